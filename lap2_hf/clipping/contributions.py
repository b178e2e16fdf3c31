"""Per-sample gradient contributions and the norms / clipped sums computed from them.

A layer call contributes to the per-sample gradient of each of its parameters in one of two forms:

* :class:`Factored` -- ``grad_i = sum_t left[i, t] (outer) right[i, t]`` for a 2-D parameter of shape
  ``(p, d)``. ``left`` is dense ``(B, T, p)`` (Linear: output gradients; GPT-2 Conv1D: inputs) or an
  index tensor ``(B, T)`` into the ``p`` rows (Embedding: token ids, i.e. a one-hot left factor).
  ``right`` is dense ``(B, T, d)``. Nothing of size ``B * p * d`` needs to exist.
* :class:`Dense` -- the per-sample gradient itself, ``(B, *param.shape)``, for small parameters
  (biases, LayerNorm / RMSNorm weights).

Norms (docs/design.md §4; Li et al. 2022, "Large language models can be strong differentially
private learners", section 4): for one factored contribution

    ||grad_i||_F^2 = sum_{t,s} (left_t . left_s)(right_t . right_s) = <L_i L_i^T, R_i R_i^T>   (ghost norm)

costs about ``T^2 (p + d)`` multiply-adds per sample (two Grams and their product), and the clipped sum
then costs ``T p d`` more (one matmul over the kept factors, below). Instantiating ``grad_i`` costs ``T p d``
(the outer products) plus ``p d`` (its squares), and the instantiated gradients are then *kept* in place of
the factors, so the clipped sum is a weighted sum over the batch, ``p d`` (the "mixed" choice of Bu et al. 2023's
book-keeping, BK-MixOpt: an instantiated per-sample gradient is never formed twice). :func:`ghost_is_cheaper`
compares the two totals per layer. Memory decides too: the ``(B, p, d)`` gradients replace the factors
``(B, T, p + d)`` until the clip, so they are instantiated only when at most ``memory_ratio`` times the
factors' size (:data:`INSTANTIATE_MEMORY_RATIO` = 1 by default: the choice never raises what a step keeps;
0 = ghost norms everywhere). For MiniLM's 384 x 384 and 1536 x 384 projections that
is the Gram form up to T = 191 and T = 307 and instantiation beyond (by FLOPs alone, instantiation would win
from T = 20 and T = 25).

Inputs shared by several layers (Q, K and V read one hidden state) need their Gram ``R R^T`` once: a
:class:`GramCache` keeps the last one while the same tensor comes back (backward visits the three
projections one after another).

A parameter used by several calls (tied embedding / LM head, shared layers) gets the norm of the *sum*
of its contributions, with cross terms ``2 <G^k_i, G^l_i>`` computed by the same Gram trick, so
per-sample contributions are summed before the norm, never after.

Clipped sum (book-keeping, Bu et al. 2023, "Differentially private optimization on large model at
small cost"): with clip factors ``c_i`` known, ``sum_i c_i grad_i = (c * left)^T right`` is one matmul
over the kept factors, so no second backward pass is needed.

Written by hand because no library exposes ghost norms with tied-weight cross terms and one-pass
book-keeping over Hugging Face layers (Opacus' fast gradient clipping needs two backward passes and
covers Linear / Embedding only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Factored:
    """``grad_i = sum_t left[i,t] (outer) right[i,t]`` for a 2-D parameter of shape ``(rows, d)``.

    What a rule returns for a matmul-like layer: e.g. ``y = x W^T`` with ``W`` of shape ``(p, d)`` gives
    ``Factored(left=dL/dy (B, T, p), right=x (B, T, d), rows=p)``. See the module docstring.
    """

    left: Tensor  # (B, T, p) dense or (B, T) long indices into p
    right: Tensor  # (B, T, d)
    rows: int  # p, the parameter's first dimension

    @property
    def indexed(self) -> bool:
        """True when ``left`` holds row indices (a one-hot left factor, as for embeddings)."""
        return not self.left.is_floating_point()

    @property
    def seq_len(self) -> int:
        """T, the positions summed over per sample."""
        return self.right.shape[1]


@dataclass(frozen=True)
class Dense:
    """Instantiated per-sample gradient ``(B, *param.shape)`` (for small parameters: biases, norm weights)."""

    grad: Tensor


Contribution = Factored | Dense


#: Default of ``memory_ratio`` (:func:`ghost_is_cheaper`, ``GradClipper(instantiate_memory_ratio=...)``):
#: instantiate a layer's per-sample gradients ``(B, p, d)`` only when they are at most this many times the
#: factors they replace, ``(B, T, p + d)`` (``(B, T, d)`` plus T indices for an embedding). See the module
#: docstring.
INSTANTIATE_MEMORY_RATIO = 1.0


def ghost_is_cheaper(
    *, seq_len: int, rows: int, cols: int, indexed: bool = False, memory_ratio: float = INSTANTIATE_MEMORY_RATIO
) -> bool:
    """Whether the ghost norm of a ``(rows, cols)`` parameter with ``seq_len`` positions per sample is the
    route to take (module docstring; Bu et al. 2023, the ghost / instantiate choice of their BK-MixOpt).

    Multiply-adds per sample, norm plus clipped sum: ghost ``T^2 (p + d + 1) + T p d`` (dense left factor) or
    ``T^2 (d + 2) + T d`` (indexed: the left Gram is a comparison of ids, the sum a scatter of T rows);
    instantiation ``T p d + 2 p d`` (dense) or ``T d + 3 p d`` (indexed: a scatter into a zeroed ``p x d``
    table), whose gradient is then reused for the clipped sum. Ghost is also taken whenever the instantiated
    gradient would exceed ``memory_ratio`` times the factors it replaces (``memory_ratio = 0``: always ghost).
    """
    t, p, d = seq_len, rows, cols
    if indexed:
        ghost, inst, kept = t * t * (d + 2) + t * d, t * d + 3 * p * d, t * (d + 1)
    else:
        ghost, inst, kept = t * t * (p + d + 1) + t * p * d, t * p * d + 2 * p * d, t * (p + d)
    return ghost <= inst or p * d > memory_ratio * kept


class GramCache:
    """The Gram ``R R^T`` ``(B, T, T)`` of the last right factor, reused while the same tensor comes back.

    Keyed on the tensor's storage, shape, strides, dtype and version counter, and it holds a reference to the
    tensor, so its memory cannot be freed and reused by another tensor while the entry lives. One entry: Q, K
    and V (which share an input) are visited consecutively by backward, and one ``(B, T, T)`` tensor is all
    it keeps.
    :attr:`computed` counts the Grams formed (for tests and profiles).
    """

    def __init__(self):
        self._key = None
        self._right: Tensor | None = None
        self._gram: Tensor | None = None
        self.computed = 0

    def right_gram(self, right: Tensor) -> Tensor:
        """``right @ right^T`` over the last two dimensions, ``(B, T, T)``."""
        # _version: an in-place change of the same tensor (which autograd would not make) still misses.
        key = (right.data_ptr(), tuple(right.shape), right.stride(), right.dtype, right.device, right._version)
        if self._gram is None or key != self._key:
            self._gram = torch.bmm(right, right.transpose(1, 2))
            self._key, self._right = key, right
            self.computed += 1
        return self._gram

    def clear(self) -> None:
        """Drop the entry (the engine does so when a batch's capture starts and when it is clipped)."""
        self._key = self._right = self._gram = None


def _left_gram(x: Factored, y: Factored) -> Tensor:
    """``(B, Tx, Ty)`` inner products of left factors; one-hot factors need no matmul."""
    if not x.indexed and not y.indexed:
        return torch.bmm(x.left, y.left.transpose(1, 2))
    if x.indexed and y.indexed:
        return (x.left[:, :, None] == y.left[:, None, :]).to(x.right.dtype)
    if x.indexed:  # <onehot(x_t), y_s> = y[s, x_t]
        ids = x.left[:, None, :].expand(-1, y.left.shape[1], -1)  # (B, Ty, Tx)
        return torch.gather(y.left, 2, ids).transpose(1, 2)
    return _left_gram(y, x).transpose(1, 2)


def _pair_inner(x: Factored, y: Factored, cache: GramCache | None = None) -> Tensor:
    """``<grad^x_i, grad^y_i>_F`` for every sample i, ``(B,)``, without instantiating either."""
    if cache is not None and x is y:
        right = cache.right_gram(x.right)  # (B, T, T)
    else:
        right = torch.bmm(x.right, y.right.transpose(1, 2))  # (B, Tx, Ty)
    return (_left_gram(x, y) * right).sum(dim=(1, 2))


def instantiate(c: Contribution, shape: torch.Size, *, out: Tensor | None = None) -> Tensor:
    """Per-sample gradient ``(B, *shape)`` of one contribution (O(B p d) memory): for a dense factored
    layer ``grad_b = sum_t left_bt (outer) right_bt``, one batched matmul ``left_b^T right_b``.

    ``out``: optional ``(B, p, d)`` buffer for a dense factored contribution, written in place and returned
    reshaped, so that a caller looping over chunks reuses one allocation (:func:`l1_norms`).
    """
    if isinstance(c, Dense):
        return c.grad
    batch, _, d = c.right.shape
    if c.indexed:
        # Scatter each row's gradient into sample-offset rows of a (B*p, d) table.
        offsets = torch.arange(batch, device=c.left.device)[:, None] * c.rows
        table = c.right.new_zeros(batch * c.rows, d)
        table.index_add_(0, (c.left + offsets).reshape(-1), c.right.reshape(-1, d))
        return table.view(batch, *shape)
    # (B, p, T) @ (B, T, d) -> (B, p, d); the same kernel einsum("btp,btd->bpd") dispatches to.
    grad = torch.bmm(c.left.transpose(1, 2), c.right, out=out)
    return grad.reshape(batch, *shape)


def sq_norms(
    contribs: list[Contribution],
    shape: torch.Size,
    *,
    cache: GramCache | None = None,
    memory_ratio: float = INSTANTIATE_MEMORY_RATIO,
) -> tuple[Tensor, list[Contribution]]:
    """Squared L2 norm ``(B,)`` of each sample's gradient summed over ``contribs`` (same parameter), and the
    contributions :func:`clipped_sum` should use for it.

    One factored contribution takes the route :func:`ghost_is_cheaper` picks; when that is instantiation,
    the second value is ``[Dense(grad)]``, the per-sample gradients just formed, so that the clipped sum
    reuses them instead of repeating the ``T p d`` matmul (the factors can then be freed). Otherwise it is
    ``contribs`` unchanged. ``cache`` shares the input Gram with other parameters reading the same input.
    """
    if len(contribs) == 1:
        c = contribs[0]
        if isinstance(c, Dense):
            return c.grad.flatten(1).pow(2).sum(1), contribs
        if ghost_is_cheaper(
            seq_len=c.seq_len, rows=shape[0], cols=c.right.shape[-1], indexed=c.indexed, memory_ratio=memory_ratio
        ):
            return _pair_inner(c, c, cache), contribs
        grad = instantiate(c, shape)  # (B, *shape)
        return grad.flatten(1).pow(2).sum(1), [Dense(grad)]
    dense = [c for c in contribs if isinstance(c, Dense)]
    factored = [c for c in contribs if isinstance(c, Factored)]
    if dense and factored:
        # Mixed forms on one parameter do not occur with the built-in rules; stay exact anyway.
        total = sum(instantiate(c, shape) for c in contribs)
        return total.flatten(1).pow(2).sum(1), contribs
    if dense:
        return sum(c.grad for c in dense).flatten(1).pow(2).sum(1), contribs
    total = 0
    for k, x in enumerate(factored):
        total = total + _pair_inner(x, x)
        for y in factored[k + 1 :]:
            total = total + 2 * _pair_inner(x, y)
    return total, contribs


def _indexed_l1(c: Factored) -> Tensor:
    """Per-sample L1 norm of an embedding gradient: rows hit by the same (sample, id) add first."""
    batch, _, d = c.right.shape
    keys = (c.left + torch.arange(batch, device=c.left.device)[:, None] * c.rows).reshape(-1)
    uniq, inverse = torch.unique(keys, return_inverse=True)
    rows = c.right.new_zeros(uniq.numel(), d).index_add_(0, inverse, c.right.reshape(-1, d))
    out = c.right.new_zeros(batch)
    return out.index_add_(0, torch.div(uniq, c.rows, rounding_mode="floor"), rows.abs().sum(1))


def _factored_l1(c: Factored, chunk: int) -> Tensor:
    """Per-sample L1 norm of ``sum_t left_t (outer) right_t``, ``chunk`` samples at a time into one reused
    ``(chunk, p, d)`` buffer, made absolute in place: a fresh buffer per chunk (tens of MiB) cost more than
    the matmul itself on CPU (allocation and page faults), about 2.5x the whole norm (measured on MiniLM's
    layers at B = 128, T = 16). Same kernel as :func:`instantiate`, so the same numbers."""
    batch, p, d = c.right.shape[0], c.left.shape[-1], c.right.shape[-1]
    out = c.right.new_empty(batch)
    buf = None
    for start in range(0, batch, chunk):
        part = _slice(c, start, start + chunk)
        size = part.right.shape[0]
        if buf is None or buf.shape[0] != size:
            buf = c.right.new_empty(size, p, d)  # (b, p, d)
        instantiate(part, torch.Size((p, d)), out=buf)
        out[start : start + size] = buf.abs_().flatten(1).sum(1)
    return out


def l1_norms(contribs: list[Contribution], shape: torch.Size, *, chunk: int = 8) -> Tensor:
    """Per-sample L1 norm ``(B,)`` of the gradient summed over ``contribs`` (standard Laplace).

    L1 norms have no Gram form, so per-sample gradients are instantiated, ``chunk`` samples at a time
    to bound memory (exact, slower: docs/design.md §4).
    """
    if len(contribs) == 1 and isinstance(contribs[0], Factored):
        return _indexed_l1(contribs[0]) if contribs[0].indexed else _factored_l1(contribs[0], chunk)
    batch = _batch_size(contribs[0])
    out = []
    for start in range(0, batch, chunk):
        part = [_slice(c, start, start + chunk) for c in contribs]
        total = sum(instantiate(c, shape) for c in part)
        out.append(total.flatten(1).abs().sum(1))
    return torch.cat(out)


def clipped_sum(
    contribs: list[Contribution], factors: Tensor, shape: torch.Size, *, keep: Tensor | None = None
) -> Tensor:
    """``sum_i factors_i * grad_i`` summed over ``contribs``: book-keeping, one matmul per contribution.

    ``keep``: optional ``(B',)`` indices of the samples to sum over. The others' rows are dropped from
    both factors before the matmul, not scaled by 0: a left-out sample may hold inf / nan and
    ``0 * inf = nan`` would reach every entry of the sum.
    """
    if keep is not None:
        contribs = [_take(c, keep) for c in contribs]
        factors = factors.index_select(0, keep.to(factors.device))  # (B',)
    total = None
    for c in contribs:
        if isinstance(c, Dense):
            part = torch.tensordot(factors.to(c.grad.dtype), c.grad, dims=1)
        else:
            d = c.right.shape[-1]
            scaled = c.right * factors.to(c.right.dtype)[:, None, None]  # (B, T, d)
            if c.indexed:
                part = scaled.new_zeros(c.rows, d).index_add_(0, c.left.reshape(-1), scaled.reshape(-1, d))
            else:
                part = c.left.reshape(-1, c.rows).t() @ scaled.reshape(-1, d)  # (p, d)
            part = part.view(shape)
        total = part if total is None else total + part
    return total


def _batch_size(c: Contribution) -> int:
    return c.grad.shape[0] if isinstance(c, Dense) else c.right.shape[0]


def _take(c: Contribution, idx: Tensor) -> Contribution:
    """The samples ``idx`` of a contribution (a copy of their rows, made only when some are left out)."""
    if isinstance(c, Dense):
        return Dense(c.grad.index_select(0, idx.to(c.grad.device)))
    idx = idx.to(c.right.device)
    return Factored(c.left.index_select(0, idx), c.right.index_select(0, idx), c.rows)


def _slice(c: Contribution, start: int, stop: int) -> Contribution:
    if isinstance(c, Dense):
        return Dense(c.grad[start:stop])
    return Factored(c.left[start:stop], c.right[start:stop], c.rows)
