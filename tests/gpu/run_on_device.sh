#!/usr/bin/env bash
# GPU tests and benchmarks on a GPU machine, one stage per call (each fits 10 minutes).
#
# The machine needs the offline site dir with vLLM, ModelOpt and Ray unpacked in
# /tmp/site (../shared/gpu/build-bundle.sh --with-ray; copy its parts first), plus the
# redis wheel in .whl/ (our job model imports the queue client). Results go to $OUT
# when set (a device call), else bench/results/.
#
#   tests/gpu/run_on_device.sh card      # nvidia-smi, copy bandwidth, the 8B-shaped model
#   tests/gpu/run_on_device.sh unpack    # after the last bundle part: /tmp/site
#   tests/gpu/run_on_device.sh tests     # pytest tests/gpu (quantize, vLLM, serving)
#   tests/gpu/run_on_device.sh quantize  # worker pipeline, calibration 512/64/128/256
#   tests/gpu/run_on_device.sh vllm      # vLLM offline: NVFP4 vs BF16 decode and TTFT
#   tests/gpu/run_on_device.sh serve     # our endpoint vs vLLM's OpenAI server
#   tests/gpu/run_on_device.sh scaleout [all|one|two]  # 2+ GPUs: 1 vs 2 replicas (BF16)
set -euo pipefail
cd "$(dirname "$0")/../.."

MODELS=${NVFP4_GPU_MODELS:-/tmp/models}
RESULTS=${OUT:-bench/results}
BF16=$MODELS/qwen3-8b-shaped-bf16
NVFP4=$MODELS/published/qwen3-8b-shaped-nvfp4-c512
mkdir -p "$MODELS" "$RESULTS"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false
# flashinfer is not in the offline bundle; vLLM's own sampler is used instead.
export VLLM_USE_FLASHINFER_SAMPLER=0
site_env() {
    test -d /tmp/site || { echo "no /tmp/site: unpack the bundle first"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD/services:$PWD PATH=/tmp/site/bin:$PATH
}

case "${1:-}" in
card)
    nvidia-smi
    df -h /tmp
    python3 bench/gpu_card.py --out "$MODELS/gpu_card.json"
    cp "$MODELS/gpu_card.json" "$RESULTS/gpu_card.json"
    python3 bench/gpu_model.py --out "$BF16" --calib "$MODELS/calib.txt" \
        --json "$RESULTS/gpu_model.json" 2>&1 | grep -v "Writing model shards"
    ;;
unpack)
    (cd /tmp/b && sha256sum -c SHA256SUMS)
    cat /tmp/b/bundle.tar.xz.part* | tar -xJ -C /tmp
    rm -rf /tmp/b
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/*.whl
    site_env
    python3 -c "import vllm, modelopt, ray, redis; print('vllm', vllm.__version__,
        'modelopt', modelopt.__version__, 'ray', ray.__version__)"
    ;;
tests)
    site_env
    python3 -m pytest tests/gpu -q -x -p no:cacheprovider "${@:2}"
    ;;
quantize)
    site_env
    python3 bench/gpu_quantize.py --model "$BF16" --calib "$MODELS/calib.txt" \
        --models-dir "$MODELS/published" --samples 512 64 128 256 \
        --deadline-s "${DEADLINE_S:-470}" --out "$RESULTS/gpu_quantize.json"
    ;;
vllm)
    site_env
    python3 bench/gpu_vllm.py --card "$MODELS/gpu_card.json" \
        --model "nvfp4=$NVFP4" --model "bf16=$BF16" --log-dir "$MODELS" \
        --deadline-s "${DEADLINE_S:-540}" --out "$RESULTS/gpu_vllm.json"
    grep -h "Model loading took\|NvFp4\|Marlin\|Error" "$MODELS"/vllm_*.log | head -20 || true
    ;;
serve)
    site_env
    python3 bench/gpu_serve.py --model "$NVFP4" --ray-prefix /tmp/site --log-dir "$MODELS" \
        --deadline-s "${DEADLINE_S:-560}" --out "$RESULTS/gpu_serve.json"
    ;;
scaleout)
    # BF16: the same engine cost per replica without the quantization minutes. `one`
    # leaves the Ray cluster running for `two` (the next call on the same machine).
    site_env
    nvidia-smi --query-gpu=index,name,memory.total --format=csv
    test -f "$BF16/config.json" || python3 bench/gpu_model.py --out "$BF16" \
        | grep -v "Writing model shards"
    python3 bench/gpu_scaleout.py "${2:-all}" --model "$BF16" --ray-prefix /tmp/site \
        --state "$MODELS/scaleout_state.json" --out "$RESULTS/gpu_scaleout.json"
    ;;
*)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
