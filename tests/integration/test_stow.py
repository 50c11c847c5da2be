"""STOW-RS: instances stored over DICOMweb go through the path C-STORE takes (same checks, durability, duplicate
rule), with the Store Instances Response of PS3.18 10.5.3 and the HTTP statuses of its Table 10.5.3-1."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
import requests
from pydicom.dataset import Dataset

from conftest import BACKENDS, backend_env
from gw_qr import CT_IMAGE, findscu, instance, peers_env
from gw_samples import by_ts, file_meta_bytes, from_dataset, small_ct, unique_corpus
from gw_s3 import stored_keys
from gw_web import client, text, value, values

HTTP_TIMEOUT = 60
DICOM_JSON = "application/dicom+json"


@pytest.fixture(scope="module")
def gateway_env():
    return peers_env("FINDSCU")


def study(n: str) -> dict:
    return {"uid": new_uid(), "PatientID": f"STOW{n}", "PatientName": "Stow^Test",
            "StudyDate": "20240102"}


def new_uid() -> str:
    """A short UID (2.25 + 20 digits), so that series and instance UIDs can extend it."""
    return f"2.25.{uuid.uuid4().int % 10**20}"


def series(st: dict, n: int = 1) -> dict:
    return {"uid": f"{st['uid']}.{n}", "Modality": "CT", "sop_class": CT_IMAGE}


def body(parts: list[bytes], boundary: str = "stowboundary", preamble: bytes = b"", epilogue: bytes = b"",
         close: bool = True) -> bytes:
    out = preamble
    for p in parts:
        out += b"\r\n--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p
    if close:
        out += b"\r\n--" + boundary.encode() + b"--"
    return out + epilogue


def post(gw, data, path: str = "/studies", content_type: str | None = None, **kw) -> requests.Response:
    ctype = content_type or 'multipart/related; type="application/dicom"; boundary=stowboundary'
    return requests.post(gw.base_url + path, data=data, headers={"Content-Type": ctype, "Accept": DICOM_JSON},
                         timeout=HTTP_TIMEOUT, **kw)


def referenced(resp: requests.Response) -> list[dict]:
    return values(resp.json(), "ReferencedSOPSequence") or []


def failures(resp: requests.Response) -> list[dict]:
    return values(resp.json(), "FailedSOPSequence") or []


def not_storage(sop_uid: str) -> bytes:
    """A readable Part-10 file whose SOP class (Verification) is not a Storage SOP class."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.1.1"
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = new_uid()
    ds.SeriesInstanceUID = new_uid()
    return from_dataset(ds, "1.2.840.10008.1.2.1", "not-storage").part10()


def indexed(gw, sop_uid: str) -> bool:
    return bool(client(gw).search_for_instances(search_filters={"SOPInstanceUID": sop_uid}))


def leftover_spool(gw) -> list:
    """Spool files holding bytes (the empty ones are created ahead of need)."""
    return [p for p in gw.data_files() if p.suffix == ".part"]


# -- storing, and finding what was stored -----------------------------------------------------------------
def test_dicomweb_client_stores_instances_found_by_qido_wado_and_cfind(gateway, tmp_path):
    st = study("a")
    se = series(st)
    samples = [instance(st, se, n, pixels=64) for n in range(1, 4)]
    c = client(gateway)
    answer = c.store_instances([s.ds for s in samples])  # the response, read into a pydicom Dataset
    refs = answer.ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in refs] == [s.sop_uid for s in samples]
    assert "FailedSOPSequence" not in answer
    assert answer.RetrieveURL == f"{gateway.base_url}/studies/{st['uid']}"
    for s, r in zip(samples, refs):
        assert r.ReferencedSOPClassUID == CT_IMAGE
        url = r.RetrieveURL
        assert url == f"{gateway.base_url}/studies/{st['uid']}/series/{se['uid']}/instances/{s.sop_uid}"
        # The RetrieveURL serves the instance.
        resp = requests.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'},
                            timeout=HTTP_TIMEOUT)
        assert resp.status_code == 200
    found = c.search_for_instances(search_filters={"StudyInstanceUID": st["uid"]})
    assert sorted(text(f, "SOPInstanceUID") for f in found) == sorted(s.sop_uid for s in samples)
    for s in samples:
        got = c.retrieve_instance(st["uid"], se["uid"], s.sop_uid)
        assert got.PixelData == s.ds.PixelData
        assert got.PatientID == st["PatientID"]
    proc, responses = findscu(gateway, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={st['uid']}",
                                        f"SeriesInstanceUID={se['uid']}", "SOPInstanceUID"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(r.SOPInstanceUID for r in responses) == sorted(s.sop_uid for s in samples)
    # Each stored part's audit event committed with its index row (docs/security.md, "Audit").
    for study_uid in {s.study_uid for s in samples}:
        resp = requests.get(f"{gateway.http_root}/fhir/AuditEvent", params={"entity": study_uid, "_count": "100"},
                            timeout=30)
        stored = [e["resource"] for e in resp.json().get("entry", []) if e["resource"]["type"]["code"] == "110104"]
        assert {e["source"]["site"] for e in stored} >= {"DICOMweb"}, stored


def test_stored_objects_are_kept_byte_for_byte_whatever_the_transfer_syntax(gateway):
    """Compressed and native samples of the corpus, one request: each is retrieved as sent."""
    corpus = unique_corpus()
    picks = []
    for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80",
               "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99"):
        found = by_ts(corpus, lambda t, ts=ts: t == ts)
        if found:
            picks.append(found[0])
    assert len(picks) >= 4
    resp = post(gateway, body([s.part10() for s in picks]))
    assert resp.status_code == 200, resp.text
    assert [text(r, "ReferencedSOPInstanceUID") for r in referenced(resp)] == [s.sop_uid for s in picks]
    for s in picks:
        url = f"{gateway.base_url}/studies/{s.study_uid}/series/{s.series_uid}/instances/{s.sop_uid}"
        got = requests.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                           timeout=HTTP_TIMEOUT)
        assert got.status_code == 200
        if s.ts not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"):  # re-encoded for the web (WADO-RS)
            assert s.part10() in got.content, s.name


