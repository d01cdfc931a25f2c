"""The `dalle` command. Each subcommand is one typed function, registered on its parser.

`main(argv)` parses the arguments and calls the subcommand's function (`set_defaults(func=)`)
with its flags as keywords. The functions hold no logic beyond arguments and messages: they
call into the package. Any `DalleError` (bad input a user can fix) becomes one line on
stderr and exit status 2. Progress and notes go through `logging` to stderr; stdout holds
each command's own output (JSON lines, paths).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from dalle import __version__
from dalle.checkpoint import lock_directory, write_text_atomic
from dalle.config import Config, ConfigError, DataConfig, check_sampling, load_config
from dalle.data.sources import export_folder, open_source, take
from dalle.demo import run_demo
from dalle.errors import DalleError, user_message
from dalle.evaluation.evaluate import evaluate_pipeline
from dalle.evaluation.stages import evaluate_clip_shapes, evaluate_dvae
from dalle.images import IMAGE_SUFFIXES, read_images, tensor_to_pil
from dalle.inference.pipeline import check_request, load_pipeline, load_scorer_for
from dalle.inference.scoring import classify as classify_images
from dalle.inference.scoring import search as search_embeddings
from dalle.inference.search_index import build_or_load_index, index_dir_for
from dalle.models.convert import convert_openai_dvae
from dalle.models.dvae import decode, encode, load_dvae
from dalle.tokenizer import train_bpe
from dalle.training import stages
from dalle.viz import caption_grid, labelled_grid, save_png

log = logging.getLogger("dalle")


# ----------------------------------------------------------------------------- data


def _check_count(flag: str, value: int, least: int, why: str = "", most: int = 10_000_000) -> None:
    if not least <= value <= most:
        raise DalleError(f"{flag} must be in [{least}, {most}], got {value}" + (f" ({why})" if why else ""))


def data_export(data: str, split: str, n: int, size: int, seed: int, out: str) -> Path:
    """Writes N pairs of a source as DIR/00000.png + DIR/00000.txt (readable by folder:DIR)."""
    _check_count("--n", n, 0)
    source = open_source(data, DataConfig(source=data, split=split, size=size, seed=seed), n=n)
    count = export_folder(take(source, n), out)
    print(f"wrote {count} pairs to {out}")
    if source.skipped:
        log.warning(source.summary())
    return Path(out)


def data_show(data: str, split: str, n: int, size: int, seed: int, out: str, columns: int = 8) -> Path:
    """Writes a PNG grid of N pairs of a source with each caption under its image."""
    _check_count("--n", n, 1)
    _check_count("--columns", columns, 1)
    config = DataConfig(source=data, split=split, size=size, seed=seed)
    path = save_png(caption_grid(take(open_source(data, config, n=n), n), columns=columns), out)
    print(path)
    return path


def train_tokenizer(data: str, out: str, vocab_size: int = 512, n: int = 20000, size: int = 32, seed: int = 0,
                    paraphrase_prob: float = 0.2) -> Path:
    """Trains a byte-level BPE on the captions of a data source and saves it as JSON."""
    _check_count("--vocab-size", vocab_size, 260, "the byte alphabet and the specials need 260")
    _check_count("--n", n, 1)
    config = DataConfig(source=data, size=size, seed=seed, paraphrase_prob=paraphrase_prob)
    captions = [caption for _, caption in take(open_source(data, config, n=n), n)]
    if not captions:
        raise DalleError(f"no captions found in {data}")
    tokenizer = train_bpe(captions, vocab_size)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    print(f"trained a {tokenizer.get_vocab_size()}-token BPE on {len(captions)} captions: {out}")
    return Path(out)


# ----------------------------------------------------------------------------- training


def _config(config: str | None, overrides: list[str] | None, run_dir: str | None = None,
            max_bad_fraction: float | None = None) -> Config:
    overrides = list(overrides or [])
    if run_dir:
        overrides.append(f"run_dir={run_dir}")
    if max_bad_fraction is not None:
        overrides.append(f"data.max_bad_fraction={max_bad_fraction}")
    return load_config(config, overrides)


def _resume(value: str) -> str | None:
    return None if value == "none" else value


def train_vae(config: str, overrides: list[str] | None = None, resume: str = "auto", run_dir: str | None = None,
              max_bad_fraction: float | None = None) -> dict:
    """Trains the dVAE (stage 1), then prints its training and reconstruction summary."""
    run = _config(config, overrides, run_dir, max_bad_fraction)
    summary = stages.train_dvae(run, resume=_resume(resume))
    if not summary.get("stopped_early"):
        summary.update(evaluate_dvae(run))
    print(json.dumps(summary))
    return summary


def train_clip(config: str, overrides: list[str] | None = None, resume: str = "auto", run_dir: str | None = None,
               max_bad_fraction: float | None = None) -> dict:
    """Trains the CLIP used for reranking, classification and search (on shapes: then measures it)."""
    run = _config(config, overrides, run_dir, max_bad_fraction)
    summary = stages.train_clip(run, resume=_resume(resume))
    if not summary.get("stopped_early") and run.data.source == "shapes":
        summary.update(evaluate_clip_shapes(run))
    print(json.dumps(summary))
    return summary


def train_transformer(config: str, overrides: list[str] | None = None, resume: str = "auto",
                      run_dir: str | None = None, max_bad_fraction: float | None = None) -> dict:
    """Trains the transformer on captions and the frozen dVAE's codes."""
    summary = stages.train_transformer(_config(config, overrides, run_dir, max_bad_fraction), resume=_resume(resume))
    print(json.dumps(summary))
    return summary


