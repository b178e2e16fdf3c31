"""The clipping engine against exact references: a loop over single examples, and Opacus."""

import re

import pytest
import torch
from conftest import padded_batch, per_example_loss, tiny_model
from torch import nn

from lap2_hf.clipping import GradClipper, UnsupportedLayerError

ARCHS = ["bert", "roberta", "gpt2", "llama"]


def _single(batch, i):
    """Example i alone, without its padding (the microbatch reference sees no pad tokens)."""
    keep = batch["attention_mask"][i].bool()
    return {k: (v[i : i + 1][:, keep] if v.dim() == 2 else v[i : i + 1]) for k, v in batch.items()}


def loop_reference(model, batch, norm="l2"):
    """Exact per-sample gradients (flattened over trainable parameters) from B single-example passes."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad(set_to_none=True)
        per_example_loss(model, _single(batch, i)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    model.zero_grad(set_to_none=True)
    grads = torch.stack(grads)
    return grads, grads.norm(p=1 if norm == "l1" else 2, dim=1)


def engine_result(model, batch, clip_norm, norm="l2", **kw):
    clipper = GradClipper(model, clip_norm=clip_norm, norm=norm, **kw)
    with clipper.capture(batch_size=batch["input_ids"].shape[0]):
        per_example_loss(model, batch).sum().backward()
    norms = clipper.clip_and_accumulate()
    summed = clipper.pop_summed()
    flat = torch.cat([summed[p].flatten() for p in clipper.params])
    clipper.detach()
    return norms, flat


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_norms_and_clipped_sum_match_loop(arch, norm):
    model = tiny_model(arch).double().train()
    batch = padded_batch(4, 9, pad=1 if arch == "roberta" else 0)
    grads, ref_norms = loop_reference(model, batch, norm)
    clip_norm = float(ref_norms.median())  # some samples clipped, some not
    norms, summed = engine_result(model, batch, clip_norm, norm)
    assert torch.allclose(norms, ref_norms, rtol=1e-5, atol=0)
    factors = (clip_norm / ref_norms).clamp(max=1)
    assert (factors < 1).any() and (factors == 1).any()
    assert _rel(summed, (factors[:, None] * grads).sum(0)) < 1e-5


def test_tied_weights_sum_before_norm():
    """GPT-2 ties wte to lm_head: the norm is of the summed contribution (not the sum of norms)."""
    model = tiny_model("gpt2").double().train()
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = padded_batch(3, 7)
    _, ref = loop_reference(model, batch)
    norms, _ = engine_result(model, batch, 1.0)
    assert torch.allclose(norms, ref, rtol=1e-6)


def test_position_ids_broadcast_keep_per_sample_gradients():
    """BERT feeds position ids of shape (1, T); each sample must still get its own gradient."""
    model = tiny_model("bert").double().train()
    for name, p in model.named_parameters():
        p.requires_grad_("position_embeddings" in name)
    batch = padded_batch(4, 9)
    grads, ref = loop_reference(model, batch)
    norms, summed = engine_result(model, batch, 1e9)
    assert torch.allclose(norms, ref, rtol=1e-6)
    assert _rel(summed, grads.sum(0)) < 1e-8


@pytest.mark.parametrize("arch", ARCHS)
def test_ghost_and_instantiated_paths_agree_with_loop(arch, monkeypatch):
    """instantiate_memory_ratio=0 takes the Gram form everywhere, a huge ratio instantiates every layer whose
    FLOPs favour it (and reuses the per-sample gradients for the clipped sum): both equal the loop."""
    from lap2_hf.clipping import contributions

    kinds = []
    orig = contributions.clipped_sum

    def spy(contribs, *a, **k):
        kinds.extend(type(c).__name__ for c in contribs)
        return orig(contribs, *a, **k)

    monkeypatch.setattr("lap2_hf.clipping.engine.clipped_sum", spy)
    model = tiny_model(arch).double().train()
    batch = padded_batch(4, 9, pad=1 if arch == "roberta" else 0)
    grads, ref = loop_reference(model, batch)
    clip = float(ref.median())
    factors = (clip / ref).clamp(max=1)
    for ratio in (0.0, 1e9):
        kinds.clear()
        norms, summed = engine_result(model, batch, clip, instantiate_memory_ratio=ratio)
        assert torch.allclose(norms, ref, rtol=1e-8)
        assert _rel(summed, (factors[:, None] * grads).sum(0)) < 1e-8
        n_factored = kinds.count("Factored")
        if ratio == 0:
            ghost_factored = n_factored
        else:  # every Linear / Conv1D weight at T = 9 and hidden 32 is cheaper instantiated, and reused
            assert n_factored < ghost_factored
    assert ghost_factored > 0


def test_memory_ratio_is_checked():
    model = tiny_model("bert")
    for bad in (-1.0, float("inf"), float("nan"), "1", True):
        with pytest.raises(ValueError, match=r"instantiate_memory_ratio.*" + re.escape(repr(bad))):
            GradClipper(model, clip_norm=1.0, instantiate_memory_ratio=bad)


@pytest.mark.parametrize("arch", ["roberta", "llama"])
def test_lora_only_adapters_are_clipped(arch):
    peft = pytest.importorskip("peft")
    base = tiny_model(arch).double()
    task = "SEQ_CLS" if arch == "roberta" else "CAUSAL_LM"
    targets = ["query", "value"] if arch == "roberta" else ["q_proj", "v_proj"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task, lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg).train()
    # LoRA-B starts at zero, so give the adapters values for a non-trivial test.
    for n, p in model.named_parameters():
        if "lora_" in n:
            nn.init.normal_(p, std=0.1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n or "score" in n for n in trainable)
    batch = padded_batch(4, 9, pad=1 if arch == "roberta" else 0)
    grads, ref = loop_reference(model, batch)
    norms, summed = engine_result(model, batch, float(ref.median()))
    assert torch.allclose(norms, ref, rtol=1e-5)
    factors = (float(ref.median()) / ref).clamp(max=1)
    assert _rel(summed, (factors[:, None] * grads).sum(0)) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_every_trainable_parameter_is_covered(arch):
    model = tiny_model(arch)
    clipper = GradClipper(model, clip_norm=1.0)
    covered = {id(p) for tap in clipper.taps for p in tap.params.values()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert covered == trainable
    assert clipper.num_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    clipper.detach()


def test_frozen_parameters_are_ignored():
    model = tiny_model("bert")
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("classifier"))
    clipper = GradClipper(model, clip_norm=1.0)
    assert clipper.num_trainable == sum(p.numel() for p in model.classifier.parameters())
    assert len(clipper.taps) == 1


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3)
        self.mha = nn.MultiheadAttention(4, 1, batch_first=True)


def test_unsupported_layers_raise_with_list():
    with pytest.raises(UnsupportedLayerError) as err:
        GradClipper(_Conv(), clip_norm=1.0)
    msg = str(err.value)
    assert "conv (Conv1d): weight, bias" in msg and "mha (MultiheadAttention)" in msg
    assert "emb" not in msg.split("\n", 1)[1]  # the covered embedding is not listed


def test_subclass_overriding_forward_is_not_trusted():
    class Weird(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(UnsupportedLayerError, match="Weird"):
        GradClipper(nn.Sequential(Weird(3, 3)), clip_norm=1.0)


def test_gradient_outside_rules_is_detected():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x) + x @ self.lin.weight.t()  # weight used outside its forward

    model = Sneaky()
    clipper = GradClipper(model, clip_norm=1.0)
    with pytest.raises(RuntimeError, match="outside the clipping rules"):
        with clipper.capture(batch_size=2):
            model(torch.randn(2, 3)).sum().backward()


def test_bad_arguments():
    model = tiny_model("bert")
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="clip_norm"):
            GradClipper(model, clip_norm=bad)
    with pytest.raises(ValueError, match="norm"):
        GradClipper(model, clip_norm=1.0, norm="l3")
    with pytest.raises(TypeError, match="nn.Module"):
        GradClipper("model", clip_norm=1.0)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        GradClipper(model, clip_norm=1.0)


def test_detach_restores_plain_training():
    model = tiny_model("bert").double()
    batch = padded_batch(2, 5)
    clipper = GradClipper(model, clip_norm=1.0)
    clipper.detach()
    per_example_loss(model, batch).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 0)


def test_accumulates_over_physical_batches():
    model = tiny_model("bert").double().train()
    batch = padded_batch(6, 9)
    grads, ref = loop_reference(model, batch)
    clipper = GradClipper(model, clip_norm=0.5)
    for lo, hi in ((0, 2), (2, 6)):
        chunk = {k: v[lo:hi] for k, v in batch.items()}
        with clipper.capture(batch_size=hi - lo):
            per_example_loss(model, chunk).sum().backward()
        clipper.clip_and_accumulate()
    summed = torch.cat([g.flatten() for g in clipper.pop_summed().values()])
    assert _rel(summed, ((0.5 / ref).clamp(max=1)[:, None] * grads).sum(0)) < 1e-8


def test_eval_forward_is_untouched():
    model = tiny_model("bert").eval()
    batch = padded_batch(2, 5)
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    clipper = GradClipper(model, clip_norm=1.0)
    with torch.no_grad():
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(before, after)
    clipper.detach()


class _OpacusNet(nn.Module):
    """A model both Opacus and the engine support: Embedding, LayerNorm, Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.lin = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        h = torch.tanh(self.lin(self.norm(self.emb(ids))))  # (B, T, 16)
        return self.head(h.mean(1))  # (B, 3)


