"""The S3 backend against a real S3 server (Garage) that the tests stop and start: failures while it is
down are reported and leave nothing behind, the gateway recovers by itself, nothing acknowledged is lost,
and large objects go up in parts and come back whole or one frame at a time."""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset

from gw_dimse import association, contexts_for, store, storescu_tree
from gw_s3 import Garage, stored_keys
from gw_samples import from_dataset, small_ct
from gw_web import client, get, instance_json, multipart_parts

AS_STORED = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
OCTETS = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}


@pytest.fixture
def own_garage(tmp_path_factory):
    """A Garage of this test's own, which it may stop."""
    server = Garage(tmp_path_factory.mktemp("garage-own")).start()
    yield server
    server.stop()


def s3_gateway(factory, garage, **extra):
    # Two attempts, short timeouts: a failure is answered in well under a second while storage is down.
    env = garage.gateway_env(prefix="faults")
    env.update({"DICOMGW_STORAGE__S3__MAX_ATTEMPTS": "2", "DICOMGW_STORAGE__S3__CONNECT_TIMEOUT_SECS": "1",
                "DICOMGW_STORAGE__S3__ATTEMPT_TIMEOUT_SECS": "10"})
    env.update(extra)
    return factory(env=env)


def ready_status(gw) -> int:
    return requests.get(f"{gw.http_root}/readyz", timeout=30).status_code


def wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def indexed_keys(gw) -> set[str]:
    with sqlite3.connect(f"file:{gw.index_path}?mode=ro", uri=True) as db:
        return {row[0] for row in db.execute("SELECT storage_key FROM instances")}


def test_storage_down_fails_c_store_and_readyz_then_recovers_alone(gateway_factory, own_garage):
    gw = s3_gateway(gateway_factory, own_garage)
    first = small_ct()
    with association(gw, contexts_for([first])) as assoc:
        assert store(assoc, first) == 0x0000

    own_garage.stop()
    assert wait_until(lambda: ready_status(gw) == 503), "/readyz still 200 with storage down"
    assert "storage" in requests.get(f"{gw.http_root}/readyz", timeout=30).text
    lost = small_ct()
    with association(gw, contexts_for([lost])) as assoc:
        rsp = assoc.send_c_store(lost.ds)
    status = rsp.Status if "Status" in rsp else None
    assert status is not None and 0xA700 <= status <= 0xA7FF, f"C-STORE with storage down answered {status}"
    assert "storage" in str(rsp.get("ErrorComment", "")).lower()
    assert instance_json(client(gw), lost.sop_uid) == []
    # Metadata and QIDO never touch storage: they keep working.
    assert len(instance_json(client(gw), first.sop_uid)) == 1
    assert get(gw, f"/studies/{first.study_uid}/metadata").status_code == 200

    own_garage.start()
    assert wait_until(lambda: ready_status(gw) == 200), "/readyz not 200 after storage came back"
    with association(gw, contexts_for([lost])) as assoc:
        assert store(assoc, lost) == 0x0000
    got = client(gw).retrieve_instance(lost.study_uid, lost.series_uid, lost.sop_uid,
                                       media_types=(("application/dicom", "*"),))
    assert got.PixelData == lost.ds.PixelData
    assert indexed_keys(gw) <= stored_keys(gw)


