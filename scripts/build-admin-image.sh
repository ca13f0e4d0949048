#!/usr/bin/env bash
# Build the admin image with podman from a local Debian base, then run `nvfp4ctl --help`
# in it. Needs no container registry: the base is made with debootstrap and imported, and
# only PyPI is contacted during the build. Used by `make image-test` and tests/deploy.
#
# Needs (Debian): podman runc debootstrap. Run as root (debootstrap and rootful podman).
#
# Environment:
#   NVFP4_IMAGE_CACHE  where the debootstrap base is cached (default .data/image-base;
#                      see scripts/image-base.sh, which also reads DEBIAN_MIRROR)
#   NVFP4_IMAGE_TAG    tag of the built admin image (default localhost/nvfp4-admin:test)
#   NVFP4_IMAGE_RECORD where to write what was built: revision, image id, size, base, build
#                      seconds, the first lines of `nvfp4ctl --help` (default
#                      bench/results/admin-image.json; empty: no record)
#   PIP_CA_BUNDLE      CA bundle pip inside the build trusts, for TLS-intercepting proxies
#                      (default: the host's /etc/ssl/certs/ca-certificates.crt). It is passed
#                      as a build secret, so it never lands in an image layer.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${NVFP4_IMAGE_TAG:-localhost/nvfp4-admin:test}
record=${NVFP4_IMAGE_RECORD-bench/results/admin-image.json}
ca_bundle=${PIP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || {
    echo "error: $tool is not installed (apt-get install podman runc debootstrap)" >&2
    exit 1
  }
done

step() { printf '[%s] %s\n' "$(date +%T)" "$*"; }

# 1-2. The local Debian base (debootstrap, cached; scripts/image-base.sh).
base_cached=false
if podman image exists localhost/nvfp4-base:bookworm-py311-v1; then base_cached=true; fi
base_start=$SECONDS
base_tag=$(scripts/image-base.sh)
base_seconds=$((SECONDS - base_start))

# 3. Build the admin image from the repository, with the local base instead of python:3.11-slim.
secret=()
if [[ -f $ca_bundle ]]; then
  secret=(--secret "id=pip_ca,src=$ca_bundle")
fi
step "podman build $tag"
build_start=$SECONDS
# Explicit ulimits: runc may not raise limits past those this host grants (the defaults
# podman asks for fail with "error setting rlimits ... operation not permitted").
limits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
build_log=$(mktemp)
trap 'rm -f "$build_log"' EXIT
podman build --pull=never --runtime runc "${limits[@]}" --network host \
  --build-arg "BASE_IMAGE=$base_tag" "${secret[@]}" \
  -f services/nvfp4_admin/Dockerfile -t "$tag" . 2>&1 | tee "$build_log"
build_seconds=$((SECONDS - build_start))
# Steps podman reused from an earlier build: a build time means little without it.
cached_steps=$(grep -c 'Using cache' "$build_log" || true)

# 4. The image must start the CLI as its non-root user.
step "podman run $tag --help"
help=$(podman run --rm --runtime runc "${limits[@]}" --network none "$tag" --help)
printf '%s\n' "$help"

# 5. A record of what was built, so a later build can be compared with this one.
if [[ -n $record ]]; then
  step "record in $record"
  # Read-only git: GIT_OPTIONAL_LOCKS=0 keeps `git status` from rewriting the index.
  dirty=false
  if [[ -n $(GIT_OPTIONAL_LOCKS=0 git status --porcelain --untracked-files=no -- \
    pyproject.toml README.md services 2>/dev/null) ]]; then
    dirty=true
  fi
  mkdir -p "$(dirname "$record")"
  REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown) DIRTY=$dirty \
    IMAGE_ID=$(podman image inspect --format '{{.Id}}' "$tag") \
    IMAGE_SIZE=$(podman image inspect --format '{{.Size}}' "$tag") \
    PODMAN_VERSION=$(podman version --format '{{.Client.Version}}') \
    TAG=$tag BASE_TAG=$base_tag BASE_CACHED=$base_cached BASE_SECONDS=$base_seconds \
    BUILD_SECONDS=$build_seconds CACHED_STEPS=$cached_steps HELP=$help \
    python3 - "$record" <<'EOF'
import json, os, platform, sys, time
e = os.environ
record = {
    "revision": e["REVISION"],
    # Sources under services/, pyproject.toml or README.md differed from that revision.
    "uncommitted_changes": e["DIRTY"] == "true",
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "image": e["TAG"],
    "image_id": e["IMAGE_ID"],
    "size_bytes": int(e["IMAGE_SIZE"]),
    "base": e["BASE_TAG"],
    "base_made_by": "debootstrap minbase bookworm + python3, python3-venv, python3-pip, ca-certificates",
    "base_cached": e["BASE_CACHED"] == "true",
    "base_seconds": int(e["BASE_SECONDS"]),
    "build_seconds": int(e["BUILD_SECONDS"]),
    "build_steps_from_cache": int(e["CACHED_STEPS"]),
    "podman": e["PODMAN_VERSION"],
    "arch": platform.machine(),
    "help_head": e["HELP"].splitlines()[:6],
}
with open(sys.argv[1], "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
EOF
fi
step "done"
