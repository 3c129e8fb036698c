"""The miniature FLAIR-2: learnable, domain-shifted, deterministic, written atomically."""

import json
import warnings

import numpy as np
import pytest
import rasterio

from damformer.data import Flair2Dataset, SentinelOptions
from damformer.errors import OutputExistsError
from damformer.miniature import scene
from damformer.miniature import synth as synth_module
from damformer.miniature.synth import INFO_FILE, SynthOptions, generate
from tests.conftest import TINY_OPTIONS

VEGETATION = [5, 6, 7, 8, 9, 10]  # coniferous .. agricultural, 13-class indices


def _pixels(root, split, region, per_patch=3000, seed=0):
    """Random aerial pixels (N, 5) and their labels from every patch of a region."""
    rng = np.random.default_rng(seed)
    dataset = Flair2Dataset(root, split=split, domains=[region], with_s2=False)
    features, labels = [], []
    for sample in (dataset[i] for i in range(len(dataset))):
        pick = rng.choice(sample.label.size, per_patch, replace=False)
        features.append(sample.aerial.reshape(5, -1).T[pick].astype(np.float64))
        labels.append(sample.label.ravel()[pick])
    return np.concatenate(features), np.concatenate(labels)


class GaussianNaiveBayes:
    """A per-pixel spectral classifier: independent Gaussians per class and band."""

    def fit(self, x, y):
        self.classes = np.unique(y)
        self.mean = np.stack([x[y == c].mean(axis=0) for c in self.classes])
        self.var = np.stack([x[y == c].var(axis=0) + 1.0 for c in self.classes])
        self.log_prior = np.log([np.mean(y == c) for c in self.classes])
        return self

    def predict(self, x):
        log_like = -0.5 * (
            ((x[:, None] - self.mean[None]) ** 2) / self.var[None] + np.log(self.var[None])
        ).sum(-1)
        return self.classes[np.argmax(log_like + self.log_prior[None], axis=1)]


# The twin pairs in the 13-class setting (raw code - 1): one aerial look, different phenology.
TWINS_13 = [(a - 1, b - 1) for a, b in scene.TWINS]


def test_domain_shift_is_real(demo_root):
    classifier = GaussianNaiveBayes().fit(*_pixels(demo_root, "train", "south"))
    # Held-out zones (test split) of both regions, so the south score is not a training score.
    south_x, south_y = _pixels(demo_root, "test", "south", seed=1)
    north_x, north_y = _pixels(demo_root, "test", "north", seed=1)
    south_accuracy = np.mean(classifier.predict(south_x) == south_y)
    north_accuracy = np.mean(classifier.predict(north_x) == north_y)
    assert south_accuracy > 0.6, "the aerial signal must be learnable"
    assert south_accuracy - north_accuracy > 0.15, (south_accuracy, north_accuracy)
    # ... and adapting to the north is possible: a classifier fitted there does well there.
    north_fitted = GaussianNaiveBayes().fit(*_pixels(demo_root, "train", "north"))
    assert np.mean(north_fitted.predict(north_x) == north_y) > north_accuracy + 0.1


def test_twin_classes_look_alike_in_the_aerial_image(demo_root):
    """A per-pixel classifier of the aerial bands cannot tell the twins of a pair apart."""
    x, y = _pixels(demo_root, "train", "south")
    test_x, test_y = _pixels(demo_root, "test", "south", seed=1)
    for first, second in TWINS_13:
        train, test = np.isin(y, (first, second)), np.isin(test_y, (first, second))
        assert train.sum() > 500 and test.sum() > 200, (first, second)
        fitted = GaussianNaiveBayes().fit(x[train], y[train])
        accuracy = np.mean(fitted.predict(test_x[test]) == test_y[test])
        majority = max(np.mean(test_y[test] == first), np.mean(test_y[test] == second))
        assert accuracy < max(0.62, majority + 0.07), (first, second, accuracy, majority)


