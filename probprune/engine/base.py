"""The engine protocol: what the pipeline needs from wherever the weights live (see :mod:`probprune.engine`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..mask_space import MaskSpace

if TYPE_CHECKING:
    from ..reconstruct import Reconstruction

# A weight task: a module-level function ``task(model, adapter, *args)`` (see :mod:`probprune.engine.tasks`).
Task = Callable[..., Any]


class Engine(Protocol):
    """What the pipeline needs from wherever the weights live.

    Attributes:
        holds_weights: True when this process holds the model's weights (the local engine); False for a driver that
            holds only its shapes.
        num_replicas: replicas that ``map`` spreads its shares over.
    """

    holds_weights: bool

    @property
    def num_replicas(self) -> int: ...

    def losses(self, masks: np.ndarray, batch: torch.Tensor, objective: str | None = None) -> np.ndarray:
        """Loss of each mask ``[K, N]`` on ``batch`` ``[B, T]`` -> ``[K]`` (the engine's objective unless given)."""
        ...

    def run(self, task: Task, *args: Any) -> Any:
        """``task(model, adapter, *args)`` on one replica."""
        ...

    def map(self, task: Task, shares: Sequence[tuple]) -> list[Any]:
        """``task(model, adapter, *share)`` for every share, spread over the replicas; results in share order."""
        ...

    def set_space(self, space: MaskSpace) -> None:
        """Score later masks in ``space``."""
        ...

    def perplexity(
        self,
        mask: np.ndarray | None,
        tokens: torch.Tensor,
        seq_lens: Sequence[int],
        max_tokens: int | None,
        batch_size: int,
        progress: bool = True,
        rec: Reconstruction | None = None,
        bos_id: int | None = None,
    ) -> dict[str, float]:
        """Held-out perplexity of the model under ``mask`` (None: dense) with ``rec``'s re-fitted weights and biases,
        by the protocol of :mod:`probprune.perplexity` (windows start with ``bos_id`` if given):
        ``{str(effective seq_len): ppl}``."""
        ...

    def save_pruned(self, mask: np.ndarray, folder: Path, tokenizer: Any, rec: Reconstruction | None = None) -> int:
        """Write the model compacted to ``mask`` (with ``rec``'s weights) as a model folder; return its parameters."""
        ...

    def close(self) -> None: ...