def test_agrees_with_opacus_per_sample_gradients():
    from opacus import GradSampleModule

    torch.manual_seed(1)
    net = _OpacusNet().double()
    ids = torch.randint(0, 50, (5, 7))
    y = torch.randint(0, 3, (5,))
    gsm = GradSampleModule(net, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(ids), y, reduction="sum").backward()
    opacus_norms = torch.cat([p.grad_sample.flatten(1) for p in net.parameters()], 1).norm(dim=1)
    gsm._close()
    net.zero_grad(set_to_none=True)
    for p in net.parameters():
        p.grad_sample = None
    clipper = GradClipper(net, clip_norm=1.0)
    with clipper.capture(batch_size=5):
        nn.functional.cross_entropy(net(ids), y, reduction="none").sum().backward()
    norms = clipper.clip_and_accumulate()
    assert torch.allclose(norms, opacus_norms, rtol=1e-8)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_bf16_autocast_matches_fp32_norms(arch):
    """Under bf16 autocast the norms agree with the fp32 engine to bf16 precision; sums stay float32."""
    model = tiny_model(arch).train()
    batch = padded_batch(4, 9)
    ref_norms, _ = engine_result(model, batch, 1.0)
    clipper = GradClipper(model, clip_norm=1.0)
    with clipper.capture(batch_size=4), torch.autocast("cpu", dtype=torch.bfloat16):
        per_example_loss(model, batch).float().sum().backward()
    norms = clipper.clip_and_accumulate()
    summed = clipper.pop_summed()
    clipper.detach()
    assert all(s.dtype == torch.float32 for s in summed.values())
    assert torch.allclose(norms, ref_norms, rtol=5e-2)


