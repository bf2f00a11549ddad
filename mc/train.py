"""Training: ``train(config) -> metrics`` — CE (eq. 2) plus α·L_con^multi (eqs. 10–12).

Usable without Prefect or the CLI, and laid out like nanoGPT's loop:

- :func:`setup` — folder, device, seeds, data, text bank, model, optimizer, resume → :class:`TrainState`;
- :func:`train_step` — one optimisation step on one batch (also what ``bench/train_step.py`` times);
- :func:`run_epoch` — one epoch of steps, its record, TensorBoard scalars and a checkpoint;
- :func:`finish` — test scores, confusion, ``metrics.json`` and ``export.pt``.

What it guarantees:

- Device auto-select (CUDA when present, else CPU); mixed precision on CUDA (float16 with a
  GradScaler), optionally bfloat16 autocast on CPU (``amp="on"``), so the AMP code path runs and
  is tested on CPU too (:mod:`mc.device`).
- Determinism: every epoch's shuffling, augmentation (``SkeletonDataset.set_epoch``), synonym
  sampling and dropout are seeded from ``(seed, epoch)``, and torch deterministic algorithms are on,
  so a run resumed from its last checkpoint ends with exactly the metrics of an uninterrupted run.
- A checkpoint (model, optimizer, scaler, epoch, history) after every epoch, written atomically to
  the run folder (:mod:`mc.run_folder`); a re-run with the same ``out`` resumes from it.
- TensorBoard scalars, a rich progress bar with loss and accuracy.
- Several processes (DistributedDataParallel under ``torchrun``, launched by
  :func:`mc.distributed.launch_training`): ``batch_size`` is the global batch, split over the
  ranks; the contrastive loss sees the whole global batch and BatchNorm its statistics
  (:mod:`mc.ddp`), so a step equals the single-process step on that batch. Rank 0 alone writes
  the run folder; every rank resumes from its checkpoint.

Entry points build the config from settings in one place, :meth:`TrainConfig.from_settings`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.data import DataLoader

from gsp.atomic import atomic_path, write_json_atomic
from gsp.errors import GspError
from gsp.schema import content_fingerprint, resolve_run_dir
from mc import ddp
from mc.data import Samples, SkeletonDataset, load_splits
from mc.device import amp_dtype, amp_enabled, configure_determinism, resolve_device, seed_everything
from mc.evaluate import EvaluationError, export_inference, load_checkpoint, predict_scores, write_eval_outputs
from mc.keypoints import DEFAULT_KEYPOINT_SET, KEYPOINT_SETS, Layout, get_layout, layout_from_settings
from mc.loss import ABLATIONS, BatchTexts, composite_loss, hierarchical_contrastive_loss
from mc.model import GSPMCModel, ModelConfig, compile_backbone, model_config_for, parameter_counts
from mc.presets import DEFAULT_ALPHA, DEFAULT_TAU, get_recipe, learning_rate
from mc.run_folder import RunFolder, check_run_folder, claim_run_folder
from mc.text_features import EncoderSpec, TextBank, build_text_bank
from mc.transforms import Stream, TransformConfig
from mc.zeroshot import resolve_holdout, without_classes

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """One training run. Unset recipe fields come from ``preset``."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="pyskl pickle, labels CSV or .npy/.pose folder (mc.data.load_samples).")
    out: Path = Field(description="Run folder: checkpoints, tb/, test scores, metrics.json, export.pt.")
    descriptions: Path | None = Field(None, description="Description run (or descriptions root with LATEST).")
    preset: str = "tiny"
    stream: Stream = "joint"
    contrastive: bool = Field(True, description="False: the CE-only baseline even with descriptions.")
    ablation: str = Field("all", description=f"Which text sets the contrastive loss uses: {sorted(ABLATIONS)}.")
    alpha: float = Field(DEFAULT_ALPHA, ge=0, description="Eq. 12 weight of the contrastive loss.")
    tau: float = Field(DEFAULT_TAU, gt=0, description="Temperature of eqs. 7-8.")
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=2)
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    base_channels: int | None = Field(None, ge=4)
    frames: int | None = Field(None, ge=4)
    warmup_epochs: int | None = Field(None, ge=0)
    milestones: tuple[int, ...] | None = Field(None, description="Epochs after which the LR is ×gamma.")
    train_per_class: int | None = Field(None, ge=1, description="Train on K clips per class, a seeded draw "
                                        "(per_class_subset); None: all.")
    holdout_classes: list[int] | None = Field(None, description="Labels left out of training (zero-shot: "
                                              "mc.zeroshot); their test clips leave the test metrics too.")
    holdout_fraction: float | None = Field(None, gt=0, lt=1, description="Hold out this share of the data's "
                                           "classes, drawn with the seed (mc.zeroshot.resolve_holdout).")
    layout: str = Field(DEFAULT_KEYPOINT_SET, description="Keypoint set (mc.keypoints.KEYPOINT_SETS).")
    text_encoder: EncoderSpec = Field(default_factory=EncoderSpec, description="Frozen text encoder.")
    text_cache: Path | None = Field(None, description="Text-feature cache root (settings.paths.cache); "
                                    "needed when the run is contrastive.")
    train_split: str = "train"
    test_split: str = "test"
    skip_bad: bool = False
    seed: int = 0
    device: str = "auto"
    amp: Literal["auto", "on", "off"] = "auto"
    num_workers: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default).")
    compile: bool = Field(False, description="torch.compile the backbone (GSP_MC_COMPILE); where it cannot "
                          "compile, one warning and the eager model (mc.model.compile_backbone).")
    resume: bool = True
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        get_recipe(self.preset)
        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {self.ablation!r}; choose one of {sorted(ABLATIONS)}")
        if self.layout not in KEYPOINT_SETS:
            get_layout(self.layout)  # raises, naming the choices
        if self.holdout_classes is not None and self.holdout_fraction is not None:
            raise ValueError("holdout_classes and holdout_fraction exclude each other; give one")
        if self.uses_contrastive and self.text_cache is None:
            raise ValueError("a contrastive run needs text_cache (the text-feature cache root, "
                             "settings.paths.cache); TrainConfig.from_settings sets it")
        return self

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> TrainConfig:
        """The one place settings become a training config (``gsp train``, the ``mc`` flow and
        ``gsp run`` all come through here): ``GSP_MC_PRESET``, ``GSP_MC_KEYPOINT_PRESET``,
        ``GSP_MC_SEED``, ``GSP_MC_DEVICE``, ``GSP_MC_NUM_WORKERS``, the text-encoder settings and
        the cache root of a ``gsp.settings.Settings``. ``overrides`` (a command's options) win;
        an override of None means "from settings" (or the recipe's, for recipe fields)."""
        mc = settings.mc
        given = {k: v for k, v in overrides.items() if v is not None}
        if "layout" not in given:
            layout_from_settings(mc)  # checked here, so that a bad setting is named as its variable
        base = {"preset": mc.preset, "epochs": mc.epochs, "layout": mc.keypoint_preset, "seed": mc.seed,
                "device": mc.device, "compile": mc.compile,
                "num_workers": mc.num_workers, "text_encoder": EncoderSpec.from_settings(mc),
                "text_cache": settings.paths.cache}
        return cls(**{**base, **given})

    def recipe(self) -> dict:
        """The effective recipe: the preset with this config's overrides."""
        p = get_recipe(self.preset).model_dump()
        for k in ("epochs", "batch_size", "lr", "weight_decay", "base_channels", "frames", "warmup_epochs",
                  "milestones"):
            v = getattr(self, k)
            if v is not None:
                p[k] = v
        return p

    @property
    def uses_contrastive(self) -> bool:
        return bool(self.contrastive and self.descriptions is not None and any(ABLATIONS[self.ablation]))


