"""Layer-by-layer quantization: models larger than the worker's memory.

The whole-model job (pipeline.py) loads every weight before calibrating. Here the model
is built on the meta device from config.json and only one decoder layer at a time is
real: the calibration windows are embedded once, then each layer in turn is read from
the safetensors shards (only its own keys), calibrated and quantized by ModelOpt on its
own, exported through ModelOpt's own per-module export handlers into its own shard file,
and freed. Peak memory is one decoder layer, the calibration activations (kept in memory,
or spilled under the job's staging folder when they do not fit) and the tensors being
written: nvfp4_common.sizing.layerwise_peak.

The checkpoint is the one a whole-model job writes: the same tensor names, dtypes and
values (tests/integration/test_layerwise.py compares them), the same
hf_quant_config.json and config.json quantization_config. What makes that hold:

- ModelOpt's max calibration collects its statistics with quantization off, so the
  whole model's layer N sees the unquantized outputs of layers 0..N-1. Each layer here is
  fed the previous layer's unquantized outputs, computed in the same calibration pass.
- Each layer is quantized inside a `_Scope` whose module names are the full model's
  ("model.layers.7.mlp.down_proj"), so exclusion patterns and ModelOpt's name-based rules
  (q/k/v and gate/up share one global amax) match as they do on the whole model.
- Before export, parameters are cast to BF16 as quantize.export does (the amax buffers
  stay FP32), and ModelOpt's requantize/resmooth of modules that share an input runs on
  the layer (collect_shared_input_modules + _fuse_shared_input_modules).
- hf_quant_config.json comes from ModelOpt's get_quant_config over the whole skeleton,
  whose layers keep their quantizers after their weights are released.

ModelOpt's private export helpers used here were checked against nvidia-modelopt 0.47.0
(its own streaming exporter, unified_export_hf_streaming.py, uses the same ones); they
are all imported in `_modelopt_export`, the one place to look when ModelOpt changes.

Supported: Llama/Qwen/Mistral-style decoders (model.embed_tokens, model.layers.N,
model.norm, lm_head), tied embeddings included, and their MoE variants: an MoE
checkpoint stores each expert's weights apart, which transformers fuses into one tensor
per projection when it loads a model; a layer read here is converted the same way
(conversion.py), and ModelOpt's export writes the experts apart again. With several GPUs
a layer runs on the first one.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from nvfp4_worker import conversion, evaluate
from nvfp4_worker.errors import JobError

INDEX_FILE = "model.safetensors.index.json"
# Tensors the export writes per decoder layer go into one shard each; the embeddings,
# final norm and lm_head into the first.
HEAD_PREFIXES = ("model.embed_tokens.", "model.norm.", "lm_head.")
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"


def _modelopt_export() -> Any:
    """ModelOpt 0.47's private per-module export helpers, in one namespace."""
    from types import SimpleNamespace

    from modelopt.torch.export.quant_utils import (
        _postprocess_single_tensor,
        fuse_prequant_to_linear,
        get_quant_config,
        get_quantization_format,
    )
    from modelopt.torch.export.registry import ExportContext
    from modelopt.torch.export.unified_export_hf import (
        _dispatch_export_handler,
        _fuse_shared_input_modules,
        _sanitize_generation_config_for_save,
        _write_hf_export_config,
        collect_shared_input_modules,
    )

    return SimpleNamespace(
        postprocess_tensor=_postprocess_single_tensor,
        fuse_prequant_to_linear=fuse_prequant_to_linear,
        get_quant_config=get_quant_config,
        get_quantization_format=get_quantization_format,
        ExportContext=ExportContext,
        dispatch=_dispatch_export_handler,
        fuse_shared=_fuse_shared_input_modules,
        sanitize_generation_config=_sanitize_generation_config_for_save,
        write_export_config=_write_hf_export_config,
        collect_shared=collect_shared_input_modules,
    )


# -- the source's tensors ----------------------------------------------------------------


