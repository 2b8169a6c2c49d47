/* The first layer of a dense float32 batch over its non-zero inputs (mlp_gradient).
 *
 * A batch of 100 MNIST images is 78,400 floats of which about 19% are not 0.  The two
 * products of its first layer, h = X W + b and dW = X^T dz, cost 100 x 784 x H
 * multiply-adds each when done densely (BLAS); over the non-zeros alone they are about
 * 15,000 row operations of H wide each.  So mlp_gradient, given dense rows, lists each
 * row's non-zeros and runs both products over that list, on the calling thread:
 *
 *   fn_nz_rows     the column numbers and values of each row's non-zeros in column
 *                  order (the batch as CSR rows), 16 columns at a time with AVX-512
 *                  compare and compress; gives up (returns -1) once there are more
 *                  than `most`, where the dense products are the faster way.
 *   fn_nz_forward  h[i, :] = b + the sum over row i's non-zeros of x W[k, :].
 *   fn_nz_backward dW = X^T dz: dW[k, :] += x dz[i, :] over the non-zeros.
 *
 * A non-zero is any x with x != 0, so NaN and inf in X reach h and dW as they would
 * through the dense products.  A value of W that is not finite would not (a dense
 * product multiplies it by the zeros too, giving NaN): fn_nz_finite lets the caller
 * take the dense products then.  The loops exist where GCC compiles AVX-512 code for
 * x86-64, and run where fn_nz_ready says the CPU has it; elsewhere mlp_gradient keeps
 * the dense products (a search for the non-zeros a pixel at a time costs about as much
 * as one of them).
 */
#ifndef FASTNET_NZROWS_H
#define FASTNET_NZROWS_H

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#define FN_NZ_TARGET __attribute__((target("avx512f,popcnt")))
#define FN_NZ_INLINE static inline __attribute__((always_inline)) FN_NZ_TARGET

/* 1 when this CPU (and its OS) run AVX-512F code */
static int fn_nz_ready(void)
{
    __builtin_cpu_init();  /* a no-op once libgcc's constructor has run */
    return __builtin_cpu_supports("avx512f");
}

/* lanes [j0 + 16 v, H) of vector v of a 64-lane tile starting at j0, as a mask */
FN_NZ_INLINE __mmask16 fn_nz_lanes(long long H, long long j0, int v)
{
    long long n = H - j0 - 16 * v;
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* 1 when the n floats at W are all finite */
FN_NZ_TARGET static int fn_nz_finite(const float *W, long long n)
{
    __mmask16 bad = 0;
    long long q = 0;
    for (; q + 16 <= n; q += 16) {
        __m512 w = _mm512_loadu_ps(W + q);
        bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(w, w), _mm512_setzero_ps(), _CMP_NEQ_UQ);
    }
    if (q < n) {
        __mmask16 t = (__mmask16)((1u << (n - q)) - 1);
        __m512 w = _mm512_maskz_loadu_ps(t, W + q);
        bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(w, w), _mm512_setzero_ps(), _CMP_NEQ_UQ);
    }
    return bad == 0;
}

/* Row i's non-zeros of X (B rows of D, contiguous) go to col[ptr[i] .. ptr[i + 1]) and
 * val[...] in column order.  Returns their number, or -1 as soon as it passes `most`;
 * col and val must hold most + D + 16 entries (a row is stored 16 lanes at a time). */
