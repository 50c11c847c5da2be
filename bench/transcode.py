#!/usr/bin/env python3
"""Transcoding benchmark: one JPEG 2000 frame (512x512, 16-bit CT, lossless) fetched decompressed to Explicit
VR Little Endian (`frames/1` with `Accept: multipart/related; type="application/octet-stream";
transfer-syntax=1.2.840.10008.1.2.1`) from the gateway and from Orthanc + its DICOMweb plugin in the same run;
p50 and p99 of the time to the last byte, and the bytes checked against pydicom's decode of the original.
Orthanc decodes JPEG 2000 through its GDCM plugin (`orthanc-gdcm`, installed by bench/run).

Run it through `bench/run transcode` (venv, gateway build). Servers run one after another, each with fresh data
on loopback; warm-up requests first, then timed ones on one keep-alive connection.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless, generate_uid

import bench
from bench import BENCH_DIR, DCMTK_ENV, BenchError, GatewayServer, Http, OrthancServer, log, pct

EXPLICIT_LE = "1.2.840.10008.1.2.1"
FRAME_ACCEPT = f'multipart/related; type="application/octet-stream"; transfer-syntax={EXPLICIT_LE}'
SIDE = 512


GDCM_PLUGIN = "/usr/share/orthanc/plugins/libOrthancGdcm.so"


class OrthancWithGdcm(OrthancServer):
    """Orthanc decodes JPEG 2000 only through its GDCM plugin (Debian package orthanc-gdcm)."""

    def __init__(self, work_root):
        super().__init__(work_root)
        if not Path(GDCM_PLUGIN).exists():
            raise BenchError(f"{GDCM_PLUGIN} missing: apt-get install orthanc-gdcm")
        cfg = json.loads(self.cfg_path.read_text())
        cfg["Plugins"].append(GDCM_PLUGIN)
        self.cfg_path.write_text(json.dumps(cfg, indent=1))


def make_j2k_ct(path: Path) -> tuple[Dataset, np.ndarray]:
    """A 512x512 16-bit signed CT slice (smooth anatomy-like structure plus noise, so the codestream is not
    trivially small), encoded JPEG 2000 lossless by pylibjpeg-openjpeg."""
    rng = np.random.default_rng(18)
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    r = np.hypot(x - SIDE / 2, y - SIDE / 2)
    body = np.where(r < 200, 40.0, -1000.0) + np.where(r < 60, 400.0, 0.0) + 30 * np.sin(x / 17.0) * np.cos(y / 23.0)
    pixels = (body + rng.normal(0, 12, body.shape)).astype(np.int16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "BENCHJ2K", "Bench^Jpeg2000", "CT"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261207", "120000", "J2K1", "1"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows = ds.Columns = SIDE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = pixels.tobytes()
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path), pixels


def store(srv, path: Path) -> None:
    proc = subprocess.run(["storescu", "-xv", "-aec", srv.ae, "127.0.0.1", str(srv.dimse_port), str(path)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise BenchError(f"storescu to {srv.name} failed: {proc.stdout}{proc.stderr}")


def frame_body(body: bytes, ctype: str) -> bytes:
    """The single part of a multipart/related answer."""
    boundary = next(p.split("=", 1)[1].strip().strip('"') for p in ctype.split(";") if p.strip().lower().startswith("boundary="))
    part = body.split(b"--" + boundary.encode())[1]
    return part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]


def measure(srv, ds: Dataset, expected: bytes, warmup: int, n: int) -> dict:
    path = f"{srv.http_root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/1"
    h = Http(srv.http_port, timeout=60)
    times = []
    try:
        for i in range(warmup + n):
            status, headers, body, _, t, _ = h.get(path, FRAME_ACCEPT)
            if status != 200:
                raise BenchError(f"{srv.name}: frames/1 answered {status}: {body[:300]!r}")
            if i == 0:
                got = frame_body(body, headers.get("Content-Type", ""))
                if got != expected:
                    raise BenchError(f"{srv.name}: the decompressed frame ({len(got)} bytes) differs from the "
                                     f"original pixels ({len(expected)} bytes)")
            if i >= warmup:
                times.append(t * 1000)
    finally:
        h.close()
    res = dict(p50_ms=pct(times, 50), p99_ms=pct(times, 99), n=n)
    log(f"  {srv.name}: p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gateway-bin", required=True)
    ap.add_argument("--gateway-unavailable")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--ready-timeout", type=float, default=60)
    ap.add_argument("--work-root", default=None)
    args = ap.parse_args()
    bench.QR_DEST_PORT = bench.free_port()  # the servers' configured C-MOVE destination (unused here)
    work = Path(args.work_root or os.environ.get("TMPDIR", "/tmp"))
    data = BENCH_DIR / ".cache" / "transcode"
    data.mkdir(parents=True, exist_ok=True)
    ds, pixels = make_j2k_ct(data / "ct-j2k.dcm")
    expected = pixels.astype("<i2").tobytes()
    log(f"JPEG 2000 lossless CT frame: {len(ds.PixelData)} bytes encapsulated, {len(expected)} decoded")
    results = {}
    load_start = os.getloadavg()
    for srv in (OrthancWithGdcm(work), GatewayServer(work, args.gateway_bin)):
        srv.start(args.ready_timeout)
        try:
            store(srv, data / "ct-j2k.dcm")
            results[srv.name] = measure(srv, ds, expected, args.warmup, args.n)
        finally:
            srv.stop()
            srv.cleanup(keep=False)
    g, o = results["gateway"], results["orthanc"]
    rows = [
        "| Metric | Gateway | Orthanc | Ratio vs Orthanc | Target | Met |",
        "|---|---|---|---|---|---|",
        f"| JPEG 2000 frame (512x512 16-bit) to Explicit VR LE, p50 / p99 | {g['p50_ms']:.2f} / {g['p99_ms']:.2f} ms "
        f"| {o['p50_ms']:.2f} / {o['p99_ms']:.2f} ms | {o['p50_ms'] / g['p50_ms']:.1f}x / {o['p99_ms'] / g['p99_ms']:.1f}x "
        f"| ≥2x faster (p50 and p99) | {'yes' if o['p50_ms'] >= 2 * g['p50_ms'] and o['p99_ms'] >= 2 * g['p99_ms'] else 'no'} |",
    ]
    report = (f"- date: {time.strftime('%Y-%m-%d %H:%M')}; {args.n} timed requests after {args.warmup} warm-ups each; "
              f"gateway: {args.gateway_bin}\n- load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}\n\n"
              + "\n".join(rows) + "\n")
    print(report)
    (BENCH_DIR / "results-transcode.md").write_text(report)
    (BENCH_DIR / "results-transcode.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
