"""The benchmark's statistics: spread of a row's steps, a ratio with its interval, a verdict.

The samples are per-step durations in any one unit (seconds from a CPU clock, milliseconds from
CUDA events): only their ratios and order matter here. Two rows are compared on steps that were
*interleaved*: step ``i`` of each row ran in the same round, one right after the other, so a slow
spell of a shared machine lands on both. :func:`ratio_interval` keeps that pairing (it works on
per-round ratios), which is what makes its interval narrow when the rows really differ and wide
when they don't.

Paired ratios are the median over rounds of the per-round ratio (``num[i] / den[i]``), not the ratio of
the two medians: a shared machine's speed drifts (on the 2-core CI machine a 30 ms matrix product's
time correlates 0.8 with the next one's, a 1 s training step's about 0.35 with the next step's, and
the whole machine ran 15% faster or slower for minutes at a time during a run), so the per-round ratio
cancels most of that drift. Its interval is the exact distribution-free interval of a median (the sign
test's: two order statistics of the per-round ratios, chosen from the binomial distribution), not a
bootstrap: a percentile bootstrap of the median of 7 rounds covers about 89% where it claims 95%, and
in two runs of the table that showed up as verdicts flipping between runs. Fewer than 6 rounds give no
95% interval at all, so they read "undecided".

A verdict has a tie band, 0.97-1.03 (:data:`TIE_WITHIN`), and reads the whole interval against it
(:func:`verdict`): "faster" when the whole interval lies above the band, "slower" when it lies below it,
"tie" when it lies inside it, and "undecided" when it straddles an edge of the band (or there is no
interval): then the run could not tell whether the rows differ by more than 3%, and says so rather than
calling it a tie. Some 40 of the table's ratios compare rows within a few percent of each other (two
implementations of the same prefix attention): against a bare 1.00 boundary, 95% intervals put one or
two of those on the wrong side of it in a typical run, and a 1-3% difference is below what a shared CPU
resolves from run to run. 3% is also the precision the sampling aims for (:data:`CONVERGED_WITHIN`). The
band does not make every verdict repeat: a ratio whose true value sits near one of its edges (several
prefix rows run at 0.95-0.97 of their floor) still comes out on either side from run to run, or
undecided. A target is met when its interval lies no lower than the threshold less the band, not met
when it lies wholly below that, undecided when it straddles it (:func:`meets`, :func:`target_edge`).
"""

from __future__ import annotations

import math

import numpy as np

CONVERGED_WITHIN = 0.03  # a ratio has converged when its interval lies within +/-3% of it
TIE_WITHIN = 0.03  # the tie band 0.97-1.03: an interval wholly inside it reads "tie" (see the module docstring)
VERDICTS = ("faster", "slower", "tie", "undecided")
# how every report states the rule
TIE_RULE = (f"\"faster\" or \"slower\" when the whole interval lies above or below {1 - TIE_WITHIN:.2f}-"
            f"{1 + TIE_WITHIN:.2f}, \"tie\" when it lies wholly inside that band (a difference under "
            f"{TIE_WITHIN:.0%}), \"undecided\" when it straddles an edge of the band or there is no interval "
            f"(the run could not tell)")


