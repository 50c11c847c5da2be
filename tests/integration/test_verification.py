"""Start-up, readiness, configuration and C-ECHO."""

import requests
from pynetdicom import build_context
from pynetdicom.sop_class import Verification

from gw_dimse import association, echo_status, echoscu


def test_healthz_and_readyz_answer_200_once_started(gateway):
    assert requests.get(f"{gateway.http_root}/healthz", timeout=5).status_code == 200
    assert requests.get(f"{gateway.http_root}/readyz", timeout=5).status_code == 200


def test_echoscu_gets_success(gateway):
    r = echoscu(gateway.dimse_port, gateway.ae_title)
    assert r.returncode == 0, f"echoscu failed:\n{r.stdout}\n{r.stderr}"


def test_pynetdicom_echo_gets_success(gateway):
    with association(gateway, [build_context(Verification)]) as assoc:
        assert echo_status(assoc) == 0x0000


def test_several_echoes_on_one_association_each_get_success(gateway):
    with association(gateway, [build_context(Verification)]) as assoc:
        assert [echo_status(assoc) for _ in range(5)] == [0x0000] * 5


def test_config_file_is_read_and_env_overrides_it(gateway_factory, tmp_path):
    """`serve --config FILE` takes its settings from the TOML file; DICOMGW_<SECTION>__<KEY> wins over it."""
    config = tmp_path / "gateway.toml"
    # No AE title in the environment: it must come from the file. The file's DIMSE bind (port 1, where
    # nothing can listen) must lose against DICOMGW_DIMSE__BIND, which the harness always sets.
    gw = gateway_factory(env={"DICOMGW_DIMSE__AE_TITLE": None}, start=False, ae_title="FROMFILE",
                         args=["--config", str(config)])
    config.write_text(
        "[dimse]\n"
        'bind = "127.0.0.1:1"\n'
        'ae_title = "FROMFILE"\n'
        "[http]\n"
        f'bind = "127.0.0.1:{gw.http_port}"\n'
        "[storage]\n"
        f'path = "{gw.storage_dir}"\n'
        "[index]\n"
        f'url = "sqlite://{gw.index_path}"\n'
    )
    gw.start()
    r = echoscu(gw.dimse_port, "FROMFILE")
    assert r.returncode == 0, f"AE title from the config file not used:\n{r.stdout}{r.stderr}"
    assert echoscu(gw.dimse_port, "DICOMGW").returncode != 0, "the default AE title was accepted too"
