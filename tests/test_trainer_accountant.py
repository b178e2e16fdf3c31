"""Lap2Trainer with dp_accountant='pld' (gaussian, laplace): calibration, logged epsilon, budget stop, resume,
repeated train(); lap2 refused (issue 11 item 3)."""

import json

import pytest
import torch
from conftest import flat_params, lap2_args, lap2_trainer, tiny_model

from lap2_hf import Lap2TrainingArguments
from lap2_hf.accounting import PldAccountant, accountant_label, epsilon_for

pytest.importorskip("dp_accounting")
PLD = accountant_label("pld")
RDP = accountant_label("rdp")


def _args(tmp_path, **kw):
    return lap2_args(tmp_path, **{"dp_accountant": "pld", **kw})


def _trainer(tmp_path, model=None, n=48, **kw):
    return lap2_trainer(tmp_path, model, n, **{"dp_accountant": "pld", **kw})


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_pld_epsilon_within_target_and_equal_to_direct(tmp_path, mechanism):
    tr = _trainer(tmp_path, dp_mechanism=mechanism, dp_target_epsilon=3.0, max_steps=4)
    out = tr.train()
    plan = tr.plan
    assert plan.accountant == PLD and isinstance(tr.accountant, PldAccountant)
    kw = dict(mechanism=mechanism, delta=plan.delta, sample_rate=plan.sample_rate)
    direct, _ = epsilon_for(noise=plan.noise, steps=4, accountant="pld", **kw)
    assert tr.privacy_spent() == direct == out.metrics["epsilon"] == plan.planned_epsilon
    assert 3.0 - 3e-3 <= direct <= 3.0
    logged = [h["epsilon"] for h in tr.state.log_history if "learning_rate" in h]
    assert logged == [epsilon_for(noise=plan.noise, steps=t, accountant="pld", **kw)[0] for t in (1, 2, 3, 4)]
    # The same target under RDP needs more noise.
    rdp = _trainer(tmp_path / "rdp", dp_mechanism=mechanism, dp_target_epsilon=3.0, max_steps=4, dp_accountant="rdp")
    rdp.train()
    assert rdp.plan.accountant == RDP and plan.noise < rdp.plan.noise


def test_lap2_with_pld_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="dp_accountant='pld' is not available for mechanism 'lap2'.*RDP"):
        _args(tmp_path, dp_mechanism="lap2", dp_target_epsilon=3.0)
    with pytest.raises(ValueError, match="dp_accountant must be one of"):
        _args(tmp_path, dp_mechanism="gaussian", dp_target_epsilon=3.0, dp_accountant="prv")


def test_budget_stop_under_pld(tmp_path, monkeypatch):
    import lap2_hf.trainer as trainer_mod

    real = trainer_mod.calibrate_noise
    monkeypatch.setattr(trainer_mod, "calibrate_noise", lambda **kw: 0.7 * real(**kw))
    tr = _trainer(tmp_path, dp_mechanism="gaussian", dp_target_epsilon=2.0, max_steps=8)
    tr.train()
    assert tr.state.global_step < 8
    assert tr.privacy_spent() <= 2.0
    # One more step would have crossed the target, by the same accountant.
    plan = tr.plan
    nxt = tr.accountant.epsilon_after(
        delta=plan.delta, mechanism="gaussian", noise=plan.noise, sample_rate=plan.sample_rate
    )
    assert nxt > 2.0


def test_budget_look_ahead_inside_the_plan_composes_nothing(tmp_path, monkeypatch):
    """Calibrated noise: the plan's end was checked against the target, so the per-step look-ahead must not
    recompose the PLD history every step (1-3 s each on CPU; it did before). Past the plan it still asks."""
    from lap2_hf.accounting.accountant import PldAccountant as Pld

    calls = []
    real = Pld.epsilon_after
    monkeypatch.setattr(Pld, "epsilon_after", lambda self, **kw: calls.append(kw.get("count", 1)) or real(self, **kw))
    tr = _trainer(tmp_path, dp_mechanism="gaussian", dp_target_epsilon=3.0, max_steps=6)
    tr.train()
    assert tr.accountant.steps == 6 and tr.privacy_spent() <= 3.0
    # Calibration and the plan ask about all 6 steps at once; a look-ahead asks about one more step, and only
    # once here: after step 6, past the plan (before the fix: twice per step, 12 calls, one new composition each step).
    assert set(calls) == {1, 6} and calls.count(1) == 1 and calls[-1] == 1
    # Past the plan the exact look-ahead refuses: one more step would cross the target the noise was
    # calibrated for.
    assert not tr._budget_allows_step() and calls.count(1) == 2


