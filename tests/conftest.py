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

TINY_KINDS = ["llama", "llama-mha", "qwen2", "mistral"]


@pytest.fixture(params=TINY_KINDS)
def tiny_kind(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2():
    """(model fp32, tokenizer) of the embedded SmolLM2-135M, loaded once per session."""
    from probprune.models.loading import load_model

    return load_model("embedded:smollm2-135m", dtype="float32")
