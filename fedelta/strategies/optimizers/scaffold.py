"""SCAFFOLD: control variates against client drift.

Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020 (Algorithm 1, option II).

The server keeps a control variate ``c`` and every site ``i`` one of its own, ``c_i``
(one tensor per exchanged trainable tensor, zeros at first). A site corrects every
gradient by ``+ (c - c_i)`` before its optimizer step, and after ``K`` local steps at
learning rate ``lr`` takes option II::

    delta_c = (x - y) / (K * lr) - c        c_i+ = c_i + delta_c

(``c_i+ = c_i - c + (x - y) / (K lr)``, computed in this order so that the server,
adding the ``delta_c`` it receives to its copy of ``c_i``, gets the same bits). The
site sends ``y - x`` as its delta and ``delta_c`` beside it. The server steps
``x <- x + server_lr * mean_w(y - x)`` (the usual weighted mean: FedAvg) and
``c <- c + (1 / N) * sum_{i in S} delta_c_i`` (``|S| / N`` times the mean over the
replies accepted this round, ``N`` the sites it sampled from).

Where ``c_i`` lives. The site keeps ``c_i`` in its node state
(:class:`~fedelta.client.session.SiteState`), and the server keeps a copy of every
site's, by site name, in its checkpointed state (it sees every ``delta_c_i``, so the
copy is exact). Each training message carries ``c`` and the round of the site's
``c_i`` the server holds; the server adds the site's ``c_i`` itself only when the
site may not hold it: after a resume (node states are new), or when the site did not
complete its last round. A site whose own copy is of another round, and was not sent
one, refuses to train (its node lost its state mid-run); it is sent its ``c_i`` the
next time. So a resumed run continues exactly where it stopped.

Option II assumes plain SGD at ``lr``: with ``optim = "sgd"`` and ``sgd-momentum = 0`` it is the
paper's estimate. With AdamW (the default) ``(x - y) / (K lr)`` is no gradient
average, and SCAFFOLD is a heuristic there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedelta import protocol
from fedelta.strategies.optimizers.base import Scalar
from fedelta.strategies.optimizers.fedavg import FedAvg
from fedelta.tensors import Layout, TensorDict, layout_of

_CONTROL, _SITE, _ROUND = "control/", "site-control/", "site-round/"


class Scaffold(FedAvg):
    """FedAvg's server step plus the server control variate ``c`` and a copy of every
    site's ``c_i``.

    Parameters
    ----------
    lr
        Server learning rate on the mean delta (default 1).
    """

    name = "scaffold"
    client_gradient_term = "SCAFFOLD's control-variate correction"
    reads_each_reply = (
        "the server keeps each site's control variate, from each site's own change of it"
    )
    extra_uplink = "SCAFFOLD's control-variate change (dense fp32)"
    per_site_tensors = True
    fixes = "client drift on heterogeneous data (control variates correct local gradients)"
    traffic = "2x down (c), 2x up (delta_c, dense fp32)"
    client_state = "c_i per site (node state; the server keeps a copy)"

    def __init__(self, lr: float | None = None) -> None:
        super().__init__(lr)
        self.control: TensorDict = {}
        """``c``, by tensor name."""
        self.site_controls: dict[str, TensorDict] = {}
        """Every site's ``c_i`` as the server holds it (sites never heard from: zeros)."""
        self.site_rounds: dict[str, int] = {}
        """The round each site's ``c_i`` was last changed."""
        self._held: set[str] = set()
        """Sites known to hold the ``c_i`` the server has for them (not checkpointed:
        after a resume every site is sent its own)."""
        self._sent: set[str] = set()
        self._replied: set[str] = set()
        self._sum: TensorDict = {}
        self._population = 1
        self._round = 0

    def begin_round(self, server_round: int, layout: Layout, population: int) -> None:
        if not self.control:
            self.control = {k: torch.zeros(shape) for k, shape in layout.items()}
        # A site sent a message it never completed may have trained (and moved its c_i)
        # or lost its state: send it the server's copy next time.
        self._held -= self._sent - self._replied
        self._sent, self._replied = set(), set()
        self._sum = {}
        self._population = max(1, population)
        self._round = server_round

    def site_downlink(self, site: str) -> tuple[dict[str, TensorDict], dict[str, Scalar]]:
        self._sent.add(site)
        records = {protocol.CONTROL: self.control}
        held_round = self.site_rounds.get(site, 0)
        if held_round and site not in self._held:
            records[protocol.SITE_CONTROL] = self.site_controls[site]
        return records, {protocol.CONTROL_ROUND: held_round}

    def reply_layouts(self, layout: Layout) -> dict[str, Layout]:
        return {protocol.CONTROL_DELTA: layout_of(self.control)}

    def observe_reply(self, site: str, extras: Mapping[str, TensorDict]) -> None:
        change = extras[protocol.CONTROL_DELTA]
        base = self.site_controls.get(site)
        if base is None:
            base = {k: torch.zeros_like(c) for k, c in self.control.items()}
        self.site_controls[site] = {k: base[k] + change[k] for k in self.control}
        self.site_rounds[site] = self._round
        self._held.add(site)
        self._replied.add(site)
        for k, d in change.items():
            self._sum[k] = self._sum[k] + d if k in self._sum else d.clone()

    def step(
        self, params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
    ) -> TensorDict:
        """FedAvg's step on the parameters; ``c`` moves by ``sum(delta_c) / N``."""
        if self._sum:
            self.control = {k: c + self._sum[k] / self._population for k, c in self.control.items()}
            self._sum = {}
        return super().step(params, delta)

    def state_dict(self) -> TensorDict:
        tensors = {_CONTROL + k: v for k, v in self.control.items()}
        for site, controls in self.site_controls.items():
            tensors |= {f"{_SITE}{site}/{k}": v for k, v in controls.items()}
            tensors[_ROUND + site] = torch.tensor(self.site_rounds[site], dtype=torch.int64)
        return tensors

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.control, self.site_controls, self.site_rounds = {}, {}, {}
        for key, value in tensors.items():
            if key.startswith(_CONTROL):
                self.control[key.removeprefix(_CONTROL)] = value.clone()
            elif key.startswith(_SITE):
                # Parameter names hold no '/'; site names may.
                site, name = key.removeprefix(_SITE).rsplit("/", 1)
                self.site_controls.setdefault(site, {})[name] = value.clone()
            elif key.startswith(_ROUND):
                self.site_rounds[key.removeprefix(_ROUND)] = int(value)
        self._held = set()


