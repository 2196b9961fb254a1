"""Builds dispatch._C (the CPU backend: planner, shared memory, byte movers).

The CUDA backend's module is built here too once it exists, where `nvcc` is found.
"""

import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

HOST_SOURCES = sorted(glob.glob("csrc/host/*.cpp")) + ["csrc/bindings/host_module.cpp"]


def _host_isa_flags():
    """AVX2/F16C when the build machine has them (the module runs where it is built): fp16
    conversions then compile to instructions instead of library calls."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return []
    if os.environ.get("DISPATCH_PORTABLE") or not {"avx2", "f16c"} <= set(flags):
        return []
    return ["-mavx2", "-mf16c"]


ext_modules = [
    Pybind11Extension(
        "dispatch._C",
        HOST_SOURCES,
        include_dirs=["csrc"],
        cxx_std=17,
        # No fast-math and no FMA contraction: combine must add in exactly the reference's
        # order and rounding.
        extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off"] + _host_isa_flags(),
        libraries=["rt"],
    )
]

setup(
    name="dispatch",
    version="0.1.0",
    description="Node-aware expert-routing dispatch/combine for Mixture-of-Experts",
    packages=find_packages(include=["dispatch", "dispatch.*", "bench", "bench.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    install_requires=["torch", "numpy"],
    extras_require={"test": ["pytest"], "bench": ["tqdm", "matplotlib"]},
)
