"""Student-t distribution (CDF and quantile) from the regularized incomplete beta function, without SciPy."""

from __future__ import annotations

import math

__all__ = ["regularized_beta", "t_cdf", "t_quantile"]

_EPS = 1e-15  # relative convergence threshold of the continued fraction
_TINY = 1e-300  # keeps Lentz's algorithm away from division by zero
_MAX_TERMS = 10_000


def regularized_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b) = B(x; a, b) / B(a, b).

    Args:
        x: point in [0, 1].
        a: first shape parameter, > 0.
        b: second shape parameter, > 0.

    Returns:
        I_x(a, b) in [0, 1].
    """
    if not 0.0 <= x <= 1.0 or a <= 0.0 or b <= 0.0:
        msg = f"regularized_beta needs 0 <= x <= 1 and a, b > 0 (got x={x}, a={a}, b={b})"
        raise ValueError(msg)
    if x in (0.0, 1.0):
        return x
    # x^a (1-x)^b / (a B(a, b)), in logs so that large shape parameters do not overflow.
    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    # The continued fraction converges fast only for x < (a + 1) / (a + b + 2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    """Continued fraction of I_x(a, b), evaluated with the modified Lentz algorithm (Numerical Recipes §6.4)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    value = d
    for m in range(1, _MAX_TERMS):
        # Even step: d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)); odd step: d_{2m+1} = -(a + m)(a + b + m) x / ...
        for coef in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + coef * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + coef / c
            c = c if abs(c) > _TINY else _TINY
            value *= c * d
        if abs(c * d - 1.0) < _EPS:
            return value
    msg = f"incomplete beta continued fraction did not converge (x={x}, a={a}, b={b})"
    raise ArithmeticError(msg)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t distribution with ``df`` degrees of freedom (df > 0)."""
    if df <= 0:
        msg = f"degrees of freedom must be > 0, got {df}"
        raise ValueError(msg)
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    # P(|T| > |t|) = I_{df / (df + t²)}(df/2, 1/2).
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (Student's t, ``df`` degrees of freedom), found by bisection on `t_cdf`.

    Args:
        p: probability in (0, 1), e.g. 0.975 for a two-sided 95 % interval.
        df: degrees of freedom, > 0 (n − 1 for a paired sample of n).

    Returns:
        The quantile, accurate to about 1e-12 relative.
    """
    if not 0.0 < p < 1.0:
        msg = f"t_quantile needs 0 < p < 1, got {p}"
        raise ValueError(msg)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # bracket: the CDF is increasing
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
