"""Graceful shutdown: on SIGTERM the gateway stops accepting, lets the C-STORE in flight finish (received,
stored, acknowledged), then exits 0; nothing acknowledged is lost and nothing new is started."""

from __future__ import annotations

import signal
import socket
import time
from io import BytesIO

from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from gw_dimse import accepted_context, association, contexts_for, pause_reactor
from gw_samples import derived_uid, synthetic_instance
from gw_web import client, instance_json


def c_store_pdus(assoc, sample) -> list:
    cx = accepted_context(assoc, sample.sop_class, sample.ts)
    req = C_STORE()
    req.MessageID = 1
    req.Priority = 2
    req.AffectedSOPClassUID = sample.sop_class
    req.AffectedSOPInstanceUID = sample.sop_uid
    req.DataSet = BytesIO(sample.payload)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    msg.context_id = cx.context_id
    return list(msg.encode_msg(cx.context_id, 16384))


def send(assoc, pdus) -> None:
    for pdu in pdus:
        assoc.dul.send_pdu(pdu)
    deadline = time.monotonic() + 20
    while not assoc.dul.to_provider_queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)


def dimse_port_refuses(gw) -> bool:
    try:
        with socket.create_connection((gw.host, gw.dimse_port), timeout=2):
            return False
    except OSError:
        return True


def test_sigterm_lets_a_c_store_in_flight_finish_then_exits_0(gateway_factory):
    gw = gateway_factory(env={"DICOMGW_RUNTIME__SHUTDOWN_GRACE_SECS": "20"})
    sample = synthetic_instance(2_000_000, sop_uid=derived_uid("shutdown", "in-flight"))
    idle_sample = synthetic_instance(1000)
    with association(gw, contexts_for([idle_sample])) as idle, association(gw, contexts_for([sample])) as assoc:
        pdus = c_store_pdus(assoc, sample)
        half = len(pdus) // 2
        pause_reactor(assoc)
        send(assoc, pdus[:half])
        time.sleep(0.3)

        gw._signal(signal.SIGTERM)
        time.sleep(1.0)
        assert gw.is_running(), "the gateway exited with a C-STORE in flight"
        assert dimse_port_refuses(gw), "new associations still accepted after SIGTERM"
        # An association between messages is ended (A-ABORT) rather than waited for.
        deadline = time.monotonic() + 5
        while idle.is_established and time.monotonic() < deadline:
            time.sleep(0.1)
        assert idle.is_aborted, "the idle association was not ended on shutdown"

        send(assoc, pdus[half:])
        _cx, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert rsp is not None and int(rsp.Status) == 0, f"C-STORE in flight answered {rsp}"

    gw.proc.wait(15)
    assert gw.proc.returncode == 0, f"exit status {gw.proc.returncode}\n{gw.log_tail()}"
    assert "all associations and requests finished" in gw.log_text()

    gw.start()
    found = instance_json(client(gw), sample.sop_uid)
    assert len(found) == 1, "the acknowledged C-STORE is not there after the restart"
