"""The `dalle` command. Each subcommand is one typed function; `main(argv)` parses and calls it.

The functions hold no logic beyond arguments and messages: they call into the modules.
Any `DalleError` (bad input a user can fix) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dalle.errors import DalleError


def data_export(data: str, split: str, n: int, size: int, seed: int, out: str) -> Path:
    """Writes N pairs of a source as DIR/00000.png + DIR/00000.txt (readable by folder:DIR)."""
    from dalle.config import DataConfig
    from dalle.data import export_folder, open_source, take

    config = DataConfig(source=data, split=split, size=size, seed=seed)
    source = open_source(data, config, n=n)
    count = export_folder(take(source, n), out)
    print(f"wrote {count} pairs to {out}")
    if source.skipped:
        print(source.summary())
    return Path(out)


def data_show(data: str, split: str, n: int, size: int, seed: int, out: str, columns: int = 8) -> Path:
    """Writes a PNG grid of N pairs of a source with each caption under its image."""
    from dalle.config import DataConfig
    from dalle.data import open_source, take
    from dalle.viz import caption_grid, save_png

    config = DataConfig(source=data, split=split, size=size, seed=seed)
    pairs = take(open_source(data, config, n=n), n)
    path = save_png(caption_grid(pairs, columns=columns), out)
    print(path)
    return path


def train_tokenizer(data: str, out: str, vocab_size: int = 512, n: int = 20000, size: int = 32,
                    seed: int = 0, paraphrase_prob: float = 0.2) -> Path:
    """Trains a byte-level BPE on the captions of a data source and saves it as JSON."""
    from dalle.config import DataConfig
    from dalle.data import open_source, take
    from dalle.tokenizer import train_bpe

    config = DataConfig(source=data, size=size, seed=seed, paraphrase_prob=paraphrase_prob)
    captions = [caption for _, caption in take(open_source(data, config, n=n), n)]
    if not captions:
        raise DalleError(f"no captions found in {data}")
    tokenizer = train_bpe(captions, vocab_size)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    print(f"trained a {tokenizer.get_vocab_size()}-token BPE on {len(captions)} captions: {out}")
    return Path(out)


def _config(config: str | None, overrides: list[str] | None, run_dir: str | None = None,
            max_bad_fraction: float | None = None):
    from dalle.config import load_config

    overrides = list(overrides or [])
    if run_dir:
        overrides.append(f"run_dir={run_dir}")
    if max_bad_fraction is not None:
        overrides.append(f"data.max_bad_fraction={max_bad_fraction}")
    return load_config(config, overrides)


def _resume(value: str) -> str | None:
    return None if value == "none" else value


def train_vae(config: str, overrides: list[str] | None = None, resume: str = "auto", run_dir: str | None = None,
              max_bad_fraction: float | None = None):
    """Trains the dVAE (stage 1) and prints its reconstruction summary."""
    from dalle.stages import train_dvae

    summary = train_dvae(_config(config, overrides, run_dir, max_bad_fraction), resume=_resume(resume))
    print(json.dumps(summary))
    return summary


def train_clip(config: str, overrides: list[str] | None = None, resume: str = "auto", run_dir: str | None = None,
              max_bad_fraction: float | None = None):
    """Trains the CLIP used for reranking, classification and search."""
    from dalle.stages import train_clip as train

    summary = train(_config(config, overrides, run_dir, max_bad_fraction), resume=_resume(resume))
    print(json.dumps(summary))
    return summary


def train_transformer(config: str, overrides: list[str] | None = None, resume: str = "auto",
                      run_dir: str | None = None, max_bad_fraction: float | None = None):
    """Trains the transformer on captions and the frozen dVAE's codes."""
    from dalle.stages import train_transformer as train

    summary = train(_config(config, overrides, run_dir, max_bad_fraction), resume=_resume(resume))
    print(json.dumps(summary))
    return summary


