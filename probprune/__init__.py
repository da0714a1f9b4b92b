"""probprune: forward-only structural pruning of LLaMA-family LLMs with a policy-gradient search.

Library entry points (the CLI is ``probprune``; Ray entry points live in ``ray_jobs/``):

>>> from probprune import load_config, prune, load_pruned
>>> summary = prune(load_config("configs/smollm2/135m_quickstart.yaml"), "runs/quickstart")
>>> model = load_pruned("runs/quickstart/model")
"""

__version__ = "0.1.0"

__all__ = ["load_config", "prune", "load_pruned", "compact", "save_pruned", "get_adapter", "load_model"]


def __getattr__(name):  # lazy: importing probprune stays cheap and needs neither torch nor Ray up front
    if name == "load_config":
        from .config import load_config

        return load_config
    if name == "prune":
        from .pipeline import prune

        return prune
    if name in ("compact", "save_pruned"):
        from . import compaction

        return getattr(compaction, name)
    if name in ("get_adapter", "load_model", "load_pruned"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'probprune' has no attribute {name!r}")
