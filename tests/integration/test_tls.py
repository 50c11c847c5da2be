"""Transport security: DICOM TLS (PS3.15 B.9 / B.11) and HTTPS, against real peers, with a CA, server and
client certificates minted here by `openssl` (plus an expired one and one from another CA).

- DCMTK echoscu / storescu / findscu with `+tls`, pynetdicom with an `ssl.SSLContext`; the client
  certificate's subject is the peer's identity, and a `[[dimse.peers]]` entry can pin it;
- movescu (which has no TLS option in DCMTK 3.6.7) to a move destination served by DCMTK `storescp +tls`
  (the gateway connects over TLS);
- a wrong CA, an expired certificate and plain text on the TLS port are refused quickly, and the listener
  goes on serving;
- HTTPS with curl (HTTP/2 by ALPN, and HTTP/1.1) and dicomweb-client;
- certificates reloaded by SIGHUP and when the files change (the served serial number changes), a bad file
  keeping the previous certificate;
- secure by default: the embedded defaults bind 127.0.0.1, and HTTP on another address without
  authentication or allow_anonymous does not start.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import CTImageStorage, Verification

from gw_dimse import dcmtk_env, make_ae
from gw_harness import Gateway, binary_path, free_port
from gw_qr import storescp
from gw_samples import small_ct

CLIENT_SUBJECT = "CN=modality1,O=Test Hospital"
DEST = "TLSDEST"


# -- certificates -----------------------------------------------------------------------------------------
def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d)


def make_cert(d: Path, name: str, subject: str, ca: str, serial: int, server: bool = False) -> None:
    """`name.key` and `name.pem` signed by `ca`; a server certificate names localhost / 127.0.0.1 and may
    also act as a client (the gateway presents it to move destinations)."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", subject, cwd=d)
    ext = ["basicConstraints=CA:FALSE"]
    if server:
        ext += ["subjectAltName=DNS:localhost,IP:127.0.0.1", "extendedKeyUsage=serverAuth,clientAuth"]
    else:
        ext += ["extendedKeyUsage=clientAuth"]
    (d / f"{name}.ext").write_text("\n".join(ext) + "\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-set_serial", str(serial), "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)


def make_expired_cert(d: Path, name: str, subject: str, ca: str) -> None:
    """A client certificate whose validity ended in 2021 (`openssl ca` takes explicit dates)."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", subject, cwd=d)
    (d / "index.txt").write_text("")
    (d / "ca.cnf").write_text(
        "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n"
        f"certificate = {ca}.pem\nprivate_key = {ca}.key\ndefault_md = sha256\npolicy = any\n"
        "unique_subject = no\nx509_extensions = client_ext\n[any]\ncommonName = supplied\n"
        "organizationName = optional\n[client_ext]\nbasicConstraints = CA:FALSE\nextendedKeyUsage = clientAuth\n"
    )
    (d / "serial").write_text("7777\n")
    openssl("ca", "-batch", "-config", "ca.cnf", "-in", f"{name}.csr", "-out", f"{name}.pem", "-notext",
            "-startdate", "20200101000000Z", "-enddate", "20210101000000Z", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "otherca")
    make_cert(d, "server", "/CN=localhost", "ca", 0x1001, server=True)
    make_cert(d, "server2", "/CN=localhost", "ca", 0x2002, server=True)
    make_cert(d, "client", "/O=Test Hospital/CN=modality1", "ca", 0x3003)
    make_cert(d, "intruder", "/O=Test Hospital/CN=intruder", "ca", 0x3004)
    make_cert(d, "stranger", "/CN=modality1", "otherca", 0x3005)
    make_expired_cert(d, "expired", "/O=Test Hospital/CN=modality1", "ca")
    return d


def tls_env(pki: Path, tls_port: int, **extra: str) -> dict[str, str]:
    return {
        "DICOMGW_DIMSE__TLS_BIND": f"127.0.0.1:{tls_port}",
        "DICOMGW_TLS__CERT": str(pki / "server.pem"),
        "DICOMGW_TLS__KEY": str(pki / "server.key"),
        "DICOMGW_TLS__CLIENT_CA": str(pki / "ca.pem"),
        **extra,
    }


# -- peers ------------------------------------------------------------------------------------------------
def dcmtk_tls(pki: Path, cert: str = "client", ca: str = "ca") -> list[str]:
    return ["+tls", str(pki / f"{cert}.key"), str(pki / f"{cert}.pem"), "+cf", str(pki / f"{ca}.pem")]


def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout)


def echoscu_tls(pki: Path, port: int, cert: str = "client", ca: str = "ca", calling: str = "ECHOSCU"):
    return run(["echoscu", "-to", "10", "-ta", "10", "-td", "10", "-aet", calling, "-aec", "DICOMGW",
                *(dcmtk_tls(pki, cert, ca) if cert else []), "127.0.0.1", str(port)])


def client_context(pki: Path, cert: str | None = "client") -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return ctx


def pynetdicom_association(pki: Path, port: int, cert: str | None = "client", calling: str = "PYTEST"):
    """(association, the A-ASSOCIATE-RJ (result, source, reason) if one came) over TLS."""
    ae = make_ae(calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    rejections = []

    def on_pdu(event):
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append((event.pdu.result, event.pdu.source, event.pdu.reason_diagnostic))

    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW", tls_args=(client_context(pki, cert), "localhost"),
                         evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)])
    deadline = time.monotonic() + 5
    while not assoc.is_established and not rejections and assoc.dul.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    return ae, assoc, rejections


def served_serial(port: int) -> str:
    """The serial number of the certificate the server on `port` presents (hex, as openssl prints it)."""
    pem = ssl.get_server_certificate(("127.0.0.1", port))
    out = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().split("=", 1)[1].upper()


def curl(pki: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", "--cacert", str(pki / "ca.pem"), *args, url],
                          capture_output=True, text=True, timeout=30)


# -- DICOM TLS --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def dest_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def gateway_env(pki, tls_port, dest_port):
    peers = ("[{ae_title = \"FINDSCU\", host = \"127.0.0.1\", port = 1},"
             " {ae_title = \"MOVESCU\", host = \"127.0.0.1\", port = 1},"
             f" {{ae_title = \"{DEST}\", host = \"127.0.0.1\", port = {dest_port}, tls = true}},"
             f" {{ae_title = \"MOD1\", host = \"127.0.0.1\", port = 1, certificate = \"{CLIENT_SUBJECT}\"}}]")
    return tls_env(pki, tls_port, DICOMGW_DIMSE__PEERS=peers, DICOMGW_TLS__CA=str(pki / "ca.pem"))


def test_dcmtk_echo_store_find_over_tls(gateway, pki, tls_port, tmp_path):
    echo = echoscu_tls(pki, tls_port)
    assert echo.returncode == 0, echo.stderr
    sample = small_ct(PatientID="TLS-DCMTK")
    path = tmp_path / "ct.dcm"
    path.write_bytes(sample.part10())
    store = run(["storescu", "-v", "-aec", "DICOMGW", *dcmtk_tls(pki), "127.0.0.1", str(tls_port), str(path)])
    assert store.returncode == 0 and "Store Response (Success)" in store.stdout + store.stderr, store.stderr
    responses = tmp_path / "responses"
    responses.mkdir()
    find = run(["findscu", "-S", "-aet", "FINDSCU", "-aec", "DICOMGW", *dcmtk_tls(pki), "-X", "-od", str(responses),
                "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=TLS-DCMTK", "-k", "StudyInstanceUID",
                "127.0.0.1", str(tls_port)])
    assert find.returncode == 0, find.stderr
    found = [pydicom.dcmread(p).StudyInstanceUID for p in sorted(responses.glob("rsp*.dcm"))]
    assert found == [sample.study_uid], find.stderr
    # The client certificate's subject is the peer's identity.
    assert re.search(r"association accepted.*certificate=.?" + re.escape(CLIENT_SUBJECT), gateway.log_text())


def test_pynetdicom_echo_and_store_over_tls(gateway, pki, tls_port):
    ae, assoc, rejections = pynetdicom_association(pki, tls_port)
    try:
        assert assoc.is_established, rejections
        assert assoc.send_c_echo().Status == 0
        ds = small_ct().ds
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
    finally:
        ae.shutdown()
    found = requests.get(f"{gateway.base_url}/instances", params={"SOPInstanceUID": ds.SOPInstanceUID}, timeout=30)
    assert found.status_code == 200 and len(found.json()) == 1


def test_pinned_certificate_must_match_the_calling_ae(gateway, pki, tls_port):
    # MOD1 pins CN=modality1: another certificate from the same CA is rejected, calling AE not recognized
    # (A-ASSOCIATE-RJ permanent (1), service user (1), reason 3).
    ae, assoc, rejections = pynetdicom_association(pki, tls_port, cert="intruder", calling="MOD1")
    ae.shutdown()
    assert not assoc.is_established
    assert rejections == [(1, 1, 3)]
    ae, assoc, rejections = pynetdicom_association(pki, tls_port, cert="client", calling="MOD1")
    try:
        assert assoc.is_established, rejections
        assoc.release()
    finally:
        ae.shutdown()
    # Without TLS there is no certificate: the pinned AE is rejected on the plain port too.
    ae = make_ae("MOD1")
    ae.add_requested_context(Verification)
    plain = ae.associate("127.0.0.1", gateway.dimse_port, ae_title="DICOMGW")
    assert not plain.is_established
    ae.shutdown()


@pytest.mark.parametrize("case", ["other CA", "expired", "no client certificate", "plain text"])
def test_bad_clients_are_refused_quickly_and_the_listener_goes_on(gateway, pki, tls_port, case):
    started = time.monotonic()
    if case == "no client certificate":
        ae, assoc, _ = pynetdicom_association(pki, tls_port, cert=None)
        ae.shutdown()
        assert not assoc.is_established
    else:
        cert = {"other CA": "stranger", "expired": "expired", "plain text": ""}[case]
        proc = echoscu_tls(pki, tls_port, cert=cert)
        assert proc.returncode != 0, proc.stdout + proc.stderr
    assert time.monotonic() - started < 15, "the refusal took too long"
    # Refused for the reason of the case, by the handshake.
    reason = {"other CA": "UnknownIssuer", "expired": "certificate expired",
              "no client certificate": "peer sent no certificates", "plain text": "corrupt message"}[case]
    deadline = time.monotonic() + 5
    while reason not in gateway.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reason in gateway.log_text()
    # A raw A-ASSOCIATE-RQ header in plain text gets a TLS alert or the close at once, not a wait for the
    # association timeout (the socket's timeout would raise).
    with socket.create_connection(("127.0.0.1", tls_port), timeout=15) as s:
        s.sendall(b"\x01\x00\x00\x00\x00\x10" + b"x" * 16)
        try:
            answer = s.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert answer == b"" or answer[0] == 0x15, answer  # 0x15: a TLS alert record
    ok = echoscu_tls(pki, tls_port)
    assert ok.returncode == 0, ok.stderr
    assert gateway.is_running()


def test_movescu_over_tls_to_a_tls_destination(gateway, pki, tls_port, dest_port, tmp_path):
    sample = small_ct(PatientID="TLS-MOVE")
    ae, assoc, rejections = pynetdicom_association(pki, tls_port)
    try:
        assert assoc.is_established, rejections
        assert assoc.send_c_store(sample.ds).Status == 0
        assoc.release()
    finally:
        ae.shutdown()
    out = tmp_path / "received"
    # The destination verifies the gateway's certificate (DCMTK requires one by default). movescu itself has
    # no TLS option (DCMTK 3.6.7): it asks on the plain port.
    with storescp(dest_port, DEST, out, options=dcmtk_tls(pki, cert="server")):
        move = run(["movescu", "-v", "-S", "-aet", "MOVESCU", "-aec", "DICOMGW", "-aem", DEST,
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={sample.study_uid}",
                    "127.0.0.1", str(gateway.dimse_port)], timeout=120)
    assert move.returncode == 0, move.stderr
    # (The study also holds what the other tests stored: CT_small's Study Instance UID.)
    received = {p.name: p for p in out.rglob("*") if p.is_file()}
    assert f"CT.{sample.sop_uid}" in received, (sorted(received), move.stderr)
    assert received[f"CT.{sample.sop_uid}"].read_bytes().endswith(sample.payload)


# -- HTTPS ------------------------------------------------------------------------------------------------
def https_gateway(gateway_factory, pki, **env) -> Gateway:
    return gateway_factory(env={
        "DICOMGW_HTTP__TLS": "true",
        "DICOMGW_TLS__CERT": str(pki / "server.pem"),
        "DICOMGW_TLS__KEY": str(pki / "server.key"),
        **env,
    }, http_ca=str(pki / "ca.pem"))


def test_https_with_curl_http2_and_dicomweb_client(gateway_factory, pki):
    gw = https_gateway(gateway_factory, pki)
    h2 = curl(pki, f"{gw.http_root}/healthz", "--http2", "-o", "/dev/null", "-w", "%{http_version}")
    assert h2.returncode == 0 and h2.stdout == "2", h2.stdout + h2.stderr
    h1 = curl(pki, f"{gw.http_root}/healthz", "--http1.1", "-o", "/dev/null", "-w", "%{http_version}")
    assert h1.returncode == 0 and h1.stdout == "1.1", h1.stdout + h1.stderr
    # Plain HTTP on the HTTPS port is not served, and the port goes on serving.
    plain = subprocess.run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{gw.http_port}/healthz"],
                           capture_output=True, text=True, timeout=30)
    assert plain.returncode != 0, plain.stdout
    assert curl(pki, f"{gw.http_root}/healthz").stdout == "ok"

    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would replace `verify`
    session.verify = str(pki / "ca.pem")
    client = DICOMwebClient(url=gw.base_url, session=session, timeout=30)
    client.set_http_retry_params(retry=False)
    sample = small_ct(PatientID="TLS-HTTPS")
    client.store_instances([sample.ds])
    found = client.search_for_studies(search_filters={"PatientID": "TLS-HTTPS"})
    assert len(found) == 1
    # URLs the gateway builds for an HTTPS client are https ones, over HTTP/2 as well.
    retrieve_url = found[0]["00081190"]["Value"][0]
    assert retrieve_url.startswith(f"https://127.0.0.1:{gw.http_port}/"), retrieve_url
    h2_search = curl(pki, f"{gw.base_url}/studies?PatientID=TLS-HTTPS", "--http2")
    assert f'"https://127.0.0.1:{gw.http_port}/' in h2_search.stdout, h2_search.stdout
    instance = client.retrieve_instance(sample.study_uid, sample.series_uid, sample.sop_uid)
    assert instance.SOPInstanceUID == sample.sop_uid


def test_certificate_reloaded_on_sighup_and_a_bad_file_keeps_the_old_one(gateway_factory, pki, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes((pki / "server.pem").read_bytes())
    key.write_bytes((pki / "server.key").read_bytes())
    gw = https_gateway(gateway_factory, pki, DICOMGW_TLS__CERT=str(cert), DICOMGW_TLS__KEY=str(key),
                       DICOMGW_TLS__RELOAD_CHECK_SECS="0")
    assert served_serial(gw.http_port) == "1001"
    # A file that does not load: logged, the certificate in service stays.
    cert.write_text("not a certificate\n")
    os.kill(gw.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "TLS certificate not reloaded" not in gw.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "TLS certificate not reloaded" in gw.log_text()
    assert served_serial(gw.http_port) == "1001"
    # Checks are off (reload_check_secs = 0): only the signal reloads.
    cert.write_bytes((pki / "server2.pem").read_bytes())
    key.write_bytes((pki / "server2.key").read_bytes())
    time.sleep(1.5)
    assert served_serial(gw.http_port) == "1001"
    os.kill(gw.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while served_serial(gw.http_port) != "2002" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert served_serial(gw.http_port) == "2002"
    assert gw.is_running()


def test_certificate_reloaded_when_the_files_change(gateway_factory, pki, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes((pki / "server.pem").read_bytes())
    key.write_bytes((pki / "server.key").read_bytes())
    gw = https_gateway(gateway_factory, pki, DICOMGW_TLS__CERT=str(cert), DICOMGW_TLS__KEY=str(key),
                       DICOMGW_TLS__RELOAD_CHECK_SECS="1")
    assert served_serial(gw.http_port) == "1001"
    # The key first, then the certificate: in between, the pair does not match and is not taken.
    key.write_bytes((pki / "server2.key").read_bytes())
    cert.write_bytes((pki / "server2.pem").read_bytes())
    deadline = time.monotonic() + 15
    while served_serial(gw.http_port) != "2002" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert served_serial(gw.http_port) == "2002"


# -- secure by default ------------------------------------------------------------------------------------
def test_embedded_defaults_listen_on_loopback_only(tmp_path):
    """No bind configured: the gateway listens on 127.0.0.1 (default ports 11112 and 8080; if another
    process holds one of them, the refusal to bind names the address, which proves the same) and says so."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMGW_")}
    env.update({"DICOMGW_STORAGE__PATH": str(tmp_path / "data/objects"),
                "DICOMGW_INDEX__URL": f"sqlite://{tmp_path}/data/index.db", "NO_COLOR": "1"})
    (tmp_path / "data").mkdir()
    proc = subprocess.Popen([str(binary_path()), "serve"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            log = "".join(lines)
            if ("HTTP listening" in log and "DIMSE listening" in log) or "binding" in log:
                break
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    log = "".join(lines)
    if "binding" in log:
        assert re.search(r"binding (DIMSE|HTTP) to 127\.0\.0\.1:(11112|8080)", log), log
    else:
        assert "DIMSE listening addr=127.0.0.1:11112" in log, log
        assert "HTTP listening addr=127.0.0.1:8080" in log, log
        assert "only callers on this machine can connect" in log, log


def test_open_http_without_authentication_does_not_start(gateway_factory):
    gw = gateway_factory(start=False)
    gw.extra_env["DICOMGW_HTTP__BIND"] = f"0.0.0.0:{gw.http_port}"
    with pytest.raises(AssertionError, match="exited with status"):
        gw.start(timeout=30)
    assert "no authentication configured" in gw.log_text()
    assert "allow_anonymous = true" in gw.log_text()
    gw.extra_env["DICOMGW_HTTP__ALLOW_ANONYMOUS"] = "true"
    gw.start()
    assert requests.get(f"{gw.http_root}/healthz", timeout=10).text == "ok"
    assert "HTTP serves anyone who reaches it" in gw.log_text()
