"""What each `dalle` subcommand does: one typed function per subcommand, called by `dalle.cli`.

The functions hold no logic beyond arguments, outputs and messages: they call into the
package. Their keyword arguments are the subcommand's flags.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from dalle.checkpoint import lock_directory, write_text_atomic
from dalle.config import Config, DataConfig, check_sampling, load_config
from dalle.data.emoji import build_emoji
from dalle.data.sources import export_folder, open_source, take
from dalle.demo import run_demo
from dalle.errors import DalleError
from dalle.evaluation.evaluate import evaluate_pipeline
from dalle.evaluation.folder import evaluate_folder
from dalle.evaluation.stages import evaluate_clip_shapes, evaluate_dvae
from dalle.images import IMAGE_SUFFIXES, read_images, tensor_to_pil
from dalle.inference.devices import resolve_device, resolve_dtype
from dalle.inference.editing import parse_box, read_picture
from dalle.inference.pipeline import MAX_CANDIDATES, Sample, check_request, load_pipeline
from dalle.inference.scorers import load_scorer_for
from dalle.inference.scoring import classify as classify_images
from dalle.inference.scoring import search as search_embeddings
from dalle.inference.search_index import build_or_load_index, index_dir_for
from dalle.models.convert import convert_openai_dvae, convert_taming_vqgan
from dalle.models.image_tokenizer import image_tokenizer_dir, load_image_tokenizer
from dalle.outputs import Results
from dalle.tokenizer import train_bpe
from dalle.training import stages
from dalle.viz import caption_grid, labelled_grid, save_png

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data


def _check_count(flag: str, value: int, least: int, why: str = "", most: int = 10_000_000) -> None:
    if not least <= value <= most:
        raise DalleError(f"{flag} must be in [{least}, {most}], got {value}" + (f" ({why})" if why else ""))


def data_export(data: str, split: str, n: int, size: int, seed: int, out: str) -> Path:
    """Writes N pairs of a source as DIR/00000.png + DIR/00000.txt (readable by folder:DIR)."""
    _check_count("--n", n, 1)
    source = open_source(data, DataConfig(source=data, split=split, size=size, seed=seed), n=n)
    with lock_directory(out):
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


def data_fetch(name: str, out: str, size: int = 32, seed: int = 0, cache: str | None = None,
               tarballs: str | None = None) -> Path:
    """Builds a named dataset from its public source (emoji: ../shared/EMOJI.md) as train/, test/, split.json."""
    _check_count("--size", size, 8, most=64)
    summary = build_emoji(out, size=size, seed=seed, cache=cache, tarballs=tarballs)  # OUT replaced atomically
    print(f"wrote {summary['train']} training and {summary['test']} held-out pairs to {out} "
          f"({len(summary['held_out']['style'])} style, {len(summary['held_out']['tone'])} tone)")
    return Path(out)


def train_tokenizer(data: str, out: str, vocab_size: int = 512, n: int = 20000, size: int = 32, seed: int = 0,
                    paraphrase_prob: float = 0.2) -> Path:
    """Trains a byte-level BPE on the captions of a data source and saves it as JSON."""
    _check_count("--vocab-size", vocab_size, 260, "the byte alphabet and the specials need 260")
    _check_count("--n", n, 1)
    if Path(out).is_dir():
        raise DalleError(f"{out} is a folder: --out names the tokenizer's file, e.g. {Path(out) / 'tokenizer.json'}")
    config = DataConfig(source=data, size=size, seed=seed, paraphrase_prob=paraphrase_prob)
    captions = [caption for _, caption in take(open_source(data, config, n=n), n)]
    if not captions:
        raise DalleError(f"no captions found in {data}")
    tokenizer = train_bpe(captions, vocab_size)
    write_text_atomic(out, tokenizer.to_str(pretty=True))  # an OSError naming OUT (a folder, say), not the Rust one
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
    """Trains the image tokenizer (stage 1: the dVAE, or the VQGAN with `image_tokenizer: vqgan`), then
    prints its training and reconstruction summary."""
    run = _config(config, overrides, run_dir, max_bad_fraction)
    summary = stages.train_image_tokenizer(run, resume=_resume(resume))
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


def train_judge(config: str, overrides: list[str] | None = None, resume: str = "auto", run_dir: str | None = None,
                max_bad_fraction: float | None = None) -> dict:
    """Fine-tunes the run's CLIP on adversarial pictures into run_dir/judge, `dalle imagine`'s default judge."""
    summary = stages.train_judge(_config(config, overrides, run_dir, max_bad_fraction), resume=_resume(resume))
    print(json.dumps(summary))
    return summary


def train_transformer(config: str, overrides: list[str] | None = None, resume: str = "auto",
                      run_dir: str | None = None, max_bad_fraction: float | None = None) -> dict:
    """Trains the transformer on captions and the frozen image tokenizer's codes."""
    summary = stages.train_transformer(_config(config, overrides, run_dir, max_bad_fraction), resume=_resume(resume))
    print(json.dumps(summary))
    return summary


