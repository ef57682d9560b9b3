#!/usr/bin/env bash
# Every GPU-only check in one run, meant to finish within 8 minutes on one GPU machine:
#   - QLoRA on bitsandbytes' CUDA kernels (tests/test_qlora_cuda.py) and FSDP-QLoRA on a one-rank NCCL mesh
#     (tests/test_fsdp_qlora.py);
#   - CUDA determinism of the SVD inits (tests/test_svd_init.py -k cuda), DeepSpeed ZeRO-3 SVD init
#     (tests/test_svd_init_distributed.py);
#   - FSDP1 and DeepSpeed ZeRO-2/3 with Lightning (tests/test_distributed.py, tests/test_svd_init_lightning.py):
#     these need two GPUs and skip on one;
#   - LoRA and DoRA training-step time and peak GPU memory against PEFT and the floor (benchmarks/train_step.py).
#
# Usage, from the repository root:  bash benchmarks/gpu_checks.sh [OUT_DIR]
# Packages the machine lacks (bitsandbytes, jsonargparse, deepspeed) are installed from wheels in .whl/ when that
# folder exists; prepare it on a machine with pip access:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 jsonargparse
# A check whose package is missing is reported skipped, never failed. The exit status is pytest's worst.
set -uo pipefail
out="${1:-${OUT:-gpu_checks_out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
    nvidia-smi -L
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.device_count(), 'GPUs')"
    for package in lightning peft transformers bitsandbytes deepspeed jsonargparse; do
        python3 -c "import $package; print('$package', getattr($package, '__version__', '?'))" 2>/dev/null \
            || echo "$package missing: its checks skip"
    done
} 2>&1 | tee "$out/environment.txt"

status=0
run_tests() {  # name, seconds, pytest arguments...
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout "$seconds" python3 -m pytest -q -p no:cacheprovider -rs "$@" 2>&1 | tee "$out/$name.txt" | tail -15
    local code=${PIPESTATUS[0]}
    [ "$code" -eq 5 ] && code=0  # nothing collected: every test was deselected
    [ "$code" -gt "$status" ] && status=$code
}
run_tests qlora_cuda 150 tests/test_qlora_cuda.py tests/test_fsdp_qlora.py
run_tests svd_init_cuda 90 tests/test_svd_init.py tests/test_svd_init_distributed.py -k "cuda or deepspeed"
run_tests fsdp1_deepspeed 150 tests/test_distributed.py tests/test_svd_init_lightning.py -k "fsdp1 or deepspeed"

echo "== train step on the GPU (LoRA, DoRA; ours, PEFT, floor)"
timeout 200 python3 benchmarks/train_step.py --device cuda --only peft-lora ours-lora peft-dora ours-dora \
    --rounds 2 --warmup 3 --steps 10 --out "$out/train_step_cuda.json" 2>&1 | tee "$out/train_step_cuda.txt" | tail -8
exit "$status"
