"""The job model: what a user asks for (JobSpec) and what the queue tracks (Job).

Everything here is stored in Redis as JSON and validated on the way in and out.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nvfp4_common.recipes import LAYERWISE_RECIPES, RECIPES, QualityTarget

# A Hugging Face repo id ("org/name"); anything else must be a local path. Both patterns
# end in \Z, not $: `$` also matches before a trailing newline, which let "name\n" through.
HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}\Z")
# Output names become a folder under the models directory: one safe path component.
OUTPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        return {"high": 0, "normal": 1, "low": 2}[self.value]


class QuantFormat(StrEnum):
    NVFP4 = "nvfp4"
    NVFP4_FP8_KV = "nvfp4-fp8kv"  # NVFP4 weights/activations plus an FP8 KV cache
    FP8 = "fp8"


class Stage(StrEnum):
    QUEUED = "queued"
    LOADING = "loading"
    CALIBRATING = "calibrating"
    EVALUATING = "evaluating"
    EXPORTING = "exporting"
    PUBLISHING = "publishing"
    DONE = "done"


class JobSpec(BaseModel):
    """A quantization request, as submitted."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="Hugging Face id (org/name) or a local directory under an allowed root.",
        min_length=1,
        max_length=4096,
    )
    format: QuantFormat = Field(QuantFormat.NVFP4, description="Target quantization format.")
    calib_dataset: str = Field(
        "allenai/c4",
        description="Hugging Face dataset id, or a local .txt/.jsonl file or folder of them.",
        min_length=1,
        max_length=4096,
    )
    calib_samples: int = Field(512, gt=0, le=100_000, description="Calibration samples.")
    calib_seq_len: int = Field(2048, gt=0, le=1_048_576, description="Tokens per sample.")
    eval_samples: int = Field(
        32, ge=0, le=10_000, description="Held-out samples for perplexity (0 skips it)."
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Glob patterns of modules kept in high precision (lm_head always is).",
        max_length=256,
    )
    output_name: str | None = Field(
        None, description="Folder name under the models directory; derived when absent."
    )
    recipe: str | None = Field(
        None,
        description="Calibration recipe (nvfp4_common.recipes); unset: max calibration, or"
        " with a target the cheapest recipes first.",
    )
    target: QualityTarget | None = Field(
        None,
        description="Quality (and size) the checkpoint must keep; the worker searches for the"
        " smallest candidate that keeps it.",
    )
    layerwise: bool = Field(
        False,
        description="Quantize one decoder layer at a time (memory bounded by a layer, not the"
        " model); the worker also chooses it when the whole model does not fit.",
    )

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, v: str | None) -> str | None:
        if v is not None and v not in RECIPES:
            raise ValueError(f"unknown recipe {v!r} (known: {', '.join(RECIPES)})")
        return v

    @model_validator(mode="after")
    def _target_is_measurable(self) -> JobSpec:
        if self.recipe is not None and self.format is QuantFormat.FP8:
            raise ValueError("recipe: recipes are NVFP4 calibrations; FP8 takes none")
        if self.layerwise and self.recipe not in (None, *LAYERWISE_RECIPES):
            raise ValueError(
                f"layerwise: layer-by-layer mode runs the {' and '.join(LAYERWISE_RECIPES)}"
                " recipes only; choose one of them or drop layer-by-layer mode"
            )
        if self.target is not None and self.target.has_quality and self.eval_samples == 0:
            raise ValueError(
                "eval_samples: a quality target is measured on held-out text; set"
                " eval_samples above 0"
            )
        return self

    @field_validator("exclude")
    @classmethod
    def _patterns_are_plain(cls, v: list[str]) -> list[str]:
        for p in v:
            # isprintable also refuses control characters and lone surrogates (non-UTF-8
            # bytes from the shell), which `jobs show` could not print.
            if not p or len(p) > 256 or not p.isprintable() or any(c.isspace() for c in p):
                raise ValueError(
                    f"exclude pattern {p!r} must be 1-256 printable characters, no spaces"
                )
        return v

    @field_validator("output_name")
    @classmethod
    def _safe_output_name(cls, v: str | None) -> str | None:
        if v is not None and (not OUTPUT_NAME.match(v) or ".." in v):
            raise ValueError(
                f"output name {v!r} must be one folder name (letters, digits, '.', '_', '-'),"
                " not a path"
            )
        return v

    @field_validator("model", "calib_dataset")
    @classmethod
    def _no_control_chars(cls, v: str) -> str:
        # isprintable: no control characters (below 32, DEL, \x85) and no line or paragraph
        # separators (\u2028, \u2029), which would break a line of `jobs list` or a log.
        if not v.isprintable():
            raise ValueError("must not contain control or line-separator characters")
        return v

    def resolved_output_name(self) -> str:
        """The output folder name: given, or the model's last path part plus the format."""
        if self.output_name:
            return self.output_name
        base = self.model.rstrip("/").split("/")[-1] or "model"
        base = re.sub(r"[^A-Za-z0-9._-]", "-", base).lstrip(".-_") or "model"
        return f"{base}-{self.format.value.upper()}"[:128]


class Progress(BaseModel):
    stage: Stage = Stage.QUEUED
    fraction: float = Field(0.0, ge=0.0, le=1.0, description="Of the current stage.")
    message: str = ""


class JobResult(BaseModel):
    """What a succeeded job produced; the full report is report.json in the output."""

    output_name: str
    output_path: str
    source_bytes: int
    output_bytes: int
    perplexity_base: float | None = None
    perplexity_quant: float | None = None
    perplexity_change_pct: float | None = None
    kl: float | None = None  # mean per-token KL from the original, on the held-out text
    recipe: str | None = None
    kept_layers: list[str] = Field(default_factory=list)  # kept in higher precision by the search
    kept_as: str | None = None  # their precision: "fp8" or "bf16"
    duration_s: float


# Redis stores a job as a flat hash so Lua scripts can change single fields atomically;
# nested models travel as JSON strings.
_JSON_FIELDS = ("spec", "progress", "result")


class Job(BaseModel):
    id: str
    spec: JobSpec
    priority: Priority = Priority.NORMAL
    state: JobState = JobState.QUEUED
    progress: Progress = Field(default_factory=lambda: Progress())
    attempts: int = 0
    max_attempts: int = 3
    worker_id: str | None = None
    error: str | None = None
    result: JobResult | None = None
    cancel_requested: bool = False
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:12]

    def to_redis(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in self.model_dump(mode="json").items():
            if name in _JSON_FIELDS:
                out[name] = json.dumps(value, separators=(",", ":"))
            elif value is None:
                out[name] = ""
            elif isinstance(value, bool):
                out[name] = "1" if value else "0"
            else:
                out[name] = str(value)
        return out

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> Job:
        data: dict[str, Any] = {}
        for name, value in raw.items():
            if name not in cls.model_fields:
                continue  # fields used only by the queue's scripts (e.g. score)
            if name in _JSON_FIELDS:
                try:
                    data[name] = json.loads(value) if value else None
                except json.JSONDecodeError as e:  # name the field: the hash has several
                    raise ValueError(
                        f"{name} is not valid JSON ({e.msg} at char {e.pos})"
                    ) from None
            elif value == "":
                data[name] = None
            elif name == "cancel_requested":
                data[name] = value == "1"
            else:
                data[name] = value
        return cls.model_validate(data)