FN_NZ_TARGET static long long fn_nz_rows(const float *X, long long B, long long D, int *col, float *val,
                                         long long *ptr, long long most)
{
    const __m512i sixteen = _mm512_set1_epi32(16);
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    long long n = 0;
    ptr[0] = 0;
    for (long long i = 0; i < B; i++) {
        const float *x = X + i * D;
        __m512i c = first;
        long long k = 0;
        for (; k + 16 <= D; k += 16) {
            __m512 v = _mm512_loadu_ps(x + k);
            __mmask16 m = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
            /* compressed in registers and stored whole: a compressing store to memory is
             * microcoded on some CPUs */
            _mm512_storeu_ps(val + n, _mm512_maskz_compress_ps(m, v));
            _mm512_storeu_si512((void *)(col + n), _mm512_maskz_compress_epi32(m, c));
            n += _mm_popcnt_u32(m);
            c = _mm512_add_epi32(c, sixteen);
        }
        if (k < D) {
            __mmask16 t = (__mmask16)((1u << (D - k)) - 1);
            __m512 v = _mm512_maskz_loadu_ps(t, x + k);
            __mmask16 m = _mm512_mask_cmp_ps_mask(t, v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
            _mm512_storeu_ps(val + n, _mm512_maskz_compress_ps(m, v));
            _mm512_storeu_si512((void *)(col + n), _mm512_maskz_compress_epi32(m, c));
            n += _mm_popcnt_u32(m);
        }
        ptr[i + 1] = n;
        if (n > most) return -1;
    }
    return n;
}

/* The products work on tiles of 64 lanes of W's rows (the book's 50 hidden units: one
 * tile; vector v of a tile holds lanes j0 + 16 v .. j0 + 16 v + 15, masked past H).
 * The sums they update go to scratch S in rows of 64 lanes, 64-byte aligned: rows of
 * H floats side by side share cache lines, and a load that overlaps the lanes of an
 * earlier masked store to the row beside it waits for that store to reach the cache
 * (no store forwarding), a wait on almost every update of the backward (benchmarks/
 * README.md has the figures).  A tile's rows of W (or dW) are taken in blocks of FN_NZ_KC rows, which
 * stay in L1 while every batch row works through its non-zeros in that block; cur[i]
 * is how far row i's list has got. */

/* rows of W or dW a block (128 x 64 lanes: 32 kB) and batch rows of the forward's sums
 * at a time (64 x 64 lanes: 16 kB); S holds FN_NZ_SCRATCH floats for either product */
#define FN_NZ_KC 128
#define FN_NZ_RB 64
#define FN_NZ_SCRATCH (FN_NZ_KC * 64)

/* the NV vectors of a 64-lane scratch row s into lanes [j0, ...) of an output row o of
 * H floats (masks m0..m3 from fn_nz_lanes) */
FN_NZ_INLINE void fn_nz_put(const int NV, float *o, const float *s, __mmask16 m0, __mmask16 m1, __mmask16 m2,
                            __mmask16 m3)
{
    _mm512_mask_storeu_ps(o, m0, _mm512_load_ps(s));
    if (NV > 1) _mm512_mask_storeu_ps(o + 16, m1, _mm512_load_ps(s + 16));
    if (NV > 2) _mm512_mask_storeu_ps(o + 32, m2, _mm512_load_ps(s + 32));
    if (NV > 3) _mm512_mask_storeu_ps(o + 48, m3, _mm512_load_ps(s + 48));
}

FN_NZ_INLINE void fn_nz_forward_tile(const int NV, const long long *ptr, const int *col, const float *val,
                                     long long i0, long long i1, long long D, const float *W, const float *b,
                                     long long H, long long j0, float *h, float *S, long long *cur)
{
    const __mmask16 m0 = fn_nz_lanes(H, j0, 0), m1 = fn_nz_lanes(H, j0, 1);
    const __mmask16 m2 = fn_nz_lanes(H, j0, 2), m3 = fn_nz_lanes(H, j0, 3);
    for (long long i = i0; i < i1; i++) {
        float *s = S + (i - i0) * 64;
        _mm512_store_ps(s, _mm512_maskz_loadu_ps(m0, b + j0));
        _mm512_store_ps(s + 16, _mm512_maskz_loadu_ps(m1, b + j0 + 16));
        _mm512_store_ps(s + 32, _mm512_maskz_loadu_ps(m2, b + j0 + 32));
        _mm512_store_ps(s + 48, _mm512_maskz_loadu_ps(m3, b + j0 + 48));
        cur[i] = ptr[i];
    }
    for (long long k0 = 0; k0 < D; k0 += FN_NZ_KC) {
        const long long k1 = k0 + FN_NZ_KC < D ? k0 + FN_NZ_KC : D;
        for (long long i = i0; i < i1; i++) {
            long long p = cur[i];
            const long long e = ptr[i + 1];
            if (p == e || col[p] >= k1) continue;
            float *s = S + (i - i0) * 64;
            /* two sets of sums (even and odd non-zeros) so that the adds do not wait on
             * each other */
            __m512 a0 = _mm512_load_ps(s), a1 = _mm512_setzero_ps(), a2 = a1, a3 = a1;
            __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
            if (NV > 1) a1 = _mm512_load_ps(s + 16);
            if (NV > 2) a2 = _mm512_load_ps(s + 32);
            if (NV > 3) a3 = _mm512_load_ps(s + 48);
            for (; p + 1 < e && col[p + 1] < k1; p += 2) {
                const float *w = W + col[p] * H + j0, *u = W + col[p + 1] * H + j0;
                const __m512 x = _mm512_set1_ps(val[p]), y = _mm512_set1_ps(val[p + 1]);
                a0 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m0, w), a0);
                c0 = _mm512_fmadd_ps(y, _mm512_maskz_loadu_ps(m0, u), c0);
                if (NV > 1) {
                    a1 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m1, w + 16), a1);
                    c1 = _mm512_fmadd_ps(y, _mm512_maskz_loadu_ps(m1, u + 16), c1);
                }
                if (NV > 2) {
                    a2 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m2, w + 32), a2);
                    c2 = _mm512_fmadd_ps(y, _mm512_maskz_loadu_ps(m2, u + 32), c2);
                }
                if (NV > 3) {
                    a3 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m3, w + 48), a3);
                    c3 = _mm512_fmadd_ps(y, _mm512_maskz_loadu_ps(m3, u + 48), c3);
                }
            }
            if (p < e && col[p] < k1) {
                const float *w = W + col[p] * H + j0;
                const __m512 x = _mm512_set1_ps(val[p]);
                a0 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m0, w), a0);
                if (NV > 1) a1 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m1, w + 16), a1);
                if (NV > 2) a2 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m2, w + 32), a2);
                if (NV > 3) a3 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m3, w + 48), a3);
                p++;
            }
            _mm512_store_ps(s, _mm512_add_ps(a0, c0));
            if (NV > 1) _mm512_store_ps(s + 16, _mm512_add_ps(a1, c1));
            if (NV > 2) _mm512_store_ps(s + 32, _mm512_add_ps(a2, c2));
            if (NV > 3) _mm512_store_ps(s + 48, _mm512_add_ps(a3, c3));
            cur[i] = p;
        }
    }
    for (long long i = i0; i < i1; i++) fn_nz_put(NV, h + i * H + j0, S + (i - i0) * 64, m0, m1, m2, m3);
}

