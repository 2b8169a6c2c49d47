/* Vectorisable exp for fastnet's Cython kernels.
 *
 * glibc's scalar exp/expf cost 3-5 ns an element here and never vectorise without
 * -ffast-math, which the kernel contract rules out (NaN and inf stay visible).  fn_exp is
 * plain arithmetic that compilers vectorise: Cody-Waite reduction x = n ln2 + r,
 * |r| <= ln2/2, a degree-13 Taylor polynomial for e^r (truncation < 5e-18), and 2^n
 * built from exponent bits in two halves so that results down to the subnormals and up
 * to +inf come out right.  Accuracy: within 2 ulp of the correctly rounded double.
 * exp(NaN) = NaN, exp(+inf) = +inf, exp(-inf) = 0.
 *
 * The same algorithm, line for line, is _exp in numba_backend.py.
 *
 * The loops are compiled for AVX-512, AVX2 and baseline x86-64 with GCC's
 * target_clones where the platform supports it (the loader picks one at run time),
 * so one portable wheel still uses the wide registers of the machine it runs on.
 */
#ifndef FASTNET_VMATH_H
#define FASTNET_VMATH_H

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FN_CLONES
#endif

/* Whether this CPU has the registers of x86-64-v4 (AVX-512: 32 of 64 bytes).  The loops
 * written with 64-byte vectors (_sparse.h, _top.h) are built or taken only where it
 * does: elsewhere GCC splits each such vector in two and the loops' accumulators no
 * longer fit in the registers. */
static int fn_narrow_only; /* set: every CPU takes the narrow builds (the tests' switch) */
static int fn_wide_vectors(void)
{
    if (fn_narrow_only) return 0;
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")
        && __builtin_cpu_supports("avx512cd");
#else
    return 0;
#endif
}

static inline double fn_bits_to_double(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }
static inline uint64_t fn_double_to_bits(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }

static inline double fn_exp(double x)
{
    const double ROUND = 6755399441055744.0;   /* 1.5 * 2^52: adding it rounds to an integer */
    const double TWO52 = 4503599627370496.0;   /* 2^52 */
    const double LOG2E = 1.4426950408889634;
    const double LN2_HI = 6.93147180369123816490e-01;  /* fdlibm: n * LN2_HI is exact */
    const double LN2_LO = 1.90821492927058770002e-10;
    /* clamp keeps 2^n representable in two halves; NaN fails both tests and passes */
    double xc = x < -1100.0 ? -1100.0 : (x > 1100.0 ? 1100.0 : x);
    double n = (xc * LOG2E + ROUND) - ROUND;
    double r = (xc - n * LN2_HI) - n * LN2_LO;
    double p = 1.0 / 6227020800.0;                      /* 1/13! */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    /* 2^n = 2^n1 * 2^n2 with |n1|, |n2| <= 794: both are normal doubles */
    double n1 = (n * 0.5 + ROUND) - ROUND;
    double n2 = n - n1;
    uint64_t e1 = fn_double_to_bits(n1 + 1023.0 + TWO52) - fn_double_to_bits(TWO52);
    uint64_t e2 = fn_double_to_bits(n2 + 1023.0 + TWO52) - fn_double_to_bits(TWO52);
    return p * fn_bits_to_double(e1 << 52) * fn_bits_to_double(e2 << 52);
}

/* float32: the same algorithm in single precision (degree-7 polynomial, truncation
 * < 6e-9; Cephes' split of ln2), so that float loops vectorise at full width. */
static inline uint32_t fn_float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float fn_bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float fn_expf(float x)
{
    const float ROUND = 12582912.0f;   /* 1.5 * 2^23 */
    const float TWO23 = 8388608.0f;
    const float LOG2E = 1.44269504088896341f;
    const float LN2_HI = 0.693359375f;
    const float LN2_LO = -2.12194440e-4f;
    float xc = x < -170.0f ? -170.0f : (x > 170.0f ? 170.0f : x);
    float n = (xc * LOG2E + ROUND) - ROUND;
    float r = (xc - n * LN2_HI) - n * LN2_LO;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    float n1 = (n * 0.5f + ROUND) - ROUND;   /* |n1|, |n2| <= 123 */
    float n2 = n - n1;
    uint32_t e1 = fn_float_to_bits(n1 + 127.0f + TWO23) - fn_float_to_bits(TWO23);
    uint32_t e2 = fn_float_to_bits(n2 + 127.0f + TWO23) - fn_float_to_bits(TWO23);
    return p * fn_bits_to_float(e1 << 23) * fn_bits_to_float(e2 << 23);
}

/* In place, one pointer: no aliasing question stops the vectoriser. */

/* y[i] = exp(y[i]) */
FN_CLONES static void fn_exp_inplace_d(double *y, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) y[i] = fn_exp(y[i]);
}

FN_CLONES static void fn_exp_inplace_f(float *y, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) y[i] = fn_expf(y[i]);
}

/* y[i] = 1 / (1 + exp(-y[i])) */
FN_CLONES static void fn_sigmoid_inplace_d(double *y, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) y[i] = 1.0 / (1.0 + fn_exp(-y[i]));
}

FN_CLONES static void fn_sigmoid_inplace_f(float *y, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) y[i] = 1.0f / (1.0f + fn_expf(-y[i]));
}

#endif
