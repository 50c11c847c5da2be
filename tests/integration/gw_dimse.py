"""DIMSE peers for the tests: DCMTK command-line tools and pynetdicom.

`send_raw_c_store` sends a C-STORE whose command and data set the test controls byte for byte: pynetdicom's
own `send_c_store` takes the Affected SOP Instance UID from the data set and re-encodes it, which hides the
very mistakes (truncated data, mismatched UIDs) a server must catch.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import Verification

from gw_samples import Sample

NETWORK_TIMEOUT = 20
VERIFICATION = "1.2.840.10008.1.1"

SUCCESS = 0x0000


def is_failure(status: int | None) -> bool:
    """A C-STORE failure status (PS3.7 C.4 / PS3.4 B.2.3): not success, not a warning (0001, Bxxx)."""
    return status is not None and status != 0x0000 and status != 0x0001 and not (0xB000 <= status <= 0xBFFF)


def is_cannot_understand_or_mismatch(status: int | None) -> bool:
    return status is not None and (0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF)


def fmt(status: int | None) -> str:
    return "no response" if status is None else f"0x{status:04X}"


# -- DCMTK ------------------------------------------------------------------------------------------------
def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"  # DCMTK crawls on Nagle + delayed ACK without it (see shared notes)
    return env


def echoscu(port: int, called_ae: str = "DICOMGW", timeout: float = 30, host: str = "127.0.0.1"):
    return subprocess.run(
        ["echoscu", "-to", "10", "-ta", "10", "-td", "10", "-aec", called_ae, host, str(port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def storescu_config(samples: list[Sample], path: Path) -> str:
    """Write a storescu association profile proposing each (SOP class, transfer syntax) pair exactly, so
    every file travels in its own transfer syntax (storescu's default proposes uncompressed only).
    Returns the profile name."""
    pairs = sorted({(s.sop_class, s.ts) for s in samples})
    tss = sorted({ts for _, ts in pairs})
    assert len(pairs) <= 128, "too many presentation contexts for one association"
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(tss):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[GatewayContexts]"]
    for i, (cls, ts) in enumerate(pairs, start=1):
        lines.append(f"PresentationContext{i} = {cls}\\TS{tss.index(ts)}")
    lines += ["[[Profiles]]", "[Gateway]", "PresentationContexts = GatewayContexts", ""]
    path.write_text("\n".join(lines))
    return "Gateway"


def storescu_tree(port: int, directory: Path, samples: list[Sample], workdir: Path, called_ae="DICOMGW",
                  timeout: float = 180):
    """`storescu +sd +r` over `directory` (one association). Returns (completed process, {file: response})
    where response is the text in "Received Store Response (...)" for each file sent."""
    cfg = workdir / "storescu.cfg"
    profile = storescu_config(samples, cfg)
    proc = subprocess.run(
        ["storescu", "-v", "-nh", "-xf", str(cfg), profile, "-to", "10", "-ta", "10", "-td", "60",
         "-aec", called_ae, "+sd", "+r", "127.0.0.1", str(port), str(directory)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=timeout,
    )
    responses: dict[str, str] = {}
    current = None
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.search(r"Sending file: (.*)$", line)
        if m:
            current = m.group(1).strip()
            responses[current] = "no response"
            continue
        m = re.search(r"Received Store Response \((.*)\)", line)
        if m and current:
            responses[current] = m.group(1)
            current = None
        elif current and re.search(r"Store Failed|Failed to send", line):
            responses[current] = "failed: " + line.strip()
            current = None
    return proc, responses


# -- pynetdicom -------------------------------------------------------------------------------------------
def make_ae(calling: str = "PYTEST") -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = NETWORK_TIMEOUT
    ae.dimse_timeout = NETWORK_TIMEOUT
    ae.network_timeout = NETWORK_TIMEOUT
    ae.connection_timeout = 10
    return ae


def contexts_for(samples: list[Sample]):
    pairs = sorted({(s.sop_class, s.ts) for s in samples})
    return [build_context(cls, ts) for cls, ts in pairs]


@contextlib.contextmanager
def association(gw, contexts=None, called_ae: str | None = None, calling: str = "PYTEST",
                require: bool = True):
    """An association with the gateway proposing `contexts` plus Verification; released on exit."""
    ae = make_ae(calling)
    contexts = list(contexts or [])
    if not any(cx.abstract_syntax == VERIFICATION for cx in contexts):
        contexts.append(build_context(Verification))
    assert len(contexts) <= 128
    assoc = ae.associate(gw.host, gw.dimse_port, contexts=contexts, ae_title=called_ae or gw.ae_title)
    try:
        if require:
            assert assoc.is_established, (
                f"association not established (rejected={assoc.is_rejected}, aborted={assoc.is_aborted})"
            )
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def association_rejection(gw, called_ae: str | None = None) -> tuple[int, int, int] | None:
    """(result, source, reason) of the A-ASSOCIATE-RJ the gateway answers a request with, or None.

    Read from the PDU as pynetdicom's transport thread decodes it: when a rejection arrives very fast,
    pynetdicom 3.0.4's requestor thread can find the transport already closed (by pynetdicom itself,
    on the RJ) and report an abort, so `Association.is_rejected` is not reliable here."""
    ae = make_ae("PYTEST")
    ae.add_requested_context(Verification)
    received = []

    def on_pdu(event):
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            received.append((event.pdu.result, event.pdu.source, event.pdu.reason_diagnostic))

    try:
        assoc = ae.associate(gw.host, gw.dimse_port, ae_title=called_ae or gw.ae_title,
                             evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)])
        if assoc.is_established:
            assoc.release()
            return None
        # The requestor thread may return before the transport thread has handled the PDU.
        deadline = time.monotonic() + 5
        while not received and assoc.dul.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        return received[0] if received else None
    finally:
        ae.shutdown()


def accepted_context(assoc, sop_class: str, ts: str):
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts:
            return cx
    return None


def send_raw_c_store(assoc, payload: bytes, sop_class: str, sop_uid: str, ts: str, msg_id: int = 1,
                     context_class: str | None = None) -> int | None:
    """Send a C-STORE-RQ with the given Affected SOP Class/Instance UIDs and data set bytes, on the accepted
    presentation context for (`context_class` or `sop_class`, `ts`). Returns the response status, or None if
    no response came (association aborted, connection closed, or DIMSE timeout)."""
    cx = accepted_context(assoc, context_class or sop_class, ts)
    assert cx is not None, f"no accepted presentation context for {context_class or sop_class} / {ts}"
    req = C_STORE()
    req.MessageID = msg_id
    req.Priority = 2
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_uid
    req.DataSet = BytesIO(payload)
    pause_reactor(assoc)
    try:
        assoc.dimse.send_msg(req, cx.context_id)
        _cx_id, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        return None
    status = getattr(rsp, "Status", None)
    return int(status) if status is not None else None


def send_partial_c_store(assoc, sample: Sample, fraction: float = 0.5, msg_id: int = 1) -> int:
    """Start a C-STORE of `sample` but send only the first `fraction` of its P-DATA PDUs (the command and
    part of the data set), then return without waiting for an answer: the object is mid-transfer until the
    test cuts the connection or kills the gateway. Returns the number of PDUs sent."""
    cx = accepted_context(assoc, sample.sop_class, sample.ts)
    assert cx is not None
    req = C_STORE()
    req.MessageID = msg_id
    req.Priority = 2
    req.AffectedSOPClassUID = sample.sop_class
    req.AffectedSOPInstanceUID = sample.sop_uid
    req.DataSet = BytesIO(sample.payload)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    msg.context_id = cx.context_id
    peer_max = assoc.dimse.maximum_pdu_size  # 0: unlimited; smaller PDUs are always allowed
    pdus = list(msg.encode_msg(cx.context_id, 16384 if not peer_max else min(peer_max, 16384)))
    count = max(2, int(len(pdus) * fraction))
    assert count < len(pdus), "object too small to be cut"
    for pdu in pdus[:count]:
        assoc.dul.send_pdu(pdu)
    deadline = time.monotonic() + 20
    while not assoc.dul.to_provider_queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the last PDU leaves the queue before it leaves the socket
    return count


def cut_connection(assoc) -> None:
    """Drop the association's TCP connection without A-RELEASE or A-ABORT: the peer simply vanishes."""
    try:
        assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def pause_reactor(assoc) -> None:
    """Stop pynetdicom's reactor thread from taking DIMSE messages off the queue, so that the next response
    is left for the caller. pynetdicom's own send_*() methods clear the checkpoint and wait for `_is_paused`,
    but the reactor sets that flag before every wait(), paused or not, so a fast answer can be stolen
    (seen here: "Received unexpected C-ECHO service message", then a DIMSE timeout). Waiting until the
    reactor thread is actually blocked on the checkpoint closes that window."""
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and assoc.is_alive():
        if assoc._is_paused and checkpoint._cond._waiters:
            return
        time.sleep(0.0002)


