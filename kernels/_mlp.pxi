# The MLP engine (included by _cython.pyx): a net of any depth as one flat parameter
# vector theta holding W1, b1, W2, b2, ... one after the other (contract.mlp_views).
#
# The arguments are checked once, in Python, by kernels/_checks.py (mlp_*), for all
# three backends; the code here trusts them.  A layer is a record (_Layer) inside the
# net's record (_Net): its sizes and where its parameters and outputs lie.  The steps
# and the evaluations run in OpenMP regions, each thread with blocks of the work and
# its products on that thread (_gemm_here); mlp_gradient runs on the calling thread,
# its products on BLAS's threads (_gemm).  The first layer over CSR rows goes through
# the loops of _sparse.h in their padded layout, split between threads by blocks of
# pixels; and mlp_gradient runs the first layer of a sparse float32 batch over its
# non-zeros (_nzrows.h).

DEF MAX_LAYERS = 64


cdef struct _Layer:
    long long n_in, n_out
    long long w, b     # where W (n_in x n_out) and b (n_out) start in theta (and in grad)
    long long out      # where this layer's outputs (B x n_out) start in acts and deltas


cdef struct _Net:
    int L              # layers (Affine), at most MAX_LAYERS
    int act            # Act of the hidden layers (the top one is softmax-with-loss)
    int B              # rows per batch
    long long size     # len(theta)
    long long outs     # B * (n_out summed over the layers): the length of acts and deltas
    _Layer layer[MAX_LAYERS]


cdef int _net_of(_Net* n, object sizes, int act, long long B) except -1:
    cdef long long w = 0, o = 0
    cdef int k
    if sizes.shape[0] - 1 > MAX_LAYERS:
        raise ValueError(f"the MLP engine takes at most {MAX_LAYERS} layers, got {sizes.shape[0] - 1}")
    n.L = sizes.shape[0] - 1
    n.act = act
    n.B = <int>B
    for k in range(n.L):
        n.layer[k].n_in = sizes[k]
        n.layer[k].n_out = sizes[k + 1]
        n.layer[k].w = w
        n.layer[k].b = w + sizes[k] * sizes[k + 1]
        n.layer[k].out = o
        w += sizes[k] * sizes[k + 1] + sizes[k + 1]
        o += B * sizes[k + 1]
    n.size = w
    n.outs = o
    return 0


cdef double _mlp_backprop(_Net* n, real* theta, real* grad, real* x, real* acts, real* deltas,
                          long long* T, long long* rows, int lo, double decay) noexcept nogil:
    """The gradient of mlp_gradient: forward from layer lo (input x when lo is 0, else
    layer lo - 1's outputs already in acts), softmax-with-loss, backward: every layer's
    db, its dW from layer lo on (+ decay W), and for lo = 1 layer 0's pre-activation
    gradient left in deltas (its dW is the caller's: the product over the non-zeros).
    The products on BLAS's threads.  Returns the loss (+ 0.5 decay sum W**2)."""
    cdef int k, B = n.B, L = n.L
    cdef Py_ssize_t i, j, q
    cdef _Layer* ly
    cdef real* inp
    cdef real* dz
    cdef real* below
    cdef real* W
    cdef real* dW
    cdef real* db
    cdef real d = <real>decay
    cdef double loss
    for k in range(lo, L):
        ly = &n.layer[k]
        inp = x if k == 0 else acts + n.layer[k - 1].out
        _affine(inp, theta + ly.w, theta + ly.b, acts + ly.out, B, <int>ly.n_in, <int>ly.n_out,
                n.act if k < L - 1 else 0)
    ly = &n.layer[L - 1]
    dz = acts + ly.out
    loss = _softmax_loss_delta(dz, T, rows, B, B, <int>ly.n_out) / B
    for k in range(L - 1, -1, -1):
        ly = &n.layer[k]
        W, dW, db = theta + ly.w, grad + ly.w, grad + ly.b
        for j in range(ly.n_out):
            db[j] = 0
        for i in range(B):
            for j in range(ly.n_out):
                db[j] += dz[i * ly.n_out + j]
        below = NULL
        if k > 0:
            below = deltas + n.layer[k - 1].out
            _gemm(False, True, B, <int>ly.n_in, <int>ly.n_out, <real>1, dz, <int>ly.n_out, W, <int>ly.n_out,
                  <real>0, below, <int>ly.n_in)
            if n.act == ACT_RELU:
                _map_relu_backward(below, acts + n.layer[k - 1].out, below, B * ly.n_in)
            else:
                _map_sigmoid_backward(below, acts + n.layer[k - 1].out, below, B * ly.n_in)
        if k >= lo:
            inp = x if k == 0 else acts + n.layer[k - 1].out
            _gemm(True, False, <int>ly.n_in, <int>ly.n_out, B, <real>1, inp, <int>ly.n_in, dz, <int>ly.n_out,
                  <real>0, dW, <int>ly.n_out)
            if decay != 0:
                for q in range(ly.n_in * ly.n_out):
                    dW[q] += d * W[q]
        dz = below
    return _decay_loss(n, theta, decay, loss)


cdef extern from "_nzrows.h" nogil:
    # the first layer of a dense float32 batch over its non-zeros (see _nzrows.h)
    int fn_nz_ready()
    int fn_nz_finite(const float* W, long long n)
    long long fn_nz_rows(const float* X, long long B, long long D, int* col, float* val, long long* ptr,
                         long long most)
    void fn_nz_forward(const long long* ptr, const int* col, const float* val, long long B, long long D,
                       const float* W, const float* b, long long H, float* h, float* S, long long* cur)
    void fn_nz_backward(const long long* ptr, const int* col, const float* val, long long B, long long D,
                        const float* dz, long long H, float* dW, float* S, long long* cur)
    enum: FN_NZ_SCRATCH  # floats of S, 64-byte aligned

# mlp_gradient runs the first layer over the non-zeros (float32, on a CPU with AVX-512 or
# AVX2) when at most NZ_MAX_DENSITY of the batch's inputs are non-zero and the layer has
# at least NZ_MIN_UNITS units and at most NZ_MAX_OUTPUTS outputs (rows x units); elsewhere
# BLAS's dense products are as fast or faster (benchmarks/README.md, "mlp_gradient over
# the non-zeros", with AVX-512 and on AVX2).
NZ_READY = bool(fn_nz_ready())
NZ_MAX_DENSITY = 0.22
NZ_MIN_UNITS = 32
NZ_MAX_OUTPUTS = 32000


