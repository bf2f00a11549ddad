"""``gsp report classes``: per-class accuracy of two training runs joined with the descriptions,
as a page and as JSON; ``gsp report joints``: per-joint importance drawn on the skeleton (paper
Fig. 5). Thin typer wrappers over :mod:`mc.report`, :mod:`mc.report_html`, :mod:`mc.joints` and
:mod:`mc.joints_figure`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.common import fail

report_app = typer.Typer(help="Reports on training runs: per-class accuracy beside the descriptions (classes), "
                         "per-joint importance on the skeleton (joints).", no_args_is_help=True)


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


def joints_cmd(
    run: Path = typer.Argument(..., metavar="RUN", help="The training run to draw (e.g. GSP-MC)."),
    out: Path = typer.Option(..., "--out", help="The PNG file to write."),
    baseline: Path | None = typer.Option(
        None, "--baseline", help="A second run drawn beside RUN (e.g. the CE-only baseline)."),
    data: Path | None = typer.Option(None, "--data", help="Data whose clips to run through the models.",
                                     show_default="the data each run was trained on"),
    label: str | None = typer.Option(None, "--label", help="Only the clips of this class (id or name).",
                                     show_default="every clip of the split"),
    split: str = typer.Option("test", "--split", help="Which split of the data."),
) -> None:
    """Per-joint importance (channel-averaged final features, the paper's Figure 5) drawn on the
    skeleton, hands and face enlarged; with --baseline the two runs side by side."""
    from mc.joints import run_importance
    from mc.joints_figure import draw_joints

    if out.suffix.lower() != ".png":
        fail(f"--out {out}: give a .png file name (the picture is a PNG)")
    if out.is_dir():
        fail(f"--out {out}: is a folder; give the path of the PNG file to write")
    runs = [baseline, run] if baseline is not None else [run]
    panels = [run_importance(r, data, label, split) for r in runs]  # a GspError is one line, exit 2
    if len({p.layout.name for p, _ in panels}) > 1:
        fail(f"--baseline {baseline}: keypoint set {panels[0][0].layout.name!r} differs from RUN's "
             f"{panels[1][0].layout.name!r}; the two pictures would not be comparable")
    pose = panels[-1][1]  # both drawn on one pose, so their dots line up
    draw_joints([(result, pose) for result, _ in panels], out)
    for result, _ in panels:
        parts = ", ".join(f"{p} {v:.2f}" for p, v in result.part_means().items())
        typer.echo(f"{result.title}: {parts}", err=True)
    typer.echo(str(out))


def register(app: typer.Typer) -> None:
    report_app.command("classes")(classes_cmd)
    report_app.command("joints")(joints_cmd)
    app.add_typer(report_app, name="report")
