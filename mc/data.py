"""Skeleton data: readers for the two common keypoint formats and the torch dataset.

Formats (both COCO-WholeBody, 133 points, channels x, y, score):

(a) **pyskl annotation pickle** — a dict with ``split`` (split name → list of ``frame_dir``) and
    ``annotations`` (list of dicts with ``frame_dir``, ``label``, ``keypoint`` [M, T, 133, 2],
    ``keypoint_score`` [M, T, 133], ``total_frames``, ``img_shape``). It is read with a restricted
    unpickler that only rebuilds numpy arrays and plain containers, so a hostile file cannot run
    code. When a clip has several people (M > 1), the one with the highest total score is used.
(b) **one .npy per video** of shape (T, 133, 3) plus a labels CSV with rows ``sample_id,label``
    (optional header, optional third column ``split``), as AUTSL's whole-body keypoints are
    commonly shared. ``<dir>/<sample_id>.npy`` lives beside the CSV. Pass the CSV, or a folder
    holding ``<split>_labels.csv``, ``<split>.csv`` or ``labels.csv``. Arrays are opened with
    ``mmap_mode="r"`` and ``allow_pickle=False`` and read one item at a time.
(c) **one pose-format .pose file per video** (``<dir>/<sample_id>.pose``, COCO-WholeBody-133 or
    MediaPipe Holistic, see :mod:`mc.pose_format`) with the same labels CSV; a sample whose
    ``.npy`` is absent is looked for as ``.pose``. Each file is read and checked when loading and
    read again when its item is used.

Every sample is checked when the data is loaded, before any training: a NaN in the last clip of
an epoch would otherwise surface hours in. The .npy files are streamed through their memory map
for that scan (:data:`SCAN_FRAMES` frames at a time), so loading stays within a small, fixed
amount of memory. Bad input (missing files, wrong shapes, empty clips, NaN/inf, labels out of
range) raises one :class:`SampleError` naming every bad sample and why; with ``skip_bad=True``
they are logged, skipped and listed in ``samples.skipped`` (with their label where it could be
read, so that a selection of classes keeps only its own bad clips).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import pickle
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from gsp.atomic import atomic_path
from gsp.errors import GspError
from mc.keypoints import DEFAULT_KEYPOINT_SET, NUM_WHOLEBODY, Layout, get_layout
from mc.transforms import STREAMS, TransformConfig, prepare

log = logging.getLogger(__name__)


class SampleError(GspError, ValueError):
    """A sample (or a whole data file) is unusable; the message names it."""


# --------------------------------------------------------------------------------------------
# Samples


@dataclass(frozen=True, eq=False)
class Sample:
    """One clip: its id, label and where its (T, 133, 3) keypoints come from."""

    sample_id: str
    label: int
    source: str  # the file it comes from, for error messages
    array: np.ndarray | None = None  # in memory (pyskl), already (T, 133, 3)
    path: Path | None = None  # a .npy file, read lazily

    def keypoints(self) -> np.ndarray:
        """The validated (T, 133, 3) float32 keypoints (x, y, score)."""
        if self.array is not None:
            arr = self.array
        elif self.path is not None and self.path.suffix.lower() == POSE_SUFFIX:
            arr = _read_pose(self.path, self.sample_id)
        else:
            assert self.path is not None
            try:
                arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise SampleError(f"sample {self.sample_id!r}: file missing: {self.path}") from None
            except (OSError, ValueError) as exc:
                raise SampleError(f"sample {self.sample_id!r}: unreadable .npy {self.path}: {exc}") from exc
        return check_keypoints(arr, self.sample_id, self.source, check_values=True)


class SkippedSample(NamedTuple):
    """A bad sample left out (``skip_bad``): its id, why, and its label where it was readable."""

    sample_id: str
    reason: str
    #: None where the label itself was the problem (not an integer, out of range, no annotation).
    label: int | None = None

    def to_json(self) -> dict[str, Any]:
        return self._asdict()


class Samples(list):
    """A list of :class:`Sample` that also records what was skipped and why."""

    def __init__(self, items: Iterable[Sample] = (), skipped: list[SkippedSample] | None = None):
        super().__init__(items)
        self.skipped: list[SkippedSample] = skipped or []

    def of_classes(self, wanted: Callable[[int], bool]) -> Samples:
        """The samples whose label is ``wanted``, and the skipped ones that may be: a bad clip of
        an unwanted class is not this selection's loss, while one whose label could not be read
        might belong to any class, so it stays listed."""
        return Samples([s for s in self if wanted(int(s.label))],
                       [s for s in self.skipped if s.label is None or wanted(s.label)])


#: Frames per block of the value scan: bounds the scan's temporary memory whatever the clip length.
SCAN_FRAMES = 1024


def first_non_finite(arr: np.ndarray, block: int = SCAN_FRAMES) -> tuple[int, int, int] | None:
    """(frame, point, channel) of the first NaN/inf value, or None; reads ``block`` frames at a
    time, so a memory-mapped file is streamed rather than copied."""
    if np.issubdtype(arr.dtype, np.integer):
        return None
    for start in range(0, arr.shape[0], block):
        chunk = np.asarray(arr[start : start + block])
        finite = np.isfinite(chunk)
        if not finite.all():
            f, v, c = np.argwhere(~finite)[0]
            return start + int(f), int(v), int(c)
    return None


def check_keypoints(arr: Any, sample_id: str, source: str, check_values: bool = True) -> np.ndarray:
    """Validate one clip's (T, 133, 3) array; return it as float32 (a copy only when needed)."""
    arr = scan_keypoints(arr, sample_id, source, check_values)
    return np.asarray(arr, dtype=np.float32) if check_values else arr


