"""Benchmark: the embedded LLM (llama-server + SmolLM2-135M) served as each weight type.

For every ``--weights`` type it converts the shipped GGUF (``gsp.llm.server.served_weights``,
timed), then describes the demo vocabulary with P1–P4 exactly as ``gsp run`` does (the same
index, settings and prompts; a fresh response cache, so every request is asked) and prints one
table: the file's size, the conversion's seconds, the run's wall seconds, requests per minute,
prompt and completion tokens, and the share of failed rows (the quality gate rejects most of a
135M model's texts, so that share is the description quality the speed must not cost).

    .venv/bin/python bench/local_llm.py                       # source (Q4_1) and Q8_0, interleaved
    .venv/bin/python bench/local_llm.py --weights source,Q8_0,BF16,Q4_0 --repeats 2

Writes only to a temp folder. A run takes 2–3 minutes on 2 cores; read ``uptime`` first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]

from gsp.generate import generate_descriptions  # noqa: E402
from gsp.index import ingest  # noqa: E402
from gsp.llm.server import WEIGHT_TYPES, served_weights, smollm2_gguf_path  # noqa: E402
from gsp.settings import Settings, get_settings  # noqa: E402

DEMO_VOCAB = ROOT / "knowledge_base" / "demo_vocab.csv"


def describe_demo(weights: str, index_dir: Path, weights_dir: Path, work: Path) -> dict:
    """One generation run of the demo vocabulary with ``weights``; its row of the table."""
    base = get_settings()
    t0 = time.perf_counter()
    served = served_weights(smollm2_gguf_path(), weights, weights_dir)
    convert_s = time.perf_counter() - t0
    settings = Settings(paths={**base.paths.model_dump(), "artifacts_dir": work, "cache_dir": work / "cache",
                               "index_dir": index_dir},
                        kb=base.kb.model_dump(), llm={**base.llm.model_dump(exclude={"api_key"}),
                                                      "base_url": None, "local_weights": weights},
                        mc=base.mc.model_dump())
    if weights != "source":  # converted once, shared by the repeats
        settings.paths.cache.mkdir(parents=True, exist_ok=True)
        (settings.paths.cache / "llm").symlink_to(weights_dir)
    t1 = time.perf_counter()
    # a run takes minutes: the same per-prompt progress bars as `gsp generate`
    run = generate_descriptions(DEMO_VOCAB, settings=settings, index_dir=index_dir, progress=True)
    wall = time.perf_counter() - t1
    m = run.manifest
    rows = sum(c["rows"] for c in m["counts"].values())
    ok = sum(c["ok"] for c in m["counts"].values())
    return {"weights": weights, "MB": served.stat().st_size / 1e6, "convert s": convert_s, "wall s": wall,
            "requests": m["requests"], "req/min": 60 * m["requests"] / wall,
            "prompt tok": m["tokens"]["prompt"], "completion tok": m["tokens"]["completion"],
            "ok rows": f"{ok}/{rows}", "failed": 1 - ok / rows,
            "ok by kind": " ".join(f"{k} {c['ok']}" for k, c in m["counts"].items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="source,Q8_0", help=f"Comma-separated, of {', '.join(WEIGHT_TYPES)}.")
    ap.add_argument("--repeats", type=int, default=1, help="Rounds; each round runs every type once.")
    args = ap.parse_args()
    types = [w.strip() for w in args.weights.split(",") if w.strip()]
    unknown = [w for w in types if w not in WEIGHT_TYPES]
    if unknown:
        raise SystemExit(f"--weights: unknown {unknown}; choose of {', '.join(WEIGHT_TYPES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = get_settings()
        ingest(settings.paths.kb_dir, tmp / "index", settings.kb)
        for r in range(args.repeats):
            for w in types:  # interleaved, so a noisy neighbour spreads over all types
                rows.append(describe_demo(w, tmp / "index", tmp / "weights" / w, tmp / f"run-{r}-{w}"))
                print(rows[-1], flush=True)
    table = Table(title=f"embedded LLM on the demo vocabulary ({DEMO_VOCAB.name}), P1–P4")
    for col in rows[0]:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(f"{v:.2f}" if isinstance(v, float) and k in ("convert s", "failed") else
                        f"{v:.0f}" if isinstance(v, float) else str(v) for k, v in row.items()))
    Console(width=160).print(table)  # one line per row, also when piped


if __name__ == "__main__":
    main()
