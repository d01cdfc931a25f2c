"""GPU checks: FlexAttention == SDPA, training MFU of a ~350M model in bf16, decode at batch 64.

    python scripts/bench_gpu.py --out gpu.json            # on a CUDA machine
    python scripts/bench_gpu.py --tiny                    # a CPU dry run of the same code

Prints a Markdown table and, as its last line, one JSON object with every figure.

- Correctness: the same weights give the same logits through FlexAttention block masks
  and through SDPA with a dense boolean mask, for the paper's layer pattern.
- Training MFU: forward + backward + AdamW of a ~350M transformer (dim 1024, 24 layers,
  256 text + 32x32 image tokens) under bf16 autocast; FLOPs counted as 6 * params *
  tokens + the dense causal attention term 6 * layers * T * dim per token (the usual
  convention), against the H200's 989 TFLOP/s dense bf16 peak.
- Decode: image tokens per second at batch 64 with the key/value-cached sampler (bf16
  weights), eager and with the static-shape step under torch.compile (one CUDA graph per
  step, `compile_step=True`), against the HBM bound: each step must read every weight
  once plus the keys and values that the layer masks let each row see.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dalle.config import TransformerConfig
from dalle.inference.sampling import sample_image_codes
from dalle.models.masks import layer_patterns
from dalle.models.transformer import DalleTransformer

PEAK_BF16_FLOPS = 989e12  # H200 (and H100 SXM) dense bf16
HBM_BYTES_PER_S = 4.8e12  # H200


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_config(tiny: bool) -> TransformerConfig:
    if tiny:
        return TransformerConfig(dim=64, depth=4, heads=4, text_len=16, text_vocab=300, image_vocab=128,
                                 image_grid=8, conv_kernel=5)
    return TransformerConfig(dim=1024, depth=24, heads=16, text_len=256, text_vocab=16384 + 256, image_vocab=8192,
                             image_grid=32, conv_kernel=11)


def check_flex_equals_sdpa(device: torch.device) -> dict:
    config = TransformerConfig(dim=128, depth=4, heads=4, text_len=16, text_vocab=300, image_vocab=256,
                               image_grid=16, conv_kernel=5)
    model = DalleTransformer(config).to(device).eval()
    text = torch.randint(0, 300, (2, 16), device=device)
    image = torch.randint(0, 256, (2, 256), device=device)
    with torch.no_grad():
        model.attention_backend = "sdpa"
        dense = model(text, image)["logits_image"].float()
        model.attention_backend = "flex"
        flex = model(text, image)["logits_image"].float()
    return {"flex_vs_sdpa_max_abs_diff": float((dense - flex).abs().max()),
            "patterns": sorted(set(layer_patterns(config.attention, config.depth)))}


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_training(config: TransformerConfig, device: torch.device, batch: int, steps: int,
                   compile_model: bool) -> dict:
    torch.manual_seed(0)
    model = DalleTransformer(config).to(device)
    params = parameter_count(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compile_model else model
    text = torch.randint(0, config.text_vocab, (batch, config.text_len), device=device)
    image = torch.randint(0, config.image_vocab, (batch, config.image_grid**2), device=device)
    dtype = torch.bfloat16

    def step():
        with torch.autocast(device.type, dtype=dtype):
            loss = forward(text, image)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - started) / steps
    tokens = batch * (config.text_len + config.image_grid**2)
    seq = config.text_len + config.image_grid**2
    flops = 6 * params * tokens + 6 * config.depth * seq * config.dim * tokens
    return {"params": params, "batch": batch, "seq": seq, "step_seconds": seconds, "tokens_per_s": tokens / seconds,
            "tflops": flops / seconds / 1e12, "mfu": flops / seconds / PEAK_BF16_FLOPS,
            "mfu_6n_only": 6 * params * tokens / seconds / PEAK_BF16_FLOPS, "compiled": compile_model}


def attended_keys_per_step(model: DalleTransformer) -> float:
    """Mean keys read per image query, summed over layers (from the layer masks)."""
    text_len, image_len = model.text_len, model.image_len
    total = 0.0
    for layer in range(model.config.depth):
        mask = model.masks[model.layer_mask[layer]]  # (T, T)
        rows = mask[text_len : text_len + image_len]
        total += rows.float().sum(1).mean().item()
    return total


def bench_decode(config: TransformerConfig, device: torch.device, batch: int, compile_step: bool = False) -> dict:
    torch.manual_seed(0)
    model = DalleTransformer(config).to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)
    model.eval()
    text = torch.randint(0, config.text_vocab - config.text_len, (1, config.text_len), device=device)
    sample_image_codes(model, text, num_candidates=batch, seed=0, compile_step=compile_step)  # warm-up, compile
    sync(device)
    started = time.perf_counter()
    sample_image_codes(model, text, num_candidates=batch, seed=1, compile_step=compile_step)
    sync(device)
    seconds = time.perf_counter() - started
    steps = config.image_grid**2
    element = 2 if device.type == "cuda" else 4
    weight_bytes = parameter_count(model) * element
    kv_bytes = attended_keys_per_step(model) * 2 * config.dim * element * batch  # keys + values, all layers
    bound_steps_per_s = HBM_BYTES_PER_S / (weight_bytes + kv_bytes)
    achieved_steps_per_s = steps / seconds
    return {"batch": batch, "compile_step": compile_step, "image_tokens": steps, "seconds": seconds,
            "image_tokens_per_s": batch * steps / seconds, "weight_bytes": weight_bytes,
            "kv_bytes_per_step": kv_bytes, "bound_image_tokens_per_s": batch * bound_steps_per_s,
            "fraction_of_bound": achieved_steps_per_s / bound_steps_per_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, any device (a dry run)")
    parser.add_argument("--batch", type=int, default=16, help="training batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = model_config(args.tiny)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__}
    results["correctness"] = check_flex_equals_sdpa(device)
    print(json.dumps(results["correctness"]), flush=True)
    results["training"] = bench_training(config, device, 2 if args.tiny else args.batch,
                                         2 if args.tiny else args.steps, not args.no_compile and not args.tiny)
    print(json.dumps(results["training"]), flush=True)
    if not args.no_compile and not args.tiny:
        results["training_eager"] = bench_training(config, device, args.batch, args.steps, False)
        print(json.dumps(results["training_eager"]), flush=True)
    results["decode_eager"] = bench_decode(config, device, 4 if args.tiny else args.decode_batch)
    print(json.dumps(results["decode_eager"]), flush=True)
    # The static-shape step under torch.compile (CUDA graphs on CUDA); --tiny checks it runs.
    results["decode"] = bench_decode(config, device, 4 if args.tiny else args.decode_batch,
                                     compile_step=not args.no_compile)
    print(json.dumps(results["decode"]), flush=True)
    t, d = results["training"], results["decode"]
    print("| figure | value |\n| --- | --- |")
    print(f"| flex vs sdpa max abs logit diff | {results['correctness']['flex_vs_sdpa_max_abs_diff']:.2e} |")
    print(f"| training params | {t['params'] / 1e6:.0f} M |")
    print(f"| training tokens/s (bf16, batch {t['batch']} x {t['seq']}) | {t['tokens_per_s']:,.0f} |")
    print(f"| training MFU (6N + attention) | {t['mfu']:.1%} |")
    print(f"| decode image tokens/s at batch {d['batch']}, eager | "
          f"{results['decode_eager']['image_tokens_per_s']:,.0f} |")
    print(f"| decode image tokens/s at batch {d['batch']}, compiled step: {d['compile_step']} | "
          f"{d['image_tokens_per_s']:,.0f} |")
    print(f"| decode, share of the HBM bound | {d['fraction_of_bound']:.1%} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
