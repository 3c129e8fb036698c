"""Sentinel-2 helpers on hand-made arrays: every number here is computed by hand."""

import datetime as dt

import numpy as np
import pytest

from damformer.data.sentinel import (
    SentinelOptions,
    cloud_cover,
    crop_window,
    day_offsets,
    monthly_means,
    parse_product_dates,
    select_clear_dates,
)
from damformer.errors import DataFormatError, NoClearDateError


def test_product_dates_parse_the_full_date():
    lines = [
        "S2A_MSIL2A_20210104T105431_N0214_R051_T31UDQ_20210104T120306",
        "S2B_MSIL2A_20191231T110441_N0213_R094_T31TFJ_20191231T121900",
    ]
    assert parse_product_dates(lines, source="p.txt") == [dt.date(2021, 1, 4), dt.date(2019, 12, 31)]


@pytest.mark.parametrize("line", ["garbage", "S2A_MSIL2A_20211341T105431_N0214"])
def test_product_date_errors_name_the_line(line):
    with pytest.raises(DataFormatError, match=r"p\.txt:2") as info:
        parse_product_dates(
            ["S2A_MSIL2A_20210104T105431_N0214_R051_T31UDQ_20210104T120306", line], source="p.txt"
        )
    assert "expected" in str(info.value)


def test_crop_window_is_centred_on_row_col():
    rows, cols = crop_window((30, 25), crop_size=40, superpatch_hw=(207, 258))
    assert (rows.start, rows.stop, cols.start, cols.stop) == (10, 50, 5, 45)
    assert crop_window((19, 100), crop_size=40, superpatch_hw=(207, 258)) is None
    assert crop_window((100, 239), crop_size=40, superpatch_hw=(207, 258)) is None
    assert crop_window((187, 238), crop_size=40, superpatch_hw=(207, 258)) is not None


def test_cloud_cover_counts_snow_and_cloud_pixels():
    masks = np.zeros((3, 2, 4, 4), dtype=np.uint8)
    masks[0, 1, :2, :] = 60  # 8 cloudy pixels (threshold is inclusive)
    masks[1, 0, 0, :] = 100  # 4 snowy pixels
    masks[1, 1, 3, :2] = 59  # below threshold
    masks[2, :, :, :] = 90  # every pixel snowy and cloudy: counted twice
    cover = cloud_cover(masks, threshold=60)
    np.testing.assert_allclose(cover, [0.5, 0.25, 2.0])


def test_clear_date_selection_and_policy():
    cover = np.array([0.6, 0.49, 0.5, 0.0])
    np.testing.assert_array_equal(
        select_clear_dates(cover, max_cover=0.5, policy="error", source="x"), [1, 3]
    )
    cloudy = np.array([0.9, 0.7, 0.8])
    np.testing.assert_array_equal(
        select_clear_dates(cloudy, max_cover=0.5, policy="least_cloudy", source="x"), [1]
    )
    with pytest.raises(NoClearDateError, match="every one of 3 Sentinel-2 dates"):
        select_clear_dates(cloudy, max_cover=0.5, policy="error", source="x")


def test_monthly_means_average_each_calendar_month():
    dates = [dt.date(2020, 12, 30), dt.date(2021, 1, 3), dt.date(2021, 1, 20), dt.date(2021, 3, 1)]
    s2 = np.arange(4 * 2 * 1 * 1, dtype=np.float32).reshape(4, 2, 1, 1) * 10
    masks = np.array([0, 10, 21, 5], dtype=np.uint8).reshape(4, 1, 1, 1).repeat(2, axis=1)
    means, mean_masks, month_dates = monthly_means(s2, masks, dates)
    assert month_dates == [dt.date(2020, 12, 15), dt.date(2021, 1, 15), dt.date(2021, 3, 15)]
    np.testing.assert_allclose(means[:, :, 0, 0], [[0, 10], [30, 40], [60, 70]])
    assert mean_masks.dtype == np.uint8
    np.testing.assert_array_equal(mean_masks[:, 0, 0, 0], [0, 16, 5])  # round(15.5) = 16 (half to even: 16)


def test_day_offsets_and_reference_date():
    options = SentinelOptions()
    assert options.reference_date(2021) == dt.date(2021, 5, 15)
    assert SentinelOptions(date_reference="2021-05-15").reference_date(2019) == dt.date(2021, 5, 15)
    offsets = day_offsets(
        [dt.date(2021, 5, 14), dt.date(2021, 5, 15), dt.date(2022, 5, 15)], dt.date(2021, 5, 15)
    )
    np.testing.assert_array_equal(offsets, [-1, 0, 365])
    assert offsets.dtype == np.int32


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("crop_size", 39),
        ("crop_size", 0),
        ("mask_threshold", 101),
        ("max_cover", 0.0),
        ("no_clear_date", "drop"),
        ("date_reference", "May 15"),
    ],
)
def test_sentinel_options_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SentinelOptions(**{field: value})