def per_class_subset(samples: Samples, k: int, seed: int) -> Samples:
    """The first ``k`` clips of every class in a seeded random order (the few-clips regime).

    A class's order is drawn from ``(seed, label)`` alone, so every condition trained with the
    same seed (CE only, each description run, each ablation) sees the same clips, as a
    paired-seed comparison needs, and K=2 ⊂ K=4 ⊂ K=8. Other seeds draw other clips: an interval
    over seeds then includes which clips were drawn, since the claim is about K clips per class,
    not about one subset. A class with fewer than ``k`` clips is refused."""
    by_label: dict[int, list[str]] = {}
    for s in samples:
        by_label.setdefault(int(s.label), []).append(s.sample_id)
    short = {label: len(ids) for label, ids in by_label.items() if len(ids) < k}
    if short:
        label = min(short, key=short.get)
        raise ValueError(f"train_per_class {k}: class {label} has only {short[label]} training clips; "
                         f"use at most {min(len(v) for v in by_label.values())}")
    keep: set[str] = set()
    for label, ids in by_label.items():
        order = np.random.default_rng([seed, label, 7]).permutation(len(ids))
        keep.update(ids[i] for i in order[:k])
    return Samples([s for s in samples if s.sample_id in keep], skipped=samples.skipped)


def _epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), transient=False)


