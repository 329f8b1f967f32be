"""Shared fixtures: offline Hugging Face, small real configs, built-in assets."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedelta.config import RunConfig  # noqa: E402


@pytest.fixture
def tiny_config(tmp_path) -> RunConfig:
    """The real MiniLM and Rotten Tomatoes, shrunk to seconds of work per round."""
    return RunConfig.from_flat(
        {
            "num-server-rounds": 1,
            "local-steps": 2,
            "batch-size": 8,
            "fraction-evaluate": 0.5,
            "output-dir": str(tmp_path / "run"),
            "model.max-length": 32,
            "data.test-size": 64,
            "simulation.num-supernodes": 2,
            "simulation.client-cpus": 2.0,
        }
    )
