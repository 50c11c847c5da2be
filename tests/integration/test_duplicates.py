"""The same SOP Instance UID stored more than once: one instance, and the version the configured rule keeps
(`dimse.on_duplicate = keep_first | replace`)."""

from __future__ import annotations

import threading

import pytest

from gw_dimse import association, contexts_for, fmt, is_failure, store
from gw_samples import Sample, derived_uid, from_dataset, small_ct
from gw_web import client, instance_json, text, value


def versions(uid: str, n: int = 2) -> list[Sample]:
    """n encodings of one instance that differ in PatientName and in one pixel value."""
    base = small_ct(sop_uid=uid, StudyInstanceUID=derived_uid("dup-study", uid))
    out = []
    for k in range(n):
        ds = base.ds.copy()
        ds.PatientName = f"Dup^Version{k}"
        ds.PixelData = bytes([k]) + base.ds.PixelData[1:]
        out.append(from_dataset(ds, base.ts, f"{base.name}#v{k}"))
    return out


def accepted(status) -> bool:
    """A duplicate may be answered with success or a warning, never a failure."""
    return status is not None and not is_failure(status)


def check_single_instance(gw, expected):
    c = client(gw)
    found = instance_json(c, expected.sop_uid, fields=["PatientName"])
    assert len(found) == 1, f"{len(found)} instances with one SOP Instance UID"
    assert value(found[0], "PatientName") == {"Alphabetic": str(expected.ds.PatientName)}, (
        f"QIDO shows {value(found[0], 'PatientName')}, expected {expected.ds.PatientName}")
    studies = c.search_for_studies(search_filters={"StudyInstanceUID": expected.study_uid})
    assert [value(r, "NumberOfStudyRelatedInstances") for r in studies] == [1]
    got = c.retrieve_instance(expected.study_uid, expected.series_uid, expected.sop_uid,
                              media_types=(("application/dicom", "*"),))
    assert str(got.PatientName) == str(expected.ds.PatientName), "retrieved object is not the kept version"
    assert got.PixelData == expected.ds.PixelData, "retrieved Pixel Data is not the kept version's"
    files = gw.files_mentioning(expected.sop_uid)
    assert len(files) == 1, f"{len(files)} stored files hold the instance: {files}"
    assert text(found[0], "SOPInstanceUID") == expected.sop_uid


@pytest.mark.parametrize("mode,kept", [("keep_first", 0), ("replace", 1)])
def test_same_instance_stored_twice_on_two_associations_is_kept_once(gateway_factory, mode, kept):
    gw = gateway_factory(env={"DICOMGW_DIMSE__ON_DUPLICATE": mode})
    v = versions(derived_uid("dup", mode, "two-assoc"))
    for s in v:
        with association(gw, contexts_for([s])) as assoc:
            status = store(assoc, s)
        assert accepted(status), f"duplicate store answered {fmt(status)}"
    check_single_instance(gw, v[kept])


@pytest.mark.parametrize("mode,kept", [("keep_first", 0), ("replace", 2)])
def test_same_instance_stored_three_times_on_one_association_is_kept_once(gateway_factory, mode, kept):
    gw = gateway_factory(env={"DICOMGW_DIMSE__ON_DUPLICATE": mode})
    v = versions(derived_uid("dup", mode, "one-assoc"), 3)
    with association(gw, contexts_for(v[:1])) as assoc:
        statuses = [store(assoc, s, msg_id=i) for i, s in enumerate(v, 1)]
    assert all(accepted(st) for st in statuses), [fmt(st) for st in statuses]
    check_single_instance(gw, v[kept])


def test_identical_duplicate_under_default_rule_leaves_one_instance(fresh_gateway):
    s = small_ct(sop_uid=derived_uid("dup", "default"))
    for _ in range(2):
        with association(fresh_gateway, contexts_for([s])) as assoc:
            assert accepted(store(assoc, s))
    check_single_instance(fresh_gateway, s)


@pytest.mark.parametrize("mode", ["keep_first", "replace"])
def test_concurrent_duplicates_leave_one_intact_instance(gateway_factory, mode):
    gw = gateway_factory(env={"DICOMGW_DIMSE__ON_DUPLICATE": mode})
    v = versions(derived_uid("dup", mode, "concurrent"), 6)
    statuses = {}

    def sender(part, tag):
        with association(gw, contexts_for(part[:1])) as assoc:
            statuses[tag] = [store(assoc, s, msg_id=i) for i, s in enumerate(part, 1)]

    threads = [threading.Thread(target=sender, args=(v[k::3], k)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(accepted(st) for sts in statuses.values() for st in sts), statuses
    c = client(gw)
    found = instance_json(c, v[0].sop_uid, fields=["PatientName"])
    assert len(found) == 1
    name = value(found[0], "PatientName")["Alphabetic"]
    kept = next(s for s in v if str(s.ds.PatientName) == name)
    check_single_instance(gw, kept)  # and the object on disk is that same version, not a mix