def train_all(config: str, overrides: list[str] | None = None, run_dir: str | None = None,
              max_bad_fraction: float | None = None) -> dict:
    """Trains every stage of a config not yet trained in the run directory, in order, resumable;
    measures what it trained (the image tokenizer; on shapes the CLIP) and prints one JSON summary."""
    run = _config(config, overrides, run_dir, max_bad_fraction)
    summary = stages.train_all(run)
    if run.image_tokenizer in summary and not stages.pretrained_of(run):
        summary[run.image_tokenizer].update(evaluate_dvae(run))
    if "clip" in summary and run.data.source == "shapes":
        summary["clip"].update(evaluate_clip_shapes(run))
    print(json.dumps(summary))
    return summary


def convert_openai(encoder: str, decoder: str, out: str, trust_pickle: bool = False, image_size: int = 256) -> Path:
    """Converts OpenAI's released dVAE (encoder.pkl, decoder.pkl) into a model directory."""
    _check_count("--image-size", image_size, 8, most=4096)
    path = Path(convert_openai_dvae(encoder, decoder, out, trust_pickle=trust_pickle, image_size=image_size))
    print(path)
    return path


def convert_vqgan(checkpoint: str, config: str, out: str, trust_pickle: bool = False) -> Path:
    """Converts a released taming-transformers VQGAN (Lightning last.ckpt + its model.yaml) into a model directory."""
    path = Path(convert_taming_vqgan(checkpoint, config, out, trust_pickle=trust_pickle))
    print(path)
    return path


# ----------------------------------------------------------------------------- inference


def reconstruct(model: str, images: list[str], out: str, device: str = "auto", dtype: str = "auto") -> Path:
    """Encodes and decodes pictures with an image tokenizer (dVAE or VQGAN); writes originals above
    reconstructions.

    (The image tokenizer runs in float32 whatever --dtype says: see `Pipeline.to`.)"""
    where = resolve_device(device)
    resolve_dtype(dtype, where)  # checked, so a dtype the device cannot run is still an error
    directory = Path(model) if (Path(model) / "config.json").is_file() else image_tokenizer_dir(model)
    tokenizer = load_image_tokenizer(directory).to(where)
    pictures, bad = read_images(images, tokenizer.image_size)
    _check_read(pictures, bad)
    originals = torch.stack([t for _, t in pictures]).to(where)
    recons = tokenizer.decode(tokenizer.encode(originals))
    grid = labelled_grid([[tensor_to_pil(t) for t in originals], [tensor_to_pil(t) for t in recons]],
                         row_titles=["originals", "reconstructions"])
    path = save_png(grid, out)
    print(path)
    return path


def _check_read(pictures: list, bad: list[str]) -> None:
    if not pictures:
        first = f" ({bad[0]}: missing or not a picture)" if bad else ""
        raise DalleError(f"no readable picture among the {len(bad)} given{first}")


def _device(device: str, dtype: str) -> torch.device:
    """The device of a command whose CLIP runs in float32 (--dtype is checked against the device)."""
    where = resolve_device(device)
    resolve_dtype(dtype, where)
    return where


