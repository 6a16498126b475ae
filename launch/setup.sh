#!/usr/bin/env bash
# One-time setup on a fresh machine (root, Python 3.11, package registries only):
# the Fashion-MNIST Debian package when missing, the pinned Python packages, ttmpd_jax itself.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash data/get_fashion_mnist.sh
if ! "$PYTHON" -c "import ttmpd_jax, jax, flax, optax, orbax.checkpoint, tensorflow_datasets, chex, pytest, xdist, hypothesis, matplotlib" 2>/dev/null \
   || ! "$PYTHON" - <<'PY' 2>/dev/null
import importlib.metadata as md, sys
pins = [l.split('#')[0].strip() for l in open('requirements.txt')]
bad = [p for p in pins if p and md.version(p.split('==')[0]) != p.split('==')[1]]
sys.exit(1 if bad else 0)
PY
then
  echo "Installing Python packages (requirements.txt) ..."
  "$PYTHON" -m pip install -q --disable-pip-version-check -r requirements.txt
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps -e .
fi
echo "setup done"
