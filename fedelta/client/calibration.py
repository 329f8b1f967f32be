"""Calibrated training losses for label-skewed sites (``loss``).

A site whose data is 90% one class learns, with plain cross-entropy, a model
whose logits carry that prior: averaged over sites of opposite skews, the
global head swings to whichever class the heaviest sites hold. Both losses here
add a per-class offset to the logits *during local training only*, so what the
site learns is the class-conditional evidence and the prior stays out of the
shared model; evaluation and inference read the plain logits.

- ``logit-adjusted``: cross-entropy on ``z_c + tau * log(pi_c)``, with ``pi`` the
  site's label prior (Menon et al., ICLR 2021, "Long-tail learning via logit
  adjustment"; ``tau = 1`` is the balanced softmax of Ren et al., NeurIPS 2020).
- ``fedlc``: cross-entropy on ``z_c - tau * n_c^(-1/4)``, with ``n_c`` the site's
  count of class ``c`` (Zhang et al., ICML 2022, "Federated Learning with Label
  Distribution Skew via Logits Calibration").

A class the site never saw gets offset ``-inf`` under both: it leaves the site's
softmax, so the site neither pushes it down nor learns about it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

LABELS = "labels"


class LogitCalibration:
    """The calibrated cross-entropy of one site, from its label counts.

    Parameters
    ----------
    kind : str
        ``logit-adjusted`` or ``fedlc``.
    tau : float
        Strength of the offset (``calibration-tau``).
    counts : sequence of int
        The site's training examples per class id.
    """

    def __init__(self, kind: str, tau: float, counts: Sequence[int]) -> None:
        n = torch.tensor(list(counts), dtype=torch.float32)
        if n.sum() <= 0:
            raise ValueError("a calibrated loss needs at least one labelled example")
        absent = torch.full_like(n, -torch.inf)
        if kind == "logit-adjusted":
            offsets = torch.where(n > 0, tau * torch.log(n / n.sum()), absent)
        elif kind == "fedlc":
            offsets = torch.where(n > 0, -tau * n.clamp_min(1.0).pow(-0.25), absent)
        else:
            raise ValueError(f"unknown calibrated loss {kind!r}")
        self.kind = kind
        self.offsets = offsets
        """Added to every example's logits during training, one per class."""

    @classmethod
    def for_labels(
        cls, kind: str, tau: float, labels: Sequence[int], num_labels: int
    ) -> LogitCalibration:
        """The calibration of a site whose training labels are ``labels``."""
        counts = torch.bincount(torch.tensor(list(labels), dtype=torch.long), minlength=num_labels)
        return cls(kind, tau, counts.tolist())

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's mean calibrated cross-entropy (a mean of per-example losses,
        so DP-SGD can clip it per example)."""
        inputs = {k: v for k, v in batch.items() if k != LABELS}
        logits = model(**inputs).logits
        return F.cross_entropy(logits + self.offsets.to(logits), batch[LABELS])