def _pure_cell_series(region, seed):
    """Monthly NDVI of the cells one raw class fills (>= 95%) in a zone's superpatch, clear dates only.

    The superpatch is written by the generator itself; the cells' classes are its ground truth.
    """
    rng = np.random.default_rng(seed)
    seeds = scene.jittered_seeds(rng, 60, 60, region)
    job = synth_module._ZoneJob("train", region, "D000_2021", 0, "Z1_NN", 0, 1)
    dates = synth_module._acquisition_dates(rng, 2021, 24)
    data, masks, _ = synth_module._superpatch(rng, job, (60, 60), seeds, dates)
    fractions = scene.class_fractions(seeds, 60, 60)  # (19, H, W), raw codes 1..19
    ndvi = (data[:, 6] - data[:, 2]) / (data[:, 6] + data[:, 2] + 1e-6)  # (T, H, W)
    ndvi[(masks[:, 1] >= 20) | (masks[:, 0] >= 20)] = np.nan  # cloudy or snowy at that cell
    months = np.array([d.month for d in dates])
    monthly = np.full((12, *ndvi.shape[1:]), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a cell cloudy on every date of a month: NaN
        for month in np.unique(months):
            monthly[month - 1] = np.nanmean(ndvi[months == month], axis=0)
    pure = fractions.max(axis=0) >= 0.95
    return monthly[:, pure].T, fractions.argmax(axis=0)[pure]  # (cells, 12), 13-class index = raw - 1


def test_twin_classes_differ_in_their_sentinel2_phenology():
    """Over the year the twins differ: a nearest-mean classifier of monthly NDVI separates each pair."""
    for region in ("south", "north"):  # each region has its own phenology delay
        zones = [_pure_cell_series(region, seed) for seed in range(3)]
        series, classes = np.concatenate([z[0] for z in zones]), np.concatenate([z[1] for z in zones])
        for first, second in TWINS_13:
            pair = np.isin(classes, (first, second))
            x, y = series[pair], classes[pair]
            assert min(np.sum(y == first), np.sum(y == second)) >= 20, (region, first, second)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # months without a clear date: NaN
                means = np.stack([np.nanmean(x[y == c], axis=0) for c in (first, second)])
                distance = np.nanmean((x[:, None] - means[None]) ** 2, axis=2)
            predicted = np.where(distance[:, 0] < distance[:, 1], first, second)
            assert np.mean(predicted == y) > 0.95, (region, first, second, np.mean(predicted == y))


def test_sentinel2_carries_the_vegetation_signal(demo_root):
    dataset = Flair2Dataset(
        demo_root, domains=["south", "north"], sentinel=SentinelOptions(monthly_average=False)
    )
    vegetated, summer_ndvi = [], []
    for sample in (dataset[i] for i in range(len(dataset))):
        centre = sample.s2[:, :, 18:22, 18:22].mean(axis=(2, 3))  # the aerial footprint
        ndvi = (centre[:, 6] - centre[:, 2]) / (centre[:, 6] + centre[:, 2] + 1e-6)  # B8, B4
        day = np.array([d.timetuple().tm_yday for d in sample.s2_dates])
        summer = (day > 120) & (day < 260)
        if summer.any():
            vegetated.append(np.isin(sample.label, VEGETATION).mean())
            summer_ndvi.append(ndvi[summer].mean())
    assert len(vegetated) > 30
    assert np.corrcoef(vegetated, summer_ndvi)[0, 1] > 0.5


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    generate(tmp_path / "a", TINY_OPTIONS)
    generate(tmp_path / "b", TINY_OPTIONS)
    generate(tmp_path / "c", SynthOptions(**{**TINY_OPTIONS.__dict__, "seed": TINY_OPTIONS.seed + 1}))
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 17
    for relative in files_a:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative
    image = "flair_aerial_train/D081_2020/Z1_NN/img/IMG_000001.tif"
    assert (tmp_path / "a" / image).read_bytes() != (tmp_path / "c" / image).read_bytes()


def test_existing_output_needs_overwrite_and_is_replaced_atomically(tmp_path):
    out = tmp_path / "f2"
    generate(out, TINY_OPTIONS)
    (out / "marker").write_text("old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        generate(out, TINY_OPTIONS)
    assert (out / "marker").exists()
    generate(out, TINY_OPTIONS, overwrite=True)
    assert not (out / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f2"]  # no temporary or old folder left


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = synth_module._write_zone

    def failing(root, options, job):
        calls.append(job)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        yield from real(root, options, job)

    monkeypatch.setattr(synth_module, "_write_zone", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate(tmp_path / "f2", TINY_OPTIONS)
    assert list(tmp_path.iterdir()) == []


def test_full_size_patches_are_real_flair2_size(tmp_path):
    options = SynthOptions(
        patch_size=512,
        domains_per_region=1,
        zones_per_domain=1,
        test_zones_per_domain=0,
        patches_per_zone=2,
        min_dates=6,
        max_dates=8,
    )
    generate(tmp_path / "full", options)
    dataset = Flair2Dataset(tmp_path / "full", patch_size=512)
    sample = dataset[0]
    assert sample.aerial.shape == (5, 512, 512) and sample.s2.shape[1:] == (10, 40, 40)
    with rasterio.open(dataset.patches[0].aerial_path) as src:
        assert src.crs.to_epsg() == 2154 and src.res == (0.2, 0.2)
        assert src.transform.c > 100_000 and src.transform.f > 6_000_000  # Lambert-93 metres


def test_info_file_records_options_and_regions(demo_root):
    info = json.loads((demo_root / INFO_FILE).read_text())
    assert info["options"]["seed"] == 0
    assert info["regions"] == {"south": ["D081_2020", "D032_2019"], "north": ["D080_2021", "D060_2021"]}
    assert info["patches"] == {"train/south": 24, "train/north": 24, "test/south": 12, "test/north": 12}


@pytest.mark.parametrize(
    ("field", "value"), [("patch_size", 100), ("domains_per_region", 6), ("min_dates", 2)]
)
def test_synth_options_validate(field, value):
    with pytest.raises(ValueError, match=field):
        SynthOptions(**{field: value})