def scan_keypoints(arr: Any, sample_id: str, source: str, check_values: bool = True) -> np.ndarray:
    """:func:`check_keypoints` without the float32 conversion: shape, dtype and (streamed) values."""
    where = f"sample {sample_id!r} ({source})"
    if not isinstance(arr, np.ndarray):
        raise SampleError(f"{where}: keypoints are {type(arr).__name__}, not a numpy array")
    if arr.ndim != 3 or arr.shape[1] != NUM_WHOLEBODY or arr.shape[2] != 3:
        raise SampleError(f"{where}: keypoints have shape {arr.shape}, expected (T, {NUM_WHOLEBODY}, 3)")
    if arr.shape[0] == 0:
        raise SampleError(f"{where}: zero-length sequence (T = 0)")
    if not np.issubdtype(arr.dtype, np.number):
        raise SampleError(f"{where}: keypoints have dtype {arr.dtype}, expected numbers")
    if check_values:
        bad = first_non_finite(arr)
        if bad is not None:
            raise SampleError(f"{where}: non-finite value at frame {bad[0]}, point {bad[1]}, channel {bad[2]}")
    return arr


def _check_label(label: Any, sample_id: str, source: str, num_classes: int | None) -> int:
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        # float labels that are whole numbers are accepted (some tools write them)
        if isinstance(label, (float, np.floating)) and float(label).is_integer():
            label = int(label)
        else:
            raise SampleError(f"sample {sample_id!r} ({source}): label {label!r} is not an integer")
    label = int(label)
    if label < 0 or (num_classes is not None and label >= num_classes):
        rng = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise SampleError(f"sample {sample_id!r} ({source}): label {label} out of range ({rng})")
    return label


# --------------------------------------------------------------------------------------------
# pyskl pickle


