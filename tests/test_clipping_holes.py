"""Issue 12, holes 5 and 7: non-finite examples, and modules whose batch dimension is not per-example.

Every check is against an exact reference: a loop over single examples (only the finite ones for hole 5).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, lap2_args, padded_batch, per_example_loss, tiny_model, toy_dataset
from torch import nn

from lap2_hf.clipping import BATCH_SHARED_EMBEDDINGS, GradClipper, UnsupportedLayerError


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _flat_grads(params):
    return torch.cat([p.grad.flatten() for p in params])


# -- hole 5: an example with a non-finite loss or norm contributes nothing ---------------------------------


def _mse(model, batch):
    """(B,) squared errors of a one-output regression head, in float32 as Lap2Trainer computes them."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return F.mse_loss(logits.squeeze(-1), batch["labels"].float(), reduction="none")


def _single(batch, i):
    keep = batch["attention_mask"][i].bool()
    return {k: (v[i : i + 1][:, keep] if v.dim() == 2 else v[i : i + 1]) for k, v in batch.items()}


def _loop(model, batch, indices, loss_fn, norm="l2"):
    """Exact per-example gradients (B', n) and norms (B',) of the examples ``indices``, one at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in indices:
        model.zero_grad(set_to_none=True)
        loss_fn(model, _single(batch, i)).sum().backward()
        grads.append(_flat_grads(params))
    model.zero_grad(set_to_none=True)
    grads = torch.stack(grads)
    return grads, grads.norm(p=1 if norm == "l1" else 2, dim=1)


BAD = 2  # index of the outlier in a batch of 5


def _outlier_case(kind):
    """(labels with the outlier, loss function applied in the engine's pass)."""
    batch = padded_batch(5, 9)
    labels = batch["labels"].float()
    loss_fn = _mse
    if kind == "label_1e25":  # (pred - 1e25)^2 overflows float32: loss inf, gradient -2e25, norm^2 inf
        labels[BAD] = 1e25
    elif kind == "label_inf":  # loss inf, gradient -inf, norms nan
        labels[BAD] = float("inf")
    elif kind == "nan_loss":  # NaN loss and NaN gradient

        def loss_fn(model, b):
            weight = torch.ones(b["labels"].shape[0])
            weight[BAD] = float("nan")
            return _mse(model, b) * weight
    elif kind == "nan_loss_finite_grad":  # NaN loss, finite gradient: only the loss tells

        def loss_fn(model, b):
            shift = torch.zeros(b["labels"].shape[0])
            shift[BAD] = float("nan")
            return _mse(model, b) + shift

    batch["labels"] = labels
    return batch, loss_fn


@pytest.mark.parametrize(
    "kind, pass_losses, norm",
    [
        ("label_1e25", True, "l2"),
        ("label_1e25", False, "l2"),
        ("label_inf", True, "l2"),
        ("label_inf", False, "l2"),
        ("label_inf", True, "l1"),
        ("nan_loss", True, "l2"),
        ("nan_loss", False, "l2"),
        ("nan_loss_finite_grad", True, "l2"),
    ],
)
@pytest.mark.parametrize("memory_ratio", [1.0, 1e9])  # 1e9: per-sample gradients instantiated and reused
def test_nonfinite_example_contributes_nothing(kind, pass_losses, norm, memory_ratio):
    torch.manual_seed(0)
    model = tiny_model("bert", num_labels=1).train()  # float32: where a 1e25 label overflows
    batch, loss_fn = _outlier_case(kind)
    finite = [i for i in range(5) if i != BAD]
    ref_model = copy.deepcopy(model).double()
    grads, ref_norms = _loop(ref_model, batch, finite, _mse, norm)
    clip_norm = float(ref_norms.median())  # some of the finite examples clipped, some not

    clipper = GradClipper(model, clip_norm=clip_norm, norm=norm, instantiate_memory_ratio=memory_ratio)
    with clipper.capture(batch_size=5):
        losses = loss_fn(model, batch)
        losses.sum().backward()
    assert not torch.isfinite(losses[BAD])
    norms = clipper.clip_and_accumulate(losses=losses) if pass_losses else clipper.clip_and_accumulate()
    summed = torch.cat([g.flatten() for g in clipper.pop_summed().values()])
    clipper.detach()

    assert torch.isfinite(summed).all()
    assert norms[BAD] == math.inf and clipper.num_nonfinite == 1
    assert torch.allclose(norms[finite].double(), ref_norms, rtol=1e-4)
    factors = (clip_norm / ref_norms).clamp(max=1)
    assert (factors < 1).any() and (factors == 1).any()
    assert _rel(summed.double(), (factors[:, None] * grads).sum(0)) < 1e-4


def test_all_examples_nonfinite_give_a_zero_sum():
    model = tiny_model("bert", num_labels=1).train()
    batch = padded_batch(3, 7)
    batch["labels"] = torch.full((3,), float("inf"))
    clipper = GradClipper(model, clip_norm=1.0)
    with clipper.capture(batch_size=3):
        losses = _mse(model, batch)
        losses.sum().backward()
    norms = clipper.clip_and_accumulate(losses=losses)
    summed = clipper.pop_summed()
    clipper.detach()
    assert torch.isinf(norms).all() and clipper.num_nonfinite == 3
    assert all(torch.equal(s, torch.zeros_like(s)) for s in summed.values())


def test_losses_of_the_wrong_shape_are_refused():
    model = tiny_model("bert", num_labels=1).train()
    batch = padded_batch(3, 7)
    clipper = GradClipper(model, clip_norm=1.0)
    with clipper.capture(batch_size=3):
        losses = _mse(model, batch)
        losses.sum().backward()
    with pytest.raises(ValueError, match=r"one entry per example, shape \(3,\), got \(\)"):
        clipper.clip_and_accumulate(losses=losses.sum())
    clipper.detach()


@pytest.mark.parametrize("outlier", [1e25, float("inf"), "nan_loss"])
def test_trainer_step_with_nonfinite_example_is_the_step_without_it(tmp_path, outlier):
    """q = 1, noise ~0: the update is -lr * sum over the *finite* examples of c_i g_i / N, finite, and the
    left-out example is counted in the logs. "nan_loss": a NaN loss with a finite gradient (only the loss
    tells), so this case needs the trainer to hand the losses to the engine."""
    from transformers import DataCollatorWithPadding

    from lap2_hf import Lap2Trainer

    n, bad, clip, lr, marker = 12, 5, 0.05, 0.5, 7.0
    ds, tok = toy_dataset(n)
    labels = [float(v) for v in ds["label"]]
    labels[bad] = marker if outlier == "nan_loss" else outlier
    ds = ds.remove_columns(["label"]).add_column("label", labels)

    class NanLossTrainer(Lap2Trainer):
        def compute_per_example_loss(self, model, batch):
            losses = super().compute_per_example_loss(model, batch)  # (B,)
            return losses + torch.where(batch["labels"] == marker, float("nan"), 0.0)

    torch.manual_seed(0)
    model = tiny_model("bert", num_labels=1)
    before = copy.deepcopy(model)
    args = lap2_args(
        tmp_path,
        per_device_train_batch_size=4,
        learning_rate=lr,
        dp_seed=1,
        dp_mechanism="gaussian",
        dp_noise_multiplier=1e-12,
        dp_clip_norm=clip,
        dp_expected_batch_size=n,
        dp_delta=1e-3,
        dp_log_private_stats=True,  # count is logged
    )
    collator = DataCollatorWithPadding(tok)
    cls = NanLossTrainer if outlier == "nan_loss" else Lap2Trainer
    tr = cls(model=model, args=args, train_dataset=ds, data_collator=collator)
    tr.train()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.isfinite(after).all()
    assert tr.state.log_history[0]["dp_nonfinite_examples"] == 1

    # Reference: the finite examples one at a time, clipped, summed, divided by q N = n.
    params = list(before.parameters())
    total = torch.zeros_like(after)
    for i in range(n):
        if i == bad:
            continue
        row = {k: v for k, v in ds[i].items() if k in ("input_ids", "attention_mask", "token_type_ids", "label")}
        b = collator([row])
        before.zero_grad(set_to_none=True)
        logits = before(**{k: v for k, v in b.items() if k != "labels"}).logits.float().squeeze(-1)
        F.mse_loss(logits, b["labels"].float(), reduction="sum").backward()
        g = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten() for p in params])
        total += g * min(1.0, clip / g.norm().item())
    expected = torch.cat([p.detach().flatten() for p in params]) - lr * total / n
    assert torch.allclose(after, expected, atol=1e-6, rtol=1e-4)


