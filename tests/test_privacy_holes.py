"""Regression tests for the privacy holes of issue 12 (review of commit 1e224b1).

Each test drives the trainer (or CLI) the way the reviewer did and checks the behaviour that must hold:
privacy set up on the model actually trained, epsilon accumulating over train() calls, no replayed
batches or noise, nothing unnoised in logs or checkpoints, seeds with more than 32 bits, no fp16, one
step count shared by the trainer and the CLI.
"""

import copy
import json
import math
import pickle

import pytest
import torch
from conftest import flat_params, lap2_args, lap2_trainer, run_cli, tiny_model, toy_dataset


# -- hole 8: fp16 ------------------------------------------------------------------------------------
def test_fp16_refused_pointing_to_bf16(tmp_path):
    with pytest.raises(ValueError, match=r"fp16=True.*bf16=True"):
        lap2_args(tmp_path, dp_noise_multiplier=1.0, fp16=True)


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_pushing_checkpoints_to_the_hub_is_refused(tmp_path, strategy):
    """These strategies upload checkpoint folders, and with them the stream key (privacy_noise_rng.pt)."""
    with pytest.raises(ValueError, match=f"hub_strategy='{strategy}'"):
        lap2_args(tmp_path, dp_noise_multiplier=1.0, push_to_hub=True, hub_strategy=strategy)
    lap2_args(tmp_path, dp_noise_multiplier=1.0, push_to_hub=True, hub_strategy="end")  # the model only: allowed


# -- hole 3: ignore_data_skip ------------------------------------------------------------------------
def test_ignore_data_skip_refused(tmp_path):
    with pytest.raises(ValueError, match="ignore_data_skip"):
        lap2_args(tmp_path, dp_noise_multiplier=1.0, ignore_data_skip=True)


# -- hole 9: one step count for the CLI and the trainer ----------------------------------------------
def test_cli_epochs_count_steps_as_the_trainer(capsys):
    """N = 8000, B = 256, 3 epochs: the trainer runs 3 * ceil(8000/256) = 96 steps; the CLI must say 96 (not 94)."""
    from lap2_hf.sampling import total_steps

    rc, out, err = run_cli(
        capsys,
        "calibrate",
        "--mechanism",
        "gaussian",
        "--epsilon",
        "1",
        "--delta",
        "1e-5",
        "--batch-size",
        "256",
        "--num-examples",
        "8000",
        "--epochs",
        "3",
        "--json",
    )
    assert rc == 0, err
    assert json.loads(out)["steps"] == 96 == total_steps(num_examples=8000, expected_batch_size=256, epochs=3)
    assert total_steps(num_examples=8000, expected_batch_size=256, epochs=3, max_steps=7) == 7


def test_noise_calibrated_by_cli_meets_target_in_trainer(tmp_path, capsys):
    """N = 40, B = 16, 4 epochs: the trainer runs 12 steps (Poisson expectation ceil(4 / 0.4) = 10)."""
    rc, out, err = run_cli(
        capsys,
        "calibrate",
        "--mechanism",
        "gaussian",
        "--epsilon",
        "2",
        "--delta",
        "0.01",
        "--batch-size",
        "16",
        "--num-examples",
        "40",
        "--epochs",
        "4",
        "--json",
    )
    assert rc == 0, err
    noise = json.loads(out)["noise"]
    tr = lap2_trainer(
        tmp_path,
        n=40,
        dp_mechanism="gaussian",
        dp_noise_multiplier=noise,
        dp_delta=0.01,
        num_train_epochs=4,
        max_steps=-1,
        learning_rate=0.0,
    )
    tr.train()
    assert tr.accountant.steps == 12
    assert tr.privacy_spent() <= 2.0


