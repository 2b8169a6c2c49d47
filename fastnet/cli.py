"""The ``fastnet`` command.

User mistakes (a missing file, a bad option, an unknown dataset, no network) print one
line, ``fastnet: error: …``, and exit with status 2; they never show a traceback
(set ``FASTNET_DEBUG=1`` to see it).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from . import __version__


def _user_errors():
    """Exceptions that are the user's to fix: printed as one line, exit status 2."""
    import pickle

    from .backend import BackendError
    from .datasets import DatasetError

    # OSError: a full disk, a folder where a file should be, a path under a file ...;
    # MemoryError: sizes beyond this machine (numpy says how much it could not allocate)
    return (BackendError, DatasetError, OSError, ValueError, TypeError, pickle.UnpicklingError,
            FloatingPointError, MemoryError)


class CLIError(Exception):
    """A mistake in the command line that the user can fix."""


class RunFailed(Exception):
    """The command ran but its result is not usable (a diverged or chance-level
    training run): one line, exit status 1; what the run wrote is kept."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line like every other mistake."""

    def error(self, message):
        self.exit(2, f"fastnet: error: {self.prog.removeprefix('fastnet ')}: {message}\n")


def _non_negative(text: str) -> float:
    """A finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive(text: str) -> int:
    """An option that counts something: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _cmd_demo(args) -> int:
    """The worked examples of chapters 3-5, computed by fastnet on the chosen backend."""
    import numpy as np

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


#: the hidden activations of fastnet.nets (named here so that --help needs no numpy)
ACTIVATIONS = ("relu", "sigmoid")
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.01, "adagrad": 0.01, "adam": 0.001}


def _hidden_sizes(text: str) -> list[int]:
    """``--hidden``: one size (50) or several (100,50)."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 50 or 100,50, got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return sizes


def _load_dataset(name, data_dir, normalize):
    from .datasets import load_fashion_mnist, load_mnist

    loaders = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}
    if name not in loaders:
        raise CLIError(f"unknown dataset {name!r}; choose mnist or fashion-mnist")
    return loaders[name](normalize=normalize, data_dir=data_dir)


def _figure_worker():
    """A FigureWorker for training.png when a core can be left to it while it imports
    matplotlib (see _CoreShare); otherwise None, and the figure is drawn in this process."""
    from .plots import FigureWorker

    return FigureWorker.start() if _cores() >= 2 else None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class _CoreShare:
    """While the figure worker imports matplotlib (0.3-0.4 s of a core here), the kernels
    use one thread fewer, so the import runs beside the training instead of after it:
    the command ends that much sooner (the results do not depend on the thread count).
    Called as an epoch callback; the threads come back once the worker is ready (or at
    the end, by restore())."""

    def __init__(self, figure):
        from . import backend

        self.figure, self.previous = figure, None
        if figure is not None:
            threads, cores = backend.get_num_threads(), _cores()
            if threads >= cores >= 2:
                self.previous = backend.set_num_threads(cores - 1)

    def __call__(self, trainer=None, record=None):
        if self.previous is not None and self.figure.ready():
            self.restore()

    def restore(self):
        from . import backend

        if self.previous is not None:
            backend.set_num_threads(self.previous)
            self.previous = None


def _cmd_train(args) -> int:
    """The chapter-5 experiment: TwoLayerNet on MNIST, with the book's defaults."""
    import time
    from pathlib import Path

    from . import backend
    from .nets import MultiLayerNet
    from .train import Trainer, TrainingInterrupted

    start = time.perf_counter()
    if args.iters is not None and args.epochs is not None:
        raise CLIError("give --iters or --epochs, not both")
    figure = getattr(args, "figure", None)  # started by main(), or None
    iters = args.iters if args.epochs is None else None
    if iters is None and args.epochs is None:
        iters = 10000
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a folder (it is made if missing)")
    try:  # before the data and the training: a bad --out fails now, not after the first epoch
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--out {out}: {exc.strerror or exc}") from None
    (x_train, t_train), (x_test, t_test) = _load_dataset(args.dataset, args.data_dir, normalize=False)
    net = MultiLayerNet(x_train.shape[1], args.hidden, 10, activation=args.activation,
                        weight_init_std=args.weight_init_std, weight_decay_lambda=args.weight_decay,
                        dtype=args.dtype, seed=args.seed)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    print(f"fastnet train: {args.dataset}, {'-'.join(map(str, net.sizes))} {args.activation}, "
          f"{iters if iters else str(args.epochs) + ' epochs'}{' iterations' if iters else ''}, "
          f"batch {args.batch_size}, {args.optimizer} lr {lr}"
          f"{f', weight decay {args.weight_decay:g}' if args.weight_decay else ''}, {net.dtype.name}, "
          f"backend {backend.get_backend()}, seed {args.seed}", flush=True)
    share = _CoreShare(figure)
    trainer = Trainer(net, x_train, t_train, x_test, t_test, iters=iters, epochs=args.epochs,
                      batch_size=args.batch_size, optimizer=args.optimizer, lr=lr, seed=args.seed,
                      gradient=args.gradient, checkpoint_dir=out, progress=progress, verbose=True,
                      callbacks=[share])
    try:
        history = trainer.fit()
    except TrainingInterrupted as stop:
        print(f"fastnet: interrupted; weights and metrics so far are in {stop.saved}", file=sys.stderr)
        return 130
    except FloatingPointError as exc:  # diverged: keep what it came to, for a look
        trainer.save_checkpoint()
        raise RunFailed(f"{exc}; the weights and metrics are in {out}") from None
    finally:
        share.restore()
    history.config["dataset"] = args.dataset
    history.config["total_seconds"] = time.perf_counter() - start
    trainer.save_checkpoint()  # weights.npz and metrics.json, written atomically
    written = ["weights.npz", "metrics.json"]
    if args.plot:
        try:
            from .plots import plot_history

            plot = figure.plot if figure is not None else plot_history
            plot(history, out / "training.png",
                 title=f"{args.dataset} {'-'.join(map(str, net.sizes))} {args.activation}")
            written.append("training.png")
        except ImportError as exc:
            print(f"fastnet: no plot ({exc})", file=sys.stderr)
        except KeyboardInterrupt:
            print(f"fastnet: interrupted while drawing the figure; weights and metrics are in {out}",
                  file=sys.stderr)
            return 130
    final = f"test acc {history.test_acc[-1]:.4f}" if history.test_acc else ""
    print(f"done: {history.iterations} iterations in {history.seconds:.2f} s "
          f"({history.seconds / history.iterations * 1e6:.0f} us/iter incl. evaluation), {final}; "
          f"total {time.perf_counter() - start:.2f} s; wrote {', '.join(written)} to {out}")
    problem = history.collapsed(classes=net.sizes[-1])
    if problem:
        raise RunFailed(f"{problem}; the weights and metrics are in {out}")
    return 0


