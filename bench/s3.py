#!/usr/bin/env python3
"""S3 benchmark: the gateway on S3 (Garage) vs the gateway on the filesystem vs raw uploads of the same files
to the same Garage with a plain client (boto3), the practical limit; then one frame of a large multi-frame
object (a ranged GET) vs the whole object.

Run it through `bench/run s3` (venv, gateway build). Reuses bench.py's data set and helpers. Everything is on
loopback; servers run one after another, each with fresh data. Garage runs with its default settings (no
fsync of data), which is also what the raw uploads see.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

import bench
from bench import BENCH_DIR, PROFILES, REPO_DIR, BenchError, GatewayServer, log, measure_ingest

sys.path.insert(0, str(REPO_DIR / "tests" / "integration"))
from gw_s3 import BUCKET, Garage  # noqa: E402  (the tests' Garage helper: same set-up as the test suite)

FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
INSTANCE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class S3GatewayServer(GatewayServer):
    name = "gateway-s3"

    def __init__(self, work_root, binary: str, garage: Garage, prefix: str):
        super().__init__(work_root, binary)
        self.garage = garage
        self.prefix = prefix

    def env(self):
        e = super().env()
        e.update(self.garage.gateway_env(self.prefix))
        return e


def files_of(dirs: list[Path]) -> list[Path]:
    return sorted(p for d in dirs for p in d.rglob("*.dcm"))


def raw_upload(garage: Garage, dirs: list[Path], count: int, nbytes: int, parallel: bool, prefix: str) -> dict:
    """PUT every file as is, one boto3 client per stream, as many streams as associations."""
    groups = [files_of([d]) for d in dirs] if parallel else [files_of(dirs)]
    errors: list[str] = []

    def upload(group: int, files: list[Path]):
        client = garage.client()
        try:
            for i, f in enumerate(files):
                with open(f, "rb") as fh:
                    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{group}/{i}.dcm", Body=fh)
        except Exception as e:
            errors.append(str(e))

    threads = [threading.Thread(target=upload, args=(i, g)) for i, g in enumerate(groups)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise BenchError(f"raw upload failed: {errors[:3]}")
    sent = sum(len(g) for g in groups)
    res = dict(wall_s=wall, count=sent, bytes=nbytes, inst_per_s=sent / wall, mb_per_s=nbytes / wall / 1e6)
    log(f"  raw boto3: {sent} objects in {wall:.2f}s = {res['inst_per_s']:.0f}/s, {res['mb_per_s']:.1f} MB/s")
    return res


def run_server(srv, args, fn):
    srv.start(args.ready_timeout)
    try:
        return fn(srv)
    finally:
        srv.stop()
        srv.cleanup(keep=False)


def ingest_case(args, garage: Garage, label: str, dirs: list[Path], count: int, nbytes: int, parallel: bool):
    log(f"--- ingest {label}: {count} instances, {nbytes / 1e6:.0f} MB, {'4 associations' if parallel else 'one association'}")
    out = {}
    bench.wait_disk_quiet()
    out["filesystem"] = run_server(GatewayServer(args.work_root, args.gateway_bin), args,
                                   lambda s: measure_ingest(s, dirs, count, nbytes, parallel, args.ingest_timeout))
    bench.wait_disk_quiet()
    out["s3"] = run_server(S3GatewayServer(args.work_root, args.gateway_bin, garage, f"gw-{label}"), args,
                           lambda s: measure_ingest(s, dirs, count, nbytes, parallel, args.ingest_timeout))
    bench.wait_disk_quiet()
    out["raw"] = raw_upload(garage, dirs, count, nbytes, parallel, f"raw-{label}")
    out["s3_vs_raw"] = out["s3"]["inst_per_s"] / out["raw"]["inst_per_s"]
    out["s3_vs_fs"] = out["s3"]["inst_per_s"] / out["filesystem"]["inst_per_s"]
    return out


def write_multiframe(path: Path, target_mb: int) -> dict:
    """An 8-bit 1024x1024 multi-frame Secondary Capture of about `target_mb` MB, written in pieces."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset

    side = 1024
    frames = max(1, target_mb * 1_000_000 // (side * side))
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.PatientID = "BENCHMF"
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = side
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta = meta
    if not path.exists():
        header = path.with_suffix(".header")
        pydicom.dcmwrite(header, ds, enforce_file_format=True)
        frame_bytes = side * side
        with open(path, "wb") as out:
            out.write(header.read_bytes())
            # Pixel Data, OB, explicit length, then the frames one at a time.
            out.write(b"\xe0\x7f\x10\x00OB\x00\x00" + (frames * frame_bytes).to_bytes(4, "little"))
            base = np.arange(frame_bytes, dtype=np.uint32)
            for n in range(frames):
                out.write(((base * 7 + n * 13) & 0xFF).astype(np.uint8).tobytes())
        header.unlink()
    return dict(path=str(path), frames=frames, bytes=path.stat().st_size, study=ds.StudyInstanceUID,
                series=ds.SeriesInstanceUID, sop=ds.SOPInstanceUID)


def timed_get(session: requests.Session, url: str, accept: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    with session.get(url, headers={"Accept": accept}, stream=True, timeout=600) as r:
        if r.status_code != 200:
            raise BenchError(f"GET {url} -> {r.status_code}: {r.text[:200]}")
        for chunk in r.iter_content(1 << 20):
            n += len(chunk)
    return time.perf_counter() - t0, n


def frame_case(args, garage: Garage, cache: Path) -> dict:
    mf = write_multiframe(cache / f"multiframe-{args.frame_object_mb}mb.dcm", args.frame_object_mb)
    log(f"--- frames: one {mf['bytes'] / 1e6:.0f} MB object of {mf['frames']} frames on S3")

    def measure(srv):
        t0 = time.perf_counter()
        store = bench.subprocess.run(bench.storescu_cmd(srv, [Path(mf["path"])]), env=bench.DCMTK_ENV,
                                     capture_output=True, text=True, timeout=args.ingest_timeout)
        ingest_s = time.perf_counter() - t0
        base = srv.url(f"/studies/{mf['study']}/series/{mf['series']}/instances/{mf['sop']}")
        session = requests.Session()
        if store.returncode != 0 or session.get(f"{base}/metadata", timeout=60).status_code != 200:
            raise BenchError(f"storing the multi-frame object failed: {(store.stdout + store.stderr)[-500:]}")
        rng = np.random.default_rng(1)
        picks = [int(n) for n in rng.integers(1, mf["frames"] + 1, size=args.frame_n)]
        timed_get(session, f"{base}/frames/1", FRAME_ACCEPT)  # connection set up
        frame_s = []
        for n in picks:
            s, size = timed_get(session, f"{base}/frames/{n}", FRAME_ACCEPT)
            if size < 1024 * 1024:
                raise BenchError(f"frame {n}: only {size} bytes")
            frame_s.append(s)
        whole_s = []
        for _ in range(args.whole_n):
            s, size = timed_get(session, base, INSTANCE_ACCEPT)
            if size < mf["bytes"]:
                raise BenchError(f"whole object: only {size} of {mf['bytes']} bytes")
            whole_s.append(s)
        key = next(k for k in garage.keys(srv.prefix + "/") if mf["sop"] in k)
        raw_s = []
        client = garage.client()
        for _ in range(args.whole_n):
            t0 = time.perf_counter()
            body = client.get_object(Bucket=BUCKET, Key=key)["Body"]
            while body.read(1 << 20):
                pass
            raw_s.append(time.perf_counter() - t0)
        return dict(object_mb=mf["bytes"] / 1e6, frames=mf["frames"], ingest_s=ingest_s,
                    frame_ms_median=1000 * statistics.median(frame_s),
                    frame_ms_p95=1000 * sorted(frame_s)[max(0, int(len(frame_s) * 0.95) - 1)],
                    whole_s_median=statistics.median(whole_s), raw_whole_s_median=statistics.median(raw_s))

    res = run_server(S3GatewayServer(args.work_root, args.gateway_bin, garage, "gw-frames"), args, measure)
    log(f"  frame median {res['frame_ms_median']:.1f} ms (p95 {res['frame_ms_p95']:.1f}), whole object "
        f"{res['whole_s_median']:.2f} s (raw boto3 GET {res['raw_whole_s_median']:.2f} s)")
    return res


def report(results: dict, meta: dict) -> str:
    lines = [
        "# S3 benchmark (gateway on Garage vs gateway on the filesystem vs raw boto3 uploads)",
        "",
        f"{meta['date']}, {meta['host']}; Garage {meta['garage']} on loopback, default settings. "
        f"Load average at start {meta['load_start'][0]:.2f}, at end {meta['load_end'][0]:.2f}: "
        "a shared, noisy 2-core machine; compare figures of the same run only.",
        "",
        "## Ingest (C-STORE with storescu; raw = boto3 put_object of the same files, same concurrency)",
        "",
        "| case | gateway, filesystem | gateway, S3 | raw upload to S3 | S3 / raw (target >= 70%) | S3 / filesystem |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results["ingest"].items():
        cell = lambda x: f"{x['inst_per_s']:.0f} inst/s, {x['mb_per_s']:.1f} MB/s"  # noqa: E731
        met = "met" if r["s3_vs_raw"] >= 0.7 else "NOT met"
        lines.append(f"| {label} | {cell(r['filesystem'])} | {cell(r['s3'])} | {cell(r['raw'])} | "
                     f"{100 * r['s3_vs_raw']:.0f}% ({met}) | {100 * r['s3_vs_fs']:.0f}% |")
    f = results.get("frames")
    if f:
        met = "met" if f["frame_ms_median"] < 50 else "NOT met"
        lines += [
            "",
            f"## One frame of a {f['object_mb']:.0f} MB multi-frame object ({f['frames']} frames of 1 MB) on S3",
            "",
            "| what | time |",
            "|---|---|",
            f"| one frame, WADO-RS frames/{{n}} (ranged GET), median of random frames | "
            f"{f['frame_ms_median']:.1f} ms (p95 {f['frame_ms_p95']:.1f} ms; target < 50 ms: {met}) |",
            f"| whole object, WADO-RS instance (streamed from S3), median | {f['whole_s_median']:.2f} s |",
            f"| whole object, raw boto3 GET, median | {f['raw_whole_s_median']:.2f} s |",
            f"| storing it (storescu -> gateway -> multipart upload) | {f['ingest_s']:.1f} s |",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts and a 100 MB object")
    ap.add_argument("--gateway-bin", default=str(REPO_DIR / "target/release/dicom-gateway"))
    ap.add_argument("--gateway-unavailable", default=None, metavar="REASON")
    ap.add_argument("--work-root", default=None)
    ap.add_argument("--frame-object-mb", type=int, default=None, help="size of the multi-frame object (500)")
    ap.add_argument("--frame-n", type=int, default=30)
    ap.add_argument("--whole-n", type=int, default=3)
    ap.add_argument("--only", default="ingest,frames")
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument("--ingest-timeout", type=float, default=1800.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.gateway_unavailable:
        log(f"gateway unavailable: {args.gateway_unavailable}")
        return 1
    args.frame_object_mb = args.frame_object_mb or (100 if args.quick else 500)
    only = {p.strip() for p in args.only.split(",")}
    prof = PROFILES["quick" if args.quick else "full"]
    cache = BENCH_DIR / ".cache" / ("quick" if args.quick else "full")
    out_md = Path(args.out) if args.out else BENCH_DIR / ("results-s3-quick.md" if args.quick else "results-s3.md")

    m = bench.generate_dataset(cache, prof)
    bench.warm_page_cache(cache)
    garage_dir = Path(tempfile.mkdtemp(prefix="bench-garage-", dir=args.work_root))
    garage = Garage(garage_dir).start()
    version = bench.subprocess.run([str(garage.binary), "--version"], capture_output=True, text=True).stdout
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), host=f"{os.uname().nodename}, {os.cpu_count()} cores",
                garage=version.strip() or "?", load_start=os.getloadavg())
    results: dict = {"ingest": {}}
    try:
        if "ingest" in only:
            mr = m["mr2k"]
            results["ingest"]["small MR, 1 association"] = ingest_case(
                args, garage, "mr", [cache / mr["dir"]], mr["count"], mr["bytes"], False)
            ct = m["ct500"]
            results["ingest"]["CT 512x512, 1 association"] = ingest_case(
                args, garage, "ct", [cache / ct["dir"]], ct["count"], ct["bytes"], False)
            sm = m["small20k"]
            results["ingest"]["small, 4 associations"] = ingest_case(
                args, garage, "small", [cache / p for p in sm["parts"]], sm["count"], sm["bytes"], True)
        if "frames" in only:
            results["frames"] = frame_case(args, garage, cache)
    finally:
        garage.stop()
        bench.shutil.rmtree(garage_dir, ignore_errors=True)
    meta["load_end"] = os.getloadavg()
    text = report(results, meta)
    print(text)
    out_md.write_text(text)
    out_md.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results), indent=1, default=str))
    log(f"wrote {out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
