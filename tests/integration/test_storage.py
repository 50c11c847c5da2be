"""C-STORE of every readable sample: from DCMTK's storescu (a whole folder on one association) and from
pynetdicom (each sample on its own association, in its own transfer syntax). Every one must get 0000 and be
found by QIDO afterwards."""

import shutil
from collections import Counter

import pytest

from conftest import BACKENDS, backend_env
from gw_dimse import association, contexts_for, fmt, storescu_tree, store
from gw_samples import DCMTK_CANNOT_SEND, TESTDATA, lacks_hierarchy, readable_samples
from gw_web import client, instance_json, text


@pytest.fixture(scope="module", params=BACKENDS)
def storage_env(request):
    """The whole module runs on each storage backend: filesystem, then S3 (Garage)."""
    return backend_env(request)


READABLE = list(readable_samples())
# Every sample not in plain Explicit VR Little Endian (implicit, big endian, deflate, RLE, JPEG, JPEG-LS,
# JPEG 2000), each on an association proposing only its own (SOP class, transfer syntax).
ODD_TS = [s for s in READABLE if s.ts != "1.2.840.10008.1.2.1"]


def test_corpus_covers_the_transfer_syntaxes_it_claims():
    """Guard against a testdata/ that silently lost samples."""
    seen = {s.ts for s in READABLE}
    for ts in ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
               "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
               "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
               "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"]:
        assert ts in seen, f"no readable sample in transfer syntax {ts}"
    assert len(READABLE) >= 150


def test_storescu_stores_every_readable_sample_on_one_association(fresh_gateway, tmp_path):
    gw = fresh_gateway
    stage = tmp_path / "stage"
    sent = [s for s in READABLE if s.name not in DCMTK_CANNOT_SEND]
    for s in sent:
        dest = stage / s.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TESTDATA / s.name, dest)

    proc, responses = storescu_tree(gw.dimse_port, stage, sent, tmp_path, called_ae=gw.ae_title)
    output = proc.stdout + proc.stderr
    assert output.count("Requesting Association") == 1, output[-3000:]
    assert len(responses) == len(sent), f"storescu sent {len(responses)} of {len(sent)} files:\n{output[-3000:]}"
    not_ok = {f: r for f, r in responses.items() if r != "Success"}
    assert not not_ok, f"{len(not_ok)} files not stored with Success: {not_ok}"

    # Several samples share a SOP Instance UID: one instance each (keep_first is the default).
    found = Counter(text(i, "SOPInstanceUID") for i in client(gw).search_for_instances(get_remaining=True))
    expected = {s.sop_uid for s in sent}
    assert set(found) == expected, (
        f"missing: {sorted(expected - set(found))[:10]}, unexpected: {sorted(set(found) - expected)[:10]}"
    )
    assert [uid for uid, n in found.items() if n > 1] == [], "an instance is listed more than once"


@pytest.mark.parametrize("sample", ODD_TS, ids=lambda s: s.id)
def test_pynetdicom_stores_sample_in_its_own_transfer_syntax(gateway, sample):
    with association(gateway, contexts_for([sample])) as assoc:
        status = store(assoc, sample)
    assert status == 0x0000, f"C-STORE of {sample.name} ({sample.ts}) answered {fmt(status)}"
    found = instance_json(client(gateway), sample.sop_uid)
    assert len(found) == 1, f"QIDO finds {len(found)} instances with SOPInstanceUID {sample.sop_uid}"
    if not lacks_hierarchy(sample):
        assert text(found[0], "StudyInstanceUID") in {s.study_uid for s in READABLE if s.sop_uid == sample.sop_uid}
