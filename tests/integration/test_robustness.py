"""The DIMSE listener against misbehaving peers: noise, idle and half-open connections, wrong AE titles,
peers that vanish mid-transfer."""

from __future__ import annotations

import socket
import struct
import time

from gw_dimse import association, association_rejection, contexts_for, cut_connection, echo_status, echoscu, send_partial_c_store
from gw_samples import derived_uid, synthetic_instance
from gw_web import client, instance_json


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Read until the peer closes (True) or `timeout` passes (False)."""
    sock.settimeout(0.5)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True, data
        if not chunk:
            return True, data
        data += chunk
    return False, data


def assert_echo_works(gw):
    r = echoscu(gw.dimse_port, gw.ae_title, timeout=20)
    assert r.returncode == 0, f"echoscu failed after the bad peer:\n{r.stdout}{r.stderr}"


GARBAGE = {
    "noise": bytes((i * 37 + 11) & 0xFF for i in range(256)),
    "http-request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "associate-rq-4gib-length": b"\x01\x00" + struct.pack(">I", 0xFFFFFFFF) + b"\x00" * 64,
    "unknown-pdu-type": b"\x09\x00" + struct.pack(">I", 16) + b"\x00" * 16,
    "p-data-before-association": b"\x04\x00" + struct.pack(">I", 6) + struct.pack(">I", 2) + b"\x01\x03",
}


def test_garbage_on_the_dimse_port_closes_the_connection_and_the_server_stays_up(gateway):
    for name, payload in GARBAGE.items():
        with socket.create_connection((gateway.host, gateway.dimse_port), timeout=5) as s:
            s.sendall(payload)
            closed, answer = read_until_closed(s, timeout=15)
            assert closed, f"{name}: connection still open 15 s after the garbage (got {answer[:20]!r})"
            if answer:
                assert answer[0] in (0x03, 0x07), f"{name}: answered PDU type {answer[0]:#x}, not A-ASSOCIATE-RJ/A-ABORT"
        assert gateway.is_running(), f"gateway died on {name}"
        assert_echo_works(gateway)


def test_idle_and_one_byte_connections_do_not_block_a_concurrent_echoscu(gateway):
    idle = [socket.create_connection((gateway.host, gateway.dimse_port), timeout=5) for _ in range(10)]
    one_byte = [socket.create_connection((gateway.host, gateway.dimse_port), timeout=5) for _ in range(10)]
    try:
        for s in one_byte:
            s.sendall(b"\x01")
        started = time.monotonic()
        assert_echo_works(gateway)
        elapsed = time.monotonic() - started
        assert elapsed < 5, f"echoscu took {elapsed:.1f} s beside idle connections"
    finally:
        for s in idle + one_byte:
            s.close()


def test_wrong_called_ae_title_is_rejected(gateway):
    r = echoscu(gateway.dimse_port, "NOTDICOMGW")
    assert r.returncode != 0, "echoscu to a wrong called AE title succeeded"
    out = (r.stdout + r.stderr).lower()
    assert "rejected" in out and "called ae title not recognized" in out, out[-800:]
    # Repeated: the rejection must come every time (PS3.8 9.3.4: permanent, service user,
    # called AE title not recognized).
    for attempt in range(20):
        assert association_rejection(gateway, called_ae="NOTDICOMGW") == (1, 1, 7), f"attempt {attempt}"


def test_called_ae_title_check_can_be_turned_off(gateway_factory):
    gw = gateway_factory(env={"DICOMGW_DIMSE__CHECK_CALLED_AE": "false"})
    r = echoscu(gw.dimse_port, "ANYTHING")
    assert r.returncode == 0, f"with check_called_ae=false a foreign called AE title was refused:\n{r.stdout}{r.stderr}"


def test_peer_vanishing_mid_store_leaves_nothing_and_server_stays_up(gateway):
    big = synthetic_instance(8_000_000, sop_uid=derived_uid("vanish", "big"))
    before = gateway.data_files()
    with association(gateway, contexts_for([big])) as assoc:
        send_partial_c_store(assoc, big, fraction=0.5)
        cut_connection(assoc)
    assert gateway.is_running()
    assert_echo_works(gateway)
    assert instance_json(client(gateway), big.sop_uid) == [], "a half-received object is listed"
    deadline = time.monotonic() + 10
    while gateway.data_files() != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gateway.data_files() == before, "a partial object stayed in the data directory (objects or spool)"


def test_echo_still_works_after_many_short_associations(gateway):
    for _ in range(30):
        with association(gateway) as assoc:
            assert echo_status(assoc) == 0x0000
    assert_echo_works(gateway)


def test_association_cap_rejects_transiently_and_frees_slots(gateway_factory):
    gw = gateway_factory(env={"DICOMGW_DIMSE__MAX_ASSOCIATIONS": "2"})
    with association(gw) as first, association(gw):
        for attempt in range(5):
            # PS3.8 9.3.4: rejected-transient, service provider (presentation), local-limit-exceeded.
            assert association_rejection(gw) == (2, 3, 2), f"attempt {attempt}"
        r = echoscu(gw.dimse_port, gw.ae_title)
        out = (r.stdout + r.stderr).lower()
        assert r.returncode != 0, "echoscu got an association beyond the cap"
        assert "rejected transient" in out and "local limit exceeded" in out, out[-800:]
        assert echo_status(first) == 0x0000
    # The slots are free again once the gateway has seen both releases.
    deadline = time.monotonic() + 5
    while True:
        with association(gw, require=False) as again:
            if again.is_established:
                assert echo_status(again) == 0x0000
                break
        assert time.monotonic() < deadline, "slots not freed after both associations were released"
        time.sleep(0.05)
