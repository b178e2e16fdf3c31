"""The documented command, end to end under ``accelerate launch`` with two CPU processes (gloo):

    accelerate launch --config_file configs/accelerate/cpu2.yaml scripts/finetune.py --config configs/sst2_eps054.yaml

on a tiny random RoBERTa and a few dozen SST-2 rows, for 2 steps. Both processes train, the noise is added
once (the update equals a one-process run with the same secret seed), the summary is printed once, one
results directory is written, and the resolved config records the paper's privacy parameters.
"""

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import WORDS, tiny_model, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.join(ROOT, "..", "shared", "data", "sst2")
SEED = 2**127 + 12345  # >= 128 bits: no weak-seed warning; fixed so that both runs draw the same batches and noise
N_TRAIN, N_DEV, BATCH = 40, 16, 8


def _write_rows(tmp_path):
    """The first SST-2 rows (synthetic GLUE-format rows where ../shared/data/sst2 is absent)."""
    for split, n in (("train", N_TRAIN), ("dev", N_DEV)):
        src = os.path.join(SST2, f"{split}.tsv")
        if os.path.isfile(src):
            with open(src) as fh:
                lines = [next(fh) for _ in range(n + 1)]
        else:
            rng = random.Random(split)
            lines = ["sentence\tlabel\n"] + [f"{' '.join(rng.sample(WORDS, 5))} \t{i % 2}\n" for i in range(n)]
        (tmp_path / f"{split}.tsv").write_text("".join(lines))


def _args(tmp_path, model_dir, name):
    # The tiny model has 64 positions, so sentences are cut to 32 tokens (the paper's 256 would overflow it).
    return [
        "--model.name_or_path",
        str(model_dir),
        "--data.dataset_name",
        "null",
        "--data.dataset_config",
        "null",
        "--data.train_file",
        str(tmp_path / "train.tsv"),
        "--data.validation_file",
        str(tmp_path / "dev.tsv"),
        "--data.max_length",
        "32",
        "--training.max_steps",
        "2",
        "--privacy.expected_batch_size",
        str(BATCH),
        "--privacy.seed",
        str(SEED),
        "--training.use_cpu",
        "true",
        "--training.output_dir",
        str(tmp_path / name / "out"),
        "--run.results_dir",
        str(tmp_path / name / "results"),
        # The weights after the last step, to compare the two runs' updates.
        "--training.save_strategy",
        "steps",
        "--training.save_steps",
        "2",
    ]


def _weights(out_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "checkpoint-2", "model.safetensors"))


@pytest.mark.slow
def test_paper_command_under_accelerate_with_two_cpu_processes(tmp_path):
    from lap2_hf.finetune import main

    model_dir = tmp_path / "model"
    tiny_model("roberta").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    _write_rows(tmp_path)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]  # = `accelerate launch`
    cmd = [
        *launch,
        "--config_file",
        "configs/accelerate/cpu2.yaml",
        "scripts/finetune.py",
        "--config",
        "configs/sst2_eps054.yaml",
        *_args(tmp_path, model_dir, "two"),
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]

    # Both processes trained every step and ended with the same parameters.
    # (Not anchored to a line: the other process's log lines may be written around it.)
    ranks = re.findall(r"rank (\d+)/(\d+): (\d+) private steps, parameters sha256 ([0-9a-f]{16})", res.stdout)
    assert sorted((r, w, s) for r, w, s, _ in ranks) == [("0", "2", "2"), ("1", "2", "2")], res.stdout
    assert ranks[0][3] == ranks[1][3]
    # Epsilon and accuracy are printed once (by the main process), and one results directory is written.
    summary = [line for line in res.stdout.splitlines() if line.startswith("== ")]
    assert len(summary) == 1, res.stdout
    assert "epsilon spent=0.538" in summary[0] and "dev accuracy=" in summary[0]
    runs = tmp_path / "two" / "results"
    assert os.listdir(runs) == ["sst2_eps0538_lap2"]
    out = runs / "sst2_eps0538_lap2"
    assert sorted(os.listdir(out)) == ["command.txt", "config.yaml", "metrics.json"]
    command = (out / "command.txt").read_text()
    assert command.startswith("accelerate launch scripts/finetune.py --config configs/sst2_eps054.yaml")
    # The resolved config records the paper's privacy parameters (expected batch as overridden for 40 rows),
    # and never the (secret) seed.
    from lap2_hf.config import REDACTED_SEED

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["privacy"] == {
        "mechanism": "lap2",
        "target_epsilon": 0.5384,
        "delta": 7.424e-6,
        "clip_norm": 0.4,
        "expected_batch_size": BATCH,
        "seed": REDACTED_SEED,
    }
    assert str(SEED) not in command and str(SEED) not in (out / "config.yaml").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_train_examples"] == N_TRAIN and metrics["steps_taken"] == metrics["steps_planned"] == 2
    assert 0.53 < metrics["epsilon_spent"] <= 0.5384 and metrics["delta"] == 7.424e-6

    # The noise is added once: the two-process update is the one-process update with the same seed (each
    # process noising its own share, or both noising the sum, would give a different model).
    one = main(["--config", os.path.join(ROOT, "configs", "sst2_eps054.yaml"), *_args(tmp_path, model_dir, "one")])
    w1, w2 = _weights(tmp_path / "one" / "out"), _weights(tmp_path / "two" / "out")
    from safetensors.torch import load_file

    initial = load_file(model_dir / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        assert torch.allclose(w1[name], w2[name], rtol=1e-5, atol=1e-7), name
    assert all(not torch.equal(w1[n], initial[n]) for n in initial)  # every trained weight moved
    assert one["noise"] == metrics["noise"] and one["epsilon_spent"] == metrics["epsilon_spent"]
    # The evaluation loss is not multiplied by the number of processes (HF's loss-kwargs scaling).
    assert metrics["evaluations"][-1]["eval_loss"] == pytest.approx(one["evaluations"][-1]["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_distributed_worker_skips_teardown_only_under_several_processes(world_size):
    # A finished worker of a multi-process run leaves with status 0 before the interpreter's teardown (where a
    # gloo worker aborted now and then, failing the finished run), with what it printed flushed; a one-process
    # run returns and tears down normally.
    code = (
        "import atexit, sys\n"
        "from lap2_hf.finetune import exit_distributed_worker\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        "sys.stdout.write('results written')\n"
        "exit_distributed_worker()\n"
        "print(' and returned')\n"
    )
    env = dict(os.environ, WORLD_SIZE=world_size)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    if world_size == "2":
        assert res.stdout == "results written"
    else:
        assert res.stdout == "results written and returned\nteardown ran\n"