def read_prompts_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DalleError(f"prompts file not found: {path}") from None
    except UnicodeDecodeError:
        raise DalleError(f"prompts file is not UTF-8: {path}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_sampling_flags(temperature, top_k, top_p, cond_scale, batch_size) -> None:
    check_sampling(temperature, top_k, top_p, cond_scale)  # a ConfigError: a DalleError, one line
    if batch_size is not None and batch_size < 1:
        raise DalleError(f"--batch-size must be >= 1, got {batch_size}")


def generate(model: str, out: str, prompt: list[str] | None = None, prompts_file: str | None = None,
             candidates: int = 8, keep: int = 1, seed: int = 0, rerank: str = "clip", clip: str | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             cond_scale: float | None = None, prime_image: str | None = None, prime_rows: int = 0,
             batch_size: int | None = None, device: str = "auto", dtype: str = "auto", compile: bool = False,
             frames: bool = False, every_rows: int = 1) -> Path:
    """Samples N pictures per prompt, ranks them with CLIP, keeps the best K as PNG + samples.jsonl.

    `--frames` also writes each kept picture forming, as an animated GIF (`--every-rows` rows a frame)."""
    prompts = prompt or (read_prompts_file(prompts_file) if prompts_file else [])
    if not prompts:
        raise DalleError("no prompts: give --prompt TEXT or a --prompts-file with one prompt a line")
    check_request(prompts, candidates, keep, seed)  # every argument checked before any output is touched
    _check_sampling_flags(temperature, top_k, top_p, cond_scale, batch_size)
    if frames and prime_image:
        raise DalleError("--frames shows a picture forming from nothing: it cannot be combined with --prime-image")
    if prime_rows and not prime_image:
        raise DalleError("--prime-rows needs --prime-image (the picture whose top rows are kept)")
    _check_count("--every-rows", every_rows, 1)
    if every_rows != 1 and not frames:
        raise DalleError("--every-rows spaces the frames of --frames: give --frames too")
    pipeline = load_pipeline(model, clip=clip if rerank == "clip" else None, device=device, dtype=dtype,
                             compile=compile)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "cond_scale": cond_scale,
                "rerank_with_clip": rerank == "clip", "batch_size": batch_size}
    with lock_directory(out):
        results = Results(Path(out))
        for index, text in enumerate(tqdm(prompts, desc=f"prompts [{pipeline.where()}]", disable=len(prompts) < 2)):
            if frames:
                steps = list(pipeline.stream(text, candidates=candidates, keep=keep, seed=seed + index,
                                             every_rows=every_rows, **sampling))
                results.add(index, text, seed + index, steps[-1].samples, [step.images for step in steps[:-1]])
            else:
                (kept,) = pipeline([text], candidates=candidates, keep=keep, seed=seed + index,
                                   prime_image=prime_image, prime_rows=prime_rows, **sampling)
                results.add(index, text, seed + index, kept)
        path = results.write()
    print(path)
    return Path(out)


def edit(model: str, image: str, prompt: str, out: str, box: str | None = None, mask: str | None = None,
         candidates: int = 8, keep: int = 1, seed: int = 0, rerank: str = "clip", clip: str | None = None,
         temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
         cond_scale: float | None = None, batch_size: int | None = None, device: str = "auto",
         dtype: str = "auto") -> Path:
    """Redraws a region (--box x0,y0,x1,y1 or --mask MASK.png) of a picture for a prompt; output as generate."""
    check_request([prompt], candidates, keep, seed)
    _check_sampling_flags(temperature, top_k, top_p, cond_scale, batch_size)
    region = parse_box(box) if box is not None else mask
    picture = read_picture(image, "picture to edit")
    pipeline = load_pipeline(model, clip=clip if rerank == "clip" else None, device=device, dtype=dtype)
    with lock_directory(out):
        results = Results(Path(out))
        kept = pipeline.edit(picture, region, prompt, candidates=candidates, keep=keep, seed=seed,
                             temperature=temperature, top_k=top_k, top_p=top_p, cond_scale=cond_scale,
                             rerank_with_clip=rerank == "clip", batch_size=batch_size)
        results.add(0, prompt, seed, kept, mask=box if box is not None else str(mask))
        path = results.write()
    print(path)
    return Path(out)


