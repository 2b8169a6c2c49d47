/* The numerical gradient's losses of one batch row for every unit of a layer at once
 * (_numgrad.pxi).
 *
 * Unit j of a layer moved by delta[j] moves the row's scores z (c classes) by
 * delta[j] * M[j, :], where M is the layer's linear map to the scores at that row (the
 * caller knows when the map holds).  The c x n matrix mt is M transposed, so that every
 * loop below runs along the n units and vectorises; each unit's softmax is computed as
 * the scalar _row_scores_loss of _numgrad.pxi computes it: the maximum taken the same
 * way, the exps summed in class order, the same fn_exp.
 */
#ifndef FASTNET_NUMGRAD_H
#define FASTNET_NUMGRAD_H

#include <math.h>
#include "_vmath.h"

/* loss[j] = -log(softmax(z + delta[j] * mt[:, j])[t] + eps) for j < n; s holds
 * (c + 2) * n doubles of scratch. */
FN_CLONES static void fn_ng_losses(long long n, long long c, const double *z, const double *mt,
                                   const double *delta, long long t, double eps, double *s, double *loss)
{
    double *m = s + c * n, *e = m + n;
    for (long long q = 0; q < c; q++) {
        double zq = z[q];
        const double *col = mt + q * n;
        double *sq = s + q * n;
        for (long long j = 0; j < n; j++) sq[j] = zq + delta[j] * col[j];
    }
    for (long long j = 0; j < n; j++) m[j] = s[j];
    for (long long q = 1; q < c; q++) {
        const double *sq = s + q * n;
        for (long long j = 0; j < n; j++) m[j] = (sq[j] > m[j] || m[j] != m[j]) ? sq[j] : m[j];
    }
    for (long long j = 0; j < n; j++) e[j] = 0;
    for (long long q = 0; q < c; q++) {
        const double *sq = s + q * n;
        for (long long j = 0; j < n; j++) e[j] += fn_exp(sq[j] - m[j]);
    }
    const double *st = s + t * n;
    for (long long j = 0; j < n; j++) loss[j] = fn_exp(st[j] - m[j]) / e[j] + eps;
    for (long long j = 0; j < n; j++) loss[j] = -log(loss[j]);
}

#endif
