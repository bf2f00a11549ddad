"""`gsp diff` and `gsp git-setup` on constructed run pairs: what a linguist sees change between two
description runs in the terminal, as JSON, in a browser (headless Chromium) and in a real `git diff`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from browser import rendered_dom, screenshot
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from gsp.atomic import write_json_atomic
from gsp.diff import diff_summary_markdown, word_diff
from gsp.schema import KINDS, row_key, write_kind

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
runner = CliRunner()

HOSTILE = "Both hands <b>tap</b> twice [bold]x[/bold] <script>document.body.innerHTML='pwned'</script>"


def row(label, kind, text, variant=0, parts=(), gloss=None, lang="en", status="ok", error=None):
    return {"key": row_key(label, kind, variant), "label": label, "gloss": gloss or f"SIGN{label}", "lang": lang,
            "kind": kind, "variant": variant, "text": text if status == "ok" else None, "body_parts": list(parts),
            "status": status, "error": error, "sources": [], "model": "m", "prompt_id": "P", "prompt_sha": "s"}


def write_run(run_dir: Path, rows: list[dict], model="model-a", p3_sha="aaaa1111") -> Path:
    for kind in KINDS:
        write_kind(run_dir, kind, [r for r in rows if r["kind"] == kind])
    prompts = {"P1": {"id": "P1_primary@1", "sha": "1111"}, "P3": {"id": "P3_refine@1", "sha": p3_sha}}
    write_json_atomic(run_dir / "manifest.json", {"run_id": run_dir.name, "model": model, "prompts": prompts})
    return run_dir


def reverse_rows(path: Path) -> None:
    """Write a parquet file's rows in the opposite order (what a run written in another order holds)."""
    table = pq.read_table(path)
    pq.write_table(table.take(list(range(table.num_rows - 1, -1, -1))), path)


OLD_ROWS = [
    row(0, "Tb", "Wave the right hand."),
    row(0, "Tg", "The right hand waves at shoulder height."),
    row(0, "Ts", "the dominant hand waves", 0), row(0, "Ts", "a hand waving hello", 1),
    row(0, "Tp", "the right hand waves side to side", 0, ["right_hand"]),
    row(0, "Tp", "the body and face stay calm", 1, ["body", "face"]),
    row(1, "Tg", "Sağ el açık tutulur ve yukarı kalkar.", gloss="açılmak", lang="tr"),
    row(2, "Tg", "右手向右移动，身体保持不动", gloss="谢谢", lang="zh"),
    row(3, "Tg", "Both hands move apart and stop.", gloss="BYE"),
    row(5, "Tb", "The flat hand pushes forward.", gloss="STOP"),
]


def new_rows():
    rows = [dict(r) for r in OLD_ROWS if r["label"] != 3]  # BYE's Tg is gone
    by_key = {r["key"]: r for r in rows}
    by_key["000000:Tp:00"]["body_parts"] = ["right_hand", "face"]  # same text, one more part
    by_key["000000:Tp:01"]["body_parts"] = ["face", "body"]  # same parts, listed in another order
    by_key["000001:Tg:00"]["text"] = "Sağ el kapalı tutulur ve yukarı kalkar."
    by_key["000002:Tg:00"]["text"] = "右手向上移动，身体保持不动"
    by_key["000005:Tb:00"].update(status="failed", text=None, error="quality: gloss echoed back")
    rows.append(row(4, "Tg", HOSTILE, gloss="THANKS"))
    return rows


