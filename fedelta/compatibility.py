"""Which components a config may combine: every rule asks the components themselves.

:class:`~fedelta.config.RunConfig` checks each value on its own. Here the names it
gives are looked up in the components' registries (an unknown one is refused with
the choices), and each combination that could not give what it promises is refused
before anything trains, by the flags the components declare: a LoRA rule's
``factor_space``, ``linear``, ``refactorable``, ``needs_adapter``; an aggregator's
``weighs_senders``; an optimizer's ``client_loss_term``, ``client_gradient_term``,
``reads_each_reply``, ``extra_uplink``, ``per_site_tensors`` and
``uses_step_counts``; a sparsity method's
``sparse``, ``sends_indices``, ``trains_mask``; a codec's ``exact``; a task's
``partitioners``, ``packs`` and ``has_head``; a head strategy's ``initialises`` and
``phased``. A new component states its flags and every rule
follows.

Every engine runs :func:`check_config` before its first round: ``fedelta simulate``,
the ServerApp under ``flwr run`` and a deployment, and the in-process engine.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedelta.build import build_strategy
from fedelta.compression import CODECS, SPARSITY
from fedelta.config import ConfigError, RunConfig, StrategyConfig, check_choice
from fedelta.data import PARTITIONERS
from fedelta.merging import EXPORT_MERGES
from fedelta.strategies import AGGREGATORS, LORA_AGGREGATIONS, OPTIMIZERS, Strategy
from fedelta.strategies.heads import HEADS
from fedelta.tasks import TASKS


def check_config(config: RunConfig) -> None:
    """Raise :class:`ConfigError` naming the key if ``config`` names a component that
    does not exist, or combines components that cannot work together."""
    OPTIMIZERS[config.strategy.optimizer]
    AGGREGATORS[config.strategy.aggregator]
    LORA_AGGREGATIONS[config.strategy.lora]
    SPARSITY[config.compression.sparsity]
    CODECS[config.compression.quantization]
    TASKS[config.model.task]
    HEADS[config.strategy.head]
    check_choice("data.partitioner", config.data.partitioner, PARTITIONERS)
    check_choice("export.merge", config.export.merge, EXPORT_MERGES)
    _check_lora(config)
    _check_optimizer(config)
    _check_compression(config)
    _check_task(config)
    _check_head(config)
    _check_privacy(config)


def check_clients_match(strategy: Strategy, config: RunConfig) -> None:
    """Clients follow the config's LoRA rule (what they freeze, keep and send); a
    strategy object with another rule would reject every reply, so refuse it now."""
    rule = getattr(getattr(strategy, "lora", None), "name", config.strategy.lora)
    if rule != config.strategy.lora:
        raise ConfigError(
            f"the strategy aggregates LoRA with {rule!r} but clients follow the config's "
            f"strategy.lora = {config.strategy.lora!r}; set strategy.lora = {rule!r}"
        )


def _check_lora(config: RunConfig) -> None:
    rule = LORA_AGGREGATIONS[config.strategy.lora]
    if config.strategy.rank_projection == "svd" and not rule.refactorable:
        refactorable = [n for n, r in LORA_AGGREGATIONS.items() if r.refactorable]
        raise ConfigError(
            "config key 'strategy.rank-projection' = \"svd\" re-factors the global "
            f"adapter, which strategy.lora = {rule.name!r} keeps fixed, local or "
            f"empty; use it with {' or '.join(refactorable)}"
        )
    if config.model.finetuning == "full":
        if rule.needs_adapter:
            plain = [n for n, r in LORA_AGGREGATIONS.items() if not r.needs_adapter]
            raise ConfigError(
                f"config key 'strategy.lora' = {rule.name!r} aggregates LoRA factors, but "
                'model.finetuning = "full" trains no adapter; use strategy.lora = '
                + " or ".join(f'"{n}"' for n in plain)
            )
        if config.lora.client_ranks.strip():
            raise ConfigError("config key 'lora.client-ranks' needs model.finetuning = \"lora\"")


def _check_optimizer(config: RunConfig) -> None:
    """A server optimizer that keeps tensors per site (SCAFFOLD's ``c_i``) in the global
    layout needs every site to train every exchanged tensor at the global rank."""
    optimizer = OPTIMIZERS[config.strategy.optimizer]
    if optimizer.per_site_tensors:
        conflicts = {
            "lora.client-ranks": (
                bool(config.lora.client_ranks.strip()),
                "its per-site tensors have the global rank's shapes",
            ),
            "compression.half-finetuning": (
                config.compression.half_finetuning,
                "a frozen half would move its per-site tensors with no training behind it",
            ),
        }
        _refuse_with(config, f'strategy.optimizer = "{optimizer.name}"', conflicts)


def _check_compression(config: RunConfig) -> None:
    """Combinations whose uploads the server could not aggregate as asked."""
    c = config.compression
    rule = LORA_AGGREGATIONS[config.strategy.lora]
    factor_rules = ", ".join(n for n, r in LORA_AGGREGATIONS.items() if r.factor_space)
    if c.half_finetuning and not rule.factor_space:
        raise ConfigError(
            "config key 'compression.half-finetuning' freezes whole LoRA modules, which "
            f"strategy.lora = {rule.name!r} folds into the base weights; use {factor_rules}"
        )
    if c.weighting == "senders":
        if not SPARSITY[c.sparsity].sparse:
            raise ConfigError(
                "config key 'compression.weighting' = \"senders\" averages sparse "
                "coordinates; set compression.sparsity"
            )
        aggregator = AGGREGATORS[config.strategy.aggregator]
        if not rule.factor_space or not aggregator.weighs_senders:
            raise ConfigError(
                "config key 'compression.weighting' = \"senders\" needs the mean over "
                f"LoRA factors (strategy.lora {factor_rules}; strategy.aggregator mean), "
                f"not {rule.name!r} with {config.strategy.aggregator!r}"
            )
        if config.lora.client_ranks.strip():
            raise ConfigError(
                "config key 'compression.weighting' = \"senders\" cannot tell a lower-rank "
                "client's padding from a sent zero; leave lora.client-ranks empty"
            )


def _check_task(config: RunConfig) -> None:
    """Options that only some tasks can use."""
    task = TASKS[config.model.task]
    partitioner = config.data.partitioner
    if partitioner not in task.partitioners:
        why = {
            "dirichlet": "skews labels, which chat data has none of",
            "topic": "splits chat data by topic",
        }.get(partitioner, f"cannot split {task.data_kind}")
        raise ConfigError(
            f"config key 'data.partitioner' = \"{partitioner}\" {why}; use "
            + " or ".join(f'"{p}"' for p in task.partitioners)
            + f' with model.task = "{task.name}"'
        )
    if config.data.packing and not task.packs:
        packers = [name for name, t in TASKS.items() if t.packs]
        raise ConfigError(
            "config key 'data.packing' needs model.task = " + " or ".join(f'"{n}"' for n in packers)
        )
    if config.model.pooling == "mean" and not task.pools:
        poolers = " or ".join(f'"{n}"' for n, t in TASKS.items() if t.pools)
        raise ConfigError(
            f"config key 'model.pooling' = \"mean\" pools token states for a head, which "
            f'model.task = "{task.name}" has none of; use it with model.task = {poolers}'
        )
    if config.loss != "cross-entropy" and not task.calibrates:
        calibrated = " or ".join(f'"{n}"' for n, t in TASKS.items() if t.calibrates)
        raise ConfigError(
            f"config key 'loss' = \"{config.loss}\" calibrates class logits by the site's "
            f'label prior, which model.task = "{task.name}" has no labels for; use it with '
            f"model.task = {calibrated}"
        )


def _check_head(config: RunConfig) -> None:
    """Head strategies need a head, whole-module updates, and (FedNCM) statistics
    that may leave the sites in the clear."""
    head = HEADS[config.strategy.head]
    if head.name == StrategyConfig().head:
        return
    task = TASKS[config.model.task]
    if not task.has_head:
        with_head = " or ".join(f'"{n}"' for n, t in TASKS.items() if t.has_head)
        raise ConfigError(
            f"config key 'strategy.head' = \"{head.name}\" treats the classification head "
            f'apart, but model.task = "{task.name}" has no head; use strategy.head = '
            f'"joint" or model.task = {with_head}'
        )
    rule = LORA_AGGREGATIONS[config.strategy.lora]
    if head.phased and not rule.factor_space:
        factor_rules = ", ".join(n for n, r in LORA_AGGREGATIONS.items() if r.factor_space)
        raise ConfigError(
            f"config key 'strategy.head' = \"{head.name}\" has rounds that update only part "
            f"of the model, but strategy.lora = {rule.name!r} folds every module's update "
            f"each round; use {factor_rules}"
        )
    if head.phased and head.trains_lora and config.strategy.head_rounds >= config.num_server_rounds:
        raise ConfigError(
            f"config key 'strategy.head-rounds' must be < num-server-rounds with "
            f'strategy.head = "{head.name}" (got {config.strategy.head_rounds} >= '
            f"{config.num_server_rounds}): no round would train LoRA"
        )
    if head.initialises:
        p = config.privacy
        clear = {
            "privacy.secure-aggregation": (
                p.secure_aggregation,
                "each site's class feature sums reach the server in the clear",
            ),
            "privacy.dp-sgd": (p.dp_sgd, "the class feature sums are not noised"),
            "privacy.client-dp": (p.client_dp != "none", "the class feature sums are not noised"),
        }
        for key, (bad, why) in clear.items():
            if bad:
                raise ConfigError(
                    f"config key 'strategy.head' = \"{head.name}\" cannot be combined with "
                    f"{key}: {why}"
                )


def _check_privacy(config: RunConfig) -> None:
    """DP and secure-aggregation settings that could not give what they promise."""
    p = config.privacy
    optimizer = OPTIMIZERS[config.strategy.optimizer]
    if p.dp_sgd:
        if not p.noise_multiplier and not p.target_epsilon:
            raise ConfigError(
                "config key 'privacy.dp-sgd' needs privacy.noise-multiplier or "
                "privacy.target-epsilon (both are 0)"
            )
        refused = {
            "gradient-accumulation-steps": (
                config.gradient_accumulation_steps > 1,
                "Opacus accounts one noisy step per sampled batch; raise batch-size",
            ),
            "strategy.optimizer": (
                bool(optimizer.client_loss_term or optimizer.client_gradient_term),
                f"{optimizer.client_loss_term} in the clients' loss is not a per-example "
                "gradient and would escape clipping"
                if optimizer.client_loss_term
                else f"{optimizer.client_gradient_term} would have to enter each noised "
                "step inside Opacus, which fedelta's DP-SGD loop does not do",
            ),
            "compression.sparsity": (
                SPARSITY[config.compression.sparsity].trains_mask,
                "training-time masks edit gradients after Opacus noised them",
            ),
            "max-grad-norm": (
                config.max_grad_norm > 0,
                "DP-SGD clips each example's gradient to privacy.max-grad-norm instead",
            ),
            "warmup-steps": (
                config.warmup_steps > 0,
                "DP-SGD steps at the round's lr (use lr-scheduler across rounds)",
            ),
            "loss": (
                config.loss != "cross-entropy",
                "the site's label counts set the offsets of every example's loss, so one "
                "example's presence changes the others' gradients outside the accounting",
            ),
        }
        _refuse_with(config, "privacy.dp-sgd", refused)
    if p.client_dp != "none":
        if not p.client_noise_multiplier and not p.client_target_epsilon:
            raise ConfigError(
                "config key 'privacy.client-dp' needs privacy.client-noise-multiplier or "
                "privacy.client-target-epsilon (both are 0)"
            )
        rule = LORA_AGGREGATIONS[config.strategy.lora]
        if p.client_dp == "distributed" and not rule.linear:
            linear = ", ".join(n for n, r in LORA_AGGREGATIONS.items() if r.linear)
            raise ConfigError(
                "config key 'privacy.client-dp' = \"distributed\" relies on the noise shares "
                f"adding up, but strategy.lora = {rule.name!r} does not combine uploads by "
                f"summing them; use {linear} (ffa recommended)"
            )
        refused = {
            "strategy.optimizer": (
                bool(optimizer.extra_uplink),
                f"{optimizer.extra_uplink} travels beside the delta, neither clipped nor noised",
            ),
            "local-steps": (
                optimizer.uses_step_counts and config.local_steps == 0,
                f"{optimizer.name} reads each site's step count, which then reveals the size "
                "of its data (client-level DP does not protect it); set local-steps > 0",
            ),
        }
        _refuse_with(config, "privacy.client-dp", refused)
        default = StrategyConfig()
        if config.strategy.aggregator != default.aggregator or config.strategy.clip_norm:
            raise ConfigError(
                "config key 'privacy.client-dp' bounds the mean of clipped updates in place "
                f'of the aggregator; it needs strategy.aggregator = "{default.aggregator}" and '
                f"strategy.clip-norm = 0 (got {config.strategy.aggregator!r}, "
                f"{config.strategy.clip_norm:g})"
            )
    if p.secure_aggregation:
        _check_secure_aggregation(config)


def _check_secure_aggregation(config: RunConfig) -> None:
    """The server sees only the sum: every option that needs one upload in the clear,
    or uploads that do not add up, is refused before anything trains."""
    if config.privacy.client_dp == "central":
        raise ConfigError(
            "config key 'privacy.client-dp' = \"central\" clips each update at the "
            'server, which secure aggregation hides; use "distributed"'
        )
    optimizer = OPTIMIZERS[config.strategy.optimizer]
    _refuse_with(
        config,
        "privacy.secure-aggregation",
        {
            "strategy.optimizer": (
                bool(optimizer.reads_each_reply),
                f"{optimizer.reads_each_reply}, which the secure sum hides",
            )
        },
    )
    if not build_strategy(config).capabilities.linear:
        raise ConfigError(
            "config key 'privacy.secure-aggregation' needs a strategy that only needs the "
            f"sum of uploads; strategy.lora = {config.strategy.lora!r} with "
            f"strategy.aggregator = {config.strategy.aggregator!r} is not linear "
            "(see `fedelta strategies`)"
        )
    c = config.compression
    summable = ", ".join(n for n, m in SPARSITY.items() if not m.sends_indices)
    clear = {
        "compression.sparsity": (
            SPARSITY[c.sparsity].sends_indices,
            f"each client sends different coordinates; use {summable}",
        ),
        "compression.quantization": (
            not CODECS[c.quantization].exact,
            "secure aggregation quantizes uploads itself",
        ),
        "compression.half-finetuning": (c.half_finetuning, "uploads differ in layout"),
        "lora.client-ranks": (
            bool(config.lora.client_ranks.strip()),
            "clients of different ranks upload different shapes",
        ),
        "max-update-norm": (
            config.max_update_norm > 0,
            "the server cannot see one update's norm",
        ),
    }
    _refuse_with(config, "privacy.secure-aggregation", clear)
    if config.min_train_nodes < 3:
        raise ConfigError(
            "config key 'min-train-nodes' must be >= 3 with privacy.secure-aggregation "
            f"(got {config.min_train_nodes}): with two clients each learns the other's upload"
        )


def _refuse_with(config: RunConfig, option: str, conflicts: Mapping[str, tuple[bool, str]]) -> None:
    """Raise for the first key whose ``(conflicts, why)`` says it breaks ``option``."""
    flat = config.to_flat()
    for key, (bad, why) in conflicts.items():
        if bad:
            raise ConfigError(
                f"config key '{key}' = {flat[key]!r} cannot be combined with {option}: {why}"
            )
