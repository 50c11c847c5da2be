"""Power loss, as xfstests simulates it: storage and index on a fresh ext4 loop file system, cut with
`xfs_io -x -c shutdown` (no flush: whatever was not fsynced is gone) under C-STORE load with replacements
and DICOMweb DELETEs; the gateway killed, the file system mounted again, the gateway restarted. After each
cut every acknowledged instance is listed once and byte-identical, every acknowledged deletion stays
deleted, no row lacks its object and no object lacks its row. Also the I/O errors a disk gives: a full file
system (C-STORE answers a failure, nothing half-written stays, the gateway recovers once space returns)
and EIO after the shutdown (a failure, never a success).

Needs root, loop devices and xfsprogs (scripts/test installs it); skips with the reason where one is
missing."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from gw_dimse import association, contexts_for, store
from gw_harness import Gateway
from gw_samples import small_ct, split_part10, synthetic_instance
from gw_web import client

CUTS = int(os.environ.get("DICOMGW_POWER_CUTS", "15"))
LOAD_SECONDS = (0.6, 1.6)  # the cut falls at a random moment in this window
STORE_THREADS = 2
HTTP_TIMEOUT = 10


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


def _prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount, losetup)"
    for tool in ("xfs_io", "mkfs.ext4", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (xfsprogs / e2fsprogs / util-linux)"
    return None


@contextlib.contextmanager
def loop_ext4(tmp_path: Path, size_mb: int):
    """A fresh ext4 file system on a loop device, mounted; yields (mount point, remount function)."""
    why = _prerequisites()
    if why:
        pytest.skip(f"power-loss tests: {why}")
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    _run("truncate", "-s", f"{size_mb}M", str(image))
    _run("mkfs.ext4", "-q", "-F", str(image))

    def mount():
        r = _run("mount", "-o", "loop", str(image), str(mnt), check=False)
        if r.returncode != 0:
            pytest.skip(f"power-loss tests: cannot mount a loop device ({r.stderr.strip()})")

    def umount():
        for _ in range(50):
            if _run("umount", str(mnt), check=False).returncode == 0:
                return
            time.sleep(0.1)
        _run("umount", "-l", str(mnt))

    mount()
    try:
        yield mnt, mount, umount
    finally:
        if os.path.ismount(mnt):
            umount()
        image.unlink(missing_ok=True)


def gateway_on(tmp_path: Path, mnt: Path, **env) -> Gateway:
    """A gateway whose storage, spool and index are on `mnt`; its log stays off the cut file system."""
    return Gateway(tmp_path / "gw", env={
        "DICOMGW_STORAGE__PATH": str(mnt / "data" / "objects"),
        "DICOMGW_INDEX__URL": f"sqlite://{mnt / 'data' / 'index.db'}",
        **env,
    })


def shutdown(mnt: Path) -> None:
    """Cut power to the file system: shut it down without flushing its log."""
    _run("xfs_io", "-x", "-c", "shutdown", str(mnt))


class Ledger:
    """What the client knows: per SOP Instance UID, the payloads it may find (None: absent). An
    acknowledged operation narrows it to one state; one without an answer leaves both possible."""

    def __init__(self):
        self.lock = threading.Lock()
        self.states: dict[str, set[bytes | None]] = {}
        self.acked = {"store": 0, "replace": 0, "delete": 0}
        self.doubtful = 0

    def begin(self, uid: str, after: bytes | None) -> None:
        with self.lock:
            self.states.setdefault(uid, {None}).add(after)

    def end(self, uid: str, after: bytes | None, kind: str, ok: bool) -> None:
        with self.lock:
            if ok:
                self.states[uid] = {after}
                self.acked[kind] += 1
            else:
                self.doubtful += 1

    def settle(self, found: dict[str, bytes]) -> None:
        """After a check: what was found is now the only state."""
        with self.lock:
            self.states = {uid: {found.get(uid)} for uid in self.states}


def run_load(gw: Gateway, ledger: Ledger, stop: threading.Event, deletable: list, rng: random.Random):
    """C-STOREs of new instances, replacements of acknowledged ones, DELETEs of others, until `stop`."""

    def storer(n: int):
        mine: list[str] = []
        try:
            with association(gw, contexts_for([small_ct()])) as assoc:
                msg = 0
                while not stop.is_set() and assoc.is_established:
                    msg += 1
                    replacing = len(mine) > 1 and rng.random() < 0.35
                    uid = mine.pop(rng.randrange(len(mine))) if replacing else None
                    sample = small_ct(sop_uid=uid, InstanceNumber=msg, ImageComments=f"t{n} m{msg}")
                    ledger.begin(sample.sop_uid, sample.payload)
                    status = store(assoc, sample, msg_id=msg)
                    ok = status == 0x0000
                    ledger.end(sample.sop_uid, sample.payload, "replace" if replacing else "store", ok)
                    if status is None:
                        return
                    if ok:
                        # Some go to the deleter, never to be touched here again.
                        if rng.random() < 0.3:
                            with ledger.lock:
                                deletable.append(sample)
                        else:
                            mine.append(sample.sop_uid)
        except Exception:
            return  # the cut: what was acknowledged is recorded

    def deleter():
        while not stop.is_set():
            with ledger.lock:
                sample = deletable.pop(0) if deletable else None
            if sample is None:
                time.sleep(0.01)
                continue
            ledger.begin(sample.sop_uid, None)
            path = f"/studies/{sample.study_uid}/series/{sample.series_uid}/instances/{sample.sop_uid}"
            try:
                ok = requests.delete(gw.base_url + path, timeout=HTTP_TIMEOUT).status_code == 204
            except requests.RequestException:
                ok = False
            ledger.end(sample.sop_uid, None, "delete", ok)

    threads = [threading.Thread(target=storer, args=(n,), daemon=True) for n in range(STORE_THREADS)]
    threads.append(threading.Thread(target=deleter, daemon=True))
    for t in threads:
        t.start()
    return threads


def index_rows(mnt: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(f"file:{mnt / 'data' / 'index.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT sop_instance_uid, storage_key FROM instances").fetchall()
    finally:
        db.close()


def listed_uids(gw: Gateway) -> list[str]:
    out: list[str] = []
    c = client(gw)
    while True:
        page = c.search_for_instances(limit=500, offset=len(out))
        out += [r["00080018"]["Value"][0] for r in page]
        if len(page) < 500:
            return out


def check_consistent(gw: Gateway, mnt: Path, ledger: Ledger) -> dict[str, bytes]:
    """Every invariant after a restart; returns what is stored (UID -> data set bytes)."""
    objects = mnt / "data" / "objects"
    rows = index_rows(mnt)
    listed = listed_uids(gw)
    problems = []
    dupes = {u for u in listed if listed.count(u) > 1}
    if dupes:
        problems.append(f"listed more than once: {sorted(dupes)[:5]}")
    if len({u for u, _ in rows}) != len(rows):
        problems.append("two index rows for one SOP Instance UID")
    if set(listed) != {u for u, _ in rows}:
        problems.append("QIDO and the index disagree")
    found: dict[str, bytes] = {}
    for uid, key in rows:
        path = objects / key
        if not path.is_file():
            problems.append(f"row without object: {uid} -> {key}")
            continue
        found[uid] = split_part10(path.read_bytes())[1]
    indexed_keys = {key for _, key in rows}
    orphans = [str(p.relative_to(objects)) for p in objects.rglob("*.dcm")
               if ".wal" not in p.parts and str(p.relative_to(objects)) not in indexed_keys]
    if orphans:
        problems.append(f"objects without a row: {orphans[:5]}")
    with ledger.lock:
        for uid, allowed in ledger.states.items():
            got = found.get(uid)
            if got not in allowed:
                if got is None:
                    problems.append(f"acknowledged instance lost: {uid}")
                elif None in allowed and len(allowed) == 1:
                    problems.append(f"acknowledged deletion came back: {uid}")
                else:
                    problems.append(f"stored bytes are not what was acknowledged: {uid}")
        unknown = set(found) - set(ledger.states)
    if unknown:
        problems.append(f"instances never sent: {sorted(unknown)[:5]}")
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} problems)\n{gw.log_tail(40)}"
    return found


def test_acknowledged_work_survives_power_cuts(tmp_path):
    with loop_ext4(tmp_path, 512) as (mnt, mount, umount):
        gw = gateway_on(tmp_path, mnt, DICOMGW_DIMSE__ON_DUPLICATE="replace", DICOMGW_HTTP__ALLOW_DELETE="true")
        ledger, deletable, rng = Ledger(), [], random.Random(17)
        eio_answers: list[int | None] = []
        gw.start()
        try:
            for cut in range(CUTS):
                stop = threading.Event()
                threads = run_load(gw, ledger, stop, deletable, rng)
                time.sleep(rng.uniform(*LOAD_SECONDS))
                shutdown(mnt)
                time.sleep(0.3)  # what was in flight at the cut ends (in failures)
                stop.set()
                # EIO: a C-STORE begun after the cut must fail, never succeed.
                try:
                    late = small_ct()
                    with association(gw, contexts_for([late])) as assoc:
                        eio_answers.append(store(assoc, late) if assoc.is_established else None)
                except Exception:
                    eio_answers.append(None)
                gw.kill9()
                for t in threads:
                    t.join(30)
                umount()
                mount()
                gw.start()
                with ledger.lock:
                    deletable.clear()  # in doubt or not, the deleter starts afresh
                found = check_consistent(gw, mnt, ledger)
                ledger.settle(found)
            assert all(a != 0x0000 for a in eio_answers), f"a C-STORE after the shutdown succeeded: {eio_answers}"
            acked = ledger.acked
            print(f"\npower cuts: {CUTS}; acknowledged and checked: {acked['store']} stores, "
                  f"{acked['replace']} replacements, {acked['delete']} deletions; "
                  f"{ledger.doubtful} operations cut without an answer")
            assert acked["store"] >= CUTS and acked["replace"] >= 1 and acked["delete"] >= 1, acked
        finally:
            gw.kill9()


def test_full_disk_fails_cleanly_and_recovers(tmp_path):
    # 160 MB: the write-ahead log's three 16 MB segments, the index and room for a few objects.
    with loop_ext4(tmp_path, 160) as (mnt, _mount, _umount):
        gw = gateway_on(tmp_path, mnt)
        gw.start()
        try:
            first = small_ct()
            with association(gw, contexts_for([first])) as assoc:
                assert store(assoc, first) == 0x0000
            baseline = gw_files(mnt)
            filler = mnt / "filler"
            with open(filler, "wb") as f:  # fill the file system to the last block
                chunk = b"\0" * (1 << 20)
                with contextlib.suppress(OSError):
                    while True:
                        f.write(chunk)
                        f.flush()
                chunk = b"\0" * 4096
                with contextlib.suppress(OSError):
                    while True:
                        f.write(chunk)
                        f.flush()
            small, big = small_ct(), synthetic_instance(4_000_000)
            with association(gw, contexts_for([small, big])) as assoc:
                statuses = [store(assoc, s, msg_id=i) for i, s in enumerate([small, big], 1)]
            assert all(s is not None and (s & 0xF000) in (0xA000, 0xC000) for s in statuses), \
                [hex(s) if s is not None else None for s in statuses]
            listed = set(listed_uids(gw))
            assert listed == {first.sop_uid}, "a refused object is listed"
            left = gw_files(mnt) - baseline - {filler}
            assert not left, f"files left by refused C-STOREs: {sorted(map(str, left))}"
            filler.unlink()
            # Space is back: the same gateway (no restart) stores again.
            with association(gw, contexts_for([small, big])) as assoc:
                assert [store(assoc, s, msg_id=i) for i, s in enumerate([small, big], 1)] == [0, 0]
            assert set(listed_uids(gw)) == {first.sop_uid, small.sop_uid, big.sop_uid}
            assert requests.get(f"{gw.http_root}/readyz", timeout=HTTP_TIMEOUT).status_code == 200
        finally:
            gw.kill9()


def gw_files(mnt: Path) -> set[Path]:
    """Files on the file system a failed store must not add to: objects, spool, index journals aside."""
    data = mnt / "data"
    return {p for p in mnt.rglob("*") if p.is_file()
            and not p.name.startswith("index.db")
            and not (p.parent == data / "spool" and p.stat().st_size == 0)}
