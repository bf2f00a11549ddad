"""CLI commands (placeholder until filled)."""

import typer


def register(app: typer.Typer) -> None:
    pass
