"""The keypoint layout: part groups, graph, flip permutation, keypoint sets and their errors."""

from __future__ import annotations

import inspect

import pytest

from gsp.schema import BODY_PARTS
from mc.keypoints import KEYPOINT_SETS, MIRROR_133, Layout, LayoutError, get_layout


def _root_of(layout: Layout, v: int) -> int:
    seen = set()
    while layout.parents[v] != v:
        assert v not in seen, f"cycle through node {v}"
        seen.add(v)
        v = layout.parents[v]
    return v


def test_gsp87_groups_follow_the_documented_choice():
    lay = get_layout("gsp87")
    assert lay.num_nodes == 87 and len(lay.indices) == 87
    assert list(lay.parts) == list(BODY_PARTS)
    assert {k: len(v) for k, v in lay.parts.items()} == {
        "body": 15, "left_hand": 21, "right_hand": 21, "mouth": 10, "face": 20}
    # contiguous groups covering 0..86 in order
    flat = [v for part in BODY_PARTS for v in lay.parts[part]]
    assert flat == list(range(87))
    idx = lambda part: [lay.indices[v] for v in lay.parts[part]]  # noqa: E731
    assert idx("body") == list(range(15))
    assert idx("left_hand") == list(range(91, 112))
    assert idx("right_hand") == list(range(112, 133))
    assert all(71 <= i <= 90 for i in idx("mouth"))
    assert all(23 <= i <= 70 for i in idx("face"))  # jaw, brows, nose, eyes: no lip points
    assert lay.part_of()[lay.parts["mouth"][0]] == "mouth"


@pytest.mark.parametrize("name", sorted(KEYPOINT_SETS))
def test_every_preset_is_one_tree_plus_rings(name):
    lay = get_layout(name)
    n = lay.num_nodes
    assert n == int(name[-2:])  # gsp87, base27, masa49, cosign76
    assert lay.root_nodes == [lay.indices.index(0)]  # the nose is the only root
    for v in range(n):
        assert _root_of(lay, v) == lay.root_nodes[0]
    tree = {(v, p) for v, p in enumerate(lay.parents) if p != v}
    assert tree <= set(lay.edges)
    assert len({frozenset(e) for e in lay.edges}) == len(lay.edges), "duplicate edge"
    assert all(0 <= a < n and 0 <= b < n and a != b for a, b in lay.edges)
    # parts are contiguous and in BODY_PARTS order
    order = [p for p in BODY_PARTS if p in lay.parts]
    assert list(lay.parts) == order
    assert [v for p in order for v in lay.parts[p]] == list(range(n))


def test_hands_hang_from_the_body_wrists():
    lay = get_layout("gsp87")
    node = {wb: v for v, wb in enumerate(lay.indices)}
    assert lay.parents[node[91]] == node[9]  # left hand wrist -> left body wrist
    assert lay.parents[node[112]] == node[10]
    assert lay.parents[node[112 + 8]] == node[112 + 7]  # index tip -> DIP
    assert lay.parents[node[112 + 5]] == node[112]  # index MCP -> hand wrist


def test_lip_rings_become_edges():
    lay = get_layout("gsp87")
    node = {wb: v for v, wb in enumerate(lay.indices)}
    edges = {frozenset(e) for e in lay.edges}
    outer = [23 + i for i in (48, 50, 52, 54, 56, 58)]
    for a, b in zip(outer, outer[1:] + outer[:1]):
        assert frozenset((node[a], node[b])) in edges
    inner = [23 + i for i in (60, 62, 64, 66)]
    for a, b in zip(inner, inner[1:] + inner[:1]):
        assert frozenset((node[a], node[b])) in edges


@pytest.mark.parametrize("name", sorted(KEYPOINT_SETS))
def test_flip_permutation_swaps_sides_and_is_an_involution(name):
    lay = get_layout(name)
    perm = lay.flip_permutation
    assert sorted(perm) == list(range(lay.num_nodes))
    assert [perm[perm[v]] for v in range(lay.num_nodes)] == list(range(lay.num_nodes))
    lh, rh = lay.parts["left_hand"], lay.parts["right_hand"]
    assert [perm[v] for v in lh] == rh
    ls, rs = lay.shoulders
    assert perm[ls] == rs
    for v, wb in enumerate(lay.indices):
        assert lay.indices[perm[v]] == MIRROR_133[wb]


def test_base27_is_the_sam_slr_selection():
    sam_slr = [0, 5, 6, 7, 8, 9, 10, 91, 95, 96, 99, 100, 103, 104, 107, 108, 111,
               112, 116, 117, 120, 121, 124, 125, 128, 129, 132]
    assert get_layout("base27").indices == sam_slr


def test_layout_errors_are_clear():
    with pytest.raises(LayoutError, match="unknown keypoint preset 'nope'"):
        get_layout("nope")
    with pytest.raises(LayoutError, match="not closed under the horizontal flip"):
        Layout.from_groups("half", {"body": [0, 5, 6, 7]})  # 7 without 8
    with pytest.raises(LayoutError, match="shoulders"):
        Layout.from_groups("noshoulder", {"body": [0, 1, 2]})
    with pytest.raises(LayoutError, match="order"):
        Layout.from_groups("order", {"left_hand": list(range(91, 112)), "body": [0, 5, 6]})
    with pytest.raises(LayoutError, match="duplicate"):
        Layout.from_groups("dup", {"body": [0, 5, 6, 0]})
    with pytest.raises(LayoutError, match="unknown part"):
        Layout.from_groups("bad", {"torso": [0, 5, 6]})


def test_the_keypoint_set_setting_reaches_training_through_the_caller(monkeypatch, tmp_path):
    """get_layout reads no settings: the entry point passes GSP_MC_KEYPOINT_PRESET in
    (TrainConfig.from_settings), an explicit --layout wins, and a bad setting is named."""
    from gsp.settings import get_settings
    from mc.train import TrainConfig

    assert "name" in inspect.signature(get_layout).parameters
    assert inspect.signature(get_layout).parameters["name"].default is inspect.Parameter.empty
    monkeypatch.setenv("GSP_MC_KEYPOINT_PRESET", "masa49")
    get_settings.cache_clear()
    cfg = TrainConfig.from_settings(get_settings(), data=tmp_path / "d.pkl", out=tmp_path / "run")
    assert cfg.layout == "masa49" and get_layout(cfg.layout).num_nodes == 49
    assert TrainConfig.from_settings(get_settings(), data=tmp_path / "d.pkl", out=tmp_path / "run",
                                     layout="base27").layout == "base27"
    monkeypatch.setenv("GSP_MC_KEYPOINT_PRESET", "gsp78")
    get_settings.cache_clear()
    with pytest.raises(LayoutError, match=r"GSP_MC_KEYPOINT_PRESET.*'gsp78'.*did you mean 'gsp87'"):
        TrainConfig.from_settings(get_settings(), data=tmp_path / "d.pkl", out=tmp_path / "run")
