"""On a GPU: masked forward = fast path = compacted model for a tiny model of each family (fp32), then where the time
of a 1B-size mask-forward goes (bf16, fast path, 2 masks of 8 x 128 tokens; torch profiler tables).

    python benchmarks/gpu_check.py          # part of benchmarks/gpu.sh; needs CUDA

The fast path's hidden states are compared before the language-model head, so Gemma 3's final-logit soft-capping
shows up as a difference in the fast-path column only (the compacted model applies it, as the masked forward does).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))

from _common import exact_mask
from scaling import build

from probprune.compaction import compact
from probprune.engine.local import LocalEngine
from probprune.fastpath import fast_forward_hidden
from probprune.masked_forward import masked_logits
from probprune.models.loading import load_model
from probprune.models.registry import get_adapter


@torch.no_grad()
def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device", file=sys.stderr)
        return 2
    dev = "cuda"
    for kind in ("llama", "qwen3", "gemma3", "phi3"):
        model, _ = load_model(f"tiny:{kind}", dtype="float32")
        model = model.to(dev).eval()
        adapter = get_adapter(model)
        space = adapter.mask_space()
        mask = (np.random.default_rng(0).random(space.num_units) < 0.6).astype(np.float32)
        x = torch.randint(0, model.config.vocab_size, (2, 16), device=dev)
        want = masked_logits(adapter, space, mask, x).float()
        fast = model.lm_head(fast_forward_hidden(adapter, space, mask, x)).float()
        got = compact(model, space, mask).eval()(input_ids=x).logits.float()
        print(
            f"{kind}: max|masked-compacted| {(want - got).abs().max():.2e}  max|masked-fast(pre-cap)| "
            f"{(want - fast).abs().max():.2e}  scale {want.abs().max():.1f}",
            flush=True,
        )

    model, space = build("1B", dev)
    rng = np.random.default_rng(0)
    masks = np.stack([exact_mask(space, 0.5, rng) for _ in range(2)])
    batch = torch.randint(0, 49152, (8, 128), device=dev)
    ev = LocalEngine(model, space, fast_path=True, threads=1)
    for _ in range(3):
        ev.losses(masks, batch)
    torch.cuda.synchronize()
    t = time.perf_counter()
    ev.losses(masks, batch)
    torch.cuda.synchronize()
    t_mask = (time.perf_counter() - t) / len(masks)
    model(batch)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model(batch)
    torch.cuda.synchronize()
    t_dense = time.perf_counter() - t
    print(
        f"1B: mask-forward {t_mask * 1e3:.1f} ms, dense {t_dense * 1e3:.1f} ms, dense ÷ mask {t_dense / t_mask:.2f}",
        flush=True,
    )
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ev.losses(masks, batch)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
