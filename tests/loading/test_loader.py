"""The streaming shard loader: epoch coverage over ranks x workers, seeded order, exact resume, errors."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from damformer.data import Flair2Dataset
from damformer.errors import DamformerError
from damformer.loading.augment import GeometricAugment
from damformer.loading.collate import collate_samples
from damformer.loading.loader import LoaderOptions, ShardLoader, plan_epoch
from damformer.loading.rawtree import RawTreeDataset
from damformer.shards.format import ShardFormatError
from damformer.shards.shardset import ShardSet
from damformer.shards.writer import ShardWriteOptions, write_shards


def _epoch(shard_set, options, *, world_size, num_workers, epoch=0):
    """Batches of every rank for one epoch: {rank: [batch, ...]}."""
    out = {}
    for rank in range(world_size):
        loader = ShardLoader(shard_set, options, rank=rank, world_size=world_size, num_workers=num_workers)
        loader.epoch = epoch
        out[rank] = list(loader)
        assert len(out[rank]) == len(
            ShardLoader(shard_set, options, rank=rank, world_size=world_size, num_workers=num_workers)
        )
    return out


def _valid_keys(batches):
    return [k for b in batches for k, v in zip(b["keys"], b["valid"].tolist(), strict=True) if v]


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 2), (3, 2)])
def test_union_over_ranks_and_workers_is_the_dataset(demo_shards, world_size, num_workers):
    shard_set = ShardSet(demo_shards)
    options = LoaderOptions(batch_size=2, augment=False)
    per_rank = _epoch(shard_set, options, world_size=world_size, num_workers=num_workers)
    seen = [k for batches in per_rank.values() for k in _valid_keys(batches)]
    assert sorted(seen) == sorted(shard_set.manifests[0]["samples"])  # every sample exactly once
    assert len(set(seen)) == len(seen) == 24
    # DDP needs every rank to take the same number of steps
    assert len({len(batches) for batches in per_rank.values()}) == 1
    for batches in per_rank.values():
        assert all(len(b["keys"]) == 2 for b in batches)
        for batch in batches:  # padding repeats real samples of the same rank, flagged invalid
            padded = [k for k, v in zip(batch["keys"], batch["valid"].tolist(), strict=True) if not v]
            assert set(padded) <= set(seen)


def test_without_padding_nothing_is_repeated(demo_shards):
    shard_set = ShardSet(demo_shards)
    options = LoaderOptions(batch_size=4, augment=False, pad=False)
    per_rank = _epoch(shard_set, options, world_size=2, num_workers=2)
    keys = [k for batches in per_rank.values() for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(shard_set.manifests[0]["samples"])
    assert all(b["valid"].all() for batches in per_rank.values() for b in batches)


def test_epoch_plan_balances_readers_and_covers_every_sample(demo_shards):
    shards = ShardSet(demo_shards).shards
    for readers in (1, 2, 4, 7, 12, 30):
        parts = plan_epoch(shards, epoch=3, seed=1, num_readers=readers)
        loads = [sum(u.count for u in part) for part in parts]
        assert sum(loads) == 24
        assert max(loads) - min(loads) <= 5  # at most one shard's worth apart
        covered = sorted(
            shards[u.shard].keys[i]
            for part in parts
            for u in part
            for i in range(u.offset, len(shards[u.shard].keys), u.stride)
        )
        assert covered == sorted(k for s in shards for k in s.keys)


def test_order_is_seeded_and_changes_per_epoch(demo_shards):
    shard_set = ShardSet(demo_shards)
    options = LoaderOptions(batch_size=3, seed=5)

    def keys(epoch):
        return [
            k
            for b in _epoch(shard_set, options, world_size=1, num_workers=2, epoch=epoch)[0]
            for k in b["keys"]
        ]

    first = keys(0)
    assert keys(0) == first
    assert keys(1) != first and sorted(keys(1)) == sorted(first)
    other_seed = [
        k
        for b in ShardLoader(shard_set, LoaderOptions(batch_size=3, seed=6), num_workers=2)
        for k in b["keys"]
    ]
    assert other_seed != first
    shuffled = first != sorted(first)
    assert shuffled


def _same_batch(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize(("num_workers", "stop"), [(0, 4), (2, 5), (2, 6), (3, 1)])
def test_resume_mid_epoch_continues_exactly(demo_shards, num_workers, stop):
    shard_set = ShardSet(demo_shards)
    options = LoaderOptions(batch_size=2, seed=2)
    full_loader = ShardLoader(shard_set, options, rank=1, world_size=2, num_workers=num_workers)
    full_loader.epoch = 1
    full = list(full_loader) + list(full_loader)  # the rest of epoch 1 and all of epoch 2

    loader = ShardLoader(shard_set, options, rank=1, world_size=2, num_workers=num_workers)
    loader.epoch = 1
    iterator = iter(loader)
    head = [next(iterator) for _ in range(stop)]
    state = loader.state_dict()
    del iterator
    assert state["batch"] == stop and state["epoch"] == 1

    resumed = ShardLoader(shard_set, options, rank=1, world_size=2, num_workers=num_workers)
    resumed.load_state_dict(state)
    tail = list(resumed) + list(resumed)
    assert len(head) + len(tail) == len(full)
    for a, b in zip(head + tail, full, strict=True):
        _same_batch(a, b)  # same samples, same augmentation draws, same padding
    seen_before = set(_valid_keys(head))
    assert not seen_before & set(_valid_keys(tail[: len(full_loader) - stop]))


def test_resume_with_another_layout_is_refused(demo_shards):
    shard_set = ShardSet(demo_shards)
    state = ShardLoader(shard_set, LoaderOptions(), world_size=2, num_workers=2).state_dict()
    with pytest.raises(DamformerError, match="saved with world_size=2, this run has world_size=1"):
        ShardLoader(shard_set, LoaderOptions()).load_state_dict(state)
    with pytest.raises(DamformerError, match="saved with num_workers=2, this run has num_workers=0"):
        ShardLoader(shard_set, LoaderOptions(), world_size=2).load_state_dict(state)


def test_batches_have_documented_dtypes_and_match_the_raw_tree(demo_root, demo_shards):
    dataset = Flair2Dataset(demo_root, domains=["south"])
    raw = {dataset[i].patch_id: dataset[i] for i in range(len(dataset))}
    for batch in ShardLoader(ShardSet(demo_shards), LoaderOptions(batch_size=3, augment=False)):
        assert batch["aerial"].dtype == torch.uint8 and batch["aerial"].shape[1:] == (5, 256, 256)
        assert batch["label"].dtype == torch.uint8
        assert batch["s2"].dtype == torch.float32 and batch["s2"].shape[2:] == (10, 40, 40)
        assert batch["s2_mask"].dtype == torch.bool and batch["s2_day_offsets"].dtype == torch.int64
        for row, key in enumerate(batch["keys"]):
            sample = raw[key]
            steps = sample.s2.shape[0]
            np.testing.assert_array_equal(batch["aerial"][row].numpy(), sample.aerial)
            np.testing.assert_array_equal(batch["label"][row].numpy(), sample.label)
            np.testing.assert_array_equal(batch["s2"][row, :steps].numpy(), sample.s2)
            assert batch["s2_mask"][row].sum() == steps
            assert not batch["s2"][row, steps:].any()
            np.testing.assert_array_equal(batch["s2_day_offsets"][row, :steps].numpy(), sample.s2_day_offsets)
            assert batch["domains"][row] == sample.domain


def test_domain_selection_picks_shard_subsets(demo_shards):
    only = ShardSet(demo_shards, domains=["D081"])
    assert {s.domain for s in only.shards} == {"D081_2020"}
    keys = {k for b in ShardLoader(only, LoaderOptions(batch_size=2)) for k in b["keys"]}
    assert keys == {k for s in only.shards for k in s.keys}
    with pytest.raises(DamformerError):
        ShardSet(demo_shards, domains=["D999"])


def test_raw_tree_dataset_shares_the_sample_format(demo_root, demo_shards):
    dataset = RawTreeDataset(Flair2Dataset(demo_root, domains=["south"]))
    raw_batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate_samples)))
    shard_batch = next(iter(ShardLoader(ShardSet(demo_shards), LoaderOptions(batch_size=3))))
    shard_batch.pop("num_skipped", None)
    assert raw_batch.keys() == shard_batch.keys()
    for key, value in raw_batch.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == shard_batch[key].dtype, key
            assert value.shape[0] == 3 and value.shape[2:] == shard_batch[key].shape[2:], key
    augmented = RawTreeDataset(Flair2Dataset(demo_root, domains=["south"]), augment=True, seed=1)
    assert augmented[0]["key"] == dataset[0]["key"]
    np.testing.assert_array_equal(
        np.sort(augmented[0]["aerial"].ravel()), np.sort(dataset[0]["aerial"].ravel())
    )


def test_augmentation_moves_aerial_label_and_every_date_alike():
    # aerial 8x8, S2 = its 2x2 block means: flips and rotations commute with aligned block means, so the
    # S2 of the transformed sample must equal the block means of the transformed aerial.
    rng = np.random.default_rng(0)
    aerial = rng.integers(0, 255, size=(5, 8, 8)).astype(np.uint8)
    label = aerial[0] % 13

    def blocks(x):
        return x.reshape(*x.shape[:-2], 4, 2, 4, 2).mean(axis=(-3, -1))

    s2 = np.stack([blocks(aerial[:1].astype(np.float32)).repeat(10, axis=0) + t for t in range(3)])
    sample = {"aerial": aerial, "label": label, "s2": s2, "key": "k"}
    augment = GeometricAugment()
    outcomes = set()
    for seed in range(40):
        out = augment(sample, np.random.default_rng(seed))
        np.testing.assert_array_equal(out["label"], out["aerial"][0] % 13)
        for t in range(3):
            np.testing.assert_allclose(
                out["s2"][t], blocks(out["aerial"][:1].astype(np.float32)).repeat(10, 0) + t
            )
        outcomes.add(out["aerial"].tobytes())
    assert len(outcomes) == 8  # the whole dihedral group is reachable
    assert np.array_equal(sample["aerial"], aerial)  # the input is not modified


def test_collate_pads_time_series_with_a_mask():
    def sample(steps):
        return {
            "key": f"k{steps}",
            "domain": "D",
            "valid": True,
            "aerial": np.zeros((5, 4, 4), np.uint8),
            "label": np.zeros((4, 4), np.uint8),
            "s2": np.ones((steps, 10, 2, 2), np.float32),
            "s2_day_offsets": np.arange(steps, dtype=np.int32) + 1,
        }

    batch = collate_samples([sample(2), sample(5)])
    assert batch["s2"].shape == (2, 5, 10, 2, 2)
    assert batch["s2_mask"].tolist() == [[True, True, False, False, False], [True] * 5]
    assert batch["s2"][0, 2:].abs().sum() == 0 and batch["s2"][0, :2].min() == 1
    assert batch["s2_day_offsets"].tolist() == [[1, 2, 0, 0, 0], [1, 2, 3, 4, 5]]


@pytest.fixture
def damaged_shards(tiny_root, tmp_path):
    out = tmp_path / "s"
    manifest = write_shards(Flair2Dataset(tiny_root), out, ShardWriteOptions(max_samples=2))
    victim = out / manifest["shards"][0]["name"]
    victim.write_bytes(victim.read_bytes()[:3000])
    return out, manifest["shards"][0]["name"], manifest["shards"][1]["keys"]


def test_corrupt_shard_raises_naming_it(damaged_shards):
    out, name, _ = damaged_shards
    with pytest.raises(ShardFormatError, match=f"{name}: size: expected .* bytes \\(manifest\\), found 3000"):
        list(ShardLoader(ShardSet(out), LoaderOptions(batch_size=1, shuffle_buffer=1)))  # checked first
    unverified = LoaderOptions(batch_size=1, shuffle_buffer=1, verify="never")  # the reader's own check
    with pytest.raises(ShardFormatError, match=f"{name}: corrupt or truncated tar"):
        list(ShardLoader(ShardSet(out), unverified))


@pytest.mark.parametrize(("num_workers", "verify"), [(0, "first"), (0, "never"), (2, "never")])
def test_corrupt_shard_is_skipped_and_counted(damaged_shards, num_workers, verify, caplog):
    out, name, intact_keys = damaged_shards
    options = LoaderOptions(batch_size=1, on_error="skip", pad=False, verify=verify)
    loader = ShardLoader(ShardSet(out), options, num_workers=num_workers)
    keys = [k for b in loader for k in b["keys"]]
    assert sorted(keys) == sorted(intact_keys)  # the intact shard, whole
    assert loader.skipped == 1
    if num_workers == 0:
        expected = f"skipping {name} (not read)" if verify == "first" else f"skipping the rest of {name}"
        assert expected in caplog.text


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ShardFormatError, match="manifest missing"):
        ShardSet(tmp_path)


def test_a_relative_shard_path_from_another_folder_names_both(tmp_path, monkeypatch):
    """Config paths are relative to the working folder: run elsewhere, the error says where it looked."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShardFormatError) as refused:
        ShardSet("runs/demo/shards/south")
    message = str(refused.value)
    assert f"looked for {tmp_path / 'runs/demo/shards/south'}" in message
    assert f"relative to the working folder {tmp_path}" in message and "manifest missing" not in message


def test_epoch_stream_resumed_on_another_world_size_sees_each_sample_once(demo_shards):
    from damformer.loading.streams import EpochStream

    def streams(world: int) -> list[EpochStream]:
        return [
            EpochStream(ShardSet(demo_shards), batch_size=2, seed=3, rank=r, world_size=world)
            for r in range(world)
        ]

    seen: list[str] = []
    two = streams(2)
    for _ in range(3):  # 3 global steps of 2 ranks x 2 samples: 12 samples
        for stream in two:
            seen += stream.next()["keys"]
    state = two[0].state_dict()
    assert state == two[1].state_dict() and state["position"] == 12  # global, the same on every rank
    three = streams(3)
    for stream in three:
        stream.load_state_dict(state)
    total = ShardSet(demo_shards).num_samples
    while len(seen) < total:  # three ranks finish the epoch
        for stream in three:
            seen += stream.next()["keys"]
    assert len(seen) == total and len(set(seen)) == total  # every sample of the epoch exactly once
    one = streams(1)[0]
    uninterrupted = [key for _ in range(total // 2) for key in one.next()["keys"]]
    assert seen == uninterrupted  # and in the order of one uninterrupted process