def _label_names(descriptions: Path | None, num_classes: int) -> list[str]:
    if descriptions is None:
        return []
    try:
        from gsp.schema import read_kind, resolve_run_dir

        df = read_kind(resolve_run_dir(descriptions), "Tg", ok_only=False)
    except Exception:  # names are a convenience for `gsp predict`; never fail training over them
        return []
    names = [""] * num_classes
    for label, gloss in zip(df["label"], df["gloss"]):
        if 0 <= int(label) < num_classes and gloss:
            names[int(label)] = str(gloss)
    return names


# --------------------------------------------------------------------------- one step


class LossNet(nn.Module):
    """The model and eq. 12 as one module, so that DistributedDataParallel (which wraps this)
    traces its graph from the loss: a part projection whose part has no text in a batch is then
    unused and left without a gradient, as in a single process."""

    def __init__(self, model: GSPMCModel, alpha: float, tau: float, amp: bool):
        super().__init__()
        self.model, self.alpha, self.tau, self.amp = model, alpha, tau, amp

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_all: torch.Tensor, texts: BatchTexts | None):
        """Local CE on this rank's rows, L_con on the gathered global batch (``y_all``'s labels).
        Returns (loss, cls_loss, con_loss or None, logits)."""
        with torch.autocast(device_type=x.device.type, dtype=amp_dtype(x.device), enabled=self.amp):
            outputs = self.model.forward_train(x, with_embeddings=texts is not None)
        cls_loss = F.cross_entropy(outputs.logits.float(), y)
        con_loss = None
        if texts is not None:
            # Only parts with texts are gathered: the same set on every rank (texts follow y_all).
            parts = {k: ddp.gather_with_grad(v.float()) for k, v in outputs.part_embeddings.items()
                     if k in (texts.parts or {})}
            con_loss, _ = hierarchical_contrastive_loss(
                ddp.gather_with_grad(outputs.global_embedding.float()), parts, y_all, texts, tau=self.tau)
        return composite_loss(cls_loss, con_loss, self.alpha), cls_loss, con_loss, outputs.logits


@dataclass
class Learner:
    """What one optimisation step needs: the model, its optimizer and the loss settings. The bench
    builds one without data or a run folder."""

    model: GSPMCModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: bool = False
    bank: TextBank | None = None  # None: CE only
    switches: tuple[bool, bool, bool] = ABLATIONS["all"]
    alpha: float = DEFAULT_ALPHA
    tau: float = DEFAULT_TAU
    #: What a step calls: LossNet over ``model``, wrapped in DistributedDataParallel by setup
    #: when several processes train.
    net: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.net is None:
            self.net = LossNet(self.model, self.alpha, self.tau, self.amp)


def train_step(learner: Learner, x: torch.Tensor, y: torch.Tensor, text_gen: torch.Generator) -> dict:
    """One step on one batch (this rank's slice of the global batch): forward (autocast when AMP
    is on), L = L_cls + α·L_con (eq. 12), backward, optimizer step. Returns this rank's losses,
    correct count and size."""
    device = learner.device
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    y_all = ddp.gather_labels(y)
    # Texts are drawn for the global batch, identically on every rank (same generator, same labels).
    texts = learner.bank.batch_texts(y_all, text_gen, *learner.switches) if learner.bank is not None else None
    loss, cls_loss, con_loss, logits = learner.net(x, y, y_all, texts)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}; lower the lr")
    learner.optimizer.zero_grad(set_to_none=True)
    learner.scaler.scale(loss).backward()
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    return {"loss": float(loss.detach()), "cls": float(cls_loss.detach()),
            "con": float(con_loss.detach()) if con_loss is not None else 0.0,
            "correct": int((logits.argmax(1) == y).sum()), "n": int(y.shape[0])}


