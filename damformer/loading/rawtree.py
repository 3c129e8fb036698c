"""A map-style dataset over the raw FLAIR-2 tree that yields the same training samples as the shard loader.

For small experiments without sharding: ``DataLoader(RawTreeDataset(...), batch_size=2,
collate_fn=collate_samples)`` produces batches with the same keys, dtypes and shapes as
:class:`damformer.loading.loader.ShardLoader`. Augmentation draws are seeded by (seed, epoch, index).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from damformer.data.flair2 import Flair2Dataset
from damformer.loading.augment import GeometricAugment, training_sample


class RawTreeDataset(Dataset):
    """Training samples read straight from GeoTIFFs and superpatches.

    Args:
        dataset: the reader over the raw tree.
        augment: apply the same flips / rot90 as the shard loader.
        seed: seed of the augmentation draws.
    """

    def __init__(self, dataset: Flair2Dataset, *, augment: bool = False, seed: int = 0) -> None:
        self.dataset = dataset
        self.augment = GeometricAugment() if augment else None
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = training_sample(self.dataset[index])
        if self.augment is not None:
            sample = self.augment(sample, np.random.default_rng([self.seed, self.epoch, index, 37]))
        return sample