@pytest.fixture
def runs(tmp_path):
    old = write_run(tmp_path / "descriptions" / "run-a", OLD_ROWS)
    new = write_run(tmp_path / "descriptions" / "run-b", new_rows(), model="model-b", p3_sha="bbbb2222")
    for kind in ("Tg", "Ts"):
        reverse_rows(new / f"{kind}.parquet")
    return old, new


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def diff_json(*args):
    result = cli("diff", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_rows_are_matched_by_key_added_removed_changed_and_reordered(runs):
    old, new = runs
    assert pq.read_table(new / "Ts.parquet").column("key").to_pylist()[0] == "000000:Ts:01"  # really reordered
    out = diff_json(old, new)
    got = {c["key"]: c["change"] for c in out["changes"]}
    assert got == {"000000:Tp:00": "changed", "000001:Tg:00": "changed", "000002:Tg:00": "changed",
                   "000003:Tg:00": "removed", "000004:Tg:00": "added", "000005:Tb:00": "removed"}
    counts = out["summary"]["counts"]
    assert counts["Ts"] == {"added": 0, "removed": 0, "changed": 0, "unchanged": 2}
    assert counts["Tg"] == {"added": 1, "removed": 1, "changed": 2, "unchanged": 1}
    assert out["summary"]["totals"]["unchanged"] == 5
    assert out["summary"]["signs_touched"] == 6 and out["summary"]["touched_labels"] == [0, 1, 2, 3, 4, 5]


def test_json_has_the_documented_shape(runs):
    out = diff_json(*runs)
    assert set(out) == {"summary", "changes"}
    documented = {"key", "label", "gloss", "kind", "change", "old", "new", "old_body_parts", "new_body_parts"}
    for c in out["changes"]:
        assert documented <= set(c) and c["change"] in {"added", "removed", "changed"}
    added = next(c for c in out["changes"] if c["change"] == "added")
    assert added == {"key": "000004:Tg:00", "label": 4, "gloss": "THANKS", "kind": "Tg", "change": "added",
                     "old": None, "new": HOSTILE, "old_body_parts": [], "new_body_parts": [],
                     "old_status": "absent", "new_status": "ok", "old_contrast_with": None,
                     "new_contrast_with": None}
    parts = next(c for c in out["changes"] if c["key"] == "000000:Tp:00")
    assert parts["old"] == parts["new"] and parts["old_body_parts"] == ["right_hand"]
    assert parts["new_body_parts"] == ["right_hand", "face"]


def test_a_failed_row_has_no_text_and_the_output_says_so(runs):
    out = diff_json(*runs)
    stop = next(c for c in out["changes"] if c["key"] == "000005:Tb:00")
    assert (stop["change"], stop["new"], stop["new_status"]) == ("removed", None, "failed")
    assert out["summary"]["failed_rows"] == {"old": 0, "new": 1}
    assert any("failed rows count as no text" in n for n in out["summary"]["notes"])
    text = cli("diff", *runs).stdout
    assert "failed — no text (quality: gloss echoed back)" in text


def test_manifests_give_model_and_prompt_changes(runs):
    summary = diff_json(*runs)["summary"]
    assert summary["model"] == {"old": "model-a", "new": "model-b", "changed": True}
    assert summary["prompts"] == [{"prompt": "P3", "old": {"id": "P3_refine@1", "sha": "aaaa1111"},
                                   "new": {"id": "P3_refine@1", "sha": "bbbb2222"}}]
    text = cli("diff", *runs).stdout
    assert "model: model-a → model-b" in text
    assert "P3: P3_refine@1 (sha aaaa1111) → P3_refine@1 (sha bbbb2222)" in text


def test_word_level_for_turkish_and_character_level_for_chinese():
    old, new = word_diff("Sağ el açık tutulur.", "Sağ el kapalı tutulur.")
    assert ("delete", "açık") in old and ("insert", "kapalı") in new  # whole words, ı and ğ inside them
    assert old[0] == ("equal", "Sağ el ")
    old, new = word_diff("右手向右移动，身体保持不动", "右手向上移动，身体保持不动")
    assert old == [("equal", "右手向"), ("delete", "右"), ("equal", "移动，身体保持不动")]
    assert new == [("equal", "右手向"), ("insert", "上"), ("equal", "移动，身体保持不动")]
    # Decomposed letters (i + combining dot) stay inside their word.
    old, new = word_diff("el açi\u0307k", "el kapalı")
    assert old == [("equal", "el "), ("delete", "açi\u0307k")]


def test_terminal_output_shows_changes_per_sign_and_hides_unchanged(runs):
    result = cli("diff", *runs)
    assert result.exit_code == 0, result.output
    text = result.stdout
    for gloss in ("açılmak · label 1", "谢谢 · label 2", "BYE · label 3", "THANKS · label 4"):
        assert gloss in text
    assert "Sağ el kapalı tutulur ve yukarı kalkar." in text and "右手向上移动" in text
    assert "body parts: right_hand → right_hand, face" in text
    assert "[bold]x[/bold]" in text  # an LLM's text is printed as it is, never read as rich markup
    assert "000000:Tg:00" not in text and "000000:Tp:01" not in text
    same = cli("diff", runs[0], runs[0])
    assert same.exit_code == 0 and "No description changed." in same.stdout and " · label " not in same.stdout
    shown_all = cli("diff", *runs, "--all").stdout
    assert "000000:Tg:00" in shown_all and "000000:Tp:01" in shown_all


def test_filters(runs):
    def keys(*args):
        return sorted(c["key"] for c in diff_json(*runs, *args)["changes"])

    assert keys("--kind", "Tb") == ["000005:Tb:00"]
    assert keys("--label", "2") == ["000002:Tg:00"]
    assert keys("--gloss", "AÇILMAK") == ["000001:Tg:00"]  # Turkish capitals: I is ı's capital
    assert keys("--gloss", "谢谢") == ["000002:Tg:00"]
    assert keys("--gloss", "nothing") == []
    assert keys("--part", "face") == ["000000:Tp:00"]
    assert keys("--part", "face", "--all") == ["000000:Tp:00", "000000:Tp:01"]
    assert keys("--kind", "Tg", "--label", "0", "--all") == ["000000:Tg:00"]
    summary = diff_json(*runs, "--kind", "Tg")["summary"]
    assert summary["kinds"] == ["Tg"] and summary["filters"] == {"kind": "Tg"}


def test_descriptions_root_and_single_parquet_files(runs, tmp_path):
    old, new = runs
    (old.parent / "LATEST").write_text("run-b\n")
    assert diff_json(old, old.parent)["summary"]["new"] == str(new)  # the root means its LATEST run
    out = diff_json(old / "Tg.parquet", new / "Tg.parquet")
    assert sorted(c["key"] for c in out["changes"]) == ["000001:Tg:00", "000002:Tg:00", "000003:Tg:00",
                                                          "000004:Tg:00"]
    assert out["summary"]["kinds"] == ["Tg"] and out["summary"]["model"] is None
    assert any("single parquet file: it has no manifest" in n for n in out["summary"]["notes"])
    mixed = diff_json(old, new / "Tp.parquet")  # a run against one file: that file's kind only
    assert [c["key"] for c in mixed["changes"]] == ["000000:Tp:00"]


def test_html_page_in_chromium(runs, tmp_path):
    page = tmp_path / "diff.html"
    result = cli("diff", *runs, "--html", page)
    assert result.exit_code == 0, result.output
    assert f"wrote {page}" in result.stdout
    html = page.read_text(encoding="utf-8")
    assert "<link" not in html and "<script" not in html and "http" not in html.lower()  # self-contained

    png = screenshot(page, tmp_path / "diff.png", width=1280, height=1800)
    with Image.open(png) as img:
        assert img.size == (1280, 1800)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert png.stat().st_size > 20_000 and len(colours) > 50  # text and badges were painted, not a blank page

    dom = rendered_dom(page)
    assert "pwned" not in dom.split("<body", 1)[1].split("&lt;script&gt;", 1)[0]  # no script ran
    assert "&lt;script&gt;document.body.innerHTML='pwned'&lt;/script&gt;" in dom
    assert dom.index('id="summary"') < dom.index('id="sign-0"')  # the summary on top
    for key, change in (("000000:Tp:00", "changed"), ("000001:Tg:00", "changed"), ("000002:Tg:00", "changed"),
                        ("000003:Tg:00", "removed"), ("000004:Tg:00", "added"), ("000005:Tb:00", "removed")):
        assert f'data-key="{key}" data-change="{change}"' in dom
    assert 'data-key="000000:Tg:00"' not in dom  # unchanged rows are hidden
    assert dom.count('<section class="sign"') == 6
    assert "<del>açık</del>" in dom and "<ins>kapalı</ins>" in dom
    assert "<del>右</del>" in dom and "<ins>上</ins>" in dom
    assert 'lang="tr"' in dom and 'lang="zh"' in dom
    assert "failed — no text (quality: gloss echoed back)" in dom
    assert "body parts: right_hand, <ins>face</ins>" in dom


def test_textconv_is_stable_and_sorted(runs):
    old, new = runs
    cmd = [str(VENV_BIN / "gsp"), "diff", "--textconv", str(new / "Tg.parquet")]
    first, second = (subprocess.run(cmd, capture_output=True, text=True, check=True).stdout for _ in range(2))
    assert first == second
    lines = first.splitlines()
    assert [ln.split()[0] for ln in lines] == ["000000:Tg:00", "000001:Tg:00", "000002:Tg:00", "000004:Tg:00"]
    assert lines[1] == "000001:Tg:00  açılmak  Sağ el kapalı tutulur ve yukarı kalkar."
    tp = cli("diff", "--textconv", new / "Tp.parquet").stdout.splitlines()
    assert tp[0] == "000000:Tp:00  SIGN0  [right_hand, face]  the right hand waves side to side"
    tb = cli("diff", "--textconv", new / "Tb.parquet").stdout.splitlines()
    assert tb[1] == "000005:Tb:00  STOP  FAILED: quality: gloss echoed back"


def _git_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "GIT_CONFIG_GLOBAL": str(tmp_path / "gitconfig"),
                "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org", "GIT_PAGER": "cat"})
    return env


