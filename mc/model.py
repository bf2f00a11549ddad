"""The part-specific skeleton encoder: CTR-GCN (Chen et al., ICCV 2021) with GSP-MC's heads.

The backbone follows the reference CTR-GCN design: a data BatchNorm over (M·V·C), ten TCN-GCN
units with ``w``/``2w``/``4w`` channels (``w`` = 64 in the paper; stride 2 at the 5th and 8th
unit), three CTR-GC subsets per unit (identity, inward, outward adjacency) whose topology is a
learnable parameter refined per channel, and a multi-scale temporal convolution (two dilated 5×1
branches, a max-pool branch and a 1×1 branch).

Heads (paper §3.1, §3.4):
- ``S_g``: global average pooling over frames, joints and persons → linear classifier (eq. 2).
- ``S_p``: the same final feature map averaged over each of the five contiguous keypoint groups.
- ``projections``: separate linear maps of ``S_g`` and of each ``S_p`` into the text-feature
  dimension. Training only; :meth:`GSPMCModel.inference_model` drops them (and the text side).

Eq. 1 writes a symmetric normalisation D^-1/2 A D^-1/2; CTR-GCN, whose reference design we follow,
uses the spatial partition with column-normalised in/out adjacency as its initial topology. The
topology is learnable either way, so we keep the reference initialisation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
# --------------------------------------------------------------------------- graph


def edges_to_matrix(edges: Sequence[tuple[int, int]], num_nodes: int) -> np.ndarray:
    """Adjacency with ``A[j, i] = 1`` for every edge ``(i, j)`` (the reference graph tools)."""
    a = np.zeros((num_nodes, num_nodes), dtype=np.float32)
    for i, j in edges:
        a[j, i] = 1.0
    return a


def normalize_digraph(a: np.ndarray) -> np.ndarray:
    """Column-normalise: each column sums to 1 (columns with no edge stay zero)."""
    degree = a.sum(0)
    inv = np.where(degree > 0, 1.0 / np.maximum(degree, 1e-12), 0.0)
    return (a * inv[None, :]).astype(np.float32)


def spatial_adjacency(num_nodes: int, edges: Sequence[tuple[int, int]]) -> np.ndarray:
    """The three CTR-GC subsets (3, V, V): self links, inward (child→parent), outward.

    ``edges`` are (child, parent) pairs, i.e. they point inward towards the body centre.
    """
    for i, j in edges:
        if not (0 <= i < num_nodes and 0 <= j < num_nodes):
            raise ValueError(f"edge ({i}, {j}) is outside the {num_nodes}-node graph")
    self_link = [(i, i) for i in range(num_nodes)]
    inward = [(int(i), int(j)) for i, j in edges]
    outward = [(j, i) for i, j in inward]
    return np.stack(
        [
            edges_to_matrix(self_link, num_nodes),
            normalize_digraph(edges_to_matrix(inward, num_nodes)),
            normalize_digraph(edges_to_matrix(outward, num_nodes)),
        ]
    )


# --------------------------------------------------------------------------- init helpers


def _conv_init(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0)


def _bn_init(bn: nn.modules.batchnorm._BatchNorm, scale: float) -> None:
    nn.init.constant_(bn.weight, scale)
    nn.init.constant_(bn.bias, 0)


# --------------------------------------------------------------------------- CPU inference path


def _cpu_inference(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` takes its CPU inference path on ``x``: the fast formulation in eval mode,
    without autograd, running eagerly on the CPU. There BatchNorm is a fixed per-channel affine
    map, folded into the convolution before it, and 1×1 convolutions run as matrix products.
    Training needs each BatchNorm's batch statistics; traced graphs (torch.compile, the ONNX
    export) must not fix a per-sample loop to the example's batch; an accelerator's convolutions
    have no reorder cost; and the reference formulation keeps the reference code's operations."""
    return (module.formulation == "fast" and not module.training and not torch.is_grad_enabled()
            and x.device.type == "cpu" and not _tracing())


