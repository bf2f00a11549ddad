"""Nothing a user points at is deleted: `gsp ingest --index`, `gsp synth --out` and
`gsp train --out` replace only what the project made (or an empty folder, or nothing), refuse
anything else with one line and exit 2, and leave the refused path byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from toy_data import toy_pyskl
from typer.testing import CliRunner

from cli.main import app
from gsp.index import MANIFEST_FILE

GSP = str(Path(sys.executable).with_name("gsp"))


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under root (hidden ones too) with the sha256 of each file."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def user_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "thesis.txt").write_text("years of work\n", encoding="utf-8")
    (path / "sub" / "data.bin").write_bytes(os.urandom(256))
    (path / ".hidden").write_text("also mine", encoding="utf-8")
    return path


def refused(result, *names: str) -> str:
    """Exit 2, no traceback, and one error line that names the path(s)."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert len(errors) == 1, result.output
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def gsp(*args: str):
    return CliRunner().invoke(app, list(args))


# --- gsp ingest --index ---------------------------------------------------------------------


def test_ingest_refuses_a_user_folder_as_index(demo_kb, tmp_path):
    mine = user_folder(tmp_path / "mine")
    before = tree(mine)
    line = refused(gsp("ingest", str(demo_kb), "--index", str(mine), "-q"), str(mine))
    assert "is not empty and is not an index made by gsp ingest" in line
    assert tree(mine) == before
    assert siblings(tmp_path) == ["kb", "mine"]


def test_ingest_refuses_a_folder_whose_manifest_is_not_an_index(demo_kb, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / MANIFEST_FILE).write_text(json.dumps({"run_id": "x", "status": "complete"}), encoding="utf-8")
    (run / "Tb.parquet").write_bytes(b"PAR1 not really")
    before = tree(run)
    refused(gsp("ingest", str(demo_kb), "--index", str(run), "-q"), str(run))
    assert tree(run) == before