# --------------------------------------------------------------------------- setup


@dataclass
class TrainState:
    """Everything a run carries from setup through its epochs to the end."""

    cfg: TrainConfig
    recipe: dict
    run: RunFolder
    layout: Layout
    train_ds: SkeletonDataset
    test_ds: SkeletonDataset
    skipped: dict[str, list]
    num_classes: int
    learner: Learner
    model_cfg: ModelConfig
    meta: dict
    writer: Any  # torch.utils.tensorboard.SummaryWriter
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # training seconds over all sessions (from the checkpoint on resume)
    samples_seen: int = 0  # this session only, for samples/s
    train_time: float = 0.0  # this session only
    descriptions_fingerprint: str | None = None  # what the texts said at setup (checked on resume)


def setup(config: TrainConfig | dict) -> TrainState:
    """Claim the run folder, seed, load and check the data, build the text bank, model and
    optimizer, and resume from the folder's checkpoint when there is one. Under torchrun (a
    process group already joined, :mod:`mc.distributed`) every rank runs this; rank 0 alone
    writes the folder."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**config)
    # Recorded absolute so `gsp eval RUN` finds the data from any folder.
    cfg = cfg.model_copy(update={"data": Path(cfg.data).resolve()})
    recipe = cfg.recipe()
    ddp.per_rank_batch(recipe["batch_size"], ddp.world_size())  # refuse a global batch the ranks cannot share
    # Train only into a new or empty folder or one of our runs: never write over a user's folder.
    # Checked first; created only once the data has passed its checks (a refused run leaves no folder).
    check_run_folder(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ddp.local_device(resolve_device(cfg.device))
    configure_determinism(device)
    seed_everything(cfg.seed)

    layout = get_layout(cfg.layout)
    splits = load_splits(cfg.data, (cfg.train_split, cfg.test_split), skip_bad=cfg.skip_bad)
    train_samples, test_samples = splits[cfg.train_split], splits[cfg.test_split]
    if cfg.train_per_class is not None:
        train_samples = per_class_subset(train_samples, cfg.train_per_class, cfg.seed)
    num_classes = int(max(max(s.label for s in train_samples), max(s.label for s in test_samples))) + 1
    # Sized before held-out classes leave, so that output i stays label i for every clip of the data
    # (eval, predict and a later fine-tune on the full set need no remapping); held-out outputs
    # never get a positive target, and `gsp predict` ranks only trained_labels.
    holdout = resolve_holdout({s.label for split in splits.values() for s in split}, cfg.holdout_classes,
                              cfg.holdout_fraction, cfg.seed)
    train_samples, test_samples = without_classes(train_samples, holdout), without_classes(test_samples, holdout)
    if not test_samples:
        raise ValueError(f"{cfg.data}: every {cfg.test_split!r} clip belongs to a held-out class; nothing to test on")
    run = _claim(cfg.out)
    train_ds = SkeletonDataset(train_samples, layout, stream=cfg.stream, frames=recipe["frames"], train=True,
                               seed=cfg.seed, num_classes=num_classes,
                               transform=TransformConfig(**recipe["augment"]))
    test_ds = SkeletonDataset(test_samples, layout, stream=cfg.stream, frames=recipe["frames"], train=False,
                              seed=cfg.seed, num_classes=num_classes)
    bank = _text_bank(cfg, num_classes, sorted({s.label for s in train_samples}), device)
    learner, model_cfg = _build_learner(cfg, recipe, layout, num_classes, bank, device)
    meta = {"stream": cfg.stream, "frames": recipe["frames"], "layout": layout.name,
            "labels": _label_names(cfg.descriptions, num_classes),
            # the classifier has max(label)+1 outputs; `gsp predict` ranks only classes that trained
            "trained_labels": sorted({int(s.label) for s in train_samples}), "holdout_classes": holdout}

    # Every rank loads the checkpoint, so all start from the same weights and optimizer state.
    start_epoch, history, seconds = _resume(cfg, run, learner, model_cfg)
    learner.net = ddp.data_parallel(learner.net, device, find_unused=bank is not None)
    skipped = {name: [x.to_json() for x in samples.skipped]
               for name, samples in (("train", train_samples), ("test", test_samples))}
    return TrainState(cfg=cfg, recipe=recipe, run=run, layout=layout, train_ds=train_ds, test_ds=test_ds,
                      skipped=skipped, num_classes=num_classes, learner=learner, model_cfg=model_cfg, meta=meta,
                      writer=_writer(cfg, run, start_epoch), start_epoch=start_epoch, history=history,
                      seconds=seconds, descriptions_fingerprint=descriptions_fingerprint(cfg.descriptions))


def _claim(out: Path) -> RunFolder:
    """Rank 0 claims the run folder (marker and all); the others use it once it is there."""
    run = claim_run_folder(out) if ddp.is_main() else None
    ddp.barrier()
    return run or RunFolder(Path(out))


def _text_bank(cfg: TrainConfig, num_classes: int, classes: list[int], device: torch.device) -> TextBank | None:
    if not cfg.uses_contrastive:
        return None
    bank = None
    # Rank 0 encodes and fills the text-feature cache first; the others then read it from there.
    for first in (True, False):
        if ddp.is_main() == first:
            bank = build_text_bank(cfg.descriptions, cfg.text_encoder, cfg.text_cache, num_classes=num_classes,
                                   progress=cfg.progress and ddp.is_main(), classes=classes).to(device)
        ddp.barrier()
    return bank


def _build_learner(cfg: TrainConfig, recipe: dict, layout: Layout, num_classes: int, bank: TextBank | None,
                   device: torch.device) -> tuple[Learner, ModelConfig]:
    use_amp = amp_enabled(cfg.amp, device)
    model_cfg = model_config_for(layout, num_classes, base_channels=recipe["base_channels"],
                                 text_dim=bank.dim if bank is not None else None, dropout=recipe["dropout"])
    # With several processes BatchNorm uses the global batch's statistics (before the optimizer
    # is built: the conversion keeps the parameters but replaces the modules).
    model = ddp.sync_batchnorm(GSPMCModel(model_cfg).to(device), device)
    if cfg.compile:
        compile_backbone(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"], nesterov=True,
                                weight_decay=recipe["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and device.type == "cuda")
    learner = Learner(model=model, optimizer=optimizer, scaler=scaler, device=device, amp=use_amp, bank=bank,
                      switches=ABLATIONS[cfg.ablation], alpha=cfg.alpha, tau=cfg.tau)
    return learner, model_cfg


def _writer(cfg: TrainConfig, run: RunFolder, start_epoch: int):
    """Rank 0's TensorBoard writer (None on the other ranks)."""
    if not ddp.is_main():
        return None
    from torch.utils.tensorboard import SummaryWriter

    # Scalars are logged per epoch (step = epoch number); on resume, drop events a killed run wrote
    # past its last checkpoint so curves do not fork.
    writer = SummaryWriter(str(run.tensorboard), purge_step=start_epoch + 1 if start_epoch else None)
    if start_epoch == 0:
        writer.add_text("config", json.dumps(cfg.model_dump(mode="json"), indent=1), 0)
    return writer


