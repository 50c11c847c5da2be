"""The study browser (/), study downloads and the OHIF viewer (/viewer/), in headless Chromium.

A real browser (Debian's Chromium, driven by Playwright) against the real gateway, with the OHIF build
`scripts/fetch-viewer` fetches: the study browser lists what is stored, escapes what it shows and links
to the viewer and the download; OHIF's study list shows the studies; opening a 50-slice CT, a JPEG 2000
and a JPEG-LS study draws an image (the viewport canvas holds varied, non-black pixels) with no failed
request, no HTTP error and no console error. Screenshots go to tests/integration/artifacts/.
"""

from __future__ import annotations

import copy
import io
import time
import zipfile

import pydicom
import pytest
import requests

from gw_dimse import store_all
from gw_samples import TESTDATA, derived_uid, from_dataset, sample_from_file
from gw_viewer import ARTIFACTS, PageWatch, browser, canvas_stats, ohif_dir

# Untrusted text in a patient name (no "=", which separates PN component groups): shown as text, never run.
HOSTILE_NAME = "<b>Doe</b><script>alert(1)</script>^O'Brien&Co"
CT_SLICES = 50


def _study(sample, name: str, patient_id: str, patient_name: str, description: str, count: int = 1):
    """`count` instances of `sample` as one new study (one series), slice positions 2.5 mm apart."""
    study_uid = derived_uid("viewer-study", name)
    series_uid = derived_uid("viewer-series", name)
    out = []
    for i in range(count):
        ds = copy.deepcopy(sample.ds)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = derived_uid("viewer-sop", name, str(i))
        ds.PatientID = patient_id
        ds.PatientName = patient_name
        ds.StudyDescription = description
        ds.StudyDate = "20240315"
        ds.AccessionNumber = f"ACC-{patient_id}"
        ds.InstanceNumber = i + 1
        if count > 1:
            ds.ImagePositionPatient = [0.0, 0.0, 2.5 * i]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SliceLocation = 2.5 * i
        out.append(from_dataset(ds, sample.ts, f"{name}-{i}"))
    return study_uid, out


@pytest.fixture(scope="module")
def viewer_dir():
    return ohif_dir()


@pytest.fixture(scope="module")
def gateway_env(viewer_dir):
    return {"DICOMGW_VIEWER__DIR": str(viewer_dir)}


@pytest.fixture(scope="module")
def studies(gateway):
    """Three studies: a 50-slice CT (Explicit VR LE), an MR in JPEG 2000 lossless, one in JPEG-LS."""
    made = {
        "ct": _study(sample_from_file(TESTDATA / "pydicom/CT_small.dcm"), "ct", "VIEW-CT", HOSTILE_NAME,
                     "CT 50 slices", CT_SLICES),
        "j2k": _study(sample_from_file(TESTDATA / "pydicom/MR_small_jp2klossless.dcm"), "j2k", "VIEW-J2K",
                      "Jpeg^Twothousand", "MR JPEG 2000"),
        "jls": _study(sample_from_file(TESTDATA / "pydicom/MR_small_jpeg_ls_lossless.dcm"), "jls", "VIEW-JLS",
                      "Jpeg^Ls", "MR JPEG-LS"),
    }
    samples = [s for _, batch in made.values() for s in batch]
    statuses = store_all(gateway, samples)
    assert all(v == 0 for v in statuses.values()), statuses
    return {key: uid for key, (uid, _) in made.items()}


