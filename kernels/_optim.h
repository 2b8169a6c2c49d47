/* The optimisers of the MLP engine over a flat parameter vector (see _mlp.pxi).
 *
 * The formulas of fastnet.optim (the book's chapter 6) element by element, in the
 * parameters' dtype: NaN and inf propagate.  Each loop reads and writes its arrays once,
 * so it is bound by memory and by the vector width of sqrt and division; like
 * _sparse.h, each is built for x86-64-v4, x86-64-v3 and baseline x86-64 and the loader
 * picks one at run time (the extension is otherwise compiled for baseline x86-64, whose
 * SSE2 vectors hold 4 floats instead of 8 or 16).
 *
 * The loops run with subnormal numbers flushed to zero (the x86 MXCSR bits FTZ and DAZ,
 * set on the calling thread and restored after).  Momentum and Adam decay their state
 * geometrically where a parameter's gradient is 0 (a pixel that is 0 in the batch), so
 * in a long run some of it always lies in the subnormal range (float32: below 1.2e-38),
 * where x86 takes about a hundred cycles an operation.  Flushing changes only those
 * values, which the formulas would take to 0 in a few more steps.
 */
#ifndef FASTNET_OPTIM_H
#define FASTNET_OPTIM_H

#include <math.h>
#if defined(__SSE2__)
#include <xmmintrin.h>
#define FN_FLUSH_BEGIN unsigned int fn_csr = _mm_getcsr(); _mm_setcsr(fn_csr | 0x8040);
#define FN_FLUSH_END _mm_setcsr(fn_csr);
#else
#define FN_FLUSH_BEGIN
#define FN_FLUSH_END
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FN_OPTIM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FN_OPTIM_CLONES
#endif

#define FN_OPTIM(T, S, SQRT)                                                                \
/* p -= lr g */                                                                             \
FN_OPTIM_CLONES static void fn_sgd_loop_##S(T *restrict p, const T *restrict g, long long n, T lr) \
{                                                                                           \
    for (long long q = 0; q < n; q++) p[q] -= lr * g[q];                                    \
}                                                                                           \
/* v = momentum v - lr g; p += v */                                                         \
FN_OPTIM_CLONES static void fn_momentum_loop_##S(T *restrict p, const T *restrict g, T *restrict v, \
                                            long long n, T lr, T momentum)                  \
{                                                                                           \
    for (long long q = 0; q < n; q++) {                                                     \
        v[q] = v[q] * momentum - lr * g[q];                                                 \
        p[q] += v[q];                                                                       \
    }                                                                                       \
}                                                                                           \
/* h += g g; p -= lr g / (sqrt(h) + eps) */                                                 \
FN_OPTIM_CLONES static void fn_adagrad_loop_##S(T *restrict p, const T *restrict g, T *restrict h, \
                                           long long n, T lr, T eps)                        \
{                                                                                           \
    for (long long q = 0; q < n; q++) {                                                     \
        h[q] += g[q] * g[q];                                                                \
        p[q] -= lr * g[q] / (SQRT(h[q]) + eps);                                             \
    }                                                                                       \
}                                                                                           \
/* m += c1 (g - m); v += c2 (g g - v); p -= lr_t m / (sqrt(v) + eps) */                     \
FN_OPTIM_CLONES static void fn_adam_loop_##S(T *restrict p, const T *restrict g, T *restrict m,  \
                                        T *restrict v, long long n, T lr_t, T c1, T c2, T eps) \
{                                                                                           \
    for (long long q = 0; q < n; q++) {                                                     \
        m[q] += c1 * (g[q] - m[q]);                                                         \
        v[q] += c2 * (g[q] * g[q] - v[q]);                                                  \
        p[q] -= lr_t * m[q] / (SQRT(v[q]) + eps);                                           \
    }                                                                                       \
}                                                                                           \
static void fn_sgd_##S(T *p, const T *g, long long n, T lr)                                 \
{                                                                                           \
    FN_FLUSH_BEGIN fn_sgd_loop_##S(p, g, n, lr); FN_FLUSH_END                              \
}                                                                                           \
static void fn_momentum_##S(T *p, const T *g, T *v, long long n, T lr, T momentum)          \
{                                                                                           \
    FN_FLUSH_BEGIN fn_momentum_loop_##S(p, g, v, n, lr, momentum); FN_FLUSH_END            \
}                                                                                           \
static void fn_adagrad_##S(T *p, const T *g, T *h, long long n, T lr, T eps)                \
{                                                                                           \
    FN_FLUSH_BEGIN fn_adagrad_loop_##S(p, g, h, n, lr, eps); FN_FLUSH_END                  \
}                                                                                           \
static void fn_adam_##S(T *p, const T *g, T *m, T *v, long long n, T lr_t, T c1, T c2, T eps) \
{                                                                                           \
    FN_FLUSH_BEGIN fn_adam_loop_##S(p, g, m, v, n, lr_t, c1, c2, eps); FN_FLUSH_END        \
}

FN_OPTIM(float, f, sqrtf)
FN_OPTIM(double, d, sqrt)

#endif
