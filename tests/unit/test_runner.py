"""The job process records a failure as one line, whatever text the error embeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvfp4_common.jobs import JobSpec, JobState
from nvfp4_common.queue import JobQueue
from nvfp4_common.settings import Settings
from nvfp4_worker import runner


def test_one_line_collapses_whitespace_and_caps_the_length() -> None:
    assert runner.one_line("model m: cannot load (\n  line one\n\tline two\r\n)") == (
        "model m: cannot load ( line one line two )"
    )
    long = runner.one_line("word " * 400)
    assert len(long) == runner.ERROR_MAX_CHARS and long.endswith("...")
    assert runner.one_line("short", limit=10) == "short"


def test_multi_line_job_error_is_recorded_in_one_line(
    settings: Settings,
    queue: JobQueue,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_model: Path,
) -> None:
    # A real input whose error text spans lines: a calibration folder holding a file whose
    # name has a newline in it, linked outside the folder.
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "secret.txt").write_text("not for jobs")
    (data / "ok.txt").write_text("calibration text")
    (data / "two\nlines.txt").symlink_to(tmp_path / "secret.txt")
    # The model is real (a local model is checked before the calibration data).
    cfg = settings.model_copy(update={"model_roots": [data, tiny_model.parent]})
    monkeypatch.setattr(runner, "get_settings", lambda: cfg)
    job = queue.submit(JobSpec(model=str(tiny_model), calib_dataset=str(data)))
    claimed = queue.claim("worker-1")
    assert claimed is not None and claimed.id == job.id

    assert runner.main([job.id, "worker-1", "1"]) == 0

    failed = queue.get(job.id)
    assert failed.state == JobState.FAILED
    assert failed.error is not None and "\n" not in failed.error
    assert failed.error.startswith("calibration file ") and "two lines.txt" in failed.error
    assert "links outside its folder" in failed.error
    # The job's log keeps the original text, one entry per line.
    messages = [line.split(" ", 1)[1].strip() for line in queue.logs(job.id)]
    assert any(m.startswith("lines.txt links outside its folder") for m in messages), messages