def imagine(model: str, prompt: str, out: str, seed: int = 0, steps: int = 100, init: str = "random",
            clip: str | None = None, smoothness: float | None = None, restarts: int = 8,
            frames: bool = False, device: str = "auto", dtype: str = "auto") -> Path:
    """A picture for a prompt found by optimising the image tokenizer's codes for CLIP's score (no transformer
    needed); the judge is `--clip`, else the model's judge/ (`dalle train-judge`), else its CLIP."""
    check_request([prompt], 1, 1, seed)
    _check_count("--steps", steps, 1, most=10_000)
    pipeline = load_pipeline(model, device=device, dtype=dtype)
    scorer = load_scorer_for(model, clip, device=pipeline.device) if clip else None
    with lock_directory(out):
        found = pipeline.imagine(prompt, steps=steps, seed=seed, init=init, scorer=scorer, smoothness=smoothness,
                                 restarts=restarts, frame_every=max(1, steps // 20) if frames else 0)
        results = Results(Path(out))
        sample = Sample(found.image, 1, found.clip_score, 0, found.codes)
        results.add(0, prompt, seed, [sample], [[frame] for frame in found.frames[:-1]] if frames else None,
                    steps=steps, init=init, rank_score=found.rank_score)
        path = results.write()
    print(path)
    return Path(out)


def split_labels_and_images(items: list[str]) -> tuple[list[str], list[str]]:
    """`--labels TEXT ... IMAGE ...`: the trailing items that name image files are the images."""
    split = len(items)
    while split > 0 and (items[split - 1].lower().endswith(IMAGE_SUFFIXES) or _is_file(items[split - 1])):
        split -= 1
    return items[:split], items[split:]


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a label too long to be a file name, or one with a NUL in it
        return False


def classify(model: str, labels: list[str], clip: str | None = None, device: str = "auto",
             dtype: str = "auto") -> list[dict]:
    """Zero-shot classification: one JSON line per picture with the best label and all probabilities.

    `labels` is `--labels TEXT ... IMAGE ...`: the labels, then the pictures' paths."""
    labels, images = split_labels_and_images(labels)
    labels = [label for label in labels if label.strip()]
    if not labels:
        raise DalleError("classify needs at least one non-empty label (--labels TEXT ... IMAGE ...)")
    if not images:
        raise DalleError("classify needs at least one image after the labels")
    scorer = load_scorer_for(model, clip, device=_device(device, dtype))
    pictures, bad = read_images(images)
    _check_read(pictures, bad)
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
           strip: str | None = None, index_dir: str | None = None, device: str = "auto",
           dtype: str = "auto") -> list[dict]:
    """Text-to-image search over a folder; the embedding index is kept beside the images (or in --index-dir)."""
    if not query.strip():
        raise DalleError("the search query is empty")
    _check_count("--k", k, 1)
    index = index_dir_for(images, index_dir)
    scorer = load_scorer_for(model, clip, device=_device(device, dtype))
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


def serve(model: str, host: str = "127.0.0.1", port: int = 7860, device: str = "auto", dtype: str = "auto",
          images: str | None = None, max_candidates: int = 64, queue: int = 16) -> None:
    """Serves the page and the JSON API of a pipeline until Ctrl-C or SIGTERM."""
    try:  # lazy: fastapi and uvicorn are the optional extra dalle[serve]
        import uvicorn

        from dalle.serve.app import create_app
    except ImportError:
        raise DalleError("dalle serve needs fastapi and uvicorn: pip install 'dalle[serve]'") from None
    _check_count("--port", port, 1, most=65535)
    _check_count("--max-candidates", max_candidates, 1, most=MAX_CANDIDATES)
    _check_count("--queue", queue, 1, most=10_000)
    if images is not None and not Path(images).is_dir():
        raise DalleError(f"picture folder not found: {images}")
    if not host.strip():  # "" would listen on every interface, which must be asked for by name
        raise DalleError("--host is empty: give 127.0.0.1 (this machine), or 0.0.0.0 for every interface")
    with socket.socket() as probe:  # a port in use is a one-line error, not uvicorn's traceback
        try:
            probe.bind((host, port))
        except OSError as error:
            raise DalleError(f"cannot listen on {host}:{port}: {error.strerror}") from None
        except (UnicodeError, TypeError):  # a name that is not text ("encoding of hostname failed")
            raise DalleError(f"not a host name or address: {host!r}") from None
    pipeline = load_pipeline(model, device=device, dtype=dtype)
    name = Path(model).name if Path(model).name != "model" else f"{Path(model).resolve().parent.name}/model"
    app = create_app(pipeline, name, images, max_candidates, queue)
    print(f"http://{host}:{port}/", flush=True)
    # uvicorn finishes the requests in flight on SIGINT/SIGTERM, then raises the signal again
    # to the handler it found: a quiet one, so the command ends with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    log.info("dalle serve: stopped")


# ----------------------------------------------------------------------------- evaluation and the demo


def evaluate(model: str, out: str, candidates: int = 16, prompts: int = 50, seed: int = 0, data: str = "shapes",
             clip: str | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, cond_scale: float | None = None, device: str = "auto",
             dtype: str = "auto", n: int | None = None, train_data: str | None = None) -> dict:
    """Measures a shapes (or digits) pipeline with the project's picture reader; writes metrics and a report.

    `prompts` is the number of prompts per set; the sampling flags that are given override
    the model's sampling.json."""
    if data not in ("shapes", "digits") and not data.startswith("folder:"):
        raise DalleError(f"eval knows shapes, digits and folder:DIR (real pictures with captions), not {data!r}")
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "cond_scale": cond_scale}
    _check_count("--candidates", candidates, 1, most=MAX_CANDIDATES)
    _check_count("--prompts", prompts, 1, most=100_000)
    check_sampling(**sampling)
    if data.startswith("folder:"):
        if not data.removeprefix("folder:").strip() or (train_data and not train_data.removeprefix("folder:").strip()):
            raise DalleError("folder: needs the folder, e.g. --data folder:emoji/test")
        if n is not None:
            _check_count("--n", n, 1, most=1_000_000)
        pipeline = load_pipeline(model, clip=None if (clip or "").startswith("hf:") else clip, device=device,
                                 dtype=dtype)
        with lock_directory(out):
            metrics = evaluate_folder(pipeline, data.removeprefix("folder:"), out, candidates=candidates, n=n,
                                      seed=seed, train_dir=train_data.removeprefix("folder:") if train_data else None,
                                      hf_clip=clip if (clip or "").startswith("hf:") else None,
                                      **{key: value for key, value in sampling.items() if value is not None})
        print(json.dumps({k: metrics[k] for k in metrics if k not in ("sampling",)}))
        return metrics
    with lock_directory(out):
        metrics = evaluate_pipeline(model, out, candidates=candidates, prompts_per_set=prompts, seed=seed, data=data,
                                    clip=clip, device=device, dtype=dtype,
                                    **{key: value for key, value in sampling.items() if value is not None})
    print(json.dumps(metrics))
    return metrics


def demo(out: str = "runs/demo", config: str = "configs/demo.yaml", fresh: bool = False,
         overrides: list[str] | None = None, candidates: int = 8, eval_prompts: int = 10, device: str = "auto",
         dtype: str = "auto") -> Path:
    """Trains every stage on the shapes data, samples and reranks, writes grid.png and report.html."""
    _check_count("--candidates", candidates, 1, most=MAX_CANDIDATES)  # checked before minutes of training
    _check_count("--eval-prompts", eval_prompts, 1, most=100_000)
    _device(device, dtype)
    grid = run_demo(out, config, fresh=fresh, overrides=overrides, candidates=candidates, eval_prompts=eval_prompts,
                    device=device, dtype=dtype)
    print(grid)
    return grid
