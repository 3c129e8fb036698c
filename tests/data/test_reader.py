"""The FLAIR-2 reader on the miniature dataset: values checked against the raw files, not just shapes."""

import datetime as dt
import json
import pickle
import shutil

import numpy as np
import pytest
import rasterio

from damformer.data import Flair2Dataset, SentinelOptions
from damformer.data.layout import Flair2Layout
from damformer.miniature.synth import INFO_FILE, NORTH_DOMAINS, SOUTH_DOMAINS


def _raw_superpatch(root, domain, zone, split="train"):
    folder = root / ("flair_sen_train" if split == "train" else "flair_2_sen_test") / domain / zone / "sen"
    stem = f"SEN2_sp_{domain}-{zone}"
    data = np.load(folder / f"{stem}_data.npy")
    masks = np.load(folder / f"{stem}_masks.npy")
    lines = (folder / f"{stem}_products.txt").read_text().split()
    dates = [dt.datetime.strptime(line[11:19], "%Y%m%d").date() for line in lines]
    return data, masks, dates


def test_every_south_patch_has_the_documented_schema(demo_root):
    dataset = Flair2Dataset(demo_root, domains=["south"])
    assert dataset.domains == sorted(SOUTH_DOMAINS[:2])
    assert len(dataset) == 24
    for sample in (dataset[i] for i in range(len(dataset))):
        assert sample.aerial.shape == (5, 256, 256) and sample.aerial.dtype == np.uint8
        assert sample.label.shape == (256, 256) and sample.label.dtype == np.uint8
        assert sample.label.max() <= 12
        assert sample.crs == "EPSG:2154"
        assert sample.transform.a == pytest.approx(0.2) and sample.transform.e == pytest.approx(-0.2)
        num_dates = sample.s2.shape[0]
        assert sample.s2.shape == (num_dates, 10, 40, 40) and sample.s2.dtype == np.float32
        assert sample.s2_masks.shape == (num_dates, 2, 40, 40) and sample.s2_masks.dtype == np.uint8
        assert len(sample.s2_dates) == num_dates == sample.s2_day_offsets.shape[0]
        assert list(sample.s2_dates) == sorted(sample.s2_dates)
        assert 0 < sample.s2_num_clear < sample.s2_num_acquisitions  # the overcast date at least is gone
        assert sample.metadata["zone"] == sample.zone


def test_patches_are_sorted_by_number_within_zones(demo_root):
    dataset = Flair2Dataset(demo_root, domains=["D081"], with_s2=False)
    numbers = [p.number for p in dataset.patches]
    assert numbers == sorted(numbers)


def test_label_is_the_remapped_file_and_georeferencing_is_the_files(demo_root):
    dataset = Flair2Dataset(demo_root, domains=["north"], with_s2=False)
    patch = dataset.patches[3]
    sample = dataset.read(patch)
    with rasterio.open(patch.label_path) as src:
        raw = src.read(1)
    with rasterio.open(patch.aerial_path) as src:
        np.testing.assert_array_equal(sample.aerial, src.read())
        assert sample.transform == src.transform
    expected = np.where(raw > 13, 13, raw) - 1
    np.testing.assert_array_equal(sample.label, expected)
    assert sample.s2 is None and sample.s2_dates == ()


def test_some_raw_labels_above_13_become_other(demo_root):
    dataset = Flair2Dataset(demo_root, with_s2=False)
    found_other = False
    for patch in dataset.patches:
        with rasterio.open(patch.label_path) as src:
            raw = src.read(1)
        if (raw >= 13).any():
            sample = dataset.read(patch)
            assert (sample.label[raw >= 13] == 12).all()
            found_other = True
            break
    assert found_other, "the miniature data should contain swimming pools / rare classes"


