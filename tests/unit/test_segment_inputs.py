"""What jobs/segment.py reads: folders, files, globs, .tar shards and object-store prefixes
(through pyarrow's filesystems; file:// stands in for s3:// here), with keys that name the
outputs, and clear errors for inputs that match nothing or collide."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from wsss_ray.inference.batch import is_done, list_inputs, outputs, read_bytes


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_every_kind_of_input(tmp_path):
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    (tmp_path / "photos" / "a.jpg").write_bytes(_jpeg())
    (tmp_path / "photos" / "sub" / "b.png").write_bytes(_jpeg())
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path / "c.jpg").write_bytes(_jpeg())
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        info = tarfile.TarInfo("k1.jpg")
        info.size = len(_jpeg())
        tar.addfile(info, io.BytesIO(_jpeg()))
    rows = list_inputs([str(tmp_path / "photos"), str(tmp_path / "c.jpg"), str(tmp_path / "*.tar")])
    assert [r["key"] for r in rows] == ["a", "sub/b", "c", "shard-0/k1"]
    assert all(read_bytes(r) == _jpeg() for r in rows)
    uri = list_inputs([f"file://{tmp_path}/photos"])
    assert [r["key"] for r in uri] == ["a", "sub/b"] and read_bytes(uri[1]) == _jpeg()
    with pytest.raises(FileNotFoundError, match="input not found"):
        list_inputs([str(tmp_path / "nothing*")])
    with pytest.raises(FileNotFoundError, match="input not found"):
        list_inputs([f"file://{tmp_path}/nope"])
    with pytest.raises(ValueError, match="same outputs: a"):
        list_inputs([str(tmp_path / "photos"), str(tmp_path / "photos" / "a.jpg")])


def test_done_means_all_three_outputs(tmp_path):
    png, jpg, js = outputs(tmp_path, "sub/x")
    assert (png.name, jpg.name, js.name) == ("x.png", "x_overlay.jpg", "x.json")
    png.parent.mkdir()
    png.write_bytes(b"1")
    jpg.write_bytes(b"1")
    assert not is_done(tmp_path, "sub/x")
    js.write_text("{}")
    assert is_done(tmp_path, "sub/x")


def test_using_tracking_uri_leaves_the_process_as_it_was(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI, which wsss_ray.tracking reads
    first: the training driver's model logging must not leave it behind."""
    import mlflow

    from wsss_ray.tracking import tracking_uri, using_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path}/a.db"
    with using_tracking_uri(store):
        assert mlflow.get_tracking_uri() == store
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking_uri("", str(tmp_path / "b")).endswith("b/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///kept.db")
    with using_tracking_uri(store):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///kept.db"
