"""One large C-STORE does not hold up the others: while DCMTK storescu sends a large object, small C-STOREs
on another association go on, none of them waiting for the large one to finish. (The latency figures are a
benchmark, bench/head_of_line.py; here only generous bounds.)"""

from __future__ import annotations

import struct
import subprocess
import time

from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from gw_dimse import association, contexts_for, dcmtk_env, store
from gw_samples import small_ct, synthetic_instance
from gw_web import client

BIG_BYTES = 384 << 20


def write_big(path, size: int) -> str:
    """A Part-10 multi-frame object of about `size` bytes (4096x4096 8-bit frames), written in chunks."""
    sample = synthetic_instance(64)
    ds = sample.ds
    del ds.PixelData
    frame = 4096 * 4096
    frames = max(1, size // frame)
    ds.Rows = ds.Columns = 4096
    ds.NumberOfFrames = frames
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    chunk = bytes(range(256)) * 4096
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, frames * frame))
        for _ in range(frames * frame // len(chunk)):
            f.write(chunk)
    return str(ds.SOPInstanceUID)


def test_small_stores_go_on_while_a_large_one_is_stored(fresh_gateway, tmp_path):
    gw = fresh_gateway
    big = tmp_path / "big.dcm"
    big_uid = write_big(big, BIG_BYTES)
    started = time.monotonic()
    sender = subprocess.Popen(["storescu", "-aec", gw.ae_title, gw.host, str(gw.dimse_port), str(big)],
                              env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latencies: list[float] = []
    with association(gw, contexts_for([small_ct()])) as assoc:
        msg = 0
        while sender.poll() is None:
            msg += 1
            t0 = time.monotonic()
            assert store(assoc, small_ct(), msg_id=msg) == 0x0000
            latencies.append(time.monotonic() - t0)
    big_seconds = time.monotonic() - started
    out = sender.communicate()[0]
    assert sender.returncode == 0, out[-2000:]
    assert big_uid in {r["00080018"]["Value"][0] for r in client(gw).search_for_instances()}
    assert len(latencies) >= 5, f"only {len(latencies)} small C-STOREs in the {big_seconds:.1f} s of the large one"
    assert max(latencies) < max(5.0, big_seconds / 2), \
        f"a small C-STORE waited {max(latencies):.1f} s while the large one took {big_seconds:.1f} s"