def test_clipped_sums_carry_no_autograd_graph():
    """Sums built from kept activations must not hold a graph (it would keep every activation alive)."""
    model = tiny_model("bert").train()
    batch = padded_batch(3, 7)
    clipper = GradClipper(model, clip_norm=1.0)
    with clipper.capture(batch_size=3):
        per_example_loss(model, batch).sum().backward()
    norms = clipper.clip_and_accumulate()
    summed = clipper.pop_summed()
    clipper.detach()
    assert not norms.requires_grad
    assert all(not s.requires_grad and s.grad_fn is None for s in summed.values())


def test_cost_rule_crossovers_match_closed_form():
    """ghost_is_cheaper against the multiply-add counts solved by hand (MiniLM's layer shapes)."""
    from lap2_hf.clipping.contributions import ghost_is_cheaper

    big = 1e9  # memory no object: FLOPs alone
    # 384 x 384, norm + clipped sum: T^2 * 769 + T pd <= T pd + 2 pd  <=>  T^2 <= 294912 / 769  <=>  T <= 19.
    assert ghost_is_cheaper(seq_len=19, rows=384, cols=384, memory_ratio=big)
    assert not ghost_is_cheaper(seq_len=20, rows=384, cols=384, memory_ratio=big)
    # 1536 x 384: T^2 * 1921 <= 1179648  <=>  T <= 24.
    assert ghost_is_cheaper(seq_len=24, rows=1536, cols=384, memory_ratio=big)
    assert not ghost_is_cheaper(seq_len=25, rows=1536, cols=384, memory_ratio=big)
    # Default memory ratio 1: p d <= T (p + d)  <=>  T >= 192 (384 x 384) and T >= 308 (1536 x 384).
    assert ghost_is_cheaper(seq_len=191, rows=384, cols=384)
    assert not ghost_is_cheaper(seq_len=192, rows=384, cols=384)
    assert ghost_is_cheaper(seq_len=307, rows=1536, cols=384)
    assert not ghost_is_cheaper(seq_len=308, rows=1536, cols=384)
    # Ratio 2 (memory up to twice the factors): 147456 <= 2 * 768 T  <=>  T >= 96.
    assert ghost_is_cheaper(seq_len=95, rows=384, cols=384, memory_ratio=2)
    assert not ghost_is_cheaper(seq_len=96, rows=384, cols=384, memory_ratio=2)
    # Ratio 0: the Gram form everywhere.
    assert ghost_is_cheaper(seq_len=512, rows=384, cols=384, memory_ratio=0)
    # A word embedding at T = 512 is cheaper to instantiate by FLOPs (35.4M vs 101.4M multiply-adds), but its
    # (30522 x 384) gradient per sample is 60x the kept factors: memory keeps it on the Gram form.
    assert not ghost_is_cheaper(seq_len=512, rows=30522, cols=384, indexed=True, memory_ratio=big)
    assert ghost_is_cheaper(seq_len=512, rows=30522, cols=384, indexed=True)
    # A token-type table (2 x 384): T^2 * 386 + 384 T <= 384 T + 2304  <=>  T <= 2.
    assert ghost_is_cheaper(seq_len=2, rows=2, cols=384, indexed=True, memory_ratio=big)
    assert not ghost_is_cheaper(seq_len=3, rows=2, cols=384, indexed=True, memory_ratio=big)


