"""Every nvfp4ctl command parses, documents itself, and fails on bad usage with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from nvfp4_admin import docgen
from nvfp4_admin.cli import cli

ROOT = Path(__file__).resolve().parents[2]


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        sub = group.get_command(ctx, name)
        if isinstance(sub, click.Group):
            out += _command_paths(sub, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


ALL_COMMANDS = _command_paths(cli)


def test_every_command_is_listed() -> None:
    names = {" ".join(p) for p in ALL_COMMANDS}
    expected = {
        "jobs submit",
        "jobs list",
        "jobs show",
        "jobs watch",
        "jobs logs",
        "jobs cancel",
        "jobs retry",
        "jobs purge",
        "serve status",
        "serve deploy",
        "serve rollback",
        "serve scale",
        "serve logs",
        "workers list",
        "workers scale",
        "bench",
        "estimate",
        "doctor",
    }
    assert expected <= names


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "root")
def test_help_works_without_services(path: tuple[str, ...]) -> None:
    # No Redis or Ray behind these URLs: --help must not need them.
    env = {"NVFP4_REDIS_URL": "redis://127.0.0.1:9/0", "NVFP4_RAY_ADDRESS": "http://127.0.0.1:9"}
    out = CliRunner().invoke(cli, [*path, "--help"], env=env)
    assert out.exit_code == 0, out.output
    assert "Usage: " in out.output
    # The docstring is the help: every command says something about itself.
    command = cli
    for name in path:
        command = command.get_command(click.Context(command), name)  # type: ignore[assignment]
    assert command.help and command.help.split("\n")[0].strip() in " ".join(out.output.split())


@pytest.mark.parametrize(
    "args",
    [
        ["jobs", "submit"],  # missing MODEL
        ["jobs", "submit", "m", "--format", "int3"],
        ["jobs", "submit", "m", "--calib-samples", "0"],
        # Values only the job model refuses are usage errors too.
        ["jobs", "submit", "m", "--name", "../x"],
        ["jobs", "submit", "m", "--calib-samples", "100001"],
        ["jobs", "submit", "m", "--exclude", "a b"],
        ["jobs", "submit", "m\tx"],
        ["jobs", "list", "--state", "sleeping"],
        ["jobs", "purge", "--older-than", "soon"],
        ["workers", "scale", "-1"],
        ["workers", "scale", "2", "--mode", "swarm"],
        ["serve", "scale"],
        ["estimate", "/no/such/config.json"],
        ["bench"],  # missing --endpoint
        ["no-such-command"],
    ],
)
def test_bad_usage_exits_2_with_one_line(args: list[str]) -> None:
    out = CliRunner().invoke(cli, args, env={"NVFP4_REDIS_URL": "redis://127.0.0.1:9/0"})
    assert out.exit_code == 2, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.output


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--name", "../x"], "'--name'"),
        (["--calib-seq-len", "2000000"], "'--calib-seq-len'"),
        (["--exclude", "a b"], "'--exclude'"),
        (["--calib-dataset", "c\x01"], "'--calib-dataset'"),
    ],
)
def test_refused_job_values_name_their_option(args: list[str], named: str) -> None:
    out = CliRunner().invoke(
        cli, ["jobs", "submit", "m", *args], env={"NVFP4_REDIS_URL": "redis://127.0.0.1:9/0"}
    )
    assert out.exit_code == 2, out.output
    assert out.output.startswith(f"Error: Invalid value for {named}: "), out.output


def test_bad_settings_are_one_line(tmp_path: Path) -> None:
    env_file = tmp_path / "prod.env"
    env_file.write_text("NVFP4_ENV=production\n")  # production without a Redis URL
    out = CliRunner().invoke(
        cli, ["--config", str(env_file), "jobs", "list"], env={"NVFP4_REDIS_URL": None}
    )
    assert out.exit_code == 1
    assert out.output.startswith("Error: invalid settings:") and out.output.count("\n") == 1


def test_console_script_runs() -> None:
    exe = Path(sys.executable).parent / "nvfp4ctl"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("nvfp4ctl, version ")


def test_committed_reference_is_current() -> None:
    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == docgen.render(), "regenerate: python -m nvfp4_admin.docgen > docs/cli.md"
