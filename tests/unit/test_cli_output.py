"""Formatting helpers: secrets never printed, durations parsed, tables aligned."""

from __future__ import annotations

import pytest

from nvfp4_admin.output import parse_duration, table
from nvfp4_common.settings import mask_url


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://user:s3cret@10.0.0.1/1", "redis://user:***@10.0.0.1/1"),
        ("rediss://:p%40ss@host:6380", "rediss://:***@host:6380"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("7d", 604800),
        ("2w", 1209600),
        ("30", 30),
        ("1.5h", 5400),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7 days", "-1d", "d"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_table_aligns_and_shows_missing_as_dash() -> None:
    assert (
        table(("id", "worker"), [("a", None), ("bbbb", "w1")]) == "ID    WORKER\na     -\nbbbb  w1"
    )
    assert table(("id",), [], empty="no jobs") == "no jobs"
