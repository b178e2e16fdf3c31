#!/usr/bin/env python
"""A DP run against a plain ``transformers.Trainer`` run, end to end: what a user pays for privacy per step.

Both arms train the same model (same initial weights, same trainable set), on the same tokenised training
data, for the same number of optimizer steps, with the same physical batch, maximum length, optimizer and
learning-rate schedule, in one process:

1. ``lap2``  -- :class:`lap2_hf.Lap2Trainer` as ``scripts/finetune.py`` builds it from ``--config``
   (default ``configs/quickstart.yaml`` with ``privacy.mechanism`` set to ``--mechanism``, default gaussian, and
   every weight but the word embeddings trained; ``--lora`` keeps the config's LoRA adapters instead):
   Poisson logical batches of expected size B, per-sample clipping, noise, accounting;
2. ``plain <sampler>`` -- ``transformers.Trainer`` with batches of exactly B = ``per_device_train_batch_size``
   x ``gradient_accumulation_steps``, one arm per ``--plain-sampling`` value: ``random`` (HF's default) and
   ``group_by_length`` (HF's length-grouped sampler: like Lap2Trainer, which sorts each logical batch by length
   before cutting physical chunks, it pads less).

Step time: the wall time between consecutive ``on_step_end`` callbacks (data loading included), over the
steps after the first (the first also pays set-up: calibration, attaching the clipping engine, the optimizer's
state, HF's length pass for ``group_by_length``). The headline ratio is of mean step times (what a whole run
costs); medians are printed too, but batches of different lengths make single steps vary a lot.

Overhead breakdown of the lap2 arm: seconds per step spent in each part of the DP step, measured by wrapping
the functions that do it (sampler ``indices``, dataset row fetch, logical-batch collation, length sorting of
physical chunks, padding collator, forward, clipping = norms + clip factors + book-keeping sums, noise,
accountant, optimizer). "backward and taps" is what remains of ``training_step``: the backward pass with the
engine's layer taps. "HF loop" is the rest of the step wall time. The plain arm gets the same wrappers where
they apply (collator, ``training_step`` = forward + backward, optimizer).

Padded tokens per step: the ``input_ids`` elements of every collated physical chunk, the work the model does.
``--lap2-plain-cuts`` adds the arm "lap2 plain cuts", Lap2Trainer cutting its sorted batch every ``--physical``
examples as it did before padding-optimal chunks (:func:`lap2_hf.sampling.padding_optimal_cuts` replaced for
that arm), for a before / after in one run.

Timing noise: run it alone (every other process on the 2 cores slows the training threads unevenly).
``--rounds`` > 1 repeats both arms in alternating order with fresh trainers and reports the median of rounds.

Example (10 steps of expected batch 1024 on SST-2 with MiniLM, about 5 minutes on 2 CPU cores)::

    python benchmarks/bench_epoch.py --steps 10 --out results/bench_clipping/epoch_minilm_cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lap2_hf import finetune, sampling  # noqa: E402
from lap2_hf.accounting import accountant as accounting  # noqa: E402
from lap2_hf.clipping.engine import GradClipper  # noqa: E402
from lap2_hf.mechanisms import Mechanism  # noqa: E402

#: Rows of the lap2 breakdown, in the order of a step.
PHASES = (
    "sampling",
    "row fetch",
    "logical collation",
    "length sorting",
    "padding collator",
    "forward",
    "backward and taps",
    "clipping",
    "noise",
    "accountant",
    "optimizer",
    "HF loop",
)


class _Timers:
    """Seconds spent inside wrapped callables, by phase. Wrappers nest: a phase's time includes that of the
    phases it calls, so only disjoint phases are wrapped (see PHASES)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack = contextlib.ExitStack()

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)
        seconds = self.seconds

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - t0

        # Restore what was there: the owner's own attribute (a module function, an instance's wrapped
        # collator), or nothing when the name came from a class (a method seen through an instance or subclass).
        had = name in vars(owner)
        setattr(owner, name, timed)
        self._stack.callback(lambda: setattr(owner, name, original) if had else delattr(owner, name))

    def close(self) -> None:
        self._stack.close()


def _count_tokens(trainer, timers: _Timers) -> None:
    """Add the padded tokens of every physical chunk the trainer collates to ``timers.seconds["tokens"]``
    (a count kept beside the phase seconds; the collator is wrapped inside the timing wrapper)."""
    collate = trainer.data_collator

    def counting(features):
        out = collate(features)
        if "input_ids" in out:
            timers.seconds["tokens"] += out["input_ids"].numel()
        return out

    trainer.data_collator = counting


