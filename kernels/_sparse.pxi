# The first layer over CSR rows (included by _cython.pyx): the OpenMP phases around the
# loops of _sparse.h, the padded layout, the two-layer SGD step that train_steps_mlp_sparse
# takes for the book's net (its layers above the first in vectors, _top.h), and the
# kernel sparse_affine.

# ---------------------------------------------------------------- fused training step
cdef void _gather_rows(real* X, unsigned char* U, long long* idx, real* xb, int B, int D) noexcept nogil:
    """xb[i] = X[idx[i]], or U[idx[i]] / 255 for uint8 pixels (load_mnist's normalisation).
    Row i + 1 is asked for from memory while row i is read (fn_prefetch_bytes)."""
    cdef Py_ssize_t i, j
    cdef unsigned char* row
    cdef real* out
    for i in range(B):
        if i + 1 < B:
            if U == NULL:
                fn_prefetch_bytes(&X[idx[i + 1] * D], D * sizeof(real))
            else:
                fn_prefetch_bytes(&U[idx[i + 1] * D], D)
        if U == NULL:
            memcpy(&xb[i * D], &X[idx[i] * D], D * sizeof(real))
        else:
            row = &U[idx[i] * D]
            out = &xb[i * D]
            for j in range(D):
                out[j] = (<real>row[j]) / <real>255


cdef double _top_rows(real* h, long long* T, long long* idx, real* W2, real* b2, int act,
                      real* s, real* dh, int n, int B, int H, int C) noexcept nogil:
    """Rows [0, n) of a batch of B, above the first layer: given their hidden activations
    h, s = softmax(h @ W2 + b2), then ds = (s - onehot(t)) / B in place of s, and
    dh = act'(ds @ W2.T).  Each row depends on its own inputs only, so blocks of rows
    may run on different threads.  Returns the sum of the rows' losses, in row order."""
    _affine(h, W2, b2, s, n, H, C, 0)
    cdef double loss = _softmax_loss_delta(s, T, idx, n, B, C)
    # dh = ds @ W2.T (with the old W2), then the activation's derivative
    _gemm(False, True, n, H, C, <real>1, s, C, W2, C, <real>0, dh, H)
    if act == ACT_RELU:
        _map_relu_backward(dh, h, dh, <Py_ssize_t>n * H)
    else:
        _map_sigmoid_backward(dh, h, dh, <Py_ssize_t>n * H)
    return loss


# ---------------------------------------------------------------- sparse first layer
# Rows of X as CSR (indptr int64, indices int32 sorted within each row, data uint8
# pixels or floats of the parameters' dtype).  The loops are in _sparse.h; here they are
# split between OpenMP threads: the forward by rows (about equal non-zeros each), the
# weight update by column ranges of W (each column updated by one thread, in row
# order, so the result does not depend on the thread count).
DEF MAX_THREADS = 64
# below this many non-zeros in a call, one thread: waking the others costs more
DEF PARALLEL_NNZ = 4096


cdef inline void _sp_forward(long long* indptr, int* indices, void* data, bint pix, real* lut,
                             long long row0, long long n, real* W, real* b, real* out, long long D,
                             long long H, long long HP, long long* bad) noexcept nogil:
    if real is float:
        fn_sparse_forward_f(indptr, indices, data, pix, lut, row0, n, W, b, out, D, H, HP, bad)
    else:
        fn_sparse_forward_d(indptr, indices, data, pix, lut, row0, n, W, b, out, D, H, HP, bad)


cdef inline void _sp_forward_cols(long long* indptr, int* indices, void* data, bint pix, real* lut,
                                  long long* rows, long long n, real* W, real* b, real* out, long long D,
                                  long long HP, int jlo, int jhi, long long* bad) noexcept nogil:
    if real is float:
        fn_sparse_forward_cols_f(indptr, indices, data, pix, lut, rows, n, W, b, out, D, HP, jlo, jhi, bad)
    else:
        fn_sparse_forward_cols_d(indptr, indices, data, pix, lut, rows, n, W, b, out, D, HP, jlo, jhi, bad)


cdef inline void _sp_scatter(long long* indptr, int* indices, void* data, bint pix, real* lut,
                             long long* rows, long long n, real* G, real* W, long long D, long long H,
                             long long HP, int jlo, int jhi, long long* bad) noexcept nogil:
    if real is float:
        fn_sparse_scatter_f(indptr, indices, data, pix, lut, rows, n, G, W, D, H, HP, jlo, jhi, bad)
    else:
        fn_sparse_scatter_d(indptr, indices, data, pix, lut, rows, n, G, W, D, H, HP, jlo, jhi, bad)


