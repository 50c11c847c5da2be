#!/usr/bin/env python3
"""FHIR benchmark (`bench/run fhir`): ImagingStudy read and search against QIDO-RS for the same study, and the
push throughput to a FHIR server that adds a delay to every request.

Phase 1: one gateway, an index of `--instances` instances (small 16x16 images, 100 per study, 2 series) plus one
study of `--big` instances; then `--rounds` rounds, each sending every query once in turn on keep-alive
connections: QIDO-RS `studies?StudyInstanceUID=` and `studies/{uid}/instances`, FHIR `ImagingStudy/{uid}`,
`ImagingStudy?identifier=`, `ImagingStudy?patient=` (the big study's patient has that one study). p50 / p99.

Phase 2: a second gateway pushing to an in-process FHIR server that sleeps `--push-delay-ms` per request;
`--push-studies` one-instance studies are stored over one association; measured: time from the last C-STORE
response to the last study received (the stability delay, `--stability-ms`, included and reported).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

CT = "1.2.840.10008.5.1.4.1.1.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dataset(study: dict, series_uid: str, series_no: int, inst_no: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study["uid"]
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = study["patient"]
    ds.PatientName = f"BENCH^{study['patient']}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = study["date"]
    ds.StudyTime = "101500"
    ds.AccessionNumber = study["accession"]
    ds.StudyDescription = "FHIR bench"
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = series_no
    ds.InstanceNumber = inst_no
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.full((16, 16), inst_no % 4096, dtype=np.uint16).tobytes()
    return ds


def study(n: int, patient: str) -> dict:
    return {"uid": generate_uid(), "patient": patient, "accession": f"ACC{n:06d}",
            "date": f"20{10 + n % 15:02d}{1 + n % 12:02d}{1 + n % 28:02d}"}


def store(port: int, datasets) -> float:
    """C-STORE every data set over one association; returns the time of the last response."""
    ae = AE(ae_title="FHIRBENCH")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300  # a busy machine is slow, not broken
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW")
    assert assoc.is_established, "association refused"
    last = 0.0
    for ds in datasets:
        status = assoc.send_c_store(ds)
        assert status and status.Status == 0, f"C-STORE answered {status!r}"
        last = time.monotonic()
    assoc.release()
    return last


class Gateway:
    def __init__(self, binary: str, workdir: Path, env: dict[str, str]):
        self.dimse, self.http = free_port(), free_port()
        self.workdir = workdir
        e = {k: v for k, v in os.environ.items() if not k.startswith("DICOMGW_")}
        e.update({"DICOMGW_DIMSE__BIND": f"127.0.0.1:{self.dimse}", "DICOMGW_HTTP__BIND": f"127.0.0.1:{self.http}",
                  "DICOMGW_STORAGE__PATH": str(workdir / "objects"),
                  "DICOMGW_INDEX__URL": f"sqlite://{workdir}/index.db", "RUST_LOG": "warn", **env})
        self.log = open(workdir / "gateway.log", "wb")
        self.proc = subprocess.Popen([binary, "serve"], env=e, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.http, timeout=2)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("gateway not ready")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


def measure(port: int, queries: dict[str, str], rounds: int) -> dict[str, list[float]]:
    conns = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=60) for name in queries}
    times: dict[str, list[float]] = {name: [] for name in queries}
    for r in range(rounds + 5):
        for name, path in queries.items():
            accept = "application/dicom+json" if path.startswith("/dicomweb") else "application/fhir+json"
            t0 = time.perf_counter()
            conns[name].request("GET", path, headers={"Accept": accept})
            resp = conns[name].getresponse()
            body = resp.read()
            elapsed = time.perf_counter() - t0
            assert resp.status == 200, (path, resp.status, body[:300])
            if r >= 5:  # warm-up rounds not counted
                times[name].append(elapsed * 1000)
    return times


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


class SlowFhir:
    """A FHIR server that answers every conditional update after `delay` seconds and counts the studies."""

    def __init__(self, delay: float):
        self.delay, self.received, self.lock = delay, {}, threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_PUT(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(owner.delay)
                ident = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)["identifier"][0]
                with owner.lock:
                    owner.received[ident] = (time.monotonic(), len(body))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway-bin", required=True)
    ap.add_argument("--instances", type=int, default=20_000, help="instances in the index besides the big study")
    ap.add_argument("--big", type=int, default=500, help="instances of the measured study")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--push-studies", type=int, default=200)
    ap.add_argument("--push-delay-ms", type=float, default=20)
    ap.add_argument("--stability-ms", type=int, default=1000)
    ap.add_argument("--work-root", default=None)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results-fhir.md")))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fhir-bench-", dir=args.work_root))
    lines = [f"# FHIR bench ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"binary: `{args.gateway_bin}`, load average at start: {os.getloadavg()[0]:.2f}", ""]
    try:
        (work / "q").mkdir()
        gw = Gateway(args.gateway_bin, work / "q", {})
        try:
            t0 = time.monotonic()
            background = []
            for n in range(args.instances // 100):
                st = study(n, f"P{n // 2:05d}")
                for s in range(2):
                    se = generate_uid()
                    background += [dataset(st, se, s + 1, i + 1) for i in range(50)]
            big = study(999_999, "BIGPATIENT")
            series = [generate_uid() for _ in range(5)]
            big_ds = [dataset(big, series[i % 5], i % 5 + 1, i + 1) for i in range(args.big)]
            store(gw.dimse, background + big_ds)
            load = time.monotonic() - t0
            uid = big["uid"]
            ident = urllib.parse.quote(f"urn:dicom:uid|urn:oid:{uid}")
            queries = {
                "QIDO studies?StudyInstanceUID": f"/dicomweb/studies?StudyInstanceUID={uid}",
                "QIDO studies/{uid}/instances": f"/dicomweb/studies/{uid}/instances",
                "FHIR ImagingStudy/{id}": f"/fhir/ImagingStudy/{uid}",
                "FHIR ImagingStudy?identifier=": f"/fhir/ImagingStudy?identifier={ident}",
                "FHIR ImagingStudy?patient=": "/fhir/ImagingStudy?patient=Patient/BIGPATIENT",
            }
            times = measure(gw.http, queries, args.rounds)
        finally:
            gw.stop()
        qido = statistics.median(times["QIDO studies/{uid}/instances"])
        lines += [f"## ImagingStudy vs QIDO-RS: a {args.big}-instance study in an index of "
                  f"{args.instances + args.big} instances ({args.rounds} rounds, loaded in {load:.0f} s)", "",
                  "| request | p50 ms | p99 ms | p50 / QIDO instances p50 |", "|---|---|---|---|"]
        for name, t in times.items():
            lines.append(f"| {name} | {statistics.median(t):.2f} | {pct(t, 99):.2f} | "
                         f"{statistics.median(t) / qido:.2f} |")
        lines.append("")

        fhir = SlowFhir(args.push_delay_ms / 1000)
        (work / "p").mkdir()
        gw = Gateway(args.gateway_bin, work / "p", {
            "DICOMGW_FHIR__PUSH__URL": f"http://127.0.0.1:{fhir.port}/fhir",
            "DICOMGW_FHIR__PUSH__STABILITY_MS": str(args.stability_ms),
            "DICOMGW_FHIR__PUSH__POLL_MS": "100",
        })
        try:
            studies = [study(n, f"Q{n:05d}") for n in range(args.push_studies)]
            first = time.monotonic()
            last = store(gw.dimse, [dataset(s, generate_uid(), 1, 1) for s in studies])
            deadline = time.monotonic() + 600
            while len(fhir.received) < args.push_studies and time.monotonic() < deadline:
                time.sleep(0.01)
            done = max(t for t, _ in fhir.received.values())
        finally:
            gw.stop()
            fhir.server.shutdown()
        elapsed = done - last
        lines += [f"## Push: {args.push_studies} studies to a FHIR server adding {args.push_delay_ms:.0f} ms "
                  f"per request", "",
                  f"- stored in {last - first:.2f} s; all {len(fhir.received)} received "
                  f"{elapsed:.2f} s after the last C-STORE, of which {args.stability_ms / 1000:.1f} s is the "
                  f"stability delay: {args.push_studies / max(elapsed - args.stability_ms / 1000, 1e-3):.0f} "
                  f"studies/s once stable (default concurrency 4)",
                  f"- average ImagingStudy size: "
                  f"{statistics.mean(n for _, n in fhir.received.values()):.0f} bytes", ""]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
