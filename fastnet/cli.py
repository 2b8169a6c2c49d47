"""The ``fastnet`` command.

User mistakes (a missing file, a bad option, an unknown dataset, no network) print one
line, ``fastnet: error: …``, and exit with status 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from . import __version__

#: exceptions that are the user's to fix: printed as one line, exit status 2
def _user_errors():
    import pickle

    from .backend import BackendError
    from .datasets import DatasetError

    return (BackendError, DatasetError, FileNotFoundError, PermissionError, ValueError, TypeError,
            pickle.UnpicklingError, FloatingPointError)


class CLIError(Exception):
    """A mistake in the command line that the user can fix."""


def _cmd_demo(args) -> int:
    """The worked examples of chapters 3-5, computed by fastnet on the chosen backend."""
    from . import backend
    from .functions import cross_entropy_error, sigmoid, softmax, sum_squared_error
    from .gradient import gradient_descent, numerical_diff
    from .layers import MulLayer
    from .nets import forward, init_network

    print(f"backend: {backend.get_backend()}")
    print("sigmoid([-1, 1, 2])        =", sigmoid(np.array([-1.0, 1.0, 2.0])))
    print("softmax([0.3, 2.9, 4.0])   =", softmax(np.array([0.3, 2.9, 4.0])))
    print("softmax([1010, 1000, 990]) =", softmax(np.array([1010.0, 1000.0, 990.0])))
    print("3-layer toy network(1, .5) =", forward(init_network(), np.array([1.0, 0.5])))
    t = np.array([0, 0, 1, 0, 0, 0, 0, 0, 0, 0.0])
    y = np.array([0.1, 0.05, 0.6, 0.0, 0.05, 0.1, 0.0, 0.1, 0.0, 0.0])
    print(f"sum_squared_error = {sum_squared_error(y, t):.4f}, cross_entropy_error = {cross_entropy_error(y, t):.4f}")
    print(f"numerical_diff(0.01x^2 + 0.1x) at 5 = {numerical_diff(lambda x: 0.01 * x**2 + 0.1 * x, 5):.6f}")
    x = gradient_descent(lambda x: x[0] ** 2 + x[1] ** 2, np.array([-3.0, 4.0]), lr=0.1, step_num=100)
    print("gradient descent on x0^2 + x1^2 from (-3, 4):", x)
    apple, tax = MulLayer(), MulLayer()
    price = tax.forward(apple.forward(100, 2), 1.1)
    dprice, dtax = tax.backward(1)
    dapple, dnum = apple.backward(dprice)
    print(f"apple shopping: price {price:.0f}, d apple {dapple:.1f}, d count {dnum:.0f}, d tax {dtax:.0f}")
    return 0


def _cmd_backends(args) -> int:
    """Which backends load here, and the kernel contract they implement."""
    from . import backend
    from .kernels import contract

    for name in backend.BACKENDS:
        why = backend.why_unavailable(name)
        print(f"{name:7s} {'available' if why is None else 'unavailable: ' + why}")
    print(f"auto -> {backend.load('auto').NAME}")
    if args.contract:
        print()
        print(contract.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastnet",
        description="The toolkit of 'Deep Learning from Scratch' (chapters 3-5) with compiled kernels.",
    )
    parser.add_argument("--version", action="version", version=f"fastnet {__version__}")
    parser.add_argument(
        "--backend",
        default=None,
        help="kernel backend: numpy, numba, cython or auto (default: $FASTNET_BACKEND or auto)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="print the book's worked examples computed by fastnet")
    demo.set_defaults(func=_cmd_demo)

    backends = sub.add_parser("backends", help="list the kernel backends and whether they load")
    backends.add_argument("--contract", action="store_true", help="also print the kernel contract")
    backends.set_defaults(func=_cmd_backends)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "backend", None):
            from .backend import set_backend

            set_backend(args.backend)
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"fastnet: error: {exc}", file=sys.stderr)
        return 2
    except _user_errors() as exc:
        message = str(exc).strip().splitlines()
        print(f"fastnet: error: {' '.join(line.strip() for line in message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
