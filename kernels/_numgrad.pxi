# The numerical gradient of an MLP of any depth (included by _cython.pyx after _mlp.pxi,
# whose records _Net and _Layer it uses): the kernel numerical_gradient_mlp.

# The book's central difference for every parameter of theta: the same two losses per
# parameter, but only what the parameter changes is recomputed, in double.  A weight
# W_k[i, j] moves unit j of layer k's pre-activation by d * a[r, i] in the rows r whose
# input a[r, i] is not 0 (the other rows' losses are unchanged: their difference is 0);
# above it only that row, from a rank-one change of layer k + 1 on.  The rows of W_k (and
# b_k) are shared between the threads; each gradient entry is one thread's sum in row
# order, so the result does not depend on the thread count.
cdef inline double _act64(double v, int act) noexcept nogil:
    if act == ACT_RELU:
        return v if v > 0 else 0.0
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


cdef void _numgrad_input(_Net* n, long long i, int k, double* a_in, real* theta, double* W64, double* Z,
                         double* A, long long* t, double h, double* base, real* grad, double* scratch) noexcept nogil:
    """The gradient of row i of W_k (i an input of layer k), or of b_k when i < 0; scratch
    holds two rows of the widest layer and B row numbers."""
    cdef _Layer* ly = &n.layer[k]
    cdef long long B = n.B, width = 0, r, q, nr = 0, j
    cdef int m
    for m in range(n.L):
        if n.layer[m].n_out > width:
            width = n.layer[m].n_out
    cdef double* buf0 = scratch
    cdef double* buf1 = scratch + width
    cdef long long* rows = <long long*>(scratch + 2 * width)
    cdef double w, dp, dm, diff, v
    cdef real moved
    for r in range(B):
        if i < 0 or a_in[r * ly.n_in + i] != 0:
            rows[nr] = r
            nr += 1
    for j in range(ly.n_out):
        w = theta[ly.w + i * ly.n_out + j] if i >= 0 else theta[ly.b + j]
        moved = <real>(w + h)  # the perturbed parameter as the book's array holds it
        dp = <double>moved - w
        moved = <real>(w - h)
        dm = <double>moved - w
        diff = 0
        for q in range(nr):
            r = rows[q]
            v = a_in[r * ly.n_in + i] if i >= 0 else 1.0
            diff += (_loss_after(n, r, k, j, dp * v, W64, Z, A, t, buf0, buf1, base)
                     - _loss_after(n, r, k, j, dm * v, W64, Z, A, t, buf0, buf1, base))
        if i >= 0:
            grad[ly.w + i * ly.n_out + j] = <real>(diff / B / (2 * h))
        else:
            grad[ly.b + j] = <real>(diff / B / (2 * h))


cdef void _numgrad_all(_Net* n, double* x64, real* theta, double* W64, double* Z, double* A, long long* t,
                       double h, double* base, real* grad, double* scratch, long long per_thread) noexcept nogil:
    cdef int k, nt = fn_max_threads()
    cdef long long i, r, c
    cdef _Layer* ly
    cdef double* a_in
    cdef double* z
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
    if nt > MAX_THREADS:
        nt = MAX_THREADS
    for k in range(n.L):
        ly = &n.layer[k]
        a_in = x64 if k == 0 else A + n.layer[k - 1].out
        for i in prange(-1, ly.n_in, num_threads=nt, schedule="dynamic", chunksize=4):
            _numgrad_input(n, i, k, a_in, theta, W64, Z, A, t, h, base, grad, scratch + threadid() * per_thread)


def numerical_gradient_mlp(x, t, sizes, int act, theta, double h, grad):
    x, t, sizes = _chk.mlp_numgrad(x, t, sizes, act, theta, h, grad)
    _blas()
    cdef _Net n
    _net_of(&n, sizes, act, x.shape[0])
    W64 = theta.astype(np.float64)
    x64 = x.astype(np.float64)
    Z, A, base = np.empty(n.outs), np.empty(n.outs), np.empty(n.B)
    cdef long long per_thread = 2 * int(sizes.max()) + n.B
    cdef int nt = fn_max_threads()
    scratch = np.empty(per_thread * min(nt, MAX_THREADS))
    cdef bint f32 = theta.dtype == np.float32
    cdef void* pth = _p(theta)
    cdef void* pg = _p(grad)
    cdef double* pw = <double*>_p(W64)
    cdef double* px = <double*>_p(x64)
    cdef double* pz = <double*>_p(Z)
    cdef double* pa = <double*>_p(A)
    cdef double* pb = <double*>_p(base)
    cdef double* ps = <double*>_p(scratch)
    cdef long long* pt = <long long*>_p(t)
    with nogil:
        if f32:
            _numgrad_all(&n, px, <float*>pth, pw, pz, pa, pt, h, pb, <float*>pg, ps, per_thread)
        else:
            _numgrad_all(&n, px, <double*>pth, pw, pz, pa, pt, h, pb, <double*>pg, ps, per_thread)
