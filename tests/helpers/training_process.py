"""A `damformer train` child process, started and past its header: what the signal tests break."""

from __future__ import annotations

import os
import subprocess


def start_training(command: list[str]) -> tuple[subprocess.Popen, str]:
    """Start ``command`` unbuffered; return the process once it printed its header (the trainer is built)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    header = process.stdout.readline()  # printed once the trainer is built, just before the first step
    assert header.startswith("training "), header + process.stderr.read()
    return process, header
