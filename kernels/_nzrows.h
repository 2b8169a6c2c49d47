/* The first layer of a dense float32 batch over its non-zero inputs (mlp_gradient).
 *
 * A batch of 100 MNIST images is 78,400 floats of which about 19% are not 0.  The two
 * products of its first layer, h = X W + b and dW = X^T dz, cost 100 x 784 x H
 * multiply-adds each when done densely (BLAS); over the non-zeros alone they are about
 * 15,000 row operations of H wide each.  So mlp_gradient, given dense rows, lists each
 * row's non-zeros and runs both products over that list, on the calling thread:
 *
 *   fn_nz_rows     the column numbers and values of each row's non-zeros in column
 *                  order (the batch as CSR rows), a vector at a time: compare, then
 *                  compress (AVX-512's compress; with AVX2 a permutation looked up by
 *                  the compare's bits); gives up (returns -1) once there are more than
 *                  `most`, where the dense products are the faster way.
 *   fn_nz_forward  h[i, :] = b + the sum over row i's non-zeros of x W[k, :].
 *   fn_nz_backward dW = X^T dz: dW[k, :] += x dz[i, :] over the non-zeros.
 *
 * A non-zero is any x with x != 0, so NaN and inf in X reach h and dW as they would
 * through the dense products.  A value of W that is not finite would not (a dense
 * product multiplies it by the zeros too, giving NaN): fn_nz_finite lets the caller
 * take the dense products then.
 *
 * Each function is built twice, for AVX-512 (vectors of 16 floats, masked loads and
 * stores) and for AVX2 + FMA (vectors of 8; the last vector of a tile loaded and stored
 * under a mask), and the entry points take the AVX-512 build where fn_wide_vectors says
 * the CPU has it.  fn_nz_ready says whether either runs here; elsewhere (and where GCC
 * builds no x86-64 code) mlp_gradient keeps the dense products (a search for the
 * non-zeros a pixel at a time costs about as much as one of them).  The two builds sum
 * in different orders, so their results differ in the last bits.
 */
#ifndef FASTNET_NZROWS_H
#define FASTNET_NZROWS_H

#include "_vmath.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>

/* The products work on tiles of 64 lanes of W's rows (the book's 50 hidden units: one
 * tile; 4 vectors of 16 lanes with AVX-512, 8 of 8 with AVX2, masked past H).  The
 * sums they update go to scratch S in rows of 64 lanes, 64-byte aligned: rows of H
 * floats side by side share cache lines, and a load that overlaps the lanes of an
 * earlier masked store to the row beside it waits for that store to reach the cache
 * (no store forwarding), a wait on almost every update of the backward (benchmarks/
 * README.md has the figures).  A tile's rows of W (or dW) are taken in blocks of
 * FN_NZ_KC rows, which stay in L1 while every batch row works through its non-zeros in
 * that block; cur[i] is how far row i's list has got. */

/* rows of W or dW a block (128 x 64 lanes: 32 kB) and batch rows of the forward's sums
 * at a time (64 x 64 lanes: 16 kB); S holds FN_NZ_SCRATCH floats for either product */
#define FN_NZ_KC 128
#define FN_NZ_RB 64
#define FN_NZ_SCRATCH (FN_NZ_KC * 64)

/* ---- AVX-512: a tile is 4 vectors of 16 lanes ---- */

#define FN_NZ512 __attribute__((target("avx512f,popcnt")))
#define FN_NZ512_INLINE static inline __attribute__((always_inline)) FN_NZ512

