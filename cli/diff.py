"""`gsp diff` (terminal, HTML, JSON, git textconv) and `gsp git-setup`: compare description runs."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.common import fail

_STYLES = {"added": "green", "removed": "red", "changed": "yellow", "unchanged": "dim"}


def _summary_table(summary: dict) -> Table:
    from gsp.diff import CHANGE_TYPES

    table = Table(title=f"{summary['old']} → {summary['new']}", title_justify="left")
    table.add_column("kind")
    for t in CHANGE_TYPES:
        table.add_column(t, justify="right", style=_STYLES[t])
    for k in summary["kinds"]:
        table.add_row(k, *(str(summary["counts"][k][t]) for t in CHANGE_TYPES))
    table.add_row("all", *(str(summary["totals"][t]) for t in CHANGE_TYPES), style="bold")
    return table


def _summary_lines(summary: dict) -> list[Text]:
    from gsp.diff import prompt_change_text

    lines = [Text(f"{summary['signs_touched']} sign(s) touched")]
    if summary["filters"]:
        lines.append(Text("filters: " + ", ".join(f"{k}={v}" for k, v in summary["filters"].items())))
    model = summary["model"]
    if model:
        lines.append(Text(f"model: {model['old']} → {model['new']}" if model["changed"]
                          else f"model: {model['old']} (unchanged)"))
    for p in summary["prompts"]:
        lines.append(Text(f"prompt changed: {prompt_change_text(p)}", style="yellow"))
    if model and not summary["prompts"]:
        lines.append(Text("prompts unchanged"))
    lines += [Text(f"note: {n}", style="italic") for n in summary["notes"]]
    return lines


def _side_text(mark: str, state, segments, style: str) -> Text:
    from gsp.diff import FAILED

    # Texts are LLM output: appended as plain Text, never parsed as rich markup.
    line = Text(f"  {mark} ", style=style)
    if state.text is None:
        why = f"failed — no text ({state.error})" if state.status == FAILED and state.error else \
            "failed — no text" if state.status == FAILED else "not in this run"
        line.append(f"({why})", style="dim italic")
        return line
    for op, text in segments:
        line.append(text, style={"delete": "bold red strike", "insert": "bold green"}.get(op, ""))
    return line


def print_diff(result, console: Console) -> None:
    from gsp.diff_html import parts_line

    console.print(_summary_table(result.summary))
    for line in _summary_lines(result.summary):
        console.print(line)
    if not result.rows:
        console.print("No description changed" + (" among the rows the filters keep." if result.summary["filters"]
                                                   else "."))
    for label, gloss, rows in result.by_sign():
        console.rule(Text(f"{gloss} · label {label}", style="bold"), align="left")
        for r in rows:
            head = Text(f"{r.kind} {r.key} ")
            head.append(r.change, style=_STYLES[r.change])
            if parts := parts_line(r):
                head.append(f"  {parts}", style="cyan")
            console.print(head)
            old_segs, new_segs = r.segments
            console.print(_side_text("-", r.old, old_segs, "red"))
            console.print(_side_text("+", r.new, new_segs, "green"))


def diff_cmd(
    old: Path | None = typer.Argument(None, help="Old side: a description run folder, the descriptions "
                                      "folder (its LATEST run), or one .parquet file of one kind."),
    new: Path | None = typer.Argument(None, help="New side, like the old one."),
    kind: str | None = typer.Option(None, "--kind", help="Only this kind: Tb, Ts, Tg or Tp."),
    label: int | None = typer.Option(None, "--label", help="Only this sign's label."),
    gloss: str | None = typer.Option(None, "--gloss", help="Only this gloss (case-insensitive)."),
    part: str | None = typer.Option(None, "--part", help="Only Tp rows that name this body part "
                                    "(body, left_hand, right_hand, mouth, face)."),
    show_all: bool = typer.Option(False, "--all", help="Show unchanged rows too."),
    html: Path | None = typer.Option(None, "--html", help="Also write one self-contained HTML page here."),
    as_json: bool = typer.Option(False, "--json", help="Print {summary, changes} as JSON instead."),
    textconv: Path | None = typer.Option(None, "--textconv", help="Print FILE.parquet as one line per row "
                                         "(git's textconv; see gsp git-setup)."),
) -> None:
    """Compare two description runs: added, removed and changed texts per sign and kind, with the
    changed words highlighted (characters for Chinese/Japanese/Korean text)."""
    from gsp.diff import Filters, diff_paths, textconv_lines

    if textconv is not None:
        if old is not None or new is not None or html or as_json:
            fail("--textconv FILE takes no other argument or option")
        lines = textconv_lines(textconv)
        typer.echo("\n".join(lines) + ("\n" if lines else ""), nl=False)
        return
    if old is None or new is None:
        fail("gsp diff needs two sides: gsp diff OLD NEW (runs or .parquet files), or --textconv FILE")
    if html is not None and html.is_dir():
        fail(f"--html {html}: is a folder; give the path of the HTML file to write")
    result = diff_paths(old, new, Filters(kind=kind, label=label, gloss=gloss, part=part, show_all=show_all))
    if html is not None:
        from gsp.diff_html import write_html

        write_html(result, html)
    if as_json:
        typer.echo(json.dumps(result.to_json(), ensure_ascii=False, indent=2))
        if html is not None:
            typer.echo(f"wrote {html}", err=True)
        return
    console = Console(highlight=False)
    if html is not None:
        console.print(_summary_table(result.summary))
        for line in _summary_lines(result.summary):
            console.print(line)
        console.print(Text(f"wrote {html}"))
        return
    print_diff(result, console)


def git_setup_cmd(
    repo: Path = typer.Argument(Path("."), help="A folder inside the git repository (default: here)."),
) -> None:
    """Make `git diff` show description parquet files as text: adds `*.parquet diff=gsp` to the
    repository's .gitattributes and sets `diff.gsp.textconv` to `gsp diff --textconv` (idempotent;
    an existing different setting is left alone and reported)."""
    from gsp.diff import git_setup

    typer.echo(git_setup(repo))


def register(app: typer.Typer) -> None:
    app.command("diff")(diff_cmd)
    app.command("git-setup")(git_setup_cmd)