class SourceTensors:
    """Which shard holds which tensor (the index json, else every shard's header), and
    reading a chosen few of them, named and shaped as the model has them (`names`: an
    MoE layer's experts, stored one by one, are one tensor per projection there)."""

    def __init__(self, folder: Path, model: str, names: conversion.Names) -> None:
        from safetensors import safe_open

        self.folder, self.model, self.names = folder, model, names
        self.file_of: dict[str, str] = {}  # the checkpoint's names
        stored: dict[str, list[int]] = {}
        index = folder / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise JobError(f"model {model}: {INDEX_FILE} cannot be read ({exc})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise JobError(f"model {model} has no safetensors weights")
        for name in files:
            path = folder / name
            if not path.exists():
                raise JobError(f"model {model}: weights shard {name} is missing")
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                        self.file_of[key] = name
                        stored[key] = list(handle.get_slice(key).get_shape())
            except Exception as exc:  # safetensors raises its own error type
                raise JobError(
                    f"model {model}: weights shard {name} cannot be read: {exc}"
                ) from None
        # The model's names: each with the checkpoint tensors it is made of, and its shape.
        self.parts: dict[str, list[str]] = {}
        for key in stored:
            self.parts.setdefault(names.target(key), []).append(key)
        self.shapes = names.shapes(stored)

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.shapes if k.startswith(prefix)]

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The model's tensors `keys`, read from the shards and converted."""
        stored = self._read([part for key in keys for part in self.parts[key]])
        converted = self.names.convert(stored)
        return {key: converted[key] for key in keys}

    def _read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.file_of[key], []).append(key)
        for name, names in by_file.items():
            try:
                with safe_open(str(self.folder / name), framework="pt") as handle:
                    for key in names:
                        out[key] = handle.get_tensor(key)
            except FileNotFoundError:
                raise JobError(f"model {self.model}: weights shard {name} is missing") from None
            except Exception as exc:
                raise JobError(
                    f"model {self.model}: weights shard {name} cannot be read: {exc}"
                ) from None
        return out


# -- calibration activations -------------------------------------------------------------


class Activations:
    """One hidden-state tensor per calibration batch, in host memory or spilled to files
    under `spill_dir` (one file per batch, read back one at a time)."""

    def __init__(self, spill_dir: Path | None, generation: int | str = 0) -> None:
        self.spill_dir, self.generation = spill_dir, generation
        self._held: list[torch.Tensor] = []
        self._files: list[Path] = []

    def __len__(self) -> int:
        return len(self._files) if self.spill_dir is not None else len(self._held)

    def append(self, hidden: torch.Tensor) -> None:
        hidden = hidden.detach().to("cpu")
        if self.spill_dir is None:
            self._held.append(hidden)
            return
        from safetensors.torch import save_file

        path = self.spill_dir / f"h{self.generation}-{len(self._files):05d}.safetensors"
        try:
            save_file({"h": hidden.contiguous()}, str(path))
        except OSError as exc:
            path.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise JobError(
                    f"the disk under {self.spill_dir.parent.parent} filled up with spilled"
                    " calibration activations; free space or lower calib_samples/calib_seq_len"
                ) from None
            raise
        self._files.append(path)

    def __getitem__(self, k: int) -> torch.Tensor:
        if self.spill_dir is None:
            return self._held[k]
        from safetensors.torch import load_file

        return load_file(str(self._files[k]))["h"]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for k in range(len(self)):
            yield self[k]

    def free(self) -> None:
        self._held.clear()
        for path in self._files:
            path.unlink(missing_ok=True)
        self._files.clear()


# -- one layer ---------------------------------------------------------------------------


class _Scope(torch.nn.Module):
    """Holds modules under the names they have in the whole model, so ModelOpt's
    name patterns match: _Scope({"model.layers.3": layer}) names its q_proj
    "model.layers.3.self_attn.q_proj"."""

    def __init__(self, modules: dict[str, torch.nn.Module], config: Any) -> None:
        super().__init__()
        self.config = config  # read by ModelOpt's use_cache guard
        for path, module in modules.items():
            parent: torch.nn.Module = self
            *parents, leaf = path.split(".")
            for part in parents:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, module)


