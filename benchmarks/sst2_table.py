"""Run the SST-2 table (epsilon x mechanism + non-private) resumably and write its markdown table and plot.

    python benchmarks/sst2_table.py                       # run every missing MiniLM config, then report
    python benchmarks/sst2_table.py --report-only         # rebuild table + plot from finished runs
    python benchmarks/sst2_table.py --only eps0538        # run a subset (substring match on config names)
    python benchmarks/sst2_table.py --tuning              # the held-out tuning runs (configs/minilm/tuning/)
    python benchmarks/sst2_table.py --zero-shot           # dev accuracy of the model every row starts from

Each config in ``configs/minilm/`` is one ``scripts/finetune.py`` run in its own process; a run whose
``metrics.json`` exists is skipped, and a run that was interrupted resumes from its latest complete
checkpoint (``run.resume: auto``; checkpoints live in ``runs/<name>/``, outside git, so a run resumes on
the machine that started it). Commit each finished row. Numbers in the table are read from the runs'
``metrics.json`` files only; the text outside the generated markers of the README is written by hand.

``--zero-shot`` evaluates the model of the table's config before any step (MiniLM with its zero-shot head, built
from two public prompts) on the dev set: the starting point every row is measured against. It trains nothing,
spends no privacy and reads no training example (the training file is only loaded and tokenised by the shared
set-up); it goes in the table as epsilon 0.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["nonprivate", "eps0538", "eps3738", "eps1158", "eps0911"]  # baseline, then the headline
MECHS = ["gaussian", "lap2", "laplace"]
PAPER = {  # reported accuracy (Gaussian, standard Laplace, Lap2), RoBERTa-base, full SST-2
    3.7382: (90.31, 50.34, 90.11),
    1.1584: (89.65, 50.21, 83.32),
    0.9108: (89.23, 50.15, 89.14),
    0.5384: (87.16, 48.97, 87.88),
}


def configs(config_dir: str, only: str | None) -> list[str]:
    files = sorted(f for f in glob.glob(os.path.join(config_dir, "*.yaml")) if not os.path.basename(f).startswith("_"))
    files.sort(key=lambda f: next((i for i, tag in enumerate(ORDER) if tag in f), len(ORDER)))
    return [f for f in files if only is None or only in os.path.basename(f)]


def run_dir(results_root: str, config: str) -> str:
    return os.path.join(results_root, "runs", os.path.splitext(os.path.basename(config))[0])


def run_missing(files: list[str], results_root: str, extra: list[str]) -> None:
    for cfg in files:
        out = run_dir(results_root, cfg)
        if os.path.isfile(os.path.join(out, "metrics.json")):
            print(f"[skip] {cfg}: {out}/metrics.json exists", flush=True)
            continue
        cmd = [sys.executable, "scripts/finetune.py", "--config", os.path.relpath(cfg, ROOT), *extra]
        print(f"[run] {' '.join(cmd)}", flush=True)
        t0 = time.time()
        res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
        if res.returncode != 0:
            raise SystemExit(f"{cfg} failed with exit code {res.returncode}")
        print(f"[done] {cfg} in {time.time() - t0:.0f} s", flush=True)


ZERO_SHOT = "sst2_zeroshot"


def zero_shot(config: str, results_root: str) -> dict:
    """Dev accuracy of ``config``'s model as built (no step): written as ``runs/sst2_zeroshot/metrics.json``."""
    import tempfile

    sys.path.insert(0, ROOT)
    from lap2_hf.finetune import prepare, write_command

    with tempfile.TemporaryDirectory() as tmp:
        run = prepare(["--config", config, "--run.results_dir", tmp, "--training.output_dir", tmp])
        metrics = run.trainer.evaluate()
    summary = {
        "run": ZERO_SHOT,
        "mechanism": "none",
        "trained": False,
        "target_epsilon": 0.0,
        "epsilon_spent": 0.0,
        "steps_planned": 0,
        "steps_taken": 0,
        "eval_accuracy": metrics["eval_accuracy"],
        "eval_loss": metrics["eval_loss"],
        "evaluations": [],
    }
    out = os.path.join(results_root, "runs", ZERO_SHOT)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    write_command(
        out, f"python benchmarks/sst2_table.py --zero-shot --zero-shot-config {os.path.relpath(config, ROOT)}"
    )
    return summary


def load_runs(results_root: str) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(results_root, "runs", "*", "metrics.json"))):
        with open(path) as fh:
            m = json.load(fh)
        with open(os.path.join(os.path.dirname(path), "command.txt")) as fh:
            m["command_txt"] = fh.read().strip().splitlines()
        cfg_path = os.path.join(os.path.dirname(path), "config.yaml")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as fh:
                m["config"] = yaml.safe_load(fh) or {}
        runs.append(m)
    return runs


