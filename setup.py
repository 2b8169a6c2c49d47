"""Build script: the Cython kernels are compiled into the wheel.

``kernels/`` is installed as the subpackage ``fastnet.kernels`` (``package_dir``), so
``pip install .``, ``pip install -e .`` and ``python -m build --wheel`` all compile
``kernels/_cython.pyx`` into ``fastnet/kernels/_cython*.so``.

Set ``FASTNET_CYTHON_DEBUG=1`` while building to turn bounds checking, wraparound and
initialised-memory checks back on and to compile without optimisation.
"""

import os
import sys
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTNET_CYTHON_DEBUG", "") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "embedsignature": True,
}

# OpenMP for the prange loops (the numerical gradient) where the compiler has it: GCC
# on Linux.  Elsewhere the same loops compile serial.
OPENMP = sys.platform.startswith("linux") and os.environ.get("FASTNET_NO_OPENMP", "") in ("", "0")
omp = ["-fopenmp"] if OPENMP else []

extensions = [
    Extension(
        "fastnet.kernels._cython",
        ["kernels/_cython.pyx"],
        include_dirs=[numpy.get_include(), "kernels"],
        depends=[str(p) for p in sorted(Path("kernels").glob("_*.[hp]*")) if p.suffix in (".h", ".pxi")],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        # -O3 without -ffast-math: NaN and inf must stay visible (kernels/contract.py).
        # -fno-math-errno: sqrt need not set errno, so the optimisers' loops vectorise.
        # -fno-trapping-math: no code here reads the floating-point exception flags, so
        # the compiler may compute both sides of a select; without it the exp loops
        # (_vmath.h, _numgrad.h), whose clamp GCC splits into branches, vectorise only
        # where AVX-512 masks them, and run scalar on AVX2 and older CPUs.  Neither flag
        # changes a result: NaN and inf are unchanged.
        extra_compile_args=(["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno", "-fno-trapping-math"]) + omp,
        # -s: no symbol tables or debug sections in the shipped extension (4.5 -> 1.1 MB)
        extra_link_args=omp + ([] if DEBUG else ["-s"]),
    )
]

setup(
    packages=["fastnet", "fastnet.datasets", "fastnet.kernels"],
    package_dir={"fastnet": "fastnet", "fastnet.kernels": "kernels"},
    # the sdist carries the Cython source and headers (MANIFEST.in); a wheel only the
    # compiled module
    exclude_package_data={"fastnet.kernels": ["*.c", "*.pyx", "*.pxi", "*.h", "*.html"]},
    ext_modules=cythonize(extensions, compiler_directives=directives),
)
