"""Shared fixtures: tiny random models for unit tests, the real embedded model for the few `slow` tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_KINDS = ["llama", "llama-mha", "qwen2", "mistral", "qwen3", "gemma3", "gemma3-mqa", "phi3"]


@pytest.fixture(params=TINY_KINDS)
def tiny_kind(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2():
    """(model fp32, tokenizer) of the embedded SmolLM2-135M, loaded once per session."""
    from probprune.models.loading import load_model

    return load_model("embedded:smollm2-135m", dtype="float32")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole test session (ray.init takes 3-4 s): 2 CPUs, no dashboard.

    Tests that use it are marked ``@pytest.mark.ray``; their actors ask for fractions of a CPU so that several
    evaluators fit at once. Shut down at the end of the session.
    """
    import ray  # the test extra installs Ray: a missing Ray is a broken set-up, not a skip

    if ray.is_initialized():  # someone else started it: use it, leave it running
        yield ray
        return
    env = {
        k: os.environ[k]
        for k in ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "PROBPRUNE_CACHE")
        if k in os.environ
    }
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024**2,
        runtime_env={"env_vars": env},
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """torch on one thread for the test (exact float comparisons stay independent of the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hetero_tiny():
    """(dense, pruned): a tiny 4-layer LLaMA and its compacted copy with thinned, attention-free (layer 1), MLP-free
    (layer 2) and untouched layers."""
    import numpy as np

    from probprune.compaction import compact
    from probprune.mask_space import CHANNEL, HEAD
    from probprune.models import get_adapter, tiny_model

    model = tiny_model("llama", num_hidden_layers=4)
    space = get_adapter(model).mask_space(channel_block=8)
    mask = space.full_mask()
    units = lambda t, li: np.flatnonzero((space.unit_type == t) & (space.unit_layer == li))
    mask[units(HEAD, 0)[:1]] = 0
    mask[units(CHANNEL, 0)[:5]] = 0
    mask[units(HEAD, 1)] = 0  # layer 1: no attention
    mask[units(CHANNEL, 2)] = 0  # layer 2: no MLP
    return model, compact(model, space, mask)
