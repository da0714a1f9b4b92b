"""Optional lm-evaluation-harness tasks on a (pruned) model, through lm-eval's HF wrapper."""

from __future__ import annotations

from typing import Any

from .errors import UserError


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 4) -> dict[str, Any]:
    """Run lm-eval tasks on an in-memory model and return ``{task: metrics}``.

    Raises:
        UserError: lm-eval is not installed, or its task data cannot be fetched (no hub access).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise UserError("--tasks needs lm-eval: pip install 'probprune[lm-eval]'") from None
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    except (OSError, ConnectionError, ValueError) as e:
        raise UserError(
            f"--tasks {','.join(tasks)}: lm-eval could not load its task data ({type(e).__name__}: {e}); task data "
            "comes from the Hugging Face hub, which must be reachable"
        ) from None
    return {t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in res["results"].items()}