/* lanes [j0 + 16 v, H) of vector v of a 64-lane tile starting at j0, as a mask */
FN_NZ512_INLINE __mmask16 fn_nz_lanes_512(long long H, long long j0, int v)
{
    long long n = H - j0 - 16 * v;
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

FN_NZ512 static int fn_nz_finite_512(const float *W, long long n)
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

FN_NZ512 static long long fn_nz_rows_512(const float *X, long long B, long long D, int *col, float *val,
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

/* the NV vectors of a 64-lane scratch row s into lanes [j0, ...) of an output row o of
 * H floats (masks m0..m3 from fn_nz_lanes_512) */
FN_NZ512_INLINE void fn_nz_put_512(const int NV, float *o, const float *s, __mmask16 m0, __mmask16 m1, __mmask16 m2,
                            __mmask16 m3)
{
    _mm512_mask_storeu_ps(o, m0, _mm512_load_ps(s));
    if (NV > 1) _mm512_mask_storeu_ps(o + 16, m1, _mm512_load_ps(s + 16));
    if (NV > 2) _mm512_mask_storeu_ps(o + 32, m2, _mm512_load_ps(s + 32));
    if (NV > 3) _mm512_mask_storeu_ps(o + 48, m3, _mm512_load_ps(s + 48));
}

FN_NZ512_INLINE void fn_nz_forward_tile_512(const int NV, const long long *ptr, const int *col, const float *val,
                                     long long i0, long long i1, long long D, const float *W, const float *b,
                                     long long H, long long j0, float *h, float *S, long long *cur)
{
    const __mmask16 m0 = fn_nz_lanes_512(H, j0, 0), m1 = fn_nz_lanes_512(H, j0, 1);
    const __mmask16 m2 = fn_nz_lanes_512(H, j0, 2), m3 = fn_nz_lanes_512(H, j0, 3);
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
    for (long long i = i0; i < i1; i++) fn_nz_put_512(NV, h + i * H + j0, S + (i - i0) * 64, m0, m1, m2, m3);
}

FN_NZ512 static void fn_nz_forward_512(const long long *ptr, const int *col, const float *val, long long B,
                                       long long D, const float *W, const float *b, long long H, float *h,
                                       float *S, long long *cur)
{
    for (long long i0 = 0; i0 < B; i0 += FN_NZ_RB) {
        const long long i1 = i0 + FN_NZ_RB < B ? i0 + FN_NZ_RB : B;
        for (long long j0 = 0; j0 < H; j0 += 64) {
            const long long n = H - j0;
            if (n > 48) fn_nz_forward_tile_512(4, ptr, col, val, i0, i1, D, W, b, H, j0, h, S, cur);
            else if (n > 32) fn_nz_forward_tile_512(3, ptr, col, val, i0, i1, D, W, b, H, j0, h, S, cur);
            else if (n > 16) fn_nz_forward_tile_512(2, ptr, col, val, i0, i1, D, W, b, H, j0, h, S, cur);
            else fn_nz_forward_tile_512(1, ptr, col, val, i0, i1, D, W, b, H, j0, h, S, cur);
        }
    }
}

FN_NZ512_INLINE void fn_nz_backward_tile_512(const int NV, const long long *ptr, const int *col, const float *val,
                                      long long B, long long D, const float *dz, long long H, long long j0,
                                      float *dW, float *S, long long *cur)
{
    const __mmask16 m0 = fn_nz_lanes_512(H, j0, 0), m1 = fn_nz_lanes_512(H, j0, 1);
    const __mmask16 m2 = fn_nz_lanes_512(H, j0, 2), m3 = fn_nz_lanes_512(H, j0, 3);
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
        for (long long k = k0; k < k1; k++) fn_nz_put_512(NV, dW + k * H + j0, S + (k - k0) * 64, m0, m1, m2, m3);
    }
}

FN_NZ512 static void fn_nz_backward_512(const long long *ptr, const int *col, const float *val, long long B,
                                        long long D, const float *dz, long long H, float *dW, float *S,
                                        long long *cur)
{
    for (long long j0 = 0; j0 < H; j0 += 64) {
        const long long n = H - j0;
        if (n > 48) fn_nz_backward_tile_512(4, ptr, col, val, B, D, dz, H, j0, dW, S, cur);
        else if (n > 32) fn_nz_backward_tile_512(3, ptr, col, val, B, D, dz, H, j0, dW, S, cur);
        else if (n > 16) fn_nz_backward_tile_512(2, ptr, col, val, B, D, dz, H, j0, dW, S, cur);
        else fn_nz_backward_tile_512(1, ptr, col, val, B, D, dz, H, j0, dW, S, cur);
    }
}

/* ---- AVX2 + FMA: a tile is 8 vectors of 8 lanes ---- */

#define FN_NZ256 __attribute__((target("avx2,fma,popcnt")))
#define FN_NZ256_INLINE static inline __attribute__((always_inline)) FN_NZ256

/* fn_nz_order[m]: the lanes whose bit is set in m, in order, then zeros: the
 * permutation that moves a vector's non-zeros (compare bits m) to its front */
static unsigned char fn_nz_order[256][8];
static int fn_nz_order_built;

static void fn_nz_build_order(void)
{
    if (__atomic_load_n(&fn_nz_order_built, __ATOMIC_ACQUIRE)) return;
    for (int m = 0; m < 256; m++) {
        int n = 0;
        for (int j = 0; j < 8; j++)
            if (m >> j & 1) fn_nz_order[m][n++] = (unsigned char)j;
        while (n < 8) fn_nz_order[m][n++] = 0;
    }
    __atomic_store_n(&fn_nz_order_built, 1, __ATOMIC_RELEASE);
}

/* lanes [j0 + 8 v, H) of vector v of a 64-lane tile starting at j0, as a mask */
FN_NZ256_INLINE __m256i fn_nz_lanes_256(long long H, long long j0, int v)
{
    long long n = H - j0 - 8 * v;
    int c = n >= 8 ? 8 : n <= 0 ? 0 : (int)n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* vector v of the NV of a tile's row at p: whole, or the last under mask `last` (the
 * lanes past H read as 0 and are never read past the row's end) */
FN_NZ256_INLINE __m256 fn_nz_load_256(const int NV, int v, const float *p, __m256i last)
{
    return v < NV - 1 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, last);
}

FN_NZ256 static int fn_nz_finite_256(const float *W, long long n)
{
    __m256 bad = _mm256_setzero_ps();
    long long q = 0;
    for (; q + 8 <= n; q += 8) {
        __m256 w = _mm256_loadu_ps(W + q);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(w, w), _mm256_setzero_ps(), _CMP_NEQ_UQ));
    }
    int finite = _mm256_movemask_ps(bad) == 0;
    for (; q < n; q++) finite &= W[q] - W[q] == 0;
    return finite;
}

