"""`gsp report classes`: per-class accuracy of two real training runs joined with the descriptions,
checked against the runs' own files; bad inputs as one line; the page rendered in headless Chromium."""

from __future__ import annotations

import csv
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import rendered_dom, screenshot
from matplotlib.image import imread
from toy_data import toy_descriptions, toy_pyskl
from typer.testing import CliRunner

from cli.main import app
from gsp.schema import read_kind, write_kind
from mc.data import write_pyskl
from mc.report_html import HELPED, HURT, chart_rows
from mc.train import TrainConfig, train

torch.set_num_threads(1)
runner = CliRunner()
NO_TEST_CLIPS = 5  # the class whose test clips the fixture data drops


def _drop_test_clips(path: Path, label: int) -> Path:
    """Rewrite a toy pyskl file so that ``label`` has training clips but no test clips."""
    with open(path, "rb") as fh:
        data = pickle.load(fh)  # our own file, written just before
    split = dict(data["split"])
    split["test"] = [sid for sid in split["test"] if not sid.startswith(f"c{label:02d}_")]
    return write_pyskl(path, data["annotations"], split)


def _train(out: Path, data: Path, epochs: int = 3, **kw) -> Path:
    train(TrainConfig(data=data, out=out, preset="tiny", epochs=epochs, frames=16, batch_size=12, threads=1,
                      progress=False, text_cache=out.parent / "cache", **kw))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A CE-only baseline (given descriptions, as `--no-contrastive` runs are), a contrastive run on
    the same data and descriptions, and two runs that must not be compared with them."""
    root = tmp_path_factory.mktemp("report")
    data = _drop_test_clips(toy_pyskl(root / "toy.pkl"), NO_TEST_CLIPS)
    desc = toy_descriptions(root / "desc")
    five = toy_pyskl(root / "five.pkl", num_classes=5)
    other = _drop_test_clips(toy_pyskl(root / "other.pkl"), 4)
    return {
        "root": root, "desc": desc,
        "base": _train(root / "base", data, descriptions=desc, contrastive=False),
        "run": _train(root / "run", data, descriptions=desc),
        "five": _train(root / "five", five, epochs=1),
        "other": _train(root / "other", other, epochs=1),
    }


def _confusion(run: Path) -> np.ndarray:
    rows = list(csv.reader((run / "confusion.csv").read_text().splitlines()))
    return np.array([[int(v) for v in row[1:]] for row in rows[1:]])


def _expected_accuracy(run: Path) -> list[float | None]:
    """Per-class accuracy from the saved test scores (argmax against labels), not from metrics.json."""
    with np.load(run / "test_scores.npz") as z:
        pred, labels = z["scores"].argmax(1), z["labels"]
    return [float((pred[labels == c] == c).mean()) if (labels == c).any() else None
            for c in range(_confusion(run).shape[0])]


def _report(*args: str) -> dict:
    res = runner.invoke(app, ["report", "classes", *map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_json_numbers_order_and_confusions_match_the_runs(runs):
    report = _report(runs["base"], runs["run"])
    base_acc, run_acc = _expected_accuracy(runs["base"]), _expected_accuracy(runs["run"])
    confusion, base_confusion = _confusion(runs["run"]), _confusion(runs["base"])
    assert base_acc == pytest.approx(json.loads((runs["base"] / "metrics.json").read_text())["per_class_accuracy"])
    tg = read_kind(runs["desc"], "Tg").set_index("label")["text"]
    assert report["descriptions"] == str(runs["desc"])  # the description run `run` was trained on
    assert len(report["classes"]) == 6
    for cls in report["classes"]:
        c = cls["label"]
        assert cls["support"] == confusion[c].sum()
        assert cls["baseline_accuracy"] == pytest.approx(base_acc[c])
        assert cls["run_accuracy"] == pytest.approx(run_acc[c])
        if c == NO_TEST_CLIPS:  # n/a, not 0
            assert (cls["support"], cls["baseline_accuracy"], cls["run_accuracy"], cls["delta"]) == (
                0, None, None, None)
        else:
            assert cls["delta"] == pytest.approx(run_acc[c] - base_acc[c])
        assert cls["gloss"] == f"sign{c}" and [d["text"] for d in cls["descriptions"]["Tg"]] == [tg[c]]
        assert [(d["body_parts"], d["status"]) for d in cls["descriptions"]["Tp"]] == [
            (["right_hand"], "ok"), (["body", "face"], "ok")]
        others = sorted((-confusion[c, o], o) for o in range(6) if o != c and confusion[c, o])[:3]
        assert [(o["label"], o["count"]) for o in cls["confused_with"]] == [(o, -n) for n, o in others]
        for o in cls["confused_with"]:
            assert o["share"] == pytest.approx(o["count"] / confusion[c].sum())
            assert o["baseline_count"] == base_confusion[c, o["label"]]
            assert o["gloss"] == f"sign{o['label']}"
            assert [d["text"] for d in o["descriptions"]["Tg"]] == [tg[o["label"]]]
    # most hurt first, ties by label, classes without test clips last
    keys = [(c["delta"] is None, c["delta"] or 0.0, c["label"]) for c in report["classes"]]
    assert keys == sorted(keys) and report["classes"][-1]["label"] == NO_TEST_CLIPS
    deltas = [c["delta"] for c in report["classes"] if c["delta"] is not None]
    s = report["summary"]
    assert (s["helped"], s["hurt"], s["unchanged"], s["without_test_clips"]) == (
        sum(d > 0 for d in deltas), sum(d < 0 for d in deltas), sum(d == 0 for d in deltas), 1)
    assert s["mean_delta"] == pytest.approx(np.mean(deltas))
    assert report["run"]["contrastive"] is True and report["baseline"]["contrastive"] is False


def test_descriptions_default_from_a_ce_runs_checkpoint_and_confused_limit(runs):
    """A CE-only run has no text bank in metrics.json; its checkpoint's config names the descriptions."""
    assert json.loads((runs["base"] / "metrics.json").read_text())["text_bank"] is None
    report = _report(runs["run"], runs["base"], "--confused", "1")
    assert report["descriptions"] == str(runs["desc"])
    assert all(len(c["confused_with"]) <= 1 for c in report["classes"])
    assert any(c["confused_with"] for c in report["classes"] if c["run_accuracy"] is not None
               and c["run_accuracy"] < 1)