_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol-2 pickles store bytes
    ("collections", "OrderedDict"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "int"), ("builtins", "float"), ("builtins", "str"),
    ("builtins", "bytes"), ("builtins", "bool"), ("builtins", "complex"), ("builtins", "slice"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and plain containers and refuses everything else.

    Hand-written because the standard library has no allow-list mode; ``pickle.load`` on a
    downloaded annotation file would otherwise run any code the file names.
    """

    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy") and name == "dtype" or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module.startswith("numpy.dtypes") and name.endswith("DType"):
            return super().find_class(module, name)  # numpy>=1.25 pickles dtype classes by name
        raise SampleError(
            f"{self._source}: refusing to unpickle {module}.{name}: only numpy arrays and plain "
            "containers are allowed in a keypoint annotation file"
        )


def read_pickle_safely(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return _NumpyOnlyUnpickler(fh, str(path)).load()
    except FileNotFoundError:
        raise SampleError(f"{path}: file missing") from None
    except SampleError:
        raise
    except Exception as exc:  # corrupt pickles raise many types (UnpicklingError, EOFError, …)
        raise SampleError(f"{path}: not a readable pickle: {exc}") from exc


def _pyskl_to_array(ann: dict, sample_id: str, source: str) -> np.ndarray:
    where = f"sample {sample_id!r} ({source})"
    kp = ann.get("keypoint")
    if kp is None:
        raise SampleError(f"{where}: no 'keypoint' field")
    kp = np.asarray(kp)
    score = ann.get("keypoint_score")
    if kp.ndim != 4:
        raise SampleError(f"{where}: 'keypoint' has shape {kp.shape}, expected [M, T, {NUM_WHOLEBODY}, 2]")
    if score is None:
        if kp.shape[-1] != 3:
            raise SampleError(f"{where}: no 'keypoint_score' and 'keypoint' has {kp.shape[-1]} channels, not 3")
        full = kp.astype(np.float32)
    else:
        score = np.asarray(score)
        if kp.shape[-1] != 2 or score.shape != kp.shape[:-1]:
            raise SampleError(
                f"{where}: 'keypoint' {kp.shape} and 'keypoint_score' {score.shape} do not match "
                f"([M, T, {NUM_WHOLEBODY}, 2] and [M, T, {NUM_WHOLEBODY}])"
            )
        full = np.concatenate([kp.astype(np.float32), score.astype(np.float32)[..., None]], axis=-1)
    if full.shape[0] == 0:
        raise SampleError(f"{where}: no person (M = 0)")
    total = ann.get("total_frames")
    if total is not None and int(total) != full.shape[1]:
        raise SampleError(f"{where}: total_frames is {int(total)} but 'keypoint' has {full.shape[1]} frames")
    if full.shape[0] > 1:
        # Several people detected: keep the signer, i.e. the most confidently tracked person.
        with np.errstate(invalid="ignore"):
            person = int(np.nanargmax(np.nan_to_num(full[..., 2], nan=0.0).sum(axis=(1, 2))))
        full = full[person]
    else:
        full = full[0]
    return check_keypoints(full, sample_id, source)


def _load_pyskl(path: Path, split: str | None, num_classes: int | None) -> tuple[Samples, list[SkippedSample]]:
    """The good samples of ``split`` and every bad one."""
    data = read_pickle_safely(path)
    if not isinstance(data, dict) or "annotations" not in data:
        raise SampleError(f"{path}: not a pyskl annotation file (expected a dict with 'annotations' and 'split')")
    anns = data["annotations"]
    if not isinstance(anns, list):
        raise SampleError(f"{path}: 'annotations' is {type(anns).__name__}, expected a list")
    by_id: dict[str, dict] = {}
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict) or "frame_dir" not in ann:
            raise SampleError(f"{path}: annotation {i} has no 'frame_dir'")
        by_id.setdefault(str(ann["frame_dir"]), ann)
    if split is None:
        wanted = list(by_id)
    else:
        splits = data.get("split")
        if not isinstance(splits, dict):
            raise SampleError(f"{path}: no 'split' dict, cannot select split {split!r} (use split=None for all)")
        if split not in splits:
            raise SampleError(f"{path}: no split {split!r}; available: {sorted(splits)}")
        wanted = [str(s) for s in splits[split]]

    out, bad = Samples(), []
    for sid in wanted:
        label = None
        try:
            ann = by_id.get(sid)
            if ann is None:
                raise SampleError(f"sample {sid!r} ({path}): listed in split {split!r} but has no annotation")
            label = _check_label(ann.get("label"), sid, str(path), num_classes)
            arr = _pyskl_to_array(ann, sid, str(path))
            out.append(Sample(sid, label, str(path), array=arr))
        except SampleError as exc:
            bad.append(SkippedSample(sid, str(exc), label))
    return out, bad


#: Bad samples listed with their reason in the one error; the rest are named by id only.
LISTED_WITH_REASON = 20
#: Beyond this many, further bad sample ids are counted, not named (the line must stay readable).
LISTED_BY_ID = 200


def bad_samples_message(path: Path, where: str, bad: Sequence[SkippedSample]) -> str:
    """One line naming every bad sample (the first ones with their reason) and the way out.

    The data path is named once at the front; per-sample reasons name files relative to it.
    """
    folder = f"{(path if path.is_dir() else path.parent)}{os.sep}"
    reasons = [b.reason.replace(folder, "") for b in bad[:LISTED_WITH_REASON]]
    text = f"{path}: {len(bad)} bad sample(s) {where}: " + "; ".join(reasons)
    rest = [b.sample_id for b in bad[LISTED_WITH_REASON:]]
    if rest:
        named = ", ".join(repr(s) for s in rest[:LISTED_BY_ID])
        more = f" and {len(rest) - LISTED_BY_ID} more" if len(rest) > LISTED_BY_ID else ""
        text += f"; … and {len(rest)} more: {named}{more}"
    return text + " (fix or remove them, or pass --skip-bad to leave them out)"


def _log_skipped(path: Path, where: str, bad: Sequence[SkippedSample]) -> None:
    """--skip-bad: one warning per bad sample (the first ones) and one summary line."""
    for b in bad[:LISTED_WITH_REASON]:
        log.warning("skipping bad sample: %s", b.reason)
    more = f"; {len(bad) - LISTED_WITH_REASON} not shown" if len(bad) > LISTED_WITH_REASON else ""
    log.warning("%s: skipped %d bad sample(s) %s%s", path, len(bad), where, more)


def _split_words(split: str | None) -> str:
    return f"in split {split!r}" if split is not None else "in the data"


def write_pyskl(path: Path | str, annotations: list[dict], split: dict[str, list[str]],
                extra: dict | None = None) -> Path:
    """Write a pyskl annotation pickle atomically (only numpy arrays and plain containers).

    ``extra`` adds top-level keys (e.g. ``classes``); pyskl ignores keys it does not know.
    """
    path = Path(path)
    with atomic_path(path, suffix=".pkl") as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump({**(extra or {}), "split": split, "annotations": annotations}, fh, protocol=4)
    return path


# --------------------------------------------------------------------------------------------
# .npy folder + labels CSV


POSE_SUFFIX = ".pose"


def _read_pose(path: Path, sample_id: str) -> np.ndarray:
    """A .pose file's (T, 133, 3) clip; a bad file is this sample's :class:`SampleError`."""
    from mc.pose_format import PoseFileError, read_pose_file  # pose-format loads only for .pose data

    try:
        return read_pose_file(path)
    except PoseFileError as exc:
        raise SampleError(f"sample {sample_id!r}: {exc}") from None


def _find_labels_csv(folder: Path, split: str | None) -> Path:
    names = ([f"{split}_labels.csv", f"{split}.csv"] if split else []) + ["labels.csv"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise SampleError(f"{folder}: no labels CSV (looked for {', '.join(names)})")


def _read_labels_csv(path: Path) -> list[tuple[int, str, str, str | None]]:
    """Rows as (line number, sample_id, label text, split or None)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise SampleError(f"{path}: {exc}") from exc
    rows = [(n, r) for n, r in enumerate(csv.reader(io.StringIO(text)), start=1) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][1][:2]] in (["sample_id", "label"], ["id", "label"]):
        header = ["sample_id"] + [c.strip().lower() for c in rows[0][1][1:]]
        rows = rows[1:]
    else:
        header = ["sample_id", "label", "split"][: max((len(r) for _, r in rows), default=2)]
    out = []
    for n, r in rows:
        if len(r) < 2:
            raise SampleError(f"{path}:{n}: expected 'sample_id,label', got {','.join(r)!r}")
        split = r[header.index("split")].strip() if "split" in header and len(r) > header.index("split") else None
        out.append((n, r[0].strip(), r[1].strip(), split))
    return out