def batch_norm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as the affine map it is: y = x·scale + shift, with scale = γ/√(σ² + ε)
    and shift = β − μ·scale (μ, σ² its running statistics)."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def conv_bn_folded(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the one convolution equal to ``bn(conv(x))`` in eval mode: BatchNorm's
    affine map folded into the convolution's output channels."""
    scale, shift = batch_norm_affine(bn)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return conv.weight * scale.view(-1, 1, 1, 1), bias


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """A 1×1 convolution with temporal stride ``stride``, as one (C_out × C_in)·(C_in × T·V)
    matrix product per sample, written into one output tensor (so without autograd).

    By hand because on the CPU oneDNN reorders an NCHW input into its blocked layout and the
    output back, through buffers it maps afresh at each call: at 87 joints the stacked conv3 of a
    64-wide unit (3 samples, 64 frames) took 12.4 ms as a convolution and 2.5 ms as products."""
    if stride > 1:
        x = x[:, :, ::stride]
    n, c, t, v = x.shape
    w = weight.view(weight.shape[0], c)
    x = x.reshape(n, c, t * v)
    out = x.new_empty(n, w.shape[0], t, v)
    for i in range(n):
        torch.addmm(bias.unsqueeze(1), w, x[i], out=out[i].view(-1, t * v))
    return out


def max_pool_frames(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``MaxPool2d((3, 1), (stride, 1), padding=(1, 0))`` (the maximum over each frame and its two
    neighbours) as two element-wise maxima of shifted views: on the CPU torch's max-pool kernel
    took 2.1–2.6 ms on (3, 16, 64, 87), the maxima 0.1 ms."""
    y = x.clone()
    torch.maximum(y[:, :, 1:], x[:, :, :-1], out=y[:, :, 1:])
    torch.maximum(y[:, :, :-1], x[:, :, 1:], out=y[:, :, :-1])
    return y[:, :, ::stride] if stride > 1 else y


# --------------------------------------------------------------------------- temporal blocks


class TemporalConv(nn.Module):
    """A (k × 1) convolution over time with BN (``unit_tcn`` in the reference code)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        pad = (kernel_size + (kernel_size - 1) * (dilation - 1) - 1) // 2
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size=(kernel_size, 1), padding=(pad, 0),
            stride=(stride, 1), dilation=(dilation, 1),
        )
        self.bn = nn.BatchNorm2d(out_channels)
        _conv_init(self.conv)
        _bn_init(self.bn, 1)

    #: "fast" or "reference" (:func:`set_formulation`).
    formulation: str = "fast"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_inference(self, x):
            c = self.conv
            if c.kernel_size == (1, 1):
                return pointwise_conv(x, *conv_bn_folded(c, self.bn), stride=c.stride[0])
            return nn.functional.conv2d(x, *conv_bn_folded(c, self.bn), c.stride, c.padding, c.dilation)
        return self.bn(self.conv(x))


