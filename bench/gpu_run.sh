#!/usr/bin/env bash
# The GPU checks of a release, one stage per device call (each fits one 10-minute call).
#
# Runs on the GPU machine once the offline bundle (../shared/gpu/build-bundle.sh --with-ray:
# vLLM 0.26.0 + Ray 2.58.0, the pair of services/nvfp4_serve/versions.env) is unpacked in
# /tmp/site and the calling line has exported PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
# HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_USE_FLASHINFER_SAMPLER=0. Stages after the
# first need the same warm machine: /tmp (site dir, model, results so far) lasts only while
# it stays warm. Results go to $OUT (a device call returns what is written there), else to
# bench/results/; the serving JSON builds up in /tmp/models across the serve stages.
#
#   bench/gpu_run.sh tests      # pytest tests/gpu (needs redis: carry .whl/ with its wheel)
#   bench/gpu_run.sh serve      # 8B-shaped BF16 model; our endpoint at concurrency 1 16 64 128
#   bench/gpu_run.sh plain      # plain vLLM OpenAI server at the same levels (the baseline)
#   bench/gpu_run.sh pair [VARIANT]   # both in one call, at 1 and 64 streams unless
#                               # GPU_CONCURRENCY says otherwise (for a sitting with little
#                               # device time); with a variant: plain vLLM and that variant
#   bench/gpu_run.sh variant ingress|direct-ingress|mode-off|proxy-actor|direct-streaming|
#                            ray-direct-streaming|NAME=KEY=VALUE,...
#                               # one more configuration of ours (Ray env KEY, else a build_app
#                               # arg; import_path=module:builder replaces build_app)
#   bench/gpu_run.sh search [plain layerwise search published]   # a plain job, a layer-by-
#                               # layer one, one whose target forces the full search (default:
#                               # these three), one whose target (+1%) publishes, with vLLM's
#                               # decode speed on its checkpoint
#
# GPU_CONCURRENCY="1 16 64" sets the levels; PROFILE_S=20 also records every serving process
# with py-spy for 20 s at 64 streams after each server's levels (bench/devkit/pyspy.py).
# "ours" runs with the serving defaults (nvfp4_common.serving.RAY_ENV_DEFAULTS: direct
# streaming in throughput-optimized Ray Serve); the variants are our ingress deployment in
# front of the engine (direct streaming off), and with it: direct ingress on, the mode off
# (Ray's defaults), the proxy calling the ingress as Ray actor calls (Ray's default) instead
# of over gRPC; direct streaming spelled out (the default: the engine replica serving vLLM's
# own app behind HAProxy, with our keys and routes: nvfp4_serve.direct), and Ray's own
# builder in that mode (its request router between HAProxy and the replicas, no API keys:
# a measurement, not a way to serve).
# Every level also runs `vllm bench serve` (--vllm-bench) beside our client.
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=${NVFP4_GPU_MODELS:-/tmp/models}
RESULTS=${OUT:-bench/results}
BF16=$MODELS/qwen3-8b-shaped-bf16
SERVE_JSON=$MODELS/gpu_serve-throughput-defaults.json
read -r -a CONCURRENCY <<<"${GPU_CONCURRENCY:-1 16 64 128}"
mkdir -p "$MODELS/vllm-bench" "$RESULTS"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false
export VLLM_USE_FLASHINFER_SAMPLER=0  # flashinfer is not in the offline bundle
test -d /tmp/site || { echo "no /tmp/site: unpack the bundle first (machine cold?)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/services:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/site/bin:$PATH

versions() {
    python3 -c "import json, vllm, ray; from nvfp4_common.serving import RAY_ENV_DEFAULTS
print(json.dumps({'vllm': vllm.__version__, 'ray': ray.__version__,
                  'ray_env_defaults': RAY_ENV_DEFAULTS}))"
}

# gpu_serve.py with this script's settings; the deadline leaves a minute of the call for
# copying results. Ours starts in 190-290 s, plain vLLM in 115-125 s (CUDA graphs, H100/H200).
serve_bench() {
    local rc=0
    python3 bench/gpu_serve.py --model "$BF16" --ray-prefix /tmp/site --log-dir "$MODELS" \
        --concurrency "${CONCURRENCY[@]}" --vllm-bench --vllm-bin /tmp/site/bin/vllm \
        --vllm-bench-min-prompts 16 --vllm-bench-dir "$MODELS/vllm-bench" \
        --deadline-s "${DEADLINE_S:-500}" --out "$SERVE_JSON" \
        ${PROFILE_S:+--profile-s "$PROFILE_S"} "$@" || rc=$?
    cp "$SERVE_JSON" "$RESULTS/" 2>/dev/null || true
    versions >"$RESULTS/gpu_run-versions.json" || true
    return "$rc"
}

# The 8B-shaped BF16 model, made once per machine.
bf16_model() {
    test -f "$BF16/config.json" || python3 bench/gpu_model.py --out "$BF16" \
        --json "$RESULTS/gpu_model.json" 2>&1 | { grep -v "Writing model shards" || true; }
}

# A serving run from scratch: the card, the model, no earlier rows.
new_serve_run() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    bf16_model
    rm -f "$SERVE_JSON"
}

