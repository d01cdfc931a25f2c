"""`dalle data fetch emoji` on tiny tarballs built here in the npm layout (never the network)."""

import base64
import hashlib
import io
import json
import os
import stat
import tarfile

import pytest
from PIL import Image

from dalle.cli import main
from dalle.data.emoji import PACKAGES, STYLES, tarball_name

ENTRIES = [
    {"name": "GRINNING FACE", "unified": "1F600", "image": "1f600.png", "category": "Smileys & Emotion",
     "has_img_google": True, "has_img_twitter": True},
    {"name": "", "short_name": "thumbsup", "unified": "1F44D", "image": "1f44d.png", "category": "People & Body",
     "has_img_google": True, "has_img_twitter": True,
     "skin_variations": {"1F3FB": {"image": "1f44d-1f3fb.png", "has_img_google": True, "has_img_twitter": True},
                         "1F3FD": {"image": "1f44d-1f3fd.png", "has_img_google": True, "has_img_twitter": True}}},
    {"name": "HANDSHAKE", "unified": "1F91D", "image": "1f91d.png", "category": "People & Body",
     "has_img_google": True, "has_img_twitter": False,
     "skin_variations": {"1F3FD-1F3FC": {"image": "1f91d-1f3fd-200d-1faf2-1f3fc.png", "has_img_google": True,
                                         "has_img_twitter": True}}},
    {"name": "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "unified": "1F3FB", "image": "1f3fb.png",
     "category": "Component", "has_img_google": True, "has_img_twitter": True},
]


def write_tarball(path, style):
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("package/emoji.json", json.dumps(ENTRIES).encode())
        images = [e["image"] for e in ENTRIES] + [v["image"] for e in ENTRIES for v in
                                                  e.get("skin_variations", {}).values()]
        for index, image in enumerate(images):
            picture = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent, one opaque square
            picture.paste((200, 30 * index % 255, 40, 255), (16, 16, 48, 48))
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            add(f"package/img/{style}/64/{image}", buffer.getvalue())


@pytest.fixture
def tarballs(tmp_path):
    folder = tmp_path / "tarballs"
    folder.mkdir()
    for style in STYLES:
        write_tarball(folder / tarball_name(style), style)
    return folder


def read_folder(folder):
    return {p.stem: p.read_text().strip() for p in folder.glob("*.txt")}


def test_the_dataset_follows_emoji_md(tarballs, tmp_path):
    out = tmp_path / "emoji"
    assert main(["data", "fetch", "emoji", "--out", str(out), "--size", "16", "--tarballs", str(tarballs)]) == 0
    captions = {**read_folder(out / "train"), **read_folder(out / "test")}
    assert captions["google-1f600"] == "grinning face, google style"
    assert captions["twitter-1f44d-1f3fd"] == "thumbsup: medium skin tone, twitter style"  # short_name: no name
    assert captions["twitter-1f91d-1f3fd-200d-1faf2-1f3fc"] == (
        "handshake: medium skin tone, medium-light skin tone, twitter style")
    assert "twitter-1f91d" not in captions and not any("1f3fb" == k.split("-")[1] for k in captions)  # no Component
    assert len(captions) == 11  # 2 styles x (grinning, thumbs, 2 tones, handshake) + Google's base handshake
    picture = Image.open(out / "train" / "google-1f600.png")
    assert picture.size == (16, 16) and picture.mode == "RGB" and picture.getpixel((0, 0)) == (255, 255, 255)
    split = json.loads((out / "split.json").read_text())
    test = set(read_folder(out / "test"))
    assert set(split["held_out"]["style"]) | set(split["held_out"]["tone"]) == test
    for stem in split["held_out"]["style"]:  # a Twitter base emoji whose Google picture is in training
        assert stem.startswith("twitter-") and ("google-" + stem[8:]) in read_folder(out / "train")
    tone_stems = split["held_out"]["tone"]
    assert tone_stems and all(s.replace("twitter-", "google-") in tone_stems for s in tone_stems)  # both styles


def fake_npm(bin_dir, tarballs, corrupt=False):
    """An `npm` that 'downloads' the tiny tarballs and reports their size and integrity as npm does."""
    reports = {}
    for style in STYLES:
        data = (tarballs / tarball_name(style)).read_bytes()
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
        reports[PACKAGES[style]] = {"size": len(data) + (1 if corrupt else 0), "integrity": integrity,
                                    "filename": tarball_name(style), "source": str(tarballs / tarball_name(style))}
    script = bin_dir / "npm"
    script.write_text(f"""#!/usr/bin/env python3
import json, shutil, sys
reports = {json.dumps(reports)!r}
report = json.loads(reports)[sys.argv[2]]
destination = sys.argv[sys.argv.index("--pack-destination") + 1]
shutil.copy(report["source"], destination + "/" + report["filename"])
print(json.dumps([report]))
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_fetching_with_npm_checks_size_and_integrity(tarballs, tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_npm(bin_dir, tarballs)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache"
    assert main(["data", "fetch", "emoji", "--out", str(tmp_path / "a"), "--cache", str(cache)]) == 0
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [tarball_name(s) for s in STYLES] + [tarball_name(s) + ".json" for s in STYLES])
    with open(cache / tarball_name("google"), "ab") as handle:  # damaged in the cache: fetched again
        handle.write(b"x")
    assert main(["data", "fetch", "emoji", "--out", str(tmp_path / "b"), "--cache", str(cache)]) == 0
    fake_npm(bin_dir, tarballs, corrupt=True)  # npm reports another size: refused
    (cache / tarball_name("twitter")).unlink()
    capsys.readouterr()
    assert main(["data", "fetch", "emoji", "--out", str(tmp_path / "c"), "--cache", str(cache)]) == 2
    assert "integrity" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert main(["data", "fetch", "emoji", "--out", str(tmp_path / "d"), "--cache", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "emoji-datasource-google@16.0.0" in err and "emoji-datasource-twitter@16.0.0" in err
