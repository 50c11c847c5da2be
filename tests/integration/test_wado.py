"""WADO-RS against the whole corpus: instances as stored and in the default transfer syntax, studies and
series, metadata with fetchable BulkDataURIs, frames, and the error answers."""

from __future__ import annotations

import re

import numpy as np
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.uid import UID

from conftest import BACKENDS, backend_env
from gw_samples import LOSSLESS_TS, Sample, unique_corpus
from gw_web import client, get, multipart_parts


@pytest.fixture(scope="module", params=BACKENDS)
def storage_env(request):
    """The whole module runs on each storage backend: filesystem, then S3 (Garage)."""
    return backend_env(request)


CORPUS = list(unique_corpus())
IMAGES = [s for s in CORPUS if s.has_pixels]
EXPLICIT_LE = "1.2.840.10008.1.2.1"
AS_STORED = (("application/dicom", "*"),)
DEFAULT_TS = ("application/dicom",)
# Over DICOMweb, "as stored" may still turn Implicit VR / Big Endian / Deflate into Explicit VR Little Endian.
MAY_BECOME_EXPLICIT_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
# Attributes a transcoder changes or adds when it decompresses.
TRANSCODE_MAY_CHANGE = {0x00280004, 0x00280006, 0x00282110, 0x00282112, 0x00282114, 0x7FE00010}
NUMERIC_VRS = {"US", "UL", "SS", "SL", "FL", "FD", "UV", "SV", "IS", "DS"}


@pytest.fixture(scope="module")
def corpus(stored_corpus):
    return stored_corpus


def test_every_corpus_sample_is_acknowledged(corpus):
    assert corpus.refused == {}, f"{len(corpus.refused)} samples not stored with 0000: {corpus.refused}"


@pytest.fixture(scope="module")
def c(gateway):
    return client(gateway)


def acked(corpus, sample: Sample) -> Sample:
    if sample not in corpus.acked:
        pytest.fail(f"{sample.name} was not stored (status {corpus.statuses.get(sample.name)})")
    return sample


# -- comparison helpers ----------------------------------------------------------------------------------------
def _swap_width(vr: str) -> int:
    """Byte width to swap when a value of this VR moves from big to little endian (0: none)."""
    return {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}.get(vr, 0)


def compare_datasets(expected: Dataset, got: Dataset, path: str = "", skip=frozenset(),
                     swap: bool = False, compare_vr: bool = True) -> list[str]:
    """Element-by-element differences (group 0002 and group lengths ignored; `skip` tags not compared)."""
    problems = []
    exp_tags = {t for t in expected.keys() if t.group != 0x0002 and t.element != 0 and t not in skip}
    got_tags = {t for t in got.keys() if t.group != 0x0002 and t.element != 0 and t not in skip}
    for t in sorted(exp_tags - got_tags):
        problems.append(f"{path}{t}: missing")
    for t in sorted(got_tags - exp_tags):
        problems.append(f"{path}{t}: not in the original")
    for t in sorted(exp_tags & got_tags):
        e, g = expected[t], got[t]
        if compare_vr and e.VR != g.VR and "UN" not in (e.VR, g.VR):
            problems.append(f"{path}{t}: VR {g.VR} != {e.VR}")
        if e.VR == "SQ":
            if len(e.value) != len(g.value):
                problems.append(f"{path}{t}: {len(g.value)} items != {len(e.value)}")
                continue
            for i, (ei, gi) in enumerate(zip(e.value, g.value)):
                problems += compare_datasets(ei, gi, f"{path}{t}[{i}].", skip=frozenset(), swap=swap,
                                             compare_vr=compare_vr)
            continue
        ev, gv = e.value, g.value
        if isinstance(ev, bytes) and isinstance(gv, bytes) and swap and _swap_width(e.VR):
            ev = _to_le(ev, _swap_width(e.VR))
        if ev != gv and not (isinstance(ev, bytes) and isinstance(gv, bytes) and ev.rstrip(b"\0") == gv.rstrip(b"\0")):
            problems.append(f"{path}{t} {e.keyword}: {_short(gv)} != {_short(ev)}")
    return problems


def _short(v) -> str:
    s = repr(v)
    return s if len(s) < 90 else s[:87] + "..."


def _to_le(raw: bytes, width: int) -> bytes:
    n = len(raw) // width * width
    return np.frombuffer(raw[:n], dtype=f">u{width}").astype(f"<u{width}").tobytes() + raw[n:]


