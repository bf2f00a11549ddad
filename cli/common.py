"""What every command shares: how a user's mistake ends a command."""

from __future__ import annotations

import typer


def fail(message: str) -> None:
    """Print one error line on stderr and exit 2 (the user's mistake)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)
