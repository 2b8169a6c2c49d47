"""Every kernel of the contract, on every backend, float32 and float64, MNIST sizes."""

from fastnet.kernels import contract

from .common import BACKENDS, DTYPES, kernel_args, require_backend

#: the MLP engine's kernels have suites of their own too (bench_training); here each is
#: timed at the sizes of kernel_args.  The numerical gradient is bench_numgrad's alone
#: (the reference loop takes minutes at these sizes).
ELEMENTARY = [k for k in contract.KERNELS if k != "numerical_gradient_mlp"]


class Kernels:
    params = (ELEMENTARY, BACKENDS, DTYPES, [1, 100])
    param_names = ["kernel", "backend", "dtype", "batch"]

    def setup(self, kernel, backend, dtype, batch):
        table = require_backend(backend)
        self.fn = getattr(table, kernel)
        self.args = kernel_args(kernel, dtype, n=batch)
        self.fn(*self.args)  # compile (Numba) and warm up: compilation is never timed

    def time_kernel(self, kernel, backend, dtype, batch):
        self.fn(*self.args)


class SpeedupOverReference:
    """The ratio reference time / backend time, measured in the same process."""

    params = (["softmax_loss_labels", "affine_relu", "affine_backward"], ["numba", "cython"])
    param_names = ["kernel", "backend"]
    unit = "times faster"

    def setup(self, kernel, backend):
        self.fast = getattr(require_backend(backend), kernel)
        self.ref = getattr(require_backend("numpy"), kernel)
        self.args = kernel_args(kernel, "float32")
        self.fast(*self.args)

    def track_speedup(self, kernel, backend):
        import timeit

        ref = min(timeit.repeat(lambda: self.ref(*self.args), number=200, repeat=5))
        fast = min(timeit.repeat(lambda: self.fast(*self.args), number=200, repeat=5))
        return ref / fast
