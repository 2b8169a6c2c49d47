# The numerical gradient of an MLP of any depth (included by _cython.pyx after _mlp.pxi,
# whose records _Net and _Layer it uses): the kernel numerical_gradient_mlp.

cdef extern from "_numgrad.h" nogil:
    # a row's losses for every unit of a layer moved along its map (see _numgrad.h)
    void fn_ng_losses(long long n, long long c, const double* z, const double* mt, const double* delta,
                      long long t, double eps, double* s, double* loss)

# The book's central difference for every parameter of theta: the same two losses per
# parameter, but only what the parameter changes is recomputed, in double.  A weight
# W_k[i, j] moves unit j of layer k's pre-activation by d * a[r, i] in the rows r whose
# input a[r, i] is not 0 (the other rows' losses are unchanged: their difference is 0);
# above it only that row, along the row's linear map below (or, where that does not
# hold, from a rank-one change of layer k + 1 on).  The rows of W_k (and b_k) are shared
# between the threads; each gradient entry sums its rows in row order, whichever thread
# adds them, so the result does not depend on the thread count.
cdef inline double _act64(double v, int act) noexcept nogil:
    if act == ACT_RELU:
        return 0.0 if v <= 0 else v  # NaN stays NaN, as in the reference
    return 1.0 / (1.0 + fn_exp(-v))


cdef double _row_scores_loss(double* s, long long n, long long t) noexcept nogil:
    """-log(softmax(s[:n])[t] + 1e-7), subtracting the row's maximum as softmax does."""
    cdef long long c
    cdef double m = s[0], e = 0
    for c in range(1, n):
        if s[c] > m or m != m:
            m = s[c]
    for c in range(n):
        e += fn_exp(s[c] - m)
    return -log(fn_exp(s[t] - m) / e + LOG_EPS)


cdef double _loss_after(_Net* n, long long r, int k, long long j, double dz, double* W64, double* Z,
                        double* A, long long* t, double* buf0, double* buf1, double* base) noexcept nogil:
    """Row r's loss when unit j of layer k's pre-activation moves by dz (Z, A: every
    layer's pre-activations and outputs at the unperturbed parameters, n.B rows)."""
    cdef int L = n.L, m
    cdef _Layer* ly = &n.layer[k]
    cdef _Layer* up
    cdef long long c, q, width = ly.n_out, w_out
    cdef double delta, v
    cdef double* cur = buf0
    cdef double* nxt
    cdef double* W
    if k == L - 1:
        memcpy(cur, Z + ly.out + r * width, width * sizeof(double))
        cur[j] += dz
        return _row_scores_loss(cur, width, t[r])
    delta = _act64(Z[ly.out + r * width + j] + dz, n.act) - A[ly.out + r * width + j]
    if delta == 0:
        return base[r]
    up = &n.layer[k + 1]
    W = W64 + up.w + j * up.n_out
    for c in range(up.n_out):
        cur[c] = Z[up.out + r * up.n_out + c] + delta * W[c]
    width = up.n_out
    for m in range(k + 2, L):
        up = &n.layer[m]
        for c in range(width):
            cur[c] = _act64(cur[c], n.act)
        nxt = buf1 if cur == buf0 else buf0
        w_out = up.n_out
        for c in range(w_out):
            nxt[c] = W64[up.b + c]
        for q in range(width):
            v = cur[q]
            if v != 0:
                W = W64 + up.w + q * w_out
                for c in range(w_out):
                    nxt[c] += v * W[c]
        cur = nxt
        width = w_out
    return _row_scores_loss(cur, width, t[r])


# Where it holds, the loss is not propagated unit by unit: moving unit j of layer k by
# delta moves the row's scores by delta * M[j, :], where M is the product of the weights
# above layer k with the row's active ReLUs between them (the map from layer k to the
# scores at that row).  That holds while no ReLU above changes side, that is while
# |delta| * |N_m[j, q]| < |z_m[r, q]| for every hidden layer m above (N_m the map from
# layer k to layer m): the limit kept per row and unit is half of the smallest such
# ratio, and a move at or beyond it is propagated as above (_loss_after).  For the top
# two layers the map is exact for any activation (the identity, and W of the top layer).
# A row with a value that is not finite, or weights that are not, takes _loss_after for
# every unit, as does every layer when NUMGRAD_LINEAR is False (the tests compare both).
NUMGRAD_LINEAR = True
NUMGRAD_MAP_BYTES = 1 << 25  # at most this much of maps per chunk of batch rows (read at each call)


