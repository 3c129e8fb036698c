"""Offline sharding: exact round trip, manifest statistics, resumability, verification and bad shards."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import webdataset

from damformer.cli import main
from damformer.data import Flair2Dataset
from damformer.errors import DataFormatError, OutputExistsError
from damformer.shards.format import ShardFormatError, decode_sample, encode_sample
from damformer.shards.manifest import load_manifest
from damformer.shards.tario import iter_tar_samples, sha256_file, write_tar
from damformer.shards.writer import ShardWriteOptions, parse_size, verify_shards, write_shards

IMG1 = "flair_aerial_train/D081_2020/Z1_NN/img/IMG_000001.tif"


def _samples_by_key(shard_dir: Path) -> dict:
    manifest = load_manifest(shard_dir)
    out = {}
    for shard in manifest["shards"]:
        for key, files in iter_tar_samples(shard_dir / shard["name"]):
            out[key] = decode_sample(files, key=key, shard=shard["name"])
    return out


def _assert_same_sample(a, b) -> None:
    for field in fields(a):
        left, right = getattr(a, field.name), getattr(b, field.name)
        if isinstance(left, np.ndarray) or isinstance(right, np.ndarray):
            assert left.dtype == right.dtype, field.name
            np.testing.assert_array_equal(left, right, err_msg=field.name)
        else:
            assert left == right, field.name


def test_round_trip_every_sample_equals_the_raw_tree(demo_root, demo_shards):
    dataset = Flair2Dataset(demo_root, domains=["south"])
    from_shards = _samples_by_key(demo_shards)
    assert len(from_shards) == len(dataset) == 24
    for index in range(len(dataset)):
        raw = dataset[index]
        _assert_same_sample(from_shards[raw.patch_id], raw)


def test_round_trip_single_dates_and_no_labels(tiny_root, tmp_path):
    # Single dates (no monthly mean) are stored as integers and must still come back as the same floats.
    from damformer.data import SentinelOptions

    dataset = Flair2Dataset(tiny_root, sentinel=SentinelOptions(monthly_average=False), with_labels=False)
    write_shards(dataset, tmp_path / "s", ShardWriteOptions(max_samples=1))
    shards = _samples_by_key(tmp_path / "s")
    for index in range(len(dataset)):
        raw = dataset[index]
        assert raw.label is None
        _assert_same_sample(shards[raw.patch_id], raw)


def test_shards_are_per_domain_and_bounded(demo_shards):
    manifest = load_manifest(demo_shards)
    names = [s["name"] for s in manifest["shards"]]
    assert names == sorted(names)
    for shard in manifest["shards"]:
        assert shard["name"].startswith(shard["domain"] + "-")
        assert 1 <= shard["num_samples"] <= 5
        assert len(shard["keys"]) == shard["num_samples"]
        domains = {
            decode_sample(f, key=k, shard="x").domain
            for k, f in iter_tar_samples(demo_shards / shard["name"])
        }
        assert domains == {shard["domain"]}
    assert manifest["domains"] == ["D032_2019", "D081_2020"]


def test_shard_size_bound_splits_shards(tiny_root, tmp_path):
    one = sum(len(b) for b in encode_sample(Flair2Dataset(tiny_root)[0]).values())
    manifest = write_shards(
        Flair2Dataset(tiny_root), tmp_path / "s", ShardWriteOptions(shard_bytes=one + 4000)
    )
    assert [s["num_samples"] for s in manifest["shards"]] == [1, 1, 1, 1]


def test_manifest_records_checksums_class_counts_and_band_stats(demo_root, demo_shards):
    manifest = load_manifest(demo_shards)
    dataset = Flair2Dataset(demo_root, domains=["south"])
    assert manifest["num_samples"] == 24
    for shard in manifest["shards"]:
        path = demo_shards / shard["name"]
        assert shard["bytes"] == path.stat().st_size
        assert shard["sha256"] == sha256_file(path)
    total = np.zeros(13, dtype=np.int64)
    aerial = []
    s2 = []
    for index in range(len(dataset)):
        sample = dataset[index]
        counts = np.bincount(sample.label.ravel(), minlength=13)
        assert manifest["samples"][sample.patch_id]["class_pixels"] == counts.tolist()
        total += counts
        aerial.append(sample.aerial.reshape(5, -1))
        s2.append(sample.s2.transpose(1, 0, 2, 3).reshape(10, -1))
    assert manifest["class_pixels"] == total.tolist()
    np.testing.assert_allclose(manifest["class_frequencies"], total / total.sum())
    aerial_all = np.concatenate(aerial, axis=1).astype(np.float64)
    s2_all = np.concatenate(s2, axis=1).astype(np.float64)
    np.testing.assert_allclose(manifest["band_stats"]["aerial"]["mean"], aerial_all.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(manifest["band_stats"]["aerial"]["std"], aerial_all.std(axis=1), rtol=1e-6)
    np.testing.assert_allclose(manifest["band_stats"]["s2"]["mean"], s2_all.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(manifest["band_stats"]["s2"]["std"], s2_all.std(axis=1), rtol=1e-6)
    params = manifest["params"]
    assert params["sentinel"]["crop_size"] == 40 and params["sentinel"]["monthly_average"] is True
    assert params["split"] == "train" and params["domains"] == ["D032_2019", "D081_2020"]


def test_sharding_is_deterministic_and_parallel_workers_give_the_same_bytes(tiny_root, tmp_path, monkeypatch):
    dataset = Flair2Dataset(tiny_root)
    written: list[str] = []
    real_write = webdataset.TarWriter.write

    def spy(self, sample):  # the shards go through webdataset's writer
        written.append(sample["__key__"])
        return real_write(self, sample)

    monkeypatch.setattr(webdataset.TarWriter, "write", spy)
    one = write_shards(dataset, tmp_path / "a", ShardWriteOptions(max_samples=1))
    assert sorted(written) == sorted(one_key for s in one["shards"] for one_key in s["keys"])
    later = time.time() + 86400  # a day later: no clock time may reach the bytes
    monkeypatch.setattr(time, "time", lambda: later)
    two = write_shards(dataset, tmp_path / "b", ShardWriteOptions(max_samples=1, workers=2))
    assert one["written"] == two["written"] == 4
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    for shard in one["shards"]:
        assert (tmp_path / "a" / shard["name"]).read_bytes() == (tmp_path / "b" / shard["name"]).read_bytes()


def test_rerun_skips_verified_shards_and_rewrites_damaged_ones(tiny_root, tmp_path):
    dataset = Flair2Dataset(tiny_root)
    out = tmp_path / "s"
    first = write_shards(dataset, out, ShardWriteOptions(max_samples=1))
    again = write_shards(dataset, out, ShardWriteOptions(max_samples=1))
    assert again["written"] == 0
    names = [s["name"] for s in first["shards"]]
    # a flipped byte (same size), a deleted shard and a deleted sidecar are each redone, nothing else
    damaged = out / names[0]
    data = bytearray(damaged.read_bytes())
    data[700] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (out / names[1]).unlink()
    (out / f"{names[2]}.json").unlink()
    mtime_untouched = (out / names[3]).stat().st_mtime_ns
    redone = write_shards(dataset, out, ShardWriteOptions(max_samples=1))
    assert redone["written"] == 3
    assert (out / names[3]).stat().st_mtime_ns == mtime_untouched
    assert [s["sha256"] for s in redone["shards"]] == [s["sha256"] for s in first["shards"]]
    assert verify_shards(out) == {"shards": 4, "samples": 4}


def test_leftovers_of_a_killed_run_are_never_taken_for_shards(tiny_root, tmp_path):
    dataset = Flair2Dataset(tiny_root)
    out = tmp_path / "s"
    first = write_shards(dataset, out, ShardWriteOptions(max_samples=1))
    # what a kill leaves: no manifest, a half-written temp file, a shard renamed but without sidecar
    (out / "manifest.json").unlink()
    name = first["shards"][1]["name"]
    (out / f".{name}.tmp-1234").write_bytes(b"partial")
    (out / f"{name}.json").unlink()
    with pytest.raises(ShardFormatError, match="manifest missing"):
        verify_shards(out)
    redone = write_shards(dataset, out, ShardWriteOptions(max_samples=1))
    assert redone["written"] == 1
    assert not list(out.glob(".*tmp*"))
    assert verify_shards(out) == {"shards": 4, "samples": 4}


def test_sigkill_mid_run_then_rerun_completes(demo_root, tmp_path):
    out = tmp_path / "s"
    command = [
        sys.executable,
        "-m",
        "damformer",
        "-q",
        "shard",
        "--src",
        str(demo_root),
        "--domains",
        "north",
        "--out",
        str(out),
        "--max-samples",
        "1",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tar.json")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "manifest.json").exists()
    complete = {p.name.removesuffix(".json") for p in out.glob("*.tar.json")}
    assert 1 <= len(complete) < 24
    # a visible .tar is complete (it has its sidecar): partial data only ever lives in hidden temp files
    assert {p.name for p in out.glob("*.tar")} <= complete
    rerun = subprocess.run([*command], capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{24 - len(complete)} written, {len(complete)} already complete" in rerun.stdout
    assert verify_shards(out) == {"shards": 24, "samples": 24}
    assert not list(out.glob(".*tmp*"))
    keys = [key for tar in sorted(out.glob("*.tar")) for key, _ in iter_tar_samples(tar)]
    expected = {patch.patch_id for patch in Flair2Dataset(demo_root, domains=["north"]).patches}
    assert len(keys) == len(set(keys)) and set(keys) == expected  # every patch exactly once: no duplicates


def test_other_parameters_refuse_to_mix_unless_overwrite(tiny_root, tmp_path):
    from damformer.data import SentinelOptions

    out = tmp_path / "s"
    write_shards(Flair2Dataset(tiny_root), out)
    other = Flair2Dataset(tiny_root, sentinel=SentinelOptions(crop_size=20))
    with pytest.raises(OutputExistsError, match="other parameters"):
        write_shards(other, out)
    manifest = write_shards(other, out, overwrite=True)
    assert manifest["params"]["sentinel"]["crop_size"] == 20
    assert verify_shards(out)["samples"] == 4


@pytest.mark.parametrize("workers", [1, 2])
def test_source_error_names_the_file_and_leaves_no_partial_shard(tiny_root, tmp_path, workers):
    (tiny_root / IMG1).write_bytes(b"II*\x00 not a tiff")
    out = tmp_path / "s"
    with pytest.raises(DataFormatError, match="IMG_000001.tif"):
        write_shards(Flair2Dataset(tiny_root), out, ShardWriteOptions(max_samples=1, workers=workers))
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".*tmp*"))
    for tar in out.glob("*.tar"):  # whatever is there is complete and listed by its sidecar
        assert (out / f"{tar.name}.json").is_file()


def test_verify_reports_the_shard_at_fault(tiny_root, tmp_path):
    out = tmp_path / "s"
    manifest = write_shards(Flair2Dataset(tiny_root), out, ShardWriteOptions(max_samples=2))
    name = manifest["shards"][0]["name"]
    path = out / name
    good = path.read_bytes()

    damaged = bytearray(good)
    damaged[2000] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.raises(ShardFormatError, match=f"{name}: sha256 mismatch"):
        verify_shards(out)

    path.write_bytes(good[:5000])
    with pytest.raises(ShardFormatError, match=f"{name}: size: expected"):
        verify_shards(out)

    path.unlink()
    with pytest.raises(ShardFormatError, match=f"{name}: shard listed in the manifest is missing"):
        verify_shards(out)

    path.write_bytes(good)
    assert verify_shards(out)["samples"] == 4
    data = json.loads((out / "manifest.json").read_text())
    data["format"] = 99
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardFormatError, match="shard format: expected 1, found 99"):
        verify_shards(out)


def _tar_with(path: Path, members: list[tuple[str, bytes]], *, kind: bytes = tarfile.REGTYPE) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.type = kind
            tar.addfile(info, io.BytesIO(data))


def test_truncated_tar_names_shard_and_last_good_sample(tiny_root, tmp_path):
    path = tmp_path / "x.tar"
    dataset = Flair2Dataset(tiny_root)
    write_tar(path, [(dataset[i].patch_id, encode_sample(dataset[i])) for i in range(2)])
    second = dataset[1].patch_id
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 1000])
    with pytest.raises(ShardFormatError, match=rf"x.tar: corrupt or truncated tar in sample {second} \(1 "):
        list(iter_tar_samples(path))


def test_sample_missing_a_key_names_shard_and_key(tiny_root, tmp_path):
    files = encode_sample(Flair2Dataset(tiny_root)[0])
    del files["meta.json"]
    with pytest.raises(ShardFormatError, match=r"D081_2020-00000.tar: sample IMG_000001: missing meta.json"):
        decode_sample(files, key="IMG_000001", shard="D081_2020-00000.tar")
    files = encode_sample(Flair2Dataset(tiny_root)[0])
    del files["s2_masks.npy.gz"]
    with pytest.raises(ShardFormatError, match="has s2.npy but no s2_masks"):
        decode_sample(files, key="IMG_000001", shard="x.tar")
    files = encode_sample(Flair2Dataset(tiny_root)[0])
    files["aerial.npy"] = files["aerial.npy"][:100]
    with pytest.raises(ShardFormatError, match="IMG_000001 aerial.npy: cannot decode"):
        decode_sample(files, key="IMG_000001", shard="x.tar")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("../evil.aerial.npy", tarfile.REGTYPE),
        ("/etc/evil.aerial.npy", tarfile.REGTYPE),
        ("sub/IMG_1.aerial.npy", tarfile.REGTYPE),
        ("IMG_1.aerial.npy", tarfile.SYMTYPE),
        ("IMG_1.exe", tarfile.REGTYPE),
        ("IMG 1;rm.aerial.npy", tarfile.REGTYPE),
    ],
)
def test_crafted_member_names_are_refused(tmp_path, name, kind):
    path = tmp_path / "evil.tar"
    _tar_with(path, [(name, b"x")], kind=kind)
    with pytest.raises(ShardFormatError, match="evil.tar: member"):
        list(iter_tar_samples(path))
    assert not (tmp_path.parent / "evil.aerial.npy").exists()


def test_pickled_arrays_are_refused(tmp_path):
    buffer = io.BytesIO()
    np.save(buffer, np.array([object()], dtype=object), allow_pickle=True)
    files = {"aerial.npy": buffer.getvalue(), "meta.json": b'{"format": 1}'}
    with pytest.raises(ShardFormatError, match="cannot decode the array"):
        decode_sample(files, key="K", shard="evil.tar")


def test_a_key_split_in_two_groups_is_refused(tmp_path):
    path = tmp_path / "dup.tar"
    _tar_with(path, [("A.meta.json", b"{}"), ("B.meta.json", b"{}"), ("A.aerial.npy", b"")])
    with pytest.raises(ShardFormatError, match="sample A appears twice"):
        list(iter_tar_samples(path))


def test_webdataset_reads_our_shards(demo_shards):
    manifest = load_manifest(demo_shards)
    shard = manifest["shards"][0]
    samples = list(webdataset.WebDataset(str(demo_shards / shard["name"]), shardshuffle=False))
    assert [s["__key__"] for s in samples] == shard["keys"]
    ours = dict(iter_tar_samples(demo_shards / shard["name"]))
    for sample in samples:
        files = {k: v for k, v in sample.items() if not k.startswith("__")}
        assert files == ours[sample["__key__"]]


def test_the_documented_webdataset_pipeline_decodes_the_package_samples(demo_shards):
    from damformer.loading.augment import training_sample
    from damformer.loading.collate import collate_samples
    from damformer.loading.wds import webdataset_pipeline
    from damformer.shards.format import decode_sample

    manifest = load_manifest(demo_shards)
    keys = [key for shard in manifest["shards"] for key in shard["keys"]]
    samples = list(webdataset_pipeline(demo_shards))  # a shard-set folder: its shards in order
    assert isinstance(webdataset_pipeline(demo_shards), webdataset.WebDataset)
    assert [s["key"] for s in samples] == keys
    tar = demo_shards / manifest["shards"][0]["name"]
    ours = {
        k: training_sample(decode_sample(f, key=k, shard=tar.name, masks=False))
        for k, f in iter_tar_samples(tar)
    }
    for sample in samples[: len(ours)]:
        expected = ours[sample["key"]]
        assert set(sample) - {"__key__"} == set(expected) and sample["domain"] == expected["domain"]
        for name in ("aerial", "label", "s2", "s2_day_offsets"):
            np.testing.assert_array_equal(sample[name], expected[name])
    shuffled = [s["key"] for s in webdataset_pipeline([str(tar)], shuffle=4, seed=1)]
    assert sorted(shuffled) == sorted(ours) and shuffled != list(ours)  # a tar path, shuffled
    batch = next(iter(webdataset_pipeline(demo_shards).batched(3, collation_fn=collate_samples)))
    assert batch["aerial"].shape[0] == 3 and batch["s2"].shape[:1] == (3,) and batch["keys"] == keys[:3]


def test_parse_size():
    assert parse_size("1GB") == 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("100k") == 100_000
    assert parse_size("12345") == 12345
    with pytest.raises(ValueError, match="expected a size like 1GB"):
        parse_size("big")


def test_cli_shard_then_verify(tiny_root, tmp_path, capsys):
    out = tmp_path / "s"
    args = [
        "-q",
        "shard",
        "--src",
        str(tiny_root),
        "--domains",
        "south",
        "--out",
        str(out),
        "--max-samples",
        "1",
    ]
    assert main(args) == 0
    assert "2 samples in 2 shards" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 written, 2 already complete" in capsys.readouterr().out
    assert main(["-q", "shard", "verify", str(out)]) == 0
    assert "OK, 2 samples in 2 shards" in capsys.readouterr().out


def test_cli_errors_are_one_line_with_exit_2(tiny_root, tmp_path):
    out = tmp_path / "s"
    base = [sys.executable, "-m", "damformer", "-q"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args], capture_output=True, text=True, check=False, env=os.environ)

    bad_size = run("shard", "--src", str(tiny_root), "--out", str(out), "--shard-size", "huge")
    assert bad_size.returncode == 2 and "expected a size like 1GB" in bad_size.stderr
    missing = run("shard", "verify", str(tmp_path / "nothing"))
    assert missing.returncode == 2
    assert "nothing: no such shard-set folder" in missing.stderr and "Traceback" not in missing.stderr
    assert run("shard", "--src", str(tiny_root), "--out", str(out), "--max-samples", "1").returncode == 0
    tar = next(out.glob("*.tar"))
    data = bytearray(tar.read_bytes())
    data[1500] ^= 0x10
    tar.write_bytes(bytes(data))
    damaged = run("shard", "verify", str(out))
    assert damaged.returncode == 2
    assert f"{tar.name}: sha256 mismatch" in damaged.stderr and "Traceback" not in damaged.stderr
    broken_src = tiny_root / IMG1
    broken_src.write_bytes(b"junk")
    failing = run("shard", "--src", str(tiny_root), "--out", str(tmp_path / "t"))
    assert failing.returncode == 2 and "IMG_000001.tif" in failing.stderr
    assert "Traceback" not in failing.stderr


def test_damaged_header_and_missing_end_marker_are_reported(tiny_root, tmp_path):
    path = tmp_path / "x.tar"
    dataset = Flair2Dataset(tiny_root)
    write_tar(path, [(dataset[0].patch_id, encode_sample(dataset[0]))])
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[5] ^= 0x01  # inside the first member's name: its header checksum no longer matches
    path.write_bytes(bytes(damaged))
    with pytest.raises(
        ShardFormatError, match="x.tar: corrupt or truncated tar before its first sample.*checksum"
    ):
        list(iter_tar_samples(path))
    end = good.rstrip(b"\0")
    path.write_bytes(end + b"\0" * (-len(end) % 512))  # every member whole, but no end-of-archive marker
    with pytest.raises(ShardFormatError, match="no end-of-archive marker"):
        list(iter_tar_samples(path))