@dataclass(frozen=True)
class ControlVariates:
    """What a site trains with under SCAFFOLD: the server's ``c`` and its own ``c_i``."""

    server: TensorDict
    site: TensorDict


class ControlVariateCorrection:
    """A :class:`~fedelta.training.StepHook` adding ``c - c_i`` to the gradient of
    every corrected parameter before each optimizer step.

    Parameters
    ----------
    variates
        ``c`` and ``c_i``, by parameter name.
    """

    def __init__(self, variates: ControlVariates) -> None:
        self.correction = {k: c - variates.site[k] for k, c in variates.server.items()}

    def before_step(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Add the correction to each gradient (a parameter without one gets it as its
        gradient: the correction does not depend on the batch)."""
        for name, correction in self.correction.items():
            param = params.get(name)
            if param is None:
                continue
            correction = correction.to(device=param.device, dtype=param.dtype)
            if param.grad is None:
                param.grad = correction.clone()
            else:
                param.grad.add_(correction)

    def after_step(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        return None


def control_variate_change(
    start: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    variates: ControlVariates,
    steps: int,
    lr: float,
) -> TensorDict:
    """Option II's ``delta_c = (x - y) / (K * lr) - c`` for every tensor of ``c``.

    Parameters
    ----------
    start, trained
        ``x`` (the global tensors the site started from) and ``y`` (after training).
    variates
        ``c`` (and ``c_i``, which ``delta_c`` does not depend on).
    steps, lr
        ``K`` optimizer steps taken at learning rate ``lr``.

    Returns
    -------
    TensorDict
        ``c_i+ - c_i``; the site's new variate is ``c_i + delta_c``.
    """
    if steps <= 0 or lr <= 0:
        raise ValueError(f"option II needs steps > 0 and lr > 0, got {steps} and {lr}")
    scale = 1.0 / (steps * lr)
    return {
        k: (start[k].float() - trained[k].float()) * scale - c.float()
        for k, c in variates.server.items()
    }
