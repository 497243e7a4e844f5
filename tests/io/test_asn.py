"""Association parsing: the members calwebb_coron3 uses, and one clear error otherwise."""

import json

import pytest

from coron_dask.core.errors import CoronInputError
from coron_dask.io import read_association


def write(tmp_path, table):
    path = tmp_path / "test_asn.json"
    path.write_text(json.dumps(table) if not isinstance(table, str) else table)
    return path


def table(members):
    return {"asn_id": "c1001", "products": [{"name": "jw1-c1001_t1", "members": members}]}


def test_groups_members_in_order_and_ignores_other_exptypes(tmp_path):
    members = [
        {"expname": "b_calints.fits", "exptype": "science"},
        {"expname": "p1_calints.fits", "exptype": "psf"},
        {"expname": "bg_calints.fits", "exptype": "background"},
        {"expname": "a_calints.fits", "exptype": "SCIENCE"},
        {"expname": "p0_calints.fits", "exptype": "psf"},
    ]
    association = read_association(write(tmp_path, table(members)))
    assert association.asn_id == "c1001"
    assert association.product_name == "jw1-c1001_t1"
    assert [p.name for p in association.science] == ["b_calints.fits", "a_calints.fits"]
    assert [p.name for p in association.psf] == ["p1_calints.fits", "p0_calints.fits"]
    assert association.science[0].parent == tmp_path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "not a JSON object"),
        ({"products": []}, "no 'asn_id'"),
        ({"asn_id": "c1", "products": []}, "no 'products'"),
        ({"asn_id": "c1", "products": [{"members": []}]}, "no 'name'"),
        (table([{"expname": "a.fits", "exptype": "psf"}]), "no science members"),
        (table([{"expname": "a.fits", "exptype": "science"}]), "no psf members"),
        (table([{"exptype": "science"}]), "member 1 has no 'expname'"),
    ],
)
def test_bad_association_names_file_and_problem(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(CoronInputError, match=message) as error:
        read_association(path)
    assert error.value.source == str(path)


def test_missing_file(tmp_path):
    with pytest.raises(CoronInputError, match="not found"):
        read_association(tmp_path / "nope_asn.json")
