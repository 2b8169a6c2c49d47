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

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FN_SPARSE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FN_SPARSE_CLONES
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

#define FN_SPARSE_LOOPS(T, S, VT, VAL)                                                      \
FN_SPARSE_CLONES static void fn_sparse_forward_##S(                                         \
    const long long *indptr, const int *indices, const VT *data, const T *lut,            \
    const long long *rows, long long row0, long long n, const T *W, const T *b,                   \
    T *__restrict out, long long D, long long H, long long *bad)                                  \
{                                                                                           \
    for (long long i = 0; i < n; i++) {                                                       \
        long long r = rows ? rows[i] : row0 + i;                                              \
        if (i + 1 < n)                                                                      \
            fn_prefetch_row(indptr, indices, data, rows ? rows[i + 1] : r + 1, sizeof(VT)); \
        long long p = indptr[r], e = indptr[r + 1];                                           \
        T *__restrict o = out + i * H;                                                      \
        for (long long k = 0; k < H; k++) o[k] = b[k];                                        \
        for (; p + 4 <= e; p += 4) {                                                        \
            int j0 = indices[p], j1 = indices[p + 1];                                   \
            int j2 = indices[p + 2], j3 = indices[p + 3];                               \
            if ((uint32_t)j0 >= D || (uint32_t)j1 >= D || (uint32_t)j2 >= D                 \
                || (uint32_t)j3 >= D) { (*bad)++; continue; }                               \
            T v0 = VAL(p), v1 = VAL(p + 1), v2 = VAL(p + 2), v3 = VAL(p + 3);               \
            const T *w0 = W + j0 * H, *w1 = W + j1 * H, *w2 = W + j2 * H, *w3 = W + j3 * H; \
            for (long long k = 0; k < H; k++)                                                 \
                o[k] += (v0 * w0[k] + v1 * w1[k]) + (v2 * w2[k] + v3 * w3[k]);              \
        }                                                                                   \
        for (; p < e; p++) {                                                                \
            int j = indices[p];                                                         \
            if ((uint32_t)j >= D) { (*bad)++; continue; }                                   \
            T v = VAL(p);                                                                   \
            const T *w = W + j * H;                                                         \
            for (long long k = 0; k < H; k++) o[k] += v * w[k];                               \
        }                                                                                   \
    }                                                                                       \
}                                                                                           \
                                                                                            \
FN_SPARSE_CLONES static void fn_sparse_scatter_##S(                                         \
    const long long *indptr, const int *indices, const VT *data, const T *lut,            \
    const long long *rows, long long n, const T *__restrict G, T *__restrict W,                 \
    long long D, long long H, int jlo, int jhi, long long *bad)                           \
{                                                                                           \
    for (long long i = 0; i < n; i++) {                                                       \
        long long r = rows[i];                                                                \
        if (i + 1 < n) fn_prefetch_row(indptr, indices, data, rows[i + 1], sizeof(VT));     \
        long long p = indptr[r], e = indptr[r + 1];                                           \
        if (jlo > 0) p = fn_lower_bound(indices, p, e, jlo);                                \
        if (jhi < D) e = fn_lower_bound(indices, p, e, jhi);                                \
        const T *__restrict g = G + i * H;                                                  \
        for (; p < e; p++) {                                                                \
            int j = indices[p];                                                         \
            if ((uint32_t)j >= D) { (*bad)++; continue; }                                   \
            T v = VAL(p);                                                                   \
            T *__restrict w = W + j * H;                                                    \
            for (long long k = 0; k < H; k++) w[k] += v * g[k];                               \
        }                                                                                   \
    }                                                                                       \
}

#define FN_VAL_DATA(p) (data[(p)])
#define FN_VAL_PIXEL(p) (lut[data[(p)]])

FN_SPARSE_LOOPS(float, f, float, FN_VAL_DATA)
FN_SPARSE_LOOPS(double, d, double, FN_VAL_DATA)
FN_SPARSE_LOOPS(float, fu, uint8_t, FN_VAL_PIXEL)
FN_SPARSE_LOOPS(double, du, uint8_t, FN_VAL_PIXEL)

/* threads a parallel region may use (1 when built without OpenMP) */
#ifdef _OPENMP
#include <omp.h>
static int fn_max_threads(void) { return omp_get_max_threads(); }
#else
static int fn_max_threads(void) { return 1; }
#endif

#endif