def test_ingest_into_the_knowledge_base_itself_deletes_nothing(demo_kb, tmp_path):
    """The reported case: `gsp ingest kb --index kb` used to delete the dictionaries and exit 0."""
    before = tree(demo_kb)
    proc = subprocess.run([GSP, "ingest", str(demo_kb), "--index", str(demo_kb), "-q"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and str(demo_kb) in errors[0] and "knowledge-base folder" in errors[0], proc.stderr
    assert tree(demo_kb) == before
    assert siblings(tmp_path) == ["kb"]


def test_ingest_refuses_an_index_inside_the_knowledge_base(demo_kb, tmp_path):
    before = tree(demo_kb)
    line = refused(gsp("ingest", str(demo_kb), "--index", str(demo_kb / "index"), "-q"), str(demo_kb / "index"))
    assert "inside the knowledge-base folder" in line
    assert tree(demo_kb) == before


def test_ingest_refuses_an_index_that_contains_the_knowledge_base(demo_kb, tmp_path):
    before = tree(tmp_path)
    line = refused(gsp("ingest", str(demo_kb), "--index", str(tmp_path), "-q"), str(tmp_path))
    assert "contains the knowledge-base folder" in line
    assert tree(tmp_path) == before


def test_ingest_refuses_a_file_as_index(demo_kb, tmp_path):
    target = tmp_path / "index"
    target.write_bytes(b"my notes, not an index")
    line = refused(gsp("ingest", str(demo_kb), "--index", str(target), "-q"), str(target))
    assert "is a file" in line
    assert target.read_bytes() == b"my notes, not an index"
    assert siblings(tmp_path) == ["index", "kb"]


def test_users_dot_old_folder_survives_ingest_reingest_and_recovery(demo_kb, tmp_path):
    index = tmp_path / "index"
    old = user_folder(tmp_path / "index.old")
    before = tree(old)
    first = gsp("ingest", str(demo_kb), "--index", str(index), "-q")
    assert first.exit_code == 0, first.output
    assert tree(old) == before
    # Re-ingest replaces the index (ours) and is incremental: nothing is embedded again.
    again = gsp("ingest", str(demo_kb), "--index", str(index), "-q")
    assert again.exit_code == 0, again.output
    manifest = json.loads((index / MANIFEST_FILE).read_text(encoding="utf-8"))
    assert manifest["counts"]["embedded_chunks"] == 0
    assert manifest["counts"]["reused_chunks"] == manifest["counts"]["chunks"] > 0
    assert tree(old) == before
    # No index any more: a search must not "recover" the user's .old folder as the index.
    for p in sorted(index.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    index.rmdir()
    search = gsp("search", "love", "--index", str(index))
    assert search.exit_code == 2 and "gsp ingest" in search.output
    assert not index.exists() and tree(old) == before
    assert siblings(tmp_path) == ["index.old", "kb"]


def test_ingest_into_an_empty_folder_builds_the_index(demo_kb, tmp_path):
    index = tmp_path / "empty"
    index.mkdir()
    result = gsp("ingest", str(demo_kb), "--index", str(index), "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((index / MANIFEST_FILE).read_text(encoding="utf-8"))["counts"]["chunks"] > 0
    assert siblings(tmp_path) == ["empty", "kb"]  # no staging or backup folder left behind


@pytest.fixture
def index_copy(demo_index, tmp_path) -> Path:
    """A private copy of the session's demo index, safe to (fail to) replace."""
    index = tmp_path / "index"
    index.mkdir()
    for f in demo_index.iterdir():
        (index / f.name).write_bytes(f.read_bytes())
    return index


def test_empty_knowledge_base_is_an_error_and_keeps_the_index(index_copy, tmp_path):
    index = index_copy
    before = tree(index)
    empty_kb = tmp_path / "kb"
    empty_kb.mkdir()
    (empty_kb / "readme.txt").write_text("no PDFs here", encoding="utf-8")
    line = refused(gsp("ingest", str(empty_kb), "--index", str(index), "-q"), str(empty_kb))
    assert "no .pdf files" in line
    assert tree(index) == before


def test_knowledge_base_without_any_text_keeps_the_index(index_copy, tmp_path):
    index = index_copy
    before = tree(index)
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "notes.pdf").write_text("not a PDF at all", encoding="utf-8")
    result = gsp("ingest", str(kb), "--index", str(index), "-q")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "notes.pdf" in result.output  # the failure of the document itself
    assert f"{index.resolve()} left as it was" in result.output
    assert tree(index) == before


# --- gsp synth --out ------------------------------------------------------------------------

SMALL_SYNTH = ["--samples-per-class", "2", "--signers", "2", "--test-signers", "1", "--frames", "8"]


def test_synth_refuses_to_overwrite_a_file_it_did_not_write(tmp_path):
    mine = tmp_path / "annotations.pkl"
    toy_pyskl(mine, num_classes=2, per_class=1, test_per_class=1, frames=4)  # a real pyskl data set
    before = mine.read_bytes()
    line = refused(gsp("synth", "--out", str(mine), *SMALL_SYNTH), str(mine))
    assert "not a synthetic data set" in line
    assert mine.read_bytes() == before
    text = tmp_path / "notes.txt"
    text.write_text("mine", encoding="utf-8")
    refused(gsp("synth", "--out", str(text), *SMALL_SYNTH), str(text))
    assert text.read_text(encoding="utf-8") == "mine"
    assert siblings(tmp_path) == ["annotations.pkl", "notes.txt"]


def test_synth_refuses_a_folder_as_out(tmp_path):
    folder = user_folder(tmp_path / "data")
    before = tree(folder)
    line = refused(gsp("synth", "--out", str(folder), *SMALL_SYNTH), str(folder))
    assert "is a folder" in line
    assert tree(folder) == before


def test_synth_overwrites_its_own_data_set(tmp_path):
    from demo.synthetic import is_synthetic_dataset
    from mc.data import load_samples

    out = tmp_path / "skeletons.pkl"
    first = gsp("synth", "--out", str(out), *SMALL_SYNTH)
    assert first.exit_code == 0, first.output
    assert is_synthetic_dataset(out)
    again = gsp("synth", "--out", str(out), *SMALL_SYNTH, "--seed", "1")
    assert again.exit_code == 0, again.output
    assert len(load_samples(out, split="test")) > 0


# --- gsp train --out ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return toy_pyskl(tmp_path_factory.mktemp("data") / "toy.pkl", num_classes=3, per_class=4, test_per_class=2,
                     frames=12)


def _train(data: Path, out: Path, epochs: int):
    return gsp("train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--epochs", str(epochs),
               "--frames", "8", "--batch-size", "4", "--base-channels", "4", "--threads", "1", "--no-progress")


def test_train_refuses_a_non_empty_foreign_folder(tmp_path, tiny_data):
    mine = user_folder(tmp_path / "mine")
    (mine / "metrics.json").write_text('{"my": "metrics"}', encoding="utf-8")
    before = tree(mine)
    line = refused(_train(tiny_data, mine, 1), str(mine))
    assert "not a gsp training run" in line
    assert tree(mine) == before
    target = tmp_path / "file"
    target.write_text("mine", encoding="utf-8")
    refused(_train(tiny_data, target, 1), str(target))
    assert target.read_text(encoding="utf-8") == "mine"


def test_train_resumes_in_its_own_run_folder(tmp_path, tiny_data):
    out = tmp_path / "run"
    first = _train(tiny_data, out, 1)
    assert first.exit_code == 0, first.output
    second = _train(tiny_data, out, 2)
    assert second.exit_code == 0, second.output
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["resumed_from_epoch"] == 1 and len(metrics["history"]) == 2
    # A run folder from before the marker existed (a checkpoint, no marker) is still ours.
    (out / ".gsp-run").unlink()
    third = _train(tiny_data, out, 2)
    assert third.exit_code == 0, third.output
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["resumed_from_epoch"] == 2


def test_resume_refuses_settings_that_change_what_the_run_computes(tmp_path, tiny_data):
    out = tmp_path / "run"
    assert _train(tiny_data, out, 1).exit_code == 0
    before = (out / "checkpoints" / "last.pt").read_bytes()
    changed = gsp("train", "--data", str(tiny_data), "--out", str(out), "--preset", "tiny", "--epochs", "2",
                  "--frames", "16", "--seed", "3", "--batch-size", "4", "--base-channels", "4", "--threads", "1",
                  "--no-progress")
    line = refused(changed, str(out / "checkpoints" / "last.pt"))
    assert "frames: 8 → 16" in line and "seed: 0 → 3" in line and "--no-resume" in line
    assert "batch_size" not in line and "epochs" not in line  # same or resumable: not named
    assert (out / "checkpoints" / "last.pt").read_bytes() == before  # the run is untouched

def test_eval_and_ensemble_refuse_a_foreign_out_folder(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert _train(tiny_data, run, 1).exit_code == 0
    mine = user_folder(tmp_path / "mine")
    (mine / "metrics.json").write_text('{"my": "metrics"}', encoding="utf-8")
    before = tree(mine)
    refused(gsp("eval", str(run), "--out", str(mine)), str(mine))
    refused(gsp("ensemble", str(run), str(run), "--out", str(mine)), str(mine))
    assert tree(mine) == before
    # its own folders are still written (and rewritten)
    for _ in range(2):
        result = gsp("eval", str(run), "--out", str(tmp_path / "eval"))
        assert result.exit_code == 0, result.output
        result = gsp("ensemble", str(run), str(run), "--out", str(tmp_path / "fused"))
        assert result.exit_code == 0, result.output
    assert (tmp_path / "eval" / "test_scores.npz").is_file() and (tmp_path / "fused" / "test_scores.npz").is_file()


# --- found by a second pass of careless inputs ------------------------------------------------


def test_generate_refuses_a_file_or_user_folder_as_out(tmp_path):
    vocab = tmp_path / "v.csv"
    vocab.write_text("ClassId,EN\n1,love\n", encoding="utf-8")
    target = tmp_path / "afile"
    target.write_text("mine", encoding="utf-8")
    args = ["generate", "--vocab", str(vocab), "--no-prefect", "--no-ingest", "--no-index"]
    refused(gsp(*args, "--out", str(target)), str(target))
    assert target.read_text(encoding="utf-8") == "mine"
    mine = user_folder(tmp_path / "mine")
    (mine / "LATEST").write_text("my own pointer", encoding="utf-8")
    before = tree(mine)
    refused(gsp(*args, "--out", str(mine)), str(mine))
    assert tree(mine) == before


def test_unwritable_output_names_the_file_not_a_temp_file(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("mine", encoding="utf-8")
    line = refused(gsp("synth", "--out", str(blocker / "x.pkl"), "--samples-per-class", "8"), str(blocker / "x.pkl"))
    assert ".tmp" not in line and ".pkl." not in line
    assert blocker.read_text(encoding="utf-8") == "mine"


def test_training_refused_for_bad_data_leaves_no_run_folder(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\nc0,x\n", encoding="utf-8")
    out = tmp_path / "run"
    refused(gsp("train", "--data", str(labels), "--out", str(out)), str(labels))
    assert not out.exists()


def test_atomic_artifacts_get_the_umask_mode_and_keep_a_replaced_files_mode(tmp_path):
    """mkstemp makes 0600 files; an artifact must be as readable as any file the user writes."""
    code = ("import os, sys; os.umask(0o027); from gsp.atomic import write_json_atomic; "
            "write_json_atomic(sys.argv[1], {'a': 1})")
    new = tmp_path / "new.json"
    subprocess.run([sys.executable, "-c", code, str(new)], check=True, cwd=Path(__file__).parents[1])
    assert new.stat().st_mode & 0o777 == 0o640
    assert json.loads(new.read_text()) == {"a": 1}
    # the umask of the moment, as open() uses it (a process that tightens it later is obeyed)
    later = ("import os, sys; from gsp.atomic import write_json_atomic; os.umask(0o022); "
             "write_json_atomic(sys.argv[1], {}); os.umask(0o077); write_json_atomic(sys.argv[2], {})")
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    subprocess.run([sys.executable, "-c", later, str(first), str(second)], check=True, cwd=Path(__file__).parents[1])
    assert (first.stat().st_mode & 0o777, second.stat().st_mode & 0o777) == (0o644, 0o600)

    from gsp.atomic import write_json_atomic
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    os.chmod(kept, 0o604)
    write_json_atomic(kept, {"b": 2})
    assert kept.stat().st_mode & 0o777 == 0o604 and json.loads(kept.read_text()) == {"b": 2}


def test_a_description_run_is_published_whole_with_the_umask_mode_and_no_debris(tmp_path):
    """The run's files are written straight into a staging folder and published by one rename
    (gsp.atomic.publish_staged_folder): no per-file temp file may be left, and the files get the
    mode a plain open() gives, not mkstemp's 0600."""
    from fake_openai import FakeOpenAI

    code = ("import os, sys; from pathlib import Path; os.umask(0o027)\n"
            "from gsp.generate import generate_descriptions\nfrom gsp.settings import Settings\n"
            "settings = Settings(paths={'artifacts_dir': Path(sys.argv[2])}, llm={'base_url': sys.argv[1],"
            " 'model': 'fake', 'structured_output': 'json_schema'})\n"
            "run = generate_descriptions(Path('data/vocab/autsl.csv'), settings=settings, use_index=False, limit=3)\n"
            "print(run.run_dir)")
    with FakeOpenAI() as srv:
        done = subprocess.run([sys.executable, "-c", code, srv.base_url, str(tmp_path / "artifacts")],
                              capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in run_dir.iterdir()) == ["Tb.parquet", "Tg.parquet", "Tp.parquet", "Ts.parquet",
                                                         "manifest.json"]
    assert {p.name: p.stat().st_mode & 0o777 for p in run_dir.iterdir()} == dict.fromkeys(
        ["Tb.parquet", "Tg.parquet", "Tp.parquet", "Ts.parquet", "manifest.json"], 0o640)
    leftovers = [p.name for p in run_dir.parent.iterdir() if p.name.startswith(".") and "partial" in p.name
                 or p.name.endswith(".tmp")]
    assert leftovers == []
    assert (run_dir.parent / "LATEST").read_text().strip() == run_dir.name
    assert json.loads((run_dir / "manifest.json").read_text())["counts"]["Tb"]["ok"] == 3
