#!/usr/bin/env python3
"""Benchmark driver: dicom-gateway vs Orthanc (+DICOMweb plugin) vs DCMTK storescp.

Run it through bench/run (which installs the peers, the venv and builds the gateway).
Everything runs on loopback; every server gets a fresh temporary data directory and
the servers are benchmarked one after another (never concurrently).

Phases per server:
  A. fresh server: C-STORE 2,000 small MR instances, one association (storescu +sd +r)
  B. fresh server: C-STORE the 500-instance 512x512 CT study, one association, then
     20,000 small instances (200 studies) with 4 parallel storescu processes,
     then QIDO latencies, then WADO-RS on the CT study (gateway and Orthanc only),
     then DIMSE query/retrieve (phase "qr"): C-FIND study level over everything stored,
     C-MOVE and C-GET of the CT study (gateway and Orthanc only).
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import http.client
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import requests

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DATA_VERSION = 3

PROFILES = {
    "full": dict(
        mr_studies=10, mr_per_study=200,        # 2,000 MR 64x64
        ct_count=500,                           # 500 CT 512x512, one study/series
        small_studies=200, small_per_study=100,  # 20,000 small, 200 studies
        parts=4,
        qido_warmup=5, qido_n=50,
        meta_n=10, frame_n=20, retrieve_n=3,
        qr_warmup=2, qr_find_n=10, qr_n=3,
        ingest_rounds=5,
    ),
    "quick": dict(
        mr_studies=4, mr_per_study=50,
        ct_count=50,
        small_studies=20, small_per_study=100,
        parts=4,
        qido_warmup=2, qido_n=10,
        meta_n=3, frame_n=5, retrieve_n=1,
        qr_warmup=1, qr_find_n=3, qr_n=1,
        ingest_rounds=1,
    ),
}

SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
}
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPL_CLASS_UID = "1.2.826.0.1.3680043.8.498.1"  # pydicom's root; fine for synthetic data

FAMILY = ["ANDERSON", "BAKER", "CARTER", "DIAZ", "EVANS", "FISCHER", "GARCIA", "HUANG",
          "IVANOV", "JOHANSSON", "KOWALSKI", "LAMBERT", "MORENO", "NAKAMURA", "OKAFOR",
          "PETERSEN", "QUINN", "ROSSI", "SCHMIDT", "TANAKA"]
GIVEN = ["ALICE", "BRUNO", "CHLOE", "DAVID", "ELENA", "FELIX", "GRACE", "HUGO", "IRIS", "JONAS"]

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")

# Phase qr: the calling AE titles of findscu / movescu / getscu, and the C-MOVE destination (a DCMTK
# storescp --ignore on QR_DEST_PORT, which receives the data but writes nothing).
QR_DEST_AE = "BENCHDEST"
QR_PEERS = ["FINDSCU", "MOVESCU", "GETSCU", QR_DEST_AE]
QR_DEST_PORT = 0  # set in main() to a free port

ACCEPT_DICOM_JSON = "application/dicom+json"
ACCEPT_STUDY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_FRAME = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------

def _uid() -> str:
    from pydicom.uid import generate_uid
    return generate_uid()


def _write_instance(path: Path, st: dict, se: dict, inst_no: int, sop_uid: str,
                    rows: int, cols: int, pixels: bytes, signed: bool) -> int:
    from pydicom.dataset import Dataset, FileMetaDataset

    mod = se["modality"]
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = SOP_CLASS[mod]
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = EXPLICIT_VR_LE
    fm.ImplementationClassUID = IMPL_CLASS_UID
    fm.ImplementationVersionName = "DICOMGW_BENCH"

    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if mod in ("CT", "MR") else "OTHER"]
    ds.InstanceCreationDate = st["date"]
    ds.SOPClassUID = SOP_CLASS[mod]
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = st["date"]
    ds.SeriesDate = st["date"]
    ds.ContentDate = st["date"]
    ds.StudyTime = st["time"]
    ds.SeriesTime = st["time"]
    ds.ContentTime = st["time"]
    ds.AccessionNumber = st["accession"]
    ds.Modality = mod
    ds.Manufacturer = "BENCH"
    ds.InstitutionName = "Synthetic Hospital"
    ds.ReferringPhysicianName = "REF^PHYSICIAN"
    ds.StudyDescription = st["description"]
    ds.SeriesDescription = se["description"]
    ds.PatientName = st["patient_name"]
    ds.PatientID = st["patient_id"]
    ds.PatientBirthDate = st["birth_date"]
    ds.PatientSex = st["sex"]
    if mod in ("CT", "MR"):
        ds.SliceThickness = "1.0"
    if mod == "CT":
        ds.KVP = "120"
    ds.StudyInstanceUID = st["uid"]
    ds.SeriesInstanceUID = se["uid"]
    ds.StudyID = st["study_id"]
    ds.SeriesNumber = se["number"]
    ds.InstanceNumber = inst_no
    if mod in ("CT", "MR"):
        ds.ImagePositionPatient = [0.0, 0.0, float(inst_no)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.FrameOfReferenceUID = se["for_uid"]
        ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [0.5, 0.5]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    if mod == "CT":
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
    ds.PixelData = pixels
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def _small_pixels(inst_no: int, size: int = 64) -> bytes:
    y, x = np.mgrid[0:size, 0:size]
    img = ((x * 37 + y * 11 + inst_no * 101) % 4096).astype(np.uint16)
    return img.tobytes()


def _write_small_study(args) -> tuple[int, int]:
    """Worker: write all instances of one small study. Returns (count, bytes)."""
    root, st = args
    root = Path(root)
    n = 0
    nbytes = 0
    for se in st["series"]:
        for i in range(se["count"]):
            inst_no = i + 1
            p = root / st["dir"] / f"se{se['number']:02d}" / f"{inst_no:05d}.dcm"
            nbytes += _write_instance(p, st, se, inst_no, _uid(), 64, 64,
                                      _small_pixels(inst_no + se["number"] * 1000), False)
            n += 1
    return n, nbytes


def _rand_date(rng: random.Random, start: _dt.date, end: _dt.date) -> str:
    d = start + _dt.timedelta(days=rng.randrange((end - start).days + 1))
    return d.strftime("%Y%m%d")


def _study(rng, uid_counter: int, patient_id: str, patient_name: str, date: str, descr: str) -> dict:
    return dict(
        uid=_uid(), patient_id=patient_id, patient_name=patient_name,
        birth_date=_rand_date(rng, _dt.date(1940, 1, 1), _dt.date(2005, 12, 31)),
        sex=rng.choice(["F", "M"]), date=date,
        time=f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}",
        accession=f"ACC{uid_counter:07d}", study_id=f"{uid_counter % 100000}", description=descr,
        series=[],
    )


def _split(total: int, k: int) -> list[int]:
    base, extra = divmod(total, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def generate_dataset(cache: Path, prof: dict) -> dict:
    """Generate (or reuse) the synthetic data set. Returns the manifest."""
    manifest_path = cache / "manifest.json"
    want = {k: prof[k] for k in ("mr_studies", "mr_per_study", "ct_count",
                                 "small_studies", "small_per_study", "parts")}
    if manifest_path.exists():
        try:
            m = json.loads(manifest_path.read_text())
            if m.get("version") == DATA_VERSION and m.get("params") == want and m.get("complete"):
                log(f"reusing cached data set {cache}")
                return m
        except Exception:
            pass
    if cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    t0 = time.monotonic()
    rng = random.Random(20240601)
    counter = 0

    # --- 2,000 MR (several studies, 2 series each)
    mr_studies = []
    for s in range(prof["mr_studies"]):
        counter += 1
        st = _study(rng, counter, f"MRPAT{s:04d}", f"MRSMALL^PATIENT{s:02d}",
                    _rand_date(rng, _dt.date(2023, 1, 1), _dt.date(2023, 12, 31)), "MR bench study")
        st["dir"] = f"st{s:03d}"
        for k, cnt in enumerate(_split(prof["mr_per_study"], 2)):
            st["series"].append(dict(uid=_uid(), for_uid=_uid(), number=k + 1, modality="MR",
                                     description=f"MR series {k + 1}", count=cnt))
        mr_studies.append(st)

    # --- 20,000 small, 200 studies, 100 instances each, 2-4 series, varied attributes
    patients = []
    n_patients = max(1, prof["small_studies"] // 2)
    for p in range(n_patients):
        patients.append((f"PID{p:05d}", f"{FAMILY[p % len(FAMILY)]}^{GIVEN[(p // len(FAMILY)) % len(GIVEN)]}"))
    small_studies = []
    mods = ["CT", "MR", "US", "CR"]
    for s in range(prof["small_studies"]):
        counter += 1
        pid, pname = patients[s % n_patients]
        main_mod = mods[s % 4]
        st = _study(rng, counter, pid, pname,
                    _rand_date(rng, _dt.date(2015, 1, 1), _dt.date(2024, 12, 31)),
                    f"{main_mod} routine study")
        st["dir"] = f"part{s % prof['parts']}/st{s:04d}"
        nser = rng.choice([2, 3, 4])
        series_mods = [main_mod] * nser
        if rng.random() < 0.15:  # some mixed-modality studies
            series_mods[-1] = rng.choice([m for m in mods if m != main_mod])
        for k, cnt in enumerate(_split(prof["small_per_study"], nser)):
            st["series"].append(dict(uid=_uid(), for_uid=_uid(), number=k + 1, modality=series_mods[k],
                                     description=f"{series_mods[k]} series {k + 1}", count=cnt))
        small_studies.append(st)

    # --- CT large study
    counter += 1
    ct = _study(rng, counter, "CTPAT0001", "LARGE^CTSTUDY", "20240115", "CT large study")
    ct["dir"] = "ct"
    ct["series"].append(dict(uid=_uid(), for_uid=_uid(), number=1, modality="CT",
                             description="CT 512x512", count=prof["ct_count"]))

    # write MR + small in 2 processes
    jobs = [(str(cache / "mr2k"), st) for st in mr_studies] + \
           [(str(cache / "small20k"), st) for st in small_studies]
    log(f"generating {sum(sum(se['count'] for se in st['series']) for _, st in jobs)} small instances "
        f"+ {prof['ct_count']} CT instances into {cache} (one-time)")
    with multiprocessing.Pool(max(1, min(2, os.cpu_count() or 1))) as pool:
        res = pool.map(_write_small_study, jobs, chunksize=4)
    mr_res = res[:len(mr_studies)]
    small_res = res[len(mr_studies):]

    # CT: 512x512 signed 16-bit phantom varying per slice
    y, x = np.mgrid[0:512, 0:512]
    r2 = (x - 256) ** 2 + (y - 256) ** 2
    base = np.where(r2 < 200 ** 2, 1024 + 40, 0).astype(np.int32)
    se = ct["series"][0]
    ct_instances = []
    ct_bytes = 0
    for i in range(prof["ct_count"]):
        inst_no = i + 1
        img = base + ((x * 3 + y * 5 + inst_no * 7) % 64) + np.where(r2 < (50 + i % 100) ** 2, 300, 0)
        sop = _uid()
        ct_instances.append(sop)
        ct_bytes += _write_instance(cache / "ct500" / f"{inst_no:05d}.dcm", ct, se, inst_no, sop,
                                    512, 512, img.astype(np.int16).tobytes(), True)

    small_meta = [{k: st[k] for k in ("uid", "patient_id", "patient_name", "date")} |
                  {"modalities": sorted({se["modality"] for se in st["series"]}),
                   "series_modalities": [se["modality"] for se in st["series"]]}
                  for st in small_studies]
    m = dict(
        version=DATA_VERSION, params=want, complete=True,
        generated=time.strftime("%Y-%m-%dT%H:%M:%S"),
        mr2k=dict(dir="mr2k", count=sum(r[0] for r in mr_res), bytes=sum(r[1] for r in mr_res),
                  studies=len(mr_studies)),
        small20k=dict(dir="small20k", parts=[f"small20k/part{i}" for i in range(prof["parts"])],
                      count=sum(r[0] for r in small_res), bytes=sum(r[1] for r in small_res),
                      studies=small_meta),
        ct500=dict(dir="ct500", count=prof["ct_count"], bytes=ct_bytes, study_uid=ct["uid"],
                   series_uid=se["uid"], instances=ct_instances, patient_id=ct["patient_id"],
                   patient_name=ct["patient_name"], date=ct["date"]),
    )
    manifest_path.write_text(json.dumps(m, indent=1))
    log(f"data set ready in {time.monotonic() - t0:.1f}s")
    return m


def warm_page_cache(cache: Path) -> None:
    """Read every cached file once so that no server pays for cold client-side reads."""
    t0 = time.monotonic()
    n = 0
    for root, _dirs, files in os.walk(cache):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                while fh.read(1 << 20):
                    pass
            n += 1
    log(f"page cache warmed ({n} files, {time.monotonic() - t0:.1f}s)")


def probe_servers_disk(args) -> float:
    """`fsync_probe` where the servers keep their data (on a server file system made for it)."""
    if not args.fs_per_server:
        return fsync_probe(args.work_root)
    fs = server_file_system()
    if fs is None:
        return fsync_probe(args.work_root)
    try:
        return fsync_probe(str(fs / "mnt"))
    finally:
        subprocess.run(["umount", str(fs / "mnt")], capture_output=True)


def fsync_probe(work_root: str | None, n: int = 200) -> float:
    """Median ms to create, write 8 KB and fsync one file where the servers keep their data."""
    d = Path(tempfile.mkdtemp(prefix="bench-fsync-", dir=work_root))
    times = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            fd = os.open(d / f"{i}", os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, b"x" * 8192)
            os.fsync(fd)
            os.close(fd)
            times.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return pct(times, 50) * 1000


def build_queries(m: dict) -> list[dict]:
    """QIDO queries with their expected result counts (computed from the manifest).

    Values are chosen so that no character needs percent-encoding: the very same literal
    URL is valid for both servers (Orthanc does not percent-decode QIDO values). '*' is
    a legal literal in a URI query (RFC 3986 sub-delims) and is sent as is.
    """
    studies = m["small20k"]["studies"]
    ct = m["ct500"]
    all_studies = studies + [dict(uid=ct["study_uid"], patient_id=ct["patient_id"],
                                  patient_name=ct["patient_name"], date=ct["date"],
                                  modalities=["CT"], series_modalities=["CT"])]
    pid = studies[min(7, len(studies) - 1)]["patient_id"]
    family = studies[min(3, len(studies) - 1)]["patient_name"].split("^")[0]
    d0, d1 = "20190101", "20191231"
    n_mr_series = sum(s["series_modalities"].count("MR") for s in all_studies)
    total_instances = m["small20k"]["count"] + ct["count"]
    return [
        dict(key="all_studies", label="QIDO /studies (all)", path="/studies", query="",
             expect=len(all_studies)),
        dict(key="studies_limit50", label="QIDO /studies?limit=50", path="/studies", query="limit=50",
             expect=min(50, len(all_studies))),
        dict(key="patient_id", label=f"QIDO PatientID={pid}", path="/studies", query=f"PatientID={pid}",
             expect=sum(1 for s in all_studies if s["patient_id"] == pid)),
        dict(key="patient_name", label=f"QIDO PatientName={family}*", path="/studies",
             query=f"PatientName={family}*",
             expect=sum(1 for s in all_studies if s["patient_name"].startswith(family))),
        dict(key="study_date", label=f"QIDO StudyDate={d0}-{d1}", path="/studies",
             query=f"StudyDate={d0}-{d1}", expect=sum(1 for s in all_studies if d0 <= s["date"] <= d1)),
        dict(key="modalities_ct", label="QIDO ModalitiesInStudy=CT", path="/studies",
             query="ModalitiesInStudy=CT", expect=sum(1 for s in all_studies if "CT" in s["modalities"])),
        dict(key="series_mr", label="QIDO /series?Modality=MR", path="/series", query="Modality=MR",
             expect=n_mr_series),
        dict(key="instances_limit100", label="QIDO /instances?limit=100", path="/instances",
             query="limit=100", expect=min(100, total_instances)),
    ]


# --------------------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


class RssSampler:
    """Samples VmRSS of one process every `interval` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.010):
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self.start_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            v = read_status_kb(self.pid, "VmRSS")
            if v is not None:
                self.peak_kb = max(self.peak_kb, v)
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start_kb = read_status_kb(self.pid, "VmRSS") or 0
        self.peak_kb = self.start_kb
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        v = read_status_kb(self.pid, "VmRSS")
        if v is not None:
            self.peak_kb = max(self.peak_kb, v)
        return False

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024.0

    @property
    def growth_mb(self) -> float:
        return (self.peak_kb - self.start_kb) / 1024.0


