"""The push of ImagingStudy to an EHR's FHIR server (gw_fhir.EhrServer, a real HTTP server that validates what
it receives against the R4B models and can fail, throttle or vanish): stable studies arrive once, changes arrive
as updates, nothing is lost to kill -9 or to an unreachable server, refused resources are parked, and the
gateway authenticates with a bearer token or OAuth 2.0 client credentials (secret or private-key JWT).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time

import pytest
import requests

from gw_dimse import store_all
from gw_fhir import EhrServer, basic_auth, study_key
from gw_samples import derived_uid, small_ct

STABILITY_MS = 1500


@pytest.fixture
def ehr():
    server = EhrServer().start()
    yield server
    server.stop()


def push_env(ehr: EhrServer, **extra) -> dict[str, str]:
    env = {
        "DICOMGW_FHIR__PUSH__URL": ehr.url,
        "DICOMGW_FHIR__PUSH__STABILITY_MS": str(STABILITY_MS),
        "DICOMGW_FHIR__PUSH__POLL_MS": "100",
        "DICOMGW_FHIR__PUSH__INITIAL_BACKOFF_MS": "200",
        "DICOMGW_FHIR__PUSH__MAX_BACKOFF_MS": "800",
        "DICOMGW_HTTP__ALLOW_DELETE": "true",
    }
    env.update(extra)
    return env


def study(name: str, series: int = 1, per_series: int = 1, series_base: int = 0, **attrs):
    """Instances of one study (UIDs derived from `name`)."""
    study_uid = derived_uid("study", name)
    out = []
    for s in range(series_base, series_base + series):
        series_uid = derived_uid("series", name, str(s))
        for i in range(per_series):
            out.append(small_ct(derived_uid("sop", name, str(s), str(i)), StudyInstanceUID=study_uid,
                                SeriesInstanceUID=series_uid, SeriesNumber=s + 1, InstanceNumber=i + 1, **attrs))
    return study_uid, out


def store(gw, samples):
    statuses = store_all(gw, samples)
    assert set(statuses.values()) == {0}, statuses


def status(gw) -> dict:
    return requests.get(f"{gw.http_root}/fhir-push/status", timeout=10).json()


def test_a_stable_study_arrives_once_and_changes_arrive_as_updates(gateway_factory, ehr):
    gw = gateway_factory(env=push_env(ehr))
    uid, samples = study("stable", series=2, per_series=2)
    store(gw, samples[:2])
    time.sleep(0.5)
    store(gw, samples[2:])  # arriving in pieces: the study is not yet stable
    stored_at = time.monotonic()
    time.sleep(STABILITY_MS / 1000 * 0.6)
    assert ehr.attempts(uid) == [], "pushed before the study was stable"
    ehr.wait_for(lambda: ehr.pushes(uid), what="the push")
    assert time.monotonic() - stored_at >= STABILITY_MS / 1000 * 0.9
    time.sleep(1.0)
    pushes = ehr.pushes(uid)
    assert len(pushes) == 1, "one push for the whole study"
    assert pushes[0]["status"] == 201 and pushes[0]["headers"]["content-type"].startswith("application/fhir+json")
    resource = ehr.study(uid)
    assert resource["numberOfInstances"] == 4 and resource["numberOfSeries"] == 2
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}", "use": "official"} in resource["identifier"]
    assert "id" not in resource, "a conditional update carries no id of ours"
    wado = next(c for c in resource["contained"] if c["connectionType"]["code"] == "dicom-wado-rs")
    assert wado["address"] == gw.base_url

    # A new series: an update with the new counts.
    _, more = study("stable", series=1, per_series=3, series_base=2)
    store(gw, more)
    ehr.wait_for(lambda: len(ehr.pushes(uid)) == 2, what="the update")
    assert ehr.pushes(uid)[1]["status"] == 200
    assert ehr.study(uid)["numberOfSeries"] == 3 and ehr.study(uid)["numberOfInstances"] == 7

    # Deleted through DICOMweb: entered-in-error.
    assert requests.delete(f"{gw.base_url}/studies/{uid}", timeout=30).status_code in (200, 204)
    ehr.wait_for(lambda: len(ehr.pushes(uid)) == 3, what="the deletion")
    assert ehr.study(uid)["status"] == "entered-in-error"
    s = status(gw)
    assert s["outbox"]["pending"] == 0 and s["worker"]["pushed"] == 3 and s["worker"]["failed"] == 0


def test_the_latest_state_wins(gateway_factory, ehr):
    gw = gateway_factory(env=push_env(ehr))
    uid, samples = study("trickle", series=1, per_series=6)
    for s in samples:  # each instance well within the stability delay of the previous one
        store(gw, [s])
        time.sleep(0.2)
    ehr.wait_for(lambda: ehr.pushes(uid), what="the push")
    time.sleep(STABILITY_MS / 1000 + 0.5)
    assert len(ehr.pushes(uid)) == 1
    assert ehr.study(uid)["numberOfInstances"] == 6


def test_conditional_delete_when_configured(gateway_factory, ehr):
    gw = gateway_factory(env=push_env(ehr, DICOMGW_FHIR__PUSH__ON_DELETE="delete"))
    uid, samples = study("to-delete")
    store(gw, samples)
    ehr.wait_for(lambda: ehr.study(uid), what="the push")
    assert requests.delete(f"{gw.base_url}/studies/{uid}", timeout=30).status_code in (200, 204)
    ehr.wait_for(lambda: [r for r in ehr.pushes(uid) if r["method"] == "DELETE"], what="the DELETE")
    assert ehr.study(uid) is None


def test_nothing_is_lost_when_the_gateway_is_killed_between_store_and_push(gateway_factory, ehr):
    gw = gateway_factory(env=push_env(ehr, DICOMGW_FHIR__PUSH__STABILITY_MS="3000"))
    uids = []
    for n in range(3):
        uid, samples = study(f"killed-{n}", per_series=2)
        store(gw, samples)
        uids.append(uid)
    gw.kill9()
    time.sleep(3.5)
    assert all(ehr.attempts(u) == [] for u in uids)
    gw.start()
    for u in uids:
        ehr.wait_for(lambda: ehr.pushes(u), what=f"the push of {u} after the restart")
    assert all(ehr.study(u)["numberOfInstances"] == 2 for u in uids)


def test_nothing_is_lost_while_the_server_is_down_or_failing(gateway_factory, ehr):
    gw = gateway_factory(env=push_env(ehr))
    ehr.stop()  # vanished: connections refused
    down_uid, samples = study("down")
    store(gw, samples)
    time.sleep(STABILITY_MS / 1000 + 1.5)
    s = status(gw)
    assert s["outbox"]["pending"] == 1 and s["outbox"]["retrying"] == 1 and s["worker"]["failed"] >= 2
    ehr.start()  # back, same port
    ehr.wait_for(lambda: ehr.pushes(down_uid), what="the push once the server is back")

    # 503, then 429 with Retry-After: retried until accepted.
    ehr.fail_status, ehr.fail_count = 503, 2
    busy_uid, samples = study("busy")
    store(gw, samples)
    ehr.wait_for(lambda: ehr.pushes(busy_uid), what="the push after two 503s")
    assert [r["status"] for r in ehr.attempts(busy_uid)] == [503, 503, 201]
    ehr.fail_status, ehr.fail_count, ehr.retry_after = 429, 1, "1"
    slow_uid, samples = study("throttled")
    store(gw, samples)
    ehr.wait_for(lambda: ehr.pushes(slow_uid), what="the push after a 429")
    first, second = ehr.attempts(slow_uid)
    assert first["status"] == 429 and second["at"] - first["at"] >= 0.9, "Retry-After honoured"
    assert status(gw)["outbox"]["pending"] == 0


def test_a_refused_study_is_parked_and_reported(gateway_factory, ehr):
    gw = gateway_factory(env=push_env(ehr))
    ehr.fail_status = 400
    uid, samples = study("refused")
    store(gw, samples)
    ehr.wait_for(lambda: ehr.attempts(uid), what="the attempt")
    time.sleep(2.0)
    assert len(ehr.attempts(uid)) == 1, "a 400 is not retried"
    s = status(gw)
    assert s["outbox"]["parked"] == 1 and s["outbox"]["pending"] == 0
    assert s["outbox"]["parked_studies"][0]["study_uid"] == uid
    assert "400" in s["outbox"]["parked_studies"][0]["error"]
    assert "study parked" in gw.log_text()
    # A later change unparks it.
    ehr.fail_status = None
    _, more = study("refused", series_base=1)
    store(gw, more)
    ehr.wait_for(lambda: ehr.pushes(uid), what="the push after the change")
    assert ehr.study(uid)["numberOfInstances"] == 2
    assert status(gw)["outbox"]["parked"] == 0


def test_bearer_token(gateway_factory):
    ehr = EhrServer(token_required="Bearer s3cret").start()
    try:
        gw = gateway_factory(env=push_env(ehr, DICOMGW_FHIR__PUSH__AUTH__KIND="bearer",
                                          DICOMGW_FHIR__PUSH__AUTH__TOKEN="s3cret"))
        uid, samples = study("bearer")
        store(gw, samples)
        ehr.wait_for(lambda: ehr.pushes(uid), what="the authenticated push")
    finally:
        ehr.stop()


def test_client_credentials_with_a_secret_refreshes_tokens_before_they_expire(gateway_factory):
    ehr = EhrServer(token_required="oauth").start()
    ehr.token_lifetime = 3
    try:
        gw = gateway_factory(env=push_env(
            ehr, DICOMGW_FHIR__PUSH__AUTH__KIND="client_credentials",
            DICOMGW_FHIR__PUSH__AUTH__TOKEN_URL=ehr.token_url, DICOMGW_FHIR__PUSH__AUTH__CLIENT_ID="gateway",
            DICOMGW_FHIR__PUSH__AUTH__CLIENT_SECRET="pw", DICOMGW_FHIR__PUSH__AUTH__REFRESH_BEFORE_SECS="2"))
        uid, samples = study("oauth-1")
        store(gw, samples)
        ehr.wait_for(lambda: ehr.pushes(uid), what="the first push")
        time.sleep(1.5)  # the token has 1.5 s left: less than refresh_before_secs
        uid2, samples = study("oauth-2")
        store(gw, samples)
        ehr.wait_for(lambda: ehr.pushes(uid2), what="the second push")
        assert len(ehr.token_requests) == 2
        for t in ehr.token_requests:
            assert t["headers"]["authorization"] == basic_auth("gateway", "pw")
            assert t["form"]["grant_type"] == ["client_credentials"]
        assert ehr.pushes(uid2)[0]["headers"]["authorization"] == "Bearer tok-2"
    finally:
        ehr.stop()


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_client_credentials_with_a_private_key_jwt(gateway_factory, tmp_path):
    key, pub = tmp_path / "key.pem", tmp_path / "pub.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                    "-out", str(key)], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True,
                   capture_output=True)
    ehr = EhrServer(token_required="oauth").start()
    try:
        gw = gateway_factory(env=push_env(
            ehr, DICOMGW_FHIR__PUSH__AUTH__KIND="client_credentials",
            DICOMGW_FHIR__PUSH__AUTH__TOKEN_URL=ehr.token_url, DICOMGW_FHIR__PUSH__AUTH__CLIENT_ID="gateway",
            DICOMGW_FHIR__PUSH__AUTH__PRIVATE_KEY_PATH=str(key), DICOMGW_FHIR__PUSH__AUTH__JWT_KID="k1"))
        uid, samples = study("jwt")
        store(gw, samples)
        ehr.wait_for(lambda: ehr.pushes(uid), what="the push")
        form = ehr.token_requests[0]["form"]
        assert form["client_assertion_type"] == ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"]
        header_b64, claims_b64, sig_b64 = form["client_assertion"][0].split(".")
        header, claims = json.loads(b64url_decode(header_b64)), json.loads(b64url_decode(claims_b64))
        assert header == {"typ": "JWT", "alg": "RS384", "kid": "k1"}
        assert claims["iss"] == claims["sub"] == "gateway" and claims["aud"] == ehr.token_url
        assert claims["exp"] - time.time() <= 300 and claims["jti"]
        # The signature verifies with the public key (openssl, independent of the gateway's JWT library).
        (tmp_path / "signed").write_bytes(f"{header_b64}.{claims_b64}".encode())
        (tmp_path / "sig").write_bytes(b64url_decode(sig_b64))
        subprocess.run(["openssl", "dgst", "-sha384", "-verify", str(pub), "-signature", str(tmp_path / "sig"),
                        str(tmp_path / "signed")], check=True, capture_output=True)
    finally:
        ehr.stop()


def test_subject_resolved_on_the_external_server(gateway_factory, ehr):
    ehr.patients["urn:dicom:patient-id|EXT-1"] = "pat-123"
    gw = gateway_factory(env=push_env(ehr, DICOMGW_FHIR__SUBJECT="external"))
    uid, samples = study("external", PatientID="EXT-1")
    store(gw, samples)
    ehr.wait_for(lambda: ehr.study(uid), what="the push")
    assert ehr.study(uid)["subject"]["reference"] == "Patient/pat-123"
    served = requests.get(f"{gw.http_root}/fhir/ImagingStudy/{uid}", timeout=10).json()
    assert served["subject"]["reference"] == f"{ehr.url}/Patient/pat-123"
    # Unknown on the server, or the server gone: the identifier alone.
    uid2, samples = study("external-2", PatientID="EXT-2")
    store(gw, samples)
    ehr.wait_for(lambda: ehr.study(uid2), what="the push")
    assert "reference" not in ehr.study(uid2)["subject"]
    assert ehr.study(uid2)["subject"]["identifier"] == {"system": "urn:dicom:patient-id", "value": "EXT-2"}
    assert study_key(uid2) in ehr.studies