def reconstruct(model: str, images: list[str], out: str) -> Path:
    """Encodes and decodes pictures with a dVAE; writes originals above reconstructions."""
    from dalle.dvae import decode, encode, load_dvae
    from dalle.rerank import tensor_to_pil
    from dalle.viz import labelled_grid, save_png

    dvae_dir = Path(model) / "dvae" if (Path(model) / "dvae").is_dir() else Path(model)
    dvae = load_dvae(dvae_dir)
    pictures, skipped = read_images(images, dvae.config.image_size)
    if not pictures:
        raise DalleError(f"no readable images among {len(images)}")
    originals = torch.stack([t for _, t in pictures])
    recons = decode(dvae, encode(dvae, originals))
    grid = labelled_grid([[tensor_to_pil(t) for t in originals], [tensor_to_pil(t) for t in recons]],
                         row_titles=["originals", "reconstructions"])
    path = save_png(grid, out)
    print(path)
    return path


def convert_openai_dvae(encoder: str, decoder: str, out: str, trust_pickle: bool = False) -> Path:
    """Converts OpenAI's released dVAE (encoder.pkl, decoder.pkl) into a model directory."""
    from dalle.convert import convert_openai_dvae as convert

    path = convert(encoder, decoder, out, trust_pickle=trust_pickle)
    print(path)
    return Path(path)


def read_images(paths: list[str], size: int | None = None) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """Reads pictures as (path, (3, S, S) float) pairs; unreadable ones are listed, not raised."""
    from dalle.data import decode_image
    from dalle.rerank import pil_to_tensor

    good, bad = [], []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError:
            bad.append(path)
            continue
        image = decode_image(data)
        if image is None:
            bad.append(path)
        else:
            good.append((path, pil_to_tensor(image, size)))
    for path in bad:
        print(f"dalle: skipped {path}: missing or not a readable image", file=sys.stderr)
    return good, bad


def generate(model: str, prompts: list[str], out: str, candidates: int = 8, keep: int = 1, seed: int = 0,
             rerank: str = "clip", clip: str | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, cond_scale: float | None = None, prime_image: str | None = None,
             prime_rows: int = 0, batch_size: int | None = None) -> Path:
    """Samples N pictures per prompt, ranks them with CLIP, keeps the best K as PNG + samples.jsonl."""
    from dalle.pipeline import load_pipeline
    from dalle.viz import labelled_grid, save_png

    if not prompts:
        raise DalleError("no prompts: give --prompt TEXT or a --prompts-file with one prompt a line")
    pipeline = load_pipeline(model, clip=clip if rerank == "clip" else None)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, labels = [], []
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as handle:
        for index, prompt in enumerate(tqdm(prompts, desc="prompts", disable=len(prompts) < 2)):
            (kept,) = pipeline([prompt], candidates=candidates, keep=keep, seed=seed + index,
                               temperature=temperature, top_k=top_k, top_p=top_p, cond_scale=cond_scale,
                               prime_image=prime_image, prime_rows=prime_rows,
                               rerank_with_clip=rerank == "clip", batch_size=batch_size)
            for sample in kept:
                name = f"{index:04d}-{sample.rank:03d}.png"
                sample.image.save(out_dir / name)
                handle.write(json.dumps({"prompt": prompt, "image": name, "rank": sample.rank,
                                         "clip_score": sample.clip_score, "seed": seed + index}) + "\n")
            rows.append([s.image for s in kept])
            labels.append([f"#{s.rank}" + (f" {s.clip_score:.1f}" if s.clip_score is not None else "") for s in kept])
    grid = labelled_grid(rows[:64], labels[:64], row_titles=[p or "(no caption)" for p in prompts[:64]],
                         label_lines=1)
    save_png(grid, out_dir / "grid.png")
    print(out_dir / "samples.jsonl")
    return out_dir


