"""Synthetic COCO-WholeBody sign clips animated from the structured sign source.

No sign-language skeleton data set is reachable offline, so tests and the demo train on clips
generated from the same ``knowledge_base/demo_signs.yaml`` that the demo dictionary is printed
from: every segment's handshape (chart finger states), location, palm, movement and the mouth,
face, head and body features become motion of the 133 whole-body points.

How a clip is made (all lengths in *body units*: half the shoulder width is 1; x to the signer's
left, y down, z toward the camera; the image is an orthographic view of that):

* **Timeline** (``timeline.py``). Rest → segment 1 → … → segment K → rest, with transitions
  between them. Each frame gets (segment a, phase u_a, segment b, phase u_b, weight w); any
  per-segment quantity is ``(1 − w)·F_a(u_a) + w·F_b(u_b)``, so transitions are smooth
  interpolations.
* **Hands** (``hands.py``). A 21-point hand model (wrist, thumb CMC-MCP-IP-tip, four fingers
  MCP-PIP-DIP-tip) whose joints flex toward the palm normal by angles per chart finger state
  (extended, bent, curled, closed) and fan out when the chart says ``spread``. The palm facing
  sets the hand's 3D orientation; movements (tap, straight, arc, circle, wiggle, twist,
  open_close, shake) are offsets, finger modulations or rotations over the segment's phase. The
  palm centre sits on a body-relative anchor for the location (face locations are placed on the
  signer's face template). Elbows come from two-link inverse kinematics. The left hand is
  computed as a right hand in the mirrored world and mirrored back, so both hands obey the same
  model.
* **Non-manual features** (``face.py``, ``render.py``). A 68-point face template; mouth shapes
  displace lip points (and the chin for an open mouth), face states displace brows, lids and
  mouth corners; head nods, shakes and tilts move the head points; body leans, shrugs and turns
  transform the upper body.
* **Signers** (``render.py``). Each signer has its own proportions (arms, neck, face, hands,
  hips), image scale and position, speed, noise level, handshape jitter and detection quality.
  Each clip adds its own length, timing, small anchor and handshape jitter, Gaussian coordinate
  noise, random missing points (score 0 and coordinates 0) and short whole-hand detection
  dropouts.

Minimal pairs in the source (signs that differ only in handshape or only in mouth/face) differ
only in those points here, by a few hundredths of a shoulder width for the mouth — so a
classifier has to learn fine detail and does not reach 100% in one epoch.

The output (``dataset.py``) is a pyskl annotation pickle (``split`` by signer, ``annotations``
with ``keypoint`` [1, T, 133, 2], ``keypoint_score`` [1, T, 133], ``label``, ``frame_dir``,
``total_frames``, ``img_shape``) plus a top-level ``classes`` list (label, class_id, gloss), led
by a ``generator`` tag so that only a data set written here is ever overwritten by a new one.
"""

from demo.synthetic.dataset import (
    DATASET_WHAT,
    GENERATOR,
    GENERATOR_KEY,
    check_dataset_target,
    is_synthetic_dataset,
    write_synthetic_dataset,
)
from demo.synthetic.render import IMG_SIZE, SignerStyle, render_clip, sample_signer

__all__ = [
    "DATASET_WHAT",
    "GENERATOR",
    "GENERATOR_KEY",
    "IMG_SIZE",
    "SignerStyle",
    "check_dataset_target",
    "is_synthetic_dataset",
    "render_clip",
    "sample_signer",
    "write_synthetic_dataset",
]
