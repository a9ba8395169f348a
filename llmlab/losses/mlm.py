"""The masked-language-model objective (BERT): corrupt 15% of the tokens, predict the originals.

Three pieces, each usable alone:

- :func:`mask_tokens`: BERT's 80/10/10 corruption of a batch of token ids (a pure function of its generator);
- :func:`mlm_loss`: the cross-entropy on the corrupted positions only, for a bidirectional (``causal=False``)
  Transformer, in the Trainer's ``loss_fn(model, batch) -> LossOutput`` contract;
- :class:`MaskedBatches`: wraps any batch source (the packed pretraining loader) so every batch it hands out
  is corrupted, deterministically from ``(seed, batch index, rank)``, so runs resume bit-exactly.

The pretraining recipe turns these on with ``objective=mlm`` (``llmlab pretrain objective=mlm``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.errors import ConfigError
from llmlab.losses.lm import MODEL_KWARGS, LossOutput
from llmlab.losses.moe import router_losses
from llmlab.losses.stability import z_loss
from llmlab.train.distributed import unwrap

IGNORE_INDEX = -100
MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # of the selected tokens; the remaining 10% stay unchanged


def mask_tokens(
    input_ids: Tensor,
    mask_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's corruption: ``(corrupted input_ids, labels)``.

    Each position is selected independently with ``probability`` (at least one per batch, so the loss is
    never empty). Of the selected positions 80% become ``mask_id``, 10% a token drawn uniformly from
    ``[0, vocab_size)`` and 10% keep their token; the unchanged and random ones stop the model from learning
    that only ``[MASK]`` positions matter (the fine-tuning input has no ``[MASK]``). ``labels`` hold the
    original token at selected positions and -100 elsewhere.
    """
    if not 0.0 < probability < 1.0:
        raise ConfigError(f"config key 'mlm_probability' must be in (0, 1), got {probability}")
    device = input_ids.device

    def uniform() -> Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=device)

    selected = uniform() < probability
    if not selected.any():
        flat = int(torch.randint(input_ids.numel(), (1,), generator=generator, device=device))
        selected.view(-1)[flat] = True
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)
    roll = uniform()  # one draw decides mask / random / keep for each selected position
    to_mask = selected & (roll < MASK_FRACTION)
    to_random = selected & (roll >= MASK_FRACTION) & (roll < MASK_FRACTION + RANDOM_FRACTION)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    corrupted = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    corrupted = torch.where(to_random, random_ids.to(input_ids.dtype), corrupted)
    return corrupted, labels


def mlm_loss(model: nn.Module, batch: dict[str, Tensor], z_loss_weight: float = 0.0) -> LossOutput:
    """Masked-LM cross-entropy, summed over the selected positions ``M = {i : labels_i != -100}``::

        L = - sum_{i in M} log p_theta(x_i | x~)        (x~: the corrupted sequence, seen bidirectionally)

    plus, with ``z_loss_weight`` w > 0, the output z-loss ``w * sum_{i in M} log(Z_i)^2`` on the same
    positions (:func:`llmlab.losses.stability.z_loss`). ``weight`` is ``|M|``. Only the selected positions'
    hidden states go through the output head (BERT's gather), so the head costs ~15% of a causal-LM step.
    Metric ``masked_acc``: the fraction of ``M`` whose argmax is the original token.
    """
    kwargs = {k: batch[k] for k in MODEL_KWARGS if k in batch}
    labels = batch["labels"]
    selected = labels != IGNORE_INDEX
    inner = unwrap(model)
    if hasattr(inner, "reshard"):  # FSDP2: the head's weight is sharded outside forward; take full logits
        logits = model(batch["input_ids"], **kwargs)[selected]
    else:
        hidden = model(batch["input_ids"], return_hidden=True, **kwargs)
        logits = inner.logits(hidden[selected])
    targets = labels[selected]
    logits = logits.float()
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    metrics: dict[str, Any] = {"masked_acc": (logits.argmax(-1) == targets).float().mean().detach()}
    if z_loss_weight > 0:
        z_sum = z_loss(logits, z_loss_weight)
        loss_sum = loss_sum + z_sum
        metrics["z_loss"] = z_sum.detach() / max(len(targets), 1)
    router_loss, router_metrics = router_losses(model, float(len(targets)))  # MoE only; (None, {}) if dense
    if router_loss is not None:
        loss_sum = loss_sum + router_loss
    return LossOutput(loss_sum, float(len(targets)), {**metrics, **router_metrics})


@dataclass
class MaskedBatches:
    """A batch source whose batches are :func:`mask_tokens`-corrupted copies of ``source``'s.

    Packed causal batches come as ``input_ids = window[:-1]``, ``labels = window[1:]``; an MLM reads the
    same ``input_ids`` unshifted, so ``labels`` are replaced. Batch ``k`` is corrupted with a generator
    seeded by ``(seed, k, rank)``: the masks depend on the run's seed, position and rank, not on whether
    the run was resumed. ``source`` must expose ``state_dict`` / ``load_state_dict`` (the Trainer
    checkpoints them); this wrapper's own state is the batch counter.
    """

    source: Any
    mask_id: int
    vocab_size: int
    probability: float = 0.15
    seed: int = 0
    index: int = 0

    def next_batch(self) -> dict[str, Tensor]:
        batch = dict(self.source.next_batch())
        batch["input_ids"], batch["labels"] = self._corrupt(batch["input_ids"], self.index)
        self.index += 1
        return batch

    def _corrupt(self, input_ids: Tensor, index: int) -> tuple[Tensor, Tensor]:
        # Each rank corrupts its rows of the global batch with its own stream (``source.rank``, 0 if absent).
        rank = int(getattr(self.source, "rank", 0))
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + index) * 4099 + rank)
        return mask_tokens(input_ids.cpu(), self.mask_id, self.vocab_size, self.probability, gen)

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "mlm_index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["source"])
        self.index = int(state.get("mlm_index", 0))

    def iterate(self, batches: Iterable[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        """Corrupt a fixed batch sequence (held-out evaluation): batch ``k`` always gets the same mask."""
        for k, batch in enumerate(batches):
            batch = dict(batch)
            batch["input_ids"], batch["labels"] = self._corrupt(batch["input_ids"], k)
            yield batch
