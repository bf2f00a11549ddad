"""The ``gsp`` command line: one typer app; each area registers its own subcommands."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="gsp",
    help="GSP-MC: dictionary knowledge base, generative sign descriptions, and multi-positive "
    "contrastive skeleton training.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

#: Modules that add commands to ``app`` through a ``register(app)`` function.
COMMAND_MODULES = (
    "gsp.cli_kb",        # ingest, search
    "gsp.cli_generate",  # generate, llm serve
    "mc.cli",            # train, eval, ensemble, predict, model summary, synth
    "gsp.cli_run",       # run: the main job end to end
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
