"""QIDO-RS against the whole corpus, through `dicomweb_client` (and plain `requests` where the status code or a
header is the promise)."""

from __future__ import annotations

import re

import pytest
from pydicom.multival import MultiValue

from gw_samples import unique_corpus
from gw_web import client, get, has, instance_json, tag_key, text, value, values

CHARSET_SAMPLES = [s for s in unique_corpus() if s.name.startswith("pydicom-charsets/")]
PAGE = 50


# -- helpers -------------------------------------------------------------------------------------------------
def norm_pn(s: str) -> str:
    """PS3.5 6.2.1: trailing empty components and groups may be left out; compare without them."""
    groups = str(s).split("=")
    groups = [g.rstrip("^ ") for g in groups]
    while groups and groups[-1] == "":
        groups.pop()
    return "=".join(groups)


def json_pn(v) -> str:
    """A DICOM JSON PN value as one string Alphabetic=Ideographic=Phonetic."""
    if v is None:
        return ""
    assert isinstance(v, dict), f"PN value is not an object: {v!r}"
    return norm_pn("=".join([v.get("Alphabetic", ""), v.get("Ideographic", ""), v.get("Phonetic", "")]))


def attr(sample, keyword) -> str:
    v = sample.ds.get(keyword)
    if v is None or v == "":
        return ""
    if keyword == "PatientName":
        return norm_pn(v)
    return str(v)


def candidates(samples, keyword) -> set[str]:
    return {attr(s, keyword) for s in samples}


def by_uid(results, keyword) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in results:
        uid = text(r, keyword)
        assert uid not in out, f"{keyword} {uid} listed twice"
        out[uid] = r
    return out


def search_all(search, **kw) -> list[dict]:
    """All results of a QIDO search, paged with limit/offset (fails if the gateway ignores offset)."""
    out: list[dict] = []
    for page in range(100):
        got = search(limit=PAGE, offset=page * PAGE, **kw)
        out += got
        if len(got) < PAGE:
            return out
    raise AssertionError("more than 100 pages: offset ignored?")


def study_uids(results) -> set[str]:
    return {text(r, "StudyInstanceUID") for r in results}


@pytest.fixture(scope="module")
def corpus(stored_corpus):
    return stored_corpus


@pytest.fixture(scope="module")
def c(gateway):
    return client(gateway)


@pytest.fixture(scope="module")
def all_studies(c, corpus):
    return by_uid(search_all(c.search_for_studies), "StudyInstanceUID")


# -- every stored object is found, with the right attributes ------------------------------------------------
def test_every_corpus_sample_is_acknowledged(corpus):
    assert corpus.refused == {}, f"{len(corpus.refused)} samples not stored with 0000: {corpus.refused}"


def test_search_for_studies_finds_each_study_with_its_attributes(gateway, corpus, all_studies):
    problems = []
    for st, samples in corpus.studies().items():
        r = all_studies.get(st)
        if r is None:
            problems.append(f"{st}: not found")
            continue
        for kw in ["PatientID", "StudyDate", "AccessionNumber", "StudyID"]:
            if text(r, kw) not in candidates(samples, kw):
                problems.append(f"{st}: {kw} {text(r, kw)!r} not in {candidates(samples, kw)}")
        if json_pn(value(r, "PatientName")) not in candidates(samples, "PatientName"):
            problems.append(f"{st}: PatientName {value(r, 'PatientName')!r} not in {candidates(samples, 'PatientName')}")
        n = value(r, "NumberOfStudyRelatedInstances")
        if n != len(samples):
            problems.append(f"{st}: NumberOfStudyRelatedInstances {n!r} != {len(samples)}")
        n = value(r, "NumberOfStudyRelatedSeries")
        if n != len({s.series_uid for s in samples}):
            problems.append(f"{st}: NumberOfStudyRelatedSeries {n!r} != {len({s.series_uid for s in samples})}")
        modalities = set(values(r, "ModalitiesInStudy") or [])
        expected = candidates(samples, "Modality") - {""}
        if modalities != expected:
            problems.append(f"{st}: ModalitiesInStudy {modalities} != {expected}")
        url = text(r, "RetrieveURL")
        if not url.endswith(f"/studies/{st}"):
            problems.append(f"{st}: RetrieveURL {url!r}")
    assert not problems, "\n".join(problems[:40])
    assert set(all_studies) == set(corpus.studies()), "studies listed that were never stored"


