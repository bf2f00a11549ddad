"""Training recipes, named by ``--preset`` / ``GSP_MC_PRESET``: the paper's two (§4.1.2) and
``tiny``, a CPU recipe for tests and the demo.

``slr500`` and ``autsl`` are the paper's settings: 110 epochs, SGD with Nesterov momentum 0.9,
5 linear warm-up epochs, ×0.1 at epochs 90 and 100; SLR-500 with batch 120, lr 0.06, wd 5e-4;
AUTSL with batch 80, lr 0.04, wd 4e-4; full CTR-GCN width (64) on 64 frames (the CTR-GCN/SAM-SLR
clip length for isolated signs; the paper does not state it).

``tiny`` keeps the architecture (ten units, three subsets, the same heads) at width 8 and 16
frames with light augmentation, so a few epochs on the synthetic set run in well under a minute
each on 2 CPU cores.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

#: Eq. 12: ``L = L_cls + α·L_con`` with the paper's α = 0.5 (every recipe; ``--alpha`` changes it).
DEFAULT_ALPHA = 0.5
#: Eqs. 7–8: the temperature τ of the similarity softmax, the paper's 0.1 (``--tau``).
DEFAULT_TAU = 0.1


class Recipe(BaseModel):
    model_config = ConfigDict(frozen=True)

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=2)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_epochs: int = Field(ge=0)
    milestones: tuple[int, ...]
    gamma: float = 0.1
    momentum: float = 0.9
    base_channels: int = Field(ge=4)
    frames: int = Field(ge=4)
    dropout: float = 0.0
    #: Overrides of ``mc.transforms.TransformConfig`` for training items (empty: its defaults).
    augment: dict = Field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "slr500": Recipe(epochs=110, batch_size=120, lr=0.06, weight_decay=5e-4, warmup_epochs=5,
                     milestones=(90, 100), base_channels=64, frames=64),
    "autsl": Recipe(epochs=110, batch_size=80, lr=0.04, weight_decay=4e-4, warmup_epochs=5,
                    milestones=(90, 100), base_channels=64, frames=64),
    # Lighter augmentation than the full recipes: with a few hundred steps the default crop
    # (50-100 %) and ±15° rotation keep a width-8 model at chance for most of its budget.
    "tiny": Recipe(epochs=8, batch_size=16, lr=0.1, weight_decay=5e-4, warmup_epochs=1,
                   milestones=(6,), base_channels=8, frames=16,
                   augment={"crop_min": 0.9, "rotate_deg": 5.0, "scale": 0.05, "shift": 0.05}),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        from gsp.errors import did_you_mean

        raise ValueError(f"unknown preset {name!r}{did_you_mean(name, RECIPES)}; "
                         f"choose one of {', '.join(RECIPES)}") from None


def learning_rate(epoch: int, base_lr: float, warmup_epochs: int, milestones: tuple[int, ...] | list[int],
                  gamma: float = 0.1) -> float:
    """LR of a (0-based) epoch: linear warm-up to ``base_lr`` over ``warmup_epochs`` epochs
    ((epoch+1)/warmup·lr, as in CTR-GCN), then ×``gamma`` at each milestone reached."""
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / warmup_epochs
    return base_lr * gamma ** sum(epoch >= m for m in milestones)