def _cmd_search(args) -> int:
    """The book's chapter-6 hyperparameter search, on Dask."""
    import time

    from . import search as s

    try:
        space = s.Space(lr=s.parse_range(args.lr), weight_decay=s.parse_range(args.weight_decay),
                        hidden=s.parse_hidden(args.hidden), optimizer=s.Choice(tuple(args.optimizer.split(","))),
                        batch_size=s.parse_range(args.batch_size, int),
                        activation=s.Choice(tuple(args.activation.split(","))),
                        seed=s.parse_range(args.trial_seed, int))
    except s.SearchError as exc:
        raise CLIError(str(exc)) from None
    from .optim import OPTIMIZERS

    for name in space.dims["optimizer"].values:
        if name not in OPTIMIZERS:
            raise CLIError(f"--optimizer: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    for name in space.dims["activation"].values:
        if name not in ACTIVATIONS:
            raise CLIError(f"--activation: {name!r} is not relu or sigmoid")
    scheduler = args.scheduler or os.environ.get("FASTNET_SCHEDULER") or None
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise CLIError('fastnet search runs on Dask: pip install "fastnet[search]"') from None
    (x_train, t_train), _ = _load_dataset(args.dataset, args.data_dir, normalize=False)
    total = len(space.grid()) if args.grid else args.trials
    where = scheduler or f"a local cluster of {args.workers or _cores()} worker processes"
    print(f"fastnet search: {total} trials of {args.epochs} epochs on {args.dataset} "
          f"({args.train_size or len(x_train)} training images, {args.validation:.0%} of them for validation), "
          f"on {where}; results in {args.out}", flush=True)
    started = time.perf_counter()
    count = [0]

    def report(record):
        count[0] += 1
        c = record["config"]
        acc = f"val acc {record['val_acc'][-1]:.4f}" if record["val_acc"] else "no epoch"
        print(f"trial {record['trial']:>4} ({count[0]}/{total}): {acc} {record['status']:>8}  lr {c['lr']:.2e} "
              f"decay {c['weight_decay']:.2e}  {record['seconds']:.1f} s on {record['worker']}", flush=True)

    try:
        records = s.search(x_train, t_train, space, trials=args.trials, grid=args.grid, epochs=args.epochs,
                           train_size=args.train_size, validation=args.validation, seed=args.seed, out=args.out,
                           resume=args.resume, scheduler=scheduler, workers=args.workers, dtype=args.dtype,
                           backend=args.backend_sub or args.backend or os.environ.get("FASTNET_BACKEND", "auto"),
                           on_result=report)
    except s.SearchError as exc:
        raise CLIError(str(exc)) from None
    except KeyboardInterrupt:
        print(f"fastnet: interrupted; the finished trials are in {args.out}/{s.RESULTS} (--resume goes on)",
              file=sys.stderr)
        return 130
    print(f"\n{len(records)} trials in {args.out}/{s.RESULTS}; {time.perf_counter() - started:.1f} s this run")
    print(s.table(records, args.top))
    try:
        written = [s.plot_search(records, f"{args.out}/search.png"), s.plot_scatter(records, f"{args.out}/scatter.png")]
        print("figures: " + ", ".join(map(str, written)))
    except ImportError as exc:
        print(f"fastnet: no figures ({exc})", file=sys.stderr)
    return 0


def _load_any_net(path):
    from pathlib import Path

    from ._validate import describe_nonfinite
    from .io import load_book_params
    from .nets import ThreeLayerNet
    from .train import load_net

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}")
    net = ThreeLayerNet(load_book_params(path)) if path.suffix == ".pkl" else load_net(path)
    for key, value in net.params.items():
        problem = describe_nonfinite(value, f"{path}: {key}")
        if problem:
            raise ValueError(f"{problem}: these weights cannot classify anything")
    return net