@pytest.mark.parametrize("ctype", [
    'multipart/related; type="application/dicom"; boundary="stowboundary"',
    "multipart/related; type=application/dicom; boundary=stowboundary",
    "Multipart/Related; Boundary=stowboundary",
])
def test_boundary_and_type_are_read_quoted_unquoted_or_missing(gateway, ctype):
    s = small_ct()
    resp = post(gateway, body([s.part10()], preamble=b"preamble to ignore",
                              epilogue=b"\r\nepilogue to ignore"), content_type=ctype)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith(DICOM_JSON)
    assert [text(r, "ReferencedSOPInstanceUID") for r in referenced(resp)] == [s.sop_uid]


def test_streamed_chunked_request_is_stored(gateway):
    """A body sent with chunked transfer coding in small pieces (no Content-Length)."""
    samples = [small_ct() for _ in range(5)]
    data = body([s.part10() for s in samples])
    resp = post(gateway, (data[i:i + 777] for i in range(0, len(data), 777)))
    assert resp.status_code == 200, resp.text
    assert len(referenced(resp)) == 5
    assert all(indexed(gateway, s.sop_uid) for s in samples)


# -- refusals -----------------------------------------------------------------------------------------------
def test_mixed_good_and_bad_parts_give_202_with_failure_reasons(gateway):
    good = small_ct()
    no_class = new_uid()
    truncated = small_ct()
    parts = [good.part10(), b"this is not DICOM at all" * 10, not_storage(no_class), truncated.part10()[:-5000]]
    resp = post(gateway, body(parts))
    assert resp.status_code == 202, resp.text
    assert [text(r, "ReferencedSOPInstanceUID") for r in referenced(resp)] == [good.sop_uid]
    reasons = {text(f, "ReferencedSOPInstanceUID"): value(f, "FailureReason") for f in failures(resp)}
    assert reasons == {"": 0xC000, no_class: 0x0122, truncated.sop_uid: 0xC000}
    assert resp.headers.get("Warning", "").startswith("299 ")
    assert indexed(gateway, good.sop_uid)
    assert not indexed(gateway, truncated.sop_uid)
    assert not gateway.files_mentioning(truncated.sop_uid)
    assert "STOW-RS part refused" in gateway.log_text()


def test_instance_of_another_study_than_the_url_names_is_refused(gateway):
    st = study("w")
    s = instance(st, series(st), 1)
    other = new_uid()
    resp = post(gateway, body([s.part10()]), path=f"/studies/{other}")
    assert resp.status_code == 409, resp.text
    [failure] = failures(resp)
    assert text(failure, "ReferencedSOPInstanceUID") == s.sop_uid
    assert value(failure, "FailureReason") == 0xA900
    assert not referenced(resp)
    assert not indexed(gateway, s.sop_uid)
    # The same instance posted to its own study's URL is stored.
    resp = post(gateway, body([s.part10()]), path=f"/studies/{st['uid']}")
    assert resp.status_code == 200, resp.text
    assert text(resp.json(), "RetrieveURL") == f"{gateway.base_url}/studies/{st['uid']}"


