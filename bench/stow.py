#!/usr/bin/env python3
"""STOW-RS benchmark: the gateway vs Orthanc + its DICOMweb plugin, storing the 500-instance 512x512 CT study of
bench.py's data set over DICOMweb, in one request of 500 instances and in 50 requests of 10 (one after another,
on one keep-alive connection).

Run it through `bench/run stow` (venv, peers, gateway build). Both servers get exactly the same request bytes
(`multipart/related; type="application/dicom"`, one Part-10 file per part, with a Content-Length), streamed
from the page cache by http.client. Each case runs on a fresh server instance (fresh data directory), the
servers taking turns (Orthanc, then the gateway) for `--rounds` rounds; the ratio is the median of the rounds'
own ratios. The server's VmRSS is sampled every 10 ms during the requests (peak and growth). What was stored is
checked: every instance in the response's ReferencedSOPSequence, and the server's own count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time
from pathlib import Path

import bench
from bench import BENCH_DIR, BenchError, GatewayServer, OrthancServer, RssSampler, log

BOUNDARY = "benchstowboundary0123456789"
CTYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
# Only the CT study is needed; the other sets of bench.py's generator are kept to one instance.
PROFILE = dict(mr_studies=1, mr_per_study=1, ct_count=500, small_studies=1, small_per_study=1, parts=1)
QUICK_PROFILE = dict(PROFILE, ct_count=50)


def part_head() -> bytes:
    return f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()


def request_length(files: list[Path]) -> int:
    head = len(part_head())
    return sum(head + f.stat().st_size + 2 for f in files) + len(f"--{BOUNDARY}--\r\n")


def send(conn: http.client.HTTPConnection, path: str, files: list[Path]) -> tuple[int, bytes]:
    """POSTs the files as one multipart/related request, streamed from disk; returns (status, body)."""
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", CTYPE)
    conn.putheader("Accept", "application/dicom+json")
    conn.putheader("Content-Length", str(request_length(files)))
    conn.endheaders()
    head = part_head()
    for f in files:
        conn.send(head)
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                conn.send(chunk)
        conn.send(b"\r\n")
    conn.send(f"--{BOUNDARY}--\r\n".encode())
    resp = conn.getresponse()
    return resp.status, resp.read()


def referenced_count(body: bytes) -> int:
    try:
        return len(json.loads(body).get("00081199", {}).get("Value", []))
    except (ValueError, AttributeError):
        return -1


def stow_case(srv, files: list[Path], per_request: int, nbytes: int) -> dict:
    root = srv.http_root.rstrip("/")
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=600)
    batches = [files[i:i + per_request] for i in range(0, len(files), per_request)]
    statuses, referenced = [], 0
    with RssSampler(srv.pid) as rss:
        t0 = time.perf_counter()
        for batch in batches:
            status, body = send(conn, f"{root}/studies", batch)
            statuses.append(status)
            referenced += referenced_count(body)
        wall = time.perf_counter() - t0
    conn.close()
    stored = srv.stored_instances()
    res = dict(wall_s=wall, requests=len(batches), count=len(files), inst_per_s=len(files) / wall,
               mb_per_s=nbytes / wall / 1e6, statuses=sorted(set(statuses)), referenced=referenced, stored=stored,
               rss_peak_mb=rss.peak_mb, rss_growth_mb=rss.growth_mb,
               hwm_mb=(bench.read_status_kb(srv.pid, "VmHWM") or 0) / 1024)
    ok = statuses == [200] * len(batches) and referenced == len(files) and stored == len(files)
    res["ok"] = ok
    log(f"  {srv.name}: {len(files)} in {len(batches)} request(s): {wall:.2f}s = {res['inst_per_s']:.0f}/s, "
        f"{res['mb_per_s']:.0f} MB/s, RSS peak {rss.peak_mb:.0f} MB (+{rss.growth_mb:.0f}), statuses "
        f"{res['statuses']}, referenced {referenced}, stored {stored}{'' if ok else '  <-- CHECK FAILED'}")
    return res


def run_case(kind: str, args, files, per_request: int, nbytes: int) -> dict:
    srv = OrthancServer(args.work_root) if kind == "orthanc" else GatewayServer(args.work_root, args.gateway_bin)
    bench.wait_disk_quiet()
    srv.start(args.ready_timeout)
    try:
        return stow_case(srv, files, per_request, nbytes)
    finally:
        srv.stop()
        srv.cleanup(keep=False)


def report(results: dict, meta: dict, count: int) -> str:
    lines = [f"# STOW-RS: dicom-gateway vs {meta['orthanc']}", "",
             f"{meta['date']}, {meta['host']}, gateway binary `{meta['gateway_bin']}`; load average "
             f"{meta['load_start'][0]:.2f} at start, {meta['load_end'][0]:.2f} at end. {count} CT instances "
             f"512x512 16-bit ({meta['mb']:.0f} MB), median of {meta['rounds']} rounds (ratio: median of the "
             "rounds' own ratios).", "",
             "| case | gateway inst/s | Orthanc inst/s | ratio | gateway MB/s | Orthanc MB/s | gateway RSS peak "
             "(growth) | Orthanc RSS peak (growth) | target ≥ 2x |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case, rounds in results.items():
        gw = [r["gateway"] for r in rounds if r.get("gateway")]
        oc = [r["orthanc"] for r in rounds if r.get("orthanc")]
        ratios = [r["gateway"]["inst_per_s"] / r["orthanc"]["inst_per_s"] for r in rounds
                  if r.get("gateway") and r.get("orthanc")]
        med = lambda xs, k: statistics.median(x[k] for x in xs) if xs else float("nan")  # noqa: E731
        ratio = statistics.median(ratios) if ratios else float("nan")
        lines.append(
            f"| {case} | {med(gw, 'inst_per_s'):.0f} | {med(oc, 'inst_per_s'):.0f} | **{ratio:.2f}x** | "
            f"{med(gw, 'mb_per_s'):.0f} | {med(oc, 'mb_per_s'):.0f} | {max((x['rss_peak_mb'] for x in gw), default=0):.0f} MB "
            f"(+{max((x['rss_growth_mb'] for x in gw), default=0):.0f}) | "
            f"{max((x['rss_peak_mb'] for x in oc), default=0):.0f} MB (+{max((x['rss_growth_mb'] for x in oc), default=0):.0f}) | "
            f"{'met' if ratio >= 2 else 'NOT met'} |")
    lines += ["", "Rounds (inst/s, gateway / Orthanc):", ""]
    for case, rounds in results.items():
        cells = [f"{r['gateway']['inst_per_s']:.0f} / {r['orthanc']['inst_per_s']:.0f}"
                 for r in rounds if r.get("gateway") and r.get("orthanc")]
        lines.append(f"- {case}: " + ", ".join(cells))
    failed = [(case, k) for case, rounds in results.items() for r in rounds for k, v in r.items() if not v["ok"]]
    if failed:
        lines += ["", f"Checks failed (status, referenced or stored count): {failed}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="50 instances, one round")
    ap.add_argument("--gateway-bin", default=str(bench.REPO_DIR / "target/release/dicom-gateway"))
    ap.add_argument("--gateway-unavailable", default=None, metavar="REASON")
    ap.add_argument("--work-root", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.gateway_unavailable:
        log(f"gateway unavailable: {args.gateway_unavailable}")
        return 1
    bench.QR_DEST_PORT = bench.free_port()  # the peers both servers are configured with (unused here)
    prof = QUICK_PROFILE if args.quick else PROFILE
    rounds = 1 if args.quick else args.rounds
    cache = BENCH_DIR / ".cache" / ("stow-quick" if args.quick else "stow")
    out_md = Path(args.out) if args.out else BENCH_DIR / ("results-stow-quick.md" if args.quick else "results-stow.md")
    m = bench.generate_dataset(cache, prof)
    bench.warm_page_cache(cache)
    ct = m["ct500"]
    files = sorted((cache / ct["dir"]).glob("*.dcm"))
    if len(files) != ct["count"]:
        raise BenchError(f"expected {ct['count']} CT files, found {len(files)}")
    count = len(files)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), host=f"{os.uname().nodename}, {os.cpu_count()} cores",
                load_start=os.getloadavg(), gateway_bin=args.gateway_bin, rounds=rounds, mb=ct["bytes"] / 1e6)
    probe = OrthancServer(args.work_root)
    probe.start(args.ready_timeout)
    meta["orthanc"] = probe.version()
    probe.stop()
    probe.cleanup(keep=False)
    cases = {f"{count} instances, 1 request": count, f"{count} instances, {count // 10} requests of 10": 10}
    results: dict = {case: [] for case in cases}
    for n in range(rounds):
        for case, per_request in cases.items():
            log(f"--- round {n + 1}/{rounds}: {case}")
            results[case].append({kind: run_case(kind, args, files, per_request, ct["bytes"])
                                  for kind in ("orthanc", "gateway")})
    meta["load_end"] = os.getloadavg()
    text = report(results, meta, count)
    print(text)
    out_md.write_text(text)
    out_md.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results), indent=1, default=str))
    log(f"wrote {out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
