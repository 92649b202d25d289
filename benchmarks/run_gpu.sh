#!/usr/bin/env bash
# Every GPU benchmark on one CUDA machine, none of which needs Ray: the encoder actor and decode side,
# training memory, and DiT^DH-XL / DiT-XL trainer-step throughput and MFU. Results go to
# ${OUT:-benchmarks/results}; DIT_BUDGET_S caps the DiT variants started (the rest are recorded as not run).
#
#   bash benchmarks/run_gpu.sh
set -u
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  "$python" -c "import torch, triton, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'timm', timm.__version__)"
  nproc
} 2>&1 | tee "$out/gpu_machine.txt"
status=0
"$python" -m benchmarks.bench_encode_gpu --out "$out/encode_gpu.json" || status=1
"$python" -m benchmarks.bench_memory --out "$out/memory.json" || status=1
"$python" -m benchmarks.bench_dit_gpu --budget-s "${DIT_BUDGET_S:-240}" --out "$out/dit_gpu.json" || status=1
"$python" -m benchmarks.bench_sampling --budget-s "${SAMPLING_BUDGET_S:-180}" --out "$out/sampling.json" || status=1
exit $status
