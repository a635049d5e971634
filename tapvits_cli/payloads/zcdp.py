"""Privacy accounting in zero-concentrated differential privacy (zCDP).

Bun & Steinke, "Concentrated Differential Privacy: Simplifications, Extensions, and Lower
Bounds" (TCC 2016): a Gaussian mechanism of L2 sensitivity Δ and noise σ is
Δ²/(2σ²)-zCDP, zCDP composes by addition, and ρ-zCDP implies (ρ + 2√(ρ ln(1/δ)), δ)-DP.
The differentially private fit (``gmm.dp``) spends a budget by these rules; every reader
of a gmm artifact checks by them that the ε, δ and ρ it records agree (protocol/gmm.md).
"""

from __future__ import annotations

import math

from tapvits_cli.errors import ParameterError


def rho_for(epsilon: float, delta: float) -> float:
    """The largest ρ whose ρ-zCDP implies (ε, δ)-DP: ρ = (√(ln(1/δ) + ε) − √ln(1/δ))²."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ParameterError(f"{{dp_epsilon}} must be a finite number > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ParameterError(f"{{dp_delta}} must lie strictly between 0 and 1, got {delta}")
    log_term = math.log(1 / delta)
    return (math.sqrt(log_term + epsilon) - math.sqrt(log_term)) ** 2


def epsilon_for(rho: float, delta: float) -> float:
    """The ε that ρ-zCDP guarantees at δ: ρ + 2√(ρ ln(1/δ))."""
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


def gaussian_sigma(sensitivity: float, rho: float) -> float:
    """Noise standard deviation that makes a query of L2 ``sensitivity`` ρ-zCDP: Δ / √(2ρ)."""
    return sensitivity / math.sqrt(2 * rho)