cdef struct _NzWork:
    # the non-zeros of a batch (fn_nz_rows) and the scratch of the two products
    long long most        # the most non-zeros worth listing (NZ_MAX_DENSITY of the batch)
    long long* ptr        # B + 1: row i's non-zeros are col[ptr[i]:ptr[i + 1]] and val[...]
    int* col              # most + D + 16
    float* val            # most + D + 16
    long long* cur        # B positions
    float* S              # FN_NZ_SCRATCH floats, 64-byte aligned


cdef bint _mlp_gradient_nz(_Net* n, float* theta, float* grad, float* x, float* acts, float* deltas,
                           long long* T, long long* rows, double decay, _NzWork* w, double* loss) noexcept nogil:
    """_mlp_backprop's gradient with the first layer's two products over the non-zeros of
    x (fn_nz_rows, fn_nz_forward, fn_nz_backward).  Returns False when x has more than
    w.most non-zeros (the dense products are then the faster way), and when W1 holds a
    value that is not finite or the loss is not finite: a NaN or inf then spreads through
    the dense products' zeros (0 * inf) as the caller's dense pass spreads it."""
    cdef _Layer* ly = &n.layer[0]
    cdef long long D = ly.n_in, H = ly.n_out, q
    cdef float* h = acts + ly.out
    cdef float d = <float>decay
    if not fn_nz_finite(theta + ly.w, D * H) or fn_nz_rows(x, n.B, D, w.col, w.val, w.ptr, w.most) < 0:
        return False
    fn_nz_forward(w.ptr, w.col, w.val, n.B, D, theta + ly.w, theta + ly.b, H, h, w.S, w.cur)
    if n.L > 1:
        if n.act == ACT_RELU:
            _map_relu(h, h, n.B * H)
        else:
            _map_sigmoid(h, h, n.B * H)
    loss[0] = _mlp_backprop(n, theta, grad, <float*>NULL, acts, deltas, T, rows, 1, decay)
    if not (loss[0] - loss[0] == 0):
        return False
    fn_nz_backward(w.ptr, w.col, w.val, n.B, D, (deltas if n.L > 1 else acts) + ly.out, H, grad + ly.w, w.S,
                   w.cur)
    if decay != 0:
        for q in range(D * H):
            grad[ly.w + q] += d * theta[ly.w + q]
    return True


cdef extern from "_optim.h" nogil:
    # the optimisers' loops over a flat vector (see _optim.h)
    void fn_sgd_f(float* p, const float* g, long long n, float lr)
    void fn_sgd_d(double* p, const double* g, long long n, double lr)
    void fn_momentum_f(float* p, const float* g, float* v, long long n, float lr, float momentum)
    void fn_momentum_d(double* p, const double* g, double* v, long long n, double lr, double momentum)
    void fn_adagrad_f(float* p, const float* g, float* h, long long n, float lr, float eps)
    void fn_adagrad_d(double* p, const double* g, double* h, long long n, double lr, double eps)
    void fn_adam_f(float* p, const float* g, float* m, float* v, long long n, float lr_t, float c1, float c2,
                   float eps)
    void fn_adam_d(double* p, const double* g, double* m, double* v, long long n, double lr_t, double c1,
                   double c2, double eps)


cdef void _optimizer_begin(double* opt) noexcept nogil:
    """A step of the optimiser of the record opt starts: Adam counts it (its bias
    correction takes the count), the others keep no count."""
    if <int>opt[OPT_KIND] == OPT_ADAM:
        opt[OPT_ITER] += 1


cdef void _optimizer_range(real* theta, real* grad, double* opt, real* m, real* v,
                           long long start, long long end) noexcept nogil:
    """The optimiser of the record opt (contract.Opt, fastnet.optim's formulas in theta's
    dtype) on theta[start:end] from grad; m and v its state (_optim.h).  Each element is
    updated from its own values alone, so a step may be applied in ranges, on different
    threads, after one _optimizer_begin."""
    cdef int kind = <int>opt[OPT_KIND]
    cdef long long n = end - start
    cdef real lr = <real>opt[OPT_LR], eps = <real>LOG_EPS, lr_t
    cdef double it
    theta, grad, m, v = theta + start, grad + start, m + start, v + start
    if kind == OPT_SGD:
        if real is float:
            fn_sgd_f(theta, grad, n, lr)
        else:
            fn_sgd_d(theta, grad, n, lr)
    elif kind == OPT_MOMENTUM:
        if real is float:
            fn_momentum_f(theta, grad, m, n, lr, <real>opt[OPT_BETA1])
        else:
            fn_momentum_d(theta, grad, m, n, lr, <real>opt[OPT_BETA1])
    elif kind == OPT_ADAGRAD:
        if real is float:
            fn_adagrad_f(theta, grad, m, n, lr, eps)
        else:
            fn_adagrad_d(theta, grad, m, n, lr, eps)
    else:
        it = opt[OPT_ITER]
        lr_t = <real>(opt[OPT_LR] * sqrt(1.0 - pow(opt[OPT_BETA2], it)) / (1.0 - pow(opt[OPT_BETA1], it)))
        if real is float:
            fn_adam_f(theta, grad, m, v, n, lr_t, 1 - <real>opt[OPT_BETA1], 1 - <real>opt[OPT_BETA2], eps)
        else:
            fn_adam_d(theta, grad, m, v, n, lr_t, 1 - <real>opt[OPT_BETA1], 1 - <real>opt[OPT_BETA2], eps)


cdef void _decay_step(real* theta, real* grad, double* opt, real* m, real* v, real decay, long long start,
                      long long end) noexcept nogil:
    """theta[start:end]: grad += decay theta, then the optimiser's step (begun by the
    caller, _optimizer_begin)."""
    cdef long long q
    if decay != 0:
        for q in range(start, end):
            grad[q] += decay * theta[q]
    _optimizer_range(theta, grad, opt, m, v, start, end)


