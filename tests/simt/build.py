"""Builds the C++ programs of tests/simt against the SIMT runtime (g++), cached under
``build/simt-tests/<hash of the sources>`` so that a rerun on unchanged sources builds nothing."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_SOURCES = ["csrc/simt/scheduler.cpp", "csrc/simt/device_api.cpp", "csrc/simt/fiber.cpp"]
KERNEL_SOURCE = "csrc/simt/kernels_simt.cpp"
DRIVER_SOURCE = "tests/simt/kernel_driver.cpp"
CXX = os.environ.get("CXX", "g++")
COMMON_FLAGS = ["-std=c++17", "-O1", "-g1", f"-I{ROOT / 'csrc'}", "-pthread", "-ffp-contract=off"]

def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "csrc").rglob("*")) + sorted((ROOT / "tests" / "simt").glob("*.cpp")):
        if path.is_file():
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _compile(source: str, obj: Path, flags: List[str]) -> None:
    subprocess.run([CXX, *COMMON_FLAGS, *flags, "-c", str(ROOT / source), "-o", str(obj)], check=True,
                   capture_output=True, text=True)


class SimtBuilds:
    """Builds programs over the SIMT runtime once per source tree; runtime and driver objects are
    shared between the variants of the kernels."""

    def __init__(self) -> None:
        self.dir = ROOT / "build" / "simt-tests" / _source_hash()
        self.dir.mkdir(parents=True, exist_ok=True)

    def runtime_checks(self) -> Path:
        """tests/simt/runtime_checks.cpp over the plain runtime (no kernels of the library)."""
        binary = self.dir / "runtime_checks"
        if not binary.exists():
            sources = ["tests/simt/runtime_checks.cpp"] + RUNTIME_SOURCES
            subprocess.run([CXX, *COMMON_FLAGS, *[str(ROOT / s) for s in sources], "-o", str(binary)], check=True,
                           capture_output=True, text=True)
        return binary

    def kernel_drivers(self, variants: Dict[str, List[str]], driver: str = DRIVER_SOURCE) -> Dict[str, Path]:
        """tests/simt/kernel_driver.cpp (or another ``driver``) linked with the kernels built with
        each variant's flags (``-fsanitize=thread`` among them selects the TSan runtime objects)."""
        stem = "driver" if driver == DRIVER_SOURCE else Path(driver).stem
        jobs = []
        for kind, runtime_flags in (("plain", []), ("tsan", ["-DSIMT_TSAN"])):
            for source in RUNTIME_SOURCES:
                # the runtime itself is never instrumented: its bookkeeping is not the kernels' data
                jobs.append((source, self.dir / f"{kind}-{Path(source).stem}.o", runtime_flags))
        for kind, flags in (("plain", []), ("tsan", ["-fsanitize=thread", "-Wno-tsan"])):
            jobs.append((driver, self.dir / f"{kind}-{stem}.o", flags))
        for name, flags in variants.items():
            jobs.append((KERNEL_SOURCE, self.dir / f"{name}-kernels.o", flags))
        todo = [job for job in jobs if not job[1].exists()]
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for future in [pool.submit(_compile, *job) for job in todo]:
                future.result()
        binaries = {}
        for name, flags in variants.items():
            kind = "tsan" if "-fsanitize=thread" in flags else "plain"
            binary = self.dir / (name if driver == DRIVER_SOURCE else f"{stem}-{name}")
            if not binary.exists():
                objects = [self.dir / f"{kind}-{Path(s).stem}.o" for s in RUNTIME_SOURCES]
                objects += [self.dir / f"{kind}-{stem}.o", self.dir / f"{name}-kernels.o"]
                link = [CXX, "-pthread"] + (["-fsanitize=thread"] if kind == "tsan" else [])
                subprocess.run(link + [str(o) for o in objects] + ["-o", str(binary)], check=True,
                               capture_output=True, text=True)
            binaries[name] = binary
        return binaries


