"""The built-in miniature FLAIR-2: a generator of small datasets in the real on-disk layout (demo, tests)."""