# the rows of a sparse step's batch above the first layer run as this many blocks (on as
# many threads when there are): a fixed number, so that the results do not depend on
# the number of threads
DEF TOP_BLOCKS = 2
# The first layer of a sparse step runs as this many blocks of W's rows (the pixels):
# block k owns the rows [D k / PIXEL_BLOCKS, D (k + 1) / PIXEL_BLOCKS), sums the batch's
# non-zeros in those columns in the forward (partial sums, added up in block order above)
# and updates those rows, on the same thread in both.  So each row of W stays in the
# cache of one core, written and read there only (a split by rows of the batch in the
# forward and by pixels in the update makes every row cross between the cores' caches).
# A fixed number, so that no sum depends on the number of threads; the sparse step uses
# at most this many.
DEF PIXEL_BLOCKS = 2


cdef struct _Padded:
    # scratch for the padded layout of _sparse.h (one block from fn_scratch_take):
    # W (D x HP), b (HP), G (B x HP) and, for gradients, dW (D x HP)
    void* block
    void* W
    void* b
    void* G
    void* dW
    long long HP
    void* fwd   # a step's forward sums over each block of pixels, PIXEL_BLOCKS x (B x HP)
    void* wp    # with vtop: W2 as H rows of one vector, W2.T as C rows of HP, and each top
    void* wt    # block's H x L scratch (fn_top_block in _top.h); else NULL
    void* acc
    void* part  # a step's sums over each block of rows above the first layer (_sp_step_par)


cdef int _padded_take(_Padded* s, void* W, long long D, long long H, long long B, bint grads,
                      long long tsize, long long C=0) except -1:
    """Take the scratch and copy W (D x H) into it in its layout (_w_rows_par: rows of HP
    for a step, split where H allows it otherwise, see fn_w_main in _sparse.h); b and G
    start at zero (their padding lanes must read 0; W's are zeroed by fn_w_rows).  With
    C (a step), room for its PIXEL_BLOCKS forward sums and TOP_BLOCKS partial sums too, and for
    fn_top_block's copies of W2 and scratch when the sizes fit it (s.wp NULL otherwise;
    fill them with _top_weights).  Give it back with fn_scratch_give(s.block)."""
    cdef long long HP = fn_padded(H, tsize)
    # W in the split layout for the forward over consecutive rows (no step: C == 0), see
    # fn_w_main in _sparse.h; the step's loops read the plain padded rows
    cdef size_t w = fn_w_bytes(D, H, tsize, C == 0), g = <size_t>(B * HP * tsize)
    cdef size_t bb = <size_t>(HP * tsize), total = w + bb + g + (w if grads else 0)
    cdef size_t fwd = <size_t>(PIXEL_BLOCKS * g) if C else 0
    cdef bint vtop = C and (fn_top_fits_f(H, C) if tsize == 4 else fn_top_fits_d(H, C))
    if C and not vtop:
        _blas()  # the rows above the first layer go through BLAS (_top_rows_blas)
    cdef size_t wp = <size_t>(H * 64) if vtop else 0, wt = <size_t>(C * HP * tsize) if vtop else 0
    cdef size_t acc = <size_t>(TOP_BLOCKS * H * 64) if vtop else 0
    cdef size_t parts = <size_t>(TOP_BLOCKS * (C + H + H * C) * tsize) if C else 0
    # the areas one after the other, each a whole number of 64-byte lines but the last
    cdef size_t o_wp = total + fwd, o_wt = o_wp + wp, o_acc = o_wt + wt, o_part = o_acc + acc
    s.block = fn_scratch_take(o_part + parts)
    if s.block == NULL:
        raise MemoryError(f"no memory for the {o_part + parts} bytes of padded weights")
    with nogil:
        _w_rows_par(W, D, H, s.block, tsize, C == 0, False)
    memset(<char*>s.block + w, 0, bb + g)
    s.HP = HP
    s.W = s.block
    s.b = <char*>s.block + w
    s.G = <char*>s.block + w + bb
    s.dW = (<char*>s.block + w + bb + g) if grads else NULL
    s.fwd = (<char*>s.block + total) if C else NULL
    s.wp = (<char*>s.block + o_wp) if vtop else NULL
    s.wt = (<char*>s.block + o_wt) if vtop else NULL
    s.acc = (<char*>s.block + o_acc) if vtop else NULL
    s.part = (<char*>s.block + o_part) if C else NULL
    return 0