def test_resume_keeps_the_pld_accountant(tmp_path):
    kw = dict(dp_mechanism="gaussian", dp_target_epsilon=3.0, max_steps=4, save_strategy="steps", save_steps=2)
    torch.manual_seed(3)
    init = tiny_model("bert").state_dict()

    def model():
        m = tiny_model("bert")
        m.load_state_dict(init)
        return m

    full = _trainer(tmp_path / "a", model(), **kw)
    full.train()
    _trainer(tmp_path / "b", model(), **kw).train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-2"
    state = json.loads((ckpt / "privacy_state.json").read_text())
    assert state["accountant"]["accountant"] == "pld" and state["plan"]["accountant"] == PLD
    resumed = _trainer(tmp_path / "b", model(), **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert isinstance(resumed.accountant, PldAccountant) and resumed.accountant.steps == 4
    assert resumed.privacy_spent() == full.privacy_spent() and resumed.plan.noise == full.plan.noise
    assert torch.allclose(flat_params(resumed.model), flat_params(full.model), atol=1e-6)
    # A checkpoint of a PLD run does not resume under another accountant.
    other = _trainer(tmp_path / "b", model(), **(kw | {"dp_accountant": "rdp"}))
    with pytest.raises(ValueError, match="accountant"):
        other.train(resume_from_checkpoint=str(ckpt))


def test_second_train_gets_the_rest_of_the_pld_budget(tmp_path):
    tr = _trainer(tmp_path, dp_mechanism="laplace", dp_noise_multiplier=3.0, max_steps=2)
    tr.train()
    first = tr.privacy_spent()
    tr.args.dp_noise_multiplier, tr.args.dp_target_epsilon = None, 2.0
    tr.train()
    assert tr.accountant.steps == 4 and tr.plan.prior_steps == 2
    assert first < tr.privacy_spent() <= 2.0
    q, delta = tr.plan.sample_rate, tr.plan.delta
    direct = PldAccountant().step(mechanism="laplace", noise=3.0, sample_rate=q, count=2)
    direct.step(mechanism="laplace", noise=tr.plan.noise, sample_rate=q, count=2)
    assert tr.privacy_spent() == direct.get_epsilon(delta=delta)


def test_switching_accountant_between_train_calls_reaccounts_the_same_steps(tmp_path):
    tr = _trainer(tmp_path, dp_mechanism="gaussian", dp_noise_multiplier=2.0, max_steps=2, dp_accountant="rdp")
    tr.train()
    tr.args.dp_accountant = "pld"
    tr.train()
    assert isinstance(tr.accountant, PldAccountant) and tr.accountant.steps == 4 and tr.plan.accountant == PLD
    direct, _ = epsilon_for(
        mechanism="gaussian", noise=2.0, delta=tr.plan.delta, sample_rate=tr.plan.sample_rate, steps=4, accountant="pld"
    )
    assert tr.privacy_spent() == direct


def test_yaml_privacy_accountant_key(tmp_path):
    """privacy.accountant comes from the dp_accountant field (privacy keys are derived from the dp_* fields)."""
    from lap2_hf.run_config import privacy_fields, training_kwargs

    assert "accountant" in privacy_fields()
    cfg = {
        "privacy": {"mechanism": "gaussian", "target_epsilon": 1.0, "accountant": "pld"},
        "training": {"output_dir": str(tmp_path), "use_cpu": True, "report_to": []},
        "run": {"name": "x"},
    }
    assert Lap2TrainingArguments(**training_kwargs(cfg)).privacy.accountant == "pld"
