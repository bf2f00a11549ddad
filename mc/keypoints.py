"""The keypoint layout: the one home of which COCO-WholeBody points the model sees and how they connect.

Input skeletons are COCO-WholeBody 2D poses, 133 points per frame (what HRNet whole-body
estimation gives):

* 0-16 body (COCO-17: nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles),
* 17-22 feet, 23-90 face (the 68 iBUG-300W landmarks, iBUG point ``i`` is index ``23 + i``),
* 91-111 left hand, 112-132 right hand (21 points each: wrist, then thumb, index, middle, ring,
  little finger, four points each from base to tip).

"Left"/"right" are the *signer's* left and right, as in COCO.

A :class:`Layout` picks a subset of those points in contiguous part groups (paper section 3.1:
body, left hand, right hand, mouth, face). Its graph is derived, not hand-listed per set: one
tree over all 133 points (:data:`PARENT_133`) plus a few rings (lips, eyes) is defined once, and a
selected point's parent is its nearest *selected* ancestor in that tree. That keeps every set's
bone stream and edge list consistent, and the horizontal flip comes from one mirror map
(:data:`MIRROR_133`).

Keypoint sets (:data:`KEYPOINT_SETS`; the paper's Table 6 compares these point sets):

``gsp87`` (default, 5 parts, 87 points):
    body 15 = COCO body 0-14 (nose, eyes, ears, shoulders, elbows, wrists, hips, knees; ankles
    dropped: never visible in sign-language video); left hand 21 = 91-111; right hand 21 = 112-132;
    mouth 10 = every other lip landmark, iBUG 48, 50, 52, 54, 56, 58 (outer lip: corners, upper
    and lower mid-sides) and 60, 62, 64, 66 (inner lip: corners, top and bottom middle, which
    carry mouth opening) = indices 71, 73, ..., 89; face 20 = jaw 7 (iBUG 0, 3, 6, 8, 10, 13, 16),
    eyebrows 6 (17, 19, 21, 22, 24, 26), nose 3 (27 bridge top, 30 tip, 33 base) and eyelids 4
    (37, 41 upper/lower lid of one eye, 44, 46 of the other). The paper only says "20 face
    points"; we spend four of them on eyelids because eye closure and squint are non-manual
    features dictionaries describe (and the demo sign source uses), which jaw/brow/nose points
    cannot show.
``base27`` (3 parts): SAM-SLR's 27 points: nose, shoulders, elbows, wrists and 10 points per
    hand (wrist, thumb tip, base and tip of the four fingers).
``masa49`` (3 parts): MASA's 49 points: the same 7 upper-body points and both full hands.
``cosign76`` (5 parts): CoSign-style 76 points: 9 upper-body points (nose, eyes, shoulders,
    elbows, wrists), both hands, mouth 8 (outer lip iBUG 48, 50, 51, 52, 54, 56, 57, 58) and face
    17 (the jaw contour iBUG 0-16). CoSign's exact list is not reproduced in the GSP-MC paper; this
    is our reconstruction with the same group sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from gsp.errors import GspError
from gsp.schema import BODY_PARTS

NUM_WHOLEBODY = 133
FACE0 = 23  # iBUG landmark i is COCO-WholeBody index FACE0 + i
LEFT_HAND0 = 91
RIGHT_HAND0 = 112
LEFT_SHOULDER, RIGHT_SHOULDER = 5, 6
NOSE = 0


def _face(*ibug: int) -> list[int]:
    return [FACE0 + i for i in ibug]


def _build_parent_133() -> list[int]:
    """Parent of each of the 133 points in one tree rooted at the nose (index 0)."""
    p = [-1] * NUM_WHOLEBODY
    # Body, COCO-17 (the usual pyskl/ST-GCN COCO tree).
    body = {0: 0, 1: 0, 2: 0, 3: 1, 4: 2, 5: 0, 6: 0, 7: 5, 8: 6, 9: 7, 10: 8,
            11: 5, 12: 6, 13: 11, 14: 12, 15: 13, 16: 14}
    for c, par in body.items():
        p[c] = par
    # Feet hang from the ankles.
    for c in (17, 18, 19):
        p[c] = 15
    for c in (20, 21, 22):
        p[c] = 16

    def f(child: int, parent_ibug: int | None, parent_133: int | None = None) -> None:
        p[FACE0 + child] = parent_133 if parent_133 is not None else FACE0 + parent_ibug

    # Nose: tip (30) hangs from the COCO nose; bridge 27-29 and base 31-35 from the tip.
    f(30, None, NOSE)
    f(29, 30), f(28, 29), f(27, 28)
    f(33, 30), f(32, 33), f(31, 32), f(34, 33), f(35, 34)
    # Eyebrows from the bridge top, inner end outwards.
    f(21, 27), f(20, 21), f(19, 20), f(18, 19), f(17, 18)
    f(22, 27), f(23, 22), f(24, 23), f(25, 24), f(26, 25)
    # Eyes: upper lid from the inner corner outwards, lower lid back from the outer corner, so a
    # lower-lid point's nearest selected ancestor is usually an upper-lid point (eye opening).
    f(39, 27), f(38, 39), f(37, 38), f(36, 37), f(41, 36), f(40, 41)
    f(42, 27), f(43, 42), f(44, 43), f(45, 44), f(46, 45), f(47, 46)
    # Jaw from the chin, which hangs from the nose base (their distance is jaw opening).
    f(8, 33)
    for i in range(7, -1, -1):
        f(i, i + 1)
    for i in range(9, 17):
        f(i, i - 1)
    # Lips: outer top middle (51) from the nose base, both rings from there.
    f(51, 33), f(50, 51), f(49, 50), f(48, 49), f(52, 51), f(53, 52), f(54, 53)
    f(59, 48), f(58, 59), f(57, 58), f(55, 54), f(56, 55)
    f(62, 51), f(61, 62), f(60, 61), f(63, 62), f(64, 63), f(67, 60), f(66, 67), f(65, 64)
    # Hands: hand wrist from the body wrist, finger bases from the hand wrist, joints in a chain.
    for hand0, body_wrist in ((LEFT_HAND0, 9), (RIGHT_HAND0, 10)):
        p[hand0] = body_wrist
        for finger in range(5):
            base = hand0 + 1 + 4 * finger
            p[base] = hand0
            for j in range(1, 4):
                p[base + j] = base + j - 1
    assert all(x >= 0 for x in p), "every point needs a parent"
    return p


def _build_mirror_133() -> list[int]:
    """Index of each point's left/right counterpart (itself on the midline)."""
    m = list(range(NUM_WHOLEBODY))

    def swap(a: int, b: int) -> None:
        m[a], m[b] = b, a

    for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16),
                 (17, 20), (18, 21), (19, 22)):
        swap(a, b)
    ibug_pairs = [(i, 16 - i) for i in range(8)]  # jaw
    ibug_pairs += [(17, 26), (18, 25), (19, 24), (20, 23), (21, 22)]  # eyebrows
    ibug_pairs += [(31, 35), (32, 34)]  # nose base
    ibug_pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    ibug_pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer lip
    ibug_pairs += [(60, 64), (61, 63), (65, 67)]  # inner lip
    for a, b in ibug_pairs:
        swap(FACE0 + a, FACE0 + b)
    for k in range(21):
        swap(LEFT_HAND0 + k, RIGHT_HAND0 + k)
    return m


