"""The CUDA module imports without a GPU driver; the package never needs one."""

import subprocess
import sys

import pytest


def test_import_dispatch_needs_no_gpu():
    subprocess.check_call([sys.executable, "-c", "import dispatch, dispatch.testing, dispatch.cuda.backend, dispatch.cuda.device"])


def test_cuda_module_imports_without_driver():
    from dispatch.cuda.device import module_built
    if not module_built("cuda"):
        pytest.skip("dispatch._cuda was not built (no nvcc at install time)")
    # in a process of its own: see test_both_modules_load_in_one_process
    subprocess.check_call([sys.executable, "-c", "from dispatch import _cuda as m; "
                           "assert m.device_count() >= 0 and m.MAX_PEERS >= 8 and not m.IS_SIMT"])


def test_simt_module_is_built():
    """The SIMT build of the kernels is part of every install (g++ only): without it the CUDA
    tests would skip instead of running, so its absence fails here unless DISPATCH_NO_SIMT=1."""
    import os

    from dispatch.cuda.device import simt_available
    if os.environ.get("DISPATCH_NO_SIMT"):
        pytest.skip("DISPATCH_NO_SIMT=1")
    assert simt_available(), "dispatch._simt was not built: pip install --no-build-isolation -e ."
    # in a process of its own: see test_both_modules_load_in_one_process
    subprocess.check_call([sys.executable, "-c", "from dispatch import _simt as m; "
                           "assert m.IS_SIMT and m.MAX_PEERS >= 8; "
                           "assert set(m.DTYPE_CODES) >= {'float32', 'bfloat16', 'float16', 'float64'}"])


def test_both_modules_load_in_one_process():
    """A GPU test run parametrized over both devices loads both modules in one process: they
    bind the same C++ types, so the bindings keep every type py::module_local."""
    from dispatch.cuda.device import module_built
    if not (module_built("cuda") and module_built("simt")):
        pytest.skip("needs both dispatch._cuda (nvcc) and dispatch._simt built")
    subprocess.check_call([sys.executable, "-c", "import dispatch._cuda, dispatch._simt"])


def test_device_keyword_is_checked():
    """Buffer's ``device`` names the backend; anything else fails before any collective."""
    import torch

    from dispatch import Buffer
    with pytest.raises(ValueError, match="device must be one of"):
        Buffer(None, device="tpu")
    with pytest.raises(TypeError, match="device must be None"):
        Buffer(None, device=3)
    with pytest.raises(ValueError, match="device must be one of"):
        Buffer(None, device=torch.device("meta"))