def test_s3_server_stopped_during_storescu_run_loses_nothing_acknowledged(gateway_factory, own_garage, tmp_path):
    gw = s3_gateway(gateway_factory, own_garage)
    samples = [small_ct(PatientID="FAULT") for _ in range(150)]
    stage = tmp_path / "stage"
    stage.mkdir()
    by_file = {}
    for i, s in enumerate(samples):
        path = stage / f"{i:04d}.dcm"
        path.write_bytes(s.part10())
        by_file[str(path)] = s

    events = []

    def cut_storage():
        # Stop S3 once some objects are in, keep it down a while, then bring it back mid-run.
        wait_until(lambda: len(stored_keys(gw)) >= 30, timeout=120)
        own_garage.stop()
        events.append("stopped")
        time.sleep(3)
        own_garage.start()
        events.append("started")

    cutter = threading.Thread(target=cut_storage, daemon=True)
    cutter.start()
    proc, responses = storescu_tree(gw.dimse_port, stage, samples, tmp_path, called_ae=gw.ae_title, timeout=300)
    cutter.join(60)
    assert events == ["stopped", "started"], events
    assert len(responses) == len(samples), (proc.stdout + proc.stderr)[-3000:]

    acked = {f for f, r in responses.items() if r == "Success"}
    failed = {f: r for f, r in responses.items() if r != "Success"}
    assert failed, "no store failed while S3 was down: the cut came too late"
    assert len(acked) > 30, "nothing stored after S3 came back: the gateway did not recover"
    for f, r in failed.items():
        assert r.startswith("Refused") or "0xa7" in r.lower(), f"{f} not reported as a failure: {r}"

    c = client(gw)
    listed = {i["00080018"]["Value"][0] for i in c.search_for_instances(get_remaining=True)}
    assert listed == {by_file[f].sop_uid for f in acked}, "QIDO must list exactly the acknowledged instances"
    for f in acked:
        s = by_file[f]
        got = c.retrieve_instance(s.study_uid, s.series_uid, s.sop_uid, media_types=(("application/dicom", "*"),))
        assert got.PixelData == s.ds.PixelData, f"{f} acknowledged but not retrievable intact"
    assert indexed_keys(gw) <= stored_keys(gw), "the index points at objects storage lacks"


def multiframe(frames: int, side: int) -> tuple:
    """An 8-bit multi-frame Secondary Capture of `frames` frames of `side` x `side`, and its frames."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(frames, side, side), dtype=np.uint8)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte SC
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.PatientID = "MULTIPART"
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = side
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"
    return from_dataset(ds, "1.2.840.10008.1.2.1", "multiframe"), [p.tobytes() for p in pixels]


def test_large_object_goes_up_in_parts_and_comes_back_whole_and_by_frame(gateway_factory, garage):
    # 5 MiB parts (the S3 minimum), 3 at a time: a 21 MB object is five parts.
    env = garage.gateway_env(prefix="multipart")
    env.update({"DICOMGW_STORAGE__S3__MULTIPART_THRESHOLD": str(5 << 20),
                "DICOMGW_STORAGE__S3__PART_SIZE": str(5 << 20),
                "DICOMGW_STORAGE__S3__PART_CONCURRENCY": "3"})
    gw = gateway_factory(env=env)
    big, frames = multiframe(84, 500)
    with association(gw, contexts_for([big])) as assoc:
        assert store(assoc, big) == 0x0000
    [key] = [k for k in stored_keys(gw) if big.sop_uid in k]
    head = garage.client().head_object(Bucket="dicom", Key=f"multipart/{key}")
    assert "-" in head["ETag"], "not a multipart upload"  # multipart ETags end in -<parts>
    whole = get(gw, f"/studies/{big.study_uid}/series/{big.series_uid}/instances/{big.sop_uid}", headers=AS_STORED)
    assert whole.status_code == 200
    [(_, body)] = multipart_parts(whole)
    # As stored: our file meta group, then the data set exactly as sent.
    assert body.endswith(big.payload) and len(body) - len(big.payload) < 1024
    for n in (1, 42, 84):
        r = get(gw, f"/studies/{big.study_uid}/series/{big.series_uid}/instances/{big.sop_uid}/frames/{n}",
                headers=OCTETS)
        assert r.status_code == 200
        [(_, frame)] = multipart_parts(r)
        assert frame == frames[n - 1], f"frame {n} differs"


def test_readyz_reports_unreachable_bucket_at_start(gateway_factory, garage):
    env = garage.gateway_env(prefix="x")
    env["DICOMGW_STORAGE__S3__BUCKET"] = "no-such-bucket"
    gw = gateway_factory(env=env, start=False)
    with pytest.raises(AssertionError, match="readyz -> 503"):
        gw.start(timeout=8)
    gw.stop()

