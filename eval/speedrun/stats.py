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
