"""Run configuration: one typed schema, read from TOML, Flower run configs and `--set`.

Flower hands apps a flat ``{"key": scalar}`` run config whose nested TOML tables
become dotted keys (``lora.r``). fedelta keeps exactly that shape on the wire and
in files, and gives Python users typed dataclasses on top of it. Every value is
checked here on its own: an unknown or renamed key, a wrong type or an impossible
value raises :class:`ConfigError` naming the key. Whether the components a config
names exist and work together is for the components to say; that is checked by
:func:`fedelta.compatibility.check_config`, which every engine runs before training.

This module is the bottom of the stack: it imports nothing from fedelta but
:mod:`fedelta.errors`.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from fedelta.config.sections import (
    CompressionConfig,
    DataConfig,
    ExportConfig,
    GenerationConfig,
    LoraSettings,
    ModelConfig,
    PrivacyConfig,
    SimulationConfig,
    StrategyConfig,
)
from fedelta.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

Scalar = bool | int | float | str

RUN_CONFIG_FILE = "config.toml"
"""Where a run directory keeps the exact config it ran with (what resume and export read)."""

RENAMED_KEYS = {
    "strategy.name": "strategy.optimizer",
    "strategy.robust": "strategy.aggregator",
}
"""Keys of earlier releases, and the key that now holds their value."""

RANGES = {
    "num-server-rounds": ">= 1",
    "fraction-train": "(0, 1]",
    "fraction-evaluate": "[0, 1]",
    "min-train-nodes": ">= 1",
    "min-available-nodes": ">= 1",
    "round-timeout": ">= 0",
    "min-train-replies": ">= 1",
    "round-retries": ">= 0",
    "max-update-norm": ">= 0",
    "local-epochs": ">= 1",
    "local-steps": ">= 0",
    "lr": "> 0",
    "max-local-epochs": ">= 0",
    "min-lr": ">= 0",
    "warmup-steps": ">= 0",
    "head-lr": ">= 0",
    "sgd-momentum": "[0, 1)",
    "max-grad-norm": ">= 0",
    "calibration-tau": ">= 0",
    "batch-size": ">= 1",
    "gradient-accumulation-steps": ">= 1",
    "weight-decay": ">= 0",
    "model.max-length": ">= 2",
    "lora.r": ">= 1",
    "lora.alpha": "> 0",
    "lora.dropout": "[0, 1)",
    "strategy.clip-norm": ">= 0",
    "strategy.server-lr": ">= 0",
    "strategy.momentum": "[0, 1)",
    "strategy.beta1": "[0, 1)",
    "strategy.beta2": "[0, 1)",
    "strategy.tau": "> 0",
    "strategy.proximal-mu": ">= 0",
    "strategy.trim-fraction": "[0, 0.5)",
    "strategy.byzantine": ">= 0",
    "strategy.krum-keep": ">= 0",
    "strategy.fold-rank": ">= 0",
    "strategy.head-rounds": ">= 0",
    "strategy.merge-density": "(0, 1]",
    "export.density": "(0, 1]",
    "export.ema-decay": "[0, 1)",
    "data.test-size": ">= 1",
    "data.dirichlet-alpha": "> 0",
    "data.validation-fraction": "[0, 1)",
    "compression.density": "(0, 1]",
    "compression.block-size": ">= 1",
    "compression.regrow-interval": ">= 0",
    "compression.regrow-fraction": "[0, 1)",
    "compression.lift-rank": ">= 1",
    "generation.num-prompts": ">= 0",
    "generation.max-new-tokens": ">= 1",
    "privacy.noise-multiplier": ">= 0",
    "privacy.target-epsilon": ">= 0",
    "privacy.max-grad-norm": "> 0",
    "privacy.delta": "(0, 1)",
    "privacy.client-clip-norm": "> 0",
    "privacy.client-noise-multiplier": ">= 0",
    "privacy.client-target-epsilon": ">= 0",
    "privacy.secagg-num-shares": "> 0",
    "privacy.secagg-reconstruction-threshold": "> 0",
    "privacy.secagg-clipping-range": "> 0",
    "privacy.secagg-quantization-range": ">= 2",
    "privacy.secagg-max-weight": "> 0",
    "simulation.num-supernodes": ">= 1",
    "simulation.client-cpus": "> 0",
}
"""The allowed interval of every numeric key: ``>= x``, ``> x`` or an interval
``[lo, hi]`` / ``(lo, hi)`` with open or closed ends."""


class ConfigError(UserError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


@dataclass
class RunConfig:
    """Everything one federated run needs; keys follow Flower's run-config names."""

    num_server_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    """Share of clients asked for federated evaluation each round (0 turns it off)."""
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 0.0
    """Seconds to wait for replies in a round; 0 waits for all of them."""
    min_train_replies: int = 1
    """Usable updates a round needs to be aggregated; fewer makes it a short round."""
    short_round: str = "retry"
    """What a short round does: ``retry`` (sample again, up to ``round-retries``
    times, then skip), ``skip`` (keep the global model, go on) or ``stop`` (end
    the run; it can be resumed)."""
    round_retries: int = 1
    max_update_norm: float = 0.0
    """Reject (not clip) an update whose L2 norm exceeds this; 0: no bound."""
    local_epochs: int = 1
    local_steps: int = 25
    """Optimizer steps per round on each client; 0 trains ``local-epochs`` instead."""
    max_local_epochs: float = 0.0
    """Cap on the passes over its data a site makes in one round (a 41-example site at
    25 steps of 16 would make 10); 0: no cap. A capped site takes fewer steps."""
    lr: float = 2e-3
    """Client learning rate (of round 1, under ``lr-scheduler``)."""
    lr_scheduler: str = "constant"
    """How the client lr moves across rounds: ``constant``, ``linear`` or ``cosine``
    decay from ``lr`` in round 1 towards ``min-lr`` after the last round."""
    min_lr: float = 0.0
    """The lr that ``linear`` and ``cosine`` decay towards."""
    warmup_steps: int = 0
    """Local steps at the start of each round whose lr ramps linearly up to the round's."""
    head_lr: float = 0.0
    """Learning rate of the classification head (scheduled like ``lr``); 0: ``lr``."""
    optim: str = "adamw"
    """Client optimizer: ``adamw`` or ``sgd`` (with ``sgd-momentum``; at 0 it is the
    plain SGD that SCAFFOLD's option II and FedNova's normalisation assume)."""
    sgd_momentum: float = 0.9
    keep_optimizer_state: bool = False
    """Sites keep their optimizer state (AdamW moments, SGD momentum) from round to
    round instead of starting each round afresh."""
    max_grad_norm: float = 0.0
    """Clip each step's gradient to this global L2 norm (0: off). Under DP-SGD the
    per-example bound is ``privacy.max-grad-norm`` instead."""
    loss: str = "cross-entropy"
    """Classification training loss: ``cross-entropy``, ``logit-adjusted`` (balanced
    softmax / logit adjustment by the site's label prior) or ``fedlc`` (FedLC's
    calibration by label counts); see :mod:`fedelta.client.calibration`."""
    calibration_tau: float = 1.0
    """Strength of the ``logit-adjusted`` and ``fedlc`` calibration."""
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    """Batches whose gradients are summed into one optimizer step (a step then sees
    ``batch-size x gradient-accumulation-steps`` examples)."""
    weight_decay: float = 0.0
    seed: int = 42
    central_evaluation: bool = True
    """Evaluate the global adapter on the held-out test split after every round."""
    output_dir: str = ""
    """Where metrics, checkpoints and the adapter go; empty means ``outputs/<time>``."""
    resume: bool = False
    """Continue the run in ``output-dir`` from its last completed round."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    # -- conversions -------------------------------------------------------------
    def to_flat(self) -> dict[str, Scalar]:
        """The Flower run-config form: dotted, hyphenated keys to scalars."""
        return dict(_flatten(self))

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build and validate from a flat mapping; missing keys keep their defaults."""
        config = cls()
        for key, value in flat.items():
            _assign(config, key, value)
        config.validate()
        return config

    def replace(self, **overrides: Any) -> RunConfig:
        """A validated copy with dotted-or-underscored keys replaced (``lora.r=4``)."""
        flat = self.to_flat()
        for key, value in overrides.items():
            flat[key.replace("_", "-")] = value
        return RunConfig.from_flat(flat)

    def to_toml(self) -> str:
        """Serialise as TOML with one table per section, readable and re-loadable."""
        top, sections = [], {}
        for key, value in self.to_flat().items():
            if "." in key:
                section, name = key.split(".", 1)
                sections.setdefault(section, []).append(f"{name} = {_toml_value(value)}")
            else:
                top.append(f"{key} = {_toml_value(value)}")
        parts = ["\n".join(top)]
        parts += [f"[{name}]\n" + "\n".join(lines) for name, lines in sections.items()]
        return "\n\n".join(parts) + "\n"

    # -- validation --------------------------------------------------------------
    def validate(self) -> None:
        """Reject values that are impossible on their own, before any model is built."""
        flat = self.to_flat()
        for key, allowed in RANGES.items():
            if not _in_range(flat[key], allowed):
                why = f"must be {allowed}" if allowed[0] in "<>" else f"must be in {allowed}"
                raise ConfigError(f"config key '{key}' {why} (got {flat[key]!r})")
        checks = [
            ("model.name", bool(self.model.name.strip()), "must not be empty"),
            ("lora.target-modules", bool(self.lora.target_module_list()), "must name a module"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' {why} (got {flat[key]!r})")
        choices = {
            "short-round": ("retry", "skip", "stop"),
            "lr-scheduler": ("constant", "linear", "cosine"),
            "optim": ("adamw", "sgd"),
            "loss": ("cross-entropy", "logit-adjusted", "fedlc"),
            "strategy.rank-projection": ("truncate", "svd"),
            "model.finetuning": ("lora", "full"),
            "model.pooling": ("auto", "cls", "mean"),
            "compression.weighting": ("all", "senders"),
            "privacy.client-dp": ("none", "central", "distributed"),
        }
        for key, allowed in choices.items():
            check_choice(key, flat[key], allowed)
        self._validate_ranks()
        labels = self.data.label_list()
        if self.data.labels.strip() and (len(labels) < 2 or len(set(labels)) != len(labels)):
            raise ConfigError(
                "config key 'data.labels' must list at least 2 distinct label names "
                f"(got {self.data.labels!r})"
            )
        if self.lr_scheduler != "constant" and self.min_lr > self.lr:
            raise ConfigError(
                f"config key 'min-lr' must be <= 'lr' ({self.min_lr} > {self.lr}): "
                f"lr-scheduler = {self.lr_scheduler!r} decays towards it"
            )
        if self.min_train_replies > self.min_train_nodes:
            raise ConfigError(
                "config key 'min-train-replies' must be <= 'min-train-nodes' "
                f"({self.min_train_replies} > {self.min_train_nodes}): a round could never "
                "reach it"
            )
        if self.min_available_nodes < self.min_train_nodes:
            raise ConfigError(
                "config key 'min-available-nodes' must be >= 'min-train-nodes' "
                f"({self.min_available_nodes} < {self.min_train_nodes})"
            )

    def _validate_ranks(self) -> None:
        try:
            ranks = self.lora.client_rank_list()
        except ValueError:
            raise ConfigError(
                "config key 'lora.client-ranks' must be comma-separated integers "
                f"(got {self.lora.client_ranks!r})"
            ) from None
        bad = [r for r in ranks if not 1 <= r <= self.lora.r]
        if bad:
            raise ConfigError(
                f"config key 'lora.client-ranks' has ranks {bad} outside [1, lora.r = "
                f"{self.lora.r}]; lora.r is the rank of the global adapter"
            )


def check_choice(key: str, value: Any, allowed: Collection[str]) -> None:
    """Raise :class:`ConfigError` naming ``key`` and the choices unless ``value`` is one
    of ``allowed`` (the config's own options and every registry use it)."""
    if value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)} (got {value!r})")