def test_study_results_always_include_the_required_attributes(all_studies):
    required = ["StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
                "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "RetrieveURL"]
    missing = {st: [k for k in required if not has(r, k)] for st, r in all_studies.items()}
    missing = {st: ks for st, ks in missing.items() if ks}
    assert not missing, f"study results lacking required attributes (even as empty): {missing}"


def test_search_for_series_finds_each_series_with_its_attributes(c, corpus):
    problems = []
    everything = by_uid(search_all(c.search_for_series), "SeriesInstanceUID")
    assert set(everything) == set(corpus.series()), "GET /series differs from the stored series"
    for st, samples in corpus.studies().items():
        found = by_uid(c.search_for_series(study_instance_uid=st), "SeriesInstanceUID")
        expected = {s.series_uid for s in samples}
        if set(found) != expected:
            problems.append(f"/studies/{st}/series: {set(found)} != {expected}")
            continue
        for se, r in found.items():
            in_series = [s for s in samples if s.series_uid == se]
            if text(r, "Modality") not in candidates(in_series, "Modality"):
                problems.append(f"{se}: Modality {text(r, 'Modality')!r}")
            if value(r, "NumberOfSeriesRelatedInstances") != len(in_series):
                problems.append(f"{se}: NumberOfSeriesRelatedInstances {value(r, 'NumberOfSeriesRelatedInstances')!r}"
                                f" != {len(in_series)}")
            if not text(r, "RetrieveURL").endswith(f"/studies/{st}/series/{se}"):
                problems.append(f"{se}: RetrieveURL {text(r, 'RetrieveURL')!r}")
    assert not problems, "\n".join(problems[:40])


def test_search_for_instances_finds_each_instance_with_its_attributes(c, corpus):
    everything = by_uid(search_all(c.search_for_instances), "SOPInstanceUID")
    assert set(everything) == {s.sop_uid for s in corpus.acked}, "GET /instances differs from the stored set"
    problems = []
    for se, samples in corpus.series().items():
        st = samples[0].study_uid
        found = by_uid(c.search_for_instances(study_instance_uid=st, series_instance_uid=se), "SOPInstanceUID")
        if set(found) != {s.sop_uid for s in samples}:
            problems.append(f"/studies/{st}/series/{se}/instances: {len(found)} found, {len(samples)} stored")
            continue
        for s in samples:
            r = found[s.sop_uid]
            if text(r, "SOPClassUID") != s.sop_class:
                problems.append(f"{s.id}: SOPClassUID {text(r, 'SOPClassUID')!r} != {s.sop_class}")
            if not text(r, "RetrieveURL").endswith(f"/studies/{st}/series/{se}/instances/{s.sop_uid}"):
                problems.append(f"{s.id}: RetrieveURL {text(r, 'RetrieveURL')!r}")
            for kw in ["Rows", "Columns"]:
                if kw in s.ds and value(r, kw) != s.ds.get(kw):
                    problems.append(f"{s.id}: {kw} {value(r, kw)!r} != {s.ds.get(kw)}")
    for st, samples in corpus.studies().items():
        found = c.search_for_instances(study_instance_uid=st)
        if {text(r, "SOPInstanceUID") for r in found} != {s.sop_uid for s in samples}:
            problems.append(f"/studies/{st}/instances: {len(found)} found, {len(samples)} stored")
    assert not problems, "\n".join(problems[:40])


@pytest.mark.parametrize("sample", CHARSET_SAMPLES, ids=lambda s: s.id)
def test_patient_name_is_decoded_from_its_specific_character_set(c, corpus, sample):
    found = instance_json(c, sample.sop_uid, fields=["PatientName"])
    assert len(found) == 1
    got = [json_pn(v) for v in values(found[0], "PatientName") or []]
    pn = sample.ds["PatientName"].value
    expected = [norm_pn(v) for v in (pn if isinstance(pn, MultiValue) else [pn])]
    assert got == expected, f"{sample.ds.get('SpecificCharacterSet')}: JSON {got} != pydicom {expected}"


# -- matching -------------------------------------------------------------------------------------------------
def expected_studies(corpus, predicate) -> set[str]:
    return {st for st, samples in corpus.studies().items() if any(predicate(s) for s in samples)}


def test_patient_id_matches_exactly_and_case_sensitively(c, corpus):
    pid = "98890234"
    assert study_uids(c.search_for_studies(search_filters={"PatientID": pid})) == expected_studies(
        corpus, lambda s: attr(s, "PatientID") == pid)
    assert c.search_for_studies(search_filters={"PatientID": pid[:-1]}) == [], "a prefix matched without *"
    assert study_uids(c.search_for_studies(search_filters={"00100020": pid})) == expected_studies(
        corpus, lambda s: attr(s, "PatientID") == pid), "the tag form 00100020 does not match like PatientID"
    assert c.search_for_studies(search_filters={"PatientID": "ID11111"}) == [], (
        "PatientID (LO) matched case-insensitively: 'ID11111' found 'id11111'")


@pytest.mark.parametrize("pattern", ["doe*", "*ARCHIBALD", "d?e^peter", "*^pete?", "citizen^jan"])
def test_patient_name_wildcards_match_case_insensitively(c, corpus, pattern):
    rx = re.compile("^" + re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".") + "$", re.I)
    expected = expected_studies(corpus, lambda s: bool(rx.match(attr(s, "PatientName"))))
    assert expected, "pattern matches nothing in the corpus"
    assert study_uids(c.search_for_studies(search_filters={"PatientName": pattern})) == expected


