#!/usr/bin/env python3
"""OHIF 3 in headless Chromium: time from page load to the first image of a 500-instance CT study, the
same viewer build in front of the gateway and in front of Orthanc + its DICOMweb plugin.

The gateway serves OHIF itself (`/viewer/`, its own DICOMweb at `/dicomweb`, same origin). For Orthanc, a
small same-origin proxy in this script serves the very same files (taken from a gateway that holds no data
and only serves `/viewer/`) and forwards `/dicomweb/` (and `/dicom-web/`, the prefix of Orthanc's own
BulkDataURIs) to Orthanc. The gateway is measured directly and through the same proxy, so the proxy's cost
is visible.

Each run opens a fresh browser context (empty cache), loads `/viewer/viewer?StudyInstanceUIDs=…` and
polls the viewport canvas every animation frame until it shows an image (varied, non-black pixels). From
the Performance API (one timeline, navigation start = 0) it reports:

- first image: when the canvas first showed the image;
- OHIF boot: navigation start to the start of the first DICOMweb request (scripts, start-up, the study);
- DICOMweb busy: the time during which at least one DICOMweb request was in flight before the first image
  (the union of their [start, responseEnd] intervals), i.e. what the server (and the wire) cost the viewer;
- OHIF work: first image minus boot minus DICOMweb busy (its processing of the metadata, decoding and
  rendering of the first frame).

Median of `--runs` runs each. Variants of the gateway: JSON compression on (default) and off, and a second
visit in the same browser context (what Cache-Control / ETag save).

Usage: bench/run viewer [--runs 5] [--quick]   (or: bench/.venv/bin/python bench/viewer.py --gateway-bin …)
Needs: Orthanc + DICOMweb plugin (bench/run installs them), Chromium (/usr/bin/chromium), the pinned
playwright package (bench/requirements.txt), npm (scripts/fetch-viewer).
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import socketserver
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the Orthanc / gateway process wrappers and the CT writer)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
OHIF_VERSION = "3.13.2"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def log(msg: str) -> None:
    print(f"[viewer-bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Data: one CT study, 512x512 16-bit signed, a phantom that changes along the slices
# ---------------------------------------------------------------------------------------------------

def ct_study(cache: Path, count: int) -> tuple[str, Path]:
    done = cache / "done.json"
    if done.exists():
        meta = json.loads(done.read_text())
        if meta.get("count") == count:
            return meta["study_uid"], cache / "files"
    import shutil
    shutil.rmtree(cache, ignore_errors=True)
    files = cache / "files"
    files.mkdir(parents=True)
    st = dict(uid=bench._uid(), date="20240601", time="120000", accession="VIEWBENCH", description="CT viewer bench",
              patient_name="VIEWER^BENCH", patient_id="VIEWBENCH", birth_date="19700101", sex="O", study_id="1")
    se = dict(uid=bench._uid(), for_uid=bench._uid(), number=1, modality="CT", description="axial")
    y, x = np.mgrid[-256:256, -256:256]
    r = np.hypot(x, y)
    for i in range(count):
        body = np.where(r < 200 - 0.1 * i, 1064, 24)  # soft tissue in air, stored values (intercept -1024)
        bone = np.where(np.hypot(x - 60, y + 40) < 30 + (i % 20), 2024, 0)
        pixels = np.maximum(body, bone).astype("<i2").tobytes()
        bench._write_instance(files / f"{i:04d}.dcm", st, se, i + 1, bench._uid(), 512, 512, pixels, True)
    done.write_text(json.dumps({"count": count, "study_uid": st["uid"]}))
    return st["uid"], files


def store(srv: bench.Server, files: Path) -> None:
    cmd = ["storescu", "-aec", srv.ae, "+sd", "+r", "127.0.0.1", str(srv.dimse_port), str(files)]
    subprocess.run(cmd, env=bench.DCMTK_ENV, check=True, capture_output=True, timeout=900)


# ---------------------------------------------------------------------------------------------------
# The same-origin proxy in front of Orthanc
# ---------------------------------------------------------------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


def start_proxy(viewer_port: int, dicomweb_port: int, dicomweb_root: str) -> tuple[http.server.HTTPServer, int]:
    """`/dicomweb/…` and `/dicom-web/…` to the DICOMweb server (under `dicomweb_root`), everything else to
    the viewer host. HTTP/1.1 with keep-alive on both sides; bodies streamed in 64 KB pieces."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            for prefix in ("/dicomweb/", "/dicom-web/"):
                if self.path.startswith(prefix) or self.path == prefix.rstrip("/"):
                    port, path = dicomweb_port, dicomweb_root + self.path[len(prefix) - 1:]
                    break
            else:
                port, path = viewer_port, self.path
            conns = self.server.__dict__.setdefault("conns", threading.local())
            conn = getattr(conns, f"c{port}", None) or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            setattr(conns, f"c{port}", conn)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
            self.send_response(resp.status)
            length = resp.getheader("content-length")
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            if length is None:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while True:
                chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                if not chunk:
                    break
                if length is None:
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                else:
                    self.wfile.write(chunk)
            if length is None:
                self.wfile.write(b"0\r\n\r\n")

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


