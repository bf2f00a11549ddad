"""``gsp report classes``: per-class accuracy of two training runs joined with the descriptions,
as a page and as JSON; a thin typer wrapper over :mod:`mc.report` and :mod:`mc.report_html`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.common import fail

report_app = typer.Typer(help="Reports that join training results with the descriptions.", no_args_is_help=True)


def classes_cmd(
    baseline: Path = typer.Argument(..., metavar="BASELINE_RUN",
                                    help="The training run to compare against (e.g. the CE-only baseline)."),
    run: Path = typer.Argument(..., metavar="RUN",
                               help="The training run to report on (e.g. GSP-MC, or after a description change)."),
    descriptions: Path | None = typer.Option(
        None, "--descriptions", help="Description run (or root with LATEST) whose texts to show.",
        show_default="the one RUN was trained on"),
    html: Path | None = typer.Option(None, "--html", help="Write the page here (one self-contained HTML file)."),
    confused: int = typer.Option(3, "--confused", min=0, help="Most confused classes shown per class."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Per-class test accuracy of BASELINE and RUN, the change sorted (most hurt first), each class
    with its Tg/Tp descriptions and those of the classes it is most confused with."""
    from mc.report import class_report
    from mc.report_html import points, write_page

    if html is None and not as_json:
        fail("give --html FILE (the page) and/or --json (the data on stdout)")
    if html is not None and html.is_dir():
        fail(f"--html {html}: is a folder; give the path of the HTML file to write")
    report = class_report(baseline, run, descriptions, confused=confused)  # a ReportError is one line, exit 2
    if html is not None:
        write_page(report, html)
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False))
        return
    for note in report["notes"]:
        typer.echo(f"note: {note}", err=True)
    s = report["summary"]
    typer.echo(f"{s['helped']} helped, {s['hurt']} hurt, {s['unchanged']} unchanged, "
               f"{s['without_test_clips']} without test clips; mean change {points(s['mean_delta'])}", err=True)
    typer.echo(str(html))


def register(app: typer.Typer) -> None:
    report_app.command("classes")(classes_cmd)
    app.add_typer(report_app, name="report")