def classify(model: str, labels: list[str], images: list[str], clip: str | None = None) -> list[dict]:
    """Zero-shot classification: one JSON line per picture with the best label and all probabilities."""
    from dalle.pipeline import load_scorer_for
    from dalle.rerank import classify as classify_images
    from dalle.rerank import tensor_to_pil

    labels = [label for label in labels if label.strip()]
    if not labels:
        raise DalleError("classify needs at least one non-empty label (--labels TEXT ... IMAGE ...)")
    if not images:
        raise DalleError("classify needs at least one image after the labels")
    scorer = load_scorer_for(model, clip)
    pictures, bad = read_images(images)
    lines = []
    for start in range(0, len(pictures), 256):
        chunk = pictures[start : start + 256]
        probs = classify_images(scorer, [tensor_to_pil(t) for _, t in chunk], labels)
        for (path, _), row in zip(chunk, probs.tolist()):
            best = max(range(len(labels)), key=row.__getitem__)
            line = {"image": path, "label": labels[best], "probs": dict(zip(labels, row))}
            print(json.dumps(line))
            lines.append(line)
    if bad:
        print(f"dalle: classified {len(pictures)} images, skipped {len(bad)}", file=sys.stderr)
    return lines


def search(model: str, images: str, query: str, k: int = 5, clip: str | None = None,
           strip: str | None = None) -> list[dict]:
    """Text-to-image search over a folder; the embedding index is kept beside the images."""
    from dalle.pipeline import load_scorer_for
    from dalle.rerank import search as search_index
    from dalle.search_index import build_or_load_index
    from dalle.viz import labelled_grid, save_png

    if not query.strip():
        raise DalleError("the search query is empty")
    if k < 1:
        raise DalleError(f"--k must be >= 1, got {k}")
    scorer = load_scorer_for(model, clip)
    paths, embeddings = build_or_load_index(scorer, images, model_id=str(clip or Path(model).resolve()))
    if not paths:
        raise DalleError(f"no readable images in {images}")
    indices, scores = search_index(scorer, query, embeddings, k)
    hits = [{"image": paths[i], "score": float(s)} for i, s in zip(indices.tolist(), scores.tolist())]
    for hit in hits:
        print(json.dumps(hit))
    from PIL import Image

    strip_path = Path(strip) if strip else Path(images) / ".dalle-index" / "last-search.png"
    pictures = [Image.open(hit["image"]).convert("RGB") for hit in hits]
    save_png(labelled_grid([pictures], [[f"{i + 1}: {h['score']:.1f}" for i, h in enumerate(hits)]],
                           row_titles=[query], label_lines=1), strip_path)
    print(f"dalle: strip of the hits: {strip_path}", file=sys.stderr)
    return hits


def evaluate(model: str, out: str, candidates: int = 16, prompts_per_set: int = 50, seed: int = 0,
             data: str = "shapes", clip: str | None = None, **sampling) -> dict:
    """Measures a shapes (or digits) pipeline with the project's picture reader; writes metrics and a report.

    `sampling` (temperature, top_k, top_p, cond_scale) overrides the model's sampling.json."""
    from dalle.evaluate import evaluate_pipeline

    if data not in ("shapes", "digits"):
        raise DalleError(f"eval knows the shapes and digits data, not {data!r}")
    metrics = evaluate_pipeline(model, out, candidates=candidates, prompts_per_set=prompts_per_set, seed=seed,
                                data=data, clip=clip, **sampling)
    print(json.dumps(metrics))
    return metrics


def demo(out: str = "runs/demo", config: str = "configs/demo.yaml", fresh: bool = False,
         overrides: list[str] | None = None, candidates: int = 8, eval_prompts: int = 10) -> Path:
    """Trains every stage on the shapes data, samples and reranks, writes grid.png and report.html."""
    from dalle.demo import run_demo

    grid = run_demo(out, config, fresh=fresh, overrides=overrides, candidates=candidates, eval_prompts=eval_prompts)
    print(grid)
    return grid


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--temperature, --top-k, --top-p, --cond-scale; left out, the model's sampling.json decides."""
    parser.add_argument("--temperature", type=float, help="default: the model's sampling.json (else 1)")
    parser.add_argument("--top-k", type=int, help="keep the k likeliest codes (0: off; default: sampling.json)")
    parser.add_argument("--top-p", type=float, help="nucleus mass (1: off; default: sampling.json)")
    parser.add_argument("--cond-scale", type=float,
                        help="classifier-free guidance scale (1: off; default: the model's sampling.json)")