def _as_array(samples, what):
    a = np.asarray(list(samples), dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{what} must be a non-empty sequence of numbers, got {a.size} values of shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        bad = [float(x) for x in a if not (math.isfinite(x) and x > 0)][:5]
        raise ValueError(f"{what} must be finite durations above 0, got {bad}")
    return a


def summarize(samples):
    """Median, quartiles, extremes and count of a row's step durations.

    ``samples``: ``[n]`` durations (n >= 1). Returns ``dict(median, q1, q3, min, max, n)`` in the
    samples' unit; the quartiles interpolate linearly between order statistics (numpy's default),
    so with one sample all five numbers are that sample.
    """
    a = _as_array(samples, "samples")
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return dict(median=float(med), q1=float(q1), q3=float(q3), min=float(a.min()), max=float(a.max()), n=int(a.size))


def median_interval(samples, level=0.95):
    """The exact distribution-free ``level`` interval of the median of ``samples``: ``(lo, hi)``.

    ``(x_(k), x_(n+1-k))`` of the sorted samples with the largest ``k`` whose two tails hold at most
    ``(1 - level) / 2`` each of Binomial(n, 1/2) (the sign test's interval; it covers the true median
    with probability at least ``level`` for independent samples of any continuous distribution).
    ``(0, inf)`` when ``n`` is too small for any such interval (``n < 6`` at 95%).
    """
    x = np.sort(_as_array(samples, "samples"))
    n, tail = x.size, (1 - level) / 2
    k, cdf = 0, 0.0  # cdf: P(Binomial(n, 1/2) <= k - 1)
    while k < n // 2:
        nxt = cdf + math.comb(n, k) / 2.0 ** n
        if nxt > tail:
            break
        cdf, k = nxt, k + 1
    if k == 0:
        return 0.0, math.inf
    return float(x[k - 1]), float(x[n - k])


def ratio_interval(num_samples, den_samples, *, level=0.95, n_boot=2000, seed=0, paired=True):
    """The ratio of ``num`` to ``den`` and its ``level`` interval: ``(ratio, lo, hi)``.

    With step durations, ``ratio_interval(baseline, row)`` is the row's speedup: > 1 means the row's
    median step is shorter, i.e. the row is faster than the baseline.

    ``paired`` (default): ``num_samples[i]`` and ``den_samples[i]`` are the two rows' steps of the same
    interleaved round, so both lists have the same length ``n``; the ratio is the median of the ``n``
    per-round ratios ``num[i] / den[i]`` and the interval is :func:`median_interval` of those ratios.
    ``paired=False`` (runs made at different times, e.g. two result files): the ratio is
    ``median(num) / median(den)`` and the interval the percentile interval of ``n_boot`` bootstrap
    ratios, each list resampled on its own, seeded by ``seed`` so the same samples always give the same
    interval. With a single step on either side the interval is ``(0, inf)`` (undecided).
    """
    num, den = _as_array(num_samples, "num_samples"), _as_array(den_samples, "den_samples")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if paired and num.size != den.size:
        raise ValueError(f"paired samples need one step of each row per round, got {num.size} and {den.size} "
                         "steps (pass paired=False for runs that were not interleaved)")
    per_round = num / den if paired else None
    ratio = float(np.median(per_round) if paired else np.median(num) / np.median(den))
    if min(num.size, den.size) < 2:  # one step has no spread to resample: no interval, undecided
        return ratio, 0.0, math.inf
    if paired:
        lo, hi = median_interval(per_round, level)
        return ratio, min(lo, ratio), max(hi, ratio)
    rng = np.random.default_rng(seed)
    boot = (np.median(num[rng.integers(0, num.size, (n_boot, num.size))], axis=1)
            / np.median(den[rng.integers(0, den.size, (n_boot, den.size))], axis=1))
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    # the percentile interval of a median can exclude the point estimate with very few steps: widen to hold it
    return ratio, float(min(lo, ratio)), float(max(hi, ratio))


def verdict(lo, hi, *, within=TIE_WITHIN, faster_word="faster", slower_word="slower"):
    """The verdict on a speedup interval ``[lo, hi]``: ``faster_word``, ``slower_word``, ``"tie"`` or ``"undecided"``.

    ``faster_word`` when the whole interval lies above ``1 + within``, ``slower_word`` when it lies below
    ``1 - within``, ``"tie"`` when it lies inside ``[1 - within, 1 + within]`` (ends included), else
    ``"undecided"``: the interval straddles an edge of the band, or there is none (``hi`` infinite, e.g. a
    single step or fewer than 6 rounds). ``within=0``: a tie only for the zero-width interval at 1.00.
    """
    if lo > hi:
        raise ValueError(f"an interval needs lo <= hi, got lo={lo} and hi={hi}")
    if not math.isfinite(hi):
        return "undecided"
    if lo > 1 + within:
        return faster_word
    if hi < 1 - within:
        return slower_word
    if lo >= 1 - within and hi <= 1 + within:
        return "tie"
    return "undecided"


def tie_band(within=TIE_WITHIN):
    """The two ends of the tie band, ``(1 - within, 1 + within)``: the thresholds a verdict turns on."""
    return (1 - within, 1 + within)


def target_edge(threshold, within=TIE_WITHIN):
    """Where a target "ratio >= ``threshold``" turns: the threshold less the tie band."""
    return threshold * (1 - within)


def meets(lo, hi, threshold, within=TIE_WITHIN):
    """A target "ratio >= ``threshold``" on the interval ``[lo, hi]``: "met", "not met" or "undecided".

    "met" when the whole interval lies at or above ``threshold * (1 - within)`` (not resolvably below it,
    the tie band's reading), "not met" when the whole interval lies below that, else "undecided".
    """
    edge = target_edge(threshold, within)
    return "met" if lo >= edge else "not met" if hi < edge else "undecided"


def _bound(x):
    # an end that rounds to 1.00 or to an end of the tie band without equalling it gets a third decimal,
    # so that "0.97-0.99 tie" next to "0.95-0.968 slower" shows why
    for edge in (1.0, *tie_band()):
        if f"{x:.2f}" == f"{edge:.2f}" and abs(x - edge) > 1e-12:
            digits = 3 if f"{x:.3f}" != f"{edge:.3f}" else 4
            return f"{x:.{digits}f}"
    return f"{x:.2f}"


def format_ratio(ratio, lo, hi):
    """``"1.03 (0.99-1.07)"``: the ratio and its interval, two decimals (three for an end near 1.00 or
    near an end of the tie band); ``"19.87 (no interval)"`` when there is none (``hi`` infinite)."""
    if not math.isfinite(hi):
        return f"{ratio:.2f} (no interval)"
    return f"{ratio:.2f} ({_bound(lo)}-{_bound(hi)})"


def converged(ratio, lo, hi, within=CONVERGED_WITHIN):
    """True when the interval lies within ``+/-within`` (relative) of the ratio."""
    return lo >= ratio * (1 - within) and hi <= ratio * (1 + within)


def decision_margin(lo, hi, thresholds=(1.0,)):
    """How safely the interval ``[lo, hi]`` decides against each threshold, in interval half-widths.

    0 when a threshold lies strictly inside the interval: the verdict turns on that threshold and the
    interval straddles it, so it is undecided (:func:`verdict`, :func:`meets`). Otherwise, for each
    threshold ``t``, the distance from ``t`` to the nearer end of the interval over the interval's
    half-width; the smallest over ``thresholds`` is returned. Small means an end of the interval sits near
    a threshold, so another run could come out on the other side of it and change the verdict; about 1 or
    more means the verdict is settled. ``inf`` for a zero-width interval, 0 for an unbounded one.
    """
    half = (hi - lo) / 2
    if not math.isfinite(half):
        return 0.0
    if any(lo < t < hi for t in thresholds):
        return 0.0
    if half <= 0:
        return math.inf
    return min(min(abs(lo - t), abs(hi - t)) for t in thresholds) / half


def speedup(base_samples, row_samples, **kwargs):
    """The row's speedup over the baseline as a dict: ratio, lo, hi, verdict, text (see :func:`ratio_interval`)."""
    ratio, lo, hi = ratio_interval(base_samples, row_samples, **kwargs)
    return dict(ratio=ratio, lo=lo, hi=hi, **reading(ratio, lo, hi))


def reading(ratio, lo, hi):
    """How a ratio with its interval reads: ``dict(verdict=..., text=...)`` (:func:`verdict`, :func:`format_ratio`)."""
    return dict(verdict=verdict(lo, hi), text=format_ratio(ratio, lo, hi))


__all__ = ["summarize", "median_interval", "ratio_interval", "verdict", "tie_band", "target_edge", "meets",
           "format_ratio", "converged", "decision_margin", "speedup", "reading", "CONVERGED_WITHIN", "TIE_WITHIN",
           "TIE_RULE", "VERDICTS"]
