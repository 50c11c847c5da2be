#!/usr/bin/env python3
"""Peak RSS growth of the gateway while it stores one object with a large private OB element before its
pixel data (300 MB by default), sent with DCMTK storescu, then while it serves that element's bulk data.

    DICOMGW_BIN=/path/to/dicom-gateway .venv/bin/python bench/big_element.py [--mb 300]

The object is written by the integration test's own writer (tests/integration/test_memory.py), the gateway
started by the test harness on a temporary directory; the peak is VmHWM, reset through /proc/PID/clear_refs
just before the store."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

import test_memory as tm  # noqa: E402
from gw_harness import Gateway  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=300, help="size of the private OB element in MB (10^6 bytes)")
    args = ap.parse_args()
    tm.SIZE = args.mb * 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        obj = tmp / "big.dcm"
        ids, path, _ = tm.private_before_pixel_data(obj)
        gw = Gateway(tmp / "gw").start()
        try:
            pid = gw.proc.pid
            before = tm.peak_reset(pid)
            started = time.monotonic()
            tm.storescu(gw, obj, tm.CT, tm.EXPLICIT_LE)
            seconds = time.monotonic() - started
            store_growth = tm.status_kb(pid, "VmHWM") - before
            study, series, sop = ids
            before = tm.peak_reset(pid)
            tm.download(f"{gw.base_url}/studies/{study}/series/{series}/instances/{sop}/bulk/{path}",
                        'multipart/related; type="application/octet-stream"', tmp / "bulk.bin")
            bulk_growth = tm.status_kb(pid, "VmHWM") - before
        finally:
            gw.stop()
    print(f"{args.mb} MB private OB before the pixel data: C-STORE in {seconds:.1f} s, "
          f"peak RSS +{store_growth / 1024:.1f} MiB storing, +{bulk_growth / 1024:.1f} MiB serving its bulk data")


if __name__ == "__main__":
    main()
