"""FHIR helpers for the integration tests: validation of every resource against the R4B models of the
`fhir.resources` package, and a small FHIR server (the "EHR") that the gateway pushes to.

`EhrServer` stores what it receives (conditional updates and deletes of ImagingStudy, keyed by the
`identifier` the gateway sends), answers `Patient?identifier=` from patients the test registers, issues
OAuth tokens at `/token`, and can be told to fail: answer a status (429, 503, 400...) for a while, add a
delay to every request, or vanish (its socket closed) and come back on the same port.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fhir.resources.R4B import get_fhir_model_class

from gw_harness import free_port

FHIR_JSON = "application/fhir+json"


def validate(resource: dict) -> dict:
    """Validate `resource` (and every resource a Bundle holds) against the R4B model of its type; returns it."""
    model = get_fhir_model_class(resource["resourceType"])
    model.model_validate(resource)
    for entry in resource.get("entry", []) if resource["resourceType"] == "Bundle" else []:
        validate(entry["resource"])
    for contained in resource.get("contained", []):
        validate(contained)
    return resource


def study_key(study_uid: str) -> str:
    return f"urn:dicom:uid|urn:oid:{study_uid}"


class EhrServer:
    def __init__(self, token_required: str | None = None):
        self.port = free_port()
        self.lock = threading.Lock()
        self.studies: dict[str, dict] = {}  # identifier -> last resource
        self.requests: list[dict] = []  # every request: method, path, query, headers, body, at
        self.patients: dict[str, str] = {}  # "system|value" -> Patient id
        self.fail_status: int | None = None  # answer this status to pushes while set
        self.fail_count: int | None = None  # ...this many times (None: until cleared)
        self.retry_after: str | None = None
        self.delay = 0.0  # seconds added to every push
        self.token_required = token_required  # e.g. "Bearer abc"; "oauth": any token issued here
        self.tokens: list[str] = []
        self.token_lifetime = 3600
        self.token_requests: list[dict] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "EhrServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                owner._handle(self, "GET")

            def do_PUT(self):
                owner._handle(self, "PUT")

            def do_DELETE(self):
                owner._handle(self, "DELETE")

            def do_POST(self):
                owner._handle(self, "POST")

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Vanish: the port stops answering (connections refused)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- queries -------------------------------------------------------------------------------------
    def pushes(self, study_uid: str | None = None) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["method"] in ("PUT", "DELETE") and r["status"] < 300
                    and (study_uid is None or r["query"].get("identifier") == [study_key(study_uid)])]

    def attempts(self, study_uid: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["method"] in ("PUT", "DELETE")
                    and r["query"].get("identifier") == [study_key(study_uid)]]

    def study(self, study_uid: str) -> dict | None:
        with self.lock:
            return self.studies.get(study_key(study_uid))

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    # -- the server side ---------------------------------------------------------------------------------
    def _reply(self, h, status: int, body: dict | None = None, headers: dict | None = None):
        data = json.dumps(body).encode() if body is not None else b""
        h.send_response(status)
        if body is not None:
            h.send_header("Content-Type", FHIR_JSON)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        return status

    def _authorized(self, h) -> bool:
        if self.token_required is None:
            return True
        got = h.headers.get("Authorization", "")
        if self.token_required == "oauth":
            return got.startswith("Bearer ") and got[7:] in self.tokens
        return got == self.token_required

    def _handle(self, h, method: str):
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        record = {"method": method, "path": url.path, "query": query,
                  "headers": {k.lower(): v for k, v in h.headers.items()},
                  "body": body, "at": time.time(), "status": 0}
        status = self._route(h, method, url.path, query, body)
        record["status"] = status
        with self.lock:
            self.requests.append(record)

    def _route(self, h, method, path, query, body) -> int:
        if path == "/token" and method == "POST":
            form = urllib.parse.parse_qs(body.decode())
            with self.lock:
                self.token_requests.append({"form": form, "headers": {k.lower(): v for k, v in h.headers.items()}})
                token = f"tok-{len(self.tokens) + 1}"
                self.tokens.append(token)
            return self._reply(h, 200, {"access_token": token, "token_type": "bearer",
                                        "expires_in": self.token_lifetime})
        if path == "/fhir/Patient" and method == "GET":
            ident = (query.get("identifier") or [""])[0]
            entries = [{"resource": {"resourceType": "Patient", "id": pid}, "search": {"mode": "match"}}
                       for key, pid in self.patients.items() if key == ident]
            return self._reply(h, 200, {"resourceType": "Bundle", "type": "searchset",
                                        "total": len(entries), "entry": entries})
        if path != "/fhir/ImagingStudy" or method not in ("PUT", "DELETE"):
            return self._reply(h, 404, {"resourceType": "OperationOutcome",
                                        "issue": [{"severity": "error", "code": "not-found"}]})
        if self.delay:
            time.sleep(self.delay)
        if not self._authorized(h):
            return self._reply(h, 401, {"resourceType": "OperationOutcome",
                                        "issue": [{"severity": "error", "code": "login"}]})
        with self.lock:
            failing = self.fail_status is not None and (self.fail_count is None or self.fail_count > 0)
            if failing and self.fail_count is not None:
                self.fail_count -= 1
            fail_status = self.fail_status
        if failing:
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return self._reply(h, fail_status, {"resourceType": "OperationOutcome",
                                                "issue": [{"severity": "error", "code": "processing",
                                                           "diagnostics": "told to fail"}]}, headers)
        ident = (query.get("identifier") or [""])[0]
        if method == "DELETE":
            with self.lock:
                self.studies.pop(ident, None)
            return self._reply(h, 204)
        resource = json.loads(body)
        try:
            validate(resource)
        except Exception as e:  # the gateway sent something a FHIR server must refuse
            return self._reply(h, 422, {"resourceType": "OperationOutcome",
                                        "issue": [{"severity": "error", "code": "invalid",
                                                   "diagnostics": str(e)[:2000]}]})
        with self.lock:
            created = ident not in self.studies
            self.studies[ident] = resource
        return self._reply(h, 201 if created else 200, resource)


def basic_auth(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()