def echo_ok(ae: str, port: int) -> bool:
    r = subprocess.run(["echoscu", "-to", "5", "-ta", "5", "-td", "5", "-aet", "BENCHSCU", "-aec", ae,
                        "127.0.0.1", str(port)], env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
    return r.returncode == 0


def tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])
    except FileNotFoundError:
        return "(no log)"


# --------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------

class Server:
    name = "?"
    ae = "?"
    http_root: str | None = None

    def __init__(self, work_root: Path | None):
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-", dir=work_root))
        self.dimse_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "server.log"
        self._logf = None
        self.fs: Path | None = None  # a file system of its own (see `server_file_system`)

    # subclasses: command(), env(), wait_ready()
    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict:
        return dict(os.environ)

    def start(self, ready_timeout: float) -> None:
        self._logf = open(self.log_path, "ab")
        cmd = self.command()
        log(f"starting {self.name}: {' '.join(cmd)}")
        try:
            self.proc = subprocess.Popen(cmd, env=self.env(), stdout=self._logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir, start_new_session=True)
        except OSError as e:
            raise BenchError(f"cannot start {self.name}: {e}") from e
        deadline = time.monotonic() + ready_timeout
        last = "no answer yet"
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with code {self.proc.returncode} during start-up; "
                                 f"log tail:\n{tail(self.log_path)}")
            try:
                ok, last = self.ready()
                if ok:
                    break
            except Exception as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{self.name} not ready after {ready_timeout:.0f}s (last check: {last}); "
                                 f"log tail:\n{tail(self.log_path)}")
            time.sleep(0.2)
        log(f"{self.name} ready (pid {self.proc.pid}, dimse {self.dimse_port}, http {self.http_port})")

    def ready(self) -> tuple[bool, str]:
        ok = echo_ok(self.ae, self.dimse_port)
        return ok, "C-ECHO ok" if ok else f"C-ECHO to {self.ae} failed"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            rc = self.proc.returncode if self.proc else None
            raise BenchError(f"{self.name} is not running (exit code {rc}); log tail:\n{tail(self.log_path)}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        elif self.proc is not None:
            # leader gone; make sure no forked child of ours lingers in its process group
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        if self._logf:
            self._logf.close()
            self._logf = None

    def cleanup(self, keep: bool) -> None:
        """Schedules the work dir for deletion at the end of the run (see `remove_work_dirs`); a
        file system of the server's own is unmounted now (its image is deleted at exit)."""
        if keep:
            if self.fs:
                SERVER_FILE_SYSTEMS.remove(self.fs)
            log(f"kept {self.name} work dir {self.workdir}")
        elif self.fs:
            subprocess.run(["umount", str(self.fs / "mnt")], capture_output=True)
        else:
            WORK_DIRS_TO_REMOVE.append(self.workdir)


# Servers' work dirs are deleted only once every server has run. Deleting tens of thousands of files
# makes file creation on the same file system slower for minutes afterwards (ext4 without a journal,
# as on these VMs, skips inodes freed in the last 60-360 s when it allocates one: `recently_deleted`
# in fs/ext4/ialloc.c), so the server after a cleanup would pay for the previous server's data.
WORK_DIRS_TO_REMOVE: list = []


def make_file_system(base: Path, size_gb: int, image: Path | None = None) -> Path:
    """Makes and mounts an ext4 file system (with its journal, as deployed servers have) on a loop
    image, a new sparse one in `base` unless `image` is given; its inode tables and journal are
    initialised by mkfs, not by a kernel thread writing in the background while a server is measured.
    Returns the mount point, `base`/mnt."""
    mnt = base / "mnt"
    mnt.mkdir()
    if image is None:
        image = base / "fs.img"
        with open(image, "wb") as f:
            f.truncate(size_gb << 30)
    # nodiscard: mkfs keeps the image's blocks (on a file it would punch them out of it).
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                    str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
    return mnt


def unmount_file_system(base: Path) -> None:
    subprocess.run(["umount", str(base / "mnt")], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def fresh_file_system(size_gb: int = 16) -> str | None:
    """One fresh file system for every server of the run (`--one-fs`), removed at exit. Every run
    then starts on a file system no earlier run has deleted files from (see WORK_DIRS_TO_REMOVE).
    Returns None (servers use $TMPDIR) if the loop mount fails."""
    base = Path(tempfile.mkdtemp(prefix="dgw-bench-fs-"))
    try:
        mnt = make_file_system(base, size_gb)
    except (OSError, subprocess.CalledProcessError) as e:
        log(f"no fresh file system for the servers ({e}); using $TMPDIR")
        shutil.rmtree(base, ignore_errors=True)
        return None

    def unmount() -> None:
        remove_work_dirs()
        unmount_file_system(base)

    atexit.register(unmount)
    log(f"fresh ext4 file system at {mnt} ({size_gb} GB sparse loop image)")
    return str(mnt)


# File systems made for one server each (see `server_file_system`), unmounted when the server is done,
# removed at exit; and the one image they are made on in turn.
SERVER_FILE_SYSTEMS: list = []
SERVER_IMAGE: list = []


def server_image(size_gb: int) -> Path:
    """The image every server's file system is made on in turn, written through once (zeros) so that
    no server writes to blocks that neither the root file system nor the VM's disk has allocated
    yet: on sparse images, a server's rate depended on how much the run had written before it."""
    if not SERVER_IMAGE:
        path = Path(tempfile.mkdtemp(prefix="dgw-bench-img-")) / "server.img"
        zeros = b"\0" * (16 << 20)
        with open(path, "wb") as f:
            for _ in range((size_gb << 30) // len(zeros)):
                f.write(zeros)
            f.flush()
            os.fsync(f.fileno())
        SERVER_IMAGE.append(path)
    return SERVER_IMAGE[0]


def server_file_system(size_gb: int = 8, reuse: bool = True) -> Path | None:
    """A fresh file system for one server instance: on one file system for the whole run, a server
    paid for what the servers before it had left (see bench/README.md). Made on the run's one
    written-through image (`server_image`), or, with `reuse` False (--keep), a sparse image of its own."""
    base = Path(tempfile.mkdtemp(prefix="dgw-bench-srvfs-"))
    try:
        make_file_system(base, size_gb, server_image(size_gb) if reuse else None)
    except (OSError, subprocess.CalledProcessError) as e:
        log(f"no fresh file system for this server ({e}); using $TMPDIR")
        shutil.rmtree(base, ignore_errors=True)
        return None
    SERVER_FILE_SYSTEMS.append(base)
    return base


@atexit.register
def remove_server_file_systems() -> None:
    for base in SERVER_FILE_SYSTEMS:
        unmount_file_system(base)
    SERVER_FILE_SYSTEMS.clear()
    for image in SERVER_IMAGE:
        shutil.rmtree(image.parent, ignore_errors=True)
    SERVER_IMAGE.clear()


@atexit.register
def remove_work_dirs() -> None:
    for d in WORK_DIRS_TO_REMOVE:
        shutil.rmtree(d, ignore_errors=True)
    WORK_DIRS_TO_REMOVE.clear()

    # ---- counting what was stored (for verification)
    def stored_instances(self) -> int | None:
        return None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{self.http_root}{path}"


class StorescpServer(Server):
    name = "storescp"
    ae = "STORESCP"

    def __init__(self, work_root, fork: bool):
        super().__init__(work_root)
        self.fork = fork
        self.outdir = self.workdir / "out"
        self.outdir.mkdir()

    def command(self):
        cmd = ["storescp"]
        if self.fork:
            cmd.append("--fork")
        # +B: write received data exactly as read (closest to "raw disk")
        return cmd + ["+B", "-aet", self.ae, "-od", str(self.outdir), str(self.dimse_port)]

    def env(self):
        return dict(DCMTK_ENV)

    def stored_instances(self):
        return sum(len(f) for _, _, f in os.walk(self.outdir))


class OrthancServer(Server):
    name = "orthanc"
    ae = "ORTHANC"
    http_root = "/dicom-web"

    def __init__(self, work_root):
        super().__init__(work_root)
        cfg = {
            "Name": "bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.ae,
            "DicomPort": self.dimse_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            # Query/retrieve peers (phase qr): the SCUs and the C-MOVE destination.
            "DicomModalities": {ae.lower(): [ae, "127.0.0.1", QR_DEST_PORT] for ae in QR_PEERS},
        }
        self.cfg_path = self.workdir / "orthanc.json"
        self.cfg_path.write_text(json.dumps(cfg, indent=1))

    def command(self):
        return ["Orthanc", str(self.cfg_path)]

    def env(self):
        # Orthanc's DICOM layer is DCMTK: without TCP_NODELAY=1 in *its* environment its
        # C-STORE responses wait on Nagle + delayed ACK (~20 inst/s instead of hundreds).
        return dict(DCMTK_ENV)

    def ready(self):
        r = requests.get(f"http://127.0.0.1:{self.http_port}/system", timeout=2)
        if r.status_code != 200:
            return False, f"GET /system -> {r.status_code}"
        # a real association, never a bare TCP connect (Orthanc stalls 30 s on idle sockets)
        return super().ready()

    def stored_instances(self):
        r = requests.get(f"http://127.0.0.1:{self.http_port}/statistics", timeout=30)
        r.raise_for_status()
        return int(r.json()["CountInstances"])

    def version(self) -> str:
        try:
            r = requests.get(f"http://127.0.0.1:{self.http_port}/system", timeout=5).json()
            p = requests.get(f"http://127.0.0.1:{self.http_port}/plugins/dicom-web", timeout=5).json()
            return f"Orthanc {r.get('Version')} + DICOMweb {p.get('Version')}"
        except Exception:
            return "Orthanc (version unknown)"


class GatewayServer(Server):
    name = "gateway"
    ae = "DICOMGW"
    http_root = "/dicomweb"

    def __init__(self, work_root, binary: str):
        super().__init__(work_root)
        self.binary = binary

    def command(self):
        return [self.binary, "serve"]

    def env(self):
        e = dict(os.environ)
        e.update({
            "DICOMGW_DIMSE__BIND": f"127.0.0.1:{self.dimse_port}",
            "DICOMGW_HTTP__BIND": f"127.0.0.1:{self.http_port}",
            "DICOMGW_STORAGE__PATH": str(self.workdir / "objects"),
            "DICOMGW_INDEX__URL": f"sqlite://{self.workdir}/index.db",
            "DICOMGW_DIMSE__AE_TITLE": self.ae,
            # Query/retrieve peers (phase qr): the SCUs and the C-MOVE destination.
            "DICOMGW_DIMSE__PEERS": "[" + ", ".join(
                f'{{ae_title = "{ae}", host = "127.0.0.1", port = {QR_DEST_PORT}}}' for ae in QR_PEERS) + "]",
        })
        return e

    def ready(self):
        r = requests.get(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2)
        if r.status_code != 200:
            return False, f"GET /healthz -> {r.status_code}"
        return super().ready()

    def stored_instances(self):
        # Sum NumberOfStudyRelatedInstances over all studies (QIDO); if the gateway can't say,
        # count the object files (layout <study>/<series>/<sop>.dcm under the storage path).
        try:
            r = requests.get(self.url("/studies?includefield=00201208&limit=100000"),
                             headers={"Accept": ACCEPT_DICOM_JSON}, timeout=60)
            if r.status_code == 204:
                return 0
            if r.status_code == 200:
                total = 0
                for study in r.json():
                    v = study.get("00201208", {}).get("Value")
                    if not v:
                        raise ValueError("no NumberOfStudyRelatedInstances")
                    total += int(v[0])
                return total
        except Exception:
            pass
        objects = self.workdir / "objects"
        if not objects.is_dir():
            return None
        return sum(1 for _, _, files in os.walk(objects) for f in files if f.endswith(".dcm"))


# --------------------------------------------------------------------------------------
# HTTP client with low overhead (keep-alive, http.client)
# --------------------------------------------------------------------------------------

class Http:
    def __init__(self, port: int, timeout: float):
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def _conn(self):
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            self.conn.connect()
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.conn

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def get(self, path: str, accept: str, sink=None, chunk: int = 1 << 20):
        """GET path; returns (status, headers, body_or_None, nbytes, t_total, t_first_byte).

        With `sink` (callable taking bytes) the body is streamed into it and not kept.
        """
        for attempt in (0, 1):
            try:
                c = self._conn()
                t0 = time.perf_counter()
                c.request("GET", path, headers={"Accept": accept, "Connection": "keep-alive"})
                resp = c.getresponse()
                t_first = time.perf_counter() - t0
                if sink is None:
                    body = resp.read()
                    nbytes = len(body)
                else:
                    body = None
                    nbytes = 0
                    while True:
                        b = resp.read(chunk)
                        if not b:
                            break
                        nbytes += len(b)
                        sink(b)
                t = time.perf_counter() - t0
                if resp.will_close:
                    self.close()
                return resp.status, resp.headers, body, nbytes, t, t_first
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    http.client.CannotSendRequest):
                self.close()
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.array(values), p))


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------

