"""Run by test_distributed.py under torchrun: 2 DP steps; rank 0 saves the parameters and the batches seen."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_model, toy_dataset  # noqa: E402
from transformers import DataCollatorWithPadding  # noqa: E402

from lap2_hf import Lap2Trainer, Lap2TrainingArguments  # noqa: E402
from lap2_hf.finetune import exit_distributed_worker, leave_together  # noqa: E402


def main(out_dir: str, mechanism: str) -> None:
    torch.manual_seed(0)
    model = tiny_model("bert")
    ds, tok = toy_dataset(40)
    ds = ds.add_column("row", list(range(len(ds))))
    args = Lap2TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"),
        per_device_train_batch_size=3,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dp_seed=7,
        max_steps=2,
        dp_expected_batch_size=10,
        dp_mechanism=mechanism,
        dp_noise_multiplier=0.3,
        dp_clip_norm=0.1,
        disable_tqdm=True,
        remove_unused_columns=False,
        logging_steps=1,
        dp_log_private_stats=True,  # batch sizes compared
    )
    seen = []

    def collate(features):
        seen.append(sorted(f.pop("row") for f in features))
        for f in features:
            f.pop("text", None)
        return DataCollatorWithPadding(tok)(features)

    trainer = Lap2Trainer(model=model, args=args, train_dataset=ds, data_collator=collate)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out_dir, f"rows-{rank}.json"), "w") as fh:
        json.dump(seen, fh)
    if rank == 0:
        torch.save({n: p.detach() for n, p in model.named_parameters()}, os.path.join(out_dir, "params.pt"))
        with open(os.path.join(out_dir, "log.json"), "w") as fh:
            json.dump(trainer.state.log_history, fh)
    leave_together(trainer.accelerator)  # the ending scripts/finetune.py has


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_distributed_worker()  # skip the static destructors that still abort a worker now and then
