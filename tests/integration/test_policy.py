"""One policy for every protocol ([[policy.rules]]): the same table of (identity, action, study) cases
driven through QIDO-RS, WADO-RS, STOW-RS, FHIR, C-FIND, C-MOVE, C-GET and C-STORE gives the same decisions.

Identities: API keys over HTTP and AE titles over DIMSE carry the same names, and the rules name them by
subject. NORTH may search and read the studies of "North Hospital"; ADMIN may do everything; SOUTH has no
rule (deny by default). A study outside the caller's scope is answered exactly like a missing one (404, no
match), and counts see only what is in scope; an action the caller has no right to at all is refused (403,
status 0124)."""

from __future__ import annotations

import uuid

import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context, build_role, evt

from gw_auth import sha256_hex
from gw_dimse import association, association_rejection, make_ae, store
from gw_harness import free_port
from gw_qr import STUDY_ROOT_FIND, STUDY_ROOT_GET, STUDY_ROOT_MOVE, SC_IMAGE, instance, send_request, uid

TIMEOUT = 30
KEYS = {name: f"{name.lower()}-{uuid.uuid4().hex}" for name in ("NORTH", "SOUTH", "ADMIN")}
DEST_PORT = free_port()
NORTH_STUDY, SOUTH_STUDY = uid(90, 1), uid(90, 2)
INSTITUTIONS = {NORTH_STUDY: "North Hospital", SOUTH_STUDY: "South Hospital"}
MISSING_STUDY = uid(90, 99)


def sample(study_uid: str, institution: str, n: int = 1):
    study = {"uid": study_uid, "PatientID": f"P{study_uid[-1]}", "PatientName": "Policy^Test",
             "InstitutionName": institution}
    return instance(study, {"uid": f"{study_uid}.1", "Modality": "OT"}, n)


@pytest.fixture(scope="module")
def gateway_env():
    keys = ", ".join(f'{{name = "{name}", sha256 = "{sha256_hex(key)}", scopes = ["read", "search", "store", '
                     f'"delete"]}}' for name, key in KEYS.items())
    rules = ", ".join([
        '{subject = "NORTH", actions = ["search", "read"], study_attribute = "InstitutionName", '
        'study_values = ["North Hospital"]}',
        '{subject = "ADMIN", actions = ["search", "read", "store", "delete"]}',
    ])
    peers = ", ".join([f'{{ae_title = "{ae}", host = "127.0.0.1", port = 1}}' for ae in KEYS]
                      + [f'{{ae_title = "DEST", host = "127.0.0.1", port = {DEST_PORT}}}'])
    return {
        "DICOMGW_AUTH__API_KEYS": f"[{keys}]",
        "DICOMGW_POLICY__RULES": f"[{rules}]",
        "DICOMGW_DIMSE__PEERS": f"[{peers}]",
        "DICOMGW_DIMSE__REQUIRE_KNOWN_PEERS": "true",
        # One result per page: whether a Warning announces more results shows what a count would leak.
        "DICOMGW_HTTP__QIDO_DEFAULT_LIMIT": "1",
    }


@pytest.fixture(scope="module")
def studies(gateway):
    with association(gateway, [build_context(SC_IMAGE, ExplicitVRLittleEndian)], calling="ADMIN") as assoc:
        for study_uid, institution in INSTITUTIONS.items():
            assert store(assoc, sample(study_uid, institution)) == 0
    return INSTITUTIONS


def http(gw, who: str, path: str, method: str = "GET", **kw) -> requests.Response:
    return requests.request(method, gw.http_root + path, headers={"X-API-Key": KEYS[who], **kw.pop("headers", {})},
                            timeout=TIMEOUT, **kw)


# -- each protocol's answer, as visible / hidden / refused ---------------------------------------------------
def qido_search(gw, who, study):
    r = http(gw, who, f"/dicomweb/studies?StudyInstanceUID={study}")
    if r.status_code == 403:
        return "refused"
    assert r.status_code in (200, 204), r.status_code
    return "visible" if r.status_code == 200 and study in r.text else "hidden"


def fhir_search(gw, who, study):
    r = http(gw, who, f"/fhir/ImagingStudy?_id={study}")
    if r.status_code == 403:
        return "refused"
    assert r.status_code == 200, (r.status_code, r.text)
    return "visible" if r.json()["total"] == 1 else "hidden"


def wado_read(gw, who, study):
    r = http(gw, who, f"/dicomweb/studies/{study}/metadata")
    return {200: "visible", 404: "hidden", 403: "refused"}[r.status_code]


def fhir_read(gw, who, study):
    r = http(gw, who, f"/fhir/ImagingStudy/{study}")
    return {200: "visible", 404: "hidden", 403: "refused"}[r.status_code]


def cfind(gw, who, study):
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    with association(gw, [build_context(STUDY_ROOT_FIND)], calling=who) as assoc:
        responses = send_request(assoc, "find", ident, STUDY_ROOT_FIND)
    final = responses[-1][0]
    if final == 0x0124:
        return "refused"
    assert final == 0x0000, hex(final)
    return "visible" if len(responses) > 1 else "hidden"


def retrieved(final_status, got: set[str], study) -> str:
    if final_status == 0x0124:
        return "refused"
    assert final_status in (0x0000, 0xA702, 0xB000), hex(final_status)
    return "visible" if any(s.startswith(study) for s in got) else "hidden"