PARENT_133: tuple[int, ...] = tuple(_build_parent_133())
MIRROR_133: tuple[int, ...] = tuple(_build_mirror_133())
#: Closed loops (lips, eyes) in 133-point space: consecutive *selected* points become extra edges.
RINGS_133: tuple[tuple[int, ...], ...] = (
    tuple(_face(*range(48, 60))),
    tuple(_face(*range(60, 68))),
    tuple(_face(*range(36, 42))),
    tuple(_face(*range(42, 48))),
)


class LayoutError(GspError, ValueError):
    pass


@dataclass(frozen=True)
class Layout:
    """A selection of COCO-WholeBody points in contiguous part groups, with its graph.

    Node ``v`` of the model is whole-body point ``indices[v]``.
    """

    name: str
    indices: list[int]
    parts: dict[str, list[int]]
    parents: list[int]
    edges: list[tuple[int, int]]
    flip_permutation: list[int]
    shoulders: tuple[int, int]  # (left, right) node indices; their midpoint and distance normalise
    part_names: tuple[str, ...] = field(default=())

    @property
    def num_nodes(self) -> int:
        return len(self.indices)

    @property
    def root_nodes(self) -> list[int]:
        return [v for v, p in enumerate(self.parents) if p == v]

    def part_of(self) -> list[str]:
        """Part name of each node."""
        out = [""] * self.num_nodes
        for name, nodes in self.parts.items():
            for v in nodes:
                out[v] = name
        return out

    @classmethod
    def from_groups(cls, name: str, groups: dict[str, list[int]]) -> Layout:
        """Build a layout from part name -> whole-body indices (parts in BODY_PARTS order)."""
        unknown = [g for g in groups if g not in BODY_PARTS]
        if unknown:
            raise LayoutError(f"layout {name!r}: unknown part names {unknown}; expected a subset of {BODY_PARTS}")
        order = [g for g in BODY_PARTS if g in groups]
        if list(groups) != order:
            raise LayoutError(f"layout {name!r}: parts must come in the order {BODY_PARTS}, got {list(groups)}")
        indices: list[int] = []
        parts: dict[str, list[int]] = {}
        for g in order:
            pts = list(groups[g])
            if not pts:
                raise LayoutError(f"layout {name!r}: part {g!r} is empty")
            parts[g] = list(range(len(indices), len(indices) + len(pts)))
            indices.extend(pts)
        bad = [i for i in indices if not 0 <= i < NUM_WHOLEBODY]
        if bad:
            raise LayoutError(f"layout {name!r}: indices out of 0..{NUM_WHOLEBODY - 1}: {bad}")
        if len(set(indices)) != len(indices):
            raise LayoutError(f"layout {name!r}: duplicate indices")
        node_of = {wb: v for v, wb in enumerate(indices)}
        for s in (LEFT_SHOULDER, RIGHT_SHOULDER):
            if s not in node_of:
                raise LayoutError(f"layout {name!r}: needs both shoulders (5, 6) for normalisation")
        missing_mirror = sorted(i for i in indices if MIRROR_133[i] not in node_of)
        if missing_mirror:
            raise LayoutError(
                f"layout {name!r}: not closed under the horizontal flip; mirrors of {missing_mirror} are not selected"
            )

        parents: list[int] = []
        for wb in indices:
            anc = wb
            while True:
                nxt = PARENT_133[anc]
                if nxt == anc:  # reached the root without a selected ancestor
                    parents.append(node_of[wb])
                    break
                anc = nxt
                if anc in node_of:
                    parents.append(node_of[anc])
                    break
        edges: list[tuple[int, int]] = [(v, p) for v, p in enumerate(parents) if p != v]
        seen = {frozenset(e) for e in edges}
        for ring in RINGS_133:
            sel = [node_of[i] for i in ring if i in node_of]
            if len(sel) < 3:
                continue
            for a, b in zip(sel, sel[1:] + sel[:1]):
                if frozenset((a, b)) not in seen:
                    seen.add(frozenset((a, b)))
                    edges.append((a, b))
        flip = [node_of[MIRROR_133[wb]] for wb in indices]
        return cls(
            name=name,
            indices=indices,
            parts=parts,
            parents=parents,
            edges=edges,
            flip_permutation=flip,
            shoulders=(node_of[LEFT_SHOULDER], node_of[RIGHT_SHOULDER]),
            part_names=tuple(order),
        )