# ---------------------------------------------------------------------------------------------------
# One measured page load
# ---------------------------------------------------------------------------------------------------

FIRST_IMAGE = """() => {
  const c = document.querySelector('canvas.cornerstone-canvas');
  if (!c || !c.width || !c.height) return false;
  const { data } = c.getContext('2d', { willReadFrequently: true }).getImageData(0, 0, c.width, c.height);
  const seen = new Set();
  let lit = 0, n = 0;
  for (let i = 0; i < data.length; i += 4 * 7) {
    const v = data[i] + data[i + 1] + data[i + 2];
    n++;
    if (v > 30) lit++;
    if (seen.size < 16) seen.add(v);
  }
  return seen.size >= 8 && lit / n > 0.05 ? performance.now() : false;
}"""

TIMINGS = """(firstImage) => performance.getEntriesByType('resource')
  .filter(e => /\\/dicom-?web\\//.test(e.name) && e.startTime < firstImage)
  .map(e => ({ name: e.name, start: e.startTime, end: e.responseEnd, bytes: e.transferSize,
               body: e.encodedBodySize, decoded: e.decodedBodySize }))"""


def load_once(context, url: str, timeout_s: float = 120) -> dict:
    page = context.new_page()
    errors: list[str] = []
    page.on("response", lambda r: r.status >= 400 and errors.append(f"{r.status} {r.url}"))
    page.on("requestfailed", lambda r: errors.append(f"failed {r.url}"))
    page.add_init_script("performance.setResourceTimingBufferSize(100000)")
    page.goto(url)
    first = page.wait_for_function(FIRST_IMAGE, polling="raf", timeout=timeout_s * 1000).json_value()
    entries = page.evaluate(TIMINGS, first)
    page.close()
    spans = sorted((e["start"], e["end"]) for e in entries)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += min(cur_e, first) - cur_s
    boot = spans[0][0] if spans else first
    kinds: dict[str, float] = {}
    for e in entries:
        kind = ("metadata" if "/metadata" in e["name"] else "frames" if "/frames/" in e["name"]
                else "qido")
        kinds[kind] = kinds.get(kind, 0.0) + (e["end"] - e["start"])
    metadata_bytes = sum(e["bytes"] for e in entries if "/metadata" in e["name"])
    return {
        "first_image": first, "boot": boot, "dicomweb_busy": busy, "ohif_work": first - boot - busy,
        "requests": len(entries), "metadata_ms": kinds.get("metadata", 0.0),
        "metadata_wire_bytes": metadata_bytes, "errors": errors,
    }


