"""The embedding index that `dalle search` keeps beside a folder of pictures.

DIR/.dalle-index/embeddings.safetensors holds one CLIP embedding per picture and
DIR/.dalle-index/index.json the picture list with each file's size and modification time
and the model that embedded them. The index is reused while every file and the model are
unchanged and rebuilt (only for the pictures that changed) otherwise.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dalle.checkpoint import write_json_atomic
from dalle.errors import DalleError
from dalle.images import IMAGE_SUFFIXES, decode_image
from dalle.inference.scoring import Scorer

INDEX_DIR = ".dalle-index"
log = logging.getLogger(__name__)


def _stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def index_dir_for(folder: str | Path, index_dir: str | Path | None = None) -> Path:
    """Where the index of `folder` lives: `index_dir`, or FOLDER/.dalle-index (never through a symlink)."""
    path = Path(index_dir) if index_dir is not None else Path(folder) / INDEX_DIR
    if path.is_symlink():
        raise DalleError(f"{path} is a symlink: refusing to write the index through it (use --index-dir)")
    return path


def build_or_load_index(scorer: Scorer, folder: str | Path, model_id: str, batch_size: int = 64,
                        index_dir: str | Path | None = None) -> tuple[list[str], torch.Tensor]:
    """(paths, (N, D) embeddings) of the readable pictures under `folder`.

    The index lives in `index_dir` (default FOLDER/.dalle-index); a broken one is rebuilt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DalleError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and INDEX_DIR not in p.parts
                   and p.is_file())
    index_dir = index_dir_for(folder, index_dir)
    old: dict[str, tuple[list[int], torch.Tensor]] = {}
    old_bad: dict[str, list[int]] = {}  # unreadable pictures, not retried while unchanged
    meta_path, weights_path = index_dir / "index.json", index_dir / "embeddings.safetensors"
    if meta_path.is_file() and weights_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            saved = load_file(str(weights_path))["embeddings"]
            if (meta.get("model") == model_id and saved.shape == (len(meta["files"]), scorer.embed_dim)
                    and torch.isfinite(saved).all()):
                old = {name: (stat, saved[i]) for i, (name, stat) in enumerate(meta["files"])}
                old_bad = {name: stat for name, stat in meta.get("unreadable", [])}
        except (OSError, ValueError, KeyError, TypeError, IndexError, SafetensorError):
            old, old_bad = {}, {}  # a broken index is rebuilt
    names, stats, embeddings, to_embed, bad = [], [], [], [], []
    for path in files:
        name = str(path.relative_to(folder))
        stat = _stat(path)
        if old_bad.get(name) == stat:
            bad.append((name, stat))
        elif name in old and old[name][0] == stat:
            names.append(name)
            stats.append(stat)
            embeddings.append(old[name][1])
        else:
            to_embed.append((name, stat, path))
    reused = len(names)
    pending_images, pending = [], []
    for name, stat, path in tqdm(to_embed, desc="embedding pictures", disable=len(to_embed) < 64):
        try:
            image = decode_image(path.read_bytes())
        except OSError:  # vanished or unreadable since the listing
            image = None
        if image is None:
            bad.append((name, stat))
            continue
        pending_images.append(image)
        pending.append((name, stat))
    for start in range(0, len(pending_images), batch_size):
        batch = scorer.embed_images(pending_images[start : start + batch_size])
        for (name, stat), vector in zip(pending[start : start + batch_size], batch):
            names.append(name)
            stats.append(stat)
            embeddings.append(vector)
    if bad:
        log.warning("dalle: skipped %d unreadable pictures in %s", len(bad), folder)
    if not names:
        return [], torch.zeros(0, scorer.embed_dim)
    stacked = torch.stack(embeddings).float().contiguous()
    if to_embed or reused != len(old) or len(bad) != len(old_bad):
        index_dir.mkdir(parents=True, exist_ok=True)
        temporary = index_dir / f".embeddings.{os.getpid()}.tmp"
        temporary.unlink(missing_ok=True)  # a new file, never one planted in its place
        save_file({"embeddings": stacked}, str(temporary))
        os.replace(temporary, weights_path)
        write_json_atomic(meta_path, {"model": model_id, "files": [[n, s] for n, s in zip(names, stats)],
                                      "unreadable": [[n, s] for n, s in bad]})
    return [str(folder / name) for name in names], stacked