def test_meta_that_disagrees_with_the_data_set_is_refused(gateway):
    s = small_ct()
    lying = file_meta_bytes(s.sop_class, s.sop_uid + ".9", s.ts) + s.payload
    resp = post(gateway, body([lying]))
    assert resp.status_code == 409
    assert value(failures(resp)[0], "FailureReason") == 0xA900


@pytest.mark.parametrize("ctype,status,words", [
    ("application/dicom", 415, "multipart/related"),
    ('multipart/related; type="application/dicom+json"; boundary=stowboundary', 415, "not supported"),
    ('multipart/related; type="application/octet-stream"; boundary=stowboundary', 415, "not supported"),
    ('multipart/related; type="application/dicom"', 400, "boundary"),
])
def test_unsupported_media_types_and_missing_boundary(gateway, ctype, status, words):
    resp = post(gateway, body([small_ct().part10()]), content_type=ctype)
    assert resp.status_code == status
    assert words in resp.text


@pytest.mark.parametrize("data,words", [
    (b"no delimiter anywhere", "no multipart boundary"),
    (b"--stowboundary--", "no part"),
    (b"--stowboundary\r\nContent-Type: application/dicom\r\nX: " + b"a" * 20000 + b"\r\n\r\nx\r\n--stowboundary--",
     "header section"),
])
def test_malformed_multipart_bodies_get_400(gateway, data, words):
    resp = post(gateway, data)
    assert resp.status_code == 400
    assert words in resp.text


def test_body_without_close_delimiter_gets_400_and_stores_only_whole_parts(gateway):
    whole, cut = small_ct(), small_ct()
    data = body([whole.part10()], close=False) + body([cut.part10()[:20000]], close=False)
    resp = post(gateway, (data[i:i + 4096] for i in range(0, len(data), 4096)))
    assert resp.status_code == 400
    assert "closing boundary" in resp.text and "1 instance(s)" in resp.text
    assert indexed(gateway, whole.sop_uid)
    assert not indexed(gateway, cut.sop_uid)
    assert not gateway.files_mentioning(cut.sop_uid)
    assert not leftover_spool(gateway)


def test_connection_dropped_mid_part_leaves_nothing_of_that_part(gateway):
    whole, cut = small_ct(), small_ct()
    data = body([whole.part10(), cut.part10()])
    half = data.index(cut.part10()) + 10000
    with socket.create_connection((gateway.host, gateway.http_port)) as sock:
        sock.sendall(("POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\n"
                      'Content-Type: multipart/related; type="application/dicom"; boundary=stowboundary\r\n'
                      f"Content-Length: {len(data)}\r\n\r\n").encode() + data[:half])
        time.sleep(0.5)
    deadline = time.time() + 10
    while time.time() < deadline and not indexed(gateway, whole.sop_uid):
        time.sleep(0.1)
    assert indexed(gateway, whole.sop_uid)
    time.sleep(0.3)
    assert not indexed(gateway, cut.sop_uid)
    assert not gateway.files_mentioning(cut.sop_uid)
    assert not leftover_spool(gateway)
    assert requests.get(gateway.http_root + "/readyz", timeout=5).status_code == 200


def test_limits_give_413_for_the_request_and_a700_for_an_instance(gateway_factory):
    gw = gateway_factory(env={"DICOMGW_HTTP__MAX_STOW_SIZE": "300000", "DICOMGW_DIMSE__MAX_OBJECT_SIZE": "100000"})
    small = small_ct()
    big_study = study("big")
    big_part = instance(big_study, series(big_study), 1, pixels=250).part10()  # 125 kB of pixel data
    resp = post(gw, body([small.part10(), big_part]))
    assert resp.status_code == 202, resp.text
    assert value(failures(resp)[0], "FailureReason") == 0xA700
    assert [text(r, "ReferencedSOPInstanceUID") for r in referenced(resp)] == [small.sop_uid]
    over = body([small_ct().part10() for _ in range(10)])
    assert len(over) > 300000
    resp = post(gw, over)
    assert resp.status_code == 413
    # Without a Content-Length, the limit is found while reading.
    resp = post(gw, (over[i:i + 50000] for i in range(0, len(over), 50000)))
    assert resp.status_code == 413
    assert not leftover_spool(gw)


