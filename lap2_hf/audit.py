"""Empirical privacy auditing: lower bounds on epsilon from one DP-SGD training run (DESIGN.md section 8).

An accountant gives an *upper* bound on epsilon; an audit gives a statistically valid *lower* bound.
If a lower bound ever exceeds the claimed epsilon, the claim is false: the accountant, the noise
calibration or the implementation is wrong. A lower bound below the claim proves nothing about
tightness.

Reference throughout: T. Steinke, M. Nasr, M. Jagielski, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023, arXiv:2305.08846 (cited below as [SNJ23]).

Statistics (pure functions of counts; numpy/scipy only):

* :func:`p_value_one_run` / :func:`epsilon_lower_bound_one_run`: the [SNJ23] test. m canaries are
  included independently with probability 1/2; the auditor guesses "in"/"out" for r of them and
  abstains on the rest; v guesses are correct. Under epsilon-DP the number of correct guesses is
  stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) ([SNJ23] main theorem for pure DP);
  under (eps, delta)-DP the tail picks up the additive term
  ``2 m delta max_{i=1..v} P[v - i <= W < v] / i`` ([SNJ23] Section 5, approximate DP; the p-value is
  the one computed by their Appendix D listing, which we re-derive rather than copy).
* :func:`epsilon_lower_bound_pure`: the delta = 0 case in closed form through the Clopper-Pearson
  lower confidence limit, an independent route to the same number.
* :func:`epsilon_lower_bound_many_runs`: the classical many-run audit (one canary, many training
  runs; Jagielski, Ullman, Oprea 2020; Nasr et al. 2021) with Clopper-Pearson bounds on FPR and FNR.
  Not used by the benchmark: here one run is cheaper, since white-box canaries on disjoint
  coordinates do not interfere.
* :func:`one_run_audit`: guesses from scores for a pre-declared grid of (k+, k-) and a Bonferroni
  correction over the grid, so that choosing the best grid point after seeing the outcome keeps the
  1 - beta confidence.

White-box DP-SGD audit (:func:`white_box_dpsgd_audit`): DP-SGD on a model with Poisson sampling,
the real :class:`~lap2_hf.clipping.GradClipper` and :class:`~lap2_hf.mechanisms.Mechanism`, plus m
crafted gradient canaries on disjoint coordinates, inserted as extra clipped per-sample gradients
of norm exactly C; see that function for the threat model and canary shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import special, stats

__all__ = [
    "p_value_one_run",
    "epsilon_lower_bound_one_run",
    "epsilon_lower_bound_pure",
    "epsilon_lower_bound_many_runs",
    "clopper_pearson_upper",
    "guesses_from_scores",
    "default_guess_grid",
    "one_run_audit",
    "audit_ceiling",
    "OneRunAudit",
    "make_canaries",
    "clip_canaries",
    "default_canary_dim",
    "canary_scores",
    "white_box_dpsgd_audit",
    "WhiteBoxAuditRun",
    "synthetic_task",
]

#: Largest epsilon the search considers. At r guesses the bound cannot exceed about
#: log(r / log(1/beta)) anyway (all guesses right), i.e. < 15 for any r below 10^7.
EPS_SEARCH_MAX = 60.0


# -------------------------------------------------------------------------------------------------
# Statistics
# -------------------------------------------------------------------------------------------------
def _check_counts(num_canaries, num_guesses, num_correct):
    for name, x in (("num_canaries", num_canaries), ("num_guesses", num_guesses), ("num_correct", num_correct)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {x!r}")
    if not num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            f"need num_correct <= num_guesses <= num_canaries, got {num_correct}, {num_guesses}, {num_canaries}"
        )


def _check_prob(name, x, *, open_low=False):
    x = float(x)
    if not (0.0 < x < 1.0 if open_low else 0.0 <= x < 1.0):
        raise ValueError(f"{name} must be in {'(0, 1)' if open_low else '[0, 1)'}, got {x!r}")
    return x


def p_value_one_run(
    *, num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float = 0.0
) -> float:
    """P-value of ``num_correct`` correct guesses out of ``num_guesses`` under (epsilon, delta)-DP.

    [SNJ23]: with W ~ Binomial(r, p), p = e^eps / (1 + e^eps) (the accuracy of eps-randomised response),

        p-value = P[W >= v] + 2 m delta * max_{i = 1..v} P[v - i <= W < v] / i,

    capped at 1. For delta = 0 this is the pure-DP binomial domination of their main theorem; the delta
    term is their approximate-DP extension (Section 5; Appendix D computes the same quantity). m is the
    number of canaries (each included with probability 1/2), r the number of non-abstaining guesses, v
    the number of correct ones. The test is conditional on the guesses, so r may depend on the scores.
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    eps = float(epsilon)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    delta = _check_prob("delta", delta)
    m, r, v = int(num_canaries), int(num_guesses), int(num_correct)
    p = float(special.expit(eps))
    tail = float(stats.binom.sf(v - 1, r, p))  # P[W >= v]
    if delta == 0.0 or v == 0:
        return min(tail, 1.0)
    # P[v - i <= W < v] for i = 1..v is a running sum of the pmf downwards from v - 1.
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p))
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound_one_run(
    *, num_canaries: int, num_guesses: int, num_correct: int, delta: float = 0.0, beta: float = 0.05, tol: float = 1e-6
) -> float:
    """Largest epsilon that the observed guesses reject at confidence ``1 - beta`` ([SNJ23]).

    Returns sup{eps : p_value(eps') < beta for every eps' in [0, eps]} (0 when even eps = 0 is not
    rejected). Scanning up from 0 and stopping at the first crossing, rather than bisecting on the whole
    range, keeps the bound valid even where the delta term makes the p-value non-monotone in eps: an
    algorithm that is (eps*, delta)-DP has p_value(eps*) >= beta with probability >= 1 - beta, and then
    the returned value is below eps*. The delta term uses ``num_canaries`` = m as in [SNJ23].
    """
    beta = _check_prob("beta", beta, open_low=True)

    def pv(e):
        return p_value_one_run(num_canaries=num_canaries, num_guesses=num_guesses, num_correct=num_correct,
                               epsilon=e, delta=delta)

    if pv(0.0) >= beta:
        return 0.0
    lo, step = 0.0, 0.125
    while True:
        hi = min(lo + step, EPS_SEARCH_MAX)
        if pv(hi) >= beta:
            break
        if hi >= EPS_SEARCH_MAX:
            return EPS_SEARCH_MAX  # pragma: no cover - needs ~10^25 guesses
        lo = hi
    while hi - lo > tol:  # invariant: pv(lo) < beta <= pv(hi), no crossing at the scanned points below lo
        mid = 0.5 * (lo + hi)
        if pv(mid) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def epsilon_lower_bound_pure(*, num_guesses: int, num_correct: int, beta: float = 0.05) -> float:
    """delta = 0 lower bound in closed form: logit of the one-sided Clopper-Pearson lower limit.

    P[Binomial(r, p) >= v] = beta exactly when p = BetaInv(beta; v, r - v + 1) (the Clopper-Pearson
    lower confidence limit for a success probability), and p = e^eps / (1 + e^eps); so the pure-DP
    bound of [SNJ23] is ``logit(p_lo)``, clipped at 0. Equal to :func:`epsilon_lower_bound_one_run`
    with delta = 0, computed by a different route (used as a cross-check in the tests).
    """
    _check_counts(num_guesses, num_guesses, num_correct)
    beta = _check_prob("beta", beta, open_low=True)
    if num_correct == 0:
        return 0.0
    p_lo = float(stats.beta.ppf(beta, num_correct, num_guesses - num_correct + 1))
    return max(0.0, float(special.logit(p_lo)))


