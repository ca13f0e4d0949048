#!/usr/bin/env bash
# Build the admin image with podman from a local Debian base, then run `nvfp4ctl --help`
# in it. Needs no container registry: the base is made with debootstrap and imported, and
# only PyPI is contacted during the build. Used by `make image-test` and tests/deploy.
#
# Needs (Debian): podman runc debootstrap. Run as root (debootstrap and rootful podman).
#
# Environment:
#   NVFP4_IMAGE_CACHE  where the debootstrap base is cached (default .data/image-base)
#   NVFP4_IMAGE_TAG    tag of the built admin image (default localhost/nvfp4-admin:test)
#   DEBIAN_MIRROR      Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   PIP_CA_BUNDLE      CA bundle pip inside the build trusts, for TLS-intercepting proxies
#                      (default: the host's /etc/ssl/certs/ca-certificates.crt). It is passed
#                      as a build secret, so it never lands in an image layer.
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${NVFP4_IMAGE_CACHE:-.data/image-base}
tag=${NVFP4_IMAGE_TAG:-localhost/nvfp4-admin:test}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ca_bundle=${PIP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# Bumping this name rebuilds the base (e.g. after changing the package list below).
base_tar="$cache/bookworm-minbase-py311-v1.tar"
base_tag=localhost/nvfp4-base:bookworm-py311-v1

for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || {
    echo "error: $tool is not installed (apt-get install podman runc debootstrap)" >&2
    exit 1
  }
done

step() { printf '[%s] %s\n' "$(date +%T)" "$*"; }

# 1. A Debian bookworm root filesystem with Python 3.11 and venv, made once and cached.
if [[ ! -f $base_tar ]]; then
  step "debootstrap bookworm (minbase + python3) into $cache"
  mkdir -p "$cache"
  rootfs="$cache/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
    tail -20 "$cache/debootstrap.log" >&2
    echo "error: debootstrap failed; full log in $cache/debootstrap.log" >&2
    exit 1
  }
  # apt lists and caches are not needed in the base and would only grow it.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -cf "$base_tar.tmp" .
  mv "$base_tar.tmp" "$base_tar"
  rm -rf "$rootfs"
fi

# 2. Import it as a local image (podman keeps it between runs).
if ! podman image exists "$base_tag"; then
  step "podman import $base_tar as $base_tag"
  podman import --quiet "$base_tar" "$base_tag" >/dev/null
fi

# 3. Build the admin image from the repository, with the local base instead of python:3.11-slim.
secret=()
if [[ -f $ca_bundle ]]; then
  secret=(--secret "id=pip_ca,src=$ca_bundle")
fi
step "podman build $tag"
# Explicit ulimits: runc may not raise limits past those this host grants (the defaults
# podman asks for fail with "error setting rlimits ... operation not permitted").
limits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
podman build --pull=never --runtime runc "${limits[@]}" --network host \
  --build-arg "BASE_IMAGE=$base_tag" "${secret[@]}" \
  -f services/nvfp4_admin/Dockerfile -t "$tag" .

# 4. The image must start the CLI as its non-root user.
step "podman run $tag --help"
podman run --rm --runtime runc "${limits[@]}" --network none "$tag" --help
step "done"
