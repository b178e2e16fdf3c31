"""Run the SST-2 table (epsilon x mechanism + non-private) resumably and write its markdown table and plot.

    python benchmarks/sst2_table.py                       # run every missing MiniLM config, then report
    python benchmarks/sst2_table.py --report-only         # rebuild table + plot from finished runs
    python benchmarks/sst2_table.py --only eps0538        # run a subset (substring match on config names)

Each config in ``configs/minilm/`` is one ``scripts/finetune.py`` run in its own process; a run whose
``metrics.json`` exists is skipped, so the table can be built across sessions, one committed piece at a
time. Numbers in the table are read from those files only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["nonprivate", "eps0538", "eps3738", "eps1158", "eps0911"]  # baseline, then the headline
MECHS = ["gaussian", "lap2", "laplace"]
PAPER = {  # reported accuracy (Gaussian, standard Laplace, Lap2), RoBERTa-base, full SST-2
    3.7382: (90.31, 50.34, 90.11), 1.1584: (89.65, 50.21, 83.32), 0.9108: (89.23, 50.15, 89.14), 0.5384: (87.16, 48.97, 87.88),
}


def configs(config_dir: str, only: str | None) -> list[str]:
    files = sorted(glob.glob(os.path.join(config_dir, "sst2_*.yaml")))
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


def load_runs(results_root: str) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(results_root, "runs", "*", "metrics.json"))):
        with open(path) as fh:
            m = json.load(fh)
        with open(os.path.join(os.path.dirname(path), "command.txt")) as fh:
            m["command_txt"] = fh.read().strip().splitlines()
        runs.append(m)
    return runs


def report(results_root: str) -> str:
    runs = load_runs(results_root)
    if not runs:
        return "no finished runs"
    by = {(r["mechanism"], r["target_epsilon"]): r for r in runs}
    lines = [
        "| target epsilon | mechanism | dev accuracy | epsilon spent | noise | steps | paper (RoBERTa-base) |",
        "|---|---|---|---|---|---|---|",
    ]
    for eps in sorted(set(PAPER) | {r["target_epsilon"] for r in runs if r["target_epsilon"] is not None}, reverse=True):
        for mech in MECHS:
            r = by.get((mech, eps))
            paper = PAPER.get(eps)
            ref = f"{paper[{'gaussian': 0, 'laplace': 1, 'lap2': 2}[mech]]:.2f}%" if paper else "-"
            if r is None:
                lines.append(f"| {eps} | {mech} | (not run yet) | | | | {ref} |")
                continue
            noise = f"{'sigma' if mech == 'gaussian' else 'b/C'} = {r['noise']:.4f}"
            lines.append(
                f"| {eps} | {mech} | {100 * r['eval_accuracy']:.2f}% | {r['epsilon_spent']:.4f} | {noise} | "
                f"{r['steps_taken']}/{r['steps_planned']} | {ref} |"
            )
    r = by.get(("none", None))
    lines.append(f"| inf | none (non-private) | {100 * r['eval_accuracy']:.2f}% | inf | - | {r['steps_taken']} | - |" if r
                 else "| inf | none (non-private) | (not run yet) | | | | - |")
    table = "\n".join(lines)
    any_run = runs[0]
    setting = (
        f"N = {any_run['num_train_examples']} training examples, q = {any_run['sample_rate']:.4g}, "
        f"delta = {any_run['delta']:.3g}, C = {any_run['clip_norm']}, n = {any_run['noised_coordinates']:,} noised coordinates"
    )
    cmds = "\n".join(f"- `{r['command_txt'][0]}` ({r['command_txt'][2]}; {r['command_txt'][1]})" for r in sorted(runs, key=lambda r: r["run"]))
    text = (
        "# SST-2 with MiniLM on CPU: accuracy per epsilon and mechanism\n\n"
        f"Measured by `python benchmarks/sst2_table.py` (configs in `configs/minilm/`). Setting: {setting}. "
        "Epsilon is the sound RDP accountant's (DESIGN.md section 2), at the run's delta.\n\n"
        f"{table}\n\n![accuracy vs epsilon](accuracy_vs_epsilon.png)\n\n## Commands, machine, date (one line per run)\n\n{cmds}\n"
    )
    with open(os.path.join(results_root, "README.md"), "w") as fh:
        fh.write(text)
    plot(runs, os.path.join(results_root, "accuracy_vs_epsilon.png"))
    return table


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
    base = [r for r in runs if r["mechanism"] == "none"]
    if base:
        ax.axhline(100 * base[0]["eval_accuracy"], color="gray", ls="--", label="non-private")
    ax.axhline(100 * 444 / 872, color="lightgray", ls=":", label="majority class")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (sound RDP accountant)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("MiniLM, SST-2 subset, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-dir", default=os.path.join(ROOT, "configs", "minilm"))
    ap.add_argument("--results", default=os.path.join(ROOT, "results", "sst2_minilm"))
    ap.add_argument("--only", default=None, help="run only configs whose name contains this")
    ap.add_argument("--report-only", action="store_true")
    args, extra = ap.parse_known_args()
    if not args.report_only:
        run_missing(configs(args.config_dir, args.only), args.results, extra)
    print(report(args.results))


if __name__ == "__main__":
    main()
