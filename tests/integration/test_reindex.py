"""`dicom-gateway reindex` on both storage backends: the index is rebuilt from storage alone (disaster
recovery), with the same answers as before, and a second run finds everything already indexed."""

from __future__ import annotations

import subprocess

import pytest

from conftest import BACKENDS, backend_env
from gw_dimse import association, contexts_for, store
from gw_harness import binary_path
from gw_samples import small_ct, synthetic_instance
from gw_web import client, get, value

COUNT = 24


@pytest.fixture(scope="module", params=BACKENDS)
def storage_env(request):
    """The whole module runs on each storage backend: filesystem, then S3 (Garage)."""
    return backend_env(request)


def reindex(gw) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary_path()), "reindex"], cwd=gw.workdir, env=gw.env(),
                          capture_output=True, text=True, timeout=300)


def snapshot(gw) -> dict[str, dict]:
    """Every instance's QIDO answer and its study's metadata, by SOP Instance UID."""
    out = {}
    for inst in client(gw).search_for_instances(get_remaining=True, fields=["all"]):
        out[value(inst, "SOPInstanceUID")] = inst
    return out


def test_reindex_rebuilds_a_lost_index_from_storage(fresh_gateway):
    gw = fresh_gateway
    samples = [small_ct(PatientID=f"REINDEX{i % 3}") for i in range(COUNT - 1)]
    multiframe = synthetic_instance(2_000_000)
    with association(gw, contexts_for(samples[:1] + [multiframe])) as assoc:
        statuses = [store(assoc, s, msg_id=i) for i, s in enumerate(samples + [multiframe], 1)]
    assert statuses == [0] * COUNT
    before = snapshot(gw)
    metadata_before = get(gw, f"/studies/{multiframe.study_uid}/metadata").json()
    assert len(before) == COUNT

    gw.stop()
    for suffix in ("", "-wal", "-shm"):
        gw.index_path.with_name(gw.index_path.name + suffix).unlink(missing_ok=True)
    run = reindex(gw)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "reindex finished" in run.stderr
    assert f"{COUNT} objects" in run.stderr and f"{COUNT} indexed" in run.stderr, run.stderr[-2000:]

    gw.start()
    after = snapshot(gw)
    assert after.keys() == before.keys()
    for uid, inst in before.items():
        assert after[uid] == inst, f"QIDO answer of {uid} differs after reindex"
    assert get(gw, f"/studies/{multiframe.study_uid}/metadata").json() == metadata_before
    frame = get(gw, f"/studies/{multiframe.study_uid}/series/{multiframe.series_uid}/instances/"
                    f"{multiframe.sop_uid}/frames/1",
                headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
    assert frame.status_code == 200
    assert multiframe.ds.PixelData in frame.content

    # A second run (gateway stopped) finds everything indexed and changes nothing.
    gw.stop()
    again = reindex(gw)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"0 indexed, {COUNT} already indexed" in again.stderr, again.stderr[-2000:]
    gw.start()
    assert snapshot(gw).keys() == before.keys()
