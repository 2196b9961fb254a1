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