def cget(gw, who, study):
    ae = make_ae(who)
    got = set()

    def on_store(rsp, cx_id):
        got.add(rsp.AffectedSOPInstanceUID)
        return 0x0000

    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    assoc = ae.associate(gw.host, gw.dimse_port, contexts=[build_context(STUDY_ROOT_GET), build_context(SC_IMAGE)],
                         ae_title=gw.ae_title, ext_neg=[build_role(SC_IMAGE, scp_role=True)])
    assert assoc.is_established
    try:
        responses = send_request(assoc, "get", ident, STUDY_ROOT_GET, on_store=on_store)
    finally:
        assoc.release()
        ae.shutdown()
    return retrieved(responses[-1][0], got, study)


def cmove(gw, who, study):
    got = set()

    def on_store(event):
        got.add(event.request.AffectedSOPInstanceUID)
        return 0x0000

    dest = AE(ae_title="DEST")
    dest.add_supported_context(SC_IMAGE)
    server = dest.start_server(("127.0.0.1", DEST_PORT), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    try:
        with association(gw, [build_context(STUDY_ROOT_MOVE)], calling=who) as assoc:
            responses = send_request(assoc, "move", ident, STUDY_ROOT_MOVE, destination="DEST")
    finally:
        server.shutdown()
    return retrieved(responses[-1][0], got, study)


def stow(gw, who, study):
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=gw.base_url, headers={"X-API-Key": KEYS[who]})
    client.set_http_retry_params(retry=False)
    try:
        client.store_instances([sample(study, "Elsewhere", n=2).ds])
    except requests.HTTPError as e:
        assert e.response.status_code == 403, e.response.status_code
        return "refused"
    return "stored"


def cstore(gw, who, study):
    with association(gw, [build_context(SC_IMAGE, ExplicitVRLittleEndian)], calling=who) as assoc:
        status = store(assoc, sample(study, "Elsewhere", n=3))
    if status == 0x0124:
        return "refused"
    assert status == 0x0000, hex(status)
    return "stored"


PROTOCOLS = {
    "search": [qido_search, fhir_search, cfind],
    "read": [wado_read, fhir_read, cget, cmove],
    "store": [stow, cstore],
}

# (who, action, study, decision): the one table every protocol must agree with.
CASES = [
    ("NORTH", "search", NORTH_STUDY, "visible"),
    ("NORTH", "search", SOUTH_STUDY, "hidden"),
    ("NORTH", "read", NORTH_STUDY, "visible"),
    ("NORTH", "read", SOUTH_STUDY, "hidden"),
    ("NORTH", "read", MISSING_STUDY, "hidden"),
    ("NORTH", "store", uid(90, 3), "refused"),
    ("SOUTH", "search", NORTH_STUDY, "refused"),
    ("SOUTH", "read", SOUTH_STUDY, "refused"),
    ("SOUTH", "store", uid(90, 4), "refused"),
    ("ADMIN", "search", SOUTH_STUDY, "visible"),
    ("ADMIN", "read", SOUTH_STUDY, "visible"),
    ("ADMIN", "store", uid(90, 5), "stored"),
]


@pytest.mark.parametrize("who,action,study,decision", CASES,
                         ids=[f"{w}-{a}-{s.rsplit('.', 1)[-1]}" for w, a, s, _ in CASES])
def test_every_protocol_gives_the_same_decision(gateway, studies, who, action, study, decision):
    answers = {p.__name__: p(gateway, who, study) for p in PROTOCOLS[action]}
    assert answers == {name: decision for name in answers}


def test_out_of_scope_study_is_answered_like_a_missing_one(gateway, studies):
    for path in ("/dicomweb/studies/{}/metadata", "/dicomweb/studies/{}", "/fhir/ImagingStudy/{}",
                 "/download/studies/{}"):
        hidden = http(gateway, "NORTH", path.format(SOUTH_STUDY))
        missing = http(gateway, "NORTH", path.format(MISSING_STUDY))
        assert hidden.status_code == missing.status_code == 404, path
        assert hidden.text.replace(SOUTH_STUDY, "X") == missing.text.replace(MISSING_STUDY, "X"), path


def test_counts_and_pages_see_only_the_scope(gateway, studies):
    north = http(gateway, "NORTH", "/dicomweb/studies")
    assert [s["0020000D"]["Value"][0] for s in north.json()] == [NORTH_STUDY]
    assert "Warning" not in north.headers  # no "additional results" hinting at the other study
    admin = http(gateway, "ADMIN", "/dicomweb/studies")
    assert "additional results" in admin.headers.get("Warning", "")
    assert http(gateway, "NORTH", "/fhir/ImagingStudy?_summary=count").json()["total"] == 1
    assert http(gateway, "ADMIN", "/fhir/ImagingStudy?_summary=count").json()["total"] >= 2
    series = http(gateway, "NORTH", "/dicomweb/series")
    assert {s["0020000D"]["Value"][0] for s in series.json()} == {NORTH_STUDY}


def test_unknown_peers_are_rejected_at_association(gateway):
    # PYTEST is not a configured peer: rejected-permanent, service-user, calling AE title not recognized.
    assert association_rejection(gateway) == (1, 1, 3)