# A training step runs in one OpenMP region, in phases with a barrier between them, each
# phase's work cut into a fixed number of blocks (block k on thread k mod the threads),
# so that no sum depends on the thread count: first by blocks of the batch's rows (the
# forward, softmax-with-loss and every delta down to the first layer's: each layer's rows
# need only the same rows of the layer next to them, and no weight changes before every
# dz W^T is done), then by blocks of every weight matrix's rows and every bias's columns
# (the gradients over the whole batch, and the optimiser on the same thread).  A sparse
# step adds a phase before these for the first layer's forward by blocks of pixels; a
# dense step adds two, its rows gathered by blocks of rows, then the first layer by
# blocks of its columns (each thread's product then copies ("packs") only its part of W1
# into BLAS's layout, not all of it for half the rows).
DEF ROW_BLOCKS = PIXEL_BLOCKS  # a sparse step's last phase gives block k of both to one thread
# the steps' products go to BLAS held to one thread for the region (_blas_one_thread),
# or to fn_gemm_256, from each block's thread (_gemm_here)


cdef inline real* _delta(_Net* n, real* acts, real* deltas, int k) noexcept nogil:
    """Where layer k's pre-activation gradient lies (B x n_out): the top layer's
    in place of its scores (softmax-with-loss), the others' in deltas."""
    return (acts if k == n.L - 1 else deltas) + n.layer[k].out


cdef double _rows_above(_Net* n, long long* T, long long* rows, real* theta, real* acts, real* deltas,
                        long long r0, long long r1) noexcept nogil:
    """Rows r0:r1 of a step's batch, once the first layer's outputs are in acts: the
    forward above the first layer, softmax-with-loss and the deltas back down to the
    first layer's (_delta), each from the same rows of the layer next to it, with the
    weights as they were before the step.  Returns the rows' losses summed in row order."""
    cdef _Layer* ly
    cdef long long nr = r1 - r0
    cdef int k, L = n.L
    cdef real* dz
    cdef real* below
    for k in range(1, L):
        ly = &n.layer[k]
        _affine(acts + n.layer[k - 1].out + r0 * ly.n_in, theta + ly.w, theta + ly.b, acts + ly.out + r0 * ly.n_out,
                <int>nr, <int>ly.n_in, <int>ly.n_out, n.act if k < L - 1 else 0, True)
    ly = &n.layer[L - 1]
    dz = acts + ly.out + r0 * ly.n_out
    cdef double loss = _softmax_loss_delta(dz, T, rows + r0, <int>nr, n.B, <int>ly.n_out)
    for k in range(L - 1, 0, -1):
        ly = &n.layer[k]
        below = deltas + n.layer[k - 1].out + r0 * ly.n_in
        _gemm_here(True, False, True, <int>nr, <int>ly.n_in, <int>ly.n_out, <real>1, dz, <int>ly.n_out,
                   theta + ly.w, <int>ly.n_out, <real>0, below, <int>ly.n_in)
        if n.act == ACT_RELU:
            _map_relu_backward(below, acts + n.layer[k - 1].out + r0 * ly.n_in, below, nr * ly.n_in)
        else:
            _map_sigmoid_backward(below, acts + n.layer[k - 1].out + r0 * ly.n_in, below, nr * ly.n_in)
        dz = below
    return loss


cdef void _grads(_Net* n, real* x, real* theta, double* opt, real* m, real* v, real* acts, real* deltas,
                 real* grad, bint direct, int k) noexcept nogil:
    """Block k (of ROW_BLOCKS) of a step's update, once every row's deltas are known:
    each bias's columns and each weight matrix's rows, dW = X^T dz over the whole batch
    (X: the layer's inputs; for the first layer x, or nothing when x is NULL: a sparse
    step scatters that one).  Plain SGD without decay (direct) is folded into the
    products (W -= lr dW: alpha = -lr, beta = 1); otherwise each block takes decay W into
    its gradient and the optimiser's step (begun by the caller), elementwise, so no block
    waits for another."""
    cdef _Layer* ly
    cdef long long lo, hi
    cdef Py_ssize_t i, j
    cdef int kk, B = n.B
    cdef real lr = <real>opt[OPT_LR], d = <real>opt[OPT_DECAY]
    cdef real* dz
    cdef real* db
    cdef real* inp
    for kk in range(n.L):
        ly = &n.layer[kk]
        dz = _delta(n, acts, deltas, kk)
        db = grad + ly.b
        lo = ly.n_out * k // ROW_BLOCKS
        hi = ly.n_out * (k + 1) // ROW_BLOCKS
        for j in range(lo, hi):
            db[j] = 0
        for i in range(B):
            for j in range(lo, hi):
                db[j] += dz[i * ly.n_out + j]
        if direct:
            for j in range(lo, hi):
                theta[ly.b + j] -= lr * db[j]
        else:
            _optimizer_range(theta, grad, opt, m, v, ly.b + lo, ly.b + hi)
        inp = x if kk == 0 else acts + n.layer[kk - 1].out
        if inp == NULL:
            continue
        lo = ly.n_in * k // ROW_BLOCKS
        hi = ly.n_in * (k + 1) // ROW_BLOCKS
        if direct:
            _gemm_here(True, True, False, <int>(hi - lo), <int>ly.n_out, B, -lr, inp + lo, <int>ly.n_in, dz,
                       <int>ly.n_out, <real>1, theta + ly.w + lo * ly.n_out, <int>ly.n_out)
        else:
            _gemm_here(True, True, False, <int>(hi - lo), <int>ly.n_out, B, <real>1, inp + lo, <int>ly.n_in, dz,
                       <int>ly.n_out, <real>0, grad + ly.w + lo * ly.n_out, <int>ly.n_out)
            _decay_step(theta, grad, opt, m, v, d, ly.w + lo * ly.n_out, ly.w + hi * ly.n_out)


cdef double _decay_loss(_Net* n, real* theta, double decay, double loss=0) noexcept nogil:
    """loss + 0.5 decay sum W**2 over every layer's W, layer by layer (loss without decay)."""
    cdef _Layer* ly
    cdef long long p
    cdef int k
    cdef double sq
    if decay == 0:
        return loss
    for k in range(n.L):
        ly = &n.layer[k]
        sq = 0
        for p in range(ly.n_in * ly.n_out):
            sq += <double>theta[ly.w + p] * theta[ly.w + p]
        loss += 0.5 * decay * sq
    return loss


