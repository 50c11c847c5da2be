"""Memory stays bounded for objects of any layout: 1 GB objects whose bulk is not pixel data (a private OB
before the pixel data, an Encapsulated PDF without pixel data, an OB inside a sequence item) are stored with
DCMTK's storescu while the gateway's peak RSS (VmHWM, reset through /proc/PID/clear_refs) is watched; their
metadata gives a BulkDataURI for the large value, which serves the identical bytes, and the default-Accept
retrieve of an Implicit VR object (re-encoded to Explicit VR Little Endian) decodes with pydicom to the same
data set. The Part-10 files are written by hand, a piece at a time, so the test never holds 1 GB either."""

from __future__ import annotations

import hashlib
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
import requests

from gw_dimse import dcmtk_env

SIZE = 1 << 30  # the large value
BOUND_KB = 64 * 1024  # allowed peak RSS growth
PIECE = 1 << 20

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
CT = "1.2.840.10008.5.1.4.1.1.2"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"
STUDY = "2.25.4711000000000000000000000000000001"

LONG_VRS = {b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV"}


def elem(tag: int, vr: bytes, value: bytes, implicit: bool = False) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in LONG_VRS:
        return head + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + vr + struct.pack("<H", len(value)) + value


def big_header(tag: int, vr: bytes, length: int, implicit: bool = False) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", length)
    return head + vr + b"\0\0" + struct.pack("<I", length)


def item_header(length: int) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, length)


def meta(sop_class: str, sop_uid: str, ts: str) -> bytes:
    body = b"".join([
        elem(0x00020001, b"OB", b"\x00\x01"),
        elem(0x00020002, b"UI", sop_class.encode()),
        elem(0x00020003, b"UI", sop_uid.encode()),
        elem(0x00020010, b"UI", ts.encode()),
        elem(0x00020012, b"UI", b"1.2.826.0.1.3680043.9.7433.1"),
    ])
    return b"\0" * 128 + b"DICM" + elem(0x00020000, b"UL", struct.pack("<I", len(body))) + body


def write_value(f, size: int) -> str:
    """Writes `size` bytes of a pattern in which every MiB differs (an offset error shows); returns its sha256."""
    block = bytes((i * 7 + 3) % 251 for i in range(PIECE))
    digest = hashlib.sha256()
    written = 0
    n = 0
    while written < size:
        piece = struct.pack("<Q", n) + block[8:]
        piece = piece[: size - written]
        f.write(piece)
        digest.update(piece)
        written += len(piece)
        n += 1
    return digest.hexdigest()


SERIES_NUMBERS = {"private": 1, "pdf": 2, "item": 3}


def uids(name: str) -> tuple[str, str, str]:
    series = f"{STUDY}.{SERIES_NUMBERS[name]}"
    return STUDY, series, series + ".1"


def identity(sop_class: str, sop_uid: str, series: str, implicit: bool) -> list[bytes]:
    return [
        elem(0x00080016, b"UI", sop_class.encode(), implicit),
        elem(0x00080018, b"UI", sop_uid.encode(), implicit),
        elem(0x00080060, b"CS", b"OT", implicit),
        elem(0x00100010, b"PN", b"Bulk^Test", implicit),
        elem(0x00100020, b"LO", b"BULK1", implicit),
        elem(0x0020000D, b"UI", STUDY.encode(), implicit),
        elem(0x0020000E, b"UI", series.encode(), implicit),
    ]


def image_tail() -> bytes:
    us = lambda v: struct.pack("<H", v)  # noqa: E731
    return b"".join([
        elem(0x00280002, b"US", us(1)),
        elem(0x00280004, b"CS", b"MONOCHROME2"),
        elem(0x00280010, b"US", us(4)),
        elem(0x00280011, b"US", us(4)),
        elem(0x00280100, b"US", us(8)),
        elem(0x00280101, b"US", us(8)),
        elem(0x00280102, b"US", us(7)),
        elem(0x00280103, b"US", us(0)),
        elem(0x7FE00010, b"OB", bytes(range(16))),
    ])


