#!/usr/bin/env bash
# The second, shorter test leg: the newest JAX (which needs Python >= 3.12) on the kernels, model,
# diffusion and decoding contract tests. It finds a Python >= 3.12 (on PATH, else through pyenv),
# makes `.venv-newest` with the package's `dev` extra (no torch: the parity tests skip), and runs
# the subset. Without such a Python it says so and exits 0: the README's main test command is
# the one every machine runs.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for cmd in python3.12 python3.13 python3.14; do
    if "$cmd" -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1; then
      command -v "$cmd"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])(\.[0-9]+)?$' | sort -V); do
      PYENV_VERSION="$version" pyenv which python && return 0
    done
  fi
  return 1
}

if ! python=$(find_python); then
  echo "test_newest_jax: no Python >= 3.12 here; the newest-JAX leg is skipped"
  exit 0
fi
echo "test_newest_jax: $python ($("$python" --version))"
"$python" -m venv .venv-newest
.venv-newest/bin/pip install -q --upgrade pip
.venv-newest/bin/pip install -q -e '.[dev]'
.venv-newest/bin/python -c 'import jax; print("test_newest_jax: JAX", jax.__version__)'
.venv-newest/bin/python -m pytest -q -n 2 --dist worksteal -m "not slow" \
  tests/pallas_kernels/test_attention_tpu.py tests/pallas_kernels/test_lightning_tpu.py \
  tests/pallas_kernels/test_selective_scan_tpu.py tests/pallas_kernels/test_wkv_tpu.py \
  tests/pallas_kernels/test_triton_lowering.py \
  tests/models/test_families.py tests/diffusion/test_sample.py tests/decoding/test_generate.py \
  "$@"
