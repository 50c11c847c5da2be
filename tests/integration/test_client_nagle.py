"""Clients as they come: a requestor that leaves Nagle's algorithm on (DCMTK without `TCP_NODELAY=1` in its
environment, what a modality or PACS on DCMTK's defaults does; pynetdicom, which never sets it) must store as
fast as one that switches it off.

Such a client writes a C-STORE's command PDU, then holds its (small) data PDU back until the command is
acknowledged; a server that delays its ACK (Linux: 40 ms, as it has nothing to answer yet) makes every small
C-STORE wait that long. Measured before the gateway re-armed TCP_QUICKACK after each read: 50 small instances
took storescu 2.2 s and pynetdicom 2.6 s (~45-50 ms each); after: 0.3 s and 0.5 s. The bounds below sit
between the two with room for a slow CI machine: a Nagle-bound run cannot pass them (50 x 40 ms = 2 s).
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
# Seconds for COUNT small C-STOREs: Nagle + delayed ACK alone costs 2 s; unhindered they take ~0.3-0.5 s.
BOUND_S = 1.6


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


def test_storescu_without_tcp_nodelay_is_not_nagle_bound(gateway, tmp_path):
    study, samples = _samples("DCMTK")
    files = tmp_path / "files"
    _write_files(samples, files)
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    started = time.monotonic()
    proc = subprocess.run(
        ["storescu", "-aec", gateway.ae_title, "+sd", "127.0.0.1", str(gateway.dimse_port), str(files)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _stored(gateway, study) == COUNT
    assert elapsed < BOUND_S, f"{COUNT} small C-STOREs took {elapsed:.2f} s without TCP_NODELAY (Nagle-bound)"


def test_pynetdicom_small_stores_are_not_nagle_bound(gateway):
    study, samples = _samples("PYNETDICOM")
    with association(gateway, contexts_for(samples[:1])) as assoc:
        # pynetdicom leaves Nagle on; check, so that this test cannot pass by a client change.
        import socket

        sock = assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        assert store(assoc, samples[0], msg_id=1) == 0  # first store: warm-up
        started = time.monotonic()
        statuses = [store(assoc, s, msg_id=i) for i, s in enumerate(samples[1:], start=2)]
        elapsed = time.monotonic() - started
    assert statuses == [0] * (COUNT - 1)
    assert _stored(gateway, study) == COUNT
    assert elapsed < BOUND_S, f"{COUNT - 1} small C-STOREs took {elapsed:.2f} s with pynetdicom (Nagle-bound)"
