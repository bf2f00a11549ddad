"""The layout of a training-run folder and of an evaluation folder: the one home of their file names.

A training run (``gsp train --out RUN``, one stream of the ``mc`` flow)::

    RUN/
      .gsp-run                 marker: this folder is a gsp training run (may be replaced by a re-run)
      checkpoints/last.pt      the latest checkpoint (every epoch; a re-run resumes from it)
      tb/                      TensorBoard scalars
      test_scores.npz          logits, labels and sample ids of the test split (what ensembles fuse)
      confusion.csv            K×K counts, rows = true class
      metrics.json             test metrics, recipe, history, device, seed, …
      export.pt                the inference-only model (skeleton encoder + classifier)
      model.onnx               the same model for ONNX Runtime (`gsp export RUN --onnx`)
      eval-<split>/            `gsp eval RUN --split <split>` (an evaluation folder)
      zeroshot-<split>/        `gsp eval RUN --zero-shot` (metrics.json of the held-out classes)

An evaluation or ensemble folder (``gsp eval``, ``gsp ensemble --out``) holds ``.gsp-eval``,
``test_scores.npz``, ``confusion.csv`` and ``metrics.json``.

Training, evaluation, the flows, the benches and the CLI all take the names from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gsp.atomic import check_replaceable, claim_folder

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
METRICS_FILE = "metrics.json"
SCORES_FILE = "test_scores.npz"
CONFUSION_FILE = "confusion.csv"
EXPORT_FILE = "export.pt"
ONNX_FILE = "model.onnx"
TENSORBOARD_DIR = "tb"
RUN_MARKER = ".gsp-run"
EVAL_MARKER = ".gsp-eval"


@dataclass(frozen=True)
class ScoresFolder:
    """A folder with one model's (or one ensemble's) test scores, confusion matrix and metrics."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def scores(self) -> Path:
        return self.root / SCORES_FILE

    @property
    def confusion(self) -> Path:
        return self.root / CONFUSION_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE


@dataclass(frozen=True)
class RunFolder(ScoresFolder):
    """A training run's folder (see the module docstring)."""

    @property
    def marker(self) -> Path:
        return self.root / RUN_MARKER

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def checkpoint(self) -> Path:
        return self.checkpoint_dir / LAST_CHECKPOINT

    @property
    def export(self) -> Path:
        return self.root / EXPORT_FILE

    @property
    def onnx(self) -> Path:
        return self.root / ONNX_FILE

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    def eval_dir(self, split: str) -> Path:
        """Where `gsp eval` writes by default."""
        return self.root / f"eval-{split}"


RUN_WHAT = "a gsp training run"


def _has_checkpoint(path: Path) -> bool:  # a run folder from before markers existed
    return RunFolder(path).checkpoint.is_file()


def check_run_folder(out: Path | str) -> None:
    """Refuse ``out`` up front, creating nothing, unless :func:`claim_run_folder` would take it."""
    check_replaceable(out, lambda p: (p / RUN_MARKER).is_file() or _has_checkpoint(p), RUN_WHAT)


def claim_run_folder(out: Path | str) -> RunFolder:
    """A folder to train into: new, empty, or one of our runs (its marker, or a checkpoint from
    before markers existed); never a user's folder whose files would be written over."""
    root = claim_folder(out, RUN_MARKER, RUN_WHAT, _has_checkpoint)
    return RunFolder(root)


def claim_eval_folder(out: Path | str) -> ScoresFolder:
    """An evaluation or ensemble output folder: new, empty, or one we wrote before (its scores
    file), never a user's folder whose same-named files would be replaced."""
    root = claim_folder(out, EVAL_MARKER, "a gsp evaluation folder", lambda p: ScoresFolder(p).scores.is_file())
    return ScoresFolder(root)
