"""FedBABU: federated averaging of the body only, the head fine-tuned at the end.

Oh, Kim and Yun, "FedBABU: Toward Enhanced Representation for Federated Image
Classification", ICLR 2022. Training the head with the body under heterogeneous
labels makes each site's head drift toward its own classes and degrades the
shared representation; keeping the head fixed at its (random) initialisation
during federated training and learning only the body avoids it. The paper then
fine-tunes the head for each site (personalisation).

Here every round but the last ``strategy.head-rounds`` trains LoRA with the head
frozen at its initialisation (not sent, bit-identical after every round); the last
``strategy.head-rounds`` rounds train only the head (LoRA frozen, no LoRA delta
sent), aggregated by the server like any round. So the global model that is
evaluated and exported has a head fitted to the federated body, as a single
exported model needs; per-site personalised heads are not kept.
"""

from __future__ import annotations

from fedelta.strategies.heads.base import BODY, HEAD, HeadStrategy


class FedBABU(HeadStrategy):
    name = "fedbabu"
    summary = "head frozen while LoRA trains; the last strategy.head-rounds rounds train only it"
    paper = "Oh et al., ICLR 2022"
    phased = True

    def phase(self, server_round: int) -> str:
        return HEAD if server_round > self.num_rounds - self.head_rounds else BODY