def test_percent_encoded_caret_in_patient_name_is_decoded(gateway, corpus):
    r = get(gateway, "/studies", params={"PatientName": "Doe^Peter"})  # sent as Doe%5EPeter
    assert r.status_code == 200, r.status_code
    assert study_uids(r.json()) == expected_studies(corpus, lambda s: attr(s, "PatientName") == "Doe^Peter")


DATE = re.compile(r"^\d{8}$")


@pytest.mark.parametrize("query,lo,hi", [
    ("20030101-20031231", "20030101", "20031231"),
    ("-19991231", "00000000", "19991231"),
    ("20200101-", "20200101", "99999999"),
    ("20040826", "20040826", "20040826"),
])
def test_study_date_range_matches(c, corpus, query, lo, hi):
    found = study_uids(c.search_for_studies(search_filters={"StudyDate": query}))
    valid = expected_studies(corpus, lambda s: bool(DATE.match(attr(s, "StudyDate"))))
    expected = expected_studies(corpus, lambda s: DATE.match(attr(s, "StudyDate")) and lo <= attr(s, "StudyDate") <= hi)
    assert expected, "range matches nothing in the corpus"
    # Studies with no date or a non-DA date (one sample has "1997.04.24") may match or not.
    assert found & valid == expected


@pytest.mark.parametrize("query,names", [
    ("2011-2012", {"pydicom/examples_palette.dcm"}),  # years name whole spans
    ("20130125105919-", {"pydicom/waveform_ecg.dcm"}),
    ("-20110525145628.35", {"pydicom/examples_palette.dcm"}),
    ("20110525-20130125", {"pydicom/examples_palette.dcm", "pydicom/waveform_ecg.dcm"}),
    # 10:00-10:59 at +01:00 is 09:xx UTC; 11:xx at +01:00 is 10:xx, where the 10:59:19 lies.
    ("2013012510&TimezoneOffsetFromUTC=%2B0100", set()),
    ("2013012511&TimezoneOffsetFromUTC=%2B0100", {"pydicom/waveform_ecg.dcm"}),
])
def test_acquisition_datetime_range_matches_instances(gateway, corpus, query, names):
    """DT range matching (PS3.4 C.2.2.2.5), the query's Timezone Offset From UTC applied to values without one
    (the stored values carry none and their objects give no offset: they compare as written)."""
    expected = {s.sop_uid for s in corpus.acked if s.name in names}
    assert len(expected) == len(names)
    r = get(gateway, f"/instances?AcquisitionDateTime={query}&includefield=AcquisitionDateTime")
    found = {text(i, "SOPInstanceUID") for i in r.json()} if r.status_code == 200 else set()
    assert r.status_code == (200 if names else 204), r.text
    assert found == expected


