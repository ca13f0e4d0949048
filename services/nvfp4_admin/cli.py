"""`nvfp4ctl`: the admin command line for quantization jobs, serving and workers.

Exit codes: 0 success, 1 an error (one line on stderr), 2 a usage error. `--debug` shows
the traceback instead of the one line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from nvfp4_admin.bench import bench
from nvfp4_admin.context import AppContext, describe_error, load_settings
from nvfp4_admin.doctor import doctor
from nvfp4_admin.estimate import estimate
from nvfp4_admin.jobs import jobs
from nvfp4_admin.serve import serve
from nvfp4_admin.workers import workers

# Every option can also come from NVFP4CTL_<COMMAND>_<OPTION>, e.g. NVFP4CTL_BENCH_ENDPOINT.
# Settings themselves (Redis, Ray, models folder) come from NVFP4_* like every service.
ENVVAR_PREFIX = "NVFP4CTL"


class RootGroup(click.Group):
    """The one place that turns errors a user can fix into one line on stderr.

    Commands raise; they do not wrap. Any `Nvfp4Error` (unknown job, bad Serve config,
    failed rollout...) and the foreign errors `describe_error` knows (unreachable Redis or
    server) become `click.ClickException` here; usage errors keep Click's exit code 2.
    Anything else is a bug and keeps its traceback.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            # Click prints the usage block too; one line that points at --help is enough.
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            click.echo(f"Error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        # Without standalone mode Click returns the exit code of ctx.exit()/--help.
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:
            app = ctx.find_object(AppContext)
            if app is not None and app.debug:
                raise
            message = describe_error(e, app.settings if app else None)
            if message is None:
                raise
            raise click.ClickException(message) from None


@click.group(cls=RootGroup, context_settings={"auto_envvar_prefix": ENVVAR_PREFIX})
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A .env-style file of NVFP4_* settings (default: ./.env when present).",
)
@click.option("--redis-url", help="Redis holding the job queue (overrides NVFP4_REDIS_URL).")
@click.option("--ray-address", help="Ray dashboard URL (overrides NVFP4_RAY_ADDRESS).")
@click.option("--serve-url", help="Ray Serve HTTP proxy URL (overrides NVFP4_SERVE_URL).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="nvfp4-stack", prog_name="nvfp4ctl")
@click.pass_context
def cli(
    ctx: click.Context,
    config: Path | None,
    redis_url: str | None,
    ray_address: str | None,
    serve_url: str | None,
    debug: bool,
) -> None:
    """Manage nvfp4-stack: quantization jobs, the serving app and the workers."""
    overrides = {
        k: v
        for k, v in {
            "redis_url": redis_url,
            "ray_address": ray_address,
            "serve_url": serve_url,
        }.items()
        if v
    }
    app = AppContext(settings=load_settings(config, overrides), debug=debug)
    ctx.obj = app
    ctx.call_on_close(app.close)


cli.add_command(jobs)
cli.add_command(serve)
cli.add_command(workers)
cli.add_command(bench)
cli.add_command(estimate)
cli.add_command(doctor)


def main() -> None:
    cli(prog_name="nvfp4ctl")
