"""The sample corpus in `testdata/`: which files are storable instances, which are deliberately invalid,
and the exact bytes a peer sends for each.

A file is *readable* when pydicom reads it (without `force`), it has File Meta Information with a Transfer
Syntax UID, a SOP Class UID and a SOP Instance UID, and it is not listed in `INVALID` (pydicom reads the two
truncated files without complaint, so they are listed by hand; `testdata/README.md` says why each is there).

Several samples share a SOP Instance UID (one image in several transfer syntaxes). `unique_corpus()` gives
every readable sample a SOP Instance UID of its own where needed, so a test can store all of them and expect
every one to be retrievable as sent.
"""

from __future__ import annotations

import copy
import functools
import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom.dsutils import encode

REPO = Path(__file__).resolve().parents[2]
TESTDATA = REPO / "testdata"

# Files that are broken on purpose (paths relative to testdata/). Those marked "sent" are sent to the
# gateway with pynetdicom and must be refused; the others cannot be sent as files by any peer at all.
INVALID: dict[str, str] = {
    "pydicom/MR_truncated.dcm": "sent: data set ends inside Pixel Data (declared 8192 bytes, 8130 present)",
    "pydicom/rtplan_truncated.dcm": "sent: data set ends inside the Beam Sequence",
    "pydicom/SC_rgb_jpeg.dcm": "sent: data set encoded in Implicit VR although its transfer syntax (JPEG "
    "Baseline) is Explicit VR; pydicom guesses its way through, a conformant parser cannot",
    "pydicom/JPEGLSNearLossless_08.dcm": "sent: no Study Instance UID or Series Instance UID, so the "
    "object has no place in the study/series hierarchy",
    "pydicom/JPEGLSNearLossless_16.dcm": "sent: no Study Instance UID or Series Instance UID",
    "pydicom/SC_rgb_jls_lossy_line.dcm": "sent: no Study Instance UID or Series Instance UID",
    "pydicom/SC_rgb_jls_lossy_sample.dcm": "sent: no Study Instance UID or Series Instance UID",
    "pydicom/no_meta.dcm": "file: no File Meta Information",
    "pydicom/ExplVR_BigEndNoMeta.dcm": "file: no File Meta Information",
    "pydicom/ExplVR_LitEndNoMeta.dcm": "file: no File Meta Information",
    "pydicom/rtstruct.dcm": "file: no File Meta Information",
    "pydicom/meta_missing_tsyntax.dcm": "file: File Meta Information without Transfer Syntax UID",
}
SENT_INVALID = [name for name, why in INVALID.items() if why.startswith("sent:")]

# Readable files that DCMTK's storescu cannot send (it does not look into UN-encoded attributes and reports
# "No SOP Class or Instance UID in file"): left out of the storescu run only; pynetdicom sends them.
DCMTK_CANNOT_SEND = {
    "pydicom/rtdose_rle.dcm": "every attribute encoded with VR UN",
    "pydicom/rtdose_rle_1frame.dcm": "every attribute encoded with VR UN",
}

NATIVE_TS = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
}
LOSSLESS_TS = {
    "1.2.840.10008.1.2.5",  # RLE
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
}


@dataclass
class Sample:
    """One instance as a peer sends it: the data set bytes in `ts`, and pydicom's reading of them."""

    name: str  # path relative to testdata/, plus "#reuid" when the SOP Instance UID was replaced
    ts: str
    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str
    payload: bytes  # encoded data set (no File Meta Information), exactly as sent in the C-STORE
    ds: Dataset  # the data set as pydicom reads `payload`, with file_meta set

    def __repr__(self) -> str:  # keeps pytest's failure reports readable
        return f"<Sample {self.name} ts={self.ts} {len(self.payload)} bytes>"

    @property
    def id(self) -> str:  # for pytest ids
        return (self.name.replace("pydicom-charsets/", "cs/").replace("pydicom/", "")
                .replace("dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/", "tiny/"))

    @property
    def is_native(self) -> bool:
        return self.ts in NATIVE_TS

    @property
    def has_pixels(self) -> bool:
        return "PixelData" in self.ds

    @property
    def number_of_frames(self) -> int:
        try:
            return max(1, int(self.ds.get("NumberOfFrames", 1) or 1))
        except (TypeError, ValueError):
            return 1

    def part10(self) -> bytes:
        """The sample as a Part 10 file (what a WADO-RS `transfer-syntax=*` answer should hold)."""
        return file_meta_bytes(self.sop_class, self.sop_uid, self.ts) + self.payload


def split_part10(data: bytes) -> tuple[bytes, bytes]:
    """Split a Part 10 file into (file meta group bytes incl. preamble, data set bytes), without decoding."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ValueError("no DICM prefix")
    pos = 132
    while pos + 8 <= len(data):
        group, _elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return data[:pos], data[pos:]


def file_meta_bytes(sop_class: str, sop_uid: str, ts: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


def read_payload(payload: bytes, ts: str) -> Dataset:
    """pydicom's reading of a data set encoded in `ts` (File Meta Information added)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(file_meta_bytes("1.2.3", "1.2.3", ts) + payload))
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    return ds


def _read(path: Path) -> Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path)
    except Exception:
        return None


