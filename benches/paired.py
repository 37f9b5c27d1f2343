"""Each target against a baseline (nginx unless told), round by round, from a
`peers.sh` run's results.txt.

peers.sh runs the targets interleaved (A B C ... A B C ...), so the targets of
one round share the host's state of that moment: a round where the host
steals CPU or the other core is busy slows all of them. The medians of each
column, which peers.sh's table prints, throw that pairing away, and on this
host the rounds of one target spread by 25-50 %, more than the differences
asked about. Here each round gives one ratio per target (target / baseline:
req/s, p99, proxy CPU a request), and the table says, over the rounds:

- the median ratio, with a distribution-free confidence interval for it (the
  order statistics a sign test allows; its confidence printed, 95 % or the
  nearest above it that the number of rounds can give);
- in how many rounds the target was at least as good as the baseline (more
  req/s, lower p99, less CPU).

A goal such as "req/s >= 1.0x nginx's" is shown met when the interval's lower
end is >= 1.0 (for p99 and CPU: the upper end <= 1.0); a median on the right
side with an interval across 1.0 is parity within what the run can resolve.

usage: python3 benches/paired.py RUN_DIR [BASELINE]
"""

import math
import statistics
import sys
from collections import defaultdict

COLUMNS = (  # results.txt field, name, True when larger is better
    (2, "req/s", True),
    (4, "p99", False),
    (7, "CPU a request", False),
)


def median_interval(values, level=0.95):
    """(low, high, confidence) for the median of `values`: the k-th smallest
    and k-th largest, k the largest with P(Binomial(n, 1/2) < k) <= (1 -
    level) / 2 (for few values, k = 1 and the confidence it gives)."""
    xs = sorted(values)
    n = len(xs)

    def below(k):  # P(Binomial(n, 1/2) < k)
        return sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while 2 * (k + 1) <= n and below(k + 1) <= (1 - level) / 2:
        k += 1
    return xs[k - 1], xs[n - k], 1 - 2 * below(k)


def rounds(path):
    """{round: {target: fields}} from results.txt."""
    by_round = defaultdict(dict)
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 8:
                by_round[fields[1]][fields[0]] = fields
    return by_round


def number(text):
    try:
        v = float(text)
    except ValueError:
        return None
    return v if v > 0 else None


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    run = sys.argv[1]
    base = sys.argv[2] if len(sys.argv) > 2 else "nginx"
    by_round = rounds(f"{run}/results.txt")
    targets = []
    for r in by_round.values():
        for t in r:
            if t not in (base, "direct") and t not in targets:
                targets.append(t)
    print(f"\npaired against {base}, round by round ({run}/results.txt):")
    print("| target | measure | rounds | median ratio | interval (confidence) | rounds at least as good |")
    print("|---|---|---|---|---|---|")
    for t in targets:
        for col, name, larger_better in COLUMNS:
            ratios = []
            for r in by_round.values():
                if base in r and t in r:
                    a, b = number(r[t][col]), number(r[base][col])
                    if a is not None and b is not None:
                        ratios.append(a / b)
            if len(ratios) < 2:
                continue
            low, high, conf = median_interval(ratios)
            good = sum(1 for x in ratios if (x >= 1.0 if larger_better else x <= 1.0))
            print(f"| {t} | {name} | {len(ratios)} | {statistics.median(ratios):.3f}x "
                  f"| {low:.3f}-{high:.3f} ({conf:.0%}) | {good} of {len(ratios)} |")


if __name__ == "__main__":
    main()
