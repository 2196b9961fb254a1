"""The CUDA kernels themselves, on the SIMT runtime, without Python in the loop.

``tests/simt/kernel_driver.cpp`` runs layout, notify, dispatch, cached dispatch and combine on L
virtual ranks through the kernels' host API and checks every output against a C++ reference. It is
built here (g++, cached under ``build/simt-tests/<hash of the sources>``):

* plain, for larger shapes (several channels, rings wrapping);
* under ThreadSanitizer: zero reports required, with and without seeded random yields;
* once per known-bad variant (``csrc/cuda/bad_variants.h``): each must be caught, by wrong output
  (exit 3), a kernel's timeout naming rank and channel (exit 4), or a TSan report (exit 66).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Optional

import pytest

from tests.simt.build import CXX, SimtBuilds

TSAN_EXIT_CODE = 66
BAD_VARIANTS = {
    1: "plain tail store instead of a release",
    2: "ring overrun by one slot",
    3: "no barrier before combine's head release",
    4: "receiver waits for one record too many",
}
# staging that leaves two ring slots per (channel, peer) for these rows: the rings wrap constantly
SMALL_STAGING = 512 * 1024 + 1024

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs a C++ compiler ({CXX})")


TSAN = ["-fsanitize=thread", "-Wno-tsan"]
VARIANTS = {"plain": [], "tsan": TSAN}
VARIANTS.update({f"bad{v}": TSAN + [f"-DDISPATCH_BAD_VARIANT={v}"] for v in BAD_VARIANTS})


@pytest.fixture(scope="module")
def drivers() -> Dict[str, Path]:
    try:
        return SimtBuilds().kernel_drivers(VARIANTS)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"building the kernel driver failed:\n{exc.stderr}")


def _run(binary: Path, L: int, T: int, H: int, k: int, E: int, num_sms: int, staging: int, timeout_s: float = 30.0,
         seed: int = 1, iterations: int = 1, yield_seed: Optional[int] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # halt_on_error=0: every report is printed; exitcode: a report makes the run fail
    env["TSAN_OPTIONS"] = f"halt_on_error=0 exitcode={TSAN_EXIT_CODE} history_size=4"
    if yield_seed:
        env["SIMT_YIELD_SEED"] = str(yield_seed)
    args = [str(binary), str(L), str(T), str(H), str(k), str(E), str(num_sms), str(staging), str(timeout_s), str(seed),
            str(iterations)]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def test_plain_build_several_channels_and_wrapping_rings(drivers):
    """4 ranks, 3 channels, two-slot rings, two iterations (counters reset between calls)."""
    res = _run(drivers["plain"], L=4, T=150, H=48, k=4, E=16, num_sms=6, staging=512 * 1024 + 6 * 1024, iterations=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "OK"


@pytest.mark.parametrize("L,num_sms,yield_seed", [(2, 2, None), (3, 4, 11)])
def test_thread_sanitizer_sees_no_race(drivers, L, num_sms, yield_seed):
    """Layout, dispatch, cached dispatch and combine under TSan with wrapping rings: zero reports."""
    res = _run(drivers["tsan"], L=L, T=48, H=32, k=4, E=4 * L, num_sms=num_sms, staging=SMALL_STAGING,
               yield_seed=yield_seed)
    # exit code first: a kernel timeout on a loaded machine (exit 4) reads differently from a race
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stderr[-8000:]}"
    assert "ThreadSanitizer" not in res.stderr, res.stderr[-8000:]
    assert res.stdout.strip() == "OK"


@pytest.mark.parametrize("variant", sorted(BAD_VARIANTS))
def test_known_bad_variant_is_caught(drivers, variant):
    res = _run(drivers[f"bad{variant}"], L=3, T=64, H=32, k=4, E=12, num_sms=2, staging=SMALL_STAGING, timeout_s=3.0,
               yield_seed=7)
    caught = {3: "wrong output", 4: "kernel timeout", TSAN_EXIT_CODE: "ThreadSanitizer report"}
    assert res.returncode in caught, (
        f"variant {variant} ({BAD_VARIANTS[variant]}) was not caught: exit {res.returncode}\n{res.stderr[-3000:]}")
    if res.returncode == 4:  # a timeout names the stalled rank and the channel
        assert "stalled on channel" in res.stderr
    print(f"bad variant {variant} ({BAD_VARIANTS[variant]}): caught by {caught[res.returncode]}")