@pytest.mark.parametrize(
    "argv",
    [
        # delta >= 1/N once N is known
        ["--batch-size", "10", "--num-examples", "100", "--delta", "0.02", "--steps", "5"],
        # epochs without N cannot be counted as the trainer counts them
        ["--sample-rate", "0.1", "--delta", "1e-5", "--epochs", "3"],
    ],
)
def test_cli_refuses_large_delta_and_epochs_without_n(capsys, argv):
    rc, out, err = run_cli(capsys, "calibrate", "--mechanism", "gaussian", "--epsilon", "1", *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("lap2-hf: error: ")


# -- hole 1: model_init / hyperparameter_search / every step checks the model -------------------------
def _fresh_bert():
    torch.manual_seed(11)  # the same initial weights every call, so the test can rebuild them
    return tiny_model("bert")


def test_model_init_trains_the_model_privately(tmp_path):
    """With model_init, Trainer.train builds a new model: that one must be clipped and noised. C = 1e-4 and
    noise ~0 bound the update by lr |B| C / B (|B| <= N); the raw gradient would move it by O(1)."""
    lr, clip, n, b = 1.0, 1e-4, 48, 16
    tr = lap2_trainer(
        tmp_path,
        model_init=_fresh_bert,
        n=n,
        dp_mechanism="gaussian",
        dp_noise_multiplier=1e-9,
        dp_clip_norm=clip,
        dp_expected_batch_size=b,
        dp_delta=1e-3,
        learning_rate=lr,
    )
    tr.train()
    assert tr.clipper.model is tr.model
    step = flat_params(tr.model) - flat_params(_fresh_bert())
    assert 0 < step.norm().item() <= lr * n * clip / b * (1 + 1e-3)


def test_every_step_checks_the_clipper_covers_the_model(tmp_path):
    from lap2_hf.sampling import LogicalBatch

    tr = lap2_trainer(tmp_path, dp_mechanism="gaussian", dp_noise_multiplier=1.0)
    tr.train()
    ds, _ = toy_dataset(48)
    feats = [{k: v for k, v in ds[i].items() if k != "text"} for i in range(4)]
    nxt = tr.accountant.steps

    # The same (clipped) model, but one more trainable tensor than privacy was set up for.
    tr.model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="trainable parameters changed"):
        tr.training_step(tr.model, {"logical_batch": LogicalBatch(feats, step=nxt)})
    tr.model.bert.embeddings.word_embeddings.weight.requires_grad_(True)

    # A model swapped in after set-up (what model_init did): never stepped without privacy.
    tr.model = tr.model_wrapped = tiny_model("bert")
    before = flat_params(tr.model).clone()
    with pytest.raises(RuntimeError, match="not attached to the model being trained"):
        tr.training_step(tr.model, {"logical_batch": LogicalBatch(feats, step=nxt)})
    assert all(p.grad is None for p in tr.model.parameters()) and torch.equal(before, flat_params(tr.model))


def test_hyperparameter_search_trials_are_private_runs_of_their_own(tmp_path, monkeypatch):
    """Each trial: a model from model_init, clipped; its own accountant (2 steps, not 2 per earlier trial
    too) and its own key; a trial's settings (here the learning rate and the clip norm) are used."""
    import transformers.integrations
    from transformers.hyperparameter_search import ALL_HYPERPARAMETER_SEARCH_BACKENDS
    from transformers.trainer_utils import BestRun, HPSearchBackend

    seen = []

    class FakeBackend:  # stands in for optuna / ray (not installed): runs two trials through train(trial=...)
        name = "wandb"

        def ensure_available(self):
            pass

        default_hp_space = staticmethod(lambda trial: {})

        def run(self, trainer, n_trials, direction, **kwargs):
            for trial in ({"learning_rate": 0.05, "dp_clip_norm": 0.5}, {"learning_rate": 0.2, "dp_clip_norm": 2.0}):
                trainer.train(trial=trial)
                seen.append(
                    dict(
                        covers=trainer.clipper.model is trainer.model,
                        steps=trainer.accountant.steps,
                        eps=trainer.privacy_spent(),
                        key=trainer._stream.key,
                        clip=trainer.plan.clip_norm,
                        model=trainer.model,
                    )
                )
            return BestRun("1", 0.0, {})

    monkeypatch.setitem(ALL_HYPERPARAMETER_SEARCH_BACKENDS, HPSearchBackend.WANDB, FakeBackend)
    monkeypatch.setattr(transformers.integrations, "hp_params", lambda trial: dict(trial))
    tr = lap2_trainer(tmp_path, model_init=_fresh_bert, dp_mechanism="gaussian", dp_target_epsilon=2.0, max_steps=2)
    monkeypatch.setattr(tr, "_get_output_dir", lambda trial: tr.args.output_dir)  # HF asks the backend for a run id
    tr.hyperparameter_search(backend="wandb", n_trials=2)
    assert [s["covers"] for s in seen] == [True, True]
    assert [s["steps"] for s in seen] == [2, 2]
    assert all(1.9 < s["eps"] <= 2.0 for s in seen)
    assert seen[0]["key"] != seen[1]["key"] and seen[0]["model"] is not seen[1]["model"]
    assert [s["clip"] for s in seen] == [0.5, 2.0]


