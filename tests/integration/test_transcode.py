"""Transcoding on retrieve, against every compressed sample: WADO-RS instances, series and frames
decompressed to Explicit VR Little Endian (pixels equal to pydicom's decode of the original: exactly for
lossless sources, within a tolerance for lossy ones), JPEG-LS lossless made from lossless sources (decoded
by pydicom and by libjpeg to the exact pixels), 406 for a lossless syntax asked of a lossy source or for a
syntax the gateway cannot make, and the data set attributes that change with the pixel encoding."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from libjpeg import decode as libjpeg_decode
from pydicom.uid import UID

from gw_dimse import store_all
from gw_samples import LOSSLESS_TS, NATIVE_TS, TESTDATA, sample_from_file, unique_corpus, with_hierarchy, with_new_uids
from gw_web import client, get, read_part10

EXPLICIT_LE = "1.2.840.10008.1.2.1"
JLS_LOSSLESS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
# Decoded by a codec that undoes the colour transform (JPEG and JPEG 2000 families).
RGB_DECODED = ("1.2.840.10008.1.2.4.5", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.9", "1.2.840.10008.1.2.4.20")
# Stored near-lossless JPEG-LS samples lack Study/Series UIDs; the tests give them some.
NEAR_LOSSLESS = [with_hierarchy(sample_from_file(TESTDATA / f"pydicom/{n}"))
                 for n in ("JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_jls_lossy_line.dcm",
                           "SC_rgb_jls_lossy_sample.dcm")]
COMPRESSED = [s for s in unique_corpus() if s.has_pixels and s.ts not in NATIVE_TS] + NEAR_LOSSLESS
LOSSLESS = [s for s in COMPRESSED if s.ts in LOSSLESS_TS]
LOSSY = [s for s in COMPRESSED if s.ts not in LOSSLESS_TS]
NATIVE_IMAGES = [s for s in unique_corpus() if s.has_pixels and s.ts in NATIVE_TS
                 and s.ds.BitsAllocated in (8, 16) and s.ds.get("PhotometricInterpretation") != "YBR_FULL_422"][:6]
# Where dicom-rs 0.10's JPEG decoder (jpeg-decoder) falls short of pydicom's (libjpeg): strict xfail, so that
# a fix shows up. (RGB-coded lossy JPEG without an Adobe marker is handled: SC_jpeg_no_color_transform.dcm.)
DECODE_FAILS = {
    "pydicom/JPGExtended.dcm#reuid": "jpeg-decoder fails on this 12-bit JPEG Extended (process 4) stream",
}

MIXED_STUDY = "1.2.826.0.1.3680043.8.498.18.1"
MIXED_SERIES = MIXED_STUDY + ".1"
MIXED = [with_new_uids(s, f"{MIXED_SERIES}.{n}", "#mixed", StudyInstanceUID=MIXED_STUDY,
                       SeriesInstanceUID=MIXED_SERIES, PatientID="TRANSCODE")
         for n, s in enumerate(LOSSLESS[:4] + LOSSY[:2], 1)]


@pytest.fixture(scope="module")
def stored(gateway):
    samples = COMPRESSED + NATIVE_IMAGES + MIXED
    statuses = store_all(gateway, samples)
    assert all(v == 0 for v in statuses.values()), statuses
    return samples


@pytest.fixture(scope="module")
def c(gateway):
    return client(gateway)


def with_gaps(samples, gaps):
    return [pytest.param(s, marks=pytest.mark.xfail(reason=gaps[s.name], strict=True))
            if s.name in gaps else s for s in samples]


def reference(ds):
    """pydicom's decode of the original (pylibjpeg / openjpeg / RLE), or None where it has no decoder."""
    try:
        return ds.pixel_array
    except Exception:
        return None


