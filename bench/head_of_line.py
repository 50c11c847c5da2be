#!/usr/bin/env python3
"""Head-of-line benchmark: does one large C-STORE hold up the small ones of other associations?

One pynetdicom association sends small instances back to back and records each C-STORE's latency:
first alone (idle), then while DCMTK storescu sends one large object (2 GB by default) on another
association. Reports p50 / p99 / max of both phases and the p99 ratio (target: under 5x).

Usage: bench/run hol [--size-gb 2] [--gateway-bin PATH] [--work-root DIR]
(or directly: bench/.venv/bin/python bench/head_of_line.py --gateway-bin target/release/dicom-gateway)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

BENCH_DIR = Path(__file__).resolve().parent
SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_dataset(study: str, series: str, n: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SC, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.Modality, ds.InstanceNumber = "HOL", "Head^OfLine", "OT", n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(256)) * 16
    return ds


def write_big_object(path: Path, size: int) -> None:
    """A Part-10 Secondary Capture multi-frame object of about `size` bytes, written in streaming fashion
    (8192x8192 8-bit frames), so the file never sits in this process's memory."""
    frame = 8192 * 8192
    frames = max(1, size // frame)
    ds = small_dataset(generate_uid(), generate_uid(), 1)
    del ds.PixelData
    ds.Rows = ds.Columns = 8192
    ds.NumberOfFrames = frames
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SC, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    chunk = bytes(range(256)) * 4096  # 1 MB
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, frames * frame))
        for _ in range(frames * frame // len(chunk)):
            f.write(chunk)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def summary(latencies: list[float]) -> dict:
    ms = [x * 1000 for x in latencies]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 2), "p99_ms": round(pct(ms, 99), 2),
            "max_ms": round(max(ms), 2)}


def small_stream(port: int, stop: threading.Event, out: list[tuple[float, float]], count: int | None):
    ae = AE(ae_title="HOLBENCH")
    ae.add_requested_context(SC, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW")
    assert assoc.is_established, "association rejected"
    study, series = generate_uid(), generate_uid()
    n = 0
    try:
        while not stop.is_set() and (count is None or n < count):
            n += 1
            ds = small_dataset(study, series, n)
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            t0 = time.monotonic()
            status = assoc.send_c_store(ds)
            t1 = time.monotonic()
            if "Status" not in status:
                raise RuntimeError("small C-STORE: no response (association aborted or timed out)")
            if int(status.Status) != 0:
                raise RuntimeError(f"small C-STORE failed: {status.Status:#06x}")
            out.append((t0, t1 - t0))
    finally:
        assoc.release()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway-bin", required=True)
    ap.add_argument("--gateway-unavailable", default=None)
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--idle-stores", type=int, default=500)
    ap.add_argument("--work-root", default=None, help="where the gateway's data and the big file go")
    ap.add_argument("--big-file", default=None, help="the large object: reused if it exists, else written "
                    "there and kept (default: written into the work directory and removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (gateway log, data)")
    ap.add_argument("--out", default=str(BENCH_DIR / "results-hol.json"))
    args = ap.parse_args()
    if args.gateway_unavailable:
        print(f"gateway unavailable: {args.gateway_unavailable}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="hol-", dir=args.work_root))
    port, http = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMGW_")}
    env.update({
        "DICOMGW_DIMSE__BIND": f"127.0.0.1:{port}", "DICOMGW_HTTP__BIND": f"127.0.0.1:{http}",
        "DICOMGW_STORAGE__PATH": str(work / "data" / "objects"),
        "DICOMGW_INDEX__URL": f"sqlite://{work / 'data' / 'index.db'}",
        "RUST_LOG": "info",
    })
    big = Path(args.big_file) if args.big_file else work / "big.dcm"
    if not big.exists():
        print(f"writing a {args.size_gb} GB object to {big}", file=sys.stderr)
        write_big_object(big, int(args.size_gb * (1 << 30)))
    log = open(work / "gateway.log", "wb")
    gw = subprocess.Popen([args.gateway_bin, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        idle: list[tuple[float, float]] = []
        small_stream(port, threading.Event(), idle, args.idle_stores)

        during: list[tuple[float, float]] = []
        stop = threading.Event()
        stream = threading.Thread(target=small_stream, args=(port, stop, during, None))
        stream.start()
        time.sleep(1.0)
        t_big = time.monotonic()
        sent = subprocess.run(["storescu", "-aec", "DICOMGW", "127.0.0.1", str(port), str(big)],
                              env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True)
        big_s = time.monotonic() - t_big
        time.sleep(0.5)
        stop.set()
        stream.join()
        if sent.returncode != 0:
            raise RuntimeError(f"storescu of the big object failed: {sent.stderr[-500:]}")
        in_window = [lat for t0, lat in during if t_big <= t0 <= t_big + big_s]
        result = {
            "big_object_gb": args.size_gb, "big_store_s": round(big_s, 2),
            "idle": summary([lat for _, lat in idle]),
            "during_big_store": summary(in_window),
        }
        result["p99_ratio"] = round(result["during_big_store"]["p99_ms"] / result["idle"]["p99_ms"], 2)
        print(json.dumps(result, indent=2))
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    finally:
        if args.keep and sys.exc_info()[0] is not None:
            print(f"error: gateway pid {gw.pid} left running for inspection", file=sys.stderr)
        else:
            gw.terminate()
            gw.wait(30)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
