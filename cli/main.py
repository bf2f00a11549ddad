"""The ``gsp`` command line: one typer app; each command group (a module of this package)
registers its commands with ``register(app)``."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from cli import demo, diff, experiment, export, generate, kb, report, retrieve, review, run, stack, training
from cli.common import check_named_settings
from gsp.errors import GspError

HELP_REQUESTED = "gsp.help_requested"


def user_error_exit(exc: GspError) -> typer.Exit:
    """Print a user-facing error as its one line on stderr; the exit to raise (the error's
    ``exit_code``: 2 for anything the user gave wrong, 1 for a failed description run)."""
    line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    return typer.Exit(exc.exit_code)


class _Group(TyperGroup):
    """The root group. Every command runs inside :meth:`invoke`, so a :class:`GspError` from any
    of them (or from reading the settings) ends as one line and its exit status here,
    once, also under typer's test runner. It also notes whether ``--help`` is among the arguments:
    click runs the group callback (which reads the settings) before a subcommand parses its own
    ``--help``, and help must work with a broken config."""

    def parse_args(self, ctx, args):
        ctx.meta[HELP_REQUESTED] = "--help" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GspError as exc:
            raise user_error_exit(exc) from None
        except typer.TyperException as exc:
            # A bad option value or a missing argument of a subcommand (typer's UsageError, exit 2):
            # one line, like every other user mistake, instead of the usage box.
            if getattr(exc, "exit_code", None) != 2 or not hasattr(exc, "format_message"):
                raise
            where = f" (see {exc.ctx.command_path} --help)" if exc.ctx else ""
            typer.secho(f"error: {exc.format_message().splitlines()[0]}{where}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    name="gsp",
    cls=_Group,
    help="GSP-MC: dictionary knowledge base, generative sign descriptions, and multi-positive "
    "contrastive skeleton training.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
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


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the package version and exit."),
) -> None:
    import os

    from gsp.settings import get_settings, unsaid_unknown_env_names

    if ctx.resilient_parsing or ctx.meta.get(HELP_REQUESTED):  # completion and help need no settings
        return
    for line in unsaid_unknown_env_names(os.environ):
        typer.secho(f"warning: {line}", fg=typer.colors.YELLOW, err=True)
    # Reading the settings here first turns a bad config into one line (a SettingsError, caught
    # by _Group.invoke) before any work starts.
    check_named_settings(get_settings())


# Each command group registers its commands the same way: module-level functions, `register(app)`.
for _group in (kb, generate, training, demo, run, stack, report, diff, review, retrieve, experiment, export):
    _group.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
