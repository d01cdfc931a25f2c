"""`dalle serve`: the JSON API in-process (every validation path), and the page in a real headless Chromium.

The browser test needs Debian's chromium and chromium-driver, which .ci/run installs: there it
runs, never skipped (DALLE_REQUIRE_BROWSER=1 turns a missing browser into a failure).
"""

import base64
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dalle.data import shapes
from dalle.inference.pipeline import load_pipeline
from dalle.serve.app import create_app

ROOT = Path(__file__).parent.parent


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def huge_png_header() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def client(tiny_pipeline, tmp_path_factory):
    images = tmp_path_factory.mktemp("pictures")
    for index in range(6):
        image, caption = shapes.render("test", 0, index, 32)
        image.save(images / f"{index}.png")
    app = create_app(load_pipeline(tiny_pipeline, device="cpu"), "tiny", images, max_candidates=8, queue=2)
    with TestClient(app) as test_client:
        yield test_client


def test_health_and_generate_follow_the_contract(client):
    health = client.get("/api/health").json()
    assert health["device"] == "cpu" and health["queue"] == 0 and health["image_size"] == 32
    reply = client.post("/api/generate", json={"prompt": "a red circle", "candidates": 3, "keep": 2, "seed": 4})
    assert reply.status_code == 200
    images = reply.json()["images"]
    assert [im["rank"] for im in images] == [1, 2] and all(im["seed"] == 4 for im in images)
    assert images[0]["clip_score"] >= images[1]["clip_score"]
    assert Image.open(io.BytesIO(base64.b64decode(images[0]["png_base64"]))).size == (32, 32)


def test_the_stream_ends_with_the_generated_pictures(client):
    request = {"prompt": "a blue square", "candidates": 2, "keep": 2, "seed": 1}
    lines = [json.loads(line) for line in client.post("/api/generate/stream", json=request).text.splitlines()]
    assert all("rows" in line for line in lines[:-1]) and lines[-1]["done"]
    assert [line["rows"] for line in lines[:-1]] == list(range(1, 8))
    plain = client.post("/api/generate", json=request).json()["images"]
    assert [im["png_base64"] for im in lines[-1]["images"]] == [im["png_base64"] for im in plain]


def test_edit_search_and_classify(client):
    picture = b64_png(shapes.render("test", 0, 2, 32)[0])
    edited = client.post("/api/edit", json={"image_base64": picture, "box": [0, 0, 16, 16], "prompt": "a red circle",
                                            "candidates": 2, "keep": 1})
    assert edited.status_code == 200 and len(edited.json()["images"]) == 1
    hits = client.post("/api/search", json={"query": "a red circle", "k": 3}).json()["hits"]
    assert len(hits) == 3 and all(hit["image"].endswith(".png") and "/" not in hit["image"] for hit in hits)
    probs = client.post("/api/classify", json={"image_base64": picture, "labels": ["a red circle", "a blue square"]})
    assert probs.status_code == 200 and abs(sum(probs.json()["probs"].values()) - 1) < 1e-4