FN_NZ256 static long long fn_nz_rows_256(const float *X, long long B, long long D, int *col, float *val,
                                         long long *ptr, long long most)
{
    long long n = 0;
    ptr[0] = 0;
    for (long long i = 0; i < B; i++) {
        const float *x = X + i * D;
        long long k = 0;
        for (; k + 8 <= D; k += 8) {
            __m256 v = _mm256_loadu_ps(x + k);
            unsigned m = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ));
            __m256i lanes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)fn_nz_order[m]));
            /* all 8 lanes stored, the first popcount(m) of them kept */
            _mm256_storeu_ps(val + n, _mm256_permutevar8x32_ps(v, lanes));
            _mm256_storeu_si256((__m256i *)(col + n), _mm256_add_epi32(lanes, _mm256_set1_epi32((int)k)));
            n += _mm_popcnt_u32(m);
        }
        for (; k < D; k++)
            if (x[k] != 0) {
                col[n] = (int)k;
                val[n++] = x[k];
            }
        ptr[i + 1] = n;
        if (n > most) return -1;
    }
    return n;
}

/* the NV vectors of a 64-lane scratch row s into lanes [j0, ...) of an output row o of
 * H floats (the last under mask `last`) */
FN_NZ256_INLINE void fn_nz_put_256(const int NV, float *o, const float *s, __m256i last)
{
    for (int v = 0; v < NV - 1; v++) _mm256_storeu_ps(o + 8 * v, _mm256_load_ps(s + 8 * v));
    _mm256_maskstore_ps(o + 8 * (NV - 1), last, _mm256_load_ps(s + 8 * (NV - 1)));
}

/* fn(NV, ...) with NV the vectors of 8 lanes that hold the n lanes of a tile left below
 * H (at most 8) as a constant: one instance per count, each with its sums in registers */
