"""A study large enough that its metadata and retrieve responses span many streamed chunks: 120 copies of
CT_small (about 1.2 MB of JSON, 32 MB of objects) stored over one association by pynetdicom. The metadata
must stay one valid JSON array with every instance, the retrieve must carry every instance, and the
gateway's memory must not grow by the size of the study while it streams."""

from __future__ import annotations

import json
import threading
import time

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import build_context

from gw_dimse import association
from gw_samples import TESTDATA
from gw_web import get, multipart_parts

COUNT = 120
STUDY = "2.25.90000000000000000000000000000000001"
SERIES = STUDY + ".1"


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _store_study(gw) -> None:
    template = pydicom.dcmread(TESTDATA / "pydicom/CT_small.dcm")
    cx = build_context(template.SOPClassUID, ExplicitVRLittleEndian)
    with association(gw, [cx]) as assoc:
        for i in range(1, COUNT + 1):
            ds = template.copy()
            ds.StudyInstanceUID = STUDY
            ds.SeriesInstanceUID = SERIES
            ds.SOPInstanceUID = f"{SERIES}.{i}"
            ds.InstanceNumber = i
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0, f"instance {i}: {status}"


def test_large_study_metadata_is_one_valid_array_and_retrieve_streams_with_bounded_memory(fresh_gateway):
    gw = fresh_gateway
    _store_study(gw)

    resp = get(gw, f"/studies/{STUDY}/metadata", headers={"Accept": "application/dicom+json"})
    assert resp.status_code == 200
    assert len(resp.content) > 256 * 1024, "the response must span several streamed chunks"
    body = json.loads(resp.content)
    assert len(body) == COUNT
    numbers = sorted(obj["00200013"]["Value"][0] for obj in body)
    assert numbers == list(range(1, COUNT + 1))
    assert all(obj["7FE00010"]["BulkDataURI"].startswith(gw.base_url) for obj in body)

    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_kb(gw.proc.pid))
            time.sleep(0.005)

    baseline = _rss_kb(gw.proc.pid)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        resp = get(gw, f"/studies/{STUDY}",
                   headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    finally:
        stop.set()
        sampler.join()
    assert resp.status_code == 200
    parts = multipart_parts(resp)
    assert len(parts) == COUNT
    study_bytes = sum(len(body) for _, body in parts)
    growth_kb = peak[0] - baseline
    # Streaming keeps a few parts in flight; buffering the study would add its whole size.
    assert growth_kb * 1024 < study_bytes / 4, f"RSS grew {growth_kb} kB while streaming {study_bytes} bytes"