def convert_openai(encoder: str, decoder: str, out: str, trust_pickle: bool = False) -> Path:
    """Converts OpenAI's released dVAE (encoder.pkl, decoder.pkl) into a model directory."""
    path = Path(convert_openai_dvae(encoder, decoder, out, trust_pickle=trust_pickle))
    print(path)
    return path


# ----------------------------------------------------------------------------- inference


def reconstruct(model: str, images: list[str], out: str) -> Path:
    """Encodes and decodes pictures with a dVAE; writes originals above reconstructions."""
    dvae = load_dvae(Path(model) / "dvae" if (Path(model) / "dvae").is_dir() else Path(model))
    pictures, _ = read_images(images, dvae.config.image_size)
    if not pictures:
        raise DalleError(f"no readable images among {len(images)}")
    originals = torch.stack([t for _, t in pictures])
    recons = decode(dvae, encode(dvae, originals))
    grid = labelled_grid([[tensor_to_pil(t) for t in originals], [tensor_to_pil(t) for t in recons]],
                         row_titles=["originals", "reconstructions"])
    path = save_png(grid, out)
    print(path)
    return path


def read_prompts_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DalleError(f"prompts file not found: {path}") from None
    except UnicodeDecodeError:
        raise DalleError(f"prompts file is not UTF-8: {path}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def generate(model: str, out: str, prompt: list[str] | None = None, prompts_file: str | None = None,
             candidates: int = 8, keep: int = 1, seed: int = 0, rerank: str = "clip", clip: str | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             cond_scale: float | None = None, prime_image: str | None = None, prime_rows: int = 0,
             batch_size: int | None = None) -> Path:
    """Samples N pictures per prompt, ranks them with CLIP, keeps the best K as PNG + samples.jsonl."""
    prompts = prompt or (read_prompts_file(prompts_file) if prompts_file else [])
    if not prompts:
        raise DalleError("no prompts: give --prompt TEXT or a --prompts-file with one prompt a line")
    check_request(prompts, candidates, keep, seed)  # every argument checked before any output is touched
    try:
        check_sampling(temperature, top_k, top_p, cond_scale)
    except ConfigError as error:
        raise DalleError(f"sampling: {error}") from None
    if batch_size is not None and batch_size < 1:
        raise DalleError(f"--batch-size must be >= 1, got {batch_size}")
    pipeline = load_pipeline(model, clip=clip if rerank == "clip" else None)
    out_dir = Path(out)
    with lock_directory(out_dir):
        lines, rows, labels = [], [], []
        for index, text in enumerate(tqdm(prompts, desc="prompts", disable=len(prompts) < 2)):
            (kept,) = pipeline([text], candidates=candidates, keep=keep, seed=seed + index,
                               temperature=temperature, top_k=top_k, top_p=top_p, cond_scale=cond_scale,
                               prime_image=prime_image, prime_rows=prime_rows,
                               rerank_with_clip=rerank == "clip", batch_size=batch_size)
            for sample in kept:
                name = f"{index:04d}-{sample.rank:03d}.png"
                save_png(sample.image, out_dir / name)
                lines.append({"prompt": text, "image": name, "rank": sample.rank, "clip_score": sample.clip_score,
                              "seed": seed + index})
            rows.append([s.image for s in kept])
            labels.append([f"#{s.rank}" + (f" {s.clip_score:.1f}" if s.clip_score is not None else "") for s in kept])
        grid = labelled_grid(rows[:64], labels[:64], row_titles=[p or "(no caption)" for p in prompts[:64]],
                             label_lines=1)
        save_png(grid, out_dir / "grid.png")
        write_text_atomic(out_dir / "samples.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    print(out_dir / "samples.jsonl")
    return out_dir


def split_labels_and_images(items: list[str]) -> tuple[list[str], list[str]]:
    """`--labels TEXT ... IMAGE ...`: the trailing items that name image files are the images."""
    split = len(items)
    while split > 0 and (items[split - 1].lower().endswith(IMAGE_SUFFIXES) or Path(items[split - 1]).is_file()):
        split -= 1
    return items[:split], items[split:]


def classify(model: str, labels: list[str], clip: str | None = None) -> list[dict]:
    """Zero-shot classification: one JSON line per picture with the best label and all probabilities.

    `labels` is `--labels TEXT ... IMAGE ...`: the labels, then the pictures' paths."""
    labels, images = split_labels_and_images(labels)
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
        log.warning("dalle: classified %d images, skipped %d", len(pictures), len(bad))
    return lines


def search(model: str, images: str, query: str, k: int = 5, clip: str | None = None,
           strip: str | None = None, index_dir: str | None = None) -> list[dict]:
    """Text-to-image search over a folder; the embedding index is kept beside the images (or in --index-dir)."""
    if not query.strip():
        raise DalleError("the search query is empty")
    _check_count("--k", k, 1)
    index = index_dir_for(images, index_dir)
    scorer = load_scorer_for(model, clip)
    paths, embeddings = build_or_load_index(scorer, images, model_id=str(clip or Path(model).resolve()),
                                            index_dir=index)
    if not paths:
        raise DalleError(f"no readable images in {images}")
    indices, scores = search_embeddings(scorer, query, embeddings, k)
    hits = [{"image": paths[i], "score": float(s)} for i, s in zip(indices.tolist(), scores.tolist())]
    for hit in hits:
        print(json.dumps(hit))
    strip_path = Path(strip) if strip else index / "last-search.png"
    pictures = [Image.open(hit["image"]).convert("RGB") for hit in hits]
    save_png(labelled_grid([pictures], [[f"{i + 1}: {h['score']:.1f}" for i, h in enumerate(hits)]],
                           row_titles=[query], label_lines=1), strip_path)
    log.info("dalle: strip of the hits: %s", strip_path)
    return hits


# ----------------------------------------------------------------------------- evaluation and the demo


def evaluate(model: str, out: str, candidates: int = 16, prompts: int = 50, seed: int = 0, data: str = "shapes",
             clip: str | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, cond_scale: float | None = None) -> dict:
    """Measures a shapes (or digits) pipeline with the project's picture reader; writes metrics and a report.

    `prompts` is the number of prompts per set; the sampling flags that are given override
    the model's sampling.json."""
    if data not in ("shapes", "digits"):
        raise DalleError(f"eval knows the shapes and digits data, not {data!r}")
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "cond_scale": cond_scale}
    metrics = evaluate_pipeline(model, out, candidates=candidates, prompts_per_set=prompts, seed=seed, data=data,
                                clip=clip, **{key: value for key, value in sampling.items() if value is not None})
    print(json.dumps(metrics))
    return metrics


