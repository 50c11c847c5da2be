"""Query/retrieve helpers: a small known corpus of studies, DCMTK findscu / movescu / getscu / storescp
runners, and pynetdicom requests sent by hand (so that a C-CANCEL can follow its request at once)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dimse_primitives import C_CANCEL, C_FIND, C_GET, C_MOVE

from gw_dimse import dcmtk_env, pause_reactor
from gw_samples import Sample, from_dataset

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"

PENDING = (0xFF00, 0xFF01)


def peers_env(*peers: tuple[str, int] | str, pending_interval_ms: int = 0) -> dict[str, str]:
    """`DICOMGW_DIMSE__PEERS` for AE titles (on 127.0.0.1; a port where one is given), and a pending
    response after every retrieve sub-operation unless `pending_interval_ms` says otherwise."""
    items = []
    for p in peers:
        ae, port = (p, 1) if isinstance(p, str) else p
        items.append(f'{{ae_title = "{ae}", host = "127.0.0.1", port = {port}}}')
    return {"DICOMGW_DIMSE__PEERS": "[" + ", ".join(items) + "]",
            "DICOMGW_DIMSE__RETRIEVE_PENDING_INTERVAL_MS": str(pending_interval_ms)}


def uid(*parts) -> str:
    return "2.25.7" + "".join(f".{p}" for p in parts)


def instance(study: dict, series: dict, number: int, pixels: int = 8, sop_uid: str | None = None,
             ts: str = ExplicitVRLittleEndian, attrs: dict | None = None) -> Sample:
    """A small image of `study` / `series` (dicts of attributes; `uid` keys give the UIDs), with the
    instance-level `attrs`."""
    ds = Dataset()
    ds.SOPClassUID = series.get("sop_class", SC_IMAGE)
    ds.SOPInstanceUID = sop_uid or f"{series['uid']}.{number}"
    ds.StudyInstanceUID = study["uid"]
    ds.SeriesInstanceUID = series["uid"]
    for k, v in study.items():
        if k != "uid":
            setattr(ds, k, v)
    for k, v in series.items():
        if k not in ("uid", "sop_class"):
            setattr(ds, k, v)
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = pixels
    ds.Columns = pixels
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((i * 7 + number) & 0xFF for i in range(pixels * pixels * 2))
    ds["PixelData"].VR = "OW"
    for k, v in (attrs or {}).items():
        setattr(ds, k, v)
    return from_dataset(ds, ts, f"qr-{ds.SOPInstanceUID}")


# -- DCMTK ------------------------------------------------------------------------------------------------
def findscu(gw, keys: list[str], outdir: Path, model: str = "-S", calling: str = "FINDSCU",
            extra: list[str] | None = None) -> tuple[subprocess.CompletedProcess, list[Dataset]]:
    """findscu with `-k` keys; responses extracted to files and read back with pydicom, in order."""
    outdir.mkdir(parents=True, exist_ok=True)
    for old in outdir.glob("rsp*.dcm"):
        old.unlink()
    args = ["findscu", "-v", model, "-aet", calling, "-aec", gw.ae_title, "-to", "10", "-ta", "10", "-td", "30",
            "-X", "-od", str(outdir)]
    for k in keys:
        args += ["-k", k]
    args += extra or []
    args += [gw.host, str(gw.dimse_port)]
    proc = subprocess.run(args, env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    responses = [pydicom.dcmread(p) for p in sorted(outdir.glob("rsp*.dcm"))]
    return proc, responses


@contextlib.contextmanager
def storescp(port: int, ae: str, outdir: Path, accept_all: bool = True, options=()):
    """A DCMTK storescp on `port` (the one the gateway's peer entry names) writing what it receives byte for
    byte (+B) into `outdir`; `accept_all` accepts every transfer syntax, else uncompressed ones only (or what
    `options`, e.g. `+xi`, says)."""
    outdir.mkdir(parents=True, exist_ok=True)
    args = (["storescp", "-aet", ae, "-od", str(outdir), "+B", "-uf"] + (["+xa"] if accept_all else [])
            + list(options) + [str(port)])
    proc = subprocess.Popen(args, env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            echo = subprocess.run(["echoscu", "-aec", ae, "127.0.0.1", str(port)], env=dcmtk_env(),
                                  capture_output=True, timeout=10)
            if echo.returncode == 0:
                break
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def received_payloads(outdir: Path) -> dict[str, bytes]:
    """{SOP Instance UID: data set bytes} of the Part-10 files in `outdir`."""
    from gw_samples import split_part10

    out = {}
    for p in outdir.iterdir():
        if p.is_file():
            data = p.read_bytes()
            try:
                _meta, payload = split_part10(data)
            except ValueError:
                continue
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            out[str(ds.SOPInstanceUID)] = payload
    return out


# -- pynetdicom, by hand ----------------------------------------------------------------------------------
def context_id(assoc, sop_class: str) -> int:
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == sop_class:
            return cx.context_id
    raise AssertionError(f"no accepted context for {sop_class}")


def send_request(assoc, kind: str, identifier: Dataset, sop_class: str, msg_id: int = 1,
                 destination: str | None = None, cancel: bool = False, on_store=None):
    """Send a C-FIND / C-MOVE / C-GET (and, with `cancel`, a C-CANCEL right behind it); return every
    response as (status, identifier dataset or None). `on_store(req)` answers C-GET's C-STOREs (status)."""
    from pynetdicom.dsutils import decode, encode
    from pynetdicom.dimse_primitives import C_STORE

    cx_id = context_id(assoc, sop_class)
    cx = next(c for c in assoc.accepted_contexts if c.context_id == cx_id)
    ts = cx.transfer_syntax[0]
    req = {"find": C_FIND, "move": C_MOVE, "get": C_GET}[kind]()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = sop_class
    req.Priority = 2
    if destination is not None:
        req.MoveDestination = destination
    from io import BytesIO

    req.Identifier = BytesIO(encode(identifier, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated))
    pause_reactor(assoc)
    responses = []
    try:
        assoc.dimse.send_msg(req, cx_id)
        if cancel:
            c = C_CANCEL()
            c.MessageIDBeingRespondedTo = msg_id
            assoc.dimse.send_msg(c, cx_id)
        while True:
            rcx, rsp = assoc.dimse.get_msg(block=True)
            if rsp is None:
                responses.append((None, None, None))
                break
            if isinstance(rsp, C_STORE):
                from pynetdicom.dimse_primitives import C_STORE as Store

                answer = Store()
                answer.MessageIDBeingRespondedTo = rsp.MessageID
                answer.AffectedSOPClassUID = rsp.AffectedSOPClassUID
                answer.AffectedSOPInstanceUID = rsp.AffectedSOPInstanceUID
                answer.Status = on_store(rsp, rcx) if on_store else 0x0000
                assoc.dimse.send_msg(answer, rcx)
                continue
            ident = None
            if getattr(rsp, "Identifier", None) is not None and rsp.Identifier.getvalue():
                rts = next(c for c in assoc.accepted_contexts if c.context_id == rcx).transfer_syntax[0]
                ident = decode(rsp.Identifier, rts.is_implicit_VR, rts.is_little_endian, rts.is_deflated)
            status = int(rsp.Status)
            responses.append((status, ident, rsp))
            if status not in PENDING:
                break
    finally:
        assoc._reactor_checkpoint.set()
    return responses