def _csv_label(label_text: str, sid: str, where: str, num_classes: int | None) -> int:
    try:
        label: Any = int(label_text)
    except ValueError:
        raise SampleError(f"sample {sid!r} ({where}): label {label_text!r} is not an integer") from None
    return _check_label(label, sid, where, num_classes)


def _npy_sample(base: Path, where: str, sid: str, label: int, check_values: bool) -> Sample:
    """One CSV row's sample, its .npy header (and, with ``check_values``, its values) checked."""
    npy = base / f"{sid}.npy"
    if not npy.is_file() and (base / f"{sid}{POSE_SUFFIX}").is_file():
        pose = base / f"{sid}{POSE_SUFFIX}"
        check_keypoints(_read_pose(pose, sid), sid, str(pose), check_values=check_values)
        return Sample(sid, label, str(pose), path=pose)
    if not npy.is_file():
        raise SampleError(f"sample {sid!r} ({where}): file missing: {npy}")
    try:
        arr = np.load(npy, mmap_mode="r", allow_pickle=False)  # maps the file; values are read by the scan
    except (OSError, ValueError) as exc:
        raise SampleError(f"sample {sid!r}: unreadable .npy {npy}: {exc}") from exc
    scan_keypoints(arr, sid, str(npy), check_values=check_values)
    del arr  # nothing of the file stays in memory: items are read again when used
    return Sample(sid, label, str(npy), path=npy)


