"""Intervals for accuracies: how far a number measured on n test images can be from the true rate.

An accuracy is a share of n images, so its sampling noise is binomial. The Wilson score interval
(Wilson, JASA 1927; recommended over the normal approximation by Brown, Cai & DasGupta, Statistical
Science 2001) stays inside [0, 100] % and is sound at 0 % and 100 %, where robust accuracies often sit.
"""

from __future__ import annotations

import math
import statistics

Z_95 = 1.959963984540054  # the 97.5 % quantile of the standard normal: a two-sided 95 % interval
PERCENT = 100.0


def wilson_interval(correct: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """95 % Wilson interval (low, high) in percent for `correct` successes out of n (n ≥ 1).

    centre = (p + z²/2n) / (1 + z²/n), half-width = z / (1 + z²/n) · √(p(1−p)/n + z²/4n²), p = correct/n.
    `correct` may be fractional (a mean over seeds). Raises ValueError for n < 1.
    """
    if n < 1:
        raise ValueError(f"an interval needs at least one image, got n={n}")
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return PERCENT * max(0.0, centre - half), PERCENT * min(1.0, centre + half)


def accuracy_fields(accuracies: list[float], n: int) -> dict:
    """Row fields of an accuracy (percent) measured once per seed on the same n images: the mean over
    seeds as `accuracy`, its Wilson interval, and with several seeds their s.d. and every value."""
    mean = sum(accuracies) / len(accuracies)
    low, high = wilson_interval(mean / PERCENT * n, n)
    fields = {"accuracy": mean, "n": n, "ci_low": low, "ci_high": high}
    if len(accuracies) > 1:
        fields |= {"sd": statistics.stdev(accuracies), "seed_accuracies": list(accuracies)}
    return fields