#define FN_NZ256_BY_NV(n, fn, ...)                                                          \
    switch ((n) >= 64 ? 8 : (int)((n) + 7) / 8) {                                           \
    case 8: fn(8, __VA_ARGS__); break;                                                      \
    case 7: fn(7, __VA_ARGS__); break;                                                      \
    case 6: fn(6, __VA_ARGS__); break;                                                      \
    case 5: fn(5, __VA_ARGS__); break;                                                      \
    case 4: fn(4, __VA_ARGS__); break;                                                      \
    case 3: fn(3, __VA_ARGS__); break;                                                      \
    case 2: fn(2, __VA_ARGS__); break;                                                      \
    default: fn(1, __VA_ARGS__); break;                                                     \
    }

FN_NZ256_INLINE void fn_nz_forward_tile_256(const int NV, const long long *ptr, const int *col, const float *val,
                                            long long i0, long long i1, long long D, const float *W,
                                            const float *b, long long H, long long j0, float *h, float *S,
                                            long long *cur)
{
    const __m256i last = fn_nz_lanes_256(H, j0, NV - 1);
    for (long long i = i0; i < i1; i++) {
        float *s = S + (i - i0) * 64;
        for (int v = 0; v < NV; v++) _mm256_store_ps(s + 8 * v, fn_nz_load_256(NV, v, b + j0 + 8 * v, last));
        cur[i] = ptr[i];
    }
    for (long long k0 = 0; k0 < D; k0 += FN_NZ_KC) {
        const long long k1 = k0 + FN_NZ_KC < D ? k0 + FN_NZ_KC : D;
        for (long long i = i0; i < i1; i++) {
            long long p = cur[i];
            const long long e = ptr[i + 1];
            if (p == e || col[p] >= k1) continue;
            float *s = S + (i - i0) * 64;
            /* one sum a vector: up to 8 chains of FMAs, as many as two FMA units with a
             * latency of 4 keep busy, and with the loads still within 16 registers */
            __m256 a[8];
            for (int v = 0; v < NV; v++) a[v] = _mm256_load_ps(s + 8 * v);
            for (; p < e && col[p] < k1; p++) {
                const float *w = W + col[p] * H + j0;
                const __m256 x = _mm256_broadcast_ss(val + p);
                for (int v = 0; v < NV; v++) a[v] = _mm256_fmadd_ps(x, fn_nz_load_256(NV, v, w + 8 * v, last), a[v]);
            }
            for (int v = 0; v < NV; v++) _mm256_store_ps(s + 8 * v, a[v]);
            cur[i] = p;
        }
    }
    for (long long i = i0; i < i1; i++) fn_nz_put_256(NV, h + i * H + j0, S + (i - i0) * 64, last);
}

FN_NZ256 static void fn_nz_forward_256(const long long *ptr, const int *col, const float *val, long long B,
                                       long long D, const float *W, const float *b, long long H, float *h,
                                       float *S, long long *cur)
{
    for (long long i0 = 0; i0 < B; i0 += FN_NZ_RB) {
        const long long i1 = i0 + FN_NZ_RB < B ? i0 + FN_NZ_RB : B;
        for (long long j0 = 0; j0 < H; j0 += 64) {
            FN_NZ256_BY_NV(H - j0, fn_nz_forward_tile_256, ptr, col, val, i0, i1, D, W, b, H, j0, h, S, cur);
        }
    }
}

