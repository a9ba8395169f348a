"""The Trainer's checkpoints: ``ckpt-STEP/`` (model, tokenizer, optimizer, RNG, data position) with a ``latest``
pointer, ``final/``, and resuming from either on any world size.

A mixin of :class:`llmlab.train.trainer.Trainer` (kept apart so each file reads on its own): it uses the
Trainer's ``cfg``, ``out_dir``, ``wrapped``/``unwrapped`` model, ``optimizer``, ``train_source``, ``dist``,
``logger`` and loop counters.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor

from llmlab.errors import CheckpointError
from llmlab.model.checkpoint import (
    TRAINABLE_ONLY_KEY,
    WEIGHTS_FILE,
    load_state_dict,
    read_config,
    save_checkpoint,
)
from llmlab.train import distributed as dist_utils
from llmlab.train import state as st


class _StateView:
    """Duck-types the parts of a Transformer that ``save_checkpoint`` reads, over a gathered state dict."""

    def __init__(self, cfg: Any, state: dict[str, Tensor]):
        self.cfg, self._state = cfg, state

    def state_dict(self) -> dict[str, Tensor]:
        return self._state


class CheckpointMixin:
    """Saving and loading the Trainer's state (see the module docstring)."""

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "lr_scale": self.lr_scale,
            "tokens_seen": self.tokens_seen,
            "loss_history": list(self.loss_history),
            "bad_steps_in_row": self.bad_steps_in_row,
            "data": self.train_source.state_dict() if hasattr(self.train_source, "state_dict") else {},
            "rng": st.rng_state(),
            "world_size": self.dist.world_size,
            "train_config": asdict(self.cfg),
        }

    def _has_frozen(self) -> bool:
        """Whether some parameters are frozen (LoRA, QLoRA, frozen layers): resume checkpoints then hold only
        the trainable ones, since the caller rebuilds the frozen base before resuming."""
        return any(not p.requires_grad for p in self.unwrapped.parameters())

    def _gather(self, trainable_only: bool = False) -> tuple[dict[str, Tensor], dict]:
        """Full model (or only trainable) and optimizer state (collective under FSDP)."""
        model_state = dist_utils.full_model_state(self.wrapped, trainable_only=trainable_only)
        optim_state = dist_utils.full_optimizer_state(self.wrapped, self.optimizer)
        return model_state, optim_state

    def save(self) -> Path | None:
        """Write ``out/ckpt-STEP/`` (model, tokenizer, optimizer, RNG, data position) and ``out/latest``.

        With frozen parameters the weights file is ``trainable.safetensors`` with the trainable tensors only
        (see :mod:`llmlab.train.state`).
        """
        if self.out_dir is None:
            return None

        partial = self._has_frozen()
        model_state, optim_state = self._gather(trainable_only=partial)
        path = self.out_dir / st.ckpt_name(self.step)
        if self.dist.is_main:
            trainer_state = self.trainer_state()
            view = _StateView(self.unwrapped.cfg, model_state)
            extra = {**self.extra_config, "train": asdict(self.cfg), "step": self.step}
            if partial:
                extra[TRAINABLE_ONLY_KEY] = True
            save_checkpoint(
                path,
                view,
                self.tokenizer,
                extra_config=extra,
                extra_files=lambda d: st.write_training_state(d, optim_state, trainer_state),
                weights_file=st.TRAINABLE_FILE if partial else WEIGHTS_FILE,
            )
            st.write_latest(self.out_dir, path.name)
            st.prune_checkpoints(self.out_dir, self.cfg.keep_last, protect=path)
            self.logger.event(self.step, "checkpoint", path=str(path))
        dist_utils.barrier()
        return path

    def save_final(self) -> Path | None:
        """``out/final/``: a plain llmlab checkpoint (model + tokenizer) for ``llmlab.load``."""
        if self.out_dir is None:
            return None

        model_state = dist_utils.full_model_state(self.wrapped)
        path = self.out_dir / "final"
        if self.dist.is_main:
            extra = {**self.extra_config, "train": asdict(self.cfg), "step": self.step}
            save_checkpoint(
                path, _StateView(self.unwrapped.cfg, model_state), self.tokenizer, extra_config=extra
            )
        dist_utils.barrier()
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from ``path`` or from ``out/latest``; returns False when there is nothing to resume."""
        if path is None:
            if self.out_dir is None:
                return False
            path = st.find_latest(self.out_dir)
            if path is None:
                return False
        self.load(path)
        if self.dist.is_main:
            print(f"[llmlab] resumed from {path} at step {self.step}")
        return True

    def load(self, path: str | Path, restore_data: bool = True, restore_rng: bool = True) -> None:
        """Load model, optimizer and loop state from a checkpoint dir (any world size wrote it).

        A trainable-only checkpoint (a run with frozen parameters) must match this model's trainable
        parameters exactly; the frozen ones are left as the caller built them.
        """

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint directory not found")
        trainer_state, optim_state = st.read_training_state(path)
        partial = bool(read_config(path).get(TRAINABLE_ONLY_KEY))
        weights = path / (st.TRAINABLE_FILE if partial else WEIGHTS_FILE)
        model_state = load_state_dict(weights)
        if partial:
            own = {n: tuple(p.shape) for n, p in self.unwrapped.named_parameters() if p.requires_grad}
            hint = (
                f" (this checkpoint holds only the {len(model_state)} trainable tensors of its run: build the "
                "same model, base + adapters + frozen layers, before resuming)"
            )
        else:
            own = {k: tuple(v.shape) for k, v in self.unwrapped.state_dict().items()}
            hint = ""
        _check_names(own, model_state, str(weights), hint)
        try:
            dist_utils.load_full_state(
                self.wrapped, self.optimizer, model_state, optim_state, strict=not partial
            )
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: cannot load training state ({exc})") from exc
        self.step = int(trainer_state["step"])
        self.lr_scale = float(trainer_state.get("lr_scale", 1.0))
        self.tokens_seen = int(trainer_state.get("tokens_seen", 0))
        self.loss_history = deque(trainer_state.get("loss_history", []), maxlen=self.cfg.spike_window)
        self.bad_steps_in_row = int(trainer_state.get("bad_steps_in_row", 0))
        if restore_data and trainer_state.get("data") and hasattr(self.train_source, "load_state_dict"):
            self.train_source.load_state_dict(trainer_state["data"])
        if restore_rng:
            st.set_rng_state(trainer_state["rng"])


def _check_names(
    own: dict[str, tuple[int, ...]], state: dict[str, Tensor], source: str, hint: str = ""
) -> None:
    """Name/shape check against ``own`` (name -> global shape, so sharded params work too) with an error
    naming the first bad tensor."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise CheckpointError(f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing){hint}")
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} unexpected){hint}"
        )
    for k, shape in own.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor '{k}' has shape {tuple(state[k].shape)}, expected {shape}{hint}"
            )
