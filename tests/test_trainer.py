"""Lap2Trainer end to end on tiny models: equivalences, the exact noised update, resume, LoRA, refusals."""

import math

import pytest
import torch
from conftest import flat_params, lap2_args, lap2_trainer, tiny_model, toy_dataset
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from lap2_hf import Lap2Trainer
from lap2_hf.clipping import GradClipper, UnsupportedLayerError
from lap2_hf.mechanisms import Mechanism
from lap2_hf.rng import keyed_generator, stream_key
from lap2_hf.sampling import PoissonBatchSampler, steps_per_epoch


def test_no_noise_huge_clip_equals_plain_trainer_step(tmp_path):
    """q = 1 (the whole set every step), noise ~0, C huge: DP-SGD is full-batch SGD on the mean loss."""
    n = 24
    torch.manual_seed(0)
    m1 = tiny_model("bert")
    m2 = tiny_model("bert")
    m2.load_state_dict(m1.state_dict())
    dp = lap2_trainer(
        tmp_path,
        m1,
        n=n,
        dp_mechanism="gaussian",
        dp_noise_multiplier=1e-12,
        dp_clip_norm=1e4,
        dp_expected_batch_size=n,
        dp_delta=1e-3,
        per_device_train_batch_size=10,
        dp_log_private_stats=True,
    )
    dp.train()
    ds, tok = toy_dataset(n)
    plain = Trainer(
        model=m2,
        args=TrainingArguments(
            output_dir=str(tmp_path / "plain"),
            per_device_train_batch_size=n,
            learning_rate=0.1,
            optim="sgd",
            lr_scheduler_type="constant",
            max_steps=1,
            max_grad_norm=0.0,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=ds,
        data_collator=DataCollatorWithPadding(tok),
    )
    plain.train()
    a, b = flat_params(m1), flat_params(m2)
    assert (a - b).abs().max().item() < 2e-6
    assert dp.state.log_history[0]["dp_batch_size"] == n


def test_dp_update_equals_engine_reference_plus_seeded_noise(tmp_path):
    torch.manual_seed(1)
    model = tiny_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = lap2_trainer(
        tmp_path,
        model,
        n=40,
        dp_mechanism="lap2",
        dp_noise_multiplier=0.5,
        dp_clip_norm=0.05,
        dp_expected_batch_size=10,
        learning_rate=1.0,
        per_device_train_batch_size=3,
        dp_log_private_stats=True,
    )
    tr.train()
    # Reference: the same Poisson draw, a clipped sum from the engine on a fresh copy, the same noise stream
    # (step 0 of the stream keyed by dp_seed=123).
    key = stream_key(123)
    batch_idx = next(iter(PoissonBatchSampler(num_examples=40, sample_rate=0.25, steps=4, seed=key)))
    ref_model = tiny_model("bert")
    ref_model.load_state_dict(before)
    ds, tok = toy_dataset(40)
    feats = [{k: v for k, v in ds[i].items() if k != "text"} for i in batch_idx]
    batch = DataCollatorWithPadding(tok)(feats)
    clipper = GradClipper(ref_model, clip_norm=0.05)
    with clipper.capture(batch_size=len(batch_idx)):
        out = ref_model(**{k: v for k, v in batch.items() if k != "labels"})
        torch.nn.functional.cross_entropy(out.logits, batch["labels"], reduction="none").sum().backward()
    clipper.clip_and_accumulate()
    summed = clipper.pop_summed()
    Mechanism("lap2", noise=0.5, clip_norm=0.05).add_noise(summed, generator=keyed_generator(key, "noise", 0))
    for name, p in model.named_parameters():
        expected = before[name] - summed[dict(ref_model.named_parameters())[name]] / 10
        assert torch.allclose(p.detach(), expected, atol=1e-5, rtol=1e-4), name
    assert tr.state.log_history[0]["dp_batch_size"] == len(batch_idx)


def test_epsilon_logged_and_within_target(tmp_path):
    tr = lap2_trainer(
        tmp_path, dp_mechanism="gaussian", dp_target_epsilon=3.0, max_steps=-1, num_train_epochs=2, logging_steps=1
    )
    out = tr.train()
    eps = [h["epsilon"] for h in tr.state.log_history if "learning_rate" in h]  # one log per step
    assert len(eps) == tr.plan.steps == 2 * steps_per_epoch(num_examples=48, expected_batch_size=16)
    assert all(a < b for a, b in zip(eps, eps[1:]))  # grows every step
    assert out.metrics["epsilon"] <= 3.0 and out.metrics["epsilon"] > 2.9
    assert tr.plan.delta == pytest.approx(1 / 96)


def test_logged_grad_norm_is_the_noised_gradient(tmp_path):
    """HF logs ``grad_norm`` by default (README: what is logged). It must be the norm of the gradient the
    optimizer receives, noise included (a function of the private release), not of the clipped sum: at sigma
    1000 the noise norm is far above C, which bounds the norm of the clipped mean for |B| <= expected batch."""
    from transformers import TrainerCallback

    seen = []

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            grads = [p.grad.flatten() for p in tr.model.parameters() if p.grad is not None]
            seen.append(torch.cat(grads).norm().item())

    tr = lap2_trainer(tmp_path, dp_mechanism="gaussian", dp_noise_multiplier=1000.0, dp_clip_norm=1.0, max_steps=2)
    tr.add_callback(Record())
    tr.train()
    logged = [h["grad_norm"] for h in tr.state.log_history if "grad_norm" in h]
    assert len(logged) == len(seen) == 2
    assert logged == pytest.approx(seen, rel=1e-5)
    assert min(logged) > 100.0  # noise norm about 1000 * C / 16 * sqrt(n); the clipped mean is at most 3 C here


def test_budget_stop_before_exceeding_target(tmp_path, monkeypatch):
    """If the noise were too small for the planned steps, training stops before overspending."""
    import lap2_hf.trainer as trainer_mod

    real = trainer_mod.calibrate_noise
    monkeypatch.setattr(trainer_mod, "calibrate_noise", lambda **kw: 0.7 * real(**kw))
    tr = lap2_trainer(tmp_path, dp_mechanism="lap2", dp_target_epsilon=2.0, max_steps=12, logging_steps=1)
    tr.train()
    assert tr.state.global_step < 12
    assert tr.privacy_spent() <= 2.0


def test_resume_gives_same_epsilon_and_weights(tmp_path):
    kw = dict(dp_mechanism="lap2", dp_target_epsilon=4.0, max_steps=4, save_strategy="steps", save_steps=2)
    torch.manual_seed(3)
    init = tiny_model("bert").state_dict()
    full_model = tiny_model("bert")
    full_model.load_state_dict(init)
    full = lap2_trainer(tmp_path / "a", full_model, **kw)
    full.train()
    part_model = tiny_model("bert")
    part_model.load_state_dict(init)
    first = lap2_trainer(tmp_path / "b", part_model, **kw)
    first.train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-2"
    assert (ckpt / "privacy_state.json").is_file()
    resumed_model = tiny_model("bert")
    resumed_model.load_state_dict(init)
    resumed = lap2_trainer(tmp_path / "b", resumed_model, **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.accountant.steps == full.accountant.steps == 4
    assert resumed.privacy_spent() == pytest.approx(full.privacy_spent(), rel=1e-12)
    assert torch.allclose(flat_params(resumed_model), flat_params(full_model), atol=1e-6)


def test_resume_refuses_changed_privacy_settings(tmp_path):
    kw = dict(dp_mechanism="lap2", dp_target_epsilon=4.0, max_steps=2, save_strategy="steps", save_steps=2)
    lap2_trainer(tmp_path, **kw).train()
    other = lap2_trainer(tmp_path, **(kw | {"dp_clip_norm": 2.0}))
    with pytest.raises(ValueError, match="clip_norm"):
        other.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lm_trains_with_tied_weights(tmp_path, arch):
    ds, tok = toy_dataset(32)
    ds = ds.remove_columns(["label"])
    from transformers import DataCollatorForLanguageModeling

    model = tiny_model(arch)
    tr = Lap2Trainer(
        model=model,
        args=lap2_args(
            tmp_path, dp_mechanism="gaussian", dp_target_epsilon=5.0, max_steps=2, dp_log_private_stats=True
        ),
        train_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )
    before = flat_params(model).clone()
    out = tr.train()
    assert math.isfinite(out.training_loss) and out.metrics["epsilon"] <= 5.0
    assert not torch.equal(before, flat_params(model))


def test_lora_only_adapters_are_trained_and_noised(tmp_path):
    import peft

    model = peft.get_peft_model(
        tiny_model("roberta"), peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tr = lap2_trainer(tmp_path, model, dp_mechanism="lap2", dp_target_epsilon=3.0, max_steps=2)
    tr.train()
    assert tr.plan.dim == trainable < sum(p.numel() for p in model.parameters()) / 5
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_none_mechanism_is_non_private_and_infinite_epsilon(tmp_path):
    tr = lap2_trainer(tmp_path, dp_mechanism="none", max_steps=2)
    out = tr.train()
    assert out.metrics["epsilon"] == math.inf and tr.clipper is None


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dp_noise_multiplier=1.0, max_grad_norm=1.0), "max_grad_norm"),
        (dict(dp_noise_multiplier=1.0, gradient_accumulation_steps=2), "gradient_accumulation_steps"),
        (dict(dp_target_epsilon=1.0, dp_noise_multiplier=1.0), "exactly one"),
        (dict(), "exactly one"),
        (dict(dp_mechanism="none", dp_target_epsilon=1.0), "without privacy"),
        (dict(dp_mechanism="gauss", dp_noise_multiplier=1.0), "dp_mechanism"),
        (dict(dp_noise_multiplier=-1.0), "dp_noise_multiplier"),
        (dict(dp_target_epsilon=0.0), "dp_target_epsilon"),
        (dict(dp_noise_multiplier=1.0, dp_clip_norm=0.0), "dp_clip_norm"),
        (dict(dp_noise_multiplier=1.0, dp_delta=1.0), "dp_delta"),
        (dict(dp_noise_multiplier=1.0, dp_expected_batch_size=0), "dp_expected_batch_size"),
        (dict(dp_noise_multiplier=1.0, gradient_checkpointing=True), "gradient_checkpointing"),
        (dict(dp_noise_multiplier=1.0, dp_task="regression"), "dp_task"),
    ],
)
def test_rejected_arguments(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        lap2_args(tmp_path, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dp_noise_multiplier=1.0, dp_delta=0.05), "dp_delta"),  # >= 1/N for N = 48
        (dict(dp_noise_multiplier=1.0, dp_expected_batch_size=100), "exceeds"),
        (dict(dp_target_epsilon=1e-6, dp_delta=1e-10), "target"),
    ],
)
def test_rejected_before_training(tmp_path, kw, match):
    model = tiny_model("bert")
    before = flat_params(model).clone()
    tr = lap2_trainer(tmp_path, model, dp_mechanism="lap2", **kw)
    with pytest.raises(ValueError, match=match):
        tr.train()
    assert torch.equal(before, flat_params(model))


