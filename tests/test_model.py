"""CTR-GCN + GSP-MC heads: shapes, part pooling, the inference export and the counts."""

import numpy as np
import pytest
import torch

from mc.keypoints import get_layout
from mc.model import (
    GSPMCModel,
    ModelConfig,
    SkeletonClassifier,
    flops_per_sample,
    model_config_for,
    parameter_counts,
    spatial_adjacency,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def layout():
    return get_layout("gsp87")


def test_adjacency_subsets_hand_checked():
    # Path 0 <- 1 <- 2 (edges are (child, parent)).
    a = spatial_adjacency(3, [(1, 0), (2, 1)])
    assert a.shape == (3, 3, 3)
    np.testing.assert_array_equal(a[0], np.eye(3))
    # inward: A[parent, child] = 1, columns normalised by in-degree of the child column.
    np.testing.assert_array_equal(a[1], [[0, 1, 0], [0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(a[2], [[0, 0, 0], [1, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="outside"):
        spatial_adjacency(3, [(3, 0)])


def test_output_shapes_and_parts(layout):
    cfg = model_config_for(layout, num_classes=7, base_channels=8, text_dim=12)
    model = GSPMCModel(cfg)
    x = torch.randn(3, 3, 16, layout.num_nodes, 1)
    out = model.forward_train(x)
    assert out.logits.shape == (3, 7)
    assert out.global_embedding.shape == (3, 12)
    assert list(out.part_embeddings) == ["body", "left_hand", "right_hand", "mouth", "face"]
    assert all(v.shape == (3, 12) for v in out.part_embeddings.values())
    # forward() is the classifier path, identical logits in eval mode.
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), model.forward_train(x).logits.numpy(), rtol=1e-5, atol=1e-6)


def test_part_pooling_averages_each_group(layout):
    model = GSPMCModel(model_config_for(layout, num_classes=3, base_channels=8, text_dim=4))
    feat = torch.randn(2, 5, 4, layout.num_nodes)  # (N·M, C, T, V)
    got = model.part_features(feat, 2)
    for p, nodes in enumerate(layout.parts.values()):
        want = feat[:, :, :, nodes].mean(dim=(2, 3))
        torch.testing.assert_close(got[:, p], want)
    # global features: mean over everything but channels.
    torch.testing.assert_close(model.global_features(feat, 2), feat.mean(dim=(2, 3)))


def test_stride_and_widths_follow_reference():
    V = 5
    cfg = ModelConfig(num_classes=4, num_nodes=V, edges=[(i, i - 1) for i in range(1, V)],
                      parts={"body": [0, 1, 2], "left_hand": [3, 4]}, base_channels=8)
    model = SkeletonClassifier(cfg)
    feat = model.backbone(torch.randn(2, 3, 20, V, 1))
    assert feat.shape == (2, 32, 5, V)  # 4w channels, two stride-2 units: 20 -> 10 -> 5 frames
    assert len(model.backbone.units) == 10
    assert [u.gcn1.PA.shape[0] for u in model.backbone.units] == [3] * 10


def test_inference_model_matches_and_has_no_projections(layout):
    model = GSPMCModel(model_config_for(layout, num_classes=5, base_channels=8, text_dim=16)).eval()
    inf = model.inference_model()
    assert not any(k.startswith("projections") for k in inf.state_dict())
    x = torch.randn(2, 3, 12, layout.num_nodes, 1)
    with torch.no_grad():
        torch.testing.assert_close(inf(x), model(x))


def test_counts_and_flops(layout):
    model = GSPMCModel(model_config_for(layout, num_classes=10, base_channels=8, text_dim=16))
    counts = parameter_counts(model)
    assert counts["classifier"] == 32 * 10 + 10
    assert counts["projections"] == 6 * (32 * 16 + 16)
    assert counts["backbone"] > 0
    f16 = flops_per_sample(model, 16, layout.num_nodes)
    f32 = flops_per_sample(model, 32, layout.num_nodes)
    assert f16 > 0 and 1.8 < f32 / f16 < 2.2  # linear in frames
    # the export has the same FLOPs: projections are not used in forward().
    assert flops_per_sample(model.inference_model(), 16, layout.num_nodes) == f16


def test_bad_config_raises(layout):
    with pytest.raises(ValueError, match="multiple of 4"):
        GSPMCModel(model_config_for(layout, num_classes=3, base_channels=6))
    cfg = model_config_for(layout, num_classes=3, base_channels=8)
    cfg.parts["mouth"] = [999]
    with pytest.raises(ValueError, match="mouth"):
        GSPMCModel(cfg)


@pytest.mark.parametrize("in_channels", [3, 8, 16, 64])
def test_factorized_ctrgc_equals_reference_form(in_channels, monkeypatch):
    from mc.model import CTRGC

    torch.manual_seed(in_channels)
    m = CTRGC(in_channels, 16).double()
    x = torch.randn(3, in_channels, 6, 11, dtype=torch.float64)
    a = torch.rand(11, 11, dtype=torch.float64)
    alpha = torch.tensor([0.3], dtype=torch.float64)
    monkeypatch.setattr(CTRGC, "FACTORIZE_MAX_REL", 10_000)
    assert m.factorized
    fact = m(x, a, alpha)
    monkeypatch.setattr(CTRGC, "FACTORIZE_MAX_REL", 0)
    assert not m.factorized
    ref = m(x, a, alpha)
    torch.testing.assert_close(fact, ref, rtol=1e-10, atol=1e-10)