#: Settings a resumed session may change: where and how fast it runs, and how long (more epochs
#: continue the schedule). Everything else decides what the run computes.
RESUMABLE_CHANGES = frozenset({"out", "resume", "progress", "device", "amp", "num_workers", "threads", "compile",
                               "text_cache", "skip_bad", "epochs"})


def resume_conflicts(before: TrainConfig, now: TrainConfig, before_texts: str | None = None) -> list[str]:
    """``name: before → now`` for each setting that differs between the session that wrote a
    checkpoint and this one, other than :data:`RESUMABLE_CHANGES`. Recipe fields are compared by
    their effective values (``--frames 64`` on a 64-frame preset changes nothing), the data by its
    resolved path, the descriptions by what they say (``before_texts``: the fingerprint the
    checkpoint recorded; else the earlier run's, read now)."""
    texts_matter = before.uses_contrastive or now.uses_contrastive  # a CE-only run reads no text

    def effective(cfg: TrainConfig, texts: str | None = None) -> dict:
        values = {**cfg.model_dump(mode="json"), **{f"recipe.{k}": v for k, v in cfg.recipe().items()}}
        data = Path(values["data"])
        # a relative path recorded from another folder is compared by its name
        values["data"] = str(data.resolve()) if data.is_absolute() or data.exists() else data.name
        # the texts, not the folder: a re-run that wrote the same descriptions anew resumes
        values["descriptions"] = (texts or descriptions_fingerprint(cfg.descriptions)) if texts_matter else None
        values["text_encoder"] = {k: v for k, v in values["text_encoder"].items() if k != "batch_size"} \
            if texts_matter else None  # its batch size is speed, not what it computes
        return {k: v for k, v in values.items()
                if k.removeprefix("recipe.") not in RESUMABLE_CHANGES and k not in _RECIPE_OVERRIDES}

    a, b = effective(before, before_texts), effective(now)
    return [f"{k.removeprefix('recipe.')}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not (k == "descriptions" and UNKNOWN in (a[k], b[k]))]


#: What :func:`descriptions_fingerprint` says of a description run that can no longer be read.
UNKNOWN = "unknown (the run is gone)"


def descriptions_fingerprint(descriptions: Path | None) -> str | None:
    """``texts <hash>`` of what a description run says (``gsp.schema.content_fingerprint``)."""
    if descriptions is None:
        return None
    try:
        return f"texts {content_fingerprint(resolve_run_dir(Path(descriptions)))[:12]}"
    except (GspError, OSError):
        return UNKNOWN


#: TrainConfig fields that override the preset's recipe: compared as ``recipe.<name>`` instead.
_RECIPE_OVERRIDES = frozenset({"batch_size", "lr", "weight_decay", "base_channels", "frames", "warmup_epochs",
                               "milestones", "epochs", "preset"})


def _resume(cfg: TrainConfig, run: RunFolder, learner: Learner, model_cfg: ModelConfig) -> tuple[int, list, float]:
    """(start epoch, history, seconds) from the run's checkpoint, loaded into ``learner``; a fresh start without one."""
    if not (cfg.resume and run.checkpoint.is_file()):
        return 0, [], 0.0
    try:
        ckpt = load_checkpoint(run.checkpoint)
    except EvaluationError as exc:
        raise EvaluationError(f"{exc}; cannot resume from it: use --no-resume or another --out") from None
    if ckpt.get("model_config") != model_cfg.to_dict():
        raise RuntimeError(f"{run.checkpoint}: checkpoint was made for a different model/data; "
                           "use another --out or delete it")
    try:
        before = TrainConfig.model_validate(json.loads(ckpt["train_config"]))
    except (KeyError, TypeError, ValueError):  # a checkpoint from a version with other settings: model check only
        before = None
    if before is not None:
        conflicts = resume_conflicts(before, cfg, ckpt.get("descriptions_fingerprint"))
        if conflicts:
            raise EvaluationError(f"{run.checkpoint}: this session changes what the run computes "
                                  f"({'; '.join(conflicts)}); resume with the settings it was started with, "
                                  "or use --no-resume or another --out")
    learner.model.load_state_dict(ckpt["model"])
    learner.optimizer.load_state_dict(ckpt["optimizer"])
    learner.scaler.load_state_dict(ckpt["scaler"])
    log.info("resuming %s at epoch %d", run.root, int(ckpt["epoch"]))
    return int(ckpt["epoch"]), list(ckpt["history"]), float(ckpt["seconds"])


# --------------------------------------------------------------------------- epochs

#: See :func:`train`.
EpochCallback = Callable[[dict, int], None]
StepCallback = Callable[[dict], None]


def run_epoch(state: TrainState, epoch: int, progress=None, on_step: StepCallback | None = None) -> dict:
    """Train one (0-based) epoch; record it, log it and checkpoint. Returns the epoch's record
    (over the global batches: the ranks' sums are added up). ``on_step``: see :func:`train`."""
    cfg, recipe, learner = state.cfg, state.recipe, state.learner
    t0 = time.perf_counter()
    lr = learning_rate(epoch, recipe["lr"], recipe["warmup_epochs"], recipe["milestones"], recipe["gamma"])
    for group in learner.optimizer.param_groups:
        group["lr"] = lr
    # Everything random in an epoch is seeded from (seed, epoch), so a resumed run repeats it.
    state.train_ds.set_epoch(epoch)
    torch.manual_seed(_epoch_seed(cfg.seed, epoch, 1))  # dropout etc.
    text_gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, 3))
    loader = _train_loader(state, torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, 2)))
    task = progress.add_task(f"epoch {epoch + 1}/{recipe['epochs']}", total=len(loader), stats="") if progress else None
    learner.model.train()
    sums = {"loss": 0.0, "cls": 0.0, "con": 0.0, "correct": 0, "n": 0}
    for step, (x, y, _) in enumerate(loader):
        try:
            out = train_step(learner, x, y, text_gen)
        except FloatingPointError as exc:
            raise FloatingPointError(f"epoch {epoch + 1} step {step}: {exc}") from None
        for k in ("loss", "cls", "con"):  # per-sample sums, so the epoch mean weighs every sample alike
            sums[k] += out[k] * out["n"]
        sums["correct"] += out["correct"]
        sums["n"] += out["n"]
        if progress is not None:
            progress.update(task, advance=1, stats=f"loss {sums['loss'] / sums['n']:.3f} "
                                                  f"acc {sums['correct'] / sums['n']:.3f} lr {lr:.4g}")
        if on_step is not None:
            on_step({"epoch": epoch + 1, "epochs": recipe["epochs"], "step": step + 1, "steps": len(loader),
                     "loss": sums["loss"] / sums["n"]})
    # A rank's loss is its own CE plus the global L_con; the mean over equal-sized ranks is the
    # global batch's loss.
    sums = dict(zip(sums, ddp.all_reduce_sum(list(sums.values()))))
    dt = time.perf_counter() - t0
    state.train_time += dt
    state.samples_seen += int(sums["n"])
    n = max(sums["n"], 1)
    record = {"epoch": epoch + 1, "lr": lr, "loss": sums["loss"] / n, "cls_loss": sums["cls"] / n,
              "con_loss": sums["con"] / n, "train_top1": sums["correct"] / n, "seconds": dt}
    state.history.append(record)
    state.seconds += dt
    if ddp.is_main():
        for k in ("loss", "cls_loss", "con_loss", "train_top1", "lr"):
            state.writer.add_scalar(f"train/{k}", record[k], epoch + 1)
        _save_checkpoint(state, epoch + 1)
    return record