cdef double _dense_step(_Net* n, real* X, unsigned char* U, long long* T, long long* rows, real* theta,
                        double* opt, real* m, real* v, real* xb, real* acts, real* deltas, real* grad,
                        bint direct, int nt) noexcept nogil:
    """A step on dense rows in one region of nt threads: by blocks of rows, their inputs
    gathered (_gather_rows); the first layer by blocks of its columns (_affine with
    rows of first.n_out); _rows_above by blocks of rows; then _grads by blocks.  Returns the batch's loss
    (+ 0.5 decay sum W**2, over W before the step)."""
    cdef double parts[ROW_BLOCKS]
    cdef _Layer* first = &n.layer[0]
    cdef long long r0, r1, c0, c1, D = first.n_in
    cdef int k, tid, nthr, B = n.B
    cdef double loss = _decay_loss(n, theta, opt[OPT_DECAY])
    if not direct:
        _optimizer_begin(opt)
    with parallel(num_threads=nt):
        tid = threadid()
        nthr = fn_num_threads()
        k = tid
        while k < ROW_BLOCKS:
            r0 = B * k // ROW_BLOCKS
            r1 = B * (k + 1) // ROW_BLOCKS
            _gather_rows(X, U, rows + r0, xb + r0 * D, <int>(r1 - r0), <int>D)
            k = k + nthr
        fn_barrier()  # the first layer's columns read every row
        k = tid
        while k < ROW_BLOCKS:
            c0 = first.n_out * k // ROW_BLOCKS
            c1 = first.n_out * (k + 1) // ROW_BLOCKS
            _affine(xb, theta + first.w + c0, theta + first.b + c0, acts + first.out + c0, B, <int>D, <int>(c1 - c0),
                    n.act if n.L > 1 else 0, True, <int>first.n_out)
            k = k + nthr
        fn_barrier()  # the rows above read every column of their rows
        k = tid
        while k < ROW_BLOCKS:
            r0 = B * k // ROW_BLOCKS
            r1 = B * (k + 1) // ROW_BLOCKS
            parts[k] = _rows_above(n, T, rows, theta, acts, deltas, r0, r1)
            k = k + nthr
        fn_barrier()  # the gradients sum over every row; the weights change after every dz W^T
        k = tid
        while k < ROW_BLOCKS:
            _grads(n, xb, theta, opt, m, v, acts, deltas, grad, direct, k)
            k = k + nthr
    for k in range(ROW_BLOCKS):
        loss += parts[k] / B
    return loss


cdef int _steps_threads(long long work) noexcept nogil:
    """The threads of a step's region for a batch of ``work`` inputs (its non-zeros, for
    CSR rows): one below PARALLEL_NNZ (waking the others costs more), else up to
    ROW_BLOCKS."""
    cdef int nt = fn_max_threads()
    if nt > ROW_BLOCKS:
        nt = ROW_BLOCKS
    if nt < 1 or work < PARALLEL_NNZ:
        nt = 1
    return nt


cdef int _mlp_steps(_Net* n, real* X, unsigned char* U, long long* T, long long* idx, int S,
                    real* theta, double* opt, real* m, real* v, double* losses, real* xb, real* acts,
                    real* deltas, real* grad) noexcept nogil:
    """S steps on dense rows (X, or U uint8 pixels / 255), each _dense_step: batch k is
    idx[k B : (k + 1) B].  Stops after a step whose loss is not finite; returns the
    number run."""
    cdef int k
    cdef bint direct = opt[OPT_KIND] == OPT_SGD and opt[OPT_DECAY] == 0
    cdef int nt = _steps_threads(<long long>n.B * n.layer[0].n_in)
    for k in range(S):
        losses[k] = _dense_step(n, X, U, T, idx + <Py_ssize_t>k * n.B, theta, opt, m, v, xb, acts, deltas, grad,
                                direct, nt)
        if not (losses[k] - losses[k] == 0):  # NaN or inf: stop here
            return k + 1
    return S


cdef struct _SparseFirst:
    # the first layer of a sparse step: its CSR rows and, in the padded layout of
    # _sparse.h (_padded_take), W (read by the forward; for direct SGD updated there), b,
    # the rows scattered G (-lr * delta when direct, else delta), the forward's sums over
    # each block of pixels (fwd) and, when not direct, the gradient dW
    long long* indptr
    int* indices
    void* data
    bint pix
    void* lut    # the pixel table (_pixel_table) in theta's dtype
    _Padded pad
    bint direct  # plain SGD without weight decay: X^T G scattered into pad.W itself


cdef double _sparse_rows(_Net* n, _SparseFirst* f, long long* T, long long* rows, real* theta, real* acts,
                         real* deltas, real scale, long long r0, long long r1) noexcept nogil:
    """Rows r0:r1 of a sparse step's batch, once the first layer's forward sums are in
    f.pad.fwd: the first layer's outputs, _rows_above, and the first layer's deltas
    into f.pad.G (padded, times scale).  Returns the rows' losses summed in row order."""
    cdef _Layer* first = &n.layer[0]
    cdef long long H = first.n_out, HP = f.pad.HP, nr = r1 - r0
    cdef Py_ssize_t i, j
    cdef int act = n.act if n.L > 1 else 0
    cdef real* h = acts + first.out + r0 * H
    cdef real* G = <real*>f.pad.G
    if real is float:
        fn_sum_parts_f(<float*>f.pad.fwd + r0 * HP, <long long>n.B * HP, PIXEL_BLOCKS, nr, H, HP, h)
    else:
        fn_sum_parts_d(<double*>f.pad.fwd + r0 * HP, <long long>n.B * HP, PIXEL_BLOCKS, nr, H, HP, h)
    _activate(h, nr * H, act)
    cdef double loss = _rows_above(n, T, rows, theta, acts, deltas, r0, r1)
    cdef real* dz = _delta(n, acts, deltas, 0) + r0 * H
    for i in range(nr):
        for j in range(H):
            G[(r0 + i) * HP + j] = dz[i * H + j] * scale
    return loss


