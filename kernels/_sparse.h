/* Sparse first-layer loops for fastnet's Cython kernels (rows of X stored as CSR).
 *
 * MNIST images are about 81% zero pixels.  A dense product X @ W1 of a 100-image batch
 * costs 100 x 784 x 50 multiply-adds; the same product over the non-zeros alone is
 * about 15,000 row operations of 50 wide.  Two loops do all of it:
 *
 *   fn_sparse_forward_*  out[i, :] = b + sum_p v_p * W[j_p, :]  over the non-zeros of
 *                        row rows[i] (or row0 + i).  Four non-zeros per pass share one
 *                        load/store of out[i, :], so the accumulation is not serialised
 *                        through memory on every non-zero.
 *   fn_sparse_scatter_*  W[j_p, :] += v_p * G[i, :]  over the non-zeros of rows[i] whose
 *                        column lies in [jlo, jhi): the weight update X^T G without
 *                        forming X^T G.  Each column is touched by one thread only
 *                        (threads own column ranges) and in image order, so the result
 *                        does not depend on the number of threads.
 *
 * Column indices must be sorted within each row (fastnet.sparse.SparseRows guarantees
 * it; the scatter finds [jlo, jhi) by binary search).  A column outside [0, D) is not
 * touched: the loops count it in *bad and the wrapper raises.
 *
 * Values are either the stored floats or uint8 pixels looked up in a 256-entry table
 * lut[u] = u / 255 in the working dtype (what load_mnist(normalize=True) computes).
 *
 * Built for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and baseline x86-64 with GCC's
 * target_clones where available; the loader picks one at run time.
 */
#ifndef FASTNET_SPARSE_H
#define FASTNET_SPARSE_H

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FN_SPARSE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FN_SPARSE_CLONES
#endif

/* The row helpers are inlined into each clone (they take 64-byte vectors, whose passing
 * convention differs between the clones). */
#if defined(__GNUC__)
#define FN_INLINE static inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define FN_INLINE static inline
#endif

/* Bring the CSR entries of the next row into cache while this one is worked on: rows
 * of a random batch lie far apart in a data set of tens of MB, and without it every
 * row starts with a wait for memory (measured: a quarter of the loop's time). */
static inline void fn_prefetch_row(const long long *indptr, const int *indices,
                                   const void *data, long long r, int value_size)
{
#if defined(__GNUC__)
    const char *a = (const char *)(indices + indptr[r]), *ae = (const char *)(indices + indptr[r + 1]);
    for (; a < ae; a += 64) __builtin_prefetch(a);
    const char *c = (const char *)data + indptr[r] * value_size;
    const char *ce = (const char *)data + indptr[r + 1] * value_size;
    for (; c < ce; c += 64) __builtin_prefetch(c);
#endif
}