@pytest.fixture(scope="module")
def chromium():
    with browser() as b:
        yield b


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    yield page
    context.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def test_study_browser_lists_studies_escapes_names_and_links_viewer_and_download(gateway, studies, page):
    watch = PageWatch().attach(page)
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(gateway.http_root + "/")
    page.wait_for_selector("tr[data-study-uid]")
    rows = page.query_selector_all("tr[data-study-uid]")
    assert {r.get_attribute("data-study-uid") for r in rows} == set(studies.values())
    ct_row = page.query_selector(f"tr[data-study-uid='{studies['ct']}']")
    # The hostile name is shown as the text it is (carets as spaces), and nothing in it ran.
    assert ct_row.query_selector(".patient-name").inner_text() == HOSTILE_NAME.replace("^", " ")
    assert ct_row.query_selector(".patient-name").evaluate("td => td.children.length") == 0
    assert dialogs == []
    assert ct_row.query_selector(".num.series").inner_text() == "1"
    assert ct_row.query_selector(".num.instances").inner_text() == str(CT_SLICES)
    assert ct_row.query_selector("a.open").get_attribute("href") == \
        f"/viewer/viewer?StudyInstanceUIDs={studies['ct']}"
    assert ct_row.query_selector("a.download").get_attribute("href") == f"/download/studies/{studies['ct']}"
    # Each row shows the study's thumbnail (the page puts a placeholder where one fails to load).
    page.wait_for_function(
        "[...document.querySelectorAll('tr[data-study-uid] td:first-child')].every(td =>"
        " td.querySelector('.placeholder') || (td.querySelector('img') && td.querySelector('img').complete"
        " && td.querySelector('img').naturalWidth > 0))")
    _shot(page, "study-browser")
    assert page.query_selector_all("tr[data-study-uid] .placeholder") == []
    assert watch.problems() == []

    # Search by patient ID, by modality and date range, and a page further on.
    page.goto(gateway.http_root + "/?PatientID=VIEW-JLS")
    page.wait_for_selector("tr[data-study-uid]")
    assert [r.get_attribute("data-study-uid") for r in page.query_selector_all("tr[data-study-uid]")] == \
        [studies["jls"]]
    page.goto(gateway.http_root + "/?ModalitiesInStudy=CT&from=2024-03-01&to=2024-03-31")
    page.wait_for_selector("tr[data-study-uid]")
    assert [r.get_attribute("data-study-uid") for r in page.query_selector_all("tr[data-study-uid]")] == \
        [studies["ct"]]
    page.goto(gateway.http_root + "/?PatientName=Jpeg")
    page.wait_for_selector("tr[data-study-uid]")
    assert len(page.query_selector_all("tr[data-study-uid]")) == 2
    page.goto(gateway.http_root + "/?offset=2")
    page.wait_for_selector("#previous")
    assert len(page.query_selector_all("tr[data-study-uid]")) == 1
    page.goto(gateway.http_root + "/?PatientID=NOBODY")
    page.wait_for_function("document.getElementById('status').textContent === 'No study matches.'")


def test_download_is_a_zip_of_the_studys_part10_files(gateway, studies):
    resp = requests.get(f"{gateway.http_root}/download/studies/{studies['ct']}", timeout=60)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/zip"
    assert resp.headers["content-disposition"] == f'attachment; filename="{studies["ct"]}.zip"'
    assert int(resp.headers["content-length"]) == len(resp.content)
    archive = zipfile.ZipFile(io.BytesIO(resp.content))
    assert archive.testzip() is None  # every member's CRC-32 checks out
    names = archive.namelist()
    assert len(names) == CT_SLICES
    sop_uids = set()
    for name in names:
        study, series, file = name.split("/")
        ds = pydicom.dcmread(io.BytesIO(archive.read(name)))
        assert (study, series, file) == (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID + ".dcm")
        # Byte for byte what WADO-RS serves for that instance.
        wado = requests.get(f"{gateway.base_url}/studies/{study}/series/{series}/instances/{ds.SOPInstanceUID}",
                            headers={"Accept": "multipart/related; type=\"application/dicom\"; transfer-syntax=*"},
                            timeout=30)
        assert archive.read(name) in wado.content
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == CT_SLICES
    assert requests.get(f"{gateway.http_root}/download/studies/1.2.3.999", timeout=10).status_code == 404
    assert requests.get(f"{gateway.http_root}/download/studies/not-a-uid", timeout=10).status_code == 400


