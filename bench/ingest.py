"""Ingest throughput next to its floor: embedding the same chunks alone.

    .venv/bin/python bench/ingest.py [--copies 10]

Copies the bundled PDFs ``--copies`` times into a temp folder (each copy a distinct document),
ingests them into a temp index, then embeds the very same chunk texts with the same model and
batch size. Prints pages/s, chunks/s and ingest/embedding as a ratio (aim: ≤ 1.2). The model is
loaded before timing, so neither figure includes loading it. Writes nothing into the repo.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from pypdf import PdfWriter
from rich.console import Console
from rich.table import Table

from gsp.embedding import load_sentence_model
from gsp.index import CHUNKS_FILE, chunk_embedding_text, ingest
from gsp.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=10)
    args = parser.parse_args()
    kb = get_settings().kb
    model = load_sentence_model(kb.embedding_model)
    model.encode(["warm-up"], normalize_embeddings=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src_pdfs = sorted((ROOT / "knowledge_base").rglob("*.pdf"))
        kb_dir = tmp / "kb"
        kb_dir.mkdir()
        for i in range(args.copies):
            for pdf in src_pdfs:
                writer = PdfWriter(clone_from=str(pdf))
                writer.add_metadata({"/Subject": f"copy {i}"})  # distinct bytes → distinct document
                with open(kb_dir / f"{pdf.stem}-{i}.pdf", "wb") as fh:
                    writer.write(fh)
        t0 = time.perf_counter()
        report = ingest(kb_dir, tmp / "index", kb)
        ingest_s = time.perf_counter() - t0

        chunks = pq.read_table(tmp / "index" / CHUNKS_FILE).to_pandas()
        texts = [chunk_embedding_text(h, t) for h, t in zip(chunks["headword"], chunks["text"])]
        t0 = time.perf_counter()
        bs = kb.embed_batch_size
        for i in range(0, len(texts), bs):
            model.encode(texts[i : i + bs], batch_size=bs, normalize_embeddings=True, show_progress_bar=False)
        floor_s = time.perf_counter() - t0

    table = Table(title=f"ingest of {len(report.documents)} PDFs ({args.copies}× the bundled ones)")
    for col in ("pages", "chunks", "ingest s", "pages/s", "chunks/s", "embed-only s", "ratio"):
        table.add_column(col, justify="right")
    table.add_row(
        str(report.pages), str(report.chunks), f"{ingest_s:.2f}", f"{report.pages / ingest_s:.1f}",
        f"{report.chunks / ingest_s:.1f}", f"{floor_s:.2f}", f"{ingest_s / floor_s:.2f}",
    )
    Console().print(table)


if __name__ == "__main__":
    main()