def test_trial_settings_are_validated_again(tmp_path, monkeypatch):
    """hyperparameter_search sets fields with setattr, past __post_init__: an unsafe one is still refused."""
    tr = lap2_trainer(tmp_path, model_init=_fresh_bert, dp_mechanism="gaussian", dp_noise_multiplier=1.0)
    tr.args.max_grad_norm = 1.0
    with pytest.raises(ValueError, match="max_grad_norm"):
        tr.train()


# -- hole 2: a second train() --------------------------------------------------------------------------
class _GradRecorder:
    """Callback recording the classifier's gradient (noise dominated when C is tiny) before every update."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        grads = self.grads = []

        class CB(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kw):
                grads.append(trainer.model.classifier.weight.grad.detach().clone())

        trainer.add_callback(CB())


def test_second_train_accumulates_epsilon_and_never_repeats_noise(tmp_path):
    """3 + 3 steps report the epsilon of 6 steps (the review: 2.432 reported, 3.537 true), and with a fixed
    dp_seed the second call draws fresh noise (C = 1e-8: the gradient is the noise)."""
    from lap2_hf.accounting import epsilon_for

    tr = lap2_trainer(
        tmp_path,
        dp_mechanism="gaussian",
        dp_noise_multiplier=1.0,
        dp_clip_norm=1e-8,
        dp_delta=1e-3,
        max_steps=3,
        learning_rate=0.0,
    )
    rec = _GradRecorder(tr)
    tr.train()
    tr.train()
    assert tr.accountant.steps == 6
    six, _ = epsilon_for(mechanism="gaussian", noise=1.0, delta=1e-3, sample_rate=16 / 48, steps=6)
    assert tr.privacy_spent() == pytest.approx(six, rel=1e-12)
    assert len(rec.grads) == 6
    for i in range(6):
        for j in range(i):
            assert not torch.allclose(rec.grads[i], rec.grads[j], rtol=1e-3, atol=0), (
                i,
                j,
            )  # lr = 0: a replay is equal


def test_second_train_with_spent_budget_is_refused(tmp_path):
    tr = lap2_trainer(tmp_path, dp_mechanism="gaussian", dp_target_epsilon=2.0, max_steps=2)
    tr.train()
    spent = tr.privacy_spent()
    before = flat_params(tr.model).clone()
    with pytest.raises(ValueError, match=r"dp_target_epsilon=2.0 bounds everything this trainer trains.*2 steps"):
        tr.train()
    assert torch.equal(before, flat_params(tr.model)) and tr.privacy_spent() == spent


def test_second_train_gets_the_rest_of_the_budget(tmp_path):
    """First call: 2 steps at a noise fixed by hand; the second, by target, must fit both in the target."""
    tr = lap2_trainer(tmp_path, dp_mechanism="gaussian", dp_noise_multiplier=3.0, max_steps=2)
    tr.train()
    first = tr.privacy_spent()
    tr.args.dp_noise_multiplier, tr.args.dp_target_epsilon = None, 2.0
    tr.train()
    assert tr.accountant.steps == 4 and tr.plan.prior_steps == 2
    assert first < tr.privacy_spent() <= 2.0


def test_resume_refused_on_a_trainer_that_already_trained(tmp_path):
    tr = lap2_trainer(
        tmp_path, dp_mechanism="gaussian", dp_noise_multiplier=1.0, max_steps=2, save_strategy="steps", save_steps=1
    )
    tr.train()
    with pytest.raises(ValueError, match="already taken 2 private steps"):
        tr.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))


# -- hole 3 (at run time): a replayed batch is refused --------------------------------------------------
def test_replayed_batch_is_refused(tmp_path):
    from lap2_hf.sampling import LogicalBatch

    tr = lap2_trainer(tmp_path, dp_mechanism="gaussian", dp_noise_multiplier=1.0, max_steps=2)
    tr.train()
    ds, _ = toy_dataset(48)
    feats = [{k: v for k, v in ds[i].items() if k != "text"} for i in range(4)]
    with pytest.raises(RuntimeError, match="replayed"):
        tr.training_step(tr.model, {"logical_batch": LogicalBatch(feats, step=0)})
    assert tr.accountant.steps == 2


# -- hole 4: unnoised statistics are not released by default --------------------------------------------
PRIVATE_KEYS = ("loss", "train_loss", "dp_batch_size", "dp_clipped_fraction", "dp_nonfinite_examples")


def _logged_run(tmp_path, **kw):
    from transformers import TrainerCallback

    reported = []

    class Integration(TrainerCallback):  # what report_to integrations and the progress bar receive
        def on_log(self, args, state, control, logs=None, **k):
            reported.append(dict(logs))

    tr = lap2_trainer(
        tmp_path, dp_mechanism="lap2", dp_noise_multiplier=1.0, max_steps=2, save_strategy="steps", save_steps=2, **kw
    )
    tr.add_callback(Integration())
    out = tr.train()
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    return out, tr.state.log_history, saved, reported


def test_default_run_releases_no_unnoised_statistics(tmp_path):
    out, history, saved, reported = _logged_run(tmp_path)
    for logs in (history, saved, reported):
        step_logs = [h for h in logs if "learning_rate" in h]
        assert len(step_logs) == 2 and all("epsilon" in h for h in step_logs)
        assert not any(k in h for h in logs for k in PRIVATE_KEYS), logs
    assert math.isnan(out.training_loss) and "train_loss" not in out.metrics and "epsilon" in out.metrics


def test_opt_in_logs_the_private_statistics(tmp_path):
    out, history, saved, reported = _logged_run(tmp_path, dp_log_private_stats=True)
    for logs in (history, saved, reported):
        step_logs = [h for h in logs if "learning_rate" in h]
        assert all(k in h for h in step_logs for k in ("loss", "dp_batch_size", "dp_clipped_fraction", "epsilon"))
    assert math.isfinite(out.training_loss) and math.isfinite(out.metrics["train_loss"])


def _holds(obj, secret: int) -> bool:
    """Whether a pickle of ``obj`` contains ``secret`` (pickle writes big ints as little-endian bytes)."""
    blob = pickle.dumps(obj)
    return secret.to_bytes((secret.bit_length() + 8) // 8, "little", signed=True) in blob


def test_saved_model_and_report_to_never_hold_the_seed(tmp_path):
    """training_args.bin (written beside every saved model and checkpoint, and pushed to the Hub with them) and
    the arguments every report_to integration logs used to carry dp_seed, from which the noise is recomputed."""
    from lap2_hf.config import REDACTED_SEED

    secret = 0xD1CE_5EED_0123_4567_89AB_CDEF_0246_8ACE_1357_9BDF
    tr = lap2_trainer(tmp_path, dp_seed=secret, dp_noise_multiplier=1.0, save_strategy="steps", save_steps=1)
    tr.train()
    tr.save_model(str(tmp_path / "final"))
    for path in (tmp_path / "final" / "training_args.bin", tmp_path / "out" / "checkpoint-1" / "training_args.bin"):
        saved = torch.load(path, weights_only=False)
        assert saved.dp_seed == REDACTED_SEED and not _holds(saved, secret)
        assert str(secret) not in path.read_bytes().decode("latin-1")
    assert tr.args.to_dict()["dp_seed"] == REDACTED_SEED and str(secret) not in tr.args.to_json_string()
    # In-process copies keep it (Trainer internals and hyperparameter search copy arguments).
    assert copy.deepcopy(tr.args).dp_seed == secret and copy.copy(tr.args).privacy.seed == secret
    # A loaded copy cannot train under a seed it does not have: refused by name.
    with pytest.raises(ValueError, match="dp_seed"):
        saved.validate_privacy()


# -- hole 6: seeds with more than 32 bits; the secure generator ----------------------------------------
def test_cpu_manual_seed_keeps_only_32_bits():
    """The reviewer's claim, checked: why seeds never go through manual_seed."""
    a = torch.randn(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, torch.randn(4, generator=torch.Generator().manual_seed(5 + 2**32)))


