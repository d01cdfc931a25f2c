"""The start-up rules: precision (bf16 only where a probe finds it faster), threads, and the
allocator set-up of training."""

import platform
import subprocess
import sys

import pytest
import torch

from dalle.cli import main
from dalle.config import TrainConfig
from dalle.errors import DalleError
from dalle.inference import devices
from dalle.inference.devices import choose_threads, matmul_gflops, resolve_dtype
from dalle.models.transformer import DalleTransformer
from dalle.training import loop
from dalle.training.batches import TableBatches
from dalle.training.loop import fit, training_precision

from .test_transformer import tiny_batch, tiny_config


@pytest.fixture
def probe(monkeypatch):
    """Sets what the bf16 probe finds on this 'CPU'."""

    def set_probe(faster: bool):
        monkeypatch.setattr(devices, "cpu_prefers_bf16", lambda: faster)
        monkeypatch.setattr(loop, "cpu_prefers_bf16", lambda: faster)

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    return set_probe


def test_the_matmul_probe_measures_something():
    assert matmul_gflops(torch.float32, size=64, seconds=0.01) > 0
    assert isinstance(devices.cpu_prefers_bf16(), bool)


def test_auto_precision_follows_the_probe_on_the_cpu(probe, monkeypatch):
    cpu = torch.device("cpu")
    probe(False)
    assert resolve_dtype("auto", cpu) == torch.float32 and training_precision("auto") == "no"
    probe(True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16 and training_precision("auto") == "bf16"
    assert resolve_dtype("float32", cpu) == torch.float32  # an explicit choice is never overridden
    assert training_precision("no") == "no" and training_precision(None) is None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate launch --mixed_precision no`
    assert training_precision("auto") is None  # the launch configuration decides
    assert TrainConfig().mixed_precision == "auto"


def test_bf16_trains_a_tiny_transformer_to_the_fp32_loss(tmp_path):
    """Tolerance: the final loss of 30 updates within 2 % (bf16 keeps 8 bits of mantissa; the
    loss, softmax and optimizer stay float32 under autocast)."""
    config = tiny_config(depth=2, dim=32)
    text, image = tiny_batch(config, batch=16)
    data = TableBatches({"text": text, "image": image}, batch_size=8, seed=0)
    losses = {}
    for precision in ("no", "bf16"):
        torch.manual_seed(0)
        model = DalleTransformer(config)
        train = TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=2, log_every=10, mixed_precision=precision)
        result = fit(model, data, lambda m, b, s: m(b["text"], b["image"]), train, tmp_path / precision, "t",
                     lambda m, d: None, progress=False)
        losses[precision] = result.history[-1]["loss"]
    first = 2.0 * torch.log(torch.tensor(float(config.image_vocab))).item()  # well above where both end
    assert losses["no"] < 0.6 * first
    assert abs(losses["bf16"] - losses["no"]) <= 0.02 * losses["no"], losses


def test_the_bar_line_says_precision_and_threads(tmp_path, probe):
    probe(False)
    run = loop._prepare(torch.nn.Linear(2, 1), TrainConfig(steps=1, batch_size=1), tmp_path, "s")
    assert loop._precision_label(run) == f"fp32, {torch.get_num_threads()} thread" + (
        "s" if torch.get_num_threads() > 1 else "")


def test_threads_by_count_by_rule_and_by_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert choose_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("DALLE_THREADS", "2")
        assert choose_threads("auto") == 2
        monkeypatch.delenv("DALLE_THREADS")
        assert 1 <= choose_threads("auto") <= devices.cpu_count()  # the measured rule
        for bad in ("0", "many", "-1"):
            with pytest.raises(DalleError, match="--threads"):
                choose_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_the_threads_flag_goes_before_or_after_the_command(capsys):
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "nope", "data", "--help"]) == 0  # help exits before any model runs
        assert main(["generate", "--threads", "two", "--model", "m", "--prompt", "p", "--out", "o"]) == 2
        assert "--threads must be auto or a positive count" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


FAULTS_AFTER = """
import resource, sys, torch
from dalle.inference.devices import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:  # glibc's default 128 KiB threshold, pinned: left alone, glibc moves it after the first free, by heap
    import ctypes  # layout, and the default's count varied from 16,159 to 122,354 between runs
    assert ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024) == 1  # M_MMAP_THRESHOLD
def step():  # six 8 MiB activations held, then freed together, as a training step's are
    held = [torch.ones(2 << 20) for _ in range(6)]
    del held
for _ in range(3):  # warm-up: the heap settles in the first steps (up to 7 blocks faulted in over steps 1-3)
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_training_keeps_freed_memory_instead_of_faulting_it_in_again():
    """By default glibc returns freed 8 MiB blocks to the kernel, and the next step faults
    them in again, zeroed (2,048 faults each); after keep_freed_memory they are reused."""
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_AFTER, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    assert default > 10 * 6 * 1000, default  # about 2,048 a block
    assert kept < default / 10, (kept, default)
