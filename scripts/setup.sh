#!/usr/bin/env bash
# Creates .venv with the pinned CPU torch and builds dispatch in place. Safe to re-run and quick
# then: packages are installed once per requirement list, and the C++ extension is rebuilt only
# when its sources (csrc/, setup.py, pyproject.toml), the interpreter or the build switches changed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
pip_flags=(-q --disable-pip-version-check)
[ -t 1 ] || pip_flags+=(--progress-bar off)  # progress bars only on a terminal

# torch==2.13.0 is the CPU build on this machine's disk; a bare `torch` would pull a CUDA build.
requirements=("torch==2.13.0" "pybind11>=2.10" numpy pytest tqdm matplotlib setuptools wheel)
requirements_stamp=.venv/.dispatch-requirements
if [ "$(cat "$requirements_stamp" 2>/dev/null)" != "${requirements[*]}" ]; then
  python -m pip install "${pip_flags[@]}" --upgrade pip >/dev/null
  python -m pip install "${pip_flags[@]}" "${requirements[@]}"
  echo "${requirements[*]}" > "$requirements_stamp"
fi

# The stamp lives in .venv: a fresh clone or a new venv always builds.
source_hash=$( {
  find csrc -type f -print0 | sort -z | xargs -0 sha256sum
  sha256sum setup.py pyproject.toml
  python --version
  echo "${requirements[*]} NO_CUDA=${DISPATCH_NO_CUDA:-} PORTABLE=${DISPATCH_PORTABLE:-}"
} | sha256sum | cut -d' ' -f1)
build_stamp=.venv/.dispatch-build-stamp
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$source_hash" ] || ! compgen -G "dispatch/_C.*.so" >/dev/null; then
  mkdir -p build
  build_log=build/setup-build.log
  echo "setup: building the C++ extension (1-2 min; compiler output in $build_log)"
  if ! python -m pip install "${pip_flags[@]}" --no-build-isolation -e . >"$build_log" 2>&1; then
    tail -n 40 "$build_log"
    echo "setup: the build failed; the whole output is in $build_log" >&2
    exit 1
  fi
  echo "$source_hash" > "$build_stamp"
fi
