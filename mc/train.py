"""Training: ``train(config) -> metrics`` — CE (eq. 2) plus α·L_con^multi (eqs. 10–12).

One function, usable without Prefect or the CLI. What it does:

- Device auto-select (CUDA when present, else CPU); mixed precision on CUDA (float16 with a
  GradScaler), optionally bfloat16 autocast on CPU (``amp=True``), so the AMP code path runs and
  is tested on CPU too.
- Determinism: every epoch's shuffling, augmentation (``SkeletonDataset.set_epoch``), synonym
  sampling and dropout are seeded from ``(seed, epoch)``, and torch deterministic algorithms are on,
  so a run resumed from its last checkpoint ends with exactly the metrics of an uninterrupted run.
- A checkpoint (model, optimizer, scaler, epoch, history) after every epoch, written atomically to
  ``<out>/checkpoints/last.pt``; a re-run with the same ``out`` resumes from it (``resume=True``).
- TensorBoard scalars under ``<out>/tb``, a rich progress bar with loss and accuracy.
- At the end: test scores, confusion matrix, ``metrics.json`` (top1, top5, per-class accuracy,
  epochs, seconds, …) and the inference-only ``export.pt`` in ``out``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import DataLoader

from gsp.atomic import atomic_path, claim_folder, write_json_atomic
from mc.evaluate import EXPORT_FILE, EvaluationError, export_inference, load_checkpoint, predict_scores, write_eval_outputs
from mc.loss import ABLATIONS, composite_loss, hierarchical_contrastive_loss
from mc.model import GSPMCModel, ModelConfig, model_config_for, parameter_counts
from mc.presets import get_preset, learning_rate

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
METRICS_FILE = "metrics.json"
RUN_MARKER = ".gsp-run"


class TrainConfig(BaseModel):
    """One training run. Unset recipe fields come from ``preset``."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="pyskl pickle, labels CSV or .npy folder (mc.data.load_samples).")
    out: Path = Field(description="Run folder: checkpoints, tb/, test scores, metrics.json, export.pt.")
    descriptions: Path | None = Field(None, description="Description run (or descriptions root with LATEST).")
    preset: str = "tiny"
    stream: Literal["joint", "bone", "joint_motion", "bone_motion"] = "joint"
    contrastive: bool = Field(True, description="False: the CE-only baseline even with descriptions.")
    ablation: str = Field("all", description=f"Which text sets the contrastive loss uses: {sorted(ABLATIONS)}.")
    alpha: float = Field(0.5, ge=0, description="Eq. 12 weight of the contrastive loss.")
    tau: float = Field(0.1, gt=0, description="Temperature of eqs. 7-8.")
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=2)
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    base_channels: int | None = Field(None, ge=4)
    frames: int | None = Field(None, ge=4)
    layout: str | None = Field(None, description="Keypoint preset; default settings.mc.keypoint_preset.")
    train_split: str = "train"
    test_split: str = "test"
    skip_bad: bool = False
    seed: int = 0
    device: str = "auto"
    amp: Literal["auto", "on", "off"] = "auto"
    num_workers: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default).")
    resume: bool = True
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        get_preset(self.preset)
        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {self.ablation!r}; choose one of {sorted(ABLATIONS)}")
        return self

    def recipe(self) -> dict:
        """The effective recipe: the preset with this config's overrides."""
        p = get_preset(self.preset).model_dump()
        for k in ("epochs", "batch_size", "lr", "weight_decay", "base_channels", "frames"):
            v = getattr(self, k)
            if v is not None:
                p[k] = v
        return p

    @property
    def uses_contrastive(self) -> bool:
        return bool(self.contrastive and self.descriptions is not None and any(ABLATIONS[self.ablation]))


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU; anything else as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return dev


def amp_enabled(setting: str, device: torch.device) -> bool:
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def _configure_determinism(device: torch.device) -> None:
    # warn_only: a few CUDA kernels (index_add backward) have no deterministic variant; on CPU
    # everything we use is deterministic.
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


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


