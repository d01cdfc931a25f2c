"""Kills a small CPU training run with SIGKILL at random steps, resumes it each time, and checks
that the final weights are bit-identical to a run that was never interrupted.

    python scripts/kill_resume.py --kills 20          # the bar: 20 of 20 must pass
    python scripts/kill_resume.py --kills 3 --steps 12   # the fast version the tests run

Each kill lands while the run is training (after a random number of new checkpoints), so
it can hit a step, a checkpoint write, or anything between; `--resume auto` must continue
from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
STEP_PREFIX = "step-"


def command(run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "dalle.cli", "train-vae", "--config", str(ROOT / "tests" / "tiny.yaml"),
            "--run-dir", str(run_dir), "--set", f"train.dvae.steps={steps}", "--set", "train.dvae.checkpoint_every=1",
            "--set", "train.dvae.keep_checkpoints=3", "--set", "train.dvae.log_every=1", "--resume", "auto"]


def newest_step(run_dir: Path) -> int:
    state = run_dir / "train-state" / "dvae"
    steps = [int(p.name[len(STEP_PREFIX):]) for p in state.glob(f"{STEP_PREFIX}*") if (p / "state.json").is_file()]
    return max(steps, default=0)


def run_to_end(run_dir: Path, steps: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(run_dir, steps), check=True, capture_output=True, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kill-resume-"))
    straight, killed = work / "straight", work / "killed"
    shutil.rmtree(straight, ignore_errors=True)
    shutil.rmtree(killed, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    run_to_end(straight, args.steps)
    reference = load_file(str(straight / "dvae" / "model.safetensors"))

    if args.steps <= args.kills + 1:
        parser.error("--steps must exceed --kills + 1")
    targets = sorted(rng.sample(range(1, args.steps), args.kills))  # kill once these checkpoints exist
    results = []
    for kill, target in enumerate(targets):
        before = newest_step(killed)
        if before >= args.steps - 1:
            break
        target = max(target, before + 1)
        process = subprocess.Popen(command(killed, args.steps), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 300
        while newest_step(killed) < target and process.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.random() * 0.05)  # land anywhere in the next step or checkpoint write
        process.send_signal(signal.SIGKILL)
        process.wait()
        results.append({"kill": kill + 1, "resumed_from": before, "killed_after": newest_step(killed)})
        print(json.dumps(results[-1]), flush=True)

    run_to_end(killed, args.steps)
    final = load_file(str(killed / "dvae" / "model.safetensors"))
    identical = final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in reference)
    print(json.dumps({"kills": len(results), "steps": args.steps, "bit_identical": identical, "workdir": str(work)}))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if identical and len(results) == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
