"""Multi-process training (torchrun, gloo on CPU) and kill -9 resume, run as real processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "tests" / "tiny.yaml")
COMMON = ["--set", "transformer.caption_dropout=0", "--set", "train.transformer.steps=6",
          "--set", "train.transformer.log_every=1", "--set", "data.n=64", "--set", "train.dvae.steps=4"]


def dalle(*args, launcher=()):
    done = subprocess.run([*launcher, "-m", "dalle.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]  # what failed, not only that it did
    return done


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "logs" / "transformer.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_with_batch_b_match_one_process_with_batch_2b(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    dalle("train-vae", "--config", TINY, "--run-dir", str(one), *COMMON, launcher=(sys.executable,))
    subprocess.run(["cp", "-r", str(one), str(two)], check=True)
    dalle("train", "--config", TINY, "--run-dir", str(one), *COMMON, "--set", "train.transformer.batch_size=8",
          launcher=(sys.executable,))
    # Each of the two processes takes half of the global batch of 8.
    dalle("train", "--config", TINY, "--run-dir", str(two), *COMMON, "--set", "train.transformer.batch_size=8",
          launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"))
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 6
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)


@pytest.mark.slow
def test_kill_9_three_times_then_resume_gives_identical_weights(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "kill_resume.py"), "--kills", "3", "--steps", "10",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and summary["bit_identical"] and summary["kills"] == 3, out.stdout + out.stderr
