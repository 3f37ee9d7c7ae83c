"""The judge's statistics: crossings of a target loss, Welch t-tests, confidence intervals, eval noise, the decision.

Pure functions of run records (eval/speedrun/campaign.py writes them, one JSON object per run):
    {arm, recipe, seed, points: [{step, tokens, time, loss, ...}], final_per_protein: {loss_sum: [...], count: [...]}}

    reach(points, target, key) -> float | None        first time / tokens at which the curve is <= target
    loss_at(points, x, key) -> float | None           the curve's loss at time / tokens x (linear interpolation)
    slope_at(points, target, key) -> float | None     d loss / d key on the segment where the curve crosses target
    welch(a, b) -> dict                               mean(a) - mean(b), its 95% CI, Welch's t, df and p
    log_ratio(a, b) -> dict                           mean(a) / mean(b) as exp(mean log a - mean log b), 95% CI, p
    eval_noise(record, other=None) -> float           bootstrap std (over validation proteins) of a final loss, or
                                                      of the difference of two runs' final losses on the same set
    compare(arm_runs, control_runs, target) -> dict   everything one comparison reports
    decide(comparison) -> str                         the rule: default only if tokens-to-target improves with
                                                      p < 0.01 and time-to-target does not get worse
Welch's test is scipy.stats.ttest_ind(equal_var=False) (scipy is installed with scikit-learn); the CI of a
difference uses the Welch-Satterthwaite degrees of freedom, the same ones the test uses.
"""

import math
import statistics
import warnings

import numpy as np

from training.metrics import reach  # the crossing's one home (the trainer's train.target_loss uses it too)

ALPHA_DEFAULT = 0.01  # tokens-to-target must improve with p below this for a switch to become a default
ALPHA_WORSE = 0.05  # time-to-target "gets worse" when it is higher with p below this
BUDGET = "budget"  # an arm's `budget=F` override (eval.speedrun): it runs for share F of the campaign budget


def loss_at(points: list[dict], x: float, key: str) -> float | None:
    """Loss of the piecewise-linear curve at `key` = x; None outside the curve's range."""
    for prev, cur in zip(points[:-1], points[1:]):
        if prev[key] <= x <= cur[key]:
            if cur[key] == prev[key]:
                return float(cur["loss"])
            frac = (x - prev[key]) / (cur[key] - prev[key])
            return float(prev["loss"] + frac * (cur["loss"] - prev["loss"]))
    return None


def slope_at(points: list[dict], target: float, key: str) -> float | None:
    """d loss / d key of the segment on which the curve first reaches target (negative while it falls)."""
    for prev, cur in zip(points[:-1], points[1:]):
        if cur["loss"] <= target and cur[key] > prev[key]:
            return float((cur["loss"] - prev["loss"]) / (cur[key] - prev[key]))
    return None


def welch(a: list[float], b: list[float]) -> dict:
    """mean(a) - mean(b) with a 95% confidence interval (Welch-Satterthwaite df) and Welch's two-sided p."""
    from scipy import stats

    out = dict(n_a=len(a), n_b=len(b), mean_a=_mean(a), mean_b=_mean(b), diff=None, low=None, high=None, p=None)
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.mean(a) - statistics.mean(b)
    out["diff"] = diff
    if va + vb == 0:  # identical constants: no spread to test against
        out.update(low=diff, high=diff, p=1.0 if diff == 0 else 0.0)
        return out
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    with warnings.catch_warnings():  # one group without spread (e.g. equal budgets): scipy warns, p is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    out.update(low=diff - half, high=diff + half, df=df, p=p)
    return out


def mean_ci(values: list[float]) -> dict:
    """Mean, std and the 95% t-interval of the mean."""
    from scipy import stats

    out = dict(mean=_mean(values), std=_std(values), low=None, high=None)
    if len(values) > 1:
        half = stats.t.ppf(0.975, len(values) - 1) * out["std"] / math.sqrt(len(values))
        out.update(low=out["mean"] - half, high=out["mean"] + half)
    return out


def log_ratio(a: list[float], b: list[float]) -> dict:
    """Ratio mean(a) / mean(b) as the geometric-mean ratio, with Welch's 95% CI and p on the logs."""
    w = welch([math.log(x) for x in a], [math.log(x) for x in b])
    exp = lambda v: None if v is None else math.exp(v)  # noqa: E731
    return dict(ratio=exp(w["diff"]), low=exp(w["low"]), high=exp(w["high"]), p=w["p"])