@pytest.mark.parametrize("modality", ["CT", "SEG", "MR"])
def test_modalities_in_study_matches_studies_with_that_modality(c, corpus, modality):
    expected = expected_studies(corpus, lambda s: attr(s, "Modality") == modality)
    found = c.search_for_studies(search_filters={"ModalitiesInStudy": modality})
    assert study_uids(found) == expected


@pytest.mark.parametrize("sep", [",", "\\"], ids=["comma", "backslash"])
def test_uid_list_matches_each_listed_study(c, corpus, sep):
    uids = sorted(corpus.studies())[:3]
    found = c.search_for_studies(search_filters={"StudyInstanceUID": sep.join(uids)})
    assert study_uids(found) == set(uids)


def test_includefield_all_returns_optional_study_attributes(c, corpus):
    s = next(s for s in corpus.acked if attr(s, "StudyDescription"))
    found = c.search_for_studies(search_filters={"StudyInstanceUID": s.study_uid}, fields=["all"])
    assert len(found) == 1
    assert text(found[0], "StudyDescription") in candidates(corpus.studies()[s.study_uid], "StudyDescription")


def test_repeated_includefield_returns_each_field(c, corpus):
    s = next(s for s in corpus.acked if attr(s, "StudyDescription") and attr(s, "SeriesDescription"))
    found = instance_json(c, s.sop_uid, fields=["StudyDescription", "SeriesDescription"])
    assert len(found) == 1
    assert text(found[0], "StudyDescription") == attr(s, "StudyDescription")
    assert text(found[0], "SeriesDescription") == attr(s, "SeriesDescription")


def test_limit_and_offset_page_through_instances_in_a_stable_order(c, corpus):
    total = len(corpus.acked)
    pages, seen = [], []
    for offset in range(0, total + 7, 7):
        page = [text(r, "SOPInstanceUID") for r in c.search_for_instances(limit=7, offset=offset)]
        assert len(page) <= 7
        pages.append(page)
        seen += page
    assert len(seen) == len(set(seen)), "pages overlap"
    assert set(seen) == {s.sop_uid for s in corpus.acked}, "pages miss instances"
    again = [text(r, "SOPInstanceUID") for r in c.search_for_instances(limit=7, offset=7)]
    assert again == pages[1], "the same page came back in a different order"


def test_no_match_answers_204(gateway, c):
    assert c.search_for_studies(search_filters={"PatientID": "NO-SUCH-PATIENT"}) == []
    r = get(gateway, "/studies", params={"PatientID": "NO-SUCH-PATIENT"})
    assert r.status_code == 204 and r.content == b"", (r.status_code, r.content[:200])


@pytest.mark.parametrize("params", [
    {"StudyDate": "notadate"}, {"limit": "-1"}, {"limit": "abc"}, {"offset": "-5"},
], ids=lambda p: "&".join(f"{k}={v}" for k, v in p.items()))
def test_malformed_query_answers_400(gateway, params):
    r = get(gateway, "/studies", params=params)
    assert r.status_code == 400, f"{params} answered {r.status_code}"


def test_fuzzymatching_is_done_or_answered_with_a_warning(gateway, corpus):
    r = get(gateway, "/studies", params={"PatientName": "peter", "fuzzymatching": "true"})
    assert r.status_code in (200, 204), r.status_code
    warning = r.headers.get("Warning", "")
    fuzzy_found = r.status_code == 200 and study_uids(r.json()) & expected_studies(
        corpus, lambda s: attr(s, "PatientName") == "Doe^Peter")
    assert fuzzy_found or warning.startswith("299"), (
        f"fuzzymatching=true neither matched 'peter' to Doe^Peter nor answered a 'Warning: 299 ...' header "
        f"(Warning: {warning!r})")


