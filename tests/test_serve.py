"""Serve: a real HTTP server on 127.0.0.1 (a free port), concurrent requests batched, bad requests 4xx."""

from __future__ import annotations

import io
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from helpers import fashion_mnist_test_images, run
from PIL import Image

from visiontune.deploy.outputs import task_spec
from visiontune.deploy.session import InferenceSession, checkpoint_datamodule
from visiontune.models.heads import resolve_task
from visiontune.serve import ServerThread, bind_socket, create_app, rename_model_override
from visiontune.training.checkpoints import load_classifier

TIMEOUT = httpx.Timeout(60.0)


def png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    """The checkpoint's service in a background thread; requests wait up to 50 ms to share a batch."""
    predictor = InferenceSession.from_checkpoint(tiny_checkpoint, "cpu")
    app = create_app(predictor, max_batch_size=8, batch_timeout=0.05, max_bytes=50_000, topk=3)
    with ServerThread(app, bind_socket("127.0.0.1", 0)) as running:
        yield running


def expected_labels(ckpt, arrays) -> list[str]:
    model = load_classifier(ckpt)
    transform = checkpoint_datamodule(model).eval_transform()
    with torch.no_grad():
        probs = model.predict_proba(
            torch.stack([transform(Image.fromarray(a).convert("RGB")) for a in arrays])
        )
    return [model.hparams.class_names[int(i)] for i in probs.argmax(1)]


def test_twenty_concurrent_requests_are_batched_and_all_answered_correctly(server, tiny_checkpoint):
    arrays = [a for a, _ in fashion_mnist_test_images(20, start=100)]
    bodies = [png_bytes(a) for a in arrays]
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        before = client.get("/health").json()

        def post(body):
            return client.post("/predict", content=body, headers={"content-type": "application/octet-stream"})

        with ThreadPoolExecutor(max_workers=20) as pool:
            responses = list(pool.map(post, bodies))
        after = client.get("/health").json()
    assert [r.status_code for r in responses] == [200] * 20
    answers = [r.json() for r in responses]
    assert [a["label"] for a in answers] == expected_labels(tiny_checkpoint, arrays)
    for answer in answers:
        assert len(answer["topk"]) == 3 and answer["topk"][0]["label"] == answer["label"]
        assert answer["topk"][0]["prob"] >= answer["topk"][1]["prob"] >= answer["topk"][2]["prob"]
    assert after["requests"] - before["requests"] == 20
    assert after["batches"] - before["batches"] < 20 and after["largest_batch"] > 1  # batched
    assert after["largest_batch"] <= 8


def test_a_multipart_upload_gets_the_same_answer_as_raw_bytes(server):
    body = png_bytes(fashion_mnist_test_images(1, start=7)[0][0])
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        raw = client.post("/predict", content=body).json()
        form = client.post("/predict", files={"file": ("x.png", body, "image/png")}).json()
    assert raw == form


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({"content": b"this is not an image"}, 400, "not an image"),
        ({"content": b""}, 400, "empty"),
        ({"content": b"\x89PNG\r\n\x1a\n" + b"\0" * 60_000}, 413, "max_bytes"),
        ({"files": {"note": ("a.txt", b"text", "text/plain")}}, 400, "not an image"),
        ({"files": {"field": (None, b"value")}}, 400, "no file"),
    ],
)
def test_a_bad_request_is_a_4xx_with_a_json_message_and_the_server_stays_healthy(
    server, kwargs, status, words
):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        response = client.post("/predict", **kwargs)
        assert response.status_code == status
        assert words in response.json()["error"]
        assert client.get("/health").json()["status"] == "ok"
        good = client.post("/predict", content=png_bytes(fashion_mnist_test_images(1)[0][0]))
        assert good.status_code == 200


def test_a_port_in_use_is_one_line_and_exit_code_2(tiny_checkpoint, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run("visiontune.serve", f"ckpt_path={tiny_checkpoint}", f"port={port}",
                     f"hydra.run.dir={tmp_path}", timeout=120)  # fmt: skip
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error:")
        and str(port) in last
        and "in use" in last
        and "Traceback" not in result.stderr
    )


