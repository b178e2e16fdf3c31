"""Poisson-sampled logical batches, their physical chunks, and the per-process shards (docs/design.md §5, §6).

The RDP accountant assumes Poisson subsampling: at every step each of the N training examples is in the
logical batch independently with probability q, so the batch size is random (it can be 0). Fixed-size
shuffled batches, padded or repeated examples would void that analysis.

Every process draws the *same* logical batch per step from a generator keyed by (secret key, t), t the
step's index in the trainer's life (:func:`lap2_hf.rng.keyed_generator`), and keeps the included indices
of its own shard (``index % world_size == rank``). Each example's inclusion is thus
one Bernoulli(q) draw, the shards are disjoint, nothing is padded, repeated or dropped, and the union
of the processes' batches is exactly the single-process logical batch for the same seed -- which is
what makes a W-process run testable against a 1-process run. The batch is drawn by geometric gaps
between members (:func:`poisson_members`): about qN uniforms per step per process, not N (at N = 10M
drawing N uniforms cost about 40 ms a step). Because a batch depends on t only, a resumed run redraws exactly the
batches of the uninterrupted one, and a later ``train()`` (which continues t) never redraws an old one;
each batch carries its t (:class:`StepTag`, :attr:`LogicalBatch.step`) so that the trainer can refuse a
replayed batch.

Written by hand because neither torch, accelerate nor Opacus ships a Poisson batch sampler that shards
across processes without padding (Opacus' ``DistributedUniformWithReplacementSampler`` samples each
shard independently, so its batches cannot be compared with a single-process run).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .rng import check_seed, keyed_generator, seed_bytes
from .steps import steps_per_epoch, total_steps  # noqa: F401  (re-exported: the one step count)


@dataclass(frozen=True)
class StepTag:
    """Marks a logical batch with its step index t; travels through the DataLoader as a pseudo-index."""

    step: int


class PoissonBatchSampler(Sampler[list]):
    """Yields, per step, this process's share of a Poisson(q) logical batch over ``num_examples``.

    Args:
        num_examples: N, the size of the whole training set (all processes together).
        sample_rate: q in (0, 1].
        steps: logical steps per epoch (``len(self)``).
        seed: the secret key (bytes, e.g. :func:`lap2_hf.rng.stream_key`) or a non-negative integer
            seed; shared by all processes; keep it secret (the batch composition must be hidden for
            amplification by subsampling to hold).
        world_size, rank: this process's shard is ``index % world_size == rank``.
        first_step: t of the first batch of epoch 0; batch i of epoch e is step
            ``first_step + e * steps + i``.
        tag_steps: prefix each yielded list with a :class:`StepTag` (the trainer's data loader does).
    """

    def __init__(
        self,
        *,
        num_examples: int,
        sample_rate: float,
        steps: int,
        seed: int | bytes,
        world_size: int = 1,
        rank: int = 0,
        first_step: int = 0,
        tag_steps: bool = False,
    ):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if isinstance(first_step, bool) or not isinstance(first_step, int) or first_step < 0:
            raise ValueError(f"first_step must be a non-negative integer, got {first_step!r}")
        self.num_examples = int(num_examples)
        self.sample_rate = float(sample_rate)
        self.steps = int(steps)
        self.key = bytes(seed) if isinstance(seed, (bytes, bytearray)) else seed_bytes(check_seed(seed, "seed"))
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.first_step = first_step
        self.tag_steps = bool(tag_steps)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def step_index(self, i: int) -> int:
        """t of the ``i``-th batch of the current epoch."""
        return self.first_step + self.epoch * self.steps + i

    def indices(self, step: int) -> list[int]:
        """This process's share of the logical batch of step ``step``."""
        idx = poisson_members(keyed_generator(self.key, "batch", step), self.num_examples, self.sample_rate)
        if self.world_size > 1:
            idx = idx[idx % self.world_size == self.rank]
        return idx.tolist()

    def __iter__(self) -> Iterator[list]:
        for i in range(self.steps):
            t = self.step_index(i)
            idx = self.indices(t)
            yield [StepTag(t), *idx] if self.tag_steps else idx


def poisson_members(gen: torch.Generator, n: int, q: float) -> torch.Tensor:
    """The sorted indices of a Poisson(q) subset of ``range(n)``, drawn in O(qn) time.

    Instead of one uniform per example (``rand(n) < q``), draw the gaps between members: the gap from one
    member to the next (and from -1 to the first) is Geometric(q) on {1, 2, ...}, ``G = floor(log V / log(1-q))
    + 1`` with V uniform on (0, 1], since ``P(G > k) = (1-q)^k`` -- exactly the law of the first success in a
    run of independent Bernoulli(q) trials, so the subset has the same distribution (each index in with
    probability q, independently). About qn + 1 float64 uniforms instead of n float32 ones (a float32
    uniform resolves q only to 2^-24; float64 does to 2^-53).
    """
    if q >= 1:
        return torch.arange(n)
    log_keep = math.log1p(-q)  # log(1 - q) < 0
    chunk = int(n * q + 6 * math.sqrt(n * q) + 16)  # enough gaps to pass n in one draw almost always
    parts, last = [], -1
    while True:
        u = torch.rand(chunk, generator=gen, dtype=torch.float64)  # [0, 1), so 1 - u is in (0, 1]
        gaps = torch.floor(torch.log1p(-u) / log_keep).to(torch.int64) + 1  # (chunk,) Geometric(q) >= 1
        members = last + torch.cumsum(gaps, 0)  # (chunk,) increasing
        parts.append(members[members < n])
        if members[-1] >= n:
            return torch.cat(parts)
        last = int(members[-1])


@dataclass
class LogicalBatch:
    """One process's examples of one logical batch (possibly none), not yet padded or on a device.

    Deliberately not a list or a mapping: ``transformers.Trainer`` would try to move or count it.
    """

    features: list[dict[str, Any]] = field(default_factory=list)
    step: int | None = None  # t of the step this batch was drawn for (None: not from a tagged sampler)

    def physical_chunks(self, size: int, *, length_key: str = "input_ids") -> list[list[dict[str, Any]]]:
        """Split into physical chunks, sorted by length, with as little padding as the memory bound allows.

        Without ``length_key`` in the features: chunks of ``size`` examples in drawn order. With it, the
        examples are sorted by length and cut by :func:`padding_optimal_cuts` into at most ``ceil(n / size)``
        chunks (as many as ``size``-example chunks would make), each holding at most ``size x (longest length
        in this batch)`` tokens once padded -- the largest ``size``-example chunk -- so a chunk of short
        sentences may hold more than ``size`` examples. The padded total is never above that of cutting the
        sorted batch every ``size`` examples (measured on SST-2 logical batches of about 1024 and ``size``
        128: 14.96 padded tokens per example instead of 16.82).

        The order and grouping inside a drawn logical batch do not affect the guarantee (docs/design.md §5):
        every example is clipped on its own and the clipped sums are added.
        """
        if size < 1:
            raise ValueError(f"physical batch size must be >= 1, got {size}")
        feats = self.features
        if not feats or length_key not in feats[0]:
            return [feats[i : i + size] for i in range(0, len(feats), size)]
        feats = sorted(feats, key=lambda f: len(f[length_key]))
        cuts = padding_optimal_cuts([len(f[length_key]) for f in feats], size=size)
        return [feats[a:b] for a, b in zip(cuts[:-1], cuts[1:])]

    def __bool__(self) -> bool:  # an empty logical batch is still a (noise-only) step
        return True


#: Above this many candidate cut points :func:`padding_optimal_cuts` keeps the ``size``-example cuts (its
#: dynamic programme holds a square matrix of them: 2048 x 2048 float64 is 32 MiB).
MAX_CUT_CANDIDATES = 2048


def plain_cuts(n: int, *, size: int) -> list[int]:
    """Cut points ``[0, size, 2 size, ..., n]``: every ``size`` examples of a sorted batch of ``n``, the
    cutting before padding-optimal chunks and :func:`padding_optimal_cuts`' fallback."""
    return list(range(0, n, size)) + [n]


def padding_optimal_cuts(lengths: list[int], *, size: int) -> list[int]:
    """Cut points ``0 = c_0 < c_1 < ... < c_m = n`` of ascending ``lengths`` into ``m <= ceil(n / size)``
    contiguous chunks that minimise the padded tokens ``sum_k (c_k - c_{k-1}) * lengths[c_k - 1]`` subject to
    each chunk's padded tokens being at most ``B = size * lengths[-1]``.

    Exact. Exchange argument: a cut inside a run of equal lengths can move right (its chunk keeps its longest
    length, the examples it takes were padded at least as much in the next chunk) until the run ends or its
    chunk reaches the bound B. So some optimal cutting uses only run ends and *tight* cuts
    ``c_k = c_{k-1} + floor(B / lengths[c_k])`` inside a run, and the candidates are the closure of the run
    ends under that step. A dynamic programme over (number of chunks, last cut) then runs on an ``R x R`` cost
    matrix of the R candidates (about 70 for SST-2 batches). Above :data:`MAX_CUT_CANDIDATES` the plain
    ``size``-example cuts are kept. Written by hand: no library partitions a batch for least padding under a
    chunk bound.
    """
    n = len(lengths)
    if n == 0:
        return [0]
    plain = plain_cuts(n, size=size)
    bound = size * lengths[-1]
    starts = [0] + [j for j in range(1, n) if lengths[j] != lengths[j - 1]]  # run starts
    runs = list(zip(starts, starts[1:] + [n]))  # [start, end) of each run of equal lengths
    cands, frontier = set(), set(starts) | {n}
    while frontier and len(cands) <= MAX_CUT_CANDIDATES:
        cands |= frontier
        new = set()
        for i in frontier:
            for r0, r1 in runs:
                j = i + bound // lengths[r0]
                if r0 < j < r1 and j not in cands:  # a tight cut strictly inside this run
                    new.add(j)
        frontier = new
    if len(cands) > MAX_CUT_CANDIDATES:
        return plain
    cands = sorted(cands)
    pos = np.asarray(cands)  # (R,) ascending, pos[0] = 0, pos[-1] = n
    longest = np.asarray(lengths)[np.maximum(pos - 1, 0)]  # (R,) longest length of a chunk ending at pos
    count = pos[None, :] - pos[:, None]  # (R, R): examples in the chunk (pos[a], pos[b]]
    cost = (count * longest[None, :]).astype(np.float64)
    cost[(count <= 0) | (cost > bound)] = np.inf
    best = np.full(len(pos), np.inf)
    best[0] = 0.0
    choices = []  # per chunk count: the previous cut of the best way to reach each candidate
    finals = []
    for _ in range(len(plain) - 1):
        total = best[:, None] + cost  # (R, R)
        choices.append(total.argmin(axis=0))
        best = total.min(axis=0)
        finals.append(best[-1])
    m = int(np.argmin(finals))  # ties: fewest chunks
    cuts, b = [len(pos) - 1], len(pos) - 1
    for k in range(m, -1, -1):
        b = int(choices[k][b])
        cuts.append(b)
    return [int(pos[b]) for b in reversed(cuts)]


def collate_logical(features: list) -> dict[str, LogicalBatch]:
    """Wrap the fetched examples in a :class:`LogicalBatch`, taking the step from a leading :class:`StepTag`."""
    step = None
    if features and isinstance(features[0], StepTag):
        step, features = features[0].step, features[1:]
    return {"logical_batch": LogicalBatch(list(features), step=step)}


class _TaggedDataset(torch.utils.data.Dataset):
    """Passes :class:`StepTag` pseudo-indices through to the collate function; everything else to ``dataset``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return index if isinstance(index, StepTag) else self.dataset[index]

    def __getitems__(self, indices: list) -> list:
        tags = [i for i in indices if isinstance(i, StepTag)]
        rest = [i for i in indices if not isinstance(i, StepTag)]
        if not rest:
            return tags
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(rest) if getitems is not None else [self.dataset[i] for i in rest]
        return tags + list(items)


class PoissonDataLoader(DataLoader):
    """A DataLoader over a :class:`PoissonBatchSampler` that forwards ``set_epoch`` (the Trainer calls it)."""

    def __init__(self, dataset, batch_sampler: PoissonBatchSampler, **kwargs):
        super().__init__(_TaggedDataset(dataset), batch_sampler=batch_sampler, collate_fn=collate_logical, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)
