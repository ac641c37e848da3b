"""An example kvstress policy from outside kvstress: H2O whose scores decay.

H2O accumulates every attention a token ever received, so a token that mattered long
ago keeps its slot forever. Here each forward first multiplies the scores by
`decay / 100`, an exponential moving average of attention: recent attention counts
most. Attention-scored policies share kvstress's query capture and batched decode
scoring (kvstress.caches.scored); this one only says how a forward's attention mass
updates a score. `ema_4_32_256_90` keeps 4 sinks, the 32 most recent tokens and the
heavy hitters of a 256-token budget, with a decay of 0.9 per forward.
"""

from dataclasses import dataclass

import torch

from kvstress.caches.scored import AttentionScoredCache
from kvstress.spec import Params, Policy, SpecError


@dataclass(frozen=True, kw_only=True)
class EMAParams(Params):
    sink: int = 4
    window: int | None = None
    capacity: int
    decay: int = 90  # percent of a score kept from one forward to the next
    rest = "heavy hitters"

    def check(self) -> None:
        if not 0 <= self.decay <= 100:
            raise SpecError(f"decay is a percentage from 0 to 100, got {self.decay}")


class EMACache(AttentionScoredCache):
    def update_scores(self, scores: torch.Tensor, mass: torch.Tensor) -> None:
        scores.mul_(self.spec.decay / 100).add_(mass)


POLICY = Policy(
    name="ema",
    params=EMAParams,
    description="H2O with decaying scores: S sinks + W most recent + the most attention, decayed by D% per forward",
    cache=EMACache,
)
