"""The joints picture (the paper's Figure 5): per-joint importance drawn on the skeleton.

One column per model (a CE-only run and a GSP-MC run side by side when both are given): the
whole skeleton at the mean pose of the clips, and below it the hands and the face enlarged —
at full-body scale they are a few pixels wide. As in the paper, nodes are pink with their size
and colour showing importance, links blue with their width and opacity showing the mean
importance of their two joints. The signer faces the viewer, so the signer's right hand is on
the picture's left. Rendering uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gsp.atomic import atomic_path
from mc.joints import JointImportance

NODE_CMAP = "RdPu"
LINK_COLOUR = "#1f5fa8"
#: Enlarged parts under each skeleton, left to right (the signer's right hand is on the left).
INSETS = (("right hand", ("right_hand",)), ("face and mouth", ("face", "mouth")), ("left hand", ("left_hand",)))


def _draw_skeleton(ax, pose: np.ndarray, importance: np.ndarray, edges: Sequence[tuple[int, int]],
                   nodes: Sequence[int], node_scale: float, link_scale: float) -> object:
    """Links then nodes of the ``nodes`` subset, y pointing down as in the image."""
    import matplotlib.pyplot as plt

    chosen = set(nodes)
    for a, b in edges:
        if a in chosen and b in chosen:
            s = float(importance[a] + importance[b]) / 2
            ax.plot(pose[[a, b], 0], pose[[a, b], 1], color=LINK_COLOUR, lw=0.4 + link_scale * s,
                    alpha=0.2 + 0.7 * s, solid_capstyle="round", zorder=1)
    idx = np.asarray(sorted(chosen))
    imp = importance[idx]
    order = np.argsort(imp)  # the most important drawn last, on top
    sc = ax.scatter(pose[idx[order], 0], pose[idx[order], 1], s=6 + node_scale * imp[order] ** 1.5,
                    c=imp[order], cmap=plt.get_cmap(NODE_CMAP), vmin=0, vmax=1, edgecolors="#5a0f3c",
                    linewidths=0.4, zorder=2)
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_color("#cccccc")
    return sc


def _zoom(ax, pose: np.ndarray, nodes: Sequence[int], margin: float = 0.12) -> None:
    pts = pose[list(nodes)]
    lo, hi = pts.min(0), pts.max(0)
    span = max(float((hi - lo).max()), 1e-3) * (1 + 2 * margin)
    centre = (lo + hi) / 2
    ax.set_xlim(centre[0] - span / 2, centre[0] + span / 2)
    ax.set_ylim(centre[1] + span / 2, centre[1] - span / 2)  # y down


def _panel(fig, spec, result: JointImportance, pose: np.ndarray):
    """One model's column: the whole skeleton on top, the enlarged parts below."""
    layout = result.layout
    grid = spec.subgridspec(2, 3, height_ratios=(2.0, 1), hspace=0.18, wspace=0.06)
    whole = fig.add_subplot(grid[0, :])
    sc = _draw_skeleton(whole, pose, result.importance, layout.edges, range(layout.num_nodes), 170, 3.0)
    means = result.part_means()
    whole.set_title(result.title + "\n" + "  ".join(f"{p.replace('_', ' ')} {m:.2f}" for p, m in means.items()),
                    fontsize=9)
    for k, (name, parts) in enumerate(INSETS):
        ax = fig.add_subplot(grid[1, k])
        nodes = [v for p in parts if p in layout.parts for v in layout.parts[p]]
        if not nodes:
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"no {name}\nin {layout.name}", ha="center", va="center", fontsize=8, color="#888888")
            continue
        _draw_skeleton(ax, pose, result.importance, layout.edges, nodes, 160, 2.5)
        _zoom(ax, pose, nodes)
        ax.set_title(f"{name}\nmean {np.mean(result.importance[nodes]):.2f}", fontsize=8)
    return sc


def draw_joints(panels: Sequence[tuple[JointImportance, np.ndarray]], out: Path | str) -> Path:
    """Write the picture of one or more models' joint importance (each with its (V, 2) pose) as a
    PNG, atomically; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    fig = plt.figure(figsize=(5.2 * len(panels) + 0.8, 7.6), dpi=130)
    grid = fig.add_gridspec(1, len(panels) + 1, width_ratios=[1] * len(panels) + [0.04], wspace=0.12)
    sc = None
    for k, (result, pose) in enumerate(panels):
        sc = _panel(fig, grid[0, k], result, pose)
    bar = fig.colorbar(sc, cax=fig.add_subplot(grid[0, -1]))
    bar.set_label("joint importance (channel-averaged final features, ÷ max per model)", fontsize=8)
    fig.suptitle("Per-joint importance of the skeleton encoder (paper Fig. 5); pink size/colour = importance, "
                 "blue link width = mean of its joints", fontsize=9)
    try:
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return out
