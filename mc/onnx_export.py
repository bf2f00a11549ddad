"""The inference export as ONNX, and prediction with ONNX Runtime.

``model.onnx`` (beside a run's ``export.pt``) holds what ``export.pt`` holds — the skeleton
encoder and classifier only, no text branch — as one graph ``x (N, C, T, V, M) → logits (N, K)``
with the batch N and the frame count T dynamic. What :func:`mc.evaluate.predict_file` needs
besides the weights is kept as the model's ``metadata_props`` (strings; lists and mappings as
JSON):

- ``gsp.format`` — ``gsp-mc-onnx/1``
- ``gsp.labels``, ``gsp.trained_labels`` — label names by id; the ids the classifier was
  trained on (a prediction ranks only those)
- ``gsp.layout``, ``gsp.stream``, ``gsp.frames``, ``gsp.transform`` — the test-time
  preprocessing (:func:`mc.evaluate.prediction_input`)
- ``gsp.model_config`` — the model's config as ``export.pt`` stores it
- ``gsp.source``, ``gsp.source_sha256`` — the ``export.pt`` it was made from

The graph comes from torch's dynamo exporter (``torch.export`` + onnxscript): it handles the model
once the batch and frame dimensions are ``Dim.DYNAMIC`` (named ranges make ``torch.export``
refuse: it cannot prove the frame count's divisibility guards of the two stride-2 units).
Preprocessing and the top-k list are :mod:`mc.evaluate`'s, so ``gsp predict model.onnx`` and
``gsp predict export.pt`` print the same thing.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path

import numpy as np

from gsp.atomic import atomic_path, sha256_file
from mc.evaluate import (
    EvaluationError,
    load_inference,
    prediction_input,
    read_keypoint_file,
    top_predictions,
)
from mc.keypoints import DEFAULT_KEYPOINT_SET
from mc.run_folder import ONNX_FILE, RunFolder


class ExportError(EvaluationError):
    """A run that cannot be exported, or an output path that may not be written."""


ONNX_FORMAT = "gsp-mc-onnx/1"
INPUT_NAME = "x"
OUTPUT_NAME = "logits"
#: Sizes of the example input the graph is traced with. Both must be above 1: torch.export
#: specialises a dimension of size 0 or 1 to a constant instead of keeping it dynamic.
TRACE_BATCH = 2
TRACE_FRAMES = 32
#: Metadata values stored as JSON (the rest are plain strings; ``frames`` an integer).
_JSON_KEYS = ("labels", "trained_labels", "transform", "model_config")
_PREFIX = "gsp."


def default_onnx_path(source: Path | str) -> Path:
    """Where the ONNX export of a run folder or an ``export.pt`` goes: beside ``export.pt``."""
    source = Path(source)
    return (source if source.is_dir() else source.parent) / ONNX_FILE


def predict_transform() -> dict:
    """The :class:`mc.transforms.TransformConfig` fields that act at test time, as predict uses
    them (training augmentation does not reach an export)."""
    from mc.transforms import TransformConfig

    config = TransformConfig()
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name in ("score_threshold", "test_crop")}


def onnx_metadata(payload: Mapping, source: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX export made from an ``export.pt`` payload."""
    values = {
        "format": ONNX_FORMAT,
        "labels": list(payload.get("labels") or []),
        "layout": str(payload.get("layout") or DEFAULT_KEYPOINT_SET),
        "stream": str(payload["stream"]),
        "frames": str(int(payload["frames"])),
        "transform": {**predict_transform(), **dict(payload.get("transform") or {})},
        "model_config": payload["model_config"],
        "source": str(source),
        "source_sha256": sha256_file(source),
    }
    if payload.get("trained_labels") is not None:
        values["trained_labels"] = [int(c) for c in payload["trained_labels"]]
    return {_PREFIX + k: json.dumps(v) if k in _JSON_KEYS else v for k, v in values.items()}


def read_metadata(props: Mapping[str, str], path: Path | str) -> dict:
    """``export.pt``-like settings (labels, layout, stream, frames, …) from an ONNX export's
    metadata; a file without them is not one of ours."""
    found = props.get(_PREFIX + "format")
    if found != ONNX_FORMAT:
        raise EvaluationError(f"{path}: not a gsp-mc ONNX export (metadata gsp.format is {found!r}, expected "
                              f"{ONNX_FORMAT!r}; `gsp export RUN --onnx` writes one)")
    settings: dict = {}
    for key, raw in props.items():
        if not key.startswith(_PREFIX):
            continue
        name = key.removeprefix(_PREFIX)
        try:
            settings[name] = json.loads(raw) if name in _JSON_KEYS else raw
        except ValueError:
            raise EvaluationError(f"{path}: damaged gsp-mc ONNX export (metadata {key} is not JSON)") from None
    missing = [k for k in ("stream", "frames", "layout") if k not in settings]
    if missing or not str(settings.get("frames", "")).isdigit():
        raise EvaluationError(f"{path}: incomplete gsp-mc ONNX export (metadata lacks a usable "
                              f"{', '.join(_PREFIX + k for k in missing or ['frames'])})")
    settings["frames"] = int(settings["frames"])
    return settings


def _export_graph(model, num_nodes: int, in_channels: int, num_persons: int):
    """The dynamo exporter's ONNX model proto of ``model`` with dynamic batch and frame count."""
    import torch

    x = torch.zeros(TRACE_BATCH, in_channels, TRACE_FRAMES, num_nodes, num_persons)
    dynamic = torch.export.Dim.DYNAMIC
    with warnings.catch_warnings():  # torch's exporter warns about internals a user cannot act on
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: dynamic, 2: dynamic},),
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], optimize=True,
                                    verbose=False)
    return program.model_proto


