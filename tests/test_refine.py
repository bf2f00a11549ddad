"""Confusion-driven refinement (`gsp generate --refine-confused TRAIN_RUN --top N`, prompt P5): a
training run folder written by mc.evaluate's own writers, a base run generated against the
loopback chat server with the real demo index; what reaches the server is counted, the P5 prompts
are read, the new run is compared with its base row by row and through `gsp diff --json`, and a
plain re-run keeps the refinement. Every bad input is one line with exit status 2."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_openai import FakeOpenAI, client_env
from toy_data import rows_by_key
from typer.testing import CliRunner

from cli.main import app
from gsp.atomic import write_json_atomic
from gsp.generate import GenerationError, contrast_partners, prepare_refine
from gsp.schema import LATEST_POINTER, REVIEW_FILE, read_manifest, read_review, resolve_run_dir
from gsp.settings import PROJECT_ROOT, get_settings
from gsp.vocab import load_vocabulary
from mc.evaluate import write_eval_outputs
from mc.report import confused_pairs, load_run
from mc.run_folder import claim_eval_folder

VOCAB = PROJECT_ROOT / "knowledge_base" / "demo_vocab.csv"
BASE_LABELS = (0, 2, 4, 14, 53)  # sister, hungry, brother, mother, full (demo dictionary entries)
NUM_CLASSES = 54
#: (true class, predicted class, clips). Pairs: (0,4) 3+2=5, (2,53) 2+2=4, (0,2) 3, (14,20) 2, (0,1) 1.
#: Class 20 (father) is in the vocabulary but not in the base run; class 1 is not in the vocabulary.
CONFUSIONS = [(0, 4, 3), (4, 0, 2), (2, 53, 2), (53, 2, 2), (0, 2, 3), (14, 20, 2), (1, 0, 1)]
REFINED = {0: 4, 4: 0, 2: 53, 53: 2}  # --top 2: each sign and the sign it is rewritten against
TB_NOTE = "it never says the hand is a fist"


def training_run(folder: Path, confusions=CONFUSIONS, trained_on: Path | None = None) -> Path:
    """A training run's test outputs as mc.evaluate writes them: two correct clips of every class
    involved, plus the confused clips; the scores' argmax is the predicted class. ``trained_on``:
    the description run its metrics record (as a contrastive run's text bank does)."""
    clips = [(c, c, 2) for c in sorted({c for t, p, _ in confusions for c in (t, p)})] + list(confusions)
    labels, preds = [], []
    for true, pred, n in clips:
        labels += [true] * n
        preds += [pred] * n
    scores = np.full((len(labels), NUM_CLASSES), -5.0, dtype=np.float32)
    scores[np.arange(len(labels)), preds] = 5.0
    root = claim_eval_folder(folder).root
    metrics = write_eval_outputs(root, scores, np.asarray(labels), [f"clip{i:03d}" for i in range(len(labels))],
                                 NUM_CLASSES)
    if trained_on is not None:
        metrics["text_bank"] = {"run_dir": str(trained_on)}
    write_json_atomic(root / "metrics.json", metrics)
    return root


def cli_env(srv: FakeOpenAI, tmp_path: Path) -> dict[str, str]:
    return client_env(srv, tmp_path, api_key="sk-refine-test")


def gsp(env: dict[str, str], *args: object):
    """One `gsp` command in this process (the retriever's model stays loaded between commands); the
    settings are read from ``env`` afresh, as a new process would."""
    get_settings.cache_clear()
    unset = {k: None for k in os.environ if k.startswith(("GSP_", "PREFECT_")) and k not in env}
    return CliRunner().invoke(app, [str(a) for a in args], env={**unset, **env})


def generate(env, index: Path, out: Path, *extra: object):
    return gsp(env, "generate", "--vocab", VOCAB, "--index", index, "--no-ingest", "--no-prefect", "--out", out,
               *extra)


def between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


@pytest.fixture(scope="module")
def srv():
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def generated(srv, tmp_path_factory, demo_index):
    """A base run of five signs (and its response cache), generated once; each sign's P1 passages
    as P1 was shown them."""
    root = tmp_path_factory.mktemp("refine-base")
    proc = generate(cli_env(srv, root), demo_index, root / "descriptions", "--labels", ",".join(map(str, BASE_LABELS)))
    assert proc.exit_code == 0, proc.output[-3000:]
    p1 = {}
    for record in srv.records:
        body = srv.bodies[record.body_hash]
        if body["response_format"]["json_schema"]["name"] == "Tb_P1":
            user = body["messages"][-1]["content"]
            p1[user.splitlines()[0].removeprefix("Sign: ")] = between(user, "Dictionary passages:\n",
                                                                       "\n\nWrite the primary")
    return root, p1


@pytest.fixture
def base(srv, generated, tmp_path):
    """A test's own copy of the base run in tmp/descriptions and of its cache; the server's records cleared."""
    root, p1 = generated
    for name in ("descriptions", "cache"):
        shutil.copytree(root / name, tmp_path / name)
    srv.reset()
    return cli_env(srv, tmp_path), resolve_run_dir(tmp_path / "descriptions"), p1


def test_the_ranking_of_pairs_and_one_rewrite_per_sign(tmp_path):
    matrix = load_run(training_run(tmp_path / "train")).confusion
    assert confused_pairs(matrix, 3) == [(0, 4, 5), (2, 53, 4), (0, 2, 3)]
    assert confused_pairs(matrix, 99) == [(0, 4, 5), (2, 53, 4), (0, 2, 3), (14, 20, 2), (0, 1, 1)]
    # sign 0 is in two pairs: rewritten once, against brother (its most confused); hungry against full
    assert contrast_partners(confused_pairs(matrix, 3)) == {0: (4, 5), 4: (0, 5), 2: (53, 4), 53: (2, 4)}
    assert contrast_partners([(2, 0, 3), (4, 0, 3)]) == {0: (2, 3), 2: (0, 3), 4: (0, 3)}  # ties: lower labels
    with pytest.raises(ValueError):
        confused_pairs(matrix, 0)
    # the library call refuses top 0 itself (it chose no pair and blamed the base run for it)
    with pytest.raises(GenerationError, match=r"^top 0: must be at least 1"):
        prepare_refine(VOCAB, confused_pairs(matrix), settings=get_settings(), top=0, out_dir=tmp_path / "none")


def test_refine_rewrites_exactly_the_top_pairs_and_carries_the_rest(srv, base, tmp_path, demo_index):
    env, base_run, p1_passages = base
    train = training_run(tmp_path / "train")
    proc = generate(env, demo_index, tmp_path / "descriptions", "--refine-confused", train, "--top", 2)
    assert proc.exit_code == 0, proc.output[-3000:]
    new_run = resolve_run_dir(tmp_path / "descriptions")  # LATEST moved to the new run
    assert new_run != base_run and (new_run.parent / LATEST_POINTER).read_text().strip() == new_run.name
    entries = {e.label: e for e in load_vocabulary(VOCAB).entries}

    # exactly one P5 and one P4 per sign of the two top pairs reached the server; nothing for carried rows
    assert srv.requests() == sorted([(entries[s].describe(), name) for s in REFINED for name in ("Tg_P5", "Tp_P4")])
    before, after = rows_by_key(base_run), rows_by_key(new_run)
    for record in srv.records:
        body = srv.bodies[record.body_hash]
        if body["response_format"]["json_schema"]["name"] != "Tg_P5":
            continue
        user = body["messages"][-1]["content"]
        sign = next(s for s in REFINED if user.startswith(f"Sign: {entries[s].describe()}\n"))
        other = entries[REFINED[sign]]
        assert f"The sign it is confused with: {other.describe()}" in user
        for label in (sign, other.label):  # both signs' retrieved passages and current descriptions
            assert p1_passages[entries[label].describe()] in user
            assert before[f"{label:06d}:Tg:00"]["text"] in user
        assert "entry: " in between(user, "Its dictionary passages:", "The sign it is confused")
        assert "entry: " in between(user, "That sign's dictionary passages:", "Rewrite the description")

    refined = {k for k, r in {**before, **after}.items() if r["label"] in REFINED and r["kind"] in ("Tg", "Tp")}
    carried = set(before) - refined
    assert carried == set(after) - refined and len(carried) > 20
    old, new = (pd.DataFrame([rows_[k] for k in sorted(carried)]) for rows_ in (before, after))
    pd.testing.assert_frame_equal(old, new)  # unchanged, created_at and tokens included

    for sign, other in REFINED.items():
        tg = after[f"{sign:06d}:Tg:00"]
        assert (tg["prompt_id"], tg["contrast_with"], tg["status"]) == ("P5.v1", f"{other}:{entries[other].gloss}",
                                                                        "ok")
        assert tg["text"] != before[f"{sign:06d}:Tg:00"]["text"]
        chunk_ids = {s["chunk_id"] for s in tg["sources"]}
        for label in (sign, other):  # grounded on both signs' passages (what P1 retrieved for each)
            assert {s["chunk_id"] for s in before[f"{label:06d}:Tb:00"]["sources"]} <= chunk_ids
        parts = [r for k, r in after.items() if k.startswith(f"{sign:06d}:Tp:")]
        assert parts and all(p["prompt_id"] == "P4.v2" and p["contrast_with"] == tg["contrast_with"] for p in parts)
    assert all(after[k]["contrast_with"] is None for k in carried)

    manifest = read_manifest(new_run)
    assert manifest["refine"]["pairs"] == [{"a": 0, "b": 4, "count": 5, "glosses": ["abla", "agabey"]},
                                           {"a": 2, "b": 53, "count": 4, "glosses": ["acikmak", "dolu"]}]
    assert {r["label"]: r["contrast_with"] for r in manifest["refine"]["refined"]} == REFINED
    assert manifest["refine"]["base_run"] == str(base_run) and manifest["refine"]["carried_rows"] == len(carried)
    assert manifest["requests"] == 8 and manifest["cached_responses"] == 0
    assert manifest["prompts"]["P5"]["id"] == "P5.v1" and "refined 4 sign(s)" in proc.stdout

    page = tmp_path / "diff.html"
    diff = gsp(env, "diff", base_run, new_run, "--json", "--html", page)
    assert diff.exit_code == 0, diff.output
    changes = json.loads(diff.stdout)["changes"]
    assert {c["key"] for c in changes} == refined
    assert {c["change"] for c in changes if c["kind"] == "Tg"} == {"changed"}
    assert {c["key"]: (c["old_contrast_with"], c["new_contrast_with"]) for c in changes if c["kind"] == "Tg"} == {
        f"{sign:06d}:Tg:00": (None, f"{other}:{entries[other].gloss}") for sign, other in REFINED.items()}
    html = page.read_text(encoding="utf-8")
    assert all(f"rewritten to be told apart from {other}:{entries[other].gloss}" in html for other in REFINED.values())
    # the review sheet says which sign each refined text must be told apart from
    sheet = tmp_path / "review.csv"
    assert gsp(env, "review", "export", new_run, "-o", sheet).exit_code == 0
    lines = list(csv.DictReader(io.StringIO(sheet.read_text(encoding="utf-8-sig"))))
    assert {r["key"]: r["contrast_with"] for r in lines if r["contrast_with"]} == {
        k: after[k]["contrast_with"] for k in refined if after[k]["status"] == "ok"}

    # a plain re-run into the folder (its base: the refined run) keeps the refinement, with no request
    srv.reset()
    proc = generate(env, demo_index, tmp_path / "descriptions", "--labels", ",".join(map(str, BASE_LABELS)))
    assert proc.exit_code == 0, proc.output[-3000:]
    again = rows_by_key(resolve_run_dir(tmp_path / "descriptions"))
    assert srv.records == []
    assert {k: (r["text"], r["contrast_with"]) for k, r in again.items()} == {
        k: (r["text"], r["contrast_with"]) for k, r in after.items()}


def test_a_pair_with_a_sign_the_base_leaves_out_is_passed_over_and_the_next_refined(srv, base, tmp_path,
                                                                                     demo_index, caplog):
    """The base describes five of the demo vocabulary's signs; a pair with father (20) has nothing to
    rewrite, so `--top 4` refines the four best pairs it can and says which one it passed over."""
    env, base_run, _ = base
    confusions = [c for c in CONFUSIONS if c != (1, 0, 1)] + [(14, 53, 1)]  # (14, 53) ranks after (14, 20)
    proc = generate(env, demo_index, tmp_path / "descriptions", "--refine-confused",
                    training_run(tmp_path / "train", confusions), "--top", 4)
    assert proc.exit_code == 0, proc.output[-3000:]
    [warning] = [r.getMessage() for r in caplog.records if "passed over" in r.getMessage()]
    assert f"{base_run}: passed over 1 confused pair(s)" in warning and "(14, 20) (2 clip(s))" in warning
    refine = read_manifest(resolve_run_dir(tmp_path / "descriptions"))["refine"]
    assert [(p["a"], p["b"], p["count"]) for p in refine["pairs"]] == [(0, 4, 5), (2, 53, 4), (0, 2, 3), (14, 53, 1)]
    assert [(p["a"], p["b"], p["count"], p["glosses"]) for p in refine["passed_over"]] == [
        (14, 20, 2, ["anne", "baba"])]
    assert {r["label"]: r["contrast_with"] for r in refine["refined"]} == {**REFINED, 14: 53}
    entries = {e.label: e for e in load_vocabulary(VOCAB).entries}
    assert srv.requests() == sorted([(entries[s].describe(), name) for s in (*REFINED, 14)
                                     for name in ("Tg_P5", "Tp_P4")])
    # without a pair passed over no warning is printed, and the manifest lists none
    srv.reset()
    caplog.clear()
    proc = generate(env, demo_index, tmp_path / "other", "--base", base_run, "--refine-confused",
                    training_run(tmp_path / "train2"), "--top", 2)
    assert proc.exit_code == 0 and "passed over" not in caplog.text, proc.output[-3000:]
    assert read_manifest(resolve_run_dir(tmp_path / "other"))["refine"]["passed_over"] == []


def write_review(path: Path, decisions: list[tuple[str, str, str]]) -> Path:
    buf = io.StringIO()
    csv.writer(buf).writerows([["key", "decision", "edited_text", "reviewer", "note"],
                               *[[k, d, "", "ayse", note] for k, d, note in decisions]])
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def test_the_base_runs_review_is_carried_and_a_rejected_tg_note_reaches_p5(srv, base, tmp_path, demo_index):
    env, base_run, _ = base
    sheet = write_review(tmp_path / "review.csv", [("000000:Tg:00", "reject", TB_NOTE),
                                                   ("000014:Tb:00", "approve", ""),
                                                   ("000004:Tg:00", "approve", "")])
    assert gsp(env, "review", "apply", base_run, sheet).exit_code == 0
    proc = generate(env, demo_index, tmp_path / "elsewhere", "--base", base_run,
                    "--refine-confused", training_run(tmp_path / "train"), "--top", 1)
    assert proc.exit_code == 0, proc.output[-3000:]
    new_run = resolve_run_dir(tmp_path / "elsewhere")
    asked = {u.splitlines()[0]: u for u in (srv.bodies[r.body_hash]["messages"][-1]["content"] for r in srv.records)
             if "confused with" in u}
    sister, brother = asked["Sign: sister (Turkish gloss: abla)"], asked["Sign: brother (Turkish gloss: agabey)"]
    assert TB_NOTE in sister and TB_NOTE not in brother
    # the rejected Tg is not shown as sister's current description; brother's approved one is
    tg = rows_by_key(base_run)
    assert tg["000000:Tg:00"]["text"] not in sister and tg["000004:Tg:00"]["text"] in sister
    after = rows_by_key(new_run)
    assert (after["000000:Tg:00"]["review"], after["000000:Tg:00"]["review_note"]) == ("regenerated", TB_NOTE)
    # decisions on carried rows travel with the run; those on rewritten rows do not
    assert {k: d["decision"] for k, d in read_review(new_run).items()} == {"000014:Tb:00": "approve"}
    assert (base_run / REVIEW_FILE).is_file() and len(read_review(base_run)) == 3


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_bad_inputs_are_one_line_and_exit_2(srv, base, tmp_path, demo_index):
    env, base_run, _ = base
    train = training_run(tmp_path / "train")

    def refine(*args: object):
        return gsp(env, "generate", "--vocab", VOCAB, "--index", demo_index, "--no-ingest", "--no-prefect",
                   "--out", tmp_path / "descriptions", *args)

    no_confusion = tmp_path / "unfinished"
    no_confusion.mkdir()
    (no_confusion / "metrics.json").write_text(json.dumps({"per_class_accuracy": [1.0]}), encoding="utf-8")
    assert "no confusion.csv" in one_error_line(refine("--refine-confused", no_confusion))
    assert "--top 0: must be at least 1" in one_error_line(refine("--refine-confused", train, "--top", 0))
    line = one_error_line(refine("--refine-confused", train, "--top", 5))
    assert "the confused pair (0, 1) (1 clip(s)) has class 1, which is not in the vocabulary" in line
    father = training_run(tmp_path / "father", [(14, 20, 2)])  # class 20 is not in the base run
    line = one_error_line(refine("--refine-confused", father))
    assert f"{base_run}: describes no confused pair of {father} whole" in line
    line = one_error_line(refine("--refine-confused", train, "--top", 2, "--out", tmp_path / "empty"))
    assert "no description run to refine" in line and "--base RUN" in line
    assert "--top needs --refine-confused" in one_error_line(refine("--top", 3))
    assert "do not apply with --refine-confused" in one_error_line(refine("--refine-confused", train,
                                                                          "--labels", "0,4"))
    assert srv.records == [] and [p.name for p in (tmp_path / "descriptions").iterdir() if p.is_dir()] == [
        base_run.name]


def test_the_prefect_flow_refines_as_the_library_does(srv, base, tmp_path, demo_index):
    """`gsp generate --refine-confused` runs the flow behind the gsp/refine deployment by default
    (on a local Prefect server): the same requests and the same rows as the plain library call."""
    env, base_run, _ = base
    train = training_run(tmp_path / "train")

    def refine_by_flow(top: int) -> subprocess.CompletedProcess:  # a process of its own, as a user runs it
        args = ["generate", "--vocab", VOCAB, "--index", demo_index, "--no-ingest", "--out", tmp_path / "descriptions",
                "--refine-confused", train, "--top", top]
        return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], env=env, cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=300)

    proc = refine_by_flow(2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Beginning flow run 'refine' for flow 'gsp'" in proc.stderr
    assert env["GSP_LLM_API_KEY"] not in proc.stdout + proc.stderr
    entries = {e.label: e for e in load_vocabulary(VOCAB).entries}
    assert srv.requests() == sorted([(entries[s].describe(), name) for s in REFINED for name in ("Tg_P5", "Tp_P4")])
    flow_run = resolve_run_dir(tmp_path / "descriptions")
    assert flow_run != base_run
    summary_end = f"status: complete; manifest: {flow_run / 'manifest.json'}"  # printed once, on stdout
    assert proc.stdout.count(summary_end) == 1 and summary_end not in proc.stderr
    assert {r["label"]: r["contrast_with"] for r in read_manifest(flow_run)["refine"]["refined"]} == REFINED
    # bad input through the flow: exit status 2, the error in one line, no traceback, nothing written
    bad = refine_by_flow(5)
    assert bad.returncode == 2 and "Traceback" not in bad.stdout + bad.stderr, bad.stderr[-3000:]
    [line] = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert "the confused pair (0, 1) (1 clip(s)) has class 1, which is not in the vocabulary" in line
    assert resolve_run_dir(tmp_path / "descriptions") == flow_run

    srv.reset()  # the library call on the same base: every answer now comes from the cache
    library = generate(env, demo_index, tmp_path / "library", "--base", base_run, "--refine-confused", train,
                       "--top", 2)
    assert library.exit_code == 0, library.output[-3000:]
    assert srv.records == []
    def content(run_dir: Path) -> dict[str, tuple]:
        return {k: (r["text"], r["contrast_with"], r["prompt_id"], r["status"],
                    None if r["body_parts"] is None else list(r["body_parts"]))
                for k, r in rows_by_key(run_dir).items()}

    assert content(flow_run) == content(resolve_run_dir(tmp_path / "library"))


def test_the_cli_states_the_librarys_default_top():
    from cli.generate import DEFAULT_TOP as CLI_DEFAULT
    from gsp.generate import DEFAULT_TOP

    assert CLI_DEFAULT == DEFAULT_TOP


def test_refining_another_run_than_the_model_was_trained_on_is_said(srv, base, tmp_path, demo_index, caplog):
    """LATEST may have moved since the training: the refinement says so in one warning line and
    records both runs, and is quiet when the base is the run the model was trained on."""
    env, base_run, _ = base
    same = generate(env, demo_index, tmp_path / "descriptions", "--refine-confused",
                    training_run(tmp_path / "train", trained_on=base_run), "--top", 2)
    assert same.exit_code == 0, same.output[-3000:]
    assert "was trained on" not in caplog.text
    first = resolve_run_dir(tmp_path / "descriptions")
    assert read_manifest(first)["refine"]["trained_on"] == str(base_run)

    other = generate(env, demo_index, tmp_path / "descriptions", "--refine-confused",
                     training_run(tmp_path / "train2", trained_on=base_run), "--top", 2)  # LATEST is `first` now
    assert other.exit_code == 0, other.output[-3000:]
    [line] = [r.getMessage() for r in caplog.records if "was trained on" in r.getMessage()]
    assert f"refining {first}, but " in line and f"was trained on {base_run}" in line and "--base" in line
    manifest = read_manifest(resolve_run_dir(tmp_path / "descriptions"))
    assert (manifest["refine"]["base_run"], manifest["refine"]["trained_on"]) == (str(first), str(base_run))


def test_the_vocabulary_defaults_to_the_one_the_base_run_was_generated_from(srv, base, tmp_path, demo_index):
    env, base_run, _ = base
    train = training_run(tmp_path / "train")

    def refine(*args: object):
        return gsp(env, "generate", "--index", demo_index, "--no-ingest", "--no-prefect",
                   "--out", tmp_path / "descriptions", "--refine-confused", train, "--top", 2, *args)

    # the base run records VOCAB (path and sha256): no --vocab asks the same requests as with it
    proc = refine()
    assert proc.exit_code == 0, proc.output[-3000:]
    entries = {e.label: e for e in load_vocabulary(VOCAB).entries}
    assert srv.requests() == sorted([(entries[s].describe(), name) for s in REFINED for name in ("Tg_P5", "Tp_P4")])
    refined = resolve_run_dir(tmp_path / "descriptions")
    assert read_manifest(refined)["vocabulary"]["path"] == str(VOCAB)

    # a vocabulary file changed since the base run was generated from it is refused, in one line
    changed = tmp_path / "vocab.csv"
    shutil.copy(VOCAB, changed)
    manifest = read_manifest(refined)
    manifest["vocabulary"]["path"] = str(changed)
    write_json_atomic(refined / "manifest.json", manifest)
    with changed.open("a", encoding="utf-8") as fh:
        fh.write("999,yeni,new\n")
    line = one_error_line(refine())
    assert f"{changed}: changed since {refined} was generated from it" in line and "--vocab" in line
    changed.unlink()  # one that is gone (or a relative path read from elsewhere): named, with the way out
    line = one_error_line(refine())
    assert str(changed) in line and f"the vocabulary {refined} records" in line and "--vocab" in line
    manifest["vocabulary"] = "autsl.csv"  # not what gsp writes: still one line, no traceback
    write_json_atomic(refined / "manifest.json", manifest)
    assert f"{refined}: its manifest records no vocabulary" in one_error_line(refine())
    assert "--vocab is required" in one_error_line(gsp(env, "generate", "--no-index", "--no-prefect"))
