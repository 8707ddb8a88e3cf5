"""The simulated network: per-message loss, delay (hence reordering), duplication, and
directed link cuts, so full, partial and asymmetric partitions are all sets of cut links."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class NetworkParams:
    loss: float = 0.0
    duplicate: float = 0.0
    delay_min: float = 0.0005
    delay_max: float = 0.01
    slow: float = 0.0
    """Probability that a message takes a slow path (up to `slow_max`): reordering."""
    slow_max: float = 0.2

    @classmethod
    def random(cls, rng: random.Random) -> NetworkParams:
        return cls(
            loss=rng.choice([0.0, 0.0, 0.01, 0.05, 0.1]),
            duplicate=rng.choice([0.0, 0.01, 0.05]),
            delay_min=0.0005,
            delay_max=rng.choice([0.002, 0.01, 0.03]),
            slow=rng.choice([0.0, 0.02, 0.1]),
            slow_max=rng.choice([0.1, 0.3]),
        )


class SimNetwork:
    def __init__(self, rng: random.Random, params: NetworkParams) -> None:
        self.rng = rng
        self.params = params
        self.extra_loss = 0.0
        self._cut: Counter[tuple[str, str]] = Counter()
        self.sent = 0
        self.dropped = 0

    def cut(self, links: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Cut directed links (src, dst); returns them so the same fault can heal them."""
        done = list(links)
        self._cut.update(done)
        return done

    def heal(self, links: Iterable[tuple[str, str]]) -> None:
        self._cut.subtract(links)
        self._cut = +self._cut

    def heal_all(self) -> None:
        self._cut.clear()
        self.extra_loss = 0.0

    def is_cut(self, src: str, dst: str) -> bool:
        return self._cut[(src, dst)] > 0

    def delays(self, src: str, dst: str) -> list[float]:
        """Delivery delays for one message (empty: lost; two: duplicated)."""
        self.sent += 1
        if src == dst:
            return [self.params.delay_min]
        if self._cut[(src, dst)] > 0:
            self.dropped += 1
            return []
        p, rng = self.params, self.rng
        if rng.random() < p.loss + self.extra_loss:
            self.dropped += 1
            return []
        copies = 2 if rng.random() < p.duplicate else 1
        out = []
        for _ in range(copies):
            if p.slow and rng.random() < p.slow:
                out.append(rng.uniform(p.delay_max, p.slow_max))
            else:
                out.append(rng.uniform(p.delay_min, p.delay_max))
        return out
