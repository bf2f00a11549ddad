"""The backbone's fast formulation is the reference CTR-GCN function: outputs, parameter
gradients and BatchNorm statistics equal on random inputs and weights; checkpoints and exports
load into it unchanged; and the opt-in torch.compile falls back to the eager model where it
cannot compile (a real missing compiler), with one warning line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_data import toy_pyskl

from mc.evaluate import CHECKPOINT_KEYS, export_inference, load_inference
from mc.keypoints import get_layout
from mc.model import CTRGCNBackbone, GSPMCModel, UnitGCN, model_config_for, set_formulation

torch.set_num_threads(1)
GSP = str(Path(sys.executable).with_name("gsp"))


class TopologyBuilds(torch.overrides.TorchFunctionMode):
    """Records (samples, channels) of every topology built: the 4-D right operand of a
    ``torch.matmul`` and the weights' channel count. A mode rather than a patched
    ``torch.matmul``: with the module attribute patched (and restored) in an earlier test, the
    compile test later in the same process failed inside inductor ("Cannot convert expression to
    float") when this file ran on its own; a mode changes nothing global."""

    def __init__(self):
        super().__init__()
        self.built: list[tuple[int, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.matmul and args[1].dim() == 4:
            self.built.append((args[1].shape[0], args[0].shape[1]))
        return func(*args, **(kwargs or {}))


def _randomised(model: GSPMCModel, seed: int) -> GSPMCModel:
    """Weights away from their init (alpha = 0 and BN γ = 1e-6 would hide the refined topology)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha") or "gcn1.bn." in name or ".PA" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if "bn.weight" in name else 0.0))
    return model


def _step(model: GSPMCModel, x: torch.Tensor, formulation: str):
    """Train-mode forward and backward; (logits, global embedding, grads by name, buffers)."""
    set_formulation(model, formulation)
    model.zero_grad(set_to_none=True)
    out = model.forward_train(x)
    weights = torch.linspace(-1, 1, out.logits.numel(), dtype=x.dtype).view_as(out.logits)
    parts = sum(e.square().sum() for e in out.part_embeddings.values())
    ((out.logits * weights).sum() + out.global_embedding.square().sum() + parts).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.global_embedding.detach(), grads


CASES = {
    # layout, base_channels (narrow: the factorised product; 32 mixes both; 64 the wide form), persons, strides
    "v27-narrow": ("base27", 8, 1, (5, 8)),
    "v87-mixed-2persons": ("gsp87", 32, 2, (5, 8)),
    "v27-wide-other-strides": ("base27", 64, 1, (2, 9)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_equals_reference_outputs_and_gradients_float64(case):
    layout_name, base, persons, strides = CASES[case]
    layout = get_layout(layout_name)
    cfg = model_config_for(layout, num_classes=5, base_channels=base, text_dim=6)
    cfg.num_persons, cfg.stride_units = persons, strides
    torch.manual_seed(0)
    fast = _randomised(GSPMCModel(cfg).double(), seed=1)
    reference = _randomised(GSPMCModel(cfg).double(), seed=1)
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 8, layout.num_nodes, persons, dtype=torch.float64)

    logits_r, emb_r, grads_r = _step(reference, x, "reference")
    logits_f, emb_f, grads_f = _step(fast, x, "fast")
    torch.testing.assert_close(logits_f, logits_r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(emb_f, emb_r, rtol=1e-9, atol=1e-9)
    assert grads_f.keys() == grads_r.keys() and len(grads_r) == len(list(fast.parameters()))
    scale = max(g.abs().max().item() for g in grads_r.values())
    for name, g in grads_r.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-7, atol=1e-10 * scale, msg=name)
    # the same batch statistics went into BatchNorm's running buffers
    buffers_r = dict(reference.named_buffers())
    for name, b in fast.named_buffers():
        torch.testing.assert_close(b, buffers_r[name], rtol=1e-9, atol=1e-12, msg=name)
    # the formulations really differ in how they compute (else this test proves nothing)
    assert {u.formulation for u in fast.modules() if isinstance(u, UnitGCN)} == {"fast"}


def test_inference_runs_in_chunks_and_topology_blocks_with_the_same_result(monkeypatch):
    """Without autograd, in eval mode, the backbone runs a chunk of samples at a time and each wide
    graph unit builds and applies its (K, C, V, V) topology in blocks of samples and channels;
    with the smallest chunks and blocks (one sample, one channel) the logits are still the
    reference formulation's on the whole batch, and a training forward still takes the whole batch at once."""
    layout = get_layout("base27")
    model = _randomised(GSPMCModel(model_config_for(layout, num_classes=5, base_channels=64)).double(), seed=4)
    x = torch.randn(3, 3, 8, layout.num_nodes, 1, dtype=torch.float64)
    monkeypatch.setattr(UnitGCN, "TOPOLOGY_BLOCK_BYTES", 1)
    monkeypatch.setattr(CTRGCNBackbone, "INFERENCE_CHUNK_BYTES", 1)
    model.eval()
    with torch.no_grad(), TopologyBuilds() as topologies:
        fast = set_formulation(model, "fast")(x)
    widths = [64] * 4 + [128] * 3 + [256] * 3
    assert topologies.built == [(1, 1)] * (3 * sum(widths))  # every sample, unit and channel on its own
    with torch.enable_grad():  # the reference formulation, the batch whole
        reference = set_formulation(model, "reference")(x).detach()
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-9)
    model.train()
    with TopologyBuilds() as topologies:
        set_formulation(model, "fast")(x)
    assert topologies.built == [(3, c) for c in widths]


class Convolutions(torch.overrides.TorchFunctionMode):
    """Records the kernel size of every ``conv2d`` and counts the max-pool calls."""

    def __init__(self):
        super().__init__()
        self.kernels: list[tuple[int, int]] = []
        self.max_pools = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.conv2d:
            self.kernels.append(tuple(args[1].shape[2:]))
        if func in (torch.nn.functional.max_pool2d, torch.max_pool2d):
            self.max_pools += 1
        return func(*args, **(kwargs or {}))


def test_cpu_inference_folds_batch_norm_and_runs_pointwise_products_with_the_same_result():
    """In eval mode without autograd on the CPU, every BatchNorm after a convolution is folded into
    it, the 1×1 convolutions (stacked conv3, the temporal branches' heads, the residual and down
    projections, at stride 1 and 2) run as matrix products and the max-pool as shifted maxima; with
    every BatchNorm's statistics and affine weights random, the logits are still the reference
    formulation's, and with autograd on the same eval-mode model takes the convolutions."""
    layout = get_layout("base27")
    cfg = model_config_for(layout, num_classes=5, base_channels=16)
    cfg.num_persons, cfg.stride_units = 2, (2, 9)
    model = _randomised(GSPMCModel(cfg).double(), seed=6)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                for t, low, high in ((m.weight, 0.5, 1.5), (m.bias, -0.3, 0.3), (m.running_mean, -0.3, 0.3),
                                     (m.running_var, 0.5, 1.5)):
                    t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * (high - low) + low)
    model.eval()
    x = torch.randn(3, 3, 8, layout.num_nodes, 2, dtype=torch.float64)
    with torch.no_grad(), Convolutions() as fast_calls:
        fast = set_formulation(model, "fast")(x)
    with torch.no_grad(), Convolutions() as reference_calls:
        reference = set_formulation(model, "reference")(x)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-10 * reference.abs().max().item())
    # only the dilated 5×1 temporal convolutions stay convolutions (two branches, ten units, per chunk)
    assert fast_calls.kernels and set(fast_calls.kernels) == {(5, 1)}
    assert fast_calls.max_pools == 0
    assert (1, 1) in reference_calls.kernels and reference_calls.max_pools == 10
    with Convolutions() as eval_with_autograd:
        torch.testing.assert_close(set_formulation(model, "fast")(x).detach(), fast, rtol=0,
                                   atol=1e-10 * reference.abs().max().item())
    assert (1, 1) in eval_with_autograd.kernels and eval_with_autograd.max_pools == 10