def demo(out: str = "runs/demo", config: str = "configs/demo.yaml", fresh: bool = False,
         overrides: list[str] | None = None, candidates: int = 8, eval_prompts: int = 10) -> Path:
    """Trains every stage on the shapes data, samples and reranks, writes grid.png and report.html."""
    grid = run_demo(out, config, fresh=fresh, overrides=overrides, candidates=candidates, eval_prompts=eval_prompts)
    print(grid)
    return grid


# ----------------------------------------------------------------------------- the parser


def _data_parsers(commands) -> None:
    data = commands.add_parser("data", help="export or look at a data source")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for name, helptext, func in (("export", "write pairs as a folder of PNG + TXT", data_export),
                                 ("show", "write a PNG grid", data_show)):
        sub = actions.add_parser(name, help=helptext)
        sub.set_defaults(func=func)
        sub.add_argument("--data", default="shapes", help="shapes | digits | folder:DIR | hf:NAME | wds:PATTERN")
        sub.add_argument("--split", default="train", choices=["train", "test"])
        sub.add_argument("--n", type=int, default=16)
        sub.add_argument("--size", type=int, default=32)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--out", required=True)
        if name == "show":
            sub.add_argument("--columns", type=int, default=8)

    tok = commands.add_parser("train-tokenizer", help="train the caption BPE on a data source")
    tok.set_defaults(func=train_tokenizer)
    tok.add_argument("--data", default="shapes")
    tok.add_argument("--out", required=True)
    tok.add_argument("--vocab-size", type=int, default=512)
    tok.add_argument("--n", type=int, default=20000, help="how many captions to read")
    tok.add_argument("--size", type=int, default=32, help="picture size of the source (captions do not depend on it)")
    tok.add_argument("--seed", type=int, default=0, help="the source's seed (which captions are drawn)")
    tok.add_argument("--paraphrase-prob", type=float, default=0.2)


