"""The benchmark's shapes: DeepEP's standard ones, a smaller set, and sweeps."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    mode: str  # "normal" or "low-latency"
    tokens: int
    hidden: int
    topk: int
    experts: int

    def fit(self, num_ranks: int) -> Shape:
        """Experts rounded up to a multiple of the rank count (contract: even split)."""
        experts = -(-self.experts // num_ranks) * num_ranks
        return Shape(self.mode, self.tokens, self.hidden, self.topk, experts)

    @property
    def label(self) -> str:
        return f"T={self.tokens} H={self.hidden} top-{self.topk}/{self.experts}"


# DeepEP's published settings: normal 4096 x 7168 top-8 of 256; low latency 128 x 7168 top-8 of 288.
STANDARD = [Shape("normal", 4096, 7168, 8, 256), Shape("low-latency", 128, 7168, 8, 288)]
QUICK = [Shape("normal", 256, 2048, 4, 32), Shape("low-latency", 32, 2048, 4, 32)]
SMALL = [Shape("normal", 512, 4096, 8, 64), Shape("low-latency", 64, 4096, 8, 64)]

NORMAL_SWEEP_TOKENS = [128, 256, 512, 1024, 2048, 4096, 8192]
LOW_LATENCY_SWEEP_TOKENS = [1, 8, 32, 64, 128, 256]


def sweep(base: Shape) -> list[Shape]:
    tokens = NORMAL_SWEEP_TOKENS if base.mode == "normal" else LOW_LATENCY_SWEEP_TOKENS
    return [Shape(base.mode, t, base.hidden, base.topk, base.experts) for t in tokens]
