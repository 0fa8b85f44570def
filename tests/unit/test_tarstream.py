"""The lean tar reader against ``tarfile`` on tars of every format ``tarfile`` and webdataset
write, and its errors on truncated and corrupt tars."""

from __future__ import annotations

import io
import tarfile

import pytest

from wsss_ray.data.tarstream import _number, iter_tar_files

SIZES = (0, 1, 511, 512, 513, 5000)


def _tar(fmt: int, compression: str = "") -> bytes:
    """A tar with regular files of awkward sizes, long and non-ASCII names, a directory and
    links, written by ``tarfile`` in format ``fmt``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}", format=fmt) as tar:
        dir_info = tarfile.TarInfo("shard")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        names = [f"shard/{i:06d}.{ext}" for i, ext in enumerate(("jpg", "txt", "json") * 2)]
        names.append("shard/" + "d" * 120 + "/sample.jpg")  # > 100: ustar prefix, GNU L, PAX
        if fmt != tarfile.USTAR_FORMAT:
            names.append("shard/" + "n" * 140 + ".txt")  # no '/' to split at: L or PAX path
            names.append("shard/überall_ß.txt")  # non-ASCII
        for i, name in enumerate(names):
            data = bytes((i * 7 + j) % 251 for j in range(SIZES[i % len(SIZES)]))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("shard/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "shard/000000.jpg"
        tar.addfile(link)
        hard = tarfile.TarInfo("shard/hard.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, "shard/000000.jpg"
        tar.addfile(hard)
    return buf.getvalue()


def _reference(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


class _Trickle:
    """A stream that returns at most ``step`` bytes per read (network filesystems may)."""

    def __init__(self, raw: bytes, step: int):
        self.buf, self.step = io.BytesIO(raw), step

    def read(self, n: int = -1) -> bytes:
        return self.buf.read(min(n, self.step) if n >= 0 else self.step)


FORMATS = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_files_match_tarfile(fmt: int):
    raw = _tar(fmt)
    ours = list(iter_tar_files(io.BytesIO(raw)))
    expected = _reference(raw)
    assert ours == expected
    assert len(ours) >= 7 and {len(d) for _, d in ours} == set(SIZES)
    assert any(len(name) > 100 for name, _ in ours)
    assert list(iter_tar_files(_Trickle(raw, 100))) == expected  # short reads change nothing


def test_webdataset_tarwriter_shards_match_tarfile():
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf) as sink:
        for i in range(5):
            sink.write({"__key__": f"s{i:04d}", "jpg": bytes(range(i * 50)), "txt": f"cap {i}"})
    raw = buf.getvalue()
    ours = list(iter_tar_files(io.BytesIO(raw)))
    assert ours == _reference(raw)
    assert [n for n, _ in ours][:2] == ["s0000.jpg", "s0000.txt"]


def test_compressed_tar_goes_through_tarfile():
    raw = _tar(tarfile.PAX_FORMAT, "gz")
    assert raw[:2] == b"\x1f\x8b"
    assert list(iter_tar_files(io.BytesIO(raw))) == _reference(raw)


def test_global_pax_header_path_and_missing_end_blocks():
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "a test"}
    ) as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    raw = buf.getvalue()
    assert raw[156:157] == b"g"  # the global header comes first
    end = raw.rstrip(b"\0")
    unpadded = end + b"\0" * (-len(end) % 512)  # the last file, without the zero blocks
    assert list(iter_tar_files(io.BytesIO(raw))) == [("a.txt", b"abc")]
    assert list(iter_tar_files(io.BytesIO(unpadded))) == [("a.txt", b"abc")]


def _offsets(raw: bytes) -> list[int]:
    """The data offset of each regular member."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return [m.offset_data for m in tar.getmembers() if m.isreg()]


@pytest.mark.parametrize("where", ["data", "header"])
def test_truncated_tar_yields_the_complete_files_then_raises(where: str):
    raw = _tar(tarfile.PAX_FORMAT)
    offsets = _offsets(raw)
    cut = offsets[4] + 10 if where == "data" else offsets[4] - 512 + 100  # inside file 4's header
    got: list[tuple[str, bytes]] = []
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        for item in iter_tar_files(io.BytesIO(raw[:cut])):
            got.append(item)
    assert got == _reference(raw)[:4]


def test_corrupt_header_raises_bad_checksum():
    raw = bytearray(_tar(tarfile.USTAR_FORMAT))
    second = _offsets(bytes(raw))[1] - 512  # the second file's header
    raw[second] ^= 0x01  # one bit of its name
    got: list[tuple[str, bytes]] = []
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        for item in iter_tar_files(io.BytesIO(bytes(raw))):
            got.append(item)
    assert len(got) == 1


def test_empty_stream_is_not_a_tar():
    with pytest.raises(tarfile.ReadError, match="empty"):
        list(iter_tar_files(io.BytesIO(b"")))


def test_numbers_octal_and_base256():
    assert _number(b"0000644\0") == 0o644
    assert _number(b"   17 \0\0") == 0o17
    assert _number(b"\0" * 8) == 0
    assert _number(b"\x80" + (9_000_000_000).to_bytes(11, "big")) == 9_000_000_000
    with pytest.raises(tarfile.ReadError):
        _number(b"12x4\0\0\0\0")


def test_old_style_directory_entry_is_not_a_file():
    """A v7 tar marks a directory by a type-'\\0' entry whose name ends in '/'; tarfile calls it
    a directory, and so do we."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("d/", b""), ("d/x.txt", b"xyz")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    raw[156] = 0  # the first entry's type '0' -> '\0', then its checksum again
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    assert list(iter_tar_files(io.BytesIO(bytes(raw)))) == _reference(bytes(raw))
    assert list(iter_tar_files(io.BytesIO(bytes(raw)))) == [("d/x.txt", b"xyz")]