def all_files() -> list[Path]:
    return sorted(
        p
        for p in TESTDATA.rglob("*")
        if p.is_file() and p.suffix not in (".txt", ".md") and p.name not in ("README", "README.md")
    )


def rel(path: Path) -> str:
    return path.relative_to(TESTDATA).as_posix()


def is_readable(path: Path) -> bool:
    if rel(path) in INVALID:
        return False
    ds = _read(path)
    if ds is None:
        return False
    meta = getattr(ds, "file_meta", None)
    return (
        meta is not None
        and "TransferSyntaxUID" in meta
        and "SOPClassUID" in ds
        and "SOPInstanceUID" in ds
    )


def sample_from_file(path: Path) -> Sample:
    raw = path.read_bytes()
    _meta, payload = split_part10(raw)
    ds = _read(path)
    assert ds is not None
    return Sample(
        name=rel(path),
        ts=str(ds.file_meta.TransferSyntaxUID),
        sop_class=str(ds.SOPClassUID),
        sop_uid=str(ds.SOPInstanceUID),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        payload=payload,
        ds=ds,
    )


@functools.lru_cache(maxsize=None)
def readable_samples() -> tuple[Sample, ...]:
    """Every readable file, unchanged (duplicate SOP Instance UIDs included)."""
    return tuple(sample_from_file(p) for p in all_files() if is_readable(p))


def derived_uid(*parts: str) -> str:
    """A stable UID for a test object (same inputs, same UID, so reruns are comparable)."""
    return str(pydicom.uid.generate_uid(prefix="1.2.826.0.1.3680043.8.498.", entropy_srcs=list(parts)))


def with_new_uids(sample: Sample, sop_uid: str, suffix: str, **attrs) -> Sample:
    """A copy of `sample` with a new SOP Instance UID (and any other top-level attributes), re-encoded in
    the sample's own transfer syntax by pydicom."""
    ds = copy.deepcopy(sample.ds)
    ds.SOPInstanceUID = sop_uid
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return from_dataset(ds, sample.ts, sample.name + suffix)


def from_dataset(ds: Dataset, ts: str, name: str) -> Sample:
    """A sample made of a pydicom data set, encoded in `ts`."""
    payload = encode_dataset(ds, ts)
    return Sample(
        name=name,
        ts=str(ts),
        sop_class=str(ds.SOPClassUID),
        sop_uid=str(ds.SOPInstanceUID),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        payload=payload,
        ds=read_payload(payload, ts),
    )


def encode_dataset(ds: Dataset, ts: str) -> bytes:
    ts = UID(ts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        payload = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    assert payload is not None, "pydicom could not encode the data set"
    return payload


def lacks_hierarchy(sample: Sample) -> bool:
    """No Study or Series Instance UID (four JPEG-LS samples): the object cannot be addressed by WADO-RS."""
    return not sample.study_uid or not sample.series_uid


def with_hierarchy(sample: Sample) -> Sample:
    """`sample` itself, or, when it lacks Study/Series Instance UID, a copy with derived ones added."""
    if not lacks_hierarchy(sample):
        return sample
    return with_new_uids(
        sample, sample.sop_uid, "#hier",
        StudyInstanceUID=sample.study_uid or derived_uid("study", sample.name),
        SeriesInstanceUID=sample.series_uid or derived_uid("series", sample.name),
    )


@functools.lru_cache(maxsize=None)
def unique_corpus() -> tuple[Sample, ...]:
    """Every readable sample once, each with a SOP Instance UID of its own and a place in the study/series
    hierarchy: the first file with a UID keeps its exact bytes, later ones get a derived UID, and samples
    without Study/Series Instance UID get derived ones (both re-encoded by pydicom in their own transfer
    syntax, pixel data untouched)."""
    seen: set[str] = set()
    out = []
    for s in readable_samples():
        s = with_hierarchy(s)
        if s.sop_uid in seen:
            s = with_new_uids(s, derived_uid("reuid", s.name), "#reuid")
        seen.add(s.sop_uid)
        out.append(s)
    return tuple(out)


def by_ts(samples, predicate) -> list[Sample]:
    return [s for s in samples if predicate(s.ts)]


def small_ct(sop_uid: str | None = None, **attrs) -> Sample:
    """CT_small.dcm (Explicit VR LE, 128x128x16 bit) with a fresh SOP Instance UID: the workhorse for tests
    that need many distinct objects."""
    base = sample_from_file(TESTDATA / "pydicom/CT_small.dcm")
    return with_new_uids(base, sop_uid or pydicom.uid.generate_uid(), "#new", **attrs)


def synthetic_instance(pixel_bytes: int, sop_uid: str | None = None, ts: str = ExplicitVRLittleEndian) -> Sample:
    """A Secondary Capture 8-bit image whose Pixel Data has about `pixel_bytes` bytes."""
    side = max(2, int(pixel_bytes**0.5))
    side += side % 2
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = sop_uid or pydicom.uid.generate_uid()
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.PatientID = "SYNTH"
    ds.PatientName = "Synthetic^Object"
    ds.StudyDate = "20240101"
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = side
    ds.Columns = side
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((i * 7) & 0xFF for i in range(side * side))
    ds["PixelData"].VR = "OB"
    return from_dataset(ds, ts, f"synthetic-{side}x{side}")
