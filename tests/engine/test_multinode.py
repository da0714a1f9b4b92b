"""A simulated multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``): actors spread over two worker
nodes, one node removed in the middle of ``probprune prune``, and the run ends with the mask of an undisturbed run.

The cluster runs in a child process (its own Ray session; the other Ray tests share one local instance).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOSE_AT_STEP = 3


def run_child(*args: str) -> dict:
    """Run this file in a child process (its own Ray session) and return the JSON line it prints last."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.ray
def test_prune_survives_losing_a_node(tmp_path):
    res = run_child(str(tmp_path))
    assert len(res["actor_nodes"]) == 2 and len(set(res["actor_nodes"])) == 2  # engine.placement=spread
    assert res["lost_node"] in res["actor_nodes"]
    assert res["retries"] >= 1 and res["replacements"] >= 1  # the lost actor's share ran again elsewhere
    assert res["same_final_mask"], "the final mask differs from the undisturbed run's"
    assert res["steps"] == res["expected_steps"]
    for key, rel in res["ppl_rel_diff"].items():
        assert rel < 1e-5, key


@pytest.mark.ray
def test_sweep_losing_a_node_keeps_its_finished_trials(tmp_path):
    res = run_child(str(tmp_path), "sweep")
    assert res["finished_before_loss"], "no trial had finished when the node was removed"
    assert len(res["running_at_loss"]) == 2
    for tid, ppl in res["finished_before_loss"].items():  # kept as they were, not run again
        assert res["after_loss"][tid] == ["finished", ppl], tid
    assert [res["after_loss"][t][0] for t in res["running_at_loss"]].count("error") == 1  # the one on the lost node
    assert res["after_resume_statuses"] == ["finished"] * 4  # --resume reruns only what the node loss cut short
    for tid, ppl in res["finished_before_loss"].items():
        assert res["after_resume"][tid] == ppl, tid


def sweep_main(out: Path) -> int:
    """The 4-trial smoke sweep on a cluster of a CPU-less head and two 1-CPU workers (one trial per node); the second
    worker is removed as soon as a trial has finished; then the sweep is resumed. Prints one JSON line."""
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from probprune.config import load_config
    from probprune.engine.ray.tune import run_sweep

    cluster = Cluster(
        initialize_head=True, connect=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 * 1024**2}
    )
    workers = [cluster.add_node(num_cpus=1, object_store_memory=80 * 1024**2) for _ in range(2)]
    cluster.wait_for_nodes()
    storage = out / "tune"
    cfg = load_config(
        ROOT / "configs" / "tiny" / "smoke_sweep.yaml",
        [f"sweep.storage_path={storage}", "search.steps=600", "search.checkpoint_every=50", "sweep.report_every=50"],
    )
    found: dict = {"finished_before_loss": {}}

    def trials() -> tuple[dict[str, float], set[str]]:
        """Finished trials (id -> final ppl) and the ids of trials that reported but have not finished."""
        done, started = {}, set()
        for result in (storage / "out").glob("*/result.json"):
            for line in result.read_text().splitlines():
                row = json.loads(line)
                started.add(row["trial_id"])
                if row.get("final"):
                    done[row["trial_id"]] = row["ppl"]
        return done, started - set(done)

    def lose_a_node_while_a_later_trial_runs():
        # trials 0 and 1 run first, one per worker; once one has finished and both workers run a trial again
        # (two trials reported but unfinished), removing a worker kills a running trial
        while True:
            done, running = trials()
            if done and len(running) == 2:
                break
            threading.Event().wait(0.05)
        found["finished_before_loss"], found["running_at_loss"] = done, sorted(running)
        cluster.remove_node(workers[1])

    watcher = threading.Thread(target=lose_a_node_while_a_later_trial_runs, daemon=True)
    watcher.start()
    df = run_sweep(cfg, out / "out", smoke=True)
    watcher.join(timeout=60)
    found["after_loss"] = {r.trial_id: (r.status, r.ppl if r.status == "finished" else None) for r in df.itertuples()}
    cluster.add_node(num_cpus=1, object_store_memory=80 * 1024**2)  # a replacement node for the resumed sweep
    cluster.wait_for_nodes()
    df = run_sweep(cfg, out / "out", smoke=True, resume=True)
    found["after_resume_statuses"] = sorted(df["status"])
    found["after_resume"] = {r.trial_id: r.ppl for r in df.itertuples()}
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(found))
    return 0


def main(out: Path) -> int:
    """Undisturbed local run, then the same run on a 3-node cluster (a head without CPUs for the driver, two 2-CPU
    workers) whose second worker is removed after step ``LOSE_AT_STEP``; prints one JSON line of findings."""
    import ray
    import torch
    from ray.cluster_utils import Cluster

    from probprune import pipeline
    from probprune.config import apply_overrides, load_config
    from probprune.engine.ray import engine as actors

    torch.set_num_threads(1)
    base = apply_overrides(
        load_config(ROOT / "configs" / "tiny" / "smoke.yaml"),
        ["search.steps=8", "search.masks_per_step=4", "engine.threads=1"],
    )
    local = pipeline.prune(base, out / "local", progress=False)

    cluster = Cluster(
        initialize_head=True, connect=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 * 1024**2}
    )
    workers = [cluster.add_node(num_cpus=2, object_store_memory=80 * 1024**2) for _ in range(2)]
    cluster.wait_for_nodes()
    evaluators = []
    init = actors.RayEngine.__init__

    def remember(self, *args, **kwargs):
        init(self, *args, **kwargs)
        evaluators.append(self)

    actors.RayEngine.__init__ = remember
    found: dict = {}

    def lose_a_node(stats):
        if stats["step"] == LOSE_AT_STEP:
            ev = evaluators[-1]
            found["actor_nodes"] = [info["node"] for info in ev._pool._info]
            victim = workers[1]
            found["lost_node"] = victim.node_id
            cluster.remove_node(victim)

    cfg = apply_overrides(
        base,
        [
            "engine.kind=ray",
            "engine.num_actors=2",
            "engine.cpus_per_actor=1",
            "engine.placement=spread",
            "engine.max_retries=3",
        ],
    )
    disturbed = pipeline.prune(cfg, out / "ray", progress=False, on_step=lose_a_node)
    ev = evaluators[-1]
    final_local = torch.load(out / "local" / "masks.pt")["final_mask"]
    final_ray = torch.load(out / "ray" / "masks.pt")["final_mask"]
    found.update(
        retries=ev.retries,
        replacements=ev.replacements,
        same_final_mask=bool(torch.equal(final_local, final_ray)),
        steps=disturbed["search"]["steps"],
        expected_steps=base.search.steps,
        ppl_rel_diff={
            f"{k}@{n}": abs(disturbed[k][n] / local[k][n] - 1) for k in ("dense_ppl", "pruned_ppl") for n in local[k]
        },
    )
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(sweep_main(Path(sys.argv[1])) if sys.argv[2:] == ["sweep"] else main(Path(sys.argv[1])))