# -- hole 7: batch-shared embeddings (T5 relative attention bias) -------------------------------------------


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(cfg)


def _t5_loss(model, batch):
    """(B,) summed target-token cross-entropy of a seq2seq example."""
    labels = batch["labels"]
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=model._shift_right(labels),
    ).logits
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100).sum(1)


def _t5_batch(size, seq_len):
    batch = padded_batch(size, seq_len)
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(3, VOCAB, (size, seq_len), generator=gen)
    for i in range(size):
        labels[i, max(1, seq_len - 1 - i) :] = -100  # targets of different lengths
    batch["labels"] = labels
    return batch


def _t5_single(batch, i):
    keep = batch["attention_mask"][i].bool()
    return {
        "input_ids": batch["input_ids"][i : i + 1, keep],
        "attention_mask": batch["attention_mask"][i : i + 1, keep],
        "labels": batch["labels"][i : i + 1],
    }


@pytest.mark.parametrize("norms_trainable", [True, False])
def test_t5_trainable_relative_attention_bias_is_refused(norms_trainable):
    model = tiny_t5()
    for name, p in model.named_parameters():
        if "layer_norm" in name:
            p.requires_grad_(norms_trainable)
    with pytest.raises(UnsupportedLayerError) as err:
        GradClipper(model, clip_norm=1.0)
    msg = str(err.value)
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias (Embedding, (8, 4))" in msg
    assert "decoder.block.0.layer.0.SelfAttention.relative_attention_bias" in msg
    assert "shared by the whole batch" in msg and "requires_grad_(False)" in msg


