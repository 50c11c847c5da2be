"""The audit trail: a C-STORE (DCMTK storescu), a QIDO-RS search (dicomweb-client) and a WADO-RS retrieve each
leave the right event, served as FHIR R4 AuditEvent at /fhir/AuditEvent (every resource validated against the
R4B models of `fhir.resources`) and searchable by date, patient, entity and agent; a store's event commits
with its index row, so it survives a kill -9 right after the C-STORE success; start and stop are recorded.
"""

from __future__ import annotations

import base64
import datetime
import subprocess

import pydicom
import requests

from gw_dimse import association, contexts_for, dcmtk_env, store, store_all
from gw_fhir import validate
from gw_samples import small_ct
from gw_web import client

DCM = "http://dicom.nema.org/resources/ontology/DCM"
STORE, QUERY, ACCESSED, ACTIVITY = "110104", "110112", "110103", "110100"


def events(gw, params: dict) -> list[dict]:
    """Every AuditEvent matching `params`, following the Bundle's next links. One page as a rule: each search is
    itself audited, and a newer event shifts the offsets of the pages after the first."""
    resp = requests.get(f"{gw.http_root}/fhir/AuditEvent", params={"_count": "100", **params},
                        headers={"Accept": "application/fhir+json"}, timeout=30)
    out = []
    while True:
        assert resp.status_code == 200, resp.text
        bundle = validate(resp.json())
        out += [e["resource"] for e in bundle.get("entry", [])]
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not nxt:
            assert len(out) == bundle["total"], bundle
            return out
        resp = requests.get(nxt[0], headers={"Accept": "application/fhir+json"}, timeout=30)


def of_type(found: list[dict], code: str) -> list[dict]:
    return [e for e in found if e["type"]["system"] == DCM and e["type"]["code"] == code]


def requestor(event: dict) -> dict:
    (agent,) = [a for a in event["agent"] if a["requestor"]]
    return agent


def entity(event: dict, role: str) -> dict | None:
    found = [e for e in event.get("entity", []) if e["role"]["code"] == role]
    return found[0] if found else None