cdef void _sparse_grads(_Net* n, _SparseFirst* f, long long* rows, real* theta, double* opt, real* m, real* v,
                        real* acts, real* deltas, real* grad, int k, long long* bad) noexcept nogil:
    """Block k of a sparse step's update: the first layer's pixels [D k / PIXEL_BLOCKS,
    D (k + 1) / PIXEL_BLOCKS) (X^T G scattered over those rows of W, on the thread that
    summed them in the forward; not direct: then decay, the optimiser and the rows
    copied into the padded layout, _update_rows), then _grads.  The column indices
    outside [0, D) met go to bad."""
    cdef _Layer* ly = &n.layer[0]
    cdef long long D = ly.n_in, H = ly.n_out, HP = f.pad.HP
    cdef long long lo = D * k // PIXEL_BLOCKS, hi = D * (k + 1) // PIXEL_BLOCKS
    cdef real* target = <real*>f.pad.W if f.direct else <real*>f.pad.dW
    if not f.direct:
        memset(target + lo * HP, 0, (hi - lo) * HP * sizeof(real))
    _sp_scatter(f.indptr, f.indices, f.data, f.pix, <real*>f.lut, rows, n.B, <real*>f.pad.G, target, D, H, HP,
                <int>lo, <int>hi, bad)
    if not f.direct:
        fn_unpad_rows(target + lo * HP, hi - lo, HP, grad + ly.w + lo * H, H, sizeof(real))
        _update_rows(theta + ly.w, grad + ly.w, opt, m + ly.w, v + ly.w, <real>opt[OPT_DECAY], lo, hi, H,
                     <real*>f.pad.W, HP)
    _grads(n, <real*>NULL, theta, opt, m, v, acts, deltas, grad, f.direct, k)