class MultiScaleTemporalConv(nn.Module):
    """Dilated temporal branches + max-pool branch + 1×1 branch, concatenated (CTR-GCN)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, stride: int = 1,
                 dilations: Sequence[int] = (1, 2)):
        super().__init__()
        num_branches = len(dilations) + 2
        if out_channels % num_branches:
            raise ValueError(f"out_channels {out_channels} must be divisible by {num_branches} temporal branches")
        bc = out_channels // num_branches
        branches: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(in_channels, bc, kernel_size=1), nn.BatchNorm2d(bc), nn.ReLU(inplace=True),
                TemporalConv(bc, bc, kernel_size=kernel_size, stride=stride, dilation=d),
            )
            for d in dilations
        ]
        branches.append(
            nn.Sequential(
                nn.Conv2d(in_channels, bc, kernel_size=1), nn.BatchNorm2d(bc), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=(3, 1), stride=(stride, 1), padding=(1, 0)), nn.BatchNorm2d(bc),
            )
        )
        branches.append(
            nn.Sequential(nn.Conv2d(in_channels, bc, kernel_size=1, stride=(stride, 1)), nn.BatchNorm2d(bc)))
        self.branches = nn.ModuleList(branches)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _conv_init(m)
            elif isinstance(m, nn.BatchNorm2d):
                _bn_init(m, 1)

    #: "fast" or "reference" (:func:`set_formulation`).
    formulation: str = "fast"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_inference(self, x):
            return self._forward_cpu_inference(x)
        return torch.cat([b(x) for b in self.branches], dim=1)

    def _forward_cpu_inference(self, x: torch.Tensor) -> torch.Tensor:
        """The same function on the CPU inference path (:func:`_cpu_inference`): every branch
        begins with a 1×1 convolution of ``x`` and its BatchNorm, so those at stride 1 run as one
        matrix product over their stacked, BatchNorm-folded weights (one pass over ``x`` instead
        of four convolutions and four BatchNorm passes); the max-pool is :func:`max_pool_frames`."""
        *dilated, pooled, pointwise = self.branches
        heads = [(b[0], b[1]) for b in (*dilated, pooled)]
        stride = pointwise[0].stride[0]
        if stride == 1:
            heads.append((pointwise[0], pointwise[1]))
        weights, biases = zip(*(conv_bn_folded(conv, bn) for conv, bn in heads))
        stacked = pointwise_conv(x, torch.cat(weights), torch.cat(biases)).split(pooled[0].out_channels, 1)
        out = [branch[3](torch.relu(y)) for branch, y in zip(dilated, stacked)]
        out.append(pooled[4](max_pool_frames(torch.relu(stacked[len(dilated)]), pooled[3].stride[0])))
        out.append(stacked[-1] if stride == 1 else pointwise_conv(x, *conv_bn_folded(*pointwise), stride=stride))
        return torch.cat(out, dim=1)


# --------------------------------------------------------------------------- graph blocks


class CTRGC(nn.Module):
    """Channel-wise topology refinement graph convolution (one subset)."""

    def __init__(self, in_channels: int, out_channels: int, rel_reduction: int = 8):
        super().__init__()
        # The reference uses 8 relation channels for raw 3/9-channel input.
        rel = 8 if in_channels in (3, 9) else max(1, in_channels // rel_reduction)
        self.conv1 = nn.Conv2d(in_channels, rel, kernel_size=1)
        self.conv2 = nn.Conv2d(in_channels, rel, kernel_size=1)
        self.conv3 = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.conv4 = nn.Conv2d(rel, out_channels, kernel_size=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _conv_init(m)

    def forward(self, x: torch.Tensor, a: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        x1 = self.conv1(x).mean(-2)  # N, R, V
        x2 = self.conv2(x).mean(-2)
        x3 = self.conv3(x)  # N, C, T, V
        rel = torch.tanh(x1.unsqueeze(-1) - x2.unsqueeze(-2))  # N, R, V, V
        if self.factorized:
            return self._forward_factorized(rel, x3, a, alpha)
        topo = self.conv4(rel) * alpha + a.unsqueeze(0).unsqueeze(0)  # N, C, V, V
        return torch.einsum("ncuv,nctv->nctu", topo, x3)

    #: Use the factorised form when there are at most this many relation channels.
    FACTORIZE_MAX_REL = 4

    @property
    def factorized(self) -> bool:
        return self.conv4.in_channels <= self.FACTORIZE_MAX_REL

    def _forward_factorized(self, rel, x3, a, alpha):
        """The same result as the reference form, computed without the (N, C, V, V) topology.

        conv4 is linear, so Σ_v (W·rel + b)[c,u,v]·x3[c,t,v] = Σ_r W[c,r]·(rel_r x3_c)[t,u] +
        b[c]·Σ_v x3[c,t,v]. With few relation channels (narrow models: the ``tiny`` preset has
        1–4) this skips materialising a C×V×V tensor per sample and subset, which dominates the
        CPU time at 87 joints; wide models (R ≥ 8) keep the reference form.
        """
        n, c, t, v = x3.shape
        w = self.conv4.weight.view(c, -1)  # C, R
        per_rel = torch.einsum("nruv,nctv->nrctu", rel, x3)
        refined = torch.einsum("cr,nrctu->nctu", w, per_rel)
        if self.conv4.bias is not None:
            refined = refined + (self.conv4.bias.view(1, c, 1, 1) * x3.sum(-1, keepdim=True))
        return refined * alpha + torch.einsum("uv,nctv->nctu", a, x3)


class UnitGCN(nn.Module):
    """Sum of the CTR-GC subsets over a learnable topology, BN, residual, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, adjacency: np.ndarray, residual: bool = True):
        super().__init__()
        self.convs = nn.ModuleList([CTRGC(in_channels, out_channels) for _ in range(adjacency.shape[0])])
        self.residual = residual
        if residual and in_channels != out_channels:
            self.down: nn.Module | None = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels))
            _conv_init(self.down[0])
            _bn_init(self.down[1], 1)
        else:
            self.down = None
        self.PA = nn.Parameter(torch.from_numpy(adjacency.astype(np.float32)))
        self.alpha = nn.Parameter(torch.zeros(1))
        self.bn = nn.BatchNorm2d(out_channels)
        _bn_init(self.bn, 1e-6)
        self.relu = nn.ReLU(inplace=True)

    #: "fast" or "reference" (:func:`set_formulation`): the same parameters and the same function.
    formulation: str = "fast"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.formulation == "reference":
            y = self._graph_conv_reference(x)
        else:
            y = self._graph_conv_fast(x)
        y = self.bn(y)
        if self.residual:
            y = y + (self._down(x) if self.down is not None else x)
        return self.relu(y)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_inference(self, x):
            return pointwise_conv(x, *conv_bn_folded(*self.down))
        return self.down(x)

    def _graph_conv_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_k CTR-GC_k(x), subset by subset, as the reference code computes it."""
        y = None
        for i, conv in enumerate(self.convs):
            z = conv(x, self.PA[i], self.alpha)
            y = z if y is None else y + z
        return y

    def _graph_conv_fast(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_k CTR-GC_k(x) with all K subsets at once: the reference function, computed with
        fewer, larger operations (``bench/backbone.py`` compares the two)."""
        rel = self._relations(x)
        x3 = self._subset_features(x)
        if self.convs[0].factorized:
            return self._factorized_product(rel, x3)
        return self._topology_product(rel, x3)

    def _factorized_product(self, rel: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        """Σ_k of :meth:`CTRGC._forward_factorized` with the K subsets inside each contraction
        (rel (N, K, R, V, V) indexed [v, u] as :meth:`_relations` makes it, x3 (N, K, C, T, V)):
        three contractions for the unit instead of three per subset, and the adjacency term one
        matmul over (k, v) together (the tiny preset's training step: 0.30–0.44 s against
        0.33–0.50 in six interleaved processes)."""
        c, r = x3.shape[2], rel.shape[2]
        w = torch.stack([g.conv4.weight.view(c, r) for g in self.convs])  # K, C, R
        refined = torch.einsum("kcr,nkrctu->nctu", w, torch.einsum("nkrvu,nkctv->nkrctu", rel, x3))
        if self.convs[0].conv4.bias is not None:
            b = torch.stack([g.conv4.bias for g in self.convs])  # K, C
            refined = refined + torch.einsum("kc,nkct->nct", b, x3.sum(-1)).unsqueeze(-1)
        return refined * self.alpha + torch.einsum("kuv,nkctv->nctu", self.PA, x3)

    def _relations(self, x: torch.Tensor) -> torch.Tensor:
        """tanh(φ(x̄)_u − ψ(x̄)_v) of every subset, (N, K, R, V, V), stored transposed: element
        [..., v, u] holds the relation of joint u to joint v (the reference's [..., u, v]).

        conv1/conv2 are linear 1×1 convolutions, so their mean over frames is the convolution of
        the frame mean: one (2KR × C) product on (N, C, V) instead of 2K convolutions over all T
        frames (the reference's costliest small convolutions at 87 joints). Transposed, the
        topology built from it is the right-hand operand of x3 @ topologyᵀ as it lies, so the
        backward pass gets its gradient in that layout rather than copying the whole (N, K, C,
        V, V) gradient out of a transposed view (1.5 s of a 12 s full-size training step)."""
        convs = self.convs
        k, r = len(convs), convs[0].conv1.out_channels
        w = torch.cat([m.weight.flatten(1) for g in convs for m in (g.conv1, g.conv2)])
        b = torch.cat([m.bias for g in convs for m in (g.conv1, g.conv2)])
        q = (torch.matmul(w, x.mean(2)) + b.unsqueeze(-1)).view(x.shape[0], k, 2, r, x.shape[-1])
        return torch.tanh(q[:, :, 0].unsqueeze(-2) - q[:, :, 1].unsqueeze(-1))

    def _subset_features(self, x: torch.Tensor) -> torch.Tensor:
        """conv3 of every subset as one convolution over the stacked weights, (N, K, C, T, V)."""
        w = torch.cat([g.conv3.weight for g in self.convs])
        b = torch.cat([g.conv3.bias for g in self.convs])
        y = pointwise_conv(x, w, b) if _cpu_inference(self, x) else nn.functional.conv2d(x, w, b)
        n, _, t, v = y.shape
        return y.view(n, len(self.convs), -1, t, v)

    #: Bytes of (·, K, ·, V, V) topology built and applied per block without autograd (see
    #: _topology_product): about what the CPU's L2/L3 keep while the block is applied.
    TOPOLOGY_BLOCK_BYTES = 2 << 20

    def _topology_product(self, rel: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        """Σ_k Σ_v (α·conv4_k(rel_k) + A_k)[n,c,u,v] · x3_k[n,c,t,v] (the CTR-GC aggregation).

        α, conv4's bias and the adjacency A_k enter one (C × (R+2)) matmul per subset, as two
        constant relation channels (ones and A_k) with weight columns α·b and 1: the (N, C, V, V)
        topology is written once, with no broadcast multiply/add passes over it, and the
        gradients of α, b and A come out of the matmul's own backward instead of reductions over
        (N, C, V, V).

        Without autograd (inference) the topology is built and applied in blocks of samples and
        channels of at most ``TOPOLOGY_BLOCK_BYTES``: building it is a matmul over only R+2
        inner terms, so its time is writing memory, and a block that stays in cache is read back
        by the second matmul at cache speed (at 87 joints one sample's topology is 6–23 MB). At
        full width, one sample and C = 256, building and applying took 13.8 ms whole and 6.9 ms
        in blocks of 32 channels. Training takes the batch whole: autograd keeps every block's
        topology for the backward anyway, and a fresh process's first step was slower in
        per-sample chunks (16 s against 12)."""
        n, k, r, v, _ = rel.shape
        c = x3.shape[2]
        w4 = torch.stack([g.conv4.weight.view(c, r) for g in self.convs]) * self.alpha
        b4 = torch.stack([g.conv4.bias for g in self.convs]).unsqueeze(-1) * self.alpha
        w_aug = torch.cat([w4, b4, torch.ones_like(b4)], dim=-1)  # K, C, R+2
        pa_t = self.PA.transpose(-1, -2)  # the layout of rel: [v, u]
        consts = torch.cat([torch.ones_like(pa_t).unsqueeze(1), pa_t.unsqueeze(1)], dim=1)

        def augmented(rel_i: torch.Tensor) -> torch.Tensor:  # (m, K, R+2, V·V)
            m = rel_i.shape[0]
            return torch.cat([rel_i, consts.unsqueeze(0).expand(m, -1, -1, -1, -1)], dim=2).view(m, k, r + 2, v * v)

        def product(rel_aug: torch.Tensor, x3_i: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            topo_t = torch.matmul(w, rel_aug).view(x3_i.shape[0], k, w.shape[1], v, v)  # [v, u]
            return torch.matmul(x3_i, topo_t)  # (m, K, c, T, V), summed over K by the caller

        # Traced graphs (torch.compile, torch.export for ONNX) take the batch whole too: a loop
        # over a dynamic batch would fix it to the example's size. So does an accelerator, whose
        # kernels want large operands more than a CPU's caches.
        if torch.is_grad_enabled() or _tracing() or x3.device.type != "cpu":
            return product(augmented(rel), x3, w_aug).sum(1)
        per_channel = k * v * v * x3.element_size()
        channels = max(1, min(c, self.TOPOLOGY_BLOCK_BYTES // per_channel))
        samples = max(1, self.TOPOLOGY_BLOCK_BYTES // (per_channel * c)) if channels == c else 1
        out = x3.new_empty(n, c, *x3.shape[3:])
        for i in range(0, n, samples):
            rel_aug = augmented(rel[i:i + samples])
            for j in range(0, c, channels):
                block = product(rel_aug, x3[i:i + samples, :, j:j + channels], w_aug[:, j:j + channels])
                torch.sum(block, 1, out=out[i:i + samples, j:j + channels])
        return out


def _tracing() -> bool:
    """Whether torch.compile, torch.export or torch.jit is tracing this call (not running it eagerly)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


#: The graph-unit formulations: "fast" (the default) and "reference" (the reference code's
#: operations, kept for the equality tests and ``bench/backbone.py``).
FORMULATIONS = ("fast", "reference")


def set_formulation(model: nn.Module, name: str) -> nn.Module:
    """Compute every graph unit of ``model``, the backbone's eval-mode batching and the temporal
    blocks' CPU inference path with formulation ``name``; returns ``model``. Parameters and
    state_dict are the same under both."""
    if name not in FORMULATIONS:
        raise ValueError(f"unknown formulation {name!r}; choose one of {', '.join(FORMULATIONS)}")
    for m in model.modules():
        if isinstance(m, (UnitGCN, CTRGCNBackbone, MultiScaleTemporalConv, TemporalConv)):
            m.formulation = name
    return model


class TCNGCNUnit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, adjacency: np.ndarray, stride: int = 1,
                 residual: bool = True, kernel_size: int = 5, dilations: Sequence[int] = (1, 2)):
        super().__init__()
        self.gcn1 = UnitGCN(in_channels, out_channels, adjacency)
        self.tcn1 = MultiScaleTemporalConv(out_channels, out_channels, kernel_size, stride, dilations)
        self.relu = nn.ReLU(inplace=True)
        if not residual:
            self.residual: nn.Module | None = None
        elif in_channels == out_channels and stride == 1:
            self.residual = nn.Identity()
        else:
            self.residual = TemporalConv(in_channels, out_channels, kernel_size=1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tcn1(self.gcn1(x))
        if self.residual is not None:
            y = y + self.residual(x)
        return self.relu(y)


# --------------------------------------------------------------------------- config + models


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (stored in checkpoints and exports)."""

    num_classes: int
    num_nodes: int
    edges: list[tuple[int, int]]
    parts: dict[str, list[int]]
    in_channels: int = 3
    num_persons: int = 1
    base_channels: int = 64
    text_dim: int | None = None
    dropout: float = 0.0
    #: Stride-2 units (1-based), as in the reference design.
    stride_units: tuple[int, ...] = (5, 8)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["edges"] = [list(e) for e in self.edges]
        d["stride_units"] = list(self.stride_units)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelConfig:
        d = dict(d)
        d["edges"] = [tuple(int(v) for v in e) for e in d["edges"]]
        d["parts"] = {str(k): [int(i) for i in v] for k, v in d["parts"].items()}
        d["stride_units"] = tuple(d.get("stride_units", (5, 8)))
        return cls(**d)


class CTRGCNBackbone(nn.Module):
    """Data BN + ten TCN-GCN units; returns the final feature map (N·M, C, T', V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = spatial_adjacency(cfg.num_nodes, cfg.edges)
        w = cfg.base_channels
        if w % 4:
            raise ValueError(f"base_channels {w} must be a multiple of 4 (four temporal branches)")
        widths = [w] * 4 + [2 * w] * 3 + [4 * w] * 3
        self.data_bn = nn.BatchNorm1d(cfg.num_persons * cfg.in_channels * cfg.num_nodes)
        _bn_init(self.data_bn, 1)
        units = []
        c_in = cfg.in_channels
        #: Channels × share of the input frames of the largest intermediate, per joint and person:
        #: a unit's K stacked conv3 outputs, before its temporal stride (the 5th unit's at 2w).
        self._peak_channels = 0.0
        frames = 1.0
        for k, c_out in enumerate(widths, start=1):
            stride = 2 if k in cfg.stride_units else 1
            units.append(TCNGCNUnit(c_in, c_out, a, stride=stride, residual=(k != 1)))
            self._peak_channels = max(self._peak_channels, a.shape[0] * c_out * frames * cfg.num_persons)
            frames /= stride
            c_in = c_out
        self.units = nn.Sequential(*units)
        self.out_channels = c_in
        #: The torch.compile'd forward (:func:`compile_backbone`); None: eager. A plain attribute,
        #: so the state_dict (and every checkpoint) is the same either way.
        self._compiled = None

    @property
    def compiled(self) -> bool:
        """Whether forward runs the torch.compile'd function (False before compile_backbone and
        after its fallback to eager)."""
        return self._compiled is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None:
            try:
                return self._compiled(x)
            except torch._dynamo.exc.TorchDynamoException as exc:
                # Compilation runs at the first call (and at a new shape); nothing has run yet.
                self._compiled = None
                log.warning("torch.compile failed (%s); going on with the eager model", _first_line(exc))
        if (self.formulation == "reference" or self.training or torch.is_grad_enabled() or _tracing()
                or x.device.type != "cpu"):  # an accelerator wants the batch whole (and has no glibc heap)
            return self._forward_eager(x)
        return self._forward_in_chunks(x)

    #: "fast" or "reference" (:func:`set_formulation`): the reference takes every batch whole.
    formulation: str = "fast"

    #: Without autograd, in eval mode, the batch runs a few samples at a time so that no
    #: intermediate passes this size (see _forward_in_chunks).
    INFERENCE_CHUNK_BYTES = 32 << 20

    def _forward_in_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """The eval-mode forward pass, a chunk of samples at a time (every operation is per
        sample in eval mode, so the result is the whole batch's).

        glibc's allocator hands every block over 32 MB (its largest mmap threshold) straight back
        to the OS when freed, so each one is mapped fresh, page by page, at its next use. At full
        width, 87 joints and 64 frames one sample's largest intermediate is 8.6 MB, a batch of 16's
        137 MB; in chunks of 3 no intermediate passes the threshold and the heap is reused. Batch
        16 at full size took 0.75–0.78 of the whole batch's time in chunks of 2–4."""
        n, _, t, v, _ = x.shape
        per_sample = self._peak_channels * t * v * x.element_size()
        step = max(1, int(self.INFERENCE_CHUNK_BYTES // per_sample))
        if step >= n:
            return self._forward_eager(x)
        return torch.cat([self._forward_eager(x[i:i + step]) for i in range(0, n, step)])

    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t, v, m = x.shape
        x = x.permute(0, 4, 3, 1, 2).contiguous().view(n, m * v * c, t)
        x = self.data_bn(x)
        x = x.view(n, m, v, c, t).permute(0, 1, 3, 4, 2).contiguous().view(n * m, c, t, v)
        return self.units(x)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def compile_backbone(model: nn.Module) -> bool:
    """Compile ``model.backbone`` with ``torch.compile`` in place (the parameters, state_dict and
    function stay the same). Returns False, after one warning line, where it cannot: no C++
    compiler for the CPU backend, or compilation failing at the first call (the backbone then
    stays eager)."""
    backbone = model.backbone
    if not any(p.is_cuda for p in backbone.parameters()):
        problem = _cpu_compiler_problem()
        if problem:
            log.warning("torch.compile is not available (%s); going on with the eager model", problem)
            return False
    backbone._compiled = torch.compile(backbone._forward_eager)
    return True


def _cpu_compiler_problem() -> str | None:
    """Why inductor cannot build CPU kernels here (no working C++ compiler), or None. Checked up
    front because without it the failure only shows after minutes of tracing."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch without this helper: the first call's fallback still applies
        return None
    try:
        get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler and whatever a broken toolchain raises
        return f"no working C++ compiler: {_first_line(exc)}"
    return None


class SkeletonClassifier(nn.Module):
    """The inference model: backbone → S_g (global average pooling) → linear classifier (eq. 2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = CTRGCNBackbone(cfg)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(self.backbone.out_channels, cfg.num_classes)
        nn.init.normal_(self.classifier.weight, 0, math.sqrt(2.0 / cfg.num_classes))
        nn.init.constant_(self.classifier.bias, 0)

    def global_features(self, feat: torch.Tensor, n: int) -> torch.Tensor:
        """S_g: mean over frames and joints, then over persons. ``feat`` is (N·M, C, T, V)."""
        c = feat.shape[1]
        return feat.view(n, -1, c, feat.shape[2] * feat.shape[3]).mean(3).mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.backbone(x)
        return self.classifier(self.dropout(self.global_features(feat, x.shape[0])))


@dataclass
class ModelOutput:
    logits: torch.Tensor
    #: Projected global feature (B, D) or None without projections.
    global_embedding: torch.Tensor | None
    #: Projected part features, part name → (B, D).
    part_embeddings: dict[str, torch.Tensor]


class GSPMCModel(SkeletonClassifier):
    """Training model: the classifier plus part pooling and projections to the text space."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        c = self.backbone.out_channels
        self.part_names = list(cfg.parts)
        for name, idx in cfg.parts.items():
            if not idx:
                raise ValueError(f"part {name!r} has no keypoints")
            if min(idx) < 0 or max(idx) >= cfg.num_nodes:
                raise ValueError(f"part {name!r} indexes outside the {cfg.num_nodes}-node graph")
        # Part membership as a (P, V) averaging matrix: one matmul pools all parts at once.
        pool = torch.zeros(len(cfg.parts), cfg.num_nodes)
        for p, idx in enumerate(cfg.parts.values()):
            pool[p, list(idx)] = 1.0 / len(idx)
        self.register_buffer("part_pool", pool, persistent=False)
        if cfg.text_dim:
            self.projections = nn.ModuleDict(
                {"global": nn.Linear(c, cfg.text_dim), **{name: nn.Linear(c, cfg.text_dim) for name in cfg.parts}}
            )
        else:
            self.projections = nn.ModuleDict()

    def part_features(self, feat: torch.Tensor, n: int) -> torch.Tensor:
        """S_p: (N, P, C), the final features averaged over frames, each part's joints and persons."""
        c = feat.shape[1]
        per_joint = feat.mean(2)  # N·M, C, V
        parts = torch.einsum("bcv,pv->bpc", per_joint, self.part_pool.to(per_joint.dtype))
        return parts.view(n, -1, parts.shape[1], c).mean(1)

    def forward_train(self, x: torch.Tensor, with_embeddings: bool = True) -> ModelOutput:
        n = x.shape[0]
        feat = self.backbone(x)
        s_g = self.global_features(feat, n)
        logits = self.classifier(self.dropout(s_g))
        if not with_embeddings or not len(self.projections):
            return ModelOutput(logits, None, {})
        s_p = self.part_features(feat, n)
        parts = {name: self.projections[name](s_p[:, i]) for i, name in enumerate(self.part_names)}
        return ModelOutput(logits, self.projections["global"](s_g), parts)

    def inference_model(self) -> SkeletonClassifier:
        """A plain classifier with this model's backbone and classifier weights (no projections)."""
        cfg = ModelConfig.from_dict({**self.cfg.to_dict(), "text_dim": None})
        out = SkeletonClassifier(cfg)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("projections.")}
        out.load_state_dict(state)
        return out.eval()


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per component: backbone, classifier, projections."""
    def count(m: nn.Module | None) -> int:
        return sum(p.numel() for p in m.parameters()) if m is not None else 0

    return {
        "backbone": count(getattr(model, "backbone", None)),
        "classifier": count(getattr(model, "classifier", None)),
        "projections": count(getattr(model, "projections", None)),
    }


def flops_per_sample(model: nn.Module, frames: int, num_nodes: int, in_channels: int = 3, num_persons: int = 1) -> int:
    """FLOPs of one inference forward pass on a single sample (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_channels, frames, num_nodes, num_persons)
    counter = FlopCounterMode(display=False)
    # No torch.no_grad(): FlopCounterMode's module tracker needs autograd on (it hooks grads).
    with counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def model_config_for(layout, num_classes: int, base_channels: int = 64, text_dim: int | None = None,
                     dropout: float = 0.0, in_channels: int = 3, num_persons: int = 1) -> ModelConfig:
    """A :class:`ModelConfig` for a keypoint layout (``mc.keypoints.Layout``)."""
    return ModelConfig(
        num_classes=int(num_classes),
        num_nodes=layout.num_nodes,
        edges=[(int(a), int(b)) for a, b in layout.edges],
        parts={name: [int(v) for v in nodes] for name, nodes in layout.parts.items()},
        in_channels=in_channels,
        num_persons=num_persons,
        base_channels=base_channels,
        text_dim=text_dim,
        dropout=dropout,
        extra={"layout": layout.name},
    )
