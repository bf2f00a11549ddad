"""Benchmark: cost of the contrastive loss per training step, and of the exported model.

Prints one table (nothing is written):

- training samples/s with CE only vs CE + the full hierarchical contrastive loss (Tg, Ts, Tp for
  five parts; text features precomputed, as in training) and their time ratio (aim ≤ 1.10);
- inference samples/s of the exported model (encoder + classifier) vs a CE-only model of the same
  size (aim: within 2 %).

    .venv/bin/python bench/train_step.py --preset tiny
    .venv/bin/python bench/train_step.py --preset slr500 --batch 8 --steps 3   # full-size CPU rate
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mc.keypoints import DEFAULT_KEYPOINT_SET, get_layout
from mc.model import GSPMCModel, model_config_for
from mc.presets import get_recipe
from mc.text_features import TextBank
from mc.train import Learner, train_step


def synthetic_bank(num_classes: int, dim: int, parts: list[str], seed: int = 0) -> TextBank:
    """A text bank shaped like a generated run: per sign 1 Tg, 3 Ts and 4 Tp over two parts each."""
    g = torch.Generator().manual_seed(seed)
    labels, kinds = [], []
    bank = TextBank(features=torch.empty(0), labels=torch.empty(0), kinds=[], texts=[])
    for c in range(num_classes):
        for kind, n in (("Tg", 1), ("Ts", 3), ("Tp", 4)):
            for j in range(n):
                i = len(labels)
                labels.append(c)
                kinds.append(kind)
                if kind == "Tg":
                    bank.tg_rows.setdefault(c, []).append(i)
                elif kind == "Ts":
                    bank.ts_rows.setdefault(c, []).append(i)
                else:
                    for p in (parts[j % len(parts)], parts[(j + 1) % len(parts)]):
                        bank.tp_rows.setdefault(p, {}).setdefault(c, []).append(i)
    bank.features = F.normalize(torch.randn(len(labels), dim, generator=g), dim=1)
    bank.labels = torch.tensor(labels)
    bank.kinds = kinds
    bank.texts = [""] * len(labels)
    return bank


def time_train(model: GSPMCModel, x, y, bank: TextBank | None, steps: int) -> float:
    """Samples/s of training's own step (:func:`mc.train.train_step`), on CPU in float32."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    learner = Learner(model=model, optimizer=opt, scaler=torch.amp.GradScaler("cpu", enabled=False),
                      device=torch.device("cpu"), bank=bank)
    gen = torch.Generator().manual_seed(0)
    model.train()
    elapsed = 0.0
    for i in range(steps + 1):
        t0 = time.perf_counter()
        train_step(learner, x, y, gen)
        if i:  # first step is warm-up
            elapsed += time.perf_counter() - t0
    return steps * x.shape[0] / elapsed


@torch.no_grad()
def time_infer(model: torch.nn.Module, x, steps: int) -> float:
    model.eval()
    model(x)
    t0 = time.perf_counter()
    for _ in range(steps):
        model(x)
    return steps * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--num-classes", type=int, default=46)
    ap.add_argument("--text-dim", type=int, default=384)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="Interleaved repeats; the best of each is kept.")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    p = get_recipe(args.preset)
    layout = get_layout(DEFAULT_KEYPOINT_SET)
    batch = args.batch or p.batch_size
    torch.manual_seed(0)
    x = torch.randn(batch, 3, p.frames, layout.num_nodes, 1)
    y = torch.randint(0, args.num_classes, (batch,))
    cfg = model_config_for(layout, args.num_classes, base_channels=p.base_channels, text_dim=args.text_dim)
    contrastive_model = GSPMCModel(cfg)
    ce_model = GSPMCModel(model_config_for(layout, args.num_classes, base_channels=p.base_channels))
    ce_model.load_state_dict(
        {k: v for k, v in contrastive_model.state_dict().items() if not k.startswith("projections")})
    bank = synthetic_bank(args.num_classes, args.text_dim, list(layout.parts))
    exported = contrastive_model.inference_model()
    plain = ce_model  # what a CE-only run evaluates with (its forward() is the classifier path)

    best = {"ce": 0.0, "con": 0.0, "export": 0.0, "plain": 0.0}
    for _ in range(args.repeats):  # interleave so background load hits both sides alike
        best["ce"] = max(best["ce"], time_train(ce_model, x, y, None, args.steps))
        best["con"] = max(best["con"], time_train(contrastive_model, x, y, bank, args.steps))
        best["export"] = max(best["export"], time_infer(exported, x, args.steps))
        best["plain"] = max(best["plain"], time_infer(plain, x, args.steps))

    print(f"preset {args.preset}: batch {batch}, {p.frames} frames, width {p.base_channels}, "
          f"{args.num_classes} classes, threads {torch.get_num_threads()}")
    print(f"{'measure':<38}{'samples/s':>12}{'ratio':>10}")
    print(f"{'train step, CE only':<38}{best['ce']:>12.1f}{'':>10}")
    print(f"{'train step, CE + hierarchical L_con':<38}{best['con']:>12.1f}{best['ce'] / best['con']:>9.3f}x")
    print(f"{'inference, CE-only model':<38}{best['plain']:>12.1f}{'':>10}")
    print(f"{'inference, exported model':<38}{best['export']:>12.1f}{best['plain'] / best['export']:>9.3f}x")
    print("(ratio = time per sample relative to the line above; aims: <= 1.10x and <= 1.02x)")


if __name__ == "__main__":
    main()
