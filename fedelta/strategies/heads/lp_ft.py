"""LP-FT: linear probing, then fine-tuning.

Kumar, Raghunathan, Jones, Ma and Liang, "Fine-Tuning can Distort Pretrained
Features and Underperform Out-of-Distribution", ICLR 2022. Fine-tuning from a
random head sends large gradients through the pretrained features while the head
is still wrong, distorting them; training the head alone first (linear probing)
and only then everything avoids it.

Here the first ``strategy.head-rounds`` federated rounds train only the head
(LoRA frozen at the global adapter; sites send no LoRA delta), the remaining rounds
train head and LoRA together.
"""

from __future__ import annotations

from fedelta.strategies.heads.base import HEAD, JOINT, HeadStrategy


class LinearProbeThenFineTune(HeadStrategy):
    name = "lp-ft"
    summary = "the first strategy.head-rounds rounds train only the head, then everything"
    paper = "Kumar et al., ICLR 2022"
    phased = True

    def phase(self, server_round: int) -> str:
        return HEAD if server_round <= self.head_rounds else JOINT
