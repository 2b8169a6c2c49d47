/* Sparse first-layer loops for fastnet's Cython kernels (rows of X stored as CSR).
 *
 * MNIST images are about 81% zero pixels.  A dense product X @ W1 of a 100-image batch
 * costs 100 x 784 x 50 multiply-adds; the same product over the non-zeros alone is
 * about 15,000 row operations of 50 wide.  These loops do all of it:
 *
 *   fn_sparse_forward_*  out[i, :] = b + sum_p v_p * W[j_p, :]  over the non-zeros of
 *                        row row0 + i (consecutive rows: a layer's output, an evaluation).
 *                        The output row is held in registers over all of the row's
 *                        non-zeros and stored once.
 *   fn_sparse_forward_cols_*  the same over the non-zeros whose column lies in
 *                        [jlo, jhi) only: a training step's forward by blocks of W's rows,
 *                        each block on the thread that also updates those rows (the
 *                        partial sums are added up by fn_sum_parts).
 *   fn_sparse_scatter_*  W[j_p, :] += v_p * G[i, :]  over the non-zeros of rows[i] whose
 *                        column lies in [jlo, jhi): the weight update X^T G without
 *                        forming X^T G.  Each column is touched by one thread only
 *                        (threads own column ranges) and in image order, so the result
 *                        does not depend on the number of threads.
 *
 * W, b and G are read in a padded layout (rows of a whole number of 64-byte vectors,
 * aligned; see fn_padded below); the wrappers in _cython.pyx copy into it.
 *
 * Column indices must be sorted within each row (the sparse_rows kernel builds them so;
 * the scatter finds [jlo, jhi) by binary search).  A column outside [0, D) is not
 * touched: the loops count it in *bad and the wrapper raises.
 *
 * Values are either the stored floats or uint8 pixels looked up in a 256-entry table
 * lut[u] = u / 255 in the working dtype (what load_mnist(normalize=True) computes).
 *
 * Built for x86-64-v4 (AVX-512) in 64-byte vectors, and for x86-64-v3 (AVX2 + FMA) and
 * baseline x86-64 in 32-byte ones (see FN_SPARSE_LOOPS below); the CPU picks at run time.
 */
#ifndef FASTNET_SPARSE_H
#define FASTNET_SPARSE_H

#include <stdint.h>
#include <string.h>
#include "_vmath.h"

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

/* Bring the n bytes at p into cache: a row of a random batch, asked for while the row
 * before it is worked on.  Rows of a random batch lie far apart in a data set of tens of
 * MB (dense or CSR), and without it every row starts with a wait for memory. */
static inline void fn_prefetch_bytes(const void *p, long long n)
{
#if defined(__GNUC__)
    for (long long at = 0; at < n; at += 64) __builtin_prefetch((const char *)p + at);
#else
    (void)p; (void)n;
#endif
}

/* the CSR entries of row r (its column indices and values), as fn_prefetch_bytes */
static inline void fn_prefetch_row(const long long *indptr, const int *indices,
                                   const void *data, long long r, int value_size)
{
    long long nnz = indptr[r + 1] - indptr[r];
    fn_prefetch_bytes(indices + indptr[r], nnz * (long long)sizeof(int));
    fn_prefetch_bytes((const char *)data + indptr[r] * value_size, nnz * value_size);
}

/* Read the CSR entries of rows[0 .. n) (one load per 64-byte line; the rows two ahead
 * prefetched, and their row pointers, which miss the cache too, four ahead) before the
 * work on them starts.  The rows of a random batch come from memory; prefetching a row
 * ahead inside the forward loop does not hide that, since there the loads of W keep the
 * cache's miss buffers busy.  So a pass of its own over the thread's rows comes first,
 * and the forward and the update that follow in the same step find the rows in cache
 * (benchmarks/README.md, "Kernel layouts"). */
