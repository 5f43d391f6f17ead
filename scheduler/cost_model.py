"""Cost model for placement: prefill, decode-step and transfer time, fit from measurements.

Lifecycle: at start-up the deployment times its engines (a few prefill lengths, a few decode
batch sizes, a few transfer sizes) and calls `fit(...)` once; the resulting frozen `CostModel`
goes into every placement call (`scheduler.policy`), which only calls its `predict_*` methods.
Everything here is pure: no clocks, no state.

Shapes of the model (all coefficients >= 0, fit by non-negative least squares):
  prefill:  t = a + b * n + c * n * (cached_len + n)
            n = tokens computed (the uncached part), cached_len = tokens of K/V reused. The
            last term counts attention pairs: each new token attends to the cached prefix and
            to the new tokens before it (n * (cached_len + n / 2), folded into c).
  decode:   t = a + b * B + c * S_total
            one decode step for B running slots whose contexts sum to S_total tokens.
  transfer: t = latency_s + num_bytes / bytes_per_s
Non-negative coefficients keep every prediction monotone in its inputs, which placement relies
on (more tokens never predicts less time).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np


def fit_nonneg(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: `features` [M, F], `targets` [M] -> [F].

    Exact for the few (F <= 3) features used here: solve the unconstrained problem on every
    subset of features and keep the best feasible one (the optimum has some subset active).
    """
    features = np.asarray(features, np.float64)
    targets = np.asarray(targets, np.float64)
    if features.ndim != 2 or features.shape[0] != targets.shape[0] or features.shape[0] == 0:
        raise ValueError(f"need [M, F] features and [M] targets with M >= 1, got "
                         f"{features.shape} and {targets.shape}")
    num_features = features.shape[1]
    best, best_err = np.zeros(num_features), float(np.sum(targets ** 2))
    for k in range(1, num_features + 1):
        for subset in itertools.combinations(range(num_features), k):
            cols = list(subset)
            coef, *_ = np.linalg.lstsq(features[:, cols], targets, rcond=None)
            if np.any(coef < 0):
                continue
            full = np.zeros(num_features)
            full[cols] = coef
            err = float(np.sum((features @ full - targets) ** 2))
            if err < best_err - 1e-15 * max(1.0, best_err):
                best, best_err = full, err
    return best


def prefill_features(num_tokens, cached_len=0) -> np.ndarray:
    n = np.asarray(num_tokens, np.float64)
    c = np.asarray(cached_len, np.float64)
    return np.stack(np.broadcast_arrays(np.ones_like(n), n, n * (c + n)), axis=-1)


def decode_features(batch_size, context_len=0) -> np.ndarray:
    b = np.asarray(batch_size, np.float64)
    s = np.asarray(context_len, np.float64)
    return np.stack(np.broadcast_arrays(np.ones_like(b), b, s), axis=-1)


@dataclasses.dataclass(frozen=True)
class CostModel:
    prefill_coefs: tuple[float, float, float]  # (a_s, s per token, s per attention pair)
    decode_coefs: tuple[float, float, float]  # (a_s, s per slot, s per context token)
    transfer_latency_s: float
    transfer_bytes_per_s: float
    kv_bytes_per_token: int  # K/V bytes of one token as sent (after compression), all layers

    def __post_init__(self):
        if min(self.prefill_coefs + self.decode_coefs) < 0 or self.transfer_latency_s < 0:
            raise ValueError(f"coefficients must be >= 0: {self}")
        if self.transfer_bytes_per_s <= 0 or self.kv_bytes_per_token < 0:
            raise ValueError(f"need transfer_bytes_per_s > 0 and kv_bytes_per_token >= 0: {self}")

    def predict_prefill_s(self, num_tokens: int, cached_len: int = 0) -> float:
        """Seconds to prefill `num_tokens` new tokens after `cached_len` reused ones (0 if none)."""
        if num_tokens <= 0:
            return 0.0
        a, b, c = self.prefill_coefs  # plain floats: placement and the simulator call this a lot
        return a + b * num_tokens + c * num_tokens * (cached_len + num_tokens)

    def predict_decode_step_s(self, batch_size: int, context_len: int = 0) -> float:
        """Seconds per decode step with `batch_size` running slots, `context_len` tokens in all."""
        if batch_size <= 0:
            return 0.0
        a, b, c = self.decode_coefs
        return a + b * batch_size + c * context_len

    def predict_transfer_s(self, num_bytes: int) -> float:
        if num_bytes <= 0:
            return 0.0
        return self.transfer_latency_s + num_bytes / self.transfer_bytes_per_s

    def kv_bytes(self, num_tokens: int) -> int:
        return max(0, num_tokens) * self.kv_bytes_per_token

    def max_local_prefill_len(self, max_stall_s: float, max_len: int = 1 << 20) -> int:
        """Longest uncached prompt a decode worker may prefill itself while stalling its running
        slots by at most `max_stall_s` (a default for the conditional-disaggregation threshold)."""
        lo, hi = 0, max_len  # predict_prefill_s is monotone: binary search the last n that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.predict_prefill_s(mid) <= max_stall_s:
                lo = mid
            else:
                hi = mid - 1
        return lo


def fit(prefill_samples: Sequence[tuple[int, int, float]],
        decode_samples: Sequence[tuple[int, int, float]],
        transfer_samples: Sequence[tuple[int, float]],
        kv_bytes_per_token: int) -> CostModel:
    """Fit a CostModel from measurements.

    prefill_samples: (num_tokens, cached_len, seconds); decode_samples: (batch_size,
    context_len, seconds) with context_len summed over slots; transfer_samples: (num_bytes,
    seconds). Each list needs at least one sample; more lengths give a better fit.
    """
    p = np.asarray(prefill_samples, np.float64).reshape(-1, 3)
    d = np.asarray(decode_samples, np.float64).reshape(-1, 3)
    t = np.asarray(transfer_samples, np.float64).reshape(-1, 2)
    prefill = fit_nonneg(prefill_features(p[:, 0], p[:, 1]), p[:, 2])
    decode = fit_nonneg(decode_features(d[:, 0], d[:, 1]), d[:, 2])
    latency_s, s_per_byte = fit_nonneg(np.stack([np.ones(len(t)), t[:, 0]], axis=-1), t[:, 1])
    return CostModel(tuple(map(float, prefill)), tuple(map(float, decode)), float(latency_s),
                     1.0 / max(float(s_per_byte), 1e-30), int(kv_bytes_per_token))
