"""Fixtures that run the real gateway binary (see gw_harness.Gateway).

- `gateway`: one gateway per test module. A module can set its configuration by defining a module-scoped
  fixture `gateway_env` returning extra `DICOMGW_*` variables.
- `fresh_gateway`: a new gateway for one test.
- `gateway_factory`: `gateway_factory(env={...})` starts as many gateways as a test needs.
- `storage_env`: the storage backend of all three (module scope; filesystem by default). A module runs on both
  backends by overriding it with a fixture parametrized over `BACKENDS` that returns `backend_env(request)`.
- `garage`: a real S3 server (gw_s3.Garage) shared by the session, started on first use; each gateway on it
  gets a key prefix of its own.

When a test fails, the tail of the log of every gateway it used is attached to its report.
"""

from __future__ import annotations

import shutil
import uuid

import pytest

from gw_harness import Gateway, binary_path

_LOG_LINES = 150


def pytest_report_header(config):
    return f"dicom-gateway binary: {binary_path()}"


@pytest.fixture(scope="module")
def gateway_env() -> dict[str, str]:
    return {}


@pytest.fixture(scope="session")
def garage(tmp_path_factory):
    from gw_s3 import Garage

    server = Garage(tmp_path_factory.mktemp("garage")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def storage_env() -> dict[str, str]:
    return {}


BACKENDS = ["filesystem", "s3"]


def backend_env(request) -> dict[str, str]:
    """Gateway variables for the backend `request.param`: the filesystem (the default), or the session's
    Garage under a key prefix no other gateway uses."""
    if request.param == "s3":
        return request.getfixturevalue("garage").gateway_env(prefix=f"gw-{uuid.uuid4().hex[:12]}")
    return {}


def _start(tmp_path_factory, name: str, env: dict[str, str], registry: list) -> Gateway:
    gw = Gateway(tmp_path_factory.mktemp(name), env=env)
    registry.append(gw)  # registered before start, so a failed start still shows its log
    gw.start()
    return gw


def _finish(gw: Gateway, keep_dir: bool) -> None:
    gw.stop()
    if not keep_dir:
        shutil.rmtree(gw.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def gateway(request, tmp_path_factory, gateway_env, storage_env):
    registry = request.node.stash.setdefault(_GATEWAYS, [])
    name = "gw-" + request.module.__name__.rsplit(".", 1)[-1]
    gw = _start(tmp_path_factory, name, {**storage_env, **gateway_env}, registry)
    yield gw
    _finish(gw, keep_dir=request.session.testsfailed > 0)


@pytest.fixture
def fresh_gateway(request, tmp_path_factory, storage_env):
    registry = request.node.stash.setdefault(_GATEWAYS, [])
    gw = _start(tmp_path_factory, "gw-" + request.node.name[:40], dict(storage_env), registry)
    yield gw
    _finish(gw, keep_dir=request.session.testsfailed > 0)


@pytest.fixture
def gateway_factory(request, tmp_path_factory, storage_env):
    registry = request.node.stash.setdefault(_GATEWAYS, [])
    started: list[Gateway] = []

    def make(env: dict[str, str | None] | None = None, start: bool = True, **kw) -> Gateway:
        env = {**storage_env, **(env or {})}
        gw = Gateway(tmp_path_factory.mktemp("gw-" + request.node.name[:40]), env=env, **kw)
        registry.append(gw)
        started.append(gw)
        if start:
            gw.start()
        return gw

    yield make
    for gw in started:
        _finish(gw, keep_dir=request.session.testsfailed > 0)


_GATEWAYS = pytest.StashKey[list]()


def _gateways_for(item, when: str) -> list[Gateway]:
    """Gateways this test used: those it started, the fixtures it got, and (when set-up failed) its
    module's, which may have failed to start."""
    found = list(item.stash.get(_GATEWAYS, []))
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Gateway) and value not in found:
            found.append(value)
    module = item.getparent(pytest.Module)
    if when == "setup" and module is not None:
        found += [g for g in module.stash.get(_GATEWAYS, []) if g not in found]
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for gw in _gateways_for(item, report.when):
            report.sections.append(
                (f"gateway log {gw.workdir.name} (last {_LOG_LINES} lines)", gw.log_tail(_LOG_LINES))
            )


class StoredCorpus:
    """`unique_corpus()` as stored in a gateway: which samples were acknowledged (0000) and which not."""

    def __init__(self, samples, statuses):
        self.samples = samples
        self.statuses = statuses
        self.acked = [s for s in samples if statuses.get(s.name) == 0x0000]
        self.refused = {s.name: statuses.get(s.name) for s in samples if statuses.get(s.name) != 0x0000}

    def studies(self) -> dict[str, list]:
        out: dict[str, list] = {}
        for s in self.acked:
            out.setdefault(s.study_uid, []).append(s)
        return out

    def series(self) -> dict[str, list]:
        out: dict[str, list] = {}
        for s in self.acked:
            out.setdefault(s.series_uid, []).append(s)
        return out


@pytest.fixture(scope="module")
def stored_corpus(gateway) -> StoredCorpus:
    """Every readable sample, each under a SOP Instance UID of its own, stored in the module's gateway."""
    from gw_dimse import store_all
    from gw_samples import unique_corpus

    samples = list(unique_corpus())
    return StoredCorpus(samples, store_all(gateway, samples))
