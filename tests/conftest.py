"""Test-session settings and the shared tiny pipeline.

One torch thread: the tests use tiny tensors, and on a shared 2-core machine OpenMP
barriers between two threads make every small op wait whenever another process holds a
core (measured: tests/test_sampling.py 132 s with 2 threads, 19 s with 1, load ~7).
"""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ["DALLE_THREADS"] = "1"  # what `dalle --threads auto` then picks in the CLI tests

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


# tiny.yaml with a VQGAN as the image tokenizer (taming's architecture at its smallest: group
# norms need 32 channels), an 8x8 grid of 32 codes like the tiny dVAE's.
VQ_TINY = ["image_tokenizer=vqgan", "vqgan.ch=32", "vqgan.ch_mult=[1,1,1]", "vqgan.z_channels=8",
           "vqgan.embed_dim=8", "vqgan.n_embed=32", "vqgan.dead_code_steps=2", "train.vqgan.steps=6",
           "train.vqgan.batch_size=8", "train.vqgan.lr=1.0e-3", "train.vqgan.warmup_steps=2",
           "train.vqgan.log_every=2"]
