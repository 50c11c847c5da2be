"""A real S3 server for the tests: Garage, single node, one bucket and one key, on free loopback ports with
a data directory of its own. It can be stopped and started again (same ports, same data) to cut storage
away from a running gateway.

The binary comes from scripts/ensure-garage (a `garage` on PATH, else one built once into ~/.cache/garage).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig

from gw_harness import free_port

CACHE_ROOT = Path.home() / ".cache" / "garage"
_RUNNING: dict[str, "Garage"] = {}  # endpoint -> server, for stored_keys()
REGION = "garage"
BUCKET = "dicom"


def garage_binary() -> Path:
    """GARAGE_BIN (set by scripts/test, which builds it once with scripts/ensure-garage), else `garage` on PATH,
    else the cached build."""
    for candidate in (os.environ.get("GARAGE_BIN"), shutil.which("garage"), CACHE_ROOT / "bin" / "garage"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise RuntimeError("no Garage binary: run scripts/ensure-garage (or scripts/test, which runs it)")


class Garage:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = garage_binary()
        self.config_path = self.workdir / "garage.toml"
        self.log_path = self.workdir / "garage.log"
        self.s3_port, self.rpc_port, self.admin_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.key_id = ""
        self.secret = ""
        self.config_path.write_text(
            f"""metadata_dir = "{self.workdir / 'meta'}"
data_dir = "{self.workdir / 'data'}"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{self.rpc_port}"
rpc_public_addr = "127.0.0.1:{self.rpc_port}"
rpc_secret = "{secrets.token_hex(32)}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{self.s3_port}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{self.admin_port}"
admin_token = "{secrets.token_hex(16)}"
"""
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def cli(self, *args: str) -> str:
        out = subprocess.run([str(self.binary), "-c", str(self.config_path), *args],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"garage {' '.join(args)} failed: {out.stdout}{out.stderr}")
        return out.stdout

    def start(self) -> "Garage":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(self.binary), "-c", str(self.config_path), "server"],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env={**os.environ, "RUST_LOG": "warn"})
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                self.cli("status")
                break
            except RuntimeError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"garage did not start:\n{self.log_path.read_text()[-3000:]}")
                time.sleep(0.2)
        if not self.key_id:
            self._set_up()
        self._wait_s3()
        _RUNNING[self.endpoint] = self
        return self

    def _set_up(self) -> None:
        """Single-node layout, the bucket and a key allowed to use it (first start only)."""
        node = self.cli("node", "id", "-q").strip().split("@")[0]
        self.cli("layout", "assign", "-z", "dc1", "-c", "1G", node)
        self.cli("layout", "apply", "--version", "1")
        self.cli("bucket", "create", BUCKET)
        self.cli("key", "create", "gateway")
        self.cli("bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "gateway")
        info = self.cli("key", "info", "gateway", "--show-secret")
        self.key_id = re.search(r"Key ID:\s*(\S+)", info).group(1)
        self.secret = re.search(r"Secret key:\s*(\S+)", info).group(1)

    def _wait_s3(self) -> None:
        """The S3 API answers once the layout is live."""
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().head_bucket(Bucket=BUCKET)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(10)

    def client(self):
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret,
            config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                              connect_timeout=2, read_timeout=30),
        )

    def keys(self, prefix: str = "") -> set[str]:
        out: set[str] = set()
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for page in pages:
            out |= {o["Key"] for o in page.get("Contents", [])}
        return out

    def gateway_env(self, prefix: str) -> dict[str, str]:
        """DICOMGW_* variables pointing a gateway at this server, under its own key prefix."""
        return {
            "DICOMGW_STORAGE__BACKEND": "s3",
            "DICOMGW_STORAGE__S3__ENDPOINT": self.endpoint,
            "DICOMGW_STORAGE__S3__REGION": REGION,
            "DICOMGW_STORAGE__S3__BUCKET": BUCKET,
            "DICOMGW_STORAGE__S3__PREFIX": prefix,
            "DICOMGW_STORAGE__S3__FORCE_PATH_STYLE": "true",
            "DICOMGW_STORAGE__S3__ACCESS_KEY_ID": self.key_id,
            "DICOMGW_STORAGE__S3__SECRET_ACCESS_KEY": self.secret,
        }


def stored_keys(gw) -> set[str]:
    """The object keys a gateway holds in storage, whichever its backend (relative to its root / prefix)."""
    env = gw.extra_env
    if env.get("DICOMGW_STORAGE__BACKEND") == "s3":
        server = _RUNNING[env["DICOMGW_STORAGE__S3__ENDPOINT"]]
        prefix = env["DICOMGW_STORAGE__S3__PREFIX"].strip("/") + "/"
        return {k[len(prefix):] for k in server.keys(prefix)}
    return {str(p.relative_to(gw.storage_dir)) for p in gw.stored_files() if p.suffix == ".dcm"}
