"""Lap2Trainer: ``transformers.Trainer`` with DP-SGD (Poisson batches, per-sample clipping, noise, accounting).

Swap ``Trainer`` for ``Lap2Trainer`` and ``TrainingArguments`` for ``Lap2TrainingArguments``; the rest of
an HF pipeline (datasets, collator, callbacks, evaluation, checkpoints, accelerate launch) stays.

One logical step (docs/design.md §5 and §6), per process:

1. the Poisson sampler hands this process its share of the logical batch of step t (possibly empty);
2. it is sorted by length and cut into at most ceil(n / ``per_device_train_batch_size``) physical chunks with
   the least padding, none larger in padded tokens than a chunk of that many longest examples; each chunk
   runs one forward and one backward, and the clipping engine adds ``sum_i c_i g_i`` to a running sum;
3. the sums of all processes are all-reduced; identical generators on every rank add the noise once;
4. ``p.grad = (sum + noise) / (q N)`` -- the *expected* batch size, never the drawn one -- and the HF
   loop runs the optimizer and scheduler as usual; the accountant records the step.

Privacy is set up inside ``train()`` once the model that will be trained exists (after ``model_init``,
a hyperparameter trial's settings and the checkpoint's weights), and every step checks that the
clipping engine covers exactly the model and parameters being stepped. The noise is calibrated from the
real N, q, number of steps and number of trainable coordinates n.

A trainer keeps one privacy *stream* (docs/design.md §7): a secret 256-bit key, an accountant, and
the number t of steps taken. Batches and noise of step t are derived from (key, t) (:mod:`lap2_hf.rng`).
A second ``train()`` continues the stream: epsilon accumulates over every step the trainer took (with
``dp_target_epsilon`` the new run gets the noise for what is left of the budget), and no batch or noise
is drawn twice. Each ``hyperparameter_search`` trial is a stream of its own. The stream is saved with
every checkpoint and restored on resume, so a resumed run is the uninterrupted run.

An empirical privacy audit can add white-box gradient canaries to the clipped sum of every step through
:class:`DPAuditHook` (``Lap2Trainer(..., dp_audit_hook=...)``; off by default, refused unless given explicitly,
and such a run is marked as an audit run in its plan and logs: docs/design.md §8).

``epsilon`` is added to every log, by the accountant ``dp_accountant`` names (``rdp``, or ``pld`` for gaussian
and laplace; ``PrivacyPlan.accountant`` says which, and the same accountant calibrates the noise and stops the
run); the training loss, the exact batch size and the clipped fraction -- unnoised statistics of the private
data -- are neither computed nor logged unless ``dp_log_private_stats=True``. Training stops before a step that
would exceed ``dp_target_epsilon``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import weakref
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from .accounting import accountant_from_state_dict, calibrate_noise, convert_accountant, make_accountant
from .clipping import GradClipper
from .config import Lap2TrainingArguments, PrivacyArguments
from .mechanisms import Mechanism, get_spec
from .rng import SecureRandom, check_seed, derive, keyed_generator, new_seed, stream_key
from .sampling import (
    LogicalBatch,
    PoissonBatchSampler,
    PoissonDataLoader,
    poisson_members,
    steps_per_epoch,
    total_steps,
)

logger = logging.getLogger(__name__)

PRIVACY_STATE = "privacy_state.json"
#: Holds the secret key of the checkpoint's batch and noise stream (the name predates the keyed streams).
NOISE_RNG_STATE = "privacy_noise_rng.pt"
_STATE_FORMAT = 2
_LOGGED_PRIVATE = ("loss", "train_loss")
#: A later train() with dp_target_epsilon needs this share of the budget left (else it is refused).
_MIN_BUDGET_LEFT = 0.01


@dataclass(frozen=True)
class PrivacyPlan:
    """What ``train()`` resolved before the first step (also written to checkpoints and results).

    ``steps`` are this ``train()`` call's; ``planned_epsilon`` is the epsilon after them, including the
    ``prior_steps`` this trainer's stream took in earlier calls.
    """

    mechanism: str
    noise: float  # sigma or b/C; 0 for 'none'
    clip_norm: float
    delta: float
    sample_rate: float
    expected_batch_size: int
    num_examples: int
    steps: int
    dim: int  # number of noised coordinates n
    target_epsilon: float | None
    planned_epsilon: float
    accountant: str = "RDP (lap2_hf, integer orders 2..4096)"  # the label of the accountant of every epsilon
    prior_steps: int = 0
    secure_rng: bool = False
    #: White-box canaries of an audit run (:class:`DPAuditHook`); 0 in a normal run. Non-zero: what this run
    #: releases is *not* a private model of the training data alone (the canaries are in it).
    audit_canaries: int = 0


@dataclass(frozen=True)
class PrivacySchedule:
    """The public shape of a run that its noise is calibrated for (see :func:`privacy_schedule`)."""

    delta: float
    sample_rate: float  # q = B / N
    steps: int  # T, as the training loop counts them (lap2_hf.steps.total_steps)


def privacy_schedule(
    privacy: PrivacyArguments, *, num_examples: int, epochs: float | None, max_steps: int | None
) -> PrivacySchedule:
    """delta, q and T of a run on ``num_examples`` = N training examples, as ``Lap2Trainer.train()`` resolves them.

    ``delta = dp_delta`` or ``1 / (2N)`` (refused if ``>= 1/N``), ``q = dp_expected_batch_size / N`` (refused if
    B > N), ``T = total_steps(N, B, epochs, max_steps)``. Public so that tools which predict a run's noise
    (``scripts/snr.py``) use the trainer's own rules.
    """
    if privacy.expected_batch_size > num_examples:
        raise ValueError(
            f"dp_expected_batch_size={privacy.expected_batch_size} exceeds the number of training "
            f"examples N={num_examples}"
        )
    delta = privacy.delta if privacy.delta is not None else 1.0 / (2 * num_examples)
    if delta >= 1.0 / num_examples:
        raise ValueError(
            f"dp_delta={delta} >= 1/N = {1.0 / num_examples:.3g}: a delta this large allows releasing an example "
            f"outright; use at most 1/(2N) = {1.0 / (2 * num_examples):.3g}"
        )
    q = privacy.expected_batch_size / num_examples
    steps = total_steps(
        num_examples=num_examples, expected_batch_size=privacy.expected_batch_size, epochs=epochs, max_steps=max_steps
    )
    return PrivacySchedule(delta=delta, sample_rate=q, steps=steps)


def planned_noise(privacy: PrivacyArguments, schedule: PrivacySchedule, *, dim: int, prior=None) -> float:
    """The noise (sigma or b/C) of a run: ``dp_noise_multiplier`` if set, else the smallest noise whose epsilon
    by the ``dp_accountant`` after ``schedule.steps`` Poisson steps at rate q on ``dim`` = n coordinates (composed
    after the steps of the accountant ``prior``) is at most ``dp_target_epsilon`` at ``schedule.delta``
    (:func:`lap2_hf.accounting.calibrate_noise`)."""
    if not get_spec(privacy.mechanism).private:
        raise ValueError(f"dp_mechanism={privacy.mechanism!r} adds no noise: there is no noise to plan")
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    return calibrate_noise(
        mechanism=privacy.mechanism,
        target_epsilon=privacy.target_epsilon,
        delta=schedule.delta,
        sample_rate=schedule.sample_rate,
        steps=schedule.steps,
        dim=dim,
        accountant=privacy.accountant,
        prior=prior,
    )


class DPAuditHook:
    """White-box gradient canaries for an empirical privacy audit of the trainer's own DP step (docs/design.md §8).

    Subclass it, set :attr:`num_canaries` (m) and implement :meth:`canary_gradients`; pass the instance as
    ``Lap2Trainer(..., dp_audit_hook=hook)``. It is an argument of the trainer only -- not a
    ``Lap2TrainingArguments`` field, so no config file, command line or hyperparameter search can switch it
    on -- and it is refused unless it is an instance of this class. Default: None, and then the step is
    exactly the normal one (nothing below runs and nothing is drawn). :func:`lap2_hf.audit.white_box_dpsgd_audit`
    is the one user.

    In every logical step t, after the clipped sums of all processes are all-reduced and before the noise is
    added (so a canary, like an example, is added once and noised once), the trainer

    1. draws which canaries step t samples: a Poisson(q) subset of ``range(m)`` at the plan's q, by the data
       sampler's own :func:`~lap2_hf.sampling.poisson_members` from the stream's keyed generator
       ``(key, "audit-canary", t)`` -- a generator distinct from those of the batches and the noise, so that the
       batch and the noise of step t are those of the same run without the hook, and secret like them (the
       auditor never sees which canaries a step sampled);
    2. calls :meth:`canary_gradients` with that subset and the step's clipped sum of the data (what a white-box
       auditor, who knows the model, the data and the batch, can compute; the hook must not modify it);
    3. checks the returned canaries -- at most one per sampled canary, finite, on coordinates of the model,
       each of norm at most C in the mechanism's clipping norm (L2, or L1 for laplace), i.e. already clipped like
       a per-sample gradient -- and adds them to the clipped sum; then noise, the division by qN, the optimizer
       and the accountant run as in any step.

    Canaries change what the run releases: the plan of a run with a hook has ``audit_canaries = m``, every log
    gets ``dp_audit_canaries = m``, and a warning says so at the start of ``train()``. The epsilon of such a run
    is the guarantee for each example *and each canary* (a canary is one more, add/remove-neighbouring record).
    With several processes the hook runs on every rank and must return the same canaries on all of them.
    """

    #: m, the number of canaries (the range of the per-step Poisson draw).
    num_canaries: int = 0

    def canary_gradients(
        self, *, step: int, sampled: Tensor, clipped_sum: dict[nn.Parameter, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """The canary gradients to add to step ``step``'s clipped sum: ``(index, value)``, both ``(s, k)``.

        ``sampled``: the (sorted, long) indices in ``range(num_canaries)`` that step ``step`` sampled; the hook
        returns a row for each of those it has put in the run (s <= len(sampled)). Row i is one canary's
        gradient: ``value[i, j]`` at coordinate ``index[i, j]`` of the concatenation of the flattened tensors of
        ``clipped_sum`` in the dict's order (the model's trainable parameters in ``model.parameters()`` order).
        ``clipped_sum``: the data's clipped sum of the step (all processes), before canaries and noise; read only.
        """
        raise NotImplementedError


@dataclass
class _Stream:
    """One line of private training: the secret key of its batches and noise, its accountant, and the
    number of logical steps it took (= t of its next step). Mutable: it grows with every step."""

    key: bytes
    accountant: object  # RdpAccountant or PldAccountant (lap2_hf.accounting)
    steps: int = 0


class Lap2Trainer(Trainer):
    """``transformers.Trainer`` that trains with DP-SGD; see the module docstring."""

    def __init__(self, *args, dp_audit_hook: DPAuditHook | None = None, **kwargs):
        """``transformers.Trainer``'s arguments, plus ``dp_audit_hook``: white-box canaries of a privacy audit
        (:class:`DPAuditHook`; never in a normal run)."""
        if dp_audit_hook is not None:
            if not isinstance(dp_audit_hook, DPAuditHook):
                raise TypeError(f"dp_audit_hook must be a lap2_hf.trainer.DPAuditHook, got {type(dp_audit_hook)!r}")
            m = dp_audit_hook.num_canaries
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ValueError(f"dp_audit_hook.num_canaries must be a positive integer, got {m!r}")
        self._audit_hook = dp_audit_hook
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, Lap2TrainingArguments):
            raise TypeError(
                f"Lap2Trainer needs Lap2TrainingArguments (got {type(self.args).__name__}): "
                "replace TrainingArguments by lap2_hf.Lap2TrainingArguments"
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                f"n_gpu={self.args.n_gpu}: torch DataParallel is not supported; launch one process per GPU "
                "with `accelerate launch` instead"
            )
        self.privacy_args: PrivacyArguments = self.args.privacy
        self.plan: PrivacyPlan | None = None
        self.clipper: GradClipper | None = None
        self.mechanism: Mechanism | None = None
        self._seed: int | None = None  # master secret; streams' keys are derived from it
        self._main: _Stream | None = None  # the stream of ordinary train() calls
        self._stream: _Stream | None = None  # the stream being trained (main, a trial's, or a resumed one)
        self._trials = 0  # hyperparameter-search trials started (each gets its own stream)
        self._session_start = 0  # t of this train() call's first step (the sampler's first_step)
        self._session_start_accountant: dict | None = None
        self._pending_resume: dict | None = None
        self._clipped_ids: frozenset[int] = frozenset()
        # Every parameter some stream of this trainer has trained, by id (tensors compare element-wise, so no
        # WeakSet); weak, so that a dead parameter's reused id is never mistaken for it.
        self._trained_params: weakref.WeakValueDictionary[int, nn.Parameter] = weakref.WeakValueDictionary()
        self._step_stats: dict[str, float] = {}
        self.add_callback(_BudgetCallback(self))

    @property
    def audit_hook(self) -> DPAuditHook | None:
        """The audit's canary hook given to the constructor (None in a normal run); read only."""
        return self._audit_hook

    @property
    def accountant(self):
        """The accountant (of kind ``dp_accountant``) of the stream being trained: every step it ever took (empty
        before training)."""
        return self._stream.accountant if self._stream is not None else make_accountant(self.privacy_args.accountant)

    # -- set-up ------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train`` with privacy set up on the model actually trained (see the module docstring).

        Calling it again continues this trainer's privacy stream (epsilon accumulates). Resuming reads
        the checkpoint's stream; it is refused on a trainer that has already trained, whose own steps the
        checkpoint would drop from the accounting. Unless ``dp_log_private_stats``, the returned
        ``TrainOutput.training_loss`` is NaN and its metrics hold no ``train_loss``.
        """
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._pending_resume = None
        if resume_from_checkpoint is not None:
            if trial is None and self._main is not None and self._main.steps > 0:
                raise ValueError(
                    f"resume_from_checkpoint={resume_from_checkpoint!r} on a Lap2Trainer that has already taken "
                    f"{self._main.steps} private steps: the checkpoint's accountant would replace this trainer's and "
                    "drop those steps from epsilon; resume with a new Lap2Trainer"
                )
            self._pending_resume = _read_privacy_checkpoint(resume_from_checkpoint)
        out = super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )
        if not self.privacy_args.log_private_stats:
            # HF's running loss is a constant placeholder here (training_step); report "not released".
            metrics = {k: v for k, v in out.metrics.items() if k not in _LOGGED_PRIVATE}
            out = TrainOutput(out.global_step, math.nan, metrics)
        return out

    def _inner_training_loop(self, *args, **kwargs):
        # Runs after Trainer.train has built the model (model_init), applied a trial's settings and loaded
        # the checkpoint's weights, and before the data loader, optimizer and first step: the one place
        # where privacy can be set up on the model that is actually trained.
        self._setup_privacy(trial=kwargs.get("trial"))
        return super()._inner_training_loop(*args, **kwargs)

    def _setup_privacy(self, *, trial=None) -> None:
        args = self.args
        pa = self.privacy_args = args.validate_privacy()  # a trial may have set dp_* (or unsafe) fields
        resume, self._pending_resume = self._pending_resume, None
        if self.train_dataset is None:
            raise ValueError("Lap2Trainer: training requires a train_dataset")
        if not hasattr(self.train_dataset, "__len__") or isinstance(
            self.train_dataset, torch.utils.data.IterableDataset
        ):
            raise TypeError(
                "Lap2Trainer needs a map-style train_dataset with a length: Poisson sampling draws from all N examples"
            )
        n_examples = len(self.train_dataset)
        if n_examples < 1:
            raise ValueError("train_dataset is empty")
        schedule = privacy_schedule(pa, num_examples=n_examples, epochs=args.num_train_epochs, max_steps=args.max_steps)
        delta, q, steps = schedule.delta, schedule.sample_rate, schedule.steps

        if self._seed is None:
            self._seed = self._shared_seed(pa.seed)
        if resume is not None:
            # Calibrate as the checkpoint's run did (same prior), then continue from the checkpoint.
            stream = _Stream(
                resume["key"], accountant_from_state_dict(resume["accountant_at_start"]), resume["session_start"]
            )
        elif trial is not None:
            # Each trial is its own private run: own key (no shared batches or noise), own accountant. That
            # is only true of a model no earlier run of this trainer has touched.
            if self.model_init is None:
                raise ValueError(
                    "train(trial=...) needs model_init: a trial's accountant counts only the trial's steps, "
                    "so every trial must start from a fresh model"
                )
            if any(self._trained_params.get(id(p)) is p for p in self.model.parameters()):
                raise ValueError(
                    "model_init returned a model this trainer has already trained: a trial's accountant would "
                    "not count the earlier steps; build a new model in model_init"
                )
            stream = _Stream(stream_key(self._seed, trial=self._trials), make_accountant(pa.accountant))
            self._trials += 1
        else:
            if self._main is None:
                self._main = _Stream(stream_key(self._seed), make_accountant(pa.accountant))
            stream = self._main
        # dp_accountant may differ from the one of earlier train() calls (or of the checkpoint, which the plan
        # check below then refuses): the same steps, re-accounted by the accountant asked for.
        stream.accountant = convert_accountant(stream.accountant, pa.accountant)
        prior = stream.accountant

        if self.clipper is not None:
            self.clipper.detach()
        self.clipper = None
        mech_name = pa.mechanism
        spec = get_spec(mech_name)
        clipper = None
        if not spec.private:
            dim = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            noise, planned = 0.0, math.inf
        else:
            clipper = GradClipper(self.model, clip_norm=pa.clip_norm, norm=spec.clip_norm_type)
            dim = clipper.num_trainable
            noise = pa.noise_multiplier
            if noise is None:
                try:
                    if prior.steps and prior.get_epsilon(delta=delta) > (1 - _MIN_BUDGET_LEFT) * pa.target_epsilon:
                        # Not an error of the accounting, but such a run could only be pure noise.
                        raise ValueError(f"less than {_MIN_BUDGET_LEFT:.0%} of the budget is left")
                    noise = planned_noise(pa, schedule, dim=dim, prior=prior)
                except ValueError as exc:
                    if not prior.steps:
                        raise
                    clipper.detach()
                    raise ValueError(
                        f"dp_target_epsilon={pa.target_epsilon} bounds everything this trainer trains: it already took "
                        f"{prior.steps} steps (epsilon {prior.get_epsilon(delta=delta):.4g}) in earlier train() calls, "
                        f"and {steps} more steps do not fit in the rest of the budget ({exc}). Use a new Lap2Trainer "
                        "for an independent run (the two models together then cost both epsilons)"
                    ) from None
            # The epsilon after the planned steps, by the accountant that will report them (the budget look-ahead
            # asks the same accountant about one step at a time).
            try:
                planned = prior.epsilon_after(
                    delta=delta, mechanism=mech_name, noise=noise, sample_rate=q, dim=dim, count=steps
                )
            except ValueError:
                clipper.detach()
                raise
        plan = PrivacyPlan(
            mechanism=mech_name,
            noise=float(noise),
            clip_norm=pa.clip_norm,
            delta=delta,
            sample_rate=q,
            expected_batch_size=pa.expected_batch_size,
            num_examples=n_examples,
            steps=steps,
            dim=int(dim),
            target_epsilon=pa.target_epsilon,
            planned_epsilon=planned,
            accountant=prior.label,
            prior_steps=prior.steps,
            secure_rng=pa.secure_rng,
            audit_canaries=self._audit_hook.num_canaries if self._audit_hook is not None else 0,
        )
        if resume is not None:
            try:
                _check_same_plan(resume["plan"], plan)
            except ValueError:
                if clipper is not None:
                    clipper.detach()
                raise
            self._session_start_accountant = resume["accountant_at_start"]
            stream.accountant = accountant_from_state_dict(resume["accountant"])
            stream.steps = resume["steps"]
            if trial is None:
                self._main = stream
        else:
            self._session_start_accountant = prior.state_dict()
        self._session_start = resume["session_start"] if resume is not None else stream.steps
        self._stream = stream
        self._trained_params.update({id(p): p for p in self.model.parameters() if p.requires_grad})
        self.clipper = clipper
        self._clipped_ids = frozenset(id(p) for p in clipper.params) if clipper is not None else frozenset()
        self.mechanism = Mechanism(mech_name, noise=noise, clip_norm=pa.clip_norm)
        self.plan = plan
        if self.is_world_process_zero():
            logger.info("DP plan: %s", self.plan)
            if plan.audit_canaries:
                logger.warning(
                    "AUDIT RUN: %d white-box gradient canaries are added to the clipped sums (dp_audit_hook); the "
                    "model this run trains is not a private model of the training data alone",
                    plan.audit_canaries,
                )

    def _shared_seed(self, seed: int | None) -> int:
        """The given seed, or a secret 256-bit one from the OS CSPRNG broadcast from rank 0 (all ranks must agree)."""
        if seed is not None:
            seed = check_seed(seed)
            if seed.bit_length() < 128:
                logger.warning(
                    "dp_seed has %d bits: a seed with fewer than 128 random bits can be enumerated, and "
                    "whoever finds it can recompute the batches and the noise",
                    seed.bit_length(),
                )
            return seed
        value = torch.tensor(list(new_seed().to_bytes(32, "big")), dtype=torch.uint8)
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            value = value.to(self.args.device)
            torch.distributed.broadcast(value, src=0)
        return int.from_bytes(bytes(value.cpu().tolist()), "big")

    def _noise_source(self, step: int) -> torch.Generator | SecureRandom:
        """The generator of step ``step``'s noise: the same on every process, never reused by another step."""
        key = self._stream.key
        if self.privacy_args.secure_rng:
            return SecureRandom(derive(key, "secure-noise", step))
        device = self.args.device
        # Noise is drawn where the gradients live on CUDA (Philox); on other devices on the CPU and moved.
        return keyed_generator(key, "noise", step, device=device if device.type == "cuda" else "cpu")

    # -- data --------------------------------------------------------------------------------------
    def get_train_dataloader(self):
        """Poisson logical batches of this process's shard, tagged with their step t; deliberately not
        ``accelerator.prepare``d (its re-sharding and ``even_batches`` padding would repeat examples)."""
        if self.plan is None:
            self._setup_privacy()
        dataset = self.train_dataset
        import datasets

        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        sampler = PoissonBatchSampler(
            num_examples=self.plan.num_examples,
            sample_rate=self.plan.sample_rate,
            steps=steps_per_epoch(
                num_examples=self.plan.num_examples, expected_batch_size=self.plan.expected_batch_size
            ),
            seed=self._stream.key,
            world_size=self.args.world_size,
            rank=self.args.process_index,
            first_step=self._session_start,
            tag_steps=True,
        )
        return PoissonDataLoader(
            dataset, sampler, num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory
        )

    # -- one logical step --------------------------------------------------------------------------
    def _check_step_is_private(self, model: nn.Module, net: nn.Module, logical: LogicalBatch) -> None:
        """Raise unless this step is covered: set-up done for this very model and its trainable
        parameters, and the batch is the fresh draw of the stream's next step (not a replay)."""
        if self.plan is None or self._stream is None:
            raise RuntimeError("Lap2Trainer.training_step before train() set up privacy")
        if self.accelerator.unwrap_model(model) is not net:
            raise RuntimeError(
                f"training_step was given a model ({type(model).__name__}) that is not trainer.model: "
                "privacy was set up on trainer.model only"
            )
        if self.clipper is not None:
            if self.clipper.model is not net or not self.clipper._attached:
                raise RuntimeError(
                    "the per-sample clipping engine is not attached to the model being trained (trainer.model was "
                    "replaced after train() set up privacy): its gradients would be neither clipped nor noised"
                )
            trainable = frozenset(id(p) for p in net.parameters() if p.requires_grad)
            if trainable != self._clipped_ids:
                raise RuntimeError(
                    f"the model's trainable parameters changed after privacy was set up ({len(trainable)} trainable "
                    f"tensors, {len(self._clipped_ids)} clipped): parameters outside the clipping engine would be "
                    "updated without privacy"
                )
            if self.optimizer is not None:
                for group in self.optimizer.param_groups:
                    for p in group["params"]:
                        if p.requires_grad and id(p) not in self._clipped_ids:
                            raise RuntimeError(
                                "the optimizer holds a trainable parameter the clipping engine does not cover"
                            )
        expected = self._stream.steps
        if logical.step != expected:
            raise RuntimeError(
                f"logical batch drawn for step {logical.step}, but this trainer's next fresh step is {expected}: a "
                "replayed (or skipped) Poisson batch would be counted by the accountant as a fresh draw"
            )

    def _budget_allows_step(self) -> bool:
        """Whether one more step of the plan keeps the epsilon of the stream's accountant within the target."""
        plan = self.plan
        if not get_spec(plan.mechanism).private or plan.target_epsilon is None:
            return True
        if self.accountant.steps < plan.prior_steps + plan.steps and plan.planned_epsilon <= plan.target_epsilon:
            # Still inside the plan, whose end was checked against the target when it was made: the accountant's
            # epsilon only grows as steps are appended (composition), so each of these prefixes is within the
            # target too. Saves one composition per step, which under PLD costs 1-3 s (seconds, not microseconds).
            return True
        nxt = self.accountant.epsilon_after(
            delta=plan.delta, mechanism=plan.mechanism, noise=plan.noise, sample_rate=plan.sample_rate, dim=plan.dim
        )
        return nxt <= plan.target_epsilon

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> Tensor:
        """One private logical step (module docstring). Returns the batch's mean loss only under
        ``dp_log_private_stats``; otherwise a constant 0 that HF accumulates but :meth:`log` never shows."""
        logical: LogicalBatch = inputs["logical_batch"]
        # Run the unwrapped model: its gradients never go through DDP (we all-reduce the clipped sums).
        net = self.model
        self._check_step_is_private(model, net, logical)
        device = self.args.device
        params = [p for p in net.parameters() if p.requires_grad] if self.clipper is None else self.clipper.params
        if not self._budget_allows_step():
            # Only reachable when a checkpoint is resumed right at the budget stop: take no step (no data is
            # read, no gradient is set, so the optimizer leaves the weights alone) and end training.
            logger.warning(
                "not taking step %d: it would exceed dp_target_epsilon=%s", self._stream.steps, self.plan.target_epsilon
            )
            for p in params:
                p.grad = None
            self.control.should_training_stop = True
            self._step_stats = {}
            return torch.zeros((), device=device)
        net.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        log_stats = self.privacy_args.log_private_stats
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        n_local = 0
        n_clipped = 0
        n_nonfinite = 0
        n_finite_loss = 0
        plain_sum: dict[nn.Parameter, Tensor] = {}
        for chunk in logical.physical_chunks(self.args.per_device_train_batch_size):
            batch = self._prepare_inputs(self.data_collator(chunk))
            size = len(chunk)
            capture = self.clipper.capture(batch_size=size) if self.clipper is not None else contextlib.nullcontext()
            with capture:
                with self.compute_loss_context_manager():
                    losses = self.compute_per_example_loss(net, batch)
                losses.sum().backward()
            if self.clipper is not None:
                # An example with a non-finite loss or norm adds nothing (its norm comes back as inf).
                norms = self.clipper.clip_and_accumulate(losses=losses)
                if log_stats:
                    n_clipped += int((norms > self.clipper.clip_norm).sum())
                    n_nonfinite += self.clipper.num_nonfinite
            else:
                for p in params:
                    if p.grad is not None:
                        plain_sum[p] = plain_sum.get(p, 0) + p.grad.detach().float()
                        p.grad = None
            if log_stats:
                # Only finite losses: a single inf/NaN example would otherwise make every logged mean NaN.
                detached = losses.detach().double()
                finite = torch.isfinite(detached)
                loss_sum += detached[finite].sum()
                n_finite_loss += int(finite.sum())
            n_local += size

        if self.clipper is not None:
            grads = self.clipper.pop_summed()
        else:
            grads = {p: plain_sum.get(p, torch.zeros(p.shape, device=p.device, dtype=torch.float32)) for p in params}
        if self.args.world_size > 1:
            self._all_reduce(grads)
        if self._audit_hook is not None:  # audit runs only (DPAuditHook); a normal step skips this entirely
            self._add_audit_canaries(grads)
        # Added once, to the all-reduced sum, by identical generators on every rank.
        self.mechanism.add_noise(grads, generator=self._noise_source(self._stream.steps))
        scale = 1.0 / self.plan.expected_batch_size
        for p, g in grads.items():
            p.grad = g.mul_(scale).to(p.dtype)
        if get_spec(self.plan.mechanism).private:
            self.accountant.step(
                mechanism=self.plan.mechanism,
                noise=self.plan.noise,
                sample_rate=self.plan.sample_rate,
                dim=self.plan.dim,
            )
        self._stream.steps += 1
        if not log_stats:
            self._step_stats = {}
            return torch.zeros((), device=device)
        stats = torch.tensor(
            [loss_sum.item(), n_local, n_clipped, n_nonfinite, n_finite_loss], device=device, dtype=torch.float64
        )
        if self.args.world_size > 1:
            torch.distributed.all_reduce(stats)
        total_loss, n_total, clipped, nonfinite, n_finite = stats.tolist()
        self._step_stats = {
            "dp_batch_size": n_total,
            "dp_clipped_fraction": clipped / n_total if n_total else 0.0,
            "dp_nonfinite_examples": nonfinite,
        }
        mean_loss = total_loss / n_finite if n_finite else float("nan")
        return torch.tensor(mean_loss, device=device)

    def _add_audit_canaries(self, grads: dict[nn.Parameter, Tensor]) -> None:
        """Add the audit hook's canaries of this step to the (all-reduced) clipped sum ``grads`` (DPAuditHook)."""
        hook, step = self._audit_hook, self._stream.steps
        # The canaries' own Poisson draw: the data sampler's code at the plan's q, from a keyed generator of
        # its own (the batch and noise generators of step t are untouched).
        gen = keyed_generator(self._stream.key, "audit-canary", step)
        sampled = poisson_members(gen, hook.num_canaries, self.plan.sample_rate)
        index, value = hook.canary_gradients(step=step, sampled=sampled.clone(), clipped_sum=grads)
        index, value = torch.as_tensor(index), torch.as_tensor(value)
        n = sum(g.numel() for g in grads.values())
        if index.dim() != 2 or index.shape != value.shape or index.dtype != torch.long:
            raise ValueError(
                f"canary_gradients must return (index, value) of the same (s, k) shape, index long; got "
                f"{tuple(index.shape)} {index.dtype}, {tuple(value.shape)}"
            )
        if index.shape[0] > len(sampled):
            raise ValueError(f"{index.shape[0]} canaries returned for step {step}, which sampled {len(sampled)}")
        if index.numel() == 0:
            return
        if int(index.min()) < 0 or int(index.max()) >= n:
            raise ValueError(f"canary coordinates must be in [0, {n}), the model's trainable coordinates")
        if not torch.isfinite(value).all():
            raise ValueError("a canary gradient is not finite")
        clip_p = get_spec(self.plan.mechanism).clip_p
        if clip_p is not None:  # like a per-sample gradient: at most C in the mechanism's clipping norm
            worst = float(value.double().norm(p=clip_p, dim=1).max())
            if worst > self.plan.clip_norm * (1 + 1e-6):
                raise ValueError(
                    f"a canary gradient has L{clip_p:g} norm {worst:.6g} > dp_clip_norm={self.plan.clip_norm}: "
                    "canaries must be clipped like examples"
                )
        flat = torch.cat([g.reshape(-1) for g in grads.values()])
        flat.index_add_(0, index.reshape(-1).to(flat.device), value.reshape(-1).to(flat.device, flat.dtype))
        offset = 0
        for g in grads.values():
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _all_reduce(self, grads: dict[nn.Parameter, Tensor]) -> None:
        flat = torch.cat([g.flatten() for g in grads.values()])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads.values():
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def compute_per_example_loss(self, model: nn.Module, batch: dict) -> Tensor:
        """``(B,)`` losses, one per example (never a batch mean: clipping is per example).

        Classification: cross-entropy (MSE for one label); causal LM: mean next-token cross-entropy
        over the example's labelled tokens; token classification: mean token cross-entropy.
        Override for other tasks.
        """
        batch = dict(batch)
        labels = batch.pop("labels", None)
        task = self._task(model)
        if task == "causal_lm" and labels is None:
            labels = batch["input_ids"].masked_fill(
                batch.get("attention_mask", torch.ones_like(batch["input_ids"])) == 0, -100
            )
        if labels is None:
            raise ValueError("the training batch has no 'labels' column: per-example losses need labels")
        logits = model(**batch).logits.float()
        if task == "sequence_classification":
            if logits.shape[-1] == 1:
                return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="none")
            return F.cross_entropy(logits, labels, reduction="none")
        if task == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        tok = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)  # (B, T)
        counts = (labels != -100).sum(1).clamp(min=1)
        return tok.sum(1) / counts

    def _task(self, model) -> str:
        task = self.privacy_args.task
        if task != "auto":
            return task
        base = model
        while hasattr(base, "get_base_model") and base is not base.get_base_model():
            base = base.get_base_model()
        name = type(base).__name__
        if "ForSequenceClassification" in name:
            return "sequence_classification"
        if "ForCausalLM" in name or "LMHeadModel" in name:
            return "causal_lm"
        if "ForTokenClassification" in name:
            return "token_classification"
        raise ValueError(
            f"cannot infer the per-example loss for {name}: set dp_task or override compute_per_example_loss"
        )

    # -- reporting ---------------------------------------------------------------------------------
    def privacy_spent(self) -> float:
        """Epsilon spent so far (at the run's delta): an upper bound from the accountant ``plan.accountant`` names
        (inf for the non-private baseline)."""
        if self.plan is None or not get_spec(self.plan.mechanism).private:
            return math.inf
        return self.accountant.get_epsilon(delta=self.plan.delta)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add ``epsilon`` (public); drop the training loss unless ``dp_log_private_stats`` (then also add
        the step's exact batch size, clipped fraction and non-finite count). Everything logged reaches
        the progress bar, ``log_history`` (``trainer_state.json`` in checkpoints) and ``report_to``."""
        if self.plan is not None:
            logs["epsilon"] = self.privacy_spent()
            if self.plan.audit_canaries:  # an audit run releases canaries too: never mistake it for a normal run
                logs["dp_audit_canaries"] = self.plan.audit_canaries
        if self.privacy_args.log_private_stats:
            if "loss" in logs and self._step_stats:
                logs.update(self._step_stats)
        else:
            for key in _LOGGED_PRIVATE:
                logs.pop(key, None)
        super().log(logs, *args, **kwargs)

    # -- checkpoints -------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.plan is None or self._stream is None or not self.args.should_save:
            return
        out = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        state = {
            "format": _STATE_FORMAT,
            "plan": asdict(self.plan),
            "accountant": self.accountant.state_dict(),
            "steps": self._stream.steps,  # t of the next step
            "session_start": self._session_start,  # t of this train() call's first step
            "accountant_at_start": self._session_start_accountant,  # reproduces this call's calibration on resume
        }
        with open(os.path.join(out, PRIVACY_STATE), "w") as fh:
            json.dump(state, fh, indent=1)
        # The key lets anyone recompute every batch and all the noise: treat checkpoints as secret.
        torch.save({"format": _STATE_FORMAT, "stream_key": self._stream.key.hex()}, os.path.join(out, NOISE_RNG_STATE))


def _read_privacy_checkpoint(path: str) -> dict:
    """The privacy stream saved in checkpoint ``path``; ValueError if it is missing or from an older format."""
    state_path = os.path.join(path, PRIVACY_STATE)
    key_path = os.path.join(path, NOISE_RNG_STATE)
    if not os.path.isfile(state_path) or not os.path.isfile(key_path):
        raise ValueError(
            f"checkpoint {path} has no {PRIVACY_STATE} / {NOISE_RNG_STATE}: it was not written by Lap2Trainer, "
            "so the privacy already spent is unknown"
        )
    with open(state_path) as fh:
        state = json.load(fh)
    if state.get("format") != _STATE_FORMAT:
        raise ValueError(
            f"checkpoint {path} was written by an older lap2_hf (privacy state format {state.get('format', 1)!r}, "
            f"expected {_STATE_FORMAT}: its secret seed had 32 effective bits and another batch stream); it cannot "
            "be resumed as the same run: start a new run"
        )
    secret = torch.load(key_path, weights_only=True)
    state["key"] = bytes.fromhex(secret["stream_key"])
    return state


def _check_same_plan(saved: dict, plan: PrivacyPlan) -> None:
    for key in ("mechanism", "accountant", "noise", "clip_norm", "delta", "sample_rate", "num_examples", "dim"):
        now = getattr(plan, key)
        if (saved[key] != now) if isinstance(now, str) else not math.isclose(saved[key], now, rel_tol=1e-9):
            raise ValueError(f"resuming with a different {key}: checkpoint has {saved[key]!r}, this run has {now!r}")


class _BudgetCallback(TrainerCallback):
    """Stops training before a step that would take epsilon past ``dp_target_epsilon``."""

    def __init__(self, trainer: Lap2Trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        tr = self.trainer
        if tr.plan is None:
            return control
        # The accountant holds every step of the stream, earlier train() calls included.
        if not tr._budget_allows_step():
            if state.global_step < state.max_steps:
                logger.warning(
                    "stopping at step %d: one more step would exceed dp_target_epsilon=%s",
                    state.global_step,
                    tr.plan.target_epsilon,
                )
            control.should_training_stop = True
        return control
