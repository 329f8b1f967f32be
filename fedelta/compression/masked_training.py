"""Training only a fixed share of the coordinates: the shared machinery of SpIEL and LIFT.

A :class:`TrainingMask` holds, per trainable tensor, the flat indices allowed to
change. During local training it zeroes the gradient elsewhere (so the
optimizer's moments build only where training happens) and, after each step,
puts every other coordinate back to its starting value (so weight decay or stale
moments cannot move it). The delta is then exactly sparse on the mask, which is
what the client sends. Subclasses choose the indices and may change them during
training (SpIEL's prune and regrow).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedelta.tensors import TensorDict


class TrainingMask:
    """Trainable coordinates per tensor, enforced around each optimizer step."""

    def __init__(self, indices: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]):
        self.start = {k: start[k].detach().clone() for k in indices}
        self.indices: TensorDict = {}
        self._allowed: TensorDict = {}
        for name, idx in indices.items():
            self.set_indices(name, idx)
        self.steps = 0

    def _bool_mask(self, name: str) -> torch.Tensor:
        mask = torch.zeros(self.start[name].numel(), dtype=torch.bool)
        mask[self.indices[name]] = True
        return mask.view(self.start[name].shape)

    def before_step(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Called after backward: zero the gradients outside the mask."""
        for name, allowed in self._allowed.items():
            grad = params[name].grad
            if grad is not None:
                self.observe_gradient(name, grad)
                grad.mul_(allowed)

    def after_step(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Called after the optimizer step: undo any change outside the mask."""
        self.steps += 1
        with torch.no_grad():
            for name, allowed in self._allowed.items():
                param = params[name]
                param.copy_(torch.where(allowed, param, self.start[name].to(param.dtype)))
        self.maybe_update(params)

    def observe_gradient(self, name: str, grad: torch.Tensor) -> None:
        """See the full gradient of a masked tensor (SpIEL accumulates it)."""
        return None

    def maybe_update(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Change the mask during training (SpIEL's prune and regrow)."""
        return None

    def set_indices(self, name: str, indices: torch.Tensor) -> None:
        """Make ``indices`` (any order) the trainable entries of ``name``."""
        self.indices[name] = torch.sort(indices.to(torch.int64)).values
        self._allowed[name] = self._bool_mask(name)
