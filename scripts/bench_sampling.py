"""Image tokens per second of `sample_image_codes`, with and without the key/value cache.

Same model, same run, same seed; the two runs must produce the same codes (checked).
Prints a small table and, as its last line, one JSON object.

    PYTHONPATH=$PWD python scripts/bench_sampling.py            # batch 8, 16x16 grid
    PYTHONPATH=$PWD python scripts/bench_sampling.py --profile  # + profile of the cached decode
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dalle.config import TransformerConfig
from dalle.inference.sampling import sample_image_codes
from dalle.models.transformer import DalleTransformer, parameter_count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grid", type=int, default=16, help="image grid side (16: 256 image tokens)")
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--text-vocab", type=int, default=1024, help="BPE ids + one padding id per position")
    parser.add_argument("--image-vocab", type=int, default=512)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--attention", default="paper", help="comma-separated patterns, or paper")
    parser.add_argument("--cond-scale", type=float, default=1.0)
    # One thread by default: on a shared 2-core machine, OpenMP barriers between two threads
    # make the small per-token ops of the cached loop 10-20x slower whenever another
    # process holds a core. Both samplers always run with the same setting.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-uncached", action="store_true", help="only time the cached loop")
    parser.add_argument("--profile", action="store_true", help="print a torch profile of the cached loop")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = TransformerConfig(dim=args.dim, depth=args.depth, heads=args.heads, text_len=args.text_len,
                               text_vocab=args.text_vocab, image_vocab=args.image_vocab, image_grid=args.grid,
                               attention=args.attention.split(","))
    torch.manual_seed(0)
    model = DalleTransformer(config).to(args.device).eval()
    text = torch.randint(0, args.text_vocab - args.text_len, (args.batch, args.text_len))
    n_tokens = args.batch * args.grid ** 2
    common = dict(seed=0, cond_scale=args.cond_scale)

    sample_image_codes(model, text[:1], **common)  # warm-up (allocator, kernels)
    cached, cached_s, cached_cpu_s = timed(lambda: sample_image_codes(model, text, use_cache=True, **common))
    result = {
        "batch": args.batch, "image_tokens": args.grid ** 2, "text_len": args.text_len, "dim": args.dim,
        "depth": args.depth, "heads": args.heads, "attention": model.patterns, "cond_scale": args.cond_scale,
        "parameters": parameter_count(model), "threads": torch.get_num_threads(), "device": args.device,
        "cached_s": round(cached_s, 3), "cached_cpu_s": round(cached_cpu_s, 3),
        "cached_tokens_per_s": round(n_tokens / cached_s, 1),
    }
    if not args.skip_uncached:
        uncached, uncached_s, uncached_cpu_s = timed(
            lambda: sample_image_codes(model, text, use_cache=False, **common))
        result.update(uncached_s=round(uncached_s, 3), uncached_cpu_s=round(uncached_cpu_s, 3),
                      uncached_tokens_per_s=round(n_tokens / uncached_s, 1),
                      speedup=round(uncached_s / cached_s, 1), cpu_speedup=round(uncached_cpu_s / cached_cpu_s, 1),
                      same_codes=bool(torch.equal(cached, uncached)))

    print(f"| sampler | wall s | CPU s | image tokens/s |\n| --- | --- | --- | --- |\n"
          f"| cached | {result['cached_s']} | {result['cached_cpu_s']} | {result['cached_tokens_per_s']} |")
    if "uncached_s" in result:
        print(f"| uncached | {result['uncached_s']} | {result['uncached_cpu_s']} | {result['uncached_tokens_per_s']} |")
        print(f"cached / uncached: {result['speedup']}x wall, {result['cpu_speedup']}x CPU time, "
              f"same codes: {result['same_codes']}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sample_image_codes(model, text, use_cache=True, **common)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(json.dumps(result))
    return result


def timed(run):
    """(result, wall seconds, process CPU seconds) of one call; CPU time is less noisy on a
    shared machine (it does not count time other processes hold the cores)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, time.perf_counter() - wall, time.process_time() - cpu


if __name__ == "__main__":
    main()
