"""Authentication of HTTP callers ([auth]): bearer JWTs (RS256 / ES256, JWKS over HTTP with key rotation),
API keys, HTTP basic against a users file, scopes and SMART scopes. Without valid credentials every
DICOMweb, WADO-URI, viewer-data and FHIR request gets 401 with a Bearer challenge; with credentials whose
scopes lack the action, 403. Health, the browser page and the viewer's files stay open."""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from gw_auth import AUDIENCE, ISSUER, JwksServer, SigningKey, bearer, sha256_hex, unsigned_token
from gw_harness import binary_path
from gw_samples import small_ct

TIMEOUT = 30
ADMIN_KEY = "admin-" + uuid.uuid4().hex
READER_KEY = "reader-" + uuid.uuid4().hex
EXPIRED_KEY = "expired-" + uuid.uuid4().hex
PASSWORD = "correct horse battery staple"
MIN_REFETCH_SECS = 2

RSA = SigningKey("RS256", "rsa-1")
EC = SigningKey("ES256", "ec-1")
ROTATED = SigningKey("RS256", "rsa-2")  # published only once the test rotates the keys


@pytest.fixture(scope="module")
def jwks():
    server = JwksServer([RSA, EC])
    yield server
    server.close()


@pytest.fixture(scope="module")
def users_file(tmp_path_factory):
    """A users file made with `dicom-gateway hash-password`, as an operator would."""
    made = subprocess.run([str(binary_path()), "hash-password"], input=PASSWORD + "\n", capture_output=True,
                          text=True, timeout=60, check=True)
    hash_ = made.stdout.strip()
    assert hash_.startswith("$pbkdf2-sha256$600000$")
    path = tmp_path_factory.mktemp("users") / "users"
    path.write_text(f"# user:hash:scopes\nbob:{hash_}:search read\n")
    return path


@pytest.fixture(scope="module")
def gateway_env(jwks, users_file):
    keys = ", ".join([
        f'{{name = "admin", sha256 = "{sha256_hex(ADMIN_KEY)}", scopes = ["read", "search", "store", "delete", "admin"]}}',
        f'{{name = "reader", sha256 = "{sha256_hex(READER_KEY)}", scopes = ["search"]}}',
        f'{{name = "old", sha256 = "{sha256_hex(EXPIRED_KEY)}", scopes = ["read"], expires = "2020-01-01T00:00:00Z"}}',
    ])
    return {
        "DICOMGW_AUTH__JWKS": jwks.url,
        "DICOMGW_AUTH__ISSUER": ISSUER,
        "DICOMGW_AUTH__AUDIENCE": AUDIENCE,
        "DICOMGW_AUTH__CLOCK_SKEW_SECS": "30",
        "DICOMGW_AUTH__JWKS_MIN_REFETCH_SECS": str(MIN_REFETCH_SECS),
        "DICOMGW_AUTH__USERS_FILE": str(users_file),
        "DICOMGW_AUTH__API_KEYS": f"[{keys}]",
        "DICOMGW_HTTP__ALLOW_DELETE": "true",
    }


@pytest.fixture(scope="module")
def study(gateway):
    """One stored instance (STOW-RS with the admin API key)."""
    sample = small_ct()
    client = DICOMwebClient(url=gateway.base_url, headers={"X-API-Key": ADMIN_KEY})
    client.set_http_retry_params(retry=False)
    client.store_instances([sample.ds])
    return sample


def get(gw, path: str, headers=None) -> requests.Response:
    return requests.get(gw.http_root + path, headers=headers or {}, timeout=TIMEOUT)


def data_paths(sample) -> list[str]:
    """One request of each kind that returns patient data."""
    st, se, sop = sample.study_uid, sample.series_uid, sample.sop_uid
    return [
        "/dicomweb/studies",
        f"/dicomweb/studies/{st}/series",
        f"/dicomweb/studies/{st}/metadata",
        f"/dicomweb/studies/{st}/series/{se}/instances/{sop}",
        f"/dicomweb/studies/{st}/series/{se}/instances/{sop}/frames/1",
        f"/dicomweb/studies/{st}/thumbnail",
        f"/wado?requestType=WADO&studyUID={st}&seriesUID={se}&objectUID={sop}&contentType=application/dicom",
        f"/download/studies/{st}",
        "/fhir/ImagingStudy",
        "/fhir/Patient",
    ]


