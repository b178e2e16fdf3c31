"""scripts/finetune.py: YAML configs, overrides, strict keys, data checks, an end-to-end run on a tiny RoBERTa."""

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_model, write_tiny_glue_run

from lap2_hf.data import DataConfig, load_raw
from lap2_hf.run_config import parse_overrides, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_run(tmp_path):
    """A saved tiny RoBERTa + tokenizer and local TSV files in GLUE format."""
    model_dir = write_tiny_glue_run(tmp_path, (("train", 60), ("dev", 20)))
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train_file": str(tmp_path / "train.tsv"),
            "validation_file": str(tmp_path / "dev.tsv"),
            "max_length": 16,
        },
        "privacy": {"mechanism": "lap2", "target_epsilon": 2.0, "clip_norm": 0.5, "expected_batch_size": 20, "seed": 1},
        "training": {
            "num_train_epochs": 2,
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 8,
            "use_cpu": True,
            "disable_tqdm": True,
            "output_dir": str(tmp_path / "out"),
        },
        "run": {"name": "tiny", "results_dir": str(tmp_path / "results")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return tmp_path, path


def test_end_to_end_writes_results(tiny_run):
    from lap2_hf.finetune import main

    tmp, cfg = tiny_run
    summary = main(["--config", str(cfg), "--privacy.target_epsilon", "3.0"])
    out = tmp / "results" / "tiny"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epsilon_spent"] <= 3.0 and metrics["epsilon_spent"] > 2.9
    assert metrics["target_epsilon"] == 3.0 and metrics["steps_taken"] == metrics["steps_planned"] == 6
    assert 0 <= metrics["eval_accuracy"] <= 1 and len(metrics["evaluations"]) == 2
    assert metrics["delta"] == pytest.approx(1 / 120)
    assert yaml.safe_load((out / "config.yaml").read_text())["privacy"]["target_epsilon"] == 3.0
    assert "--privacy.target_epsilon 3.0" in (out / "command.txt").read_text()
    assert summary["noised_coordinates"] > 0
    assert metrics["secure_rng"] is False and metrics["log_private_stats"] is False


def test_summary_line_names_what_was_scored(tiny_run, capsys):
    """The summary line says dev accuracy only when dev was scored: a tuning run on the held-out slice of the
    training file says held-out accuracy (it printed "dev accuracy" before)."""
    from lap2_hf.finetune import main

    _, cfg = tiny_run
    main(["--config", str(cfg), "--training.num_train_epochs", "1"])
    assert "| dev accuracy=" in capsys.readouterr().out
    main(["--config", str(cfg), "--training.num_train_epochs", "1", "--data.holdout_fraction", "0.25",
          "--data.evaluate_on", "holdout"])  # fmt: skip
    line = capsys.readouterr().out
    assert "| held-out accuracy=" in line and "dev accuracy" not in line


def test_results_never_hold_the_seed(tiny_run):
    """The seed is secret (it recomputes the noise): results/ keep the config and the command but not its value,
    also when it was given on the command line."""
    from lap2_hf.config import REDACTED_SEED
    from lap2_hf.finetune import main

    tmp, cfg = tiny_run
    secret = 0xD1CE_5EED_0123_4567_89AB_CDEF_0246_8ACE
    main(["--config", str(cfg), "--privacy.seed", str(secret), "--training.num_train_epochs", "1"])
    out = tmp / "results" / "tiny"
    for name in ("config.yaml", "command.txt", "metrics.json"):
        assert str(secret) not in (out / name).read_text(), name
    assert yaml.safe_load((out / "config.yaml").read_text())["privacy"]["seed"] == REDACTED_SEED
    assert f"--privacy.seed '{REDACTED_SEED}'" in (out / "command.txt").read_text()


def test_lora_run(tiny_run):
    from lap2_hf.finetune import main

    tmp, cfg = tiny_run
    summary = main(
        ["--config", str(cfg), "--model.lora", "{r: 2, target_modules: [query, value]}", "--run.name", "lora"]
    )
    full = sum(p.numel() for p in tiny_model("roberta").parameters())
    assert 0 < summary["noised_coordinates"] < full / 4


def test_overrides_and_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model: {name_or_path: m}\nprivacy: {mechanism: lap2, target_epsilon: 1.0, delta: 1e-5}\nrun: {name: a}\n"
    )
    (tmp_path / "child.yaml").write_text("base: base.yaml\nprivacy: {mechanism: gaussian}\n")
    cfg = resolve(str(tmp_path / "child.yaml"), ["--privacy.target_epsilon=2", "--run.name", "b"])
    assert cfg["privacy"] == {"mechanism": "gaussian", "target_epsilon": 2, "delta": 1e-5}
    assert cfg["run"]["name"] == "b" and cfg["model"]["name_or_path"] == "m"
    assert parse_overrides(["--training.learning_rate", "1e-4"])["training"]["learning_rate"] == "1e-4"


