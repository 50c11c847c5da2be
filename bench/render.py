#!/usr/bin/env python3
"""Rendering benchmark: dicom-gateway vs Orthanc + its DICOMweb plugin, in one run.

Run through `bench/run render` (which installs Orthanc, the venv and builds the gateway). Both servers
get the same data, stored with storescu: one CT series of 20 slices of 512x512 16-bit signed pixels
(rescale -1024, window 40/400; realistic noise-and-shapes content, not constant), and the same 20
slices re-encoded in JPEG 2000 lossless (pylibjpeg-openjpeg) in a series of their own. Then, per
server, on one keep-alive connection, 3 warm-up requests then N timed ones (time to the last byte),
each request on a different slice in turn:

  ct_jpeg     GET .../instances/{ct}/rendered            Accept: image/jpeg   (512x512 CT frame)
  j2k_jpeg    GET .../instances/{j2k}/rendered           Accept: image/jpeg   (JPEG 2000 frame)
  thumbnail   GET /studies/{st}/series/{se}/thumbnail    Accept: image/jpeg   (series thumbnail)

Orthanc's DICOMweb plugin (1.7 in Debian 12) has no /thumbnail; its series-level thumbnail is the
rendered series fitted into the same 128x128 viewport (`.../series/{se}/rendered?viewport=128,128`),
which is what a viewer falls back to. The gateway caches thumbnails (the first request renders and
stores it), so its figure is the cached path; the uncached render is the ct_jpeg row at full size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the driver's servers, HTTP client and helpers)

SLICES = 20
JPEG = "image/jpeg"


def make_data(root: Path) -> dict:
    """Writes the CT series and its JPEG 2000 copy; returns their UIDs."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless, generate_uid

    st = {"uid": generate_uid(), "date": "20240101", "time": "120000", "accession": "RENDER1",
          "description": "render bench", "patient_name": "RENDER^BENCH", "patient_id": "RENDER",
          "birth_date": "19700101", "sex": "O", "study_id": "1"}
    series = {}
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:512, 0:512]
    body = ((yy - 256) ** 2 / 230**2 + (xx - 256) ** 2 / 200**2) < 1
    for name, number in (("ct", 1), ("j2k", 2)):
        se = {"uid": generate_uid(), "modality": "CT", "description": name, "number": number,
              "for_uid": generate_uid()}
        sops = []
        for i in range(1, SLICES + 1):
            organ = ((yy - 200 - i) ** 2 + (xx - 300) ** 2) < 60**2
            hu = np.where(body, 40, -1000) + np.where(organ, 60, 0) + rng.normal(0, 12, (512, 512))
            pixels = np.clip(hu + 1024, -2048, 4000).astype(np.int16).tobytes()
            sop = generate_uid()
            path = root / name / f"{i:03d}.dcm"
            bench._write_instance(path, st, se, i, sop, 512, 512, pixels, signed=True)
            if name == "j2k":
                ds = pydicom.dcmread(path)
                ds.compress(JPEG2000Lossless)
                ds.save_as(path, enforce_file_format=True)
            sops.append(sop)
        series[name] = {"uid": se["uid"], "sops": sops}
    return {"study": st["uid"], "series": series}


def store(srv: bench.Server, root: Path) -> None:
    # One storescu per series: a presentation context carries one transfer syntax, so the JPEG 2000
    # files get a run of their own proposing it (-xv).
    for sub, extra in (("ct", []), ("j2k", ["-xv"])):
        cmd = bench.storescu_cmd(srv, [root / sub]) + extra
        r = subprocess.run(cmd, capture_output=True, text=True, env=bench.DCMTK_ENV, timeout=600)
        if r.returncode != 0 or "E:" in r.stderr:
            raise bench.BenchError(f"storescu to {srv.name} failed: {r.stderr[-2000:]}")