def _training_parsers(commands) -> None:
    for name, helptext, func in (("train-vae", "train the dVAE", train_vae),
                                 ("train-clip", "train the CLIP", train_clip),
                                 ("train", "train the transformer (needs the run's dVAE)", train_transformer)):
        sub = commands.add_parser(name, help=helptext)
        sub.set_defaults(func=func)
        sub.add_argument("--config", required=True, help="a YAML file in configs/")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. --set train.dvae.lr=3e-4 (repeatable)")
        sub.add_argument("--run-dir", help="where the run writes (default: the config's run_dir)")
        sub.add_argument("--resume", default="auto", help="auto (newest checkpoint), none, or a checkpoint path")
        sub.add_argument("--max-bad-fraction", type=float,
                         help="stop with a message when more of the data files than this are broken")

    convert = commands.add_parser("convert", help="import released weights")
    what = convert.add_subparsers(dest="convert_command", required=True, metavar="WHAT")
    openai = what.add_parser("openai-dvae", help="OpenAI's encoder.pkl + decoder.pkl")
    openai.set_defaults(func=convert_openai)
    openai.add_argument("--encoder", required=True)
    openai.add_argument("--decoder", required=True)
    openai.add_argument("--out", required=True)
    openai.add_argument("--trust-pickle", action="store_true",
                        help="allow loading pickled modules (this runs code from the files)")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--temperature, --top-k, --top-p, --cond-scale; left out, the model's sampling.json decides."""
    parser.add_argument("--temperature", type=float, help="default: the model's sampling.json (else 1)")
    parser.add_argument("--top-k", type=int, help="keep the k likeliest codes (0: off; default: sampling.json)")
    parser.add_argument("--top-p", type=float, help="nucleus mass (1: off; default: sampling.json)")
    parser.add_argument("--cond-scale", type=float,
                        help="classifier-free guidance scale (1: off; default: the model's sampling.json)")


