"""Model and calibration sources resolve inside the allowed folders only."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nvfp4_common.settings import Settings
from nvfp4_worker import sources
from nvfp4_worker.errors import JobError


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("models", "hub", "extra", "outside")}
    for p in paths.values():
        p.mkdir()
    return paths


@pytest.fixture
def cfg(roots: dict[str, Path]) -> Settings:
    return Settings(
        models_dir=roots["models"],
        hf_cache_dir=roots["hub"],
        model_roots=[roots["extra"]],
        hf_offline=True,
        _env_file=None,  # type: ignore[call-arg]
    )


def fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_local_model_in_a_root(cfg: Settings, roots: dict[str, Path]) -> None:
    folder = fake_model(roots["extra"] / "m")
    source = sources.resolve_model(str(folder), cfg)
    assert source.path == folder.resolve() and source.hub_id is None


def test_model_outside_the_roots_is_refused(cfg: Settings, roots: dict[str, Path]) -> None:
    folder = fake_model(roots["outside"] / "m")
    with pytest.raises(JobError, match="outside the allowed folders"):
        sources.resolve_model(str(folder), cfg)


def test_symlink_escaping_a_root_is_refused(cfg: Settings, roots: dict[str, Path]) -> None:
    target = fake_model(roots["outside"] / "m")
    link = roots["extra"] / "link"
    link.symlink_to(target)
    with pytest.raises(JobError, match="outside the allowed folders"):
        sources.resolve_model(str(link), cfg)


def test_dotdot_escape_is_refused(cfg: Settings, roots: dict[str, Path]) -> None:
    fake_model(roots["outside"] / "m")
    with pytest.raises(JobError, match="outside"):
        sources.resolve_model(str(roots["extra"] / ".." / "outside" / "m"), cfg)


def test_missing_model_path(cfg: Settings, roots: dict[str, Path]) -> None:
    with pytest.raises(JobError, match="does not exist"):
        sources.resolve_model(str(roots["extra"] / "nope"), cfg)


def test_folder_without_config(cfg: Settings, roots: dict[str, Path]) -> None:
    (roots["extra"] / "empty").mkdir()
    with pytest.raises(JobError, match="no config.json"):
        sources.resolve_model(str(roots["extra"] / "empty"), cfg)


def test_hub_id_offline_not_cached(cfg: Settings) -> None:
    with pytest.raises(JobError, match="not in the local Hugging Face cache"):
        sources.resolve_model("some-org/some-model", cfg)


def test_hub_id_offline_from_cache(cfg: Settings, roots: dict[str, Path]) -> None:
    # The hub cache layout huggingface_hub reads: refs/main names the snapshot folder.
    repo = roots["hub"] / "models--some-org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    fake_model(repo / "snapshots" / "abc123")
    source = sources.resolve_model("some-org/tiny", cfg)
    assert source.hub_id == "some-org/tiny"
    assert source.path == (repo / "snapshots" / "abc123").resolve()


def test_calibration_file_and_folder(cfg: Settings, roots: dict[str, Path]) -> None:
    data = roots["extra"] / "data"
    data.mkdir()
    (data / "a.txt").write_text("hello")
    (data / "b.jsonl").write_text('{"text": "x"}\n')
    (data / "c.csv").write_text("ignored")
    single = sources.resolve_calibration(str(data / "a.txt"), cfg)
    assert single.files == ((data / "a.txt").resolve(),)
    folder = sources.resolve_calibration(str(data), cfg)
    assert [p.name for p in folder.files] == ["a.txt", "b.jsonl"]


def test_calibration_wrong_suffix_and_missing(cfg: Settings, roots: dict[str, Path]) -> None:
    (roots["extra"] / "x.csv").write_text("a,b")
    with pytest.raises(JobError, match=r"\.txt or \.jsonl"):
        sources.resolve_calibration(str(roots["extra"] / "x.csv"), cfg)
    with pytest.raises(JobError, match="does not exist"):
        sources.resolve_calibration(str(roots["extra"] / "missing.txt"), cfg)


def test_calibration_outside_and_linked_out(cfg: Settings, roots: dict[str, Path]) -> None:
    (roots["outside"] / "secret.txt").write_text("x")
    with pytest.raises(JobError, match="outside"):
        sources.resolve_calibration(str(roots["outside"] / "secret.txt"), cfg)
    data = roots["extra"] / "data"
    data.mkdir()
    (data / "ok.txt").write_text("x")
    (data / "leak.txt").symlink_to(roots["outside"] / "secret.txt")
    with pytest.raises(JobError, match="links outside"):
        sources.resolve_calibration(str(data), cfg)


class FakeHub(BaseHTTPRequestHandler):
    """The two hub answers the dataset lookup reads: dataset info, or the hub's error
    headers (X-Error-Code) for a missing or gated dataset; anything else is a 500."""

    KNOWN = {"allenai/c4", "some-org/tiny-text"}

    def do_GET(self) -> None:  # noqa: N802
        repo = self.path.split("?")[0].removeprefix("/api/datasets/")
        if repo in self.KNOWN:
            body = json.dumps({"id": repo, "private": False}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
        elif repo == "some-org/gated-text":
            body = b'{"error": "gated"}'
            self.send_response(403)
            self.send_header("X-Error-Code", "GatedRepo")
        elif repo == "some-org/flaky":
            body = b"internal error"
            self.send_response(500)
        else:
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def online(cfg: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Online settings against a local fake of the Hugging Face hub API: this machine has
    no internet, so the hub itself cannot answer. huggingface_hub's own client (and its
    mapping of the hub's error headers to exceptions) runs unchanged."""
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield cfg.model_copy(update={"hf_offline": False})
    server.shutdown()
    server.server_close()


def test_hub_dataset_needs_online(cfg: Settings, online: Settings) -> None:
    with pytest.raises(JobError, match="NVFP4_HF_OFFLINE"):
        sources.resolve_calibration("allenai/c4", cfg)
    calib = sources.resolve_calibration("allenai/c4:en", online)
    assert calib.hub_id == "allenai/c4" and calib.hub_config == "en" and not calib.files


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("some-org/no-such-text", "unknown calibration dataset some-org/no-such-text"),
        ("some-org/gated-text:en", "calibration dataset some-org/gated-text:en is gated"),
        ("some-org/flaky", "the Hugging Face hub answered HTTP 500"),
        ("some-org/bad--name", "not a valid Hugging Face id"),
    ],
)
def test_hub_dataset_is_looked_up_before_any_weights(
    online: Settings, name: str, message: str
) -> None:
    sources.resolve_calibration("some-org/tiny-text", online)  # exists: accepted
    with pytest.raises(JobError, match=message) as info:
        sources.resolve_calibration(name, online)
    assert "\n" not in str(info.value)


def test_unreachable_hub_is_not_called_unknown(
    online: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(JobError, match="could not reach the Hugging Face hub") as info:
        sources.resolve_calibration("allenai/c4", online)
    assert "unknown" not in str(info.value) and "\n" not in str(info.value)

    # A hub that accepts the connection but never answers: the short timeout applies.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(sources, "HUB_CHECK_TIMEOUT_S", 0.5)
        with pytest.raises(JobError, match=r"could not reach .*Timeout"):
            sources.resolve_calibration("allenai/c4", online)