def test_crop_is_centred_on_the_json_centroid(demo_root):
    options = SentinelOptions(cloud_filter=False, monthly_average=False)
    dataset = Flair2Dataset(demo_root, domains=["D080_2021"], sentinel=options)
    centroids = json.loads((demo_root / "flair-2_centroids_sp_to_patch.json").read_text())
    for index in (0, 7):
        patch = dataset.patches[index]
        sample = dataset[index]
        row, col = centroids[f"{patch.patch_id}.tif"]
        assert sample.centroid == (row, col)
        data, masks, dates = _raw_superpatch(demo_root, patch.domain, patch.zone)
        np.testing.assert_array_equal(sample.s2, data[:, :, row - 20 : row + 20, col - 20 : col + 20])
        np.testing.assert_array_equal(sample.s2_masks, masks[:, :, row - 20 : row + 20, col - 20 : col + 20])
        assert list(sample.s2_dates) == dates
        # Geometry: the superpatch pixel grid (10 m) and the aerial transform agree on the patch centre.
        centre_x = sample.transform.c + 0.2 * sample.aerial.shape[2] / 2
        centre_y = sample.transform.f - 0.2 * sample.aerial.shape[1] / 2
        assert centre_x == pytest.approx(sample.metadata["patch_centroid_x"], abs=0.01)
        assert centre_y == pytest.approx(sample.metadata["patch_centroid_y"], abs=0.01)


def test_crop_size_is_configurable(demo_root):
    dataset = Flair2Dataset(demo_root, domains=["D032"], sentinel=SentinelOptions(crop_size=16))
    sample = dataset[0]
    assert sample.s2.shape[1:] == (10, 16, 16)
    data, _, _ = _raw_superpatch(demo_root, sample.domain, sample.zone)
    row, col = sample.centroid
    # The cloud filter keeps a subset of dates; each kept date equals the raw crop of some date.
    raw_crops = data[:, :, row - 8 : row + 8, col - 8 : col + 8]
    unfiltered = Flair2Dataset(
        demo_root, domains=["D032"], sentinel=SentinelOptions(crop_size=16, monthly_average=False)
    )[0]
    for crop in unfiltered.s2:
        assert any(np.array_equal(crop, raw) for raw in raw_crops)


def test_known_overcast_date_is_dropped(demo_root):
    info = json.loads((demo_root / INFO_FILE).read_text())
    dataset = Flair2Dataset(
        demo_root, domains=["south", "north"], sentinel=SentinelOptions(monthly_average=False)
    )
    checked = 0
    for index in range(0, len(dataset), 5):
        sample = dataset[index]
        overcast = {
            dt.date.fromisoformat(d) for d in info["overcast_dates"][f"{sample.domain}-{sample.zone}"]
        }
        assert overcast, "every zone has at least one overcast date"
        assert not overcast & set(sample.s2_dates)
        # ... and it is there without the filter.
        unfiltered = Flair2Dataset(
            demo_root,
            domains=[sample.domain],
            sentinel=SentinelOptions(cloud_filter=False, monthly_average=False),
        )
        same = next(unfiltered.read(p) for p in unfiltered.patches if p.patch_id == sample.patch_id)
        assert overcast <= set(same.s2_dates)
        checked += 1
    assert checked >= 9


def test_filter_matches_the_baseline_rule_on_the_crop(demo_root):
    dataset = Flair2Dataset(demo_root, domains=["D060"], sentinel=SentinelOptions(monthly_average=False))
    sample = dataset[2]
    _, masks, dates = _raw_superpatch(demo_root, sample.domain, sample.zone)
    row, col = sample.centroid
    crop = masks[:, :, row - 20 : row + 20, col - 20 : col + 20]
    cover = ((crop[:, 0] >= 60).sum(axis=(1, 2)) + (crop[:, 1] >= 60).sum(axis=(1, 2))) / 1600.0
    expected = [d for d, c in zip(dates, cover, strict=True) if c < 0.5]
    assert list(sample.s2_dates) == expected
    assert sample.s2_num_clear == len(expected)
    assert sample.s2_num_acquisitions == len(dates)


def test_monthly_means_equal_the_mean_of_each_months_kept_dates(demo_root):
    daily = Flair2Dataset(demo_root, domains=["D081"], sentinel=SentinelOptions(monthly_average=False))
    monthly = Flair2Dataset(demo_root, domains=["D081"])
    for index in (0, 9):
        days, months = daily[index], monthly[index]
        assert len({(d.year, d.month) for d in days.s2_dates}) == len(months.s2_dates)
        for step, month_date in enumerate(months.s2_dates):
            assert month_date.day == 15
            members = [
                i
                for i, d in enumerate(days.s2_dates)
                if (d.year, d.month) == (month_date.year, month_date.month)
            ]
            assert members
            expected = days.s2[members].astype(np.float64).mean(axis=0)
            np.testing.assert_allclose(months.s2[step], expected, rtol=1e-6)
        reference = dt.date(int(months.domain[-4:]), 5, 15)
        np.testing.assert_array_equal(months.s2_day_offsets, [(d - reference).days for d in months.s2_dates])


