"""Bad input never crashes or hangs the data tools (issue 24, item 6): the shard writer, the tar
and shard readers and the segmentation readers skip, count and name what they cannot use, or stop
with one line naming the file (exit status 2). Every input is a tiny file made here."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time

import numpy as np
import pytest
from PIL import Image, ImageFile

from jobs.make_shards import main as make_shards_main
from tests.unit.test_shards import _members
from wsss_ray.data import synthetic as syn
from wsss_ray.data.coco import coco_source
from wsss_ray.data.coco_object import THING_IDS, coco_object_source
from wsss_ray.data.segmentation import (
    DatasetError,
    _shard_rows,
    open_source,
    read_mask,
    shard_segmentation,
)
from wsss_ray.data.shards import (
    ShardSink,
    ShardSummary,
    pairs_from_folder,
    pairs_from_table,
    to_jpeg,
    write_shards,
)
from wsss_ray.data.skips import MAX_CAPTION_BYTES, MAX_NAMED, SkipReporter, _Counter
from wsss_ray.data.tarstream import iter_tar_files
from wsss_ray.data.webdataset import TRUNCATED_KEY, FusedShardDecoder, resolve_shards


def _rgb(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)


def _png(size=(24, 16)) -> bytes:
    """A noise PNG: its pixel data is most of the file, so a cut lands in it."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- shard writer
