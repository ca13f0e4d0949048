"""Layer-by-layer quantization (nvfp4_worker.layerwise) against the whole-model job.

Real ModelOpt on CPU, real vLLM (CPU build, .venv-serve) for the serving check. The
layer-by-layer export must be the whole-model export: the same keys, dtypes and shapes,
every tensor bit-for-bit equal (packed E2M1 weights, FP8 block scales, the FP32
weight_scale_2 and input_scale: no tolerance is needed, both paths run the same CPU
kernels on the same activations), and equal hf_quant_config.json, config.json and
generation_config.json.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from devkit.serve_cluster import SERVE_PYTHON, serve_env_available
from nvfp4_common.jobs import JobSpec, QuantFormat, Stage
from nvfp4_common.settings import Settings
from nvfp4_worker import calibration, cpu_ops, layerwise, pipeline, quantize, sources
from nvfp4_worker.errors import JobError
from nvfp4_worker.reporter import PrintReporter
from tests.fixtures import models, text


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    src = tmp_path_factory.mktemp("layerwise")
    tiny = models.make_tiny_qwen3(src / "tiny-qwen3")
    calib = text.write_text_file(src / "plays.txt", 120_000)
    return {"src": src, "tiny": tiny, "calib": calib}


def make_settings(workspace: dict[str, Path], models_dir: Path) -> Settings:
    models_dir.mkdir(exist_ok=True)
    return Settings(
        models_dir=models_dir,
        model_roots=[workspace["src"], models.SMOLLM2_CACHE.parent],
        hf_offline=True,
        device="cpu",
        min_free_disk_gb=0.01,
        _env_file=None,
    )


def spec(model: Path, calib: Path, name: str, **overrides: object) -> JobSpec:
    values: dict[str, object] = {
        "model": str(model),
        "calib_dataset": str(calib),
        "calib_samples": 8,
        "calib_seq_len": 128,
        "eval_samples": 0,
        "output_name": name,
    }
    values.update(overrides)
    return JobSpec(**values)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                out[key] = handle.get_tensor(key)
    return out


def assert_same_checkpoint(whole: Path, layered: Path) -> int:
    a, b = read_tensors(whole), read_tensors(layered)
    assert sorted(a) == sorted(b)
    for key, x in a.items():
        y = b[key]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), key
        # Bit-for-bit: FP8/uint8 compared as bytes, so NaN patterns count too.
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), key
    for name in ("hf_quant_config.json", "config.json", "generation_config.json"):
        assert json.loads((whole / name).read_text()) == json.loads((layered / name).read_text())
    return len(a)


def quantize_both(
    workspace: dict[str, Path],
    tmp_path: Path,
    model: Path,
    fmt: QuantFormat = QuantFormat.NVFP4,
    **fields: Any,
) -> tuple[Path, Path]:
    settings = make_settings(workspace, tmp_path / "models")
    whole = pipeline.run(
        spec(model, workspace["calib"], "whole", format=fmt, **fields),
        settings,
        PrintReporter(),
        "j-w",
    )
    layered = pipeline.run(
        spec(model, workspace["calib"], "layered", format=fmt, layerwise=True, **fields),
        settings,
        PrintReporter(),
        "j-l",
    )
    return Path(whole.output_path), Path(layered.output_path)


@pytest.mark.parametrize("fmt", [QuantFormat.NVFP4, QuantFormat.NVFP4_FP8_KV])
def test_tiny_layerwise_export_equals_whole_model(
    workspace: dict[str, Path], tmp_path: Path, fmt: QuantFormat
) -> None:
    whole, layered = quantize_both(workspace, tmp_path, workspace["tiny"], fmt)
    n = assert_same_checkpoint(whole, layered)
    assert n > 0
    report = json.loads((layered / "report.json").read_text())
    assert report["mode"] == "layerwise"
    assert report["layerwise"]["layers"] == 2
    assert (layered / "model.safetensors.index.json").exists()
    assert not list(layered.rglob(".spill"))
    if fmt is QuantFormat.NVFP4_FP8_KV:
        assert "model.layers.0.self_attn.k_proj.k_scale" in read_tensors(layered)


def test_four_over_six_layer_by_layer_equals_whole_model(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    """The other recipe of the search ladder: its weight MSE reads only the layer's own
    weights, so calibrating one layer alone writes the whole model's checkpoint."""
    whole, layered = quantize_both(workspace, tmp_path, workspace["tiny"], recipe="nvfp4-4over6")
    assert assert_same_checkpoint(whole, layered) > 0
    report = json.loads((layered / "report.json").read_text())
    assert (report["mode"], report["recipe"]) == ("layerwise", "nvfp4-4over6")
    # Not the default recipe's checkpoint under another name: its block scales differ.
    default = pipeline.run(
        spec(workspace["tiny"], workspace["calib"], "default"),
        make_settings(workspace, tmp_path / "models"),
        PrintReporter(),
        "j-d",
    )
    ours, theirs = read_tensors(layered), read_tensors(Path(default.output_path))
    scales = [k for k in ours if k.endswith(".weight_scale")]
    assert scales and any(not torch.equal(ours[k], theirs[k]) for k in scales)


