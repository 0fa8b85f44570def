"""Shard writer: folder and table sources; unreadable images skipped and counted."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
from PIL import Image

from jobs.make_shards import main as make_shards_main
from wsss_ray.data.shards import pairs_from_folder, pairs_from_table, write_shards


def _img(path, colour=(200, 10, 10), fmt="PNG"):
    Image.fromarray(np.full((20, 30, 3), colour, np.uint8)).save(path, format=fmt)


def _members(paths):
    out = {}
    for p in paths:
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                out[m.name] = tf.extractfile(m).read()
    return out


def test_folder_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        _img(src / f"im{i}.png")
        (src / f"im{i}.txt").write_text(f"a red square number {i}")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (src / "broken.txt").write_text("caption of a broken file")
    _img(src / "nocap.png")  # no caption file
    summary = write_shards(pairs_from_folder(src), tmp_path / "out", "t", 2, progress=False)
    assert (summary.written, summary.skipped) == (5, 2)
    assert len(summary.shards) == 3 and all(p.endswith(".tar") for p in summary.shards)
    files = _members(summary.shards)
    jpgs = [k for k in files if k.endswith(".jpg")]
    assert len(jpgs) == 5
    assert Image.open(io.BytesIO(files[jpgs[0]])).format == "JPEG"
    assert files[jpgs[0].replace(".jpg", ".txt")].decode().startswith("a red square")
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_table_source_and_cli(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        _img(imgs / f"{i}.jpg", fmt="JPEG")
    table = pa.table(
        {
            "path": ["imgs/0.jpg", "imgs/1.jpg", "imgs/missing.jpg", "imgs/2.jpg"],
            "caption": ["one", "two", "three", ""],
        }
    )
    pcsv.write_csv(table, tmp_path / "pairs.csv")
    pairs = list(pairs_from_table(tmp_path / "pairs.csv"))
    assert pairs[0] == (str(tmp_path / "imgs/0.jpg"), "one")
    rc = make_shards_main(
        [
            "--table",
            str(tmp_path / "pairs.csv"),
            "--out",
            str(tmp_path / "out"),
            "--samples-per-shard",
            "10",
        ]
    )
    assert rc == 0
    assert "wrote 2 samples in 1 shards, skipped 2" in capsys.readouterr().out