def test_int16_and_uint16_superpatches_are_both_read(demo_root):
    dtypes = set()
    for path in (demo_root / "flair_sen_train").rglob("*_data.npy"):
        dtypes.add(np.load(path, mmap_mode="r").dtype)
    assert dtypes == {np.dtype(np.int16), np.dtype(np.uint16)}
    dataset = Flair2Dataset(demo_root, domains=["D080"])
    zones = {dataset.read(p).zone for p in dataset.patches}
    assert len(zones) == 2


def test_test_split_and_unlabelled_reading(demo_root):
    dataset = Flair2Dataset(demo_root, split="test", domains=["north"], with_labels=False)
    assert dataset.domains == sorted(NORTH_DOMAINS[:2])
    sample = dataset[0]
    assert sample.label is None and sample.s2 is not None
    train_ids = {p.patch_id for p in Flair2Dataset(demo_root, domains=["north"], with_s2=False).patches}
    assert not train_ids & {p.patch_id for p in dataset.patches}


def test_dataset_pickles_without_its_memory_maps(demo_root):
    dataset = Flair2Dataset(demo_root, domains=["D032"])
    before = dataset[1]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._zones == {}
    np.testing.assert_array_equal(clone[1].s2, before.s2)


def test_toy_release_layout_and_aux_data_json(demo_root, tmp_path):
    toy = tmp_path / "toy"
    nested = toy / "flair_2_toy_dataset"
    for src, dst in (
        ("flair_aerial_train", "flair_2_toy_aerial_train"),
        ("flair_labels_train", "flair_2_toy_labels_train"),
        ("flair_sen_train", "flair_2_toy_sen_train"),
    ):
        shutil.copytree(demo_root / src / "D081_2020", nested / dst / "D081_2020")
    (toy / "aux-data").mkdir()
    shutil.copy(demo_root / "flair-2_centroids_sp_to_patch.json", toy / "aux-data")
    shutil.copy(demo_root / "flair_aerial_metadata.json", toy / "aux-data" / "metadata_aerial.json")
    dataset = Flair2Dataset(toy)
    assert dataset.domains == ["D081_2020"] and len(dataset) == 12
    assert dataset[0].metadata["domain"] == "D081_2020"


def test_explicit_folders_and_json_paths(demo_root, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(demo_root / "flair_aerial_train" / "D032_2019", custom / "air" / "D032_2019")
    shutil.copytree(demo_root / "flair_labels_train" / "D032_2019", custom / "lab" / "D032_2019")
    shutil.copytree(demo_root / "flair_sen_train" / "D032_2019", custom / "s2" / "D032_2019")
    shutil.copy(demo_root / "flair-2_centroids_sp_to_patch.json", custom / "c.json")
    layout = Flair2Layout(
        custom, aerial_dir="air", labels_dir="lab", sen_dir=custom / "s2", centroids_json="c.json"
    )
    assert layout.metadata_json is None
    dataset = Flair2Dataset(
        custom, aerial_dir="air", labels_dir="lab", sen_dir=custom / "s2", centroids_json="c.json"
    )
    assert len(dataset) == 12 and dataset[0].metadata == {}


def test_upper_case_tif_names_are_read_not_skipped(tiny_root):
    before = Flair2Dataset(tiny_root, domains=["south"])
    expected = [
        (p.patch_id, before[i].aerial.tobytes(), before[i].label.tobytes())
        for i, p in enumerate(before.patches)
    ]
    for path in sorted(tiny_root.rglob("*.tif")):  # a copy from a system that upper-cases extensions
        if path.name.startswith(("IMG_", "MSK_")):
            path.rename(path.with_suffix(".TIF"))
    after = Flair2Dataset(tiny_root, domains=["south"])
    assert all(p.aerial_path.suffix == ".TIF" for p in after.patches)
    found = [
        (p.patch_id, after[i].aerial.tobytes(), after[i].label.tobytes()) for i, p in enumerate(after.patches)
    ]
    assert found == expected and len(found) > 0