@pytest.mark.parametrize(
    "override, match",
    [
        (["--privacy.epsilon", "1"], r"unknown key\(s\) \['epsilon'\] in section 'privacy'"),
        (["--training.dp_clip_norm", "1"], "privacy settings go in the 'privacy' section"),
        (["--trainig.seed", "1"], "unknown config sections"),
        (["--model.lora", "{rank: 2}"], "model.lora"),
        (["learning_rate", "1"], "--section.key"),
        (["--run.name"], "no value"),
    ],
)
def test_unknown_keys_are_errors(tmp_path, override, match):
    (tmp_path / "c.yaml").write_text("model: {name_or_path: m}\nrun: {name: a}\n")
    with pytest.raises(ValueError, match=match):
        resolve(str(tmp_path / "c.yaml"), override)


def test_data_errors_name_the_field(tiny_run, tmp_path):
    tmp, _ = tiny_run
    with pytest.raises(ValueError, match="data.train_file='nope.tsv' does not exist"):
        DataConfig(train_file="nope.tsv", validation_file=str(tmp / "dev.tsv"))
    with pytest.raises(ValueError, match="either dataset_name"):
        DataConfig()
    with pytest.raises(ValueError, match="data.text_column='text' is not a column"):
        load_raw(
            DataConfig(train_file=str(tmp / "train.tsv"), validation_file=str(tmp / "dev.tsv"), text_column="text")
        )
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\na b \tpositive\n")
    with pytest.raises(ValueError, match="integer class ids"):
        load_raw(DataConfig(train_file=str(bad), validation_file=str(bad)))


def test_sst2_files_load_with_provenance_counts():
    train = os.path.join(ROOT, "..", "shared", "data", "sst2", "train.tsv")
    if not os.path.isfile(train):
        pytest.skip("../shared/data/sst2 not present")
    raw = load_raw(DataConfig(train_file=train, validation_file=train.replace("train", "dev")))
    assert len(raw["train"]) == 67349 and len(raw["validation"]) == 872  # PROVENANCE.txt
    assert sum(raw["validation"]["label"]) == 444


def test_every_shipped_config_resolves():
    files = [
        f
        for f in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
        if "accelerate" not in f and not os.path.basename(f).startswith("_")
    ]
    assert len(files) >= 28
    for f in files:
        cfg = resolve(f, [])
        assert cfg["privacy"]["mechanism"] in ("gaussian", "laplace", "lap2", "none"), f
    paper = resolve(os.path.join(ROOT, "configs", "sst2_eps054.yaml"), [])
    assert paper["privacy"] == {
        "delta": 7.424e-6,
        "clip_norm": 0.4,
        "expected_batch_size": 1024,
        "mechanism": "lap2",
        "target_epsilon": 0.5384,
    }
    assert paper["data"]["max_length"] == 256 and paper["training"]["learning_rate"] == 5e-4