def timed(http: bench.Http, paths: list[str], n: int, warmup: int = 3) -> dict:
    times, sizes = [], []
    for k in range(warmup + n):
        status, headers, body, nbytes, t, _ = http.get(paths[k % len(paths)], JPEG)
        if status != 200 or not (headers.get("content-type") or "").startswith(JPEG):
            # Reported in the table (e.g. Orthanc without a JPEG 2000 decoder), not fatal.
            return {"error": f"{status} {headers.get('content-type')}: {(body or b'')[:120]!r}"}
        if k >= warmup:
            times.append(t * 1000)
            sizes.append(nbytes)
    return {"p50_ms": bench.pct(times, 50), "p99_ms": bench.pct(times, 99), "n": n,
            "mean_bytes": int(np.mean(sizes))}


def measure(srv: bench.Server, data: dict, n: int) -> dict:
    http = bench.Http(srv.http_port, 60)
    root = srv.http_root
    st = data["study"]

    def instances(name: str) -> list[str]:
        se = data["series"][name]
        return [f"{root}/studies/{st}/series/{se['uid']}/instances/{sop}/rendered" for sop in se["sops"]]

    se_ct = data["series"]["ct"]["uid"]
    if isinstance(srv, bench.GatewayServer):
        thumb = [f"{root}/studies/{st}/series/{se_ct}/thumbnail"]
    else:
        thumb = [f"{root}/studies/{st}/series/{se_ct}/rendered?viewport=128,128"]
    out = {}
    try:
        out["ct_jpeg"] = timed(http, instances("ct"), n)
        out["j2k_jpeg"] = timed(http, instances("j2k"), n)
        out["thumbnail"] = timed(http, thumb, n)
    finally:
        http.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway-bin", default=str(bench.REPO_DIR / "target/release/dicom-gateway"))
    ap.add_argument("--gateway-unavailable", default=None)
    ap.add_argument("-n", type=int, default=100, help="timed requests per measurement")
    ap.add_argument("--out", default=str(bench.BENCH_DIR / "results-render.md"))
    args = ap.parse_args()
    if args.gateway_unavailable:
        print(f"gateway unavailable: {args.gateway_unavailable}", file=sys.stderr)
        return 1
    bench.QR_DEST_PORT = bench.free_port()  # both servers' configurations name a C-MOVE destination
    load0 = open("/proc/loadavg").read().split()[0]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-render-") as tmp:
        root = Path(tmp) / "data"
        data = make_data(root)
        bench.warm_page_cache(root)
        for srv in (bench.OrthancServer(Path(tmp)), bench.GatewayServer(Path(tmp), args.gateway_bin)):
            try:
                srv.start(60)
                store(srv, root)
                results[srv.name] = measure(srv, data, args.n)
                bench.log(f"{srv.name}: {json.dumps(results[srv.name])}")
            finally:
                srv.stop()
    load1 = open("/proc/loadavg").read().split()[0]
    lines = [f"Rendering, {time.strftime('%Y-%m-%d %H:%M')} UTC, n={args.n} per row, "
             f"load average {load0} -> {load1}", "",
             "| request | gateway p50 / p99 (ms) | Orthanc p50 / p99 (ms) | ratio p50 / p99 | bytes gw / Orthanc |",
             "|---|---|---|---|---|"]
    for key, label in (("ct_jpeg", "rendered JPEG, 512x512 CT frame"),
                       ("j2k_jpeg", "rendered JPEG, JPEG 2000 frame"),
                       ("thumbnail", "series thumbnail")):
        g, o = results["gateway"][key], results["orthanc"][key]

        def cell(r):
            return f"failed: {r['error']}" if "error" in r else f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}"
        ratio = (f"{o['p50_ms'] / g['p50_ms']:.1f}x / {o['p99_ms'] / g['p99_ms']:.1f}x"
                 if "error" not in g and "error" not in o else "-")
        size = f"{g.get('mean_bytes', '-')} / {o.get('mean_bytes', '-')}"
        lines.append(f"| {label} | {cell(g)} | {cell(o)} | {ratio} | {size} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
