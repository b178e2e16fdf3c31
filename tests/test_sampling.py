"""Poisson sampler: inclusion rate, independence across steps, disjoint shards whose union is the 1-process batch."""

import math

import pytest
import torch

from lap2_hf.sampling import LogicalBatch, PoissonBatchSampler, steps_per_epoch


def test_steps_per_epoch_matches_paper_setting():
    assert steps_per_epoch(num_examples=67349, expected_batch_size=1024) * 3 == 198


def test_inclusion_frequency_is_q():
    n, q, steps = 200, 0.1, 500
    s = PoissonBatchSampler(num_examples=n, sample_rate=q, steps=steps, seed=5)
    sizes = [len(b) for b in s]
    counts = [0] * n
    for b in PoissonBatchSampler(num_examples=n, sample_rate=q, steps=steps, seed=5):
        for i in b:
            counts[i] += 1
    mean = sum(sizes) / steps
    # |B| ~ Binomial(N, q): mean N q = 20, sd of the average over 500 steps = sqrt(Nq(1-q)/500) = 0.19.
    assert abs(mean - n * q) < 6 * math.sqrt(n * q * (1 - q) / steps)
    assert len(set(sizes)) > 5  # the batch size is random, not fixed
    # Per-example frequency: each count ~ Binomial(500, 0.1), sd 6.7.
    assert all(abs(c - steps * q) < 6 * math.sqrt(steps * q * (1 - q)) for c in counts)


def test_empty_batches_are_yielded():
    s = PoissonBatchSampler(num_examples=10, sample_rate=0.01, steps=50, seed=0)
    batches = list(s)
    assert len(batches) == 50 and any(b == [] for b in batches)


def test_epochs_differ_and_seed_reproduces():
    s = PoissonBatchSampler(num_examples=100, sample_rate=0.3, steps=3, seed=1)
    e0 = list(s)
    assert list(s) == e0
    s.set_epoch(1)
    assert list(s) != e0


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_disjoint_and_union_is_single_process_batch(world):
    single = list(PoissonBatchSampler(num_examples=101, sample_rate=0.2, steps=20, seed=9))
    shards = [
        list(PoissonBatchSampler(num_examples=101, sample_rate=0.2, steps=20, seed=9, world_size=world, rank=r))
        for r in range(world)
    ]
    for step, batch in enumerate(single):
        parts = [set(sh[step]) for sh in shards]
        assert sum(len(p) for p in parts) == len(batch)  # nothing repeated
        assert set().union(*parts) == set(batch)  # nothing dropped


def test_physical_chunks_sorted_and_complete():
    feats = [{"input_ids": [0] * n, "i": i} for i, n in enumerate([5, 1, 9, 3, 7])]
    chunks = LogicalBatch(feats).physical_chunks(2)
    assert len(chunks) <= 3
    flat = [f["i"] for c in chunks for f in c]
    assert sorted(flat) == list(range(5))
    assert [len(f["input_ids"]) for c in chunks for f in c] == [1, 3, 5, 7, 9]
    assert all(len(c) * max(len(f["input_ids"]) for f in c) <= 2 * 9 for c in chunks)
    assert LogicalBatch([]).physical_chunks(4) == []
    # Without lengths: size-example chunks in drawn order.
    plain = LogicalBatch([{"x": i} for i in range(5)]).physical_chunks(2)
    assert [[f["x"] for f in c] for c in plain] == [[0, 1], [2, 3], [4]]


def test_short_examples_share_a_chunk_when_that_cuts_padding():
    """Six 1-token and two 8-token examples, size 4: cutting every 4 pads to 4 + 32 = 36 tokens; six short ones
    together (6 <= 4 x 8 tokens) and the two long ones pad to 6 + 16 = 22."""
    feats = [{"input_ids": [0] * n} for n in [8, 1, 1, 8, 1, 1, 1, 1]]
    chunks = LogicalBatch(feats).physical_chunks(4)
    assert [[len(f["input_ids"]) for f in c] for c in chunks] == [[1] * 6, [8, 8]]


