"""`nvfp4ctl jobs submit` with a recipe or a quality target, against a real Redis.

A good target is stored on the queued job's spec; each bad one is a usage error (exit 2)
in one line that names the option, and queues nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from nvfp4_admin.cli import cli
from nvfp4_common.queue import JobQueue
from nvfp4_common.recipes import LAYERWISE_RECIPES, RECIPES, SEARCH_LADDER


def submit(redis_url: str, *args: str) -> Result:
    return CliRunner().invoke(
        cli, ["jobs", "submit", *args], env={"NVFP4_REDIS_URL": redis_url}, catch_exceptions=False
    )


def test_percent_target_is_stored_on_the_spec(redis_url: str, queue: JobQueue) -> None:
    out = submit(redis_url, "Qwen/Qwen3-0.6B", "--max-ppl-increase", "5%", "--json")
    assert out.exit_code == 0, out.output
    spec = queue.get(json.loads(out.output)["id"]).spec
    assert spec.target is not None and spec.target.max_ppl_increase_pct == 5
    assert spec.target.max_kl is None and spec.target.max_size_gb is None
    assert spec.recipe is None  # a target without a recipe lets the worker search


def test_recipe_and_every_target_part_are_stored(
    redis_url: str, queue: JobQueue, tiny_model: Path
) -> None:
    out = submit(
        redis_url,
        str(tiny_model),
        "--recipe",
        "nvfp4-mse",
        "--max-ppl-increase",
        "2.5",
        "--max-kl",
        "0.05",
        "--max-size-gb",
        "1",
        "--json",
    )
    assert out.exit_code == 0, out.output
    spec = queue.get(json.loads(out.output)["id"]).spec
    assert spec.recipe == "nvfp4-mse"
    assert spec.target is not None
    assert spec.target.model_dump() == {
        "max_ppl_increase_pct": 2.5,
        "max_kl": 0.05,
        "max_size_gb": 1.0,
    }


BAD = {
    "ppl zero": (["--max-ppl-increase", "0"], "--max-ppl-increase"),
    "ppl negative": (["--max-ppl-increase", "-3%"], "--max-ppl-increase"),
    "ppl not a number": (["--max-ppl-increase", "abc"], "--max-ppl-increase"),
    "kl negative": (["--max-kl", "-1"], "--max-kl"),
    "unknown recipe": (["--recipe", "nope"], "--recipe"),
    "size below the smallest export": (["--max-size-gb", "0.0001"], "--max-size-gb"),
    "target without evaluation": (["--max-kl", "0.05", "--eval-samples", "0"], "--eval-samples"),
    "recipe for fp8": (["--format", "fp8", "--recipe", "nvfp4-mse"], "--recipe"),
    "layerwise with a recipe it does not run": (
        ["--layerwise", "--recipe", "nvfp4-mse"],
        "--layerwise",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_one_line_usage_error_and_queues_nothing(
    redis_url: str, queue: JobQueue, tiny_model: Path, case: str
) -> None:
    args, option = BAD[case]
    # A local folder, so the CLI can read config.json and check the size budget (the
    # tiny model's all-NVFP4 checkpoint is about 0.19 MB, above 0.0001 GB).
    out = submit(redis_url, str(tiny_model), *args)
    assert out.exit_code == 2, out.output
    error = [line for line in out.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and option in error[0], out.output
    assert "Traceback" not in out.output
    assert queue.jobs() == []


@pytest.mark.parametrize("recipe", LAYERWISE_RECIPES)
def test_layerwise_takes_the_recipes_it_runs(
    redis_url: str, queue: JobQueue, tiny_model: Path, recipe: str
) -> None:
    out = submit(redis_url, str(tiny_model), "--layerwise", "--recipe", recipe, "--json")
    assert out.exit_code == 0, out.output
    spec = queue.get(json.loads(out.output)["id"]).spec
    assert spec.layerwise and spec.recipe == recipe


def test_size_budget_names_the_smallest_checkpoint(redis_url: str, tiny_model: Path) -> None:
    out = submit(redis_url, str(tiny_model), "--max-size-gb", "0.0001")
    assert "below the smallest nvfp4 checkpoint of this model" in out.output
    # A budget above it is accepted.
    assert submit(redis_url, str(tiny_model), "--max-size-gb", "1").exit_code == 0


def test_the_search_ladder_runs_layer_by_layer() -> None:
    """A quality-target job switched to layer-by-layer mode runs the whole ladder there."""
    assert set(SEARCH_LADDER) <= set(LAYERWISE_RECIPES)


def test_help_lists_every_recipe() -> None:
    out = CliRunner().invoke(cli, ["jobs", "submit", "--help"], terminal_width=200)
    assert out.exit_code == 0
    for name in RECIPES:
        assert name in out.output, name
    for option in ("--max-ppl-increase", "--max-kl", "--max-size-gb", "--recipe"):
        assert option in out.output
