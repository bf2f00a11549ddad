"""Zero-shot recognition of held-out signs and text → clip retrieval, on real toy data: a real
`gsp train --holdout-classes` run (CLI, in process), the run's own text encoder, `gsp eval
--zero-shot`, `gsp retrieve`, and the refusals (one line, exit 2)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_data import toy_descriptions, toy_pyskl
from typer.testing import CliRunner

from cli.main import app
from gsp.schema import KINDS, read_kind, write_kind
from gsp.settings import get_settings
from mc.train import TrainConfig, setup
from mc.zeroshot import (
    ClassTexts,
    clip_dataset,
    combine_terms,
    derangement,
    evaluate_zero_shot,
    held_out_texts,
    load_run,
    resolve_holdout,
    retrieve,
    zero_shot_scores,
)

torch.set_num_threads(1)
HELD_OUT = [2, 5, 7]
TRAIN_ARGS = ["--epochs", "2", "--base-channels", "4", "--frames", "16", "--batch-size", "12", "--threads", "1",
              "--no-progress"]


def gsp(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *words: str) -> str:
    assert result.exit_code == 2, result.output
    # stderr may also carry the mc logger's INFO lines (data checked, coverage); the error is one line
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Toy data of 8 classes, their descriptions, and one GSP-MC run holding out classes 2, 5, 7."""
    root = tmp_path_factory.mktemp("zeroshot")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GSP_ARTIFACTS_DIR", str(root / "artifacts"))
        get_settings.cache_clear()
        data = toy_pyskl(root / "toy.pkl", num_classes=8, per_class=6, test_per_class=3, frames=16)
        desc = toy_descriptions(root / "desc", num_classes=8)
        result = gsp("train", "--data", data, "--descriptions", desc, "--holdout-classes", "2,5,7",
                     "--out", root / "run", *TRAIN_ARGS)
        assert result.exit_code == 0, result.output
        get_settings.cache_clear()
    return {"root": root, "data": Path(data), "desc": Path(desc), "run": root / "run",
            "cache": root / "artifacts" / "cache"}


@pytest.fixture
def shared_cache(world, monkeypatch):
    """The module's text-feature cache, so each test does not re-encode the same texts."""
    monkeypatch.setenv("GSP_CACHE_DIR", str(world["cache"]))
    get_settings.cache_clear()
    return world["cache"]


def test_held_out_classes_never_reach_training(world, shared_cache):
    metrics = json.loads((world["run"] / "metrics.json").read_text())
    assert metrics["holdout_classes"] == HELD_OUT and "seen" in metrics["test_classes"]
    assert metrics["train_samples"] == 5 * 6 and metrics["test_samples"] == 5 * 3
    assert [metrics["per_class_accuracy"][c] for c in HELD_OUT] == [None] * 3  # no held-out test clip scored
    assert metrics["num_classes"] == 8  # outputs keep their label ids
    assert metrics["text_bank"]["coverage"]["num_classes"] == 5
    run = load_run(world["run"])
    assert run.meta["trained_labels"] == [0, 1, 3, 4, 6]
    # The dataset and text batches the trainer builds for this config: no held-out clip, no held-out text.
    cfg = TrainConfig(**{**json.loads(run.ckpt["train_config"]), "out": world["root"] / "setup-only",
                         "text_cache": shared_cache, "progress": False})
    state = setup(cfg)
    assert not set(state.train_ds.labels.tolist()) & set(HELD_OUT)
    assert not set(state.test_ds.labels.tolist()) & set(HELD_OUT)
    texts = state.learner.bank.batch_texts(torch.as_tensor(state.train_ds.labels), torch.Generator().manual_seed(0))
    used = {int(v) for feats in [texts.global_, texts.synonyms, *texts.parts.values()] for v in feats[1]}
    assert used == {0, 1, 3, 4, 6}
    # Plain evaluation of the run also leaves the held-out classes out.
    result = gsp("eval", world["run"], "--json", "--out", world["root"] / "plain-eval")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_samples"] == 15