static inline void fn_touch_rows(const long long *indptr, const int *indices, const void *data,
                                 const long long *rows, long long n, int value_size)
{
    unsigned sum = 0;
    for (long long i = 0; i < n; i++) {
#if defined(__GNUC__)
        if (i + 4 < n) __builtin_prefetch(indptr + rows[i + 4]);
#endif
        if (i + 2 < n) fn_prefetch_row(indptr, indices, data, rows[i + 2], value_size);
        const volatile char *a = (const volatile char *)(indices + indptr[rows[i]]);
        const volatile char *ae = (const volatile char *)(indices + indptr[rows[i] + 1]);
        for (; a < ae; a += 64) sum += *a;
        const volatile char *c = (const volatile char *)data + indptr[rows[i]] * value_size;
        const volatile char *ce = (const volatile char *)data + indptr[rows[i] + 1] * value_size;
        for (; c < ce; c += 64) sum += *c;
    }
    (void)sum;
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

/* The loops take W in strips of columns where its rows in use (a step's block of rows
 * [jlo, jhi) in fn_sparse_forward_cols and fn_sparse_scatter, all D in the evaluation's
 * fn_sparse_forward) are more than FN_STRIP_BYTES: every row of the batch (or block of
 * rows) works through one strip before the next strip starts, so that the strip of W
 * stays in L2 while the rows read it.  Taken whole, a wide layer does not fit (784 x
 * 1,024 floats: 3.2 MB), and each non-zero would bring a row of W from L3 or memory.
 * Each output vector still sums its terms in the same order, so the strips change no
 * bit.  FN_STRIP_BYTES: half the 256 kB L2 of the smaller x86-64 cores; a strip is a
 * whole number of the loops' groups of 4 vectors.  FN_ROW_CHUNK: the batch rows whose
 * ranges of non-zeros a step's loops find at a time. */
#define FN_STRIP_BYTES (128 * 1024)
#define FN_ROW_CHUNK 128

/* vectors a strip of `rows` rows of W (vectors of vbytes), of nv vectors in all */
static inline long long fn_strip_vectors(long long rows, long long vbytes, long long nv)
{
    if (rows * nv * vbytes <= FN_STRIP_BYTES) return nv;
    long long sv = FN_STRIP_BYTES / (rows * vbytes) / 4 * 4;
    return sv < 4 ? 4 : sv;
}

/* ps[i], es[i]: the non-zeros of row rows[i] whose column lies in [jlo, jhi) */
static inline void fn_row_ranges(const long long *indptr, const int *indices, const long long *rows,
                                 long long n, long long D, int jlo, int jhi, long long *ps, long long *es)
{
    for (long long i = 0; i < n; i++) {
        long long p = indptr[rows[i]], e = indptr[rows[i] + 1];
        if (jlo > 0) p = fn_lower_bound(indices, p, e, jlo);
        if (jhi < D) e = fn_lower_bound(indices, p, e, jhi);
        ps[i] = p;
        es[i] = e;
    }
}

/* The padded layout.  The loops read W, b and G with rows of HP entries: H rounded up
 * to whole 64-byte lines of lanes (L = 16 floats or 8 doubles), each row 64-byte
 * aligned, the lanes past H zero.  Every vector load and store of W is then whole and
 * aligned: rows of the book's 50 floats (200 bytes) would otherwise start anywhere in a
 * cache line, and a 64-byte load across two lines costs two (a quarter of the forward
 * and of the update; benchmarks/README.md, "Kernel layouts").  A row of 16 lines or more
 * gets an odd number of them (one more line where the count is even): the caches pick a
 * line's set from the address bits below 4 kB (L1) or 64 kB (L2), so rows of 1,024
 * floats, 4 kB apart, would all put the same column in the same few sets, and the loops,
 * which read the rows of a batch's non-zeros one after the other, would find almost
 * none of them in cache (without the extra line a step of 784-1,024-10 takes more than
 * twice as long as one of 784-1,000-10; benchmarks/README.md, "Wide layers").  The wrappers copy W into the layout once per
 * call (fn_pad_rows) and back after it; a call of many training steps pays that once.
 * The forward writes its output unpadded (rows of H). */
#define FN_ODD_LINES 16
static long long fn_padded(long long H, long long tsize)
{
    long long L = 64 / tsize, lines = (H + L - 1) / L;
    if (lines >= FN_ODD_LINES && lines % 2 == 0) lines++;
    return lines * L;
}

/* n rows of w entries (tsize bytes each) into rows of wp entries, zero past w */
static void fn_pad_rows(const void *src, long long n, long long w, void *dst, long long wp,
                        long long tsize)
{
    for (long long i = 0; i < n; i++) {
        memcpy((char *)dst + i * wp * tsize, (const char *)src + i * w * tsize, w * tsize);
        memset((char *)dst + (i * wp + w) * tsize, 0, (wp - w) * tsize);
    }
}

/* the first w entries of n rows of wp entries, into rows of w entries */
static void fn_unpad_rows(const void *src, long long n, long long wp, void *dst, long long w,
                          long long tsize)
{
    for (long long i = 0; i < n; i++)
        memcpy((char *)dst + i * w * tsize, (const char *)src + i * wp * tsize, w * tsize);
}

/* The split layout of W.  When H is a few lanes more than whole vectors (H mod L = t
 * with 0 < t <= Q, Q = 16 bytes of lanes: the book's 50 floats are 3 vectors and 2),
 * W's rows hold only the HM = H - t lanes of the whole vectors (rows of HM, 64-byte
 * aligned), and the t lanes left over are kept apart, after all D rows of W, in rows of
 * Q entries (16 bytes, zero past t).  A non-zero then reads HM / L cache lines of W and
 * 16 bytes of tails, which fit in L1 (MNIST: 784 rows, 12.5 kB), instead of HM / L + 1
 * lines: the loops are bound by the lines they bring from L2.  The forward over
 * consecutive rows (fn_sparse_forward: the evaluation, sparse_affine) reads W so; b
 * keeps its padded row.  The training step keeps the plain layout: its update is bound
 * by other things than these lines, and there the split is no faster (both measured:
 * benchmarks/README.md, "Kernel layouts").
 * fn_w_main returns HM for the split layout, 0 for the plain padded one (rows of HP). */
static long long fn_w_main(long long H, long long tsize)
{
    long long L = 64 / tsize, Q = 16 / tsize, t = H % L;
    return H >= L && t > 0 && t <= Q ? H - t : 0;
}

/* bytes of W (D rows of H) in its layout (split: the split layout where H allows it),
 * a whole number of 64-byte lines */
static size_t fn_w_bytes(long long D, long long H, long long tsize, int split)
{
    long long HM = split ? fn_w_main(H, tsize) : 0;
    size_t n = HM ? (size_t)D * (HM + 16 / tsize) * tsize : (size_t)D * fn_padded(H, tsize) * tsize;
    return (n + 63) / 64 * 64;
}

/* rows [r0, r1) of W (D rows of H, dense) into Wl, W in its layout (as fn_w_bytes), or
 * back when `back` */
static void fn_w_rows(void *W, long long D, long long H, void *Wl, long long r0, long long r1,
                      long long tsize, int split, int back)
{
    long long HM = split ? fn_w_main(H, tsize) : 0;
    if (!HM) {
        long long HP = fn_padded(H, tsize);
        char *l = (char *)Wl + r0 * HP * tsize;
        if (back) fn_unpad_rows(l, r1 - r0, HP, (char *)W + r0 * H * tsize, H, tsize);
        else fn_pad_rows((char *)W + r0 * H * tsize, r1 - r0, H, l, HP, tsize);
        return;
    }
    long long Q = 16 / tsize, t = H - HM;
    char *m = (char *)Wl + r0 * HM * tsize, *q = (char *)Wl + (D * HM + r0 * Q) * tsize;
    for (long long r = r0; r < r1; r++, m += HM * tsize, q += Q * tsize) {
        char *w = (char *)W + r * H * tsize;
        if (back) {
            memcpy(w, m, HM * tsize);
            memcpy(w + HM * tsize, q, t * tsize);
        } else {
            memcpy(m, w, HM * tsize);
            memcpy(q, w + HM * tsize, t * tsize);
            memset(q + t * tsize, 0, (Q - t) * tsize);
        }
    }
}

/* Scratch memory for the padded copies, 64-byte aligned.  One block is kept between
 * calls (grown when a call needs more) so that a step at a time does not map and fault
 * in fresh pages on every call; a call that finds it in use (another thread) gets a block
 * of its own.  fn_scratch_take returns NULL when out of memory. */
#include <stdlib.h>
static void *fn_scratch_block;
static size_t fn_scratch_bytes;
static int fn_scratch_busy;

static void *fn_scratch_take(size_t bytes)
{
    bytes = (bytes + 63) / 64 * 64;
    if (bytes == 0) bytes = 64;
    if (!__atomic_exchange_n(&fn_scratch_busy, 1, __ATOMIC_ACQUIRE)) {
        void *block = fn_scratch_block;
        if (fn_scratch_bytes < bytes) {
            free(block);
            block = aligned_alloc(64, bytes);
            fn_scratch_bytes = block ? bytes : 0;
            /* read without the flag by fn_scratch_give of other callers */
            __atomic_store_n(&fn_scratch_block, block, __ATOMIC_RELAXED);
        }
        if (block) return block;
        __atomic_store_n(&fn_scratch_busy, 0, __ATOMIC_RELEASE);
        return NULL;
    }
    return aligned_alloc(64, bytes);
}

static void fn_scratch_give(void *p)
{
    /* a block of one's own is never the kept one: both are live when compared */
    if (p != NULL && p == __atomic_load_n(&fn_scratch_block, __ATOMIC_RELAXED))
        __atomic_store_n(&fn_scratch_busy, 0, __ATOMIC_RELEASE);
    else
        free(p);
}

/* A row is worked on as its NV = HP / L vectors, held in registers, up to four per
 * pass over the row's non-zeros (the book's 50 hidden floats: one pass of four).
 * The forward keeps two sets of accumulators (even and odd non-zeros) so that the adds
 * do not wait on each other; the update loads all vectors of a row of W before it
 * stores any.  The step rows of benchmarks/report.py time the result. */

/* fn(m, ...) with m a constant: one instance per vector count, so that each keeps its
 * vectors in registers */
#define FN_FOR_M(m, fn, ...)                                                                \
    switch (m) {                                                                            \
    case 4: fn(4, __VA_ARGS__); break;                                                      \
    case 3: fn(3, __VA_ARGS__); break;                                                      \
    case 2: fn(2, __VA_ARGS__); break;                                                      \
    default: fn(1, __VA_ARGS__); break;                                                     \
    }

/* the same with a flag h (0 or 1) as a second constant */
#define FN_FOR_MH(m, h, fn, ...)                                                            \
    switch ((m) * 2 + (h)) {                                                                \
    case 8: fn(4, 0, __VA_ARGS__); break;                                                   \
    case 9: fn(4, 1, __VA_ARGS__); break;                                                   \
    case 6: fn(3, 0, __VA_ARGS__); break;                                                   \
    case 7: fn(3, 1, __VA_ARGS__); break;                                                   \
    case 4: fn(2, 0, __VA_ARGS__); break;                                                   \
    case 5: fn(2, 1, __VA_ARGS__); break;                                                   \
    case 2: fn(1, 0, __VA_ARGS__); break;                                                   \
    default: fn(1, 1, __VA_ARGS__); break;                                                  \
    }

#define FN_SPARSE_LOOPS(T, S, VT, VAL, VB, ATTR)                                            \
typedef T fn_vec_##S __attribute__((vector_size(VB)));                                      \
typedef T fn_uvec_##S __attribute__((vector_size(VB), aligned(sizeof(T))));                 \
typedef T fn_hvec_##S __attribute__((vector_size(VB / 2)));                                  \
typedef T fn_qvec_##S __attribute__((vector_size(16)));                                      \
                                                                                            \
/* the tail lanes of a split row (see fn_w_main): lanes [off, H) of an unpadded output */  \
/* row of H entries, H - off <= Q */                                                        \
FN_INLINE void fn_put_tail_##S(T *o, long long off, long long H, fn_qvec_##S q)            \
{                                                                                           \
    T t[16 / sizeof(T)];                                                                    \
    memcpy(t, &q, sizeof q);                                                                \
    memcpy(o + off, t, (H - off) * sizeof(T));                                              \
}                                                                                           \
                                                                                            \
/* vector k of an unpadded output row of H entries, lanes [off, off + L): whole, or the */  \
/* lanes below H (none: 32-byte vectors past H in a row padded to 64 bytes) */              \
FN_INLINE void fn_put_##S(T *o, long long off, long long H, fn_vec_##S a)                  \
{                                                                                           \
    const long long L = VB / sizeof(T);                                                     \
    if (off + L <= H) { fn_uvec_##S u = a; memcpy(o + off, &u, sizeof u); }                 \
    else if (off < H) { T t[VB / sizeof(T)]; memcpy(t, &a, sizeof a); memcpy(o + off, t, (H - off) * sizeof(T)); } \
}                                                                                           \
                                                                                            \
/* vectors v0 .. v0 + m - 1 (m <= 4) of one output row; W (rows of WS), b at vector v0; */ \
/* with `tail`, then the tail lanes of the split layout (Wq: the tail rows) */              \
FN_INLINE void fn_forward_row_##S(int m, int tail, const int *indices, const VT *data,  \
    const T *lut, long long p, long long e, const T *W, const T *Wq, const T *b,          \
    T *__restrict o, long long off, long long D, long long H, long long WS, int count_bad, \
    long long *bad)                                                                       \
{                                                                                           \
    const fn_vec_##S *bv = (const fn_vec_##S *)b; /* NULL: start from zero */               \
    const long long Q = 16 / sizeof(T);                                                     \
    fn_vec_##S a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                      \
    fn_vec_##S c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};                                      \
    fn_qvec_##S qa = {0}, qc = {0};                                                         \
    if (bv) {                                                                               \
        a0 = bv[0];                                                                         \
        if (m > 1) a1 = bv[1];                                                              \
        if (m > 2) a2 = bv[2];                                                              \
        if (m > 3) a3 = bv[3];                                                              \
        if (tail) memcpy(&qa, b + m * (VB / sizeof(T)), sizeof qa);                         \
    }                                                                                       \
    for (; p + 2 <= e; p += 2) {                                                            \
        int j = indices[p], k = indices[p + 1];                                             \
        T v = VAL(p), u = VAL(p + 1);                                                       \
        if ((uint32_t)j >= D || (uint32_t)k >= D) {                                         \
            if (count_bad) *bad += ((uint32_t)j >= D) + ((uint32_t)k >= D);                 \
            if ((uint32_t)j >= D) { j = 0; v = 0; }                                         \
            if ((uint32_t)k >= D) { k = 0; u = 0; }                                         \
        }                                                                                   \
        const fn_vec_##S *w = (const fn_vec_##S *)(W + (long long)j * WS);                  \
        const fn_vec_##S *x = (const fn_vec_##S *)(W + (long long)k * WS);                  \
        a0 += v * w[0]; c0 += u * x[0];                                                     \
        if (m > 1) { a1 += v * w[1]; c1 += u * x[1]; }                                      \
        if (m > 2) { a2 += v * w[2]; c2 += u * x[2]; }                                      \
        if (m > 3) { a3 += v * w[3]; c3 += u * x[3]; }                                      \
        if (tail) {                                                                         \
            qa += v * *(const fn_qvec_##S *)(Wq + (long long)j * Q);                        \
            qc += u * *(const fn_qvec_##S *)(Wq + (long long)k * Q);                        \
        }                                                                                   \
    }                                                                                       \
    if (p < e) {                                                                            \
        int j = indices[p];                                                                 \
        if ((uint32_t)j >= D) { if (count_bad) (*bad)++; }                                  \
        else {                                                                              \
            T v = VAL(p);                                                                   \
            const fn_vec_##S *w = (const fn_vec_##S *)(W + (long long)j * WS);              \
            a0 += v * w[0];                                                                 \
            if (m > 1) a1 += v * w[1];                                                      \
            if (m > 2) a2 += v * w[2];                                                      \
            if (m > 3) a3 += v * w[3];                                                      \
            if (tail) qa += v * *(const fn_qvec_##S *)(Wq + (long long)j * Q);              \
        }                                                                                   \
    }                                                                                       \
    const long long L = VB / sizeof(T);                                                     \
    if (tail) fn_put_tail_##S(o, off + m * L, H, qa + qc);                                  \
    if (m > 3) fn_put_##S(o, off + 3 * L, H, a3 + c3);                                      \
    if (m > 2) fn_put_##S(o, off + 2 * L, H, a2 + c2);                                      \
    if (m > 1) fn_put_##S(o, off + L, H, a1 + c1);                                          \
    fn_put_##S(o, off, H, a0 + c0);                                                         \
}                                                                                           \
                                                                                            \
/* out[i, :H] = b + sum_p v_p W[j_p, :] over the non-zeros of row row0 + i; W in the */  \
/* split layout where H allows it (fn_w_main; as fn_w_rows with split), else padded, */     \
/* b padded (rows of HP), out unpadded (rows of H) */                                       \
ATTR static void fn_sparse_forward_##S(                                                     \
    const long long *indptr, const int *indices, const VT *data, const T *lut,            \
    long long row0, long long n, const T *W, const T *b,                                  \
    T *__restrict out, long long D, long long H, long long HP, long long *bad)            \
{                                                                                           \
    const long long L = VB / sizeof(T), HM = fn_w_main(H, sizeof(T));                       \
    const long long WS = HM ? HM : HP, nv = HM ? HM / L : (H + L - 1) / L;                  \
    const T *Wq = W + D * WS; /* the tail rows, when split */                               \
    const long long sv = fn_strip_vectors(D, L * (long long)sizeof(T), nv);                 \
    for (long long s0 = 0; s0 < nv; s0 += sv)                                               \
        for (long long i = 0; i < n; i++) {                                                 \
            long long r = row0 + i;                                                         \
            if (s0 == 0 && i + 1 < n) /* the next row's entries while this one is worked on */ \
                fn_prefetch_row(indptr, indices, data, r + 1, sizeof(VT));                  \
            long long p = indptr[r], e = indptr[r + 1];                                     \
            for (long long v0 = s0; v0 < nv && v0 < s0 + sv; v0 += 4) {                     \
                int m = nv - v0 < 4 ? (int)(nv - v0) : 4;                                   \
                FN_FOR_MH(m, HM && v0 + m == nv, fn_forward_row_##S, indices, data, lut, p, e, \
                          W + v0 * L, Wq, b + v0 * L, out + i * H, v0 * L, D, H, WS, v0 == 0, bad) \
            }                                                                               \
        }                                                                                   \
}                                                                                           \
                                                                                            \
/* out[i, :] = b + sum_p v_p W[j_p, :] over the non-zeros of row rows[i] whose column */  \
/* lies in [jlo, jhi) (b NULL: no b); W, b and out padded (rows of HP, whole vectors */     \
/* stored).  The step's forward by blocks of W's rows (see fn_sum_parts) */                \
ATTR static void fn_sparse_forward_cols_##S(                                                \
    const long long *indptr, const int *indices, const VT *data, const T *lut,            \
    const long long *rows, long long n, const T *W, const T *b, T *__restrict out,        \
    long long D, long long HP, int jlo, int jhi, long long *bad)                          \
{                                                                                           \
    const long long L = VB / sizeof(T), nv = HP / L;                                        \
    const long long sv = fn_strip_vectors(jhi - jlo, L * (long long)sizeof(T), nv);         \
    long long ps[FN_ROW_CHUNK], es[FN_ROW_CHUNK];                                           \
    fn_touch_rows(indptr, indices, data, rows, n, sizeof(VT));                              \
    for (long long i0 = 0; i0 < n; i0 += FN_ROW_CHUNK) {                                    \
        const long long i1 = i0 + FN_ROW_CHUNK < n ? i0 + FN_ROW_CHUNK : n;                 \
        fn_row_ranges(indptr, indices, rows + i0, i1 - i0, D, jlo, jhi, ps, es);            \
        for (long long s0 = 0; s0 < nv; s0 += sv)                                           \
            for (long long i = i0; i < i1; i++)                                             \
                for (long long v0 = s0; v0 < nv && v0 < s0 + sv; v0 += 4) {                 \
                    int m = nv - v0 < 4 ? (int)(nv - v0) : 4;                               \
                    FN_FOR_MH(m, 0, fn_forward_row_##S, indices, data, lut, ps[i - i0], es[i - i0], \
                              W + v0 * L, NULL, b ? b + v0 * L : NULL, out + i * HP, v0 * L, D, HP, HP, \
                              v0 == 0, bad)                                                 \
                }                                                                           \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* W[j] += v G[i] over columns [p, e) of one row, vectors v0 .. v0 + m - 1 (W, g at v0); */ \
/* with `half` the last of them is done as its lower half only (see fn_sparse_scatter)  */ \
FN_INLINE void fn_scatter_row_##S(int m, int half, const int *indices, const VT *data,  \
    const T *lut, long long p, long long e, const T *__restrict g, T *__restrict W,       \
    long long D, long long HP, long long *bad)                                            \
{                                                                                           \
    const long long L = VB / sizeof(T);                                                     \
    const int mf = m - half; /* whole vectors */                                            \
    const fn_vec_##S *gv = (const fn_vec_##S *)g;                                           \
    fn_vec_##S g0 = {0}, g1 = {0}, g2 = {0}, g3 = {0};                                      \
    fn_hvec_##S gh = {0};                                                                   \
    if (mf > 0) g0 = gv[0];                                                                 \
    if (mf > 1) g1 = gv[1];                                                                 \
    if (mf > 2) g2 = gv[2];                                                                 \
    if (mf > 3) g3 = gv[3];                                                                 \
    if (half) gh = *(const fn_hvec_##S *)(g + mf * L);                                      \
    for (; p < e; p++) {                                                                    \
        int j = indices[p];                                                                 \
        if ((uint32_t)j >= D) { if (bad) (*bad)++; continue; }                              \
        T v = VAL(p);                                                                       \
        fn_vec_##S *w = (fn_vec_##S *)(W + (long long)j * HP);                              \
        fn_hvec_##S *wh = (fn_hvec_##S *)(W + (long long)j * HP + mf * L);                  \
        fn_vec_##S w0 = {0}, w1 = {0}, w2 = {0}, w3 = {0};                                  \
        fn_hvec_##S w4 = {0};                                                               \
        if (mf > 0) w0 = w[0];                                                              \
        if (mf > 1) w1 = w[1];                                                              \
        if (mf > 2) w2 = w[2];                                                              \
        if (mf > 3) w3 = w[3];                                                              \
        if (half) w4 = *wh;                                                                 \
        if (half) *wh = w4 + v * gh;                                                        \
        if (mf > 3) w[3] = w3 + v * g3;                                                     \
        if (mf > 2) w[2] = w2 + v * g2;                                                     \
        if (mf > 1) w[1] = w1 + v * g1;                                                     \
        if (mf > 0) w[0] = w0 + v * g0;                                                     \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* W[j, :] += v G[i, :] over the non-zeros (i, j, v) of rows rows[0 .. n) with j in */      \
/* [jlo, jhi); W and G padded (rows of HP).  Only the vectors holding the H columns are */ \
/* updated, and when the last holds no more than half a vector of them (the book's 50 */    \
/* floats: 2 of 16, or 2 of 8), only its lower half: the update is bound by its stores, */  \
/* and AVX-512 on an EPYC 9004 stores 32 bytes a cycle (benchmarks/README.md, "Kernel */    \
/* layouts") */                                                                             \
ATTR static void fn_sparse_scatter_##S(                                                     \
    const long long *indptr, const int *indices, const VT *data, const T *lut,            \
    const long long *rows, long long n, const T *__restrict G, T *__restrict W,           \
    long long D, long long H, long long HP, int jlo, int jhi, long long *bad)             \
{                                                                                           \
    const long long L = VB / sizeof(T), nv = (H + L - 1) / L; /* the vectors holding H */   \
    const int half_last = H - (nv - 1) * L <= L / 2;                                        \
    const long long sv = fn_strip_vectors(jhi - jlo, L * (long long)sizeof(T), nv);         \
    long long ps[FN_ROW_CHUNK], es[FN_ROW_CHUNK];                                           \
    for (long long i0 = 0; i0 < n; i0 += FN_ROW_CHUNK) {                                    \
        const long long i1 = i0 + FN_ROW_CHUNK < n ? i0 + FN_ROW_CHUNK : n;                 \
        /* the rows were read into cache by the step's forward (fn_touch_rows) */           \
        fn_row_ranges(indptr, indices, rows + i0, i1 - i0, D, jlo, jhi, ps, es);            \
        for (long long s0 = 0; s0 < nv; s0 += sv)                                           \
            for (long long i = i0; i < i1; i++)                                             \
                for (long long v0 = s0; v0 < nv && v0 < s0 + sv; v0 += 4) {                 \
                    int m = nv - v0 < 4 ? (int)(nv - v0) : 4;                               \
                    int half = half_last && v0 + m == nv;                                   \
                    FN_FOR_MH(m, half, fn_scatter_row_##S, indices, data, lut, ps[i - i0], es[i - i0], \
                              G + i * HP + v0 * L, W + v0 * L, D, HP, v0 == 0 ? bad : NULL) \
                }                                                                           \
    }                                                                                       \
}

#define FN_VAL_DATA(p) (data[(p)])
#define FN_VAL_PIXEL(p) (lut[data[(p)]])

/* Each loop is built twice: with 64-byte vectors for x86-64-v4 (AVX-512: 32 registers of
 * 64 bytes), and with 32-byte vectors for x86-64-v3 (AVX2: 16 registers of 32 bytes) and
 * baseline x86-64.  Where the target has no 64-byte registers GCC splits a 64-byte vector
 * in two, and a row's accumulators no longer fit in the registers: they go to the stack
 * (benchmarks/README.md, "an AVX2 host").  The layout (fn_padded) is the same for both:
 * rows of whole 64-byte lines, so whole 32-byte vectors too.  fn_wide_vectors (_vmath.h)
 * picks the build. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FN_SPARSE_WIDE __attribute__((target("arch=x86-64-v4")))
#define FN_SPARSE_NARROW __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FN_SPARSE_WIDE
#define FN_SPARSE_NARROW
#endif

FN_SPARSE_LOOPS(float, fv64, float, FN_VAL_DATA, 64, FN_SPARSE_WIDE)
FN_SPARSE_LOOPS(double, dv64, double, FN_VAL_DATA, 64, FN_SPARSE_WIDE)
FN_SPARSE_LOOPS(float, fu64, uint8_t, FN_VAL_PIXEL, 64, FN_SPARSE_WIDE)
FN_SPARSE_LOOPS(double, du64, uint8_t, FN_VAL_PIXEL, 64, FN_SPARSE_WIDE)
FN_SPARSE_LOOPS(float, fv32, float, FN_VAL_DATA, 32, FN_SPARSE_NARROW)
FN_SPARSE_LOOPS(double, dv32, double, FN_VAL_DATA, 32, FN_SPARSE_NARROW)
FN_SPARSE_LOOPS(float, fu32, uint8_t, FN_VAL_PIXEL, 32, FN_SPARSE_NARROW)
FN_SPARSE_LOOPS(double, du32, uint8_t, FN_VAL_PIXEL, 32, FN_SPARSE_NARROW)

/* fn(S, suffix, args): the build of fn_<name>_<S><suffix> for this CPU's vectors */
#define FN_SPARSE_PICK(fn, S, x, ...)                                                       \
    do {                                                                                    \
        if (fn_wide_vectors()) fn##_##S##x##64(__VA_ARGS__);                                 \
        else fn##_##S##x##32(__VA_ARGS__);                                                  \
    } while (0)

/* The entry points, one per working dtype: data holds uint8 pixels (pix != 0, looked up
 * in lut) or values of the working dtype. */
#define FN_SPARSE_ENTRIES(T, S)                                                             \
static void fn_sparse_forward_##S(                                                          \
    const long long *indptr, const int *indices, const void *data, int pix, const T *lut, \
    long long row0, long long n, const T *W, const T *b, T *out,                          \
    long long D, long long H, long long HP, long long *bad)                               \
{                                                                                           \
    if (pix)                                                                                \
        FN_SPARSE_PICK(fn_sparse_forward, S, u, indptr, indices, (const uint8_t *)data, lut,  \
                       row0, n, W, b, out, D, H, HP, bad);                                  \
    else                                                                                    \
        FN_SPARSE_PICK(fn_sparse_forward, S, v, indptr, indices, (const T *)data, lut,        \
                       row0, n, W, b, out, D, H, HP, bad);                                  \
}                                                                                           \
static void fn_sparse_forward_cols_##S(                                                     \
    const long long *indptr, const int *indices, const void *data, int pix, const T *lut, \
    const long long *rows, long long n, const T *W, const T *b, T *out, long long D,      \
    long long HP, int jlo, int jhi, long long *bad)                                       \
{                                                                                           \
    if (pix)                                                                                \
        FN_SPARSE_PICK(fn_sparse_forward_cols, S, u, indptr, indices, (const uint8_t *)data,  \
                       lut, rows, n, W, b, out, D, HP, jlo, jhi, bad);                      \
    else                                                                                    \
        FN_SPARSE_PICK(fn_sparse_forward_cols, S, v, indptr, indices, (const T *)data,        \
                       lut, rows, n, W, b, out, D, HP, jlo, jhi, bad);                      \
}                                                                                           \
static void fn_sparse_scatter_##S(                                                          \
    const long long *indptr, const int *indices, const void *data, int pix, const T *lut, \
    const long long *rows, long long n, const T *G, T *W, long long D, long long H,       \
    long long HP, int jlo, int jhi, long long *bad)                                       \
{                                                                                           \
    if (pix)                                                                                \
        FN_SPARSE_PICK(fn_sparse_scatter, S, u, indptr, indices, (const uint8_t *)data, lut,  \
                       rows, n, G, W, D, H, HP, jlo, jhi, bad);                             \
    else                                                                                    \
        FN_SPARSE_PICK(fn_sparse_scatter, S, v, indptr, indices, (const T *)data, lut,        \
                       rows, n, G, W, D, H, HP, jlo, jhi, bad);                             \
}

FN_SPARSE_ENTRIES(float, f)
FN_SPARSE_ENTRIES(double, d)

/* Class labels from hidden rows: labels[i] = argmax_c (h[i] @ W2 + b2)[c] for n rows of
 * H values (unpadded), W2 of H x C, b2 of C; the first maximum, and the first NaN when
 * there is one (what numpy.argmax does).  Each score is the sum over the H products in
 * order, then b2.  With C up to one 64-byte line (the book's 10 classes) W2 is read as
 * wp, H rows of one line (the wrapper pads it, lanes past C zero), and four rows are
 * summed at once, so that the adds of one row do not wait on each other: a row's scores
 * in one 64-byte vector (x86-64-v4) or two of 32 bytes (x86-64-v3 and baseline, where
 * GCC keeps a 64-byte vector's halves on the stack, as for the loops above); both builds
 * sum each lane in the same order.  Otherwise plain loops, with s scratch of C. */
#define FN_TOP_ROWS(T, S, VB, ATTR)                                                         \
typedef T fn_tv##VB##_##S __attribute__((vector_size(VB)));                                 \
ATTR static void fn_top_rows_##S##VB(const T *h, long long n, long long H, const T *wp,    \
    const T *b2, long long C, long long *labels)                                           \
{                                                                                           \
    enum { NV = 64 / VB, LINE = 64 / sizeof(T) };                                           \
    typedef fn_tv##VB##_##S vec;                                                            \
    T t[LINE];                                                                              \
    long long i = 0;                                                                        \
    for (; i + 4 <= n; i += 4) {                                                            \
        vec a[4][NV];                                                                       \
        for (int r = 0; r < 4; r++)                                                         \
            for (int v = 0; v < NV; v++) a[r][v] = (vec){0};                                \
        for (long long j = 0; j < H; j++) {                                                 \
            const vec *w = (const vec *)(wp + j * LINE);                                    \
            for (int r = 0; r < 4; r++) {                                                   \
                T x = h[(i + r) * H + j];                                                   \
                for (int v = 0; v < NV; v++) a[r][v] += x * w[v];                           \
            }                                                                               \
        }                                                                                   \
        for (int r = 0; r < 4; r++) {                                                       \
            memcpy(t, a[r], sizeof t);                                                      \
            for (long long c = 0; c < C; c++) t[c] += b2[c];                                \
            labels[i + r] = fn_argmax_##S(t, C);                                            \
        }                                                                                   \
    }                                                                                       \
    for (; i < n; i++) {                                                                    \
        vec a[NV];                                                                          \
        for (int v = 0; v < NV; v++) a[v] = (vec){0};                                       \
        for (long long j = 0; j < H; j++) {                                                 \
            const vec *w = (const vec *)(wp + j * LINE);                                    \
            for (int v = 0; v < NV; v++) a[v] += h[i * H + j] * w[v];                       \
        }                                                                                   \
        memcpy(t, a, sizeof t);                                                             \
        for (long long c = 0; c < C; c++) t[c] += b2[c];                                    \
        labels[i] = fn_argmax_##S(t, C);                                                    \
    }                                                                                       \
}

#define FN_TOP_ARGMAX(T, S)                                                                 \
static inline long long fn_argmax_##S(const T *s, long long C)                             \
{                                                                                           \
    long long k = 0;                                                                        \
    T best = s[0];                                                                          \
    if (best != best) return 0;                                                             \
    for (long long c = 1; c < C; c++) {                                                     \
        T v = s[c];                                                                         \
        if (v != v) return c;                                                               \
        if (v > best) { best = v; k = c; }                                                  \
    }                                                                                       \
    return k;                                                                               \
}                                                                                           \
                                                                                            \
FN_TOP_ROWS(T, S, 64, FN_SPARSE_WIDE)                                                       \
FN_TOP_ROWS(T, S, 32, FN_SPARSE_NARROW)                                                     \
                                                                                            \
static void fn_top_argmax_##S(const T *h, long long n, long long H, const T *W2,           \
    const T *b2, long long C, const T *wp, T *s, long long *labels)                        \
{                                                                                           \
    if (C <= 64 / (long long)sizeof(T)) {                                                   \
        if (fn_wide_vectors()) fn_top_rows_##S##64(h, n, H, wp, b2, C, labels);             \
        else fn_top_rows_##S##32(h, n, H, wp, b2, C, labels);                               \
        return;                                                                             \
    }                                                                                       \
    for (long long i = 0; i < n; i++) {                                                     \
        const T *h0 = h + i * H;                                                            \
        for (long long c = 0; c < C; c++) s[c] = 0;                                         \
        for (long long j = 0; j < H; j++)                                                   \
            for (long long c = 0; c < C; c++) s[c] += h0[j] * W2[j * C + c];                \
        for (long long c = 0; c < C; c++) s[c] += b2[c];                                    \
        labels[i] = fn_argmax_##S(s, C);                                                    \
    }                                                                                       \
}

