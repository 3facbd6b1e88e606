#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with mlsae and its test dependencies.
# torch is pinned to the CPU wheel first; set MLSAE_TORCH to choose another build (e.g. "torch" for CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${MLSAE_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
# Test tools, not dependencies of mlsae: the interop tests load our exports with the real libraries,
# and the Triton kernels are checked on the CPU through Triton's interpreter (GPU torch builds bring triton).
.venv/bin/python -m pip install -q "eai-sparsify==1.3.3" "sae-lens==6.54.12" "triton==3.9.0"
# The report test renders the HTML page in headless Chromium; CI (CI=true) installs Debian's package.
if [ "${CI:-}" = "true" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "could not install chromium: the headless report check will be skipped"
fi
echo "mlsae is installed in .venv: activate it with 'source .venv/bin/activate'"