def _load_npy_folder(path: Path, split: str | None, num_classes: int | None,
                     check_values: bool) -> tuple[Samples, list[SkippedSample]]:
    """The good samples of ``split`` and every bad one."""
    csv_path = path if path.is_file() else _find_labels_csv(path, split)
    rows = _read_labels_csv(csv_path)
    has_split_col = any(s is not None for *_, s in rows)
    if split is not None and has_split_col:
        rows = [r for r in rows if r[3] == split]
    elif split is not None and csv_path.name == "labels.csv":
        raise SampleError(f"{csv_path}: has no 'split' column, cannot select split {split!r} (use split=None)")
    out, bad = Samples(), []
    seen: set[str] = set()
    for n, sid, label_text, _ in rows:
        where = f"{csv_path}:{n}"
        label = None
        try:
            if sid in seen:
                raise SampleError(f"sample {sid!r} ({where}): duplicate sample_id")
            seen.add(sid)
            label = _csv_label(label_text, sid, where, num_classes)
            out.append(_npy_sample(csv_path.parent, where, sid, label, check_values))
        except SampleError as exc:
            bad.append(SkippedSample(sid, str(exc), label))
    return out, bad


def _read_split(path: Path, split: str | None, num_classes: int | None,
                check_values: bool) -> tuple[Samples, list[SkippedSample]]:
    if path.is_file() and path.suffix.lower() in (".pkl", ".pickle"):
        return _load_pyskl(path, split, num_classes)
    if path.is_dir() or path.suffix.lower() == ".csv":
        return _load_npy_folder(path, split, num_classes, check_values)
    raise SampleError(f"{path}: unknown data format (expected a pyskl .pkl, a labels .csv or a folder of "
                      ".npy or .pose files)")


def load_splits(
    path: Path | str,
    splits: Sequence[str | None] = ("train", "test"),
    skip_bad: bool = False,
    num_classes: int | None = None,
    check_values: bool = True,
) -> dict[str | None, Samples]:
    """Read several splits, checking every sample of all of them before raising.

    Without ``skip_bad`` one :class:`SampleError` names the bad samples of every split at once
    (so a user fixes the data in one go, not one sample per run); with it they are logged and
    listed in each split's ``samples.skipped``. Every sample is checked here, up front: shape,
    dtype, label and every value (NaN/inf), .npy files streamed block by block through their
    memory map. ``check_values=False`` leaves the value scan of .npy files to item reads.
    """
    path = Path(path)
    if not path.exists():
        raise SampleError(f"{path}: data path does not exist")
    started = time.perf_counter()
    read = {split: _read_split(path, split, num_classes, check_values) for split in splits}
    bad = [b for _, split_bad in read.values() for b in split_bad]
    where = _split_words(splits[0]) if len(splits) == 1 else "in splits " + ", ".join(
        f"{s!r} ({len(read[s][1])})" for s in splits)
    if bad and not skip_bad:
        raise SampleError(bad_samples_message(path, where, bad))
    out: dict[str | None, Samples] = {}
    for split, (samples, split_bad) in read.items():
        if split_bad:
            _log_skipped(path, _split_words(split), split_bad)
        samples.skipped = list(split_bad)
        if not samples:
            raise SampleError(f"{path}: no usable samples in split {split!r}"
                              + (f" ({len(split_bad)} skipped as bad)" if split_bad else ""))
        out[split] = samples
    log.info("%s: checked %d sample(s) %s in %.1f s", path, sum(len(s) + len(b) for s, b in read.values()),
             ", ".join(_split_words(s) for s in splits), time.perf_counter() - started)
    return out


