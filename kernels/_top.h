/* The layers above the first of a sparse two-layer training step, for fastnet's Cython
 * kernels: one block of the batch's rows, with each row's classes in one 64-byte vector.
 *
 * _sp_step_par in _sparse.pxi runs the batch above the first layer as TOP_BLOCKS blocks
 * of rows.  With 10 classes a row of logits is one vector (16 floats), so a whole block
 * runs here in registers, in place of three small BLAS calls (h @ W2, ds @ W2.T,
 * h.T @ ds) and the scalar loops around them (benchmarks/README.md, "Kernel layouts").
 *
 *
 *   h    = act(parts[0] + parts[1] + ...)        the first layer's sums by pixel blocks
 *   z    = h @ W2 + b2                            four rows at a time, j in order
 *   y    = softmax(z)                             z - max, exp (fn_expf/fn_exp), / sum
 *   loss = -log(y[t] + 1e-7)                      in double, as _top_rows
 *   ds   = (y - onehot(t)) / B
 *   dh   = act'(ds @ W2.T)                        ReLU: 0 where h <= 0; sigmoid: (1 - h) h
 *   G    = mlr * dh                               padded rows (lanes past H zero)
 *   sums db2 += ds, db1 += dh, dW2 += h.T ds      in row order
 *
 * W2 is read twice over, from copies the step keeps in its scratch: wp, its H rows as
 * vectors (lanes past C zero), and wt, W2.T as C rows of HP (lanes past H zero);
 * fn_top_weights writes both from W2 after each update.  Rows of up to four vectors
 * (H <= 64 floats or 32 doubles) and classes of up to one vector (C <= 16 or 8); the
 * step uses the BLAS path otherwise.  NaN and inf stay visible: a NaN logit gives a NaN
 * row and a NaN loss (the step stops on it), as the BLAS path does.
 */
#ifndef FASTNET_TOP_H
#define FASTNET_TOP_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "_vmath.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FN_TOP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FN_TOP_CLONES
#endif

#if defined(__GNUC__)
#define FN_TOP_PREFETCH(p) __builtin_prefetch(p)
#else
#define FN_TOP_PREFETCH(p) ((void)0)
#endif

#define FN_TOP_BLOCK(T, S, IT, EXP)                                                         \
typedef T fn_yvec_##S __attribute__((vector_size(64)));                                     \
typedef IT fn_ymask_##S __attribute__((vector_size(64)));                                   \
                                                                                            \
/* whether a block of H hidden units and C classes fits the vectors of fn_top_block, on */ \
/* a CPU with 64-byte registers (elsewhere the BLAS path is faster: benchmarks/README.md, */ \
/* "an AVX2 host") */                                                                       \
static int fn_top_fits_##S(long long H, long long C)                                        \
{                                                                                           \
    const long long L = 64 / sizeof(T);                                                     \
    return fn_wide_vectors() && H >= 1 && C >= 1 && C <= L && H <= 4 * L;                   \
}                                                                                           \
                                                                                            \
/* wp (H x L) and wt (C x HP) from W2 (H x C), the padding lanes zero */                    \
static void fn_top_weights_##S(const T *W2, long long H, long long C, long long HP,        \
                               T *wp, T *wt)                                                \
{                                                                                           \
    const long long L = 64 / sizeof(T);                                                     \
    memset(wp, 0, H * L * sizeof(T));                                                       \
    memset(wt, 0, C * HP * sizeof(T));                                                      \
    for (long long j = 0; j < H; j++)                                                       \
        for (long long c = 0; c < C; c++) {                                                 \
            wp[j * L + c] = W2[j * C + c];                                                  \
            wt[c * HP + j] = W2[j * C + c];                                                 \
        }                                                                                   \
}                                                                                           \
                                                                                            \