def le_pixel_bytes(ds: Dataset) -> bytes:
    """Native Pixel Data as little-endian bytes. From big endian: swapped per pixel cell, or per 16-bit word
    for 8-bit pixels in an OW value (PS3.5 7.3), as pydicom reads them."""
    raw = ds.PixelData
    if UID(ds.file_meta.TransferSyntaxUID).is_little_endian:
        return raw
    width = (ds.BitsAllocated + 7) // 8
    if width == 1:
        width = 2 if ds["PixelData"].VR == "OW" else 1
    return raw if width == 1 else _to_le(raw, width)


def frame_size(ds: Dataset) -> int:
    """Bytes per native frame (computed here: pydicom's helper trips over an invalid Number of Frames)."""
    pixels_per_frame = ds.Rows * ds.Columns
    if ds.BitsAllocated == 1:
        return (pixels_per_frame * ds.SamplesPerPixel + 7) // 8
    if ds.PhotometricInterpretation == "YBR_FULL_422":
        return pixels_per_frame * 2 * (ds.BitsAllocated // 8)
    return pixels_per_frame * ds.SamplesPerPixel * (ds.BitsAllocated // 8)


def native_frame(ds: Dataset, index: int) -> bytes:
    size = frame_size(ds)
    return le_pixel_bytes(ds)[index * size:(index + 1) * size]


def got_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except ValueError:
        return 1


def encapsulated_frame(ds: Dataset, index: int) -> bytes:
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    return list(generate_frames(ds.PixelData, number_of_frames=nframes))[index]


def pixels(ds: Dataset):
    try:
        return ds.pixel_array
    except Exception as e:  # no decoder for it, or an unusable header (badVR.dcm)
        return e


# -- instances -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sample", CORPUS, ids=lambda s: s.id)
def test_instance_as_stored_equals_the_original(c, corpus, sample):
    s = acked(corpus, sample)
    got = c.retrieve_instance(s.study_uid, s.series_uid, s.sop_uid, media_types=AS_STORED)
    got_ts = str(got.file_meta.TransferSyntaxUID)
    allowed = {s.ts} | ({EXPLICIT_LE} if s.ts in MAY_BECOME_EXPLICIT_LE else set())
    assert got_ts in allowed, f"transfer-syntax=* gave {got_ts}, stored {s.ts}"
    same_ts = got_ts == s.ts
    swap = not UID(s.ts).is_little_endian and UID(got_ts).is_little_endian
    problems = compare_datasets(s.ds, got, skip={0x7FE00010}, swap=swap,
                                compare_vr=not UID(s.ts).is_implicit_VR)
    assert not problems, "\n".join(problems[:30])
    if s.has_pixels:
        if same_ts:
            assert got.PixelData == s.ds.PixelData, "Pixel Data bytes differ"
        else:
            assert le_pixel_bytes(got) == le_pixel_bytes(s.ds), "Pixel Data values differ"
    assert str(got.file_meta.MediaStorageSOPInstanceUID) == s.sop_uid


@pytest.mark.parametrize("sample", CORPUS, ids=lambda s: s.id)
def test_instance_in_default_transfer_syntax_is_explicit_le_with_equal_pixels(c, corpus, sample):
    s = acked(corpus, sample)
    try:
        got = c.retrieve_instance(s.study_uid, s.series_uid, s.sop_uid, media_types=DEFAULT_TS)
    except requests.HTTPError as e:
        status = e.response.status_code
        if s.is_native:
            pytest.fail(f"native object in the default transfer syntax answered {status}")
        assert status == 406, f"compressed object in the default transfer syntax answered {status}, not 406"
        return
    assert str(got.file_meta.TransferSyntaxUID) == EXPLICIT_LE
    swap = not UID(s.ts).is_little_endian
    if s.is_native:
        problems = compare_datasets(s.ds, got, skip={0x7FE00010}, swap=swap,
                                    compare_vr=not UID(s.ts).is_implicit_VR)
        assert not problems, "\n".join(problems[:30])
        if s.has_pixels:
            exp, out = pixels(s.ds), pixels(got)
            if isinstance(exp, Exception):
                assert le_pixel_bytes(got) == le_pixel_bytes(s.ds), "Pixel Data values differ"
            else:
                assert not isinstance(out, Exception), f"returned pixels undecodable: {out}"
                assert np.array_equal(exp, out), "pixel values differ"
        return
    # A compressed object the gateway decompressed: the rest must be untouched, the pixels decoded right.
    problems = compare_datasets(s.ds, got, skip=TRANSCODE_MAY_CHANGE, compare_vr=True)
    assert not problems, "\n".join(problems[:30])
    exp, out = pixels(s.ds), pixels(got)
    assert not isinstance(out, Exception), f"decompressed object is not decodable: {out}"
    if isinstance(exp, Exception):  # no reference decoder here: check the size only
        assert len(got.PixelData) >= frame_size(got) * got_frames(got)
        return
    assert exp.shape == out.shape, f"shape {out.shape} != {exp.shape}"
    if s.ts in LOSSLESS_TS:
        assert np.array_equal(exp, out), "lossless decompression changed pixel values"
    else:
        diff = np.abs(exp.astype(np.float64) - out.astype(np.float64))
        span = max(1.0, float(exp.max()) - float(exp.min()))
        assert diff.mean() <= max(1.0, 0.01 * span), f"lossy decode differs: mean {diff.mean():.2f}"


@pytest.mark.parametrize("sample", [s for s in IMAGES], ids=lambda s: s.id)
def test_frames_equal_the_original_frames(c, corpus, sample):
    s = acked(corpus, sample)
    numbers = [1, 2] if s.number_of_frames >= 2 else [1]
    got = c.retrieve_instance_frames(s.study_uid, s.series_uid, s.sop_uid, frame_numbers=numbers,
                                     media_types=(("application/octet-stream", "*"),))
    assert len(got) == len(numbers), f"{len(got)} parts for frames {numbers}"
    for n, frame in zip(numbers, got):
        expected = native_frame(s.ds, n - 1) if s.is_native else encapsulated_frame(s.ds, n - 1)
        if frame != expected and not s.is_native and frame.rstrip(b"\0") == expected.rstrip(b"\0"):
            continue  # a fragment's trailing pad byte may be dropped
        assert len(frame) == len(expected) and frame == expected, (
            f"frame {n}: {len(frame)} bytes differ from the original's {len(expected)}")
    if s.is_native:
        default = c.retrieve_instance_frames(s.study_uid, s.series_uid, s.sop_uid, frame_numbers=[1],
                                             media_types=("application/octet-stream",))
        assert default == [native_frame(s.ds, 0)], "frame 1 in the default transfer syntax differs"


# -- studies and series ----------------------------------------------------------------------------------------
def biggest_studies(corpus, n=3):
    studies = corpus.studies()
    return sorted(studies, key=lambda st: (-len(studies[st]), st))[:n]


def test_retrieve_study_streams_every_instance(c, corpus):
    studies = corpus.studies()
    for st in biggest_studies(corpus):
        got = c.retrieve_study(st, media_types=AS_STORED)
        assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(s.sop_uid for s in studies[st])
        by_uid = {s.sop_uid: s for s in studies[st]}
        for d in got:
            if "PixelData" in d and str(d.file_meta.TransferSyntaxUID) == by_uid[str(d.SOPInstanceUID)].ts:
                assert d.PixelData == by_uid[str(d.SOPInstanceUID)].ds.PixelData


def test_retrieve_series_returns_its_instances(c, corpus):
    for se, samples in list(corpus.series().items())[:5]:
        got = c.retrieve_series(samples[0].study_uid, se, media_types=AS_STORED)
        assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(s.sop_uid for s in samples)


def test_retrieve_study_part_headers_name_their_transfer_syntax(gateway, corpus):
    st = biggest_studies(corpus, 1)[0]
    r = get(gateway, f"/studies/{st}", headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200
    for headers, _ in multipart_parts(r):
        ctype = headers.get("content-type", "")
        assert ctype.startswith("application/dicom"), ctype
        assert "transfer-syntax=" in ctype, f"part without transfer-syntax parameter: {ctype!r}"


# -- metadata --------------------------------------------------------------------------------------------------
def walk_json(obj: dict, path=""):
    for key, elem in obj.items():
        yield path + key, key, elem
        if elem.get("vr") == "SQ":
            for i, item in enumerate(elem.get("Value", [])):
                yield from walk_json(item, f"{path}{key}[{i}].")


def study_metadata(gw, st: str) -> list[dict]:
    """GET .../metadata with plain requests. dicomweb_client 0.61.2 sends `Host: 127.0.0.1` without the
    port (web.py, _http_get), which would mislead a server that builds BulkDataURIs from the Host header;
    test_metadata_fetched_by_dicomweb_client_has_bulkdata_uris_on_this_server covers that case on its own."""
    r = get(gw, f"/studies/{st}/metadata", headers={"Accept": "application/dicom+json"})
    r.raise_for_status()
    return r.json()


def test_study_metadata_is_dicom_json_with_fetchable_bulkdata_uris(gateway, c, corpus):
    base = gateway.http_root
    problems = []
    for st, samples in corpus.studies().items():
        try:
            meta = study_metadata(gateway, st)
        except requests.HTTPError as e:
            problems.append(f"{st}: metadata answered {e.response.status_code}")
            continue
        by_uid = {}
        for obj in meta:
            keys = list(obj)
            if keys != sorted(keys) or not all(re.fullmatch(r"[0-9A-F]{8}", k) for k in keys):
                problems.append(f"{st}: keys not ascending upper-case 8-hex tags")
            if any(k.startswith("0002") for k in keys):
                problems.append(f"{st}: group 0002 in metadata")
            by_uid[obj.get("00080018", {}).get("Value", [None])[0]] = obj
        if set(by_uid) != {s.sop_uid for s in samples}:
            problems.append(f"{st}: metadata for {len(by_uid)} instances, {len(samples)} stored")
            continue
        for s in samples:
            obj = by_uid[s.sop_uid]
            for path, _key, elem in walk_json(obj):
                if sum(k in elem for k in ("Value", "BulkDataURI", "InlineBinary")) > 1:
                    problems.append(f"{s.id} {path}: more than one of Value/BulkDataURI/InlineBinary")
            if s.has_pixels:
                px = obj.get("7FE00010", {})
                uri = px.get("BulkDataURI")
                if not uri or not uri.startswith(base + "/"):
                    problems.append(f"{s.id}: Pixel Data BulkDataURI {uri!r} is not an absolute URL on {base}")
                    continue
                try:
                    content = b"".join(c.retrieve_bulkdata(uri, media_types=(("application/octet-stream", "*"),)))
                except requests.HTTPError as e:
                    problems.append(f"{s.id}: Pixel Data BulkDataURI answered {e.response.status_code}")
                    continue
                if s.is_native:
                    expected = le_pixel_bytes(s.ds)
                    if content.rstrip(b"\0") != expected.rstrip(b"\0"):
                        problems.append(f"{s.id}: bulk Pixel Data ({len(content)} bytes) != original ({len(expected)})")
                elif not content:
                    problems.append(f"{s.id}: bulk Pixel Data empty")
    assert not problems, "\n".join(problems[:40])


def test_every_bulkdata_uri_in_metadata_answers_200(gateway, c, corpus):
    uris, bad = [], []
    for st in corpus.studies():
        try:
            for obj in study_metadata(gateway, st):
                uris += [e["BulkDataURI"] for _p, _k, e in walk_json(obj) if "BulkDataURI" in e]
        except requests.HTTPError as e:
            bad.append((f"/studies/{st}/metadata", e.response.status_code))
    assert uris
    for uri in uris:
        r = requests.get(uri, headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
                         timeout=30)
        if r.status_code != 200:
            bad.append((uri, r.status_code))
    assert not bad, bad[:10]


def test_metadata_fetched_by_dicomweb_client_has_bulkdata_uris_on_this_server(gateway, c, corpus):
    """dicomweb_client sends a Host header without the port: the URIs must still point at this server."""
    s = next(s for s in corpus.acked if s.has_pixels and s.is_native)
    meta = c.retrieve_series_metadata(s.study_uid, s.series_uid)
    uris = [e["BulkDataURI"] for obj in meta for _p, _k, e in walk_json(obj) if "BulkDataURI" in e]
    assert uris, "no BulkDataURI in the metadata"
    wrong = [u for u in uris if not u.startswith(gateway.http_root + "/")]
    assert not wrong, f"BulkDataURIs not on {gateway.http_root}: {wrong[:3]}"
    assert c.retrieve_bulkdata(uris[0], media_types=(("application/octet-stream", "*"),))


def test_numeric_values_in_metadata_are_json_numbers(c, corpus):
    problems = []
    for s in corpus.acked:
        try:
            meta = c.retrieve_instance_metadata(s.study_uid, s.series_uid, s.sop_uid)
        except requests.HTTPError as e:
            problems.append(f"{s.id}: instance metadata answered {e.response.status_code}")
            continue
        obj = meta[0] if isinstance(meta, list) else meta
        problems += _numbers(obj, s.ds, s.id)
    assert not problems, "\n".join(problems[:40])


def _numbers(obj: dict, ds: Dataset, where: str) -> list[str]:
    """Numeric-VR values that are not JSON numbers, where the original value is a number."""
    problems = []
    for key, elem in obj.items():
        tag = int(key, 16)
        original = ds[tag] if tag in ds else None
        if elem.get("vr") == "SQ" and original is not None and original.VR == "SQ":
            for item, orig_item in zip(elem.get("Value", []), original.value):
                problems += _numbers(item, orig_item, where)
            continue
        if elem.get("vr") not in NUMERIC_VRS:
            continue
        orig = [] if original is None or original.value is None else original.value
        orig = list(orig) if isinstance(orig, (list, tuple, MultiValue)) else [orig]
        for i, v in enumerate(elem.get("Value", [])):
            if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
                continue
            if i < len(orig) and not isinstance(orig[i], (int, float)):
                continue  # the original is not a number either (badVR.dcm has IS "1A")
            problems.append(f"{where} {key} ({elem.get('vr')}) value {v!r} is not a JSON number")
    return problems


def test_instance_metadata_values_match_the_original(c, corpus):
    problems = []
    for s in corpus.acked:
        try:
            obj = c.retrieve_instance_metadata(s.study_uid, s.series_uid, s.sop_uid)
        except requests.HTTPError as e:
            problems.append(f"{s.id}: instance metadata answered {e.response.status_code}")
            continue
        obj = obj[0] if isinstance(obj, list) else obj
        for kw, tag in [("SOPClassUID", "00080016"), ("SOPInstanceUID", "00080018"),
                        ("StudyInstanceUID", "0020000D"), ("SeriesInstanceUID", "0020000E")]:
            got = obj.get(tag, {}).get("Value", [None])[0]
            if got != str(s.ds.get(kw)):
                problems.append(f"{s.id}: {kw} {got!r} != {s.ds.get(kw)!r}")
        for kw, tag in [("Rows", "00280010"), ("Columns", "00280011")]:
            if kw in s.ds and obj.get(tag, {}).get("Value", [None])[0] != s.ds.get(kw):
                problems.append(f"{s.id}: {kw} {obj.get(tag)} != {s.ds.get(kw)}")
    assert not problems, "\n".join(problems[:40])


# -- error answers ---------------------------------------------------------------------------------------------
DICOM_ACCEPT = {"Accept": 'multipart/related; type="application/dicom"'}


def first_native_image(corpus) -> Sample:
    return next(s for s in corpus.acked if s.has_pixels and s.ts == EXPLICIT_LE)


def test_unknown_study_answers_404(gateway, corpus):
    assert get(gateway, "/studies/1.2.826.0.1.3680043.8.498.404", headers=DICOM_ACCEPT).status_code == 404
    assert get(gateway, "/studies/1.2.826.0.1.3680043.8.498.404/metadata",
               headers={"Accept": "application/dicom+json"}).status_code == 404


def test_unknown_instance_in_known_series_answers_404(gateway, corpus):
    s = first_native_image(corpus)
    r = get(gateway, f"/studies/{s.study_uid}/series/{s.series_uid}/instances/1.2.826.0.1.3680043.8.498.404",
            headers=DICOM_ACCEPT)
    assert r.status_code == 404


@pytest.mark.parametrize("accept", [
    "text/html",
    'multipart/related; type="application/dicom"; transfer-syntax=1.2.826.0.1.3680043.8.498.406',
    'multipart/related; type="image/png"',
])
def test_unsupported_accept_answers_406(gateway, corpus, accept):
    s = first_native_image(corpus)
    r = get(gateway, f"/studies/{s.study_uid}/series/{s.series_uid}/instances/{s.sop_uid}", headers={"Accept": accept})
    assert r.status_code == 406, f"Accept: {accept} answered {r.status_code}"


@pytest.mark.parametrize("frames", ["0", "0,1", "abc", "-1"])
def test_invalid_frame_number_answers_400(gateway, corpus, frames):
    s = first_native_image(corpus)
    r = get(gateway, f"/studies/{s.study_uid}/series/{s.series_uid}/instances/{s.sop_uid}/frames/{frames}",
            headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert r.status_code == 400, f"frames/{frames} answered {r.status_code}"


def test_quoted_and_unquoted_accept_parameters_are_both_understood(gateway, corpus):
    s = first_native_image(corpus)
    url = f"/studies/{s.study_uid}/series/{s.series_uid}/instances/{s.sop_uid}"
    for accept in ['multipart/related; type="application/dicom"; transfer-syntax="1.2.840.10008.1.2.1"',
                   "multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.1"]:
        r = get(gateway, url, headers={"Accept": accept})
        assert r.status_code == 200, f"Accept: {accept} answered {r.status_code}"


def test_wado_answers_carry_cors_headers(gateway, corpus):
    s = first_native_image(corpus)
    r = get(gateway, f"/studies/{s.study_uid}/metadata",
            headers={"Accept": "application/dicom+json", "Origin": "http://viewer.example"})
    assert r.status_code == 200
    assert r.headers.get("Access-Control-Allow-Origin") in ("*", "http://viewer.example")

