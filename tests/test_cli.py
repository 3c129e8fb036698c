"""The damformer command as a user runs it: real processes, real files."""

import re
import subprocess
import sys

import pytest

from damformer.cli import build_parser


def _run(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "damformer", *args], capture_output=True, text=True, check=False
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_help_lists_commands_and_each_command_has_an_example():
    top = _run("--help").stdout
    assert "synth" in top and "read" in top and "shard" in top
    subcommands = build_parser()._subparsers._group_actions[0].choices
    for name in subcommands:
        text = _run(name, "--help").stdout
        spelled = name.replace("-", " ")  # 'shard-verify' is documented as 'damformer shard verify'
        assert re.search(r"examples?:\n", text) and f"damformer {spelled}" in text, name
        flat = " ".join(text.split())  # help lines wrap anywhere
        assert not re.search(r"\(default:[^)]*\) \(default:", flat), f"{name}: a default printed twice"
        assert "(default: None)" not in flat and "(default: False)" not in flat, name


def test_version():
    assert _run("--version").stdout.startswith("damformer ")


def test_synth_then_read_end_to_end(tmp_path):
    out = tmp_path / "f2"
    result = _run(
        "-q",
        "synth",
        "--out",
        str(out),
        "--patch-size",
        "64",
        "--domains-per-region",
        "2",
        "--zones-per-domain",
        "1",
        "--test-zones-per-domain",
        "1",
        "--patches-per-zone",
        "2",
    )
    assert "train/south: 4" in result.stdout and "D081_2020 D032_2019" in result.stdout
    read = _run("-q", "read", "--root", str(out), "--domains", "south", "north", "--patch-size", "64")
    assert read.stdout.splitlines()[0].endswith("8 patches in 4 domains")
    for domain in ("D081_2020", "D032_2019", "D080_2021", "D060_2021"):
        assert domain in read.stdout
    assert "class share %" in read.stdout and "herbaceous vegetation" in read.stdout
    test_split = _run("-q", "read", "--root", str(out), "--split", "test", "--no-labels", "--no-monthly")
    assert "class share %" not in test_split.stdout and "4 domains" in test_split.stdout


def test_synth_refuses_to_overwrite_without_flag(tmp_path):
    (tmp_path / "f2").mkdir()
    result = _run("synth", "--out", str(tmp_path / "f2"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("exists; pass --overwrite to replace it")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--patch-size", "100"), "patch_size: expected a multiple of 32"),
        (("--domains-per-region", "0"), "domains_per_region: expected 1..5"),
    ],
)
def test_synth_rejects_bad_options(tmp_path, args, message):
    result = _run("synth", "--out", str(tmp_path / "x"), *args, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_quiet_and_log_level_are_accepted_before_and_after_the_command():
    cell = "configs/ablation/damformer-rgbne-t.yaml"
    for args in (("-q", "train", cell, "--dry-run"), ("train", cell, "--dry-run", "-q"),
                 ("train", cell, "--dry-run", "--log-level", "ERROR")):  # fmt: skip
        assert "model: DAM-Former RGB+NIR+E+T" in _run(*args).stdout


def test_print_config_is_the_resolved_yaml_headed_by_the_batch_plan():
    import yaml

    printed = _run("train", "configs/ablation/damformer-rgbne-t.yaml", "--print-config", "--world-size", "2",
                   "--set", "optim.lr=0.001").stdout  # fmt: skip
    head, _, body = printed.partition("\n")
    assert head.startswith("# DAM-Former RGB+NIR+E+T; on 2 process(es): global batch 2 source + 2 target")
    assert "= 1 per process x 2 process(es)" in head
    config = yaml.safe_load(body)
    assert config["optim"]["lr"] == 0.001 and config["model"]["fusion_levels"] == [-1]
    assert config["data"]["global_batch"] == 2