def load_samples(
    path: Path | str,
    split: str | None = "train",
    skip_bad: bool = False,
    num_classes: int | None = None,
    check_values: bool | None = None,
) -> Samples:
    """Read the samples of one split from a pyskl pickle, a labels CSV or a folder of .npy/.pose files.

    ``split=None`` takes every sample. ``num_classes`` (when known) also rejects labels out of
    range. Every sample is checked up front (see :func:`load_splits`) and all bad ones are
    reported in one error; ``check_values=False`` skips the value scan of .npy files (their
    values are then checked when an item is read).
    """
    return load_splits(path, (split,), skip_bad=skip_bad, num_classes=num_classes,
                       check_values=True if check_values is None else check_values)[split]


# --------------------------------------------------------------------------------------------
# Dataset


class SkeletonDataset(Dataset):
    """Torch dataset of fixed-length stream inputs.

    ``ds[i]`` is ``(x, label, i)`` with ``x`` a float32 tensor (C=3, T=frames, V=num_nodes, M=1).
    Randomness (crop, augmentation) is drawn from ``np.random.default_rng((seed, epoch, i))``, so
    an item is the same whatever worker reads it and a resumed run sees the same data: call
    :meth:`set_epoch` at the start of every epoch (before creating the DataLoader iterator).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        layout: Layout | str = DEFAULT_KEYPOINT_SET,
        stream: str = "joint",
        frames: int = 64,
        train: bool = True,
        seed: int = 0,
        num_classes: int | None = None,
        transform: TransformConfig | None = None,
    ):
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}; choose one of {STREAMS}")
        if not samples:
            raise ValueError("SkeletonDataset needs at least one sample")
        self.samples = list(samples)
        #: (sample id, why) of the bad samples left out before this dataset (``skip_bad``)
        self.skipped: list[SkippedSample] = list(getattr(samples, "skipped", []))
        self.layout = layout if isinstance(layout, Layout) else get_layout(layout)
        self.stream = stream
        self.frames = int(frames)
        self.train = train
        self.seed = int(seed)
        self.epoch = 0
        self.transform = transform or TransformConfig()
        self.labels = np.array([s.label for s in self.samples], dtype=np.int64)
        if num_classes is None:
            num_classes = int(self.labels.max()) + 1
        else:
            bad = np.flatnonzero((self.labels < 0) | (self.labels >= num_classes))
            if len(bad):
                s = self.samples[int(bad[0])]
                raise SampleError(
                    f"sample {s.sample_id!r} ({s.source}): label {s.label} out of range 0..{num_classes - 1}"
                )
        self.num_classes = int(num_classes)

    @property
    def sample_ids(self) -> list[str]:
        return [s.sample_id for s in self.samples]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def item_array(self, index: int) -> np.ndarray:
        """The (T, V, 3) numpy input of item ``index`` for the current epoch."""
        s = self.samples[index]
        rng = np.random.default_rng((self.seed, self.epoch, index)) if self.train else None
        try:
            return prepare(s.keypoints(), self.layout, self.stream, self.frames, self.train, rng, self.transform)
        except SampleError:
            raise
        except ValueError as exc:
            raise SampleError(f"sample {s.sample_id!r} ({s.source}): {exc}") from exc

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        x = self.item_array(index)
        # (T, V, C) -> (C, T, V, M=1)
        tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[..., None]))
        return tensor, int(self.labels[index]), int(index)
