"""`dalle serve`: a page and a JSON API over a `Pipeline`, on FastAPI.

  GET  /                     the page (one hand-written HTML file, no scripts or fonts from outside)
  GET  /api/health           model, device, dtype, queue length and limits
  POST /api/generate         {"prompt", "candidates", "keep", "seed", sampling fields} ->
                             {"images": [{"png_base64", "rank", "clip_score", "seed"}, ...]}
  POST /api/generate/stream  the same, as NDJSON: {"rows", "images"} per frame, then {"done": true, "images"}
  POST /api/edit             {"image_base64", "box": [x0, y0, x1, y1] | "mask_base64", "prompt", ...}
  POST /api/search           {"query", "k"} over the pictures of --images
  POST /api/classify         {"image_base64", "labels": [...]} -> {"label", "probs"}

Validation is the CLI's (`check_request`, `check_sampling`): a bad request gets a 4xx with
{"error": one line}; past the queue, 429 with Retry-After. Nothing the client sends is
used as a path. One model call runs at a time (`dalle.serve.worker`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, Field

from dalle.errors import DalleError
from dalle.inference.editing import read_picture
from dalle.inference.pipeline import Pipeline, check_request
from dalle.inference.scoring import classify, search
from dalle.inference.search_index import build_or_load_index
from dalle.serve.worker import Job, ModelWorker, QueueFull

PAGE = Path(__file__).with_name("page.html")
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_BODY_BYTES = 15 * 1024 * 1024  # a 10 MB picture as base64, and the rest of the request


class Sampling(BaseModel):
    prompt: str = ""
    candidates: int = 8
    keep: int = 4
    seed: int = 0
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    cond_scale: float | None = None
    rerank: bool = True


class EditRequest(Sampling):
    image_base64: str
    box: list[int] | None = Field(default=None, min_length=4, max_length=4)
    mask_base64: str | None = None


class SearchRequest(BaseModel):
    query: str
    k: int = 8


class ClassifyRequest(BaseModel):
    image_base64: str
    labels: list[str]


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def resident_mb() -> float | None:
    """This process's resident memory in MB (Linux /proc; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_upload(text: str, what: str, mode: str = "RGB") -> Image.Image:
    """A base64 picture from the client: at most 10 MB and 4096 x 4096, fully decoded, or a DalleError."""
    if "," in text[:100] and text.startswith("data:"):
        text = text.split(",", 1)[1]  # a data: URL
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DalleError(f"{what} is not base64") from None
    if len(data) > MAX_UPLOAD_BYTES:
        raise DalleError(f"{what} is {len(data) / 1e6:.1f} MB: at most {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
    return read_picture(io.BytesIO(data), what, mode)  # at most 4096 x 4096, fully decoded


class Server:
    """The state behind the routes: the pipeline, its worker, the search folder and the limits."""

    def __init__(self, pipeline: Pipeline, model_name: str, images: Path | None, max_candidates: int,
                 queue: int):
        self.pipeline, self.model_name, self.images = pipeline, model_name, images
        self.max_candidates = max_candidates
        self.worker = ModelWorker(queue)
        self.index: tuple[list[str], torch.Tensor] | None = None

    def check(self, request: Sampling) -> None:
        if not 1 <= request.candidates <= self.max_candidates:
            raise DalleError(f"candidates must be in [1, {self.max_candidates}], got {request.candidates}")
        check_request([request.prompt], request.candidates, request.keep, request.seed)
        self.pipeline.settings(request.temperature, request.top_k, request.top_p, request.cond_scale)

    def sampling(self, request: Sampling) -> dict[str, Any]:
        rerank = request.rerank and self.pipeline.scorer is not None
        return {"candidates": request.candidates, "keep": request.keep, "seed": request.seed,
                "temperature": request.temperature, "top_k": request.top_k, "top_p": request.top_p,
                "cond_scale": request.cond_scale, "rerank_with_clip": rerank}

    def images_json(self, samples: list, seed: int) -> list[dict[str, Any]]:
        return [{"png_base64": png_base64(s.image), "rank": s.rank, "clip_score": s.clip_score, "seed": seed}
                for s in samples]

    async def run(self, request: Request, fn) -> Any:
        """Runs `fn(job)` on the worker; cancels it if the client leaves while it waits."""
        job = self.worker.submit(fn)
        future = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                return future.result()
            if await request.is_disconnected():
                job.cancelled = True
                raise asyncio.CancelledError

    def search_index(self) -> tuple[list[str], torch.Tensor]:
        if self.index is None:  # built (or read) on the worker, on first use
            paths, embeddings = build_or_load_index(self.pipeline.scorer, self.images, model_id=self.model_name)
            self.index = ([str(Path(p).relative_to(self.images)) for p in paths], embeddings)
        return self.index


def create_app(pipeline: Pipeline, model_name: str = "model", images: str | Path | None = None,
               max_candidates: int = 64, queue: int = 16) -> FastAPI:
    """The FastAPI app of `dalle serve` over a loaded pipeline."""
    server = Server(pipeline, model_name, Path(images) if images else None, max_candidates, queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.worker.close()  # on shutdown: the job running finishes, the thread ends

    app = FastAPI(title="dalle", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
    _errors(app, server)
    _routes(app, server)
    return app


def _errors(app: FastAPI, server: Server) -> None:
    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return JSONResponse({"error": f"the request is {int(length) / 1e6:.1f} MB: at most "
                                          f"{MAX_BODY_BYTES // (1024 * 1024)} MB"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(DalleError)
    async def user_error(request: Request, error: DalleError):
        return JSONResponse({"error": str(error).splitlines()[0]}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def bad_fields(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "body"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=400)

    @app.exception_handler(QueueFull)
    async def busy(request: Request, error: QueueFull):
        return JSONResponse({"error": f"busy: {error}; try again"}, status_code=429,
                            headers={"Retry-After": str(server.worker.retry_after())})


def _routes(app: FastAPI, server: Server) -> None:
    pipeline = server.pipeline

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"model": server.model_name, "device": str(pipeline.device), "dtype": str(pipeline.dtype),
                "queue": server.worker.queue_length(), "max_queue": server.worker.size,
                "max_candidates": server.max_candidates, "image_size": pipeline.image_size,
                "sampling": pipeline.sampling.__dict__, "search": server.images is not None,
                "clip": pipeline.scorer is not None, "pid": os.getpid(), "memory_mb": resident_mb()}

    @app.post("/api/generate")
    async def generate(body: Sampling, request: Request) -> dict[str, Any]:
        server.check(body)
        options = server.sampling(body)
        samples = await server.run(request, lambda job: pipeline([body.prompt], **options)[0])
        return {"images": server.images_json(samples, body.seed)}

    @app.post("/api/generate/stream")
    async def generate_stream(body: Sampling, request: Request) -> StreamingResponse:
        server.check(body)
        options = server.sampling(body)
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def work(job: Job) -> None:
            try:
                for frame in pipeline.stream(body.prompt, every_rows=max(1, pipeline.grid // 8), **options):
                    if job.cancelled:
                        return
                    if frame.samples is None:
                        line = {"rows": frame.rows, "images": [png_base64(image) for image in frame.images]}
                    else:
                        line = {"done": True, "images": server.images_json(frame.samples, body.seed)}
                    loop.call_soon_threadsafe(lines.put_nowait, json.dumps(line) + "\n")
            except DalleError as error:
                loop.call_soon_threadsafe(lines.put_nowait, json.dumps({"error": str(error)}) + "\n")
            finally:
                loop.call_soon_threadsafe(lines.put_nowait, None)

        job = server.worker.submit(work)  # QueueFull -> 429 before the response starts

        async def body_lines() -> AsyncIterator[str]:
            try:
                while (line := await lines.get()) is not None:
                    yield line
            finally:  # the client went away (or all was sent): a waiting or running job stops
                job.cancelled = True

        return StreamingResponse(body_lines(), media_type="application/x-ndjson")

    @app.post("/api/edit")
    async def edit(body: EditRequest, request: Request) -> dict[str, Any]:
        server.check(body)
        picture = decode_upload(body.image_base64, "the picture")
        if (body.box is None) == (body.mask_base64 is None):
            raise DalleError("give either box [x0, y0, x1, y1] or mask_base64")
        region = tuple(body.box) if body.box else decode_upload(body.mask_base64, "the mask", mode="L")
        options = server.sampling(body)
        samples = await server.run(request, lambda job: pipeline.edit(picture, region, body.prompt, **options))
        return {"images": server.images_json(samples, body.seed)}

    _clip_routes(app, server)


def _clip_routes(app: FastAPI, server: Server) -> None:
    """CLIP's other two powers: text-to-image search over --images, and zero-shot classification."""
    pipeline = server.pipeline

    @app.post("/api/search")
    async def search_pictures(body: SearchRequest, request: Request) -> dict[str, Any]:
        if server.images is None:
            raise DalleError("this server has no picture folder to search: start it with --images FOLDER")
        if pipeline.scorer is None:
            raise DalleError("this model has no CLIP to search with")
        if not body.query.strip() or len(body.query) > 1000:
            raise DalleError("the query must have 1 to 1000 characters")
        if not 1 <= body.k <= 100:
            raise DalleError(f"k must be in [1, 100], got {body.k}")

        def work(job: Job) -> list[dict[str, Any]]:
            names, embeddings = server.search_index()
            if not names:
                return []
            indices, scores = search(pipeline.scorer, body.query, embeddings, body.k)
            hits = []
            for i, s in zip(indices.tolist(), scores.tolist()):
                try:
                    picture = Image.open(server.images / names[i]).convert("RGB")
                except OSError:  # removed or damaged since the index was built: rebuilt on the next search
                    server.index = None
                    continue
                hits.append({"image": names[i], "score": float(s), "png_base64": png_base64(picture)})
            return hits

        return {"hits": await server.run(request, work)}

    @app.post("/api/classify")
    async def classify_picture(body: ClassifyRequest, request: Request) -> dict[str, Any]:
        if pipeline.scorer is None:
            raise DalleError("this model has no CLIP to classify with")
        labels = [label for label in body.labels if label.strip()]
        if not labels or len(labels) > 100 or any(len(label) > 1000 for label in labels):
            raise DalleError("give 1 to 100 labels of at most 1000 characters")
        if any(_not_utf8(label) for label in labels):  # the answer echoes them, as UTF-8
            raise DalleError("the labels must be UTF-8 text")
        picture = decode_upload(body.image_base64, "the picture")
        probs = await server.run(request, lambda job: classify(pipeline.scorer, [picture], labels)[0].tolist())
        best = max(range(len(labels)), key=probs.__getitem__)
        return {"label": labels[best], "probs": dict(zip(labels, probs))}