def test_bad_images_are_skipped_counted_and_named(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    good = _png()
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(jpeg, "JPEG")
    files = {
        "good.png": good,
        "empty.jpg": b"",
        "empty.png": b"",
        "cut.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "cut.png": good[: len(good) // 2],
        "text.jpg": b"this is no image at all",
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
        (src / name).with_suffix(".txt").write_text(f"caption of {name}")
    assert make_shards_main(["--folder", str(src), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 samples in 1 shards, skipped 5: 5 unreadable" in out
    why = {
        "empty.jpg": "empty file (0 bytes)",
        "empty.png": "empty file (0 bytes)",
        "cut.jpg": "truncated or corrupt",
        "cut.png": "truncated or corrupt",
        "text.jpg": "not an image PIL can read (23 bytes)",
    }
    listed = (tmp_path / "out" / "shard-skipped.txt").read_text().splitlines()
    assert len(listed) == 5
    for name, reason in why.items():
        assert f"skipped: {src / name} ({reason}" in out, name
        assert any(line.startswith(f"skipped: {src / name} ({reason}") for line in listed), name
    assert "<_io.BytesIO" not in out  # PIL's message named a memory buffer, not the file
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "shard-000000.tar",
        "shard-skipped.txt",
    ]


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, monkeypatch):
    """Over PIL.Image.MAX_IMAGE_PIXELS: skipped with the size named, never decoded (PIL alone
    decodes up to twice the limit with a warning, and raises a traceback above it)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    Image.new("1", (200, 100)).save(tmp_path / "over.png")  # 20,000 px: PIL would decode it
    Image.new("1", (300, 100)).save(tmp_path / "far_over.png")  # 30,000 px: PIL raises
    Image.new("RGB", (100, 100)).save(tmp_path / "at_limit.png")
    decoded = []
    real_load = ImageFile.ImageFile.load

    def load(im):
        decoded.append(im.size)
        return real_load(im)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    pairs = [(str(tmp_path / n), "a caption") for n in ("over.png", "far_over.png", "at_limit.png")]
    summary = write_shards(pairs, tmp_path / "out", progress=False)
    assert (summary.written, summary.skipped, summary.kinds) == (1, 2, {"too large": 2})
    assert set(decoded) == {(100, 100)}  # only the image within the limit was decoded
    over, far = summary.skipped_examples
    assert "over.png (too large: 200 x 100 = 20,000 pixels, over PIL.Image.MAX_IMAGE_PIXELS" in over
    assert "10,000 (a decompression bomb?); not decoded" in over
    assert "far_over.png (too large: 30,000 pixels" in far


def test_cmyk_and_palette_images_look_as_in_a_viewer(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    px = _rgb(to_jpeg(tmp_path / "cmyk.jpg")[0])
    assert abs(px[..., 0].mean() - 255) < 6 and px[..., 1:].mean() < 6  # red, not cyan or black
    idx = np.zeros((16, 16), np.uint8)
    idx[8:] = 1
    pal = Image.fromarray(idx, "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0 red (transparent), 1 blue
    pal.save(tmp_path / "pal_alpha.png", transparency=0)
    pal.save(tmp_path / "pal.png")
    px = _rgb(to_jpeg(tmp_path / "pal_alpha.png")[0])
    assert (px[:6] > 245).all()  # the transparent half is white, not its hidden red
    assert px[10:, :, 2].mean() > 240 and px[10:, :, 0].mean() < 15  # the other half blue
    px = _rgb(to_jpeg(tmp_path / "pal.png")[0])
    assert px[:6, :, 0].mean() > 240 and px[:6, :, 2].mean() < 15  # no transparency: red


def test_huge_captions_are_cut_at_a_character_boundary(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("long", "wide", "short"):
        (src / f"{name}.png").write_bytes(_png())
    (src / "long.txt").write_text("word " * 400_000)  # 2 MB
    (src / "wide.txt").write_text("é" * 5_000)  # 10,000 bytes of 2-byte characters
    (src / "short.txt").write_text("a green square")
    summary = write_shards(pairs_from_folder(src), tmp_path / "out", progress=False)
    assert (summary.written, summary.skipped) == (3, 0)
    assert summary.notes == {f"captions cut to {MAX_CAPTION_BYTES} bytes": 2}
    assert any(
        "long.png: caption longer than 4,096 bytes, cut there" in n for n in summary.note_examples
    )
    caps = {
        json.loads(v)["source"].rsplit("/", 1)[-1]: _members(summary.shards)[k[:-5] + ".txt"]
        for k, v in _members(summary.shards).items()
        if k.endswith(".json")
    }
    assert len(caps["long.png"]) <= MAX_CAPTION_BYTES and caps["long.png"].startswith(b"word word")
    assert caps["wide.png"].decode("utf-8") == "é" * (MAX_CAPTION_BYTES // 2)  # no half character
    assert caps["short.png"] == b"a green square"
    # a table caption is cut the same way
    (tmp_path / "t.csv").write_text(f"path,caption\nsrc/short.png,{'x' * 9000}\n")
    summary = write_shards(pairs_from_table(tmp_path / "t.csv"), tmp_path / "o2", progress=False)
    assert summary.written == 1 and sum(summary.notes.values()) == 1
    txt = next(v for k, v in _members(summary.shards).items() if k.endswith(".txt"))
    assert txt == b"x" * MAX_CAPTION_BYTES


def test_a_file_name_that_is_not_utf8_is_printed_escaped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bad = str(src).encode() + b"/caf\xe9.png"
    open(bad, "wb").close()  # empty
    open(bad[:-4] + b".txt", "wb").write(b"a caption")
    summary = write_shards(pairs_from_folder(src), tmp_path / "out", progress=False)
    assert summary.skipped == 1
    assert "caf\\udce9.png (empty file (0 bytes))" in str(summary)
    str(summary).encode("utf-8")  # printable on a UTF-8 console (surrogates would raise)


# ---------------------------------------------------------------------------- tar reader
def _tar(members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _with_size_field(raw: bytes, member: int, field: bytes) -> bytes:
    """The tar with member ``member``'s size field replaced and its checksum made valid."""
    off = member * 1024  # 100-byte members: one header + one data block each
    header = bytearray(raw[off : off + 512])
    header[124:136] = field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return raw[:off] + bytes(header) + raw[off + 512 :]


def test_tar_reader_errors_fast_on_impossible_sizes(tmp_path):
    raw = _tar([(f"{i}.jpg", bytes(100)) for i in range(3)])
    cases = {
        b"\x80" + b"\0" * 4 + b"\x7f" + b"\xff" * 6: "unexpected end of data",  # ~550 TB
        b"77777777777\0": "unexpected end of data",  # 8 GB
        b"\xff" * 11 + b"\xfe": "negative member size",
        b"zz" + b"\0" * 10: "invalid header number",
    }
    for field, message in cases.items():
        path = tmp_path / "t.tar"
        path.write_bytes(_with_size_field(raw, 1, field))
        got = []
        t0 = time.perf_counter()
        with open(path, "rb") as f, pytest.raises(tarfile.ReadError, match=message):
            for name, _ in iter_tar_files(f):  # a real file: read(n) allocates n bytes
                got.append(name)
        assert got == ["0.jpg"] and time.perf_counter() - t0 < 1.0, field


def test_tar_reader_on_every_cut_and_random_damage_ends(tmp_path):
    raw = _tar([(f"{i:03d}.{e}", bytes(range(60)) * 9) for i in range(3) for e in ("jpg", "txt")])
    rng = np.random.default_rng(0)
    damaged = [raw[:cut] for cut in range(0, len(raw), 37)]
    for _ in range(300):
        b = bytearray(raw)
        b[int(rng.integers(len(b)))] = int(rng.integers(256))
        damaged.append(bytes(b))
    outcomes = set()
    for data in damaged:
        try:
            list(iter_tar_files(io.BytesIO(data)))
            outcomes.add("ok")
        except tarfile.ReadError:
            outcomes.add("ReadError")
    assert outcomes == {"ok", "ReadError"}  # nothing else raised, every stream ended


# -------------------------------------------------------------------------- shard readers
class _Recorder:
    """Stands in for the Ray skip counter: what the decoder reports."""

    def __init__(self):
        self.n, self.names = 0, []

    def add(self, n, names=None):
        self.n += n
        self.names.extend(names or [])


def _kwargs(**over):
    kw = {"tokenizer_name": "wsss-tiny", "image_size": 32, "crop_scale": (1.0, 1.0)}
    return {**kw, "hflip": False, **over}


def test_decoder_names_every_skipped_sample(tmp_path, corrupt_shards):
    scenes = list(syn.scenes(3, seed=7, size=32))
    with ShardSink(tmp_path, "c", samples_per_shard=100) as sink:  # members missing their pair
        sink.write(scenes[0].key, scenes[0].jpeg(), scenes[0].caption, {})
        sink._writer.write({"__key__": scenes[1].key, "txt": b"a caption without its image"})
        sink.write(scenes[2].key, scenes[2].jpeg(), "word " * 300_000, {})  # 1.5 MB caption
    dup = tmp_path / "d-000000.tar"
    jpg, txt = scenes[0].jpeg(), b"a caption"
    dup.write_bytes(
        _tar(
            [("k1.jpg", jpg), ("k1.txt", txt), ("k2.jpg", jpg), ("k2.txt", txt)]
            + [("k2.txt", txt), ("k3.jpg", jpg), ("k3.txt", txt)]
        )
    )
    split = tmp_path / "e-000000.tar"  # key k1 split apart by k2
    split.write_bytes(_tar([("k1.jpg", jpg), ("k2.jpg", jpg), ("k1.txt", txt), ("k2.txt", txt)]))
    more = [str(tmp_path / "c-000000.tar"), str(dup), str(split)]
    tars, fs = resolve_shards([*corrupt_shards, *more])
    fused = FusedShardDecoder(fs, batch_size=4, **_kwargs())
    fused.decoder.skips = rec = _Recorder()
    t0 = time.perf_counter()
    out = list(fused({"path": np.array(tars, dtype=object)}))
    assert time.perf_counter() - t0 < 30
    kept = sum(len(b["image"]) for b in out)
    # A: 4 good of 7; B: 3 before the cut; C: 2 of 3; D: k1 before the duplicate k2.txt;
    # E: k1 and k2 each without a caption before k1 comes back, then the rest of E
    assert kept == 4 + 3 + 2 + 1 + 0
    assert rec.n == 3 + 1 + 1 + 1 + 3  # the counter is exact; the column misses E's batch,
    assert sum(int(b["skipped"].sum()) for b in out) == rec.n - 3  # which kept no row to carry it
    a, b, c, d, e = tars
    s = list(syn.scenes(13, seed=4, size=64))
    expected = [
        f"{a} {s[2].key}: undecodable image (",
        f"{a} {s[3].key}: image without its .txt",
        f"{a} {s[4].key}: empty caption",
        f"{b}: truncated or corrupt tar: the rest of the shard is skipped",
        f"{c} {scenes[1].key}: caption without its .jpg",
        f"{d}: truncated or corrupt tar: the rest of the shard is skipped",
        f"{e} k1: image without its .txt",
        f"{e} k2: image without its .txt",
        f"{e}: truncated or corrupt tar: the rest of the shard is skipped",
    ]
    assert len(rec.names) == len(expected)
    for want in expected:
        assert any(n.startswith(want) for n in rec.names), (want, rec.names)


def test_skip_names_are_capped(monkeypatch):
    counter = _Counter()
    counter.add(3, ["a", "b", "c"])
    counter.add(2, ["a", "b"])  # the same samples in the next epoch: counted, not named again
    counter.add(MAX_NAMED * 2, [f"n{i}" for i in range(MAX_NAMED * 2)])
    assert counter.total() == 5 + 2 * MAX_NAMED
    assert len(counter.names()) == MAX_NAMED and counter.names(2)[:2] == ["c", "n0"]
    sent = []

    class _Remote:
        def remote(self, *args):
            sent.append(args)

    reporter = SkipReporter("x")
    reporter._handle = type("H", (), {"add": _Remote()})()
    reporter.add(MAX_NAMED - 1, [f"s{i}" for i in range(MAX_NAMED - 1)])
    reporter.add(3, ["p", "q", "r"])  # one more name fits, then only counts
    reporter.add(2, ["x", "y"])
    assert [a[0] for a in sent] == [MAX_NAMED - 1, 3, 2]
    assert sent[1] == (3, ["p"]) and sent[2] == (2,)


def test_segmentation_shard_rows_skip_and_name(caplog):
    mask = io.BytesIO()
    Image.fromarray(np.array([[0, 3], [3, 255]], np.uint8)).save(mask, "PNG")
    batch = {
        "__key__": ["ok", "nomask", "badmask", TRUNCATED_KEY],
        "__url__": ["s.tar"] * 4,
        "jpg": [b"jpeg", b"jpeg", b"jpeg", None],
        "png": [mask.getvalue(), None, b"not a png", None],
        "json": [json.dumps({"id": "2007_1"}).encode(), None, b"{broken", None],
    }
    with caplog.at_level(logging.WARNING):
        table = _shard_rows(batch)
    assert table.column("id").to_pylist() == ["2007_1"]
    assert table.column("labels").to_pylist() == [[3]]
    text = caplog.text
    assert "s.tar nomask: image without its .png mask" in text
    assert "s.tar badmask: unreadable mask" in text
    assert "s.tar: truncated or corrupt tar" in text


# -------------------------------------------------------------------- segmentation: VOC
def test_voc_bad_images_and_masks_are_left_out_and_named(tmp_path, capsys):
    root = syn.write_voc(tmp_path / "VOC2012", 1, 5, size=32)
    ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    mask0 = root / "SegmentationClass" / f"{ids[0]}.png"
    Image.open(mask0).resize((30, 20)).save(mask0)  # another size than its image
    (root / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(b"")  # empty
    jpg2 = root / "JPEGImages" / f"{ids[2]}.jpg"
    jpg2.write_bytes(jpg2.read_bytes()[:-200])  # truncated: the header reads, the pixels not
    (root / "SegmentationClass" / f"{ids[3]}.png").write_bytes(b"\x89PNG broken")
    src = open_source("voc", root, "val")
    assert [r.id for r in src.records] == [ids[2], ids[4]]
    assert src.skipped == [
        f"{ids[0]} ({mask0}): mask 30 x 20 differs from image 32 x 32",
        f"{ids[1]} ({root / 'JPEGImages' / ids[1]}.jpg): unreadable image (empty file (0 bytes))",
        f"{ids[3]} ({root / 'SegmentationClass' / ids[3]}.png): unreadable mask "
        "(not an image PIL can read)",
    ]
    out = tmp_path / "shards"
    argv = ["--segmentation", "voc", "--root", str(root), "--split", "val", "--out", str(out)]
    assert make_shards_main(argv) == 0
    text = capsys.readouterr().out
    assert "wrote 1 samples in 1 shards, skipped 4: 3 unreadable, 1 mask size differs" in text
    assert f"{ids[2]} ({jpg2}): truncated or corrupt" in text
    assert len((out / "shard-skipped.txt").read_text().splitlines()) == 4
    assert sorted(_members([out / "shard-000000.tar"])) == [
        f"{ids[4]}.{e}" for e in ("jpg", "json", "png")
    ]


def test_segmentation_crash_leaves_no_half_shard(tmp_path, monkeypatch):
    root = syn.write_voc(tmp_path / "VOC2012", 0, 5, size=32)
    src = open_source("voc", root, "val")
    import wsss_ray.data.segmentation as seg

    real, calls = seg.encode_mask, []

    def encode(mask):
        calls.append(1)
        if len(calls) == 4:  # the 2nd sample of the 2nd shard
            raise RuntimeError("disk full")
        return real(mask)

    monkeypatch.setattr(seg, "encode_mask", encode)
    with pytest.raises(RuntimeError, match="disk full"):
        shard_segmentation(src, tmp_path / "out", samples_per_shard=2, progress=False)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["class_names.txt", "seg-000000.tar"]  # no seg-000001.tar, no .tmp
    assert len(_members([tmp_path / "out" / names[1]])) == 6  # 2 complete samples


# ------------------------------------------------------------------- segmentation: COCO
def _jpeg(path, w, h):
    Image.new("RGB", (w, h), (90, 90, 90)).save(path, "JPEG")


SQUARE = [[1.0, 1.0, 5.0, 1.0, 5.0, 5.0, 1.0, 5.0]]


def _coco(root, annotations, images=None, categories=None, split="val"):
    (root / f"{split}2014").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images = images or [{"id": i, "file_name": f"im{i}.jpg", "width": 10, "height": 10}
                        for i in (1, 2)]  # fmt: skip
    for im in images:
        _jpeg(root / f"{split}2014" / im["file_name"], 10, 10)
    doc = {
        "images": images,
        "annotations": annotations,
        "categories": categories or [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}],
    }
    (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(doc))
    return root


def _ann(i, image_id, seg, cat=3, **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "segmentation": seg,
            "iscrowd": 0, **kw}  # fmt: skip


def test_coco_bad_annotations_are_left_out_and_named(tmp_path):
    images = [
        {"id": 1, "file_name": "im1.jpg", "width": 10, "height": 10},
        {"id": 2, "file_name": "im2.jpg", "width": 12, "height": 10},  # the JPEG is 10 x 10
    ]
    root = tmp_path / "coco"
    _coco(root, [], images)
    _jpeg(root / "val2014" / "im2.jpg", 10, 10)
    anns = [
        _ann(10, 1, SQUARE),
        _ann(11, 1, []),  # empty segmentation
        _ann(12, 1, [[]]),  # an empty polygon
        _ann(13, 1, [[1, 2, 3, 4]]),  # two points: pycocotools reads it as a box
        _ann(14, 1, {"counts": [0, 4], "size": [2, 2]}),  # RLE of another size
        _ann(15, 1, [[6.0, 6.0, 9.0, 6.0, 9.0, 9.0], [1, 1]], cat=7),  # a 1-point polygon dropped
        _ann(16, 99, SQUARE),  # no such image
        _ann(17, 1, {"counts": [5, 300, 2], "size": [10, 10]}),  # counts past the image
    ]
    doc = json.loads((root / "annotations/instances_val2014.json").read_text())
    doc["annotations"] = anns
    (root / "annotations/instances_val2014.json").write_text(json.dumps(doc))
    src = coco_source(root, "val")
    assert [r.id for r in src.records] == ["im1"]
    assert src.skipped == [
        f"im2 (image 2, {root / 'val2014/im2.jpg'}): image 10 x 10 differs from the json's 12 x 10"
    ]
    assert src.skipped_annotations == [
        "annotation 16: image_id 99 is not in 'images'",
        "annotation 11 (image 1, im1.jpg): empty segmentation",
        "annotation 12 (image 1, im1.jpg): no polygon of 3 or more points ([[]])",
        "annotation 13 (image 1, im1.jpg): no polygon of 3 or more points ([[1, 2, 3, 4]])",
        "annotation 14 (image 1, im1.jpg): RLE size [2, 2] differs from the image's [10, 10]",
        "annotation 17 (image 1, im1.jpg): undecodable RLE (Invalid RLE mask representation)",
    ]
    from pycocotools import mask as mask_utils

    mask = read_mask(src.records[0].mask)
    assert set(np.unique(mask)) == {0, 1, 2}  # car (3 -> 1) and train (7 -> 2) painted
    square = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(SQUARE, 10, 10)))
    np.testing.assert_array_equal(mask == 1, square.astype(bool))  # as pycocotools draws it
    again = coco_source(root, "val")  # from the cache: the same names
    assert again.skipped == src.skipped and again.skipped_annotations == src.skipped_annotations


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: "{ not json", "not JSON (Expecting property name"),
        (lambda d: [], "not a COCO instances file (a JSON list, not an object)"),
        (lambda d: {k: v for k, v in d.items() if k != "images"}, "no 'images' list"),
        (lambda d: {k: v for k, v in d.items() if k != "annotations"}, "no 'annotations' list"),
        (lambda d: {**d, "categories": None}, "no 'categories' list"),
        (lambda d: {**d, "images": [{"id": 1, "file_name": "im1.jpg"}]}, "images[0] needs"),
        (lambda d: {**d, "annotations": [{"id": 5, "segmentation": []}]}, "annotations[0] needs"),
        (
            lambda d: {**d, "annotations": [_ann(5, 1, SQUARE, cat=999)]},
            "annotation 5 (image 1) has category_id 999, which is not in the file's categories",
        ),
    ],
)
def test_coco_file_errors_are_one_line_with_exit_2(tmp_path, capsys, edit, message):
    root = _coco(tmp_path / "coco", [_ann(5, 1, SQUARE)])
    ann_file = root / "annotations/instances_val2014.json"
    doc = edit(json.loads(ann_file.read_text()))
    ann_file.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    argv = ["--segmentation", "coco", "--root", str(root), "--out", str(tmp_path / "o")]
    assert make_shards_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {ann_file}: ") and message in err[0]
    assert not (root / "wsss_semantic" / "val2014" / "DONE.json").exists()


