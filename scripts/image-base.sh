#!/usr/bin/env bash
# Make the local Debian base of the images where no registry is reachable: a bookworm
# root filesystem with Python 3.11 (debootstrap, cached as a tar), imported into podman.
# Prints the base's tag on stdout (progress goes to stderr). Used by
# scripts/build-admin-image.sh and scripts/build-images.sh; the Dockerfiles take it as
# their base-image build argument.
#
# Needs (Debian): podman debootstrap. Run as root (debootstrap and rootful podman).
#
# Environment:
#   NVFP4_IMAGE_CACHE  where the debootstrap tar is cached (default .data/image-base)
#   DEBIAN_MIRROR      Debian mirror for debootstrap (default http://deb.debian.org/debian)
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${NVFP4_IMAGE_CACHE:-.data/image-base}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Bumping this name rebuilds the base (e.g. after changing the package list below).
base_tar="$cache/bookworm-minbase-py311-v1.tar"
base_tag=localhost/nvfp4-base:bookworm-py311-v1

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || {
    echo "error: $tool is not installed (apt-get install podman runc debootstrap)" >&2
    exit 1
  }
done

step() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

# Imported already (podman keeps it between runs): nothing to make.
if podman image exists "$base_tag"; then
  echo "$base_tag"
  exit 0
fi

# 1. A Debian bookworm root filesystem with Python 3.11 and venv, made once and cached.
# Made in a private folder and renamed into place: two builds at once cannot clobber it.
if [[ ! -f $base_tar ]]; then
  step "debootstrap bookworm (minbase + python3) into $cache"
  mkdir -p "$cache"
  work=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -20 "$work/debootstrap.log" >&2
    cp "$work/debootstrap.log" "$cache/debootstrap.log"
    echo "error: debootstrap failed; full log in $cache/debootstrap.log" >&2
    exit 1
  }
  # apt lists and caches are not needed in the base and would only grow it.
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" -cf "$work/base.tar" .
  mv "$work/base.tar" "$base_tar"
fi

# 2. Import it as a local image.
step "podman import $base_tar as $base_tag"
podman import --quiet "$base_tar" "$base_tag" >/dev/null
echo "$base_tag"
