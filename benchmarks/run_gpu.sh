#!/usr/bin/env bash
# GPU benchmarks on one CUDA machine, none of which needs Ray: the encoder actor and GPU JPEG decode,
# training memory, DiT^DH-XL / DiT-XL trainer-step throughput and MFU, sampling, and the ViT-XL
# decoder's trainer-step MFU. Results go to ${OUT:-benchmarks/results}; DIT_BUDGET_S and
# SAMPLING_BUDGET_S cap the variants those two start (the rest are recorded as not run).
#
#   bash benchmarks/run_gpu.sh                          # all of them, in this order
#   bash benchmarks/run_gpu.sh encode_gpu decoder_train # only these (issue 16's GPU goals 2 and 4)
#
# A lent GPU comes with 15 minutes in all: name the benchmarks that slot is for.
# decoder_train needs the `lpips` package, which the H200 image lacks: carry its wheel. Here, once,
#   echo /.whl/ >> .git/info/exclude && python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl lpips==0.1.4
# then run with carry [".whl"] and the command starting
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. &&
set -u
all=(encode_gpu memory dit_gpu sampling decoder_train)
chosen=("$@")
[ ${#chosen[@]} -eq 0 ] && chosen=("${all[@]}")
for name in "${chosen[@]}"; do
  case " ${all[*]} " in
    *" $name "*) ;;
    *) echo "run_gpu.sh: unknown benchmark '$name'; choose from: ${all[*]}" >&2; exit 2 ;;
  esac
done
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
for name in "${chosen[@]}"; do
  case "$name" in
    encode_gpu | memory) args=() ;;
    dit_gpu) args=(--budget-s "${DIT_BUDGET_S:-240}") ;;
    sampling) args=(--budget-s "${SAMPLING_BUDGET_S:-180}") ;;
    decoder_train)
      args=(--gpu-only)  # its CPU comparisons are the 2-core VM's numbers
      if ! "$python" -c "import lpips" 2>/dev/null; then
        echo "run_gpu.sh: decoder_train needs the lpips package (the paper's perceptual loss); see this script's header" >&2
        status=1
        continue
      fi ;;
  esac
  echo "== $name" >&2
  "$python" -m "benchmarks.bench_$name" "${args[@]}" --out "$out/$name.json" || status=1
done
exit $status
