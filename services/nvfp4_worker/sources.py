"""Where a job's model and calibration data come from, resolved safely.

Local paths must stay inside the allowed roots (the models folder, the Hugging Face cache
and `settings.model_roots`) after symlinks are resolved, so a job cannot read arbitrary
files of the worker's machine. Hugging Face ids go through the normal hub cache
(`settings.hf_offline` -> the local cache only); a hub dataset is looked up before any
weights are loaded, so a typo in its name fails in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nvfp4_common.jobs import HF_ID
from nvfp4_common.settings import Settings
from nvfp4_worker.errors import JobError

TEXT_SUFFIXES = (".txt", ".jsonl")
# Only what a causal LM checkpoint needs: never remote code, never pickled weights.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# Datasets whose default layout needs a config name; C4 streams one shard of English.
DATASET_DEFAULTS: dict[str, dict[str, str]] = {
    "allenai/c4": {"data_files": "en/c4-train.00000-of-01024.json.gz"},
}
# The up-front lookup of a hub dataset (one small API call). A hub that does not answer
# within this time would not stream the data either.
HUB_CHECK_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class ModelSource:
    path: Path  # resolved local folder holding config.json and safetensors
    hub_id: str | None  # set when the model came from the Hugging Face hub


@dataclass(frozen=True)
class CalibSource:
    description: str  # for logs and the model card
    files: tuple[Path, ...] = ()  # local .txt/.jsonl files (resolved), or
    hub_id: str | None = None  # a Hugging Face dataset streamed with `datasets`
    hub_config: str | None = None


def hf_cache_dir(settings: Settings) -> Path:
    if settings.hf_cache_dir is not None:
        return settings.hf_cache_dir
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def allowed_roots(settings: Settings) -> list[Path]:
    roots = [settings.models_dir, hf_cache_dir(settings), *settings.model_roots]
    return [r.expanduser().resolve() for r in roots]


def confine(path: Path, settings: Settings, what: str) -> Path:
    """`path` with symlinks resolved, refused unless it is inside an allowed root."""
    try:
        resolved = path.expanduser().resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise JobError(f"{what} {path} does not exist") from None
    except (OSError, RuntimeError) as exc:  # permission, symlink loop
        raise JobError(f"{what} {path} cannot be read: {exc}") from None
    if not any(resolved.is_relative_to(root) for root in allowed_roots(settings)):
        raise JobError(
            f"{what} {path} is outside the allowed folders (models_dir, the Hugging Face"
            " cache, model_roots); move it there or add its folder to NVFP4_MODEL_ROOTS"
        )
    return resolved


def _local_path(name: str, what: str) -> Path:
    try:
        return Path(name).expanduser()
    except RuntimeError:  # "~someone/..." where this machine has no user "someone"
        raise JobError(f"{what} {name}: no such home folder") from None


def _is_hub_id(name: str) -> bool:
    return bool(HF_ID.match(name)) and not name.startswith((".", "/", "~"))


def needs_download(name: str) -> bool:
    """True for a hub id with no local folder of that name: resolve_model downloads it."""
    return _is_hub_id(name) and not _local_path(name, "model path").exists()


def resolve_model(name: str, settings: Settings) -> ModelSource:
    """A local folder (confined) or a hub id downloaded into / read from the HF cache."""
    local = _local_path(name, "model path")
    if not _is_hub_id(name) or local.exists():
        path = confine(local, settings, "model path")
        if not path.is_dir():
            raise JobError(f"model path {name} is not a folder")
        hub_id = None
    else:
        path = _download(name, settings)
        hub_id = name
    if not (path / "config.json").is_file():
        raise JobError(f"model {name} has no config.json (not a Hugging Face model folder)")
    if not any(path.glob("*.safetensors")):
        raise JobError(f"model {name} has no .safetensors weights")
    return ModelSource(path=path, hub_id=hub_id)


def _download(repo_id: str, settings: Settings) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        folder = snapshot_download(
            repo_id,
            cache_dir=hf_cache_dir(settings),
            local_files_only=settings.hf_offline,
            allow_patterns=MODEL_FILES,
        )
    except GatedRepoError:
        raise JobError(f"model {repo_id} is gated: accept its license and set HF_TOKEN") from None
    except HFValidationError as exc:  # HF_ID is looser than the hub's rules ("--", "..")
        reason = str(exc).splitlines()[0] if str(exc) else "refused by huggingface_hub"
        raise JobError(f"model {repo_id} is not a valid Hugging Face id: {reason}") from None
    except RepositoryNotFoundError:
        raise JobError(f"model {repo_id} was not found on the Hugging Face hub") from None
    except LocalEntryNotFoundError:
        where = "offline (NVFP4_HF_OFFLINE)" if settings.hf_offline else "the hub is unreachable"
        raise JobError(
            f"model {repo_id} is not in the local Hugging Face cache and {where}"
        ) from None
    except OSError as exc:
        raise JobError(f"could not download model {repo_id}: {type(exc).__name__}") from None
    return Path(folder).resolve()


def _text_files(path: Path, name: str) -> tuple[Path, ...]:
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise JobError(f"calibration file {name} must be .txt or .jsonl")
        return (path,)
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise JobError(f"calibration folder {name} holds no .txt or .jsonl files")
    return files_confined(files, path)


def files_confined(files: list[Path], folder: Path) -> tuple[Path, ...]:
    """Files of a folder with symlinks resolved; a link that leaves the folder is refused."""
    out = []
    for f in files:
        resolved = f.resolve()
        if not resolved.is_relative_to(folder):
            raise JobError(f"calibration file {f} links outside its folder {folder}")
        out.append(resolved)
    return tuple(out)


def resolve_calibration(name: str, settings: Settings) -> CalibSource:
    """Local .txt/.jsonl file or folder (confined), or a Hugging Face dataset id."""
    local = _local_path(name, "calibration data")
    hub_name, _, config = name.partition(":")  # "org/name:config" picks a dataset config
    if _is_hub_id(hub_name) and not local.exists() and not name.endswith(TEXT_SUFFIXES):
        if settings.hf_offline:
            raise JobError(
                f"calibration dataset {name} needs the Hugging Face hub but NVFP4_HF_OFFLINE"
                " is set; use a local .txt/.jsonl file or folder"
            )
        check_hub_dataset(hub_name, name)
        return CalibSource(description=name, hub_id=hub_name, hub_config=config or None)
    path = confine(local, settings, "calibration data")
    files = _text_files(path, name)
    return CalibSource(description=f"{path.name} ({len(files)} local file(s))", files=files)


def check_hub_dataset(repo_id: str, name: str) -> None:
    """Refuse a hub dataset that does not exist (or cannot be read) before the job loads
    any weights; otherwise the failure would only show once streaming starts."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        HfApi().dataset_info(repo_id, timeout=HUB_CHECK_TIMEOUT_S)
    except GatedRepoError:  # before RepositoryNotFoundError, its base class
        raise JobError(
            f"calibration dataset {name} is gated: accept its terms on the hub and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise JobError(
            f"unknown calibration dataset {name}: the Hugging Face hub has no such dataset"
            " (if it is private, set HF_TOKEN)"
        ) from None
    except HFValidationError:  # HF_ID is looser than the hub's rules ("--", "..")
        raise JobError(f"calibration dataset {name} is not a valid Hugging Face id") from None
    except OfflineModeIsEnabled:
        raise JobError(
            f"calibration dataset {name} needs the Hugging Face hub but HF_HUB_OFFLINE is set;"
            " use a local .txt/.jsonl file or folder"
        ) from None
    except HfHubHTTPError as exc:  # the hub answered, with an error of its own (5xx, 429)
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise JobError(
            f"could not check calibration dataset {name}: the Hugging Face hub answered HTTP"
            f" {status}; retry the job later"
        ) from None
    except Exception as exc:  # the HTTP client's own errors (refused, DNS, timeout), whose
        # classes depend on the huggingface_hub version: the dataset may well exist.
        raise JobError(
            f"could not reach the Hugging Face hub to check calibration dataset {name}"
            f" ({type(exc).__name__}); check the network or use local calibration data"
        ) from None