def test_t5_with_frozen_relative_bias_is_exact_when_seq_len_equals_chunk():
    """The reviewer's trap: source length == target length == chunk size (6). Everything else trainable
    (tied shared embedding / LM head, T5LayerNorm, attention, feed-forward): exact against the loop."""
    torch.manual_seed(0)
    model = tiny_t5().double().train()
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[0].endswith(tuple(BATCH_SHARED_EMBEDDINGS)):
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _t5_batch(6, 6)
    grads = []
    for i in range(6):
        model.zero_grad(set_to_none=True)
        _t5_loss(model, _t5_single(batch, i)).sum().backward()
        grads.append(_flat_grads(params))
    model.zero_grad(set_to_none=True)
    grads = torch.stack(grads)
    ref = grads.norm(dim=1)
    clip_norm = float(ref.median())

    clipper = GradClipper(model, clip_norm=clip_norm)
    with clipper.capture(batch_size=6):
        _t5_loss(model, batch).sum().backward()
    norms = clipper.clip_and_accumulate()
    summed = clipper.pop_summed()
    clipper.detach()
    flat = torch.cat([summed[p].flatten() for p in params])
    assert torch.allclose(norms, ref, rtol=1e-6)
    factors = (clip_norm / ref).clamp(max=1)
    assert _rel(flat, (factors[:, None] * grads).sum(0)) < 1e-6


