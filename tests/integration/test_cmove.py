"""C-MOVE SCP: DCMTK movescu to a DCMTK storescp started by the test (objects arrive byte for byte in
their stored transfer syntax), re-encoding or decompression when the destination cannot take that syntax,
counts and statuses (0000, B000, A702, A801, FE00, 0124), and a 500-instance study moved with bounded
gateway memory."""

from __future__ import annotations

import re
import subprocess
import threading
import time

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_context

from gw_dimse import association, dcmtk_env, store_all
from gw_harness import free_port
from gw_qr import (
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_MOVE,
    instance,
    peers_env,
    received_payloads,
    send_request,
    storescp,
    uid,
)
from gw_samples import LOSSLESS_TS, NATIVE_TS, unique_corpus, with_new_uids

STUDY = uid(30)
DEST = "STORESCP"


def _mixed_study():
    """One study holding samples in several transfer syntaxes (native and compressed), one series each."""
    wanted = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
              "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"]
    picked = []
    for ts in wanted:
        sample = next(s for s in unique_corpus() if s.ts == ts and s.has_pixels)
        n = len(picked) + 1
        picked.append(with_new_uids(sample, f"{STUDY}.{n}.1", "#move", StudyInstanceUID=STUDY,
                                    SeriesInstanceUID=f"{STUDY}.{n}", PatientID="MOVE1"))
    return picked


@pytest.fixture(scope="module")
def dest_port():
    return free_port()


@pytest.fixture(scope="module")
def gateway_env(dest_port):
    return peers_env("MOVESCU", "PYTEST", (DEST, dest_port), ("NOBODY", free_port()))


@pytest.fixture(scope="module")
def study(gateway):
    samples = _mixed_study()
    statuses = store_all(gateway, samples)
    assert all(v == 0 for v in statuses.values()), statuses
    return samples


def movescu(gw, keys, dest=DEST, model="-S", calling="MOVESCU"):
    args = ["movescu", "-v", model, "-aet", calling, "-aec", gw.ae_title, "-aem", dest, "-to", "10", "-ta", "10",
            "-td", "60"]
    for k in keys:
        args += ["-k", k]
    args += [gw.host, str(gw.dimse_port)]
    return subprocess.run(args, env=dcmtk_env(), capture_output=True, text=True, timeout=120)


def _move(assoc, identifier, sop_class=STUDY_ROOT_MOVE, dest=DEST, **kw):
    return send_request(assoc, "move", identifier, sop_class, destination=dest, **kw)


def _study_identifier(study_uid=STUDY):
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    return ds


def test_movescu_study_arrives_byte_for_byte(gateway, study, dest_port, tmp_path):
    out = tmp_path / "received"
    with storescp(dest_port, DEST, out):
        proc = movescu(gateway, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY}"])
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert re.search(r"Success", text), text
    got = received_payloads(out)
    assert set(got) == {s.sop_uid for s in study}
    for s in study:
        assert got[s.sop_uid] == s.payload, f"{s.name} ({s.ts}) differs"


@pytest.mark.parametrize("model, keys", [
    ("-P", ["QueryRetrieveLevel=PATIENT", "PatientID=MOVE1"]),
    ("-S", ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={STUDY}", f"SeriesInstanceUID={STUDY}.2"]),
    ("-S", ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={STUDY}", f"SeriesInstanceUID={STUDY}.3",
            f"SOPInstanceUID={STUDY}.3.1"]),
], ids=["patient", "series", "image"])
def test_movescu_other_levels(gateway, study, dest_port, tmp_path, model, keys):
    out = tmp_path / "received"
    with storescp(dest_port, DEST, out):
        proc = movescu(gateway, keys, model=model)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = received_payloads(out)
    expected = {
        "patient": {s.sop_uid for s in study},
        "series": {f"{STUDY}.2.1"},
        "image": {f"{STUDY}.3.1"},
    }["patient" if model == "-P" else ("series" if "SERIES" in keys[0] else "image")]
    assert set(got) == expected


