"""Test-session settings and the shared tiny pipeline.

One torch thread: the tests use tiny tensors, and on a shared 2-core machine OpenMP
barriers between two threads make every small op wait whenever another process holds a
core (measured: tests/test_sampling.py 132 s with 2 threads, 19 s with 1, load ~7).
"""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

TINY = Path(__file__).parent / "tiny.yaml"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A whole pipeline (tokenizer, dVAE, CLIP, transformer) trained for a few steps."""
    from dalle.config import load_config
    from dalle.training import stages

    run_dir = tmp_path_factory.mktemp("tiny") / "model"
    config = load_config(TINY, [f"run_dir={run_dir}"])
    stages.train_dvae(config, progress=False)
    stages.train_clip(config, progress=False)
    stages.train_transformer(config, progress=False)
    return run_dir
