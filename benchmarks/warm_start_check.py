"""Would a warm start that also scores its best candidates re-fit (``reconstruct.candidates``) have chosen the same
start as a finished run made without it? Recomputes the missing ``NAME+rec`` entries on that run's own check set.

    python benchmarks/warm_start_check.py RUN [RUN ...] --out FILE.json

Where the start is the same, the run's search, final choice and result are those of the newer warm start (everything
after the start is deterministic and the start's re-fit is the one the final choice made), so a run made before the
option existed stands for the default. Each line checks itself: a candidate's recomputed own loss must equal the one
the run recorded.
"""

import argparse
import json

import numpy as np
import torch

from probprune.baselines import baseline_mask
from probprune.config import load_config
from probprune.reconstruct import reconstructed_loss
from probprune.session import prepare
from probprune.steps import reconstruct
from probprune.warmstart import REFIT, check_losses

torch.set_num_threads(1)  # as the quality benchmark's jobs ran
ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("runs", nargs="+")
ap.add_argument("--out", required=True)
args = ap.parse_args()
out = {}
for run in args.runs:
    cfg = load_config(f"{run}/config.yaml")  # a run made before the option: it takes the default
    with open(f"{run}/summary.json") as f:
        summ = json.load(f)
    s = prepare(cfg, progress=False)
    _, check = s.calib.hold_out(cfg.search.check_blocks)
    bs = cfg.search.batch_size
    table = dict(summ["warm_start"]["check_losses"])
    chosen = summ["warm_start"]["chosen"]
    masks = torch.load(f"{run}/masks.pt", weights_only=False)
    new = dict(table)
    for name in sorted(table, key=table.get)[: cfg.reconstruct.candidates]:
        if name == chosen:
            m = masks["init_mask"].numpy()
        else:
            m = baseline_mask(
                name, s.adapter, s.space, s.init_blocks(), cfg.search.sparsity, budget=cfg.search.budget, stats=s.stats
            )
        (bare,) = check_losses(s.engine, np.asarray(m)[None], check, bs)
        assert abs(bare - table[name]) < 1e-9, (run, name, bare, table[name])  # the run's own check set
        rec = reconstruct(s, m)
        new[name + REFIT] = float(reconstructed_loss(s.engine, s.space, m, rec, check, bs))
        print(run, name, "bare", bare, "recorded", table[name], "+rec", new[name + REFIT], flush=True)
    best = min(new, key=new.get).removesuffix(REFIT)
    out[run] = {
        "chosen_then": chosen,
        "chosen_with_candidates": best,
        "check_losses": new,
        "start_loss_reconstructed_recorded": summ["check"]["start_loss_reconstructed"],
    }
    print(run, "->", best, "same start" if best == chosen else "DIFFERENT START", flush=True)
with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