def store(assoc, sample: Sample, msg_id: int = 1) -> int | None:
    """C-STORE `sample` exactly as encoded, on its own (SOP class, transfer syntax) context."""
    return send_raw_c_store(assoc, sample.payload, sample.sop_class, sample.sop_uid, sample.ts, msg_id)


def store_all(gw, samples: list[Sample], calling: str = "PYTEST") -> dict[str, int | None]:
    """Store every sample (one association per 100 distinct contexts). Returns {sample.name: status}."""
    results: dict[str, int | None] = {}
    remaining = list(samples)
    while remaining:
        batch, pairs = [], set()
        for s in list(remaining):
            pair = (s.sop_class, s.ts)
            if pair not in pairs and len(pairs) >= 100:
                continue
            pairs.add(pair)
            batch.append(s)
            remaining.remove(s)
        with association(gw, contexts_for(batch), calling=calling) as assoc:
            for i, s in enumerate(batch, start=1):
                if not assoc.is_established:
                    results[s.name] = None
                    continue
                results[s.name] = store(assoc, s, msg_id=i)
    return results


def echo_status(assoc) -> int | None:
    pause_reactor(assoc)  # send_c_echo resumes it when done
    rsp: Dataset = assoc.send_c_echo()
    return int(rsp.Status) if "Status" in rsp else None
