"""GradClipper: per-sample gradient norms and clipped gradient sums in one forward and one backward.

Usage, per physical batch of B examples (the trainer does this for you)::

    clipper = GradClipper(model, clip_norm=C, norm="l2")      # attaches; checks every trainable
    with clipper.capture(batch_size=B):                       # parameter is covered by a rule
        per_example_loss = ...                                # (B,) -- never a mean over the batch
        per_example_loss.sum().backward()
    norms = clipper.clip_and_accumulate(losses=per_example_loss)  # (B,); adds sum_i c_i g_i to summed
    ...                                                       # more physical batches accumulate
    grads = clipper.pop_summed()                              # {param: clipped sum}, then add noise

``c_i = min(1, C / ||g_i||)`` with ``||.||`` the L2 norm (``gaussian``, ``lap2``) or the L1 norm
(standard ``laplace``), docs/design.md §2. Per-sample norms come from the kept layer inputs and output
gradients (:mod:`.contributions`); autograd never forms an unclipped parameter gradient.

Non-finite examples (docs/design.md §4): an example whose loss or per-sample norm is inf or NaN (a label of
1e25 overflows float32, a label of inf, a NaN loss) gets clip factor 0 **and** its rows are left out of the
clipped-sum matmuls (``0 * inf = nan``, so scaling alone would still poison the sum). It contributes nothing,
the step stays finite, and it is reported: its entry in the returned norms is ``inf`` and
:attr:`GradClipper.num_nonfinite` counts it.

Modules that mix the examples of a batch (BatchNorm in training mode, see :func:`.layers.batch_mixing_reason`)
are refused at set-up and again at every :meth:`GradClipper.capture`, whether their parameters are trainable
or not: per-sample clipping bounds an example's influence only if no other example's gradient depends on it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .contributions import INSTANTIATE_MEMORY_RATIO, Contribution, GramCache, clipped_sum, l1_norms, sq_norms
from .layers import BATCH_SHARED_EMBEDDINGS, MODE_DEPENDENT_MIXERS, batch_mixing_reason  # also registers built-ins
from .rules import LayerRule, UnsupportedLayerError, rule_for


class GradClipper:
    """Attach per-sample clipping to ``model``; see the module docstring.

    It is the :class:`~.rules.Recorder` of every rule it installs: the rules report calls and per-sample
    contributions through :meth:`record_call` and :meth:`record_contributions`.

    Args:
        model: any ``nn.Module`` (HF ``PreTrainedModel``, peft ``PeftModel``...). Frozen parameters
            are ignored; every trainable one must be covered by a registered rule (:mod:`.rules`;
            the built-in ones are in :mod:`.layers`).
        clip_norm: the per-sample bound ``C > 0``.
        norm: ``"l2"`` (Gaussian, Lap2) or ``"l1"`` (standard Laplace).
        instantiate_memory_ratio: per layer, L2 norms come from the ghost (Gram) form or from per-sample
            gradients instantiated and then reused for the clipped sum, whichever costs fewer FLOPs, but
            instantiated only when the ``(B, p, d)`` gradients are at most this many times the layer's kept
            input and output gradients ``(B, T, p + d)`` (:func:`.contributions.ghost_is_cheaper`). The
            default 1 never raises what a step keeps; 0 takes the ghost form everywhere (the engine before this
            choice; for comparisons);
            larger values trade memory for time at medium sequence lengths. Same numbers either way.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        clip_norm: float,
        norm: str = "l2",
        instantiate_memory_ratio: float = INSTANTIATE_MEMORY_RATIO,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(clip_norm, (int, float)) and clip_norm > 0 and clip_norm < float("inf")):
            raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm!r}")
        if norm not in ("l2", "l1"):
            raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")
        r = instantiate_memory_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < float("inf"):
            raise ValueError(f"instantiate_memory_ratio must be a finite number >= 0, got {r!r}")
        self.instantiate_memory_ratio = float(r)
        self.model = model
        self.clip_norm = float(clip_norm)
        self.norm = norm
        self.capturing = False
        self.batch_size: int | None = None
        self.params: list[nn.Parameter] = _unique(p for p in model.parameters() if p.requires_grad)
        if not self.params:
            raise ValueError("model has no trainable parameters (requires_grad=True): nothing to train privately")
        # Every module that can mix examples depending on its mode; re-checked at each capture because
        # ``model.train()`` (which Lap2Trainer calls every step) flips BatchNorm back to batch statistics.
        self._mixers: list[tuple[str, nn.Module]] = [
            (name or "<root>", m) for name, m in model.named_modules() if isinstance(m, MODE_DEPENDENT_MIXERS)
        ]
        self._check_no_batch_mixing()
        self.taps: list[LayerRule] = []  # one rule instance per covered module
        self._build_taps()
        self.num_nonfinite = 0  # examples left out by the last clip_and_accumulate (non-finite loss or norm)
        self.summed: dict[nn.Parameter, Tensor] = {}
        self.gram_cache = GramCache()  # input Grams shared by layers reading one input (Q, K, V)
        self._reset_batch()
        self._attached = False
        self.attach()

    # -- set-up ------------------------------------------------------------------------------------
    def _check_no_batch_mixing(self) -> None:
        found = [(name, m, batch_mixing_reason(m)) for name, m in self._mixers]
        found = [f"{name} ({type(m).__name__}): {why}" for name, m, why in found if why]
        if found:
            raise UnsupportedLayerError(
                "per-sample clipping needs every example to be processed on its own, but these modules mix the "
                "examples of a batch (freezing their parameters does not help):\n  "
                + "\n  ".join(found)
                + "\nReplace them with GroupNorm or LayerNorm (opacus.validators.ModuleValidator.fix does this for "
                "BatchNorm), or put them in eval mode with track_running_stats=True (module.eval() after "
                "model.train(); Lap2Trainer calls model.train() every step, so there replace them)."
            )

    def _build_taps(self) -> None:
        uncovered, covered, shared = [], set(), []
        for name, module in self.model.named_modules():
            own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in BATCH_SHARED_EMBEDDINGS:
                shared.append(f"{name} ({type(module).__name__}, {tuple(module.weight.shape)})")
                continue
            rule = rule_for(module)
            if rule is None:
                uncovered.append(f"{name or '<root>'} ({type(module).__name__}): {', '.join(own)}")
                continue
            tap = rule(recorder=self, name=name, module=module)
            self.taps.append(tap)
            covered.update(id(p) for p in tap.params.values())
        if shared:
            # Their ids (relative-position buckets, (query_len, key_len)) carry no batch dimension and the
            # output is broadcast over the batch, so autograd has already summed the examples' gradients.
            raise UnsupportedLayerError(
                "these trainable embeddings are indexed by relative-position buckets shared by the whole batch "
                "(see lap2_hf.clipping.BATCH_SHARED_EMBEDDINGS): their output is broadcast over the examples, so "
                "per-example gradients cannot be separated:\n  "
                + "\n  ".join(shared)
                + "\nFreeze them (module.weight.requires_grad_(False)); they hold num_buckets x num_heads values."
            )
        if uncovered:
            raise UnsupportedLayerError(
                "per-sample clipping has no rule for these modules with trainable parameters:\n  "
                + "\n  ".join(uncovered)
                + "\nFreeze them (requires_grad=False), train through peft LoRA, or register a rule for them "
                '(lap2_hf.register_rule; README, "Adding a layer").'
            )
        missing = [p for p in self.params if id(p) not in covered]
        if missing:  # pragma: no cover - named_modules visits every parameter's owner
            raise UnsupportedLayerError(f"{len(missing)} trainable parameters are not owned by any module")

    @property
    def num_trainable(self) -> int:
        """Number of noised coordinates n (the Lap2 accountant's dimension)."""
        return sum(p.numel() for p in self.params)

    @property
    def attached(self) -> bool:
        """Whether the rules' forwards are installed (between construction or :meth:`attach` and :meth:`detach`)."""
        return self._attached

    def attach(self) -> None:
        """Install every rule's forward (done by the constructor; again after :meth:`detach`)."""
        if not self._attached:
            for tap in self.taps:
                tap.install()
            self._attached = True

    def detach(self) -> None:
        """Restore every module's original forward."""
        if self._attached:
            for tap in self.taps:
                tap.remove()
            self._attached = False

    # -- capture -----------------------------------------------------------------------------------
    def _reset_batch(self) -> None:
        self._calls: dict[nn.Parameter, int] = defaultdict(int)
        self._contribs: dict[nn.Parameter, list[Contribution]] = defaultdict(list)
        self._finalised: set[int] = set()
        self._norm_acc: Tensor | None = None
        self.gram_cache.clear()

    @contextlib.contextmanager
    def capture(self, *, batch_size: int):
        """Record per-sample contributions of the forward/backward run inside the block."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._reset_batch()
        self._check_no_batch_mixing()
        self.batch_size = int(batch_size)
        # Park existing .grad so that any gradient autograd produces here is detectable.
        parked = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        self.capturing = True
        try:
            yield self
        finally:
            self.capturing = False
            leaked = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is not None]
            for p, g in zip(self.params, parked):
                p.grad = g
        if leaked:
            raise RuntimeError(
                "these parameters received a gradient outside the clipping rules (used outside their "
                f"module's forward?), so they cannot be clipped per sample: {leaked}"
            )

    # -- the Recorder interface (rules.Recorder) ---------------------------------------------------------
    def compute_dtype(self, t: Tensor) -> torch.dtype:
        """float64 for float64 tensors, float32 for everything else (bf16 / fp16 under autocast included)."""
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def record_call(self, rule: LayerRule) -> None:
        """A tapped forward of ``rule``'s module ran: its parameters wait for one more backward report."""
        for p in rule.params.values():
            self._calls[p] += 1

    def record_contributions(self, rule: LayerRule, contributions: Mapping[nn.Parameter, Contribution]) -> None:
        """One call's per-sample contributions; a parameter's norm is formed once every call has reported,
        so that a shared (tied) parameter gets the norm of the per-sample *sum* (docs/design.md §4)."""
        own = {id(q) for q in rule.params.values()}
        for p, c in contributions.items():
            if id(p) not in own:  # a rule speaks for its own module's trainable parameters only
                raise RuntimeError(
                    f"rule {type(rule).__name__} of {rule.name} reported a contribution for a parameter that is not "
                    "a trainable parameter of its module"
                )
            lst = self._contribs[p]
            lst.append(c)
            if len(lst) == self._calls[p]:  # every call of a shared parameter has reported
                self._finalise(p)

    def _finalise(self, p: nn.Parameter) -> None:
        if id(p) in self._finalised or not self._contribs.get(p):
            return
        lst = self._contribs[p]
        if self.norm == "l1":
            part = l1_norms(lst, p.shape)
        else:
            # An instantiated per-sample gradient replaces the factors, for clip_and_accumulate to reuse.
            part, self._contribs[p] = sq_norms(
                lst, p.shape, cache=self.gram_cache, memory_ratio=self.instantiate_memory_ratio
            )
        self._norm_acc = part if self._norm_acc is None else self._norm_acc + part
        self._finalised.add(id(p))

    # -- results -----------------------------------------------------------------------------------
    @torch.no_grad()
    def per_sample_norms(self) -> Tensor:
        """``(B,)`` per-sample gradient norms (L2 or L1) over all trainable parameters."""
        for p in list(self._contribs):
            self._finalise(p)  # calls whose output did not reach the loss contribute nothing
        if self._norm_acc is None:
            return torch.zeros(self.batch_size or 0)
        return self._norm_acc.sqrt() if self.norm == "l2" else self._norm_acc

    def clip_factors(self, norms: Tensor) -> Tensor:
        """``c_i = min(1, C / ||g_i||)`` (1 for a zero gradient, 0 for a non-finite norm)."""
        factors = (self.clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
        return factors.masked_fill(~torch.isfinite(norms), 0.0)  # C / nan is nan, not 0

    @torch.no_grad()
    def clip_and_accumulate(self, losses: Tensor | None = None) -> Tensor:
        """Add ``sum_i c_i g_i`` of the captured batch to :attr:`summed`; returns the norms ``(B,)``.

        Args:
            losses: optional ``(B,)`` per-example losses of the captured batch. An example whose loss is
                not finite is left out even if its gradient happens to be finite (``loss + nan``).

        Returns:
            The per-sample norms, ``inf`` for every example left out because its loss or norm is not
            finite (it contributes exactly nothing to :attr:`summed`); :attr:`num_nonfinite` counts them.
        """
        norms = self.per_sample_norms()  # (B,)
        bad = ~torch.isfinite(norms)  # (B,) bool
        if losses is not None:
            losses = losses.detach()
            if losses.shape != norms.shape:
                raise ValueError(
                    f"losses must have one entry per example, shape ({norms.shape[0]},), got {tuple(losses.shape)}"
                )
            bad |= ~torch.isfinite(losses).to(bad.device)
        self.num_nonfinite = int(bad.sum())  # one host sync per physical batch
        norms = norms.masked_fill(bad, float("inf"))
        factors = self.clip_factors(norms)  # 0 where bad
        # Rows of a left-out example may hold inf / nan; with none (the usual case) nothing is copied.
        keep = None if self.num_nonfinite == 0 else torch.nonzero(~bad).squeeze(1)
        # Pop as we go: each kept input / output gradient is freed right after its last use (an input
        # shared by Q, K and V goes with the third), so the peak never holds all of them plus the sums.
        while self._contribs:
            p, lst = self._contribs.popitem()
            part = clipped_sum(lst, factors, p.shape, keep=keep)
            del lst
            acc = self.summed.get(p)
            self.summed[p] = part if acc is None else acc + part
        self._reset_batch()
        return norms.detach()

    def pop_summed(self) -> dict[nn.Parameter, Tensor]:
        """The clipped sums accumulated since the last call (zeros for untouched parameters)."""
        out = {}
        for p in self.params:
            s = self.summed.get(p)
            out[p] = s if s is not None else torch.zeros(p.shape, dtype=_acc_dtype(p), device=p.device)
        self.summed = {}
        return out


def _acc_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _unique(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