@pytest.mark.parametrize("offset", [2**32, 2**64, 2**127])
def test_seeds_differing_above_32_bits_give_different_noise(tmp_path, offset):
    """C = 1e-8, sigma = 1e6: the gradient is the noise. Seeds s and s + 2^32 gave identical noise before the fix."""
    seeds = (123456789, 123456789 + offset)
    grads = []
    for i, seed in enumerate(seeds):
        tr = lap2_trainer(
            tmp_path / str(i),
            dp_mechanism="gaussian",
            dp_noise_multiplier=1e6,
            dp_clip_norm=1e-8,
            dp_delta=1e-3,
            dp_seed=seed,
            learning_rate=0.0,
        )
        rec = _GradRecorder(tr)
        tr.train()
        grads.append(rec.grads[0])
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3, atol=0)


def test_keyed_streams_depend_on_every_bit_of_the_key():
    from lap2_hf.rng import keyed_generator, stream_key
    from lap2_hf.sampling import PoissonBatchSampler

    s = 2**200 + 12345
    noise = [torch.randn(64, generator=keyed_generator(stream_key(x), "noise", 0)) for x in (s, s + 2**32, s ^ 2**199)]
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.equal(noise[0], torch.randn(64, generator=keyed_generator(stream_key(s), "noise", 0)))  # reproducible
    batches = [
        list(PoissonBatchSampler(num_examples=200, sample_rate=0.5, steps=2, seed=stream_key(x)))
        for x in (s, s + 2**32)
    ]
    assert batches[0] != batches[1]
    # The state is derived from the whole key, not from a 32-bit seed: the generator's seed field is unused.
    assert keyed_generator(stream_key(s), "noise", 0).initial_seed() == 0