/* h = X W + b (B x H) over the non-zeros listed by fn_nz_rows; W is D x H; S holds
 * FN_NZ_RB x 64 floats (64-byte aligned), cur B positions */
FN_NZ_TARGET static void fn_nz_forward(const long long *ptr, const int *col, const float *val, long long B,
                                       long long D, const float *W, const float *b, long long H, float *h,
                                       float *S, long long *cur)
{
    for (long long i0 = 0; i0 < B; i0 += FN_NZ_RB) {
        const long long i1 = i0 + FN_NZ_RB < B ? i0 + FN_NZ_RB : B;
        for (long long j0 = 0; j0 < H; j0 += 64) {
            const long long n = H - j0;
            if (n > 48) fn_nz_forward_tile(4, ptr, col, val, i0, i1, D, W, b, H, j0, h, S, cur);
            else if (n > 32) fn_nz_forward_tile(3, ptr, col, val, i0, i1, D, W, b, H, j0, h, S, cur);
            else if (n > 16) fn_nz_forward_tile(2, ptr, col, val, i0, i1, D, W, b, H, j0, h, S, cur);
            else fn_nz_forward_tile(1, ptr, col, val, i0, i1, D, W, b, H, j0, h, S, cur);
        }
    }
}

FN_NZ_INLINE void fn_nz_backward_tile(const int NV, const long long *ptr, const int *col, const float *val,
                                      long long B, long long D, const float *dz, long long H, long long j0,
                                      float *dW, float *S, long long *cur)
{
    const __mmask16 m0 = fn_nz_lanes(H, j0, 0), m1 = fn_nz_lanes(H, j0, 1);
    const __mmask16 m2 = fn_nz_lanes(H, j0, 2), m3 = fn_nz_lanes(H, j0, 3);
    for (long long i = 0; i < B; i++) cur[i] = ptr[i];
    for (long long k0 = 0; k0 < D; k0 += FN_NZ_KC) {
        const long long k1 = k0 + FN_NZ_KC < D ? k0 + FN_NZ_KC : D;
        for (long long q = 0; q < (k1 - k0) * 64; q += 16) _mm512_store_ps(S + q, _mm512_setzero_ps());
        for (long long i = 0; i < B; i++) {
            long long p = cur[i];
            const long long e = ptr[i + 1];
            if (p == e || col[p] >= k1) continue;
            const float *g = dz + i * H + j0;
            const __m512 d0 = _mm512_maskz_loadu_ps(m0, g), d1 = _mm512_maskz_loadu_ps(m1, g + 16);
            const __m512 d2 = _mm512_maskz_loadu_ps(m2, g + 32), d3 = _mm512_maskz_loadu_ps(m3, g + 48);
            do {
                float *s = S + (col[p] - k0) * 64;
                const __m512 x = _mm512_set1_ps(val[p]);
                _mm512_store_ps(s, _mm512_fmadd_ps(x, d0, _mm512_load_ps(s)));
                if (NV > 1) _mm512_store_ps(s + 16, _mm512_fmadd_ps(x, d1, _mm512_load_ps(s + 16)));
                if (NV > 2) _mm512_store_ps(s + 32, _mm512_fmadd_ps(x, d2, _mm512_load_ps(s + 32)));
                if (NV > 3) _mm512_store_ps(s + 48, _mm512_fmadd_ps(x, d3, _mm512_load_ps(s + 48)));
                p++;
            } while (p < e && col[p] < k1);
            cur[i] = p;
        }
        for (long long k = k0; k < k1; k++) fn_nz_put(NV, dW + k * H + j0, S + (k - k0) * 64, m0, m1, m2, m3);
    }
}

