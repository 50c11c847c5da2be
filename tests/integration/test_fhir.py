"""FHIR R4 at /fhir: ImagingStudy, Patient, Endpoint, CapabilityStatement and OperationOutcome, answered from
the index, every resource validated against the R4B models of `fhir.resources`, searched with the SMART
`fhirclient` package; and the IHE Invoke Image Display launch link.

The gateway holds every readable sample of testdata/ (each with a SOP Instance UID of its own).
"""

from __future__ import annotations

import collections
import urllib.parse

import pytest
import requests
from fhirclient import client as fhirclient
from fhirclient.models.imagingstudy import ImagingStudy

from gw_dimse import store_all
from gw_fhir import validate
from gw_samples import small_ct, unique_corpus

ISSUER_SYSTEM = "urn:oid:1.2.3.999"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


@pytest.fixture(scope="module")
def gateway_env():
    return {
        "DICOMGW_FHIR__SUBJECT": "local",
        "DICOMGW_HTTP__ALLOW_DELETE": "true",
        "DICOMGW_FHIR__DEFAULT_COUNT": "20",
    }


def text(ds, keyword) -> str:
    v = ds.get(keyword)
    return str(v).strip() if v is not None else ""


@pytest.fixture(scope="module")
def corpus(gateway):
    samples = list(unique_corpus())
    statuses = store_all(gateway, samples)
    stored = [s for s in samples if statuses[s.name] in (0x0000, 0xB000, 0xB007, 0xB006)]
    assert len(stored) >= 100, statuses
    studies = collections.defaultdict(list)
    for s in stored:
        studies[s.study_uid].append(s)
    return studies


def fhir(gw, path, params=None, headers=None, **kw):
    return requests.get(f"{gw.http_root}/fhir/{path}", params=params,
                        headers={"Accept": "application/fhir+json", **(headers or {})}, timeout=30, **kw)


def ok_json(resp) -> dict:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/fhir+json")
    return validate(resp.json())


def search(gw, params) -> dict:
    return ok_json(fhir(gw, "ImagingStudy", params))


def ids(bundle) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"}


def all_ids(gw, params) -> set[str]:
    """Every match of a search, following the next links to the end."""
    found, bundle = set(), search(gw, params)
    total = bundle["total"]
    while True:
        found |= ids(bundle)
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not nxt:
            break
        bundle = ok_json(requests.get(nxt[0], headers={"Accept": "application/fhir+json"}, timeout=30))
    assert len(found) == total
    return found