def frame_bytes(ds) -> int:
    return ds.Rows * ds.Columns * ds.SamplesPerPixel * ((ds.BitsAllocated + 7) // 8)


def frames_of(arr, ds):
    """The reference pixel array split per frame (pydicom drops the frame axis for one frame)."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    return [arr] if n == 1 else list(arr)


def stored_bits(arr, ds):
    """The Bits Stored bits of each sample: what is above them is not part of the value (a decoder may
    sign-extend or not)."""
    bits = ds.BitsStored
    if arr.dtype.kind not in "iu" or bits >= arr.dtype.itemsize * 8:
        return arr
    return arr.astype(np.int64) & ((1 << bits) - 1)


def assert_pixels_match(exp, got, lossless: bool, what: str):
    assert exp.shape == got.shape, f"{what}: shape {got.shape} != {exp.shape}"
    if lossless:
        assert np.array_equal(exp, got), f"{what}: lossless decode changed pixel values"
    else:
        diff = np.abs(exp.astype(np.float64) - got.astype(np.float64))
        span = max(1.0, float(exp.max()) - float(exp.min()))
        assert diff.mean() <= max(1.0, 0.01 * span), f"{what}: mean difference {diff.mean():.2f} (span {span})"


def decompressed(c, sample, call, **kw):
    """`call` for `sample` in Explicit VR LE; None when the gateway answers 406, which it may only for an
    original that pydicom's decoders cannot decode either."""
    try:
        return call(sample.study_uid, sample.series_uid, sample.sop_uid, **kw)
    except requests.HTTPError as e:
        assert e.response.status_code == 406, f"answered {e.response.status_code}: {e.response.text}"
        assert "cannot decode" in e.response.text, e.response.text
        assert reference(sample.ds) is None, f"406 for an object pydicom decodes: {e.response.text}"
        return None


# -- instances -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sample", with_gaps(COMPRESSED, DECODE_FAILS), ids=lambda s: s.id)
def test_instance_decompressed_to_explicit_le(c, stored, sample):
    got = decompressed(c, sample, c.retrieve_instance, media_types=(("application/dicom", EXPLICIT_LE),))
    if got is None:
        return
    orig = sample.ds
    assert str(got.file_meta.TransferSyntaxUID) == EXPLICIT_LE
    # A lossless change of encoding keeps the instance's identity (PS3.4, PS3.5 Annex A).
    assert got.SOPInstanceUID == sample.sop_uid and got.file_meta.MediaStorageSOPInstanceUID == sample.sop_uid
    assert "EncapsulatedPixelDataValueTotalLength" not in got
    n = int(orig.get("NumberOfFrames", 1) or 1)
    assert len(got.PixelData) == frame_bytes(orig) * n + (frame_bytes(orig) * n) % 2
    if orig.SamplesPerPixel == 3:
        assert got.PlanarConfiguration == 0
        if sample.ts.startswith(RGB_DECODED):
            assert got.PhotometricInterpretation == "RGB"
    else:
        assert got.PhotometricInterpretation == orig.PhotometricInterpretation
    if sample.ts not in LOSSLESS_TS:
        assert got.LossyImageCompression == "01", "a lossy source must stay marked as lossy compressed"
    exp = reference(orig)
    if exp is not None:
        assert_pixels_match(exp, got.pixel_array, sample.ts in LOSSLESS_TS, sample.name)


# JPEG-LS codes 2 to 16 bits per sample.
ENCODABLE = [s for s in LOSSLESS + NATIVE_IMAGES if s.ds.BitsAllocated in (8, 16)]
TOO_WIDE = [s for s in LOSSLESS if s.ds.BitsAllocated not in (8, 16)]


@pytest.mark.parametrize("sample", TOO_WIDE, ids=lambda s: s.id)
def test_jpeg_ls_of_32_bit_samples_is_406(gateway, stored, sample):
    base = f"/studies/{sample.study_uid}/series/{sample.series_uid}/instances/{sample.sop_uid}"
    r = get(gateway, base, headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={JLS_LOSSLESS}'})
    assert r.status_code == 406 and "32" in r.text, (r.status_code, r.text)
    r = get(gateway, base + "/frames/1", headers={"Accept": 'multipart/related; type="image/jls"'})
    assert r.status_code == 406, (r.status_code, r.text)


@pytest.mark.parametrize("sample", ENCODABLE, ids=lambda s: s.id)
def test_jpeg_ls_lossless_from_lossless_sources_decodes_exactly(c, stored, sample):
    got = c.retrieve_instance(sample.study_uid, sample.series_uid, sample.sop_uid,
                              media_types=(("application/dicom", JLS_LOSSLESS),))
    assert str(got.file_meta.TransferSyntaxUID) == JLS_LOSSLESS
    assert got.SOPInstanceUID == sample.sop_uid
    exp = reference(sample.ds)
    if exp is None:
        pytest.skip(f"pydicom has no decoder for the original {sample.ts}")
    assert got.pixel_array.shape == exp.shape
    assert np.array_equal(stored_bits(got.pixel_array, sample.ds), stored_bits(exp, sample.ds)), (
        "JPEG-LS lossless output differs from the original pixels")


@pytest.mark.parametrize("sample", LOSSY, ids=lambda s: s.id)
def test_lossless_syntax_from_a_lossy_source_is_406(gateway, stored, sample):
    base = f"/studies/{sample.study_uid}/series/{sample.series_uid}/instances/{sample.sop_uid}"
    r = get(gateway, base, headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={JLS_LOSSLESS}'})
    assert r.status_code == 406, r.status_code
    assert "lossy" in r.text, r.text
    r = get(gateway, base + "/frames/1", headers={"Accept": 'multipart/related; type="image/jls"'})
    assert r.status_code == 406, r.status_code


def test_a_syntax_the_gateway_cannot_encode_is_406(gateway, stored):
    s = NATIVE_IMAGES[0]
    base = f"/studies/{s.study_uid}/series/{s.series_uid}/instances/{s.sop_uid}"
    r = get(gateway, base, headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={J2K_LOSSLESS}'})
    assert r.status_code == 406 and "cannot encode" in r.text, (r.status_code, r.text)
    r = get(gateway, base + "/frames/1", headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert r.status_code == 406, r.status_code


# -- frames ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sample", with_gaps(COMPRESSED, DECODE_FAILS), ids=lambda s: s.id)
def test_frames_as_octet_stream_are_the_decoded_pixels(c, stored, sample):
    orig = sample.ds
    n = int(orig.get("NumberOfFrames", 1) or 1)
    numbers = [1, n] if n > 1 else [1]
    got = decompressed(c, sample, c.retrieve_instance_frames, frame_numbers=numbers,
                       media_types=(("application/octet-stream", EXPLICIT_LE),))
    if got is None:
        return
    assert [len(f) for f in got] == [frame_bytes(orig)] * len(numbers)
    # The same pixels as the decompressed instance.
    whole = c.retrieve_instance(sample.study_uid, sample.series_uid, sample.sop_uid,
                                media_types=(("application/dicom", EXPLICIT_LE),))
    size = frame_bytes(orig)
    for number, frame in zip(numbers, got):
        assert frame == whole.PixelData[(number - 1) * size:number * size], f"frame {number} differs"
    exp = reference(orig)
    if exp is not None and sample.ts in LOSSLESS_TS:
        ref = frames_of(exp, orig)
        for number, frame in zip(numbers, got):
            values = np.frombuffer(frame, dtype=ref[number - 1].dtype.newbyteorder("<")).reshape(ref[number - 1].shape)
            assert np.array_equal(stored_bits(values, orig), stored_bits(ref[number - 1], orig)), f"frame {number}"


@pytest.mark.parametrize("sample", ENCODABLE, ids=lambda s: s.id)
def test_frames_as_jpeg_ls_decode_exactly(c, stored, sample):
    got = c.retrieve_instance_frames(sample.study_uid, sample.series_uid, sample.sop_uid, frame_numbers=[1],
                                     media_types=(("image/jls", JLS_LOSSLESS),))
    assert len(got) == 1 and got[0][:4] == b"\xff\xd8\xff\xf7", "not a JPEG-LS codestream"
    exp = reference(sample.ds)
    if exp is None:
        pytest.skip(f"pydicom has no decoder for the original {sample.ts}")
    ref = frames_of(exp, sample.ds)[0]
    decoded = libjpeg_decode(bytes(got[0]))
    assert decoded.shape == ref.shape, f"{decoded.shape} != {ref.shape}"
    # JPEG-LS codes the Bits Stored bits; the sign comes from the data set's attributes.
    assert np.array_equal(stored_bits(decoded, sample.ds), stored_bits(ref, sample.ds))


def test_frames_as_stored_stay_as_stored(c, stored):
    s = next(s for s in LOSSLESS if s.ts == J2K_LOSSLESS)
    got = c.retrieve_instance_frames(s.study_uid, s.series_uid, s.sop_uid, frame_numbers=[1],
                                     media_types=(("image/jp2", J2K_LOSSLESS),))
    from pydicom.encaps import generate_frames
    expected = next(generate_frames(s.ds.PixelData, number_of_frames=1))
    assert got[0].rstrip(b"\0") == expected.rstrip(b"\0")


# -- series and studies ----------------------------------------------------------------------------------------
def test_series_and_study_transcoded_part_by_part(c, stored):
    by_uid = {s.sop_uid: s for s in MIXED}
    for got in (c.retrieve_series(MIXED_STUDY, MIXED_SERIES, media_types=(("application/dicom", EXPLICIT_LE),)),
                c.retrieve_study(MIXED_STUDY, media_types=(("application/dicom", EXPLICIT_LE),))):
        assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(by_uid)
        for d in got:
            s = by_uid[str(d.SOPInstanceUID)]
            assert str(d.file_meta.TransferSyntaxUID) == EXPLICIT_LE
            exp = reference(s.ds)
            if exp is not None:
                assert_pixels_match(exp, d.pixel_array, s.ts in LOSSLESS_TS, s.name)


def test_series_in_jpeg_ls_is_refused_when_one_instance_is_lossy(gateway, stored):
    r = get(gateway, f"/studies/{MIXED_STUDY}/series/{MIXED_SERIES}",
            headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={JLS_LOSSLESS}'})
    assert r.status_code == 406, r.status_code
