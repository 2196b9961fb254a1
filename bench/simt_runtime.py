"""Cost of the SIMT runtime's collectives on this machine: one launch of 512 threads, one
``__syncthreads`` over 512 threads (fibers of one OS thread), one ``__shfl_sync`` over a warp.

    python -m bench.simt_runtime

Builds ``tests/simt/runtime_checks.cpp`` (cached under build/simt-tests) and runs its ``bench`` case.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

from tests.simt.build import SimtBuilds


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    binary = SimtBuilds().runtime_checks()
    out = subprocess.run([str(binary), "bench"], check=True, capture_output=True, text=True).stdout
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}")
    for line in out.splitlines():
        if line != "OK":
            name, value = line.split()
            print(f"{name:32s} {value}")


if __name__ == "__main__":
    main()
