"""Privacy-aware training arguments: ``Lap2TrainingArguments`` extends ``transformers.TrainingArguments``.

Replacing ``TrainingArguments`` by ``Lap2TrainingArguments`` (and ``Trainer`` by ``Lap2Trainer``) is all
an existing Hugging Face pipeline changes. Settings that would break the guarantee or clip twice are
refused here, before any training, with the setting to use instead.

``per_device_train_batch_size`` keeps its HF meaning of *physical* batch (memory only); the privacy
batch is ``dp_expected_batch_size`` (sets the Poisson rate q = B / N).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .accounting.mechanism_spec import ACCOUNTANTS, MECHANISMS, get_spec

TASKS = ("auto", "sequence_classification", "causal_lm", "token_classification")

#: What saved and logged arguments hold instead of a ``dp_seed`` (see :meth:`Lap2TrainingArguments.to_dict`).
REDACTED_SEED = "<dp_seed redacted>"


@dataclass(frozen=True)
class PrivacyArguments:
    """The privacy half of :class:`Lap2TrainingArguments`, validated (a frozen record for logs/checkpoints)."""

    mechanism: str = "lap2"
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    clip_norm: float = 1.0
    expected_batch_size: int = 256
    seed: int | None = None
    task: str = "auto"
    secure_rng: bool = False
    log_private_stats: bool = False
    accountant: str = "rdp"

    def __post_init__(self):
        m = self.mechanism
        if m not in MECHANISMS:
            raise ValueError(f"dp_mechanism must be one of {tuple(MECHANISMS)}, got {m!r}")
        spec = get_spec(m)
        # Refused here, before any data or model is touched: lap2 has no PLD analysis (the error says why).
        spec.check_accountant(self.accountant, field="dp_accountant")
        if not spec.private:
            if self.target_epsilon is not None or self.noise_multiplier is not None:
                raise ValueError(
                    "dp_mechanism='none' trains without privacy: do not set dp_target_epsilon "
                    f"({self.target_epsilon!r}) or dp_noise_multiplier ({self.noise_multiplier!r})"
                )
        else:
            if (self.target_epsilon is None) == (self.noise_multiplier is None):
                raise ValueError(
                    f"dp_mechanism={m!r} needs exactly one of dp_target_epsilon (calibrate the noise) or "
                    f"dp_noise_multiplier (sigma or b/C); got dp_target_epsilon={self.target_epsilon!r}, "
                    f"dp_noise_multiplier={self.noise_multiplier!r}"
                )
            if self.target_epsilon is not None and not _positive_finite(self.target_epsilon):
                raise ValueError(f"dp_target_epsilon must be a positive finite number, got {self.target_epsilon!r}")
            if self.noise_multiplier is not None and not _positive_finite(self.noise_multiplier):
                raise ValueError(f"dp_noise_multiplier must be a positive finite number, got {self.noise_multiplier!r}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"dp_delta must be in (0, 1), got {self.delta!r}")
        if not _positive_finite(self.clip_norm):
            raise ValueError(f"dp_clip_norm must be a positive finite number, got {self.clip_norm!r}")
        if not isinstance(self.expected_batch_size, int) or self.expected_batch_size < 1:
            raise ValueError(f"dp_expected_batch_size must be a positive integer, got {self.expected_batch_size!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"dp_seed must be a non-negative integer or None, got {self.seed!r}")
        for name in ("secure_rng", "log_private_stats"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"dp_{name} must be True or False, got {getattr(self, name)!r}")
        if self.task not in TASKS:
            raise ValueError(f"dp_task must be one of {TASKS}, got {self.task!r}")


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf")


@dataclass
class Lap2TrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus differential privacy (DP-SGD with Poisson sampling)."""

    dp_mechanism: str = field(
        default="lap2",
        metadata={
            "help": "Noise mechanism: " + "; ".join(f"'{s.name}' ({s.summary})" for s in MECHANISMS.values()) + ".",
            "choices": list(MECHANISMS),
        },
    )
    dp_target_epsilon: float | None = field(
        default=None,
        metadata={
            "help": (
                "Target epsilon: the noise is calibrated so that the whole run spends at most this. Exclusive with "
                "dp_noise_multiplier."
            )
        },
    )
    dp_noise_multiplier: float | None = field(
        default=None,
        metadata={"help": "Explicit noise: sigma (gaussian) or b/C (laplace, lap2). Exclusive with dp_target_epsilon."},
    )
    dp_delta: float | None = field(
        default=None, metadata={"help": "delta of (epsilon, delta)-DP. Must be < 1/N; default 1/(2N)."}
    )
    dp_clip_norm: float = field(
        default=1.0, metadata={"help": "Per-sample clipping bound C (L2 norm; L1 for 'laplace')."}
    )
    dp_accountant: str = field(
        default="rdp",
        metadata={
            "help": "Accountant of every epsilon (calibration, logs, budget stop, results): 'rdp' (lap2_hf's "
            "Renyi-DP bound at integer orders; every mechanism) or 'pld' (dp_accounting's privacy loss "
            "distribution, pessimistic discretisation; gaussian and laplace only, tighter: less noise "
            "for the same epsilon). 'pld' with lap2 is refused: its only proven analysis is RDP.",
            "choices": list(ACCOUNTANTS),
        },
    )
    dp_expected_batch_size: int = field(
        default=256,
        metadata={
            "help": (
                "Expected logical batch size B; each example is sampled with probability q = B/N per step. "
                "per_device_train_batch_size is the physical (memory) batch."
            )
        },
    )
    dp_seed: int | None = field(
        default=None,
        metadata={
            "help": (
                "Secret seed of Poisson sampling and noise: a non-negative integer of any size. None (default) draws "
                "a 256-bit seed from the OS CSPRNG. A fixed seed makes runs reproducible, but anyone who knows or can "
                "enumerate it can recompute the batches and the noise: keep it secret and give it at least 128 random "
                "bits (e.g. secrets.randbits(128))."
            )
        },
    )
    dp_secure_rng: bool = field(
        default=False,
        metadata={
            "help": (
                "Draw the noise from a ChaCha20 keystream (a cryptographically secure generator, keyed from the "
                "secret seed) instead of torch's MT19937/Philox generators. Same law, same reproducibility; slower "
                "(see benchmarks/bench_secure_rng.py)."
            )
        },
    )
    dp_log_private_stats: bool = field(
        default=False,
        metadata={
            "help": (
                "Also log (progress bar, log_history, trainer_state.json in checkpoints, report_to, TrainOutput) four "
                "unnoised statistics of the private data: 'loss' / 'train_loss' (mean training loss of the step's "
                "Poisson batch over its finite losses: reveals how well the model fits those examples, a membership "
                "signal), 'dp_batch_size' (the exact Poisson batch size |B|: reveals how many examples were sampled, "
                "which the guarantee assumes hidden), 'dp_clipped_fraction' (share of the batch whose gradient norm "
                "exceeded dp_clip_norm: reveals how unusual the sampled examples are) and 'dp_nonfinite_examples' "
                "(how many sampled examples had a non-finite loss or norm: reveals whether a given odd example was "
                "sampled). None of them is covered by the reported epsilon. Default False: none is computed or "
                "logged, and TrainOutput.training_loss is NaN."
            )
        },
    )
    dp_task: str = field(
        default="auto",
        metadata={
            "help": (
                "Per-example loss: 'auto' (from the model class), 'sequence_classification', 'causal_lm', "
                "'token_classification'."
            ),
            "choices": list(TASKS),
        },
    )
    # Global clipping on top of per-sample clipping changes the mechanism (docs/design.md §9).
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "Must stay 0 under DP: per-sample clipping is dp_clip_norm."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.validate_privacy()

    # -- the seed never leaves in what is saved or logged -----------------------------------------------
    # Whoever knows dp_seed can recompute every batch and all the noise (README, "Seeds are secrets"), and HF
    # writes the arguments into training_args.bin beside every saved model and checkpoint (pushed to the Hub
    # with them) and hands to_dict() to every report_to integration. So both redact it, whatever its value,
    # like HF's own *_token fields; in-process copies (copy / deepcopy) keep it.
    def to_dict(self):
        """HF's ``to_dict`` (what ``report_to`` integrations log) with ``dp_seed`` replaced by :data:`REDACTED_SEED`."""
        d = super().to_dict()
        if d.get("dp_seed") is not None:
            d["dp_seed"] = REDACTED_SEED
        return d

    def __getstate__(self):
        """Pickled state (``training_args.bin``): ``dp_seed`` redacted, and the derived ``privacy`` left out."""
        state = dict(self.__dict__)
        if state.get("dp_seed") is not None:
            state["dp_seed"] = REDACTED_SEED
            state.pop("privacy", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __copy__(self):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def validate_privacy(self) -> PrivacyArguments:
        """Rebuild :attr:`privacy` from the ``dp_*`` fields and refuse unsafe settings again.

        ``Lap2Trainer`` calls this at the start of every ``train()``: fields can be set after construction
        (``hyperparameter_search`` sets trial values with ``setattr``), and each must be checked.
        """
        if self.dp_seed == REDACTED_SEED:
            raise ValueError(
                f"dp_seed={REDACTED_SEED!r}: these arguments were loaded from a saved copy, which never holds the seed "
                "(it is secret); set dp_seed again, or None for a fresh secret seed"
            )
        self.privacy = PrivacyArguments(
            mechanism=self.dp_mechanism,
            target_epsilon=self.dp_target_epsilon,
            noise_multiplier=self.dp_noise_multiplier,
            delta=self.dp_delta,
            clip_norm=self.dp_clip_norm,
            expected_batch_size=self.dp_expected_batch_size,
            seed=self.dp_seed,
            task=self.dp_task,
            secure_rng=self.dp_secure_rng,
            log_private_stats=self.dp_log_private_stats,
            accountant=self.dp_accountant,
        )
        self._refuse_unsafe_settings()
        return self.privacy

    def _refuse_unsafe_settings(self) -> None:
        refuse = []
        if self.max_grad_norm not in (0, 0.0, None):
            refuse.append(
                f"max_grad_norm={self.max_grad_norm}: global clipping on top of per-sample clipping; set "
                "max_grad_norm=0 and use dp_clip_norm"
            )
        if self.gradient_accumulation_steps != 1:
            refuse.append(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}: logical batches are set by "
                "dp_expected_batch_size and split into physical chunks of per_device_train_batch_size; set "
                "gradient_accumulation_steps=1"
            )
        if self.gradient_checkpointing:
            refuse.append(
                "gradient_checkpointing=True: recomputed forwards would be recorded twice by the clipping hooks; set "
                "gradient_checkpointing=False"
            )
        if getattr(self, "label_smoothing_factor", 0):
            refuse.append(
                f"label_smoothing_factor={self.label_smoothing_factor}: not applied by the per-example loss; "
                "set it to 0"
            )
        if getattr(self, "neftune_noise_alpha", None):
            refuse.append("neftune_noise_alpha: embedding noise hooks conflict with per-sample clipping; unset it")
        if getattr(self, "torch_compile", False):
            refuse.append("torch_compile=True: not supported with the clipping hooks; set torch_compile=False")
        if getattr(self, "deepspeed", None) or getattr(self, "fsdp", None):
            refuse.append(
                "deepspeed/fsdp: sharded parameters are not supported by per-sample clipping; use plain data parallel "
                "(accelerate launch)"
            )
        if getattr(self, "auto_find_batch_size", False):
            refuse.append("auto_find_batch_size=True: set per_device_train_batch_size (physical) explicitly")
        if getattr(self, "fp16", False):
            # HF's GradScaler unscales gradients it expects to be scaled by the loss scale; the private
            # gradient is formed from per-example losses the scaler never sees, so the update would be
            # wrong by the scale factor.
            refuse.append(
                "fp16=True: the per-sample clipped gradient is never loss-scaled, so HF's fp16 grad scaler would "
                "unscale (corrupt) it; use bf16=True (needs no loss scaling) or float32"
            )
        if getattr(self, "ignore_data_skip", False):
            # On resume the loop would replay the batches of the interrupted epoch from its start while the
            # accountant counts them as fresh draws.
            refuse.append(
                "ignore_data_skip=True: on resume it replays Poisson batches already drawn while the accountant "
                "counts them as fresh; leave ignore_data_skip=False (resuming then continues the exact batch stream)"
            )
        strategy = getattr(self.hub_strategy, "value", self.hub_strategy)  # HubStrategy after HF's post-init
        if self.push_to_hub and strategy in ("checkpoint", "all_checkpoints"):
            # HF uploads the whole checkpoint folder, privacy_noise_rng.pt (the stream key) included.
            refuse.append(
                f"push_to_hub with hub_strategy={strategy!r}: it uploads checkpoint folders, whose stream key "
                "recomputes every batch and all the noise; use hub_strategy='every_save' or 'end' (model only)"
            )
        if refuse:
            raise ValueError(
                "Lap2TrainingArguments: these settings would break the privacy guarantee or are unsupported under "
                "DP:\n  - " + "\n  - ".join(refuse)
            )
