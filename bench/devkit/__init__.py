"""Material shared by the benchmarks, the tests and the demo; none of it is product code.

- `text`: offline English text for calibration and evaluation
- `models`: small causal LMs made offline (a tiny random Qwen3, SmolLM2-135M)
- `serve_cluster`: a private Ray cluster serving `nvfp4_serve.app:build_app`
- `redis_server`: a private redis-server on a free port
- `processes`: find and stop the processes that carry a marker variable

It lives beside the bench scripts, so `python bench/x.py` imports it from the script's own
folder; pytest finds it through `pythonpath` in pyproject.toml.
"""
