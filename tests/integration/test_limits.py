"""The limits of docs/conformance.md section 4, each hit on purpose: trickling and oversized DIMSE peers, too
many rejections at once, QIDO paging, HTTP bodies and heads too large or too slow."""

from __future__ import annotations

import socket
import struct
import time

import pydicom
import requests

from gw_dimse import association, contexts_for, echoscu, store
from gw_samples import synthetic_instance, with_new_uids
from gw_web import client, get, text
from test_negotiation import associate_rq
from test_robustness import read_until_closed


def open_association(gw, max_pdu: int = 16384) -> tuple[socket.socket, int]:
    """A raw association proposing Verification on context 1; returns the socket and the maximum PDU length
    the gateway announced in its A-ASSOCIATE-AC."""
    s = socket.create_connection((gw.host, gw.dimse_port), timeout=10)
    s.sendall(associate_rq([1]))
    header = recv_exact(s, 6)
    assert header[0] == 0x02, f"no A-ASSOCIATE-AC: {header!r}"
    body = recv_exact(s, struct.unpack(">I", header[2:])[0])
    announced = None
    pos = 68
    while pos < len(body):
        kind, length = body[pos], struct.unpack(">H", body[pos + 2:pos + 4])[0]
        if kind == 0x50:
            sub = body[pos + 4:pos + 4 + length]
            i = 0
            while i < len(sub):
                sk, sl = sub[i], struct.unpack(">H", sub[i + 2:i + 4])[0]
                if sk == 0x51:
                    announced = struct.unpack(">I", sub[i + 4:i + 8])[0]
                i += 4 + sl
        pos += 4 + length
    return s, announced


def recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def command_fragment() -> bytes:
    """A P-DATA-TF PDU with one 2-byte command fragment on context 1, not the last one."""
    pdv = struct.pack(">IBB", 4, 1, 0x01) + b"\x00\x00"
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def aborted_within(s: socket.socket, seconds: float, feed) -> float:
    """Calls `feed(s)` every 0.5 s until the gateway answers A-ABORT and closes; returns the time taken."""
    started = time.monotonic()
    s.settimeout(0.5)
    data = b""
    while time.monotonic() - started < seconds:
        try:
            feed(s)
        except OSError:
            break
        try:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        except socket.timeout:
            continue
        except OSError:
            break
    elapsed = time.monotonic() - started
    assert data[:1] == b"\x07", f"no A-ABORT after {elapsed:.1f} s (got {data[:8]!r})"
    return elapsed


def test_a_peer_trickling_one_pdu_byte_by_byte_is_aborted(gateway_factory):
    gw = gateway_factory(env={"DICOMGW_DIMSE__READ_TIMEOUT_SECS": "3"})
    s, _ = open_association(gw)
    pdu = iter(command_fragment() * 10)
    with s:
        elapsed = aborted_within(s, 15, lambda s: s.sendall(bytes([next(pdu)])))
    assert 2.5 < elapsed < 8, f"aborted after {elapsed:.1f} s, read timeout 3 s"


def test_a_peer_trickling_small_pdus_is_aborted_by_the_message_timeout(gateway_factory):
    """Each PDU arrives well within the read timeout, but the message never ends."""
    gw = gateway_factory(env={"DICOMGW_DIMSE__READ_TIMEOUT_SECS": "30", "DICOMGW_DIMSE__MESSAGE_TIMEOUT_SECS": "3"})
    s, _ = open_association(gw)
    with s:
        elapsed = aborted_within(s, 20, lambda s: s.sendall(command_fragment()))
    assert 2.5 < elapsed < 8, f"aborted after {elapsed:.1f} s, message timeout 3 s"
    # An ordinary client is not affected.
    r = echoscu(gw.dimse_port, gw.ae_title)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pdu_size_is_announced_and_a_longer_pdu_aborts(gateway_factory):
    gw = gateway_factory(env={"DICOMGW_DIMSE__MAX_PDU_LENGTH": "16384"})
    s, announced = open_association(gw)
    assert announced == 16384, f"A-ASSOCIATE-AC announces {announced}"
    with s:
        body = struct.pack(">IBB", 20000 + 2, 1, 0x00) + bytes(20000)
        s.sendall(struct.pack(">BBI", 0x04, 0, len(body)) + body)
        closed, answer = read_until_closed(s, timeout=10)
        assert answer[:1] == b"\x07" and closed, f"oversized PDU answered {answer[:8]!r}, closed={closed}"
    # pynetdicom, told 16384, sends within it: a 100 KB object still goes through.
    sample = synthetic_instance(100_000)
    with association(gw, contexts_for([sample])) as assoc:
        assert assoc.acceptor.maximum_length == 16384
        assert store(assoc, sample) == 0


