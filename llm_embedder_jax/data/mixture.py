"""Which dataset each global batch comes from: a seeded, random-access schedule.

The schedule runs in cycles. A cycle holds `counts[d]` batches of dataset d,
in an order shuffled per cycle from the seed. With sizes, counts are each
dataset's full batches per epoch, so a cycle is one epoch of everything (every
record used once, as the released "epoch" organisation); with weights, counts
are the smallest integers in the ratio of the weights. Either way the
proportions hold exactly over every cycle, and step → (dataset, its own batch
number) is a pure function, so any step can be recomputed after a restart.
"""
import fractions
import math
import sys

import grain
import numpy as np


def cycle_counts(batches_per_epoch, weights=None):
    """Batches of each dataset per cycle: its batches per epoch, or its weight ratio."""
    if weights is None:
        counts = [int(n) for n in batches_per_epoch]
    else:
        if len(weights) != len(batches_per_epoch):
            raise ValueError(f"{len(weights)} weights for {len(batches_per_epoch)} datasets")
        bad = [w for w in weights if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)]
        if bad:
            raise ValueError(f"mixture weights must be positive finite numbers, got {bad}")
        ratios = [fractions.Fraction(w).limit_denominator(1000) for w in weights]
        scale = math.lcm(*(r.denominator for r in ratios))
        counts = [int(r * scale) for r in ratios]
        divisor = math.gcd(*counts)
        counts = [c // divisor for c in counts]
    if min(counts) < 1:
        raise ValueError(f"every dataset needs at least one batch per cycle, got {counts}")
    return counts


class Schedule(grain.transforms.DatasetSelectionMap):
    """Global step → (dataset index, batch number within that dataset)."""

    def __init__(self, counts, *, seed):
        self.counts = np.asarray(counts, np.int64)
        self.seed = int(seed)
        self.cycle_length = int(self.counts.sum())
        self._cached = None

    def __len__(self):
        return sys.maxsize

    def _cycle(self, cycle):
        cached = self._cached
        if cached is not None and cached[0] == cycle:
            return cached[1], cached[2]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, cycle]))
        order = rng.permutation(np.repeat(np.arange(len(self.counts)), self.counts))
        # rank[i]: how many batches of the same dataset come before position i.
        rank = np.empty_like(order)
        for dataset in range(len(self.counts)):
            positions = np.flatnonzero(order == dataset)
            rank[positions] = np.arange(len(positions))
        self._cached = (cycle, order, rank)
        return order, rank

    def __getitem__(self, step):
        cycle, position = divmod(int(step), self.cycle_length)
        order, rank = self._cycle(cycle)
        dataset = int(order[position])
        return dataset, int(cycle * self.counts[dataset] + rank[position])
