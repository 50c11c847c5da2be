"""C-STORE requests the gateway must refuse, and the promise that a refused object leaves nothing behind:
no QIDO match and no new file in the data directory (objects, spool; the index excepted).

Only refused objects are sent to this module's gateway, so any file that mentions one of their UIDs is a
leftover.
"""

import zlib

import pytest
from pynetdicom import build_context

from gw_dimse import (
    association, contexts_for, echo_status, fmt, is_cannot_understand_or_mismatch, is_failure,
    send_raw_c_store, store,
)
from gw_samples import (
    SENT_INVALID, TESTDATA, Sample, derived_uid, encode_dataset, sample_from_file, small_ct,
    synthetic_instance,
)
from gw_web import client, instance_json

MADE_UP_SOP_CLASS = "1.2.826.0.1.3680043.8.498.999.1"  # no such storage SOP class exists
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"


def invalid_cases():
    """(id, sample whose payload is cut short or malformed). UIDs are derived from the case name, so each case is the
    only object with its UID."""
    cases = []
    for name in SENT_INVALID:  # invalid files from testdata/, sent exactly as they are
        s = sample_from_file(TESTDATA / name)
        cases.append((name.rsplit("/", 1)[-1], s))
    ct = small_ct(sop_uid=derived_uid("truncated", "ct"))
    n = len(ct.payload)
    # CT_small ends with Pixel Data (32768 bytes) and then Data Set Trailing Padding (FFFC,FFFC), 126 bytes
    # of value after a 12-byte header.
    for label, cut in [("ct-first-100-bytes", 100), ("ct-inside-element-header", 301),
                       ("ct-half-pixel-data", n - 16000), ("ct-last-pixel-byte-missing", n - 139),
                       ("ct-cut-inside-trailing-padding", n - 1)]:
        cases.append((label, _cut(ct, cut, label)))
    implicit = sample_from_file(TESTDATA / "pydicom/MR_small_implicit.dcm")
    implicit = _with_uid(implicit, derived_uid("truncated", "implicit"))
    cases.append(("implicit-le-inside-pixel-data", _cut(implicit, len(implicit.payload) - 999, "implicit")))
    deflated = sample_from_file(TESTDATA / "pydicom/image_dfl.dcm")
    deflated = _with_uid(deflated, derived_uid("truncated", "deflate"))
    cases.append(("deflate-stream-cut", _cut(deflated, len(deflated.payload) // 2, "deflate")))
    rle = sample_from_file(TESTDATA / "pydicom/MR_small_RLE.dcm")
    rle = _with_uid(rle, derived_uid("truncated", "rle"))
    cases.append(("rle-inside-fragment", _cut(rle, len(rle.payload) - 333, "rle")))
    return cases


def _with_uid(sample: Sample, uid: str) -> Sample:
    ds = sample.ds.copy()
    ds.SOPInstanceUID = uid
    payload = encode_dataset(ds, sample.ts)
    return Sample(sample.name, sample.ts, sample.sop_class, uid, sample.study_uid, sample.series_uid,
                  payload, ds)


def _cut(sample: Sample, length: int, label: str) -> Sample:
    return Sample(sample.name + "#" + label, sample.ts, sample.sop_class, sample.sop_uid, sample.study_uid,
                  sample.series_uid, sample.payload[:length], sample.ds)


INVALID_CASES = invalid_cases()


def assert_nothing_left(gw, files_before, *uids):
    c = client(gw)
    for uid in uids:
        assert instance_json(c, uid) == [], f"QIDO finds the refused instance {uid}"
        assert gw.files_mentioning(uid) == [], f"a file under the data directory mentions refused instance {uid}"
    assert gw.data_files() == files_before, (
        f"data directory changed by a refused C-STORE: new {sorted(map(str, gw.data_files() - files_before))}"
    )


@pytest.mark.parametrize("case", INVALID_CASES, ids=[c[0] for c in INVALID_CASES])
def test_truncated_or_malformed_data_set_is_refused_and_leaves_nothing(gateway, case):
    _label, sample = case
    before = gateway.data_files()
    with association(gateway, contexts_for([sample])) as assoc:
        status = store(assoc, sample)
        assert is_cannot_understand_or_mismatch(status), (
            f"invalid data set ({len(sample.payload)} bytes) answered {fmt(status)}, expected A9xx or Cxxx"
        )
        assert echo_status(assoc) == 0x0000, "association unusable after a refused C-STORE"
    assert_nothing_left(gateway, before, sample.sop_uid)


def test_data_set_uid_differing_from_affected_sop_instance_uid_is_refused(gateway):
    in_dataset = derived_uid("mismatch", "dataset")
    in_command = derived_uid("mismatch", "command")
    ct = small_ct(sop_uid=in_dataset)
    before = gateway.data_files()
    with association(gateway, contexts_for([ct])) as assoc:
        status = send_raw_c_store(assoc, ct.payload, ct.sop_class, in_command, ct.ts)
    assert is_cannot_understand_or_mismatch(status), (
        f"data set SOP Instance UID != Affected SOP Instance UID answered {fmt(status)}, expected A9xx or Cxxx"
    )
    assert_nothing_left(gateway, before, in_dataset, in_command)


def test_c_store_of_unknown_sop_class_gets_0122(gateway):
    """A made-up SOP class, sent on an accepted CT context (Affected SOP Class UID and data set agree)."""
    uid = derived_uid("unknown-class", "on-ct-context")
    ct = small_ct(sop_uid=uid, SOPClassUID=MADE_UP_SOP_CLASS)
    before = gateway.data_files()
    with association(gateway, [build_context(CT_IMAGE_STORAGE, EXPLICIT_LE)]) as assoc:
        status = send_raw_c_store(assoc, ct.payload, MADE_UP_SOP_CLASS, uid, EXPLICIT_LE,
                                  context_class=CT_IMAGE_STORAGE)
    assert status == 0x0122, f"unknown SOP class answered {fmt(status)}, expected 0x0122"
    assert_nothing_left(gateway, before, uid)


def test_presentation_context_for_unknown_sop_class_is_rejected_or_store_gets_0122(gateway):
    uid = derived_uid("unknown-class", "own-context")
    ct = small_ct(sop_uid=uid, SOPClassUID=MADE_UP_SOP_CLASS)
    before = gateway.data_files()
    with association(gateway, [build_context(MADE_UP_SOP_CLASS, EXPLICIT_LE),
                               build_context(CT_IMAGE_STORAGE, EXPLICIT_LE)]) as assoc:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert CT_IMAGE_STORAGE in accepted
        if MADE_UP_SOP_CLASS in accepted:
            status = send_raw_c_store(assoc, ct.payload, MADE_UP_SOP_CLASS, uid, EXPLICIT_LE)
            assert status == 0x0122, f"unknown SOP class answered {fmt(status)}, expected 0x0122"
    assert_nothing_left(gateway, before, uid)


def test_object_larger_than_max_object_size_gets_failure_and_leaves_nothing(gateway_factory):
    gw = gateway_factory(env={"DICOMGW_DIMSE__MAX_OBJECT_SIZE": "200000"})
    small = synthetic_instance(50_000, sop_uid=derived_uid("size", "small"))
    big = synthetic_instance(1_000_000, sop_uid=derived_uid("size", "big"))
    before = gw.data_files()
    with association(gw, contexts_for([small, big])) as assoc:
        big_status = store(assoc, big, msg_id=1)
        assert is_failure(big_status), f"object of {len(big.payload)} bytes > 200000 answered {fmt(big_status)}"
        assert_nothing_left(gw, before, big.sop_uid)
        small_status = store(assoc, small, msg_id=2)
    assert small_status == 0x0000, f"object of {len(small.payload)} bytes < 200000 answered {fmt(small_status)}"
    assert len(instance_json(client(gw), small.sop_uid)) == 1


def test_data_set_without_sop_instance_uid_is_refused(gateway):
    ct = small_ct(sop_uid=derived_uid("no-sop-uid", "x"))
    ds = ct.ds.copy()
    del ds.SOPInstanceUID
    payload = encode_dataset(ds, ct.ts)
    before = gateway.data_files()
    with association(gateway, contexts_for([ct])) as assoc:
        status = send_raw_c_store(assoc, payload, ct.sop_class, ct.sop_uid, ct.ts)
    assert is_cannot_understand_or_mismatch(status), f"data set without SOP Instance UID answered {fmt(status)}"
    assert_nothing_left(gateway, before, ct.sop_uid)


def test_garbage_data_set_is_refused(gateway):
    uid = derived_uid("garbage", "payload")
    garbage = bytes((i * 131 + 7) & 0xFF for i in range(4096))
    before = gateway.data_files()
    with association(gateway, [build_context(CT_IMAGE_STORAGE, EXPLICIT_LE)]) as assoc:
        status = send_raw_c_store(assoc, garbage, CT_IMAGE_STORAGE, uid, EXPLICIT_LE)
        assert is_cannot_understand_or_mismatch(status), f"4 KiB of noise as a data set answered {fmt(status)}"
        assert echo_status(assoc) == 0x0000
    assert_nothing_left(gateway, before, uid)



def _ct_with_element_before_pixel_data(label: str, element: bytes) -> tuple[Sample, bytes]:
    """A fresh CT (Explicit VR LE) and its data set with `element` inserted right before the pixel data."""
    ct = small_ct(sop_uid=derived_uid(label, "ct"))
    pixel_data = ct.payload.index(b"\xe0\x7f\x10\x00")
    return ct, ct.payload[:pixel_data] + element + ct.payload[pixel_data:]


def _deflate(chunks) -> bytes:
    """Raw deflate (no zlib header), as Deflated Explicit VR Little Endian wants (PS3.5 A.5)."""
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    return b"".join(z.compress(c) for c in chunks) + z.flush()


def _peak_memory_kb(gateway) -> int:
    with open(f"/proc/{gateway.proc.pid}/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))


@pytest.mark.parametrize("deflated", [False, True], ids=["explicit-le", "deflated"])
def test_un_of_undefined_length_holding_items_is_refused_without_a_huge_allocation(gateway, deflated):
    """A CT carrying (4453,100C) UN of undefined length with Implicit VR items (CP-246; the element of
    testdata/pydicom/UN_sequence.dcm, which starts right after its meta group at byte 0x166). dicom-rs 0.10
    reads such items in Explicit VR and allocated 3.7 GB for them; the gateway refuses the object before it
    parses, at once and with its memory unchanged, whether the data set is sent as it is or deflated."""
    un_element = (TESTDATA / "pydicom/UN_sequence.dcm").read_bytes()[0x166:]
    assert un_element[:4] == b"\x53\x44\x0c\x10"
    ct, payload = _ct_with_element_before_pixel_data(f"un-undefined-length-{deflated}", un_element)
    ts = DEFLATED_LE if deflated else ct.ts
    if deflated:
        payload = _deflate([payload])
    before = gateway.data_files()
    with association(gateway, [build_context(ct.sop_class, ts)]) as assoc:
        status = send_raw_c_store(assoc, payload, ct.sop_class, ct.sop_uid, ts)
        assert is_cannot_understand_or_mismatch(status), f"answered {fmt(status)}, expected A9xx or Cxxx"
    assert _peak_memory_kb(gateway) < 512 * 1024, "gateway peak memory after refusing the object"
    assert_nothing_left(gateway, before, ct.sop_uid)


def test_deflated_data_set_inflating_to_a_gigabyte_is_refused_without_holding_it(gateway):
    """1 GiB of zeros in an OB element before the pixel data deflate to ~1 MB. dicom-rs would inflate the
    element and hold it in memory while parsing the header; the gateway refuses a data set that inflates far
    beyond its size before it parses, keeping none of it."""
    zeros = 1 << 30
    ct = small_ct(sop_uid=derived_uid("deflate-bomb", "ct"))
    payload = ct.payload
    pixel_data = payload.index(b"\xe0\x7f\x10\x00")
    header = b"\x09\x00\x10\x10OB\x00\x00" + zeros.to_bytes(4, "little")
    chunk = bytes(1 << 20)
    stream = _deflate([payload[:pixel_data], header, *(chunk for _ in range(zeros // len(chunk))),
                       payload[pixel_data:]])
    assert len(stream) < 2 << 20
    before = gateway.data_files()
    with association(gateway, [build_context(ct.sop_class, DEFLATED_LE)]) as assoc:
        status = send_raw_c_store(assoc, stream, ct.sop_class, ct.sop_uid, DEFLATED_LE)
        assert is_cannot_understand_or_mismatch(status), f"answered {fmt(status)}, expected A9xx or Cxxx"
        assert echo_status(assoc) == 0x0000
    assert _peak_memory_kb(gateway) < 512 * 1024, "gateway peak memory after refusing the object"
    assert_nothing_left(gateway, before, ct.sop_uid)