def storescu(gw, path, calling: str) -> None:
    proc = subprocess.run(["storescu", "-aet", calling, "-aec", gw.ae_title, "127.0.0.1", str(gw.dimse_port),
                           str(path)], env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def study_of(patient_id: str):
    """CT_small in a study and series of its own, for patient `patient_id`."""
    return small_ct(PatientID=patient_id, StudyInstanceUID=pydicom.uid.generate_uid(),
                    SeriesInstanceUID=pydicom.uid.generate_uid())


def iso(t: datetime.datetime) -> str:
    return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_c_store_by_storescu_leaves_a_store_event(gateway, tmp_path):
    gw = gateway
    sample = study_of("AUDIT-STORE")
    path = tmp_path / "ct.dcm"
    path.write_bytes(sample.part10())
    storescu(gw, path, "STORESCU")

    (event,) = of_type(events(gw, {"entity": f"ImagingStudy/{sample.study_uid}"}), STORE)
    assert (event["action"], event["outcome"]) == ("C", "0")
    who = requestor(event)
    assert who["who"]["identifier"]["value"] == "STORESCU" and who["altId"] == "STORESCU"
    assert who["network"] == {"address": "127.0.0.1", "type": "2"}
    assert who["type"]["coding"][0]["code"] == "110153"  # Source Role ID
    study = entity(event, "3")
    assert study["what"]["identifier"]["value"] == f"urn:oid:{sample.study_uid}"
    details = {(d["type"], d["valueString"]) for d in study["detail"]}
    assert ("SOPInstanceUID", sample.sop_uid) in details
    assert ("SOPClassUID", sample.sop_class) in details
    assert entity(event, "1")["what"]["identifier"]["value"] == "AUDIT-STORE"
    # The same resource by id.
    resp = requests.get(f"{gw.http_root}/fhir/AuditEvent/{event['id']}", timeout=30)
    assert resp.status_code == 200 and validate(resp.json()) == event
    assert requests.get(f"{gw.http_root}/fhir/AuditEvent/999999999", timeout=30).status_code == 404


def test_a_qido_search_leaves_a_query_event(gateway):
    gw = gateway
    sample = study_of("AUDIT-QIDO")
    assert store_all(gw, [sample])[sample.name] == 0
    found = client(gw).search_for_studies(search_filters={"PatientID": "AUDIT-QIDO"})
    assert len(found) == 1

    queries = of_type(events(gw, {"patient": "AUDIT-QIDO"}), QUERY)
    assert len(queries) == 1, queries
    (event,) = queries
    assert (event["action"], event["outcome"]) == ("E", "0")
    asked = base64.b64decode(entity(event, "24")["query"]).decode()
    assert asked.startswith("GET /dicomweb/studies?") and "PatientID=AUDIT-QIDO" in asked
    assert requestor(event)["network"]["address"] == "127.0.0.1"


def test_a_wado_retrieve_leaves_a_retrieve_event(gateway):
    gw = gateway
    sample = study_of("AUDIT-WADO")
    assert store_all(gw, [sample])[sample.name] == 0
    got = client(gw).retrieve_instance(sample.study_uid, sample.series_uid, sample.sop_uid)
    assert str(got.SOPInstanceUID) == sample.sop_uid

    (event,) = of_type(events(gw, {"entity": sample.study_uid}), ACCESSED)
    assert (event["action"], event["outcome"]) == ("R", "0")
    assert requestor(event)["type"]["coding"][0]["code"] == "110152"  # Destination Role ID
    # The patient comes from the index: the request named only the study.
    assert entity(event, "1")["what"]["identifier"]["value"] == "AUDIT-WADO"
    assert event in events(gw, {"patient": "AUDIT-WADO"})


def test_events_are_searched_by_date_patient_entity_and_agent(gateway):
    gw = gateway
    before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=2)
    a, b = study_of("AUDIT-A"), study_of("AUDIT-B")
    assert store_all(gw, [a], calling="AUDIT_AE_A")[a.name] == 0
    assert store_all(gw, [b], calling="AUDIT_AE_B")[b.name] == 0
    after = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)

    def stored_studies(params):
        return {entity(e, "3")["what"]["identifier"]["value"][8:] for e in of_type(events(gw, params), STORE)}

    assert stored_studies({"patient": "AUDIT-A"}) == {a.study_uid}
    assert stored_studies({"entity": f"ImagingStudy/{b.study_uid}"}) == {b.study_uid}
    assert stored_studies({"agent": "AUDIT_AE_B"}) == {b.study_uid}
    window = stored_studies({"date": [f"ge{iso(before)}", f"le{iso(after)}"]})
    assert {a.study_uid, b.study_uid} <= window
    assert not {a.study_uid, b.study_uid} & stored_studies({"date": f"lt{iso(before)}"})
    assert not {a.study_uid, b.study_uid} & stored_studies({"date": f"gt{iso(after)}"})
    today = after.strftime("%Y-%m-%d")
    assert {a.study_uid, b.study_uid} <= stored_studies({"date": today, "agent": "127.0.0.1"})
    # A malformed date is refused, not ignored.
    resp = requests.get(f"{gw.http_root}/fhir/AuditEvent", params={"date": "ne2020"}, timeout=30)
    assert resp.status_code == 400


def test_a_store_event_survives_kill_9_right_after_the_c_store_success(fresh_gateway):
    gw = fresh_gateway
    sample = study_of("AUDIT-KILL")
    with association(gw, contexts_for([sample]), calling="KILLED_AE") as assoc:
        assert store(assoc, sample) == 0
        gw.kill9()
    gw.start()
    (event,) = of_type(events(gw, {"entity": sample.study_uid}), STORE)
    assert requestor(event)["altId"] == "KILLED_AE"
    assert entity(event, "1")["what"]["identifier"]["value"] == "AUDIT-KILL"


def test_start_and_stop_are_recorded(fresh_gateway):
    gw = fresh_gateway
    gw.restart()
    activity = of_type(events(gw, {}), ACTIVITY)
    subtypes = [e["subtype"][0]["code"] for e in activity]
    # Newest first: the second start, the stop, the first start.
    assert subtypes == ["110120", "110121", "110120"], subtypes