def test_qido_answers_carry_cors_headers(gateway, corpus):
    r = get(gateway, "/studies", headers={"Origin": "http://viewer.example"})
    assert r.status_code == 200
    assert r.headers.get("Access-Control-Allow-Origin") in ("*", "http://viewer.example")


def test_qido_content_type_is_dicom_json(gateway, corpus):
    r = get(gateway, "/studies", headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200
    assert r.headers.get("Content-Type", "").split(";")[0].strip() == "application/dicom+json"



def test_repeated_uid_key_is_a_list_of_uids(gateway, corpus):
    """PS3.18: a UID matching key repeated in the query is one UID list (here sent by `requests`, which
    repeats a key given a list of values)."""
    uids = sorted(corpus.studies())[:3]
    r = get(gateway, "/studies", params=[("StudyInstanceUID", u) for u in uids])
    assert r.status_code == 200, r.status_code
    assert study_uids(r.json()) == set(uids)
    series = sorted({s.series_uid for s in corpus.acked})[:2]
    r = get(gateway, "/instances", params=[("SeriesInstanceUID", u) for u in series])
    assert r.status_code == 200, r.status_code
    expected = {s.sop_uid for s in corpus.acked if s.series_uid in series}
    assert {text(x, "SOPInstanceUID") for x in r.json()} == expected


STUDY_LEVEL = ["StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "PatientName", "PatientID",
               "PatientBirthDate", "PatientSex", "StudyID", "ReferringPhysicianName"]
SERIES_LEVEL = ["SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription"]


def test_series_and_instance_results_carry_the_levels_above(c, corpus, all_studies):
    """PS3.18 10.6.3.3.2 / 10.6.3.3.3: series results include the study attributes, instance results the
    study and series attributes, whichever resource was searched."""
    st = next(st for st, r in all_studies.items() if text(r, "PatientID") and text(r, "StudyDate"))
    study = all_studies[st]
    all_series = by_uid(c.search_for_series(search_filters={"StudyInstanceUID": st}), "SeriesInstanceUID")
    in_study = by_uid(c.search_for_series(study_instance_uid=st), "SeriesInstanceUID")
    assert all_series and set(all_series) == set(in_study)
    for results in (all_series, in_study):
        for r in results.values():
            for kw in STUDY_LEVEL:
                assert has(r, kw), f"series result lacks study attribute {kw}"
                assert r[tag_key(kw)] == study[tag_key(kw)], kw
    se, series = next(iter(all_series.items()))
    for found in (c.search_for_instances(search_filters={"SeriesInstanceUID": se}),
                  c.search_for_instances(study_instance_uid=st, series_instance_uid=se)):
        assert found
        for r in found:
            for kw in STUDY_LEVEL:
                assert r.get(tag_key(kw)) == study[tag_key(kw)], f"instance result: study attribute {kw}"
            for kw in SERIES_LEVEL:
                assert r.get(tag_key(kw)) == series.get(tag_key(kw)), f"instance result: series attribute {kw}"


@pytest.mark.parametrize("accept", ["image/xyz", 'multipart/related; type="application/dicom+xml"',
                                    "application/dicom+json;q=0"])
def test_search_with_an_accept_that_cannot_be_met_answers_406(gateway, corpus, accept):
    for path in ("/studies", "/series", "/instances"):
        r = get(gateway, path, headers={"Accept": accept})
        assert r.status_code == 406, f"{path} with Accept {accept!r} answered {r.status_code}"


@pytest.mark.parametrize("accept", ["application/json", "application/*, image/xyz;q=0.5", "*/*"])
def test_search_with_an_accept_admitting_json_is_answered(gateway, corpus, accept):
    r = get(gateway, "/studies", headers={"Accept": accept})
    assert r.status_code == 200, f"Accept {accept!r} answered {r.status_code}"
