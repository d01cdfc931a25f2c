"""Hugging Face Hub conventions for a pipeline: `save_pretrained`, `hf:USER/REPO` loading, `push_to_hub`.

A saved pipeline is the directory `load_pipeline` reads (tokenizer.json, sampling.json,
dvae/ or vqgan/, transformer/, clip/: config.json + safetensors each, sharded above a size limit)
plus a model card, README.md, whose YAML header the Hub reads (library_name,
pipeline_tag, tags). Nothing here imports training code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from PIL import Image

from dalle.checkpoint import CheckpointError, atomic_directory, save_model, write_json_atomic
from dalle.config import SamplingConfig
from dalle.config_io import to_dict
from dalle.errors import DalleError
from dalle.models.image_tokenizer import NAMES
from dalle.tokenizer import TOKENIZER_FILE, Tokenizer

SAMPLING_FILE = "sampling.json"
CARD_FILE = "README.md"
SAMPLE_GRID = "samples.png"


def snapshot_of(spec: str) -> Path:
    """The local folder of `hf:USER/REPO[@REVISION]`: downloaded once, then read from the cache.

    Offline (no network, or HF_HUB_OFFLINE=1), the cached snapshot is used."""
    repo, _, revision = spec.removeprefix("hf:").partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise DalleError(f"a Hub pipeline is hf:USER/REPO, got {spec!r}")
    try:
        return Path(snapshot_download(repo, revision=revision or None, library_name="dalle"))
    except LocalEntryNotFoundError:
        raise DalleError(f"{spec}: not in the local Hugging Face cache, and the Hub cannot be reached") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DalleError(f"cannot download {spec}: {first}") from None


def model_card(sampling: SamplingConfig, facts: dict[str, Any], metrics: dict[str, Any] | None,
               has_grid: bool) -> str:
    """README.md: YAML metadata for the Hub, then what the pipeline is, how to use it, what it scored."""
    meta = {"library_name": "dalle", "pipeline_tag": "text-to-image", "license": "mit",
            "tags": ["dalle", "text-to-image", "dvae", "clip", "pytorch"]}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             "# A DALL-E 1 pipeline", "",
             "A dVAE, a one-stream transformer with the paper's sparse attention, and a CLIP that reranks, "
             "trained with [dalle](https://github.com/) (an open reimplementation of OpenAI's DALL-E 1).", "",
             "```python", "import dalle",
             'pipe = dalle.load_pipeline("hf:USER/REPO")  # or this folder',
             '[samples] = pipe(["a red circle"], candidates=16, keep=4, seed=0)', "```", "",
             "## Model", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += ["", "## Sampling defaults", "", "```json", json.dumps(to_dict(sampling), indent=2), "```"]
    if metrics:
        lines += ["", "## Evaluation (`dalle eval`)", "", "| metric | value |", "| --- | --- |"]
        for key, value in _flatten(metrics):
            lines.append(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if has_grid:
        lines += ["", "## Samples", "", f"![samples]({SAMPLE_GRID})"]
    return "\n".join(lines) + "\n"


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    flat = []
    for key, value in values.items():
        if isinstance(value, dict):
            flat += _flatten(value, f"{prefix}{key}.")
        else:
            flat.append((f"{prefix}{key}", value))
    return flat


def read_card_metadata(directory: str | Path) -> dict[str, Any]:
    """The YAML header of a pipeline's model card."""
    text = (Path(directory) / CARD_FILE).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise CheckpointError(f"{directory}/{CARD_FILE} has no YAML header")
    return yaml.safe_load(text.split("---\n")[1])


def save_pipeline(directory: str | Path, tokenizer: Tokenizer, transformer, image_tokenizer, clip_model,
                  sampling: SamplingConfig, source: Path | None = None, max_shard_size: int | str = "2GB",
                  metrics: dict[str, Any] | None = None, grid: Image.Image | None = None, judge=None) -> Path:
    """Writes a pipeline directory (atomically) with sharded weights and a model card.

    Args:
        directory: where to write (replaced if it exists).
        tokenizer, transformer, image_tokenizer, clip_model: the parts (the image tokenizer, a
            dVAE or a VQGAN, goes to the folder named by its kind; clip_model: our CLIP or None).
        sampling: the defaults written to sampling.json.
        source: the directory the pipeline was loaded from; its training logs and
            reports are read for the card (steps, dVAE metrics).
        max_shard_size: weights above this are split into shards ("2GB", or bytes).
        metrics: `dalle eval` metrics for the card (default: source/eval/metrics.json if any).
        grid: a picture of samples for the card.
        judge: imagine's CLIP from `dalle train-judge` (our CLIP), written to judge/, or None.
    """
    kind = image_tokenizer.kind
    facts = {"image tokenizer": NAMES.get(kind, kind),
             "tokens per picture": f"{image_tokenizer.grid}x{image_tokenizer.grid} of "
                                   f"{image_tokenizer.codebook_size} codes",
             "picture size": f"{image_tokenizer.image_size} px",
             "transformer": f"{transformer.config.depth} layers, width {transformer.config.dim}, "
                            f"attention {transformer.config.attention}",
             "parameters": f"{sum(p.numel() for p in transformer.parameters()):,} (transformer)"}
    facts.update(_training_facts(source, kind))
    if metrics is None and source is not None and (source / "eval" / "metrics.json").is_file():
        metrics = json.loads((source / "eval" / "metrics.json").read_text(encoding="utf-8"))
    with atomic_directory(directory) as tmp:
        tokenizer.hf.save(str(tmp / TOKENIZER_FILE))
        write_json_atomic(tmp / SAMPLING_FILE, to_dict(sampling))
        for folder, name, model in (("transformer", "transformer", transformer), (kind, kind, image_tokenizer),
                                    ("clip", "clip", clip_model), ("judge", "clip", judge)):
            if model is not None:
                save_model(model, model.config, tmp / folder, name, max_shard_size=max_shard_size)
        if grid is not None:
            grid.save(tmp / SAMPLE_GRID)
        (tmp / CARD_FILE).write_text(model_card(sampling, facts, metrics, grid is not None), encoding="utf-8")
    return Path(directory)


def _training_facts(source: Path | None, kind: str = "dvae") -> dict[str, str]:
    """Training steps per stage and the data, from a run directory's logs and config, when there are any."""
    facts = {}
    if source is None:
        return facts
    for stage in (kind, "clip", "transformer", "judge"):
        log = source / "logs" / f"{stage}.jsonl"
        if log.is_file():
            lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
            if lines:
                facts[f"{stage} training steps"] = str(json.loads(lines[-1]).get("step"))
    tokenizer_metrics = source / "reports" / f"{kind}-metrics.json"
    if tokenizer_metrics.is_file():
        psnr = json.loads(tokenizer_metrics.read_text(encoding="utf-8")).get("psnr")
        if psnr is not None:
            facts[f"{NAMES.get(kind, kind)} reconstruction PSNR (test split)"] = f"{psnr:.1f} dB"
    return facts


def push_pipeline(directory: Path, repo: str, private: bool = False, token: str | None = None,
                  api: HfApi | None = None) -> str:
    """Uploads a saved pipeline directory to the Hub repository `repo` (created if missing); returns its URL."""
    api = api or HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(directory), commit_message="Upload dalle pipeline")
    except (HfHubHTTPError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DalleError(f"cannot push to {repo}: {first}") from None
    return str(url)