def test_zero_shot_eval_reports_scores_chance_and_control(world, shared_cache):
    result = gsp("eval", world["run"], "--zero-shot", "--json")
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    for key in ("top1", "top5", "num_classes", "chance", "chance_top5", "control", "holdout_classes"):
        assert key in m, key
    assert m["holdout_classes"] == HELD_OUT and m["num_classes"] == 3 and m["num_samples"] == 9
    assert m["chance"] == pytest.approx(1 / 3) and m["chance_top5"] == 1.0
    for v in (m["top1"], m["top5"], m["control"]["top1"], m["control"]["top5"], *m["top1_by_term"].values()):
        assert 0.0 <= v <= 1.0
    assert m["top5"] == 1.0  # three candidates: the true one is always among the top 5
    perm = m["control"]["permutation"]
    assert sorted(perm) == HELD_OUT and all(p != c for p, c in zip(perm, HELD_OUT))
    assert json.loads((world["run"] / "zeroshot-test" / "metrics.json").read_text())["top1"] == m["top1"]
    # The same numbers by a second path: the library's scores of the held-out test clips.
    run = load_run(world["run"])
    texts, _ = held_out_texts(run, world["desc"], shared_cache)
    ds, _ = clip_dataset(run, None, "test", HELD_OUT)
    scores, target = zero_shot_scores(run.model, ds, texts)
    assert scores.shape == (9, 3) and sorted(set(target.tolist())) == [0, 1, 2]
    assert m["top1"] == pytest.approx(float((scores.argmax(1) == target).mean()))
    control = evaluate_zero_shot(world["run"], shared_cache, write=False)["control"]
    assert control["top1"] == m["control"]["top1"]  # the derangement is seeded

    table = gsp("eval", world["run"], "--zero-shot")
    assert table.exit_code == 0 and "shuffled control" in table.output and "chance" in table.output


def test_score_combination_is_the_mean_of_the_available_terms():
    cos_tg = torch.tensor([[0.9, 0.1, 0.0]])
    cos_p = torch.tensor([[0.3, 0.7, 0.0]])
    cosines = {"Tg": (cos_tg, torch.tensor([True, True, False])),
               "Tp:right_hand": (cos_p, torch.tensor([True, False, False]))}
    scores = combine_terms(cosines)
    assert scores[0, 0] == pytest.approx(0.6) and scores[0, 1] == pytest.approx(0.1) and scores[0, 2] == -np.inf
    texts = ClassTexts([4, 8, 9], {"Tg": (torch.eye(3), torch.tensor([True, False, True]))})
    assert texts.classes_without_texts() == [8]
    assert texts.permuted([2, 0, 1]).terms["Tg"][1].tolist() == [True, True, False]


def test_holdout_choice_is_seeded_and_checked():
    labels = list(range(0, 92, 2))  # 46 sparse label ids, like the demo signs' class ids
    held = resolve_holdout(labels, fraction=0.2, seed=0)
    assert len(held) == 9 and set(held) <= set(labels) and held == sorted(held)
    assert resolve_holdout(labels, fraction=0.2, seed=0) == held
    assert any(resolve_holdout(labels, fraction=0.2, seed=s) != held for s in (1, 2, 3))
    assert resolve_holdout(labels) == []
    for n in (2, 3, 9):
        for seed in range(5):
            perm = derangement(n, seed)
            assert sorted(perm.tolist()) == list(range(n)) and not (perm == np.arange(n)).any()


def test_train_refuses_bad_holdout_options(world, tmp_path):
    out = tmp_path / "never"
    base = ["train", "--data", world["data"], "--out", out, *TRAIN_ARGS]
    one_line_error(gsp(*base, "--holdout-classes", "2,5", "--holdout-fraction", "0.2"), "exclude each other")
    one_line_error(gsp(*base, "--holdout-classes", "2,99"), "--holdout-classes", "99")
    one_line_error(gsp(*base, "--holdout-classes", "2"), "at least 2")
    one_line_error(gsp(*base, "--holdout-fraction", "0.1"), "--holdout-fraction", "at least 2")
    one_line_error(gsp(*base, "--holdout-classes", "two"), "--holdout-classes")
    one_line_error(gsp(*base, "--holdout-fraction", "1.5"), "--holdout-fraction")
    assert not out.exists()  # refused before the run folder is made