def test_coco_missing_jpeg_is_an_error_naming_it(tmp_path):
    root = _coco(tmp_path / "coco", [_ann(5, 1, SQUARE)])
    (root / "val2014" / "im2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"image 2 is listed but .*im2.jpg is missing"):
        coco_source(root, "val")


def test_coco_object_unknown_category_and_map_of_another_size(tmp_path):
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    _jpeg(tmp_path / "val2017" / "000000000007.jpg", 10, 10)
    doc = {
        "images": [{"id": 7, "file_name": "000000000007.jpg", "height": 10, "width": 10}],
        "annotations": [_ann(1, 7, SQUARE, cat=1), _ann(2, 7, SQUARE, cat=92)],  # 92: stuff
    }
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="annotation 2 .* category_id 92, which is not one of"):
        coco_object_source(tmp_path, "val", source="instances")
    # stuffthingmaps: a map of another size than its JPEG is left out and named
    maps = tmp_path / "stuffthingmaps_trainval2017" / "val2017"
    maps.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(maps / "000000000007.png")
    _jpeg(tmp_path / "val2017" / "000000000009.jpg", 10, 10)
    Image.fromarray(np.full((10, 10), THING_IDS[0] - 1, np.uint8)).save(maps / "000000000009.png")
    src = coco_object_source(tmp_path, "val", source="stuffthingmaps")
    assert [r.id for r in src.records] == ["000000000009"]
    assert src.skipped == [
        f"000000000007 ({maps / '000000000007.png'}): image 10 x 10 differs from the map's 10 x 8"
    ]
    assert set(np.unique(read_mask(src.records[0].mask))) == {1}