def eval_noise(record: dict, other: dict | None = None, draws: int = 2000, seed: int = 0) -> float:
    """Bootstrap std, over the validation proteins, of a run's final token-weighted loss (or of the difference of
    two runs' final losses on the same proteins): how far the loss on another draw of proteins could move."""
    total, count = (np.asarray(record["final_per_protein"][k], dtype=np.float64) for k in ("loss_sum", "count"))
    if other is not None:
        other_total = np.asarray(other["final_per_protein"]["loss_sum"], dtype=np.float64)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        idx = rng.integers(0, len(total), len(total))
        n = count[idx].sum()
        value = total[idx].sum() / n
        if other is not None:
            value -= other_total[idx].sum() / n
        values.append(value)
    return float(np.std(values, ddof=1))


def _mean(values):
    return statistics.mean(values) if values else None


def _std(values):
    return statistics.stdev(values) if len(values) > 1 else None


def crossing(record: dict, target: float) -> dict:
    """Tokens and time at which one run reaches target, the slopes there and the run's end."""
    pts = record["points"]
    out = dict(
        seed=record["seed"], final_loss=pts[-1]["loss"], final_tokens=pts[-1]["tokens"], final_time=pts[-1]["time"]
    )
    for key in ("tokens", "time"):
        out[key] = reach(pts, target, key)
        out[f"slope_{key}"] = slope_at(pts, target, key)
    # already below target at its first evaluation: the crossing is somewhere before it, unresolved
    out["at_first_point"] = pts[0]["loss"] <= target
    return out


def compare(arm_runs: list[dict], control_runs: list[dict], target: float) -> dict:
    """One arm against the control: tokens / time to target (Welch on each), the final loss at equal tokens and the
    loss at equal time (each with a CI), and the eval-noise resolution of the crossings."""
    mine, theirs = [crossing(r, target) for r in arm_runs], [crossing(r, target) for r in control_runs]
    out = dict(n=len(mine), n_control=len(theirs), unresolved=sum(c["at_first_point"] for c in mine + theirs))
    for key in ("tokens", "time"):
        a, b = [c[key] for c in mine], [c[key] for c in theirs]
        out[f"{key}_reached"] = sum(v is not None for v in a)
        a, b = [v for v in a if v is not None], [v for v in b if v is not None]
        out[f"{key}_mean"], out[f"{key}_std"] = _mean(a), _std(a)
        out[f"{key}_test"] = welch(a, b)
        out[f"{key}_ratio"] = log_ratio(a, b) if len(a) > 1 and len(b) > 1 else None
    # equal tokens / equal time: the largest horizon every run of both arms covers
    for key in ("tokens", "time"):
        horizon = min(r["points"][-1][key] for r in arm_runs + control_runs)
        a = [loss_at(r["points"], horizon, key) for r in arm_runs]
        b = [loss_at(r["points"], horizon, key) for r in control_runs]
        out[f"loss_at_equal_{key}"] = dict(at=horizon, **welch(a, b))
    out["final_loss"] = welch([c["final_loss"] for c in mine], [c["final_loss"] for c in theirs])
    # |d loss / d tokens| (and / d time) where the arm's runs cross: eval noise / slope = how far a crossing can move
    for key in ("tokens", "time"):
        out[f"slope_{key}"] = _mean([abs(c[f"slope_{key}"]) for c in mine if c[f"slope_{key}"]])
    out["crossings"] = mine
    return out


def decide(comparison: dict) -> str:
    """The judge's rule for a switch (this arm vs the control)."""
    tok, tim = comparison["tokens_test"], comparison["time_test"]
    n = comparison["n"]
    if comparison["tokens_reached"] < n or comparison["time_reached"] < n:
        return f"stays off (target not reached in {n - comparison['tokens_reached']} of {n} runs)"
    if comparison.get("unresolved"):
        return "undecided (target crossed before the first evaluation: more --evals, or a lower target)"
    if tok["p"] is None or tim["p"] is None:
        return "undecided (needs 2+ runs per arm)"
    better_tokens = tok["diff"] < 0 and tok["p"] < ALPHA_DEFAULT
    worse_time = tim["diff"] > 0 and tim["p"] < ALPHA_WORSE
    if better_tokens and not worse_time:
        return "default (tokens-to-target better, p < 0.01; time not worse)"
    if better_tokens:
        return f"stays off (fewer tokens but time worse, p = {tim['p']:.3g})"
    if tok["diff"] > 0 and tok["p"] < ALPHA_DEFAULT:
        return "stays off (tokens-to-target worse, p < 0.01)"
    return f"stays off (no significant tokens-to-target gain, p = {tok['p']:.3g})"


# ---------------------------------------------------------------------------------------------------- records


def current_runs(records: list[dict]) -> dict[str, list[dict]]:
    """Runs per arm name, in first-seen order, keeping only the arm's latest definition (key) and the latest run
    of each seed."""
    latest = {r["arm"]: r["key"] for r in records}
    runs = {}
    for r in records:
        if r["key"] == latest[r["arm"]]:
            runs.setdefault(r["arm"], {})[r["seed"]] = r
    return {arm: [by_seed[k] for k in sorted(by_seed)] for arm, by_seed in runs.items()}


