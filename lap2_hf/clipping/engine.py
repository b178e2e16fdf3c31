"""GradClipper: per-sample gradient norms and clipped gradient sums in one forward and one backward.

Usage, per physical batch of B examples (the trainer does this for you)::

    clipper = GradClipper(model, clip_norm=C, norm="l2")      # attaches; checks every trainable
    with clipper.capture(batch_size=B):                       # parameter is covered by a rule
        per_example_loss = ...                                # (B,) -- never a mean over the batch
        per_example_loss.sum().backward()
    norms = clipper.clip_and_accumulate()                     # (B,); adds sum_i c_i g_i to clipper.summed
    ...                                                       # more physical batches accumulate
    grads = clipper.pop_summed()                              # {param: clipped sum}, then add noise

``c_i = min(1, C / ||g_i||)`` with ``||.||`` the L2 norm (``gaussian``, ``lap2``) or the L1 norm
(standard ``laplace``), DESIGN.md section 1. Per-sample norms come from the kept layer inputs and output
gradients (:mod:`.contributions`); autograd never forms an unclipped parameter gradient.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import Tensor, nn

from .contributions import Contribution, clipped_sum, l1_norms, sq_norms
from .layers import Tap, rule_for


class UnsupportedLayerError(TypeError):
    """A trainable parameter belongs to a module no clipping rule covers."""


class GradClipper:
    """Attach per-sample clipping to ``model``; see the module docstring.

    Args:
        model: any ``nn.Module`` (HF ``PreTrainedModel``, peft ``PeftModel``...). Frozen parameters
            are ignored; every trainable one must be covered by a rule in :mod:`.layers`.
        clip_norm: the per-sample bound ``C > 0``.
        norm: ``"l2"`` (Gaussian, Lap2) or ``"l1"`` (standard Laplace).
    """

    def __init__(self, model: nn.Module, *, clip_norm: float, norm: str = "l2"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(clip_norm, (int, float)) and clip_norm > 0 and clip_norm < float("inf")):
            raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm!r}")
        if norm not in ("l2", "l1"):
            raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")
        self.model = model
        self.clip_norm = float(clip_norm)
        self.norm = norm
        self.capturing = False
        self.batch_size: int | None = None
        self.params: list[nn.Parameter] = _unique(p for p in model.parameters() if p.requires_grad)
        if not self.params:
            raise ValueError("model has no trainable parameters (requires_grad=True): nothing to train privately")
        self.taps: list[Tap] = []
        self._build_taps()
        self.summed: dict[nn.Parameter, Tensor] = {}
        self._reset_batch()
        self._attached = False
        self.attach()

    # -- set-up ------------------------------------------------------------------------------------
    def _build_taps(self) -> None:
        uncovered, covered = [], set()
        for name, module in self.model.named_modules():
            own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            rule = rule_for(module)
            if rule is None:
                uncovered.append(f"{name or '<root>'} ({type(module).__name__}): {', '.join(own)}")
                continue
            tap = rule(self, name, module)
            self.taps.append(tap)
            covered.update(id(p) for p in tap.params.values())
        if uncovered:
            raise UnsupportedLayerError(
                "per-sample clipping has no rule for these modules with trainable parameters:\n  "
                + "\n  ".join(uncovered)
                + "\nFreeze them (requires_grad=False), train through peft LoRA, or register a rule."
            )
        missing = [p for p in self.params if id(p) not in covered]
        if missing:  # pragma: no cover - named_modules visits every parameter's owner
            raise UnsupportedLayerError(f"{len(missing)} trainable parameters are not owned by any module")

    @property
    def num_trainable(self) -> int:
        """Number of noised coordinates n (the Lap2 accountant's dimension)."""
        return sum(p.numel() for p in self.params)

    def attach(self) -> None:
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

    @contextlib.contextmanager
    def capture(self, *, batch_size: int):
        """Record per-sample contributions of the forward/backward run inside the block."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._reset_batch()
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

    def compute_dtype(self, t: Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def _on_forward(self, tap: Tap) -> None:
        for p in tap.params.values():
            self._calls[p] += 1

    def _on_backward(self, tap: Tap, contribs: dict[nn.Parameter, Contribution]) -> None:
        for p, c in contribs.items():
            lst = self._contribs[p]
            lst.append(c)
            if len(lst) == self._calls[p]:  # every call of a shared parameter has reported
                self._finalise(p)

    def _finalise(self, p: nn.Parameter) -> None:
        if id(p) in self._finalised or not self._contribs.get(p):
            return
        lst = self._contribs[p]
        part = l1_norms(lst, p.shape) if self.norm == "l1" else sq_norms(lst, p.shape)
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
        """``c_i = min(1, C / ||g_i||)`` (and 1 for a zero gradient)."""
        return (self.clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)

    @torch.no_grad()
    def clip_and_accumulate(self) -> Tensor:
        """Add ``sum_i c_i g_i`` of the captured batch to :attr:`summed`; returns the norms ``(B,)``."""
        norms = self.per_sample_norms()
        factors = self.clip_factors(norms)
        # Pop as we go: each kept input / output gradient is freed right after its last use (an input
        # shared by Q, K and V goes with the third), so the peak never holds all of them plus the sums.
        while self._contribs:
            p, lst = self._contribs.popitem()
            part = clipped_sum(lst, factors, p.shape)
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
