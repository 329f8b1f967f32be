"""What one client does with the global state: train locally, or evaluate it.

The model is the process-wide cached one (one per LoRA rank); only its adapter
tensors and folded base weights are reset from the server's message, so
successive rounds (and successive simulated clients in the same worker process)
pay for model construction once.

The strategy's LoRA rule says what the client sees and sends: a lower-rank
client takes the first components of the global adapter (the rest folded into
its base weights by exact rules), FFA-LoRA's A is regenerated from the shared
seed instead of sent, and FedSA-LoRA's B comes from the site's own state.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord

from fedelta.build import build_lora_aggregation, model_spec
from fedelta.client.calibration import LogitCalibration
from fedelta.client.view import load_client_view
from fedelta.compression import ClientMemory, UplinkCompression
from fedelta.config import RunConfig
from fedelta.data import (
    LABEL,
    ClientData,
    cycle,
    label_names,
    load_client_data,
    load_site_data,
)
from fedelta.lora import B_SUFFIX, rank_layout
from fedelta.models import adapter_layout, adapter_state, cached_model
from fedelta.privacy.accounting import PrivacyAccountant
from fedelta.privacy.client_level import NOISE_MULTIPLIER, SAMPLED, add_noise_share
from fedelta.privacy.dp_sgd import PrivateRound, train_private
from fedelta.privacy.noise import noise_generator
from fedelta.protocol import Site
from fedelta.seeding import derive_seed, seed_everything
from fedelta.strategies.heads import round_phase, select
from fedelta.strategies.optimizers import (
    PROXIMAL_MU,
    ControlVariateCorrection,
    ControlVariates,
    control_variate_change,
)
from fedelta.tasks import EvalResult, build_task
from fedelta.tensors import TensorDict
from fedelta.training import (
    StepHooks,
    TrainResult,
    local_optimizer,
    restore_optimizer_state,
    round_lr,
    steps_for,
    train,
)
from fedelta.training import optimizer_state as optimizer_state_of


@dataclass(frozen=True)
class FitOutput:
    """What one round of local training produced."""

    upload: ArrayRecord
    """The delta in wire form (sparse and quantized as ``[compression]`` says)."""
    kept: TensorDict
    """Tensors the site keeps to itself (FedSA-LoRA's B)."""
    result: TrainResult
    private: PrivateRound | None = None
    """What DP-SGD spent this round (``privacy.dp-sgd``)."""
    optimizer_state: TensorDict | None = None
    """The optimizer's state after the round, for the site to keep (``keep-optimizer-state``)."""
    control_change: TensorDict | None = None
    """SCAFFOLD's ``c_i+ - c_i`` (option II), when the site trained with control variates."""


class ClientTrainer:
    """Local training and evaluation for one site under one run config."""

    def __init__(self, config: RunConfig, site: Site) -> None:
        self.config = config
        self.site = site
        self.rank = site.rank(config)
        self.rule = build_lora_aggregation(config)
        self.compression = UplinkCompression(config.compression, config.seed)
        self.task = build_task(config)
        self.data: ClientData
        if site.data_path:
            self.data = load_site_data(site.data_path, config.data, config.seed + site.partition_id)
        else:
            self.data = load_client_data(
                config.data, config.seed, site.num_partitions, site.partition_id
            )
        self.task.check_data(self.data.train, f"the data of site '{site.name}'")
        num_labels = len(label_names(config.data, config.seed))
        built = cached_model(model_spec(config, num_labels, self.rank))
        self.model, self.tokenizer = built.model, built.tokenizer
        self.initial_state = built.initial_state
        self.loss_fn = (
            LogitCalibration.for_labels(
                config.loss, config.calibration_tau, self.data.train[LABEL], num_labels
            )
            if config.loss != "cross-entropy"
            else None
        )

    @property
    def global_layout(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the adapter tensors the server sends (global rank)."""
        return self._exchanged_layout(self.rule.scaling.global_rank)

    @property
    def uplink_layout(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors this client's delta covers (its own rank)."""
        return self._exchanged_layout(self.rank)

    def _exchanged_layout(self, rank: int) -> dict[str, tuple[int, ...]]:
        sent = {k: v for k, v in adapter_layout(self.model).items() if self.rule.exchanged(k)}
        return dict(rank_layout(sent, rank))

    def receive(
        self,
        received: Mapping[str, torch.Tensor],
        fold: Mapping[str, torch.Tensor],
        local: Mapping[str, torch.Tensor],
    ) -> TensorDict:
        """Load the global model as this client sees it; returns the adapter it starts from."""
        return load_client_view(
            self.model,
            self.rule,
            self.rank,
            received,
            fold,
            local,
            initial_state=self.initial_state,
            seed=self.config.seed,
        )

    def fit(
        self,
        start: TensorDict,
        server_round: int,
        instructions: Mapping[str, bool | int | float | str] | None = None,
        memory: ClientMemory | None = None,
        accountant: PrivacyAccountant | None = None,
        optimizer_state: TensorDict | None = None,
        control: ControlVariates | None = None,
    ) -> FitOutput:
        """Train from ``start`` (loaded by :meth:`receive`) and encode the delta of the
        tensors this client sends. ``instructions`` is what the strategy asks this round
        (a proximal term, client-level DP noise); ``memory`` (error feedback, SpIEL
        indices) and ``accountant`` (DP-SGD budget) are the site's, and are updated;
        ``optimizer_state`` is what the site kept of its optimizer last round.
        With ``control`` (SCAFFOLD's ``c`` and ``c_i``) every gradient is corrected by
        ``c - c_i`` and the output carries option II's change of ``c_i``.

        Raises :class:`~fedelta.privacy.accounting.PrivacyBudgetError` before training
        if DP-SGD would take the site past its budget."""
        cfg = self.config
        instructions = instructions or {}
        memory = memory if memory is not None else ClientMemory()
        seed = derive_seed(cfg.seed, server_round, self.site.partition_id)
        seed_everything(seed)
        accumulation = cfg.gradient_accumulation_steps
        steps = steps_for(
            len(self.data.train),
            cfg.batch_size * accumulation,
            cfg.local_epochs,
            cfg.local_steps,
            cfg.max_local_epochs,
        )
        exchanged = {k for k in start if self.rule.exchanged(k)}
        phase = round_phase(cfg, server_round)  # strategy.head: what trains this round
        sent = sorted(self.compression.uplink_names(select(phase, exchanged), server_round))
        site_seed = derive_seed(seed, zlib.crc32(self.site.name.encode()))
        mask = self.compression.training_mask(
            {k: start[k] for k in sent}, memory, server_round, site_seed
        )
        correction = None
        if control is not None:
            _check_control(control, start)
            correction = ControlVariateCorrection(control)
        private = None
        lr = round_lr(cfg.lr, cfg.lr_scheduler, cfg.min_lr, server_round, cfg.num_server_rounds)
        head_lr = lr * cfg.head_lr / cfg.lr
        with _frozen(self.model, (exchanged - set(sent)) | (set(start) - select(phase, start))):
            named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            optimizer = local_optimizer(
                named,
                optim=cfg.optim,
                lr=lr,
                head_lr=head_lr,
                weight_decay=cfg.weight_decay,
                momentum=cfg.sgd_momentum,
            )
            if cfg.keep_optimizer_state and optimizer_state:
                restore_optimizer_state(optimizer, named, optimizer_state)
            if cfg.privacy.dp_sgd:
                private = train_private(
                    self.model,
                    self.task,
                    self.task.examples(self.data.train, self.tokenizer, train=True),
                    self.task.collate_fn(self.tokenizer),
                    batch_size=cfg.batch_size,
                    steps=steps,
                    rounds=cfg.num_server_rounds,
                    lr=lr,
                    weight_decay=cfg.weight_decay,
                    settings=cfg.privacy,
                    accountant=accountant if accountant is not None else PrivacyAccountant(),
                    seed_parts=(site_seed, 1),
                    optimizer=optimizer,
                    loss_fn=self.loss_fn,
                )
                result = private.result
            else:
                loader = self.task.make_loader(
                    self.data.train, self.tokenizer, cfg.batch_size, train=True, seed=seed
                )
                result = train(
                    self.model,
                    cycle(loader, steps * accumulation),
                    lr=lr,
                    optimizer=optimizer,
                    proximal_mu=float(instructions.get(PROXIMAL_MU, 0.0)),
                    anchor=start,
                    hook=mask if correction is None else StepHooks(correction, mask),
                    accumulation=accumulation,
                    warmup_steps=cfg.warmup_steps,
                    max_grad_norm=cfg.max_grad_norm,
                    loss_fn=self.loss_fn,
                )
            kept_optimizer = None
            if cfg.keep_optimizer_state:
                # Entries of parameters frozen this round stay for a later round.
                kept_optimizer = dict(optimizer_state or {})
                kept_optimizer |= optimizer_state_of(optimizer, named)
        trained = adapter_state(self.model)
        delta = {k: trained[k] - start[k] for k in sent}
        if cfg.privacy.client_dp == "distributed":
            delta, _ = add_noise_share(
                delta,
                cfg.privacy.client_clip_norm,
                float(instructions[NOISE_MULTIPLIER]),
                int(instructions[SAMPLED]),
                noise_generator(cfg.privacy.seeded_noise, site_seed, 2),
            )
        kept = {k: trained[k] for k in start if self.rule.local_b and k.endswith(B_SUFFIX)}
        upload = self.compression.compress(delta, memory, server_round, site_seed, mask)
        change = None
        if control is not None:
            change = control_variate_change(start, trained, control, result.steps, lr)
        return FitOutput(
            upload, kept, result, private, optimizer_state=kept_optimizer, control_change=change
        )

    def evaluate(self) -> EvalResult:
        """Evaluate the model loaded by :meth:`receive` on the local validation split."""
        loader = self.task.make_loader(
            self.data.validation, self.tokenizer, self.task.eval_batch_size, train=False
        )
        return self.task.evaluate(self.model, loader)


def _check_control(control: ControlVariates, start: Mapping[str, torch.Tensor]) -> None:
    """The control variates cover tensors this site trains, in their shapes."""
    for name, c in control.server.items():
        if name not in start or tuple(start[name].shape) != tuple(c.shape):
            raise ValueError(f"control variate '{name}' matches no tensor this site trains")
        if name not in control.site or tuple(control.site[name].shape) != tuple(c.shape):
            raise ValueError(f"the site's control variate lacks '{name}' or has another shape")


@contextlib.contextmanager
def _frozen(model: torch.nn.Module, names: Collection[str]) -> Iterator[None]:
    """Parameters ``names`` do not train inside the block (Half Fine-Tuning)."""
    params = [p for n, p in model.named_parameters() if n in names and p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
