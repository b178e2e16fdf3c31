"""benchmarks/sst2_table.py: which run is a table row, a repeat or a variant, and what its table line says."""

import importlib.util
import json
import os

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location("sst2_table", os.path.join(ROOT, "benchmarks", "sst2_table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_run(root, name, *, mech, eps, acc, lora=False, lr=5e-4, clip=0.1):
    d = os.path.join(root, "runs", name)
    os.makedirs(d)
    metrics = {
        "run": name,
        "mechanism": mech,
        "noise": 0.7818,
        "clip_norm": clip,
        "target_epsilon": eps,
        "epsilon_spent": eps,
        "delta": 7.424e-6,
        "sample_rate": 0.0152,
        "steps_planned": 198,
        "steps_taken": 198,
        "noised_coordinates": 332546 if lora else 10845698,
        "num_train_examples": 63981,
        "eval_accuracy": acc,
        "evaluations": [],
    }
    with open(os.path.join(d, "metrics.json"), "w") as fh:
        json.dump(metrics, fh)
    with open(os.path.join(d, "command.txt"), "w") as fh:
        fh.write(f"python scripts/finetune.py --config configs/minilm/{name}.yaml\nmachine: m\ndate: d\n")
    cfg = {"model": {"lora": {"r": 8}} if lora else {}, "training": {"learning_rate": lr}}
    with open(os.path.join(d, "config.yaml"), "w") as fh:
        yaml.safe_dump(cfg, fh)


def test_rows_repeats_and_variants(tmp_path):
    mod = _module()
    root = str(tmp_path)
    _write_run(root, "sst2_eps3738_gaussian", mech="gaussian", eps=3.7382, acc=0.8211)
    _write_run(root, "sst2_eps0538_gaussian_seed1", mech="gaussian", eps=0.5384, acc=0.8005)
    _write_run(root, "sst2_eps0538_gaussian", mech="gaussian", eps=0.5384, acc=0.7947)
    _write_run(
        root, "sst2_eps3738_gaussian_lora", mech="gaussian", eps=3.7382, acc=0.8394, lora=True, lr=3e-3, clip=3.5
    )
    _write_run(root, "sst2_eps3738_gaussian_c10", mech="gaussian", eps=3.7382, acc=0.8383, lr=1e-3, clip=10.0)
    lora = dict(lora=True, lr=3e-3, clip=3.5)
    _write_run(root, "sst2_eps0538_lap2_lora", mech="lap2", eps=0.5384, acc=0.8200, **lora)
    _write_run(root, "sst2_eps0538_lap2_lora_seed1", mech="lap2", eps=0.5384, acc=0.8100, **lora)
    runs = mod.load_runs(root)
    kinds = {r["run"]: mod._kind(r) for r in runs}
    assert kinds == {
        "sst2_eps3738_gaussian": "main",
        "sst2_eps0538_gaussian": "main",
        "sst2_eps0538_gaussian_seed1": "seed1",
        "sst2_eps3738_gaussian_lora": "variant",
        "sst2_eps3738_gaussian_c10": "variant",
        "sst2_eps0538_lap2_lora": "variant",
        "sst2_eps0538_lap2_lora_seed1": "seed1",  # a repeat of the variant (it was listed as another variant)
    }
    lines = mod.table(runs).splitlines()
    main_3738 = next(x for x in lines if x.startswith("| 3.7382 | gaussian | "))
    assert "82.11%" in main_3738  # the variants do not replace the table's own row
    main_0538 = next(x for x in lines if x.startswith("| 0.5384 | gaussian | "))
    assert "79.47%" in main_0538 and "80.05%" in main_0538  # the repeat sits in "other seeds"
    variants = [x for x in lines if x.startswith("| 3.7382 | gaussian, ")]
    assert len(variants) == 2
    assert "full fine-tuning (n = 10,845,698, C = 10.0, lr 0.001)" in variants[0] and "83.83%" in variants[0]
    assert "LoRA adapters + head (n = 332,546, C = 3.5, lr 0.003)" in variants[1] and "83.94%" in variants[1]
    assert all("| - |" in x.split("%")[1] for x in variants)  # no other seeds
    lap2_lora = [x for x in lines if x.startswith("| 0.5384 | lap2, ")]
    assert len(lap2_lora) == 1 and "| 82.00% | 81.00% |" in lap2_lora[0]  # its repeat sits in "other seeds"
    main_lap2 = next(x for x in lines if x.startswith("| 0.5384 | lap2 | "))
    assert "81.00%" not in main_lap2  # a variant's repeat is not the table row's repeat


def test_zero_shot_start_is_its_own_line(tmp_path):
    """The untrained starting point is listed at epsilon 0, apart from the non-private row, and adds no
    empty epsilon-0 block of mechanism rows (both failed before ``--zero-shot`` existed)."""
    mod = _module()
    root = str(tmp_path)
    _write_run(root, "sst2_eps3738_gaussian", mech="gaussian", eps=3.7382, acc=0.8211)
    _write_run(root, "sst2_nonprivate", mech="none", eps=None, acc=0.8899)
    d = os.path.join(root, "runs", mod.ZERO_SHOT)
    os.makedirs(d)
    with open(os.path.join(d, "metrics.json"), "w") as fh:
        json.dump(
            {
                "run": mod.ZERO_SHOT,
                "mechanism": "none",
                "trained": False,
                "target_epsilon": 0.0,
                "epsilon_spent": 0.0,
                "steps_taken": 0,
                "steps_planned": 0,
                "eval_accuracy": 0.6961,
            },
            fh,
        )
    with open(os.path.join(d, "command.txt"), "w") as fh:
        fh.write("python benchmarks/sst2_table.py --zero-shot\nmachine: m\ndate: d\n")
    runs = mod.load_runs(root)
    assert {r["run"]: mod._kind(r) for r in runs}[mod.ZERO_SHOT] == "zero-shot"
    lines = mod.table(runs).splitlines()
    assert [x for x in lines if x.startswith("| 0 | none (zero-shot head")] and "69.61%" in lines[-1]
    assert not [x for x in lines if x.startswith("| 0.0 |")]
    assert next(x for x in lines if x.startswith("| inf | none (non-private) |")).count("88.99%") == 1


def test_zero_shot_evaluates_the_model_as_built(tmp_path):
    """``zero_shot`` trains nothing: its accuracy is that of the config's model evaluated before any step."""
    from conftest import write_tiny_glue_run

    from lap2_hf.finetune import prepare

    mod = _module()
    model_dir = write_tiny_glue_run(tmp_path, (("train", 30), ("dev", 20)))
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_file": str(tmp_path / "train.tsv"), "validation_file": str(tmp_path / "dev.tsv")},
        "privacy": {"mechanism": "gaussian", "target_epsilon": 2.0, "expected_batch_size": 10, "seed": 1},
        "training": {"use_cpu": True, "disable_tqdm": True, "output_dir": str(tmp_path / "out")},
        "run": {"name": "tiny", "results_dir": str(tmp_path / "r")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = mod.zero_shot(str(path), str(tmp_path / "table"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "r").exists()  # no checkpoint, no run results
    want = prepare(["--config", str(path)]).trainer.evaluate()
    assert summary["eval_accuracy"] == want["eval_accuracy"] and summary["eval_loss"] == want["eval_loss"]
    saved = json.loads((tmp_path / "table" / "runs" / mod.ZERO_SHOT / "metrics.json").read_text())
    assert saved == summary and saved["steps_taken"] == 0 and saved["epsilon_spent"] == 0.0
