"""The ``gsp`` command line: one typer app; each command group (a module of this package)
registers its commands with ``register(app)``."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from cli import demo, generate, kb, run, training
from cli.common import fail

HELP_REQUESTED = "gsp.help_requested"


class _Group(TyperGroup):
    """Notes whether ``--help`` is among the arguments: click runs the group callback (which reads
    the settings) before a subcommand parses its own ``--help``, and help must work with a broken config."""

    def parse_args(self, ctx, args):
        ctx.meta[HELP_REQUESTED] = "--help" in args
        return super().parse_args(ctx, args)


app = typer.Typer(
    name="gsp",
    cls=_Group,
    help="GSP-MC: dictionary knowledge base, generative sign descriptions, and multi-positive "
    "contrastive skeleton training.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

#: Errors that mean the user gave something wrong (a setting, a file, a name): their message is
#: one line naming it, so the CLI prints that line and exits 2 instead of a traceback. Named as
#: "module:class" and matched only when the module is already imported, so `gsp --help` does not
#: import torch to build this list.
USER_ERRORS = (
    "gsp.settings:SettingsError",
    "mc.keypoints:LayoutError",
    "mc.evaluate:EvaluationError",
    "mc.data:SampleError",
)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gsp-mc")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"gsp-mc {_package_version()}")
        raise typer.Exit()


def is_user_error(exc: BaseException) -> bool:
    for spec in USER_ERRORS:
        module_name, class_name = spec.split(":")
        module = sys.modules.get(module_name)
        if module is not None and isinstance(exc, getattr(module, class_name)):
            return True
    return False


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the package version and exit."),
) -> None:
    from gsp.settings import SettingsError, get_settings

    if ctx.resilient_parsing or ctx.meta.get(HELP_REQUESTED):  # completion and help need no settings
        return
    # Settings are read lazily deep inside commands (and inside Prefect tasks); reading them
    # here first turns a bad config into one line before any work starts.
    try:
        get_settings()
    except SettingsError as exc:
        fail(str(exc))


# Each command group registers its commands the same way: module-level functions, `register(app)`.
for _group in (kb, generate, training, demo, run):
    _group.register(app)


def main() -> None:
    try:
        app()
    except Exception as exc:
        if not is_user_error(exc):
            raise
        typer.secho(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                    fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