def _hand(hand0: int, full: bool = True) -> list[int]:
    if full:
        return list(range(hand0, hand0 + 21))
    # wrist, thumb tip, then base and tip of index, middle, ring, little
    return [hand0, hand0 + 4] + [hand0 + k for f in range(1, 5) for k in (1 + 4 * f, 4 + 4 * f)]


_UPPER7 = [0, 5, 6, 7, 8, 9, 10]

KEYPOINT_SETS: dict[str, dict[str, list[int]]] = {
    "gsp87": {
        "body": list(range(15)),
        "left_hand": _hand(LEFT_HAND0),
        "right_hand": _hand(RIGHT_HAND0),
        "mouth": _face(48, 50, 52, 54, 56, 58, 60, 62, 64, 66),
        "face": _face(0, 3, 6, 8, 10, 13, 16, 17, 19, 21, 22, 24, 26, 27, 30, 33, 37, 41, 44, 46),
    },
    "base27": {"body": _UPPER7, "left_hand": _hand(LEFT_HAND0, False), "right_hand": _hand(RIGHT_HAND0, False)},
    "masa49": {"body": _UPPER7, "left_hand": _hand(LEFT_HAND0), "right_hand": _hand(RIGHT_HAND0)},
    "cosign76": {
        "body": [0, 1, 2, 5, 6, 7, 8, 9, 10],
        "left_hand": _hand(LEFT_HAND0),
        "right_hand": _hand(RIGHT_HAND0),
        "mouth": _face(48, 50, 51, 52, 54, 56, 57, 58),
        "face": _face(*range(17)),
    },
}
#: The default keypoint set (``GSP_MC_KEYPOINT_PRESET``'s default).
DEFAULT_KEYPOINT_SET = "gsp87"


def get_layout(name: str, source: str = "keypoint preset") -> Layout:
    """The layout of a keypoint set. Callers pass ``settings.mc.keypoint_preset`` or a recorded
    name; ``source`` names where it came from in the error (e.g. the environment variable)."""
    if name not in KEYPOINT_SETS:
        from gsp.errors import did_you_mean

        raise LayoutError(f"unknown {source} {name!r}{did_you_mean(name, KEYPOINT_SETS)}; "
                          f"choose one of {', '.join(sorted(KEYPOINT_SETS))}")
    return _layout_of(name)


def layout_from_settings(mc_settings) -> Layout:
    """The layout named by an ``mc`` settings section (``GSP_MC_KEYPOINT_PRESET``); a bad name is
    reported as that variable, so the user knows where to fix it."""
    env = type(mc_settings).env_name("keypoint_preset")
    return get_layout(mc_settings.keypoint_preset, source=f"{env} (mc.keypoint_preset)")


@cache
def _layout_of(name: str) -> Layout:
    return Layout.from_groups(name, KEYPOINT_SETS[name])
