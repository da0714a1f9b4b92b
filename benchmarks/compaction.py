"""Compaction check on the real SmolLM2-135M: a 50 % mask (half the KV groups, half the channels, at random),
parameters before/after, max |logit| difference masked vs compacted vs reloaded (fp32), time to compact and save.

    python benchmarks/compaction.py [--seed 0] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from probprune.compaction import compact, count_params, save_pruned
from probprune.mask_space import CHANNEL, HEAD
from probprune.masked_forward import masked_logits
from probprune.models import get_adapter, load_model
from probprune.models.loading import load_pruned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = load_model("embedded:smollm2-135m", dtype="float32")
    adapter = get_adapter(model)
    space = adapter.mask_space()
    rng = np.random.default_rng(args.seed)
    mask = np.zeros(space.num_units, dtype=np.float32)
    for t in (HEAD, CHANNEL):
        sl = space.type_slice(t)
        n = sl.stop - sl.start
        mask[sl.start + rng.choice(n, n // 2, replace=False)] = 1
    text = "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election produced"
    x = tok(text, return_tensors="pt").input_ids
    want = masked_logits(adapter, space, mask, x)
    t0 = time.perf_counter()
    small = compact(model, space, mask)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        save_pruned(small, f"{d}/m", tok)
        t2 = time.perf_counter()
        ours = load_pruned(f"{d}/m")
        stock = AutoModelForCausalLM.from_pretrained(f"{d}/m", trust_remote_code=True)
        with torch.no_grad():
            got = small(input_ids=x).logits
            res = {
                "params_dense": count_params(model),
                "params_pruned": count_params(small),
                "prunable_sparsity": space.sparsity(mask)["prunable"],
                "total_sparsity": space.sparsity(mask)["total"],
                "max_abs_logit_masked_vs_compacted": float((got - want).abs().max()),
                "max_abs_logit_compacted_vs_load_pruned": float((ours(input_ids=x).logits - got).abs().max()),
                "max_abs_logit_compacted_vs_from_pretrained": float((stock(input_ids=x).logits - got).abs().max()),
                "max_abs_logit": float(want.abs().max()),
                "compact_seconds": t1 - t0,
                "save_seconds": t2 - t1,
            }
    for k, v in res.items():
        print(f"{k:45s} {v:,.6g}" if isinstance(v, float) else f"{k:45s} {v:,}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
