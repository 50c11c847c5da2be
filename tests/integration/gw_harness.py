"""Runs the real `dicom-gateway` binary for a test: free ports, a private data directory, readiness,
stop / kill -9 / restart, and its log.

Configuration is passed only through `DICOMGW_<SECTION>__<KEY>` environment variables (any inherited
`DICOMGW_*` variable is dropped first, so the developer's shell cannot change what a test sees). The process
runs with its working directory set to the gateway's own temporary directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = float(os.environ.get("DICOMGW_TEST_START_TIMEOUT", "30"))
STOP_TIMEOUT = 10.0


def binary_path() -> Path:
    explicit = os.environ.get("DICOMGW_BIN")
    if explicit:
        p = Path(explicit)
        return p if p.is_absolute() else (REPO / p)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    return target / "debug" / "dicom-gateway"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayError(AssertionError):
    pass


class Gateway:
    """One gateway installation: ports and data directory stay the same across stop/start/kill9."""

    def __init__(self, workdir: Path, env: dict[str, str | None] | None = None, ae_title: str = "DICOMGW",
                 args: list[str] | None = None, http_ca: str | None = None):
        """`env`: extra DICOMGW_* variables; a value of None removes a variable the harness would set.
        `http_ca`: the gateway serves HTTPS (`DICOMGW_HTTP__TLS=true` in `env`) with a certificate this CA
        file verifies."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.storage_dir = self.data_dir / "objects"
        self.index_path = self.data_dir / "index.db"
        self.log_path = self.workdir / "gateway.log"
        self.ae_title = ae_title
        self.extra_env = dict(env or {})
        self.args = list(args or [])
        self.http_ca = http_ca
        self.dimse_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    # -- addresses -------------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def http_root(self) -> str:
        scheme = "https" if self.http_ca else "http"
        return f"{scheme}://{self.host}:{self.http_port}"

    @property
    def base_url(self) -> str:
        """DICOMweb root."""
        return f"{self.http_root}/dicomweb"

    # -- process control -------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMGW_")}
        env.update(
            {
                "DICOMGW_DIMSE__BIND": f"{self.host}:{self.dimse_port}",
                "DICOMGW_HTTP__BIND": f"{self.host}:{self.http_port}",
                "DICOMGW_STORAGE__PATH": str(self.storage_dir),
                "DICOMGW_INDEX__URL": f"sqlite://{self.index_path}",
                "DICOMGW_DIMSE__AE_TITLE": self.ae_title,
                "RUST_BACKTRACE": "1",
                "NO_COLOR": "1",  # plain log lines in test reports
            }
        )
        env.setdefault("RUST_LOG", "info,jpeg2k=warn")
        env.update(self.extra_env)
        return {k: v for k, v in env.items() if v is not None}

    def start(self, timeout: float = START_TIMEOUT) -> "Gateway":
        """Start and wait until ready. On the very first start only, a port taken by someone else between
        free_port() and the bind is replaced and the start retried; later starts keep their ports."""
        for attempt in range(3):
            try:
                return self._start_once(timeout)
            except GatewayError as e:
                if self.starts > 1 or "in use" not in str(e).lower() or attempt == 2:
                    raise
                self.starts = 0
                self.dimse_port, self.http_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> "Gateway":
        if self.is_running():
            raise GatewayError("gateway already running")
        binary = binary_path()
        if not binary.exists():
            raise GatewayError(f"gateway binary {binary} does not exist (run cargo build, or set DICOMGW_BIN)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== start #{self.starts}: {binary} serve {' '.join(self.args)} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [str(binary), "serve", *self.args],
            cwd=self.workdir,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until GET /readyz answers 200 and the DIMSE port accepts a connection."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise GatewayError(
                    f"gateway exited with status {self.proc.returncode} before it was ready\n{self.log_tail()}"
                )
            try:
                r = requests.get(f"{self.http_root}/readyz", timeout=2, verify=self.http_ca or True)
                last = f"/readyz -> {r.status_code}"
                if r.status_code == 200 and self._dimse_accepts():
                    return
            except requests.RequestException as e:
                last = f"/readyz: {type(e).__name__}"
            time.sleep(0.1)
        raise GatewayError(f"gateway not ready after {timeout}s ({last})\n{self.log_tail()}")

    def _dimse_accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.dimse_port), timeout=1):
                return True
        except OSError:
            return False

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in `timeout` seconds. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._append_log(f"===== did not stop {timeout}s after SIGTERM: SIGKILL =====")
                self._signal(signal.SIGKILL)
                self.proc.wait(5)
        rc = self.proc.returncode
        self._append_log(f"===== exited with status {rc} =====")
        return rc

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait(5)
            self._append_log("===== killed with SIGKILL by the test =====")

    def restart(self, timeout: float = START_TIMEOUT) -> "Gateway":
        self.stop()
        return self.start(timeout)

    def _signal(self, sig: int) -> None:
        # The gateway runs in its own session; signal the whole group so no helper process outlives it.
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    # -- inspection ------------------------------------------------------------------------------------
    def _append_log(self, line: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        text = self.log_text().splitlines()
        return "\n".join(text[-lines:])

    def stored_files(self) -> set[Path]:
        """Every regular file under the storage directory (whatever the gateway names them)."""
        if not self.storage_dir.exists():
            return set()
        return {p for p in self.storage_dir.rglob("*") if p.is_file()}

    def data_files(self) -> set[Path]:
        """Every regular file under the data directory (objects, spool, anything else) except the SQLite
        index and its journal files, and the empty spool files the gateway creates ahead of need: what a
        refused or interrupted C-STORE must not add to. (The storage write-ahead log's segments are
        allocated at start, so they never appear as added files.)"""
        if not self.data_dir.exists():
            return set()
        index_files = {self.index_path.name + suffix for suffix in ("", "-wal", "-shm", "-journal")}
        return {p for p in self.data_dir.rglob("*")
                if p.is_file() and p.name not in index_files
                and not (p.suffix == ".part" and p.stat().st_size == 0)}

    def files_mentioning(self, text: str) -> list[Path]:
        """Files under the data directory (index excluded) whose bytes contain `text` (e.g. a UID). The
        storage write-ahead log is left out: it holds every recently stored object (and deletion) by
        design until its segment is reused."""
        needle = text.encode()
        return [p for p in self.data_files() if ".wal" not in p.parts and needle in p.read_bytes()]

    def __repr__(self) -> str:
        return f"<Gateway dimse={self.dimse_port} http={self.http_port} dir={self.workdir}>"