def test_viewer_files_are_served_under_the_prefix(gateway, viewer_dir):
    index = requests.get(f"{gateway.http_root}/viewer/", timeout=10)
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert 'window.PUBLIC_URL="/viewer/"' in index.text
    assert 'src="/app-config.js"' not in index.text and 'src="/viewer/app-config.js"' in index.text
    # A client-side route gets index.html.
    assert requests.get(f"{gateway.http_root}/viewer/viewer?StudyInstanceUIDs=1.2.3", timeout=10).text == index.text
    config = requests.get(f"{gateway.http_root}/viewer/app-config.js", timeout=10).text
    assert "window.location.origin + '/dicomweb'" in config
    wasm = next(viewer_dir.glob("*.wasm")).name
    resp = requests.get(f"{gateway.http_root}/viewer/{wasm}", timeout=30)
    assert resp.headers["content-type"] == "application/wasm"
    assert resp.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert resp.content == (viewer_dir / wasm).read_bytes()
    assert requests.get(f"{gateway.http_root}/viewer/{wasm}", headers={"If-None-Match": resp.headers["etag"]},
                        timeout=10).status_code == 304
    assert requests.get(f"{gateway.http_root}/viewer/no-such.0123456789abcdef.js", timeout=10).status_code == 404


def test_without_the_files_the_viewer_says_how_to_get_them(gateway_factory, tmp_path):
    gw = gateway_factory(env={"DICOMGW_VIEWER__DIR": str(tmp_path / "nothing")})
    resp = requests.get(f"{gw.http_root}/viewer/", timeout=10)
    assert resp.status_code == 404
    assert "scripts/fetch-viewer" in resp.text
    # The study browser does not need the viewer.
    assert requests.get(f"{gw.http_root}/", timeout=10).status_code == 200


def test_ohif_study_list_shows_the_stored_studies(gateway, studies, page):
    watch = PageWatch().attach(page)
    page.goto(gateway.http_root + "/viewer/")
    # OHIF's worklist shows name, date, modalities, description, accession and instance count.
    for description in ("CT 50 slices", "MR JPEG 2000", "MR JPEG-LS"):
        page.get_by_text(description, exact=True).first.wait_for(timeout=60_000)
    _shot(page, "ohif-study-list")
    qido = [r.url for r in watch.requests if "/dicomweb/studies?" in r.url]
    assert qido, "OHIF sent no study search"
    # Its paging and the percent-encoded comma list of includefield, answered as sent.
    assert "limit=101" in qido[0] and "includefield=00081030%2C00080060" in qido[0]
    assert watch.problems() == []


@pytest.mark.parametrize("key", ["ct", "j2k", "jls"])
def test_ohif_renders_each_study_without_errors(gateway, studies, page, key):
    watch = PageWatch().attach(page)
    page.goto(f"{gateway.http_root}/viewer/viewer?StudyInstanceUIDs={studies[key]}")
    deadline = time.monotonic() + 90
    stats = None
    while time.monotonic() < deadline:
        stats = canvas_stats(page)
        if stats and stats["distinct"] >= 8 and stats["lit"] > 0.05:
            break
        page.wait_for_timeout(250)
    _shot(page, f"ohif-{key}")
    assert stats and stats["distinct"] >= 8 and stats["lit"] > 0.05, f"viewport stayed blank: {stats}"
    # Let the rest of the series load (prefetch), then check nothing failed on the way.
    page.wait_for_timeout(2000)
    urls = [r.url for r in watch.requests]
    assert any("/metadata" in u for u in urls), "OHIF read no metadata"
    assert any("/frames/" in u for u in urls), "OHIF fetched no frame"
    assert watch.problems() == []


def test_json_answers_are_gzipped_and_pixel_data_is_not(gateway, studies):
    study = studies["ct"]
    meta = requests.get(f"{gateway.base_url}/studies/{study}/metadata", headers={"Accept-Encoding": "gzip"},
                        stream=True, timeout=30)
    assert meta.headers["content-encoding"] == "gzip"
    wire = len(meta.raw.read(decode_content=False))
    plain = requests.get(f"{gateway.base_url}/studies/{study}/metadata",
                         headers={"Accept-Encoding": "identity"}, timeout=30)
    assert "content-encoding" not in plain.headers
    assert wire < len(plain.content) / 3, (wire, len(plain.content))
    first = plain.json()[0]
    series, sop = first["0020000E"]["Value"][0], first["00080018"]["Value"][0]
    frame = requests.get(f"{gateway.base_url}/studies/{study}/series/{series}/instances/{sop}/frames/1",
                         headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*",
                                  "Accept-Encoding": "gzip"}, timeout=30)
    assert frame.status_code == 200 and "content-encoding" not in frame.headers