_SEED_SUFFIX = re.compile(r"_seed\d+$")  # a repeat's run name: <name of the run it repeats>_seed<k>


def _kind(run: dict) -> str:
    """'main', 'seed<k>' (a repeat, with other privacy and training seeds, of the run named without the
    ``_seed<k>`` suffix: :func:`_repeat_of`) or 'variant' (another fixed setting, e.g. LoRA:
    ``sst2_eps3738_gaussian_<tag>``), from the run name ``sst2_eps<eps>_<mechanism>[_<tag>][_seed<k>]``;
    'zero-shot' for the untrained starting point (:func:`zero_shot`)."""
    if run.get("trained") is False:
        return "zero-shot"
    parts = run["run"].split("_")
    if len(parts) <= 3 or parts[1] == "nonprivate":
        return "main"
    seed = _SEED_SUFFIX.search(run["run"])
    return seed.group()[1:] if seed else "variant"


def _repeat_of(run: dict) -> str:
    """The run a 'seed<k>' run repeats: its name without the ``_seed<k>`` suffix."""
    return _SEED_SUFFIX.sub("", run["run"])


def _variant_label(run: dict) -> str:
    """What a variant row trains, with the clipping norm and learning rate of its resolved config."""
    cfg = run.get("config", {})
    lr = cfg.get("training", {}).get("learning_rate")
    what = "LoRA adapters + head" if cfg.get("model", {}).get("lora") else "full fine-tuning"
    return f"{what} (n = {run['noised_coordinates']:,}, C = {run['clip_norm']}, lr {lr})"


def _acc(r: dict | None) -> str:
    return f"{100 * r['eval_accuracy']:.2f}%" if r else "(not run yet)"


