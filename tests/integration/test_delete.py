"""DICOMweb DELETE of an instance, a series and a study, on both storage backends: off unless configured
(405), then rows and objects removed together, counts refreshed, audited."""

from __future__ import annotations

import pydicom
import pytest
import requests

from conftest import BACKENDS, backend_env
from gw_dimse import association, contexts_for, store
from gw_s3 import stored_keys
from gw_samples import small_ct
from gw_web import HTTP_TIMEOUT, client, get, value


@pytest.fixture(scope="module", params=BACKENDS)
def storage_env(request):
    """The whole module runs on each storage backend: filesystem, then S3 (Garage)."""
    return backend_env(request)


@pytest.fixture(scope="module")
def gateway_env():
    return {"DICOMGW_HTTP__ALLOW_DELETE": "true"}


def delete(gw, path: str) -> requests.Response:
    return requests.delete(gw.base_url + path, timeout=HTTP_TIMEOUT)


def store_study(gw, series: int, per_series: int):
    """One new study of `series` x `per_series` small CTs; returns the samples by series."""
    study = pydicom.uid.generate_uid()
    groups = []
    for n in range(series):
        series_uid = pydicom.uid.generate_uid()
        groups.append([small_ct(StudyInstanceUID=study, SeriesInstanceUID=series_uid, SeriesNumber=n + 1)
                       for _ in range(per_series)])
    flat = [s for g in groups for s in g]
    with association(gw, contexts_for(flat[:1])) as assoc:
        assert [store(assoc, s, msg_id=i) for i, s in enumerate(flat, 1)] == [0] * len(flat)
    return study, groups


def study_counts(gw, study: str) -> tuple[int, int] | None:
    found = client(gw).search_for_studies(search_filters={"StudyInstanceUID": study})
    if not found:
        return None
    return value(found[0], "NumberOfStudyRelatedSeries"), value(found[0], "NumberOfStudyRelatedInstances")


def test_delete_is_refused_unless_configured(gateway_factory):
    gw = gateway_factory()  # allow_delete defaults to false
    study, groups = store_study(gw, 1, 1)
    before = stored_keys(gw)
    r = delete(gw, f"/studies/{study}")
    assert r.status_code == 405, r.text
    assert "allow_delete" in r.text
    assert study_counts(gw, study) == (1, 1)
    assert stored_keys(gw) == before


def test_delete_instance_removes_row_and_object_and_updates_counts(gateway):
    study, groups = store_study(gateway, 2, 2)
    keys_before = stored_keys(gateway)
    victim = groups[0][0]
    r = delete(gateway, f"/studies/{study}/series/{victim.series_uid}/instances/{victim.sop_uid}")
    assert r.status_code == 204, r.text
    assert study_counts(gateway, study) == (2, 3)
    assert get(gateway, f"/studies/{study}/series/{victim.series_uid}/instances/{victim.sop_uid}",
               headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}).status_code == 404
    gone = keys_before - stored_keys(gateway)
    assert len(gone) == 1 and victim.sop_uid in next(iter(gone)), gone
    # The others are untouched and still retrievable.
    other = groups[0][1]
    got = client(gateway).retrieve_instance(study, other.series_uid, other.sop_uid,
                                            media_types=(("application/dicom", "*"),))
    assert got.PixelData == other.ds.PixelData


def test_delete_series_then_study_removes_everything(gateway):
    study, groups = store_study(gateway, 2, 3)
    uids = {s.sop_uid for g in groups for s in g}

    def keys_of_study():
        return {k for k in stored_keys(gateway) if k.startswith(study + "/")}

    assert len(keys_of_study()) == 6
    r = delete(gateway, f"/studies/{study}/series/{groups[0][0].series_uid}")
    assert r.status_code == 204, r.text
    assert study_counts(gateway, study) == (1, 3)
    assert len(keys_of_study()) == 3
    r = delete(gateway, f"/studies/{study}")
    assert r.status_code == 204, r.text
    assert study_counts(gateway, study) is None
    assert keys_of_study() == set()
    assert get(gateway, f"/studies/{study}/metadata").status_code == 404
    listed = {value(i, "SOPInstanceUID") for i in client(gateway).search_for_instances(get_remaining=True)}
    assert not (uids & listed)


def test_delete_unknown_or_invalid_answers_404_or_400(gateway):
    assert delete(gateway, "/studies/1.2.3.999999").status_code == 404
    assert delete(gateway, "/studies/not-a-uid").status_code == 400


def test_deletion_is_audited(gateway):
    study, _ = store_study(gateway, 1, 1)
    assert delete(gateway, f"/studies/{study}").status_code == 204
    # The deletion's audit event committed with the rows' removal (docs/security.md, "Audit").
    resp = requests.get(f"{gateway.http_root}/fhir/AuditEvent", params={"entity": study}, timeout=30)
    assert resp.status_code == 200, resp.text
    deleted = [e["resource"] for e in resp.json().get("entry", []) if e["resource"]["type"]["code"] == "110105"]
    assert len(deleted) == 1 and deleted[0]["action"] == "D", deleted
