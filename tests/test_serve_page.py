"""The try-it page (GET /) and the offline /docs of visiontune-serve: the HTTP side with httpx, and the page
in a real browser (Debian's chromium driven by Playwright; the `browser` marker)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import httpx
import pytest
from helpers import SMALL, run, write_images

from visiontune.deploy.session import InferenceSession
from visiontune.serve import ServerThread, bind_socket, create_app

TIMEOUT = httpx.Timeout(60.0)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def page_server(tiny_checkpoint):
    """The tiny checkpoint's service with the default limits (max_bytes 10 MB)."""
    app = create_app(InferenceSession.from_checkpoint(tiny_checkpoint, "cpu"))
    with ServerThread(app, bind_socket("127.0.0.1", 0)) as running:
        yield running


def test_the_page_info_and_docs_are_served_with_no_network_and_the_schema_declares_the_upload(page_server):
    with httpx.Client(base_url=page_server.url, timeout=TIMEOUT) as client:
        page = client.get("/")
        info = client.get("/info").json()
        docs = client.get("/docs").text
        schema = client.get("/openapi.json").json()
        asset = client.get("/static-offline-docs/swagger-ui-bundle.js")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and "http" not in page.text.split("<script>")[1]  # no CDN, no URL
    assert info["source"].endswith("best.ckpt") and info["backbone"] == SMALL
    assert len(info["task"]["heads"][0]["classes"]) == 10 and "test/acc" in info["metrics"]
    assert "/static-offline-docs/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert asset.status_code == 200 and len(asset.content) > 100_000
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert body["application/octet-stream"]["schema"]["format"] == "binary"


def test_a_30_mb_file_is_a_413_with_a_json_error_and_the_server_stays_up(page_server):
    with httpx.Client(base_url=page_server.url, timeout=TIMEOUT) as client:
        response = client.post("/predict", files={"file": ("big.png", b"\x89PNG" + b"\0" * 30_000_000)})
        assert response.status_code == 413 and "max_bytes" in response.json()["error"]
        assert client.get("/health").json()["status"] == "ok"


def launch_chromium(playwright):
    """Debian's chromium, or a skip that says what is missing (never a silent pass)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(
            "browser test: no chromium here (apt-get install chromium; make setup installs it where apt is)"
        )
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])


def predicted_top5(tiny_checkpoint, image: Path, out: Path) -> dict[str, float]:
    """visiontune-predict's top-5 for one image: {label: probability}."""
    result = run(
        "visiontune.predict", f"ckpt_path={tiny_checkpoint}", f"inputs={image}", f"hydra.run.dir={out}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "predictions.csv") as f:
        (row,) = list(csv.DictReader(f))
    return {row[f"top{r}_label"]: float(row[f"top{r}_prob"]) for r in range(1, 6)}


def playwright_or_skip():
    return pytest.importorskip(
        "playwright.sync_api", reason="browser test: playwright is not installed (pip install -e '.[dev]')"
    ).sync_playwright


@pytest.mark.browser
def test_in_a_real_browser_an_uploaded_image_shows_the_top5_of_visiontune_predict(
    page_server, tiny_checkpoint, tmp_path
):
    sync_playwright = playwright_or_skip()
    image = write_images(tmp_path / "in", 1, start=21)[0]
    expected = predicted_top5(tiny_checkpoint, image, tmp_path / "p")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page()
            outside = []  # every request that would leave this machine is refused and recorded
            page.route(
                "**/*",
                lambda route: (
                    route.continue_()
                    if route.request.url.startswith(page_server.url)
                    else (outside.append(route.request.url), route.abort())
                ),
            )
            page.goto(page_server.url + "/")
            page.wait_for_selector("#metrics td")  # /info read: the model and its test metrics shown
            assert SMALL in page.inner_text("#model") and "test/acc" in page.inner_text("#metrics")

            page.set_input_files("#file", str(image))
            page.wait_for_function("document.querySelectorAll('#result .bar').length === 5")
            names = page.locator("#result .bar .name").all_inner_texts()
            values = [
                float(v.rstrip(" %")) / 100 for v in page.locator("#result .bar .value").all_inner_texts()
            ]
            shown = dict(zip(names, values, strict=True))
            assert shown.keys() == expected.keys()
            for label, prob in expected.items():
                assert abs(shown[label] - prob) <= 0.00006  # the page shows 2 decimals of a percent
            assert values == sorted(values, reverse=True)

            for bad, words in (("notes.txt", "not an image"), ("empty.png", "empty")):
                page.set_input_files("#file", str(tmp_path / bad))
                page.wait_for_function("document.getElementById('error').textContent.length > 0")
                assert words in page.inner_text("#error") and page.locator("#result .bar").count() == 0

            page.goto(page_server.url + "/docs")  # Swagger renders from the package's assets
            page.click(".opblock-summary-path[data-path='/predict']", timeout=30_000)
            page.click("button.try-out__btn")
            page.wait_for_selector(".opblock-body input[type=file]")  # the schema's upload field
            assert outside == []
        finally:
            browser.close()
    with httpx.Client(base_url=page_server.url, timeout=TIMEOUT) as client:
        assert client.get("/health").json()["status"] == "ok"


class TwoHeads:
    """A multitask predictor (a multiclass head and a multilabel one) that answers fixed probabilities."""

    source, temperature, class_names = "two_heads.ckpt", 1.0, ["a", "b", "c", "x", "y"]
    task = {
        "name": "multitask",
        "heads": [
            {"name": "kind", "kind": "multiclass", "classes": ["a", "b", "c"], "start": 0, "stop": 3},
            {"name": "tags", "kind": "multilabel", "classes": ["x", "y"], "start": 3, "stop": 5,
             "thresholds": [0.5, 0.5]},
        ],
    }  # fmt: skip

    def __call__(self, images):
        return [[0.1, 0.7, 0.2, 0.9, 0.3]] * len(images)


@pytest.mark.browser
def test_in_a_real_browser_a_multitask_model_shows_each_heads_answer(tmp_path):
    sync_playwright = playwright_or_skip()
    image = write_images(tmp_path, 1)[0]
    with ServerThread(create_app(TwoHeads()), bind_socket("127.0.0.1", 0)) as server, sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("#metrics p")  # no metrics.json: said so
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#result h3")
            assert page.locator("#result h3").all_inner_texts() == ["kind", "tags"]
            bars = page.locator("#result .bar .name").all_inner_texts()
            assert bars == ["b", "c", "a", "x", "y"]  # each head ranked on its own
            assert "labels predicted: x" in page.inner_text("#result")  # y is under its threshold
            assert page.locator("#result .bar.below").count() == 1
        finally:
            browser.close()