def _confusion(pred, t, classes=10):
    import numpy as np

    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (t, pred), 1)
    return matrix


def _cmd_evaluate(args) -> int:
    """Accuracy and confusion matrix of saved weights on a test set."""
    import numpy as np

    net = _load_any_net(args.weights)
    _, (x_test, t_test) = _load_dataset(args.dataset, args.data_dir, normalize=True)
    pred = np.concatenate([np.argmax(net.predict(x_test[i : i + 1000]), axis=1)
                           for i in range(0, len(x_test), 1000)])
    t = np.asarray(t_test, dtype=np.int64)
    accuracy = float(np.mean(pred == t))
    print(f"accuracy: {accuracy:.4f} ({int(np.sum(pred == t))}/{len(t)}) on the {args.dataset} test set")
    matrix = _confusion(pred, t)
    print("confusion matrix (rows: true label, columns: predicted)")
    print("      " + "".join(f"{j:>6d}" for j in range(10)))
    for i, row in enumerate(matrix):
        print(f"{i:>6d}" + "".join(f"{v:>6d}" for v in row))
    return 0


def _cmd_predict(args) -> int:
    """Classify 28x28 grayscale images (white digit on black, as MNIST)."""
    import numpy as np

    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover
        raise CLIError('reading images needs Pillow: pip install "fastnet[plot]"') from exc
    from .functions import softmax
    from .nets import ThreeLayerNet

    net = _load_any_net(args.weights)
    for path in args.images:
        try:
            with Image.open(path) as img:  # reads the header only: check the size before decoding
                if img.size != (28, 28):
                    raise CLIError(f"{path} is {img.size[0]}x{img.size[1]}; fastnet predict takes 28x28 images")
                gray = img.convert("L")
                x = np.asarray(gray, dtype=np.float32).reshape(1, 784) / 255.0
        except FileNotFoundError:
            raise FileNotFoundError(f"no image at {path}") from None
        except (OSError, Image.DecompressionBombError) as exc:
            raise CLIError(f"cannot read {path} as an image ({exc})") from None
        if args.invert:
            x = 1.0 - x
        y = net.predict(x)
        probs = y[0] if isinstance(net, ThreeLayerNet) and net.output == "softmax" else softmax(y)[0]
        best = int(np.argmax(probs))
        top = np.argsort(probs)[::-1][:3]
        print(f"{path}: {best}  (" + ", ".join(f"{k}: {probs[k]:.3f}" for k in top) + ")")
    return 0