class _StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step; the phase timers restart after the first step (set-up)."""

    def __init__(self, timers: _Timers):
        self.ends: list[float] = []
        self.start = time.perf_counter()
        self.timers = timers

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        if len(self.ends) == 1:
            self.timers.seconds.clear()


def _median_step(clock: _StepClock) -> tuple[float, float]:
    """(median step seconds after the first, first step seconds)."""
    ends = [clock.start, *clock.ends]
    steps = [b - a for a, b in zip(ends, ends[1:])]
    return statistics.median(steps[1:] or steps), steps[0]


def _lap2_trainer(args, out_dir: str):
    argv = [
        "--config", args.config,
        "--privacy.mechanism", args.mechanism,
        "--privacy.expected_batch_size", str(args.batch),
        "--privacy.seed", "0",  # a public seed: every lap2 arm draws the same Poisson batches
        "--training.max_steps", str(args.steps),
        "--training.per_device_train_batch_size", str(args.physical),
        "--training.eval_strategy", "no",
        "--training.save_strategy", "no",
        "--training.logging_steps", str(10**6),
        "--training.output_dir", out_dir,
        "--run.resume", "false",
    ]  # fmt: skip
    if not args.lora:  # the config's LoRA adapters (the quickstart has them) off: full fine-tuning
        argv += ["--model.lora", "null"]
    return finetune.prepare(argv).trainer


def _plain_trainer(lap2, model, out_dir: str, args, sampling_strategy: str) -> Trainer:
    src = lap2.args
    if args.batch % args.physical:
        raise ValueError(f"--batch {args.batch} must be a multiple of --physical {args.physical} for the plain arm")
    plain_args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=args.physical,
        gradient_accumulation_steps=args.batch // args.physical,
        max_steps=args.steps,
        learning_rate=src.learning_rate,
        lr_scheduler_type=src.lr_scheduler_type,
        warmup_steps=src.warmup_steps,
        weight_decay=src.weight_decay,
        optim=src.optim,
        seed=src.seed,
        use_cpu=src.use_cpu,
        dataloader_num_workers=src.dataloader_num_workers,
        train_sampling_strategy=sampling_strategy,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10**6,
        report_to=[],
    )
    return Trainer(
        model=model,
        args=plain_args,
        train_dataset=lap2.train_dataset,
        data_collator=lap2.data_collator,
        processing_class=lap2.processing_class,
    )


def _run(trainer, timers: _Timers) -> dict:
    clock = _StepClock(timers)
    trainer.add_callback(clock)
    clock.start = time.perf_counter()
    try:
        trainer.train()
    finally:
        timers.close()
    median, first = _median_step(clock)
    # Phases and wall time over the steps after the first (its set-up is in "first step").
    steps = len(clock.ends) - 1
    per_step = {k: v / steps for k, v in timers.seconds.items()}
    return {
        "median": median,
        "first": first,
        "steps": steps,
        "per_step": per_step,
        "mean": (clock.ends[-1] - clock.ends[0]) / steps,  # mean step after the first: the headline
    }


def run_lap2(trainer, *, plain_cuts: bool = False) -> dict:
    t = _Timers()
    _count_tokens(trainer, t)
    if plain_cuts:  # the "before" arm: sampling.padding_optimal_cuts (public) replaced for this arm only
        original = sampling.padding_optimal_cuts
        sampling.padding_optimal_cuts = lambda lengths, *, size: sampling.plain_cuts(len(lengths), size=size)
        t._stack.callback(lambda: setattr(sampling, "padding_optimal_cuts", original))
    t.wrap(sampling.PoissonBatchSampler, "indices", "sampling")
    t.wrap(datasets.Dataset, "__getitems__", "row fetch")
    t.wrap(sampling, "collate_logical", "logical collation")
    t.wrap(sampling.LogicalBatch, "physical_chunks", "length sorting")
    t.wrap(trainer, "data_collator", "padding collator")
    t.wrap(trainer, "compute_per_example_loss", "forward")
    t.wrap(trainer, "training_step", "training_step")
    t.wrap(GradClipper, "clip_and_accumulate", "clipping")
    t.wrap(GradClipper, "pop_summed", "clipping")
    t.wrap(Mechanism, "add_noise", "noise")
    for cls in (accounting.RdpAccountant, accounting.PldAccountant):
        t.wrap(cls, "epsilon_after", "accountant")
        t.wrap(cls, "step", "accountant")
    t.wrap(torch.optim.AdamW, "step", "optimizer")
    res = _run(trainer, t)
    p = res["per_step"]
    inside = ("padding collator", "length sorting", "forward", "clipping", "noise", "accountant")
    p["backward and taps"] = p.pop("training_step", 0.0) - sum(p.get(k, 0.0) for k in inside)
    loader = ("sampling", "row fetch", "logical collation")
    p["HF loop"] = res["mean"] - p["backward and taps"] - sum(p.get(k, 0.0) for k in (*inside, *loader, "optimizer"))
    res["plan"] = trainer.plan
    return res


def run_plain(trainer) -> dict:
    t = _Timers()
    _count_tokens(trainer, t)
    t.wrap(trainer, "data_collator", "padding collator")
    t.wrap(trainer, "training_step", "forward and backward")
    t.wrap(torch.optim.AdamW, "step", "optimizer")
    return _run(trainer, t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--mechanism", default="gaussian", choices=["gaussian", "lap2", "laplace"])
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per arm")
    ap.add_argument("--batch", type=int, default=1024, help="(expected) examples per step")
    ap.add_argument("--physical", type=int, default=128, help="examples per forward/backward chunk")
    ap.add_argument(
        "--plain-sampling", default="random,group_by_length", help="comma-separated: random, group_by_length"
    )
    ap.add_argument(
        "--lora", action="store_true", help="keep the config's model.lora adapters (default: full fine-tuning)"
    )
    ap.add_argument(
        "--lap2-plain-cuts",
        action="store_true",
        help="add an arm 'lap2 plain cuts': Lap2Trainer cutting every --physical examples (before / after of "
        "padding-optimal chunks in one run)",
    )
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", help="write the markdown report here too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is set-up)")
    args.plain_sampling = [x.strip() for x in args.plain_sampling.split(",") if x.strip()]
    if not args.plain_sampling or not set(args.plain_sampling) <= {"random", "group_by_length"}:
        ap.error(f"--plain-sampling: random and/or group_by_length, got {args.plain_sampling}")

    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            lap2 = _lap2_trainer(args, os.path.join(tmp, f"lap2-{r}"))
            arms = [("lap2", run_lap2, lap2)]
            if args.lap2_plain_cuts:
                before = _lap2_trainer(args, os.path.join(tmp, f"lap2-plain-cuts-{r}"))
                arms.append(("lap2 plain cuts", lambda tr: run_lap2(tr, plain_cuts=True), before))
            for sampling_ in args.plain_sampling:
                # Same weights and trainable set for every arm: copied before the engine attaches at train().
                out = os.path.join(tmp, f"plain-{sampling_}-{r}")
                plain = _plain_trainer(lap2, copy.deepcopy(lap2.model), out, args, sampling_)
                arms.append((f"plain {sampling_}", run_plain, plain))
            if r % 2:
                arms.reverse()
            got = {}
            for name, fn, trainer in arms:
                got[name] = fn(trainer)
                print(f"round {r}: {name} median step {got[name]['median']:.2f} s", flush=True)
            rounds.append(got)

    report = _report(args, rounds, argv)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(report)
    return 0


def _report(args, rounds: list[dict], argv) -> str:
    names = list(rounds[0])
    plains = [n for n in names if n.startswith("plain")]
    lap2s = [n for n in names if not n.startswith("plain")]
    med = {arm: statistics.median(r[arm]["median"] for r in rounds) for arm in names}
    mean = {arm: statistics.median(r[arm]["mean"] for r in rounds) for arm in names}
    plan = rounds[0]["lap2"]["plan"]
    lines = [
        f"# One DP training run against a plain transformers.Trainer run ({args.steps} steps of {args.batch})",
        "",
        f"Command: `python benchmarks/bench_epoch.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; machine: "
        f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; config {args.config}, mechanism {plan.mechanism}, noised coordinates {plan.dim:,}, "
        f"physical batch {args.physical}, rounds {args.rounds}.",
        "",
        "| arm | mean step (s) | median step (s) | first step (s) | padded tokens per step | per-round means |",
        "|---|---|---|---|---|---|",
    ]
    for arm in (*plains, *lap2s):
        per = ", ".join(f"{r[arm]['mean']:.2f}" for r in rounds)
        first = statistics.median(r[arm]["first"] for r in rounds)
        tokens = statistics.median(r[arm]["per_step"].get("tokens", 0.0) for r in rounds)
        lines.append(f"| {arm} | {mean[arm]:.2f} | {med[arm]:.2f} | {first:.2f} | {tokens:,.0f} | {per} |")
    lines.append("")
    for arm in plains:
        for mine in lap2s:
            lines.append(
                f"**Ratio {mine} / {arm}: {mean[mine] / mean[arm]:.3f}x (mean step)**, "
                f"{med[mine] / med[arm]:.3f}x (median step)  "
            )
    lines += ["", "Where a step's time goes (seconds per step after the first, median over rounds):", ""]
    lines += [
        "| part | " + " | ".join(lap2s + plains) + " |",
        "|---|" + "---|" * (len(lap2s) + len(plains)),
    ]

    def cell(arm, key):
        return f"{statistics.median(r[arm]['per_step'].get(key, 0.0) for r in rounds):.3f}"

    shared = ("padding collator", "optimizer")
    for phase in PHASES:
        mine = " | ".join(cell(a, phase) for a in lap2s)
        others = " | ".join(cell(a, phase) if phase in shared else "" for a in plains)
        lines.append(f"| {phase} | {mine} | {others} |")
    fwd_bwd = " | ".join(cell(a, "forward and backward") for a in plains)
    lines.append(f"| forward and backward (plain: `training_step`) |{' |' * len(lap2s)} {fwd_bwd} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
