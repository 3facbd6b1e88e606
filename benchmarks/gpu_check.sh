#!/usr/bin/env bash
# The performance issue's GPU checks as one short script (a few minutes on one H100/H200), for a
# session lent a GPU: the Triton kernels and bf16 autocast against the dense formula, the coder's
# step against sparsify's own Triton kernels at d 512 R 64 and d 4096 R 16 in bf16 (with the
# measured bf16 matmul rate), and the whole pipeline on a random Pythia-160m-shaped model.
# Needs torch with CUDA, triton, transformers and eai-sparsify importable; writes to $OUT (or
# benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "triton or bf16" 2>&1 | tee "$out/gpu_tests.log"
python3 benchmarks/bench_step.py --device cuda --bf16 --shapes 512x64 4096x16 --batch 16384 --impls ours sparsify \
    --json "$out/step_gpu.json" 2>&1 | tee "$out/step_gpu.log"
python3 benchmarks/bench_pipeline.py --device cuda --tokens 262144 --model-dtype bfloat16 --coder-dtype bfloat16 \
    --json "$out/pipeline_gpu.json" 2>&1 | tail -n 5 | tee "$out/pipeline_gpu.log"