class _SharedBuckets(nn.Module):
    """A toy relative-position bias under a name not in BATCH_SHARED_EMBEDDINGS: ids (T, T), shared."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.rel = nn.Embedding(7, 1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 1)

    def forward(self, ids):  # (B, T) -> (B,)
        pos = torch.arange(ids.shape[1])
        buckets = (pos[None, :] - pos[:, None]).clamp(-3, 3) + 3  # (T, T), the same for every example
        h = self.emb(ids)  # (B, T, 8)
        att = torch.softmax(h @ h.transpose(1, 2) + self.rel(buckets).squeeze(-1), -1)  # (B, T, T)
        return self.head(att @ h).sum((1, 2))


def test_embedding_with_batch_shared_ids_is_refused_in_the_forward():
    model = _SharedBuckets()
    ids = torch.randint(0, VOCAB, (3, 5))
    clipper = GradClipper(model, clip_norm=1.0)
    expected = r"rel: nn.Embedding called with ids of shape \(5, 5\).*rel\.weight\.requires_grad_\(False\)"
    with pytest.raises(UnsupportedLayerError, match=expected):
        with clipper.capture(batch_size=3):
            model(ids)  # refused before any gradient exists
    clipper.detach()


def test_norm_layer_over_batch_shared_input_is_refused():
    class SharedTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(5, 8), requires_grad=False)  # (T, 8), no batch
            self.norm = nn.LayerNorm(8)

        def forward(self, x):  # (B, T, 8)
            return (x * self.norm(self.table)).sum((1, 2))

    model = SharedTable()
    clipper = GradClipper(model, clip_norm=1.0)
    with pytest.raises(UnsupportedLayerError, match=r"norm \(LayerNorm\): input of shape \(5, 8\)"):
        with clipper.capture(batch_size=3):
            model(torch.randn(3, 5, 8))
    clipper.detach()


def test_position_ids_broadcast_still_exact_when_seq_len_equals_batch():
    """(1, T) position ids are expanded to (B, T); with T == B nothing is mistaken for a shared table."""
    model = tiny_model("bert").double().train()
    for name, p in model.named_parameters():
        p.requires_grad_("position_embeddings" in name or "word_embeddings" in name or "classifier" in name)
    batch = padded_batch(7, 7)
    grads, ref = _loop(model, batch, range(7), per_example_loss)
    clipper = GradClipper(model, clip_norm=float(ref.median()))
    with clipper.capture(batch_size=7):
        per_example_loss(model, batch).sum().backward()
    norms = clipper.clip_and_accumulate()
    summed = torch.cat([g.flatten() for g in clipper.pop_summed().values()])
    clipper.detach()
    assert torch.allclose(norms, ref, rtol=1e-8)
    factors = (float(ref.median()) / ref).clamp(max=1)
    params = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in clipper.params] == [id(p) for p in params]
    assert _rel(summed, (factors[:, None] * grads).sum(0)) < 1e-8


# -- hole 7: modules that mix examples (BatchNorm) ------------------------------------------------------------


class _NormNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.lin = nn.Linear(8, 8)
        self.bn = norm
        self.head = nn.Linear(8, 2)

    def forward(self, ids):  # (B, T) -> (B, 2)
        h = self.lin(self.emb(ids).mean(1))  # (B, 8)
        return self.head(torch.tanh(self.bn(h)))


def _bn_loss(model, batch):
    return F.cross_entropy(model(batch["input_ids"]), batch["labels"], reduction="none")


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.BatchNorm1d(8),
        lambda: nn.SyncBatchNorm(8),
        lambda: nn.BatchNorm1d(8, affine=False),
        lambda: nn.InstanceNorm1d(8, track_running_stats=True),  # updates running stats from the batch
    ],
    ids=["BatchNorm1d", "SyncBatchNorm", "BatchNorm1d-no-affine", "InstanceNorm1d-running-stats"],
)
def test_batch_mixing_module_in_train_mode_is_refused_at_setup(make, trainable):
    norm = make()
    model = _NormNet(norm).train()
    for p in norm.parameters():
        p.requires_grad_(trainable)
    with pytest.raises(UnsupportedLayerError) as err:
        GradClipper(model, clip_norm=1.0)
    msg = str(err.value)
    assert f"bn ({type(norm).__name__}):" in msg and "mix the examples" in msg
    assert "GroupNorm" in msg and "eval mode" in msg


def test_batch_norm_without_running_stats_is_refused_even_in_eval_mode():
    model = _NormNet(nn.BatchNorm1d(8, track_running_stats=False)).eval()
    model.bn.requires_grad_(False)
    with pytest.raises(UnsupportedLayerError, match=r"bn \(BatchNorm1d\): has no running statistics"):
        GradClipper(model, clip_norm=1.0)


def test_batch_norm_put_back_in_train_mode_is_refused_at_capture():
    """Set up with the BatchNorm in eval mode; model.train() (Lap2Trainer calls it every step) flips it back."""
    model = _NormNet(nn.BatchNorm1d(8)).eval()
    model.bn.requires_grad_(False)
    clipper = GradClipper(model, clip_norm=1.0)
    model.train()
    running = model.bn.running_mean.clone()
    with pytest.raises(UnsupportedLayerError, match=r"bn \(BatchNorm1d\): normalises with the statistics"):
        with clipper.capture(batch_size=4):
            _bn_loss(model, padded_batch(4, 6)).sum().backward()
    assert torch.equal(model.bn.running_mean, running)  # refused before any forward
    clipper.detach()


def test_frozen_batch_norm_in_eval_mode_is_exact():
    torch.manual_seed(0)
    model = _NormNet(nn.BatchNorm1d(8)).double()
    with torch.no_grad():  # non-trivial running statistics
        model.train()(torch.randint(0, VOCAB, (16, 6)))
    model.eval()
    model.bn.requires_grad_(False)
    batch = padded_batch(5, 6)
    grads, ref = _loop(model, {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}, range(5), _bn_loss)
    clipper = GradClipper(model, clip_norm=float(ref.median()))
    with clipper.capture(batch_size=5):
        _bn_loss(model, batch).sum().backward()
    norms = clipper.clip_and_accumulate()
    summed = torch.cat([g.flatten() for g in clipper.pop_summed().values()])
    clipper.detach()
    assert torch.allclose(norms, ref, rtol=1e-8)
    factors = (float(ref.median()) / ref).clamp(max=1)
    assert _rel(summed, (factors[:, None] * grads).sum(0)) < 1e-8
