/* A float32 matrix product for AVX2 + FMA that reads its operands where they lie.
 *
 *   fn_gemm_256(M, N, K, alpha, A, si, sp, B, ldb, beta, C, ldc)
 *       C = alpha A B + beta C   (beta 0: C is not read)
 *       C: M x N, row-major, row stride ldc;  B: K x N, row-major, row stride ldb;
 *       A: M x K, its element (i, p) at A[i si + p sp]: a row-major matrix (si = its
 *       row stride, sp = 1) or the transpose of one (si = 1, sp = its row stride).
 *
 * The steps' layers above the first multiply blocks of 50 rows by 100 x 100 weights on
 * each of two threads, and the evaluations blocks of 64 or 256 rows on each.  For
 * such products one-thread OpenBLAS spends about half as long copying ("packing") both
 * operands into its own layout as it spends multiplying them (benchmarks/README.md,
 * "the layers above the first without BLAS's copies").  Here a block of R <= 6 rows of
 * C and 16 of its columns is held in 12 registers over the whole sum over p (for each p:
 * two loads of B's row p, R broadcasts of A's elements, 2R FMAs) and stored once.
 * Blocks run rows outer, columns inner, so the R rows of A in use stay in L1 while B's
 * columns stream through it.  A block narrower than 16 columns (N not a multiple of 16)
 * is loaded and stored under masks.
 *
 * Each element of C is one sum over p in order, whatever the blocks, so a caller may
 * split the rows between threads without changing a bit.  NaN and inf propagate as in
 * any product.  Where GCC builds no x86-64 code, fn_gemm_256_ready() is 0 and callers
 * use BLAS.
 */
#ifndef FASTNET_GEMM256_H
#define FASTNET_GEMM256_H

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>

#define FN_G256 __attribute__((target("avx2,fma")))
#define FN_G256_INLINE static inline __attribute__((always_inline)) FN_G256

/* lanes [0, n) of a vector of 8 (n clamped to 0..8) */
FN_G256_INLINE __m256i fn_g256_mask(long long n)
{
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int k = n < 0 ? 0 : (n > 8 ? 8 : (int)n);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), lane);
}

/* C[0:R, 0:16] = alpha A[0:R, :] B[:, 0:16] + beta C, the lanes outside m0, m1 (when
 * masked) neither read nor written */
FN_G256_INLINE void fn_g256_block(const int R, const int masked, long long K, float alpha,
                                  const float *A, long long si, long long sp,
                                  const float *B, long long ldb, float beta,
                                  float *C, long long ldc, __m256i m0, __m256i m1)
{
    __m256 acc[6][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (long long p = 0; p < K; ++p) {
        const float *b = B + p * ldb, *a = A + p * sp;
        __m256 b0 = masked ? _mm256_maskload_ps(b, m0) : _mm256_loadu_ps(b);
        __m256 b1 = masked ? _mm256_maskload_ps(b + 8, m1) : _mm256_loadu_ps(b + 8);
        for (int r = 0; r < R; ++r) {
            __m256 x = _mm256_broadcast_ss(a + r * si);
            acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
        }
    }
    __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    for (int r = 0; r < R; ++r) {
        float *c = C + r * ldc;
        __m256 c0 = _mm256_mul_ps(va, acc[r][0]), c1 = _mm256_mul_ps(va, acc[r][1]);
        if (masked) {
            if (beta != 0) {
                c0 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(c, m0), c0);
                c1 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(c + 8, m1), c1);
            }
            _mm256_maskstore_ps(c, m0, c0);
            _mm256_maskstore_ps(c + 8, m1, c1);
        } else {
            if (beta != 0) {
                c0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c), c0);
                c1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(c + 8), c1);
            }
            _mm256_storeu_ps(c, c0);
            _mm256_storeu_ps(c + 8, c1);
        }
    }
}

/* rows [0, R) of C, all its columns */
FN_G256_INLINE void fn_g256_rows(const int R, long long N, long long K, float alpha,
                                 const float *A, long long si, long long sp,
                                 const float *B, long long ldb, float beta, float *C, long long ldc)
{
    const __m256i all = _mm256_set1_epi32(-1);
    long long j = 0;
    for (; j + 16 <= N; j += 16)
        fn_g256_block(R, 0, K, alpha, A, si, sp, B + j, ldb, beta, C + j, ldc, all, all);
    if (j < N)
        fn_g256_block(R, 1, K, alpha, A, si, sp, B + j, ldb, beta, C + j, ldc,
                      fn_g256_mask(N - j), fn_g256_mask(N - j - 8));
}

static FN_G256 void fn_gemm_256(long long M, long long N, long long K, float alpha,
                                const float *A, long long si, long long sp,
                                const float *B, long long ldb, float beta, float *C, long long ldc)
{
    long long i = 0;
    for (; i + 6 <= M; i += 6)
        fn_g256_rows(6, N, K, alpha, A + i * si, si, sp, B, ldb, beta, C + i * ldc, ldc);
    A += i * si;
    C += i * ldc;
    switch (M - i) {  /* R is a constant in each call: the accumulators stay in registers */
    case 5: fn_g256_rows(5, N, K, alpha, A, si, sp, B, ldb, beta, C, ldc); break;
    case 4: fn_g256_rows(4, N, K, alpha, A, si, sp, B, ldb, beta, C, ldc); break;
    case 3: fn_g256_rows(3, N, K, alpha, A, si, sp, B, ldb, beta, C, ldc); break;
    case 2: fn_g256_rows(2, N, K, alpha, A, si, sp, B, ldb, beta, C, ldc); break;
    case 1: fn_g256_rows(1, N, K, alpha, A, si, sp, B, ldb, beta, C, ldc); break;
    default: break;
    }
}

static int fn_gemm_256_ready(void)
{
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#else /* no x86-64 GCC: callers take BLAS */

static void fn_gemm_256(long long M, long long N, long long K, float alpha, const float *A,
                        long long si, long long sp, const float *B, long long ldb, float beta,
                        float *C, long long ldc)
{
    (void)M; (void)N; (void)K; (void)alpha; (void)A; (void)si; (void)sp; (void)B; (void)ldb;
    (void)beta; (void)C; (void)ldc;
}

static int fn_gemm_256_ready(void) { return 0; }

#endif
#endif