def challenge(response: requests.Response) -> str:
    return response.headers.get("WWW-Authenticate", "")


def test_every_data_endpoint_needs_credentials(gateway, study):
    for path in data_paths(study):
        r = get(gateway, path)
        assert r.status_code == 401, path
        assert challenge(r).startswith('Bearer realm="dicom-gateway"'), (path, challenge(r))
        assert study.study_uid not in r.text


def test_health_browser_and_capability_stay_open(gateway):
    for path in ["/healthz", "/readyz", "/", "/fhir/metadata"]:
        assert get(gateway, path).status_code == 200, path


@pytest.mark.parametrize("key", [RSA, EC], ids=["RS256", "ES256"])
def test_valid_token_reads_everything_its_scopes_allow(gateway, study, key):
    headers = bearer(key.token(scope="read search"))
    for path in data_paths(study):
        r = get(gateway, path, headers)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
    found = requests.get(gateway.base_url + "/studies", headers=headers, timeout=TIMEOUT).json()
    assert study.study_uid in str(found)


@pytest.mark.parametrize("token,error", [
    (RSA.token(exp=int(time.time()) - 120), "expired"),
    (RSA.token(nbf=int(time.time()) + 600), "not valid yet"),
    (RSA.token(aud="someone-else"), "audience"),
    (RSA.token(iss="https://evil.example"), "issuer"),
    (RSA.token(header={"kid": "rsa-1"}, sub="x") [:-8] + "AAAAAAAA", "signature"),
    (EC.token(header={"kid": "rsa-1"}), "no key"),  # an ES256 token naming an RSA key
    (unsigned_token("none"), "algorithm"),
    (unsigned_token("HS256", signature=b"\x00" * 32), "algorithm"),
    ("not-a-jwt", "malformed"),
], ids=["expired", "nbf", "audience", "issuer", "signature", "key-type", "alg-none", "hs256", "garbage"])
def test_invalid_tokens_get_401_invalid_token(gateway, study, token, error):
    r = get(gateway, "/dicomweb/studies", bearer(token))
    assert r.status_code == 401
    assert 'error="invalid_token"' in challenge(r)
    assert error in challenge(r).lower()


def test_expiry_within_clock_skew_is_accepted(gateway, study):
    token = EC.token(exp=int(time.time()) - 10)  # skew is 30 s
    assert get(gateway, "/dicomweb/studies", bearer(token)).status_code == 200


def test_token_signed_by_another_key_with_a_known_kid_is_refused(gateway, study):
    impostor = SigningKey("RS256", "rsa-1")
    r = get(gateway, "/dicomweb/studies", bearer(impostor.token()))
    assert r.status_code == 401 and "signature" in challenge(r)


def test_missing_scope_gets_403_insufficient_scope(gateway, study):
    search_only = bearer(RSA.token(scope="search"))
    assert get(gateway, "/dicomweb/studies", search_only).status_code == 200
    r = get(gateway, f"/dicomweb/studies/{study.study_uid}/metadata", search_only)
    assert r.status_code == 403
    assert 'error="insufficient_scope"' in challenge(r) and 'scope="read"' in challenge(r)
    # STOW-RS and DELETE need store and delete.
    client = DICOMwebClient(url=gateway.base_url, headers=bearer(RSA.token(scope="read search")))
    client.set_http_retry_params(retry=False)
    with pytest.raises(requests.HTTPError) as refused:
        client.store_instances([small_ct().ds])
    assert refused.value.response.status_code == 403
    r = requests.delete(f"{gateway.base_url}/studies/{study.study_uid}", headers=search_only, timeout=TIMEOUT)
    assert r.status_code == 403
    assert get(gateway, "/fhir-push/status", bearer(RSA.token(scope="read search"))).status_code == 403


def test_store_scope_stores(gateway):
    sample = small_ct()
    client = DICOMwebClient(url=gateway.base_url, headers=bearer(EC.token(scope="store")))
    client.set_http_retry_params(retry=False)
    client.store_instances([sample.ds])
    r = get(gateway, f"/dicomweb/studies?StudyInstanceUID={sample.study_uid}", bearer(EC.token()))
    assert r.status_code == 200 and sample.study_uid in r.text