def private_before_pixel_data(path: Path) -> tuple[tuple[str, str, str], str, str]:
    study, series, sop = uids("private")
    ident = identity(CT, sop, series, False)
    with open(path, "wb") as f:
        f.write(meta(CT, sop, EXPLICIT_LE))
        f.write(b"".join(ident[:3]))
        f.write(elem(0x00090010, b"LO", b"BULKTEST"))
        f.write(big_header(0x00091001, b"OB", SIZE))
        digest = write_value(f, SIZE)
        f.write(b"".join(ident[3:]))
        f.write(image_tail())
    return (study, series, sop), "00091001", digest


def pdf_without_pixel_data(path: Path) -> tuple[tuple[str, str, str], str, str]:
    study, series, sop = uids("pdf")
    ident = identity(PDF, sop, series, True)
    with open(path, "wb") as f:
        f.write(meta(PDF, sop, IMPLICIT_LE))
        f.write(b"".join(ident))
        f.write(elem(0x00280301, b"CS", b"NO", True))
        f.write(elem(0x00420010, b"ST", b"A large document", True))
        f.write(big_header(0x00420011, b"OB", SIZE, True))
        digest = write_value(f, SIZE)
        f.write(elem(0x00420012, b"LO", b"application/pdf", True))
    return (study, series, sop), "00420011", digest


def ob_in_sequence_item(path: Path) -> tuple[tuple[str, str, str], str, str]:
    study, series, sop = uids("item")
    ident = identity(CT, sop, series, False)
    creator = elem(0x00090010, b"LO", b"BULKTEST")
    inner = creator + elem(0x00090011, b"SH", b"SMALL") + big_header(0x00091001, b"OB", SIZE)
    item_len = len(inner) + SIZE
    with open(path, "wb") as f:
        f.write(meta(CT, sop, EXPLICIT_LE))
        f.write(b"".join(ident[:3]))
        f.write(creator)
        f.write(big_header(0x00091010, b"SQ", 8 + item_len))
        f.write(item_header(item_len))
        f.write(inner)
        digest = write_value(f, SIZE)
        f.write(b"".join(ident[3:]))
        f.write(image_tail())
    return (study, series, sop), "00091010/0/00091001", digest