/* One block of n rows (see the top of this file).  parts: np sums of n rows of HP, q */    \
/* entries apart; labels Tl[idx[i]]; G: n rows of HP (written; first holds h, then */      \
/* mlr * dh, a group of rows at a time once dW2 has read their h); sums: db2 (C), db1 */     \
/* (H), dW2 (H x C) (written); */                                                           \
/* acc: scratch of H x L.  Rows go four at a time (their logits summed side by side); */    \
/* every sum runs in row order, so a row's results do not depend on its group. */           \
/* Returns the sum of the rows' losses, in row order. */                                    \
FN_TOP_CLONES static double fn_top_block_##S(const T *parts, long long q, int np,         \
    long long n, long long H, long long HP, int act, const T *wp, const T *wt,            \
    const T *b2, const long long *Tl, const long long *idx, long long C, long long B,     \
    T mlr, T *__restrict G, T *__restrict sums, T *__restrict acc)                        \
{                                                                                           \
    const long long L = 64 / sizeof(T), nv = HP / L;                                        \
    const fn_yvec_##S zero = {0};                                                           \
    const fn_yvec_##S *wpv = (const fn_yvec_##S *)wp, *wtv = (const fn_yvec_##S *)wt;      \
    fn_yvec_##S *av = (fn_yvec_##S *)acc;                                                   \
    const T rs = (T)(1.0 / B);                                                              \
    fn_yvec_##S bv = zero, sdb2 = zero, sdb1[4] = {zero, zero, zero, zero};                 \
    T t[64 / sizeof(T)];                                                                    \
    double loss = 0;                                                                        \
    memcpy(t, &zero, 64);                                                                   \
    memcpy(t, b2, C * sizeof(T));                                                           \
    memcpy(&bv, t, 64);                                                                     \
    for (long long j = 0; j < H; j++) av[j] = zero;                                         \
    /* the labels lie anywhere in T (all of the data set's): ask for them all at once */   \
    for (long long i = 0; i < n; i++) FN_TOP_PREFETCH(Tl + idx[i]);                         \
    /* lanes below H of each vector of a row: all bits set */                               \
    fn_ymask_##S lanes[4];                                                                  \
    for (long long k = 0; k < 4; k++) {                                                     \
        IT b[64 / sizeof(T)];                                                               \
        for (long long l = 0; l < L; l++) b[l] = k * L + l < H ? (IT)-1 : 0;                \
        memcpy(&lanes[k], b, 64);                                                           \
    }                                                                                       \
    /* h = act(sum of the parts), padded into G (lanes past H zero) */                      \
    for (long long i = 0; i < n; i++) {                                                     \
        fn_yvec_##S *g = (fn_yvec_##S *)(G + i * HP);                                       \
        for (long long k = 0; k < nv; k++) {                                                \
            fn_yvec_##S a = *(const fn_yvec_##S *)(parts + i * HP + k * L);                 \
            for (int p = 1; p < np; p++)                                                    \
                a += *(const fn_yvec_##S *)(parts + p * q + i * HP + k * L);                \
            if (act == 1) { /* 0 where a <= 0; NaN stays NaN */                             \
                a = (fn_yvec_##S)((fn_ymask_##S)a & ~(a <= zero));                          \
            } else if (act == 2) {                                                          \
                memcpy(t, &a, 64);                                                          \
                for (long long l = 0; l < L; l++) t[l] = (T)1 / ((T)1 + EXP(-t[l]));        \
                memcpy(&a, t, 64);                                                          \
            }                                                                               \
            g[k] = (fn_yvec_##S)((fn_ymask_##S)a & lanes[k]);                               \
        }                                                                                   \
    }                                                                                       \
    for (long long i = 0; i < n; i += 4) {                                                  \
        const long long rr = n - i < 4 ? n - i : 4;                                         \
        fn_yvec_##S z[4] = {zero, zero, zero, zero}, ds[4];                                 \
        /* z = h @ W2 (+ b2 below), j in order */                                           \
        if (rr == 4) {                                                                      \
            const T *h0 = G + i * HP, *h1 = h0 + HP, *h2 = h1 + HP, *h3 = h2 + HP;          \
            fn_yvec_##S z0 = zero, z1 = zero, z2 = zero, z3 = zero;                         \
            for (long long j = 0; j < H; j++) {                                             \
                z0 += h0[j] * wpv[j]; z1 += h1[j] * wpv[j];                                 \
                z2 += h2[j] * wpv[j]; z3 += h3[j] * wpv[j];                                 \
            }                                                                               \
            z[0] = z0; z[1] = z1; z[2] = z2; z[3] = z3;                                     \
        } else {                                                                            \
            for (long long r = 0; r < rr; r++) {                                            \
                const T *hr = G + (i + r) * HP;                                             \
                fn_yvec_##S zr = zero;                                                      \
                for (long long j = 0; j < H; j++) zr += hr[j] * wpv[j];                     \
                z[r] = zr;                                                                  \
            }                                                                               \
        }                                                                                   \
        for (long long r = 0; r < rr; r++) {                                                \
            /* softmax over the C lanes (a NaN logit makes the row's sum, so all of it NaN) */ \
            fn_yvec_##S zr = z[r] + bv;                                                     \
            memcpy(t, &zr, 64);                                                             \
            T m = t[0];                                                                     \
            for (long long c = 1; c < C; c++) m = t[c] > m ? t[c] : m;                      \
            for (long long l = 0; l < L; l++) t[l] = l < C ? EXP(t[l] - m) : (T)0;          \
            double s = 0;                                                                   \
            for (long long c = 0; c < C; c++) s += t[c];                                    \
            for (long long c = 0; c < C; c++) t[c] = (T)(t[c] / s);                         \
            long long lab = Tl[idx[i + r]];                                                 \
            loss -= log((double)(t[lab] + (T)1e-7));                                        \
            for (long long c = 0; c < C; c++) t[c] = t[c] * rs;                             \
            t[lab] = t[lab] - rs;                                                           \
            memcpy(&ds[r], t, 64);                                                          \
            sdb2 += ds[r];                                                                  \
        }                                                                                   \
        /* dW2 += h.T @ ds, rows in order (h: the group's rows of G, not yet overwritten) */ \
        if (rr == 4) {                                                                      \
            const T *h0 = G + i * HP, *h1 = h0 + HP, *h2 = h1 + HP, *h3 = h2 + HP;          \
            for (long long j = 0; j < H; j++) {                                             \
                fn_yvec_##S a = av[j];                                                      \
                a += h0[j] * ds[0]; a += h1[j] * ds[1];                                     \
                a += h2[j] * ds[2]; a += h3[j] * ds[3];                                     \
                av[j] = a;                                                                  \
            }                                                                               \
        } else {                                                                            \
            for (long long r = 0; r < rr; r++)                                              \
                for (long long j = 0; j < H; j++) av[j] += G[(i + r) * HP + j] * ds[r];     \
        }                                                                                   \
        for (long long r = 0; r < rr; r++) {                                                \
            /* dh = ds @ W2.T, then act'(h); G = mlr * dh */                                \
            memcpy(t, &ds[r], 64);                                                          \
            fn_yvec_##S d[4] = {zero, zero, zero, zero};                                    \
            for (long long c = 0; c < C; c++)                                               \
                for (long long k = 0; k < nv; k++) d[k] += t[c] * wtv[c * nv + k];          \
            fn_yvec_##S *g = (fn_yvec_##S *)(G + (i + r) * HP);                             \
            for (long long k = 0; k < nv; k++) {                                            \
                fn_yvec_##S hv = g[k];                                                      \
                if (act == 1) { /* dout where h > 0 (or NaN), as _map_relu_backward */      \
                    fn_ymask_##S keep = ~(hv <= zero);                                      \
                    d[k] = (fn_yvec_##S)((fn_ymask_##S)d[k] & keep);                        \
                } else if (act == 2) {                                                      \
                    d[k] = d[k] * ((T)1 - hv) * hv;                                         \
                }                                                                           \
                sdb1[k] += d[k];                                                            \
                g[k] = d[k] * mlr;                                                          \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    memcpy(t, &sdb2, 64);                                                                   \
    memcpy(sums, t, C * sizeof(T));                                                         \
    for (long long k = 0; k < nv; k++) {                                                    \
        memcpy(t, &sdb1[k], 64);                                                            \
        for (long long l = 0; l < L && k * L + l < H; l++) sums[C + k * L + l] = t[l];      \
    }                                                                                       \
    for (long long j = 0; j < H; j++)                                                       \
        for (long long c = 0; c < C; c++) sums[C + H + j * C + c] = acc[j * L + c];         \
    return loss;                                                                            \
}

FN_TOP_BLOCK(float, f, int32_t, fn_expf)
FN_TOP_BLOCK(double, d, int64_t, fn_exp)

#endif