def _cmd_gradcheck(args) -> int:
    """Backprop against the numerical gradient on MNIST batches."""
    import numpy as np

    from .gradient import gradcheck
    from .nets import MultiLayerNet

    (x_train, t_train), _ = _load_dataset(args.dataset, args.data_dir, normalize=True)
    rng = np.random.default_rng(args.seed)
    failed = 0
    for b in range(args.batches):
        net = MultiLayerNet(x_train.shape[1], args.hidden, 10, activation=args.activation,
                            weight_init_std=args.weight_init_std, dtype=args.dtype, seed=args.seed + b)
        idx = rng.choice(len(x_train), args.batch_size, replace=False)
        report = gradcheck(net, x_train[idx].astype(net.dtype), t_train[idx], subset=args.subset)
        print(f"batch {b + 1}/{args.batches} ({args.batch_size} images):")
        print(report)
        failed += not report.passed
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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

    train = sub.add_parser(
        "train",
        help="train a net on MNIST (defaults: the book's chapter-5 experiment)",
        description="Train a net; the defaults reproduce the book's chapter 5: 784-50-10 ReLU, "
        "10000 iterations, batch 100, SGD lr 0.1.  Writes weights.npz, metrics.json and "
        "training.png to --out.  Ctrl-C stops and keeps what was trained.",
    )
    train.add_argument("--dataset", default="mnist", help="mnist (default) or fashion-mnist")
    train.add_argument("--hidden", default=[50], type=_hidden_sizes,
                       help="hidden layer size, or sizes like 100,50 (default 50)")
    train.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    train.add_argument("--iters", type=_positive, default=None, help="iterations (default 10000)")
    train.add_argument("--epochs", type=_positive, default=None, help="epochs instead of --iters")
    train.add_argument("--batch-size", type=_positive, default=100)
    train.add_argument("--lr", type=float, default=None,
                       help="learning rate (default: sgd 0.1, momentum 0.01, adagrad 0.01, adam 0.001)")
    train.add_argument("--optimizer", choices=list(DEFAULT_LR), default="sgd")
    train.add_argument("--weight-init-std", default=0.01,
                       type=lambda v: v if v in ("he", "xavier") else float(v),
                       help="initial weight scale: a number (default 0.01), he or xavier")
    train.add_argument("--weight-decay", type=_non_negative, default=0.0,
                       help="the book's weight decay lambda: loss + lambda/2 sum(W^2) (default 0)")
    train.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--data-dir", default=None, help="folder holding the data set files")
    train.add_argument("--out", default="fastnet-run", help="output folder (default fastnet-run)")
    train.add_argument("--gradient", choices=["backprop", "numerical"], default="backprop",
                       help="backprop (default) or the book's numerical gradient (chapter 4)")
    train.add_argument("--no-plot", dest="plot", action="store_false", help="do not write training.png")
    train.add_argument("--progress", dest="progress", action="store_true", default=None,
                       help="show the progress bar (default: when stderr is a terminal)")
    train.add_argument("--no-progress", dest="progress", action="store_false")
    train.add_argument("--backend", dest="backend_sub", default=None,
                       help="kernel backend: numpy, numba, cython or auto")
    train.set_defaults(func=_cmd_train)

    check = sub.add_parser("gradcheck", help="check backprop against the numerical gradient on MNIST batches")
    check.add_argument("--dataset", default="mnist")
    check.add_argument("--data-dir", default=None)
    check.add_argument("--hidden", default=[50], type=_hidden_sizes, help="hidden layer size(s), e.g. 50 or 100,50")
    check.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    check.add_argument("--weight-init-std", default=0.01,
                       type=lambda v: v if v in ("he", "xavier") else float(v))
    check.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    check.add_argument("--batch-size", type=_positive, default=100)
    check.add_argument("--batches", type=_positive, default=1, help="how many random batches (default 1)")
    check.add_argument("--subset", type=_positive, default=None,
                       help="check this many random elements per parameter (big nets)")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--backend", dest="backend_sub", default=None)
    check.set_defaults(func=_cmd_gradcheck)

    find = sub.add_parser(
        "search", help="hyperparameter search on Dask (the book's chapter 6)",
        description="Random (or --grid) search: each trial a Trainer run on the training set less a "
        "validation split, results appended to OUT/results.jsonl as they finish.  A range is "
        "LOW:HIGH[:log] (with :N points for --grid), a choice a,b,c; hidden sizes 100,100 or "
        "100,100/50,50,50.  Runs on a local Dask cluster, or on --scheduler tcp://HOST:PORT.",
    )
    find.add_argument("--trials", type=_positive, default=100, help="random trials (default 100)")
    find.add_argument("--grid", action="store_true", help="every combination instead of random draws")
    find.add_argument("--epochs", type=_positive, default=50, help="epochs per trial (default 50)")
    find.add_argument("--train-size", type=_positive, default=None,
                      help="training images used (default all; the book: 500)")
    find.add_argument("--validation", type=float, default=0.2, help="fraction held out (default 0.2)")
    find.add_argument("--hidden", default="100,100,100,100,100,100", help="hidden sizes, or choices a/b")
    find.add_argument("--lr", default="1e-6:1e-2:log", help="learning rate range (default 1e-6:1e-2:log)")
    find.add_argument("--weight-decay", default="1e-8:1e-4:log", help="weight decay range (default 1e-8:1e-4:log)")
    find.add_argument("--optimizer", default="sgd", help="optimizer(s): sgd, momentum, adagrad, adam (default sgd)")
    find.add_argument("--batch-size", default="100", help="batch size(s) (default 100)")
    find.add_argument("--activation", default="relu", help="relu, sigmoid or both (default relu)")
    find.add_argument("--trial-seed", default="0", help="the trials' seed(s) for weights and batches (default 0)")
    find.add_argument("--seed", type=int, default=0, help="the search's seed: draws and the split (default 0)")
    find.add_argument("--dataset", default="mnist")
    find.add_argument("--data-dir", default=None)
    find.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    find.add_argument("--out", default="search-run", help="output folder (default search-run)")
    find.add_argument("--resume", action="store_true", help="keep the trials in --out and run the rest")
    find.add_argument("--scheduler", default=None,
                      help="a running Dask scheduler, tcp://HOST:PORT (default $FASTNET_SCHEDULER, else local)")
    find.add_argument("--workers", type=_positive, default=None, help="local worker processes (default: cores)")
    find.add_argument("--top", type=_positive, default=10, help="rows of the ranked table (default 10)")
    find.add_argument("--backend", dest="backend_sub", default=None)
    find.set_defaults(func=_cmd_search)

    evaluate = sub.add_parser("evaluate", help="accuracy and confusion matrix of saved weights")
    evaluate.add_argument("--weights", required=True,
                          help="a .npz written by fastnet train, or the book's sample_weight.pkl")
    evaluate.add_argument("--dataset", default="mnist")
    evaluate.add_argument("--data-dir", default=None)
    evaluate.add_argument("--backend", dest="backend_sub", default=None)
    evaluate.set_defaults(func=_cmd_evaluate)

    predict = sub.add_parser("predict", help="classify 28x28 grayscale images")
    predict.add_argument("--weights", required=True)
    predict.add_argument("images", nargs="+", help="PNG (or other Pillow-readable) 28x28 images")
    predict.add_argument("--invert", action="store_true",
                         help="the images are dark digits on white (MNIST is white on black)")
    predict.add_argument("--backend", dest="backend_sub", default=None)
    predict.set_defaults(func=_cmd_predict)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # the training figure's worker starts before anything else, so that its import of
    # matplotlib overlaps this process's own start (numpy, the kernels, the data)
    args.figure = _figure_worker() if args.command == "train" and args.plot else None
    try:
        chosen = getattr(args, "backend_sub", None) or getattr(args, "backend", None)
        if chosen:
            from .backend import set_backend

            set_backend(chosen)
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"fastnet: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"fastnet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the training loop (imports, data): nothing to keep yet
        print("fastnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away: run() ends quietly
        raise
    except _user_errors() as exc:
        if os.environ.get("FASTNET_DEBUG"):
            raise  # developers: the whole traceback
        print(f"fastnet: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        if args.figure is not None:
            args.figure.close()


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; an OSError with the path it concerns, a
    MemoryError said as such."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, MemoryError):
        text = f"not enough memory ({text})"
    return " ".join(line.strip() for line in text.splitlines())


def run() -> None:
    """The ``fastnet`` command (console script and ``python -m fastnet``): :func:`main`,
    then a quick exit.

    When main() returns, every file it wrote is closed (weights and metrics are written
    atomically).  What is left is the interpreter's teardown of the modules that numpy
    and the backends load, which the command's user would wait for (2-3% of ``fastnet
    train``; benchmarks/README.md).  So the exit handlers run (``atexit``: logging,
    temporary files, …), the standard streams are flushed, and the process ends without
    that teardown.  Where ``atexit`` cannot run its handlers (another Python), the plain
    ``sys.exit``.

    A reader that goes away early (``fastnet demo | head``) ends the command quietly with
    status 141, as a program killed by SIGPIPE would, instead of a traceback."""
    try:
        code = main()
        sys.stdout.flush()
    except KeyboardInterrupt:  # before main() could catch it (its own imports)
        print("fastnet: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        try:  # nothing more can reach the reader; later flushes must not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # pragma: no cover - stdout without a descriptor
            pass
        code = 141
    import atexit

    run_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_handlers is None:  # pragma: no cover - CPython has it
        sys.exit(code)
    run_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (fastnet ... | head): nothing to flush to
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