def test_spilled_activations_give_the_same_checkpoint(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    whole, _ = quantize_both(workspace, tmp_path, workspace["tiny"])
    out = tmp_path / "spilled"
    out.mkdir()
    seen: list[list[str]] = []

    def on_layer(done: int, total: int) -> None:
        seen.append(sorted(p.name for p in (out / ".spill").iterdir()))

    run_direct(workspace, out, activation_budget=0, on_layer=on_layer)
    # Between layers only the next layer's inputs are on disk: one file per batch.
    assert seen and all(len(names) == 1 for names in seen), seen
    assert not (out / ".spill").exists()
    assert_same_checkpoint(whole, out)


def run_direct(
    workspace: dict[str, Path],
    out: Path,
    activation_budget: int | None = None,
    on_layer: Callable[[int, int], None] | None = None,
) -> None:
    """The layer-by-layer run alone (no job around it) into `out`."""
    from transformers import AutoTokenizer

    cpu_ops.install()
    model = workspace["tiny"]
    settings = make_settings(workspace, out.parent / "models-direct")
    calib = sources.resolve_calibration(str(workspace["calib"]), settings)
    windows = calibration.build_windows(AutoTokenizer.from_pretrained(model), calib, 8, 0, 128)
    run = layerwise.LayerwiseRun(
        model,
        str(model),
        quantize.build_config(QuantFormat.NVFP4, []),
        out,
        device=torch.device("cpu"),
        dtype=torch.float32,
        calib_shape=(8, 128),
        held_out_shape=None,
        activation_budget=activation_budget,
    )
    run.calibrate(calibration.batches(windows.calib, 128), on_layer=on_layer)
    run.finish()


@pytest.mark.slow
def test_smollm2_tied_embeddings_layerwise_equals_whole_model(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    whole, layered = quantize_both(workspace, tmp_path, models.make_smollm2())
    assert_same_checkpoint(whole, layered)
    assert "lm_head.weight" not in read_tensors(layered)  # tied: stored once


_VLLM = """
import json, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256, dtype="bfloat16")
params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
res = llm.generate(["The history of the sea is"], params)
quantization = llm.llm_engine.vllm_config.model_config.quantization
print("RESULT " + json.dumps({"tokens": len(res[0].outputs[0].token_ids),
                              "quantization": quantization}))
"""


@pytest.mark.skipif(not serve_env_available(), reason="needs .venv-serve (make install-serve)")
def test_vllm_serves_the_layerwise_export(workspace: dict[str, Path], tmp_path: Path) -> None:
    settings = make_settings(workspace, tmp_path / "models")
    result = pipeline.run(
        spec(workspace["tiny"], workspace["calib"], "served", layerwise=True),
        settings,
        PrintReporter(),
        "j-served",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVFP4_")}
    out = subprocess.run(
        [str(SERVE_PYTHON), "-c", _VLLM, result.output_path],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line[7:])
    assert got["tokens"] == 8
    assert got["quantization"] == "modelopt_fp4"


# -- bad input ---------------------------------------------------------------------------


def sharded_copy(model: Path, dest: Path) -> Path:
    """The tiny model with one shard per decoder layer and an index, as big models ship."""
    shutil.copytree(model, dest)
    tensors = read_tensors(model)
    (dest / "model.safetensors").unlink()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        part = key.split(".")[2] if key.startswith("model.layers.") else "head"
        groups.setdefault(part, {})[key] = tensor
    weight_map = {}
    for n, (part, group) in enumerate(sorted(groups.items()), start=1):
        name = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(dest / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
        if part == "1":
            (dest / "layer1-shard").write_text(name)
    (dest / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dest


def assert_failed_cleanly(settings: Settings) -> None:
    assert list(settings.models_dir.iterdir()) == []  # no output, no staging, no spill


def test_missing_shard_mid_model_fails_in_one_line(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    model = sharded_copy(workspace["tiny"], workspace["src"] / "sharded-missing")
    (model / (model / "layer1-shard").read_text()).unlink()
    settings = make_settings(workspace, tmp_path / "models")
    with pytest.raises(JobError) as err:
        pipeline.run(
            spec(model, workspace["calib"], "x", layerwise=True), settings, PrintReporter(), "j-m"
        )
    message = str(err.value)
    assert "\n" not in message
    assert "shard" in message and "missing" in message, message
    assert_failed_cleanly(settings)


def test_layer_that_does_not_match_the_config_fails_in_one_line(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    model = sharded_copy(workspace["tiny"], workspace["src"] / "sharded-bad-shape")
    shard = model / (model / "layer1-shard").read_text()
    tensors = read_tensors(model)
    group = {k: v for k, v in tensors.items() if k.startswith("model.layers.1.")}
    key = "model.layers.1.mlp.up_proj.weight"
    group[key] = group[key][:-16].clone()
    save_file(group, str(shard), metadata={"format": "pt"})
    settings = make_settings(workspace, tmp_path / "models")
    with pytest.raises(JobError) as err:
        pipeline.run(
            spec(model, workspace["calib"], "x", layerwise=True), settings, PrintReporter(), "j-s"
        )
    message = str(err.value)
    assert "\n" not in message and key in message and "config.json" in message, message
    assert_failed_cleanly(settings)


class _Cancelled(Exception):
    pass


class CancelAfterFirstLayer(PrintReporter):
    def progress(self, stage: Stage, fraction: float = 0.0, message: str = "") -> None:
        if "layer 1/" in message:
            raise _Cancelled  # as RedisReporter does for a cancelled job
        super().progress(stage, fraction, message)


def test_cancel_between_layers_leaves_nothing(workspace: dict[str, Path], tmp_path: Path) -> None:
    settings = make_settings(workspace, tmp_path / "models")
    with pytest.raises(_Cancelled):
        pipeline.run(
            spec(workspace["tiny"], workspace["calib"], "x", layerwise=True),
            settings,
            CancelAfterFirstLayer(),
            "j-c",
        )
    assert_failed_cleanly(settings)


def test_disk_full_while_spilling_fails_in_one_line(
    workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    def full(tensors: object, filename: str, metadata: object = None) -> None:
        if "/.spill/" in filename:
            raise OSError(errno.ENOSPC, "No space left on device")
        raise AssertionError("only spill files are written before the first layer")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(JobError) as err:
        run_direct(workspace, out, activation_budget=0)
    message = str(err.value)
    assert "\n" not in message and "filled up" in message, message


def test_auto_selected_when_the_whole_model_does_not_fit(
    workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nvfp4_worker import memory

    # A 2.5 GiB limit: the whole-model rule's fixed 2 GiB runtime plus the tiny model fit,
    # so the "model" is made to need more by a larger compute estimate.
    real = memory.estimate

    def big(*args: object, **kw: object) -> object:
        need = real(*args, **kw)  # type: ignore[arg-type]
        return type(need)(need.rule, 64 * 2**30, need.working, need.runtime, need.compute_dtype)

    monkeypatch.setattr(memory, "estimate", big)
    monkeypatch.setattr(memory, "room", lambda **_: memory.Room(8 * 2**30, None))
    settings = make_settings(workspace, tmp_path / "models")
    logs: list[str] = []

    class Log(PrintReporter):
        def log(self, message: str) -> None:
            logs.append(message)

    result = pipeline.run(
        spec(workspace["tiny"], workspace["calib"], "auto"), settings, Log(), "j-a"
    )
    report = json.loads((Path(result.output_path) / "report.json").read_text())
    assert report["mode"] == "layerwise"
    assert any("quantizing layer by layer" in line for line in logs), logs


def test_quality_search_layer_by_layer_matches_the_whole_model(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    """A quality target in layer-by-layer mode: the held-out perplexity and KL measured
    layer by layer are the whole model's, the search keeps the same layer in FP8, and the
    exported MIXED_PRECISION checkpoint is the whole-model search's, bit for bit. The
    activations are spilled to disk (no memory for them), so that path runs too."""
    settings = make_settings(workspace, tmp_path / "models")
    plain = pipeline.run(
        spec(workspace["tiny"], workspace["calib"], "lw-plain", eval_samples=4, layerwise=True),
        settings,
        PrintReporter(),
        "j-p",
    )
    first = json.loads((Path(plain.output_path) / "report.json").read_text())["evaluation"]
    assert first["perplexity_base"] and first["kl"] and first["kl"] > 0
    # A KL target the every-layer candidate misses: the search must keep layers.
    target = {"max_kl": first["kl"] * 0.6}
    whole = pipeline.run(
        spec(workspace["tiny"], workspace["calib"], "whole", eval_samples=4, target=target),
        settings,
        PrintReporter(),
        "j-w",
    )
    logs: list[str] = []

    class Log(PrintReporter):
        def log(self, message: str) -> None:
            logs.append(message)

    plan = pipeline._plan

    def spilling(*args: object, **kw: object) -> object:
        planned = plan(*args, **kw)  # type: ignore[arg-type]
        planned.activation_budget = 0
        return planned

    import unittest.mock

    with unittest.mock.patch.object(pipeline, "_plan", spilling):
        layered = pipeline.run(
            spec(
                workspace["tiny"],
                workspace["calib"],
                "layered",
                eval_samples=4,
                target=target,
                layerwise=True,
            ),
            settings,
            Log(),
            "j-l",
        )
    w = json.loads((Path(whole.output_path) / "report.json").read_text())
    lw = json.loads((Path(layered.output_path) / "report.json").read_text())
    assert lw["mode"] == "layerwise" and lw["layerwise"]["activations_spilled"] is True
    assert lw["evaluation"]["perplexity_base"] == pytest.approx(
        w["evaluation"]["perplexity_base"], rel=1e-5
    )
    assert lw["search"]["candidates"][0]["kl"] == pytest.approx(first["kl"], rel=1e-6)
    # Both modes calibrate the same recipes with every layer quantized, to the same KL,
    # and keep layers of the same (closest) one.
    ladder = [(c["recipe"], c["kl"]) for c in w["search"]["candidates"] if not c["kept"]]
    lw_ladder = [(c["recipe"], c["kl"]) for c in lw["search"]["candidates"] if not c["kept"]]
    assert [r for r, _ in lw_ladder] == [r for r, _ in ladder] == ["nvfp4", "nvfp4-4over6"]
    assert [k for _, k in lw_ladder] == pytest.approx([k for _, k in ladder], rel=1e-4)
    assert lw["recipe"] == w["recipe"]
    assert lw["kept_layers"] and lw["kept_as"] == "fp8"
    assert (lw["kept_layers"], lw["kept_as"]) == (w["kept_layers"], w["kept_as"])
    assert lw["evaluation"]["kl"] == pytest.approx(w["evaluation"]["kl"], rel=1e-4)
    assert lw["evaluation"]["kl"] <= target["max_kl"]
    assert len(lw["search"]["sensitivity"]) == 2
    assert any(line.startswith("candidate: ") for line in logs), logs
    assert_same_checkpoint(Path(whole.output_path), Path(layered.output_path))
    quant = json.loads((Path(layered.output_path) / "hf_quant_config.json").read_text())
    assert quant["quantization"]["quant_algo"] == "MIXED_PRECISION"
    assert not list(Path(layered.output_path).rglob(".spill"))
    card = (Path(layered.output_path) / "README.md").read_text()
    assert "Kept in FP8" in card and "measured layer by layer" in card


def test_quality_search_layer_by_layer_that_cannot_meet_its_target_leaves_nothing(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    settings = make_settings(workspace, tmp_path / "models")
    job = spec(
        workspace["tiny"],
        workspace["calib"],
        "never",
        eval_samples=4,
        target={"max_kl": 1e-12},
        layerwise=True,
    )
    with pytest.raises(JobError) as err:
        pipeline.run(job, settings, PrintReporter(), "j-n")
    message = str(err.value)
    assert "\n" not in message and message.startswith("no candidate keeps the target"), message
    # every layer quantized, then the FP8 and the BF16 bisections of 2 layers
    assert "tried" in message
    assert_failed_cleanly(settings)


def test_size_only_target_layer_by_layer_without_held_out_text(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    """Nothing to measure: the every-layer candidate is judged on its size alone."""
    settings = make_settings(workspace, tmp_path / "models")
    small = {"max_size_gb": 1.0}
    job = spec(workspace["tiny"], workspace["calib"], "small", target=small, layerwise=True)
    result = pipeline.run(job, settings, PrintReporter(), "j-s")
    report = json.loads((Path(result.output_path) / "report.json").read_text())
    assert report["mode"] == "layerwise" and report["kept_layers"] == []
    assert report["search"]["candidates"][0]["meets"] is True
    assert report["evaluation"]["perplexity_quant"] is None
    tiny = {"max_size_gb": 1e-6}
    job = spec(workspace["tiny"], workspace["calib"], "tiny", target=tiny, layerwise=True)
    with pytest.raises(JobError, match="no candidate keeps the target"):
        pipeline.run(job, settings, PrintReporter(), "j-t")


def test_moe_layerwise_equals_whole_model(workspace: dict[str, Path], tmp_path: Path) -> None:
    """A tiny Qwen3-MoE: its checkpoint stores each expert apart, transformers fuses them
    into one 3-D tensor per projection when it loads a model, and ModelOpt's export writes
    them apart again. Layer by layer, the same conversion is applied to one layer's
    tensors (nvfp4_worker.conversion): the checkpoint and the held-out figures are the
    whole-model job's, and hf_quant_config.json excludes only the routers, as there."""
    moe = models.make_tiny_qwen3(workspace["src"] / "tiny-moe", experts=4)
    settings = make_settings(workspace, tmp_path / "models")
    calib = workspace["calib"]
    whole = pipeline.run(spec(moe, calib, "whole", eval_samples=2), settings, PrintReporter(), "w")
    layered = pipeline.run(
        spec(moe, calib, "layered", eval_samples=2, layerwise=True), settings, PrintReporter(), "l"
    )
    w, lw = Path(whole.output_path), Path(layered.output_path)
    assert_same_checkpoint(w, lw)
    tensors = read_tensors(lw)
    assert "model.layers.0.mlp.experts.3.gate_proj.weight_scale" in tensors
    excluded = json.loads((lw / "hf_quant_config.json").read_text())["quantization"]
    assert sorted(excluded["exclude_modules"]) == [
        "lm_head",
        "model.embed_tokens",
        "model.layers.0.mlp.gate",
        "model.layers.1.mlp.gate",
    ]
    ev_w = json.loads((w / "report.json").read_text())["evaluation"]
    ev_l = json.loads((lw / "report.json").read_text())["evaluation"]
    assert ev_l["perplexity_base"] == pytest.approx(ev_w["perplexity_base"], rel=1e-5)
    assert ev_l["kl"] == pytest.approx(ev_w["kl"], rel=1e-3)


def test_moe_quality_search_keeps_experts_and_matches_the_whole_model(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    """A KL target on the tiny Qwen3-MoE: both searches keep the same layers in FP8,
    experts included (ModelOpt's fused-experts quantizers, not only the attention), and
    write the same MIXED_PRECISION checkpoint."""
    moe = models.make_tiny_qwen3(workspace["src"] / "tiny-moe-search", experts=4)
    settings = make_settings(workspace, tmp_path / "models")
    calib = workspace["calib"]
    plain = pipeline.run(
        spec(moe, calib, "plain", eval_samples=4, layerwise=True), settings, PrintReporter(), "p"
    )
    kl = json.loads((Path(plain.output_path) / "report.json").read_text())["evaluation"]["kl"]
    job = {"eval_samples": 4, "recipe": "nvfp4", "target": {"max_kl": kl * 0.6}}
    whole = pipeline.run(spec(moe, calib, "whole", **job), settings, PrintReporter(), "w")
    layered = pipeline.run(
        spec(moe, calib, "layered", layerwise=True, **job), settings, PrintReporter(), "l"
    )
    w, lw = Path(whole.output_path), Path(layered.output_path)
    w_rep, lw_rep = (json.loads((p / "report.json").read_text()) for p in (w, lw))
    assert lw_rep["kept_layers"] and lw_rep["kept_as"] == "fp8"
    assert (lw_rep["kept_layers"], lw_rep["kept_as"]) == (w_rep["kept_layers"], w_rep["kept_as"])
    assert_same_checkpoint(w, lw)
    layers = json.loads((lw / "hf_quant_config.json").read_text())["quantization"]
    algo = {k: v["quant_algo"] for k, v in layers["quantized_layers"].items()}
    for kept in lw_rep["kept_layers"]:
        assert algo[f"{kept}.mlp.experts"] == "FP8"
        assert read_tensors(lw)[f"{kept}.mlp.experts.0.down_proj.weight"].dtype == (
            torch.float8_e4m3fn
        )