def sampling_options(args: argparse.Namespace) -> dict:
    """The sampling flags that were given (the model's defaults fill the rest)."""
    options = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
               "cond_scale": args.cond_scale}
    return {key: value for key, value in options.items() if value is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle", description="DALL-E 1: dVAE, transformer, CLIP reranking.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="export or look at a data source")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for name, helptext in (("export", "write pairs as a folder of PNG + TXT"), ("show", "write a PNG grid")):
        sub = data_commands.add_parser(name, help=helptext)
        sub.add_argument("--data", default="shapes", help="shapes | digits | folder:DIR | hf:NAME | wds:PATTERN")
        sub.add_argument("--split", default="train", choices=["train", "test"])
        sub.add_argument("--n", type=int, default=16)
        sub.add_argument("--size", type=int, default=32)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--out", required=True)
        if name == "show":
            sub.add_argument("--columns", type=int, default=8)

    tok = commands.add_parser("train-tokenizer", help="train the caption BPE on a data source")
    tok.add_argument("--data", default="shapes")
    tok.add_argument("--out", required=True)
    tok.add_argument("--vocab-size", type=int, default=512)
    tok.add_argument("--n", type=int, default=20000, help="how many captions to read")
    tok.add_argument("--paraphrase-prob", type=float, default=0.2)

    for name, helptext in (("train-vae", "train the dVAE"), ("train-clip", "train the CLIP"),
                           ("train", "train the transformer (needs the run's dVAE)")):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("--config", required=True, help="a YAML file in configs/")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. --set train.dvae.lr=3e-4 (repeatable)")
        sub.add_argument("--run-dir", help="where the run writes (default: the config's run_dir)")
        sub.add_argument("--resume", default="auto", help="auto (newest checkpoint), none, or a checkpoint path")
        sub.add_argument("--max-bad-fraction", type=float,
                         help="stop with a message when more of the data files than this are broken")

    rec = commands.add_parser("reconstruct", help="encode + decode pictures with a dVAE")
    rec.add_argument("--model", required=True, help="a dVAE or pipeline directory")
    rec.add_argument("--out", required=True)
    rec.add_argument("images", nargs="+")

    convert = commands.add_parser("convert", help="import released weights")
    convert_commands = convert.add_subparsers(dest="convert_command", required=True, metavar="WHAT")
    openai = convert_commands.add_parser("openai-dvae", help="OpenAI's encoder.pkl + decoder.pkl")
    openai.add_argument("--encoder", required=True)
    openai.add_argument("--decoder", required=True)
    openai.add_argument("--out", required=True)
    openai.add_argument("--trust-pickle", action="store_true",
                        help="allow loading pickled modules (this runs code from the files)")

    gen = commands.add_parser("generate", help="sample pictures for prompts, ranked by CLIP")
    gen.add_argument("--model", required=True, help="a pipeline directory")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", nargs="+", help="one or more prompts")
    source.add_argument("--prompts-file", help="UTF-8, one prompt a line, blank lines ignored")
    gen.add_argument("--candidates", type=int, default=8)
    gen.add_argument("--keep", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", required=True)
    gen.add_argument("--rerank", choices=["clip", "none"], default="clip")
    gen.add_argument("--clip", help="rerank with another CLIP: hf:NAME_OR_DIR or a CLIP directory")
    add_sampling_flags(gen)
    gen.add_argument("--prime-image", help="complete this picture from its top rows")
    gen.add_argument("--prime-rows", type=int, default=0)
    gen.add_argument("--batch-size", type=int)

    cls = commands.add_parser("classify", help="zero-shot classification with CLIP")
    cls.add_argument("--model", required=True, help="a pipeline or CLIP directory")
    cls.add_argument("--labels", nargs="+", required=True, metavar="TEXT ... IMAGE",
                     help="the labels, then the image paths")
    cls.add_argument("--clip", help="hf:NAME_OR_DIR to use a Hugging Face CLIP")

    srch = commands.add_parser("search", help="text-to-image search over a folder")
    srch.add_argument("--model", required=True, help="a pipeline or CLIP directory")
    srch.add_argument("--images", required=True, help="a folder of pictures")
    srch.add_argument("--query", required=True)
    srch.add_argument("--k", type=int, default=5)
    srch.add_argument("--clip", help="hf:NAME_OR_DIR to use a Hugging Face CLIP")
    srch.add_argument("--strip", help="where to write the PNG strip of the hits")

    ev = commands.add_parser("eval", help="measure a pipeline with the picture reader")
    ev.add_argument("--model", required=True)
    ev.add_argument("--out", required=True)
    ev.add_argument("--candidates", type=int, default=16)
    ev.add_argument("--prompts", type=int, default=50, help="prompts per set")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--data", default="shapes", choices=["shapes", "digits"], help="what the model was trained on")
    ev.add_argument("--clip", help="rerank with another CLIP: hf:NAME_OR_DIR or a CLIP model directory")
    add_sampling_flags(ev)

    dm = commands.add_parser("demo", help="train every stage on shapes, then sample, rerank and report")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--config", default="configs/demo.yaml")
    dm.add_argument("--fresh", action="store_true", help="retrain stages that are already trained")
    dm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    dm.add_argument("--candidates", type=int, default=8, help="pictures sampled per prompt")
    dm.add_argument("--eval-prompts", type=int, default=10, help="prompts per evaluation set")
    return parser


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


def split_labels_and_images(items: list[str]) -> tuple[list[str], list[str]]:
    """`--labels TEXT ... IMAGE ...`: the trailing items that name image files are the images."""
    split = len(items)
    while split > 0 and (items[split - 1].lower().endswith(IMAGE_SUFFIXES) or Path(items[split - 1]).is_file()):
        split -= 1
    return items[:split], items[split:]


def read_prompts_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DalleError(f"prompts file not found: {path}") from None
    except UnicodeDecodeError:
        raise DalleError(f"prompts file is not UTF-8: {path}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def run(args: argparse.Namespace) -> object:
    if args.command == "data" and args.data_command == "export":
        return data_export(args.data, args.split, args.n, args.size, args.seed, args.out)
    if args.command == "data" and args.data_command == "show":
        return data_show(args.data, args.split, args.n, args.size, args.seed, args.out, args.columns)
    if args.command == "train-tokenizer":
        return train_tokenizer(args.data, args.out, args.vocab_size, args.n, paraphrase_prob=args.paraphrase_prob)
    if args.command == "train-vae":
        return train_vae(args.config, args.overrides, args.resume, args.run_dir, args.max_bad_fraction)
    if args.command == "train-clip":
        return train_clip(args.config, args.overrides, args.resume, args.run_dir, args.max_bad_fraction)
    if args.command == "train":
        return train_transformer(args.config, args.overrides, args.resume, args.run_dir, args.max_bad_fraction)
    if args.command == "reconstruct":
        return reconstruct(args.model, args.images, args.out)
    if args.command == "convert":
        return convert_openai_dvae(args.encoder, args.decoder, args.out, args.trust_pickle)
    if args.command == "generate":
        prompts = args.prompt or read_prompts_file(args.prompts_file)
        return generate(args.model, prompts, args.out, args.candidates, args.keep, args.seed, args.rerank, args.clip,
                        args.temperature, args.top_k, args.top_p, args.cond_scale, args.prime_image, args.prime_rows,
                        args.batch_size)
    if args.command == "classify":
        labels, images = split_labels_and_images(args.labels)
        return classify(args.model, labels, images, args.clip)
    if args.command == "search":
        return search(args.model, args.images, args.query, args.k, args.clip, args.strip)
    if args.command == "eval":
        return evaluate(args.model, args.out, args.candidates, args.prompts, args.seed, args.data, args.clip,
                        **sampling_options(args))
    if args.command == "demo":
        return demo(args.out, args.config, args.fresh, args.overrides, args.candidates, args.eval_prompts)
    raise DalleError(f"unknown command {args.command}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dalle` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except DalleError as error:
        print(f"dalle: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dalle: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
