"""Data-parallel training with Ray Train: one :class:`ray.train.torch.TorchTrainer` worker per GPU (or per CPU slot).

Used by healing: each worker runs :func:`probprune.heal.train_worker` (passed in, so this module does not import the
training code it runs) on its share of every global batch (``heal.batch_size`` blocks
split evenly over ``heal.workers``); ``ray.train.torch.prepare_model`` wraps the student in DistributedDataParallel,
which averages the gradients, so a step equals the one-worker step on the whole batch up to float summation order.
Worker 0 evaluates, writes the checkpoints, ``metrics.jsonl`` and the healed model into the output folder (a shared
file system when the workers span several machines). Backend: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, prepare_model

from ...errors import UserError
from .cluster import connect

log = logging.getLogger(__name__)

RESULT_NAME = ".heal_result.json"


def _worker_loop(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    import torch

    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config["threads"]))
    job = config["job"]
    if job.device.startswith("cuda"):
        job.device = str(ray.train.torch.get_device())
    result = config["worker"](
        job,
        rank,
        size,
        prepare=lambda m: prepare_model(m, move_to_device=False, parallel_strategy="ddp"),
        report=lambda metrics: ray.train.report(metrics),
        stop_after=config["stop_after"],
    )
    if rank == 0 and result is not None:
        from ...files import write_text_atomic

        write_text_atomic(Path(job.output) / RESULT_NAME, json.dumps(result))


def _user_error(err: BaseException) -> str | None:
    """The message of a :class:`UserError` raised inside a worker, if that is what failed the run."""
    text = str(err)
    for line in text.splitlines():
        if "UserError:" in line:
            return line.split("UserError:", 1)[1].strip()
    cause = err.__cause__ or err.__context__
    return _user_error(cause) if cause is not None and cause is not err else None


def data_parallel(
    worker: Callable[..., dict | None], job: Any, cfg: Any, stop_after: int | None = None
) -> dict[str, Any]:
    """Run ``worker(job, rank, size, prepare=, report=, stop_after=)`` on ``job.heal["workers"]`` Ray Train workers
    (e.g. :func:`probprune.heal.train_worker` on a :class:`probprune.heal.HealJob`) and return worker 0's result
    record.

    Resources per worker: ``engine.cpus_per_actor`` CPUs (torch uses that many threads) and, when ``model.device``
    is a GPU, one GPU. Ray is started locally unless connected already or ``engine.address`` names a cluster.

    Raises:
        UserError: a worker failed on bad input (e.g. not enough memory for student + teacher); the message is the
            worker's.
    """
    workers = int(job.heal["workers"])
    use_gpu = job.device.startswith("cuda")
    connect(cfg.engine.address)
    storage = Path(tempfile.mkdtemp(prefix="probprune-heal-ray-"))
    cpus = float(cfg.engine.cpus_per_actor)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"worker": worker, "job": job, "threads": max(1, int(cpus)), "stop_after": stop_after},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name="heal", storage_path=str(storage)),
    )
    result_path = Path(job.output) / RESULT_NAME
    try:
        trainer.fit()
    except Exception as e:
        msg = _user_error(e)
        if msg is not None:
            raise UserError(msg) from None
        raise
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    if not result_path.exists():
        raise RuntimeError(f"Ray Train finished but worker 0 wrote no result ({result_path})")
    result = json.loads(result_path.read_text())
    result_path.unlink()
    return result
