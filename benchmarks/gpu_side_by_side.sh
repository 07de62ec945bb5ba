#!/usr/bin/env bash
# Issue 7's GPU comparison in one go: the PyTorch reference workload and abd-jax's suite on the
# same GPU, back to back, at the paper's configuration (WRN-16-2 -> WRN-16-1, batch 128, 32x32x3).
#
#     bash benchmarks/gpu_side_by_side.sh OUT_DIR [REPEATS]
#
# Needs a Python with jax[cuda], flax, optax and torch (CUDA) importable as `python3`; run from the
# repository root. Writes OUT_DIR/env.txt, OUT_DIR/reference_gpu.jsonl (PyTorch, run before and
# after the JAX suite, to expose order effects) and OUT_DIR/suite_gpu.jsonl (abd-jax; last, the
# vanilla pseudo-batch at batch 512, to see whether batch 128 leaves the GPU idle). Each part
# has its own time limit so that one slow part cannot take the others' time.
set -u
out=${1:?usage: gpu_side_by_side.sh OUT_DIR [REPEATS]}
repeats=${2:-20}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 - <<'EOF'
import jax, flax, optax, torch
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__)
print("jax devices", jax.devices(), "default_matmul_precision", jax.config.jax_default_matmul_precision)
print("torch cudnn.allow_tf32", torch.backends.cudnn.allow_tf32, "cuda.matmul.allow_tf32", torch.backends.cuda.matmul.allow_tf32)
EOF
} 2>&1 | tee "$out/env.txt"
ref() { timeout "$1" python3 -m benchmarks.reference_torch --device cuda --repeats "$repeats" --json --cases "${@:2}" \
          | tee -a "$out/reference_gpu.jsonl"; }
ref 150 teacher_forward kd_step zskt zskt_sv zskt_sr
timeout 330 python3 -m benchmarks.suite --repeats "$repeats" --json \
  --cases teacher_forward kd_step zskt zskt_sv zskt_sr | tee -a "$out/suite_gpu.jsonl"
ref 60 zskt zskt_sv
# Is the pseudo-batch bound by launches and latency rather than arithmetic? Same step, 4x the batch.
timeout 100 python3 -m benchmarks.suite --repeats "$repeats" --json --cases zskt --batch 512 | tee -a "$out/suite_gpu.jsonl"
date -u +%FT%TZ | tee -a "$out/env.txt"