def test_key_rotation_refetches_the_jwks_rate_limited(gateway, study, jwks):
    assert get(gateway, "/dicomweb/studies", bearer(RSA.token())).status_code == 200
    time.sleep(MIN_REFETCH_SECS + 0.5)
    jwks.keys.append(ROTATED)  # the provider publishes a new key and signs with it
    before = jwks.fetches
    assert get(gateway, "/dicomweb/studies", bearer(ROTATED.token())).status_code == 200
    assert jwks.fetches == before + 1
    # Unknown key ids do not make the gateway fetch again within the minimum interval.
    for i in range(5):
        stranger = SigningKey("ES256", f"unknown-{i}")
        r = get(gateway, "/dicomweb/studies", bearer(stranger.token()))
        assert r.status_code == 401 and "no key" in challenge(r)
    assert jwks.fetches == before + 1
    # A key withdrawn from the JWKS stops working after the next refetch.
    jwks.keys.remove(ROTATED)
    time.sleep(MIN_REFETCH_SECS + 0.5)
    assert get(gateway, "/dicomweb/studies", bearer(SigningKey("ES256", "x").token())).status_code == 401
    assert get(gateway, "/dicomweb/studies", bearer(ROTATED.token())).status_code == 401


def test_api_key_in_either_header(gateway, study):
    for headers in ({"Authorization": f"ApiKey {ADMIN_KEY}"}, {"X-API-Key": ADMIN_KEY}):
        assert get(gateway, f"/dicomweb/studies/{study.study_uid}/metadata", headers).status_code == 200
    assert get(gateway, "/dicomweb/studies", {"X-API-Key": READER_KEY}).status_code == 200
    assert get(gateway, f"/dicomweb/studies/{study.study_uid}/metadata", {"X-API-Key": READER_KEY}).status_code == 403
    for wrong in ("no-such-key", EXPIRED_KEY):
        r = get(gateway, "/dicomweb/studies", {"X-API-Key": wrong})
        assert r.status_code == 401 and 'error="invalid_token"' in challenge(r)


def test_basic_auth_against_the_users_file(gateway, study):
    auth = ("bob", PASSWORD)
    r = requests.get(gateway.base_url + "/studies", auth=auth, timeout=TIMEOUT)
    assert r.status_code == 200 and study.study_uid in r.text
    r = requests.get(gateway.base_url + "/studies", auth=("bob", "wrong"), timeout=TIMEOUT)
    assert r.status_code == 401
    assert 'Basic realm="dicom-gateway"' in challenge(r)
    r = requests.get(gateway.base_url + "/studies", timeout=TIMEOUT)
    assert 'Basic realm="dicom-gateway"' in challenge(r)


def test_smart_scopes_on_fhir(gateway, study):
    imaging_only = bearer(RSA.token(scope="patient/ImagingStudy.read"))
    r = get(gateway, "/fhir/ImagingStudy", imaging_only)
    assert r.status_code == 200 and r.json()["resourceType"] == "Bundle"
    assert get(gateway, "/fhir/Patient", imaging_only).status_code == 403
    assert get(gateway, "/dicomweb/studies", imaging_only).status_code == 403
    everything = bearer(RSA.token(scope="user/*.rs"))
    for path in ("/fhir/ImagingStudy", "/fhir/Patient", "/dicomweb/studies"):
        assert get(gateway, path, everything).status_code == 200, path
    system = bearer(EC.token(scope="system/*.*"))
    assert get(gateway, "/fhir/Endpoint", system).status_code == 200
    # fhirclient, as a SMART app would use it, with the token.
    from fhirclient import client as fhir_client
    from fhirclient.models.imagingstudy import ImagingStudy

    smart = fhir_client.FHIRClient(settings={"app_id": "test", "api_base": gateway.http_root + "/fhir/"})
    smart.server.session.headers.update(imaging_only)
    bundle = ImagingStudy.where(struct={}).perform(smart.server)
    assert bundle.entry, "the stored study is found"