def test_long_sequences_take_both_branches_and_match_loop(monkeypatch):
    """At T = 20 the tiny BERT's 32 x 32 projections are instantiated and its 64 x 32 ones ghost-normed:
    norms and clipped sum still equal the per-example loop."""
    from lap2_hf.clipping import contributions

    calls = {"ghost": 0, "instantiate": 0}
    inner, inst = contributions._pair_inner, contributions.instantiate

    def count(kind, fn):
        def wrapped(*a, **k):
            calls[kind] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(contributions, "_pair_inner", count("ghost", inner))
    monkeypatch.setattr(contributions, "instantiate", count("instantiate", inst))
    model = tiny_model("bert").double().train()
    batch = padded_batch(4, 20)
    grads, ref = loop_reference(model, batch)
    clip = float(ref.median())
    norms, summed = engine_result(model, batch, clip)
    assert calls["ghost"] > 0 and calls["instantiate"] > 0
    assert torch.allclose(norms, ref, rtol=1e-8)
    factors = (clip / ref).clamp(max=1)
    assert _rel(summed, (factors[:, None] * grads).sum(0)) < 1e-8


def test_layers_reading_one_input_share_its_gram():
    """Three Linear layers on one input (like Q, K, V) and one on another: two input Grams, exact norms."""

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.o = nn.Linear(16, 16)

        def forward(self, x):
            h = torch.tanh(self.q(x)) * self.k(x) + self.v(x)  # (B, T, 16)
            return self.o(h).sum(dim=(1, 2))  # (B,)

    torch.manual_seed(0)
    model = QKV().double()
    x = torch.randn(5, 3, 16, dtype=torch.double)  # T = 3: every weight takes the Gram form
    clipper = GradClipper(model, clip_norm=1e9)
    with clipper.capture(batch_size=5):
        model(x).sum().backward()
    assert clipper.gram_cache.computed == 2
    norms = clipper.clip_and_accumulate()
    clipper.detach()
    ref = []
    for i in range(5):
        model.zero_grad()
        model(x[i : i + 1]).sum().backward()
        ref.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    assert torch.allclose(norms, torch.stack(ref), rtol=1e-10)


def test_gram_cache_misses_on_another_or_changed_tensor():
    from lap2_hf.clipping.contributions import GramCache

    cache = GramCache()
    a = torch.randn(2, 3, 4)
    g1 = cache.right_gram(a)
    assert cache.right_gram(a.detach()) is g1 and cache.computed == 1  # same storage and view
    b = a.clone()
    cache.right_gram(b)
    assert cache.computed == 2
    b.mul_(2)  # in place: same storage, new version
    assert torch.allclose(cache.right_gram(b), b @ b.transpose(1, 2)) and cache.computed == 3
    cache.right_gram(b[:, :2])  # a view of other shape
    assert cache.computed == 4


def test_factored_l1_norms_match_instantiated_gradients_bit_for_bit():
    """The reused-buffer L1 path gives exactly ``instantiate(c).abs().sum()``, also for a last chunk of
    another size (13 = 8 + 5) and in float64."""
    from lap2_hf.clipping.contributions import Factored, instantiate, l1_norms

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        c = Factored(
            torch.randn(13, 5, 7, generator=gen, dtype=dtype), torch.randn(13, 5, 3, generator=gen, dtype=dtype), 7
        )
        got = l1_norms([c], torch.Size([7, 3]), chunk=8)
        grads = instantiate(c, torch.Size([7, 3]))
        # instantiate itself against a per-example loop of outer products (an independent reference).
        loop = torch.stack([sum(torch.outer(c.left[b, t], c.right[b, t]) for t in range(5)) for b in range(13)])
        torch.testing.assert_close(grads, loop)
        want = grads.flatten(1).abs().sum(1)
        assert got.dtype == dtype and torch.equal(got, want)
        # The factors are left as they were (the buffer is made absolute in place, not the inputs).
        assert (c.left < 0).any() and (c.right < 0).any()