def _materialize(
    module: torch.nn.Module,
    prefix: str,
    source: SourceTensors,
    device: torch.device,
    what: str,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Give a meta module real storage and load its tensors from the shards (and `state`,
    what calibration added: the quantizers' ranges); JobError when the shards' tensors are
    not the ones the config asks for."""
    state = state or {}
    expected = {k: v for k, v in module.state_dict().items() if k not in state}
    have = set(source.keys(prefix))
    want = {prefix + k for k in expected}
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        more = len(missing) + len(extra) - 1
        raise JobError(
            f"model {source.model}: {what} does not match config.json"
            f" ({detail}{f' and {more} more' if more else ''})"
        )
    for key, tensor in expected.items():
        shape = source.shapes[prefix + key]
        if list(tensor.shape) != shape:
            raise JobError(
                f"model {source.model}: {what} does not match config.json ({prefix}{key} is"
                f" {shape}, config.json makes it {list(tensor.shape)})"
            )
    module.to_empty(device=device)
    tensors = source.read(sorted(want))
    values = {k.removeprefix(prefix): v for k, v in tensors.items()}
    values.update(state)
    with torch.no_grad():
        module.load_state_dict(values, strict=True)
    del tensors, values


def _release(module: torch.nn.Module) -> None:
    """Back to the meta device: the storage is freed, the quantizers' settings stay."""
    module.to("meta")
    gc.collect()
    _trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _trim_heap() -> None:
    """Give freed heap memory back to the system. glibc keeps freed blocks below its
    (growing) mmap threshold in the heap, and a layer's tensors, freed after each layer,
    left the RSS about one layer higher per layer without this (measured)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _cast_for_export(module: torch.nn.Module) -> None:
    """As quantize.export: parameters and floating buffers to BF16, amax buffers kept in
    FP32 (their precision sets the scales)."""
    with torch.no_grad():
        for param in module.parameters():
            if param.is_floating_point() and param.dtype != torch.bfloat16:
                param.data = param.data.to(torch.bfloat16)
        for sub in module.modules():
            for name, buf in sub.named_buffers(recurse=False):
                if buf.is_floating_point() and "amax" not in name and buf.dtype != torch.bfloat16:
                    setattr(sub, name, buf.to(torch.bfloat16))


def _quantize_scope(scope: _Scope, cfg: dict[str, Any], loop: Callable[[Any], None]) -> None:
    import modelopt.torch.quantization as mtq

    try:
        mtq.quantize(scope, cfg, loop)
    except RuntimeError as exc:
        # Every weight quantizer of this layer excluded (--exclude "layers.3."): ModelOpt
        # has converted it already and refuses to calibrate; the layer is written in BF16
        # and listed in exclude_modules, as in a whole-model export. KV-cache quantizers,
        # if any, still need their statistics.
        if "no weight quantizer is enabled" not in str(exc):
            raise
        mtq.calibrate(scope, cfg.get("algorithm", "max"), loop)


def _export_tensors(
    scope: _Scope, mo: Any, dummy: Callable[[], None], kv_format: str | None
) -> dict[str, torch.Tensor]:
    """The exported (name -> tensor) of every module in `scope`, by ModelOpt's handlers."""
    fmt = mo.get_quantization_format(scope)
    if fmt is not None and "nvfp4_awq" in str(fmt).lower():
        mo.fuse_prequant_to_linear(scope)
    input_to_linear, output_to_layernorm = mo.collect_shared(scope, dummy, collect_layernorms=True)
    mo.fuse_shared(
        scope,
        input_to_linear,
        output_to_layernorm,
        qkv_only=False,
        fuse_layernorms=True,
        quantization_format=fmt,
    )
    ctx = mo.ExportContext(model=scope, dtype=torch.bfloat16, is_modelopt_qlora=False)
    out: dict[str, torch.Tensor] = {}
    with _modules_kept(scope):
        for name, sub in list(scope.named_modules()):
            mo.dispatch(name, sub, ctx)
        for key, tensor in scope.state_dict().items():
            new_key, value = mo.postprocess_tensor(key, tensor, 448, kv_format, False)
            if new_key is not None and value is not None:
                out[new_key] = value.detach().to("cpu").contiguous()
    return out


@contextlib.contextmanager
def _modules_kept(root: torch.nn.Module) -> Iterator[None]:
    """Put every module's children and parameters back after ModelOpt's export handlers.

    Some handlers rebuild a module for writing: fused MoE experts become one child per
    expert, their quantizers gone. The whole-model export reads hf_quant_config's layers
    before its handlers run; here the skeleton is read after all layers are written, so
    each layer is put back as calibration left it (else the experts read as unquantized
    and the config would exclude them)."""
    saved = [(m, dict(m._modules), dict(m._parameters)) for m in root.modules()]
    try:
        yield
    finally:
        for module, children, params in saved:
            module._modules.clear()
            module._modules.update(children)
            module._parameters.clear()
            module._parameters.update(params)


class _LayerCalls:
    """How a decoder layer is called, as LlamaModel/Qwen3Model.forward calls it
    (transformers 5.x): rotary position embeddings made once by the model's own rotary
    module, the causal mask (None where the attention applies it itself), use_cache off
    as calibration.make_forward_loop runs the whole model."""

    def __init__(
        self, config: Any, inner: torch.nn.Module, seq_len: int, device: torch.device, dtype: Any
    ) -> None:
        self.config, self.seq_len, self.device, self.dtype = config, seq_len, device, dtype
        # Built afresh: the skeleton's rotary tables are on the meta device.
        rotary_cls: Any = type(inner.rotary_emb)
        self.rotary = rotary_cls(config=config).to(device)
        n = config.num_hidden_layers
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
        self._masks: dict[int, dict[str, Any]] = {}
        self.full = self._position(seq_len, dtype)
        self.probe = self._position(2, torch.bfloat16)

    def _position(self, n: int, dtype: Any) -> tuple[torch.Tensor, Any]:
        position_ids = torch.arange(n, device=self.device).unsqueeze(0)
        x = torch.zeros(1, n, self.config.hidden_size, dtype=dtype, device=self.device)
        with torch.no_grad():
            return position_ids, self.rotary(x, position_ids)

    def _mask(self, batch: int, layer_type: str) -> Any:
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        if batch not in self._masks:
            kw = {
                "config": self.config,
                "inputs_embeds": torch.zeros(batch, self.seq_len, 1, dtype=self.dtype),
                "attention_mask": None,
                "past_key_values": None,
                "position_ids": self.full[0],
            }
            made = {"full_attention": create_causal_mask(**kw)}
            if "sliding_attention" in self.layer_types:
                made["sliding_attention"] = create_sliding_window_causal_mask(**kw)
            self._masks[batch] = made
        masks = self._masks[batch]
        return masks.get(layer_type, masks["full_attention"])

    def run(self, layer: torch.nn.Module, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer i on a calibration batch."""
        position_ids, cos_sin = self.full
        out = layer(
            hidden.to(self.device),
            attention_mask=self._mask(hidden.shape[0], self.layer_types[i]),
            position_embeddings=cos_sin,
            position_ids=position_ids,
            past_key_values=None,
            use_cache=False,
        )
        return out[0] if isinstance(out, tuple) else out

    def run_probe(self, layer: torch.nn.Module) -> None:
        """ModelOpt's two-token probe pass (which modules share an input) on a BF16 layer."""
        position_ids, cos_sin = self.probe
        x = torch.ones(1, 2, self.config.hidden_size, dtype=torch.bfloat16, device=self.device)
        layer(x, position_embeddings=cos_sin, position_ids=position_ids, use_cache=False)


def _calibrate_layer(
    scope: _Scope, i: int, cfg: dict[str, Any], hidden: Activations, calls: _LayerCalls
) -> Activations:
    """Quantize layer i with ModelOpt on the stored inputs; returns the next layer's."""
    layer = scope.get_submodule(f"model.layers.{i}")
    outputs = Activations(hidden.spill_dir, i + 1)
    algorithm = cfg.get("algorithm", "max")
    method = algorithm.get("method") if isinstance(algorithm, dict) else algorithm
    # Max calibration runs the layer unquantized (ModelOpt turns quantization off while it
    # collects statistics), so its forward pass also gives the next layer's inputs, which
    # must be the unquantized outputs a whole-model calibration feeds it. Other algorithms
    # run quantized passes: their next inputs come from a plain pass before quantizing.
    single_pass = method in ("max", None)

    def run_all(keep: bool) -> None:
        with torch.no_grad():
            for h in hidden:
                out = calls.run(layer, i, h)
                if keep:
                    outputs.append(out)

    if not single_pass:
        run_all(keep=True)
    passes = 0

    def loop(_: Any) -> None:
        nonlocal passes
        passes += 1
        run_all(keep=single_pass and passes == 1)

    _quantize_scope(scope, cfg, loop)
    if len(outputs) != len(hidden):
        raise RuntimeError(f"layer {i}: {len(outputs)} of {len(hidden)} outputs kept")
    hidden.free()
    return outputs


def _export_layer(scope: _Scope, i: int, mo: Any, calls: _LayerCalls) -> dict[str, torch.Tensor]:
    layer = scope.get_submodule(f"model.layers.{i}")
    _cast_for_export(layer)
    kv_format = mo.get_quant_config(scope)["quantization"]["kv_cache_quant_algo"]
    return _export_tensors(scope, mo, lambda: calls.run_probe(layer), kv_format)


# -- the job -----------------------------------------------------------------------------


@dataclass
class Streams:
    """The held-out windows' hidden states on their way through the layers: the original
    model's (`base`, only in the first pass) and the quantized one's (`quant`)."""

    windows: list[torch.Tensor]  # the held-out token ids, batch by batch
    quant: Activations
    base: Activations | None = None


class LayerwiseRun:
    """One model, one decoder layer in memory at a time.

    `calibrate` is the first pass: every layer is read, calibrated and (unless the caller
    searches) exported; held-out windows, if given, go through each layer as it was and
    as quantized, which measures the checkpoint without the whole model. A search then
    measures candidates (`measure`: which layers to keep in FP8 or BF16) and exports the
    one it chose (`export`), each in one more pass over the layers, from the quantizer
    ranges the first pass kept. `finish` writes the head shard and the configs.
    """

    def __init__(
        self,
        source_dir: Path,
        model_name: str,
        cfg: dict[str, Any],
        export_dir: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        calib_shape: tuple[int, int],
        held_out_shape: tuple[int, int] | None,
        activation_budget: int | None,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.mo = _modelopt_export()
        self.cfg, self.export_dir, self.device = cfg, export_dir, device
        self.timings: dict[str, float] = {}
        self.source_dir = source_dir
        config = AutoConfig.from_pretrained(source_dir, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.source = SourceTensors(source_dir, model_name, conversion.Names(model))
        inner = getattr(model, "model", None)
        if (
            inner is None
            or not isinstance(getattr(inner, "layers", None), torch.nn.ModuleList)
            or not all(hasattr(inner, a) for a in ("embed_tokens", "norm", "rotary_emb"))
            or not hasattr(model, "lm_head")
        ):
            raise JobError(
                f"model {model_name} ({config.model_type}): layer-by-layer quantization"
                " supports Llama/Qwen-style decoders (model.embed_tokens, model.layers,"
                " model.norm, lm_head)"
            )
        self.config, self.model, self.inner = config, model, inner
        self.layers: torch.nn.ModuleList = inner.layers
        # ModelOpt registers a model's attention classes for KV-cache quantization when it
        # converts a whole transformers model; the layers here are converted on their own.
        from modelopt.torch.quantization.plugins.huggingface import (
            register_hf_attentions_on_the_fly,
        )

        register_hf_attentions_on_the_fly(model)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        # Every tensor's name and shape is checked against config.json before any is read,
        # so a mismatched or missing tensor fails in a second, not after an hour of layers.
        skeleton_keys = {k: list(v.shape) for k, v in model.state_dict().items()}
        if self.tied:
            skeleton_keys.pop("lm_head.weight", None)
        for key, shape in skeleton_keys.items():
            if key not in self.source.shapes:
                where = key.split(".weight")[0]
                raise JobError(
                    f"model {model_name}: {where} does not match config.json (missing {key})"
                )
            if self.source.shapes[key] != shape:
                raise JobError(
                    f"model {model_name}: {key} is {self.source.shapes[key]}, config.json"
                    f" makes it {shape}"
                )
        self.activation_bytes = stream_bytes(calib_shape, held_out_shape, config.hidden_size, dtype)
        self.spill = activation_budget is not None and self.activation_bytes > activation_budget
        self.spill_dir = export_dir / ".spill" if self.spill else None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.calls = _LayerCalls(config, inner, calib_shape[1], device, dtype)
        self.weight_map: dict[str, str] = {}
        self.shard_bytes: dict[str, int] = {}
        self.streams: Streams | None = None
        # Per layer: its quantizers' calibrated state (amax), kept for later passes.
        self.states: list[dict[str, torch.Tensor]] = []

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def embed(self, streams: dict[str, list[torch.Tensor]]) -> dict[str, Activations]:
        """Each stream's token batches through the embedding table (read once for all):
        the first layer's inputs, by stream name."""
        embed = self.inner.embed_tokens
        _materialize(embed, "model.embed_tokens.", self.source, self.device, "model.embed_tokens")
        out = {name: Activations(self.spill_dir, f"{name}0") for name in streams}
        with torch.no_grad():
            for name, batches in streams.items():
                for batch in batches:
                    out[name].append(embed(batch.to(self.device)))
        _release(embed)
        return out

    def calibrate(
        self,
        batches: list[torch.Tensor],
        held_out: list[torch.Tensor] | None = None,
        *,
        export: bool = True,
        base: bool = True,
        on_layer: Callable[[int, int], None] | None = None,
    ) -> dict[str, float]:
        """The first pass. Without `export` (a search follows) it keeps each layer's
        quantizer ranges and returns each layer's sensitivity (see `_sensitivity`).
        Without `base` the original model's held-out stream is not run (a search's later
        recipe: the first one's run measured it)."""
        t = time.monotonic()
        wanted = {"c": batches, "q": held_out or []}
        if base:
            wanted["b"] = held_out or []
        embedded = self.embed(wanted)
        hidden = embedded["c"]
        streams = Streams(held_out, embedded["q"], embedded.get("b")) if held_out else None
        self.streams = streams
        self.timings["prepare"] = round(time.monotonic() - t, 3)
        t = time.monotonic()
        sensitivity: dict[str, float] = {}
        for i in range(self.n_layers):
            layer = self.layers[i]
            _materialize(layer, f"model.layers.{i}.", self.source, self.device, f"model.layers.{i}")
            if streams is not None and streams.base is not None:
                streams.base = self._run(layer, i, streams.base, f"b{i + 1}")
            scope = _Scope({f"model.layers.{i}": layer}, self.config)
            first_input = None if export else hidden[0]
            hidden = _calibrate_layer(scope, i, self.cfg, hidden, self.calls)
            # ModelOpt may swap a module for its quantized class: keep the skeleton's the same.
            layer = self.layers[i] = scope.get_submodule(f"model.layers.{i}")
            if first_input is not None:
                sensitivity[f"model.layers.{i}"] = _sensitivity(
                    layer, i, first_input, hidden[0], self.calls
                )
            if streams is not None:
                streams.quant = self._run(layer, i, streams.quant, f"q{i + 1}")
            if export:
                self._export(scope, i)
            else:
                self.states.append(_quantizer_state(layer, f"model.layers.{i}.", self.source))
            del scope
            _release(layer)
            if on_layer is not None:
                on_layer(i + 1, self.n_layers)
        hidden.free()
        self.timings["layers"] = round(time.monotonic() - t, 3)
        return sensitivity

    def reference(self) -> evaluate.Measurement:
        """The original model on the held-out windows (the first pass's base stream)."""
        assert self.streams is not None and self.streams.base is not None
        measured = self._score(self.streams.base, None)
        self.streams.base.free()
        self.streams.base = None
        return measured

    def measured(self, reference: evaluate.Reference) -> evaluate.Measurement:
        """The quantized model of the last pass on the held-out windows."""
        assert self.streams is not None
        measured = self._score(self.streams.quant, reference)
        self.streams.quant.free()
        return measured

    def measure(
        self,
        kept: tuple[str, ...],
        precision: str,
        reference: evaluate.Reference,
        on_layer: Callable[[int, int], None] | None = None,
    ) -> evaluate.Measurement:
        """A candidate (`kept` layers in `precision`, the rest as calibrated) on the held-out
        windows: one pass over the layers."""
        assert self.streams is not None
        quant = self.embed({"q": self.streams.windows})["q"]
        for i in range(self.n_layers):
            with self._candidate_layer(i, kept, precision, reset=True) as layer:
                quant = self._run(layer, i, quant, f"q{i + 1}")
            if on_layer is not None:
                on_layer(i + 1, self.n_layers)
        self.streams.quant = quant
        return self.measured(reference)

    def export(
        self,
        kept: tuple[str, ...],
        precision: str,
        on_layer: Callable[[int, int], None] | None = None,
    ) -> None:
        """Write every layer of the chosen candidate (after a first pass without export)."""
        for i in range(self.n_layers):
            with self._candidate_layer(i, kept, precision, reset=False) as layer:
                self._export(_Scope({f"model.layers.{i}": layer}, self.config), i)
            if on_layer is not None:
                on_layer(i + 1, self.n_layers)

    def finish(self) -> dict[str, Any]:
        """The head shard, the index and the configs; returns hf_quant_config.json."""
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
        if self.streams is not None:
            self.streams.quant.free()
        model, inner, config, source, mo = (
            self.model,
            self.inner,
            self.config,
            self.source,
            self.mo,
        )
        # Embeddings, final norm, lm_head: not quantized (ModelOpt disables nn.Embedding
        # and lm_head), written in BF16 as read, after ModelOpt converts them so that
        # get_quant_config lists them in exclude_modules as it does for the whole model.
        head_names = ["model.embed_tokens", "model.norm", *([] if self.tied else ["lm_head"])]
        head = _Scope({"model.embed_tokens": inner.embed_tokens, "lm_head": model.lm_head}, config)
        _quantize_scope_without_data(head, self.cfg)
        inner.embed_tokens = head.get_submodule("model.embed_tokens")
        model.lm_head = head.get_submodule("lm_head")
        keys = [k for k in source.shapes if k.startswith(HEAD_PREFIXES)]
        keys = [k for k in keys if any(k.startswith(n + ".") for n in head_names)]
        head_tensors = {k: v.to(torch.bfloat16) for k, v in source.read(keys).items()}
        self._save(head_tensors, SHARD_NAME.format(1, self.n_layers + 1))

        quant_config = mo.get_quant_config(model)
        index = {
            "metadata": {"total_size": sum(self.shard_bytes.values())},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.export_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        config.dtype = torch.bfloat16
        model.config.dtype = torch.bfloat16
        model.config.save_pretrained(str(self.export_dir))
        # The source's generation_config.json, as from_pretrained would have read it.
        with contextlib.suppress(OSError, ValueError):
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(self.source_dir)
        mo.sanitize_generation_config(model)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            with contextlib.suppress(Exception):
                generation_config.save_pretrained(str(self.export_dir))
        mo.write_export_config(model, quant_config, self.export_dir)
        return cast(dict[str, Any], quant_config)

    # -- inside a pass

    def _run(self, layer: torch.nn.Module, i: int, hidden: Activations, gen: str) -> Activations:
        out = Activations(hidden.spill_dir, gen)
        with torch.no_grad():
            for h in hidden:
                out.append(self.calls.run(layer, i, h))
        hidden.free()
        return out

    def _export(self, scope: _Scope, i: int) -> None:
        tensors = _export_layer(scope, i, self.mo, self.calls)
        self._save(tensors, SHARD_NAME.format(i + 2, self.n_layers + 1))

    def _save(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        _save(tensors, self.export_dir / name, self.export_dir)
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.shard_bytes[name] = sum(v.nbytes for v in tensors.values())

    @contextlib.contextmanager
    def _candidate_layer(
        self, i: int, kept: tuple[str, ...], precision: str, *, reset: bool
    ) -> Iterator[torch.nn.Module]:
        """Layer i as calibrated, kept in `precision` if `kept` names it."""
        from nvfp4_worker.search import Layers

        layer = self.layers[i]
        prefix = f"model.layers.{i}."
        _materialize(layer, prefix, self.source, self.device, prefix[:-1], self.states[i])
        units = Layers(_Scope({prefix[:-1]: layer}, self.config))
        units.keep([u for u in kept if u == prefix[:-1]], precision)
        try:
            yield layer
        finally:
            if reset:  # the next pass starts from the calibrated quantizers again
                units.keep(())
            _release(layer)

    def _score(
        self, hidden: Activations, reference: evaluate.Reference | None
    ) -> evaluate.Measurement:
        """Perplexity (and KL from `reference`) from the last layer's outputs: the final norm
        and lm_head, materialized for this."""
        assert self.streams is not None
        norm, lm_head = self.inner.norm, self.model.lm_head
        _materialize(norm, "model.norm.", self.source, self.device, "model.norm")
        head_prefix = "model.embed_tokens." if self.tied else "lm_head."
        _materialize(lm_head, head_prefix, self.source, self.device, "lm_head")

        windows = self.streams.windows

        def logits() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            # One window at a time: its logits (seq_len x vocab in float32) are the largest
            # tensor of the evaluation, and a batch of them could outgrow a layer.
            for ids, h in zip(windows, hidden, strict=True):
                for r in range(ids.shape[0]):
                    yield ids[r : r + 1], lm_head(norm(h[r : r + 1].to(self.device)))

        try:
            with torch.no_grad():
                return evaluate.score(logits(), self.device, reference)
        finally:
            _release(norm)
            _release(lm_head)


def _sensitivity(
    layer: torch.nn.Module, i: int, x: torch.Tensor, y: torch.Tensor, calls: _LayerCalls
) -> float:
    """How much quantizing layer i alone changes its output on one calibration batch:
    ||layer_q(x) - layer(x)||^2 / ||layer(x)||^2. The search orders layers by it (the
    whole-model search measures each layer's KL instead, which needs the whole model)."""
    with torch.no_grad():
        yq = calls.run(layer, i, x).float()
        y = y.to(yq.device).float()
        return float((yq - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))


def _quantizer_state(
    layer: torch.nn.Module, prefix: str, source: SourceTensors
) -> dict[str, torch.Tensor]:
    """What calibration added to the layer's state (the quantizers' amax), on the CPU."""
    return {
        k: v.detach().to("cpu", copy=True)
        for k, v in layer.state_dict().items()
        if prefix + k not in source.shapes
    }


def stream_bytes(
    calib_shape: tuple[int, int],
    held_out_shape: tuple[int, int] | None,
    hidden_size: int,
    dtype: torch.dtype,
) -> int:
    """Host memory of the hidden states a pass keeps: a layer's calibration inputs and
    outputs, and with held-out windows their two streams (inputs and outputs of each)."""
    item = torch.empty((), dtype=dtype).element_size()
    tokens = 2 * calib_shape[0] * calib_shape[1]
    if held_out_shape is not None:
        tokens += 4 * held_out_shape[0] * held_out_shape[1]
    return tokens * hidden_size * item


def _quantize_scope_without_data(scope: _Scope, cfg: dict[str, Any]) -> None:
    """ModelOpt's conversion alone (no calibration): for modules that stay unquantized."""
    from modelopt.torch.opt import apply_mode
    from modelopt.torch.quantization.mode import QuantizeModeRegistry

    apply_mode(scope, mode=[("quantize", dict(cfg))], registry=QuantizeModeRegistry)


def _save(tensors: dict[str, torch.Tensor], path: Path, export_dir: Path) -> None:
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except OSError as exc:
        path.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise JobError(f"the disk under {export_dir.parent} is full; free space") from None
        raise