def test_model_equals_onnx_path_is_not_read_as_a_config_group():
    assert rename_model_override(["serve", "model=/x/model.onnx", "port=1", "model_file=y"]) == [
        "serve",
        "model_file=/x/model.onnx",
        "port=1",
        "model_file=y",
    ]


def test_an_exported_onnx_model_serves_the_checkpoint_answers(tiny_checkpoint, tmp_path):
    from helpers import compose_cfg

    from visiontune.export import export

    export(
        compose_cfg([f"ckpt_path={tiny_checkpoint}", "format=onnx"], tmp_path, config_name="export"), patch={}
    )
    arrays = [a for a, _ in fashion_mnist_test_images(4, start=40)]
    app = create_app(
        InferenceSession.from_export(tmp_path / "model.onnx"), max_batch_size=4, batch_timeout=0.01, topk=10
    )
    with ServerThread(app, bind_socket("127.0.0.1", 0)) as running:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as client:
            answers = [client.post("/predict", content=png_bytes(a)).json() for a in arrays]
    torch_predictor = InferenceSession.from_checkpoint(tiny_checkpoint, "cpu")
    direct = torch_predictor([Image.fromarray(a).convert("RGB") for a in arrays])
    for answer, probs in zip(answers, direct, strict=True):
        served = {t["label"]: t["prob"] for t in answer["topk"]}
        assert len(served) == 10
        for name, p in zip(torch_predictor.class_names, probs, strict=True):
            assert abs(served[name] - float(p)) <= 1e-4


class SlowPredictor:
    """A stand-in model: 0.2 s a batch, uniform probabilities, and a log of its batch sizes."""

    class_names = ["a", "b", "c"]
    temperature = 1.0
    source = "slow"
    task = task_spec(resolve_task(None, class_names), [])

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, images):
        import time

        import numpy as np

        self.batch_sizes.append(len(images))
        time.sleep(0.2)
        return np.full((len(images), 3), 1 / 3)


def test_a_full_queue_answers_503_and_the_server_recovers():
    predictor = SlowPredictor()
    app = create_app(predictor, max_batch_size=1, batch_timeout=0.0, max_pending=2)
    body = png_bytes(fashion_mnist_test_images(1)[0][0])
    with ServerThread(app, bind_socket("127.0.0.1", 0)) as running:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as client:
            with ThreadPoolExecutor(max_workers=12) as pool:
                codes = list(pool.map(lambda _: client.post("/predict", content=body).status_code, range(12)))
            assert set(codes) == {200, 503} and codes.count(200) >= 2
            assert client.get("/health").json()["status"] == "ok"
            assert client.post("/predict", content=body).status_code == 200
    assert max(predictor.batch_sizes) == 1  # max_batch_size is a hard cap


class PickyPredictor(SlowPredictor):
    """Fails on any batch holding a 13x13 image, as a model might on an odd input."""

    def __init__(self):
        super().__init__()
        self.attempts = []

    def __call__(self, images):
        self.attempts.append(len(images))
        if any(image.size == (13, 13) for image in images):
            raise RuntimeError("cannot handle 13x13")
        return super().__call__(images)


def test_a_model_failure_fails_only_its_own_request():
    import numpy as np

    predictor = PickyPredictor()
    app = create_app(predictor, max_batch_size=8, batch_timeout=0.2)
    good = png_bytes(fashion_mnist_test_images(1)[0][0])
    odd = png_bytes(np.zeros((13, 13), dtype=np.uint8))
    with ServerThread(app, bind_socket("127.0.0.1", 0)) as running:
        with httpx.Client(base_url=running.url, timeout=TIMEOUT) as client:
            with ThreadPoolExecutor(max_workers=4) as pool:
                responses = list(
                    pool.map(lambda body: client.post("/predict", content=body), [good, odd, good, good])
                )
            assert [r.status_code for r in responses] == [200, 500, 200, 200]
            assert "prediction failed" in responses[1].json()["error"]
            assert client.get("/health").json()["status"] == "ok"
    assert max(predictor.attempts) > 1  # they were batched together, then run one by one
    assert predictor.batch_sizes == [1, 1, 1]