def storescu_cmd(srv: Server, dirs: list[Path]) -> list[str]:
    return ["storescu", "-aet", "BENCHSCU", "-aec", srv.ae, "-to", "30", "-ta", "30", "-td", "120",
            "+sd", "+r", "127.0.0.1", str(srv.dimse_port)] + [str(d) for d in dirs]


def measure_ingest(srv: Server, dirs: list[Path], count: int, nbytes: int, parallel: bool,
                   timeout: float) -> dict:
    """Run one storescu per dir (in parallel if `parallel`, else a single storescu on all dirs)."""
    before = srv.stored_instances() if srv.name != "storescp" else srv.stored_instances()
    groups = [[d] for d in dirs] if parallel else [dirs]
    sampler = RssSampler(srv.pid) if srv.name != "storescp" else None
    t0 = time.perf_counter()
    if sampler:
        sampler.__enter__()
    try:
        procs = [subprocess.Popen(storescu_cmd(srv, g), env=DCMTK_ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for g in groups]
        outs = []
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise BenchError(f"storescu timed out after {timeout:.0f}s")
            outs.append((p.returncode, out))
        wall = time.perf_counter() - t0
    finally:
        if sampler:
            sampler.__exit__(None, None, None)
    errors = [f"storescu rc={rc}: {out.strip().splitlines()[-3:] if out.strip() else ''}"
              for rc, out in outs if rc != 0]
    if errors:
        raise BenchError("; ".join(errors))
    warnings = [ln for _, out in outs for ln in out.splitlines() if ln.startswith(("E:", "W:"))]
    # stored count (allow a short settle time for asynchronous indexing)
    stored = None
    try:
        deadline = time.monotonic() + 15
        while True:
            after = srv.stored_instances()
            if after is None or before is None:
                break
            stored = after - before
            if stored >= count or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    except Exception as e:  # verification is best-effort
        warnings.append(f"count verification failed: {e}")
    res = dict(wall_s=wall, count=count, bytes=nbytes, inst_per_s=count / wall,
               mb_per_s=nbytes / wall / 1e6, stored=stored, warnings=warnings[:5])
    if sampler:
        res["peak_rss_mb"] = sampler.peak_mb
    log(f"  {srv.name}: {count} inst in {wall:.2f}s = {res['inst_per_s']:.0f} inst/s, "
        f"{res['mb_per_s']:.1f} MB/s (stored {stored})")
    return res


def measure_qido(srv: Server, queries: list[dict], prof: dict, budget_s: float) -> dict:
    h = Http(srv.http_port, timeout=120)
    out = {}
    try:
        for q in queries:
            path = srv.http_root + q["path"] + (("?" + q["query"]) if q["query"] else "")
            res: dict = dict(path=path)
            try:
                times = []
                ttfbs = []
                t_start = time.monotonic()
                count = None
                for i in range(prof["qido_warmup"] + prof["qido_n"]):
                    status, _hdr, body, _n, t, tf = h.get(path, ACCEPT_DICOM_JSON)
                    if status == 204:
                        count = 0
                    elif status == 200:
                        if i == 0:
                            try:
                                count = len(json.loads(body))
                            except ValueError as e:
                                count = f"invalid JSON ({e})"
                    else:
                        raise BenchError(f"HTTP {status}: {body[:200]!r}")
                    if i >= prof["qido_warmup"]:
                        times.append(t)
                        ttfbs.append(tf)
                    if time.monotonic() - t_start > budget_s and len(times) >= 3:
                        res["truncated"] = True
                        break
                res.update(p50_ms=pct(times, 50) * 1000, p99_ms=pct(times, 99) * 1000, n=len(times),
                           ttfb_p50_ms=pct(ttfbs, 50) * 1000, results=count, expected=q["expect"])
                log(f"  {srv.name} {q['label']}: p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, "
                    f"{count} results (expected {q['expect']}), n={len(times)}")
            except Exception as e:
                res["error"] = str(e)
                log(f"  {srv.name} {q['label']}: ERROR {e}")
                h.close()
                srv.check_alive()
            out[q["key"]] = res
    finally:
        h.close()
    return out


class BoundaryCounter:
    def __init__(self, boundary: bytes | None):
        self.delim = b"--" + boundary if boundary else None
        self.count = 0
        self.carry = b""

    def __call__(self, b: bytes):
        if not self.delim:
            return
        buf = self.carry + b
        self.count += buf.count(self.delim)
        keep = len(self.delim) - 1
        # keep a tail that cannot itself contain a full delimiter
        self.carry = buf[-keep:] if keep > 0 else b""


def _boundary(ctype: str | None) -> bytes | None:
    if not ctype:
        return None
    for part in ctype.split(";"):
        part = part.strip()
        if part.lower().startswith("boundary="):
            return part.split("=", 1)[1].strip().strip('"').encode()
    return None


def _qr_run(args: list[str], timeout: float = 600) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise BenchError(f"{args[0]} exit {p.returncode}: {(p.stdout + p.stderr)[-500:]}")
    return dt, p.stdout + p.stderr


def measure_qr(srv: Server, m: dict, prof: dict) -> dict:
    """C-FIND study level over everything stored (findscu, time to the last response, p50 of n),
    then C-MOVE (to a storescp --ignore) and C-GET (getscu --ignore) of the CT study, instances/s of
    the whole retrieve (median of qr_n). Every run's result count is checked."""
    out: dict = {}
    ct = m["ct500"]
    studies = len(m["small20k"]["studies"]) + 1
    base = ["-aec", srv.ae, "-to", "30", "-ta", "30", "-td", "600"]
    target = ["127.0.0.1", str(srv.dimse_port)]
    find = (["findscu", "-S", "-aet", "FINDSCU"] + base
            + ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientName", "-k", "PatientID",
               "-k", "StudyDate", "-k", "ModalitiesInStudy", "-k", "NumberOfStudyRelatedInstances"] + target)
    times = []
    for i in range(prof["qr_warmup"] + prof["qr_find_n"]):
        dt, _ = _qr_run(find)
        if i >= prof["qr_warmup"]:
            times.append(dt)
    # one verbose run to count the responses
    _, text = _qr_run(find[:1] + ["-v"] + find[1:])
    out["find_results"] = text.count("Find Response:")  # pending ones; the final one prints no colon
    if out["find_results"] != studies:
        out["find_warning"] = f"C-FIND returned {out['find_results']} studies, {studies} expected"
    out["find_p50_ms"] = pct(times, 50) * 1000
    out["find_n"] = len(times)

    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ct['study_uid']}"]
    dest = subprocess.Popen(["storescp", "-aet", QR_DEST_AE, "--ignore", "+xa", str(QR_DEST_PORT)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not echo_ok(QR_DEST_AE, QR_DEST_PORT) and time.monotonic() < deadline:
            time.sleep(0.1)
        runs = []
        for _ in range(prof["qr_n"]):
            dt, text = _qr_run(["movescu", "-v", "-S", "-aet", "MOVESCU", "-aem", QR_DEST_AE] + base + keys + target)
            # movescu prints no counts; a final Success means every sub-operation completed.
            if "Received Final Move Response (Success)" not in text:
                out["move_warning"] = "C-MOVE did not end with Success: " + text[-300:].replace("\n", " ")
            runs.append(dt)
        out["move_s"] = sorted(runs)[len(runs) // 2]
        out["move_inst_per_s"] = ct["count"] / out["move_s"]
    finally:
        dest.terminate()
        dest.wait(timeout=10)
    runs = []
    for _ in range(prof["qr_n"]):
        dt, text = _qr_run(["getscu", "-v", "-S", "-aet", "GETSCU", "--ignore"] + base + keys + target)
        done = _completed_subops(text)
        if done != ct["count"]:
            out["get_warning"] = f"C-GET completed {done} of {ct['count']}"
        runs.append(dt)
    out["get_s"] = sorted(runs)[len(runs) // 2]
    out["get_inst_per_s"] = ct["count"] / out["get_s"]
    return out


def _completed_subops(text: str) -> int | None:
    """The Completed Sub-operations of the last C-GET response getscu printed."""
    import re
    found = re.findall(r"Completed Suboperations\s*:\s*(\d+)", text)
    return int(found[-1]) if found else None


def measure_wado(srv: Server, m: dict, prof: dict) -> dict:
    ct = m["ct500"]
    st, se = ct["study_uid"], ct["series_uid"]
    inst = ct["instances"][len(ct["instances"]) // 2]
    root = srv.http_root
    out: dict = {}
    h = Http(srv.http_port, timeout=600)
    try:
        out["rss_before_mb"] = (read_status_kb(srv.pid, "VmRSS") or 0) / 1024

        # --- metadata
        try:
            path = f"{root}/studies/{st}/metadata"
            times = []
            with RssSampler(srv.pid) as rs:
                for i in range(1 + prof["meta_n"]):
                    status, _hdr, body, nbytes, t, _tf = h.get(path, ACCEPT_DICOM_JSON)
                    if status != 200:
                        raise BenchError(f"HTTP {status}: {body[:200]!r}")
                    if i == 0:
                        try:
                            n_items = len(json.loads(body))
                        except ValueError as e:
                            n_items = None
                            out["metadata_invalid"] = f"response is not valid JSON: {e}"
                        out["metadata_cold_ms"] = t * 1000
                        out["metadata_items"] = n_items
                        out["metadata_bytes"] = nbytes
                    else:
                        times.append(t)
            out.update(metadata_p50_ms=pct(times, 50) * 1000, metadata_n=len(times),
                       metadata_peak_rss_mb=rs.peak_mb)
            log(f"  {srv.name} metadata: cold {out['metadata_cold_ms']:.0f} ms, p50 "
                f"{out['metadata_p50_ms']:.1f} ms, {out['metadata_items']} items, peak RSS {rs.peak_mb:.0f} MB"
                + (f" -- {out['metadata_invalid']}" if "metadata_invalid" in out else ""))
        except Exception as e:
            out["metadata_error"] = str(e)
            log(f"  {srv.name} metadata: ERROR {e}")
            h.close()
            srv.check_alive()

        # --- whole-study retrieve (streamed, bytes counted, never held in memory)
        try:
            path = f"{root}/studies/{st}"
            runs = []
            with RssSampler(srv.pid) as rs:
                for _ in range(prof["retrieve_n"]):
                    status, hdr, _body, nbytes, t, tf = _get_multipart(h, path, ACCEPT_STUDY)
                    if status != 200:
                        raise BenchError(f"HTTP {status}")
                    runs.append((t, tf, nbytes, hdr["parts"]))
            ts = sorted(runs)
            t_med, tf_med, nbytes, parts = ts[len(ts) // 2]
            out.update(retrieve_s=t_med, retrieve_ttfb_ms=tf_med * 1000, retrieve_bytes=nbytes,
                       retrieve_parts=parts, retrieve_mb_per_s=nbytes / t_med / 1e6,
                       retrieve_n=len(runs), retrieve_peak_rss_mb=rs.peak_mb,
                       retrieve_rss_growth_mb=rs.growth_mb, retrieve_rss_start_mb=rs.start_kb / 1024)
            log(f"  {srv.name} retrieve: {t_med:.2f} s, {nbytes / 1e6:.1f} MB ({parts} parts), "
                f"{out['retrieve_mb_per_s']:.0f} MB/s, TTFB {tf_med * 1000:.0f} ms, peak RSS {rs.peak_mb:.0f} MB")
        except Exception as e:
            out["retrieve_error"] = str(e)
            log(f"  {srv.name} retrieve: ERROR {e}")
            h.close()
            srv.check_alive()

        # --- one frame
        try:
            path = f"{root}/studies/{st}/series/{se}/instances/{inst}/frames/1"
            times = []
            with RssSampler(srv.pid) as rs:
                for i in range(2 + prof["frame_n"]):
                    status, hdr, body, nbytes, t, _tf = h.get(path, ACCEPT_FRAME)
                    if status != 200:
                        raise BenchError(f"HTTP {status}: {body[:200]!r}")
                    if i == 0:
                        out["frame_bytes"] = nbytes
                        out["frame_content_type"] = hdr.get("Content-Type")
                    if i >= 2:
                        times.append(t)
            out.update(frame_p50_ms=pct(times, 50) * 1000, frame_n=len(times), frame_peak_rss_mb=rs.peak_mb)
            if out["frame_bytes"] < 512 * 512 * 2:
                out["frame_warning"] = f"frame response only {out['frame_bytes']} bytes"
            log(f"  {srv.name} frame: p50 {out['frame_p50_ms']:.2f} ms, {out['frame_bytes']} bytes")
        except Exception as e:
            out["frame_error"] = str(e)
            log(f"  {srv.name} frame: ERROR {e}")
            h.close()
            srv.check_alive()

        out["vmhwm_mb"] = (read_status_kb(srv.pid, "VmHWM") or 0) / 1024
    finally:
        h.close()
    return out


def _get_multipart(h: Http, path: str, accept: str):
    """Streamed GET of a multipart response; counts bytes and parts."""
    for attempt in (0, 1):
        try:
            c = h._conn()
            t0 = time.perf_counter()
            c.request("GET", path, headers={"Accept": accept, "Connection": "keep-alive"})
            resp = c.getresponse()
            tf = time.perf_counter() - t0
            counter = BoundaryCounter(_boundary(resp.getheader("Content-Type")))
            nbytes = 0
            while True:
                b = resp.read(1 << 20)
                if not b:
                    break
                nbytes += len(b)
                counter(b)
            t = time.perf_counter() - t0
            if resp.will_close:
                h.close()
            parts = max(0, counter.count - 1) if counter.delim else None
            return resp.status, {"parts": parts, "ctype": resp.getheader("Content-Type")}, None, nbytes, t, tf
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                http.client.CannotSendRequest):
            h.close()
            if attempt == 1:
                raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------

def sectors_written() -> int:
    """Sectors written so far on all whole disks (/proc/diskstats field 10)."""
    total = 0
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            name = parts[2]
            if name.startswith(("loop", "ram", "dm-")) or name[-1].isdigit() and not name.startswith("nvme"):
                continue
            total += int(parts[9])
    return total


def wait_disk_quiet(max_wait: float = 90.0, quiet_mb_per_s: float = 1.0) -> float:
    """Waits until the disks write less than `quiet_mb_per_s` for two seconds in a row, so that one
    server's ingest is not slowed by the write-back and discards of the previous server's deleted data
    (servers run one after another; both pay fsync latency). Returns the seconds waited."""
    start = time.monotonic()
    quiet = 0
    last = sectors_written()
    while time.monotonic() - start < max_wait and quiet < 2:
        time.sleep(1.0)
        now = sectors_written()
        quiet = quiet + 1 if (now - last) * 512 < quiet_mb_per_s * 1e6 else 0
        last = now
    return time.monotonic() - start


# Phase nagle: clients as they come. A DCMTK tool without TCP_NODELAY=1 in its environment (a modality on
# DCMTK's defaults) and pynetdicom (which never sets it) leave Nagle's algorithm on: a C-STORE's data PDU
# waits until its command PDU is acknowledged, so a server that delays its ACKs stalls every small C-STORE.
# Each case runs with and without TCP_NODELAY on the client, on a fresh server; target: without it the rate
# is at least 1/1.5 of the rate with it.
NAGLE_CASES = (("storescu", "mr2k", "MR 64x64"), ("storescu", "ct500", "CT 512x512"),
               ("pynetdicom", "mr2k", "MR 64x64"), ("pynetdicom", "ct500", "CT 512x512"))
NAGLE_TARGET = 1.5


def pynetdicom_store(srv: Server, files: list[Path], nodelay: bool) -> float:
    """C-STORE every file on one pynetdicom association; returns the wall time of the association (the
    files are read before the clock starts)."""
    import socket as _socket

    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="BENCHPY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for cx in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        ae.add_requested_context(cx[0], cx[1])
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", srv.dimse_port, ae_title=srv.ae)
    if not assoc.is_established:
        raise BenchError("pynetdicom: association not established")
    try:
        if nodelay:
            assoc.dul.socket.socket.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            if int(getattr(rsp, "Status", -1)) != 0:
                raise BenchError(f"pynetdicom: C-STORE answered {rsp}")
    finally:
        assoc.release()
        ae.shutdown()
    return time.perf_counter() - t0


def measure_nagle(kind: str, args, m: dict, cache: Path) -> dict:
    out: dict = {}
    for client, key, label in NAGLE_CASES:
        files = sorted((cache / m[key]["dir"]).rglob("*.dcm"))
        # No wait for a quiet disk here: what is compared is the pair of runs, seconds apart.
        for nodelay in (True, False):
            srv = make_server(kind, args)
            try:
                srv.start(args.ready_timeout)
                if client == "storescu":
                    env = DCMTK_ENV if nodelay else {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
                    t0 = time.perf_counter()
                    p = subprocess.run(storescu_cmd(srv, [cache / m[key]["dir"]]), env=env,
                                       capture_output=True, text=True, timeout=args.ingest_timeout)
                    wall = time.perf_counter() - t0
                    if p.returncode != 0:
                        raise BenchError(f"storescu rc={p.returncode}: {p.stdout[-300:]}{p.stderr[-300:]}")
                else:
                    wall = pynetdicom_store(srv, files, nodelay)
                rate = len(files) / wall
                out[f"{client}_{key}_{'nodelay' if nodelay else 'nagle'}"] = rate
                log(f"  {kind} {client} {label} {'with' if nodelay else 'without'} TCP_NODELAY: "
                    f"{len(files)} in {wall:.2f}s = {rate:.0f} inst/s")
            except Exception as e:
                out.setdefault("errors", []).append(f"{client} {label} nodelay={nodelay}: {e}")
                log(f"  {kind} nagle {client} {label}: {e}")
            finally:
                srv.stop()
                srv.cleanup(args.keep)
                os.sync()
    return out


def bench_server(kind: str, args, m: dict, prof: dict, queries: list[dict], cache: Path) -> dict:
    res: dict = {"errors": []}
    phases = args.only

    def run_phase(label, fn):
        try:
            return fn()
        except Exception as e:
            msg = f"{label}: {e}"
            log(f"  {kind} {msg}")
            if not isinstance(e, BenchError):
                traceback.print_exc()
            res["errors"].append(msg)
            return None

    # Phase A: 2,000 MR on a fresh server
    if "ingest" in phases:
        waited = wait_disk_quiet()
        if waited > 3:
            log(f"  waited {waited:.0f}s for the disk to go quiet before {kind}")
        srv = make_server(kind, args)
        try:
            run_phase("start", lambda: srv.start(args.ready_timeout))
            if not srv.alive():
                return res  # could not start: don't try phase B (saves the start-up timeout)
            else:
                r = run_phase("ingest 2k MR", lambda: measure_ingest(
                    srv, [cache / m["mr2k"]["dir"]], m["mr2k"]["count"], m["mr2k"]["bytes"], False,
                    args.ingest_timeout))
                if r:
                    res["ingest_mr"] = r
                if kind == "orthanc":
                    res["version"] = srv.version()
        finally:
            srv.stop()
            srv.cleanup(args.keep)
            os.sync()

    if "nagle" in phases and kind == "gateway":
        r = run_phase("nagle", lambda: measure_nagle(kind, args, m, cache))
        if r:
            res["nagle"] = r

    # Phase B: CT + 20k (4-way) on a fresh server, then QIDO / WADO
    need_small = "ingest" in phases or "qido" in phases or "qr" in phases
    need_ct = need_small or "wado" in phases
    if not need_ct:
        return res
    wait_disk_quiet()
    srv = make_server(kind, args, fork=True)
    try:
        run_phase("start", lambda: srv.start(args.ready_timeout))
        if not srv.alive():
            return res
        if kind == "orthanc" and "version" not in res:
            res["version"] = srv.version()
        r = run_phase("ingest CT", lambda: measure_ingest(
            srv, [cache / m["ct500"]["dir"]], m["ct500"]["count"], m["ct500"]["bytes"], False,
            args.ingest_timeout))
        if r:
            res["ingest_ct"] = r
        if need_small and srv.alive():
            parts = [cache / p for p in m["small20k"]["parts"]]
            r = run_phase("ingest 20k x4", lambda: measure_ingest(
                srv, parts, m["small20k"]["count"], m["small20k"]["bytes"], True, args.ingest_timeout))
            if r:
                res["ingest_parallel"] = r
        if kind != "storescp" and srv.alive():
            if "qido" in phases:
                r = run_phase("qido", lambda: measure_qido(srv, queries, prof, args.qido_budget))
                if r:
                    res["qido"] = r
            if "wado" in phases and srv.alive():
                r = run_phase("wado", lambda: measure_wado(srv, m, prof))
                if r:
                    res["wado"] = r
            if "qr" in phases and srv.alive():
                r = run_phase("qr", lambda: measure_qr(srv, m, prof))
                if r:
                    res["qr"] = r
        if not srv.alive():
            res["errors"].append(f"{kind} died (exit code {srv.proc.returncode if srv.proc else '?'}); "
                                 f"log tail:\n{tail(srv.log_path)}")
    finally:
        srv.stop()
        srv.cleanup(args.keep)
        os.sync()
    return res


def make_server(kind: str, args, fork: bool = False) -> Server:
    """A fresh server of `kind` (storescp with `--fork` for concurrent associations)."""
    fs = server_file_system(reuse=not args.keep) if args.fs_per_server else None
    work_root = str(fs / "mnt") if fs else args.work_root
    if kind == "orthanc":
        srv: Server = OrthancServer(work_root)
    elif kind == "storescp":
        srv = StorescpServer(work_root, fork=fork)
    else:
        srv = GatewayServer(work_root, args.gateway_bin)
    srv.fs = fs
    return srv


def ingest_round(kind: str, args, m: dict, cache: Path) -> dict:
    """One more round of the ingest cases (MR, CT, then 20,000 small over 4 associations), each on a
    fresh server."""
    out: dict = {}
    cases = (("ingest_mr", [m["mr2k"]["dir"]], m["mr2k"], False),
             ("ingest_ct", [m["ct500"]["dir"]], m["ct500"], False),
             ("ingest_parallel", m["small20k"]["parts"], m["small20k"], True))
    for key, dirs, case, parallel in cases:
        wait_disk_quiet()
        srv = make_server(kind, args, fork=parallel)
        try:
            srv.start(args.ready_timeout)
            out[key] = measure_ingest(srv, [cache / d for d in dirs], case["count"], case["bytes"],
                                      parallel, args.ingest_timeout)
        except Exception as e:
            log(f"  {kind} extra {key} round: {e}")
        finally:
            srv.stop()
            srv.cleanup(args.keep)
            os.sync()
    return out


def paired_ratios(gw_rates: list | None, orthanc_rates: list | None) -> list[float]:
    """Gateway/Orthanc rate ratios round by round (a round that failed on either side is left out):
    each pair ran seconds apart, so a slow spell of the machine affects both sides of a ratio alike."""
    if not gw_rates or not orthanc_rates or len(gw_rates) != len(orthanc_rates):
        return []
    return [g / o for g, o in zip(gw_rates, orthanc_rates) if g and o]


INGEST_CASES = (("ingest_mr", "MR"), ("ingest_ct", "CT"), ("ingest_parallel", "4 associations"))


def fold_rounds(res: dict, rounds: list[dict]) -> None:
    """Replaces each ingest rate by the median over all rounds (the servers take turns round by
    round, so a slow spell of the machine hits both), keeping every round's rate (None where a round
    failed)."""
    for key, _ in INGEST_CASES:
        runs = [res.get(key)] + [r.get(key) for r in rounds]
        rates = [x["inst_per_s"] if x else None for x in runs]
        done = sorted(x for x in rates if x)
        if not done:
            continue
        if not res.get(key):
            res[key] = dict(next(x for x in runs if x))
        med = done[len(done) // 2]
        first = res[key]
        first["rounds_inst_per_s"] = rates
        first["inst_per_s"] = med
        first["wall_s"] = first["count"] / med
        first["mb_per_s"] = first["bytes"] / first["wall_s"] / 1e6


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

def fmt(v, digits=1):
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def build_report(results: dict, m: dict, prof: dict, queries: list[dict], args, meta: dict) -> str:
    gw, orth, scp = results.get("gateway"), results.get("orthanc"), results.get("storescp")
    rows = []

    def get(r, *keys):
        cur = r
        for k in keys:
            if not isinstance(cur, dict) or k not in cur:
                return None
            cur = cur[k]
        return cur

    def ratio(g, o, higher_better):
        if g is None or o is None or g == 0 or o == 0:
            return None
        return g / o if higher_better else o / g

    def met(r, need):
        if need is None:
            return "—"
        if r is None:
            return "n/a"
        return "yes" if r >= need else "**NO**"

    def gw_cell(v, f=fmt):
        if v is not None:
            return f(v)
        return "n/a" if gw is not None else "—"

    # ingest rows
    ingest = [("ingest_mr", f"C-STORE {m['mr2k']['count']:,} MR 64x64, 1 assoc"),
              ("ingest_ct", f"C-STORE {m['ct500']['count']:,} CT 512x512, 1 assoc"),
              ("ingest_parallel", f"C-STORE {m['small20k']['count']:,} small, 4 parallel assocs")]
    for key, label in ingest:
        def cell(r):
            x = get(r, key)
            if not x:
                return None
            flag = ""
            if x.get("stored") is not None and x["stored"] != x["count"]:
                flag = f" (!stored {x['stored']})"
            return f"{x['inst_per_s']:,.0f} inst/s · {x['mb_per_s']:.1f} MB/s{flag}"
        g, o, s = get(gw, key, "inst_per_s"), get(orth, key, "inst_per_s"), get(scp, key, "inst_per_s")
        if g is None and o is None and s is None:
            continue
        r = ratio(g, o, True)
        paired = paired_ratios(get(gw, key, "rounds_inst_per_s"), get(orth, key, "rounds_inst_per_s"))
        if paired:
            r = sorted(paired)[len(paired) // 2]
        rows.append([label, gw_cell(cell(gw), str), cell(orth) or "—", fmt(r, 2) + "x" if r else "—",
                     cell(scp) or "—", "≥2x Orthanc", met(r, 2.0)])

    # QIDO rows
    for q in queries:
        g50, g99 = get(gw, "qido", q["key"], "p50_ms"), get(gw, "qido", q["key"], "p99_ms")
        o50, o99 = get(orth, "qido", q["key"], "p50_ms"), get(orth, "qido", q["key"], "p99_ms")
        if g50 is None and o50 is None:
            continue
        r50, r99 = ratio(g50, o50, False), ratio(g99, o99, False)
        cell = lambda a, b: f"{fmt(a, 2)} / {fmt(b, 2)} ms" if a is not None else None
        rows.append([q["label"] + " p50/p99", gw_cell(cell(g50, g99), str), cell(o50, o99) or "—",
                     (f"{fmt(r50, 1)}x / {fmt(r99, 1)}x" if r50 else "—"), "—", "≥5x faster (p50)",
                     met(r50, 5.0)])

    # DIMSE query/retrieve rows
    g, o = get(gw, "qr", "find_p50_ms"), get(orth, "qr", "find_p50_ms")
    if g is not None or o is not None:
        r = ratio(g, o, False)
        c = lambda w: f"{fmt(get(w, 'qr', 'find_p50_ms'), 1)} ms" if get(w, "qr", "find_p50_ms") else None
        n_st = len(m["small20k"]["studies"]) + 1
        rows.append([f"C-FIND study level, all {n_st} studies ({m['small20k']['count'] + m['ct500']['count']:,} "
                     "instances), findscu, p50", gw_cell(c(gw), str), c(orth) or "—", fmt(r, 1) + "x" if r else "—",
                     "—", "≥2x faster", met(r, 2.0)])
    for key, label in (("move", f"C-MOVE {m['ct500']['count']}-instance CT study to storescp"),
                       ("get", f"C-GET {m['ct500']['count']}-instance CT study, getscu")):
        g, o = get(gw, "qr", f"{key}_inst_per_s"), get(orth, "qr", f"{key}_inst_per_s")
        if g is None and o is None:
            continue
        r = ratio(g, o, True)
        c = lambda w, k=key: (f"{get(w, 'qr', k + '_inst_per_s'):,.0f} inst/s ({get(w, 'qr', k + '_s'):.2f} s)"
                              if get(w, "qr", k + "_inst_per_s") else None)
        rows.append([label, gw_cell(c(gw), str), c(orth) or "—", fmt(r, 2) + "x" if r else "—", "—",
                     "≥2x Orthanc", met(r, 2.0)])

    # WADO rows
    g, o = get(gw, "wado", "metadata_p50_ms"), get(orth, "wado", "metadata_p50_ms")
    if g is not None or o is not None:
        r = ratio(g, o, False)
        c = lambda w: (f"{fmt(get(w, 'wado', 'metadata_p50_ms'), 1)} ms (cold "
                       f"{fmt(get(w, 'wado', 'metadata_cold_ms'), 0)})"
                       + (" (!invalid JSON)" if get(w, "wado", "metadata_invalid") else "")) \
            if get(w, "wado", "metadata_p50_ms") else None
        rows.append([f"WADO metadata, {m['ct500']['count']}-instance study, p50", gw_cell(c(gw), str),
                     c(orth) or "—", fmt(r, 1) + "x" if r else "—", "—", "≥5x faster", met(r, 5.0)])
    g, o = get(gw, "wado", "retrieve_s"), get(orth, "wado", "retrieve_s")
    if g is not None or o is not None:
        r = ratio(g, o, False)
        c = lambda w: (f"{get(w, 'wado', 'retrieve_s'):.2f} s · {get(w, 'wado', 'retrieve_mb_per_s'):.0f} MB/s"
                       if get(w, "wado", "retrieve_s") else None)
        rows.append([f"WADO whole-study retrieve ({m['ct500']['bytes'] / 1e6:.0f} MB)", gw_cell(c(gw), str),
                     c(orth) or "—", fmt(r, 2) + "x" if r else "—", "—", "≥1x (≥ Orthanc)", met(r, 1.0)])
    g, o = get(gw, "wado", "frame_p50_ms"), get(orth, "wado", "frame_p50_ms")
    if g is not None or o is not None:
        r = ratio(g, o, False)
        rows.append(["WADO frame 1 (512x512), p50", gw_cell(fmt(g, 2) + " ms" if g is not None else None, str),
                     (fmt(o, 2) + " ms") if o is not None else "—", fmt(r, 1) + "x" if r else "—", "—",
                     "—", "—"])
    # memory rows
    study_mb = m["ct500"]["bytes"] / 1e6
    for key, label in [("metadata_peak_rss_mb", "peak RSS during metadata"),
                       ("retrieve_peak_rss_mb", "peak RSS during whole-study retrieve"),
                       ("frame_peak_rss_mb", "peak RSS during frame requests"),
                       ("vmhwm_mb", "VmHWM (process lifetime peak)")]:
        g, o = get(gw, "wado", key), get(orth, "wado", key)
        if g is None and o is None:
            continue
        r = ratio(g, o, False)
        target, ok = "—", "—"
        if key == "retrieve_peak_rss_mb":
            target = f"bounded: growth < {study_mb / 2:.0f} MB (½ study)"
            gg = get(gw, "wado", "retrieve_rss_growth_mb")
            ok = "n/a" if gg is None else ("yes" if gg < study_mb / 2 else "**NO**")
            cg = lambda w: (f"{fmt(get(w, 'wado', key), 0)} MB (+{fmt(get(w, 'wado', 'retrieve_rss_growth_mb'), 0)})"
                            if get(w, "wado", key) is not None else None)
        else:
            cg = lambda w: f"{fmt(get(w, 'wado', key), 0)} MB" if get(w, "wado", key) is not None else None
        rows.append([label, gw_cell(cg(gw), str), cg(orth) or "—", fmt(r, 2) + "x" if r else "—", "—",
                     target, ok])
    for key, label in [("ingest_parallel", "peak RSS during 4-way ingest")]:
        g, o = get(gw, key, "peak_rss_mb"), get(orth, key, "peak_rss_mb")
        if g is None and o is None:
            continue
        r = ratio(g, o, False)
        rows.append([label, gw_cell(f"{g:.0f} MB" if g is not None else None, str),
                     f"{o:.0f} MB" if o is not None else "—", fmt(r, 2) + "x" if r else "—", "—", "—", "—"])

    hdr = ["Metric", "Gateway", "Orthanc", "Ratio vs Orthanc", "storescp", "Target", "Met"]
    lines = [f"# dicom-gateway benchmark results ({'quick' if args.quick else 'full'} run)", "",
             f"- date: {meta['date']}; host: {meta['host']}",
             f"- peers: {meta.get('orthanc_version', 'Orthanc not run')}; {meta['dcmtk']}",
             f"- gateway: {meta['gateway']}",
             f"- data: {m['mr2k']['count']:,} MR 64x64 ({m['mr2k']['bytes'] / 1e6:.0f} MB), "
             f"{m['ct500']['count']:,} CT 512x512 ({m['ct500']['bytes'] / 1e6:.0f} MB), "
             f"{m['small20k']['count']:,} small in {len(m['small20k']['studies'])} studies "
             f"({m['small20k']['bytes'] / 1e6:.0f} MB); Explicit VR LE",
             f"- phases: {', '.join(args.only)}; servers: {', '.join(args.servers)}",
             f"- servers' data on {meta['work_root']}: write+fsync of an 8 KB file takes "
             f"{meta['fsync_ms']:.2f} ms (p50) on such a file system",
             f"- load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in meta['load_start'])}, at end "
             f"{'/'.join(f'{x:.2f}' for x in meta['load_end'])}"
             + (" — **machine was busy: numbers are noisy**" if max(meta['load_start'][0], meta['load_end'][1]) > 1.0
                else ""), "",
             "Ratio: gateway/Orthanc for rates, Orthanc/gateway for latencies and memory (>1 = gateway better). "
             "QIDO cells are p50 / p99.", "",
             "| " + " | ".join(hdr) + " |", "|" + "|".join(["---"] * len(hdr)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")

    # Notes
    notes = []
    nagle: dict = {}
    nagle_p99: dict = {}
    for q in queries:
        for name, r in (("gateway", gw), ("orthanc", orth)):
            x = get(r, "qido", q["key"])
            if not x:
                continue
            if "error" in x:
                notes.append(f"{name} {q['label']}: error: {x['error']}")
            elif x.get("results") != x.get("expected"):
                notes.append(f"{name} {q['label']}: returned {x.get('results')} results, expected "
                             f"{x.get('expected')}")
            if "p50_ms" in x and x["p50_ms"] - x.get("ttfb_p50_ms", 0) > 35 and x["p50_ms"] < 60:
                nagle.setdefault(name, []).append(f"{q['key']} ({x['ttfb_p50_ms']:.1f} → {x['p50_ms']:.1f} ms)")
            elif "p50_ms" in x and x["p50_ms"] < 15 and 40 <= x["p99_ms"] <= 60:
                nagle_p99.setdefault(name, []).append(f"{q['key']} ({x['p50_ms']:.1f} / {x['p99_ms']:.1f} ms)")
            if x.get("truncated"):
                notes.append(f"{name} {q['label']}: time budget hit, only {x['n']} timed requests")
    for name, qs in nagle.items():
        notes.append(f"{name}: QIDO headers arrive fast but the last byte ~40 ms later, the Nagle + "
                     f"delayed-ACK stall of a server socket without TCP_NODELAY whose response is written in "
                     f"several pieces (p50 headers → last byte): {', '.join(qs)}")
    for name, qs in nagle_p99.items():
        notes.append(f"{name}: QIDO p50 is fast but p99 sits at 40–60 ms, most likely the same ~40 ms "
                     f"Nagle + delayed-ACK stall hitting some responses (p50 / p99): {', '.join(qs)}")
    for name, r in (("gateway", gw), ("orthanc", orth), ("storescp", scp)):
        if not r:
            continue
        for key in ("ingest_mr", "ingest_ct", "ingest_parallel"):
            x = get(r, key)
            if x and x.get("stored") is not None and x["stored"] != x["count"]:
                notes.append(f"{name} {key}: sent {x['count']} but {x['stored']} stored")
            if x and x.get("stored") is None and name != "storescp":
                notes.append(f"{name} {key}: stored count could not be verified")
            if x and x.get("warnings"):
                notes.append(f"{name} {key}: storescu said: {' | '.join(x['warnings'][:3])}")
        w = get(r, "wado")
        if w:
            for k in ("metadata_error", "metadata_invalid", "retrieve_error", "frame_error", "frame_warning"):
                if k in w:
                    notes.append(f"{name} WADO {k.split('_')[0]}: {w[k]}")
            if w.get("metadata_items") is not None and w["metadata_items"] != m["ct500"]["count"]:
                notes.append(f"{name} metadata returned {w['metadata_items']} items, expected {m['ct500']['count']}")
            if w.get("retrieve_parts") is not None and w["retrieve_parts"] != m["ct500"]["count"]:
                notes.append(f"{name} retrieve returned {w['retrieve_parts']} parts, expected {m['ct500']['count']}")
            if "retrieve_ttfb_ms" in w:
                notes.append(f"{name} retrieve: time to first byte {w['retrieve_ttfb_ms']:.0f} ms, "
                             f"{w['retrieve_bytes'] / 1e6:.1f} MB in {w['retrieve_parts']} parts")
            if "metadata_bytes" in w:
                notes.append(f"{name} metadata: {w['metadata_bytes'] / 1e6:.2f} MB JSON, cold (first) "
                             f"request {w['metadata_cold_ms']:.0f} ms")
        q = get(r, "qr")
        if q:
            for k in ("find_warning", "move_warning", "get_warning"):
                if k in q:
                    notes.append(f"{name} {q[k]}")
        for e in r.get("errors", []):
            notes.append(f"{name} error: {e}")
    if results.get("gateway_unavailable"):
        notes.append(f"gateway not measured: {results['gateway_unavailable']}")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}".replace("\n", "\n  ") for n in notes]
    rounds = meta.get("ingest_rounds", 1)
    if rounds > 1:
        lines += ["", f"Ingest rates are medians of {rounds} rounds, each case on a fresh server, "
                  "the servers taking turns (Orthanc, then the gateway); the ratio is the "
                  "median of the rounds' ratios (inst/s per round):", ""]
        for name, r in (("gateway", gw), ("orthanc", orth), ("storescp", scp)):
            for key, label in INGEST_CASES:
                rates = get(r, key, "rounds_inst_per_s") if r else None
                if rates:
                    lines.append(f"- {name} {label}: "
                                 + ", ".join(f"{x:,.0f}" if x else "failed" for x in rates))
        for key, label in INGEST_CASES:
            paired = paired_ratios(get(gw, key, "rounds_inst_per_s"), get(orth, key, "rounds_inst_per_s"))
            if paired:
                lines.append(f"- gateway/Orthanc {label}, round by round: "
                             + ", ".join(f"{x:.2f}x" for x in paired)
                             + " (the table's ratio is their median)")
    nag = get(gw, "nagle") if gw else None
    if nag:
        lines += ["", "Clients without TCP_NODELAY (gateway only; one association, fresh server per run; target: "
                  f"the rate without TCP_NODELAY at least 1/{NAGLE_TARGET} of the rate with it):", "",
                  "| client | objects | with TCP_NODELAY (inst/s) | without (inst/s) | with / without | target met |",
                  "|---|---|---|---|---|---|"]
        for client, key, label in NAGLE_CASES:
            w, wo = nag.get(f"{client}_{key}_nodelay"), nag.get(f"{client}_{key}_nagle")
            r = w / wo if w and wo else None
            lines.append(f"| {client} | {m[key]['count']:,} {label} | {fmt(w, 0)} | {fmt(wo, 0)} | "
                         f"{fmt(r, 2)} | {met(None if r is None else NAGLE_TARGET / r, 1.0)} |")
        for e in nag.get("errors", []):
            lines.append(f"- error: {e}")
    lines += ["", "Method: storescu `+sd +r` (TCP_NODELAY=1); rates = files sent / wall time of the storescu "
              "process(es), MB/s counts file bytes. storescp runs with `+B` (bit-preserving write) and "
              "`--fork` for the 4-way case. Orthanc runs with its defaults (SQLite index, "
              "SyncStorageArea=true, DICOMweb metadata mode Full). HTTP latencies are measured with a "
              "keep-alive http.client connection, time to the last byte. RSS sampled every 10 ms from "
              "/proc/PID/status."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts for a smoke run (~2 min)")
    ap.add_argument("--only", default="ingest,qido,wado,qr,nagle",
                    help="comma list of phases: ingest,qido,wado,qr,nagle (default: all)")
    ap.add_argument("--servers", default="storescp,orthanc,gateway",
                    help="comma list: storescp,orthanc,gateway (default: all)")
    ap.add_argument("--gateway-bin", default=str(REPO_DIR / "target/release/dicom-gateway"))
    ap.add_argument("--gateway-unavailable", default=None, metavar="REASON",
                    help="skip the gateway and say why (used by bench/run when the build fails)")
    ap.add_argument("--cache-dir", default=None, help="data cache (default bench/.cache/{full,quick})")
    ap.add_argument("--work-root", default=None, help="parent dir for the servers' temp data dirs "
                    "(default: a fresh file system, see --no-fresh-fs)")
    ap.add_argument("--one-fs", action="store_true",
                    help="all servers on the run's one fresh file system instead of a fresh one for "
                         "each server instance")
    ap.add_argument("--no-fresh-fs", action="store_true",
                    help="keep the servers' data under $TMPDIR instead of a fresh ext4 file system "
                    "made for the run (a loop-mounted sparse image; needs root)")
    ap.add_argument("--out", default=None, help="markdown output (default bench/results.md; "
                    "results-quick.md with --quick, results-partial.md for a subset)")
    ap.add_argument("--keep", action="store_true", help="keep the servers' data dirs and logs")
    ap.add_argument("--regen", action="store_true", help="regenerate the data set")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before starting, wait up to SECONDS for the 1-min load average to drop "
                    "below --idle-load")
    ap.add_argument("--idle-load", type=float, default=0.5)
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument("--ingest-timeout", type=float, default=900.0)
    ap.add_argument("--qido-budget", type=float, default=30.0,
                    help="max seconds of timed requests per QIDO query and server")
    args = ap.parse_args()

    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for p in args.only:
        if p not in ("ingest", "qido", "wado", "qr", "nagle"):
            ap.error(f"unknown phase {p}")
    for s in args.servers:
        if s not in ("storescp", "orthanc", "gateway"):
            ap.error(f"unknown server {s}")
    args.fs_per_server = False
    if args.work_root:
        Path(args.work_root).mkdir(parents=True, exist_ok=True)
    elif not args.no_fresh_fs and os.geteuid() == 0:
        if args.one_fs:
            args.work_root = fresh_file_system()
        else:
            args.fs_per_server = True
    prof = PROFILES["quick" if args.quick else "full"]
    cache = Path(args.cache_dir) if args.cache_dir else BENCH_DIR / ".cache" / ("quick" if args.quick else "full")
    if args.out:
        out_md = Path(args.out)
    elif args.quick:
        out_md = BENCH_DIR / "results-quick.md"
    elif len(args.only) < 5 or len(args.servers) < 3:
        out_md = BENCH_DIR / "results-partial.md"  # never clobber a full run's results.md
    else:
        out_md = BENCH_DIR / "results.md"

    global QR_DEST_PORT
    QR_DEST_PORT = free_port()
    for tool in ("storescu", "storescp", "echoscu", "Orthanc"):
        if shutil.which(tool) is None:
            log(f"missing {tool}: run through bench/run (it installs orthanc, orthanc-dicomweb, dcmtk)")
            return 2

    if args.wait_idle > 0:
        deadline = time.monotonic() + args.wait_idle
        while os.getloadavg()[0] > args.idle_load and time.monotonic() < deadline:
            log(f"waiting for an idle machine: load {os.getloadavg()[0]:.2f} > {args.idle_load}")
            time.sleep(10)
    t_start = time.monotonic()
    if args.regen and cache.exists():
        shutil.rmtree(cache)
    m = generate_dataset(cache, prof)
    warm_page_cache(cache)
    queries = build_queries(m)

    results: dict = {}
    gw_reason = args.gateway_unavailable
    if "gateway" in args.servers and not gw_reason:
        b = Path(args.gateway_bin)
        if not (b.is_file() and os.access(b, os.X_OK)):
            gw_reason = f"binary not found: {b}"
    if gw_reason and "gateway" in args.servers:
        log(f"gateway skipped: {gw_reason}")
        results["gateway_unavailable"] = gw_reason

    dcmtk = subprocess.run(["storescu", "--version"], capture_output=True, text=True).stdout.splitlines()
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"),
                host=f"{platform.node()}, {os.cpu_count()} cores, Linux {platform.release()}",
                dcmtk=(dcmtk[0].strip("$ ").replace("dcmtk: ", "DCMTK ") if dcmtk else "DCMTK ?"),
                gateway=("not in this run" if "gateway" not in args.servers else
                         ("not run: " + gw_reason) if gw_reason else
                         f"{args.gateway_bin} (built {time.strftime('%Y-%m-%d %H:%M', time.localtime(os.path.getmtime(args.gateway_bin)))})"),
                load_start=os.getloadavg(),
                fsync_ms=probe_servers_disk(args),
                work_root=("a fresh 8 GB ext4 file system per server instance (made in turn on one "
                           "loop-mounted, written-through image)" if args.fs_per_server else args.work_root or tempfile.gettempdir()))
    if meta["load_start"][0] > 1.0:
        log(f"WARNING: load average {meta['load_start'][0]:.2f} on {os.cpu_count()} cores: other work "
            "is running, the numbers will be noisy")

    for kind in args.servers:
        if kind == "gateway" and gw_reason:
            continue
        log(f"=== {kind} ===")
        t0 = time.monotonic()
        results[kind] = bench_server(kind, args, m, prof, queries, cache)
        log(f"=== {kind} done in {time.monotonic() - t0:.0f}s ===")
        if kind == "orthanc" and results[kind].get("version"):
            meta["orthanc_version"] = results[kind]["version"]

    # More rounds of the ingest cases, the servers taking turns; medians reported.
    if "ingest" in args.only and prof["ingest_rounds"] > 1:
        ran = [k for k in args.servers if k in results and results[k].get("ingest_ct")]
        extra: dict = {k: [] for k in ran}
        for n in range(1, prof["ingest_rounds"]):
            for kind in ran:
                log(f"=== {kind}: ingest round {n + 1} of {prof['ingest_rounds']} ===")
                extra[kind].append(ingest_round(kind, args, m, cache))
        for kind in ran:
            fold_rounds(results[kind], extra[kind])
        meta["ingest_rounds"] = prof["ingest_rounds"]

    meta["load_end"] = os.getloadavg()
    remove_work_dirs()
    report = build_report(results, m, prof, queries, args, meta)
    report += f"\nTotal bench time: {time.monotonic() - t_start:.0f}s\n"
    print(report)
    out_md.write_text(report)
    out_md.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results,
                                                          queries=queries), indent=1, default=str))
    log(f"wrote {out_md} and {out_md.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
