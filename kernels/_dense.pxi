# The elementary kernels over dense arrays (included by _cython.pyx): activations,
# affine layers (BLAS), softmax and the losses, as loops over fused float types and the
# thin def layer of the kernel table.

# ---------------------------------------------------------------- loops
cdef void _map_step(real* x, real* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = 1 if x[i] > 0 else 0


cdef void _map_sigmoid(real* x, real* out, Py_ssize_t n) noexcept nogil:
    if x != out:
        memcpy(out, x, n * sizeof(real))
    if real is float:
        fn_sigmoid_inplace_f(out, n)
    else:
        fn_sigmoid_inplace_d(out, n)


cdef void _map_relu(real* x, real* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = _relu(x[i])


cdef void _map_sigmoid_backward(real* dout, real* y, real* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = dout[i] * (1 - y[i]) * y[i]


cdef void _map_relu_backward(real* dout, real* y, real* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = 0 if y[i] <= 0 else dout[i]


cdef void _activate(real* x, Py_ssize_t n, int act) noexcept nogil:
    """x = act(x) in place over n entries (contract.Act; identity leaves x)."""
    if act == ACT_RELU:
        _map_relu(x, x, n)
    elif act == ACT_SIGMOID:
        _map_sigmoid(x, x, n)


cdef void _affine(real* x, real* W, real* b, real* out, int N, int D, int M,
                  int act, bint here=False, int ld=0) noexcept nogil:
    """out = act(x @ W + b) (contract.Act); the product on BLAS's threads, or with
    ``here`` on the calling thread only (_gemm_here).  W and out have rows of ld entries
    (0: M), so that M columns of a wider layer may be computed on their own."""
    cdef Py_ssize_t i, j
    cdef int s = ld if ld else M
    for i in range(N):
        for j in range(M):
            out[i * s + j] = b[j]
    if here:
        _gemm_here(True, False, False, N, M, D, <real>1, x, D, W, s, <real>1, out, s)
    else:
        _gemm(False, False, N, M, D, <real>1, x, D, W, s, <real>1, out, s)
    if s == M:  # rows side by side: the activation over the whole block at once
        _activate(out, <Py_ssize_t>N * M, act)
    else:
        for i in range(N):
            _activate(out + i * s, M, act)


cdef void _affine_backward(real* x, real* W, real* dout, real* dW, real* db, real* dx,
                           int N, int D, int M) noexcept nogil:
    cdef Py_ssize_t i, j
    _gemm(True, False, D, M, N, <real>1, x, D, dout, M, <real>0, dW, M)
    for j in range(M):
        db[j] = 0
    for i in range(N):
        for j in range(M):
            db[j] += dout[i * M + j]
    if dx != NULL:
        _gemm(False, True, N, D, M, <real>1, dout, M, W, M, <real>0, dx, D)


cdef void _softmax(real* x, real* y, Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    """Row-wise: y = x - max(row); y = exp(y) over the whole block; y /= sum(row)."""
    cdef Py_ssize_t i, j
    cdef real m
    cdef double s
    for i in range(N):
        m = x[i * C]
        for j in range(1, C):
            if x[i * C + j] > m or m != m:
                m = x[i * C + j]
        for j in range(C):
            y[i * C + j] = x[i * C + j] - m
    _exp_inplace(y, N * C)
    for i in range(N):
        s = 0
        for j in range(C):
            s += y[i * C + j]
        for j in range(C):
            y[i * C + j] = <real>(y[i * C + j] / s)


cdef double _ce_labels(real* y, long long* t, Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t i
    cdef double s = 0
    for i in range(N):
        s += log(<double>(y[i * C + t[i]] + <real>LOG_EPS))
    return -s / N


cdef double _ce_onehot(real* y, real* t, Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t i
    cdef double s = 0
    for i in range(N * C):
        if t[i] != 0:
            s += t[i] * log(<double>(y[i] + <real>LOG_EPS))
    return -s / N


cdef void _sl_backward_labels(real* y, long long* t, double dout, real* dx,
                              Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef real scale = <real>(dout / N)
    for i in range(N):
        for j in range(C):
            dx[i * C + j] = y[i * C + j] * scale
        dx[i * C + t[i]] = (y[i * C + t[i]] - 1) * scale


cdef void _sl_backward_onehot(real* y, real* t, double dout, real* dx,
                              Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t i
    cdef real scale = <real>(dout / N)
    for i in range(N * C):
        dx[i] = (y[i] - t[i]) * scale


cdef double _softmax_loss_delta(real* s, long long* T, long long* rows, int n, int B, int C) noexcept nogil:
    """Rows [0, n) of a batch of B: scores s (n x C) -> (softmax(s) - onehot(t)) / B in
    place, t = T[rows[i]].  Each row depends on its own inputs only, so blocks of rows may
    run on different threads.  Returns the sum of the rows' losses, in row order."""
    cdef Py_ssize_t i, j
    cdef long long t
    cdef double loss = 0
    cdef real rs = <real>(1.0 / B)
    _softmax(s, s, n, C)
    for i in range(n):
        t = T[rows[i]]
        loss -= log(<double>(s[i * C + t] + <real>LOG_EPS))
        for j in range(C):
            s[i * C + j] = s[i * C + j] * rs
        s[i * C + t] = s[i * C + t] - rs
    return loss


# ---------------------------------------------------------------- the kernel table
# which function _unary and _binary_backward apply (not activation codes: see Act)
cdef enum _Map:
    MAP_STEP
    MAP_SIGMOID
    MAP_RELU


def _unary(x, out, int which):
    cdef int tn = _typenum(x, "x")
    cdef cnp.ndarray xa = _in2(x, tn, "x")
    cdef cnp.ndarray oa = _out2(out, tn, "out", xa.shape[0], xa.shape[1])
    cdef Py_ssize_t n = cnp.PyArray_SIZE(xa)
    cdef void* px = _p(xa)
    cdef void* po = _p(oa)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            if which == MAP_STEP:
                _map_step(<float*>px, <float*>po, n)
            elif which == MAP_SIGMOID:
                _map_sigmoid(<float*>px, <float*>po, n)
            else:
                _map_relu(<float*>px, <float*>po, n)
        else:
            if which == MAP_STEP:
                _map_step(<double*>px, <double*>po, n)
            elif which == MAP_SIGMOID:
                _map_sigmoid(<double*>px, <double*>po, n)
            else:
                _map_relu(<double*>px, <double*>po, n)
    return out


def step(x, out):
    return _unary(x, out, MAP_STEP)


def sigmoid(x, out):
    return _unary(x, out, MAP_SIGMOID)


def relu(x, out):
    return _unary(x, out, MAP_RELU)


def _binary_backward(dout, y, out, int which):
    cdef int tn = _typenum(dout, "dout")
    cdef cnp.ndarray da = _in2(dout, tn, "dout")
    cdef cnp.ndarray ya = _in2(y, tn, "y")
    if ya.shape[0] != da.shape[0] or ya.shape[1] != da.shape[1]:
        raise ValueError(f"dout has shape {dout.shape} but y has shape {y.shape}")
    cdef cnp.ndarray oa = _out2(out, tn, "out", da.shape[0], da.shape[1])
    cdef Py_ssize_t n = cnp.PyArray_SIZE(da)
    cdef void* pd = _p(da)
    cdef void* py = _p(ya)
    cdef void* po = _p(oa)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            if which == MAP_SIGMOID:
                _map_sigmoid_backward(<float*>pd, <float*>py, <float*>po, n)
            else:
                _map_relu_backward(<float*>pd, <float*>py, <float*>po, n)
        else:
            if which == MAP_SIGMOID:
                _map_sigmoid_backward(<double*>pd, <double*>py, <double*>po, n)
            else:
                _map_relu_backward(<double*>pd, <double*>py, <double*>po, n)
    return out


def sigmoid_backward(dout, y, out):
    return _binary_backward(dout, y, out, MAP_SIGMOID)


def relu_backward(dout, y, out):
    return _binary_backward(dout, y, out, MAP_RELU)


def _affine_act(x, W, b, out, int act):
    _blas()
    cdef int tn = _typenum(x, "x")
    cdef cnp.ndarray xa = _in2(x, tn, "x")
    cdef cnp.ndarray Wa = _in2(W, tn, "W")
    cdef int N = _blas_dim(xa, 0, "x"), D = _blas_dim(xa, 1, "x"), M = _blas_dim(Wa, 1, "W")
    if Wa.shape[0] != D:
        raise ValueError(f"x has shape {x.shape} but W has shape {W.shape}: "
                         f"x's {D} columns must equal W's rows")
    cdef cnp.ndarray ba = _vec(b, tn, "b", M, False)
    cdef cnp.ndarray oa = _out2(out, tn, "out", N, M)
    if N == 0 or M == 0:
        return out
    cdef void* px = _p(xa)
    cdef void* pW = _p(Wa)
    cdef void* pb = _p(ba)
    cdef void* po = _p(oa)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            _affine(<float*>px, <float*>pW, <float*>pb, <float*>po, N, D, M, act)
        else:
            _affine(<double*>px, <double*>pW, <double*>pb, <double*>po, N, D, M, act)
    return out


def affine(x, W, b, out):
    return _affine_act(x, W, b, out, 0)


def affine_relu(x, W, b, out):
    return _affine_act(x, W, b, out, 1)


def affine_sigmoid(x, W, b, out):
    return _affine_act(x, W, b, out, 2)


def affine_backward(x, W, dout, dW, db, dx=None):
    _blas()
    cdef int tn = _typenum(x, "x")
    cdef cnp.ndarray xa = _in2(x, tn, "x")
    cdef cnp.ndarray Wa = _in2(W, tn, "W")
    cdef cnp.ndarray da = _in2(dout, tn, "dout")
    cdef int N = _blas_dim(xa, 0, "x"), D = _blas_dim(xa, 1, "x"), M = _blas_dim(Wa, 1, "W")
    if Wa.shape[0] != D or da.shape[0] != N or da.shape[1] != M:
        raise ValueError(f"x {x.shape}, W {W.shape} and dout {dout.shape} do not fit "
                         "x (N, D), W (D, M), dout (N, M)")
    cdef cnp.ndarray dWa = _out2(dW, tn, "dW", D, M)
    cdef cnp.ndarray dba = _vec(db, tn, "db", M, True)
    cdef cnp.ndarray dxa = None
    cdef void* pdx = NULL
    if dx is not None:
        dxa = _out2(dx, tn, "dx", N, D)
        pdx = _p(dxa)
    if N == 0 or D == 0 or M == 0:
        dW[...] = 0
        db[...] = 0
        return None
    cdef void* px = _p(xa)
    cdef void* pW = _p(Wa)
    cdef void* pd = _p(da)
    cdef void* pdW = _p(dWa)
    cdef void* pdb = _p(dba)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            _affine_backward(<float*>px, <float*>pW, <float*>pd, <float*>pdW, <float*>pdb,
                             <float*>pdx, N, D, M)
        else:
            _affine_backward(<double*>px, <double*>pW, <double*>pd, <double*>pdW,
                             <double*>pdb, <double*>pdx, N, D, M)
    return None


def softmax(x, out):
    cdef int tn = _typenum(x, "x")
    cdef cnp.ndarray xa = _in2(x, tn, "x")
    cdef Py_ssize_t N = xa.shape[0], C = xa.shape[1]
    cdef cnp.ndarray oa = _out2(out, tn, "out", N, C)
    if C == 0:
        return out
    cdef void* px = _p(xa)
    cdef void* po = _p(oa)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            _softmax(<float*>px, <float*>po, N, C)
        else:
            _softmax(<double*>px, <double*>po, N, C)
    return out


def cross_entropy_labels(y, t):
    cdef int tn = _typenum(y, "y")
    cdef cnp.ndarray ya = _in2(y, tn, "y")
    cdef Py_ssize_t N = ya.shape[0], C = ya.shape[1]
    cdef cnp.ndarray ta = _checked_labels(t, N, C)
    cdef double r
    cdef void* py = _p(ya)
    cdef long long* pt = <long long*>_p(ta)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            r = _ce_labels(<float*>py, pt, N, C)
        else:
            r = _ce_labels(<double*>py, pt, N, C)
    return r


def cross_entropy_onehot(y, t):
    cdef int tn = _typenum(y, "y")
    cdef cnp.ndarray ya = _in2(y, tn, "y")
    cdef cnp.ndarray ta = _in2(t, tn, "t")
    cdef Py_ssize_t N = ya.shape[0], C = ya.shape[1]
    if ta.shape[0] != N or ta.shape[1] != C:
        raise ValueError(f"y has shape {y.shape} but t has shape {t.shape}")
    cdef double r
    cdef void* py = _p(ya)
    cdef void* pt = _p(ta)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            r = _ce_onehot(<float*>py, <float*>pt, N, C)
        else:
            r = _ce_onehot(<double*>py, <double*>pt, N, C)
    return r


def sum_squared_error(y, t):
    cdef int tn = _typenum(y, "y")
    cdef cnp.ndarray ya = _in2(y, tn, "y")
    cdef cnp.ndarray ta = _in2(t, tn, "t")
    if ta.shape[0] != ya.shape[0] or ta.shape[1] != ya.shape[1]:
        raise ValueError(f"y has shape {y.shape} but t has shape {t.shape}")
    cdef Py_ssize_t i, n = cnp.PyArray_SIZE(ya)
    cdef double s = 0, d
    cdef float* fy = <float*>_p(ya)
    cdef float* ft = <float*>_p(ta)
    cdef double* dy = <double*>_p(ya)
    cdef double* dt = <double*>_p(ta)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            for i in range(n):
                d = fy[i] - ft[i]
                s += d * d
        else:
            for i in range(n):
                d = dy[i] - dt[i]
                s += d * d
    return 0.5 * s


def softmax_loss_labels(x, t, y):
    cdef int tn = _typenum(x, "x")
    cdef cnp.ndarray xa = _in2(x, tn, "x")
    cdef Py_ssize_t N = xa.shape[0], C = xa.shape[1]
    cdef cnp.ndarray ta = _checked_labels(t, N, C)
    cdef cnp.ndarray ya = _out2(y, tn, "y", N, C)
    cdef double r
    cdef void* px = _p(xa)
    cdef void* py = _p(ya)
    cdef long long* pt = <long long*>_p(ta)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            _softmax(<float*>px, <float*>py, N, C)
            r = _ce_labels(<float*>py, pt, N, C)
        else:
            _softmax(<double*>px, <double*>py, N, C)
            r = _ce_labels(<double*>py, pt, N, C)
    return r


def softmax_loss_onehot(x, t, y):
    softmax(x, y)
    return cross_entropy_onehot(y, t)


def softmax_loss_backward_labels(y, t, double dout, dx):
    cdef int tn = _typenum(y, "y")
    cdef cnp.ndarray ya = _in2(y, tn, "y")
    cdef Py_ssize_t N = ya.shape[0], C = ya.shape[1]
    cdef cnp.ndarray ta = _checked_labels(t, N, C)
    cdef cnp.ndarray da = _out2(dx, tn, "dx", N, C)
    cdef void* py = _p(ya)
    cdef long long* pt = <long long*>_p(ta)
    cdef void* pd = _p(da)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            _sl_backward_labels(<float*>py, pt, dout, <float*>pd, N, C)
        else:
            _sl_backward_labels(<double*>py, pt, dout, <double*>pd, N, C)
    return dx


def softmax_loss_backward_onehot(y, t, double dout, dx):
    cdef int tn = _typenum(y, "y")
    cdef cnp.ndarray ya = _in2(y, tn, "y")
    cdef cnp.ndarray ta = _in2(t, tn, "t")
    cdef Py_ssize_t N = ya.shape[0], C = ya.shape[1]
    if ta.shape[0] != N or ta.shape[1] != C:
        raise ValueError(f"y has shape {y.shape} but t has shape {t.shape}")
    cdef cnp.ndarray da = _out2(dx, tn, "dx", N, C)
    cdef void* py = _p(ya)
    cdef void* pt = _p(ta)
    cdef void* pd = _p(da)
    with nogil:
        if tn == cnp.NPY_FLOAT32:
            _sl_backward_onehot(<float*>py, <float*>pt, dout, <float*>pd, N, C)
        else:
            _sl_backward_onehot(<double*>py, <double*>pt, dout, <double*>pd, N, C)
    return dx