def test_connections_beyond_the_rejection_cap_are_closed_at_once(gateway_factory):
    gw = gateway_factory(env={"DICOMGW_DIMSE__MAX_ASSOCIATIONS": "1",
                              "DICOMGW_DIMSE__MAX_REJECTIONS_IN_PROGRESS": "2"})
    with association(gw, []):
        # Five connections that send nothing: two are waited on (for an A-ASSOCIATE-RQ to reject), the rest
        # are closed at once.
        conns = [socket.create_connection((gw.host, gw.dimse_port), timeout=5) for _ in range(5)]
        time.sleep(1)
        closed = 0
        for c in conns:
            c.settimeout(0.2)
            try:
                closed += c.recv(1) == b""
            except socket.timeout:
                pass
            except OSError:
                closed += 1
        for c in conns:
            c.close()
    assert closed == 3, f"{closed} of 5 connections closed at once, expected 3 (cap 2)"


def test_qido_default_and_maximum_limit_page_with_a_warning(gateway_factory):
    gw = gateway_factory(env={"DICOMGW_HTTP__QIDO_DEFAULT_LIMIT": "5", "DICOMGW_HTTP__QIDO_MAX_LIMIT": "8"})
    base = synthetic_instance(1000)
    study = pydicom.uid.generate_uid()
    samples = [with_new_uids(base, pydicom.uid.generate_uid(), f"#{i}", StudyInstanceUID=study, InstanceNumber=i)
               for i in range(12)]
    with association(gw, contexts_for(samples)) as assoc:
        assert [store(assoc, s, msg_id=i + 1) for i, s in enumerate(samples)] == [0] * 12

    r = get(gw, "/instances")
    assert r.status_code == 200 and len(r.json()) == 5
    assert r.headers.get("Warning", "").startswith("299"), r.headers
    assert "7 additional results" in r.headers["Warning"] and "offset=5" in r.headers["Warning"]

    r = get(gw, "/instances", params={"limit": 100, "offset": 2})
    assert len(r.json()) == 8, "limit beyond the maximum must be cut to it"
    assert "2 additional results" in r.headers.get("Warning", ""), r.headers

    r = get(gw, "/instances", params={"limit": 3})
    assert len(r.json()) == 3 and "Warning" not in r.headers, "the client's own limit needs no warning"
    r = get(gw, "/instances", params={"offset": 10})
    assert len(r.json()) == 2 and "Warning" not in r.headers

    # dicomweb-client pages through everything with offset.
    c = client(gw)
    seen = []
    for offset in range(0, 20, 5):
        seen += [text(x, "SOPInstanceUID") for x in c.search_for_instances(offset=offset)]
    assert sorted(seen) == sorted(s.sop_uid for s in samples)


def test_http_body_too_large_is_413(gateway_factory):
    gw = gateway_factory(env={"DICOMGW_HTTP__MAX_BODY_SIZE": "1000"})
    # Any request but STOW-RS (which has max_stow_size of its own; test_stow stores megabytes).
    r = requests.request("GET", gw.base_url + "/studies", data=b"x" * 5000, timeout=10)
    assert r.status_code == 413, r.status_code
    assert requests.get(gw.base_url + "/studies", timeout=10).status_code in (200, 204)


def test_http_head_too_large_is_refused(gateway_factory):
    gw = gateway_factory(env={"DICOMGW_HTTP__MAX_HEADER_SIZE": "8192"})
    try:
        r = requests.get(gw.base_url + "/studies", headers={"X-Big": "a" * 20000}, timeout=10)
        assert r.status_code == 431, r.status_code
    except requests.ConnectionError:
        pass  # hyper may close the connection instead of answering 431
    assert requests.get(gw.http_root + "/healthz", timeout=10).status_code == 200


def test_slow_http_request_head_is_cut_off(gateway_factory):
    """Slowloris: a client sending its headers a line at a time must not hold a connection for ever."""
    gw = gateway_factory(env={"DICOMGW_HTTP__HEADER_READ_TIMEOUT_SECS": "2"})
    with socket.create_connection((gw.host, gw.http_port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        s.settimeout(0.5)
        for i in range(40):
            try:
                s.sendall(f"X-Slow-{i}: 1\r\n".encode())
                if s.recv(4096) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
        elapsed = time.monotonic() - started
    assert closed and elapsed < 6, f"connection still open after {elapsed:.1f} s of a trickled head"
    assert requests.get(gw.http_root + "/healthz", timeout=10).status_code == 200
