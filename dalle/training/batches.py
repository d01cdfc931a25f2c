"""Deterministic batches: `batch_at(step)` is a pure function of the step.

Because a batch depends only on the step (an epoch permutation seeded by the epoch, or
endless procedural items, or a stream skipped to its position), resuming a run needs only
the step, and gives bit-identical weights to a run that was never stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import PartialState

from dalle.config import Config, TrainConfig
from dalle.data import shapes
from dalle.data.sources import ShardedStream, open_source
from dalle.data.table import load_table
from dalle.data.twin_pictures import shape_twin
from dalle.errors import DalleError
from dalle.images import pil_to_uint8


class EmptyStreamError(DalleError):
    """The data stream yields no usable pair at all."""


@dataclass
class TableBatches:
    """Batches from an in-memory table, reshuffled every epoch by a seeded permutation.

    `columns` maps a name to a tensor or list with one row per item; `batch_at(step)`
    gives the same rows for the same step on any run.
    """

    columns: dict[str, Any]
    batch_size: int
    seed: int = 0
    _perm_epoch: int = field(default=-1, repr=False)
    _perm: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def indices_at(self, step: int) -> torch.Tensor:
        n = len(self)
        start = step * self.batch_size
        rows = []
        while len(rows) < self.batch_size:
            epoch, offset = divmod(start + len(rows), n)
            if epoch != self._perm_epoch:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm, self._perm_epoch = torch.randperm(n, generator=generator), epoch
            take = min(self.batch_size - len(rows), n - offset)
            rows.extend(self._perm[offset : offset + take].tolist())
        return torch.tensor(rows)

    def batch_at(self, step: int) -> dict[str, Any]:
        index = self.indices_at(step)
        batch = {}
        for name, column in self.columns.items():
            batch[name] = column[index] if isinstance(column, torch.Tensor) else [column[i] for i in index]
        return batch


@dataclass
class FunctionBatches:
    """Endless batches from a function of the item index (procedural data)."""

    make: Callable[[list[int]], dict[str, Any]]
    batch_size: int

    def batch_at(self, step: int) -> dict[str, Any]:
        return self.make(list(range(step * self.batch_size, (step + 1) * self.batch_size)))


@dataclass
class MappedBatches:
    """Another batch source with a function applied to each batch (e.g. images -> dVAE codes)."""

    inner: Any
    fn: Callable[[dict[str, Any]], dict[str, Any]]

    @property
    def sharded(self) -> bool:
        return getattr(self.inner, "sharded", False)

    def batch_at(self, step: int) -> dict[str, Any]:
        return self.fn(self.inner.batch_at(step))


def collate_pairs(items: list[tuple[np.ndarray, str]]) -> dict[str, Any]:
    """(H, W, 3) uint8 arrays + captions -> {"images": uint8 (B, 3, H, W), "captions": [...]}."""
    images = torch.from_numpy(np.stack([image for image, _ in items])).permute(0, 3, 1, 2).contiguous()
    return {"images": images, "captions": [caption for _, caption in items]}


class StreamBatches:
    """Batches read in order from a streaming source; each process reads only its own share.

    `batch_at(step)` expects steps in order; asked for another step (a resumed run), it
    restarts the stream and skips to it, so the data position is the step itself. When
    the stream ends, the next epoch starts from its beginning.
    """

    sharded = True

    def __init__(self, dataset: torch.utils.data.IterableDataset, batch_size: int, num_workers: int = 0):
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                                  collate_fn=collate_pairs)
        self._iterator = None
        self._position = 0

    def _next(self) -> dict[str, Any]:
        try:
            return next(self._iterator)
        except StopIteration:  # a new epoch
            self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                raise EmptyStreamError("the data stream is empty: no usable pairs") from None

    def batch_at(self, step: int) -> dict[str, Any]:
        if self._iterator is None or step != self._position:
            self._iterator, self._position = iter(self.loader), 0
            while self._position < step:
                self._next()
                self._position += 1
        self._position += 1
        return self._next()


def shard(batch: dict[str, Any], index: int, count: int) -> dict[str, Any]:
    """This process's rows of a global batch (rows index, index + count, ...)."""
    if count == 1:
        return batch
    return {k: v[index::count] for k, v in batch.items()}


def shapes_batch_maker(config: Config, twins: bool = False):
    """Endless shapes: item i of the training split, rendered on demand; with `twins`, each
    item's shape twin too (`twin_images`, `twin_captions`: `dalle.data.twin_pictures`)."""
    data = config.data
    shapes.check_size(data.size)  # before the stage's progress bar starts

    def make(indices: list[int]) -> dict[str, Any]:
        pairs = [shapes.render(data.split, data.seed, i, data.size, data.paraphrase_prob, data.one_object_share)
                 for i in indices]
        batch = {"images": torch.stack([pil_to_uint8(p[0]) for p in pairs]), "captions": [p[1] for p in pairs]}
        if twins:
            drawn = [shape_twin(data.split, data.seed, i, data.size, data.one_object_share) for i in indices]
            batch["twin_images"] = torch.stack([pil_to_uint8(t[0]) for t in drawn])
            batch["twin_captions"] = [t[1] for t in drawn]
        return batch

    return make


def is_streaming(config: Config) -> bool:
    return config.data.streaming or config.data.source.startswith("wds:")


def image_caption_batches(config: Config, train: TrainConfig, progress: bool = True, twins: bool = False):
    """Deterministic batches of {"images": uint8, "captions": list[str]} for a stage (`twins`:
    plus each item's shape twin, on procedural shapes only)."""
    batch_size, seed = train.batch_size, train.seed
    procedural = config.data.source == "shapes" and not config.data.n
    if twins and not procedural:
        raise DalleError("shape twins are drawn for the procedural shapes data only (data.source: shapes, no data.n)")
    if procedural:
        return FunctionBatches(shapes_batch_maker(config, twins), batch_size)
    if is_streaming(config):  # each process reads its own share: batch_size / processes rows
        state = PartialState()
        if batch_size % state.num_processes:
            raise DalleError(f"batch_size {batch_size} does not split over {state.num_processes} processes")
        stream = ShardedStream(lambda: open_source(config.data.source, config.data), state.process_index,
                               state.num_processes)
        return StreamBatches(stream, batch_size // state.num_processes, train.num_workers)
    images, captions = load_table(config.data, progress=progress)
    return TableBatches({"images": images, "captions": captions}, batch_size, seed)