cdef struct _NgMaps:
    long long r0, rows          # the chunk: batch rows r0 .. r0 + rows - 1
    double* mt[MAX_LAYERS]      # layer k's maps, transposed: rows x (C x n_k); the top: the identity
    long long stride[MAX_LAYERS]  # between rows of mt[k] (0 for the identity)
    double* lim[MAX_LAYERS]     # rows x n_k: |delta| below it keeps the map exact
    bint mapped[MAX_LAYERS]     # whether layer k has maps at all (else lim is 0)


cdef inline bint _finite_row(double* z, long long n) noexcept nogil:
    cdef long long c
    for c in range(n):
        if not (z[c] - z[c] == 0):
            return False
    return True


cdef void _ng_limit(double* lim, double* N, long long nk, long long nm, double* z) noexcept nogil:
    """lim[j] = min(lim[j], half the smallest |z[q]| / |N[j, q]|); 0 where that is NaN."""
    cdef long long j, q
    cdef double b, v
    for j in range(nk):
        for q in range(nm):
            b = fabs(N[j * nm + q])
            if b != 0:
                v = 0.5 * fabs(z[q]) / b
                if v != v:
                    v = 0
                if v < lim[j]:
                    lim[j] = v


cdef void _ng_maps(_Net* n, double* W64, double* Z, _NgMaps* g, double* work,
                   long long width) noexcept nogil:
    """Each row's maps and limits for the chunk g.r0 .. g.r0 + g.rows - 1 (work: four
    width x width matrices)."""
    cdef int L = n.L, k, m
    cdef long long C = n.layer[L - 1].n_out, rr, r, j, c, q, na, nk, nm, nprev
    cdef double* N
    cdef double* Nn
    cdef double* Nc = work + 2 * width * width
    cdef double* Wc = work + 3 * width * width
    cdef double* mt
    cdef double* lim
    cdef double* zm
    cdef bint ok
    for rr in range(g.rows):
        r = g.r0 + rr
        ok = True
        for m in range(L):
            ok = ok and _finite_row(Z + n.layer[m].out + r * n.layer[m].n_out, n.layer[m].n_out)
        for k in range(L):
            nk = n.layer[k].n_out
            lim = g.lim[k] + rr * nk
            for j in range(nk):
                lim[j] = INFINITY if ok and g.mapped[k] else 0
            if not (ok and g.mapped[k]) or k == L - 1:
                continue
            mt = g.mt[k] + rr * g.stride[k]
            N = W64 + n.layer[k + 1].w  # N_{k+1} = W_{k+1}
            nprev = n.layer[k + 1].n_out
            for m in range(k + 1, L):
                nm = n.layer[m].n_out
                if m > k + 1:  # N_m = N_{m-1}[:, active] W_m[active, :]
                    zm = Z + n.layer[m - 1].out + r * nprev
                    na = 0
                    for q in range(nprev):
                        if zm[q] > 0:
                            for j in range(nk):
                                Nc[j * nprev + na] = N[j * nprev + q]
                            memcpy(Wc + na * nm, W64 + n.layer[m].w + q * nm, nm * sizeof(double))
                            na += 1
                    Nn = work if N != work else work + width * width
                    if na == 0:
                        memset(Nn, 0, nk * nm * sizeof(double))
                    else:
                        _gemm(False, False, <int>nk, <int>nm, <int>na, <double>1, Nc, <int>nprev, Wc, <int>nm,
                              <double>0, Nn, <int>nm)
                    N = Nn
                if m < L - 1:
                    _ng_limit(lim, N, nk, nm, Z + n.layer[m].out + r * nm)
                nprev = nm
            for j in range(nk):  # N is now the map to the scores
                if not _finite_row(N + j * C, C):
                    lim[j] = 0
                for c in range(C):
                    mt[c * nk + j] = N[j * C + c]


