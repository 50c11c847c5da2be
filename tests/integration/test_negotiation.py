"""Association negotiation (PS3.8 9.3.2, 9.3.3): which presentation contexts are accepted, and what an invalid
A-ASSOCIATE-RQ gets."""

from __future__ import annotations

import socket
import struct

from pynetdicom import build_context
from pynetdicom.sop_class import (
    CTImageStorage,
    ModalityWorklistInformationFind,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
)

from gw_dimse import association, echo_status, echoscu
from test_robustness import read_until_closed

PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.8.498.99999.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03


def test_unsupported_abstract_syntaxes_are_answered_result_3(gateway):
    contexts = [build_context(uid, EXPLICIT_LE) for uid in (
        CTImageStorage, ModalityWorklistInformationFind, StorageCommitmentPushModel, PRIVATE_SOP_CLASS,
        StudyRootQueryRetrieveInformationModelFind)]
    with association(gateway, contexts) as assoc:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
        assert {CTImageStorage, StudyRootQueryRetrieveInformationModelFind} <= accepted
        for uid in (ModalityWorklistInformationFind, StorageCommitmentPushModel, PRIVATE_SOP_CLASS):
            assert uid not in accepted, f"{uid} accepted"
            assert rejected.get(uid) == ABSTRACT_SYNTAX_NOT_SUPPORTED, (
                f"{uid}: result {rejected.get(uid)}, expected 3 (abstract syntax not supported)")
        assert echo_status(assoc) == 0


def test_private_sop_classes_are_accepted_when_configured(gateway_factory):
    gw = gateway_factory(env={"DICOMGW_DIMSE__ACCEPT_PRIVATE_SOP_CLASSES": "true"})
    contexts = [build_context(PRIVATE_SOP_CLASS, EXPLICIT_LE), build_context(ModalityWorklistInformationFind)]
    with association(gw, contexts) as assoc:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert PRIVATE_SOP_CLASS in accepted
        assert ModalityWorklistInformationFind not in accepted


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(context_ids: list[int], called: str = "DICOMGW") -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing Verification on each of `context_ids`."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + b"RAWSCU".ljust(16) + bytes(32)
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    for pc in context_ids:
        sub = _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2")
        body += _item(0x20, bytes([pc, 0, 0, 0]) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">I", 16384)))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def test_a_well_formed_raw_request_is_accepted(gateway):
    """The raw request below is right when its IDs are odd: the gateway answers A-ASSOCIATE-AC."""
    with socket.create_connection((gateway.host, gateway.dimse_port), timeout=5) as s:
        s.sendall(associate_rq([1, 3]))
        s.settimeout(5)
        assert s.recv(1)[:1] == b"\x02", "no A-ASSOCIATE-AC"


def test_even_presentation_context_id_is_aborted(gateway):
    """PS3.8 9.3.2.2: presentation context IDs are odd. An A-ASSOCIATE-RQ with an even one is an invalid PDU:
    A-ABORT (Sta2 + Evt19 -> AA-1), then the connection closes; never an association."""
    for ids in ([2], [1, 4], [0]):
        with socket.create_connection((gateway.host, gateway.dimse_port), timeout=5) as s:
            s.sendall(associate_rq(ids))
            closed, answer = read_until_closed(s, timeout=10)
            assert answer[:1] == b"\x07", f"IDs {ids}: answered {answer[:1]!r}, expected A-ABORT (0x07)"
            assert closed, f"IDs {ids}: connection left open"
    r = echoscu(gateway.dimse_port, gateway.ae_title)
    assert r.returncode == 0, r.stdout + r.stderr