def test_git_setup_and_a_real_git_diff(runs, tmp_path):
    old, new = runs
    env = _git_env(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()

    def sh(*args, cwd=repo):
        return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, check=False)

    assert sh("git", "init", "-q").returncode == 0
    setup = sh(str(VENV_BIN / "gsp"), "git-setup", str(repo))
    assert setup.returncode == 0, setup.stderr
    assert len(setup.stdout.splitlines()) == 1 and "added '*.parquet diff=gsp'" in setup.stdout
    assert (repo / ".gitattributes").read_text() == "*.parquet diff=gsp\n"
    assert sh("git", "config", "--get", "diff.gsp.textconv").stdout.strip() == "gsp diff --textconv"

    again = sh(str(VENV_BIN / "gsp"), "git-setup", str(repo))
    assert again.returncode == 0 and "nothing changed" in again.stdout
    assert (repo / ".gitattributes").read_text() == "*.parquet diff=gsp\n"

    desc = repo / "descriptions"
    desc.mkdir()
    (desc / "Tg.parquet").write_bytes((old / "Tg.parquet").read_bytes())
    assert sh("git", "add", ".").returncode == 0 and sh("git", "commit", "-qm", "old").returncode == 0
    (desc / "Tg.parquet").write_bytes((new / "Tg.parquet").read_bytes())
    shown = sh("git", "diff")
    assert shown.returncode == 0, shown.stderr
    assert "Binary files" not in shown.stdout
    assert "-000001:Tg:00  açılmak  Sağ el açık tutulur ve yukarı kalkar." in shown.stdout
    assert "+000001:Tg:00  açılmak  Sağ el kapalı tutulur ve yukarı kalkar." in shown.stdout
    assert "-000003:Tg:00  BYE  Both hands move apart and stop." in shown.stdout
    assert " 000000:Tg:00  SIGN0  The right hand waves at shoulder height." in shown.stdout  # context, unchanged
    assert sh("git", "diff", "--word-diff").stdout.count("[-açık-]{+kapalı+}") == 1