@pytest.mark.parametrize("options", [[], ["+xi"]], ids=["uncompressed", "implicit-only"])
def test_counts_and_decompression_when_the_destination_takes_only_uncompressed(gateway, study, dest_port, tmp_path,
                                                                               options):
    out = tmp_path / "received"
    with storescp(dest_port, DEST, out, accept_all=False, options=options):
        with association(gateway, [build_context(STUDY_ROOT_MOVE)]) as assoc:
            responses = _move(assoc, _study_identifier())
    statuses = [s for s, *_ in responses]
    assert all(s == 0xFF00 for s in statuses[:-1])
    final_status, _ident, rsp = responses[-1]
    assert final_status == 0x0000
    assert rsp.NumberOfCompletedSuboperations == len(study) and rsp.NumberOfFailedSuboperations == 0
    # Pending responses count down.
    remaining = [r.NumberOfRemainingSuboperations for _, _, r in responses[:-1]]
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] == 1
    got = received_payloads(out)
    assert set(got) == {s.sop_uid for s in study}
    for s in study:
        ds = pydicom.dcmread(out / next(p.name for p in out.iterdir() if s.sop_uid in p.name))
        ts = ds.file_meta.TransferSyntaxUID
        assert not ts.is_compressed and (ts == "1.2.840.10008.1.2" or not options), ts
        if s.ts in NATIVE_TS:
            assert ds.PixelData == s.ds.PixelData or ds.pixel_array.tobytes() == s.ds.pixel_array.tobytes()
            continue
        # Decompressed by the gateway: the pixels are the original's decode (within a tolerance if lossy).
        exp, got_px = s.ds.pixel_array, ds.pixel_array
        assert got_px.shape == exp.shape
        if s.ts in LOSSLESS_TS:
            assert np.array_equal(got_px, exp), f"{s.name}: decompressed pixels differ"
        else:
            diff = np.abs(got_px.astype(np.float64) - exp.astype(np.float64))
            assert diff.mean() <= max(1.0, 0.01 * (float(exp.max()) - float(exp.min()))), diff.mean()


def test_unknown_destination_gets_a801(gateway, study):
    with association(gateway, [build_context(STUDY_ROOT_MOVE)]) as assoc:
        responses = _move(assoc, _study_identifier(), dest="NOWHERE")
    assert [s for s, *_ in responses] == [0xA801]


def test_unreachable_destination_gets_a702_with_every_instance_failed(gateway, study):
    with association(gateway, [build_context(STUDY_ROOT_MOVE)]) as assoc:
        responses = _move(assoc, _study_identifier(), dest="NOBODY")
    status, ident, rsp = responses[-1]
    assert status == 0xA702
    assert rsp.NumberOfFailedSuboperations == len(study)


def test_nothing_matching_is_success_with_no_sub_operations(gateway, study):
    with association(gateway, [build_context(STUDY_ROOT_MOVE)]) as assoc:
        responses = _move(assoc, _study_identifier(uid(30, 999)))
    status, _, rsp = responses[-1]
    assert status == 0x0000 and rsp.NumberOfCompletedSuboperations == 0


def test_missing_unique_key_is_refused(gateway, study):
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = STUDY
    with association(gateway, [build_context(STUDY_ROOT_MOVE)]) as assoc:
        responses = _move(assoc, ds)
    assert [s for s, *_ in responses] == [0xA900]


def test_cancel_stops_before_the_next_sub_operation(gateway, study, dest_port, tmp_path):
    with storescp(dest_port, DEST, tmp_path / "received"):
        with association(gateway, [build_context(PATIENT_ROOT_MOVE)]) as assoc:
            ds = Dataset()
            ds.QueryRetrieveLevel = "PATIENT"
            ds.PatientID = "MOVE1"
            responses = _move(assoc, ds, sop_class=PATIENT_ROOT_MOVE, cancel=True)
    status, _, rsp = responses[-1]
    assert status == 0xFE00
    assert rsp.NumberOfRemainingSuboperations > 0


def test_unknown_callers_cannot_retrieve(gateway, study):
    with association(gateway, [build_context(STUDY_ROOT_MOVE)], calling="STRANGER") as assoc:
        responses = _move(assoc, _study_identifier())
    assert [s for s, *_ in responses] == [0x0124]


LARGE = 500
LARGE_STUDY = uid(31)


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_500_instance_study_moves_with_bounded_memory(gateway, dest_port, tmp_path):
    st = {"uid": LARGE_STUDY, "PatientID": "LARGE", "PatientName": "Large^Study"}
    se = {"uid": LARGE_STUDY + ".1", "Modality": "CT", "sop_class": "1.2.840.10008.5.1.4.1.1.7"}
    samples = [instance(st, se, n, pixels=128) for n in range(1, LARGE + 1)]  # 32 KiB of pixels each
    statuses = store_all(gateway, samples)
    assert all(v == 0 for v in statuses.values())
    study_bytes = sum(len(s.payload) for s in samples)

    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_kb(gateway.proc.pid))
            time.sleep(0.005)

    out = tmp_path / "received"
    with storescp(dest_port, DEST, out):
        baseline = _rss_kb(gateway.proc.pid)
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            proc = movescu(gateway, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={LARGE_STUDY}"])
        finally:
            stop.set()
            sampler.join()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = received_payloads(out)
    assert len(got) == LARGE
    assert all(got[s.sop_uid] == s.payload for s in samples)
    growth_kb = peak[0] - baseline
    assert growth_kb * 1024 < study_bytes / 4, f"RSS grew {growth_kb} kB while moving {study_bytes} bytes"
