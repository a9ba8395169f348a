"""Process-group setup and model wrapping for ``torchrun``: DDP or FSDP2, gloo on CPU, nccl on GPU.

A run started with plain ``python`` is a world of one and nothing here touches ``torch.distributed``.
Checkpoints never depend on the world size: model and optimizer state are gathered to full tensors on save
(:func:`full_model_state` / :func:`full_optimizer_state`) and re-sharded on load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights live (its first parameter's device)."""
    return next(model.parameters()).device


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with every tensor moved to ``device`` (a no-op for tensors already there).

    Data sources build batches on the CPU. The Trainer moves its own; every no-grad forward outside it
    (reference log-probs, rollout scoring, reward-model evaluation) must move them too, or it breaks on a GPU.
    """
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
    }


def local_device(name: str = "auto") -> torch.device:
    """This rank's device: ``resolve_device(name)``, on GPU the one numbered ``LOCAL_RANK`` under torchrun.

    Stages that build frozen copies (reference, teacher, reward model) put the model here before copying, so
    the copies land where the Trainer will put the policy.
    """
    dev = resolve_device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def setup(device: str = "auto") -> DistInfo:
    """Join the process group if launched by ``torchrun`` (``WORLD_SIZE`` > 1); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = local_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, parallel: str) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` each block, then the root), for a world larger than one."""
    if not info.enabled:
        return model
    if parallel == "fsdp":
        # only under torchrun with parallel=fsdp; FSDP2's API is missing from some torch builds
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in getattr(model, "layers", []):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP  # only under torchrun

    ids = [info.device.index] if info.device.type == "cuda" else None
    # The model's buffers (RoPE tables, ALiBi slopes, the causal mask) are constants every rank builds the same
    # way: broadcasting them before each forward would only cost time.
    return DDP(model, device_ids=ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP/compile wrapper (FSDP2 shards in place, so it is its own module)."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile
    inner = getattr(inner, "module", inner)  # DDP
    return getattr(inner, "_orig_mod", inner)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks (one collective)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_model_state(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict on CPU, with the user's parameter names. Collective.

    ``trainable_only``: just the parameters that require grad (no frozen weights, no buffers).
    """
    inner = unwrap(model)
    if not dist.is_initialized():
        # One process: the module's own state dict (works for any module, quantized or adapted ones too).
        # keep_vars keeps the Parameters, so frozen weights are dropped before any device-to-CPU copy.
        state = inner.state_dict(keep_vars=True)
        return {k: v.detach().cpu() for k, v in state.items() if v.requires_grad or not trainable_only}
    # only when a process group runs (torchrun): distributed checkpoint APIs
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=opts)
    if trainable_only:  # ignore_frozen_params keeps buffers
        names = {n for n, p in inner.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    return state


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimizer state keyed by parameter name (so it reloads on any world size). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_state: dict,
    optim_state,
    strict: bool = True,
):
    """Load full (name-keyed) model/optimizer state into a possibly sharded model; every rank passes it.

    ``strict=False`` loads a subset (the trainable parameters); the caller checks the names beforehand.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, strict=strict)
    if dist.is_initialized():
        set_model_state_dict(model, model_state, options=opts)
    else:
        unwrap(model).load_state_dict(model_state, strict=strict)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state, options=opts)