@pytest.mark.parametrize("per_chunk", [1, 2])
def test_a_batch_in_inference_chunks_gives_the_whole_batch_result_in_float32(monkeypatch, per_chunk):
    """At 87 joints in float32 the eval-mode batch in chunks (the first unit sees them) equals the
    batch taken whole (the training path, autograd on) within float tolerance."""
    layout = get_layout("gsp87")
    torch.manual_seed(5)
    model = GSPMCModel(model_config_for(layout, num_classes=6, base_channels=16)).eval()
    x = torch.randn(5, 3, 8, layout.num_nodes, 1)
    # The refined topology switched on (α = 0, BN γ = 1e-6 at init) and BatchNorm's running
    # statistics those of this batch, so that eval mode normalises as a trained model does:
    # through ten units of unnormalised random weights (_randomised) float32 rounding alone moves
    # the outputs by 1e-3 of their scale.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, UnitGCN):
                m.alpha.fill_(0.5)
                m.bn.weight.fill_(1.0)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # a cumulative average: after one batch, that batch's statistics
                m.reset_running_stats()
        model.train()(x)
    model.eval()
    seen = []
    model.backbone.units[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    with torch.enable_grad():
        whole = model(x).detach()
    per_sample = 3 * 32 * 8 * layout.num_nodes * 4  # the 5th unit's K stacked conv3 outputs (width 2·16), float32
    monkeypatch.setattr(CTRGCNBackbone, "INFERENCE_CHUNK_BYTES", per_chunk * per_sample)
    with torch.no_grad():
        chunked = model(x)
    assert seen == [5] + [per_chunk] * (5 // per_chunk) + [5 % per_chunk] * (5 % per_chunk > 0)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_inference_off_the_cpu_takes_the_batch_whole(monkeypatch):
    """The chunks and blocks are for a CPU's allocator and caches; on another device (here the
    meta device, which runs shapes only) eval-mode inference takes the batch whole."""
    layout = get_layout("base27")
    model = GSPMCModel(model_config_for(layout, num_classes=5, base_channels=64)).to("meta").eval()
    monkeypatch.setattr(UnitGCN, "TOPOLOGY_BLOCK_BYTES", 1)
    monkeypatch.setattr(CTRGCNBackbone, "INFERENCE_CHUNK_BYTES", 1)
    seen = []
    model.backbone.units[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    with torch.no_grad(), TopologyBuilds() as topologies:
        logits = model(torch.randn(3, 3, 8, layout.num_nodes, 1, device="meta"))
    assert logits.shape == (3, 5)
    assert seen == [3]
    assert topologies.built == [(3, c) for c in [64] * 4 + [128] * 3 + [256] * 3]


def test_fast_equals_reference_in_float32_at_87_joints():
    """Full width at 87 joints in float32: outputs within 1e-4 of their scale; gradients as close
    to the float64 truth as the reference formulation's own float32 gradients are (through ten
    units of random weights float32 rounding alone moves the first units' gradients by ~1e-2 of
    their scale, in either formulation)."""
    layout = get_layout("gsp87")
    torch.manual_seed(2)
    model = _randomised(GSPMCModel(model_config_for(layout, num_classes=4, base_channels=64, text_dim=6)), seed=3)
    x = torch.randn(2, 3, 8, layout.num_nodes, 1)
    logits_r, emb_r, grads_r = _step(model, x, "reference")
    logits_f, emb_f, grads_f = _step(model, x, "fast")
    torch.testing.assert_close(logits_f, logits_r, rtol=0, atol=1e-4 * logits_r.abs().max().item())
    torch.testing.assert_close(emb_f, emb_r, rtol=0, atol=1e-4 * emb_r.abs().max().item())
    _, _, truth = _step(model.double(), x.double(), "reference")
    scale = max(g.abs().max().item() for g in truth.values())

    def error(grads):
        return max((grads[k].double() - g).abs().max().item() for k, g in truth.items()) / scale

    assert error(grads_f) <= 1.5 * error(grads_r) + 1e-6, (error(grads_f), error(grads_r))


def test_reference_checkpoint_exports_and_loads_into_the_fast_model(tmp_path):
    """A training checkpoint written from the reference formulation (the state_dict layout every
    existing run has) exports and loads with no key or shape change, and predicts the same."""
    layout = get_layout("gsp87")
    cfg = model_config_for(layout, num_classes=6, base_channels=16, text_dim=8)
    torch.manual_seed(4)
    reference = set_formulation(_randomised(GSPMCModel(cfg), seed=5), "reference").eval()
    ckpt = {k: None for k in CHECKPOINT_KEYS}
    ckpt.update(model=reference.state_dict(), model_config=cfg.to_dict(), meta={"frames": 10, "layout": "gsp87"})
    torch.save(ckpt, tmp_path / "last.pt")
    export_inference(tmp_path / "last.pt", tmp_path / "export.pt")
    loaded, payload = load_inference(tmp_path / "export.pt")
    assert {u.formulation for u in loaded.modules() if isinstance(u, UnitGCN)} == {"fast"}
    x = torch.randn(4, 3, 10, layout.num_nodes, 1)
    with torch.no_grad():
        want = reference(x)
        got = loaded(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert set(payload["state_dict"]) == {k for k in reference.state_dict() if not k.startswith("projections.")}


def test_unknown_formulation_is_refused():
    model = GSPMCModel(model_config_for(get_layout("base27"), num_classes=3, base_channels=8))
    with pytest.raises(ValueError, match="unknown formulation 'fastest'.*fast, reference"):
        set_formulation(model, "fastest")


def _train_cli(data: Path, out: Path, *extra: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [GSP, "train", "--data", str(data), "--out", str(out), "--epochs", "1", "--frames", "8",
           "--batch-size", "8", "--base-channels", "8", "--threads", "1", "--no-progress", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_compile_without_a_compiler_falls_back_to_the_same_eager_training(tmp_path):
    """GSP_MC_COMPILE=1 where inductor has no C++ compiler (CXX names none): one warning line, and
    the run trains exactly as `--no-compile` does."""
    data = toy_pyskl(tmp_path / "toy.pkl", num_classes=3, per_class=4, test_per_class=2, frames=10)
    env = {**os.environ, "PYTHONHASHSEED": "0", "CXX": str(tmp_path / "no-such-c++")}
    compiled = _train_cli(data, tmp_path / "compiled", env={**env, "GSP_MC_COMPILE": "1"})
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    warnings = [line for line in compiled.stderr.splitlines() if "torch.compile" in line]
    assert len(warnings) == 1, compiled.stderr[-2000:]
    assert "not available" in warnings[0] and "C++ compiler" in warnings[0] and "eager" in warnings[0]
    assert "Traceback" not in compiled.stderr
    eager = _train_cli(data, tmp_path / "eager", "--no-compile", env={**env, "GSP_MC_COMPILE": "1"})
    assert eager.returncode == 0, eager.stderr[-2000:]
    assert "torch.compile" not in eager.stderr  # --no-compile wins over the setting
    a = json.loads((tmp_path / "compiled" / "metrics.json").read_text())
    b = json.loads((tmp_path / "eager" / "metrics.json").read_text())
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["compiled"] is False and b["compiled"] is False  # the fallback is recorded
    np.testing.assert_array_equal(np.load(tmp_path / "compiled" / "test_scores.npz")["scores"],
                                  np.load(tmp_path / "eager" / "test_scores.npz")["scores"])


def test_compiled_training_step_equals_the_eager_one(tmp_path, monkeypatch):
    """torch.compile with inductor's real C++ kernels (a fresh kernel cache, so nothing is
    replayed): a train-mode forward and backward give the eager model's outputs and gradients
    within float32 tolerance, and the compiled module is what ran (not the silent fallback)."""
    from mc.model import compile_backbone

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    layout = get_layout("base27")
    cfg = model_config_for(layout, num_classes=5, base_channels=8, text_dim=6)
    torch.manual_seed(6)
    eager = _randomised(GSPMCModel(cfg), seed=7)
    compiled = _randomised(GSPMCModel(cfg), seed=7)
    compiled.load_state_dict(eager.state_dict())
    assert compile_backbone(compiled)
    torch._dynamo.reset()
    x = torch.randn(4, 3, 8, layout.num_nodes, 1)

    logits_e, emb_e, grads_e = _step(eager, x, "fast")
    logits_c, emb_c, grads_c = _step(compiled, x, "fast")
    assert compiled.backbone.compiled, "compilation failed: the eager fallback ran"
    assert any((tmp_path / "inductor").rglob("*.so")), "inductor built no kernel"
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-4, atol=1e-4 * logits_e.abs().max().item())
    torch.testing.assert_close(emb_c, emb_e, rtol=1e-4, atol=1e-4 * emb_e.abs().max().item())
    assert grads_c.keys() == grads_e.keys()
    scale = max(g.abs().max().item() for g in grads_e.values())
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-3, atol=1e-4 * scale, msg=name)