FN_NZ256_INLINE void fn_nz_backward_tile_256(const int NV, const long long *ptr, const int *col,
                                             const float *val, long long B, long long D, const float *dz,
                                             long long H, long long j0, float *dW, float *S, long long *cur)
{
    const __m256i last = fn_nz_lanes_256(H, j0, NV - 1);
    for (long long i = 0; i < B; i++) cur[i] = ptr[i];
    for (long long k0 = 0; k0 < D; k0 += FN_NZ_KC) {
        const long long k1 = k0 + FN_NZ_KC < D ? k0 + FN_NZ_KC : D;
        for (long long q = 0; q < (k1 - k0) * 64; q += 8) _mm256_store_ps(S + q, _mm256_setzero_ps());
        for (long long i = 0; i < B; i++) {
            long long p = cur[i];
            const long long e = ptr[i + 1];
            if (p == e || col[p] >= k1) continue;
            const float *g = dz + i * H + j0;
            __m256 d[8];
            for (int v = 0; v < NV; v++) d[v] = fn_nz_load_256(NV, v, g + 8 * v, last);
            do {
                float *s = S + (col[p] - k0) * 64;
                const __m256 x = _mm256_broadcast_ss(val + p);
                for (int v = 0; v < NV; v++)
                    _mm256_store_ps(s + 8 * v, _mm256_fmadd_ps(x, d[v], _mm256_load_ps(s + 8 * v)));
                p++;
            } while (p < e && col[p] < k1);
            cur[i] = p;
        }
        for (long long k = k0; k < k1; k++) fn_nz_put_256(NV, dW + k * H + j0, S + (k - k0) * 64, last);
    }
}

FN_NZ256 static void fn_nz_backward_256(const long long *ptr, const int *col, const float *val, long long B,
                                        long long D, const float *dz, long long H, float *dW, float *S,
                                        long long *cur)
{
    for (long long j0 = 0; j0 < H; j0 += 64) {
        FN_NZ256_BY_NV(H - j0, fn_nz_backward_tile_256, ptr, col, val, B, D, dz, H, j0, dW, S, cur);
    }
}

/* ---- the entry points: the AVX-512 build where the CPU has it, else the AVX2 one ---- */

/* 1 when this CPU (and its OS) run one of the two builds */
static int fn_nz_ready(void)
{
    __builtin_cpu_init();  /* a no-op once libgcc's constructor has run */
    return __builtin_cpu_supports("avx512f") || (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
}

/* 1 when the n floats at W are all finite */
static int fn_nz_finite(const float *W, long long n)
{
    return fn_wide_vectors() ? fn_nz_finite_512(W, n) : fn_nz_finite_256(W, n);
}

/* Row i's non-zeros of X (B rows of D, contiguous) go to col[ptr[i] .. ptr[i + 1]) and
 * val[...] in column order.  Returns their number, or -1 as soon as it passes `most`;
 * col and val must hold most + D + 16 entries (a row is stored a vector at a time). */
static long long fn_nz_rows(const float *X, long long B, long long D, int *col, float *val, long long *ptr,
                            long long most)
{
    if (fn_wide_vectors()) return fn_nz_rows_512(X, B, D, col, val, ptr, most);
    fn_nz_build_order();
    return fn_nz_rows_256(X, B, D, col, val, ptr, most);
}

/* h = X W + b (B x H) over the non-zeros listed by fn_nz_rows; W is D x H; S holds
 * FN_NZ_RB x 64 floats (64-byte aligned), cur B positions */
static void fn_nz_forward(const long long *ptr, const int *col, const float *val, long long B, long long D,
                          const float *W, const float *b, long long H, float *h, float *S, long long *cur)
{
    if (fn_wide_vectors()) fn_nz_forward_512(ptr, col, val, B, D, W, b, H, h, S, cur);
    else fn_nz_forward_256(ptr, col, val, B, D, W, b, H, h, S, cur);
}

/* dW = X^T dz (D x H) over the non-zeros listed by fn_nz_rows; dz is B x H; S holds
 * FN_NZ_SCRATCH floats (64-byte aligned), cur B positions.  Each dW[k, :] sums its terms
 * in batch-row order. */
static void fn_nz_backward(const long long *ptr, const int *col, const float *val, long long B, long long D,
                           const float *dz, long long H, float *dW, float *S, long long *cur)
{
    if (fn_wide_vectors()) fn_nz_backward_512(ptr, col, val, B, D, dz, H, dW, S, cur);
    else fn_nz_backward_256(ptr, col, val, B, D, dz, H, dW, S, cur);
}

#else /* no x86-64 code from this compiler: mlp_gradient keeps the dense products */

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
