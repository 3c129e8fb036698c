"""Domain selection and the 19 -> 13 class remap."""

import numpy as np
import pytest

from damformer.data import domains
from damformer.data.classes import FLAIR_CLASSES, NUM_CLASSES, invalid_raw_values, remap_labels
from damformer.data.domains import select_domains
from damformer.errors import DomainSelectionError

AVAILABLE = ["D004_2021", "D008_2019", "D032_2019", "D060_2021", "D080_2021", "D081_2020"]


def test_presets_prefixes_ids_and_all():
    assert select_domains(AVAILABLE, ["north"]) == ["D008_2019", "D060_2021", "D080_2021"]
    assert select_domains(AVAILABLE, ["south"]) == ["D032_2019", "D081_2020"]
    assert select_domains(AVAILABLE, ["D080", "D004_2021"]) == ["D004_2021", "D080_2021"]
    assert select_domains(AVAILABLE, ["d080,south"]) == ["D032_2019", "D080_2021", "D081_2020"]
    assert select_domains(AVAILABLE, ["all"]) == AVAILABLE
    assert select_domains(AVAILABLE, None) == AVAILABLE


def test_prefix_does_not_match_another_departement():
    assert select_domains(["D0801_2021", "D080_2021"], ["D080"]) == ["D080_2021"]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (["D099"], "D099' is not in the dataset"),
        (["D080_2019"], "not in the dataset"),
        (["Paris"], "expected an id like D080_2021"),
    ],
)
def test_unknown_domains_are_errors(request_, message):
    with pytest.raises(DomainSelectionError, match=message) as info:
        select_domains(AVAILABLE, request_)
    assert "available: D004_2021" in str(info.value)


def test_preset_with_no_domain_present_is_an_error():
    with pytest.raises(DomainSelectionError, match="preset 'north'"):
        select_domains(["D004_2021"], ["north"])


def test_remap_19_to_13_classes():
    raw = np.arange(1, 20, dtype=np.uint8)
    expected = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 12, 12, 12, 12, 12, 12]
    np.testing.assert_array_equal(remap_labels(raw), expected)
    assert len(FLAIR_CLASSES) == NUM_CLASSES == 13
    assert FLAIR_CLASSES[12].name == "other"


def test_invalid_raw_values_are_listed():
    assert invalid_raw_values(np.array([[0, 1], [19, 25]], dtype=np.uint8)) == [0, 25]
    assert invalid_raw_values(np.arange(1, 20, dtype=np.uint8)) == []


def test_a_partial_preset_is_reported_once_per_process(caplog, monkeypatch):
    # predict reads the folder twice (tiles, then labels): the same partial preset is one warning
    monkeypatch.setattr(domains, "_WARNED_PRESETS", set())  # as in a fresh process
    available = ["D080_2021", "D060_2021", "D032_2019"]
    with caplog.at_level("WARNING", logger="damformer.data.domains"):
        first = select_domains(available, ["north"])
        second = select_domains(available, ["north"])
    assert first == second == ["D060_2021", "D080_2021"]
    warnings = [r.getMessage() for r in caplog.records if "not in this dataset" in r.getMessage()]
    assert len(warnings) == 1 and "D008, D051, D077" in warnings[0], warnings
