"""Run configuration: one typed schema, read from TOML, Flower run configs and `--set`.

Flower hands apps a flat ``{"key": scalar}`` run config whose nested TOML tables
become dotted keys (``lora.r``). fedelta keeps exactly that shape on the wire and
in files, and gives Python users typed dataclasses on top of it. Every value is
checked before anything is trained: an unknown key, a wrong type or an impossible
value raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from fedelta.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

Scalar = bool | int | float | str

TASKS = ("classification", "causal-lm")
"""What ``model.task`` may be."""

RUN_CONFIG_FILE = "config.toml"
"""Where a run directory keeps the exact config it ran with (what resume and export read)."""


class ConfigError(UserError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


@dataclass
class ModelConfig:
    """Which pretrained model the federation adapts (``[model]``)."""

    name: str = "all-MiniLM-L6-v2"
    """A built-in alias (all-MiniLM-L6-v2, SmolLM2-135M-Instruct), a local Hugging Face
    model folder, or a hub id."""
    task: str = "classification"
    """``classification`` (sequence classification on labelled text: a new head) or
    ``causal-lm`` (instruction tuning on chat data: loss on response tokens)."""
    max_length: int = 64
    """Longest tokenised input (a whole chat for causal-lm); longer ones are truncated."""
    finetuning: str = "lora"
    """``lora`` trains LoRA adapters on ``lora.target-modules``; ``full`` trains those
    modules' weights and biases directly (no adapter), e.g. for sparse fine-tuning.
    The classification head trains in both."""


@dataclass
class LoraSettings:
    """LoRA adapter shape shared by every client (``[lora]``)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = "query,key,value,dense"
    """Comma-separated module name suffixes, as in ``peft.LoraConfig``."""
    use_rslora: bool = False
    """Scale updates by ``alpha / sqrt(rank)`` (rsLoRA) instead of ``alpha / rank``."""
    client_ranks: str = ""
    """Comma-separated ranks assigned to clients by partition id (cycled); empty: all
    use ``r``. A SuperNode's ``lora-r`` node config overrides it. Each must be <= ``r``,
    the rank of the server's global adapter."""

    def target_module_list(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def client_rank_list(self) -> list[int]:
        """The ranks of ``client-ranks``; raises ``ValueError`` on a non-integer item."""
        return [int(item) for item in self.client_ranks.split(",") if item.strip()]


@dataclass
class DataConfig:
    """Where examples come from and how they are split across clients (``[data]``)."""

    name: str = "rotten-tomatoes"
    """A built-in corpus name or a local CSV/JSON/JSONL/Parquet file."""
    text_column: str = "text"
    label_column: str = "label"
    test_size: int = 1000
    """Examples held out before partitioning, for the server's central evaluation."""
    partitioner: str = "dirichlet"
    """``iid``, ``dirichlet`` (label skew) or ``topic`` (chat data: each site gets whole
    topics, the topics spread evenly over the sites)."""
    dirichlet_alpha: float = 0.5
    validation_fraction: float = 0.1
    """Share of each client's partition kept for federated evaluation."""
    labels: str = ""
    """Label names in class-id order, comma-separated; empty: those of ``name``'s corpus.
    The server fills them in before the first round, so sites training on their own
    data file (node config ``data-path``) map their labels to the same ids."""

    packing: bool = False
    """causal-lm: concatenate tokenised chats into ``model.max-length`` blocks instead
    of padding each one (faster on short chats; attention crosses chat boundaries)."""

    def label_list(self) -> tuple[str, ...]:
        return tuple(item.strip() for item in self.labels.split(",") if item.strip())


@dataclass
class GenerationConfig:
    """Sample answers written into a causal-lm run's report (``[generation]``)."""

    prompts: str = ""
    """User prompts separated by ``|``; empty: the first ``num-prompts`` held-out ones."""
    num_prompts: int = 4
    max_new_tokens: int = 48
    """Greedy decoding length per answer."""

    def prompt_list(self) -> list[str]:
        return [item.strip() for item in self.prompts.split("|") if item.strip()]


@dataclass
class StrategyConfig:
    """How the server turns client deltas into the next global adapter (``[strategy]``).

    Three choices compose: the server optimizer (``name``), how LoRA factors are
    aggregated (``lora``) and how client updates are combined (``robust``), with
    optional norm bounding (``clip-norm``) before any of them.
    """

    name: str = "fedavg"
    """Server optimizer: fedavg, fedavgm, fedadam, fedyogi, fedadagrad or fedprox."""
    lora: str = "naive"
    """LoRA aggregation: naive, ffa, fedsa, fedex or flora."""
    robust: str = "mean"
    """Combination of client updates: mean, median, trimmed-mean, krum, multi-krum, or a
    merge operator: ties, dare-ties, dare-linear or magnitude-prune."""
    merge_density: float = 0.2
    """Merge operators: share of each client's entries kept (TIES trim, DARE keep rate)."""
    clip_norm: float = 0.0
    """Norm bounding: scale each client's update to at most this L2 norm (0: off)."""
    server_lr: float = 0.0
    """Server learning rate; 0 picks the optimizer's default (1.0, adaptive ones 0.01)."""
    momentum: float = 0.9
    """FedAvgM server momentum."""
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    """Adaptivity of FedAdam/FedYogi/FedAdagrad (Reddi et al., 2021)."""
    proximal_mu: float = 0.01
    """FedProx: weight of the proximal term (mu/2)||w - w_global||^2 on clients."""
    trim_fraction: float = 0.1
    """Trimmed mean: share of the largest and of the smallest values dropped per coordinate."""
    byzantine: int = 1
    """Krum / Multi-Krum: number of faulty clients tolerated (f)."""
    krum_keep: int = 0
    """Multi-Krum: updates averaged (m); 0 keeps n - f."""
    fold_rank: int = 0
    """FedEx-LoRA / FLoRA: rank of the truncated SVD that carries the folded base-weight
    correction to clients; 0 sends it dense (exact)."""
    rank_projection: str = "truncate"
    """How a client of lower rank takes the global adapter: the first components
    (``truncate``) or the top singular components (``svd``)."""


@dataclass
class CompressionConfig:
    """How clients sparsify and quantize the deltas they upload (``[compression]``).

    Sparsity and quantization compose: the kept entries are quantized. The server
    decodes every reply against what this table says it must look like.
    """

    sparsity: str = "none"
    """``none``, ``top-k`` (largest entries of the delta), ``random-mask`` (a mask
    seeded by the round, shared by all clients: no indices sent), ``spiel``
    (train a fixed-density index set, prune and regrow) or ``lift`` (train the
    principal weights of a low-rank approximation)."""
    density: float = 0.05
    """Share of each tensor's entries a sparse method keeps."""
    error_feedback: bool = True
    """Top-k, random masks and quantization: keep what was not sent and add it to the
    next round's delta. Training-time masks (spiel, lift) send exactly what they train."""
    quantization: str = "none"
    """Values on the wire: ``none`` (fp32), ``fp16``, ``int8`` (one scale per tensor)
    or ``int8-block`` (one scale per ``block-size`` values)."""
    block_size: int = 256
    stochastic_rounding: bool = False
    """int8: round up or down at random in proportion (unbiased) instead of to nearest."""
    weighting: str = "all"
    """Sparse averaging per coordinate: over ``all`` clients of the round (a client
    that did not send a coordinate counts as zero: the mean of the densified deltas)
    or over the ``senders`` of that coordinate only."""
    half_finetuning: bool = False
    """Half Fine-Tuning: each round the server's seeded draw trains half of the
    modules and freezes the rest; clients upload only the trained half."""
    regrow_interval: int = 10
    """spiel: local steps between prune-and-regrow updates of the index set (0: never)."""
    regrow_fraction: float = 0.2
    """spiel: share of the index set replaced at each update."""
    lift_rank: int = 16
    """lift: rank of the approximation whose largest entries are trained."""


@dataclass
class ExportConfig:
    """Which model a run exports (``[export]``): the last global model, or a merge of
    the global deltas of all rounds."""

    merge: str = "none"
    """``none`` (the last round's model), a merge operator over the round deltas
    (``task-arithmetic``, ``ties``, ``dare-ties``, ``dare-linear``,
    ``magnitude-prune``), ``ema`` (exponential moving average of the global models)
    or ``lines`` (the final delta scaled by depth)."""
    density: float = 0.2
    """Merge operators: share of each round delta's entries kept."""
    scale: float = 1.0
    """Merge operators: the merged delta is multiplied by this (task arithmetic's lambda)."""
    ema_decay: float = 0.5
    """ema: weight of the average so far against each new global model."""
    lines_alpha: float = 0.5
    lines_beta: float = 0.5
    """lines: the delta of block l of L is scaled by alpha + beta * (l - 1) / (L - 1)."""


@dataclass
class PrivacyConfig:
    """Differential privacy and secure aggregation (``[privacy]``).

    Sample-level DP-SGD protects each training example at its site (Opacus, per-site
    accountant). Client-level DP protects each site's whole contribution to a round
    (clip the delta, add Gaussian noise at the server or on the clients). Secure
    aggregation (SecAgg+) hides each site's upload from the server.
    """

    dp_sgd: bool = False
    """Train every client with DP-SGD (per-example clipping and noise, Poisson sampling)."""
    noise_multiplier: float = 0.0
    """DP-SGD noise std over ``max-grad-norm``; 0 derives it per site from ``target-epsilon``."""
    target_epsilon: float = 0.0
    """DP-SGD: each site's privacy budget over the run. With ``noise-multiplier`` = 0 the
    noise is chosen so that a site trained in every round ends at this epsilon; a site
    whose next round would exceed it refuses to train. 0 (only with an explicit noise
    multiplier): no limit, epsilon is reported only."""
    max_grad_norm: float = 1.0
    """DP-SGD: per-example gradient clipping norm."""
    delta: float = 1e-5
    """The delta of (epsilon, delta)-DP, for DP-SGD and client-level DP alike."""
    client_dp: str = "none"
    """Client-level DP on deltas: ``none``, ``central`` (the server clips each update and
    noises the mean: a trusted server) or ``distributed`` (each client clips its delta
    and adds its share of the noise; pair it with ``secure-aggregation``)."""
    client_clip_norm: float = 0.1
    """Client-level DP: L2 bound on each site's update (C)."""
    client_noise_multiplier: float = 0.0
    """Client-level DP: noise std on the sum of updates over C; 0 derives it from
    ``client-target-epsilon``."""
    client_target_epsilon: float = 0.0
    """Client-level DP: epsilon over ``num-server-rounds`` rounds."""
    seeded_noise: bool = False
    """Draw DP noise from generators seeded by the run seed (reproducible experiments).
    Off: fresh operating-system entropy, so nobody who knows the config can subtract
    the noise; keep it off in production."""
    secure_aggregation: bool = False
    """SecAgg+ (Flower's protocol): the server learns only the sum of the uploads.
    Needs a linear strategy (see ``fedelta strategies``)."""
    secagg_num_shares: float = 1.0
    """SecAgg+: shares each secret is split into, as a share of the round's clients
    (<= 1) or a count (> 1)."""
    secagg_reconstruction_threshold: float = 0.7
    """SecAgg+: shares needed to reconstruct a secret, as a share of ``secagg-num-shares``
    (<= 1) or a count (> 1); lower tolerates more dropouts, higher resists collusion."""
    secagg_clipping_range: float = 1.0
    """SecAgg+: uploads are quantized over [-range, range]; a client with a larger entry
    fails the round with a message naming it, rather than being clipped silently."""
    secagg_quantization_range: int = 4194304
    """SecAgg+: integer levels over the clipping range (2**22)."""
    secagg_max_weight: float = 1000.0
    """SecAgg+: the example count that maps to the full quantization range (precision
    per entry: 2 x clipping-range / quantization-range x max-weight / examples); a site
    with more examples must keep its entries within clipping-range x max-weight /
    examples. Unused under client-level DP (every site weighs 1)."""


@dataclass
class SimulationConfig:
    """Settings for ``fedelta simulate`` only (``[simulation]``)."""

    num_supernodes: int = 8
    client_cpus: float = 2.0
    """CPU cores (torch threads) per ClientApp; Ray runs ``cores / client-cpus`` at once."""


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
    lr: float = 2e-3
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
        """Reject impossible values before any model is built."""
        checks: list[tuple[str, bool, str]] = [
            ("num-server-rounds", self.num_server_rounds >= 1, "must be >= 1"),
            ("fraction-train", 0.0 < self.fraction_train <= 1.0, "must be in (0, 1]"),
            ("fraction-evaluate", 0.0 <= self.fraction_evaluate <= 1.0, "must be in [0, 1]"),
            ("min-train-nodes", self.min_train_nodes >= 1, "must be >= 1"),
            ("min-available-nodes", self.min_available_nodes >= 1, "must be >= 1"),
            ("round-timeout", self.round_timeout >= 0.0, "must be >= 0"),
            ("min-train-replies", self.min_train_replies >= 1, "must be >= 1"),
            ("round-retries", self.round_retries >= 0, "must be >= 0"),
            ("max-update-norm", self.max_update_norm >= 0.0, "must be >= 0"),
            ("local-epochs", self.local_epochs >= 1, "must be >= 1"),
            ("local-steps", self.local_steps >= 0, "must be >= 0"),
            ("lr", self.lr > 0.0, "must be > 0"),
            ("batch-size", self.batch_size >= 1, "must be >= 1"),
            (
                "gradient-accumulation-steps",
                self.gradient_accumulation_steps >= 1,
                "must be >= 1",
            ),
            ("weight-decay", self.weight_decay >= 0.0, "must be >= 0"),
            ("model.name", bool(self.model.name.strip()), "must not be empty"),
            ("model.max-length", self.model.max_length >= 2, "must be >= 2"),
            ("lora.r", self.lora.r >= 1, "must be >= 1"),
            ("lora.alpha", self.lora.alpha > 0, "must be > 0"),
            ("lora.dropout", 0.0 <= self.lora.dropout < 1.0, "must be in [0, 1)"),
            ("lora.target-modules", bool(self.lora.target_module_list()), "must name a module"),
            ("strategy.clip-norm", self.strategy.clip_norm >= 0.0, "must be >= 0"),
            ("strategy.server-lr", self.strategy.server_lr >= 0.0, "must be >= 0"),
            ("strategy.momentum", 0.0 <= self.strategy.momentum < 1.0, "must be in [0, 1)"),
            ("strategy.beta1", 0.0 <= self.strategy.beta1 < 1.0, "must be in [0, 1)"),
            ("strategy.beta2", 0.0 <= self.strategy.beta2 < 1.0, "must be in [0, 1)"),
            ("strategy.tau", self.strategy.tau > 0.0, "must be > 0"),
            ("strategy.proximal-mu", self.strategy.proximal_mu >= 0.0, "must be >= 0"),
            (
                "strategy.trim-fraction",
                0.0 <= self.strategy.trim_fraction < 0.5,
                "must be in [0, 0.5)",
            ),
            ("strategy.byzantine", self.strategy.byzantine >= 0, "must be >= 0"),
            ("strategy.krum-keep", self.strategy.krum_keep >= 0, "must be >= 0"),
            ("strategy.fold-rank", self.strategy.fold_rank >= 0, "must be >= 0"),
            (
                "strategy.merge-density",
                0.0 < self.strategy.merge_density <= 1.0,
                "must be in (0, 1]",
            ),
            ("export.density", 0.0 < self.export.density <= 1.0, "must be in (0, 1]"),
            ("export.ema-decay", 0.0 <= self.export.ema_decay < 1.0, "must be in [0, 1)"),
            ("data.test-size", self.data.test_size >= 1, "must be >= 1"),
            ("data.dirichlet-alpha", self.data.dirichlet_alpha > 0.0, "must be > 0"),
            (
                "data.validation-fraction",
                0.0 <= self.data.validation_fraction < 1.0,
                "must be in [0, 1)",
            ),
            ("compression.density", 0.0 < self.compression.density <= 1.0, "must be in (0, 1]"),
            ("compression.block-size", self.compression.block_size >= 1, "must be >= 1"),
            (
                "compression.regrow-interval",
                self.compression.regrow_interval >= 0,
                "must be >= 0",
            ),
            (
                "compression.regrow-fraction",
                0.0 <= self.compression.regrow_fraction < 1.0,
                "must be in [0, 1)",
            ),
            ("compression.lift-rank", self.compression.lift_rank >= 1, "must be >= 1"),
            ("generation.num-prompts", self.generation.num_prompts >= 0, "must be >= 0"),
            ("generation.max-new-tokens", self.generation.max_new_tokens >= 1, "must be >= 1"),
            ("privacy.noise-multiplier", self.privacy.noise_multiplier >= 0.0, "must be >= 0"),
            ("privacy.target-epsilon", self.privacy.target_epsilon >= 0.0, "must be >= 0"),
            ("privacy.max-grad-norm", self.privacy.max_grad_norm > 0.0, "must be > 0"),
            ("privacy.delta", 0.0 < self.privacy.delta < 1.0, "must be in (0, 1)"),
            ("privacy.client-clip-norm", self.privacy.client_clip_norm > 0.0, "must be > 0"),
            (
                "privacy.client-noise-multiplier",
                self.privacy.client_noise_multiplier >= 0.0,
                "must be >= 0",
            ),
            (
                "privacy.client-target-epsilon",
                self.privacy.client_target_epsilon >= 0.0,
                "must be >= 0",
            ),
            ("privacy.secagg-num-shares", self.privacy.secagg_num_shares > 0.0, "must be > 0"),
            (
                "privacy.secagg-reconstruction-threshold",
                self.privacy.secagg_reconstruction_threshold > 0.0,
                "must be > 0",
            ),
            (
                "privacy.secagg-clipping-range",
                self.privacy.secagg_clipping_range > 0.0,
                "must be > 0",
            ),
            (
                "privacy.secagg-quantization-range",
                self.privacy.secagg_quantization_range >= 2,
                "must be >= 2",
            ),
            ("privacy.secagg-max-weight", self.privacy.secagg_max_weight > 0.0, "must be > 0"),
            ("simulation.num-supernodes", self.simulation.num_supernodes >= 1, "must be >= 1"),
            ("simulation.client-cpus", self.simulation.client_cpus > 0.0, "must be > 0"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' {why} (got {self._get(key)!r})")
        from fedelta.compression import CODECS, SPARSITY
        from fedelta.merging import AGGREGATION_MERGES, EXPORT_MERGES
        from fedelta.strategies import AGGREGATORS, LORA_AGGREGATIONS, OPTIMIZERS

        choices = {
            "short-round": ("retry", "skip", "stop"),
            "data.partitioner": ("iid", "dirichlet", "topic"),
            "strategy.name": tuple(OPTIMIZERS),
            "strategy.lora": tuple(LORA_AGGREGATIONS),
            "strategy.robust": tuple(AGGREGATORS) + AGGREGATION_MERGES,
            "export.merge": EXPORT_MERGES,
            "strategy.rank-projection": ("truncate", "svd"),
            "model.finetuning": ("lora", "full"),
            "model.task": TASKS,
            "compression.sparsity": SPARSITY,
            "compression.quantization": CODECS,
            "compression.weighting": ("all", "senders"),
            "privacy.client-dp": ("none", "central", "distributed"),
        }
        for key, allowed in choices.items():
            if self._get(key) not in allowed:
                raise ConfigError(
                    f"config key '{key}' must be one of {', '.join(allowed)} "
                    f"(got {self._get(key)!r})"
                )
        self._validate_ranks()
        labels = self.data.label_list()
        if self.data.labels.strip() and (len(labels) < 2 or len(set(labels)) != len(labels)):
            raise ConfigError(
                "config key 'data.labels' must list at least 2 distinct label names "
                f"(got {self.data.labels!r})"
            )
        if self.strategy.rank_projection == "svd" and self.strategy.lora not in ("naive", "fedex"):
            raise ConfigError(
                "config key 'strategy.rank-projection' = \"svd\" re-factors the global "
                f"adapter, which strategy.lora = {self.strategy.lora!r} keeps fixed, local or "
                "empty; use it with naive or fedex"
            )
        self._validate_compression()
        self._validate_task()
        self._validate_privacy()
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

    def _validate_compression(self) -> None:
        """Combinations whose uploads the server could not aggregate as asked."""
        c, lora = self.compression, self.strategy.lora
        factor_rules = ("naive", "ffa", "fedsa")
        if self.model.finetuning == "full" and lora != "naive":
            raise ConfigError(
                f"config key 'strategy.lora' = {lora!r} aggregates LoRA factors, but "
                'model.finetuning = "full" trains no adapter; use strategy.lora = "naive"'
            )
        if self.model.finetuning == "full" and self.lora.client_ranks.strip():
            raise ConfigError("config key 'lora.client-ranks' needs model.finetuning = \"lora\"")
        if c.half_finetuning and lora not in factor_rules:
            raise ConfigError(
                "config key 'compression.half-finetuning' freezes whole LoRA modules, which "
                f"strategy.lora = {lora!r} folds into the base weights; use naive, ffa or fedsa"
            )
        if c.weighting == "senders":
            if c.sparsity == "none":
                raise ConfigError(
                    "config key 'compression.weighting' = \"senders\" averages sparse "
                    "coordinates; set compression.sparsity"
                )
            if lora not in factor_rules or self.strategy.robust != "mean":
                raise ConfigError(
                    "config key 'compression.weighting' = \"senders\" needs the mean over "
                    "LoRA factors (strategy.lora naive, ffa or fedsa; strategy.robust mean), "
                    f"not {lora!r} with {self.strategy.robust!r}"
                )
            if self.lora.client_ranks.strip():
                raise ConfigError(
                    "config key 'compression.weighting' = \"senders\" cannot tell a lower-rank "
                    "client's padding from a sent zero; leave lora.client-ranks empty"
                )

    def _validate_task(self) -> None:
        """Options that only one task can use."""
        causal = self.model.task == "causal-lm"
        if causal and self.data.partitioner == "dirichlet":
            raise ConfigError(
                "config key 'data.partitioner' = \"dirichlet\" skews labels, which chat data "
                'has none of; use "topic" or "iid" with model.task = "causal-lm"'
            )
        if not causal and self.data.partitioner == "topic":
            raise ConfigError(
                "config key 'data.partitioner' = \"topic\" splits chat data by topic; "
                'it needs model.task = "causal-lm"'
            )
        if not causal and self.data.packing:
            raise ConfigError("config key 'data.packing' needs model.task = \"causal-lm\"")

    def _validate_privacy(self) -> None:
        """DP and secure-aggregation settings that could not give what they promise."""
        from fedelta.strategies import LORA_AGGREGATIONS

        p = self.privacy
        if p.dp_sgd:
            if not p.noise_multiplier and not p.target_epsilon:
                raise ConfigError(
                    "config key 'privacy.dp-sgd' needs privacy.noise-multiplier or "
                    "privacy.target-epsilon (both are 0)"
                )
            refused = {
                "gradient-accumulation-steps": (
                    self.gradient_accumulation_steps > 1,
                    "Opacus accounts one noisy step per sampled batch; raise batch-size",
                ),
                "strategy.name": (
                    self.strategy.name == "fedprox",
                    "FedProx's proximal term is not a per-example gradient and would "
                    "escape clipping",
                ),
                "compression.sparsity": (
                    self.compression.sparsity in ("spiel", "lift"),
                    "training-time masks edit gradients after Opacus noised them",
                ),
            }
            self._refuse_with("privacy.dp-sgd", refused)
        if p.client_dp != "none":
            if not p.client_noise_multiplier and not p.client_target_epsilon:
                raise ConfigError(
                    "config key 'privacy.client-dp' needs privacy.client-noise-multiplier or "
                    "privacy.client-target-epsilon (both are 0)"
                )
            if p.client_dp == "distributed" and not LORA_AGGREGATIONS[self.strategy.lora].linear:
                raise ConfigError(
                    "config key 'privacy.client-dp' = \"distributed\" relies on the noise shares "
                    f"adding up, but strategy.lora = {self.strategy.lora!r} does not combine "
                    "uploads by summing them; use naive, ffa or fedsa (ffa recommended)"
                )
            if self.strategy.robust != "mean" or self.strategy.clip_norm:
                raise ConfigError(
                    "config key 'privacy.client-dp' bounds the mean of clipped updates; it "
                    f'needs strategy.robust = "mean" and strategy.clip-norm = 0 (got '
                    f"{self.strategy.robust!r}, {self.strategy.clip_norm:g})"
                )
        if p.secure_aggregation:
            self._validate_secure_aggregation()

    def _validate_secure_aggregation(self) -> None:
        """The server sees only the sum: every option that needs one upload in the clear,
        or uploads that do not add up, is refused before anything trains."""
        from fedelta.strategies import build_strategy

        if self.privacy.client_dp == "central":
            raise ConfigError(
                "config key 'privacy.client-dp' = \"central\" clips each update at the "
                'server, which secure aggregation hides; use "distributed"'
            )
        if not build_strategy(self).capabilities.linear:
            raise ConfigError(
                "config key 'privacy.secure-aggregation' needs a strategy that only needs the "
                f"sum of uploads; strategy.lora = {self.strategy.lora!r} with strategy.robust = "
                f"{self.strategy.robust!r} is not linear (see `fedelta strategies`)"
            )
        c = self.compression
        clear = {
            "compression.sparsity": (
                c.sparsity not in ("none", "random-mask"),
                "each client sends different coordinates; use none or random-mask",
            ),
            "compression.quantization": (
                c.quantization != "none",
                "secure aggregation quantizes uploads itself",
            ),
            "compression.half-finetuning": (c.half_finetuning, "uploads differ in layout"),
            "lora.client-ranks": (
                bool(self.lora.client_ranks.strip()),
                "clients of different ranks upload different shapes",
            ),
            "max-update-norm": (
                self.max_update_norm > 0,
                "the server cannot see one update's norm",
            ),
        }
        self._refuse_with("privacy.secure-aggregation", clear)
        if self.min_train_nodes < 3:
            raise ConfigError(
                "config key 'min-train-nodes' must be >= 3 with privacy.secure-aggregation "
                f"(got {self.min_train_nodes}): with two clients each learns the other's upload"
            )

    def _refuse_with(self, option: str, conflicts: Mapping[str, tuple[bool, str]]) -> None:
        """Raise for the first key whose ``(conflicts, why)`` says it breaks ``option``."""
        for key, (bad, why) in conflicts.items():
            if bad:
                raise ConfigError(
                    f"config key '{key}' = {self._get(key)!r} cannot be combined with "
                    f"{option}: {why}"
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

    def _get(self, key: str) -> Any:
        return self.to_flat()[key]


# -- loading ----------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a TOML run config (or the defaults) and apply ``key=value`` overrides."""
    flat = flatten_mapping(read_toml(path)) if path is not None else {}
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