# -- duplicates --------------------------------------------------------------------------------------------
def test_duplicate_keeps_the_first_copy_with_a_warning(gateway):
    st = study("d")
    se = series(st)
    first = instance(st, se, 1, attrs={"ImageComments": "first"})
    second = instance(st, se, 1, attrs={"ImageComments": "second"})
    assert first.sop_uid == second.sop_uid
    assert post(gateway, body([first.part10()])).status_code == 200
    resp = post(gateway, body([second.part10()]))
    assert resp.status_code == 202, resp.text
    [ref] = referenced(resp)
    assert value(ref, "WarningReason") == 0xB000
    got = client(gateway).retrieve_instance(st["uid"], se["uid"], first.sop_uid)
    assert got.ImageComments == "first"


def test_duplicate_replaces_when_configured(gateway_factory):
    gw = gateway_factory(env={"DICOMGW_DIMSE__ON_DUPLICATE": "replace"})
    st = study("r")
    se = series(st)
    first = instance(st, se, 1, attrs={"ImageComments": "first"})
    second = instance(st, se, 1, attrs={"ImageComments": "second"})
    assert post(gw, body([first.part10()])).status_code == 200
    resp = post(gw, body([second.part10()]))
    assert resp.status_code == 200, resp.text
    assert not values(referenced(resp)[0], "WarningReason")
    got = client(gw).retrieve_instance(st["uid"], se["uid"], first.sop_uid)
    assert got.ImageComments == "second"


# -- both storage backends ---------------------------------------------------------------------------------
@pytest.fixture(params=BACKENDS)
def backend_gateway(request, gateway_factory):
    return gateway_factory(env=backend_env(request))


def test_instances_of_every_size_are_stored_on_each_backend(backend_gateway):
    """Objects below, across and well above ingest's 256 KB buffer and 1 MB in-memory limit, in one request, on
    the filesystem and on S3 (Garage); then a request cut inside a part adds no object."""
    gw = backend_gateway
    st = study("b")
    se = series(st)
    samples = [instance(st, se, n, pixels=px) for n, px in enumerate((16, 400, 800, 1300), start=1)]
    resp = post(gw, body([s.part10() for s in samples]))
    assert resp.status_code == 200, resp.text
    assert [text(r, "ReferencedSOPInstanceUID") for r in referenced(resp)] == [s.sop_uid for s in samples]
    c = client(gw)
    for s in samples:
        assert c.retrieve_instance(st["uid"], se["uid"], s.sop_uid).PixelData == s.ds.PixelData
    keys = stored_keys(gw)
    assert len(keys) == len(samples)
    cut = instance(st, se, 9, pixels=900)
    data = body([cut.part10()], close=False)[:-1000]
    resp = post(gw, (data[i:i + 65536] for i in range(0, len(data), 65536)))
    assert resp.status_code == 400
    assert stored_keys(gw) == keys
    assert not indexed(gw, cut.sop_uid)


# -- size ---------------------------------------------------------------------------------------------------
def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_one_gigabyte_request_is_stored_with_bounded_memory(fresh_gateway):
    """64 instances of 16 MB in one request, streamed by the client: every one stored, and the gateway's
    peak resident memory stays far below the request's size."""
    gw = fresh_gateway
    st = study("big")
    se = series(st)
    pixels = bytes(range(256)) * (16 * 1024 * 1024 // 256)
    template = instance(st, se, 1, pixels=8)
    count = 64
    sop_uids = [f"{se['uid']}.{n}" for n in range(1, count + 1)]

    def parts():
        for n, sop in enumerate(sop_uids, start=1):
            ds = template.ds.copy()
            ds.SOPInstanceUID = sop
            ds.InstanceNumber = n
            ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 4096, 2048, 16, 16, 15
            ds.PixelData = pixels
            s = from_dataset(ds, template.ts, f"big-{n}")
            yield b"\r\n--stowboundary\r\nContent-Type: application/dicom\r\n\r\n"
            data = s.part10()
            for i in range(0, len(data), 1 << 20):
                yield data[i:i + (1 << 20)]
        yield b"\r\n--stowboundary--"

    before = vm_hwm_kib(gw.proc.pid)
    started = time.time()
    resp = post(gw, parts())
    elapsed = time.time() - started
    assert resp.status_code == 200, resp.text[:2000]
    assert [text(r, "ReferencedSOPInstanceUID") for r in referenced(resp)] == sop_uids
    peak = vm_hwm_kib(gw.proc.pid)
    print(f"1 GiB STOW-RS: {elapsed:.1f} s, VmHWM {before} KiB before, {peak} KiB after")
    assert peak < 100 * 1024, f"peak RSS {peak} KiB for a 1 GiB request"
    found = client(gw).search_for_instances(search_filters={"StudyInstanceUID": st["uid"]}, get_remaining=True)
    assert len(found) == count