cdef inline void _pixel_table(real* lut) noexcept nogil:
    """lut[u] = u / 255 in the working dtype, as load_mnist(normalize=True) computes it."""
    cdef int u
    for u in range(256):
        lut[u] = (<real>u) / <real>255


cdef int _split_rows(long long* indptr, long long row0, long long n, long long* cut) noexcept nogil:
    """Cut rows row0 + [0, n) into up to fn_max_threads() runs of about equal non-zeros:
    run t is [cut[t], cut[t + 1]).  Returns the number of runs (1 for small work)."""
    cdef long long i, total = indptr[row0 + n] - indptr[row0], acc = 0
    cdef int t, nt = fn_max_threads()
    if nt > MAX_THREADS:
        nt = MAX_THREADS
    if nt > n:
        nt = <int>n
    if nt < 1 or total < PARALLEL_NNZ:
        nt = 1
    cut[0] = 0
    t = 1
    for i in range(n):
        while t < nt and acc * nt >= total * t:
            cut[t] = i
            t += 1
        acc += indptr[row0 + i + 1] - indptr[row0 + i]
    while t <= nt:
        cut[t] = n
        t += 1
    return nt


cdef inline void _sp_forward_run(long long* indptr, int* indices, void* data, bint pix, real* lut,
                                 long long row0, real* W, real* b, real* out, long long D, long long H,
                                 long long HP, int act, long long* cut, int t, long long* bad) noexcept nogil:
    """Run t of the rows (cut[t]:cut[t + 1], from _split_rows): out = act(X[row0 + i] @ W + b)
    (W and b padded, out not); the thread's count of bad columns in bad[0]."""
    cdef long long c0 = cut[t], n = cut[t + 1] - cut[t]
    cdef real* o = out + c0 * H
    bad[0] = 0
    _sp_forward(indptr, indices, data, pix, lut, row0 + c0, n, W, b, o, D, H, HP, bad)
    _activate(o, n * H, act)


cdef void _sp_forward_par(long long* indptr, int* indices, void* data, bint pix, real* lut,
                          long long row0, real* W, real* b, real* out, long long D, long long H,
                          long long HP, int act, long long* cut, int nt, long long* bad) noexcept nogil:
    """out = act(X[row0 + i] @ W + b), run t of the rows on thread t (_sp_forward_run)."""
    cdef long long bads[MAX_THREADS]
    cdef int t
    for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
        _sp_forward_run(indptr, indices, data, pix, lut, row0, W, b, out, D, H, HP, act, cut, t, &bads[t])
    for t in range(nt):
        bad[0] += bads[t]


cdef inline void _block_sums(real* h, real* ds, real* dh, int n, int H, int C, real* part) noexcept nogil:
    """The sums over n rows of one block: part = [db2 (C), db1 (H), dW2 = h.T @ ds (H x C)]."""
    cdef Py_ssize_t i, j
    for j in range(C + H):
        part[j] = 0
    for i in range(n):
        for j in range(C):
            part[j] += ds[i * C + j]
    for i in range(n):
        for j in range(H):
            part[C + j] += dh[i * H + j]
    _gemm(True, False, H, C, n, <real>1, h, H, ds, C, <real>0, part + C + H, C)


cdef void _sum_blocks(real* part, int nb, double lr, real* W2, real* b2, real* b1, int H, int C) noexcept nogil:
    """db2, db1 and dW2 as the sums of the blocks' parts (in block order), each applied at
    once as SGD to b2, b1 and W2."""
    cdef Py_ssize_t j, k
    cdef long long w = C + H + H * C
    cdef real v
    for j in range(C + H + H * C):
        v = part[j]
        for k in range(1, nb):
            v = v + part[k * w + j]
        if j < C:
            b2[j] -= <real>lr * v
        elif j < C + H:
            b1[j - C] -= <real>lr * v
        else:
            W2[j - C - H] -= <real>lr * v


cdef inline void _top_weights(real* W2, long long H, long long C, long long HP, real* wp,
                              real* wt) noexcept nogil:
    if real is float:
        fn_top_weights_f(W2, H, C, HP, wp, wt)
    else:
        fn_top_weights_d(W2, H, C, HP, wp, wt)