def table(runs: list[dict]) -> str:
    """The markdown table: one row per (epsilon, mechanism), repeats and the LoRA row beside it."""
    main = {(r["mechanism"], r["target_epsilon"]): r for r in runs if _kind(r) == "main"}
    repeats: dict = {}  # run name -> its repeats with other seeds
    for r in runs:
        if _kind(r).startswith("seed"):
            repeats.setdefault(_repeat_of(r), []).append(r)

    def other_seeds(r: dict) -> str:
        return ", ".join(_acc(x) for x in sorted(repeats.get(r["run"], []), key=lambda x: x["run"])) or "-"

    lines = [
        (
            "| target epsilon | mechanism | dev accuracy | other seeds | epsilon spent | noise | steps "
            "| paper (RoBERTa-base) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for eps in sorted(
        set(PAPER) | {r["target_epsilon"] for r in runs if r["target_epsilon"] is not None and _kind(r) != "zero-shot"},
        reverse=True,
    ):
        for mech in MECHS:
            r = main.get((mech, eps))
            paper = PAPER.get(eps)
            ref = f"{paper[{'gaussian': 0, 'laplace': 1, 'lap2': 2}[mech]]:.2f}%" if paper else "-"
            if r is None:
                lines.append(f"| {eps} | {mech} | (not run yet) | | | | | {ref} |")
                continue
            rep = other_seeds(r)
            noise = f"{'sigma' if mech == 'gaussian' else 'b/C'} = {r['noise']:.4f}"
            lines.append(
                f"| {eps} | {mech} | {_acc(r)} | {rep} | {r['epsilon_spent']:.4f} | {noise} | "
                f"{r['steps_taken']}/{r['steps_planned']} | {ref} |"
            )
    r = main.get(("none", None))
    lines.append(f"| inf | none (non-private) | {_acc(r)} | - | inf | - | {r['steps_taken'] if r else ''} | - |")
    for r in (x for x in runs if _kind(x) == "zero-shot"):
        lines.append(
            f"| 0 | none (zero-shot head, no training: where every row starts) | {_acc(r)} | - | 0 | - | 0 | - |"
        )
    for r in sorted((x for x in runs if _kind(x) == "variant"), key=lambda x: x["run"]):
        noise = f"{'sigma' if r['mechanism'] == 'gaussian' else 'b/C'} = {r['noise']:.4f}"
        lines.append(
            f"| {r['target_epsilon']} | {r['mechanism']}, {_variant_label(r)} | "
            f"{_acc(r)} | {other_seeds(r)} | {r['epsilon_spent']:.4f} | {noise} | "
            f"{r['steps_taken']}/{r['steps_planned']} | - |"
        )
    return "\n".join(lines)


def report(results_root: str) -> str:
    """Rewrite the generated part of ``<results_root>/README.md`` (between the table markers) and the plot."""
    runs = load_runs(results_root)
    if not runs:
        return "no finished runs"
    text = table(runs)
    any_run = next((r for r in runs if _kind(r) == "main" and r["mechanism"] != "none"), runs[0])
    setting = (
        f"N = {any_run['num_train_examples']:,} training examples, q = {any_run['sample_rate']:.5g}, "
        f"delta = {any_run['delta']:.4g}, C = {any_run['clip_norm']}, n = {any_run['noised_coordinates']:,} noised "
        "coordinates (full fine-tuning)"
    )
    cmds = "\n".join(
        f"- {r['run']}: `{r['command_txt'][0]}` ({r['command_txt'][2]}; {r['command_txt'][1]})"
        for r in sorted(runs, key=lambda r: r["run"])
    )
    generated = (
        f"{START}\nSetting: {setting}. Epsilon: the sound RDP accountant's, at the run's delta.\n\n{text}\n\n"
        "![accuracy vs epsilon](accuracy_vs_epsilon.png)\n\nCommands, machine, date (one line per run):\n\n"
        f"{cmds}\n{END}"
    )
    path = os.path.join(results_root, "README.md")
    old = open(path).read() if os.path.isfile(path) else f"# SST-2 table\n\n{START}\n{END}\n"
    if START in old and END in old:
        new = old[: old.index(START)] + generated + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip() + "\n\n" + generated + "\n"
    with open(path, "w") as fh:
        fh.write(new)
    plot([r for r in runs if _kind(r) in ("main", "zero-shot")], os.path.join(results_root, "accuracy_vs_epsilon.png"))
    return text


def tuning_report(results_root: str) -> str:
    """Held-out accuracy (and loss) of every tuning run at each evaluation, into the tuning README's markers."""
    runs = load_runs(results_root)
    lines = [
        "| run | steps | held-out accuracy at each evaluation (step: accuracy / loss) | final held-out accuracy |",
        "|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: r["run"]):
        evs = ", ".join(
            f"{e['step']}: {100 * e['eval_accuracy']:.1f}% / {e['eval_loss']:.2f}" for e in r["evaluations"]
        )
        lines.append(f"| {r['run']} | {r['steps_taken']} | {evs} | {_acc(r)} |")
    cmds = "\n".join(
        f"- {r['run']}: `{r['command_txt'][0]}` ({r['command_txt'][2]}; {r['command_txt'][1]})"
        for r in sorted(runs, key=lambda r: r["run"])
    )
    text = "\n".join(lines)
    path = os.path.join(results_root, "README.md")
    old = open(path).read() if os.path.isfile(path) else f"# Tuning\n\n{START}\n{END}\n"
    generated = f"{START}\n{text}\n\nCommands, machine, date:\n\n{cmds}\n{END}"
    new = old[: old.index(START)] + generated + old[old.index(END) + len(END) :] if START in old else old + generated
    with open(path, "w") as fh:
        fh.write(new)
    return text


START, END = (
    "<!-- generated by benchmarks/sst2_table.py: begin -->",
    "<!-- generated by benchmarks/sst2_table.py: end -->",
)


def plot(runs: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install '.[plots]'): no plot written")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for mech, marker in zip(MECHS, "os^"):
        pts = sorted((r["target_epsilon"], 100 * r["eval_accuracy"]) for r in runs if r["mechanism"] == mech)
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=mech)
    base = [r for r in runs if r["mechanism"] == "none" and _kind(r) == "main"]
    if base:
        ax.axhline(100 * base[0]["eval_accuracy"], color="gray", ls="--", label="non-private")
    start = [r for r in runs if _kind(r) == "zero-shot"]
    if start:
        ax.axhline(100 * start[0]["eval_accuracy"], color="tab:olive", ls="-.", label="zero-shot start (no training)")
    ax.axhline(100 * 444 / 872, color="lightgray", ls=":", label="majority class")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (sound RDP accountant)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("MiniLM, SST-2 (paper privacy parameters), CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-dir", default=os.path.join(ROOT, "configs", "minilm"))
    ap.add_argument("--results", default=os.path.join(ROOT, "results", "sst2_minilm"))
    ap.add_argument("--only", default=None, help="run only configs whose name contains this")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument(
        "--tuning", action="store_true", help="run/report configs/minilm/tuning into results/sst2_minilm_tuning"
    )
    ap.add_argument("--zero-shot", action="store_true", help="evaluate the table's starting model on dev (no training)")
    ap.add_argument("--zero-shot-config", default=os.path.join(ROOT, "configs", "minilm", "sst2_eps3738_gaussian.yaml"))
    args, extra = ap.parse_known_args()
    if args.zero_shot:
        print(zero_shot(args.zero_shot_config, args.results))
        print(report(args.results))
        return
    if args.tuning:
        args.config_dir = os.path.join(ROOT, "configs", "minilm", "tuning")
        args.results = os.path.join(ROOT, "results", "sst2_minilm_tuning")
        if not args.report_only:
            run_missing(configs(args.config_dir, args.only), args.results, extra)
        print(tuning_report(args.results))
        return
    if not args.report_only:
        run_missing(configs(args.config_dir, args.only), args.results, extra)
    print(report(args.results))


if __name__ == "__main__":
    main()