def export_onnx(source: Path | str, out_path: Path | str | None = None) -> Path:
    """Write the ONNX export of an ``export.pt`` (or of a run folder's) to ``out_path`` (default
    ``model.onnx`` beside it), atomically; returns its path."""
    import onnx

    source = Path(source)
    export_pt = RunFolder(source).export if source.is_dir() else source
    out = Path(out_path) if out_path is not None else default_onnx_path(source)
    model, payload = load_inference(export_pt)
    cfg = model.cfg
    proto = _export_graph(model, cfg.num_nodes, cfg.in_channels, cfg.num_persons)
    onnx.helper.set_model_props(proto, onnx_metadata(payload, export_pt))
    proto.doc_string = ("gsp-mc inference model (skeleton encoder + classifier): x float32 (N, C, T, V, M) "
                        "-> logits (N, K); see metadata gsp.*")
    with atomic_path(out, suffix=".onnx") as tmp:
        onnx.save_model(proto, str(tmp))
    return out


def is_onnx_export(path: Path) -> bool:
    """Whether ``path`` is an ONNX export of ours (so writing over it loses nothing of a user's)."""
    import onnx

    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # anything unreadable as ONNX is not ours
        return False
    return any(p.key == _PREFIX + "format" and p.value == ONNX_FORMAT for p in proto.metadata_props)


def _is_torch_export(path: Path) -> bool:
    try:
        load_inference(path)
    except EvaluationError:
        return False
    return True


def _check_out(out: Path, suffix: str, is_ours, what: str) -> None:
    """Refuse an output path before any work: the wrong suffix, a folder, or a user's file."""
    from gsp.atomic import check_replaceable

    if out.suffix.lower() != suffix:
        raise ExportError(f"--out {out}: must end in {suffix} (gsp predict tells the formats apart by it)")
    check_replaceable(out, is_ours, what, folder=False)


def run_checkpoint(run_dir: Path | str) -> Path:
    """The last checkpoint of a training run folder; one line if it is not one or has none."""
    from mc.run_folder import RUN_MARKER

    run = RunFolder(Path(run_dir))
    if not run.root.is_dir():
        found = "a file" if run.root.is_file() else "missing"
        raise ExportError(f"{run.root}: not a training run folder ({found}; give the folder `gsp train --out` wrote)")
    if not run.checkpoint.is_file():
        why = ("its training has not finished an epoch yet" if run.marker.is_file()
               else f"no {RUN_MARKER} marker either: not a gsp training run")
        raise ExportError(f"{run.root}: no checkpoint {run.checkpoint.relative_to(run.root)} ({why})")
    return run.checkpoint


def export_run(run_dir: Path | str, onnx: bool = False, out: Path | str | None = None,
               notify: Callable[[str], None] | None = None) -> list[Path]:
    """(Re)write a run's ``export.pt`` from its last checkpoint and, with ``onnx``, its ONNX export.
    ``out`` is where the asked-for format goes (default: in the run folder); ``notify`` hears
    about the slow step before it starts. Returns what was written."""
    from mc.evaluate import export_inference

    run = RunFolder(Path(run_dir))
    checkpoint = run_checkpoint(run.root)
    target = Path(out) if out is not None else (run.onnx if onnx else run.export)
    if onnx:
        _check_out(target, ".onnx", is_onnx_export, "a gsp-mc ONNX export")
    else:
        _check_out(target, ".pt", _is_torch_export, "a gsp-mc export")
    export_pt = export_inference(checkpoint, run.export if onnx else target)
    if not onnx:
        return [export_pt]
    if notify is not None:  # torch.export traces every operation symbolically: tens of seconds
        notify("tracing the model for ONNX (this can take a minute)…")
    return [export_pt, export_onnx(export_pt, target)]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


#: ONNX Runtime's graph optimisation levels by short name.
OPTIMIZATION_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
                       "none": "ORT_DISABLE_ALL"}


class OnnxPredictor:
    """An ONNX export loaded in ONNX Runtime (CPU): its settings and a logits function."""

    def __init__(self, path: Path | str, threads: int | None = None, optimization: str = "all"):
        """``threads``: ONNX Runtime's intra-op threads (default: one per physical core);
        ``optimization``: its graph optimisation level, one of :data:`OPTIMIZATION_LEVELS`."""
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise EvaluationError(f"{self.path}: ONNX model not found")
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[optimization])
        options.log_severity_level = 3  # ORT's warnings go to stderr unasked; errors still raise
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own pybind types (InvalidProtobuf, Fail, …)
            raise EvaluationError(f"{self.path}: not a readable ONNX model ({_first_line(exc)})") from None
        self.settings = read_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, K) of a float32 batch (N, C, T, V, M)."""
        try:
            return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        except Exception as exc:
            raise EvaluationError(f"{self.path}: ONNX Runtime could not run the model on input of shape "
                                  f"{tuple(x.shape)} ({_first_line(exc)})") from None


def predict_onnx_file(model_path: Path | str, keypoint_file: Path | str, topk: int = 5) -> list[dict]:
    """:func:`mc.evaluate.predict_file` with ONNX Runtime: the same preprocessing and top-k list."""
    predictor = OnnxPredictor(model_path)
    x = prediction_input(read_keypoint_file(Path(keypoint_file)), predictor.settings, model_path)
    return top_predictions(predictor.logits(x)[0], predictor.settings, topk)
