"""`python -m visiontune.serve ckpt_path=PATH | model=PATH.onnx [port=8000]`: an HTTP service (FastAPI + uvicorn).

- `POST /predict`: one image, as the raw request body (any content type) or as a file in a
  multipart form. Answers `{"label", "prob", "topk": [{"label", "prob"}, ...]}`, probabilities
  being softmax(logits / temperature) with the model's temperature.
  A multilabel model answers `{"labels": [{"label", "prob"}, ...], "probs": {label: prob}}` (the labels
  at or above their thresholds), a multitask one `{"heads": {<head>: <its answer>}}`.
- `GET /health`: `{"status": "ok", ...}` with request and batch counters.
- `GET /`: a page to try the model in a browser (pick or drop an image: the top-5 as bars, each head's
  answer for multilabel and multitask models, the model's classes and test metrics), plain HTML and JS
  shipped in the package (deploy/page/). `GET /info`: what the page shows, as JSON. `GET /docs`: the
  API's Swagger page, its assets served from the `fastapi-offline` package: both work offline.
- `adapters='{fmnist: A.safetensors, digits: B.safetensors}'` serves several adapter files of
  parameter-efficient runs on one backbone, which they share in memory: `POST /predict?task=fmnist`
  (a task it does not have: 404 with the names; none named: 400).
- Requests that arrive together are run as one batch: up to `max_batch_size` images, collected for
  at most `batch_timeout` seconds after the first one (a small asyncio queue in front of one model
  thread; see MicroBatcher).
- Not an image, an empty body: 400; over `max_bytes`, or an image over `max_pixels` (refused from its
  header, before decoding: a pixel bomb never reaches memory): 413; `max_pending` requests already in
  hand (waiting or running): 503; always a JSON `{"error": ...}`, and the server keeps serving.

A checkpoint runs in PyTorch with the training eval transform; an .onnx file runs in onnxruntime
with the preprocess.json beside it (`visiontune.export` writes both), so the service needs no
checkpoint at all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import hydra
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from omegaconf import DictConfig
from starlette.concurrency import run_in_threadpool

from visiontune.cli import CONF_DIR, run_cli
from visiontune.data.images import DEFAULT_MAX_PIXELS, ImageTooLarge, open_image
from visiontune.deploy.outputs import describe
from visiontune.deploy.session import InferenceSession, device_setting
from visiontune.errors import UserError

log = logging.getLogger("visiontune")
PAGE = Path(__file__).parent / "deploy" / "page" / "index.html"
# /predict's request body in the OpenAPI schema, so that /docs offers an upload: a multipart file or raw bytes
IMAGE_BODY = {
    "required": True,
    "description": "one image: a file in a multipart form, or the raw bytes as the request body",
    "content": {
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["file"],
                       "properties": {"file": {"type": "string", "format": "binary"}}},
        },
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}  # fmt: skip
TASK_PARAMETER = {"name": "task", "in": "query", "required": True, "schema": {"type": "string"},
                  "description": "which task's adapter answers"}  # fmt: skip


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# the model behind the service is a deploy.session.InferenceSession: a list of RGB images -> probabilities


class MicroBatcher:
    """Collects concurrent requests into batches for one model thread.

    The first waiting request opens a batch; it closes at `max_batch_size` items or `batch_timeout`
    seconds later, whichever comes first, and runs in a single worker thread (so the event loop keeps
    accepting requests meanwhile). If a batch fails, its items are run one by one, so only the
    request that caused it gets the error.
    """

    def __init__(self, fn, max_batch_size: int, batch_timeout: float):
        self.fn = fn
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_timeout = float(batch_timeout)
        self.queue: asyncio.Queue | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batches = self.items = self.largest = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.batch_timeout
            while len(batch) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            self.batches += 1
            self.items += len(batch)
            self.largest = max(self.largest, len(batch))
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self.executor, self.fn, items)
            except Exception:  # noqa: BLE001 - find the culprit: one by one
                results = [await self._run_one(loop, item) for item in items]
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def _run_one(self, loop, item):
        try:
            return (await loop.run_in_executor(self.executor, self.fn, [item]))[0]
        except Exception as exc:  # noqa: BLE001 - handed to the one waiting request
            return exc


def decode(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """Request bytes -> RGB image, or BadRequest(400; 413 over `max_pixels`, before decoding) saying why not."""
    from PIL import Image

    if not data:
        raise BadRequest(400, "empty request: send the image as the request body or as a multipart file")
    try:
        image = open_image(bytes(data), max_pixels)
    except ImageTooLarge as exc:
        fix = "send a smaller image, or start the service with a higher max_pixels="
        raise BadRequest(413, f"image too large: {exc}; {fix}") from None
    except Image.UnidentifiedImageError:
        raise BadRequest(400, "not an image: the bytes are in no image format PIL can read") from None
    except Exception as exc:
        reason = (str(exc).splitlines() or [""])[0][:100]
        raise BadRequest(400, f"not a readable image ({type(exc).__name__}: {reason})") from None
    return image


async def read_body(request, max_bytes: int) -> bytes:
    """The body, refused (413) as soon as it passes max_bytes (Content-Length or the bytes read)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise BadRequest(413, f"request of {int(length)} bytes is over max_bytes={max_bytes}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise BadRequest(413, f"request is over max_bytes={max_bytes}")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request, max_bytes: int) -> bytes:
    """The image's bytes: the first file of a multipart form, else the raw body."""
    from starlette.datastructures import UploadFile

    body = await read_body(request, max_bytes)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return body
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as exc:
        raise BadRequest(400, f"malformed multipart form ({type(exc).__name__})") from None
    files = [v for v in form.values() if isinstance(v, UploadFile)]
    if not files:
        raise BadRequest(
            400, "the multipart form has no file: send the image as a file field (e.g. -F file=@x.png)"
        )
    return await files[0].read()


def model_metrics(source: str) -> dict:
    """The test metrics (else the val ones) of the metrics.json nearest the model: in its folder or up to
    two above it (a run dir holds checkpoints/best.ckpt), or inside it (a Hub folder)."""
    path = Path(source)
    folders = ([path] if path.is_dir() else []) + [path.parent, path.parent.parent, path.parent.parent.parent]
    for folder in folders:
        try:
            metrics = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(metrics, dict):
            continue
        for prefix in ("test/", "val/"):
            found = {k: v for k, v in metrics.items() if k.startswith(prefix) and isinstance(v, int | float)}
            if found:
                return found
    return {}


def model_info(p) -> dict:
    """What the page shows of a predictor: its file, backbone, task (heads and classes) and metrics."""
    model, spec = getattr(p, "model", None), getattr(p, "spec", None)
    if model is not None:
        backbone = str(model.hparams.get("model", {}).get("backbone", ""))
    else:
        backbone = str((spec or {}).get("backbone", ""))
    return {"source": p.source, "backbone": backbone, "task": p.task,
            "temperature": p.temperature, "metrics": model_metrics(p.source)}  # fmt: skip


def add_pages(app: FastAPI, info: dict) -> None:
    """GET / (the try-it page) and GET /info."""

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/info")
    async def about_model():
        """The model (or each task's model): file, backbone, heads and classes, temperature, test metrics."""
        return info


def create_app(predictor, max_batch_size: int = 16, batch_timeout: float = 0.01, max_bytes: int = 10_000_000,
               topk: int = 5, max_pending: int = 256,
               max_pixels: int | None = DEFAULT_MAX_PIXELS):  # fmt: skip
    """The FastAPI app around `predictor` (an InferenceSession, or any callable: list of RGB images ->
    probabilities (N, outputs), with `class_names`, `temperature`, `source` and `task`, the task_spec),
    or around several, {task name: predictor}, which `POST /predict?task=<name>` picks from."""
    named = isinstance(predictor, Mapping)
    predictors = dict(predictor) if named else {None: predictor}
    batchers = {name: MicroBatcher(p, max_batch_size, batch_timeout) for name, p in predictors.items()}
    ks = {name: max(1, min(int(topk), len(p.class_names))) for name, p in predictors.items()}  # top-k shown
    started = time.time()
    pending = [0]  # requests admitted and not answered yet (the event loop is one thread: no lock)

    @asynccontextmanager
    async def lifespan(app):
        for batcher in batchers.values():
            batcher.start()
        yield
        for batcher in batchers.values():
            await batcher.stop()

    # fastapi-offline: FastAPI whose /docs loads Swagger's assets from its package, not from a CDN
    app = FastAPIOffline(title="visiontune", lifespan=lifespan, redoc_url=None)
    if named:
        add_pages(app, {"tasks": {name: model_info(p) for name, p in predictors.items()}})
    else:
        add_pages(app, model_info(predictor))
    app.state.batchers = batchers
    app.state.batcher = next(iter(batchers.values()))

    def about(p, batcher) -> dict:
        return {
            "model": p.source,
            "classes": len(p.class_names),
            "temperature": p.temperature,
            "task": p.task["name"],
            "requests": batcher.items,
            "batches": batcher.batches,
            "largest_batch": batcher.largest,
        }

    @app.get("/health")
    async def health():
        status = {"status": "ok", "max_batch_size": app.state.batcher.max_batch_size}
        if named:
            status["tasks"] = {name: about(predictors[name], b) for name, b in batchers.items()}
        else:
            status.update(about(predictor, app.state.batcher))
        return {**status, "uptime_s": round(time.time() - started, 1)}

    extra = {"requestBody": IMAGE_BODY, **({"parameters": [TASK_PARAMETER]} if named else {})}

    @app.post("/predict", openapi_extra=extra)
    async def predict(request: Request):
        """One image -> each head's answer: the top-k labels with probabilities (multiclass), the labels
        above their thresholds (multilabel), or both per head (multitask)."""
        task = request.query_params.get("task")
        if named and task not in predictors:
            listed = ", ".join(predictors)
            if task is None:
                return JSONResponse({"error": f"name a task: /predict?task=<{listed}>"}, status_code=400)
            return JSONResponse({"error": f"unknown task {task!r}; the tasks are {listed}"}, status_code=404)
        if not named and task is not None:
            return JSONResponse(
                {"error": f"task={task}: this service runs one model (no ?task=)"}, status_code=404
            )
        if pending[0] >= max_pending:
            return JSONResponse(
                {"error": f"busy: {max_pending} requests in hand; retry later"}, status_code=503
            )
        pending[0] += 1
        try:
            return await answer(request, predictors[task], batchers[task], ks[task])
        finally:
            pending[0] -= 1

    async def answer(request: Request, p, batcher, k: int):
        try:
            data = await image_bytes(request, max_bytes)
            image = await run_in_threadpool(decode, data, max_pixels)
        except BadRequest as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        try:
            probs = np.asarray(await batcher.submit(image), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - the model failed on this image: a JSON 500, not a crash
            log.exception("prediction failed")
            return JSONResponse({"error": f"prediction failed ({type(exc).__name__})"}, status_code=500)
        return describe(probs, p.task, k)

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a UserError if the port is taken (checked before the model loads)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse a port in TIME_WAIT
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): the port is in use or not allowed. "
            "Fix: port=<another port>, or stop the other server"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def make_predictor(cfg: DictConfig) -> InferenceSession | dict[str, InferenceSession]:
    ckpt, onnx, adapters = cfg.get("ckpt_path"), cfg.get("model_file"), cfg.get("adapters")
    if sum(bool(x) for x in (ckpt, onnx, adapters)) != 1:
        raise UserError(
            "give exactly one of ckpt_path=<best.ckpt>, model=<model.onnx> or adapters='{task: adapter.safetensors, ...}'"
        )
    if adapters:
        return InferenceSession.from_adapters(adapters, device_setting(cfg))
    if onnx:
        if not str(onnx).endswith(".onnx"):
            raise UserError(f"model={onnx} is not an .onnx file. Fix: model=<export run dir>/model.onnx")
        return InferenceSession.from_export(str(onnx))
    return InferenceSession.from_checkpoint(str(ckpt), device_setting(cfg))


class ServerThread:
    """Run the app with uvicorn in a background thread on an open socket (tests, benchmarks)."""

    def __init__(self, app, sock: socket.socket, log_level: str = "warning"):
        import uvicorn

        self.sock = sock
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def serve(cfg: DictConfig) -> None:
    import uvicorn

    for key in ("max_batch_size", "max_bytes", "topk", "max_pending"):
        if type(cfg[key]) is not int or cfg[key] < 1:
            raise UserError(f"{key}={cfg[key]} must be a whole number, at least 1")
    if (
        isinstance(cfg.batch_timeout, bool)
        or not isinstance(cfg.batch_timeout, int | float)
        or cfg.batch_timeout < 0
    ):
        raise UserError(f"batch_timeout={cfg.batch_timeout} must be a number of seconds, at least 0")
    max_pixels = cfg.get("max_pixels", DEFAULT_MAX_PIXELS)
    if max_pixels is not None and (type(max_pixels) is not int or max_pixels < 1):
        raise UserError(f"max_pixels={max_pixels} must be a whole number of pixels, at least 1 (null = none)")
    port = int(cfg.port) if str(cfg.port).isdigit() else 0  # an int, or digits (e.g. from ${oc.env:PORT})
    if not 1 <= port <= 65535:
        raise UserError(f"port={cfg.port} is not a TCP port: give a whole number in 1..65535, e.g. port=8000")
    sock = bind_socket(str(cfg.host), port)  # a taken port fails before the model loads
    try:
        predictor = make_predictor(cfg)
        app = create_app(predictor, int(cfg.max_batch_size), float(cfg.batch_timeout), int(cfg.max_bytes),
                         int(cfg.topk), int(cfg.max_pending), max_pixels)  # fmt: skip
        host, port = sock.getsockname()[:2]
        what = f"tasks {', '.join(predictor)}" if isinstance(predictor, Mapping) else predictor.source
        print(f"serving {what} on http://{host}:{port} (try it: GET /; POST /predict, GET /docs, GET /health)",
              flush=True)  # fmt: skip
        uvicorn.Server(uvicorn.Config(app, log_level=str(cfg.log_level))).run(sockets=[sock])
    finally:
        sock.close()


def rename_model_override(argv: list[str]) -> list[str]:
    """`model=PATH.onnx` -> `model_file=PATH.onnx`: Hydra reads `model=` as a choice of the conf/model group."""
    return [f"model_file={a[len('model=') :]}" if a.startswith("model=") else a for a in argv]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def _hydra_main(cfg: DictConfig) -> None:
    run_cli(serve, cfg)


def main() -> None:
    sys.argv = rename_model_override(sys.argv)
    _hydra_main()


if __name__ == "__main__":
    main()
