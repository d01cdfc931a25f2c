"""What each training stage reached, measured on the test split after it trained.

- `evaluate_dvae`: the run's image tokenizer (dVAE or VQGAN): reconstruction PSNR, codebook
  use and (on shapes) how often the picture reader reads a reconstruction as its original;
  a PNG of the worst.
- `evaluate_clip_shapes`: zero-shot accuracy on the 24 colour-shape labels, search
  precision, and false-twin accuracies (order, binding, attribute, shape).

The CLI (`dalle train-vae`, `train-clip`) and the demo call these after training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dalle.config import Config
from dalle.data import shapes
from dalle.data.table import load_table
from dalle.images import to_float, to_uint8, uint8_to_pil
from dalle.inference.scoring import CLIPScorer, classify, embed_images, search
from dalle.models.clip import load_clip
from dalle.models.dvae import codebook_stats, psnr
from dalle.models.image_tokenizer import load_image_tokenizer
from dalle.tokenizer import TOKENIZER_FILE, load_tokenizer
from dalle.viz import labelled_grid, save_png


def evaluate_dvae(config: Config, n: int = 500, progress: bool = True) -> dict[str, float]:
    """PSNR, codebook use and (for shapes) reader agreement of the run's image tokenizer (run_dir/dvae
    or run_dir/vqgan) on the test split; writes reports/KIND-reconstructions.png and KIND-metrics.json."""
    run_dir, kind = Path(config.run_dir), config.image_tokenizer
    model = load_image_tokenizer(run_dir / kind)
    images, captions = load_table(config.data, n=n, split="test", progress=progress)
    originals = to_float(images)
    codes, recons = [], []
    with torch.inference_mode():
        for start in range(0, len(originals), 100):
            batch_codes = model.encode(originals[start : start + 100])
            codes.append(batch_codes)
            recons.append(model.decode(batch_codes))
    codes, recons = torch.cat(codes), torch.cat(recons)
    summary = {"psnr": psnr(originals, recons), **codebook_stats(codes, model.codebook_size),
               "codebook_size": model.codebook_size, "grid": model.grid}
    recon_uint8 = to_uint8(recons)
    failures: list[int] = []
    if config.data.source == "shapes":
        same = [shapes.reads_same(original.permute(1, 2, 0).numpy(), recon.permute(1, 2, 0).numpy(), caption)
                for original, recon, caption in zip(images, recon_uint8, captions)]
        summary["reader_agreement"] = sum(same) / len(images)
        failures = [i for i, ok in enumerate(same) if not ok]
    pil = uint8_to_pil
    show = list(range(min(16, len(images))))
    rows = [[pil(images[i]) for i in show], [pil(recon_uint8[i]) for i in show]]
    titles = ["originals", "reconstructions"]
    if failures:  # the pictures the reader reads differently, where to look first
        worst = failures[:16]
        rows += [[pil(images[i]) for i in worst], [pil(recon_uint8[i]) for i in worst]]
        titles += ["misread: originals", "misread: reconstructions"]
    save_png(labelled_grid(rows, row_titles=titles, cell=64), run_dir / "reports" / f"{kind}-reconstructions.png")
    (run_dir / "reports" / f"{kind}-metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate_clip_shapes(config: Config, n: int = 500) -> dict[str, float]:
    """Zero-shot accuracy with the 24 colour-shape labels on one-object test pictures."""
    run_dir = Path(config.run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE, config.tokenizer.text_len)
    scorer = CLIPScorer(load_clip(run_dir / "clip"), tokenizer)
    labels = shapes.all_captions_single()
    images, truths, held = [], [], []
    index = 0
    while len(images) < n:
        image, caption = shapes.render("test", config.data.seed + 1, index, config.data.size)
        index += 1
        scene = shapes.parse_caption(caption)
        if scene.relation is None:
            images.append(image)
            truths.append(labels.index(shapes.caption_of(shapes.Scene(objects=scene.objects))))
            held.append(scene.objects[0] in shapes.HELD_OUT)
    probs = classify(scorer, images, labels)
    right = (probs.argmax(1) == torch.tensor(truths)).numpy()
    held = np.array(held)
    # Search: each label as a query over the same pictures; the share of the top 5 that show it.
    embeddings = embed_images(scorer, images)
    truth = torch.tensor(truths)
    hits = [(truth[search(scorer, label, embeddings, 5)[0]] == index).float().mean().item()
            for index, label in enumerate(labels)]
    metrics = {"classify_accuracy": float(right.mean()),
               "classify_accuracy_held_out": float(right[held].mean()) if held.any() else float("nan"),
               "search_top5_precision": float(np.mean(hits)), "search_top5_precision_worst_label": float(min(hits))}
    metrics.update(evaluate_clip_twins(scorer, config, n // 2))
    return metrics


def evaluate_clip_twins(scorer, config: Config, n: int) -> dict[str, float]:
    """How often CLIP scores a test picture's caption above its false twin (`shapes.false_twin`).

    `twin_accuracy_order`: two-object pictures, against the objects swapped or the
    relation reversed; `twin_accuracy_binding`: against their colours or shapes swapped;
    `twin_accuracy_attribute`: one-object pictures, against another position or size;
    `twin_accuracy_shape`: any picture, against one object drawn as another shape.
    0.5 is a bag of words (for "shape": a CLIP blind to shape).
    """
    rng = np.random.default_rng(config.data.seed)
    found: dict[str, list[tuple]] = {"order": [], "binding": [], "attribute": [], "shape": []}
    index = 0
    while min(len(v) for v in found.values()) < n and index < 50 * n:
        image, caption = shapes.render("test", config.data.seed + 2, index, config.data.size)
        index += 1
        for kind, items in found.items():
            twin = shapes.false_twin(caption, rng, kind)
            if twin is not None and len(items) < n:
                items.append((image, caption, twin))
    metrics = {}
    for kind, items in found.items():
        images = embed_images(scorer, [item[0] for item in items])  # (n, E)
        true = (images * scorer.embed_texts([item[1] for item in items])).sum(-1)  # (n,)
        false = (images * scorer.embed_texts([item[2] for item in items])).sum(-1)  # (n,)
        metrics[f"twin_accuracy_{kind}"] = float((true > false).float().mean())
    return metrics
