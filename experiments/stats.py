"""
The statistics the comparisons report: the paired interval over seeds and its verdict (compare.py,
real_model.py), the Spearman rank correlation, the paired t-test with Holm's correction (claim.py),
and the one-sided test of non-inferiority (claim3.py).

The rule for "better", fixed before any run: for each seed, the difference in mean held-out exact
match (rule minus reference) on the same base, data and seed; rule A is better than B when the
two-sided 95 % Student-t confidence interval of the mean paired difference lies entirely above 0,
worse when entirely below, and otherwise no difference was detected.
"""

import math
import statistics

# two-sided 95 % quantiles of Student's t with df = 1..30 degrees of freedom (any statistics table)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def paired_interval(a, b):
    """Mean of the per-seed differences a - b and the half-width of its 95 % t interval
    (None with one seed: no spread to estimate). Example: a = [0.9, 0.8, 0.7], b = [0.8, 0.8, 0.6]:
    differences 0.1, 0, 0.1, mean 0.0667, sd 0.0577, half-width 4.303 * 0.0577 / sqrt(3) = 0.1434."""
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return statistics.mean(d), None
    t = T_975.get(len(d) - 1, 1.96 + 2.4 / (len(d) - 1))  # beyond the table (df > 30): within 0.003 of the exact quantile
    return statistics.mean(d), t * statistics.stdev(d) / math.sqrt(len(d))


def verdict(mean, half):
    if half is None:
        return "one seed: no interval"
    return "better" if mean - half > 0 else "worse" if mean + half < 0 else "no difference detected"


def spearman(a, b):
    """Spearman rank correlation: the Pearson correlation of the ranks, ties sharing their average rank.
    Example: [1, 2, 2, 3] ranks (1, 2.5, 2.5, 4)."""
    def ranks(v):
        order = sorted(v)
        return [order.index(x) + 1 + (order.count(x) - 1) / 2 for x in v]  # first rank of x, plus half its ties
    return statistics.correlation(ranks(a), ranks(b))


def t_tail(t, df):
    """P(T > t) for Student's t with df degrees of freedom: 1/2 minus the density's integral from 0 to |t|
    by Simpson's rule (2,000 intervals), mirrored for t < 0."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    density = [c * (1 + (abs(t) * i / 2000) ** 2 / df) ** (-(df + 1) / 2) for i in range(2001)]
    inner = abs(t) / 2000 / 3 * sum(f * (1 if i in (0, 2000) else 4 if i % 2 else 2) for i, f in enumerate(density))
    upper = max(0.0, 0.5 - inner)
    return upper if t >= 0 else 1 - upper


def t_test(d):
    """Mean of d, the half-width of its 95 % t interval, and the two-sided p-value of mean 0
    (Student's t, len(d) - 1 degrees of freedom)."""
    n, mean = len(d), statistics.mean(d)
    se = statistics.stdev(d) / math.sqrt(n)
    if se == 0:
        return mean, 0.0, 0.0 if mean else 1.0
    return mean, T_975[n - 1] * se, min(1.0, 2 * t_tail(abs(mean / se), n - 1))


def noninferiority_p(d, delta):
    """One-sided p-value of "the mean of d is at most -delta" (Student's t): small when d is
    at least as good as its reference, within delta."""
    n, mean = len(d), statistics.mean(d)
    se = statistics.stdev(d) / math.sqrt(n)
    if se == 0:
        return 0.0 if mean > -delta else 1.0
    return t_tail((mean + delta) / se, n - 1)


def holm(p):
    """Holm's step-down adjustment: the i-th smallest of m p-values times (m - i), never below an earlier one."""
    order, adjusted, running = sorted(range(len(p)), key=lambda i: p[i]), [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def decide(gate_passed, tests, adjusted, delta=0.02):
    """PROTOCOL.md's decision rule from the gate and the primary tests ((mean, half-width, p), Holm-adjusted p):
    no verdict when the gate failed; supported when every primary difference is positive at adjusted
    p < 0.05; refuted when one interval lies entirely below +delta; inconclusive otherwise."""
    if not gate_passed:
        return "no verdict"
    if all(mean > 0 and p < 0.05 for (mean, _, _), p in zip(tests, adjusted)):
        return "supported"
    if any(mean + half < delta for mean, half, _ in tests):
        return "refuted"
    return "inconclusive"
