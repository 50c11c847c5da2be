"""kill -9 in the middle of ingest, then restart: every acknowledged instance is still found and retrievable,
and nothing QIDO lists lacks its object."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import BACKENDS, backend_env
from gw_dimse import association, contexts_for, send_partial_c_store, store
from gw_s3 import stored_keys
from gw_samples import small_ct, synthetic_instance
from gw_web import client


@pytest.fixture(scope="module", params=BACKENDS)
def storage_env(request):
    """The whole module runs on each storage backend: filesystem, then S3 (Garage)."""
    return backend_env(request)


ACKS_BEFORE_KILL = 30
PER_SENDER = 60


def qido_uids(gw) -> set[str]:
    c = client(gw)
    out: list[str] = []
    for page_no in range(50):
        page = c.search_for_instances(limit=100, offset=page_no * 100)
        out += [r["00080018"]["Value"][0] for r in page]
        if len(page) < 100:
            return set(out)
    raise AssertionError("more than 50 pages of instances: offset ignored?")


def retrieved_matches(gw, sample) -> str | None:
    """None if the gateway returns `sample` as sent, else what is wrong."""
    try:
        got = client(gw).retrieve_instance(sample.study_uid, sample.series_uid, sample.sop_uid,
                                           media_types=(("application/dicom", "*"),))
    except Exception as e:
        return f"retrieve failed: {e}"
    if str(got.SOPInstanceUID) != sample.sop_uid:
        return "wrong instance"
    if got.PixelData != sample.ds.PixelData:
        return "Pixel Data differs"
    return None


def test_acknowledged_instances_survive_kill_9(fresh_gateway):
    gw = fresh_gateway
    batches = [[small_ct(PatientID=f"CRASH{k}") for _ in range(PER_SENDER)] for k in range(2)]
    by_uid = {s.sop_uid: s for b in batches for s in b}
    acked: set[str] = set()
    attempted: set[str] = set()
    lock = threading.Lock()
    killed = threading.Event()

    def sender(samples):
        try:
            with association(gw, contexts_for(samples[:1])) as assoc:
                for i, s in enumerate(samples, start=1):
                    if killed.is_set() or not assoc.is_established:
                        return
                    with lock:
                        attempted.add(s.sop_uid)
                    status = store(assoc, s, msg_id=i)
                    if status == 0x0000:
                        with lock:
                            acked.add(s.sop_uid)
                    elif status is None:
                        return
        except Exception:
            return  # the gateway is gone; what was acknowledged so far is recorded

    def killer():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if len(acked) >= ACKS_BEFORE_KILL:
                    break
            time.sleep(0.005)
        killed.set()
        gw.kill9()

    threads = [threading.Thread(target=sender, args=(b,), daemon=True) for b in batches]
    threads.append(threading.Thread(target=killer, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(acked) >= ACKS_BEFORE_KILL, f"only {len(acked)} stores acknowledged before the kill"
    assert len(acked) < len(by_uid), "every store finished before the kill: nothing was cut"

    gw.start()
    listed = qido_uids(gw)
    lost = acked - listed
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged instances lost after kill -9: {sorted(lost)[:5]}"
    assert listed <= attempted, "QIDO lists instances that were never sent"
    broken = {uid: retrieved_matches(gw, by_uid[uid]) for uid in listed}
    broken = {uid: why for uid, why in broken.items() if why}
    assert not broken, f"instances listed by QIDO but not retrievable intact: {broken}"

    # The gateway goes on working on the recovered index and storage.
    more = [small_ct(PatientID="AFTERCRASH") for _ in range(3)]
    with association(gw, contexts_for(more[:1])) as assoc:
        assert [store(assoc, s, msg_id=i) for i, s in enumerate(more, 1)] == [0x0000] * 3
    assert qido_uids(gw) == listed | {s.sop_uid for s in more}


def test_object_in_flight_during_kill_9_is_not_listed_after_restart(fresh_gateway):
    gw = fresh_gateway
    big = synthetic_instance(8_000_000)
    with association(gw, contexts_for([big])) as assoc:
        send_partial_c_store(assoc, big, fraction=0.6)
        gw.kill9()
    gw.start()
    assert big.sop_uid not in qido_uids(gw), "a half-received object is listed after kill -9 and restart"


def test_restart_after_kill_9_leaves_no_partial_object_behind(fresh_gateway):
    gw = fresh_gateway
    big = synthetic_instance(8_000_000)
    baseline = gw.data_files()  # the gateway's own files (e.g. a readiness probe file), before any object
    baseline_keys = stored_keys(gw)
    with association(gw, contexts_for([big])) as assoc:
        send_partial_c_store(assoc, big, fraction=0.6)
        gw.kill9()
    gw.start()
    deadline = time.monotonic() + 5  # room for a start-up sweep done in the background
    while gw.data_files() - baseline and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = sorted(str(p.relative_to(gw.data_dir)) for p in gw.data_files() - baseline)
    leftovers += sorted(stored_keys(gw) - baseline_keys)
    assert leftovers == [], f"files of an unacknowledged object left after restart: {leftovers}"
