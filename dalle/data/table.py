"""A data source read into memory as a table: uint8 pictures (N, 3, S, S) and their captions."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from dalle.config import DataConfig
from dalle.data.sources import open_source
from dalle.errors import DalleError
from dalle.images import pil_to_uint8

log = logging.getLogger(__name__)


def load_table(data: DataConfig, n: int | None = None, split: str | None = None,
               progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Reads up to n pairs (default: `data.n`) of a split of the source into memory.

    Broken files are skipped and counted; more than `data.max_bad_fraction` of them is an
    error, as is a source with no usable pair.
    """
    data = replace(data, split=split or data.split)
    limit = n if n is not None else (data.n or None)
    if data.source == "shapes" and limit is None:
        raise DalleError("an in-memory table of the endless shapes source needs data.n > 0")
    source = open_source(data.source, data, n=limit)
    images, captions = [], []
    bar = tqdm(total=limit, desc=f"reading {data.source}", disable=not progress, leave=False)
    for image, caption in source:
        images.append(pil_to_uint8(image))
        captions.append(caption)
        bar.update(1)
        if limit and len(images) >= limit:
            break
    bar.close()
    if source.skipped:
        log.warning(source.summary())
    if not images:
        raise DalleError(f"no usable pairs in {data.source}")
    total = len(images) + sum(source.skipped.values())
    bad = sum(source.skipped.values()) / max(1, total)
    if bad > data.max_bad_fraction:
        raise DalleError(f"{data.source}: {bad:.0%} of the files are broken (limit: data.max_bad_fraction = "
                         f"{data.max_bad_fraction})")
    return torch.stack(images), captions