# -- loading ----------------------------------------------------------------------
def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    follow_renames: bool = False,
) -> RunConfig:
    """Read a TOML run config (or the defaults) and apply ``key=value`` overrides.

    A key of an earlier release is refused with its new name; with ``follow_renames``
    (a run folder's own ``config.toml``, written by an earlier release) it is read
    under its new name instead, so old runs can still be resumed, exported and
    reported."""
    flat = flatten_mapping(read_toml(path)) if path is not None else {}
    for key in [k for k in flat if k in RENAMED_KEYS]:
        if not follow_renames:
            raise ConfigError(
                f"config file '{path}': key '{key}' was renamed to '{RENAMED_KEYS[key]}'"
            )
        flat[RENAMED_KEYS[key]] = flat.pop(key)
    flat.update(parse_overrides(overrides))
    return RunConfig.from_flat(flat)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file's tables, or a :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file '{path}' is not valid TOML: {err}") from err


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` items; values are TOML literals, bare words are strings."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            parsed[key] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            parsed[key] = text.strip()
    return parsed


def flatten_mapping(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables to dotted keys (``[lora] r = 4`` is ``lora.r``)."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, Mapping):
            flat.update(flatten_mapping(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# -- internals --------------------------------------------------------------------
def _key(name: str) -> str:
    return name.replace("_", "-")


def _flatten(obj: Any, prefix: str = "") -> Iterable[tuple[str, Scalar]]:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + _key(f.name)
        if dataclasses.is_dataclass(value):
            yield from _flatten(value, key + ".")
        else:
            yield key, value


def _assign(config: RunConfig, key: str, value: Any) -> None:
    """Set one dotted key on the dataclass tree, type-checked."""
    if key in RENAMED_KEYS:
        raise ConfigError(f"config key '{key}' was renamed to '{RENAMED_KEYS[key]}'")
    target: Any = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        names = {_key(f.name): f.name for f in dataclasses.fields(target)}
        if part not in names:
            known = ", ".join(sorted(k for k, _ in _flatten(RunConfig())))
            raise ConfigError(f"unknown config key '{key}' (known keys: {known})")
        attr = names[part]
        if depth < len(parts) - 1:
            target = getattr(target, attr)
            if not dataclasses.is_dataclass(target):
                raise ConfigError(f"unknown config key '{key}': '{part}' is not a section")
            continue
        if dataclasses.is_dataclass(getattr(target, attr)):
            raise ConfigError(f"config key '{key}' is a section, not a value")
        expected = get_type_hints(type(target))[attr]
        setattr(target, attr, _coerce(key, value, expected))


def _coerce(key: str, value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
        raise ConfigError(
            f"config key '{key}' must be of type {expected.__name__}, "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def _toml_value(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _in_range(value: float, allowed: str) -> bool:
    """Whether ``value`` lies in ``allowed`` (a :data:`RANGES` entry)."""
    if allowed.startswith(">="):
        return value >= float(allowed[2:])
    if allowed.startswith(">"):
        return value > float(allowed[1:])
    low, high = (float(x) for x in allowed[1:-1].split(","))
    above = value >= low if allowed[0] == "[" else value > low
    below = value <= high if allowed[-1] == "]" else value < high
    return above and below


__all__ = [
    "RANGES",
    "RENAMED_KEYS",
    "RUN_CONFIG_FILE",
    "CompressionConfig",
    "ConfigError",
    "DataConfig",
    "ExportConfig",
    "GenerationConfig",
    "LoraSettings",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "SimulationConfig",
    "StrategyConfig",
    "check_choice",
    "flatten_mapping",
    "load_config",
    "parse_overrides",
    "read_toml",
]