def _train_loader(state: TrainState, shuffle_gen: torch.Generator) -> DataLoader:
    """This rank's batches of one epoch: its slice of every global batch (all of it in one process)."""
    cfg, batch = state.cfg, state.recipe["batch_size"]
    batches = ddp.global_batches(len(state.train_ds), batch, shuffle_gen, drop_last=len(state.train_ds) >= batch)
    return DataLoader(state.train_ds, batch_sampler=ddp.rank_slices(batches, ddp.rank(), ddp.world_size()),
                      num_workers=cfg.num_workers, pin_memory=state.learner.device.type == "cuda",
                      # Workers start from a clean server process, not a fork of this one: forked
                      # from a process running Prefect's threads they died with exit code 1.
                      multiprocessing_context="forkserver" if cfg.num_workers else None,
                      persistent_workers=False)


def _save_checkpoint(state: TrainState, epoch: int) -> None:
    learner = state.learner
    payload = {
        "model": learner.model.state_dict(),
        "optimizer": learner.optimizer.state_dict(),
        "scaler": learner.scaler.state_dict(),
        "epoch": epoch,
        "history": state.history,
        "seconds": state.seconds,
        "model_config": state.model_cfg.to_dict(),
        "train_config": json.dumps(state.cfg.model_dump(mode="json")),
        "descriptions_fingerprint": state.descriptions_fingerprint,
        "meta": state.meta,
    }
    with atomic_path(state.run.checkpoint, suffix=".pt") as tmp:
        torch.save(payload, tmp)


