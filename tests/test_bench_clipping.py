"""The clipping benchmark's models take every sequence length its over-L table asks for."""

import importlib.util
from pathlib import Path

import torch


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_clipping.py"
    spec = importlib.util.spec_from_file_location("bench_clipping", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_random_roberta_base_takes_512_tokens():
    # RobertaConfig() has 512 positions, but RoBERTa's positions start at pad_token_id + 1: L = 512 failed
    # with "index 512 is out of bounds" before the benchmark used roberta-base's 514.
    bench = _bench()
    model = bench.build_model("roberta-base-random", dropout=False).eval()
    assert model.config.hidden_size == 768 and model.config.num_hidden_layers == 12
    batch = bench.make_batch(model, batch_size=1, seq_len=512, device="cpu")
    with torch.no_grad():
        out = model(**bench.inputs(batch))
    assert out.logits.shape == (1, 2)
