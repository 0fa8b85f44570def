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


# ------------------------------------------------------------------- bad input (issue 24)
def test_a_caption_that_is_not_utf8_is_skipped_and_named(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (16, 16), (9, 9, 9)).save(src / f"{name}.png")
    (src / "a.txt").write_text("a dark square")
    (src / "b.txt").write_bytes(b"caf\xe9 latin-1")
    assert make_shards_main(["--folder", str(src), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 samples in 1 shards, skipped 1" in out
    assert f"{src / 'b.txt'}: caption not UTF-8" in out


def test_a_crash_never_leaves_a_half_shard_under_its_final_name(tmp_path):
    good = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(good)

    def pairs():
        for _ in range(3):  # shard 0 complete (2 samples), shard 1 half written
            yield str(good), "a black square"
        raise RuntimeError("the source broke")

    out = tmp_path / "out"
    try:
        write_shards(pairs(), out, samples_per_shard=2, progress=False)
    except RuntimeError:
        pass
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]
    assert len(_members([out / "shard-000000.tar"])) == 6  # 2 samples x (jpg, txt, json)


def test_table_and_folder_errors_are_one_line_with_exit_2(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(img)
    (tmp_path / "nocol.csv").write_text("file,caption\na.png,x\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("path,caption\n")
    cases = {
        ("--table", str(tmp_path / "nocol.csv")): "no column 'path'",
        ("--table", str(tmp_path / "empty.csv")): "not a readable table",
        ("--table", str(tmp_path / "header.csv")): "the table has no rows",
        ("--table", str(tmp_path / "missing.csv")): "no such table",
        ("--folder", str(tmp_path / "nope")): "no such folder",
    }
    for args, message in cases.items():
        assert make_shards_main([*args, "--out", str(tmp_path / "o")]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_row_without_image_path_is_skipped_and_counted(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    table = pa.table({"path": ["a.png", None], "caption": ["one", "two"]})
    pcsv.write_csv(table, tmp_path / "t.csv")
    summary = write_shards(pairs_from_table(tmp_path / "t.csv"), tmp_path / "o", progress=False)
    assert summary.written == 1 and summary.skipped == 1
    assert "row 1: no image path" in summary.skipped_examples[0]


def _decoded(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)


def test_16_bit_grey_and_transparent_images_look_as_in_a_viewer(tmp_path):
    from wsss_ray.data.shards import to_jpeg

    grey16 = np.full((16, 16), 32768, np.uint16)  # mid-grey in 16 bits
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert abs(_decoded(to_jpeg(tmp_path / "g16.png")[0]).mean() - 128) < 3  # was 255: white
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent
    rgba[8:, :, 3] = 255  # only the lower half is shown
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    px = _decoded(to_jpeg(tmp_path / "t.png")[0])
    assert (px[:6] > 245).all()  # the transparent half is white (was red)
    assert px[10:, :, 0].mean() > 240 and px[10:, :, 1].mean() < 15  # the shown half is red
