"""C-FIND SCP (Patient Root and Study Root, every level) against DCMTK findscu and pynetdicom: each
matching type, return of the requested keys only, character sets, FF01 for keys the index cannot match on,
C-CANCEL, odd transfer syntaxes, and who may query."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pynetdicom import build_context

from gw_dimse import association, store_all
from gw_qr import (
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    findscu,
    instance,
    peers_env,
    send_request,
    uid,
)
from gw_samples import TESTDATA, sample_from_file, with_new_uids

P1 = {"PatientID": "P1", "PatientName": "Doe^John", "PatientBirthDate": "19700101", "PatientSex": "M"}
P2 = {"PatientID": "P2", "PatientName": "Smith^Anna", "PatientBirthDate": "19851224", "PatientSex": "F"}
PROCEDURE = Dataset()
PROCEDURE.CodeValue = "CTHEAD"
PROCEDURE.CodingSchemeDesignator = "LOCAL"
PROCEDURE.CodeMeaning = "CT Head"
STUDY_A = {"uid": uid(1), **P1, "StudyDate": "20200115", "StudyTime": "101500", "AccessionNumber": "ACC1",
           "StudyDescription": "CT HEAD", "StudyID": "S1", "ProcedureCodeSequence": [PROCEDURE]}
STUDY_B = {"uid": uid(2), **P1, "StudyDate": "20210620", "StudyTime": "143000", "AccessionNumber": "ACC2",
           "StudyDescription": "MR KNEE", "StudyID": "S2"}
STUDY_C = {"uid": uid(3), **P2, "StudyDate": "20221001", "StudyTime": "080000", "AccessionNumber": "ACC3",
           "StudyDescription": "US ABDOMEN", "StudyID": "S3"}
SERIES = {
    uid(1, 1): (STUDY_A, {"uid": uid(1, 1), "Modality": "CT", "SeriesNumber": 1, "SeriesDescription": "AXIAL"}, 2),
    uid(1, 2): (STUDY_A, {"uid": uid(1, 2), "Modality": "CT", "SeriesNumber": 2, "SeriesDescription": "CORONAL"}, 1),
    uid(2, 1): (STUDY_B, {"uid": uid(2, 1), "Modality": "MR", "SeriesNumber": 1, "SeriesDescription": "T1"}, 3),
    uid(3, 1): (STUDY_C, {"uid": uid(3, 1), "Modality": "US", "SeriesNumber": 1, "SeriesDescription": "LIVER"}, 1),
}
GERMAN = uid(9)  # chrGerm.dcm, ISO_IR 100: PatientName "Äneas^Rüdiger"
CYRILLIC = uid(10)  # chrRuss.dcm, ISO_IR 144
# AcquisitionDateTime of STUDY_B's instances, and the moment each is in UTC: no offset and none in the
# object (as written), its own offset, the object's Timezone Offset From UTC.
ACQUISITION = {
    1: ({"AcquisitionDateTime": "20210620143000"}, "14:30"),
    2: ({"AcquisitionDateTime": "20210620163000+0100"}, "15:30"),
    3: ({"AcquisitionDateTime": "20210620190000", "TimezoneOffsetFromUTC": "+0200"}, "17:00"),
}
# A study with many instances, for C-CANCEL.
MANY = {"uid": uid(20), "PatientID": "P9", "PatientName": "Many^Images", "StudyDate": "20230101"}
MANY_SERIES = {"uid": uid(20, 1), "Modality": "OT", "SeriesNumber": 1}
MANY_COUNT = 40


@pytest.fixture(scope="module")
def gateway_env():
    return peers_env("FINDSCU", "PYTEST")


def _charset_sample(name: str, study_uid: str):
    s = sample_from_file(TESTDATA / f"pydicom-charsets/{name}.dcm")
    return with_new_uids(s, study_uid + ".1.1", "#qr", StudyInstanceUID=study_uid,
                         SeriesInstanceUID=study_uid + ".1", PatientID=name)


@pytest.fixture(scope="module")
def corpus(gateway):
    samples = [instance(st, se, n, attrs=ACQUISITION[n][0] if st is STUDY_B else None)
               for st, se, count in SERIES.values() for n in range(1, count + 1)]
    samples += [_charset_sample("chrGerm", GERMAN), _charset_sample("chrRuss", CYRILLIC)]
    samples += [instance(MANY, MANY_SERIES, n) for n in range(1, MANY_COUNT + 1)]
    statuses = store_all(gateway, samples)
    assert all(v == 0 for v in statuses.values()), statuses
    return samples


def _values(responses, keyword):
    return sorted(str(r.get(keyword, "")).rstrip("\0") for r in responses)


def _study_keys(**match) -> list[str]:
    keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"]
    return keys + [f"{k}={v}" for k, v in match.items()]


def _find(gateway, tmp_path, keys, **kw):
    proc, responses = findscu(gateway, keys, tmp_path / "rsp", **kw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, responses


def test_study_root_study_level_returns_the_requested_keys_only(gateway, corpus, tmp_path):
    _, responses = _find(gateway, tmp_path, _study_keys(PatientID="P1") + ["StudyDate", "PatientName",
                                                                           "NumberOfStudyRelatedInstances"])
    assert _values(responses, "StudyInstanceUID") == sorted([STUDY_A["uid"], STUDY_B["uid"]])
    for r in responses:
        keywords = {e.keyword for e in r}
        # ASCII text: no Specific Character Set (default repertoire).
        assert keywords == {"QueryRetrieveLevel", "StudyInstanceUID", "PatientID", "StudyDate", "PatientName",
                            "NumberOfStudyRelatedInstances"}, keywords
        assert r.QueryRetrieveLevel == "STUDY"
        assert str(r.PatientName) == "Doe^John"
    counts = {r.StudyInstanceUID.rstrip("\0"): int(r.NumberOfStudyRelatedInstances) for r in responses}
    assert counts == {STUDY_A["uid"]: 3, STUDY_B["uid"]: 3}


def test_patient_root_patient_level_groups_studies_by_patient(gateway, corpus, tmp_path):
    _, responses = _find(gateway, tmp_path, ["QueryRetrieveLevel=PATIENT", "PatientName=Doe*", "PatientID",
                                             "PatientBirthDate", "NumberOfPatientRelatedStudies",
                                             "NumberOfPatientRelatedInstances"], model="-P")
    assert len(responses) == 1
    r = responses[0]
    assert (r.PatientID, r.PatientBirthDate) == ("P1", "19700101")
    assert int(r.NumberOfPatientRelatedStudies) == 2
    assert int(r.NumberOfPatientRelatedInstances) == 6


def test_patient_level_is_refused_in_the_study_root_model(gateway, corpus, tmp_path):
    proc, responses = findscu(gateway, ["QueryRetrieveLevel=PATIENT", "PatientID"], tmp_path / "rsp")
    assert responses == []
    out = proc.stdout + proc.stderr
    assert "DataSetDoesNotMatchSOPClass" in out, out


@pytest.mark.parametrize("model", ["-S", "-P"])
def test_series_level_within_a_study(gateway, corpus, tmp_path, model):
    keys = ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={STUDY_A['uid']}", "SeriesInstanceUID", "Modality",
            "SeriesNumber", "NumberOfSeriesRelatedInstances"]
    if model == "-P":
        keys.append("PatientID=P1")
    _, responses = _find(gateway, tmp_path, keys, model=model)
    assert _values(responses, "SeriesInstanceUID") == sorted([uid(1, 1), uid(1, 2)])
    assert {int(r.NumberOfSeriesRelatedInstances) for r in responses} == {2, 1}
    assert {r.Modality for r in responses} == {"CT"}


@pytest.mark.parametrize("model", ["-S", "-P"])
def test_image_level_within_a_series(gateway, corpus, tmp_path, model):
    keys = ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={STUDY_B['uid']}",
            f"SeriesInstanceUID={uid(2, 1)}", "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows"]
    _, responses = _find(gateway, tmp_path, keys, model=model)
    assert _values(responses, "SOPInstanceUID") == sorted(f"{uid(2, 1)}.{n}" for n in (1, 2, 3))
    assert sorted(int(r.InstanceNumber) for r in responses) == [1, 2, 3]
    assert {int(r.Rows) for r in responses} == {8}


@pytest.mark.parametrize(
    "match, expected",
    [
        ({"PatientID": "P2"}, [STUDY_C]),  # single value
        ({"StudyInstanceUID": f"{STUDY_A['uid']}\\{STUDY_C['uid']}"}, [STUDY_A, STUDY_C]),  # UID list
        ({"PatientName": "Sm*"}, [STUDY_C]),  # wildcard *
        ({"AccessionNumber": "ACC?"}, [STUDY_A, STUDY_B, STUDY_C]),  # wildcard ?
        ({"StudyDate": "20200101-20211231"}, [STUDY_A, STUDY_B]),  # date range
        ({"StudyDate": "-20201231"}, [STUDY_A]),  # open start
        ({"StudyDate": "20220101-"}, [STUDY_C, MANY]),  # open end
        ({"StudyTime": "0700-0900"}, [STUDY_C]),  # time range
        ({"ModalitiesInStudy": "MR"}, [STUDY_B]),  # any series of the study
        ({"PatientID": "P1", "StudyDescription": "CT*"}, [STUDY_A]),  # keys combine
    ],
    ids=["single", "uid-list", "star", "question-mark", "date-range", "date-before", "date-after", "time-range",
         "modalities", "combined"],
)
def test_matching_types(gateway, corpus, tmp_path, match, expected):
    keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID" if "StudyInstanceUID" not in match else ""]
    keys = [k for k in keys if k] + [f"{k}={v}" for k, v in match.items()]
    _, responses = _find(gateway, tmp_path, keys)
    assert _values(responses, "StudyInstanceUID") == sorted(s["uid"] for s in expected)


@pytest.mark.parametrize(
    "match, expected",
    [
        ({"AcquisitionDateTime": "20210620150000-20210620160000"}, [2]),  # compared in UTC
        ({"AcquisitionDateTime": "-20210620143000"}, [1]),  # a complete value spans its second
        ({"AcquisitionDateTime": "2021062016-"}, [3]),
        ({"AcquisitionDateTime": "2021062014"}, [1]),  # a partial value spans the hour it names
        ({"AcquisitionDateTime": "2020-2021"}, [1, 2, 3]),
        ({"AcquisitionDateTime": "20210620153000-0100-20210620163000-0100"}, [3]),  # offsets in a range
        ({"AcquisitionDateTime": "20210620163000", "TimezoneOffsetFromUTC": "+0100"}, [2]),  # query's zone
        ({"AcquisitionDateTime": "2022-"}, []),
    ],
    ids=["range", "before", "after", "partial", "years", "range-with-offsets", "query-timezone", "none"],
)
def test_datetime_range_matching_at_image_level(gateway, corpus, tmp_path, match, expected):
    keys = ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={STUDY_B['uid']}", f"SeriesInstanceUID={uid(2, 1)}",
            "SOPInstanceUID"] + [f"{k}={v}" for k, v in match.items()]
    _, responses = _find(gateway, tmp_path, keys)
    assert _values(responses, "SOPInstanceUID") == sorted(f"{uid(2, 1)}.{n}" for n in expected)
    for r in responses:
        n = int(r.SOPInstanceUID.rsplit(".", 1)[1])
        assert r.AcquisitionDateTime == ACQUISITION[n][0]["AcquisitionDateTime"]  # returned as stored


def test_invalid_datetime_is_refused(gateway, corpus, tmp_path):
    proc, responses = findscu(gateway, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={STUDY_B['uid']}",
                                        "AcquisitionDateTime=20211301"], tmp_path / "rsp")
    assert responses == []
    out = proc.stdout + proc.stderr
    assert "DataSetDoesNotMatchSOPClass" in out, out


def test_universal_matching_returns_every_study(gateway, corpus, tmp_path):
    _, responses = _find(gateway, tmp_path, _study_keys() + ["PatientID"])
    assert len(responses) == 6
    assert "P1" in _values(responses, "PatientID")


def _code_item(**values) -> Dataset:
    item = Dataset()
    for k, v in values.items():
        setattr(item, k, v)
    return item


@pytest.mark.parametrize("item, expected, status", [
    ({}, [STUDY_A], 0xFF00),  # empty item: return the sequence, match nothing
    ({"CodeValue": "CTHEAD", "CodingSchemeDesignator": "LOCAL"}, [STUDY_A], 0xFF00),
    ({"CodeValue": "CT*", "CodeMeaning": ""}, [STUDY_A], 0xFF00),
    ({"CodeValue": "MRKNEE"}, [], None),
    ({"CodeValue": "CTHEAD", "CodingSchemeDesignator": "OTHER"}, [], None),  # same item must match all
], ids=["universal", "single", "wildcard", "no-match", "all-keys-one-item"])
def test_sequence_matching(gateway, corpus, item, expected, status):
    with association(gateway, [build_context(STUDY_ROOT_FIND)]) as assoc:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = STUDY_A["uid"] if not item else ""
        ds.ProcedureCodeSequence = [_code_item(**item)]
        responses = send_request(assoc, "find", ds, STUDY_ROOT_FIND)
    assert [s for s, *_ in responses] == [status] * len(expected) + [0x0000]
    assert [r[1].StudyInstanceUID for r in responses[:-1]] == [s["uid"] for s in expected]
    for _, ident, _ in responses[:-1]:
        assert ident.ProcedureCodeSequence[0].CodeValue == "CTHEAD"


def test_nested_sequence_matching_is_reported_unsupported(gateway, corpus):
    with association(gateway, [build_context(STUDY_ROOT_FIND)]) as assoc:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = STUDY_A["uid"]
        ds.ProcedureCodeSequence = [_code_item(CodeValue="CTHEAD", ContextGroupExtensionFlag="N")]
        ds.ProcedureCodeSequence[0].EquivalentCodeSequence = [_code_item(CodeValue="X")]
        responses = send_request(assoc, "find", ds, STUDY_ROOT_FIND)
    assert [s for s, *_ in responses] == [0xFF01, 0x0000]


def test_keys_the_index_cannot_match_give_ff01_and_are_still_returned(gateway, corpus):
    with association(gateway, [build_context(STUDY_ROOT_FIND)]) as assoc:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = STUDY_A["uid"]
        ds.PatientAge = "030Y"
        ds.PatientName = ""
        responses = send_request(assoc, "find", ds, STUDY_ROOT_FIND)
    assert [s for s, *_ in responses] == [0xFF01, 0x0000]
    ident = responses[0][1]
    assert str(ident.PatientName) == "Doe^John"
    assert "PatientAge" in ident


def test_invalid_values_and_unknown_sop_classes_get_failure_statuses(gateway, corpus):
    with association(gateway, [build_context(STUDY_ROOT_FIND)]) as assoc:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyDate = "2020"
        responses = send_request(assoc, "find", ds, STUDY_ROOT_FIND)
        assert [s for s, *_ in responses] == [0xA900]
        ds = Dataset()
        ds.QueryRetrieveLevel = "WARD"
        responses = send_request(assoc, "find", ds, STUDY_ROOT_FIND, msg_id=2)
        assert [s for s, *_ in responses] == [0xA900]
        assert assoc.is_established


@pytest.mark.parametrize("study, file", [(GERMAN, "chrGerm"), (CYRILLIC, "chrRuss")])
def test_non_ascii_text_is_answered_in_utf8(gateway, corpus, tmp_path, study, file):
    name = str(pydicom.dcmread(TESTDATA / f"pydicom-charsets/{file}.dcm").PatientName)
    assert not name.isascii()
    _, responses = _find(gateway, tmp_path, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}",
                                             "PatientName"])
    assert len(responses) == 1
    r = responses[0]
    assert r.SpecificCharacterSet == "ISO_IR 192"
    assert str(r.PatientName) == name


def test_non_ascii_matching_value_in_utf8(gateway, corpus):
    with association(gateway, [build_context(STUDY_ROOT_FIND)]) as assoc:
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        ds.PatientName = "Äneas*"
        responses = send_request(assoc, "find", ds, STUDY_ROOT_FIND)
    assert [s for s, *_ in responses] == [0xFF00, 0x0000]
    assert responses[0][1].StudyInstanceUID == GERMAN


def test_cancel_stops_the_responses(gateway, corpus):
    with association(gateway, [build_context(STUDY_ROOT_FIND)]) as assoc:
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = MANY["uid"]
        ds.SOPInstanceUID = ""
        responses = send_request(assoc, "find", ds, STUDY_ROOT_FIND, cancel=True)
        statuses = [s for s, *_ in responses]
        assert statuses[-1] == 0xFE00
        assert len(statuses) - 1 < MANY_COUNT
        # The association goes on.
        ds.SOPInstanceUID = f"{MANY_SERIES['uid']}.1"
        responses = send_request(assoc, "find", ds, STUDY_ROOT_FIND, msg_id=2)
        assert [s for s, *_ in responses] == [0xFF00, 0x0000]


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_identifiers_in_other_transfer_syntaxes(gateway, corpus, ts):
    with association(gateway, [build_context(PATIENT_ROOT_FIND, ts)]) as assoc:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.PatientID = "P1"
        ds.StudyInstanceUID = STUDY_B["uid"]
        ds.SeriesInstanceUID = ""
        ds.SeriesDescription = ""
        responses = send_request(assoc, "find", ds, PATIENT_ROOT_FIND)
    assert [s for s, *_ in responses] == [0xFF00, 0x0000]
    assert responses[0][1].SeriesDescription == "T1"


def test_unknown_callers_are_not_authorized(gateway, corpus, tmp_path):
    proc, responses = findscu(gateway, _study_keys(), tmp_path / "rsp", calling="STRANGER")
    assert responses == []
    out = (proc.stdout + proc.stderr).lower()
    assert "status: 0x124" in out, out  # "Refused: not authorized", unnamed by DCMTK


def test_other_operations_are_unaffected_for_unknown_callers(gateway, corpus):
    # C-ECHO and C-STORE stay open to any calling AE title.
    sample = instance(STUDY_C, {"uid": uid(3, 9), "Modality": "US"}, 1)
    assert store_all(gateway, [sample], calling="ANYONE") == {sample.name: 0}


def test_query_returns_what_was_stored_for_real_samples(gateway, corpus, tmp_path):
    german = pydicom.dcmread(TESTDATA / "pydicom-charsets/chrGerm.dcm")
    _, responses = _find(gateway, tmp_path, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={GERMAN}",
                                             "SOPInstanceUID", "SOPClassUID"])
    assert len(responses) == 1
    assert responses[0].SOPClassUID == german.SOPClassUID