def _inference_parsers(commands) -> None:
    rec = commands.add_parser("reconstruct", help="encode + decode pictures with a dVAE")
    rec.set_defaults(func=reconstruct)
    rec.add_argument("--model", required=True, help="a dVAE or pipeline directory")
    rec.add_argument("--out", required=True)
    rec.add_argument("images", nargs="+")

    gen = commands.add_parser("generate", help="sample pictures for prompts, ranked by CLIP")
    gen.set_defaults(func=generate)
    gen.add_argument("--model", required=True, help="a pipeline directory")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", nargs="+", help="one or more prompts")
    prompts.add_argument("--prompts-file", help="UTF-8, one prompt a line, blank lines ignored")
    gen.add_argument("--candidates", type=int, default=8)
    gen.add_argument("--keep", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", required=True)
    gen.add_argument("--rerank", choices=["clip", "none"], default="clip")
    gen.add_argument("--clip", help="rerank with another CLIP: hf:NAME_OR_DIR or a CLIP directory")
    _add_sampling_flags(gen)
    gen.add_argument("--prime-image", help="complete this picture from its top rows")
    gen.add_argument("--prime-rows", type=int, default=0)
    gen.add_argument("--batch-size", type=int)

    cls = commands.add_parser("classify", help="zero-shot classification with CLIP")
    cls.set_defaults(func=classify)
    cls.add_argument("--model", required=True, help="a pipeline or CLIP directory")
    cls.add_argument("--labels", nargs="+", required=True, metavar="TEXT ... IMAGE",
                     help="the labels, then the image paths")
    cls.add_argument("--clip", help="hf:NAME_OR_DIR to use a Hugging Face CLIP")

    srch = commands.add_parser("search", help="text-to-image search over a folder")
    srch.set_defaults(func=search)
    srch.add_argument("--model", required=True, help="a pipeline or CLIP directory")
    srch.add_argument("--images", required=True, help="a folder of pictures")
    srch.add_argument("--query", required=True)
    srch.add_argument("--k", type=int, default=5)
    srch.add_argument("--clip", help="hf:NAME_OR_DIR to use a Hugging Face CLIP")
    srch.add_argument("--strip", help="where to write the PNG strip of the hits")
    srch.add_argument("--index-dir", help="keep the embedding index here (default: IMAGES/.dalle-index)")


def _evaluation_parsers(commands) -> None:
    ev = commands.add_parser("eval", help="measure a pipeline with the picture reader")
    ev.set_defaults(func=evaluate)
    ev.add_argument("--model", required=True)
    ev.add_argument("--out", required=True)
    ev.add_argument("--candidates", type=int, default=16)
    ev.add_argument("--prompts", type=int, default=50, help="prompts per set")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--data", default="shapes", choices=["shapes", "digits"], help="what the model was trained on")
    ev.add_argument("--clip", help="rerank with another CLIP: hf:NAME_OR_DIR or a CLIP model directory")
    _add_sampling_flags(ev)

    dm = commands.add_parser("demo", help="train every stage on shapes, then sample, rerank and report")
    dm.set_defaults(func=demo)
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--config", default="configs/demo.yaml")
    dm.add_argument("--fresh", action="store_true", help="retrain stages that are already trained")
    dm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    dm.add_argument("--candidates", type=int, default=8, help="pictures sampled per prompt")
    dm.add_argument("--eval-prompts", type=int, default=10, help="prompts per evaluation set")


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one `dalle: error:` line (exit 2), like every other user error; -h shows usage."""

    def error(self, message: str):
        self.exit(2, f"dalle: error: {self.prog.removeprefix('dalle ')}: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dalle", description="DALL-E 1: dVAE, transformer, CLIP reranking.")
    parser.add_argument("--version", action="version", version=f"dalle {__version__}")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _data_parsers(commands)
    _training_parsers(commands)
    _inference_parsers(commands)
    _evaluation_parsers(commands)
    return parser


def run(args: argparse.Namespace) -> object:
    """Calls the subcommand's function with the flags it takes, as keywords."""
    func = args.func
    names = inspect.signature(func).parameters
    return func(**{name: value for name, value in vars(args).items() if name in names})


def setup_logging(quiet: bool = False) -> None:
    """Notes and progress from the package go to stderr, one plain line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("dalle")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dalle` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # -h, --version, or an argument error already printed as one line
        return exit.code if isinstance(exit.code, int) else 2
    setup_logging(args.quiet)
    try:
        run(args)
    except KeyboardInterrupt:
        print("dalle: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - expected failures become one line; anything else re-raises
        message = user_message(error)
        if message is None:
            raise
        print(f"dalle: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
