"""Zero-shot recognition of signs the model never trained on, and text → clip retrieval.

GSP-MC's projections (paper §3.1, eqs. 7–11) map the skeleton features S_g and S_p into the text
space, where the contrastive loss pulls a clip towards its sign's descriptions. A sign held out of
training (``gsp train --holdout-classes`` / ``--holdout-fraction``) can then be recognised from its
descriptions alone: each held-out test clip is compared with each held-out class's text features,
with the cosine similarity the loss trains (``sim`` of eq. 7).

The protocol (the usual zero-shot one, not the "generalised" variant):

- candidates are the held-out classes only; the clips are the held-out classes' clips of a split
  (``test``: other signers than the training split's). Chance is ``1/n`` for top-1 and
  ``min(5, n)/n`` for top-5 with ``n`` candidates;
- the score of class c for clip x is the mean of the cosines that eq. 11's terms would compare:
  cos(P_g(S_g), T̄g_c), cos(P_g(S_g), T̄s_c) and, for each part p, cos(P_p(S_p), T̄p_{c,p}), where
  T̄ is the mean of the class's (L2-normalised) text features of that kind (and part). A class
  without texts of a term leaves that term out of its mean (eq. 11's 1/N over the terms present),
  so classes with more Tp parts are not favoured by having more terms;
- the shuffled-description control repeats the evaluation with the held-out classes' texts
  permuted among them by a seeded derangement (every class gets another class's texts): what
  survives it does not come from the descriptions.

Retrieval (:func:`retrieve`) ranks the clips of a split by the cosine between their projected
global feature P_g(S_g) and the encoded query, with the run's own frozen text encoder.

Held-out classes are chosen here too (:func:`resolve_holdout`), so training and evaluation agree
on them. Texts of held-out classes never reach training: :meth:`mc.text_features.TextBank.batch_texts`
only draws texts for labels present in a batch, and a held-out class has no training clip.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from gsp.atomic import write_json_atomic
from gsp.errors import GspError
from mc.evaluate import load_checkpoint, model_from_checkpoint, recorded_data_path, topk_accuracy
from mc.model import GSPMCModel
from mc.run_folder import RunFolder, claim_eval_folder
from mc.text_features import EncoderSpec, TextBank

#: Stream of the run seed that picks ``--holdout-fraction`` classes (apart from training's streams).
HOLDOUT_SEED_STREAM = 7
#: Stream of the seed of the shuffled-description control's derangement.
CONTROL_SEED_STREAM = 11
MIN_HELD_OUT = 2


class ZeroShotError(GspError, ValueError):
    pass


# --------------------------------------------------------------------------- held-out classes


def resolve_holdout(labels: Iterable[int], classes: Sequence[int] | None = None, fraction: float | None = None,
                    seed: int = 0) -> list[int]:
    """The held-out labels (sorted): ``classes`` as given, or ``round(fraction · n)`` of the ``n``
    distinct ``labels`` of the data, drawn with the run seed. At least :data:`MIN_HELD_OUT` held out
    (top-1 among one candidate is no test) and two classes left to train."""
    present = sorted({int(v) for v in labels})
    if classes is not None and fraction is not None:
        raise ZeroShotError("--holdout-classes and --holdout-fraction exclude each other; give one")
    if classes is None and fraction is None:
        return []
    if classes is not None:
        held = sorted({int(c) for c in classes})
        absent = [c for c in held if c not in set(present)]
        if absent:
            raise ZeroShotError(f"--holdout-classes: label(s) {', '.join(map(str, absent))} have no clips in the "
                                f"data (its labels are {_label_span(present)})")
    else:
        if not 0 < fraction < 1:
            raise ZeroShotError(f"--holdout-fraction {fraction}: must be between 0 and 1 (exclusive)")
        rng = np.random.default_rng([int(seed), HOLDOUT_SEED_STREAM])
        count = int(round(fraction * len(present)))
        held = sorted(int(c) for c in rng.choice(present, size=min(count, len(present)), replace=False))
    if len(held) < MIN_HELD_OUT:
        what = "--holdout-classes" if classes is not None else f"--holdout-fraction {fraction}"
        raise ZeroShotError(f"{what} holds out {len(held)} of {len(present)} classes; at least {MIN_HELD_OUT} "
                            "are needed (zero-shot top-1 among one candidate is no test)")
    if len(present) - len(held) < 2:
        raise ZeroShotError(f"holding out {len(held)} of {len(present)} classes leaves fewer than 2 to train on")
    return held


def _label_span(labels: Sequence[int]) -> str:
    return f"{len(labels)} labels from {labels[0]} to {labels[-1]}" if labels else "none"


def without_classes(samples, classes: Iterable[int]):
    """``samples`` (an :class:`mc.data.Samples`) minus the clips of ``classes``, bad ones included."""
    drop = {int(c) for c in classes}
    return samples.of_classes(lambda label: label not in drop)


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``0..n-1`` without fixed points (rejection sampling: about e draws)."""
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    rng = np.random.default_rng([int(seed), CONTROL_SEED_STREAM])
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