def test_git_setup_never_clobbers_another_setting(tmp_path):
    env = _git_env(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, env=env, check=True)
    subprocess.run(["git", "config", "diff.gsp.textconv", "other-tool"], cwd=repo, env=env, check=True)
    proc = subprocess.run([str(VENV_BIN / "gsp"), "git-setup", str(repo)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "already 'other-tool'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (repo / ".gitattributes").exists()  # nothing written when refusing

    subprocess.run(["git", "config", "--unset", "diff.gsp.textconv"], cwd=repo, env=env, check=True)
    (repo / ".gitattributes").write_text("*.parquet diff=parquet-tool\n")
    proc = subprocess.run([str(VENV_BIN / "gsp"), "git-setup", str(repo)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "*.parquet diff=parquet-tool" in proc.stderr
    assert (repo / ".gitattributes").read_text() == "*.parquet diff=parquet-tool\n"

    (repo / ".gitattributes").write_text("*.txt text")  # no final newline: ours goes on a line of its own
    done = subprocess.run([str(VENV_BIN / "gsp"), "git-setup", str(repo)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (repo / ".gitattributes").read_text() == "*.txt text\n*.parquet diff=gsp\n"


def test_summary_markdown_for_the_flow(runs):
    md = diff_summary_markdown(*runs, first=2)
    assert "| Tg | 1 | 1 | 2 | 1 |" in md
    assert "**6** sign(s) touched." in md and "First 2 of 6 change(s):" in md
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| `0000")]
    assert [ln.split("`")[1] for ln in table_rows] == ["000000:Tp:00", "000001:Tg:00"]
    assert "Model: `model-a` → `model-b`." in md
    hostile = diff_summary_markdown(runs[0], runs[1], first=10)
    assert "<script>" not in hostile and "&lt;script&gt;" in hostile


def _bad(tmp_path, runs):
    old, new = runs
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("hello")
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pq.read_table(old / "Tg.parquet").select(["key", "text"]), foreign)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    return [
        (["diff", tmp_path / "missing", new], f"{tmp_path / 'missing'}: no such file or folder"),
        (["diff", empty_dir, new], f"{empty_dir}: neither a description run"),
        (["diff", not_parquet, new / "Tg.parquet"], f"{not_parquet}: not a readable parquet file"),
        (["diff", foreign, new / "Tg.parquet"], f"{foreign}: not a description parquet of gsp's schema"),
        (["diff", old / "Tg.parquet", new / "Tp.parquet"], "holds Tg rows but"),
        (["diff", old, new, "--kind", "Tx"], "--kind 'Tx': unknown kind; choose one of Tb, Ts, Tg, Tp"),
        (["diff", old, new, "--part", "lefthand"], "--part 'lefthand': unknown body part (did you mean 'left_hand'?); "
                                                   "choose one of body, left_hand, right_hand, mouth, face"),
        (["diff", old / "Tg.parquet", new / "Tg.parquet", "--kind", "Tp"], "the files given hold Tg rows only"),
        (["diff", old], "gsp diff needs two sides"),
        (["diff", old, new, "--kind", "Tg", "--part", "face"], "--part face: only Tp rows name body parts"),
        (["diff", old, new, "--html", empty_dir], f"--html {empty_dir}: is a folder"),
        (["diff", old, new, "--html", not_parquet / "page.html"], f"{not_parquet / 'page.html'}: cannot write there"),
        (["diff", "--textconv", not_parquet], f"{not_parquet}: not a readable parquet file"),
        (["diff", "--textconv", foreign], f"{foreign}: not a description parquet"),
        (["git-setup", empty_dir], f"{empty_dir}: not inside a git work tree"),
    ]


def test_every_bad_input_is_one_line_and_exit_2(runs, tmp_path):
    env = _git_env(tmp_path)
    env["GIT_CEILING_DIRECTORIES"] = str(tmp_path)  # tmp_path may sit inside someone's repository
    for args, expected in _bad(tmp_path, runs):
        proc = subprocess.run([str(VENV_BIN / "gsp"), *map(str, args)], env=env, capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == "", (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, lines)


def test_generation_flow_publishes_its_diff_against_the_previous_latest_run(tmp_path, monkeypatch):
    """Reviewers see in the Prefect UI what a new run changed, without running anything."""
    import asyncio

    from fake_openai import FakeOpenAI
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows import use_local_prefect
    from gsp.settings import get_settings

    root = Path(__file__).resolve().parents[1]
    vocab = tmp_path / "vocab.csv"
    vocab.write_text("\n".join((root / "knowledge_base" / "demo_vocab.csv").read_text().splitlines()[:3]) + "\n")
    runs = tmp_path / "runs"
    use_local_prefect()
    from flows.gsp_flow import gsp_flow

    async def diff_artifacts() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gsp-description-diff"])))

    with FakeOpenAI() as srv:
        monkeypatch.setenv("GSP_LLM_BASE_URL", srv.base_url)
        before = len(asyncio.run(diff_artifacts()))
        for model in ("fake-a", "fake-b"):  # another model: other answers from the fake server
            monkeypatch.setenv("GSP_LLM_MODEL", model)
            get_settings.cache_clear()
            asyncio.run(gsp_flow(vocab=str(vocab), use_index=False, out_dir=str(runs)))
    published = asyncio.run(diff_artifacts())
    assert len(published) == before + 1  # the first run had nothing to compare with
    markdown = max(published, key=lambda a: a.created).data
    assert "fake-a" in markdown and "fake-b" in markdown and "changed" in markdown