FN_TOP_ARGMAX(float, f)
FN_TOP_ARGMAX(double, d)

/* h[i, :H] = parts[0][i] + parts[1][i] + ... (np parts, each n rows of HP, q entries */
/* apart; added in part order) for rows [0, n): the forward sums of a step's blocks of */
/* pixels (fn_sparse_forward_cols) into its hidden rows (unpadded) */
#define FN_SUM_PARTS(T, S)                                                                  \
typedef T fn_pvec_##S __attribute__((vector_size(64)));                                     \
FN_SPARSE_CLONES static void fn_sum_parts_##S(const T *parts, long long q, int np,         \
    long long n, long long H, long long HP, T *__restrict h)                              \
{                                                                                           \
    const long long L = 64 / sizeof(T);                                                     \
    for (long long i = 0; i < n; i++) {                                                     \
        for (long long off = 0; off < HP; off += L) {                                       \
            fn_pvec_##S a = *(const fn_pvec_##S *)(parts + i * HP + off);                   \
            for (int k = 1; k < np; k++)                                                    \
                a += *(const fn_pvec_##S *)(parts + k * q + i * HP + off);                  \
            if (off + L <= H) memcpy(h + i * H + off, &a, sizeof a);                        \
            else if (off < H) {                                                             \
                T t[64 / sizeof(T)];                                                        \
                memcpy(t, &a, sizeof a);                                                    \
                memcpy(h + i * H + off, t, (H - off) * sizeof(T));                          \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
}

FN_SUM_PARTS(float, f)
FN_SUM_PARTS(double, d)

/* fn_max_threads: the threads a parallel region may use; fn_num_threads: those of the
 * region running now (both 1 when built without OpenMP); fn_set_max_threads: how many
 * the regions that the calling thread starts from now on may use (OpenMP's nthreads
 * setting, which belongs to the calling thread; no effect without OpenMP).
 * fn_barrier: every thread of the enclosing parallel region waits here for the others
 * (an orphaned `omp barrier`).  Cython compiles each prange inside a `with parallel()`
 * block to `omp for nowait`, with its variables firstprivate and lastprivate.  GCC puts
 * a barrier at the start of such a loop (for the firstprivate copies), so phases written
 * as one prange after another did wait for each other, but nothing in OpenMP promises
 * that, and a phase after the last prange gets no barrier at all.  _sp_step_par hands
 * its blocks to threads itself and calls this between its phases. */
#ifdef _OPENMP
#include <omp.h>
static int fn_max_threads(void) { return omp_get_max_threads(); }
static int fn_num_threads(void) { return omp_get_num_threads(); }
static void fn_set_max_threads(int n) { omp_set_num_threads(n); }
static void fn_barrier(void)
{
#pragma omp barrier
}
#else
static int fn_max_threads(void) { return 1; }
static int fn_num_threads(void) { return 1; }
static void fn_set_max_threads(int n) { (void)n; }
static void fn_barrier(void) {}
#endif

#endif