def test_default_seed_has_256_bits_and_dp_seed_is_validated(tmp_path):
    tr = lap2_trainer(tmp_path, dp_mechanism="gaussian", dp_noise_multiplier=1.0, dp_seed=None)
    tr.train()
    assert tr._seed.bit_length() > 128  # fails with probability 2^-128
    lap2_args(tmp_path, dp_noise_multiplier=1.0, dp_seed=2**300)  # any size
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="dp_seed"):
            lap2_args(tmp_path, dp_noise_multiplier=1.0, dp_seed=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Philox generator)")
def test_cuda_keyed_generator_uses_the_whole_key():
    from lap2_hf.rng import keyed_generator, stream_key

    draws = [
        torch.randn(64, device="cuda", generator=keyed_generator(stream_key(x), "noise", t, device="cuda"))
        for x, t in ((7, 0), (7 + 2**64, 0), (7, 1), (7, 0))
    ]
    assert (
        not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2]) and torch.equal(draws[0], draws[3])
    )


N_SECURE = 1_000_000


@pytest.mark.parametrize(
    "name, noise, clip, std, kurt, m8",
    [
        ("gaussian", 0.7, 2.0, 1.4, 3.0, 105.0),
        ("lap2", 0.7, 2.0, 0.7 * 2.0 * math.sqrt(2), 6.0, 2520.0),
        ("laplace", 1.5, 0.4, 1.5 * 0.4 * math.sqrt(2), 6.0, 2520.0),
    ],
)
def test_secure_rng_has_the_right_law(name, noise, clip, std, kurt, m8):
    """Same bounds as tests/test_mechanisms.py: variance, kurtosis and mean within 6 standard errors."""
    from lap2_hf.mechanisms import Mechanism
    from lap2_hf.rng import SecureRandom

    x = Mechanism(name, noise=noise, clip_norm=clip).sample((N_SECURE,), generator=SecureRandom(bytes(range(32))))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    x = x.double()
    var = x.pow(2).mean().item()
    k = x.pow(4).mean().item() / var**2
    var_se = std**2 * math.sqrt((kurt - 1) / N_SECURE)
    kurt_se = math.sqrt((m8 - kurt**2) / N_SECURE)
    assert abs(var - std**2) < 6 * var_se
    assert abs(k - kurt) < 6 * kurt_se + 4 * kurt * var_se / std**2
    assert abs(x.mean().item()) < 6 * std / math.sqrt(N_SECURE)
    # symmetric, and the two halves of a Box-Muller pair are uncorrelated
    assert abs((x > 0).double().mean().item() - 0.5) < 6 * 0.5 / math.sqrt(N_SECURE)
    if name == "gaussian":
        a, b = x[: N_SECURE // 2], x[N_SECURE // 2 :]
        assert abs((a * b).mean().item()) / std**2 < 6 / math.sqrt(N_SECURE / 2)


def test_secure_rng_is_a_keyed_chacha20_stream():
    from lap2_hf.rng import SecureRandom

    a = SecureRandom(bytes(32)).normal((5,), dtype=torch.float64)
    assert torch.equal(a, SecureRandom(bytes(32)).normal((5,), dtype=torch.float64))
    assert not torch.equal(a, SecureRandom(bytes(31) + b"\x01").normal((5,), dtype=torch.float64))
    # Reference: the first 64-bit keystream word of ChaCha20 (key 0, nonce 0) through the Laplace map.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    word = int.from_bytes(
        Cipher(algorithms.ChaCha20(bytes(32), bytes(16)), mode=None).encryptor().update(bytes(8)), "little"
    )
    e = -math.log(((word & (2**53 - 1)) + 0.5) * 2.0**-53)
    assert SecureRandom(bytes(32)).laplace((1,), dtype=torch.float64).item() == pytest.approx(
        -e if word >> 63 else e, rel=1e-15
    )


