"""Builds dispatch._C (the CPU backend: planner, shared memory, byte movers), dispatch._simt (the
CUDA backend's kernels built by the C++ compiler against the CPU SIMT runtime, csrc/simt) and, where
`nvcc` is found, dispatch._cuda (the same kernels for the GPU). A failed CUDA build only warns.
"""

import glob
import os
import shutil
import subprocess
import warnings

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


# No fast-math and no FMA contraction: combine must add in exactly the reference's order and rounding.
EXACT_MATH = ["-fno-fast-math", "-ffp-contract=off"]

ext_modules = [
    Pybind11Extension(
        "dispatch._C",
        HOST_SOURCES,
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"] + EXACT_MATH + _host_isa_flags(),
        libraries=["rt"],
    )
]

# --- the CUDA kernels on the CPU (dispatch._simt): same kernel files, same bindings, SIMT runtime.
SIMT_RUNTIME_SOURCES = ["csrc/simt/scheduler.cpp", "csrc/simt/device_api.cpp", "csrc/simt/fiber.cpp"]
ext_modules.append(
    Pybind11Extension(
        "dispatch._simt",
        ["csrc/simt/kernels_simt.cpp"] + SIMT_RUNTIME_SOURCES + ["csrc/bindings/cuda_module.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        define_macros=[("DISPATCH_MODULE_NAME", "_simt")],
        extra_compile_args=["-O2", "-pthread"] + EXACT_MATH,
        extra_link_args=["-pthread"],
    )
)

# --- CUDA backend (dispatch._cuda): kernels compiled by nvcc, bindings by the C++ compiler, cudart
# linked statically so that importing the module needs no GPU driver. Skipped without nvcc
# (or with DISPATCH_NO_CUDA=1); a failure warns instead of failing the install.
CUDA_SOURCES = sorted(glob.glob("csrc/cuda/*.cu"))


def _cuda_home():
    nvcc = shutil.which("nvcc")
    if os.environ.get("DISPATCH_NO_CUDA") or nvcc is None or not CUDA_SOURCES:
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))):
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


CUDA_HOME = _cuda_home()
if CUDA_HOME is not None:
    ext_modules.append(
        Pybind11Extension(
            "dispatch._cuda",
            ["csrc/bindings/cuda_module.cpp"],
            include_dirs=["csrc", os.path.join(CUDA_HOME, "include")],
            cxx_std=17,
            define_macros=[("DISPATCH_WITH_NVCC", "1")],
            extra_compile_args=["-O2"],
            library_dirs=[os.path.join(CUDA_HOME, "lib64")],
            libraries=["cudart_static", "rt", "pthread", "dl"],
        )
    )


class BuildExt(build_ext):
    """pybind11's build_ext, plus nvcc for the CUDA module's kernels; a CUDA failure only warns."""

    def build_extension(self, ext):
        if ext.name != "dispatch._cuda":
            return super().build_extension(ext)
        try:
            objects = []
            # sm_80 and sm_90 machine code plus sm_90 PTX (newer GPUs JIT it)
            archs = os.environ.get("DISPATCH_CUDA_ARCHS", "80,90").split(",")
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
            for source in CUDA_SOURCES:
                obj = os.path.join(self.build_temp, source.replace("/", "_") + ".o")
                os.makedirs(os.path.dirname(obj), exist_ok=True)
                # -fmad=false: combine adds in the reference's order and rounding, never fused.
                cmd = [os.path.join(CUDA_HOME, "bin", "nvcc") if os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
                       else "nvcc", "-std=c++17", "-O3", *gencode, "-fmad=false", "-Xcompiler", "-fPIC",
                       "-Icsrc", "-c", source, "-o", obj]
                print(" ".join(cmd))
                subprocess.check_call(cmd)
                objects.append(obj)
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - the CPU backend must still install
            warnings.warn(f"dispatch._cuda was not built ({exc}); the CUDA backend is unavailable")


setup(
    name="dispatch",
    version="0.1.0",
    description="Node-aware expert-routing dispatch/combine for Mixture-of-Experts",
    packages=find_packages(include=["dispatch", "dispatch.*", "bench", "bench.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
    python_requires=">=3.10",
    install_requires=["torch", "numpy"],
    extras_require={"test": ["pytest"], "bench": ["tqdm", "matplotlib"]},
)
