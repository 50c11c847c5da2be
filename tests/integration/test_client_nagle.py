"""Clients as they come: a requestor that leaves Nagle's algorithm on (DCMTK without `TCP_NODELAY=1` in its
environment, what a modality or PACS on DCMTK's defaults does; pynetdicom, which never sets it) must store as
fast as one that switches it off.

Such a client writes a C-STORE's command PDU, then holds its (small) data PDU back until the command is
acknowledged; a server that delays its ACK (Linux: 40 ms, as it has nothing to answer yet) makes every small
C-STORE wait that long. Each test compares with the same client's TCP_NODELAY rate, measured next to it.
"""

from __future__ import annotations

import os
import subprocess
import time

import pydicom

from gw_dimse import association, contexts_for, store
from gw_samples import synthetic_instance, with_new_uids
from gw_web import client

COUNT = 50
# Nagle + delayed ACK costs ~40 ms per small C-STORE (2 s for COUNT); the same stores with TCP_NODELAY take
# ~0.3-0.5 s on an idle machine. Compared with a TCP_NODELAY run measured just before, so that a loaded
# machine slows both sides alike: without TCP_NODELAY may take at most 1.5x as long, plus 0.5 s of slack
# (less than the 2 s the delayed ACKs alone would add).
RATIO, SLACK_S = 1.5, 0.5


def _samples(tag: str):
    study = pydicom.uid.generate_uid()
    series = pydicom.uid.generate_uid()
    base = synthetic_instance(4096)
    out = [with_new_uids(base, pydicom.uid.generate_uid(), f"#{i}", StudyInstanceUID=study,
                         SeriesInstanceUID=series, PatientID=f"NAGLE-{tag}") for i in range(COUNT)]
    return study, out


def _write_files(samples, directory):
    directory.mkdir(parents=True)
    for i, s in enumerate(samples):
        s.ds.save_as(directory / f"{i:03}.dcm", enforce_file_format=True)


def _stored(gw, study: str) -> int:
    found = client(gw).search_for_studies(search_filters={"StudyInstanceUID": study})
    return found[0]["00201208"]["Value"][0] if found else 0


def _storescu(gw, files, nodelay: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    started = time.monotonic()
    proc = subprocess.run(
        ["storescu", "-aec", gw.ae_title, "+sd", "127.0.0.1", str(gw.dimse_port), str(files)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return elapsed


def test_storescu_without_tcp_nodelay_is_not_nagle_bound(gateway, tmp_path):
    runs = {}
    for nodelay in (True, False):
        study, samples = _samples(f"DCMTK-{nodelay}")
        files = tmp_path / f"files-{nodelay}"
        _write_files(samples, files)
        runs[nodelay] = _storescu(gateway, files, nodelay)
        assert _stored(gateway, study) == COUNT
    assert runs[False] < RATIO * runs[True] + SLACK_S, (
        f"{COUNT} small C-STOREs took {runs[False]:.2f} s without TCP_NODELAY, {runs[True]:.2f} s with it")


def test_pynetdicom_small_stores_are_not_nagle_bound(gateway):
    import socket

    study, samples = _samples("PYNETDICOM")
    half = COUNT // 2
    with association(gateway, contexts_for(samples[:1])) as assoc:
        sock = assoc.dul.socket.socket
        # pynetdicom leaves Nagle on; check, so that this test cannot pass by a client change.
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        assert store(assoc, samples[0], msg_id=1) == 0  # warm-up
        times = {}
        for nodelay, batch in ((True, samples[1:half]), (False, samples[half:])):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))
            started = time.monotonic()
            statuses = [store(assoc, s, msg_id=i) for i, s in enumerate(batch, start=2)]
            times[nodelay] = (time.monotonic() - started) / len(batch)
            assert statuses == [0] * len(batch)
    assert _stored(gateway, study) == COUNT
    # Per store: 1.5x the TCP_NODELAY time plus 10 ms, well under the 40 ms of a delayed ACK.
    assert times[False] < RATIO * times[True] + 0.010, (
        f"pynetdicom: {times[False] * 1000:.1f} ms per small C-STORE with Nagle on, "
        f"{times[True] * 1000:.1f} ms with TCP_NODELAY")