def clopper_pearson_upper(successes: int, trials: int, *, alpha: float) -> float:
    """One-sided upper Clopper-Pearson limit: the p with P[Binomial(trials, p) <= successes] = alpha."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, trials >= 1; got {successes}, {trials}")
    if successes == trials:
        return 1.0
    return float(stats.beta.ppf(1.0 - alpha, successes + 1, trials - successes))


def epsilon_lower_bound_many_runs(
    *, true_positives: int, false_negatives: int, false_positives: int, true_negatives: int,
    delta: float = 0.0, beta: float = 0.05,
) -> float:
    """Many-run audit: one canary, independent runs with and without it, a fixed membership test.

    (eps, delta)-DP implies FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta (Kairouz et
    al. 2015), so eps >= log((1 - delta - FNR) / FPR) and the symmetric form. FPR and FNR are replaced
    by one-sided Clopper-Pearson upper limits at beta / 2 each (union bound), as in Jagielski, Ullman &
    Oprea 2020 and Nasr et al. 2021, giving a bound that holds with probability >= 1 - beta.
    """
    beta = _check_prob("beta", beta, open_low=True)
    delta = _check_prob("delta", delta)
    pos, neg = true_positives + false_negatives, false_positives + true_negatives
    fpr = clopper_pearson_upper(false_positives, neg, alpha=beta / 2)
    fnr = clopper_pearson_upper(false_negatives, pos, alpha=beta / 2)
    best = 0.0
    for a, b in ((fnr, fpr), (fpr, fnr)):
        if 1.0 - delta - a > 0.0 and b > 0.0:
            best = max(best, math.log((1.0 - delta - a) / b))
    return best


def guesses_from_scores(scores, *, k_pos: int, k_neg: int) -> np.ndarray:
    """[SNJ23] guessing rule: +1 for the ``k_pos`` highest scores, -1 for the ``k_neg`` lowest, 0 else.

    Ties are broken by position (a stable sort), never by the secret membership.
    """
    s = np.asarray(scores, dtype=np.float64)
    m = s.size
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise ValueError(f"need k_pos, k_neg >= 0 and k_pos + k_neg <= {m}, got {k_pos}, {k_neg}")
    order = np.argsort(s, kind="stable")
    g = np.zeros(m, dtype=np.int8)
    if k_neg:
        g[order[:k_neg]] = -1
    if k_pos:
        g[order[m - k_pos:]] = 1
    return g


def default_guess_grid(num_canaries: int) -> list[tuple[int, int]]:
    """A fixed grid of (k+, k-), declared before any score is seen.

    Guess counts r from 5 canaries up to all of them, roughly doubling, either only "in" guesses
    (k- = 0: the informative tail of a subsampled mechanism is the top one, since an included canary
    that was never sampled looks excluded) or split evenly. 2 x ~log2(m) points: the Bonferroni price
    of searching it is small (beta / 20 instead of beta for m = 1000).
    """
    m = int(num_canaries)
    if m < 1:
        raise ValueError(f"num_canaries must be >= 1, got {num_canaries!r}")
    rs, r = [], 5
    while r < m:
        rs.append(r)
        r *= 2
    rs.append(m)
    grid = []
    for r in rs:
        grid.append((r, 0))
        if r >= 2:
            grid.append((r - r // 2, r // 2))
    return list(dict.fromkeys(grid))


def audit_ceiling(*, num_canaries: int, delta: float, beta: float = 0.05, guess_grid=None) -> float:
    """The largest bound :func:`one_run_audit` can return: every guess of the best grid point right.

    A claim above the ceiling cannot be contradicted by this audit whatever the mechanism does. With
    delta > 0 the ceiling stops growing with m (the 2 m delta term of [SNJ23] grows with it): about 5
    at delta = 1e-5 for any m, so claims of epsilon = 8 are out of reach of this test.
    """
    grid = list(guess_grid) if guess_grid is not None else default_guess_grid(num_canaries)
    b = _check_prob("beta", beta, open_low=True) / len(grid)
    return max(
        epsilon_lower_bound_one_run(num_canaries=num_canaries, num_guesses=kp + kn, num_correct=kp + kn,
                                    delta=delta, beta=b)
        for kp, kn in grid
    )


@dataclass(frozen=True)
class OneRunAudit:
    """Result of :func:`one_run_audit`: the bound and the grid point that achieved it."""

    epsilon_lower_bound: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    k_pos: int
    k_neg: int
    delta: float
    beta: float
    grid_size: int
    per_point_beta: float
    all_points: list = field(default_factory=list, repr=False)


def one_run_audit(scores, included, *, delta: float, beta: float = 0.05, guess_grid=None) -> OneRunAudit:
    """One-run audit of [SNJ23] (their Algorithm 1, last steps) with a Bonferroni-corrected guess grid.

    ``scores`` (m,): larger means "more likely included"; computed without looking at ``included``.
    ``included`` (m,) bool: the secret coin flips (each canary in with probability 1/2).
    For every (k+, k-) of ``guess_grid`` (default :func:`default_guess_grid`) the bound of
    :func:`epsilon_lower_bound_one_run` is computed at level ``beta / len(grid)``; the maximum over the
    grid then holds with confidence ``1 - beta`` by the union bound. The grid must not be chosen after
    looking at the outcome.
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1:
        raise ValueError(f"scores and included must be 1-d of equal length, got {s.shape}, {inc.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    m = s.size
    grid = list(guess_grid) if guess_grid is not None else default_guess_grid(m)
    if not grid:
        raise ValueError("guess_grid is empty")
    beta = _check_prob("beta", beta, open_low=True)
    b = beta / len(grid)
    truth = np.where(inc, 1, -1)
    best, points = None, []
    for kp, kn in grid:
        g = guesses_from_scores(s, k_pos=kp, k_neg=kn)
        r = int(np.count_nonzero(g))
        v = int(np.count_nonzero(g == truth))
        eps = epsilon_lower_bound_one_run(num_canaries=m, num_guesses=r, num_correct=v, delta=delta, beta=b)
        points.append((kp, kn, r, v, eps))
        if best is None or eps > best[4]:
            best = (kp, kn, r, v, eps)
    kp, kn, r, v, eps = best
    return OneRunAudit(epsilon_lower_bound=eps, num_canaries=m, num_guesses=r, num_correct=v, k_pos=kp, k_neg=kn,
                       delta=delta, beta=beta, grid_size=len(grid), per_point_beta=b, all_points=points)


# -------------------------------------------------------------------------------------------------
# White-box gradient canaries in a DP-SGD run
# -------------------------------------------------------------------------------------------------
#: Coordinates per Lap2 canary. The Lap2 worst case spreads |g_j| = C / sqrt(k) over as many
#: coordinates as possible (DESIGN.md section 2: the privacy loss grows with k towards the Gaussian
#: limit), while disjoint canaries need m k <= n. At the benchmark's q = 0.1, T = 100 and the b/C
#: calibrated for eps = 1 / 4 / 8 with n = 197,890, the accountant gives a k = 32 canary
#: eps = 0.99 / 3.85 / 7.57 (a one-hot one only 0.91 / 2.86 / 4.55): k = 32 leaves at most 5 % on the table.
DEFAULT_LAP2_CANARY_DIM = 32


def default_canary_dim(mechanism: str) -> int:
    """k, the coordinates per canary, by mechanism (DESIGN.md section 8).

    ``laplace``: 1. Under L1 clipping all the L1 mass on one coordinate is the worst case (a spread
    canary of L1 norm C moves each coordinate by only C / k).
    ``lap2``: :data:`DEFAULT_LAP2_CANARY_DIM`, spread evenly (the L2 worst case of section 2).
    ``gaussian`` and ``none``: 1. Isotropic noise makes every direction equivalent; one coordinate is
    the cheapest way to keep canaries disjoint.
    """
    return DEFAULT_LAP2_CANARY_DIM if mechanism == "lap2" else 1


def make_canaries(*, mechanism: str, num_canaries: int, num_coordinates: int, clip_norm: float,
                  canary_dim: int | None = None, generator=None):
    """m gradient canaries on disjoint random coordinates: ``(index (m, k) long, value (m, k) float64)``.

    Each canary has k coordinates of magnitude C / sqrt(k) and random signs, so its L2 norm is
    exactly C; with k = 1 (one-hot) its L1 norm is C as well. Distinct canaries never share a
    coordinate, so the auditor can read each one's evidence without interference from the others
    (the interference that makes black-box one-run audits loose). The values are then clipped by the
    mechanism's own rule (:func:`clip_canaries`), a no-op except for spread canaries under L1.
    """
    import torch

    k = default_canary_dim(mechanism) if canary_dim is None else int(canary_dim)
    m, n = int(num_canaries), int(num_coordinates)
    if m < 1 or k < 1:
        raise ValueError(f"num_canaries and canary_dim must be >= 1, got {m}, {k}")
    if m * k > n:
        raise ValueError(
            f"{m} disjoint canaries of {k} coordinates need {m * k} trainable coordinates; the model has {n}"
        )
    perm = torch.randperm(n, generator=generator)[: m * k]
    index = perm.view(m, k)
    signs = torch.randint(0, 2, (m, k), generator=generator, dtype=torch.float64).mul_(2).sub_(1)
    value = signs * (float(clip_norm) / math.sqrt(k))
    return index, clip_canaries(value, mechanism=mechanism, clip_norm=clip_norm)


def clip_canaries(value, *, mechanism: str, clip_norm: float):
    """Apply the mechanism's per-sample clipping, min(1, C / ||g||), to each canary (rows of ``value``).

    The same rule as :meth:`GradClipper.clip_factors`: L2 for gaussian and lap2, L1 for laplace, none
    for the non-private baseline. A canary is one more per-sample gradient and gets no exemption.
    """
    if mechanism == "none":
        return value
    p = 1 if mechanism == "laplace" else 2
    norms = value.norm(p=p, dim=1, keepdim=True)
    return value * (float(clip_norm) / norms.clamp_min(1e-12)).clamp(max=1.0)


def canary_scores(observed, value, *, mechanism: str, noise_scale: float, sample_rate: float):
    """Per-step evidence for each canary: ``(log-likelihood ratio (m,), linear score (m,))``, float64.

    ``observed`` (m, k): the residual noisy update on each canary's coordinates in one step (noisy
    clipped sum minus the known data contribution, i.e. canary-if-sampled + noise).
    ``value`` (m, k): the clipped canaries.

    *Linear*: <observed, value> / ||value||^2, summed over steps: the projection of the updates on the
    canary, as for the white-box gradient canaries of [SNJ23]'s DP-SGD experiments.
    *Log-likelihood ratio*: log[(1 - q) + q exp(l)] with l the log density ratio of "canary in this
    step" to "not": for Gaussian noise l = (<y, c> - ||c||^2 / 2) / s^2; for Laplace noise of scale b,
    l = sum_j (|y_j| - |y_j - c_j|) / b. Summed over steps this is the exact log-likelihood ratio of
    "included" vs "excluded" given the auditor's view (Poisson sampling makes the steps independent
    given the past), hence the most powerful score (Neyman-Pearson). It matters for Laplace noise, whose
    optimal test is sign-like rather than linear. For ``none`` there is no density: the LLR slot
    repeats the linear score.
    """
    import torch

    y = observed.to(torch.float64)
    c = value.to(torch.float64)
    csq = (c * c).sum(1)
    lin = (y * c).sum(1) / csq.clamp_min(1e-300)
    if mechanism == "none":
        return lin, lin
    s = float(noise_scale)
    if mechanism == "gaussian":
        step_llr = ((y * c).sum(1) - 0.5 * csq) / (s * s)
    else:
        step_llr = ((y.abs() - (y - c).abs()).sum(1)) / s
    q = float(sample_rate)
    mix = torch.logaddexp(torch.full_like(step_llr, math.log1p(-q)), step_llr + math.log(q))
    return mix, lin


@dataclass
class WhiteBoxAuditRun:
    """Everything a white-box audit run produced (see :func:`white_box_dpsgd_audit`)."""

    mechanism: str
    noise: float
    clip_norm: float
    sample_rate: float
    steps: int
    delta: float
    beta: float
    num_trainable: int
    num_canaries: int
    canary_dim: int
    num_included: int
    audit: OneRunAudit  # with the log-likelihood-ratio score (the primary, pre-declared one)
    audit_linear: OneRunAudit  # with the linear projection score
    scores: np.ndarray
    scores_linear: np.ndarray
    included: np.ndarray
    train_accuracy: float
    seconds: float


def synthetic_task(*, num_examples: int = 500, in_features: int = 128, hidden: tuple = (512, 256),
                   num_classes: int = 2, seed: int = 0):
    """A small ReLU MLP and a synthetic classification set: ``(model, inputs, labels)``.

    Why not a transformer: the audit's verdict depends on the noise, the clipping and the canaries, not
    on the architecture (the canaries are inserted as gradients), and an MLP gives
    the many disjoint coordinates that thousands of spread canaries need (the default has 197,890
    trainable coordinates) at a cost two shared CPU cores can afford.
    Labels are a noisy linear rule of Gaussian inputs, so training makes visible progress.
    """
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # nn.Linear initialises from the global generator
    try:
        dims = (in_features, *hidden, num_classes)
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
    finally:
        torch.random.set_rng_state(torch_state)
    x = torch.randn(num_examples, in_features, generator=g)
    w = torch.randn(in_features, num_classes, generator=g)
    logits = x @ w + 0.5 * torch.randn(num_examples, num_classes, generator=g)
    return model, x, logits.argmax(1)


def white_box_dpsgd_audit(
    model,
    inputs,
    labels,
    *,
    mechanism: str,
    clip_norm: float,
    sample_rate: float,
    steps: int,
    num_canaries: int,
    delta: float,
    noise: float | None = None,
    target_epsilon: float | None = None,
    beta: float = 0.05,
    canary_dim: int | None = None,
    lr: float = 0.05,
    seed: int = 0,
    guess_grid=None,
    auditor_noise: float | None = None,
) -> WhiteBoxAuditRun:
    """One DP-SGD run with m white-box gradient canaries, audited with [SNJ23].

    Training: ``steps`` logical batches; each example *and each included canary* is taken
    independently with probability q = ``sample_rate`` per step (Poisson sampling, DESIGN.md section
    1). Data gradients are clipped per sample by :class:`~lap2_hf.clipping.GradClipper` (L2, or L1 for
    laplace); the sampled canaries are added to the clipped sum as extra per-sample gradients of norm
    C; :meth:`Mechanism.add_noise` noises the sum once; plain SGD applies lr * noisy sum / (q N).

    Canaries (:func:`make_canaries`): m disjoint ones, each included in the run with probability 1/2
    ([SNJ23] Algorithm 1). Shapes follow DESIGN.md section 8: one-hot for laplace, spread evenly over k
    coordinates for lap2, one-hot for gaussian (any direction is equivalent).

    Threat model (white box): the auditor sees every noisy clipped sum (with SGD, equivalently every
    iterate), knows the model, the data and which data examples each step sampled, and the noise law;
    it does not see which canaries were included or sampled. It subtracts the data's clipped sum and
    scores each canary on its own coordinates (:func:`canary_scores`). DP-SGD's add/remove analysis
    covers exactly this adversary: conditional on everything but the target's participation, each step
    is a Poisson-subsampled Gaussian/Laplace mechanism on the target, which is what the accountant
    composes. A bound above the claimed epsilon is therefore a genuine contradiction.

    Noise: ``noise`` (sigma or b/C), or calibrated from ``target_epsilon`` with
    :func:`lap2_hf.accounting.calibrate_noise` at this q and T (dim = number of trainable coordinates
    for lap2). Both audits (LLR and linear score) use the grid of :func:`default_guess_grid`.
    ``auditor_noise``: the noise the auditor's LLR assumes (default: the one used). Positive controls
    that inject a noise bug pass the *claimed* noise here, as a real auditor only knows the claim; a
    wrong assumption makes the score less powerful, never the bound invalid.
    """
    import time

    import torch
    import torch.nn.functional as F

    from .clipping import GradClipper
    from .mechanisms import Mechanism

    t0 = time.perf_counter()
    q = float(sample_rate)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    steps = int(steps)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    if mechanism == "none":
        mech = Mechanism("none", clip_norm=clip_norm)
    else:
        if noise is None:
            if target_epsilon is None:
                raise ValueError("give noise or target_epsilon")
            from .accounting import calibrate_noise

            noise = calibrate_noise(mechanism=mechanism, target_epsilon=target_epsilon, delta=delta,
                                    sample_rate=q, steps=steps, dim=n if mechanism == "lap2" else None)
        mech = Mechanism(mechanism, noise=float(noise), clip_norm=clip_norm)

    g_canary = torch.Generator().manual_seed(seed)
    g_data = torch.Generator().manual_seed(seed + 1)
    g_noise = torch.Generator().manual_seed(seed + 2)
    index, value = make_canaries(mechanism=mechanism, num_canaries=num_canaries, num_coordinates=n,
                                 clip_norm=clip_norm, canary_dim=canary_dim, generator=g_canary)
    included = torch.rand(num_canaries, generator=g_canary) < 0.5
    value32 = value.to(torch.float32)
    flat_index = index.reshape(-1)
    score_scale = mech.noise_scale if auditor_noise is None else float(auditor_noise) * float(clip_norm)

    clipper = GradClipper(model, clip_norm=clip_norm, norm=mech.clip_type) if mech.clip_type else None
    N = inputs.shape[0]
    expected_batch = q * N
    llr = torch.zeros(num_canaries, dtype=torch.float64)
    lin = torch.zeros(num_canaries, dtype=torch.float64)
    try:
        for _ in range(steps):
            take = torch.rand(N, generator=g_data) < q
            canary_take = included & (torch.rand(num_canaries, generator=g_canary) < q)
            data_sum = torch.zeros(n)
            if take.any():
                x, y = inputs[take], labels[take]
                if clipper is not None:
                    with clipper.capture(batch_size=int(take.sum())):
                        F.cross_entropy(model(x), y, reduction="none").sum().backward()
                    clipper.clip_and_accumulate()
                    summed = clipper.pop_summed()
                    data_sum = torch.cat([summed[p].reshape(-1).float() for p in params])
                else:
                    model.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y, reduction="none").sum().backward()
                    data_sum = torch.cat([p.grad.reshape(-1).float() for p in params])
                    model.zero_grad(set_to_none=True)
            with torch.no_grad():
                data_sum = data_sum.detach()
                noisy = data_sum.clone()
                noisy.index_add_(0, flat_index, (value32 * canary_take[:, None]).reshape(-1))
                # Noise through the real code path: a dict of per-parameter views of the flat sum.
                views, offset = {}, 0
                for p in params:
                    views[p] = noisy.narrow(0, offset, p.numel()).view(p.shape)
                    offset += p.numel()
                mech.add_noise(views, generator=g_noise)
                for p, v in views.items():
                    p.sub_(lr / expected_batch * v.to(p.dtype))
            # The auditor's view: the noisy sum minus the (known) data contribution.
            observed = (noisy - data_sum)[flat_index].view(index.shape)
            step_llr, step_lin = canary_scores(observed, value, mechanism=mechanism,
                                               noise_scale=score_scale, sample_rate=q)
            llr += step_llr
            lin += step_lin
    finally:
        if clipper is not None:
            clipper.detach()
    with torch.no_grad():
        acc = float((model(inputs).argmax(1) == labels).float().mean())
    inc = included.numpy()
    audit = one_run_audit(llr.numpy(), inc, delta=delta, beta=beta, guess_grid=guess_grid)
    audit_lin = one_run_audit(lin.numpy(), inc, delta=delta, beta=beta, guess_grid=guess_grid)
    return WhiteBoxAuditRun(
        mechanism=mechanism, noise=float(mech.noise), clip_norm=float(clip_norm), sample_rate=q, steps=steps,
        delta=float(delta), beta=float(beta), num_trainable=n, num_canaries=int(num_canaries),
        canary_dim=int(index.shape[1]), num_included=int(inc.sum()), audit=audit, audit_linear=audit_lin,
        scores=llr.numpy(), scores_linear=lin.numpy(), included=inc, train_accuracy=acc,
        seconds=time.perf_counter() - t0,
    )
