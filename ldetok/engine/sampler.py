"""A resumable, rank-sharded batch sampler for step-based training.

Epoch e uses the permutation from `torch.Generator().manual_seed(seed + e)`, so batch (epoch, index)
is a pure function of (seed, epoch, index, rank, world_size): a resumed run needs only its step to
continue with exactly the next batch (``ldetok.engine.trainer.StepBatches`` feeds a DataLoader this way).
"""

from __future__ import annotations

import math
import torch

__all__ = ["ResumableSampler"]


class ResumableSampler:
    """Lists of dataset indices (batches) for this rank, epoch after epoch: ``batch(epoch, index)``.

    Sharding follows DistributedSampler: the epoch's permutation is truncated (drop_last=True) or
    padded by wrapping around (drop_last=False) to a multiple of world_size, then rank r takes
    positions r, r + world_size, ... Within a rank, drop_last=True also drops a short final batch,
    so every rank runs the same number of equal-size steps per epoch.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ):
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be > 0, got {dataset_len}.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}.")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
        self.dataset_len = int(dataset_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)

        if drop_last:
            self.samples_per_rank = self.dataset_len // self.world_size
        else:
            self.samples_per_rank = math.ceil(self.dataset_len / self.world_size)
        if drop_last:
            self.batches_per_epoch = self.samples_per_rank // self.batch_size
        else:
            self.batches_per_epoch = math.ceil(self.samples_per_rank / self.batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"No full batch per epoch: dataset_len={dataset_len} over world_size={world_size} gives "
                f"{self.samples_per_rank} samples per rank < batch_size={batch_size} (drop_last=True)."
            )

        self._cache: tuple[int, torch.Tensor] | None = None

    # ----------------------------------------------------------------------- index math

    def indices_for_epoch(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for `epoch` (length samples_per_rank)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = self.dataset_len
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        total = self.samples_per_rank * self.world_size
        if total > n:  # pad by wrapping around, as DistributedSampler does
            reps = math.ceil(total / n)
            order = order.repeat(reps)
        order = order[:total]
        mine = order[self.rank : total : self.world_size]
        self._cache = (epoch, mine)
        return mine

    def batch(self, epoch: int, index: int) -> list[int]:
        """Batch number `index` of `epoch` for this rank."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch index {index} outside [0, {self.batches_per_epoch}).")
        idx = self.indices_for_epoch(epoch)
        return idx[index * self.batch_size : (index + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch
