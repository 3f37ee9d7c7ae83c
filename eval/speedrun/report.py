"""The judge's report: tables, plot and probes from the run records of `python -m eval.speedrun` (results.jsonl).

build_report(records, control, target=None) -> dict      every number (eval/speedrun/stats.py does the statistics)
report_markdown(report, state, settings, command) -> str
ReportOptions(control="control", target=None, probes=False, quality=None)   what the report compares, whether it
    probes, and where the eval.quality data is (None: no quality yardsticks)
write_report(settings, out, command, options=ReportOptions())   speedrun.md / .json / .png (+ probes/)
"""

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from eval.checkpoints import esm_twin
from eval.speedrun import stats as st
from eval.speedrun.campaign import (
    EVAL_MASK_RATE,
    EVAL_SEED,
    SHAPES,
    Settings,
    SpeedrunError,
    load_records,
    speedplm_config,
)
from eval.speedrun.stats import baseline_arm, current_runs, final
from eval.tables import markdown_table


class ReportNotReady(SpeedrunError):
    """The runs a report needs (the control, an ESM2 arm for the target) have not finished yet."""


def throughput(runs: list[dict]) -> float:
    """Mean training tokens/s of an arm's runs over their whole run: a machine that drifts between arms run at
    different hours shows here (time comparisons are fair only between arms run at the same speed)."""
    return statistics.mean(t / s for t, s in zip(final(runs, "tokens"), final(runs, "time"), strict=True))


def build_report(records: list[dict], control: str, target: float | None = None, fixed_on: str | None = None) -> dict:
    """Every number of the report, from the run records (those of `--confirm` arms judged apart: `confirmation`).
    fixed_on: where the arms were chosen before these runs (a confirmation campaign's `fixed_on`), for the labels."""
    selection = [r for r in records if not r.get("confirms")]
    runs = current_runs(selection)
    if control not in runs or runs[control][0]["recipe"] != "speedplm":
        raise ReportNotReady(f"--control {control}: no finished SpeedPLM runs of that arm (arms: {sorted(runs)})")
    base = baseline_arm(selection)
    sides = st.esm2_sides(selection, target)  # the ESM2 side of every speedup (the target redrawn with its seeds)
    source = "given (--target)"
    if target is None:
        if base is None:
            raise ReportNotReady("no finished ESM2 arm to take the target from: add one (recipe=esm2) or give --target")
        target, source = statistics.mean(final(runs[base["arm"]])), f"mean final loss of {base['arm']} (tuned ESM2)"
    baseline_rows = []
    for name, rs in runs.items():
        if rs[0]["recipe"] == "esm2":
            losses = final(rs)
            baseline_rows.append(
                dict(
                    arm=name,
                    overrides=" ".join(rs[0]["overrides"]) or "(ESM2 paper: lr 4e-4, warmup 5%)",
                    runs=len(rs),
                    loss=st.mean_ci(losses),
                    tokens=statistics.mean(final(rs, "tokens")),
                    time=statistics.mean(final(rs, "time")),
                    throughput=throughput(rs),
                    chosen=base is not None and name == base["arm"],
                    budget=st.budget_share(rs[0]["overrides"]),
                    sets=[k for k in ("tokens", "time") if sides and sides[k]["setter"] == name],
                )
            )
    arms = {}
    for name, rs in runs.items():
        if rs[0]["recipe"] != "speedplm":
            continue
        crossings = [st.crossing(r, target) for r in rs]
        entry = dict(overrides=rs[0]["overrides"], runs=len(rs), seeds=[r["seed"] for r in rs], crossings=crossings)
        for key in ("tokens", "time"):
            got = [c[key] for c in crossings if c[key] is not None]
            entry[f"{key}_reached"] = len(got)
            entry[f"{key}_mean"] = statistics.mean(got) if got else None
            entry[f"{key}_std"] = statistics.stdev(got) if len(got) > 1 else None
            entry[f"speedup_{key}"] = st.speedup(rs, sides[key], key) if sides else None
        entry["final_loss"] = statistics.mean(final(rs))
        entry["throughput"] = throughput(rs)
        if name != control:
            entry["vs_control"] = st.compare(rs, runs[control], target)
            entry["vs_control"].pop("crossings")
            entry["decision"] = st.decide(entry["vs_control"])
            entry["aa"] = rs[0]["overrides"] == runs[control][0]["overrides"]  # A/A: the control on other seeds
        arms[name] = entry
    everyone = [r for rs in runs.values() for r in rs]
    pairs = [st.eval_noise(a, b) for a, b in zip(runs[control][:-1], runs[control][1:])]
    slope = (
        statistics.mean(abs(c["slope_tokens"]) for c in arms[control]["crossings"] if c["slope_tokens"])
        if any(c["slope_tokens"] for c in arms[control]["crossings"])
        else None
    )
    noise = dict(
        final_loss=statistics.median(st.eval_noise(r) for r in everyone),
        difference=statistics.median(pairs) if pairs else None,
        control_seed_std=statistics.stdev(final(runs[control])) if len(runs[control]) > 1 else None,
        control_slope_per_mtoken=slope * 1e6 if slope else None,
    )
    if noise["difference"] and slope and arms[control]["tokens_mean"]:
        # how far eval noise alone moves a crossing: noise of a loss difference / |d loss / d tokens| there
        noise["crossing_tokens_pct"] = 100 * noise["difference"] / slope / arms[control]["tokens_mean"]
    confirming = [r for r in records if r.get("confirms")]
    confirmed = confirmation(confirming, arms) if confirming else None
    for name, entry in arms.items():
        entry["claim"] = claim_label(name, entry["seeds"], confirmed, fixed_on)
    return dict(
        target=target,
        target_source=source,
        baseline=base["arm"] if base else None,
        baseline_setters={k: sides[k]["setter"] for k in sides} if sides else None,
        baseline_rows=baseline_rows,
        control=control,
        eval_noise=noise,
        arms=arms,
        confirmation=confirmed,
        fixed_on=fixed_on,
    )


def seed_text(seeds: list[int]) -> str:
    """[0, 1, 2, 3, 4] -> '0-4'; [0, 2] -> '0, 2'."""
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def confirmation(records: list[dict], selected: dict) -> dict:
    """The `--confirm` runs judged on their own, as the selection was: the target is the confirming ESM2 arm's mean
    final loss on the fresh seeds, the ESM2 side the best confirming ESM2 arm, each kept arm's speedup with the
    two-sided interval. `holds`: every fresh run reaches the fresh target and the tokens and time intervals both
    lie above 1 (faster than the ESM2 recipe); `consistent`: the selection's estimate lies inside the fresh
    interval (no sign that selecting on seeds 0-4 flattered it)."""
    runs = current_runs(records)
    sides = st.esm2_sides(records)
    out = dict(target=sides["tokens"]["target"] if sides else None, arms={}, esm2={})
    for name, rs in runs.items():
        seeds = [r["seed"] for r in rs]
        if rs[0]["recipe"] == "esm2":
            out["esm2"][name] = dict(confirms=rs[0]["confirms"], seeds=seeds, loss=st.mean_ci(final(rs)))
            continue
        entry = dict(confirms=rs[0]["confirms"], seeds=seeds, runs=len(rs), final_loss=statistics.mean(final(rs)))
        for key in ("tokens", "time"):
            got = [c[key] for c in (st.crossing(r, out["target"]) for r in rs) if c[key] is not None] if sides else []
            entry[f"{key}_reached"], entry[f"{key}_mean"] = len(got), statistics.mean(got) if got else None
            entry[f"speedup_{key}"] = st.speedup(rs, sides[key], key) if sides else None
            entry[f"selected_{key}"] = (selected.get(rs[0]["confirms"]) or {}).get(f"speedup_{key}")
        sp = [entry["speedup_tokens"], entry["speedup_time"]]
        entry["holds"] = all(d and d["low"] is not None and d["low"] > 1 for d in sp)
        entry["consistent"] = all(
            d and s and s["ratio"] is not None and d["high"] is not None and (d["low"] or 0) <= s["ratio"] <= d["high"]
            for d, s in zip(sp, [entry["selected_tokens"], entry["selected_time"]], strict=True)
        )
        out["arms"][name] = entry
    return out


def claim_label(name: str, seeds: list[int], confirmed: dict | None, fixed_on: str | None = None) -> str:
    """What an arm's numbers are: measured on the seeds it was selected on, or confirmed on fresh ones; in a
    confirmation campaign (`fixed_on`), measured on seeds its choice never saw."""
    if fixed_on:
        return f"chosen beforehand ({fixed_on}); measured on fresh seeds {seed_text(seeds)}"
    selected = f"selected on seeds {seed_text(seeds)}"
    for entry in (confirmed or {}).get("arms", {}).values():
        if entry["confirms"] == name:
            fresh = seed_text(entry["seeds"])
            return (
                f"{selected}; confirmed on seeds {fresh}" if entry["holds"] else f"{selected}; NOT confirmed on {fresh}"
            )
    return f"{selected}, not confirmed"


def fmt(v, digits=2, pct=False):
    if v is None:
        return "n/a"
    return f"{100 * (v - 1):+.{digits}f}%" if pct else f"{v:,.{digits}f}"


def ci(d: dict | None, digits=2, pct=False, key="ratio") -> str:
    if not d or d.get(key) is None:
        return "n/a"
    if d.get("low") is None:
        return fmt(d[key], digits, pct)
    return f"{fmt(d[key], digits, pct)} [{fmt(d['low'], digits, pct)}, {fmt(d['high'], digits, pct)}]"


def speed_ci(d: dict | None) -> str:
    """A speedup with its two-sided interval; 'unbounded' where redraws of the target the arm misses reach the
    lower percentile."""
    if not d or d.get("ratio") is None:
        return "n/a"
    if d.get("unbounded"):
        return f"{fmt(d['ratio'])} [unbounded, {fmt(d['high'])}]†"
    return ci(d)


def pval(d: dict | None) -> str:
    return "n/a" if not d or d.get("p") is None else f"{d['p']:.2g}"


def report_markdown(report: dict, state: dict, settings: Settings, command: str, probes: str = "") -> str:
    s, noise, arms = settings, report["eval_noise"], report["arms"]
    base_rows = [
        {
            "ESM2 arm": r["arm"]
            + (" **(target)**" if r["chosen"] else "")
            + "".join(f" **(sets {k} to target)**" for k in r.get("sets", [])),
            "settings": r["overrides"],
            "runs": r["runs"],
            "final loss [95% CI]": ci(r["loss"], 4, key="mean"),
            "std": fmt(r["loss"]["std"], 4),
            "tokens (M)": fmt(r["tokens"] / 1e6, 2),
            "time (s)": fmt(r["time"], 1),
            "tokens/s": fmt(r["throughput"], 0),
        }
        for r in report["baseline_rows"]
    ]
    arm_rows = [
        {
            "arm": name + (" (control)" if name == report["control"] and name != "control" else ""),
            "overrides": " ".join(a["overrides"]) or "(recipe defaults)",
            "runs": a["runs"],
            "reached": f"{a['tokens_reached']}/{a['runs']}",
            "final loss": fmt(a["final_loss"], 4),
            "tokens to target (M)": f"{fmt(a['tokens_mean'] and a['tokens_mean'] / 1e6, 3)} ± "
            f"{fmt(a['tokens_std'] and a['tokens_std'] / 1e6, 3)}" + ("*" if _unresolved(a) else ""),
            "time to target (s)": f"{fmt(a['time_mean'], 1)} ± {fmt(a['time_std'], 1)}",
            "speedup vs ESM2, tokens [95% CI]": speed_ci(a["speedup_tokens"]),
            "speedup vs ESM2, time [95% CI]": speed_ci(a["speedup_time"]),
            "tokens/s": fmt(a["throughput"], 0),
            "claim": a["claim"],
        }
        for name, a in arms.items()
    ]
    switch_rows = []
    for name, a in arms.items():
        if name == report["control"]:
            continue
        v = a["vs_control"]
        switch_rows.append(
            {
                "arm": name + (" (A/A)" if a["aa"] else ""),
                "tokens to target vs control [95% CI]": ci(v["tokens_ratio"], 1, pct=True),
                "p (tokens)": pval(v["tokens_test"]),
                "time to target vs control [95% CI]": ci(v["time_ratio"], 1, pct=True),
                "p (time)": pval(v["time_test"]),
                "Δ loss at equal tokens [95% CI]": ci(v["loss_at_equal_tokens"], 4, key="diff"),
                "Δ loss at equal time [95% CI]": ci(v["loss_at_equal_time"], 4, key="diff"),
                "decision": "A/A check: " + ("agrees (CI covers 0)" if _covers(v["tokens_test"]) else "DISAGREES")
                if a["aa"]
                else a["decision"],
            }
        )
    run_rows = [
        {
            "arm": name,
            "seed": c["seed"],
            "final loss": fmt(c["final_loss"], 4),
            "tokens to target": fmt(c["tokens"], 0),
            "time to target (s)": fmt(c["time"], 1),
            "tokens": f"{c['final_tokens']:,}",
            "train time (s)": fmt(c["final_time"], 1),
        }
        for name, a in arms.items()
        for c in a["crossings"]
    ]
    conditioning = [
        f"- Eval noise (bootstrap over the {_proteins(state)} validation proteins): std of one run's final loss "
        f"{fmt(noise['final_loss'], 4)}; std of the difference of two runs' final losses on the same proteins "
        f"{fmt(noise['difference'], 4)}; seed-to-seed std of the control's final loss "
        f"{fmt(noise['control_seed_std'], 4)}.",
        f"- Where the control crosses the target its loss falls {fmt(noise['control_slope_per_mtoken'], 4)} per "
        f"million tokens, so eval noise alone moves a crossing by about "
        f"{fmt(noise.get('crossing_tokens_pct'), 2)}% of tokens-to-target.",
    ]
    cal = state["calibration"]
    text = [
        "# Speedrun judge: time and tokens to the tuned ESM2 recipe's final validation loss",
        "",
        f"Target loss **{report['target']:.4f}** ({report['target_source']}).",
        "",
        "## Baseline tuning (ESM2 recipe: EsmForMaskedLM + transformers.Trainer)",
        "",
        markdown_table(base_rows, list(base_rows[0])) if base_rows else "(no ESM2 arm run)",
        "",
        "## Arms",
        "",
        markdown_table(arm_rows, list(arm_rows[0])),
        "",
        *(
            [
                "\\* Some runs were below the target at their first evaluation: their crossing lies before it and is "
                "not resolved (reported at that evaluation); use more --evals or a lower --target.",
                "",
            ]
            if any(_unresolved(a) for a in arms.values())
            else []
        ),
        *(
            [
                "† In the redraws of the target (the ESM2 arm's seeds) where some of this arm's resampled runs end "
                "above it, its tokens-to-target is unknown (beyond its end); those redraws reach the lower "
                "percentile, so the interval has no lower bound.",
                "",
            ]
            if any(a[f"speedup_{k}"] and a[f"speedup_{k}"]["unbounded"] for a in arms.values() for k in KEYS)
            else []
        ),
        "Speedup vs ESM2 = the ESM2 recipe's mean tokens (time) to the target / the arm's. The target is the tuned "
        "full-budget ESM2 arm's mean final loss; the ESM2 side is the best of that arm's own end and every ESM2 "
        "arm of any `budget=` share whose runs all reach the target (the same schedule fitting SpeedPLM arms get; "
        f"this time: {_setters(report)}). 95% interval: bootstrap over the seeds of both sides, the target redrawn "
        "with the ESM2 seeds, Hesterberg's expanded percentiles for few seeds (eval/speedrun/stats.py). "
        + (
            f"Every arm here was chosen before these runs ({report['fixed_on']}): the seeds are fresh."
            if report.get("fixed_on")
            else "Every number here was measured on the seeds it was selected on: the `claim` column says which were "
            "confirmed on fresh seeds (`--confirm ARM`)."
        ),
        "",
        *confirmation_markdown(report),
        "## Switches vs the control",
        "",
        markdown_table(switch_rows, list(switch_rows[0])) if switch_rows else "(no arm besides the control)",
        "",
        "Decision rule: a switch becomes a default only where tokens-to-target improves with Welch p < 0.01 and "
        "time-to-target does not get worse (higher with p < 0.05). An A/A arm repeats the control on other seeds: "
        "its interval must cover 0. Ratios vs the control are geometric-mean ratios with Welch 95% intervals on the "
        "logs; Δ loss at equal tokens / time is arm minus control at the largest horizon every run of both covers.",
        "",
        "## How well-conditioned the judge is",
        "",
        *conditioning,
        "",
        *([probes, ""] if probes else []),
        "## Runs",
        "",
        markdown_table(run_rows, list(run_rows[0])),
        "",
        f"Settings: shape `{s.shape}` ({SHAPES[s.shape]}), max length {s.max_length}, {s.tokens_per_step} tokens per "
        f"step, budget {s.budget_s:g} s ({state['steps']['speedplm']} SpeedPLM / {state['steps']['esm']} ESM2 "
        f"steps; step times measured once: SpeedPLM {cal['speedplm_step_s']:.3f} s, ESM2 {cal['esm_step_s']:.3f} "
        f"s), ~{s.evals} evaluations per run, {s.lanes} run(s) at a time with {s.threads or 'default'} torch "
        f"thread(s) each. Validation: {_proteins(state)} proteins of the valid split, mask rate {EVAL_MASK_RATE}, "
        f"seed {EVAL_SEED}, identical for every run.",
        "",
        f"Command: `{command}`",
        "",
        f"Hardware: {state['hardware']}",
        "",
    ]
    return "\n".join(text)


KEYS = ("tokens", "time")


def _setters(report: dict) -> str:
    setters = report.get("baseline_setters")
    if not setters:
        return "no ESM2 arm"
    return "; ".join(f"{k}: {v}" for k, v in setters.items())


def confirmation_markdown(report: dict) -> list[str]:
    """The `--confirm` section: fresh seeds, fresh target, next to what the selection said."""
    conf = report.get("confirmation")
    if not conf:
        return []
    rows = [
        {
            "arm": f"{name} (confirms {c['confirms']})",
            "seeds": seed_text(c["seeds"]),
            "reached": f"{c['tokens_reached']}/{c['runs']}",
            "tokens to target (M)": fmt(c["tokens_mean"] and c["tokens_mean"] / 1e6, 3),
            "speedup, tokens [95% CI]": speed_ci(c["speedup_tokens"]),
            "speedup, time [95% CI]": speed_ci(c["speedup_time"]),
            "selection said (tokens / time)": f"{speed_ci(c['selected_tokens'])} / {speed_ci(c['selected_time'])}",
            "holds": "yes" if c["holds"] else "NO",
            "selection inside the fresh interval": "yes" if c["consistent"] else "no",
        }
        for name, c in conf["arms"].items()
    ]
    esm = ", ".join(f"{n} ({seed_text(e['seeds'])}): {ci(e['loss'], 4, key='mean')}" for n, e in conf["esm2"].items())
    return [
        "## Confirmation on fresh seeds (`--confirm`)",
        "",
        f"Fresh target **{fmt(conf['target'], 4)}** (the confirming tuned ESM2 arm's mean final loss on its fresh "
        f"seeds); ESM2 confirmation runs: {esm or 'none yet'}.",
        "",
        markdown_table(rows, list(rows[0])) if rows else "(no SpeedPLM confirmation runs yet)",
        "",
        "A claim holds when every fresh run reaches the fresh target and both intervals lie above 1.",
        "",
    ]


def _unresolved(arm: dict) -> bool:
    return any(c["at_first_point"] for c in arm["crossings"])


def _covers(test: dict) -> bool:
    return test.get("low") is not None and test["low"] <= 0 <= test["high"]


def _proteins(state: dict) -> str:
    return f"{state['eval_proteins']:,}"


def plot(records: list[dict], report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    runs = current_runs(records)
    for i, (name, rs) in enumerate(runs.items()):
        for j, r in enumerate(rs):
            for ax, key, scale in [(axes[0], "time", 1.0), (axes[1], "tokens", 1e-6)]:
                ax.plot(
                    [p[key] * scale for p in r["points"]],
                    [p["loss"] for p in r["points"]],
                    lw=1.0,
                    color=f"C{i % 10}",
                    ls="--" if r["recipe"] == "esm2" else "-",
                    alpha=0.6,
                    label=name if j == 0 else None,
                )
    for ax in axes:
        ax.axhline(report["target"], color="k", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("training time (s, evaluation excluded)")
    axes[1].set_xlabel("tokens seen (millions, non-padding)")
    axes[0].set_ylabel("validation loss (15% masked, same positions)")
    axes[1].legend(fontsize=7, ncol=2)
    low = report["target"] - 0.15
    high = max(max(p["loss"] for p in r["points"][1:] or r["points"]) for rs in runs.values() for r in rs)
    axes[0].set_ylim(low, min(high, report["target"] + 0.6))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def random_init_twins(s: Settings, twin: Path) -> tuple[str, str]:
    """Model folders (weights, config, tokenizer) of an untrained SpeedPLM and ESM2 of the campaign's shape, seed 0:
    what the probes compare trained models against (embedding composition only)."""
    from modeling_speedplm import SpeedPLMForMaskedLM, build_tokenizer
    from training.publish.model_folder import write_model_folder

    torch.manual_seed(0)
    write_model_folder(SpeedPLMForMaskedLM(speedplm_config(s)), twin / "speedplm")  # weights + tokenizer, as a run
    esm_twin(speedplm_config(s)).save_pretrained(twin / "esm2")
    build_tokenizer(s.max_length).save_pretrained(twin / "esm2")
    return str(twin / "speedplm"), str(twin / "esm2")


def probed_arms(report: dict) -> list[str]:
    """The arms whose models the probes score: the control, the tuned baseline and every arm the judge keeps
    (a winning recipe must embed proteins at least as well as the baseline trained on the same budget)."""
    kept = [n for n, a in report["arms"].items() if a.get("decision", "").startswith("default") and not a.get("aa")]
    return [report["control"], *([report["baseline"]] if report["baseline"] else []), *kept]


def run_probes(s: Settings, records: list[dict], report: dict, out: Path, log=print) -> str:
    """eval.probes on the first-seed final models of `probed_arms` and on random-init twins; returns the markdown
    summary (best-layer accuracy per task; the models must beat their random-init twin)."""
    from eval import probes

    runs = current_runs(records)
    models = {}
    for name in probed_arms(report):
        first = runs[name][0]
        models[f"{name} ({'ESM2' if first['recipe'] == 'esm2' else 'SpeedPLM'}, seed {first['seed']})"] = first
    paths = {name: r["model_dir"] for name, r in models.items()}
    paths["random-init SpeedPLM"], paths["random-init ESM2"] = random_init_twins(s, out / "random-init")
    rows, tasks = probes.run(list(paths.values()), list(probes.TASKS), probes.ProbeOptions(max_per_task=2000), log=log)
    names = {v: k for k, v in paths.items()}
    for row in rows:
        row["model"] = names[row["model"]]
    probes.write_outputs(rows, tasks, out / "probes", "eval.speedrun --probes")
    table = []
    for name in paths:
        best = {t.name: max(r["accuracy"] for r in rows if r["model"] == name and r["task"] == t.name) for t in tasks}
        table.append(
            {"model": name, **{k: f"{v:.3f}" for k, v in best.items()}, "mean": f"{np.mean(list(best.values())):.3f}"}
        )
    n_test = ", ".join(f"{t.name} {len(t.test)}" for t in tasks)
    return "\n".join(
        [
            "## Embedding probes (best-layer held-out accuracy; eval.probes: logistic regression, mean-pooled states)",
            "",
            markdown_table(table, list(table[0])),
            "",
            f"Held-out proteins per task: {n_test} (binomial std of an accuracy near 0.75 on 400: ~0.022). "
            f"Full tables: probes/probes.md.",
            *twin_check({row["model"]: float(row["mean"]) for row in table}),
        ]
    )


def twin_check(means: dict[str, float]) -> list[str]:
    """Markdown lines flagging every trained model whose mean probe accuracy does not beat EVERY random-init twin
    (names starting 'random-init'): where one does not, the probes cannot tell trained from untrained here."""
    twins = {k: v for k, v in means.items() if k.startswith("random-init")}
    if not twins:
        return ["", "**No random-init twin was probed: these accuracies cannot be told from an untrained model's.**"]
    best = max(twins, key=twins.get)
    losers = [f"{k} {v:.3f}" for k, v in means.items() if k not in twins and v <= twins[best]]
    if not losers:
        return ["", f"Every trained model beats every random-init twin (best twin: {best} {twins[best]:.3f})."]
    return [
        "",
        f"**The probes do not tell trained from untrained here**: {', '.join(losers)} do(es) not beat the "
        f"random-init twin {best} ({twins[best]:.3f}). At this scale the probes read composition, not training.",
    ]


def run_quality(s: Settings, records: list[dict], report: dict, out: Path, options: "ReportOptions") -> str:
    """The quality yardsticks (eval.quality: variant effects, secondary structure, fold, contacts) on the first-seed
    final models of `probed_arms` and the random-init twins, in out/quality/; returns the markdown section, with
    quality_check's flags: a kept recipe that wins in loss but scores below the tuned baseline here is named."""
    from eval.quality.suite import YARDSTICKS, metric_values, run_yardsticks

    runs = current_runs(records)
    paths = {name: runs[name][0]["model_dir"] for name in probed_arms(report)}
    paths["random-init SpeedPLM"], paths["random-init ESM2"] = random_init_twins(s, out / "random-init")
    run_yardsticks(list(paths.values()), options.quality, out / "quality", YARDSTICKS, options.contacts_train_chains)
    label = {v: k for k, v in paths.items()}
    metrics = [
        (f"{y}: {m}", {label[k]: v for k, v in values.items()}) for y, m, values, *_ in metric_values(out / "quality")
    ]
    table = [{"metric": name, **{k: f"{v:.3f}" for k, v in values.items()}} for name, values in metrics]
    kept = [n for n in probed_arms(report) if n not in (report["control"], report["baseline"])]
    return "\n".join(
        [
            "## Quality yardsticks (eval.quality on each arm's seed-0 model; spread in quality/<yardstick>/)",
            "",
            markdown_table(table, ["metric", *paths]),
            *quality_check(metrics, kept, report["baseline"]),
        ]
    )


def quality_check(metrics: list[tuple[str, dict[str, float]]], kept: list[str], baseline: str | None) -> list[str]:
    """Markdown lines: per metric, the trained models that do not beat every random-init twin (the yardstick cannot
    tell them from untrained at this scale); per kept arm, the metrics where it scores below the tuned baseline (a
    recipe that wins in loss and loses here)."""
    lines = []
    for name, values in metrics:
        twins = [v for k, v in values.items() if k.startswith("random-init")]
        losers = [k for k, v in values.items() if not k.startswith("random-init") and twins and v <= max(twins)]
        if losers:
            lines.append(f"- {name}: {', '.join(losers)} do(es) not beat the best random-init twin ({max(twins):.3f})")
    for arm in kept:
        below = [f"{n} ({v[arm]:.3f} < {v[baseline]:.3f})" for n, v in metrics if baseline and v[arm] < v[baseline]]
        if below:
            lines.append(
                f"- **{arm} wins in loss but scores below the tuned baseline {baseline} on**: {'; '.join(below)}"
            )
    return ["", *lines] if lines else ["", "Every model beats every twin, and no kept arm scores below the baseline."]


@dataclass(frozen=True, kw_only=True)
class ReportOptions:
    """What a report compares: the control arm (--control), the target loss (--target; None: the tuned ESM2 arm's
    mean final loss); probes: also run eval.probes on the kept arms' models (--probes); quality: the prepared
    eval.quality data folder, to run the quality yardsticks on them too (--quality DATA)."""

    control: str = "control"
    target: float | None = None
    probes: bool = False
    quality: Path | None = None
    contacts_train_chains: int = 20  # structures the contact regression fits on (--quality-train-chains)
    fixed_on: str | None = None  # a confirmation campaign: where its arms were chosen (build_report)


def write_report(s: Settings, out: Path, command: str, options: ReportOptions = ReportOptions(), log=print):
    control, target, probes = options.control, options.target, options.probes
    records = load_records(out)
    if not (out / "campaign.json").exists():
        raise SpeedrunError(f"{out}: no campaign.json: nothing has run there yet")
    state = json.loads((out / "campaign.json").read_text())
    s = Settings(**{**asdict(s), **state["settings"]})  # a report describes the runs as they were made
    report = build_report(records, control, target, options.fixed_on)
    probe_text = run_probes(s, records, report, out, log) if probes else ""
    if not probes and (out / "probes" / "summary.md").exists():
        probe_text = (out / "probes" / "summary.md").read_text()
    if probes:
        (out / "probes" / "summary.md").write_text(probe_text)
    if options.quality is not None:
        (out / "quality").mkdir(exist_ok=True)
        (out / "quality" / "summary.md").write_text(run_quality(s, records, report, out, options))
    if (out / "quality" / "summary.md").exists():
        probe_text = "\n\n".join(t for t in (probe_text, (out / "quality" / "summary.md").read_text()) if t)
    text = report_markdown(report, state, s, command, probe_text)
    (out / "speedrun.md").write_text(text)
    (out / "speedrun.json").write_text(json.dumps(dict(report=report, campaign=state, command=command), indent=1))
    plot(records, report, out / "speedrun.png")
    log(text)
    return report