def peak_reset(pid: int) -> int:
    """Resets the process's peak RSS to its current RSS; returns that (kB)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return status_kb(pid, "VmHWM")


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def storescu(gw, path: Path, sop_class: str, ts: str) -> str:
    proc = subprocess.run(
        ["storescu", "-v", "-nh", "-R", "-xe" if ts == EXPLICIT_LE else "-xi", "-to", "10", "-ta", "10",
         "-td", "120", "-aec", gw.ae_title, gw.host, str(gw.dimse_port), str(path)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=170,
    )
    out = proc.stdout + proc.stderr
    assert "Received Store Response (Success)" in out, out[-2000:]
    return out


def download(url: str, accept: str, to: Path) -> None:
    with requests.get(url, headers={"Accept": accept}, stream=True, timeout=120) as resp:
        assert resp.status_code == 200, resp.text[:500]
        ctype = resp.headers["Content-Type"]
        with open(to, "wb") as f:
            for chunk in resp.iter_content(PIECE):
                f.write(chunk)
    to.with_suffix(".ctype").write_text(ctype)


def single_part(path: Path) -> tuple[int, int]:
    """(offset, length) of the content of the only part of a multipart/related body saved in `path`."""
    ctype = path.with_suffix(".ctype").read_text()
    boundary = [p.split("=", 1)[1].strip('"') for p in ctype.split(";") if p.strip().startswith("boundary=")][0]
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4096)
        start = head.index(b"\r\n\r\n") + 4
        f.seek(max(0, size - 4096))
        tail = f.read()
    end = size - len(tail) + tail.rindex(b"\r\n--" + boundary.encode())
    return start, end - start


def sha256_of(path: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            piece = f.read(min(PIECE, length))
            assert piece, "file ends early"
            digest.update(piece)
            length -= len(piece)
    return digest.hexdigest()


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    for f in tmp_path.iterdir():  # 1 GB files: not kept for the report
        f.unlink()


def check_bulk_element(gw, tmp: Path, ids, path: str, digest: str) -> None:
    study, series, sop = ids
    pid = gw.proc.pid
    resp = requests.get(f"{gw.base_url}/studies/{study}/series/{series}/instances/{sop}/metadata",
                        headers={"Accept": "application/dicom+json"}, timeout=30)
    assert resp.status_code == 200
    node = resp.json()[0]
    parts = path.split("/")
    for i in range(0, len(parts) - 1, 2):
        node = node[parts[i]]["Value"][int(parts[i + 1])]
    element = node[parts[-1]]
    assert set(element) == {"vr", "BulkDataURI"}, element
    uri = element["BulkDataURI"]
    assert uri.endswith("/bulk/" + path), uri

    before = peak_reset(pid)
    out = tmp / "bulk.bin"
    download(uri, 'multipart/related; type="application/octet-stream"', out)
    growth = status_kb(pid, "VmHWM") - before
    offset, length = single_part(out)
    assert length == SIZE
    assert sha256_of(out, offset, length) == digest
    assert growth < BOUND_KB, f"peak RSS grew by {growth} kB serving the bulk data"
    out.unlink()


@pytest.mark.parametrize("build", [private_before_pixel_data, pdf_without_pixel_data, ob_in_sequence_item],
                         ids=["private-ob-before-pixel-data", "encapsulated-pdf", "ob-in-sequence-item"])
def test_a_1gb_value_outside_pixel_data_is_stored_and_served_with_bounded_memory(gateway, workdir, build):
    gw = gateway
    obj = workdir / "big.dcm"
    ids, path, digest = build(obj)
    ts = IMPLICIT_LE if build is pdf_without_pixel_data else EXPLICIT_LE
    sop_class = PDF if build is pdf_without_pixel_data else CT

    before = peak_reset(gw.proc.pid)
    storescu(gw, obj, sop_class, ts)
    growth = status_kb(gw.proc.pid, "VmHWM") - before
    assert growth < BOUND_KB, f"peak RSS grew by {growth} kB storing a 1 GB value"

    check_bulk_element(gw, workdir, ids, path, digest)


def test_default_retrieve_of_a_1gb_implicit_vr_object_is_streamed_and_decodes_to_the_same_data_set(
        gateway, workdir):
    gw = gateway
    obj = workdir / "big.dcm"
    (study, series, sop), _, digest = pdf_without_pixel_data(obj)
    storescu(gw, obj, PDF, IMPLICIT_LE)

    before = peak_reset(gw.proc.pid)
    out = workdir / "retrieved.multipart"
    download(f"{gw.base_url}/studies/{study}/series/{series}/instances/{sop}",
             'multipart/related; type="application/dicom"', out)
    growth = status_kb(gw.proc.pid, "VmHWM") - before
    assert growth < BOUND_KB, f"peak RSS grew by {growth} kB re-encoding a 1 GB object"

    # The part is read where it lies in the response body (no copy: disk space).
    offset, length = single_part(out)
    # Elements are looked up by tag, never iterated: iterating would read the deferred 1 GB value.
    original = pydicom.dcmread(obj, defer_size="1 MB")
    with open(out, "rb") as f:
        f.seek(offset)
        copy = pydicom.dcmread(f, defer_size="1 MB")
        f.seek(offset)
        head = f.read(64 * 1024)
    assert copy.file_meta.TransferSyntaxUID == EXPLICIT_LE
    # pydicom reads on past the part into the closing boundary ("\r\n--" reads as tag (0A0D,2D2D)).
    keys = [t for t in copy.keys() if t != 0x0A0D2D2D]
    assert keys == list(original.keys())
    for tag in original.keys():
        if tag != 0x00420011:
            assert copy[tag].value == original[tag].value, tag
    # The document: an Explicit VR LE OB header with its length, then the identical bytes.
    header = struct.pack("<HH", 0x0042, 0x0011) + b"OB\0\0" + struct.pack("<I", SIZE)
    start = offset + head.index(header) + len(header)
    assert start + SIZE <= offset + length
    assert sha256_of(out, start, SIZE) == digest
