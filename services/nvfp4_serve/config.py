"""The serving configuration: Settings (NVFP4_SERVE_*) overridden by build_app's args.

Both come from one model, `nvfp4_common.serving.ServingConfig`; `ServeArgs` adds what
only a deploy sets. Args are validated before anything starts, so a typo in a YAML file
fails `serve deploy` with one line that names the field, not a replica crash loop.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from nvfp4_common.serving import (
    AUTOSCALING_ARG,
    NUM_REPLICAS_ARG,
    ServeArgs,
    config_from_settings,
)
from nvfp4_common.settings import Settings

__all__ = ["ServeArgs", "args_from_settings", "load_args"]


def args_from_settings(settings: Settings) -> dict[str, Any]:
    """The serve_ settings as build_app args (the defaults that args override)."""
    return config_from_settings(settings)


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "args"
        if e["type"] == "extra_forbidden":
            known = ", ".join(ServeArgs.model_fields)
            parts.append(f"unknown arg {where!r} (known: {known})")
        elif e["type"] == "missing" and where == "model":
            parts.append("no model: pass args.model or set NVFP4_SERVE_MODEL")
        else:
            parts.append(f"{where}: {e['msg']}")
    return "invalid serving config: " + "; ".join(parts)


def load_args(settings: Settings, args: dict[str, Any] | None) -> ServeArgs:
    """Settings first, then `args` on top; raise ValueError with one line on bad input."""
    given = args or {}
    merged = args_from_settings(settings)
    merged.update(given)
    if given.get(AUTOSCALING_ARG) is not None and NUM_REPLICAS_ARG in given:
        raise ValueError("invalid serving config: set num_replicas or autoscaling, not both")
    try:
        return ServeArgs.model_validate(merged)
    except ValidationError as e:
        raise ValueError(_one_line(e)) from None