def test_script_bad_config_is_one_line_exit_2(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "model: {name_or_path: m}\nrun: {name: a}\nprivacy: {mechanism: lap2}\ndata: {dataset_name: glue}\n"
    )
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "finetune.py"), "--config", str(tmp_path / "c.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "exactly one of dp_target_epsilon" in res.stderr and "Traceback" not in res.stderr


def test_trainable_subset_freezes_the_rest(tiny_run):
    from lap2_hf.finetune import main

    tmp, cfg = tiny_run
    summary = main(["--config", str(cfg), "--model.trainable", "[classifier]", "--run.name", "head"])
    head = sum(p.numel() for n, p in tiny_model("roberta").named_parameters() if "classifier" in n)
    assert summary["noised_coordinates"] == head
    with pytest.raises(ValueError, match="matches no parameter"):
        main(["--config", str(cfg), "--model.trainable", "[nothing_like_this]"])


@pytest.mark.slow
def test_sigkill_then_same_command_resumes_to_the_uninterrupted_run(tiny_run):
    """Issue 13: a run killed (SIGKILL) after a checkpoint and started again with the same command ends
    with the same steps, the same epsilon (no step counted twice) and the same model as an uninterrupted run."""
    import signal
    import time

    from lap2_hf.finetune import complete_checkpoints

    tmp, cfg = tiny_run
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
    )
    opts = [
        "--training.num_train_epochs",
        "15",
        "--training.save_strategy",
        "steps",
        "--training.save_steps",
        "1",
        "--training.save_total_limit",
        "2",
        "--training.eval_strategy",
        "no",
        "--privacy.seed",
        "7",
    ]

    def command(name):
        return [
            sys.executable,
            "scripts/finetune.py",
            "--config",
            str(cfg),
            *opts,
            "--run.name",
            name,
            "--training.output_dir",
            str(tmp / "out" / name),
        ]

    straight_run = subprocess.run(command("straight"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert straight_run.returncode == 0, straight_run.stderr[-3000:]
    proc = subprocess.Popen(command("killed"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not complete_checkpoints(str(tmp / "out" / "killed")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp / "results" / "killed" / "metrics.json").exists()
    done = subprocess.run(command("killed"), cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert "resuming from" in done.stdout

    straight = json.loads((tmp / "results" / "straight" / "metrics.json").read_text())
    resumed = json.loads((tmp / "results" / "killed" / "metrics.json").read_text())
    assert resumed["resumed_from"] is not None and straight["resumed_from"] is None
    assert resumed["steps_taken"] == straight["steps_taken"] == straight["steps_planned"] == 45
    assert resumed["epsilon_spent"] == pytest.approx(straight["epsilon_spent"], rel=1e-12)
    assert resumed["evaluations"][-1]["eval_loss"] == pytest.approx(straight["evaluations"][-1]["eval_loss"], rel=1e-5)
    # The accountant of the last checkpoint holds exactly one record per step taken.
    last = complete_checkpoints(str(tmp / "out" / "killed"))[-1]
    assert last.endswith("checkpoint-45")


def test_resume_option_checks(tmp_path):
    from lap2_hf.finetune import resume_checkpoint

    assert resume_checkpoint("auto", str(tmp_path / "nothing")) is None
    with pytest.raises(ValueError, match="run.resume"):
        resume_checkpoint("yes", str(tmp_path))
    half = tmp_path / "checkpoint-3"  # a checkpoint cut short by a kill: no privacy state
    half.mkdir()
    (half / "trainer_state.json").write_text("{}")
    assert resume_checkpoint("auto", str(tmp_path)) is None
    assert resume_checkpoint(False, str(tmp_path)) is None


def test_trainable_patterns_must_match(tiny_run):
    from lap2_hf.finetune import main

    tmp, cfg = tiny_run
    with pytest.raises(ValueError, match="model.trainable pattern 'nosuchlayer'"):
        main(["--config", str(cfg), "--model.trainable", "nosuchlayer"])
    summary = main(["--config", str(cfg), "--model.trainable", "classifier", "--training.max_steps", "1"])
    assert 0 < summary["noised_coordinates"] < 5000  # the head only, not every parameter


def test_mean_pooling_head_trains_privately(tiny_run):
    from lap2_hf.finetune import main

    tmp, cfg = tiny_run
    summary = main(["--config", str(cfg), "--model.pooling", "mean", "--training.max_steps", "2"])
    assert summary["steps_taken"] == 2 and summary["epsilon_spent"] > 0


# -- issue 12: bad input is one line naming the field and the value, before training ---------------------

EPOCHS_HINT = "(or set training.max_steps > 0)"


@pytest.mark.parametrize("key, spelling", [("eval_strategy", "no"), ("eval_strategy", "off"), ("save_strategy", "no")])
def test_strategy_off_spellings_work(tmp_path, key, spelling):
    """``--training.eval_strategy no`` / ``off`` and ``--training.save_strategy no`` reach HF as "no" (YAML 1.1
    reads no/off as the boolean False, which HF refuses)."""
    from lap2_hf.config import Lap2TrainingArguments
    from lap2_hf.run_config import training_kwargs

    (tmp_path / "c.yaml").write_text("model: {name_or_path: m}\nrun: {name: a}\nprivacy: {mechanism: none}\n")
    cfg = resolve(str(tmp_path / "c.yaml"), [f"--training.{key}", spelling, "--training.output_dir", str(tmp_path)])
    args = Lap2TrainingArguments(**training_kwargs(cfg), use_cpu=True, report_to=[])
    assert getattr(args, key) == "no"


@pytest.mark.parametrize(
    "override, message",
    [
        (["--privacy.delta", "nan"], "privacy.delta must be a finite number or null, got 'nan'"),
        (["--privacy.delta", ".nan"], "privacy.delta must be a finite number or null, got nan"),
        (["--training.learning_rate", "abc"], "training.learning_rate must be a finite number, got 'abc'"),
        (["--training.max_steps", "1e2"], "training.max_steps must be an integer, got 100.0"),
        (["--training.max_grad_norm", "null"], "training.max_grad_norm must be a finite number, got None"),
        (["--training.num_train_epochs", "0"], f"training.num_train_epochs must be > 0 {EPOCHS_HINT}, got 0"),
        (["--training.num_train_epochs", "-1"], f"training.num_train_epochs must be > 0 {EPOCHS_HINT}, got -1"),
        (
            ["--training.eval_strategy", "sometimes"],
            "training.eval_strategy must be one of ['no', 'steps', 'epoch'], got 'sometimes'",
        ),
        (["--training.per_device_train_batch_size", "0"], "training.per_device_train_batch_size must be >= 1, got 0"),
        (["--privacy.secure_rng", "yes"], "privacy.secure_rng must be true or false, got 'yes'"),
        (
            ["--privacy.mechanism", "gauss"],
            "privacy.mechanism must be one of ['gaussian', 'laplace', 'lap2', 'none'], got 'gauss'",
        ),
        (["--privacy.task", "causal_lm"], "privacy.task='causal_lm': scripts/finetune.py trains a sequence classifier"),
        (["--data.max_train_samples", "1e3"], "data.max_train_samples must be an integer or null, got 1000.0"),
        (["--run.name", "5"], "run.name must be a non-empty string, got 5"),
        # model and run sections are typed by ModelConfig / LoraSettings / RunConfig, like the others
        (["--model.pooling", "avg"], "model.pooling must be 'cls' or 'mean' or 'mean_normalized', got 'avg'"),
        (["--model.head_scale", "big"], "model.head_scale must be a finite number or null, got 'big'"),
        (["--model.head_prompts", "[1, 2]"], "model.head_prompts must be a list of (a string) or null, got [1, 2]"),
        (["--model.lora", "{r: eight}"], "model.lora.r must be an integer, got 'eight'"),
        (["--run.resume", "5"], "run.resume must be true or false or a string, got 5"),
    ],
)
def test_bad_values_are_one_line_naming_field_and_value(tiny_run, override, message):
    from lap2_hf.finetune import main
    from lap2_hf.run_config import ConfigError

    _, cfg = tiny_run
    with pytest.raises(ConfigError) as err:
        main(["--config", str(cfg), *override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_files_are_one_line_naming_the_file(tiny_run, tmp_path):
    from lap2_hf.finetune import main
    from lap2_hf.run_config import ConfigError

    tmp, cfg = tiny_run
    (tmp_path / "malformed.yaml").write_text("model: {name_or_path: x\nrun: [\n")
    (tmp_path / "base5.yaml").write_text("base: 5\n")
    (tmp_path / "child.yaml").write_text("base: missing.yaml\n")
    (tmp_path / "empty.tsv").write_text("")
    (tmp_path / "negative.tsv").write_text("sentence\tlabel\nw1 w2 \t1\nw3 \t-1\n")
    cases = [
        (
            ["--config", str(tmp_path / "malformed.yaml")],
            f"config '{tmp_path}/malformed.yaml' is not valid YAML: "
            "expected ',' or '}', but got ':' at line 2, column 4",
        ),
        (["--config", str(tmp_path / "base5.yaml")], "base must be a file name (relative to that config), got 5"),
        (
            ["--config", str(tmp_path / "child.yaml")],
            f"config '{tmp_path}/child.yaml' names base 'missing.yaml', which does not exist",
        ),
        (["--config", str(cfg), "--model.lora", "{r: 2"], "override --model.lora: value '{r: 2' is not valid YAML"),
        (
            ["--config", str(cfg), "--data.train_file", str(tmp_path / "empty.tsv")],
            f"data.train_file='{tmp_path}/empty.tsv' is empty (0 bytes)",
        ),
        (
            ["--config", str(cfg), "--data.validation_file", str(tmp_path / "negative.tsv")],
            "data.label_column='label' must hold class ids >= 0, but the validation split",
        ),
        # The privacy plan needs N (the data), so its errors come from train(), still before the first step.
        (["--config", str(cfg), "--privacy.expected_batch_size", "1000"], "dp_expected_batch_size=1000 exceeds"),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError) as err:
            main(argv)
        assert message in str(err.value) and "\n" not in str(err.value), argv


@pytest.mark.parametrize(
    "override, message",
    [
        (["--training.learning_rate", "abc"], "training.learning_rate must be a finite number, got 'abc'"),
        (["--data.train_file", "NEGATIVE"], "must hold class ids >= 0"),
    ],
)
def test_script_config_error_is_one_line_exit_2(tiny_run, tmp_path, override, message):
    _, cfg = tiny_run
    (tmp_path / "negative.tsv").write_text("sentence\tlabel\nw1 w2 \t1\nw3 \t-1\n")
    override = [str(tmp_path / "negative.tsv") if v == "NEGATIVE" else v for v in override]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    script = os.path.join(ROOT, "scripts", "finetune.py")
    res = subprocess.run(
        [sys.executable, script, "--config", str(cfg), *override], capture_output=True, text=True, timeout=300, env=env
    )
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(errors) == 1 and errors[0].startswith("finetune.py: error: ") and message in errors[0], res.stderr


@pytest.mark.parametrize("error", ["TypeError", "ValueError"])
def test_script_error_during_training_keeps_its_traceback(tiny_run, error):
    """Only configuration errors, found before the first step, are one line: a failure inside a training step
    (here injected into the step) is a bug to debug, so the script shows its traceback (exit 1)."""
    _, cfg = tiny_run
    inject = (
        "import runpy, sys\n"
        "import lap2_hf.trainer as t\n"
        "def step(self, *a, **k):\n"
        f"    raise {error}('injected failure in a training step')\n"
        "t.Lap2Trainer.training_step = step\n"
        f"sys.argv = ['scripts/finetune.py', '--config', {str(cfg)!r}, '--training.max_steps', '1']\n"
        f"runpy.run_path({os.path.join(ROOT, 'scripts', 'finetune.py')!r}, run_name='__main__')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", inject], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback (most recent call last)" in res.stderr and f"{error}: injected failure" in res.stderr
    assert "finetune.py: error:" not in res.stderr


def test_privacy_options_reach_the_trainer(tiny_run, monkeypatch):
    """``privacy.secure_rng`` and ``privacy.log_private_stats`` (dp_* fields of Lap2TrainingArguments) reach the
    trainer that runs, and metrics.json records both (whether unnoised statistics were released)."""
    from lap2_hf.finetune import main
    from lap2_hf.trainer import Lap2Trainer

    trainers = []
    train = Lap2Trainer.train

    def spy(self, *args, **kwargs):
        trainers.append(self)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(Lap2Trainer, "train", spy)
    tmp, cfg = tiny_run
    main(
        [
            "--config",
            str(cfg),
            "--privacy.secure_rng",
            "true",
            "--privacy.log_private_stats",
            "true",
            "--training.max_steps",
            "2",
            "--training.logging_steps",
            "1",
            "--run.name",
            "opts",
        ]
    )
    (trainer,) = trainers
    assert trainer.args.dp_secure_rng is True and trainer.plan.secure_rng is True
    assert trainer.privacy_args.log_private_stats is True
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2 and all("dp_batch_size" in h for h in steps)  # logged only with log_private_stats
    metrics = json.loads((tmp / "results" / "opts" / "metrics.json").read_text())
    assert metrics["secure_rng"] is True and metrics["log_private_stats"] is True


# -- a zero-shot head from public class descriptions ------------------------------------------------------


def test_prompt_head_is_the_zero_shot_classifier(tiny_run):
    """``model.head_prompts`` sets ``W_k = scale * e_k / ||e_k||`` and ``b = 0`` (e_k: the pooled features of
    prompt k), so ``logits = scale * ||f(x)|| * cos(f(x), e_k)``; the pretrained weights are untouched."""
    import torch
    import torch.nn.functional as F

    from lap2_hf.finetune import load_model_and_tokenizer

    tmp, _ = tiny_run
    prompts = ["a negative review", "a positive review"]
    for pooling in ("mean", "mean_normalized"):
        torch.manual_seed(0)
        base, _ = load_model_and_tokenizer({"name_or_path": str(tmp / "model"), "pooling": pooling}, 2)
        torch.manual_seed(0)
        cfg = {"name_or_path": str(tmp / "model"), "pooling": pooling, "head_prompts": prompts, "head_scale": 3.0}
        model, tok = load_model_and_tokenizer(cfg, 2)
        model.eval()
        for (n, p), (_, q) in zip(model.encoder.named_parameters(), base.encoder.named_parameters(), strict=True):
            assert torch.equal(p, q), n
        e = torch.stack([model.pool(**tok([t], return_tensors="pt"))[0] for t in prompts])  # (2, H)
        assert torch.allclose(model.classifier.weight, 3.0 * F.normalize(e, dim=-1), atol=1e-6)
        assert torch.count_nonzero(model.classifier.bias) == 0
        x = tok(["some words here", "another sentence"], padding=True, return_tensors="pt")
        f = model.pool(**x)  # (2, H)
        expected = 3.0 * f.norm(dim=-1, keepdim=True) * F.cosine_similarity(f[:, None], e[None], dim=-1)
        assert torch.allclose(model(**x).logits, expected, atol=1e-5)


@pytest.mark.parametrize(
    "model_cfg, message",
    [
        ({"pooling": "cls", "head_prompts": ["a", "b"]}, "model.head_prompts needs model.pooling 'mean'"),
        ({"pooling": "mean", "head_prompts": ["only one"]}, "model.head_prompts needs one text per class (2), got 1"),
        ({"pooling": "mean", "head_prompts": "a b"}, "model.head_prompts must be a list of non-empty texts"),
        ({"pooling": "mean", "head_prompts": ["a", " "]}, "model.head_prompts must be a list of non-empty texts"),
        ({"pooling": "mean", "head_prompts": ["a", "b"], "head_scale": 0}, "model.head_scale must be a finite"),
        ({"pooling": "mean", "head_prompts": ["a", "b"], "head_scale": "5"}, "model.head_scale must be a finite"),
        ({"pooling": "mean", "head_scale": 5}, "model.head_scale is only used with model.head_prompts"),
    ],
)
def test_bad_head_prompts_name_the_field(tiny_run, model_cfg, message):
    from lap2_hf.finetune import load_model_and_tokenizer

    tmp, _ = tiny_run
    with pytest.raises(ValueError) as err:
        load_model_and_tokenizer({"name_or_path": str(tmp / "model"), **model_cfg}, 2)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_config_overrides_reach_the_loaded_model(tiny_run, pooling):
    """``model.config_overrides`` sets attributes of the checkpoint's config at load: the dropout rates of encoder
    and head follow it (the tiny checkpoint has every dropout off); without it they keep the checkpoint's."""
    import torch

    from lap2_hf.finetune import load_model_and_tokenizer

    tmp, _ = tiny_run
    base = {"name_or_path": str(tmp / "model"), "pooling": pooling}
    on = {"hidden_dropout_prob": 0.25, "attention_probs_dropout_prob": 0.125}
    model, _ = load_model_and_tokenizer({**base, "config_overrides": on}, 2)
    assert model.config.hidden_dropout_prob == 0.25 and model.config.attention_probs_dropout_prob == 0.125
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.25, 0.125}
    default, _ = load_model_and_tokenizer(base, 2)
    assert {m.p for m in default.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_dropout": 0.0}, "model.config_overrides: ['hidden_dropout'] are not attributes of RobertaConfig"),
        ({}, "model.config_overrides must be null or a non-empty mapping"),
        ("hidden_dropout_prob=0", "model.config_overrides must be null or a non-empty mapping"),
    ],
)
def test_bad_config_overrides_name_the_field(tiny_run, overrides, message):
    from lap2_hf.finetune import load_model_and_tokenizer

    tmp, _ = tiny_run
    with pytest.raises(ValueError) as err:
        load_model_and_tokenizer({"name_or_path": str(tmp / "model"), "config_overrides": overrides}, 2)
    assert str(err.value).startswith(message)
