"""The Ray Serve test cluster now lives in bench/devkit/serve_cluster.py (the benchmarks
start it too). This name is the same module object, so a test that patches
`serve_harness.SERVE_VENV` changes what `ServeCluster` runs."""

import sys

from devkit import serve_cluster

sys.modules[__name__] = serve_cluster