cdef double _top_rows_blas(real* fwd, long long q, long long r0, long long r1, real* h, long long* T,
                           long long* idx, real* W2, real* b2, int act, real* s, real* dh, real* G,
                           real mlr, int B, long long H, long long HP, int C, real* part) noexcept nogil:
    """Rows r0:r1 of a sparse step above the first layer with BLAS (the sizes fn_top_block
    does not take): h = act(sum of the PIXEL_BLOCKS forward sums), _top_rows, the rows'
    G = mlr * dh (padded) and their sums (_block_sums) into part.  Returns their loss."""
    cdef Py_ssize_t i, j
    cdef double loss
    if real is float:
        fn_sum_parts_f(fwd + r0 * HP, q, PIXEL_BLOCKS, r1 - r0, H, HP, h + r0 * H)
    else:
        fn_sum_parts_d(fwd + r0 * HP, q, PIXEL_BLOCKS, r1 - r0, H, HP, h + r0 * H)
    _activate(h + r0 * H, (r1 - r0) * H, act)
    loss = _top_rows(h + r0 * H, T, idx + r0, W2, b2, act, s + r0 * C, dh + r0 * H, <int>(r1 - r0), B,
                     <int>H, C)
    for i in range(r0, r1):
        for j in range(H):
            G[i * HP + j] = dh[i * H + j] * mlr
    _block_sums(h + r0 * H, s + r0 * C, dh + r0 * H, <int>(r1 - r0), <int>H, C, part)
    return loss