def test_shard_summary_counts_kinds_and_lists_every_skip(tmp_path):
    with ShardSummary().listing(tmp_path / "l.txt") as summary:
        for i in range(12):
            summary.skip(f"f{i} (why)", "unreadable" if i % 3 else "no caption")
    text = str(summary)
    assert text.startswith("wrote 0 samples in 0 shards, skipped 12: 8 unreadable, 4 no caption")
    assert "  ... 2 more skipped" in text and f"every one listed in {tmp_path / 'l.txt'}" in text
    assert len((tmp_path / "l.txt").read_text().splitlines()) == 12


@pytest.mark.slow
def test_skip_names_reach_the_counter_through_ray(ray_local, corrupt_shards):
    """The names travel from the decode actors to the run's counter actor (what rank 0 prints
    under its report line), for both readers."""
    from wsss_ray.data.skips import read_skip_names, read_skips, start_skip_counter
    from wsss_ray.data.webdataset import image_text_dataset

    a, b = resolve_shards(corrupt_shards)[0]
    for reader in ("fused", "read_webdataset"):
        counter = start_skip_counter("test_bad_input")
        ds = image_text_dataset(
            corrupt_shards, **_kwargs(), batch_size=8, actors=(1, 1), reader=reader,
            shuffle_files=False, skip_counter=counter,
        )  # fmt: skip
        assert len(ds.take_all()) == 4 + 3
        deadline = time.monotonic() + 20  # the decoders' adds are fire-and-forget
        while len(read_skip_names(counter)) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        names = read_skip_names(counter)
        assert read_skips(counter) == 4 and len(names) == 4, (reader, names)
        assert any(n.startswith(f"{b}: truncated or corrupt tar") for n in names), names
        assert sum(n.startswith(f"{a} ") for n in names) == 3, names
        assert read_skip_names(counter, 3) == names[3:]
