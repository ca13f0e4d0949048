"""Generate docs/cli.md from the commands themselves, so the reference never drifts.

python -m nvfp4_admin.docgen > docs/cli.md
"""

from __future__ import annotations

import click

from nvfp4_admin.cli import ENVVAR_PREFIX, cli

HEADER = """# nvfp4ctl command reference

Generated from the commands by `python -m nvfp4_admin.docgen > docs/cli.md`; do not edit.

Settings come from `NVFP4_*` environment variables (or `--config FILE`, a .env-style file),
like every service of the stack; any option can also be given as
`{prefix}_<COMMAND>_<OPTION>` (e.g. `{prefix}_BENCH_API_KEY`). Exit codes: 0 success,
1 an error (one line), 2 a usage error.
"""


def render() -> str:
    parts = [HEADER.format(prefix=ENVVAR_PREFIX)]
    root = click.Context(cli, info_name="nvfp4ctl")
    _walk(cli, root, parts)
    return "\n".join(parts).rstrip() + "\n"


def _walk(command: click.Command, ctx: click.Context, parts: list[str]) -> None:
    formatter = ctx.make_formatter()
    formatter.width = 100
    command.format_help(ctx, formatter)
    level = "#" * min(ctx.command_path.count(" ") + 2, 4)
    parts += [
        f"{level} `{ctx.command_path}`",
        "",
        "```text",
        formatter.getvalue().rstrip(),
        "```",
        "",
    ]
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                _walk(sub, click.Context(sub, info_name=name, parent=ctx), parts)


if __name__ == "__main__":
    click.echo(render(), nl=False)
