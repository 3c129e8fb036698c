"""What every command shares, training or not.

The device and precision, the process group, the CPU allocator, the launcher, and the run folder's
schema (:mod:`damformer.runtime.artifacts`).
"""
