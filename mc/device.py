"""Where and how tensors run: device choice, mixed precision, seeding and determinism.

Shared by training and evaluation (one home, so neither imports the other for it).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU; anything else as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return dev


def amp_enabled(setting: str, device: torch.device) -> bool:
    """Mixed precision: 'on', 'off', or 'auto' (on for CUDA only)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype: float16 (with a GradScaler) on CUDA; bfloat16 on CPU, which CPU
    autocast supports and which needs no scaler."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def configure_determinism(device: torch.device) -> None:
    """Deterministic kernels, so a resumed run ends with exactly the metrics of an uninterrupted one."""
    # warn_only: a few CUDA kernels (index_add backward) have no deterministic variant; on CPU
    # everything we use is deterministic.
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
