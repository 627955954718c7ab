"""A resumable, rank-sharded batch sampler for step-based training.

Epoch e uses the permutation from `torch.Generator().manual_seed(seed + e)`, so the data order is
a pure function of (seed, epoch, rank, world_size) and a resumed run only needs
{"epoch", "batch_in_epoch"} to continue with exactly the next batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

__all__ = ["ResumableSampler"]


class ResumableSampler:
    """Yields lists of dataset indices (batches) for this rank, epoch after epoch.

    Sharding follows DistributedSampler: the epoch's permutation is truncated (drop_last=True) or
    padded by wrapping around (drop_last=False) to a multiple of world_size, then rank r takes
    positions r, r + world_size, ... Within a rank, drop_last=True also drops a short final batch,
    so every rank runs the same number of equal-size steps per epoch.

    Iterating directly (`for batch in sampler`) advances the resume state as batches are handed
    out. Used as a DataLoader `batch_sampler`, the loader pulls batches ahead of the training loop
    (prefetching), so checkpoint `state_at(batches_consumed)` rather than `state_dict()`.
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

        self.epoch = 0
        self.batch_in_epoch = 0
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

    # ----------------------------------------------------------------------- iteration

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        """Infinite stream of batches from the current position."""
        while True:
            yield self._next()

    def one_epoch(self) -> Iterator[list[int]]:
        """The rest of the current epoch (epoch-based loops); afterwards the position is the next epoch."""
        start_epoch = self.epoch
        while self.epoch == start_epoch:
            yield self._next()

    def _next(self) -> list[int]:
        b = self.batch(self.epoch, self.batch_in_epoch)
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        return b

    def set_epoch(self, epoch: int) -> None:
        """DistributedSampler-style: jump to the start of `epoch`."""
        self.epoch, self.batch_in_epoch = int(epoch), 0

    # ----------------------------------------------------------------------- resume

    def state_at(self, batches_consumed: int) -> dict[str, int]:
        """Resume state after `batches_consumed` batches since epoch 0 (e.g. global step x grad accum)."""
        if batches_consumed < 0:
            raise ValueError(f"batches_consumed must be >= 0, got {batches_consumed}.")
        epoch, b = divmod(int(batches_consumed), self.batches_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": b}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        try:
            epoch, b = int(state["epoch"]), int(state["batch_in_epoch"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"Sampler state must hold integer 'epoch' and 'batch_in_epoch', got {state!r}."
            ) from e
        if epoch < 0 or not 0 <= b <= self.batches_per_epoch:
            raise ValueError(
                f"Sampler state {state!r} is out of range (batches_per_epoch={self.batches_per_epoch}); "
                "was it saved with another dataset size, batch size or world size?"
            )
        if b == self.batches_per_epoch:  # saved exactly at an epoch boundary
            epoch, b = epoch + 1, 0
        self.epoch, self.batch_in_epoch = epoch, b