def test_classes_without_descriptions_are_named_in_a_note(runs, tmp_path):
    part = toy_descriptions(tmp_path / "four", num_classes=4)
    report = _report(runs["base"], runs["run"], "--descriptions", part)
    assert report["notes"] == [f"2 of 6 classes have no Tg/Tp rows in {part} (4, 5)"]
    bare = {c["label"]: c for c in report["classes"]}
    assert bare[4]["descriptions"] == {"Tg": [], "Tp": []} and bare[4]["gloss"] is None
    assert bare[3]["gloss"] == "sign3"


def _broken_confusion(runs) -> list[str]:
    copy = runs["root"] / "broken"
    if not copy.exists():
        shutil.copytree(runs["run"], copy)
        lines = (copy / "confusion.csv").read_text().splitlines()
        lines[2] = lines[2].replace(",", ";", 2)
        (copy / "confusion.csv").write_text("\n".join(lines) + "\n")
    return [runs["base"], copy, "--json"]


def _moved_descriptions(runs) -> list[str]:
    """A run whose recorded description folder is gone."""
    copy = runs["root"] / "moved"
    if not copy.exists():
        shutil.copytree(runs["run"], copy)
        metrics = json.loads((copy / "metrics.json").read_text())
        metrics["text_bank"]["run_dir"] = str(runs["root"] / "gone")
        (copy / "metrics.json").write_text(json.dumps(metrics))
    return [runs["base"], copy, "--json"]


BAD = {
    "class count": (lambda r: [r["base"], r["five"], "--json"], r"has 6 classes but .*five has 5"),
    "label set": (lambda r: [r["base"], r["other"], "--json"],
                  r"different classes \(only in .*base: 4; only in .*other: 5\)"),
    "missing run": (lambda r: [r["base"], r["root"] / "nope", "--json"], r"nope: no such folder"),
    "not a run": (lambda r: [r["base"], r["desc"], "--json"], r"desc: not a finished training run \(no metrics.json"),
    "bad confusion": (_broken_confusion, r"confusion.csv: line 3 is not class 1 followed by 6 counts"),
    "bad descriptions": (lambda r: [r["base"], r["run"], "--descriptions", r["root"], "--json"],
                         r"neither a description run nor a folder with a LATEST pointer"),
    "none recorded": (lambda r: [r["other"], r["other"], "--json"],
                      r"other: .*record no description run; pass --descriptions"),
    "descriptions gone": (_moved_descriptions, r"moved: trained on the descriptions .*gone, which are not there"),
    "no output": (lambda r: [r["base"], r["run"]], r"give --html FILE .* and/or --json"),
    "html is a folder": (lambda r: [r["base"], r["run"], "--html", r["root"]], r"--html .*: is a folder"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(runs, case):
    args, pattern = BAD[case]
    res = runner.invoke(app, ["report", "classes", *map(str, args(runs))])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert res.stdout == ""


def _linguist_descriptions(root: Path, src: Path) -> Path:
    """The toy run with Chinese and Turkish rows, a text that tries to be HTML, and a failed Tg."""
    out = root / "desc-multi"
    for kind in ("Tb", "Ts", "Tg", "Tp"):
        df = read_kind(src, kind)
        df.loc[df["label"] == 0, ["gloss", "lang"]] = ["谢谢", "zh"]
        df.loc[df["label"] == 1, ["gloss", "lang"]] = ["açıkmak", "tr"]
        df.loc[df["label"] == 2, "gloss"] = '<i id="gloss-injected">$x$</i>'  # markup, and mathtext to matplotlib
        if kind == "Tg":
            df.loc[df["label"] == 0, "text"] = "右手掌心向下，从胸前向右平移。"
            df.loc[df["label"] == 1, "text"] = "Sağ el, gövdenin önünde yukarı ve sağa doğru kayar; İ ı ğ ş."
            df.loc[df["label"] == 2, "text"] = '<b id="injected">bold</b><script>document.title="pwned"</script>'
            df.loc[df["label"] == 3, ["text", "status", "error"]] = [None, "failed", "quality: echoes the gloss"]
        write_kind(out, kind, df)
    return out


def test_html_page_renders_in_chromium(runs, tmp_path):
    desc = _linguist_descriptions(tmp_path, runs["desc"])
    page = tmp_path / "page" / "classes.html"
    res = runner.invoke(app, ["report", "classes", str(runs["base"]), str(runs["run"]), "--descriptions", str(desc),
                              "--html", str(page)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(page) and "helped" in res.stderr
    assert sorted(p.name for p in page.parent.iterdir()) == ["classes.html"]  # no temp file left behind
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # self-contained: nothing fetched

    png = screenshot(page, tmp_path / "classes.png", height=2600)
    pixels = (imread(png)[..., :3] * 255).round()
    assert (pixels < 250).any(axis=2).mean() > 0.02  # not a blank page
    report = _report(runs["base"], runs["run"], "--descriptions", desc)
    bar_colours = {HELPED if c["delta"] > 0 else HURT for c in report["classes"] if c["delta"]}
    for colour in bar_colours:  # each coloured bar of the chart is on screen
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).max(axis=2) <= 8).sum() > 50, colour

    dom = rendered_dom(page)
    for c in range(6):
        assert f'id="class-{c}"' in dom
    for text in ("谢谢", "右手掌心向下，从胸前向右平移。", "açıkmak", "İ ı ğ ş", "quality: echoes the gloss",
                 "right_hand", "the body and face stay neutral", "n/a"):
        assert text in dom, text
    assert '<b id="injected"' not in dom and '&lt;b id="injected"&gt;' in dom  # LLM text shown, never run
    assert "<i id=" not in dom and '&lt;i id="gloss-injected"&gt;$x$&lt;/i&gt;' in dom
    assert "<title>Class report" in dom and "pwned" not in dom.split("</title>")[0]
    chart = re.search(r'<figure class="chart" id="delta-chart".*?</figure>', dom, re.S)
    assert chart and "<svg" in chart.group(0)
    shown = [c for c in report["classes"] if c["delta"] is not None]
    assert chart.group(0).count("<text") >= len(shown) and "0 谢谢" in chart.group(0)
    assert '2 &lt;i id="gloss-injected"&gt;$x$' in chart.group(0)  # the gloss as written, not as mathtext
    assert f"class-{NO_TEST_CLIPS}" not in chart.group(0)
    # the page's overview lists the classes in the report's order
    order = [int(m) for m in re.findall(r'<a href="#class-(\d+)">', dom)]
    assert order == [c["label"] for c in report["classes"]]


def test_chart_keeps_the_most_hurt_and_most_helped_when_there_are_many_classes():
    classes = [{"label": i, "delta": (i - 50) / 100} for i in range(100)] + [{"label": 100, "delta": None}]
    rows, partial = chart_rows(classes, max_bars=10)
    assert partial and [r["label"] for r in rows] == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    rows, partial = chart_rows(classes[:8], max_bars=10)
    assert not partial and len(rows) == 8