# A named variant's gpu_serve.py --variant spec (NAME=KEY=VALUE,... passes through).
INGRESS="RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=0,RAY_SERVE_ENABLE_HA_PROXY=0"
variant_spec() {
    case "$1" in
    ingress) echo "ingress=$INGRESS" ;;
    direct-ingress) echo "direct-ingress=$INGRESS,RAY_SERVE_ENABLE_DIRECT_INGRESS=1" ;;
    mode-off) echo "mode-off=$INGRESS,RAY_SERVE_THROUGHPUT_OPTIMIZED=0" ;;
    proxy-actor) echo "proxy-actor=$INGRESS,RAY_SERVE_PROXY_USE_GRPC=0" ;;
    # The engine replica as the ingress, behind HAProxy: ours (nvfp4_serve.direct), and
    # Ray's own builder, with its request router and without our keys and routes
    # (bench/devkit/direct_streaming.py).
    direct-streaming)
        echo "direct-streaming=RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1,RAY_SERVE_ENABLE_HA_PROXY=1" ;;
    ray-direct-streaming)
        local env="RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1,RAY_SERVE_ENABLE_HA_PROXY=1"
        echo "ray-direct-streaming=$env,import_path=devkit.direct_streaming:build_app" ;;
    *=*) echo "$1" ;;
    *) echo "variant: ingress, direct-ingress, mode-off, proxy-actor, direct-streaming," \
            "ray-direct-streaming or NAME=KEY=VALUE,..." >&2
       exit 2 ;;
    esac
}

case "${1:-}" in
tests)
    if ! python3 -c "import redis" 2>/dev/null; then
        # tests/conftest.py imports the Redis client; the image has none.
        ls .whl/redis-*.whl >/dev/null 2>&1 || { echo "no .whl/redis-*.whl: carry .whl"; exit 1; }
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target /tmp/site .whl/redis-*.whl
    fi
    versions | tee "$RESULTS/gpu_run-versions.json"
    timeout "${TESTS_TIMEOUT_S:-540}" python3 -m pytest tests/gpu -q -x -p no:cacheprovider \
        -rs --durations=10 --junitxml="$RESULTS/gpu-tests.xml" "${@:2}"
    ;;
serve)
    new_serve_run
    serve_bench --skip-plain
    ;;
pair)
    # With a variant name: plain vLLM and that variant instead of ours.
    spec=()
    if [ -n "${2:-}" ]; then
        name=$(variant_spec "$2")
        spec=(--skip-ours --variant "$name")
    fi
    new_serve_run
    [ -n "${GPU_CONCURRENCY:-}" ] || CONCURRENCY=(1 64)
    DEADLINE_S=${DEADLINE_S:-540} serve_bench "${spec[@]}"
    ;;
plain)
    test -f "$SERVE_JSON" || { echo "run 'serve' first on this machine"; exit 1; }
    serve_bench --append --skip-ours
    ;;
search)
    # The search's worst case: a KL target no candidate keeps runs every recipe of the
    # ladder, the sensitivity of every layer and the whole bisection, then fails.
    bf16_model
    test -f "$MODELS/calib.txt" || PYTHONPATH=$PWD/bench:$PYTHONPATH python3 -c \
        "from pathlib import Path; from devkit.text import write_text_file
write_text_file(Path('$MODELS/calib.txt'), max_chars=2_000_000)"
    runs=("${@:2}")
    [ ${#runs[@]} -gt 0 ] || runs=(plain layerwise search)
    for run in "${runs[@]}"; do
        extra=()
        [ "$run" = search ] && extra=(--max-kl 1e-9)
        # A target the search can meet: its published checkpoint, with vLLM's speed on it.
        [ "$run" = published ] && extra=(--max-ppl-increase 1 --served-speed)
        [ "$run" = layerwise ] && extra=(--layerwise)
        python3 bench/gpu_quantize.py --model "$BF16" --calib "$MODELS/calib.txt" \
            --models-dir "$MODELS/published" --samples 64 --seq-len 1024 --eval-samples 8 \
            --deadline-s "${DEADLINE_S:-240}" --out "$RESULTS/gpu_quantize-$run.json" \
            "${extra[@]}"
    done
    ;;
variant)
    test -f "$SERVE_JSON" || { echo "run 'serve' and 'plain' first on this machine"; exit 1; }
    name=$(variant_spec "${2:-}")
    serve_bench --append --skip-ours --skip-plain --variant "$name"
    ;;
*)
    sed -n '/^set -euo/q;2,$p' "$0"  # this header
    exit 2
    ;;
esac
