"""CLI: ``gsp review export`` / ``gsp review apply`` (a linguist's decisions on a description run)."""

from __future__ import annotations

from pathlib import Path

import typer

review_app = typer.Typer(help="Review a description run in a spreadsheet and feed the decisions back.",
                         no_args_is_help=True)


def export(
    run: Path = typer.Argument(..., help="A description run folder (or a descriptions folder: its LATEST run)."),
    out: Path = typer.Option(..., "-o", "--out", help="The CSV to write (UTF-8 with BOM; opens in a spreadsheet)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing, non-empty CSV."),
) -> None:
    """Write one line per description (key, label, gloss, kind, body parts, text) with empty
    decision, edited_text, reviewer and note columns to fill in."""
    from gsp.review import export_review

    path, n = export_review(run, out, force=force)
    typer.echo(f"{n} description(s) → {path}; fill decision (approve / reject / edit), edited_text for edit, "
               f"reviewer and note, then: gsp review apply {run} {path}")


def apply(
    run: Path = typer.Argument(..., help="The description run the file was exported from."),
    review_file: Path = typer.Argument(..., help="The filled-in review CSV."),
) -> None:
    """Check the whole file (every bad line is named, exit 2, nothing stored), then store the
    decisions with the run (review.json; the texts themselves stay as they are)."""
    from gsp.review import ReviewFileError, apply_review_file

    try:
        summary = apply_review_file(run, review_file)
    except ReviewFileError as exc:
        lines = str(exc).splitlines()
        for line in lines:
            typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
        typer.secho(f"{len(lines)} error(s); nothing was stored", err=True)
        raise typer.Exit(2) from None
    for line in summary.lines():
        typer.echo(line)


def register(app: typer.Typer) -> None:
    review_app.command("export")(export)
    review_app.command("apply")(apply)
    app.add_typer(review_app, name="review")
