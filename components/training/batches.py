"""batches: the train step's data side, the prepared splits as uint8 batches on the device.

Reads `paths.prepared` (the arrays of components.data.dataset); writes nothing. `load_images`
decides whether train+val live on the training device (they fit `train.device_data_mb`) or stream
from the memory-mapped arrays, and hands back one `Images` per split; the loop in components.train
asks them for batches by index (`rows`) or by position (`span`).

Under DDP (components.training.ddp) every rank loads the same splits and reads only the rows of its
own share: `epoch_order` is the same shuffled order on every rank and `share` cuts each global batch
into one piece per rank.

With `train.sampler: balanced`, `BalancedOrder` replaces `epoch_order`: each epoch is as many
indices as the split has images (epochs keep their length and cost), drawn with replacement so
that every class present is drawn equally often (to within one). It is a function of (seed,
epoch) and the labels alone, like `epoch_order`, so every rank draws the same epoch and takes its
share of it, a resumed run draws what the uninterrupted one did, and resident and streamed data
see the same indices (a streamed batch reads a repeated row twice).

    from components.training.batches import load_images
    train_data, val_data = load_images("data/prepared", torch.device("cpu"),
                                       torch.contiguous_format, budget_mb=4096)
"""

from __future__ import annotations

import numpy as np
import torch

from components.core.params import UserError
from components.data.dataset import Split, load_split


class Images:
    """One split as uint8 N×C×H×W batches and int64 labels on the training device.

    Resident (it fits train.device_data_mb): copied to the device once, batches are index slices.
    Otherwise each batch is read from the memory map, rows in ascending order so reads go
    forward, and copied over (pinned, asynchronously, on a GPU).
    """

    def __init__(self, split: Split, device: torch.device, fmt, resident: bool):
        self.n, self.device, self.fmt, self.resident = len(split.y), device, fmt, resident
        self.y = torch.from_numpy(np.asarray(split.y)).to(device)
        if resident:
            # N×H×W×C permuted to N×C×H×W is already channels_last in memory.
            x = torch.from_numpy(np.array(split.x)).to(device).permute(0, 3, 1, 2)
            self.x = x.contiguous(memory_format=fmt)
        else:
            self.x = split.x
        self.index_device = device if resident else torch.device("cpu")

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.resident:
            return self.x[idx], self.y[idx]
        idx = idx.sort().values
        return self._upload(self.x[idx.numpy()]), self.y[idx.to(self.device)]

    def span(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.resident:
            return self.x[start:stop], self.y[start:stop]
        return self._upload(self.x[start:stop]), self.y[start:stop]

    def _upload(self, rows: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(rows))  # a copy: memory-map slices are read-only
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return x.contiguous(memory_format=self.fmt)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch`: the same on every rank, and on a resumed run."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=g)


class BalancedOrder:
    """`(seed, epoch) -> indices` of a class-balanced epoch of `labels` (see the module doc)."""

    def __init__(self, labels: np.ndarray):
        labels = np.asarray(labels)
        self.n = len(labels)
        # Members of each class present, in index order: the draw depends on nothing else.
        self.groups = [torch.from_numpy(np.flatnonzero(labels == c)) for c in np.unique(labels)]

    def __call__(self, seed: int, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        k = len(self.groups)
        per_class = torch.full((k,), self.n // k, dtype=torch.int64)
        per_class[torch.randperm(k, generator=g)[: self.n % k]] += 1  # the remainder, at random
        drawn = [members[torch.randint(len(members), (int(m),), generator=g)]
                 for members, m in zip(self.groups, per_class, strict=True)]
        order = torch.cat(drawn)
        return order[torch.randperm(self.n, generator=g)]


def epoch_seed(seed: int, epoch: int, rank: int | None = None) -> int:
    """A seed for (seed, epoch[, rank]), mixed so that nearby inputs give unrelated streams."""
    words = [seed, epoch] if rank is None else [seed, epoch, rank, 1]
    return int(np.random.SeedSequence(words).generate_state(1)[0])  # 32 bits: numpy's limit


def share(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s part of a global batch of indices: contiguous, sizes differing by <= 1."""
    return batch if world == 1 else torch.tensor_split(batch, world)[rank]


def part(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous part of n rows (validation: each rank scores its own)."""
    return range(n * rank // world, n * (rank + 1) // world)


def load_images(prepared, device: torch.device, fmt, budget_mb: int) -> tuple[Images, Images]:
    """(train, val) of the prepared data; resident when both fit `budget_mb` together."""
    train_split, val_split = (load_split(prepared, s) for s in ("train", "val"))
    if len(train_split.y) == 0:
        raise UserError(f"{prepared}: the train split is empty; prepare more data")
    resident = train_split.x.nbytes + val_split.x.nbytes <= budget_mb * 2**20
    return (Images(train_split, device, fmt, resident), Images(val_split, device, fmt, resident))