# --------------------------------------------------------------------------- class text features


@dataclass
class ClassTexts:
    """Per candidate class, the mean text feature of each term of eq. 11 and whether it has one."""

    labels: list[int]
    #: term name ("Tg", "Ts", "Tp:<part>") → ((n, D) unit features, (n,) bool: the class has texts)
    terms: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def permuted(self, perm: Sequence[int]) -> ClassTexts:
        """Class i gets the texts of class ``perm[i]`` (the shuffled-description control)."""
        idx = torch.as_tensor(list(perm), dtype=torch.long)
        return ClassTexts(self.labels, {k: (f[idx], m[idx]) for k, (f, m) in self.terms.items()})

    def classes_without_texts(self) -> list[int]:
        have = torch.zeros(len(self.labels), dtype=torch.bool)
        for _, mask in self.terms.values():
            have |= mask
        return [c for c, h in zip(self.labels, have.tolist()) if not h]


def _mean_features(bank: TextBank, rows_by_label: Mapping[int, list[int]], labels: Sequence[int]):
    feats = torch.zeros(len(labels), bank.dim)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for i, label in enumerate(labels):
        rows = rows_by_label.get(int(label))
        if rows:
            feats[i] = F.normalize(bank.features[rows].float().cpu(), dim=-1).mean(0)
            mask[i] = True
    return F.normalize(feats, dim=-1), mask


def class_texts(bank: TextBank, labels: Sequence[int], part_names: Sequence[str]) -> ClassTexts:
    """The candidate classes' text features per term: Tg and Ts (compared with S_g) and Tp of each
    of the model's parts (compared with that part's S_p), each the renormalised mean of the class's
    texts of that kind (a class has one Tg, several Ts and several Tp per part)."""
    out = ClassTexts([int(c) for c in labels])
    out.terms["Tg"] = _mean_features(bank, bank.tg_rows, labels)
    out.terms["Ts"] = _mean_features(bank, bank.ts_rows, labels)
    for part in part_names:
        out.terms[f"Tp:{part}"] = _mean_features(bank, bank.tp_rows.get(part, {}), labels)
    return out


# --------------------------------------------------------------------------- scoring


@dataclass
class ClipEmbeddings:
    """Projected, L2-normalised skeleton features of a dataset's clips, in its order."""

    global_: torch.Tensor  # (N, D)
    parts: dict[str, torch.Tensor]  # part → (N, D)
    labels: np.ndarray  # (N,)


@torch.no_grad()
def embed_clips(model: GSPMCModel, dataset, batch_size: int = 64, device: str | torch.device = "cpu") -> ClipEmbeddings:
    """P_g(S_g) and P_p(S_p) of every clip (the projections of eqs. 7–11), unit length."""
    if not len(model.projections):
        raise ZeroShotError("the model has no projections into the text space (a CE-only run)")
    device = torch.device(device)
    model = model.to(device).eval()
    globals_, parts, labels = [], {name: [] for name in model.part_names}, []
    for x, y, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        out = model.forward_train(x.to(device))
        globals_.append(F.normalize(out.global_embedding.float(), dim=-1).cpu())
        for name, emb in out.part_embeddings.items():
            parts[name].append(F.normalize(emb.float(), dim=-1).cpu())
        labels.append(np.asarray(y))
    return ClipEmbeddings(torch.cat(globals_), {k: torch.cat(v) for k, v in parts.items()},
                          np.concatenate(labels).astype(np.int64))


def term_cosines(clips: ClipEmbeddings, texts: ClassTexts) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per term, the (N, n) cosines between clips and candidate classes (``sim`` of eq. 7) and the
    classes' (n,) availability mask: Tg and Ts against the global projection, Tp:p against part p's."""
    out = {}
    for term, (feats, mask) in texts.terms.items():
        skeleton = clips.global_ if term in ("Tg", "Ts") else clips.parts.get(term.split(":", 1)[1])
        if skeleton is not None:
            out[term] = (skeleton @ feats.t(), mask)
    return out


def combine_terms(cosines: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  terms: Iterable[str] | None = None) -> np.ndarray:
    """(N, n) scores: per class, the mean of the cosines of the ``terms`` (default all) that class
    has texts for — eq. 11's 1/N over the terms present. A class with none of them scores -inf."""
    chosen = [cosines[t] for t in (terms if terms is not None else cosines) if t in cosines]
    if not chosen:
        raise ZeroShotError("no text term to score with")
    total = sum(cos * mask.float()[None, :] for cos, mask in chosen)
    count = sum(mask.float() for _, mask in chosen)[None, :]
    scores = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("-inf")))
    return scores.numpy().astype(np.float64)


def zero_shot_scores(model: GSPMCModel, dataset, texts: ClassTexts, batch_size: int = 64,
                     device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Scores (N, n) of ``dataset``'s clips against ``texts``' candidate classes and the clips'
    candidate indexes (N,) (see :func:`combine_terms`)."""
    clips = embed_clips(model, dataset, batch_size, device)
    return combine_terms(term_cosines(clips, texts)), _candidate_index(clips.labels, texts.labels)


def _candidate_index(labels: np.ndarray, candidates: Sequence[int]) -> np.ndarray:
    index = {int(c): i for i, c in enumerate(candidates)}
    return np.array([index[int(v)] for v in labels], dtype=np.int64)


def chance_levels(n: int) -> dict[str, float]:
    """Top-1 and top-5 accuracy of guessing uniformly among ``n`` candidates."""
    return {"chance": 1.0 / n, "chance_top5": min(5, n) / n}


def score_metrics(scores: np.ndarray, target: np.ndarray) -> dict[str, float]:
    return {"top1": topk_accuracy(scores, target, 1), "top5": topk_accuracy(scores, target, 5)}


def per_class_top1(scores: np.ndarray, target: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    pred = scores.argmax(1)
    return {str(c): float((pred[target == i] == i).mean()) for i, c in enumerate(labels) if (target == i).any()}


# --------------------------------------------------------------------------- runs


@dataclass
class LoadedRun:
    """What zero-shot evaluation and retrieval need of a training run."""

    root: Path
    ckpt: dict
    model: GSPMCModel
    train_config: dict
    meta: dict

    @property
    def holdout(self) -> list[int]:
        return [int(c) for c in self.meta.get("holdout_classes") or []]

    @property
    def names(self) -> list[str]:
        return list(self.meta.get("labels") or [])

    def name(self, label: int) -> str | None:
        return (self.names[label] or None) if 0 <= label < len(self.names) else None

    def encoder_spec(self) -> EncoderSpec:
        """The frozen text encoder the run trained with (recorded in its config): texts must be
        encoded by it, or their features mean nothing to the projections."""
        spec = self.train_config.get("text_encoder")
        if not isinstance(spec, Mapping):
            raise ZeroShotError(f"{self.root}: the checkpoint does not record its text encoder")
        spec = dict(spec)
        spec["weights"] = Path(spec["weights"]) if spec.get("weights") else None
        return EncoderSpec(**spec)


def load_run(run_dir: Path | str) -> LoadedRun:
    """A run's last checkpoint as a model with projections; a CE-only run is refused."""
    run = RunFolder(Path(run_dir))
    ckpt = load_checkpoint(run.checkpoint)
    model = model_from_checkpoint(ckpt, run.checkpoint)
    if not len(model.projections):
        raise ZeroShotError(f"{run.root}: a CE-only run (trained without descriptions or with --no-contrastive) "
                            "has no projections into the text space; train with --descriptions")
    try:
        train_config = json.loads(ckpt.get("train_config") or "{}")
    except ValueError:
        train_config = {}
    return LoadedRun(run.root, ckpt, model, train_config, dict(ckpt.get("meta") or {}))


def clip_dataset(run: LoadedRun, data: Path | None, split: str, classes: Iterable[int] | None = None,
                 skip_bad: bool = False):
    """(the run's test-time dataset of ``split`` — only ``classes``' clips when given —, the data path);
    ``data`` None: the data the run was trained on. ``skip_bad``: bad clips are left out (listed in
    the dataset's ``samples.skipped``) instead of failing."""
    from mc.data import SkeletonDataset, load_samples
    from mc.keypoints import DEFAULT_KEYPOINT_SET, get_layout

    if data is None:
        recorded = run.train_config.get("data")
        if not recorded:
            raise ZeroShotError(f"{run.root}: no --data given and the checkpoint does not record one")
        data = recorded_data_path(run.root, recorded)
    samples = load_samples(Path(data), split=split, num_classes=run.model.cfg.num_classes, skip_bad=skip_bad)
    if classes is not None:
        keep = {int(c) for c in classes}
        samples = samples.of_classes(lambda label: label in keep)
        if not samples:
            raise ZeroShotError(f"{data}: split {split!r} has no clips of the held-out classes "
                                f"{', '.join(map(str, sorted(keep)))}")
    return SkeletonDataset(samples, get_layout(run.meta.get("layout", DEFAULT_KEYPOINT_SET)),
                           stream=run.meta.get("stream", "joint"), frames=int(run.meta.get("frames", 64)),
                           train=False, num_classes=run.model.cfg.num_classes), Path(data)


def _description_run(run: LoadedRun, descriptions: Path | None) -> Path:
    if descriptions is not None:
        return Path(descriptions)
    recorded = run.train_config.get("descriptions")
    if not recorded:
        raise ZeroShotError(f"{run.root}: the run records no descriptions; give --descriptions")
    return Path(recorded)


def held_out_texts(run: LoadedRun, descriptions: Path, cache_root: Path) -> tuple[ClassTexts, str]:
    """The held-out classes' text features, encoded by the run's encoder; (texts, run dir)."""
    from mc.text_features import build_text_bank

    holdout = run.holdout
    bank = build_text_bank(descriptions, run.encoder_spec(), cache_root, num_classes=run.model.cfg.num_classes,
                           classes=holdout)
    if bank.dim != run.model.cfg.text_dim:
        raise ZeroShotError(f"{bank.run_dir}: texts encode to {bank.dim} dimensions, the run's projections "
                            f"to {run.model.cfg.text_dim}")
    texts = class_texts(bank, holdout, run.model.part_names)
    missing = texts.classes_without_texts()
    if missing:
        named = ", ".join(f"{c}" + (f" ({run.name(c)})" if run.name(c) else "") for c in missing)
        raise ZeroShotError(f"{bank.run_dir}: no usable Tg, Ts or Tp text for held-out class(es) {named}; "
                            "every held-out class needs descriptions to be recognised from them")
    return texts, bank.run_dir


def evaluate_zero_shot(run_dir: Path | str, cache_root: Path | str, descriptions: Path | None = None,
                       data: Path | None = None, split: str = "test", device: str | torch.device = "cpu",
                       batch_size: int = 64, out: Path | None = None, write: bool = True,
                       skip_bad: bool = False) -> dict:
    """Zero-shot top-1/top-5 of a run's held-out classes on ``split`` (module docstring), with
    chance, the shuffled-description control and each term's own top-1; written as
    ``metrics.json`` into ``out`` (default ``RUN/zeroshot-<split>``) unless ``write`` is False.
    ``skip_bad``: bad clips are left out and listed under ``skipped`` instead of failing."""
    run = load_run(run_dir)
    if not run.holdout:
        raise ZeroShotError(f"{run.root}: the run held out no classes (train with --holdout-classes or "
                            "--holdout-fraction to evaluate zero-shot)")
    desc = _description_run(run, descriptions)
    texts, desc_dir = held_out_texts(run, desc, Path(cache_root))
    dataset, data_path = clip_dataset(run, data, split, run.holdout, skip_bad=skip_bad)
    clips = embed_clips(run.model, dataset, batch_size, device)
    target = _candidate_index(clips.labels, texts.labels)
    cosines = term_cosines(clips, texts)
    scores = combine_terms(cosines)
    seed = int(run.train_config.get("seed", 0))
    perm = derangement(len(texts.labels), seed)
    control = combine_terms(term_cosines(clips, texts.permuted(perm)))
    parts = [t for t in cosines if t.startswith("Tp:") and bool(cosines[t][1].any())]
    by_term = {t: score_metrics(combine_terms(cosines, [t]), target)["top1"]
               for t in ("Tg", "Ts") if bool(cosines[t][1].any())}
    if parts:
        by_term["parts"] = score_metrics(combine_terms(cosines, parts), target)["top1"]
    n = len(texts.labels)
    metrics = {
        **score_metrics(scores, target), "num_classes": n, **chance_levels(n),
        "control": {**score_metrics(control, target), "permutation": [texts.labels[i] for i in perm.tolist()]},
        "top1_by_term": by_term,
        "holdout_classes": texts.labels, "holdout_names": [run.name(c) for c in texts.labels],
        "per_class_top1": per_class_top1(scores, target, texts.labels),
        "num_samples": int(len(target)), "split": split, "data": str(data_path),
        "descriptions": str(Path(desc_dir).resolve()),
        "candidates": "held-out classes only", "checkpoint_epoch": int(run.ckpt["epoch"]),
        "skipped": [s.to_json() for s in dataset.skipped],
    }
    if write:
        folder = claim_eval_folder(Path(out) if out is not None else run.root / f"zeroshot-{split}")
        write_json_atomic(folder.metrics, metrics)
    return metrics


# --------------------------------------------------------------------------- retrieval


def encode_query(spec: EncoderSpec, query: str) -> torch.Tensor:
    """The (D,) unit feature of one text with ``spec``'s encoder and long-text policy (not cached:
    queries are one-offs)."""
    from mc.text_features import encode_with_policy, load_encoder

    feats = encode_with_policy(load_encoder(spec), [query], spec.long_text, spec.batch_size)
    return torch.from_numpy(feats[0]).float()


def retrieve(run_dir: Path | str, data: Path | None, query: str, k: int = 5, split: str = "test",
             device: str | torch.device = "cpu", batch_size: int = 64) -> list[dict]:
    """The ``k`` clips of ``split`` whose projected global feature P_g(S_g) is closest (cosine) to
    the encoded ``query``, best first: ``{"rank", "sample_id", "label", "name", "score"}``."""
    if not query.strip():
        raise ZeroShotError("the query is empty; give a description such as 'the right hand circles'")
    if k < 1:
        raise ZeroShotError(f"-k {k}: must be at least 1")
    run = load_run(run_dir)
    spec = run.encoder_spec()
    dataset, _ = clip_dataset(run, data, split)
    clips = embed_clips(run.model, dataset, batch_size, device)
    q = encode_query(spec, query)
    if q.shape[0] != clips.global_.shape[1]:
        raise ZeroShotError(f"{run.root}: the query encodes to {q.shape[0]} dimensions, the run's projections "
                            f"to {clips.global_.shape[1]}")
    sims = clips.global_ @ F.normalize(q, dim=0)
    values, idx = sims.topk(min(k, len(sims)))
    ids = dataset.sample_ids
    return [{"rank": r, "sample_id": ids[i], "label": int(clips.labels[i]), "name": run.name(int(clips.labels[i])),
             "score": float(v)} for r, (v, i) in enumerate(zip(values.tolist(), idx.tolist()), start=1)]
