"""The serving app: Ray Serve's LLM API hosting vLLM with NVFP4 checkpoints (OpenAI API).

`nvfp4_serve.app:build_app` is the import path for `serve run`, `serve deploy` and KubeRay.
"""