def test_every_study_maps_to_a_valid_imaging_study(gateway, corpus):
    for study_uid, samples in corpus.items():
        study = ok_json(fhir(gateway, f"ImagingStudy/{study_uid}"))
        assert study["id"] == study_uid
        assert {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}", "use": "official"} in study["identifier"]
        assert study["status"] == "available"
        assert study["numberOfInstances"] == len(samples)
        series = {s.series_uid for s in samples}
        assert study["numberOfSeries"] == len(series)
        assert {se["uid"] for se in study["series"]} == series
        got = {i["uid"]: i["sopClass"]["code"] for se in study["series"] for i in se.get("instance", [])}
        assert got == {s.sop_uid: f"urn:oid:{s.sop_class}" for s in samples}
        modalities = {text(s.ds, "Modality") for s in samples} - {""}
        assert {c["code"] for c in study.get("modality", [])} == modalities
        for c in study.get("modality", []):
            assert c["system"] == DCM
        first = samples[0].ds
        accession = text(first, "AccessionNumber")
        acsn = [i for i in study["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN"]
        assert [i["value"] for i in acsn] == ([accession] if accession else [])
        d = text(first, "StudyDate")
        if len(d) == 8 and d.isdigit():
            assert study["started"].startswith(f"{d[:4]}-{d[4:6]}-{d[6:8]}"), (d, study.get("started"))
        if text(first, "PatientID"):
            assert study["subject"]["reference"].startswith("Patient/")
        # The endpoints: this server's DICOMweb root, and the study's IID launch link (contained).
        refs = [e["reference"] for e in study["endpoint"]]
        assert "Endpoint/dicomweb" in refs and "#iid" in refs
        iid = study["contained"][0]
        assert iid["connectionType"]["code"] == "ihe-iid" and study_uid in iid["address"]


def test_series_attributes_are_mapped(gateway, corpus):
    checked = 0
    for study_uid, samples in corpus.items():
        study = ok_json(fhir(gateway, f"ImagingStudy/{study_uid}"))
        for se in study["series"]:
            ds = next(s.ds for s in samples if s.series_uid == se["uid"])
            assert se["modality"]["system"] == DCM
            if text(ds, "SeriesNumber"):
                assert se["number"] == int(text(ds, "SeriesNumber"))
            if text(ds, "BodyPartExamined"):
                assert se["bodySite"].get("display") or se["bodySite"].get("code")
                checked += 1
            if text(ds, "Laterality") in ("L", "R"):
                assert se["laterality"]["system"] == "http://snomed.info/sct"
            if text(ds, "SeriesDescription"):
                assert se["description"] == text(ds, "SeriesDescription")
    assert checked > 0, "no sample with Body Part Examined"


def test_patients_endpoint_and_capability_statement_validate(gateway, corpus):
    ok_json(fhir(gateway, "metadata"))
    ep = ok_json(fhir(gateway, "Endpoint/dicomweb"))
    assert ep["address"] == gateway.base_url and ep["connectionType"]["code"] == "dicom-wado-rs"
    ok_json(fhir(gateway, "Endpoint"))
    patients = {(text(s.ds, "PatientID"), text(s.ds, "IssuerOfPatientID"))
                for samples in corpus.values() for s in samples if text(s.ds, "PatientID")}
    assert patients
    for study_uid in list(corpus)[:40]:
        study = ok_json(fhir(gateway, f"ImagingStudy/{study_uid}"))
        ref = study["subject"].get("reference")
        if ref:
            patient = ok_json(fhir(gateway, ref))
            assert patient["identifier"][0]["value"] == study["subject"]["identifier"]["value"]
    pid, issuer = sorted(patients)[0]
    bundle = ok_json(fhir(gateway, "Patient", {"identifier": f"urn:dicom:patient-id|{pid}"}))
    assert bundle["total"] >= 1
    assert all(e["resource"]["identifier"][0]["value"] == pid for e in bundle["entry"])


def expected_by(corpus, predicate) -> set[str]:
    return {uid for uid, samples in corpus.items() if predicate(samples[0].ds)}


def test_fhirclient_searches_by_patient_accession_and_dates_and_pages_to_the_end(gateway, corpus):
    smart = fhirclient.FHIRClient(settings={"app_id": "dicom-gateway-tests", "api_base": f"{gateway.http_root}/fhir/"})

    def run(struct):
        found = [r for r in ImagingStudy.where(struct=struct).perform_resources_iter(smart.server)]
        assert all(isinstance(r, ImagingStudy) for r in found)
        return [r.id for r in found]

    # Paging to the end (the default page is 20 studies): every study exactly once.
    everything = run({"_count": "7"})
    assert len(everything) == len(set(everything)) == len(corpus)

    by_patient = collections.Counter(text(s[0].ds, "PatientID") for s in corpus.values())
    pid = next(p for p, n in by_patient.most_common() if p)
    expected = expected_by(corpus, lambda ds: text(ds, "PatientID") == pid)
    assert set(run({"patient:identifier": f"urn:dicom:patient-id|{pid}"})) == expected
    assert set(run({"subject:identifier": f"urn:dicom:patient-id|{pid}"})) == expected

    accession = next(text(s[0].ds, "AccessionNumber") for s in corpus.values() if text(s[0].ds, "AccessionNumber"))
    expected = expected_by(corpus, lambda ds: text(ds, "AccessionNumber") == accession)
    assert set(run({"identifier": accession})) == expected
    assert set(run({"identifier": f"http://terminology.hl7.org/CodeSystem/v2-0203|{accession}"})) == expected

    dates = sorted({text(s[0].ds, "StudyDate") for s in corpus.values() if len(text(s[0].ds, "StudyDate")) == 8})
    lo, hi = dates[len(dates) // 4], dates[3 * len(dates) // 4]
    fhir_date = lambda d: f"{d[:4]}-{d[4:6]}-{d[6:]}"  # noqa: E731
    expected = expected_by(corpus, lambda ds: lo <= text(ds, "StudyDate") <= hi and len(text(ds, "StudyDate")) == 8)
    got = all_ids(gateway, {"started": [f"ge{fhir_date(lo)}", f"le{fhir_date(hi)}"], "_count": "5"})
    assert got == expected and expected
    # A partial date is a range too (fhirclient sends one value per parameter).
    year = lo[:4]
    expected = expected_by(corpus, lambda ds: text(ds, "StudyDate")[:4] == year and len(text(ds, "StudyDate")) == 8)
    assert set(run({"started": year})) == expected and expected


def test_the_capability_statement_is_true_for_every_parameter_it_lists(gateway, corpus):
    cs = ok_json(fhir(gateway, "metadata"))
    resources = {r["type"]: r for r in cs["rest"][0]["resource"]}
    study_uid, samples = next((u, s) for u, s in corpus.items()
                              if text(s[0].ds, "AccessionNumber") and text(s[0].ds, "PatientID")
                              and len(text(s[0].ds, "StudyDate")) == 8)
    ds = samples[0].ds
    study = ok_json(fhir(gateway, f"ImagingStudy/{study_uid}"))
    d = text(ds, "StudyDate")
    day = f"{d[:4]}-{d[4:6]}-{d[6:]}"
    modality = study["modality"][0]["code"]
    patient_ref = study["subject"]["reference"]
    # For each parameter: a value that finds the study, and one that must not.
    values = {
        "identifier": (f"urn:dicom:uid|urn:oid:{study_uid}", "urn:dicom:uid|urn:oid:1.2.3.4.5.6.7"),
        "patient": (patient_ref, "Patient/NOBODY"),
        "subject": (patient_ref, "Patient/NOBODY"),
        "started": (f"eq{day}", "lt1900-01-01"),
        "modality": (f"{DCM}|{modality}", f"{DCM}|XX"),
        "status": ("available", "cancelled"),
        "series": (study["series"][0]["uid"], "1.2.3.4.5.6.7"),
        "endpoint": ("Endpoint/dicomweb", "Endpoint/other"),
        "_id": (study_uid, "1.2.3.4.5.6.7"),
        "_lastUpdated": ("gt2000-01-01", "lt2000-01-01"),
    }
    listed = [p["name"] for p in resources["ImagingStudy"]["searchParam"]]
    assert sorted(listed) == sorted(values), "the test covers exactly the parameters the server lists"
    for name in listed:
        hit, miss = values[name]
        assert study_uid in ids(search(gateway, {name: hit})), name
        assert study_uid not in ids(search(gateway, {name: miss})), name
    for include in resources["ImagingStudy"]["searchInclude"]:
        bundle = search(gateway, {"_id": study_uid, "_include": include})
        included = [e["resource"]["resourceType"] for e in bundle["entry"] if e["search"]["mode"] == "include"]
        assert included == ["Endpoint" if include.endswith("endpoint") else "Patient"], include
    pid = text(ds, "PatientID")
    for p in resources["Patient"]["searchParam"]:
        value = {"identifier": f"urn:dicom:patient-id|{pid}",
                 "_id": patient_ref.split("/", 1)[1]}[p["name"]]
        assert ok_json(fhir(gateway, "Patient", {p["name"]: value}))["total"] >= 1, p["name"]
    assert set(cs["format"]) >= {"json", "application/fhir+json"}


def test_result_parameters(gateway, corpus):
    count = search(gateway, {"_summary": "count"})
    assert count["total"] == len(corpus) and "entry" not in count
    page = search(gateway, {"_count": "3", "_sort": "-started"})
    assert len(page["entry"]) == 3 and page["total"] == len(corpus)
    relations = {link["relation"] for link in page["link"]}
    assert {"self", "next"} <= relations and "previous" not in relations
    second = ok_json(requests.get(next(link["url"] for link in page["link"] if link["relation"] == "next"),
                                  headers={"Accept": "application/fhir+json"}, timeout=30))
    assert "previous" in {link["relation"] for link in second["link"]}
    started = [e["resource"].get("started", "")[:10] for e in page["entry"] + second["entry"]]
    assert started == sorted(started, reverse=True)
    slim = search(gateway, {"_count": "2", "_elements": "identifier"})
    for e in slim["entry"]:
        assert "series" not in e["resource"] and "identifier" in e["resource"]
        assert e["resource"]["meta"]["tag"][0]["code"] == "SUBSETTED"
    last = search(gateway, {"_sort": "_lastUpdated", "_count": "1000"})
    stamps = [e["resource"]["meta"]["lastUpdated"] for e in last["entry"]]
    assert stamps == sorted(stamps)


def test_errors_are_operation_outcomes(gateway, corpus):
    def outcome(resp, status):
        assert resp.status_code == status, resp.text
        body = validate(resp.json())
        assert body["resourceType"] == "OperationOutcome"
        return body

    outcome(fhir(gateway, "ImagingStudy/1.2.3.4.5.6.7.8.9"), 404)
    outcome(fhir(gateway, "ImagingStudy/not-a-uid"), 404)
    outcome(fhir(gateway, "Patient/NOBODY"), 404)
    outcome(fhir(gateway, "Endpoint/nope"), 404)
    outcome(fhir(gateway, "ImagingStudy", {"started": "ge-last-week"}), 400)
    outcome(fhir(gateway, "ImagingStudy", {"_count": "many"}), 400)
    outcome(fhir(gateway, "ImagingStudy", {"_sort": "color"}), 400)
    # Unknown parameters: ignored (lenient, the default), refused under handling=strict.
    lenient = search(gateway, {"colour": "blue", "_count": "1"})
    assert lenient["total"] == len(corpus)
    assert "colour" not in lenient["link"][0]["url"]
    outcome(fhir(gateway, "ImagingStudy", {"colour": "blue"}, headers={"Prefer": "handling=strict"}), 400)
    # JSON only.
    outcome(fhir(gateway, "metadata", {"_format": "xml"}), 406)
    outcome(fhir(gateway, "metadata", headers={"Accept": "application/fhir+xml"}), 406)
    for fmt in ("json", "application/json", "application/fhir+json"):
        ok_json(fhir(gateway, "metadata", {"_format": fmt}, headers={"Accept": "*/*"}))
    ok_json(requests.get(f"{gateway.http_root}/fhir/metadata", headers={"Accept": "application/json"}, timeout=30))


def test_a_deleted_study_is_gone(gateway, corpus):
    sample = small_ct(StudyInstanceUID="1.2.826.0.1.3680043.8.498.777.1",
                      SeriesInstanceUID="1.2.826.0.1.3680043.8.498.777.2")
    assert store_all(gateway, [sample])[sample.name] == 0
    study = ok_json(fhir(gateway, f"ImagingStudy/{sample.study_uid}"))
    assert study["meta"]["versionId"] == "1"
    resp = requests.delete(f"{gateway.base_url}/studies/{sample.study_uid}", timeout=30)
    assert resp.status_code in (200, 204), resp.text
    gone = fhir(gateway, f"ImagingStudy/{sample.study_uid}")
    assert gone.status_code == 410
    assert validate(gone.json())["issue"][0]["code"] == "deleted"
    assert search(gateway, {"_id": sample.study_uid})["total"] == 0
    # Stored again: back, with a newer version.
    assert store_all(gateway, [sample])[sample.name] == 0
    again = ok_json(fhir(gateway, f"ImagingStudy/{sample.study_uid}"))
    assert int(again["meta"]["versionId"]) == 3


def test_iid_redirects_to_the_viewer(gateway, corpus):
    study_uid = next(iter(corpus))
    resp = requests.get(f"{gateway.http_root}/IHEInvokeImageDisplay",
                        params={"requestType": "STUDY", "studyUID": study_uid}, allow_redirects=False, timeout=30)
    assert resp.status_code == 303
    assert resp.headers["location"] == f"{gateway.base_url}/studies/{study_uid}/series"
    # The default target answers with the study's series.
    series = requests.get(resp.headers["location"], timeout=30)
    assert series.status_code == 200 and len(series.json()) == len({s.series_uid for s in corpus[study_uid]})
    pid = next(text(s[0].ds, "PatientID") for s in corpus.values() if text(s[0].ds, "PatientID"))
    resp = requests.get(f"{gateway.http_root}/IHEInvokeImageDisplay",
                        params={"requestType": "PATIENT", "patientID": pid}, allow_redirects=False, timeout=30)
    assert resp.status_code == 303
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(resp.headers["location"]).query)["PatientID"] == [pid]
    bad = requests.get(f"{gateway.http_root}/IHEInvokeImageDisplay", params={"requestType": "STUDY"}, timeout=30)
    assert bad.status_code == 400
    missing = requests.get(f"{gateway.http_root}/IHEInvokeImageDisplay",
                           params={"requestType": "STUDY", "studyUID": "1.2.3.4.5.6.7"}, timeout=30)
    assert missing.status_code == 404


def test_subject_by_identifier_with_issuer_systems(gateway_factory):
    gw = gateway_factory(env={"DICOMGW_FHIR__ISSUER_SYSTEMS": '{ "HOSP_A" = "urn:oid:1.2.3.999" }'})
    a = small_ct(PatientID="P-1", IssuerOfPatientID="HOSP_A")
    b = small_ct(PatientID="P-1", StudyInstanceUID="1.2.826.0.1.3680043.8.498.778.1",
                 SeriesInstanceUID="1.2.826.0.1.3680043.8.498.778.2")
    assert set(store_all(gw, [a, b]).values()) == {0}
    study = ok_json(fhir(gw, f"ImagingStudy/{a.study_uid}"))
    assert study["subject"] == {"type": "Patient", "identifier": {"system": ISSUER_SYSTEM, "value": "P-1"}}
    assert ids(search(gw, {"subject:identifier": f"{ISSUER_SYSTEM}|P-1"})) == {a.study_uid}
    assert ids(search(gw, {"patient:identifier": "P-1"})) == {a.study_uid, b.study_uid}