# --------------------------------------------------------------------------- finish


def finish(state: TrainState) -> dict:
    """Evaluate on the test split; write scores, confusion, ``export.pt`` and ``metrics.json``.
    Rank 0 evaluates the whole test split alone (the other ranks wait) and every rank returns
    its metrics."""
    if ddp.is_main():
        metrics = _evaluate_and_write(state)
    ddp.barrier()
    return ddp.broadcast_object(metrics if ddp.is_main() else None)


def _evaluate_and_write(state: TrainState) -> dict:
    cfg, recipe, learner, run = state.cfg, state.recipe, state.learner, state.run
    epochs = recipe["epochs"]
    # read before evaluating: a recompile for eval mode that falls back would turn the flag off
    compiled = learner.model.backbone.compiled
    t_eval = time.perf_counter()
    scores, labels = predict_scores(learner.model, state.test_ds, batch_size=recipe["batch_size"],
                                    device=learner.device, amp=learner.amp)
    metrics = write_eval_outputs(run.root, scores, labels, state.test_ds.sample_ids, state.num_classes)
    eval_seconds = time.perf_counter() - t_eval
    state.writer.add_scalar("test/top1", metrics["top1"], epochs)
    state.writer.add_scalar("test/top5", metrics["top5"], epochs)
    state.writer.close()
    export_inference(run.checkpoint, run.export)

    bank = learner.bank
    metrics.update({
        "epochs": epochs,
        "seconds": round(state.seconds + eval_seconds, 3),
        "train_seconds": round(state.seconds, 3),
        "train_samples_per_s": round(state.samples_seen / state.train_time, 2) if state.train_time > 0 else None,
        "stream": cfg.stream,
        "preset": cfg.preset,
        "layout": state.layout.name,
        "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in recipe.items()},
        "contrastive": bank is not None,
        "ablation": cfg.ablation if bank is not None else "ce",
        "alpha": cfg.alpha,
        "tau": cfg.tau,
        "seed": cfg.seed,
        "num_classes": state.num_classes,
        "train_samples": len(state.train_ds),
        "train_per_class": cfg.train_per_class,
        "holdout_classes": state.meta["holdout_classes"],
        # held-out classes are recognised only zero-shot (`gsp eval RUN --zero-shot`)
        "test_classes": "seen classes only" if state.meta["holdout_classes"] else "all",
        "test_samples": len(state.test_ds),
        "skipped": state.skipped,
        "device": str(learner.device),
        "device_setting": cfg.device,
        "num_workers": cfg.num_workers,
        "world_size": ddp.world_size(),
        "amp": learner.amp,
        # whether the backbone trained torch.compile'd (False after a fallback to eager, see compile_backbone)
        "compiled": compiled,
        "parameters": parameter_counts(learner.model),
        "text_bank": bank.summary() if bank is not None else None,
        "history": state.history,
        "resumed_from_epoch": state.start_epoch or None,
    })
    write_json_atomic(run.metrics, metrics)
    return metrics


def train(config: TrainConfig | dict, on_epoch: EpochCallback | None = None,
          on_step: StepCallback | None = None) -> dict:
    """Train one stream; return (and write to the run's ``metrics.json``) its test metrics.
    ``on_epoch(record, epochs)`` after each epoch and ``on_step({epoch, epochs, step, steps,
    loss})`` after each step (the epoch's mean loss so far), on the main process: how a caller
    without a terminal (a flow's task, whose logs a server keeps) reports progress."""
    state = setup(config)
    main = ddp.is_main()
    with _progress(state.cfg.progress and main) as progress:
        for epoch in range(state.start_epoch, state.recipe["epochs"]):
            record = run_epoch(state, epoch, progress, on_step if main else None)
            if on_epoch is not None and main:
                on_epoch(record, state.recipe["epochs"])
    return finish(state)
