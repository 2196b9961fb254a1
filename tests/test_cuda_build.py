"""The CUDA module imports without a GPU driver; the package never needs one."""

import subprocess
import sys

import pytest


def test_import_dispatch_needs_no_gpu():
    subprocess.check_call([sys.executable, "-c", "import dispatch, dispatch.testing, dispatch.cuda.backend, dispatch.cuda.device"])


def test_cuda_module_imports_without_driver():
    try:
        from dispatch import _cuda
    except ImportError:
        pytest.skip("dispatch._cuda was not built (no nvcc at install time)")
    assert _cuda.device_count() >= 0
    assert _cuda.MAX_PEERS >= 8


def test_simt_module_is_built():
    """The SIMT build of the kernels is part of every install (g++ only): without it the CUDA
    tests would skip instead of running, so its absence fails here unless DISPATCH_NO_SIMT=1."""
    import os

    from dispatch.cuda.device import simt_available
    if os.environ.get("DISPATCH_NO_SIMT"):
        pytest.skip("DISPATCH_NO_SIMT=1")
    assert simt_available(), "dispatch._simt was not built: pip install --no-build-isolation -e ."
    from dispatch import _simt
    assert _simt.IS_SIMT and _simt.MAX_PEERS >= 8
    assert set(_simt.DTYPE_CODES) >= {"float32", "bfloat16", "float16", "float64"}


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