def test_zero_shot_refusals(world, shared_cache, tmp_path):
    # descriptions lacking every text of held-out class 5
    partial = tmp_path / "partial"
    for kind in KINDS:
        rows = read_kind(world["desc"], kind).to_dict("records")
        write_kind(partial, kind, [r for r in rows if r["label"] != 5])
    one_line_error(gsp("eval", world["run"], "--zero-shot", "--descriptions", partial), "held-out", "5 (sign5)")
    one_line_error(gsp("eval", world["run"], "--descriptions", world["desc"]), "--zero-shot")
    # a run that held nothing out, and a CE-only run
    seen_all = tmp_path / "seen-all"
    assert gsp("train", "--data", world["data"], "--descriptions", world["desc"], "--out", seen_all,
               *TRAIN_ARGS, "--epochs", "1").exit_code == 0
    one_line_error(gsp("eval", seen_all, "--zero-shot"), "held out no classes")
    ce = tmp_path / "ce"
    assert gsp("train", "--data", world["data"], "--holdout-classes", "2,5", "--out", ce, *TRAIN_ARGS,
               "--epochs", "1").exit_code == 0
    one_line_error(gsp("eval", ce, "--zero-shot", "--descriptions", world["desc"]), "CE-only")
    one_line_error(gsp("retrieve", "the right hand moves up", "--run", ce), "CE-only")


def test_zero_shot_eval_names_a_bad_clip_and_skip_bad_leaves_it_out(world, shared_cache, tmp_path):
    import pickle

    data = pickle.loads(world["data"].read_bytes())
    for clip in ("c02_s06", "c00_s06"):  # test clips of a held-out class and of a seen one
        bad = next(a for a in data["annotations"] if a["frame_dir"] == clip)
        bad["keypoint"][0, 3, 7, 0] = np.nan
    broken = tmp_path / "broken.pkl"
    broken.write_bytes(pickle.dumps(data))
    one_line_error(gsp("eval", world["run"], "--zero-shot", "--data", broken, "--out", tmp_path / "e1"),
                   "c02_s06", "--skip-bad")
    result = gsp("eval", world["run"], "--zero-shot", "--data", broken, "--skip-bad", "--json",
                 "--out", tmp_path / "e2")
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    # only the evaluated classes' bad clips count as left out: the seen class's is not this eval's
    assert m["num_samples"] == 8 and [s["sample_id"] for s in m["skipped"]] == ["c02_s06"]
    assert "non-finite" in m["skipped"][0]["reason"] and m["skipped"][0]["label"] == 2
    seen = gsp("eval", world["run"], "--data", broken, "--skip-bad", "--json", "--out", tmp_path / "e3")
    assert seen.exit_code == 0, seen.output
    m = json.loads(seen.stdout)
    assert m["num_samples"] == 5 * 3 - 1 and [s["sample_id"] for s in m["skipped"]] == ["c00_s06"]

def test_retrieval_ranks_clips_by_cosine(world, shared_cache):
    hits = retrieve(world["run"], None, "The right hand moves straight towards the up.", k=4)
    assert len(hits) == 4 and [h["rank"] for h in hits] == [1, 2, 3, 4]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    test_ids = {sid for sid in clip_dataset(load_run(world["run"]), None, "test")[0].sample_ids}
    assert all(h["sample_id"] in test_ids and h["name"] == f"sign{h['label']}" for h in hits)
    assert len(retrieve(world["run"], None, "a hand", k=500)) == 24  # every test clip, no more

    result = gsp("retrieve", "the right hand moves up", "--run", world["run"], "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    assert [h["rank"] for h in json.loads(result.stdout)] == [1, 2, 3]
    printed = gsp("retrieve", "the right hand moves up", "--run", world["run"], "-k", "2")
    assert printed.exit_code == 0 and len(printed.stdout.strip().splitlines()) == 2
    one_line_error(gsp("retrieve", "  ", "--run", world["run"]), "query is empty")