def test_plain_training_arguments_and_unsupported_layers_refused(tmp_path):
    ds, tok = toy_dataset(8)
    with pytest.raises(TypeError, match="Lap2TrainingArguments"):
        Lap2Trainer(
            model=tiny_model("bert"),
            args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
            train_dataset=ds,
        )

    class WithConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = tiny_model("bert")
            self.conv = torch.nn.Conv1d(2, 2, 1)

        def forward(self, **kw):
            return self.bert(**kw)

    tr = lap2_trainer(tmp_path, WithConv(), dp_mechanism="gaussian", dp_noise_multiplier=1.0)
    with pytest.raises(UnsupportedLayerError, match="conv"):
        tr.train()


def test_bf16_autocast_training_keeps_float32_noise_and_weights(tmp_path):
    model = tiny_model("bert")
    tr = lap2_trainer(
        tmp_path, model, dp_mechanism="lap2", dp_target_epsilon=3.0, max_steps=2, bf16=True, dp_log_private_stats=True
    )
    before = flat_params(model).clone()
    dtypes = []
    model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    out = tr.train()
    assert dtypes and dtypes[0] == torch.bfloat16  # autocast was on during the private step
    assert math.isfinite(out.training_loss) and out.metrics["epsilon"] <= 3.0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(before, flat_params(model))