cdef void _ng_row_losses(_Net* n, int k, long long r, long long rr, double* d, double v, double* W64,
                         double* Z, double* A, long long* t, double* base, _NgMaps* g, double* delta,
                         double* s, double* buf0, double* buf1, double* loss) noexcept nogil:
    """loss[j]: row r's loss with unit j of layer k's pre-activation moved by d[j] * v."""
    cdef _Layer* ly = &n.layer[k]
    cdef _Layer* top = &n.layer[n.L - 1]
    cdef long long j, nk = ly.n_out
    cdef double dz
    cdef double* lim = g.lim[k] + rr * nk
    for j in range(nk):
        dz = d[j] * v
        delta[j] = dz if k == n.L - 1 else _act64(Z[ly.out + r * nk + j] + dz, n.act) - A[ly.out + r * nk + j]
    if g.mapped[k]:
        fn_ng_losses(nk, top.n_out, Z + top.out + r * top.n_out, g.mt[k] + rr * g.stride[k], delta, t[r],
                     LOG_EPS, s, loss)
    for j in range(nk):
        if delta[j] == 0:
            loss[j] = base[r]
        elif not (fabs(delta[j]) < lim[j]):
            loss[j] = _loss_after(n, r, k, j, d[j] * v, W64, Z, A, t, buf0, buf1, base)


cdef void _numgrad_input(_Net* n, long long i, int k, double* a_in, real* theta, double* W64, double* Z,
                         double* A, long long* t, double h, double* base, double* G, _NgMaps* g,
                         double* scratch, long long width) noexcept nogil:
    """Add the chunk's rows' loss differences to G for row i of W_k (i an input of layer
    k), or for b_k when i < 0; scratch: (9 + C) x width doubles."""
    cdef _Layer* ly = &n.layer[k]
    cdef long long nk = ly.n_out, rr, r, j, o = ly.w + i * nk if i >= 0 else ly.b
    cdef double* dp = scratch
    cdef double* dm = scratch + width
    cdef double* lp = scratch + 2 * width
    cdef double* lm = scratch + 3 * width
    cdef double* delta = scratch + 4 * width
    cdef double* buf0 = scratch + 5 * width
    cdef double* buf1 = scratch + 6 * width
    cdef double* s = scratch + 7 * width
    cdef double w, v
    cdef real moved
    for j in range(nk):
        w = theta[o + j]
        moved = <real>(w + h)  # the perturbed parameter as the book's array holds it
        dp[j] = <double>moved - w
        moved = <real>(w - h)
        dm[j] = <double>moved - w
    for rr in range(g.rows):
        r = g.r0 + rr
        v = a_in[r * ly.n_in + i] if i >= 0 else 1.0
        if v == 0:
            continue
        _ng_row_losses(n, k, r, rr, dp, v, W64, Z, A, t, base, g, delta, s, buf0, buf1, lp)
        _ng_row_losses(n, k, r, rr, dm, v, W64, Z, A, t, base, g, delta, s, buf0, buf1, lm)
        for j in range(nk):
            G[o + j] += lp[j] - lm[j]


