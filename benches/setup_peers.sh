#!/usr/bin/env bash
# Sets up the Python of the benchmarks' peers (numpy with threadpoolctl, JAX on CPU) in the build
# folder: <target>/benchvenv, where <target> is $CARGO_TARGET_DIR or the repository's target/.
# `cargo bench --bench run` finds it there (TPC_BENCH_PYTHON overrides). The golden-file scripts
# of tests/golden/ need only numpy from it.
#
#   bash benches/setup_peers.sh            # numpy, threadpoolctl and jax[cpu] (benches/peers/requirements.txt)
#   bash benches/setup_peers.sh --numpy    # numpy only (for tests/golden/*.py)
#
# Needs python3 (>= 3.10) with the venv module, and access to PyPI. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
venv="$target/benchvenv"
reqs="$root/benches/peers/requirements.txt"
python3 -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
  || { echo "setup_peers.sh: python3 >= 3.10 is needed" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
if [ "${1:-}" = "--numpy" ]; then
  "$venv/bin/python" -m pip install --quiet "$(grep '^numpy==' "$reqs")"
else
  "$venv/bin/python" -m pip install --quiet -r "$reqs"
fi
"$venv/bin/python" - <<'PY'
import importlib
for m in ["numpy", "threadpoolctl", "jax"]:
    try:
        print(f"{m} {importlib.import_module(m).__version__}")
    except ImportError:
        print(f"{m}: not installed")
PY
echo "peers' python: $venv/bin/python"