cdef double _sp_step_par(long long* indptr, int* indices, void* data, bint pix, real* lut,
                         long long* idx, real* W, real* b, real* h, long long D, long long H,
                         long long HP, int act, int nt, long long* bad,
                         long long* T, real* W2, real* b2, real* s, real* dh, real* G,
                         real mlr, int B, int C, double lr, real* b1, real* fwd, real* part, real* wp,
                         real* wt, real* acc) noexcept nogil:
    """A whole sparse step in one parallel region, on up to PIXEL_BLOCKS threads.  First
    by blocks of pixels (the rows of W): block k sums the batch's non-zeros in its
    columns into fwd[k] (B x HP; b in block 0's).  Then by TOP_BLOCKS blocks of rows:
    h = act(fwd[0] + fwd[1] + ...), softmax-with-loss and the backward to the block's
    rows of G = mlr * dh (padded) and its sums, in vectors (fn_top_block, with W2's
    copies wp and wt) when wp is not NULL, else with BLAS (_top_rows, _block_sums).
    Then by blocks of pixels again, block k on the thread that did its forward:
    W += X[idx].T @ G scattered over its rows of W, each in image order; block 0 first
    adds up the blocks' sums, updates W2, b2 and b1 (_sum_blocks) and W2's copies.
    No sum depends on the number of threads.  Returns the sum of the rows' losses (block
    sums added in block order)."""
    cdef long long bads[PIXEL_BLOCKS]
    cdef long long sbad[PIXEL_BLOCKS]
    cdef double losses[TOP_BLOCKS]
    cdef int k, nb = TOP_BLOCKS if B >= TOP_BLOCKS else B
    cdef long long r0, r1, w = C + H + H * C, q = <long long>B * HP
    cdef int jlo, jhi
    cdef double loss = 0
    cdef int tid, nthr
    with parallel(num_threads=nt):
        # blocks go to threads by hand (block k on thread k mod nthr, in every phase) with a
        # barrier between the phases: see fn_barrier in _sparse.h for why not prange
        tid = threadid()
        nthr = fn_num_threads()
        k = tid
        while k < PIXEL_BLOCKS:
            bads[k] = 0
            _sp_forward_cols(indptr, indices, data, pix, lut, idx, B, W, b if k == 0 else <real*>NULL,
                             fwd + k * q, D, HP, <int>(D * k // PIXEL_BLOCKS), <int>(D * (k + 1) // PIXEL_BLOCKS),
                             &bads[k])
            k = k + nthr
        fn_barrier()  # the blocks of rows read every block's forward sums
        k = tid
        while k < nb:
            r0 = B * k // nb
            r1 = B * (k + 1) // nb
            if wp != NULL:
                if real is float:
                    losses[k] = fn_top_block_f(fwd + r0 * HP, q, PIXEL_BLOCKS, r1 - r0, H, HP, act, wp, wt,
                                               b2, T, idx + r0, C, B, mlr, G + r0 * HP, part + k * w,
                                               acc + k * H * (64 // sizeof(real)))
                else:
                    losses[k] = fn_top_block_d(fwd + r0 * HP, q, PIXEL_BLOCKS, r1 - r0, H, HP, act, wp, wt,
                                               b2, T, idx + r0, C, B, mlr, G + r0 * HP, part + k * w,
                                               acc + k * H * (64 // sizeof(real)))
            else:
                losses[k] = _top_rows_blas(fwd, q, r0, r1, h, T, idx, W2, b2, act, s, dh, G, mlr, B, H, HP, C,
                                           part + k * w)
            k = k + nthr
        fn_barrier()  # the update reads every block's rows of G, and block 0 their sums
        k = tid
        while k < PIXEL_BLOCKS:
            if k == 0:
                _sum_blocks(part, nb, lr, W2, b2, b1, <int>H, C)
                if wp != NULL:
                    _top_weights(W2, H, C, HP, wp, wt)
            sbad[k] = 0
            jlo = <int>(D * k // PIXEL_BLOCKS)
            jhi = <int>(D * (k + 1) // PIXEL_BLOCKS)
            _sp_scatter(indptr, indices, data, pix, lut, idx, B, G, W, D, H, HP, jlo, jhi, &sbad[k])
            k = k + nthr
    for k in range(PIXEL_BLOCKS):
        bad[0] += bads[k] + sbad[k]
    for k in range(nb):
        loss += losses[k]
    return loss


cdef void _w_rows_par(void* W, long long D, long long H, void* Wl, long long tsize, bint split,
                      bint back) noexcept nogil:
    """W (D x H, dense) into Wl, W's layout in the scratch (fn_w_rows: padded rows, or
    split when ``split`` and H allow it), or back when ``back``, with the rows split
    between threads (a call of a single step does it once at the start and once at the
    end)."""
    cdef int t, nt = fn_max_threads()
    cdef long long r0, r1
    if nt > MAX_THREADS:
        nt = MAX_THREADS
    if D * H * tsize < 65536:
        nt = 1
    for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
        r0 = D * t // nt
        r1 = D * (t + 1) // nt
        fn_w_rows(W, D, H, Wl, r0, r1, tsize, split, back)


cdef double _two_layer_sgd_step(long long* indptr, int* indices, void* data, bint pix,
                               real* lut, long long* T, long long* idx, _Padded* pad, real* b1,
                               real* W2, real* b2, double lr, int act, real* h, real* s, real* dh,
                               int B, int D, int H, int C, long long* bad) noexcept nogil:
    """One SGD step of the two-layer net with the first layer over CSR rows and W1 in the
    padded layout (pad.W), in one parallel region (_sp_step_par): the forward by blocks
    of pixels, the layers above by blocks of rows, then the W1 update scattered by the
    same blocks of pixels.  One thread when the batch has fewer than PARALLEL_NNZ
    non-zeros.  ``lut``: the pixel table (_pixel_table).  Returns the batch loss."""
    cdef long long HP = pad.HP, total = 0
    cdef int i, nt = fn_max_threads()
    cdef real* Wp = <real*>pad.W
    memcpy(pad.b, b1, H * sizeof(real))
    for i in range(B):
        total += indptr[idx[i] + 1] - indptr[idx[i]]
    if nt > PIXEL_BLOCKS:
        nt = PIXEL_BLOCKS
    if nt < 1 or total < PARALLEL_NNZ:
        nt = 1
    return _sp_step_par(indptr, indices, data, pix, lut, idx, Wp, <real*>pad.b, h, D, H, HP, act,
                        nt, bad, T, W2, b2, s, dh, <real*>pad.G, <real>(-lr), B, C, lr, b1,
                        <real*>pad.fwd, <real*>pad.part, <real*>pad.wp, <real*>pad.wt, <real*>pad.acc) / B


cdef object _csr(indptr, indices, data, int tn, str who):
    """Check CSR arrays; returns whether data holds uint8 pixels."""
    for name, a, typenum in (("indptr", indptr, cnp.NPY_INT64), ("indices", indices, cnp.NPY_INT32)):
        if not (cnp.PyArray_Check(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum
                and cnp.PyArray_NDIM(<cnp.ndarray>a) == 1 and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)):
            raise TypeError(f"{who}: {name} must be a C-contiguous 1-D "
                            f"{'int64' if typenum == cnp.NPY_INT64 else 'int32'} array")
    if not (cnp.PyArray_Check(data) and cnp.PyArray_NDIM(<cnp.ndarray>data) == 1
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>data)):
        raise TypeError(f"{who}: data must be a C-contiguous 1-D array")
    cdef int dn = cnp.PyArray_TYPE(<cnp.ndarray>data)
    if dn != cnp.NPY_UINT8 and dn != tn:
        raise TypeError(f"{who}: data is {data.dtype}; it must be uint8 pixels or the weights' "
                        f"dtype {np.dtype(np.float32 if tn == cnp.NPY_FLOAT32 else np.float64)}")
    if indptr.shape[0] < 1:
        raise ValueError(f"{who}: indptr must hold at least one entry")
    if data.shape[0] != indices.shape[0]:
        raise ValueError(f"{who}: data has {data.shape[0]} entries but indices {indices.shape[0]}")
    return dn == cnp.NPY_UINT8


cdef int _csr_rows_ok(long long* indptr, long long n_rows, long long nnz, long long* rows,
                      long long row0, long long n) except -1:
    """The rows used must have 0 <= indptr[r] <= indptr[r + 1] <= nnz."""
    cdef long long i, r
    for i in range(n):
        r = rows[i] if rows != NULL else row0 + i
        if r < 0 or r >= n_rows:
            raise IndexError(f"row {r} is out of range for {n_rows} rows")
        if indptr[r] < 0 or indptr[r] > indptr[r + 1] or indptr[r + 1] > nnz:
            raise ValueError(f"indptr is not a valid CSR row pointer at row {r}")
    return 0


cdef int _two_layer_sgd_sparse(indptr, indices, data, T, idx, theta, long long D, long long H, long long C,
                               double lr, int act, losses) except -1:
    """train_steps_mlp_sparse for a net of two layers with plain SGD and no weight decay,
    the arguments checked by _checks.mlp_steps: the step of _sp_step_par, whose layers
    above the first run in vectors by blocks of rows inside the same parallel region
    (fn_top_block in _top.h), faster than the general engine's phases for the book's
    net (benchmarks/README.md).  Stops after a step that met a bad column index or whose
    loss is not finite; returns the number of steps run."""
    cdef long long* pp = <long long*>_p(indptr)
    cdef int* pj = <int*>_p(indices)
    cdef void* pd = _p(data)
    cdef bint pixels = data.dtype == np.uint8, f32 = theta.dtype == np.float32
    cdef long long* pT = <long long*>_p(T)
    cdef long long* pidx = <long long*>_p(idx)
    cdef double* pl = <double*>_p(losses)
    cdef int S = idx.shape[0], B = idx.shape[1], k, done = 0
    cdef long long bad = 0, ts = theta.dtype.itemsize
    # theta: W1 (D x H), b1, W2 (H x C), b2; scratch: h, s, dh (B rows each)
    cdef char* pw = <char*>_p(theta)
    cdef void* W1 = pw
    cdef void* b1 = pw + D * H * ts
    cdef void* W2 = pw + (D * H + H) * ts
    cdef void* b2 = pw + (D * H + H + H * C) * ts
    work = np.empty(B * (H + C + H), theta.dtype)
    cdef char* pk = <char*>_p(work)
    cdef void* h = pk
    cdef void* s = pk + B * H * ts
    cdef void* dh = pk + B * (H + C) * ts
    cdef double loss
    cdef long long* rows
    cdef _Padded pad
    cdef float lutf[256]
    cdef double lutd[256]
    cdef int threads[MAX_BLAS_LIBS]
    _padded_take(&pad, W1, D, H, B, False, ts, C)
    with nogil:
        _blas_one_thread(threads)  # around the regions (_top_rows_blas): see _blas_one_thread
        if f32:
            _pixel_table(lutf)
            if pad.wp != NULL:
                _top_weights(<float*>W2, H, C, pad.HP, <float*>pad.wp, <float*>pad.wt)
        else:
            _pixel_table(lutd)
            if pad.wp != NULL:
                _top_weights(<double*>W2, H, C, pad.HP, <double*>pad.wp, <double*>pad.wt)
        for k in range(S):
            rows = pidx + <Py_ssize_t>k * B
            if f32:
                loss = _two_layer_sgd_step(pp, pj, pd, pixels, lutf, pT, rows, &pad, <float*>b1, <float*>W2,
                                           <float*>b2, lr, act, <float*>h, <float*>s, <float*>dh, B, <int>D,
                                           <int>H, <int>C, &bad)
            else:
                loss = _two_layer_sgd_step(pp, pj, pd, pixels, lutd, pT, rows, &pad, <double*>b1, <double*>W2,
                                           <double*>b2, lr, act, <double*>h, <double*>s, <double*>dh, B,
                                           <int>D, <int>H, <int>C, &bad)
            pl[k] = loss
            done += 1
            if bad or not (loss - loss == 0):  # a bad column, NaN or inf: stop here
                break
        _w_rows_par(W1, D, H, pad.W, ts, False, True)
        fn_scratch_give(pad.block)
        _blas_threads_back(threads)
    if bad:
        raise ValueError(f"train_steps_mlp_sparse: {bad} column indices are outside [0, {D}) "
                         "(the weights may be partly updated)")
    return done


cdef tuple _first_layer_args(str who, indptr, indices, data, W, b, int act, str wname, str bname):
    """The checks of a kernel whose first layer reads CSR rows: act, the CSR arrays, W and
    b.  Returns (dtype number, whether data holds uint8 pixels, W, b) as contiguous arrays."""
    if act != ACT_IDENTITY and act != ACT_RELU and act != ACT_SIGMOID:
        activation(act, identity=True)  # the error, in the words of every backend
    cdef int tn = _typenum(W, wname)
    pixels = _csr(indptr, indices, data, tn, who)
    cdef cnp.ndarray Wa = _in2(W, tn, wname)
    return tn, pixels, Wa, _vec(b, tn, bname, Wa.shape[1], False)


cdef long long* _row_range(indptr, indices, long long row0, long long n) except NULL:
    """indptr's pointer, after checking that rows [row0, row0 + n) exist and are valid."""
    cdef cnp.ndarray pa = <cnp.ndarray>indptr
    cdef long long* pp = <long long*>_p(pa)
    if row0 < 0 or row0 + n > pa.shape[0] - 1:
        raise IndexError(f"rows [{row0}, {row0 + n}) are out of range for {pa.shape[0] - 1} rows")
    _csr_rows_ok(pp, pa.shape[0] - 1, indices.shape[0], NULL, row0, n)
    return pp


def sparse_affine(indptr, indices, data, long long row0, W, b, int act, out):
    cdef int tn
    cdef bint pixels
    cdef cnp.ndarray Wa, ba
    tn, pixels, Wa, ba = _first_layer_args("sparse_affine", indptr, indices, data, W, b, act, "W", "b")
    cdef long long D = Wa.shape[0], H = Wa.shape[1]
    cdef cnp.ndarray oa = _out2(out, tn, "out", out.shape[0] if out.ndim == 2 else -1, H)
    cdef long long n = oa.shape[0]
    cdef long long* pp = _row_range(indptr, indices, row0, n)
    cdef long long bad = 0
    cdef int* pj = <int*>_p(<cnp.ndarray>indices)
    cdef void* pd = _p(<cnp.ndarray>data)
    cdef void* po = _p(oa)
    cdef float lutf[256]
    cdef double lutd[256]
    cdef long long cut[MAX_THREADS + 1]
    cdef int nt
    cdef _Padded pad
    cdef long long ts = 4 if tn == cnp.NPY_FLOAT32 else 8
    _padded_take(&pad, _p(Wa), D, H, 0, False, ts)
    memcpy(pad.b, _p(ba), H * ts)
    with nogil:
        nt = _split_rows(pp, row0, n, cut)
        if tn == cnp.NPY_FLOAT32:
            _pixel_table(lutf)
            _sp_forward_par(pp, pj, pd, pixels, lutf, row0, <float*>pad.W, <float*>pad.b,
                            <float*>po, D, H, pad.HP, act, cut, nt, &bad)
        else:
            _pixel_table(lutd)
            _sp_forward_par(pp, pj, pd, pixels, lutd, row0, <double*>pad.W, <double*>pad.b,
                            <double*>po, D, H, pad.HP, act, cut, nt, &bad)
        fn_scratch_give(pad.block)
    if bad:
        raise ValueError(f"sparse_affine: {bad} column indices are outside [0, {D})")
    return out
