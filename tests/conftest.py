"""Shared test set-up: a fixed thread count and seeds, so tests are repeatable on 2 cores."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY = Path(__file__).parent / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A whole pipeline (tokenizer, dVAE, CLIP, transformer) trained for a few steps."""
    from dalle import stages
    from dalle.config import load_config

    run_dir = tmp_path_factory.mktemp("tiny") / "model"
    config = load_config(TINY, [f"run_dir={run_dir}"])
    stages.train_dvae(config, progress=False)
    stages.train_clip(config, progress=False)
    stages.train_transformer(config, progress=False)
    return run_dir
