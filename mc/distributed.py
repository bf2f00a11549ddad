"""Launching multi-process training: :func:`launch_training` runs ``torchrun`` (``torch.distributed.run``)
as a subprocess, one DistributedDataParallel worker per process, and returns rank 0's metrics.

    launch_training(config, nproc_per_node=2)   # what `gsp train --nproc-per-node 2` calls

How a run is laid out:

- the caller's process checks what a user can get wrong (config, global batch vs process count,
  run folder) before anything starts, so those are one line each, as in a single process;
- ``python -m mc.distributed agent N CONFIG TMP`` runs torchrun's agent (standalone rendezvous on
  this machine) with N workers ``python -m mc.distributed worker CONFIG TMP``; the agent exits
  quietly with status 1 when a worker fails, instead of torchrun's traceback;
- a worker joins the process group (NCCL on CUDA, gloo on CPU, :mod:`mc.ddp`) and runs
  :func:`mc.train.train`; an error meant for the user (bad data, say) is written to
  ``TMP/error-rank<R>.txt`` and raised here as one line;
- a worker dies with its agent (Linux ``PR_SET_PDEATHSIG``), so a killed launch leaves no
  process training alone; the next launch resumes from the last checkpoint.

With ``nproc_per_node == 1`` it is :func:`mc.train.train` in this process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from gsp.errors import GspError
from mc import ddp
from mc.device import resolve_device
from mc.run_folder import RunFolder, check_run_folder
from mc.train import EpochCallback, StepCallback, TrainConfig, train


class DistributedRunError(GspError, RuntimeError):
    """A worker of a multi-process run stopped on an error (its one-line message)."""


def launch_training(config: TrainConfig | dict, nproc_per_node: int = 1, on_epoch: EpochCallback | None = None,
                    on_step: StepCallback | None = None) -> dict:
    """Train with ``nproc_per_node`` processes on this machine; returns (and the run folder's
    ``metrics.json`` holds) the test metrics. ``batch_size`` is the global batch. ``on_epoch``
    and ``on_step`` (see :func:`mc.train.train`) are called in one process only: the ranks of
    several are processes of their own, whose epochs are in the run folder's TensorBoard scalars."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**config)
    if nproc_per_node < 1:
        raise ddp.DistributedConfigError(f"nproc_per_node {nproc_per_node} is not valid; use 1 or more")
    if nproc_per_node == 1:
        return train(cfg, on_epoch, on_step)
    ddp.per_rank_batch(cfg.recipe()["batch_size"], nproc_per_node)
    check_run_folder(cfg.out)
    with tempfile.TemporaryDirectory(prefix="gsp-ddp-") as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(cfg.model_dump_json(), encoding="utf-8")
        cmd = [sys.executable, "-m", "mc.distributed", "agent", str(nproc_per_node), str(config_file), tmp]
        proc = subprocess.Popen(cmd)
        try:
            status = proc.wait()
        except BaseException:  # Ctrl-C, a cancelled flow: the agent stops its workers on SIGTERM
            proc.terminate()
            proc.wait()
            raise
        if status != 0:
            raise DistributedRunError(_failure(Path(tmp), status))
    return json.loads(RunFolder(cfg.out).metrics.read_text(encoding="utf-8"))


def _failure(tmp: Path, status: int) -> str:
    """The lowest rank's recorded error (rank 0 fails first on what they all share), else a pointer to the log."""
    files = sorted(tmp.glob("error-rank*.txt"), key=lambda p: int(p.stem.removeprefix("error-rank")))
    if files:
        return files[0].read_text(encoding="utf-8").strip()
    return f"a training process failed (torchrun agent exit status {status}); its traceback is in the log above"


# --------------------------------------------------------------------------- subprocess entry points


def _agent(nproc: int, config_file: str, tmp: str) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # A free port picked by the standalone rendezvous, so several runs can share a machine.
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "mc.distributed",
                                         "worker", config_file, tmp])
    try:
        run(args)
    except ChildFailedError:
        return 1  # the worker wrote its error (or its traceback); torchrun's own report adds nothing
    return 0


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its agent dies (kill -9, OOM), so a killed launch
    leaves nothing training alone."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))


def _worker(config_file: str, tmp: str) -> int:
    _die_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    # Rank 0 tells the story (resume, text coverage); the others only their errors.
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mc").setLevel(logging.INFO if rank == 0 else logging.ERROR)
    cfg = TrainConfig.model_validate_json(Path(config_file).read_text(encoding="utf-8"))
    ddp.init_process_group(resolve_device(cfg.device))
    try:
        train(cfg)
    except (GspError, ValueError, RuntimeError, OSError) as exc:  # what the CLI reports as one line
        (Path(tmp) / f"error-rank{rank}.txt").write_text(str(exc).splitlines()[0] if str(exc) else repr(exc),
                                                         encoding="utf-8")
        return 2
    finally:
        ddp.destroy_process_group()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "agent":
        return _agent(int(argv[1]), argv[2], argv[3])
    if len(argv) == 3 and argv[0] == "worker":
        return _worker(argv[1], argv[2])
    print("usage: python -m mc.distributed agent N CONFIG.json TMP | worker CONFIG.json TMP", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