/* dW = X^T dz (D x H) over the non-zeros listed by fn_nz_rows; dz is B x H; S holds
 * FN_NZ_SCRATCH floats (64-byte aligned), cur B positions.  Each dW[k, :] sums its terms
 * in batch-row order. */
FN_NZ_TARGET static void fn_nz_backward(const long long *ptr, const int *col, const float *val, long long B,
                                        long long D, const float *dz, long long H, float *dW, float *S,
                                        long long *cur)
{
    for (long long j0 = 0; j0 < H; j0 += 64) {
        const long long n = H - j0;
        if (n > 48) fn_nz_backward_tile(4, ptr, col, val, B, D, dz, H, j0, dW, S, cur);
        else if (n > 32) fn_nz_backward_tile(3, ptr, col, val, B, D, dz, H, j0, dW, S, cur);
        else if (n > 16) fn_nz_backward_tile(2, ptr, col, val, B, D, dz, H, j0, dW, S, cur);
        else fn_nz_backward_tile(1, ptr, col, val, B, D, dz, H, j0, dW, S, cur);
    }
}

#else /* no AVX-512 code from this compiler: mlp_gradient keeps the dense products */

#define FN_NZ_SCRATCH 16
static int fn_nz_ready(void) { return 0; }
static int fn_nz_finite(const float *W, long long n) { (void)W; (void)n; return 0; }
static long long fn_nz_rows(const float *X, long long B, long long D, int *col, float *val, long long *ptr,
                            long long most)
{
    (void)X; (void)B; (void)D; (void)col; (void)val; (void)ptr; (void)most;
    return -1;
}
static void fn_nz_forward(const long long *ptr, const int *col, const float *val, long long B, long long D,
                          const float *W, const float *b, long long H, float *h, float *S, long long *cur)
{
    (void)ptr; (void)col; (void)val; (void)B; (void)D; (void)W; (void)b; (void)H; (void)h; (void)S; (void)cur;
}
static void fn_nz_backward(const long long *ptr, const int *col, const float *val, long long B, long long D,
                           const float *dz, long long H, float *dW, float *S, long long *cur)
{
    (void)ptr; (void)col; (void)val; (void)B; (void)D; (void)dz; (void)H; (void)dW; (void)S; (void)cur;
}

#endif
#endif
