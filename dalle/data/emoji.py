"""The emoji caption dataset of ../shared/EMOJI.md: Google's and Twitter's emoji with their names.

`dalle data fetch emoji --out DIR [--size 32]` gets the two npm tarballs (`npm pack`, cached
and checked by size and sha512 integrity), reads them with `tarfile`, and writes
DIR/train/ and DIR/test/ (`STEM.png` + `STEM.txt`, the `folder:` format) and DIR/split.json.

Our held-out split (seeded) is of the two kinds EMOJI.md names:
- style: the Twitter picture of a base emoji (no skin tone) whose Google picture is in
  training: the emoji and the style are known, never together;
- tone: an (emoji, one skin tone) pair, both styles: the emoji is known in other tones and
  the tone on other emoji.
Everything else is training data.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import random
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from dalle.checkpoint import atomic_directory, write_json_atomic
from dalle.errors import DalleError

log = logging.getLogger(__name__)

VERSION = "16.0.0"
STYLES = ("google", "twitter")
PACKAGES = {style: f"emoji-datasource-{style}@{VERSION}" for style in STYLES}
TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
         "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone"}


@dataclass
class Pair:
    """One picture of the dataset, not yet decoded."""

    stem: str  # STYLE-IMAGE, e.g. google-1f600
    style: str
    member: str  # its path in the tarball
    caption: str
    emoji: str  # the entry's unified code, shared by its styles and tones
    tones: tuple[str, ...]  # the skin tones of a variation (code points); () for a base emoji


def tarball_name(style: str) -> str:
    return f"emoji-datasource-{style}-{VERSION}.tgz"


def sha512_integrity(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def fetch_tarballs(cache: Path) -> dict[str, Path]:
    """The two tarballs in `cache`, downloaded with `npm pack` when missing or damaged.

    Each download's size and sha512 integrity (as npm reports them) are recorded beside it
    and checked again whenever the cached file is used."""
    cache.mkdir(parents=True, exist_ok=True)
    found = {}
    for style in STYLES:
        path, record = cache / tarball_name(style), cache / (tarball_name(style) + ".json")
        if path.is_file() and record.is_file() and _matches(path, json.loads(record.read_text())):
            found[style] = path
            continue
        if shutil.which("npm") is None:
            raise DalleError(f"npm is needed to download the emoji pictures: install Node.js, or download "
                             f"{PACKAGES['google']} and {PACKAGES['twitter']} (npm pack) into {cache}")
        log.info("downloading %s with npm pack", PACKAGES[style])
        done = subprocess.run(["npm", "pack", PACKAGES[style], "--json", "--pack-destination", str(cache)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["npm failed"])[-1]
            raise DalleError(f"npm pack {PACKAGES[style]} failed: {last}")
        info = json.loads(done.stdout)[0]
        expected = {"size": info["size"], "integrity": info["integrity"]}
        if not _matches(path, expected):
            raise DalleError(f"{path}: size or sha512 integrity differs from what npm reported; delete it and retry")
        write_json_atomic(record, expected)
        found[style] = path
    return found


def _matches(path: Path, expected: dict) -> bool:
    return path.stat().st_size == expected.get("size") and sha512_integrity(path) == expected.get("integrity")


def read_pairs(tarballs: dict[str, Path]) -> tuple[list[Pair], dict[str, tarfile.TarFile]]:
    """Every (entry, style) and skin variation with a picture, as EMOJI.md lists them."""
    pairs, archives = [], {}
    for style, path in tarballs.items():
        try:
            archive = tarfile.open(path)
            entries = json.load(archive.extractfile("package/emoji.json"))
        except (tarfile.TarError, OSError, KeyError, ValueError, AttributeError) as error:
            raise DalleError(f"{path} is not an emoji-datasource tarball ({error})") from None
        archives[style] = archive
        members = set(archive.getnames())
        for entry in entries:
            if entry.get("category") == "Component":
                continue
            name = (entry.get("name") or entry.get("short_name") or "").lower()
            candidates = [(entry, None)] + [(variation, key) for key, variation in
                                            (entry.get("skin_variations") or {}).items()]
            for item, key in candidates:
                member = f"package/img/{style}/64/{item['image']}"
                if not item.get(f"has_img_{style}") or member not in members:
                    continue
                tones = list(dict.fromkeys(code for code in (key or "").split("-") if code in TONES))
                caption = name + (": " + ", ".join(TONES[t] for t in tones) if tones else "") + f", {style} style"
                pairs.append(Pair(f"{style}-{item['image'].removesuffix('.png')}", style, member, caption,
                                  entry["unified"], tuple(tones)))
    return pairs, archives


def split_pairs(pairs: list[Pair], seed: int, style_held: int, tone_held: int) -> dict[str, list[str]]:
    """The stems of the held-out pairs by kind (seeded); the rest is training data."""
    rng = random.Random(seed)
    by_stem = {pair.stem: pair for pair in pairs}
    google_base = {p.emoji for p in pairs if p.style == "google" and not p.tones}
    style = sorted(p.stem for p in pairs if p.style == "twitter" and not p.tones and p.emoji in google_base)
    one_tone = sorted({(p.emoji, p.tones) for p in pairs if len(p.tones) == 1})
    held_tones = set(rng.sample(one_tone, min(tone_held, len(one_tone))))
    tone = sorted(p.stem for p in pairs if (p.emoji, p.tones) in held_tones)
    style = sorted(rng.sample(style, min(style_held, len(style))))
    assert not set(style) & set(tone) and all(stem in by_stem for stem in style + tone)
    return {"style": style, "tone": tone}


def to_picture(data: bytes, size: int) -> Image.Image:
    """A 64-px RGBA emoji on white, RGB, resized to size x size with Lanczos."""
    with Image.open(io.BytesIO(data)) as image:
        rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    picture = Image.alpha_composite(white, rgba).convert("RGB")
    return picture if picture.size == (size, size) else picture.resize((size, size), Image.Resampling.LANCZOS)


def build_emoji(out: str | Path, size: int = 32, seed: int = 0, cache: str | Path | None = None,
                tarballs: str | Path | None = None, style_held: int = 200, tone_held: int = 60) -> dict:
    """Writes OUT/train, OUT/test and OUT/split.json; returns the split's summary.

    Args:
        out: the dataset folder (replaced atomically).
        size: the picture side.
        seed: the split's seed.
        cache: where the tarballs are kept (default ~/.cache/dalle/emoji).
        tarballs: a folder that already holds the two tarballs (no download, no integrity record).
        style_held, tone_held: how many held-out style pictures and (emoji, tone) pairs.
    """
    if tarballs is not None:
        paths = {style: Path(tarballs) / tarball_name(style) for style in STYLES}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise DalleError(f"missing tarball(s): {', '.join(missing)}")
    else:
        paths = fetch_tarballs(Path(cache) if cache else Path.home() / ".cache" / "dalle" / "emoji")
    pairs, archives = read_pairs(paths)
    held = split_pairs(pairs, seed, style_held, tone_held)
    test = set(held["style"]) | set(held["tone"])
    with atomic_directory(out) as tmp:
        for folder in ("train", "test"):
            (tmp / folder).mkdir()
        for pair in tqdm(pairs, desc="emoji pictures", leave=False):
            folder = tmp / ("test" if pair.stem in test else "train")
            data = archives[pair.style].extractfile(pair.member).read()
            to_picture(data, size).save(folder / f"{pair.stem}.png")
            (folder / f"{pair.stem}.txt").write_text(pair.caption + "\n", encoding="utf-8")
        summary = {"version": VERSION, "size": size, "seed": seed, "pairs": len(pairs),
                   "train": len(pairs) - len(test), "test": len(test),
                   "kinds": {"style": "the Twitter picture of a base emoji whose Google picture is in train",
                             "tone": "an (emoji, one skin tone) pair, both styles"},
                   "held_out": held}
        write_json_atomic(tmp / "split.json", summary)
    for archive in archives.values():
        archive.close()
    return summary
