"""C-GET SCP: DCMTK getscu receives a study over its own association (byte for byte when it accepts the
stored transfer syntax; compressed objects decompressed when it proposes uncompressed syntaxes only),
pynetdicom with odd transfer syntaxes (objects re-encoded or decompressed into what the requester accepted),
C-CANCEL, and who may retrieve."""

from __future__ import annotations

import subprocess
from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, build_role

from gw_dimse import dcmtk_env, make_ae, store_all
from gw_qr import STUDY_ROOT_GET, PATIENT_ROOT_GET, instance, peers_env, received_payloads, send_request, uid
from gw_samples import LOSSLESS_TS, unique_corpus, with_new_uids

STUDY = uid(40)
NATIVE_STUDY = uid(41)


@pytest.fixture(scope="module")
def gateway_env():
    return peers_env("GETSCU", "PYTEST")


@pytest.fixture(scope="module")
def studies(gateway):
    st = {"uid": NATIVE_STUDY, "PatientID": "GET1", "PatientName": "Get^One"}
    native = [instance(st, {"uid": NATIVE_STUDY + ".1", "Modality": "OT"}, n) for n in range(1, 6)]
    jpeg = next(s for s in unique_corpus() if s.ts == "1.2.840.10008.1.2.4.50")
    be = next(s for s in unique_corpus() if s.ts == ExplicitVRBigEndian and s.has_pixels)
    j2k = next(s for s in unique_corpus() if s.ts == "1.2.840.10008.1.2.4.90" and s.has_pixels)
    mixed = [
        with_new_uids(jpeg, STUDY + ".1.1", "#get", StudyInstanceUID=STUDY, SeriesInstanceUID=STUDY + ".1"),
        with_new_uids(be, STUDY + ".2.1", "#get", StudyInstanceUID=STUDY, SeriesInstanceUID=STUDY + ".2"),
        with_new_uids(j2k, STUDY + ".3.1", "#get", StudyInstanceUID=STUDY, SeriesInstanceUID=STUDY + ".3"),
    ]
    statuses = store_all(gateway, native + mixed)
    assert all(v == 0 for v in statuses.values()), statuses
    return native, mixed


def getscu(gw, keys, outdir, calling="GETSCU"):
    outdir.mkdir(parents=True, exist_ok=True)
    args = ["getscu", "-v", "-S", "-aet", calling, "-aec", gw.ae_title, "-to", "10", "-ta", "10", "-td", "60",
            "+B", "-od", str(outdir)]
    for k in keys:
        args += ["-k", k]
    args += [gw.host, str(gw.dimse_port)]
    return subprocess.run(args, env=dcmtk_env(), capture_output=True, text=True, timeout=120)