def train(config: TrainConfig | dict) -> dict:
    """Train one stream; return (and write to ``<out>/metrics.json``) its test metrics."""
    from mc.data import SkeletonDataset, load_splits
    from mc.keypoints import get_layout
    from mc.transforms import TransformConfig

    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**config)
    # Recorded absolute so `gsp eval RUN` finds the data from any folder.
    cfg = cfg.model_copy(update={"data": Path(cfg.data).resolve()})
    recipe = cfg.recipe()
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_DIR / LAST_CHECKPOINT
    # Train only into a new or empty folder or one of our runs (marker, or a checkpoint from before
    # the marker): never write over a user's folder.
    claim_folder(out, RUN_MARKER, "a gsp training run", lambda p: (p / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    use_amp = amp_enabled(cfg.amp, device)
    _configure_determinism(device)
    seed_everything(cfg.seed)

    layout = get_layout(cfg.layout)
    splits = load_splits(cfg.data, (cfg.train_split, cfg.test_split), skip_bad=cfg.skip_bad)
    train_samples, test_samples = splits[cfg.train_split], splits[cfg.test_split]
    num_classes = int(max(max(s.label for s in train_samples), max(s.label for s in test_samples))) + 1
    train_ds = SkeletonDataset(train_samples, layout, stream=cfg.stream, frames=recipe["frames"], train=True,
                               seed=cfg.seed, num_classes=num_classes,
                               transform=TransformConfig(**recipe["augment"]))
    test_ds = SkeletonDataset(test_samples, layout, stream=cfg.stream, frames=recipe["frames"], train=False,
                              seed=cfg.seed, num_classes=num_classes)

    bank = None
    if cfg.uses_contrastive:
        from mc.text_features import build_text_bank

        bank = build_text_bank(cfg.descriptions, num_classes=num_classes, progress=cfg.progress,
                               classes=sorted({s.label for s in train_samples})).to(device)
    switches = ABLATIONS[cfg.ablation]

    model_cfg = model_config_for(layout, num_classes, base_channels=recipe["base_channels"],
                                 text_dim=bank.dim if bank is not None else None, dropout=recipe["dropout"])
    model = GSPMCModel(model_cfg).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"], nesterov=True,
                                weight_decay=recipe["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and device.type == "cuda")
    meta = {"stream": cfg.stream, "frames": recipe["frames"], "layout": layout.name,
            "labels": _label_names(cfg.descriptions, num_classes),
            # the classifier has max(label)+1 outputs; `gsp predict` ranks only classes that trained
            "trained_labels": sorted({int(s.label) for s in train_samples})}

    start_epoch, history, seconds = 0, [], 0.0
    if cfg.resume and ckpt_path.is_file():
        try:
            ckpt = load_checkpoint(ckpt_path)
        except EvaluationError as exc:
            raise EvaluationError(f"{exc}; cannot resume from it: use --no-resume or another --out") from None
        if ckpt.get("model_config") != model_cfg.to_dict():
            raise RuntimeError(f"{ckpt_path}: checkpoint was made for a different model/data; "
                               "use another --out or delete it")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history, seconds = int(ckpt["epoch"]), list(ckpt["history"]), float(ckpt["seconds"])
        log.info("resuming %s at epoch %d", out, start_epoch)

    from torch.utils.tensorboard import SummaryWriter

    # Scalars are logged per epoch (step = epoch number); on resume, drop events a killed run wrote
    # past its last checkpoint so curves do not fork.
    writer = SummaryWriter(str(out / "tb"), purge_step=start_epoch + 1 if start_epoch else None)
    if start_epoch == 0:
        writer.add_text("config", json.dumps(cfg.model_dump(mode="json"), indent=1), 0)

    epochs = recipe["epochs"]
    samples_seen = 0
    train_time = 0.0
    with _progress(cfg.progress) as progress:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            lr = learning_rate(epoch, recipe["lr"], recipe["warmup_epochs"], recipe["milestones"], recipe["gamma"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            train_ds.set_epoch(epoch)
            torch.manual_seed(_epoch_seed(cfg.seed, epoch, 1))  # dropout etc.
            shuffle_gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, 2))
            text_gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, 3))
            loader = DataLoader(train_ds, batch_size=recipe["batch_size"], shuffle=True, generator=shuffle_gen,
                                drop_last=len(train_ds) >= recipe["batch_size"], num_workers=cfg.num_workers,
                                pin_memory=device.type == "cuda")
            task = progress.add_task(f"epoch {epoch + 1}/{epochs}", total=len(loader), stats="") if progress else None
            model.train()
            sums = {"loss": 0.0, "cls": 0.0, "con": 0.0, "correct": 0, "n": 0}
            for step, (x, y, _) in enumerate(loader):
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                with torch.autocast(device_type=device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                                    enabled=use_amp):
                    outputs = model.forward_train(x, with_embeddings=bank is not None)
                cls_loss = F.cross_entropy(outputs.logits.float(), y)
                con_loss = None
                if bank is not None:
                    texts = bank.batch_texts(y, text_gen, *switches)
                    con_loss, _ = hierarchical_contrastive_loss(
                        outputs.global_embedding.float(), {k: v.float() for k, v in outputs.part_embeddings.items()},
                        y, texts, tau=cfg.tau)
                loss = composite_loss(cls_loss, con_loss, cfg.alpha)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"epoch {epoch + 1} step {step}: loss is {loss.item()}; lower the lr")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                bs = int(y.shape[0])
                sums["loss"] += float(loss.detach()) * bs
                sums["cls"] += float(cls_loss.detach()) * bs
                sums["con"] += float(con_loss.detach()) * bs if con_loss is not None else 0.0
                sums["correct"] += int((outputs.logits.argmax(1) == y).sum())
                sums["n"] += bs
                if progress is not None:
                    progress.update(task, advance=1, stats=f"loss {sums['loss'] / sums['n']:.3f} "
                                                          f"acc {sums['correct'] / sums['n']:.3f} lr {lr:.4g}")
            dt = time.perf_counter() - t0
            train_time += dt
            samples_seen += sums["n"]
            n = max(sums["n"], 1)
            record = {"epoch": epoch + 1, "lr": lr, "loss": sums["loss"] / n, "cls_loss": sums["cls"] / n,
                      "con_loss": sums["con"] / n, "train_top1": sums["correct"] / n, "seconds": dt}
            history.append(record)
            seconds += dt
            for k in ("loss", "cls_loss", "con_loss", "train_top1", "lr"):
                writer.add_scalar(f"train/{k}", record[k], epoch + 1)
            _save_checkpoint(ckpt_path, model, optimizer, scaler, epoch + 1, history, seconds, model_cfg, cfg, meta)

    t_eval = time.perf_counter()
    scores, labels = predict_scores(model, test_ds, batch_size=recipe["batch_size"], device=device, amp=use_amp)
    metrics = write_eval_outputs(out, scores, labels, test_ds.sample_ids, num_classes)
    eval_seconds = time.perf_counter() - t_eval
    writer.add_scalar("test/top1", metrics["top1"], epochs)
    writer.add_scalar("test/top5", metrics["top5"], epochs)
    writer.close()
    export_inference(ckpt_path, out / EXPORT_FILE)

    metrics.update({
        "epochs": epochs,
        "seconds": round(seconds + eval_seconds, 3),
        "train_seconds": round(seconds, 3),
        "train_samples_per_s": round(samples_seen / train_time, 2) if train_time > 0 else None,
        "stream": cfg.stream,
        "preset": cfg.preset,
        "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in recipe.items()},
        "contrastive": bank is not None,
        "ablation": cfg.ablation if bank is not None else "ce",
        "alpha": cfg.alpha,
        "tau": cfg.tau,
        "num_classes": num_classes,
        "train_samples": len(train_ds),
        "test_samples": len(test_ds),
        "skipped": {"train": [list(x) for x in train_samples.skipped], "test": [list(x) for x in test_samples.skipped]},
        "device": str(device),
        "amp": use_amp,
        "parameters": parameter_counts(model),
        "text_bank": bank.summary() if bank is not None else None,
        "history": history,
        "resumed_from_epoch": start_epoch or None,
    })
    write_json_atomic(out / METRICS_FILE, metrics)
    return metrics


def _save_checkpoint(path: Path, model, optimizer, scaler, epoch: int, history: list, seconds: float,
                     model_cfg: ModelConfig, cfg: TrainConfig, meta: dict) -> None:
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "history": history,
        "seconds": seconds,
        "model_config": model_cfg.to_dict(),
        "train_config": json.dumps(cfg.model_dump(mode="json")),
        "meta": meta,
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