/* first position in indices[lo:hi) whose column is >= j */
static inline long long fn_lower_bound(const int *indices, long long lo, long long hi, int j)
{
    while (lo < hi) {
        long long mid = lo + (hi - lo) / 2;
        if (indices[mid] < j) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* One hidden row is worked on as NV vectors of L lanes (64 bytes each: 16 floats or 8
 * doubles) held in registers: the vectors start at 0, L, 2L, ... and, when L does not
 * divide H, one more at H - L that overlaps the one before it.  Up to four vectors are
 * done per pass over a row's non-zeros (a net with H <= 4L, like the book's 50 hidden
 * floats, makes one pass).  Nets with H < L use the plain loops, whose trip count over
 * H is only known at run time.  The step rows of benchmarks/report.py time the result.
 *
 * The forward keeps two sets of accumulators (even and odd non-zeros) so that the adds
 * do not wait on each other.  The overlapping vector computes the same sums for its
 * shared lanes as the vector it overlaps (same operations, same order): they store the
 * same values.  In the update, the overlapping vector's shared lanes add zero, and all
 * vectors of a row of W are loaded before any is stored. */
/* The vectors v0 .. v0 + m - 1 of a row, m <= 4: their offsets off[0 .. m - 1] (the
 * unused entries repeat off[0]).  Returns m. */
static inline int fn_vec_group(long long v0, long long nv, long long nfull, long long H,
                               long long L, long long off[4])
{
    int m = nv - v0 < 4 ? (int)(nv - v0) : 4;
    for (int k = 0; k < 4; k++) {
        long long v = v0 + (k < m ? k : 0);
        off[k] = v < nfull ? v * L : H - L;
    }
    return m;
}

/* fn(m, ...) with m a constant: one instance per vector count, so that each keeps its
 * vectors in registers */
#define FN_FOR_M(m, fn, ...)                                                                \
    switch (m) {                                                                            \
    case 4: fn(4, __VA_ARGS__); break;                                                      \
    case 3: fn(3, __VA_ARGS__); break;                                                      \
    case 2: fn(2, __VA_ARGS__); break;                                                      \
    default: fn(1, __VA_ARGS__); break;                                                     \
    }

#define FN_SPARSE_LOOPS(T, S, VT, VAL)                                                      \
typedef T fn_vec_##S __attribute__((vector_size(64), aligned(sizeof(T))));                  \
FN_INLINE fn_vec_##S fn_ld_##S(const T *p)                                              \
{ fn_vec_##S v; memcpy(&v, p, sizeof v); return v; }                                        \
FN_INLINE void fn_st_##S(T *p, fn_vec_##S v) { memcpy(p, &v, sizeof v); }              \
                                                                                            \
/* plain loops: any H */                                                                    \
FN_INLINE void fn_forward_row_plain_##S(const int *indices, const VT *data,            \
    const T *lut, long long p, long long e, const T *W, const T *b, T *__restrict o,      \
    long long D, long long H, long long *bad)                                             \
{                                                                                           \
    for (long long k = 0; k < H; k++) o[k] = b[k];                                          \
    for (; p + 4 <= e; p += 4) {                                                            \
        int j0 = indices[p], j1 = indices[p + 1];                                           \
        int j2 = indices[p + 2], j3 = indices[p + 3];                                       \
        if ((uint32_t)j0 >= D || (uint32_t)j1 >= D || (uint32_t)j2 >= D                     \
            || (uint32_t)j3 >= D) { (*bad)++; continue; }                                   \
        T v0 = VAL(p), v1 = VAL(p + 1), v2 = VAL(p + 2), v3 = VAL(p + 3);                   \
        const T *w0 = W + j0 * H, *w1 = W + j1 * H, *w2 = W + j2 * H, *w3 = W + j3 * H;     \
        for (long long k = 0; k < H; k++)                                                   \
            o[k] += (v0 * w0[k] + v1 * w1[k]) + (v2 * w2[k] + v3 * w3[k]);                  \
    }                                                                                       \
    for (; p < e; p++) {                                                                    \
        int j = indices[p];                                                                 \
        if ((uint32_t)j >= D) { (*bad)++; continue; }                                       \
        T v = VAL(p);                                                                       \
        const T *w = W + j * H;                                                             \
        for (long long k = 0; k < H; k++) o[k] += v * w[k];                                 \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* vectors v0 .. v0 + m - 1 (m <= 4) of one output row */                                  \
FN_INLINE void fn_forward_row_vec_##S(int m, const int *indices, const VT *data,       \
    const T *lut, long long p, long long e, const T *W, const T *b, T *__restrict o,      \
    long long D, long long H, long long o0, long long o1, long long o2, long long o3,      \
    int count_bad, long long *bad)                                                          \
{                                                                                           \
    fn_vec_##S a0 = fn_ld_##S(b + o0), a1 = fn_ld_##S(b + o1);                              \
    fn_vec_##S a2 = fn_ld_##S(b + o2), a3 = fn_ld_##S(b + o3);                              \
    fn_vec_##S c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};                                      \
    for (; p + 2 <= e; p += 2) {                                                            \
        int j = indices[p], k = indices[p + 1];                                             \
        T v = VAL(p), u = VAL(p + 1);                                                       \
        if ((uint32_t)j >= D || (uint32_t)k >= D) {                                         \
            if (count_bad) *bad += ((uint32_t)j >= D) + ((uint32_t)k >= D);                 \
            if ((uint32_t)j >= D) { j = 0; v = 0; }                                         \
            if ((uint32_t)k >= D) { k = 0; u = 0; }                                         \
        }                                                                                   \
        const T *w = W + (long long)j * H, *x = W + (long long)k * H;                       \
        a0 += v * fn_ld_##S(w + o0); c0 += u * fn_ld_##S(x + o0);                           \
        if (m > 1) { a1 += v * fn_ld_##S(w + o1); c1 += u * fn_ld_##S(x + o1); }            \
        if (m > 2) { a2 += v * fn_ld_##S(w + o2); c2 += u * fn_ld_##S(x + o2); }            \
        if (m > 3) { a3 += v * fn_ld_##S(w + o3); c3 += u * fn_ld_##S(x + o3); }            \
    }                                                                                       \
    if (p < e) {                                                                            \
        int j = indices[p];                                                                 \
        if ((uint32_t)j >= D) { if (count_bad) (*bad)++; }                                  \
        else {                                                                              \
            T v = VAL(p);                                                                   \
            const T *w = W + (long long)j * H;                                              \
            a0 += v * fn_ld_##S(w + o0);                                                    \
            if (m > 1) a1 += v * fn_ld_##S(w + o1);                                         \
            if (m > 2) a2 += v * fn_ld_##S(w + o2);                                         \
            if (m > 3) a3 += v * fn_ld_##S(w + o3);                                         \
        }                                                                                   \
    }                                                                                       \
    if (m > 3) fn_st_##S(o + o3, a3 + c3);                                                  \
    if (m > 2) fn_st_##S(o + o2, a2 + c2);                                                  \
    if (m > 1) fn_st_##S(o + o1, a1 + c1);                                                  \
    fn_st_##S(o + o0, a0 + c0);                                                             \
}                                                                                           \
                                                                                            \
FN_SPARSE_CLONES static void fn_sparse_forward_##S(                                         \
    const long long *indptr, const int *indices, const VT *data, const T *lut,            \
    const long long *rows, long long row0, long long n, const T *W, const T *b,           \
    T *__restrict out, long long D, long long H, long long *bad)                          \
{                                                                                           \
    const long long L = 64 / sizeof(T), nfull = H / L, nv = nfull + (H % L != 0);           \
    for (long long i = 0; i < n; i++) {                                                     \
        long long r = rows ? rows[i] : row0 + i;                                            \
        if (i + 1 < n)                                                                      \
            fn_prefetch_row(indptr, indices, data, rows ? rows[i + 1] : r + 1, sizeof(VT)); \
        long long p = indptr[r], e = indptr[r + 1];                                         \
        T *__restrict o = out + i * H;                                                      \
        if (H < L) {                                                                        \
            fn_forward_row_plain_##S(indices, data, lut, p, e, W, b, o, D, H, bad);         \
            continue;                                                                       \
        }                                                                                   \
        for (long long v0 = 0; v0 < nv; v0 += 4) {                                          \
            long long off[4];                                                               \
            int m = fn_vec_group(v0, nv, nfull, H, L, off);                                 \
            FN_FOR_M(m, fn_forward_row_vec_##S, indices, data, lut, p, e, W, b, o, D, H,    \
                     off[0], off[1], off[2], off[3], v0 == 0, bad)                          \
        }                                                                                   \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* W[j] += v G[i] over columns [p, e) of one row, vectors v0 .. v0 + m - 1; lanes of the */ \
/* overlapping vector that the vector before it covers add zero (keep[] is 0 there) */      \
FN_INLINE void fn_scatter_row_vec_##S(int m, const int *indices, const VT *data,       \
    const T *lut, long long p, long long e, const T *__restrict g, T *__restrict W,       \
    long long D, long long H, long long o0, long long o1, long long o2, long long o3,      \
    fn_vec_##S keep3, long long *bad)                                                     \
{                                                                                           \
    fn_vec_##S g0 = fn_ld_##S(g + o0), g1 = fn_ld_##S(g + o1);                              \
    fn_vec_##S g2 = fn_ld_##S(g + o2), g3 = fn_ld_##S(g + o3);                              \
    if (m == 4) g3 *= keep3; else if (m == 3) g2 *= keep3;                                  \
    else if (m == 2) g1 *= keep3; else g0 *= keep3;                                         \
    for (; p < e; p++) {                                                                    \
        int j = indices[p];                                                                 \
        if ((uint32_t)j >= D) { if (bad) (*bad)++; continue; }                              \
        T v = VAL(p);                                                                       \
        T *w = W + (long long)j * H;                                                        \
        fn_vec_##S w0 = fn_ld_##S(w + o0), w1 = {0}, w2 = {0}, w3 = {0};                    \
        if (m > 1) w1 = fn_ld_##S(w + o1);                                                  \
        if (m > 2) w2 = fn_ld_##S(w + o2);                                                  \
        if (m > 3) w3 = fn_ld_##S(w + o3);                                                  \
        if (m > 3) fn_st_##S(w + o3, w3 + v * g3);                                          \
        if (m > 2) fn_st_##S(w + o2, w2 + v * g2);                                          \
        if (m > 1) fn_st_##S(w + o1, w1 + v * g1);                                          \
        fn_st_##S(w + o0, w0 + v * g0);                                                     \
    }                                                                                       \
}                                                                                           \
                                                                                            \
FN_SPARSE_CLONES static void fn_sparse_scatter_##S(                                         \
    const long long *indptr, const int *indices, const VT *data, const T *lut,            \
    const long long *rows, long long n, const T *__restrict G, T *__restrict W,           \
    long long D, long long H, int jlo, int jhi, long long *bad)                           \
{                                                                                           \
    const long long L = 64 / sizeof(T), nfull = H / L, nv = nfull + (H % L != 0);           \
    fn_vec_##S ones, keep;                                                                  \
    for (long long l = 0; l < L; l++) {                                                     \
        ones[l] = 1;                                                                        \
        keep[l] = (H % L != 0 && H - L + l < nfull * L) ? 0 : 1;                            \
    }                                                                                       \
    for (long long i = 0; i < n; i++) {                                                     \
        long long r = rows[i];                                                              \
        if (i + 1 < n) fn_prefetch_row(indptr, indices, data, rows[i + 1], sizeof(VT));     \
        long long p = indptr[r], e = indptr[r + 1];                                         \
        if (jlo > 0) p = fn_lower_bound(indices, p, e, jlo);                                \
        if (jhi < D) e = fn_lower_bound(indices, p, e, jhi);                                \
        const T *__restrict g = G + i * H;                                                  \
        if (H < L) {                                                                        \
            for (; p < e; p++) {                                                            \
                int j = indices[p];                                                         \
                if ((uint32_t)j >= D) { (*bad)++; continue; }                               \
                T v = VAL(p);                                                               \
                T *__restrict w = W + j * H;                                                \
                for (long long k = 0; k < H; k++) w[k] += v * g[k];                         \
            }                                                                               \
            continue;                                                                       \
        }                                                                                   \
        for (long long v0 = 0; v0 < nv; v0 += 4) {                                          \
            long long off[4];                                                               \
            int m = fn_vec_group(v0, nv, nfull, H, L, off);                                 \
            /* only the last group holds the overlapping vector, as its last vector */      \
            FN_FOR_M(m, fn_scatter_row_vec_##S, indices, data, lut, p, e, g, W, D, H,       \
                     off[0], off[1], off[2], off[3], v0 + m == nv ? keep : ones,            \
                     v0 == 0 ? bad : NULL)                                                  \
        }                                                                                   \
    }                                                                                       \
}

#define FN_VAL_DATA(p) (data[(p)])
#define FN_VAL_PIXEL(p) (lut[data[(p)]])

FN_SPARSE_LOOPS(float, fv, float, FN_VAL_DATA)
FN_SPARSE_LOOPS(double, dv, double, FN_VAL_DATA)
FN_SPARSE_LOOPS(float, fu, uint8_t, FN_VAL_PIXEL)
FN_SPARSE_LOOPS(double, du, uint8_t, FN_VAL_PIXEL)

/* The entry points, one per working dtype: data holds uint8 pixels (pix != 0, looked up
 * in lut) or values of the working dtype. */
#define FN_SPARSE_ENTRIES(T, S)                                                             \
static void fn_sparse_forward_##S(                                                          \
    const long long *indptr, const int *indices, const void *data, int pix, const T *lut, \
    const long long *rows, long long row0, long long n, const T *W, const T *b, T *out,   \
    long long D, long long H, long long *bad)                                             \
{                                                                                           \
    if (pix)                                                                                \
        fn_sparse_forward_##S##u(indptr, indices, (const uint8_t *)data, lut, rows, row0, n, \
                                 W, b, out, D, H, bad);                                     \
    else                                                                                    \
        fn_sparse_forward_##S##v(indptr, indices, (const T *)data, lut, rows, row0, n,      \
                                 W, b, out, D, H, bad);                                     \
}                                                                                           \
static void fn_sparse_scatter_##S(                                                          \
    const long long *indptr, const int *indices, const void *data, int pix, const T *lut, \
    const long long *rows, long long n, const T *G, T *W, long long D, long long H,       \
    int jlo, int jhi, long long *bad)                                                     \
{                                                                                           \
    if (pix)                                                                                \
        fn_sparse_scatter_##S##u(indptr, indices, (const uint8_t *)data, lut, rows, n, G, W, \
                                 D, H, jlo, jhi, bad);                                      \
    else                                                                                    \
        fn_sparse_scatter_##S##v(indptr, indices, (const T *)data, lut, rows, n, G, W,      \
                                 D, H, jlo, jhi, bad);                                      \
}

FN_SPARSE_ENTRIES(float, f)
FN_SPARSE_ENTRIES(double, d)

/* threads a parallel region may use (1 when built without OpenMP) */
#ifdef _OPENMP
#include <omp.h>
static int fn_max_threads(void) { return omp_get_max_threads(); }
#else
static int fn_max_threads(void) { return 1; }
#endif

#endif