cdef double _sparse_step(_Net* n, _SparseFirst* f, long long* T, long long* rows, real* theta, double* opt,
                         real* m, real* v, real* acts, real* deltas, real* grad, int nt,
                         long long* bad) noexcept nogil:
    """A step over CSR rows in one region of nt threads: the first layer's forward by
    PIXEL_BLOCKS blocks of pixels (block k's partial sums into fwd[k], b in block 0's),
    then _sparse_rows and _sparse_grads by blocks (the pixels of block k on the thread
    that summed them).  Returns the batch's loss (+ 0.5 decay sum W**2, over W before
    the step)."""
    cdef long long bads[2 * PIXEL_BLOCKS]
    cdef double parts[ROW_BLOCKS]
    cdef long long D = n.layer[0].n_in, HP = f.pad.HP, q = <long long>n.B * HP
    cdef int k, tid, nthr, B = n.B
    cdef double loss = _decay_loss(n, theta, opt[OPT_DECAY])
    cdef real scale = <real>(-opt[OPT_LR]) if f.direct else <real>1
    if not f.direct:
        _optimizer_begin(opt)
    with parallel(num_threads=nt):
        tid = threadid()
        nthr = fn_num_threads()
        k = tid
        while k < PIXEL_BLOCKS:
            bads[k] = 0
            _sp_forward_cols(f.indptr, f.indices, f.data, f.pix, <real*>f.lut, rows, B, <real*>f.pad.W,
                             <real*>f.pad.b if k == 0 else <real*>NULL, <real*>f.pad.fwd + k * q, D, HP,
                             <int>(D * k // PIXEL_BLOCKS), <int>(D * (k + 1) // PIXEL_BLOCKS), &bads[k])
            k = k + nthr
        fn_barrier()  # each block of rows adds up every block of pixels' sums
        k = tid
        while k < ROW_BLOCKS:
            parts[k] = _sparse_rows(n, f, T, rows, theta, acts, deltas, scale, B * k // ROW_BLOCKS,
                                    B * (k + 1) // ROW_BLOCKS)
            k = k + nthr
        fn_barrier()  # the gradients sum over every row; the weights change after every dz W^T
        k = tid
        while k < PIXEL_BLOCKS:
            bads[PIXEL_BLOCKS + k] = 0
            _sparse_grads(n, f, rows, theta, opt, m, v, acts, deltas, grad, k, &bads[PIXEL_BLOCKS + k])
            k = k + nthr
    for k in range(2 * PIXEL_BLOCKS):
        bad[0] += bads[k]
    for k in range(ROW_BLOCKS):
        loss += parts[k] / B
    return loss


cdef void _update_rows(real* W, real* dW, double* opt, real* m, real* v, real decay, long long lo, long long hi,
                       long long H, real* padded, long long HP) noexcept nogil:
    """Rows lo:hi of a first layer's W (H wide): _decay_step, and the rows copied into
    padded (rows of HP)."""
    _decay_step(W, dW, opt, m, v, decay, lo * H, hi * H)
    fn_pad_rows(W + lo * H, hi - lo, H, padded + lo * HP, HP, sizeof(real))


cdef int _mlp_steps_sparse(_Net* n, _SparseFirst* f, long long* T, long long* idx, int S, real* theta,
                           double* opt, real* m, real* v, double* losses, real* acts, real* deltas,
                           real* grad, long long* bad) noexcept nogil:
    """_mlp_steps over CSR rows (f), each step one parallel region (_sparse_step), on one
    thread when its batch has fewer than PARALLEL_NNZ non-zeros.  W1 lives in f.pad.W
    during the call (direct) or is copied there after each update; b1 is copied to
    f.pad.b after each.  Stops after a step that met a bad column index or a loss that is
    not finite."""
    cdef _Layer* ly = &n.layer[0]
    cdef long long total
    cdef int k, i
    cdef long long* rows
    for k in range(S):
        rows = idx + <Py_ssize_t>k * n.B
        total = 0
        for i in range(n.B):
            total += f.indptr[rows[i] + 1] - f.indptr[rows[i]]
        losses[k] = _sparse_step(n, f, T, rows, theta, opt, m, v, acts, deltas, grad, _steps_threads(total), bad)
        memcpy(f.pad.b, theta + ly.b, ly.n_out * sizeof(real))
        if bad[0] or not (losses[k] - losses[k] == 0):
            S = k + 1
            break
    if f.direct:
        fn_unpad_rows(f.pad.W, ly.n_in, f.pad.HP, theta + ly.w, ly.n_out, sizeof(real))
    return S


cdef void _argmax_rows(real* s, long long n, long long C, long long* out) noexcept nogil:
    """out[i] = the first maximum of row i (the first NaN when there is one: numpy.argmax)."""
    cdef long long i, c, k
    cdef real best, x
    for i in range(n):
        k = 0
        best = s[i * C]
        if best == best:
            for c in range(1, C):
                x = s[i * C + c]
                if x != x:
                    k = c
                    break
                if x > best:
                    best = x
                    k = c
        out[i] = k


cdef void _mlp_scores_above(_Net* n, real* theta, real* acts, int lo) noexcept nogil:
    """Layers lo.. of a forward whose layer lo - 1 outputs are in acts (n.B rows), the
    products on the calling thread (an evaluation's OpenMP thread)."""
    cdef int k
    cdef _Layer* ly
    for k in range(lo, n.L):
        ly = &n.layer[k]
        _affine(acts + n.layer[k - 1].out, theta + ly.w, theta + ly.b, acts + ly.out, n.B, <int>ly.n_in,
                <int>ly.n_out, n.act if k < n.L - 1 else 0, True)


#: rows labelled at a time by the evaluation kernels (their activations stay in cache)
DEF PREDICT_ROWS = 256


cdef void _mlp_predict_dense(_Net* n, real* X, unsigned char* U, long long r0, long long r1, real* theta,
                             real* xb, real* acts, long long* rowno, long long* out) noexcept nogil:
    """Labels of rows r0:r1 of X (or U), PREDICT_ROWS at a time (n built for that many
    rows; xb, acts and rowno this call's own), the products on the calling thread."""
    cdef _Net local = n[0]
    cdef long long i, r, m
    cdef _Layer* ly = &local.layer[0]
    cdef _Layer* top = &local.layer[local.L - 1]
    for i in range(r0, r1, PREDICT_ROWS):
        m = r1 - i if r1 - i < PREDICT_ROWS else PREDICT_ROWS
        for r in range(m):
            rowno[r] = i + r
        local.B = <int>m
        _gather_rows(X, U, rowno, xb, <int>m, <int>ly.n_in)
        _affine(xb, theta + ly.w, theta + ly.b, acts + ly.out, <int>m, <int>ly.n_in, <int>ly.n_out,
                local.act if local.L > 1 else 0, True)
        _mlp_scores_above(&local, theta, acts, 1)
        _argmax_rows(acts + top.out, m, top.n_out, out + i)


cdef extern from "_sparse.h" nogil:
    # the vector top of a two-layer net's evaluation (see _sparse.h)
    void fn_top_argmax_f(const float* h, long long n, long long H, const float* W2, const float* b2,
                         long long C, const float* wp, float* s, long long* labels)
    void fn_top_argmax_d(const double* h, long long n, long long H, const double* W2, const double* b2,
                         long long C, const double* wp, double* s, long long* labels)


#: rows of a thread's run labelled at a time by sparse_predict_mlp: their outputs stay in
#: the core's cache between the layers
DEF PREDICT_BLOCK = 64


cdef void _predict_run(_Net* n, long long* indptr, int* indices, void* data, bint pix, real* lut,
                       long long row0, _Padded* pad, real* theta, real* wp, long long* cut, int t,
                       real* acts, real* s, long long* labels, long long* bad) noexcept nogil:
    """Run t of the rows (cut[t]:cut[t + 1]): labels of rows row0 + i, PREDICT_BLOCK at a
    time.  The first layer over the non-zeros of consecutive rows (_sp_forward, W in the
    padded layout of pad), then a two-layer net's top in vectors (fn_top_argmax with W2
    as one vector a row, wp), or the layers above through BLAS and _argmax_rows."""
    cdef _Net local = n[0]
    cdef _Layer* first = &local.layer[0]
    cdef _Layer* top = &local.layer[local.L - 1]
    cdef long long i, m, H = first.n_out
    cdef real* h = acts + first.out
    bad[0] = 0
    i = cut[t]
    while i < cut[t + 1]:
        m = cut[t + 1] - i
        if m > PREDICT_BLOCK:
            m = PREDICT_BLOCK
        _sp_forward(indptr, indices, data, pix, lut, row0 + i, m, <real*>pad.W, <real*>pad.b, h, first.n_in, H,
                    pad.HP, bad)
        if local.L == 1:
            _argmax_rows(h, m, H, labels + i)
        else:
            if local.act == ACT_RELU:
                _map_relu(h, h, m * H)
            else:
                _map_sigmoid(h, h, m * H)
            if local.L == 2:
                if real is float:
                    fn_top_argmax_f(h, m, H, theta + top.w, theta + top.b, top.n_out, wp, s, labels + i)
                else:
                    fn_top_argmax_d(h, m, H, theta + top.w, theta + top.b, top.n_out, wp, s, labels + i)
            else:
                local.B = <int>m
                _mlp_scores_above(&local, theta, acts, 1)
                _argmax_rows(acts + top.out, m, top.n_out, labels + i)
        i += m


# ---------------------------------------------------------------- the Python-facing kernels
def _aligned(long long n, dtype):
    """n zeros of dtype whose first element is 64-byte aligned (the padded layout's loads)."""
    dtype = np.dtype(dtype)
    buf = np.zeros(n + 64 // dtype.itemsize, dtype)
    start = (-buf.ctypes.data % 64) // dtype.itemsize
    return buf[start : start + n]


cdef tuple _work(_Net* n, dtype, bint batch):
    """acts, deltas, grad (and the gathered batch when ``batch``) for n: the calling
    thread's scratch (_scratch.py), so they hold nothing a caller may keep."""
    return (_scratch.buffer("acts", n.outs, dtype), _scratch.buffer("deltas", n.outs, dtype),
            _scratch.buffer("grad", n.size, dtype),
            _scratch.buffer("batch", n.B * n.layer[0].n_in, dtype).reshape(n.B, n.layer[0].n_in) if batch else None)


def train_steps_mlp(X, T, idx, sizes, int act, theta, opt, state, losses):
    X, T, idx, sizes = _chk.mlp_steps(X, T, idx, sizes, act, theta, opt, state, losses)
    _blas()
    cdef _Net n
    _net_of(&n, sizes, act, idx.shape[1])
    acts, deltas, grad, xb = _work(&n, theta.dtype, True)
    cdef bint f32 = theta.dtype == np.float32, pixels = X.dtype == np.uint8
    cdef unsigned char* pu = <unsigned char*>_p(X) if pixels else NULL
    cdef void* px = NULL if pixels else _p(X)
    cdef long long* pT = <long long*>_p(T)
    cdef long long* pi = <long long*>_p(idx)
    cdef int S = idx.shape[0], done
    cdef double* po = <double*>_p(opt)
    cdef double* pl = <double*>_p(losses)
    cdef void* pth = _p(theta)
    cdef char* pm = <char*>_p(state)
    cdef long long ts = theta.dtype.itemsize
    cdef char* pv = pm + n.size * ts
    cdef void* pa = _p(acts)
    cdef void* pd = _p(deltas)
    cdef void* pg = _p(grad)
    cdef void* pb = _p(xb)
    cdef int threads[MAX_BLAS_LIBS]
    with nogil:
        _blas_one_thread(threads)  # around the regions: see _blas_one_thread
        if f32:
            done = _mlp_steps(&n, <float*>px, pu, pT, pi, S, <float*>pth, po, <float*>pm, <float*>pv, pl,
                              <float*>pb, <float*>pa, <float*>pd, <float*>pg)
        else:
            done = _mlp_steps(&n, <double*>px, pu, pT, pi, S, <double*>pth, po, <double*>pm, <double*>pv, pl,
                              <double*>pb, <double*>pa, <double*>pd, <double*>pg)
        _blas_threads_back(threads)
    return done


def train_steps_mlp_sparse(indptr, indices, data, T, idx, sizes, int act, theta, opt, state, losses):
    _, T, idx, sizes = _chk.mlp_steps(None, T, idx, sizes, act, theta, opt, state, losses, (indptr, indices, data))
    if sizes.shape[0] == 3 and opt[OPT_KIND] == OPT_SGD and opt[OPT_DECAY] == 0:
        return _two_layer_sgd_sparse(indptr, indices, data, T, idx, theta, sizes[0], sizes[1], sizes[2],
                                     opt[OPT_LR], act, losses)
    _blas()
    cdef _Net n
    _net_of(&n, sizes, act, idx.shape[1])
    acts, deltas, grad, _ = _work(&n, theta.dtype, False)
    cdef _SparseFirst first
    first.indptr, first.indices, first.data = <long long*>_p(indptr), <int*>_p(indices), _p(data)
    first.pix = data.dtype == np.uint8
    first.direct = opt[OPT_KIND] == OPT_SGD and opt[OPT_DECAY] == 0
    cdef float lutf[256]
    cdef double lutd[256]
    cdef bint f32 = theta.dtype == np.float32
    cdef long long* pT = <long long*>_p(T)
    cdef long long* pi = <long long*>_p(idx)
    cdef int S = idx.shape[0], done
    cdef long long bad = 0
    cdef double* po = <double*>_p(opt)
    cdef double* pl = <double*>_p(losses)
    cdef void* pth = _p(theta)
    cdef char* pm = <char*>_p(state)
    cdef long long ts = theta.dtype.itemsize, H = n.layer[0].n_out
    cdef char* pv = pm + n.size * ts
    cdef void* pa = _p(acts)
    cdef void* pd = _p(deltas)
    cdef void* pg = _p(grad)
    cdef int threads[MAX_BLAS_LIBS]
    _padded_take(&first.pad, pth, n.layer[0].n_in, H, n.B, not first.direct, ts, n.layer[n.L - 1].n_out)
    memcpy(first.pad.b, <char*>pth + n.layer[0].b * ts, H * ts)
    with nogil:
        _blas_one_thread(threads)  # around the region: see _blas_one_thread
        if f32:
            _pixel_table(lutf)
            first.lut = lutf
            done = _mlp_steps_sparse(&n, &first, pT, pi, S, <float*>pth, po, <float*>pm, <float*>pv, pl,
                                     <float*>pa, <float*>pd, <float*>pg, &bad)
        else:
            _pixel_table(lutd)
            first.lut = lutd
            done = _mlp_steps_sparse(&n, &first, pT, pi, S, <double*>pth, po, <double*>pm, <double*>pv, pl,
                                     <double*>pa, <double*>pd, <double*>pg, &bad)
        fn_scratch_give(first.pad.block)
        _blas_threads_back(threads)
    if bad:
        raise ValueError(f"train_steps_mlp_sparse: {bad} column indices are outside [0, {sizes[0]}) "
                         "(the weights may be partly updated)")
    return done


def mlp_gradient(X, T, idx, sizes, int act, theta, double decay, grad):
    X, T, idx, sizes = _chk.mlp_gradient(X, T, idx, sizes, act, theta, decay, grad)
    _blas()
    cdef _Net n
    _net_of(&n, sizes, act, idx.shape[0])
    acts, deltas, _, xb = _work(&n, theta.dtype, True)
    cdef bint f32 = theta.dtype == np.float32, pixels = X.dtype == np.uint8
    cdef unsigned char* pu = <unsigned char*>_p(X) if pixels else NULL
    cdef void* px = NULL if pixels else _p(X)
    cdef long long* pT = <long long*>_p(T)
    cdef long long* pi = <long long*>_p(idx)
    cdef void* pth = _p(theta)
    cdef void* pa = _p(acts)
    cdef void* pd = _p(deltas)
    cdef void* pg = _p(grad)
    cdef void* pb = _p(xb)
    cdef double loss
    cdef long long i, D = n.layer[0].n_in
    cdef bint in_order = not pixels  # the batch is X's rows as they are (a net's gradient of x): no copy
    for i in range(n.B):
        in_order = in_order and pi[i] == i
    if in_order:
        pb = px
    cdef _NzWork nzw
    cdef long long H = n.layer[0].n_out
    cdef bint nz = f32 and NZ_READY and H >= NZ_MIN_UNITS and n.B * H <= NZ_MAX_OUTPUTS, done = False
    cdef long long listed
    cdef char* at
    if nz:  # one scratch array: S (64-byte aligned), ptr and cur, col, val
        nzw.most = <long long>(NZ_MAX_DENSITY * n.B * D)  # fn_nz_rows gives up past it
        listed = nzw.most + D + 16
        at = <char*>_p(_scratch.buffer("nonzeros", 64 + FN_NZ_SCRATCH * 4 + (2 * n.B + 1) * 8 + listed * 8, np.uint8))
        nzw.S = <float*>(at + (-<size_t>at % 64))
        nzw.ptr = <long long*>(nzw.S + FN_NZ_SCRATCH)
        nzw.cur = nzw.ptr + n.B + 1
        nzw.col = <int*>(nzw.cur + n.B)
        nzw.val = <float*>(nzw.col + listed)
    with nogil:
        if f32:
            if not in_order:
                _gather_rows(<float*>px, pu, pi, <float*>pb, n.B, <int>D)
            if nz:
                done = _mlp_gradient_nz(&n, <float*>pth, <float*>pg, <float*>pb, <float*>pa, <float*>pd, pT, pi,
                                        decay, &nzw, &loss)
            if not done:
                loss = _mlp_backprop(&n, <float*>pth, <float*>pg, <float*>pb, <float*>pa, <float*>pd, pT, pi, 0,
                                     decay)
        else:
            if not in_order:
                _gather_rows(<double*>px, pu, pi, <double*>pb, n.B, <int>n.layer[0].n_in)
            loss = _mlp_backprop(&n, <double*>pth, <double*>pg, <double*>pb, <double*>pa, <double*>pd, pT, pi, 0,
                                 decay)
    return loss


def predict_mlp(X, sizes, int act, theta, out):
    X, sizes = _chk.mlp_predict(X, sizes, act, theta, out)
    cdef long long rows = X.shape[0]
    if rows == 0:
        return out
    _blas()
    cdef _Net n
    _net_of(&n, sizes, act, min(rows, PREDICT_ROWS))
    # runs of whole blocks of rows, one a thread, each with its own scratch
    cdef int nt = fn_max_threads(), t
    nt = <int>max(1, min(nt, MAX_THREADS, (rows + PREDICT_ROWS - 1) // PREDICT_ROWS))
    cdef long long D = n.layer[0].n_in, per_x = <long long>n.B * D, per_a = n.outs
    xbs = _scratch.buffer("batch", nt * per_x, theta.dtype)
    actss = _scratch.buffer("acts", nt * per_a, theta.dtype)
    rownos = _scratch.buffer("rows", nt * PREDICT_ROWS, np.int64)
    cdef long long cut[MAX_THREADS + 1]
    for t in range(nt + 1):
        cut[t] = (rows + PREDICT_ROWS - 1) // PREDICT_ROWS * t // nt * PREDICT_ROWS
    cut[nt] = rows
    cdef bint f32 = theta.dtype == np.float32, pixels = X.dtype == np.uint8
    cdef unsigned char* pu = <unsigned char*>_p(X) if pixels else NULL
    cdef void* px = NULL if pixels else _p(X)
    cdef char* pth = <char*>_p(theta)
    cdef char* pa = <char*>_p(actss)
    cdef char* pb = <char*>_p(xbs)
    cdef long long* pr = <long long*>_p(rownos)
    cdef long long* po = <long long*>_p(out)
    cdef long long ts = theta.dtype.itemsize
    cdef int threads[MAX_BLAS_LIBS]
    with nogil:
        _blas_one_thread(threads)  # around the region: see _blas_one_thread
        for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
            if f32:
                _mlp_predict_dense(&n, <float*>px, pu, cut[t], cut[t + 1], <float*>pth, <float*>(pb + t * per_x * ts),
                                   <float*>(pa + t * per_a * ts), pr + t * PREDICT_ROWS, po)
            else:
                _mlp_predict_dense(&n, <double*>px, pu, cut[t], cut[t + 1], <double*>pth,
                                   <double*>(pb + t * per_x * ts), <double*>(pa + t * per_a * ts),
                                   pr + t * PREDICT_ROWS, po)
        _blas_threads_back(threads)
    return out


def sparse_predict_mlp(indptr, indices, data, long long row0, sizes, int act, theta, out):
    _, sizes = _chk.mlp_predict(None, sizes, act, theta, out, (indptr, indices, data), row0)
    cdef long long rows = out.shape[0]
    if rows == 0:
        return out
    if sizes.shape[0] > 3:  # hidden layers above the first (_mlp_scores_above)
        _blas()
    cdef _Net n
    _net_of(&n, sizes, act, PREDICT_BLOCK)
    cdef long long ts = theta.dtype.itemsize, lane = 64 // ts
    cdef long long D = n.layer[0].n_in, H = n.layer[0].n_out, C = n.layer[n.L - 1].n_out
    cdef long long* pp = <long long*>_p(indptr)
    cdef long long cut[MAX_THREADS + 1]
    cdef int nt = _split_rows(pp, row0, rows, cut), t
    # a thread's scratch: the layers' outputs for a block, then C scores, in whole vectors;
    # after them W2 as one vector a row (a two-layer net with C <= one vector: fn_top_argmax)
    cdef long long per = (n.outs + C + 2 * lane - 1) // lane * lane
    scratch = _aligned(per * nt + H * lane, theta.dtype)
    cdef char* base = <char*>_p(scratch)
    cdef char* wp = base + per * nt * ts
    cdef char* pth = <char*>_p(theta)
    cdef long long j
    if n.L == 2 and C <= lane:
        for j in range(H):
            memcpy(wp + j * 64, pth + (n.layer[1].w + j * C) * ts, C * ts)
    cdef _Padded pad
    _padded_take(&pad, pth, D, H, 0, False, ts)
    memcpy(pad.b, pth + D * H * ts, H * ts)
    cdef bint pixels = data.dtype == np.uint8, f32 = theta.dtype == np.float32
    cdef int* pj = <int*>_p(indices)
    cdef void* pd = _p(data)
    cdef long long* po = <long long*>_p(out)
    cdef long long bads[MAX_THREADS]
    cdef long long bad = 0
    cdef float lutf[256]
    cdef double lutd[256]
    cdef int threads[MAX_BLAS_LIBS]
    with nogil:
        _blas_one_thread(threads)  # around the region: see _blas_one_thread
        if f32:
            _pixel_table(lutf)
        else:
            _pixel_table(lutd)
        for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
            if f32:
                _predict_run(&n, pp, pj, pd, pixels, lutf, row0, &pad, <float*>pth, <float*>wp, cut, t,
                             <float*>(base + t * per * ts), <float*>(base + (t * per + n.outs) * ts), po, &bads[t])
            else:
                _predict_run(&n, pp, pj, pd, pixels, lutd, row0, &pad, <double*>pth, <double*>wp, cut, t,
                             <double*>(base + t * per * ts), <double*>(base + (t * per + n.outs) * ts), po,
                             &bads[t])
        for t in range(nt):
            bad += bads[t]
        fn_scratch_give(pad.block)
        _blas_threads_back(threads)
    if bad:
        raise ValueError(f"sparse_predict_mlp: {bad} column indices are outside [0, {sizes[0]})")
    return out
