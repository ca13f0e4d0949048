"""One error base, one place that prints it: every error a user can cause derives from
Nvfp4Error, and nvfp4ctl's root group turns it into one line (a traceback with --debug)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from nvfp4_admin.cli import RootGroup, cli
from nvfp4_admin.context import AppContext
from nvfp4_admin.engine_metrics import MetricsError
from nvfp4_admin.loadgen import EndpointError
from nvfp4_admin.ray_client import RayApiError
from nvfp4_admin.rollout import RolloutError
from nvfp4_admin.scaler import ScaleError
from nvfp4_admin.serve_config import ServeConfigError
from nvfp4_admin.sizing import ConfigError
from nvfp4_common.errors import (
    CheckpointError,
    CorruptJob,
    InvalidSettings,
    InvalidTransition,
    JobNotFound,
    Nvfp4Error,
)
from nvfp4_common.settings import Settings, get_settings
from nvfp4_worker.errors import JobError

# Each keeps the built-in base its callers catch (estimate catches ValueError, tests of the
# serving app catch ValueError, the worker catches JobError).
BASES: list[tuple[type[Exception], type[Exception]]] = [
    (InvalidSettings, ValueError),
    (JobNotFound, LookupError),
    (InvalidTransition, ValueError),
    (CorruptJob, ValueError),
    (CheckpointError, ValueError),
    (ServeConfigError, ValueError),
    (ConfigError, ValueError),
    (RayApiError, RuntimeError),
    (RolloutError, RuntimeError),
    (MetricsError, RuntimeError),
    (ScaleError, RuntimeError),
    (EndpointError, RuntimeError),
    (JobError, Exception),
]


@pytest.mark.parametrize(("error", "base"), BASES, ids=[e.__name__ for e, _ in BASES])
def test_every_user_error_derives_from_the_base_and_keeps_its_own(
    error: type[Exception], base: type[Exception]
) -> None:
    assert issubclass(error, Nvfp4Error) and issubclass(error, base)


def _root() -> click.Group:
    @click.group(cls=RootGroup)
    @click.option("--debug", is_flag=True)
    @click.pass_context
    def root(ctx: click.Context, debug: bool) -> None:
        ctx.obj = AppContext(settings=Settings(_env_file=None), debug=debug)  # type: ignore[call-arg]

    @root.command()
    def scale() -> None:
        raise ScaleError("cannot reach the Docker engine: no socket; start Docker")

    @root.command()
    def bug() -> None:
        raise KeyError("replicas")

    return root


def test_a_command_raises_and_the_root_prints_one_line_with_exit_1() -> None:
    out = CliRunner().invoke(_root(), ["scale"])
    assert out.exit_code == 1
    assert out.output == "Error: cannot reach the Docker engine: no socket; start Docker\n"


def test_debug_shows_the_traceback_of_a_user_error() -> None:
    out = CliRunner().invoke(_root(), ["--debug", "scale"])
    assert isinstance(out.exception, ScaleError) and "Error:" not in out.output


def test_a_bug_keeps_its_traceback() -> None:
    out = CliRunner().invoke(_root(), ["bug"])
    assert isinstance(out.exception, KeyError)


def test_invalid_settings_are_one_line_naming_the_setting() -> None:
    out = CliRunner().invoke(cli, ["--redis-url", "ftp://somewhere", "jobs", "list"])
    assert out.exit_code == 1
    assert out.output.startswith("Error: invalid settings: redis_url: must start with redis://")
    assert len(out.output.splitlines()) == 1


def test_services_get_the_same_invalid_settings() -> None:
    # What the worker, its health check and serving read: the CLI's error, not a bare
    # ValueError. A fresh call: get_settings caches per set of overrides.
    with pytest.raises(InvalidSettings, match="^invalid settings: redis_url: must start with"):
        get_settings(redis_url="ftp://somewhere")