def test_getscu_receives_the_study_byte_for_byte(gateway, studies, tmp_path):
    native, _ = studies
    out = tmp_path / "got"
    proc = getscu(gateway, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={NATIVE_STUDY}"], out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = received_payloads(out)
    assert set(got) == {s.sop_uid for s in native}
    assert all(got[s.sop_uid] == s.payload for s in native)


class _Receiver:
    """Answers the gateway's C-STORE sub-operations with success and keeps what arrived."""

    def __init__(self):
        self.assoc = None
        self.received: dict[str, tuple[str, bytes]] = {}

    def on_store(self, rsp, cx_id):
        cx = next(c for c in self.assoc.accepted_contexts if c.context_id == cx_id)
        data = rsp.DataSet.getvalue() if isinstance(rsp.DataSet, BytesIO) else rsp.DataSet
        self.received[rsp.AffectedSOPInstanceUID] = (cx.transfer_syntax[0], data)
        return 0x0000


def _run_get(gw, ts, identifier, sop_classes, cancel=False, model=STUDY_ROOT_GET):
    """C-GET with pynetdicom proposing the SCP role for `sop_classes` in transfer syntax `ts` only. Returns
    (responses, {sop uid: (transfer syntax, data set bytes)})."""
    ae = make_ae("PYTEST")
    contexts = [build_context(model)] + [build_context(c, ts) for c in sop_classes]
    roles = [build_role(c, scp_role=True) for c in sop_classes]
    receiver = _Receiver()
    assoc = ae.associate(gw.host, gw.dimse_port, contexts=contexts, ae_title=gw.ae_title, ext_neg=roles)
    assert assoc.is_established
    receiver.assoc = assoc
    try:
        responses = send_request(assoc, "get", identifier, model, cancel=cancel, on_store=receiver.on_store)
    finally:
        assoc.release()
        ae.shutdown()
    return responses, receiver.received


def _identifier(level, **keys):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_native_objects_are_re_encoded_into_the_accepted_syntax(gateway, studies):
    native, mixed = studies
    be = mixed[1]
    responses, received = _run_get(gateway, ImplicitVRLittleEndian, _identifier("IMAGE", StudyInstanceUID=STUDY,
                                   SeriesInstanceUID=STUDY + ".2", SOPInstanceUID=be.sop_uid), [be.sop_class])
    assert responses[-1][0] == 0x0000
    ts, data = received[be.sop_uid]
    assert ts == ImplicitVRLittleEndian
    ds = pydicom.dcmread(BytesIO(data), force=True)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert ds.SOPInstanceUID == be.sop_uid
    assert ds.pixel_array.tolist() == be.ds.pixel_array.tolist()


def _assert_decoded_pixels_match(original, ds):
    exp, got = original.ds.pixel_array, ds.pixel_array
    assert got.shape == exp.shape
    if original.ts in LOSSLESS_TS:
        assert np.array_equal(got, exp), "decompressed pixels differ from the original's"
    else:
        diff = np.abs(got.astype(np.float64) - exp.astype(np.float64))
        assert diff.mean() <= max(1.0, 0.01 * (float(exp.max()) - float(exp.min()))), diff.mean()


def test_compressed_objects_are_decompressed_for_a_requester_taking_only_uncompressed(gateway, studies):
    _, mixed = studies
    classes = sorted({s.sop_class for s in mixed})
    responses, received = _run_get(gateway, ExplicitVRLittleEndian, _identifier("STUDY", StudyInstanceUID=STUDY),
                                   classes)
    status, _, rsp = responses[-1]
    assert status == 0x0000
    assert rsp.NumberOfCompletedSuboperations == len(mixed) and rsp.NumberOfFailedSuboperations == 0
    assert set(received) == {s.sop_uid for s in mixed}
    for s in mixed:
        ts, data = received[s.sop_uid]
        assert ts == ExplicitVRLittleEndian
        ds = pydicom.dcmread(BytesIO(data), force=True)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assert ds.SOPInstanceUID == s.sop_uid
        _assert_decoded_pixels_match(s, ds)


def test_getscu_proposing_uncompressed_only_receives_compressed_objects_decompressed(gateway, studies, tmp_path):
    _, mixed = studies
    out = tmp_path / "got"
    # getscu proposes the uncompressed syntaxes only unless told otherwise.
    proc = getscu(gateway, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY}"], out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in out.iterdir() if p.is_file()}
    assert set(files) == {s.sop_uid for s in mixed}
    for s in mixed:
        ds = pydicom.dcmread(files[s.sop_uid])
        assert not ds.file_meta.TransferSyntaxUID.is_compressed, ds.file_meta.TransferSyntaxUID
        _assert_decoded_pixels_match(s, ds)


def test_stored_syntax_is_sent_as_is_when_accepted(gateway, studies):
    _, mixed = studies
    jpeg = mixed[0]
    responses, received = _run_get(gateway, jpeg.ts, _identifier("IMAGE", StudyInstanceUID=STUDY,
                                   SeriesInstanceUID=STUDY + ".1", SOPInstanceUID=jpeg.sop_uid), [jpeg.sop_class])
    assert responses[-1][0] == 0x0000
    assert received[jpeg.sop_uid] == (jpeg.ts, jpeg.payload)


def test_pending_responses_count_every_sub_operation(gateway, studies):
    native, _ = studies
    responses, received = _run_get(gateway, ExplicitVRLittleEndian,
                                   _identifier("PATIENT", PatientID="GET1"), [native[0].sop_class],
                                   model=PATIENT_ROOT_GET)
    statuses = [s for s, *_ in responses]
    assert statuses == [0xFF00] * (len(native) - 1) + [0x0000]
    assert [r.NumberOfRemainingSuboperations for _, _, r in responses[:-1]] == list(range(len(native) - 1, 0, -1))
    assert responses[-1][2].NumberOfCompletedSuboperations == len(native)
    assert len(received) == len(native)


def test_cancel_stops_the_sub_operations(gateway, studies):
    native, _ = studies
    responses, received = _run_get(gateway, ExplicitVRLittleEndian,
                                   _identifier("STUDY", StudyInstanceUID=NATIVE_STUDY), [native[0].sop_class],
                                   cancel=True)
    status, _, rsp = responses[-1]
    assert status == 0xFE00
    assert len(received) < len(native)


def test_unknown_callers_cannot_retrieve(gateway, studies, tmp_path):
    proc = getscu(gateway, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={NATIVE_STUDY}"], tmp_path / "got",
                  calling="STRANGER")
    assert not any((tmp_path / "got").iterdir())
    out = (proc.stdout + proc.stderr).lower()
    assert "0x124" in out, out


def test_pending_responses_wait_for_the_configured_interval(gateway_factory, tmp_path):
    """With a long `retrieve_pending_interval_ms`, only the first sub-operation is followed by a pending
    response; the final response still carries every count."""
    gw = gateway_factory(peers_env("PYTEST", pending_interval_ms=3_600_000))
    st = {"uid": uid(42), "PatientID": "GET2", "PatientName": "Get^Two"}
    native = [instance(st, {"uid": uid(42, 1), "Modality": "OT"}, n) for n in range(1, 5)]
    assert all(v == 0 for v in store_all(gw, native).values())
    responses, received = _run_get(gw, ExplicitVRLittleEndian,
                                   _identifier("STUDY", StudyInstanceUID=uid(42)), [native[0].sop_class])
    assert [s for s, *_ in responses] == [0xFF00, 0x0000]
    assert responses[0][2].NumberOfRemainingSuboperations == len(native) - 1
    assert responses[-1][2].NumberOfCompletedSuboperations == len(native)
    assert len(received) == len(native)
