"""The SIMT runtime itself (csrc/simt): warp collectives and barriers as CUDA defines them, blocks of
concurrent grids spinning on each other, and the failures it must report instead of hanging."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.simt.build import CXX, SimtBuilds

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs a C++ compiler ({CXX})")


@pytest.fixture(scope="module")
def runtime_checks():
    try:
        return SimtBuilds().runtime_checks()
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"building tests/simt/runtime_checks.cpp failed:\n{exc.stderr}")


def _check(binary, case: str) -> str:
    res = subprocess.run([str(binary), case], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout + res.stderr
    return res.stdout


def test_shuffle_ballot_and_barriers_under_random_yields(runtime_checks):
    _check(runtime_checks, "collectives")


def test_blocks_of_concurrent_grids_progress_together(runtime_checks):
    _check(runtime_checks, "concurrent_grids")


def test_barrier_deadlock_is_reported_with_block_and_warp(runtime_checks):
    out = _check(runtime_checks, "deadlock")
    assert "deadlock in kernel 'deadlock_kernel' block (" in out


def test_stuck_spin_wait_is_stopped_by_the_watchdog(runtime_checks):
    out = _check(runtime_checks, "watchdog")
    assert "watchdog: kernel 'spin_forever_kernel'" in out


def test_resident_block_cap_reproduces_the_co_residency_hazard(runtime_checks):
    _check(runtime_checks, "resident_cap")