def final(runs: list[dict], key: str = "loss") -> list[float]:
    return [r["points"][-1][key] for r in runs]


def budget_share(overrides: list) -> float:
    """'budget=0.5' among an arm's (or a record's) overrides -> 0.5; none -> 1.0 (the whole budget)."""
    for text in overrides:
        key, value = text.split("=", 1)
        if key == BUDGET:
            try:
                share = float(value)
            except ValueError:
                share = float("nan")
            if not 0 < share <= 1:
                raise ValueError(f"{text!r}: the share of the campaign budget, 0 < F <= 1 (e.g. budget=0.5)")
            return share
    return 1.0


def baseline_arm(records: list[dict], exclude_best: bool = False) -> dict | None:
    """The tuned ESM2 baseline: the ESM2 arm of lowest mean final loss on the whole budget (its first run stands for
    the arm; arms run on a `budget=` share below 1 are left out); exclude_best leaves out arms whose learning rate
    was itself resolved from `esm.lr=best`."""
    arms = {
        name: runs
        for name, runs in current_runs(records).items()
        if runs[0]["recipe"] == "esm2"
        and budget_share(runs[0]["overrides"]) == 1
        and not (exclude_best and "esm.lr=best" in runs[0].get("template", []))
    }
    if not arms:
        return None
    return arms[min(arms, key=lambda n: statistics.mean(final(arms[n])))][0]


# ---------------------------------------------------------------------------------------------------- speedup vs ESM2
#
# Speedup = the ESM2 recipe's tokens (or time) to the target / the arm's, with a 95% interval over BOTH sides' seeds.
#
# The target is the tuned ESM2 arm's mean final loss, so it is itself an estimate from that arm's seeds; the ESM2
# side's tokens-to-target is the best of the ESM2 arms (any `budget=` share) that reach it; the arm's crossings move
# with the target. A Fieller / delta-method interval would need the covariance of all three (the arm's crossing
# depends on the target through the curve's slope, the ESM2 side is a minimum over arms, and an arm that stops just
# below the target does not reach a redrawn lower one at all: censored, not small). So the interval is a bootstrap
# over seeds of both sides: each draw resamples the target arm's seeds (a new target and its own end as its
# tokens-to-target), every other ESM2 arm's seeds (its crossings of that target; it competes only if all its
# resampled runs reach it) and the arm's seeds (their crossings of that target). A draw in which a resampled arm run
# does not reach the redrawn target counts as a ratio below any other (the arm's tokens-to-target is unknown, beyond
# its end); if such draws reach the lower percentile the interval has no lower bound, and the report says so.
#
# A plain percentile bootstrap under-covers with 3-5 seeds (its spread uses n, not n - 1, and normal, not t, tails).
# Hesterberg's expanded percentile interval corrects both: percentiles at Phi(-+ sqrt(n/(n-1)) * t_{0.975, n-1})
# instead of 2.5/97.5% (T. C. Hesterberg, "What teachers should know about the bootstrap", The American
# Statistician 69(4), 2015, section 5.3; R package `resample`, CI.percentile(expand = TRUE)). With two samples n is
# the smaller side's seed count (the more conservative expansion). tests/test_speedrun.py checks its coverage on
# simulated campaigns of 5 + 5 seeds.

DRAWS = 20_000


def expanded_levels(n: int, level: float = 0.95) -> tuple[float, float]:
    """The percentiles (as fractions) of Hesterberg's expanded percentile interval for samples of n (n >= 2)."""
    from scipy import stats

    tail = float(stats.norm.sf(math.sqrt(n / (n - 1)) * stats.t.ppf(0.5 + level / 2, n - 1)))
    return tail, 1 - tail


def crossing_table(runs: list[dict], targets, key: str) -> np.ndarray:
    """[target, run] -> `key` at which the run first reaches that target (nan: never)."""
    table = [[reach(r["points"], float(t), key) for r in runs] for t in targets]
    return np.array([[np.nan if v is None else v for v in row] for row in table], dtype=np.float64).reshape(
        len(targets), len(runs)
    )


def _resample(rng, n: int, draws: int) -> np.ndarray:
    # sorted within a draw: the same multiset of seeds gives bit-identical means (few distinct targets to cross)
    return np.sort(rng.integers(0, n, (draws, n)), axis=1)


