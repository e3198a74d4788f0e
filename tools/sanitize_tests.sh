#!/usr/bin/env bash
# Builds an ASan + UBSan copy of the C++ engine (build/asan) and runs the engine's tests against it.
# Exits non-zero on any test failure or any sanitizer report. Usage: tools/sanitize_tests.sh [pytest args...]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
CXX_BIN="${CXX:-g++}"
BUILD="$ROOT/build/asan"
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)

cmake -S . -B "$BUILD" "${GENERATOR[@]}" -DDNET_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="$CXX_BIN" -Dpybind11_DIR="$("$PYTHON" -m pybind11 --cmakedir)" \
  -DPython_EXECUTABLE="$(command -v "$PYTHON" || echo "$PYTHON")" >/dev/null
cmake --build "$BUILD" --parallel

SO="$(ls "$BUILD"/_C*.so | head -n 1)"
# Python itself is not instrumented, so the sanitizer runtimes must be loaded first.
PRELOAD="$("$CXX_BIN" -print-file-name=libasan.so):$("$CXX_BIN" -print-file-name=libubsan.so)"
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT

status=0
# detect_leaks=0: CPython and torch keep allocations alive until exit by design.
# allocator_may_return_null=1: oversized requests become MemoryError, as in the normal build.
env LD_PRELOAD="$PRELOAD" DNET_FAST_C_PATH="$SO" DNET_FAST_FUZZ_EXAMPLES="${DNET_FAST_FUZZ_EXAMPLES:-25}" \
  ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:log_path=$LOGS/asan" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$LOGS/ubsan" \
  "$PYTHON" -m pytest -q -p no:cacheprovider \
  tests/test_sampling.py tests/test_metrics.py tests/test_engine_fuzz.py tests/test_stub.py "$@" || status=$?

if compgen -G "$LOGS/*" >/dev/null; then
  echo "sanitizer reports:" >&2
  cat "$LOGS"/* >&2
  status=1
fi
if [[ $status -eq 0 ]]; then echo "sanitize_tests: clean ($SO)"; fi
exit $status
