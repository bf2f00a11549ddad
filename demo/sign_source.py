"""The structured sign source: one machine-readable file of signs that drives both the demo
dictionary PDF (``demo.render_dictionary``) and the synthetic skeleton generator
(``demo.synthetic``).

A sign is a sequence of *segments*; each segment says what the right (dominant) hand, the left
hand, the mouth, the face and the body do at the same time. A segment can instead be a reference
to another sign (``ref: love``) — the way real dictionaries say "make the sign for LOVE, then …".
Handshapes are ids into the dictionary's handshape chart, which the same file defines.

The vocabularies below are deliberately small and closed, so the animator can turn every value
into motion; the ``prose`` of a sign is what the PDF prints, written as a dictionary would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gsp.errors import GspError
from gsp.settings import PROJECT_ROOT

# The bundled source, read from the repository's data folder (it is data, not code, so it stays
# beside the PDFs rendered from it).
KB_DIR = PROJECT_ROOT / "knowledge_base"
DEFAULT_SOURCE = KB_DIR / "demo_signs.yaml"

FingerState = Literal["extended", "bent", "curled", "closed"]
Location = Literal[
    "neutral", "head_top", "forehead", "temple", "eye", "nose", "cheek", "ear", "mouth", "chin",
    "neck", "shoulder", "chest", "stomach", "other_hand",
]
MovementType = Literal["none", "tap", "straight", "arc", "circle", "wiggle", "twist", "open_close", "shake"]
Direction = Literal["none", "up", "down", "left", "right", "forward", "back", "in", "out"]
PalmFacing = Literal["down", "up", "in", "out", "left", "right", "forward", "back"]
MouthShape = Literal["neutral", "open", "round", "spread", "puffed", "tongue", "pressed", "blow"]
FaceState = Literal["neutral", "brows_raised", "brows_furrowed", "eyes_closed", "squint", "smile", "frown"]
HeadMove = Literal["none", "nod", "shake", "tilt"]
BodyMove = Literal["none", "lean_forward", "lean_back", "shrug", "turn"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Handshape(_Strict):
    """One entry of the dictionary's handshape / manual-alphabet chart."""

    id: str = Field(description="Chart id as cited by entries, e.g. '5', 'A', 'flat-O'.")
    name: str
    description: str = Field(description="How the chart describes the hand, in prose.")
    thumb: FingerState
    index: FingerState
    middle: FingerState
    ring: FingerState
    little: FingerState
    spread: bool = False


class HandAction(_Strict):
    handshape: str = Field(description="Id of a chart handshape.")
    location: Location = "neutral"
    palm: PalmFacing = "down"
    movement: MovementType = "none"
    direction: Direction = "none"
    size: float = Field(1.0, gt=0, le=3, description="Relative amplitude of the movement.")
    repeat: int = Field(1, ge=1, le=6)


class Segment(_Strict):
    """What happens at one time in the sign; either parts or a reference to another sign."""

    ref: str | None = Field(None, description="Gloss of another sign whose segments are inserted here.")
    right: HandAction | None = None
    left: HandAction | None = None
    mouth: MouthShape = "neutral"
    face: FaceState = "neutral"
    head: HeadMove = "none"
    body: BodyMove = "none"

    @model_validator(mode="after")
    def _ref_or_parts(self) -> Segment:
        if self.ref is not None and (self.right or self.left):
            raise ValueError("a segment is either a 'ref' to another sign or its own hand actions")
        if self.ref is None and self.right is None and self.left is None and self.mouth == "neutral" \
                and self.face == "neutral" and self.head == "none" and self.body == "none":
            raise ValueError("a segment must do something: a ref, a hand, or a non-manual feature")
        return self


class Sign(_Strict):
    class_id: int = Field(ge=0, description="AUTSL ClassId.")
    gloss: str = Field(description="English gloss as in the AUTSL vocabulary (EN column).")
    native: str = Field(description="Turkish gloss as in the AUTSL vocabulary (TR column).")
    prose: str = Field(description="The entry text as the dictionary prints it.")
    segments: list[Segment] = Field(min_length=1)
    notes: list[str] = Field(default_factory=list, description="Non-action remarks: etymology, homophones, usage.")


class SignSource(_Strict):
    title: str
    disclaimer: str
    handshapes: list[Handshape]
    signs: list[Sign]

    @model_validator(mode="after")
    def _references_resolve(self) -> SignSource:
        chart = {h.id for h in self.handshapes}
        glosses = {s.gloss for s in self.signs}
        ids = [s.class_id for s in self.signs]
        if len(ids) != len(set(ids)):
            raise ValueError("duplicate class_id in signs")
        if len(glosses) != len(self.signs):
            raise ValueError("duplicate gloss in signs")
        for sign in self.signs:
            for i, seg in enumerate(sign.segments):
                if seg.ref is not None and seg.ref not in glosses:
                    raise ValueError(f"sign {sign.gloss!r} segment {i}: unknown ref {seg.ref!r}")
                for hand in (seg.right, seg.left):
                    if hand is not None and hand.handshape not in chart:
                        raise ValueError(
                            f"sign {sign.gloss!r} segment {i}: handshape {hand.handshape!r} is not in the chart"
                        )
        # A reference cycle would make expansion loop forever.
        for sign in self.signs:
            self.expanded_segments(sign.gloss)
        return self

    def sign(self, gloss: str) -> Sign:
        for s in self.signs:
            if s.gloss == gloss:
                return s
        raise KeyError(gloss)

    def handshape(self, shape_id: str) -> Handshape:
        for h in self.handshapes:
            if h.id == shape_id:
                return h
        raise KeyError(shape_id)

    def expanded_segments(self, gloss: str, _seen: tuple[str, ...] = ()) -> list[Segment]:
        """The sign's segments with every ``ref`` replaced by the referenced sign's segments."""
        if gloss in _seen:
            raise ValueError(f"reference cycle: {' -> '.join(_seen + (gloss,))}")
        out: list[Segment] = []
        for seg in self.sign(gloss).segments:
            if seg.ref is not None:
                out.extend(self.expanded_segments(seg.ref, _seen + (gloss,)))
            else:
                out.append(seg)
        return out


class SignSourceError(GspError, ValueError):
    pass


def load_sign_source(path: Path | str = DEFAULT_SOURCE) -> SignSource:
    """Read and validate the YAML sign source; errors name the file and the failing field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SignSourceError(f"{path}: {exc}") from exc
    try:
        return SignSource.model_validate(data)
    except ValidationError as exc:
        raise SignSourceError(f"{path}: {exc}") from exc