def esm2_side(target_runs: list[dict], rivals: dict, key: str, draws=DRAWS, seed=0, target=None) -> dict:
    """The ESM2 side of a speedup: the target (mean final loss of `target_runs`, the tuned full-budget arm), the
    ESM2 tokens (or time) to it (the best of: the target arm's own mean end, every rival ESM2 arm whose runs all
    reach the target, mean crossing), which arm sets it, and the same for `draws` bootstrap redraws of every ESM2
    arm's seeds (`targets[inverse]` is draw i's target, `values[i]` its ESM2 tokens-to-target). A given `target`
    (--target) is fixed: no target arm (target_runs empty), every ESM2 arm is a rival, nan where none reaches it."""
    rng = np.random.default_rng(seed)
    if target is None:
        finals = np.array([r["points"][-1]["loss"] for r in target_runs], dtype=np.float64)
        ends = np.array([r["points"][-1][key] for r in target_runs], dtype=np.float64)
        target, value, setter, n = float(finals.mean()), float(ends.mean()), target_runs[0]["arm"], len(target_runs)
        idx = _resample(rng, len(target_runs), draws)
        targets, inverse = np.unique(finals[idx].mean(axis=1), return_inverse=True)
        values = ends[idx].mean(axis=1)
    else:
        value, setter, n = math.inf, None, 0
        targets, inverse, values = np.array([target]), np.zeros(draws, dtype=np.int64), np.full(draws, np.nan)
    for name, runs in rivals.items():
        point = crossing_table(runs, [target], key)[0]
        if not np.isnan(point).any() and point.mean() < value:
            value, setter, n = float(point.mean()), name, len(runs)
        table = crossing_table(runs, targets, key)
        drawn = table[inverse[:, None], _resample(rng, len(runs), draws)].mean(axis=1)  # nan: a run misses it
        values = np.fmin(values, drawn)
    value = None if setter is None else value
    return dict(target=target, value=value, setter=setter, n=n, targets=targets, inverse=inverse, values=values)


def speedup(arm_runs: list[dict], side: dict, key: str, seed: int = 1, level: float = 0.95) -> dict:
    """ESM2 tokens (or time) to target / the arm's mean tokens (time) to it, with the two-sided bootstrap interval
    described above. ratio is None unless every arm run reaches the target; low is None (and `unbounded`) when
    redraws in which the arm misses the redrawn target reach the lower percentile."""
    point = crossing_table(arm_runs, [side["target"]], key)[0]
    out = dict(ratio=None, low=None, high=None, unbounded=False, missed=None, baseline_arm=side["setter"])
    out.update(baseline=side["value"], n=len(arm_runs), n_baseline=side["n"])
    if np.isnan(point).any() or side["value"] is None:
        return out
    out["ratio"] = side["value"] / float(point.mean())
    if len(arm_runs) < 2 or side["n"] < 2:
        return out
    table = crossing_table(arm_runs, side["targets"], key)
    draws = len(side["values"])
    mine = table[side["inverse"][:, None], _resample(np.random.default_rng(seed), len(arm_runs), draws)].mean(axis=1)
    ratios = side["values"] / mine
    ratios[np.isnan(side["values"]) & ~np.isnan(mine)] = np.inf  # (a fixed target) no ESM2 arm reaches it
    missed = np.isnan(ratios)
    ratios[missed] = 0.0  # the arm's tokens-to-target lies beyond its end: below every finite ratio
    lo, hi = np.quantile(ratios, expanded_levels(min(len(arm_runs), side["n"]), level))
    out.update(missed=float(missed.mean()), low=float(lo) or None, high=float(hi) or None, unbounded=bool(lo == 0.0))
    return out


def esm2_arms(records: list[dict]) -> dict[str, list[dict]]:
    """Every ESM2 arm's current runs, any budget share."""
    return {name: runs for name, runs in current_runs(records).items() if runs[0]["recipe"] == "esm2"}


def esm2_sides(records: list[dict], target: float | None = None, draws: int = DRAWS) -> dict | None:
    """{'tokens': side, 'time': side} for the tuned baseline of these records (None: no full-budget ESM2 arm).

    The fair comparison (issue #21): the TARGET stays the tuned full-budget ESM2 arm's mean final loss (the quality
    the ESM2 recipe reaches on the whole budget: the bar), while the ESM2 tokens / time to that target is the best
    over every ESM2 arm, of any `budget=` share, whose runs all reach it. That is exactly how a SpeedPLM arm is
    judged (a `budget=0.3` SpeedPLM arm is scored on its crossing of the full-budget target), so both recipes are
    offered the same schedule fitting. Letting a short ESM2 arm SET the target instead would lower the bar for
    everyone (a shorter run ends at a higher loss) and would not measure the ESM2 recipe's best time to the same
    quality. With a given `target` (--target) every ESM2 arm is a rival and the target is not redrawn."""
    arms = esm2_arms(records)
    base = baseline_arm(records)
    if base is None and (target is None or not arms):
        return None
    target_runs = arms.pop(base["arm"]) if target is None else []
    return {key: esm2_side(target_runs, arms, key, draws, target=target) for key in ("tokens", "time")}