def _brute_force_padding(lengths, size):
    """Least padded tokens over every cut of the sorted lengths into <= ceil(n/size) chunks within the bound."""
    n, bound, best = len(lengths), size * lengths[-1], None
    for mask in range(1 << (n - 1)):
        cuts = [0] + [j for j in range(1, n) if mask >> (j - 1) & 1] + [n]
        if len(cuts) - 1 > -(-n // size):
            continue
        chunks = [(b - a) * lengths[b - 1] for a, b in zip(cuts, cuts[1:])]
        if max(chunks) <= bound and (best is None or sum(chunks) < best):
            best = sum(chunks)
    return best


def test_padding_optimal_cuts_match_brute_force_and_never_lose_to_plain_cuts():
    from lap2_hf.sampling import padding_optimal_cuts

    gen = torch.Generator().manual_seed(0)
    for trial in range(150):
        n = int(torch.randint(1, 11, (1,), generator=gen))
        size = int(torch.randint(1, 5, (1,), generator=gen))
        lengths = sorted(torch.randint(1, 7, (n,), generator=gen).tolist())
        cuts = padding_optimal_cuts(lengths, size=size)
        assert cuts[0] == 0 and cuts[-1] == n and all(a < b for a, b in zip(cuts, cuts[1:]))
        chunks = [(b - a) * lengths[b - 1] for a, b in zip(cuts, cuts[1:])]
        assert len(chunks) <= -(-n // size) and max(chunks) <= size * lengths[-1]
        plain = sum(len(lengths[i : i + size]) * lengths[min(i + size, n) - 1] for i in range(0, n, size))
        assert sum(chunks) == _brute_force_padding(lengths, size) <= plain, (lengths, size, cuts)


def test_plain_cuts_are_the_fallback_above_the_candidate_limit(monkeypatch):
    """Above MAX_CUT_CANDIDATES the cutting is every ``size`` examples, the same list plain_cuts gives."""
    from lap2_hf import sampling

    assert sampling.plain_cuts(5, size=2) == [0, 2, 4, 5]
    assert sampling.plain_cuts(0, size=3) == [0]
    lengths = [1, 1, 1, 1, 1, 1, 8, 8]  # optimal: [0, 6, 8] (see the test above)
    assert sampling.padding_optimal_cuts(lengths, size=4) == [0, 6, 8]
    monkeypatch.setattr(sampling, "MAX_CUT_CANDIDATES", 1)
    assert sampling.padding_optimal_cuts(lengths, size=4) == sampling.plain_cuts(8, size=4) == [0, 4, 8]


def test_bad_arguments():
    for kw, msg in [
        ({"num_examples": 0}, "num_examples"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"rank": 2}, "rank"),
    ]:
        args = dict(num_examples=10, sample_rate=0.5, steps=1, seed=0, world_size=2, rank=0) | kw
        with pytest.raises(ValueError, match=msg):
            PoissonBatchSampler(**args)


def test_poisson_members_is_bernoulli_q_per_index():
    """Geometric gaps give the Bernoulli(q) subset law: each index in with probability q, neighbours
    independent (an off-by-one in the gaps would break the first index or adjacent pairs), |B| ~ Binomial."""
    import torch

    from lap2_hf.sampling import poisson_members

    n, q, draws = 50, 0.3, 4000
    gen = torch.Generator().manual_seed(3)
    masks = torch.zeros(draws, n)
    for d in range(draws):
        masks[d, poisson_members(gen, n, q)] = 1
    sd = math.sqrt(q * (1 - q) / draws)
    assert (masks.mean(0) - q).abs().max() < 5 * sd  # every index, the first and the last included
    pair = (masks[:, :-1] * masks[:, 1:]).mean(0)  # P(i and i+1 both in) = q^2
    assert (pair - q * q).abs().max() < 5 * math.sqrt(q * q * (1 - q * q) / draws)
    size = masks.sum(1)
    assert abs(size.var().item() - n * q * (1 - q)) < 0.15 * n * q * (1 - q)
    assert torch.equal(poisson_members(gen, 7, 1.0), torch.arange(7))


def test_poisson_members_cost_is_order_qn():
    """N = 2^40 examples at q = 1e-9: about 1,100 members, drawn without N uniforms (which would need 4 TiB)."""
    import torch

    from lap2_hf.sampling import poisson_members

    members = poisson_members(torch.Generator().manual_seed(0), 2**40, 1e-9)
    assert 900 < len(members) < 1300
    assert bool((members[1:] > members[:-1]).all()) and int(members[-1]) < 2**40
