"""Start-up reconcile looks only at what the storage's log says may be unindexed: nothing after a clean
stop, the recent keys after kill -9; `dicom-gateway reconcile` compares storage and index in full."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import BACKENDS, backend_env
from gw_dimse import association, contexts_for, store
from gw_harness import binary_path
from gw_samples import small_ct
from gw_web import client


@pytest.fixture(scope="module", params=BACKENDS)
def storage_env(request):
    return backend_env(request)


def reconciled_keys(gw) -> list[int]:
    """The `keys=` count of every start's reconcile, in order."""
    return [int(n) for n in re.findall(r"reconcile finished keys=(\d+)", gw.log_text())]


def listed(gw) -> set[str]:
    return {r["00080018"]["Value"][0] for r in client(gw).search_for_instances()}


def store_some(gw, n: int) -> set[str]:
    samples = [small_ct() for _ in range(n)]
    with association(gw, contexts_for(samples[:1])) as assoc:
        assert [store(assoc, s, msg_id=i) for i, s in enumerate(samples, 1)] == [0] * n
    return {s.sop_uid for s in samples}


def test_clean_stop_leaves_nothing_to_reconcile_and_kill_9_only_the_recent_keys(fresh_gateway):
    gw = fresh_gateway
    first = store_some(gw, 5)
    gw.stop()
    gw.start()
    assert reconciled_keys(gw)[-1] == 0, "a clean stop left keys to reconcile"
    second = store_some(gw, 4)
    gw.kill9()
    gw.start()
    assert reconciled_keys(gw)[-1] == 4, "after kill -9 the keys stored since the clean start are rechecked"
    assert listed(gw) == first | second


def test_reconcile_command_indexes_an_object_copied_into_storage(fresh_gateway, storage_env):
    if storage_env:
        pytest.skip("copies a file into the filesystem store")
    gw = fresh_gateway
    [uid] = store_some(gw, 1)
    gw.stop()
    # Restored behind the gateway's back: a copy of the object under another instance's key.
    [path] = [p for p in gw.storage_dir.rglob("*.dcm") if ".wal" not in p.parts]
    other = small_ct()
    (path.parent / f"{other.sop_uid}.restored.dcm").write_bytes(other.part10())
    gw.start()
    assert other.sop_uid not in listed(gw), "start-up reconcile lists the whole storage again"
    gw.stop()
    run = subprocess.run([str(binary_path()), "reconcile"], cwd=gw.workdir, env=gw.env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    gw.start()
    assert listed(gw) == {uid, other.sop_uid}