def measure(browser, origin: str, study_uid: str, runs: int, second_visit: bool = False) -> dict:
    url = f"{origin}/viewer/viewer?StudyInstanceUIDs={study_uid}"
    results = []
    # One warm-up load (not counted): the OS page cache and the server's first requests.
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    load_once(ctx, url)
    ctx.close()
    for _ in range(runs):
        ctx = browser.new_context(viewport={"width": 1400, "height": 900})
        r = load_once(ctx, url)
        if second_visit:
            r = load_once(ctx, url)
        ctx.close()
        results.append(r)
        log(f"  {origin}: first image {r['first_image']:.0f} ms, boot {r['boot']:.0f}, DICOMweb "
            f"{r['dicomweb_busy']:.0f}, OHIF {r['ohif_work']:.0f}, {r['requests']} requests"
            + (f", ERRORS {r['errors'][:3]}" if r["errors"] else ""))
    med = {k: statistics.median(r[k] for r in results) for k in results[0] if k != "errors"}
    med["errors"] = sum(len(r["errors"]) for r in results)
    med["runs"] = results
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway-bin", default=str(REPO_DIR / "target" / "release" / "dicom-gateway"))
    ap.add_argument("--gateway-unavailable", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--count", type=int, default=500, help="CT instances (default 500)")
    ap.add_argument("--ohif-dir", default=str(Path.home() / ".cache" / "dicom-gateway" / f"ohif-{OHIF_VERSION}"))
    ap.add_argument("--out", default=str(BENCH_DIR / "results-viewer.md"))
    args = ap.parse_args()
    if args.gateway_unavailable:
        log(f"no gateway binary: {args.gateway_unavailable}")
        return 1

    subprocess.run([str(REPO_DIR / "scripts" / "fetch-viewer"), args.ohif_dir], check=True)
    # Both servers' configurations name a C-MOVE destination port (unused here), which must be valid.
    bench.QR_DEST_PORT = bench.free_port()
    study_uid, files = ct_study(BENCH_DIR / ".cache" / f"viewer-ct-{args.count}", args.count)
    log(f"CT study {study_uid}: {args.count} instances")

    def gateway(extra: dict) -> bench.GatewayServer:
        srv = bench.GatewayServer(None, args.gateway_bin)
        base_env = srv.env
        srv.env = lambda: {**base_env(), "DICOMGW_VIEWER__DIR": args.ohif_dir, "RUST_LOG": "warn", **extra}
        srv.start(60)
        return srv

    from playwright.sync_api import sync_playwright

    rows = []
    servers: list[bench.Server] = []
    proxies = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"])
            # Orthanc behind the proxy, the viewer files from a gateway holding no data.
            orthanc = bench.OrthancServer(None)
            orthanc.start(60)
            servers.append(orthanc)
            store(orthanc, files)
            viewer_host = gateway({})
            servers.append(viewer_host)
            proxy, proxy_port = start_proxy(viewer_host.http_port, orthanc.http_port, "/dicom-web")
            proxies.append(proxy)
            log("Orthanc (through the proxy)")
            rows.append(("Orthanc 1.10 + DICOMweb (same-origin proxy)",
                         measure(browser, f"http://127.0.0.1:{proxy_port}", study_uid, args.runs)))
            orthanc.stop()
            servers.remove(orthanc)

            for label, extra, via_proxy, second in [
                ("gateway, direct", {}, False, False),
                ("gateway, direct, second visit (browser cache)", {}, False, True),
                ("gateway, direct, JSON compression off", {"DICOMGW_HTTP__COMPRESSION": "false"}, False, False),
                ("gateway through the same proxy", {}, True, False),
            ]:
                gw = gateway(extra)
                servers.append(gw)
                store(gw, files)
                origin = f"http://127.0.0.1:{gw.http_port}"
                if via_proxy:
                    proxy, port = start_proxy(viewer_host.http_port, gw.http_port, "/dicomweb")
                    proxies.append(proxy)
                    origin = f"http://127.0.0.1:{port}"
                log(label)
                rows.append((label, measure(browser, origin, study_uid, args.runs, second_visit=second)))
                gw.stop()
                servers.remove(gw)
            browser.close()
    finally:
        for proxy in proxies:
            proxy.shutdown()
        for srv in servers:
            srv.stop()

    orthanc_row = rows[0][1]
    lines = [
        f"OHIF {OHIF_VERSION} in headless Chromium, {args.count}-instance CT (512x512, 16-bit), "
        f"median of {args.runs} runs (fresh browser context each), ms:",
        "",
        "| server | first image | OHIF boot (to 1st DICOMweb request) | DICOMweb busy until first image | "
        "OHIF work | metadata request(s) | metadata on the wire | requests | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, m in rows:
        lines.append(
            f"| {label} | {m['first_image']:.0f} | {m['boot']:.0f} | {m['dicomweb_busy']:.0f} | "
            f"{m['ohif_work']:.0f} | {m['metadata_ms']:.0f} | {m['metadata_wire_bytes'] / 1024:.0f} KB | "
            f"{m['requests']:.0f} | {m['errors']} |")
    direct = rows[1][1]
    lines += ["", f"DICOMweb busy, Orthanc / gateway direct: "
                  f"{orthanc_row['dicomweb_busy'] / max(direct['dicomweb_busy'], 0.001):.1f}x; first image "
                  f"{direct['first_image']:.0f} ms vs Orthanc {orthanc_row['first_image']:.0f} ms."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