BAD = {
    "a 10 kB prompt": ("/api/generate", {"prompt": "x" * 10_000}),
    "no candidates": ("/api/generate", {"prompt": "a", "candidates": 0}),
    "10,000 candidates": ("/api/generate", {"prompt": "a", "candidates": 10_000}),
    "keep above candidates": ("/api/generate", {"prompt": "a", "candidates": 2, "keep": 3}),
    "NaN temperature": ("/api/generate", {"prompt": "a", "temperature": float("nan")}),
    "a seed past 64 bits": ("/api/generate", {"prompt": "a", "seed": 2**64}),
    "candidates as text": ("/api/generate", {"prompt": "a", "candidates": "many"}),
    "a text file as the picture": ("/api/classify", {"image_base64": base64.b64encode(b"hello").decode(),
                                                     "labels": ["a"]}),
    "not base64": ("/api/classify", {"image_base64": "%%%", "labels": ["a"]}),
    "a 20000x20000 PNG header": ("/api/edit", {"image_base64": base64.b64encode(huge_png_header()).decode(),
                                               "box": [0, 0, 8, 8], "prompt": "a"}),
    "no labels": ("/api/classify", {"image_base64": "", "labels": []}),
    "an empty query": ("/api/search", {"query": " "}),
    "a box and no picture": ("/api/edit", {"box": [0, 0, 8, 8], "prompt": "a"}),
    "a label that is not UTF-8": ("/api/classify", {"image_base64": b64_png(Image.new("RGB", (8, 8))),
                                                    "labels": ["\udcff"]}),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_requests_get_a_4xx_with_one_line_and_the_server_keeps_serving(client, name):
    path, body = BAD[name]
    reply = client.post(path, content=json.dumps(body, allow_nan=True), headers={"Content-Type": "application/json"})
    assert 400 <= reply.status_code < 500, reply.text
    message = reply.json()["error"]
    assert isinstance(message, str) and "\n" not in message and message
    assert client.get("/api/health").status_code == 200


def test_a_picture_removed_after_indexing_is_left_out_of_the_hits(tiny_pipeline, tmp_path):
    for index in range(3):
        shapes.render("test", 0, index, 32)[0].save(tmp_path / f"{index}.png")
    app = create_app(load_pipeline(tiny_pipeline, device="cpu"), "tiny", tmp_path, max_candidates=8, queue=2)
    with TestClient(app) as test_client:
        assert len(test_client.post("/api/search", json={"query": "a", "k": 3}).json()["hits"]) == 3
        (tmp_path / "0.png").unlink()
        for _ in range(2):  # the stale index, then the rebuilt one
            reply = test_client.post("/api/search", json={"query": "a", "k": 3})
            assert reply.status_code == 200
            assert sorted(hit["image"] for hit in reply.json()["hits"]) == ["1.png", "2.png"]


def test_a_huge_body_is_refused_before_it_is_read(client):
    reply = client.post("/api/classify", content=b"{}", headers={"Content-Type": "application/json",
                                                                   "Content-Length": str(50 * 1024 * 1024)})
    assert reply.status_code == 413


def test_past_the_queue_the_answer_is_429_with_retry_after(client):
    worker = client.app.state.server.worker
    release = threading.Event()
    blockers = [worker.submit(lambda job: release.wait(30)) for _ in range(worker.size)]  # the queue is full
    try:
        reply = client.post("/api/generate", json={"prompt": "a", "candidates": 1, "keep": 1})
        assert reply.status_code == 429 and int(reply.headers["Retry-After"]) >= 1
        assert client.get("/api/health").json()["queue"] == worker.size
    finally:
        release.set()
    for job in blockers:
        job.future.result(timeout=30)
    assert client.post("/api/generate", json={"prompt": "a", "candidates": 1, "keep": 1}).status_code == 200


# ----------------------------------------------------------------------------- a real browser


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, port: int, *extra: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "dalle", "serve", "--model", str(model), "--port", str(port),
                                "--device", "cpu", *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1).read()
            return process
        except OSError:
            if process.poll() is not None:
                raise AssertionError(process.stderr.read()) from None
            time.sleep(0.1)
    process.kill()
    raise AssertionError("dalle serve did not answer in 30 s")


def browser_or_skip():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("DALLE_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromium-driver are required here (apt-get install -y chromium chromium-driver)")
        pytest.skip("no chromium + chromedriver on this machine (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_the_page_generates_pictures_in_a_real_browser(tiny_pipeline, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    server = start_server(tiny_pipeline, port)
    browser = browser_or_skip() if server else None
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(browser, 20).until(lambda b: "cpu" in b.find_element(By.ID, "status").text)
        browser.find_element(By.ID, "prompt").send_keys("a red circle")
        browser.find_element(By.ID, "candidates").clear()
        browser.find_element(By.ID, "candidates").send_keys("4")
        browser.find_element(By.ID, "keep").clear()
        browser.find_element(By.ID, "keep").send_keys("3")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results img")) == 3)
        for img in browser.find_elements(By.CSS_SELECTOR, "#results img"):
            src = img.get_attribute("src")
            assert src.startswith("data:image/png;base64,")
            assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size == (32, 32)
        assert browser.find_element(By.ID, "generate-error").text == ""
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()  # SIGTERM: it stops cleanly
        assert server.wait(timeout=30) == 0
