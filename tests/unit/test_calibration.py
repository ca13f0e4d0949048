"""Calibration text from local .txt and .jsonl files and folders of both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvfp4_common.settings import Settings
from nvfp4_worker import calibration, sources
from nvfp4_worker.errors import JobError


@pytest.fixture
def cfg(tmp_path: Path) -> Settings:
    (tmp_path / "models").mkdir()
    return Settings(
        models_dir=tmp_path / "models",
        hf_cache_dir=tmp_path / "hub",
        model_roots=[tmp_path / "data"],
        hf_offline=True,
        _env_file=None,  # type: ignore[call-arg]
    )


def test_folder_of_txt_and_jsonl_is_read_in_name_order(cfg: Settings, tmp_path: Path) -> None:
    data = tmp_path / "data" / "mixed"
    (data / "more").mkdir(parents=True)
    (data / "a-plays.txt").write_text("Now is the winter of our discontent.")
    records = [{"text": "First record."}, {"text": ""}, {"text": "Second record.", "id": 7}]
    lines = [json.dumps(r) for r in records]
    (data / "more" / "b-records.jsonl").write_text("\n".join([lines[0], "", *lines[1:]]) + "\n")
    (data / "notes.md").write_text("not calibration text")

    source = sources.resolve_calibration(str(data), cfg)
    assert source.description == "mixed (2 local file(s))"
    texts = list(calibration.iter_texts(source))
    # Blank lines and empty texts are skipped; the .md file is not read.
    assert texts == ["Now is the winter of our discontent.", "First record.", "Second record."]


@pytest.mark.parametrize(
    "bad_line",
    ["this is not JSON", '["a list", "not an object"]', '{"content": "no text field"}'],
)
def test_bad_jsonl_line_is_named_in_one_line(cfg: Settings, tmp_path: Path, bad_line: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    path = data / "records.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n\n" + bad_line + "\n")
    source = sources.resolve_calibration(str(path), cfg)
    texts = calibration.iter_texts(source)
    assert next(texts) == "fine"  # good lines before the bad one are read
    with pytest.raises(JobError) as info:
        next(texts)
    assert str(info.value) == (
        "calibration file records.jsonl line 3 is not a JSON object with a 'text' field"
    )