cdef void _numgrad_all(_Net* n, double* x64, real* theta, double* W64, double* Z, double* A, long long* t,
                       double h, double* base, double* G, real* grad, _NgMaps* g, long long chunk,
                       double* work, double* scratch, long long width) noexcept nogil:
    cdef int k, nt = fn_max_threads()
    cdef long long i, r, c, per_thread = (9 + n.layer[n.L - 1].n_out) * width
    cdef int threads[MAX_BLAS_LIBS]
    cdef _Layer* ly
    cdef double* a_in
    cdef double* z
    _blas_one_thread(threads)  # BLAS threads left spinning would take a core from the loop
    for k in range(n.L):  # the unperturbed forward, in double
        ly = &n.layer[k]
        a_in = x64 if k == 0 else A + n.layer[k - 1].out
        z = Z + ly.out
        _gemm(False, False, n.B, <int>ly.n_out, <int>ly.n_in, <double>1, a_in, <int>ly.n_in, W64 + ly.w,
              <int>ly.n_out, <double>0, z, <int>ly.n_out)
        for r in range(n.B):
            for c in range(ly.n_out):
                z[r * ly.n_out + c] += W64[ly.b + c]
                A[ly.out + r * ly.n_out + c] = _act64(z[r * ly.n_out + c], n.act)
    ly = &n.layer[n.L - 1]
    for r in range(n.B):
        base[r] = _row_scores_loss(Z + ly.out + r * ly.n_out, ly.n_out, t[r])
    for r in range(n.B):
        if base[r] != base[r]:  # the book's mean loss is NaN at every move: so is each entry
            for i in range(n.size):
                grad[i] = <real>NAN
            _blas_threads_back(threads)
            return
    memset(G, 0, n.size * sizeof(double))
    if nt > MAX_THREADS:
        nt = MAX_THREADS
    g.r0 = 0
    while g.r0 < n.B:  # chunk by chunk: each entry of G sums its rows in order
        g.rows = min(chunk, n.B - g.r0)
        _ng_maps(n, W64, Z, g, work, width)
        for k in range(n.L):
            ly = &n.layer[k]
            a_in = x64 if k == 0 else A + n.layer[k - 1].out
            for i in prange(-1, ly.n_in, num_threads=nt, schedule="dynamic", chunksize=4):
                _numgrad_input(n, i, k, a_in, theta, W64, Z, A, t, h, base, G, g,
                               scratch + threadid() * per_thread, width)
        g.r0 += chunk
    _blas_threads_back(threads)
    for i in range(n.size):
        grad[i] = <real>(G[i] / n.B / (2 * h))


def numerical_gradient_mlp(x, t, sizes, int act, theta, double h, grad):
    x, t, sizes = _chk.mlp_numgrad(x, t, sizes, act, theta, h, grad)
    _blas()
    cdef _Net n
    cdef _NgMaps g
    _net_of(&n, sizes, act, x.shape[0])
    W64 = theta.astype(np.float64)
    x64 = x.astype(np.float64)
    Z, A, base, G = np.empty(n.outs), np.empty(n.outs), np.empty(n.B), np.empty(n.size)
    cdef int k, L = n.L
    cdef long long width = int(sizes[1:].max()), C = n.layer[L - 1].n_out, per_row = 0
    cdef bint linear = NUMGRAD_LINEAR and bool(np.isfinite(W64).all())
    for k in range(L):
        g.mapped[k] = linear and (k >= L - 2 or act == ACT_RELU)
        per_row += n.layer[k].n_out * (C * (k < L - 1) + 1)
    cdef long long chunk = max(1, min(n.B, int(NUMGRAD_MAP_BYTES) // (8 * per_row)))
    maps = np.zeros(chunk * per_row + C * C)
    cdef double* pm = <double*>_p(maps)
    for k in range(L):  # each layer's maps, then its limits; the top's map is the identity
        g.mt[k] = pm
        g.stride[k] = C * n.layer[k].n_out if k < L - 1 else 0
        pm += chunk * g.stride[k]
        g.lim[k] = pm
        pm += chunk * n.layer[k].n_out
    g.mt[L - 1] = pm
    for k in range(C):
        pm[k * C + k] = 1
    work = np.empty(4 * width * width)
    cdef int nt = fn_max_threads()
    scratch = np.empty((9 + C) * width * min(nt, MAX_THREADS))
    cdef bint f32 = theta.dtype == np.float32
    cdef void* pth = _p(theta)
    cdef void* pg = _p(grad)
    cdef double* pw = <double*>_p(W64)
    cdef double* px = <double*>_p(x64)
    cdef double* pz = <double*>_p(Z)
    cdef double* pa = <double*>_p(A)
    cdef double* pb = <double*>_p(base)
    cdef double* pG = <double*>_p(G)
    cdef double* pk = <double*>_p(work)
    cdef double* ps = <double*>_p(scratch)
    cdef long long* pt = <long long*>_p(t)
    with nogil:
        if f32:
            _numgrad_all(&n, px, <float*>pth, pw, pz, pa, pt, h, pb, pG, <float*>pg, &g, chunk, pk, ps, width)
        else:
            _numgrad_all(&n, px, <double*>pth, pw, pz, pa, pt, h, pb, pG, <double*>pg, &g, chunk, pk, ps, width)