def test_trainer_with_secure_rng_adds_the_keyed_chacha20_noise(tmp_path):
    """C = 1e-8, b/C = 1e8, lr = 1: the update is -noise / B (b = 1), SecureRandom's noise for step 0 of the stream."""
    from lap2_hf.mechanisms import Mechanism
    from lap2_hf.rng import SecureRandom, derive, stream_key

    model = tiny_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = lap2_trainer(
        tmp_path,
        model,
        dp_mechanism="lap2",
        dp_noise_multiplier=1e8,
        dp_clip_norm=1e-8,
        dp_delta=1e-3,
        learning_rate=1.0,
        dp_secure_rng=True,
    )
    tr.train()
    assert tr.plan.secure_rng
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    Mechanism("lap2", noise=1e8, clip_norm=1e-8).add_noise(
        ref, generator=SecureRandom(derive(stream_key(123), "secure-noise", 0))
    )
    for n, p in model.named_parameters():
        assert torch.allclose(before[n] - p.detach(), ref[n] / 16, rtol=1e-4, atol=1e-6), n


def test_a_trial_must_start_from_a_fresh_model(tmp_path):
    """A trial's accountant starts at 0 steps: refused on a model the trainer trained before."""
    tr = lap2_trainer(tmp_path, dp_mechanism="gaussian", dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="needs model_init"):
        tr.train(trial={"learning_rate": 0.1})
    model = tiny_model("bert")
    tr = lap2_trainer(tmp_path, model_init=lambda: model, dp_mechanism="gaussian", dp_noise_multiplier=1.0)
    tr.train()
    tr.hp_search_backend = None  # train(trial=...) as a backend calls it, minus the backend's bookkeeping
    with pytest.raises(ValueError, match="already trained"):
        tr.train(trial={"learning_rate": 0.1})


def test_resume_inside_a_second_train_call_is_the_uninterrupted_run(tmp_path):
    """The second call is calibrated to the rest of the budget; a checkpoint of it resumes to the same end."""

    def run(out, resume=None):
        torch.manual_seed(5)
        tr = lap2_trainer(out, tiny_model("bert"), dp_mechanism="gaussian", dp_noise_multiplier=3.0, max_steps=2)
        if resume is None:
            tr.train()
        tr.args.dp_noise_multiplier, tr.args.dp_target_epsilon = None, 2.0
        tr.args.max_steps, tr.args.save_strategy, tr.args.save_steps = 3, "steps", 1
        tr.train(resume_from_checkpoint=resume)
        return tr

    full = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "out" / "checkpoint-1"))
    assert full.accountant.steps == resumed.accountant.steps == 5
    assert resumed.plan.noise == full.plan.noise and resumed.plan.prior_steps == 2
    assert resumed.privacy_spent() == pytest.approx(full.privacy_spent(), rel=1e-12) and full.privacy_spent() <= 2.0
    assert torch.allclose(flat_params(resumed.model), flat_params(full.model), atol=1e-6)
