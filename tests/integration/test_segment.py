"""Using a trained model: a tiny PGSeg trained here (its run logs and registers the MLflow
model), then the Segmenter from the run folder, the MLflow model round trip, ``jobs/segment.py``
on a folder (and its resume), and the Ray Serve app on 127.0.0.1 with good and bad input."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from wsss_ray.config import PGSegPretrainConfig, load_config
from wsss_ray.train.driver import run

CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("segment")
    cfg = load_config(
        PGSegPretrainConfig,
        "configs/pgseg/tiny.yaml",
        [
            f"run.output_dir={tmp}",
            "train.max_steps=8",
            "train.ckpt_every=8",
            "train.log_every=4",
            "data.synthetic.num_images=256",
            "data.decode_actors=[1,1]",
            "eval.every=0",
            "tracking.register_as=pgseg_tiny",
        ],
    )
    before = os.environ.get("MLFLOW_TRACKING_URI")
    summary = run(cfg)
    assert summary.metrics["step"] == 8
    # logging the model left the process's MLflow settings as they were: a later run in this
    # process must not be sent to this run's store
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    return tmp, summary


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((70, 90), (48, 64))]


def test_segmenter_from_the_run_folder(trained):
    from wsss_ray import Segmenter

    tmp, summary = trained
    seg = Segmenter.from_checkpoint(tmp / "ray_results" / "pgseg_tiny")
    assert seg.kind == "pgseg"
    results = seg.predict(_images(), class_names="circle, square,triangle")
    for image, r in zip(_images(), results):
        assert r.mask.shape == image.shape[:2] and r.mask.dtype == np.uint8
        assert r.class_names == ["background", *CLASSES]
        assert set(np.unique(r.mask)) <= set(range(4))
        assert sum(r.areas.values()) == pytest.approx(1.0)
    other = seg.predict(_images()[:1], ["cat", "dog"])[0]
    assert other.class_names == ["background", "cat", "dog"] and other.mask.max() <= 2
    overlay = seg.overlay(_images()[0], results[0])
    assert overlay.size[1] >= 70 and overlay.size[0] > 90  # the image plus a legend
    with pytest.raises(ValueError, match="at least one"):
        seg.predict(_images()[:1], " , ")
    with pytest.raises(ValueError, match="at most"):
        seg.predict(_images()[:1], [f"c{i}" for i in range(10_000)])


def test_mlflow_model_round_trip(trained):
    import mlflow
    import pandas as pd

    from wsss_ray import Segmenter
    from wsss_ray.tracking import using_tracking_uri

    tmp, summary = trained
    before = os.environ.get("MLFLOW_TRACKING_URI")
    with using_tracking_uri(summary.tracking_uri):
        _round_trip(tmp, mlflow, pd, Segmenter)
    assert os.environ.get("MLFLOW_TRACKING_URI") == before


def _round_trip(tmp, mlflow, pd, Segmenter):
    model = mlflow.pyfunc.load_model("models:/pgseg_tiny/1")
    images = _images()
    payload = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        payload.append(buf.getvalue())
    out = model.predict(pd.DataFrame({"image": payload, "class_names": [",".join(CLASSES)] * 2}))
    direct = Segmenter.from_checkpoint(tmp / "ray_results" / "pgseg_tiny").predict(images, CLASSES)
    via_uri = Segmenter.from_checkpoint("models:/pgseg_tiny/1").predict(images, CLASSES)
    for row, d, u in zip(out.to_dict("records"), direct, via_uri):
        mask = np.asarray(Image.open(io.BytesIO(row["mask_png"])))
        assert np.array_equal(mask, d.mask) and np.array_equal(u.mask, d.mask)
        assert json.loads(row["classes"]) == d.class_names
        assert json.loads(row["areas"]) == pytest.approx(d.areas)
    info = mlflow.models.get_model_info("models:/pgseg_tiny/1")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image", "class_names"]


def test_segment_job_writes_and_resumes(trained, tmp_path, capsys):
    from jobs import segment

    tmp, _ = trained
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, im in enumerate(_images()):
        Image.fromarray(im).save(photos / f"img{i}.jpg")
    Image.fromarray(_images()[0]).save(photos / "sub" / "deep.png")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "masks"
    run_dir = str(tmp / "ray_results" / "pgseg_tiny")
    args = ["--checkpoint", run_dir, "--classes", ",".join(CLASSES), "--input", str(photos),
            "--out", str(out), "--actors", "1", "1"]  # fmt: skip
    assert segment.main(args) == 0
    text = capsys.readouterr().out
    assert "4 images, 0 done already, 4 to segment" in text and "skipped broken" in text
    for key, size in (("img0", (70, 90)), ("img1", (48, 64)), ("sub/deep", (70, 90))):
        mask = np.asarray(Image.open(out / f"{key}.png"))
        assert mask.shape == size and mask.max() <= 3
        assert Image.open(out / f"{key}_overlay.jpg").size[1] >= size[0]
        doc = json.loads((out / f"{key}.json").read_text())
        assert doc["classes"] == ["background", *CLASSES] and doc["size"] == list(size)
    assert not (out / "broken.png").exists()
    # a rerun tries only the broken image again; nothing it tried worked: exit status 1
    assert segment.main(args) == 1
    text = capsys.readouterr().out
    assert "4 images, 3 done already, 1 to segment" in text
    assert "skipped broken: not an image" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` (a decompression bomb's header, no pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # far fewer pixels than the header claims
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def served(trained):
    import requests
    from ray import serve

    from wsss_ray.serve import app

    tmp, _ = trained
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        app({"checkpoint": str(tmp / "ray_results" / "pgseg_tiny"), "max_pixels": "1000000"}),
        route_prefix="/",
    )
    url = f"http://127.0.0.1:{port}"
    assert requests.get(f"{url}/healthz", timeout=30).text == "ok"
    yield url
    serve.shutdown()


def test_serve_answers_good_and_bad_input(served):
    import requests

    buf = io.BytesIO()
    Image.fromarray(_images()[0]).save(buf, format="JPEG")
    jpeg = buf.getvalue()

    def post(body, classes="circle,square,triangle"):
        params = None if classes is None else {"classes": classes}
        return requests.post(f"{served}/segment", data=body, params=params, timeout=60)

    def as_json(body, classes):
        doc = {"image": base64.b64encode(body).decode(), "classes": classes}
        return requests.post(f"{served}/segment", json=doc, timeout=60)

    page = requests.get(f"{served}/", timeout=30)
    assert page.status_code == 200 and "<form" in page.text
    good = post(jpeg)
    assert good.status_code == 200, good.text
    doc = good.json()
    assert doc["classes"] == ["background", *CLASSES] and doc["size"] == [70, 90]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["mask_png"]))))
    assert mask.shape == (70, 90)
    Image.open(io.BytesIO(base64.b64decode(doc["overlay_jpg"]))).verify()
    assert post(jpeg, classes=None).status_code == 200  # the model's default classes
    same = as_json(jpeg, CLASSES)  # a JSON body: the same answer
    assert same.status_code == 200 and same.json()["mask_png"] == doc["mask_png"]
    cases = {
        "empty body": (post(b""), 400, "empty"),
        "not an image": (post(b"hello, world"), 415, "not an image"),
        "decompression bomb": (post(_png_header(50_000, 50_000)), 413, "MP"),
        "40 MP": (post(_png_header(8000, 5000)), 413, "MP"),
        "empty class list": (post(jpeg, classes=" , "), 400, "class"),
        "10,000 classes": (as_json(jpeg, [f"class {i}" for i in range(10_000)]), 400, "at most"),
        "JSON without an image": (requests.post(f"{served}/segment", json={"x": 1}), 400, "empty"),
    }  # fmt: skip
    for name, (reply, status, words) in cases.items():
        assert reply.status_code == status, (name, reply.status_code, reply.text)
        assert words in reply.json()["error"], (name, reply.json())
        assert "\n" not in reply.json()["error"]
    assert requests.get(f"{served}/nope", timeout=30).status_code == 404
    assert post(jpeg).status_code == 200  # the replica survived all of it


def _chrome():
    """Headless Chromium through selenium (Debian's chromium + chromium-driver, which
    ``.ci/run`` installs); None where they are missing."""
    import shutil

    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None or not shutil.os.path.exists(driver):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_the_web_page_in_a_real_browser(served, tmp_path):
    """Upload an image, type class names, press the button: the overlay appears."""
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chrome()
    if browser is None:
        pytest.skip("no chromium + chromium-driver here (.ci/run installs them)")
    photo = tmp_path / "photo.png"
    Image.fromarray(_images()[0]).save(photo)
    try:
        browser.get(f"{served}/")
        browser.find_element(By.ID, "image").send_keys(str(photo))
        browser.find_element(By.ID, "classes").send_keys("circle, square, triangle")
        browser.find_element(By.ID, "go").click()
        img = WebDriverWait(browser, 60).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "#overlay[alt='overlay']"))
        )
        assert img.get_attribute("src").startswith("data:image/jpeg;base64,")
        assert img.get_attribute("data-classes") == "background,circle,square,triangle"
        WebDriverWait(browser, 30).until(
            lambda b: b.execute_script("return document.getElementById('overlay').naturalWidth")
        )
        assert browser.execute_script("return document.getElementById('overlay').naturalWidth") > 90
        assert "%" in browser.find_element(By.ID, "areas").text
        browser.save_screenshot(str(tmp_path / "page.png"))
    finally:
        browser.quit()
