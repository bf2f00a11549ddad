"""The synthetic data set file: clips of every demo sign by several signers, split by signer,
written as a pyskl pickle that only this module's own earlier output may be replaced by."""

from __future__ import annotations

import logging
import pickletools
from pathlib import Path
from typing import Literal

import numpy as np

from demo.sign_source import DEFAULT_SOURCE, SignSource, load_sign_source
from demo.synthetic.render import IMG_SIZE, render_clip, sample_signer
from gsp.atomic import check_replaceable
from mc.data import write_pyskl

log = logging.getLogger(__name__)

GENERATOR_KEY, GENERATOR = "generator", "gsp-mc synthetic skeletons"
DATASET_WHAT = "a synthetic data set written by gsp synth"


def is_synthetic_dataset(path: Path | str) -> bool:
    """True for a pickle this module wrote: its first key is the generator tag. Only the first
    opcodes are read, so a large real data set is recognised as foreign without loading it."""
    previous = None
    try:
        with open(path, "rb") as fh:
            for n, (_, arg, _) in enumerate(pickletools.genops(fh)):
                if previous == GENERATOR_KEY and arg == GENERATOR:
                    return True
                if n > 16:
                    return False
                previous = arg if isinstance(arg, str) else previous
    except (OSError, ValueError, EOFError):
        return False
    return False


def check_dataset_target(out_path: Path | str) -> None:
    """Refuse an ``out_path`` holding a folder or any file but an earlier synthetic data set."""
    check_replaceable(out_path, is_synthetic_dataset, DATASET_WHAT, folder=False)


def _check_arguments(samples_per_class: int, frames: int, signers: int, test_signers: int) -> None:
    if not 0 < test_signers < signers:
        raise ValueError(f"need 0 < test_signers < signers, got {test_signers} of {signers}")
    if samples_per_class < signers:
        # Clips are dealt to signers in turn; with fewer clips than signers the test signers
        # (the last ones) would perform nothing and the test split would be empty.
        raise ValueError(f"samples_per_class ({samples_per_class}) must be at least signers ({signers})")
    if frames < 4:
        raise ValueError(f"frames must be >= 4, got {frames}")


def write_synthetic_dataset(
    out_path: Path | str,
    source: Path | str | SignSource = DEFAULT_SOURCE,
    samples_per_class: int = 30,
    frames: int = 48,
    signers: int = 8,
    test_signers: int = 2,
    seed: int = 0,
    glosses: list[str] | None = None,
    label_mode: Literal["class_id", "index"] = "class_id",
) -> Path:
    """Render a signer-split synthetic data set and write it as a pyskl pickle at ``out_path``.

    Every sign of the source (or only ``glosses``) gets ``samples_per_class`` clips spread over
    ``signers`` signers; the last ``test_signers`` signers form the ``test`` split, the others
    ``train``. ``frames`` is the typical clip length; each clip's length varies with signer and
    clip speed. Labels are the signs' ``class_id`` (as in the description artifacts and the
    vocabulary) or, with ``label_mode="index"``, 0..N-1 in source order. Same arguments, same file.
    """
    _check_arguments(samples_per_class, frames, signers, test_signers)
    check_dataset_target(out_path)  # before minutes of rendering
    src = source if isinstance(source, SignSource) else load_sign_source(source)
    signs = src.signs if glosses is None else [src.sign(g) for g in glosses]
    styles = [sample_signer(i, np.random.default_rng([seed, 1, i])) for i in range(signers)]
    test_ids = set(range(signers - test_signers, signers))
    annotations: list[dict] = []
    split: dict[str, list[str]] = {"train": [], "test": []}
    classes = []
    for k, sign in enumerate(signs):
        label = sign.class_id if label_mode == "class_id" else k
        classes.append({"label": int(label), "class_id": int(sign.class_id), "gloss": sign.gloss})
        for rep in range(samples_per_class):
            style = styles[rep % signers]
            rng = np.random.default_rng([seed, 2, sign.class_id, rep])
            length = max(8, round(frames * style.speed * rng.uniform(0.85, 1.15)))
            clip = render_clip(src, sign.gloss, style, length, rng)
            frame_dir = f"{sign.class_id:03d}_{sign.gloss}_s{style.signer_id:02d}_r{rep:03d}"
            annotations.append({
                "frame_dir": frame_dir,
                "label": int(label),
                "keypoint": np.ascontiguousarray(clip[None, ..., :2]),
                "keypoint_score": np.ascontiguousarray(clip[None, ..., 2]),
                "total_frames": int(length),
                "img_shape": (IMG_SIZE, IMG_SIZE),
                "original_shape": (IMG_SIZE, IMG_SIZE),
                "signer": int(style.signer_id),
            })
            split["test" if style.signer_id in test_ids else "train"].append(frame_dir)
    check_dataset_target(out_path)  # again: the path may have been taken while rendering
    path = write_pyskl(out_path, annotations, split, extra={GENERATOR_KEY: GENERATOR, "classes": classes})
    log.info("wrote %d synthetic clips of %d signs to %s", len(annotations), len(signs), path)
    return path
