"""The pieces of multi-process (DistributedDataParallel) training that :mod:`mc.train` uses:
process group from torchrun's environment, rank helpers, the global-batch split, gathers with
gradients for the contrastive loss, and BatchNorm statistics over the global batch.

Every helper is a no-op in a single process (no process group), so one code path trains with
one process or many. The launcher (``torchrun`` as a subprocess) is :mod:`mc.distributed`.

What "the same as one process" means here: ``batch_size`` is the *global* batch. Each step the
ranks take consecutive slices of the batch a single process would take, so gathering in rank
order gives back that batch in its order; the contrastive loss runs on the gathered features and
labels (so the texts sampled per sample are the ones a single process samples), and BatchNorm
normalises with the statistics of the whole global batch.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn import functional as dist_nn

from gsp.errors import GspError

# torch 2.14 steers these autograd-aware collectives to torch.distributed._functional_collectives,
# which has no differentiable all_reduce; they remain the public, documented ones.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated",
                        category=FutureWarning)


class DistributedConfigError(GspError, ValueError):
    """A setting that cannot work with this many processes."""


# --------------------------------------------------------------------------- process group


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(device: torch.device) -> torch.device:
    """Join torchrun's process group when launched by it with more than one process: NCCL on
    CUDA (one GPU per local rank), gloo on CPU. Returns the device this rank trains on."""
    if env_world_size() <= 1 or dist.is_initialized():
        return local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    # Rank 0 evaluates the whole test split while the others wait at a barrier; give it time.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return local_device(device)


def local_device(device: torch.device) -> torch.device:
    """CUDA ranks get one GPU each (LOCAL_RANK); CPU is CPU."""
    if device.type == "cuda" and env_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes the run folder, TensorBoard, metrics and export."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a few numbers over the ranks (float64, so counts stay exact)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


# --------------------------------------------------------------------------- batches


def per_rank_batch(global_batch: int, world: int) -> int:
    """The per-rank batch of a global batch, refusing one the ranks cannot share equally."""
    if global_batch % world:
        raise DistributedConfigError(
            f"batch_size {global_batch} (the global batch) is not divisible by {world} processes "
            f"(--nproc-per-node); use a multiple of {world}, e.g. {global_batch - global_batch % world or world}")
    return global_batch // world


def global_batches(n: int, global_batch: int, generator: torch.Generator, drop_last: bool) -> list[list[int]]:
    """The index batches one process takes in an epoch: one permutation from ``generator`` cut
    into batches of ``global_batch``, as a shuffling DataLoader would."""
    order = torch.randperm(n, generator=generator).tolist()
    stop = n - n % global_batch if drop_last else n
    return [order[i:i + global_batch] for i in range(0, stop, global_batch)]


def rank_slices(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This rank's consecutive slice of every global batch (rank r: items [r·b, (r+1)·b)), so the
    ranks' slices gathered in rank order are the global batch in its order."""
    out = []
    for batch in batches:
        if len(batch) % world:
            raise DistributedConfigError(
                f"a batch of {len(batch)} samples cannot be split over {world} processes; "
                f"the training split needs at least one full global batch")
        b = len(batch) // world
        out.append(batch[rank * b:(rank + 1) * b])
    return out


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of ``t`` concatenated in rank order, differentiable: the backward sums the
    gradient each rank's loss sends to a row back to the rank that owns it."""
    if world_size() == 1:
        return t
    return torch.cat(dist_nn.all_gather(t.contiguous()), 0)


def gather_labels(y: torch.Tensor) -> torch.Tensor:
    """All ranks' labels concatenated in rank order (no gradient)."""
    if world_size() == 1:
        return y
    parts = [torch.empty_like(y) for _ in range(world_size())]
    dist.all_gather(parts, y.contiguous())
    return torch.cat(parts, 0)


# --------------------------------------------------------------------------- BatchNorm


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, summed over the ranks
    with differentiable all-reduces (any backend). ``nn.SyncBatchNorm`` does this on GPUs but
    refuses CPU tensors (torch 2.14), which is what the gloo runs use. Same parameters and
    buffers as ``nn.BatchNorm*d``, so checkpoints load into either; in eval mode, or in a single
    process, it is plain batch norm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        # In float64, as ATen's CPU batch norm accumulates: the backward through the mean and
        # variance cancels large terms, and float32 sums leave the gradients ~1e-3 off.
        xd = x.double()
        # Ranks always hold equal batch shapes (rank_slices), so the global count is a product.
        count = xd.numel() // xd.shape[1] * world_size()
        mean = dist_nn.all_reduce(xd.sum(dims)) / count
        centred = xd - mean.view(shape)
        var = dist_nn.all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        # Running variance is unbiased, as in nn.BatchNorm.
        self.running_var.mul_(1 - m).add_((var * (count / max(count - 1, 1))).to(self.running_var.dtype), alpha=m)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """With more than one process, every BatchNorm normalises over the global batch: torch's
    ``SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` elsewhere. Parameters are kept (the same
    tensors), so call this before building the optimizer."""
    if world_size() == 1:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out


def data_parallel(module: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
    """``module`` in DistributedDataParallel with more than one process (as it is otherwise).
    DDP averages the ranks' gradients: with every rank computing the same L_con on the gathered
    batch and the gathers' backward summing over ranks, the average is the single-process
    gradient. ``find_unused``: contrastive runs, where a part without texts in a batch leaves its
    projection out of the graph (on every rank alike, so DDP keeps its gradient None, as one
    process would, and the optimizer skips it)."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)
