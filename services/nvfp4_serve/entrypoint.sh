#!/usr/bin/env bash
# Entry point of the serve image: a one-node Ray cluster with Ray Serve, and the model
# application deployed from the NVFP4_SERVE_* settings.
#
# The application is deployed declaratively (`serve deploy`, Ray's REST API), never with
# `serve run`: `nvfp4ctl serve deploy/rollback` replace applications over the same API,
# which refuses to touch applications started from Python.
#
# Environment (besides NVFP4_*): RAY_GCS_PORT (6380; Redis owns 6379 by habit),
# RAY_METRICS_PORT (8080, Prometheus scrapes it), RAY_START_ARGS (extra `ray start` flags).
set -euo pipefail

gcs_port=${RAY_GCS_PORT:-6380}
dashboard=http://127.0.0.1:8265

# Ray's object store is shared memory: LLM serving moves little data through it, and on a
# DGX Spark every GiB it takes is a GiB less for the GPU (unified memory). 2 GiB fits the
# container's shm_size.
# shellcheck disable=SC2086  # RAY_START_ARGS is a list of flags on purpose
ray start --head --port="$gcs_port" \
  --dashboard-host=0.0.0.0 --dashboard-port=8265 \
  --metrics-export-port="${RAY_METRICS_PORT:-8080}" \
  --object-store-memory="${RAY_OBJECT_STORE_BYTES:-2147483648}" \
  --disable-usage-stats ${RAY_START_ARGS:-}

# shellcheck disable=SC2329  # invoked by the trap below
stop() {
  echo "stopping Ray Serve and Ray"
  serve shutdown --address "$dashboard" -y || true
  ray stop || true
  exit 0
}
trap stop TERM INT

if [[ -n ${NVFP4_SERVE_MODEL:-} ]]; then
  # args {}: build_app reads every NVFP4_SERVE_* setting from the replica's environment,
  # which Ray's worker processes inherit from this one.
  config=$(mktemp --suffix=.yaml)
  cat >"$config" <<EOF
proxy_location: HeadOnly
http_options:
  host: 0.0.0.0
  port: 8000
applications:
  - name: ${NVFP4_SERVE_APP_NAME:-nvfp4}
    route_prefix: /
    import_path: nvfp4_serve.app:build_app
    args: {}
EOF
  serve deploy --address "$dashboard" "$config"
else
  # No model yet: Serve runs without an application until `nvfp4ctl serve deploy`.
  echo "NVFP4_SERVE_MODEL is not set: Ray Serve is up with no application;" \
    "deploy one with 'nvfp4ctl serve deploy' (or set NVFP4_SERVE_MODEL and restart)"
  serve start --address "127.0.0.1:$gcs_port" --http-host 0.0.0.0 --http-port 8000
fi

# Stay in the foreground while Ray is alive; if its head dies, exit so Docker restarts us.
while ray health-check --address "127.0.0.1:$gcs_port" >/dev/null 2>&1; do
  sleep 15 &
  wait $! || true
done
echo "error: the Ray head stopped answering health checks" >&2
exit 1
