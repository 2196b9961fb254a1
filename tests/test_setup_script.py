"""scripts/setup.sh rebuilds the extension only when its sources changed, and says so quietly."""

from __future__ import annotations

import os
import subprocess
import time

from tests.cluster import REPO_ROOT

SETUP = os.path.join(REPO_ROOT, "scripts", "setup.sh")


def _setup() -> tuple:
    start = time.monotonic()
    proc = subprocess.run(["bash", SETUP], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def test_setup_rebuilds_only_when_sources_change():
    code, out, _ = _setup()  # builds at most once (a fresh checkout), then the stamp is current
    assert code == 0, out
    code, out, seconds = _setup()
    assert code == 0, out
    assert "building" not in out, f"rebuilt with unchanged sources:\n{out}"
    assert out.strip() == "", f"a no-op setup should print nothing:\n{out}"
    assert seconds < 60, f"a no-op setup took {seconds:.0f} s"
