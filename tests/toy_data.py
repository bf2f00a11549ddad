"""Small skeleton data sets and description runs that several test modules share (a fixture
module: test files import from here, never from each other)."""

from __future__ import annotations

import numpy as np

from gsp.schema import KINDS, read_kind, row_key, write_kind
from mc.data import write_pyskl


def keypoint_clip(t: int, seed: int = 0) -> np.ndarray:
    """A plausible (t, 133, 3) clip: points around a body with shoulders 40 px apart."""
    rng = np.random.default_rng(seed)
    x = np.zeros((t, 133, 3), dtype=np.float32)
    x[..., :2] = rng.uniform(100, 200, (t, 133, 2))
    x[:, 5, :2] = (170, 120)
    x[:, 6, :2] = (130, 120)
    x[..., 2] = rng.uniform(0.5, 1.0, (t, 133))
    return x


def pyskl_annotation(frame_dir: str, label, t: int = 12, people: int = 1, seed: int = 0) -> dict:
    clips = np.stack([keypoint_clip(t, seed + p) for p in range(people)])
    return {"frame_dir": frame_dir, "label": label, "keypoint": clips[..., :2],
            "keypoint_score": clips[..., 2], "total_frames": t, "img_shape": (480, 640)}


def toy_pyskl(path, num_classes=6, per_class=6, test_per_class=3, frames=20, seed=0):
    """Whole-body clips whose right hand moves in a class-specific direction (noise, size, shift)."""
    rng = np.random.default_rng(seed)
    template = rng.normal(0, 0.3, size=(133, 2))
    template[5], template[6] = (-1, 0), (1, 0)
    anns, split = [], {"train": [], "test": []}
    for c in range(num_classes):
        ang = 2 * np.pi * c / num_classes
        for k in range(per_class + test_per_class):
            sid = f"c{c:02d}_s{k:02d}"
            t = np.linspace(0, 1, frames)[:, None]
            kp = np.repeat(template[None], frames, 0) * rng.uniform(0.9, 1.1) + rng.normal(0, 0.05, (1, 1, 2))
            kp[:, 112:133] += (t * np.array([np.cos(ang), np.sin(ang)]))[:, None, :]
            kp += rng.normal(0, 0.03, kp.shape)
            anns.append({"frame_dir": sid, "label": c, "keypoint": (kp[None] * 100 + 300).astype(np.float32),
                         "keypoint_score": np.ones((1, frames, 133), np.float32), "total_frames": frames,
                         "img_shape": (600, 600)})
            split["train" if k < per_class else "test"].append(sid)
    return write_pyskl(path, anns, split)


def toy_descriptions(run_dir, num_classes=6):
    dirs = ["right", "upper right", "upper left", "left", "lower left", "lower right", "down", "up"]

    def row(label, kind, variant, text, parts=()):
        return {"key": row_key(label, kind, variant), "label": label, "gloss": f"sign{label}", "lang": "en",
                "kind": kind, "variant": variant, "text": text, "body_parts": list(parts), "status": "ok",
                "sources": []}

    rows = {k: [] for k in ("Tb", "Tg", "Ts", "Tp")}
    for c in range(num_classes):
        d = dirs[c % len(dirs)]
        rows["Tb"].append(row(c, "Tb", 0, f"Move the right hand {d}."))
        rows["Tg"].append(row(c, "Tg", 0, f"The right hand moves straight towards the {d} while the body stays still."))
        rows["Ts"] += [row(c, "Ts", v, f"variant {v}: the dominant hand travels {d}") for v in range(2)]
        rows["Tp"].append(row(c, "Tp", 0, f"right hand travels {d}", ["right_hand"]))
        rows["Tp"].append(row(c, "Tp", 1, "the body and face stay neutral", ["body", "face"]))
    for kind, r in rows.items():
        write_kind(run_dir, kind, r)
    return run_dir


def rows_by_key(run_dir) -> dict[str, dict]:
    """Every row of a description run (all kinds), by its key."""
    return {r["key"]: r for kind in KINDS for r in read_kind(run_dir, kind).to_dict("records")}
