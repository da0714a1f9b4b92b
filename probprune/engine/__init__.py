"""Where the weights live: one engine object for everything that reads them.

An :class:`Engine` scores masks (``losses``), runs weight tasks on its replicas (``run`` on one, ``map`` one share
per replica), measures held-out perplexity under a mask, and writes the pruned model. Two implementations:

- :class:`~probprune.engine.local.LocalEngine` — the model in this process, on one device (or one replica split by a
  device map): the single-GPU fallback;
- :class:`~probprune.engine.ray.RayEngine` — Ray actors that each hold one replica; the driver holds only the model's
  shapes (a ``meta``-device skeleton), so its memory does not grow with the model.

The pipeline and the search loop see only this protocol: they never ask which engine they have. Ray is imported in
:mod:`probprune.engine.ray` and nowhere else in the package.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from ..mask_space import MaskSpace
from .base import Engine, Task


def load_for_engine(cfg: Any) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` as this process should hold them for ``cfg.engine``: the weights for the local engine;
    only the shapes (a ``meta``-device skeleton) for the Ray engine, whose actors load the weights themselves."""
    from ..models.loading import load_model, load_skeleton

    m = cfg.model
    if cfg.engine.kind == "ray":
        return load_skeleton(m.name_or_path, m.dtype, m.trust_remote_code)
    return load_model(m.name_or_path, m.dtype, m.device, m.device_map, m.trust_remote_code)


def build_engine(cfg: Any, model: torch.nn.Module, space: MaskSpace) -> Engine:
    """The engine ``cfg.engine`` asks for: ``local`` (``model`` holds the weights) or ``ray`` (actors load the model
    named by ``cfg.model`` themselves; ``model`` may be a ``meta``-device skeleton).

    Raises:
        UserError: ``engine.kind=ray`` but Ray is not installed, or the actors cannot start (see
            :class:`~probprune.engine.ray.RayEngine`).
    """
    if cfg.engine.kind == "ray":
        try:
            from .ray import RayEngine
        except ImportError as e:
            raise UserError(
                f"engine.kind=ray needs Ray: pip install 'probprune[ray]' ({e}); or set engine.kind=local"
            ) from None
        return RayEngine(cfg.model, space, cfg.engine, objective=cfg.search.objective, skeleton=model)
    from .local import LocalEngine

    return LocalEngine(
        model,
        space,
        fast_path=cfg.engine.fast_path,
        threads=cfg.engine.threads,
        objective=cfg.search.objective,
        scoring=cfg.engine.scoring,
    )


__all__ = ["Engine", "Task", "build_engine", "load_for_engine"]
