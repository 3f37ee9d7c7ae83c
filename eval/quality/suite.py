"""The whole quality suite on a checkpoint, in one table, each yardstick beside the checkpoint's random-init twin and
a trivial baseline:

    python -m eval.quality fetch [--data data/quality]          # the pinned packages -> prepared sets (once)
    python -m eval.quality sequences --out eval-proteins.fasta  # every protein the yardsticks use (corpus --exclude)
    python -m eval.quality run --model CKPT --out DIR [--twin auto|none|DIR] [--only zeroshot ss fold contacts]
    python -m eval.quality compare DIR [DIR ...] [--names A B ...] --out TABLE.md [--curves RUN ...]  # one table

`run` calls each yardstick's own command (eval.zeroshot, eval.quality.secondary_structure, .fold, .contacts) with
DIR/<yardstick> as its output folder (its detailed table, CSV and stamp stay there), then reads their CSVs into
DIR/quality.md and DIR/quality.csv: one row per yardstick and metric, columns model / twin / baselines. A yardstick
that cannot tell the model from its twin shows it here rather than hiding it (the `model - twin` column).

The twin (`--twin auto`): the checkpoint's own config, weights drawn fresh (seed 0), saved with its tokenizer into
DIR/twin. SpeedPLM's initialisation zeroes every residual output projection, so its twin's per-residue features
depend on the residue letter only: the one-hot / composition baselines are its equals, not a weak floor.
"""

import argparse
import csv
import shlex
import sys
import time
from pathlib import Path

from eval.tables import markdown_table, stamp

YARDSTICKS = ("zeroshot", "ss", "fold", "contacts")
DATA = {"zeroshot": "dms", "ss": "sidechainnet", "fold": "sidechainnet", "contacts": "promod3"}


class QualityError(Exception):
    """A bad request: missing prepared data, a model that cannot be loaded; the message names it."""


# ---------------------------------------------------------------------------------------------------- data


def fetch(data: Path) -> None:
    """Each yardstick's documented fetch (package registries only, versions and sha256 pinned)."""
    from eval.quality import contacts_data, dms, structure_data

    steps = [
        (dms.main, ["fetch", "--out", str(data / "dms")]),
        (structure_data.main, ["fetch", "--out", str(data / "sidechainnet")]),
        (contacts_data.main, ["fetch", "--out", str(data / "promod3")]),
    ]
    for main, argv in steps:
        if main(argv) != 0:
            raise QualityError(f"{main.__module__} {shlex.join(argv)} failed")


def sequences(data: Path) -> dict[str, str]:
    """id -> sequence of every protein the yardsticks train probes on or score (all splits): what a pretraining
    corpus must not hold (`python -m training.data.corpora swissprot --exclude FASTA`)."""
    from eval.quality.contacts_data import load_prepared
    from eval.quality.dms import prepared_files
    from eval.quality.structure_data import load
    from eval.zeroshot import read_dms

    found = {}
    for path in prepared_files(data / "dms"):
        found[f"dms|{Path(path).stem}|wt"] = read_dms(path).wt
    for name in ("ss_subset.jsonl", "fold_subset.jsonl"):
        for row in load(data / "sidechainnet", name):
            found[f"{name.split('_')[0]}|{row.id}|{row.split}"] = row.sequence
    chains, _ = load_prepared(data / "promod3")
    for i, (cid, seq) in enumerate(zip(chains.ids, chains.sequences)):
        found[f"contacts|{cid}|{'test' if chains.split[i] else 'train'}"] = seq
    return found


# ---------------------------------------------------------------------------------------------------- models


def make_twin(checkpoint: str, out: Path) -> str:
    """A model folder with the checkpoint's config and tokenizer and freshly initialised weights (seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(config, trust_remote_code=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True).save_pretrained(out)
    return str(out)


# ---------------------------------------------------------------------------------------------------- running


def _commands(models: list[str], data: Path, train_chains: int) -> dict:
    """Yardstick -> (its main, its argv): the same command a user would type, one output folder each."""
    from eval import zeroshot
    from eval.quality import contacts, fold, secondary_structure

    model_args = ["--model", *models]  # one flag, every model: each yardstick CLI takes nargs="+"
    return {
        "zeroshot": (zeroshot.main, [*model_args, "--builtin", "--builtin-dir", str(data / "dms")]),
        "ss": (secondary_structure.main, [*model_args, "--data", str(data / "sidechainnet")]),
        "fold": (fold.main, [*model_args, "--data", str(data / "sidechainnet")]),
        "contacts": (
            contacts.main,
            [*model_args, "--data", str(data / "promod3"), "--train-chains", str(train_chains)],
        ),
    }


def check_data(data: Path, only: tuple = YARDSTICKS) -> None:
    """QualityError naming every yardstick whose prepared data is missing under `data`, and the fix."""
    missing = [f"{data / DATA[y]} (for {y})" for y in only if not (data / DATA[y] / "manifest.json").exists()]
    if missing:
        raise QualityError(f"not prepared: {', '.join(missing)}; run `python -m eval.quality fetch --data {data}`")


def run_yardsticks(models: list[str], data: Path, out: Path, only: tuple, train_chains: int = 20) -> dict[str, float]:
    """Run the chosen yardsticks; returns their wall seconds. Every one's data is checked before any starts."""
    check_data(data, only)
    seconds = {}
    for name, (main, argv) in _commands(models, data, train_chains).items():
        if name not in only:
            continue
        start = time.perf_counter()
        argv = [*argv, "--out", str(out / name)]
        print(f"eval.quality: {name}: {shlex.join(argv)}", file=sys.stderr)
        if main(argv) != 0:
            raise QualityError(f"{name} failed ({main.__module__} {shlex.join(argv)})")
        seconds[name] = round(time.perf_counter() - start, 1)
    return seconds


# ---------------------------------------------------------------------------------------------------- summary


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def metric_values(out: Path) -> list[tuple[str, str, dict[str, float], str, dict[str, float]]]:
    """(yardstick, metric, {model: value}, baselines text, {model: std over probe seeds}) for every metric the
    yardsticks wrote under `out` (one home of reading their CSVs: the suite's summary, `compare` and the recipe
    judge's quality table use it). Zero-shot Spearman has no probe and no spread ({})."""
    found = []
    if (out / "zeroshot" / "zeroshot.csv").exists():
        table = _read(out / "zeroshot" / "zeroshot.csv")
        for assay in dict.fromkeys(r["assay"] for r in table):
            values = {r["model"]: float(r["spearman"]) for r in table if r["assay"] == assay}
            found.append(("variant effects (DMS)", f"Spearman, {assay}", values, "—", {}))
    for name, csv_name, yardstick in (
        ("ss", "secondary_structure.csv", "secondary structure"),
        ("fold", "fold.csv", "fold"),
    ):
        if not (out / name / csv_name).exists():
            continue
        table = _read(out / name / csv_name)
        for metric in dict.fromkeys(r["metric"] for r in table):
            picked = [r for r in table if r["metric"] == metric]
            values = {r["model"]: float(r["mean"]) for r in picked if r["model"] != "baseline"}
            spread = {r["model"]: float(r["std"]) for r in picked if r["model"] != "baseline"}
            base = "; ".join(f"{r['features']} {float(r['mean']):.3f}" for r in picked if r["model"] == "baseline")
            found.append((yardstick, f"{metric} ({picked[-1]['features']})", values, base, spread))
    if (out / "contacts" / "contacts.csv").exists():
        table = [r for r in _read(out / "contacts" / "contacts.csv") if r["range"] == "long"]
        for metric in ("P@L", "P@L/5"):
            values = {r["model"]: float(r[f"{metric} mean"]) for r in table if r["method"].startswith("attention")}
            spread = {r["model"]: float(r[f"{metric} std"]) for r in table if r["method"].startswith("attention")}
            base = "; ".join(
                f"{r['method']} {float(r[f'{metric} mean']):.3f}"
                for r in table
                if not r["method"].startswith("attention")
            )
            found.append(("contacts (long range)", metric, values, base, spread))
    return found


def summary_rows(out: Path, model: str, twin: str | None) -> list[dict]:
    """One row per yardstick x metric: model, twin, baselines, model - twin, and the model's and twin's std over probe
    seeds (empty for zero-shot) (from each yardstick's CSV)."""
    rows = []
    for yardstick, metric, values, baselines, spread in metric_values(out):
        m, t = values.get(model), values.get(twin) if twin else None
        diff = m - t if m is not None and t is not None else None
        row = dict(yardstick=yardstick, metric=metric, model=m, twin=t, baselines=baselines, diff=diff)
        rows.append({**row, "model_std": spread.get(model), "twin_std": spread.get(twin) if twin else None})
    return rows


def pm(mean, std) -> str:
    """'0.6123 ± 0.0040' (std over probe seeds), or the mean alone where there is no spread; '' for no value."""
    if mean is None or mean == "":
        return ""
    return f"{float(mean):.4f} ± {float(std):.4f}" if std not in (None, "") else f"{float(mean):.4f}"


def write_summary(out: Path, rows: list[dict], seconds: dict, command: str) -> str:
    with open(out / "quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    shown = [
        {**r, "model": pm(r["model"], r["model_std"]), "twin": pm(r["twin"], r["twin_std"]), "model - twin": r["diff"]}
        for r in rows
    ]
    text = "\n".join(
        [
            "# Quality yardsticks",
            "",
            markdown_table(shown, ["yardstick", "metric", "model", "twin", "model - twin", "baselines"]),
            "",
            "Each yardstick's own table (spread over probe seeds, data, method) is in its folder beside this file. "
            f"Wall seconds: {', '.join(f'{k} {v}' for k, v in seconds.items())}.",
            "",
            *stamp(command),
        ]
    )
    (out / "quality.md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------------------- CLI


def compare(runs: list[Path], names: list[str]) -> list[dict]:
    """One row per yardstick x metric over several `run` folders (their quality.csv): each run's model, then the
    twin (of the runs that scored one: they must agree, i.e. share the model config) and the first run's baselines."""
    tables = [_read(run / "quality.csv") for run in runs]
    keys = [[(r["yardstick"], r["metric"]) for r in t] for t in tables]
    if any(k != keys[0] for k in keys[1:]):
        raise QualityError(
            f"{', '.join(map(str, runs))}: not the same yardsticks and metrics (run them with the same --only)"
        )
    twins = [[r["twin"] for r in t] for t in tables if any(r["twin"] for r in t)]  # --twin none: no twin scored
    if any(t != twins[0] for t in twins[1:]):
        raise QualityError(
            "the runs' twins score differently: their models have different configs (compare like with like)"
        )
    rows = []
    for i, (yardstick, metric) in enumerate(keys[0]):
        row = dict(yardstick=yardstick, metric=metric)
        row.update({name: pm(t[i]["model"], t[i].get("model_std")) for name, t in zip(names, tables)})
        with_twin = next((t for t in tables if t[i]["twin"]), None)
        twin = pm(with_twin[i]["twin"], with_twin[i].get("twin_std")) if with_twin else ""
        row.update(twin=twin, baselines=tables[0][i]["baselines"])
        rows.append(row)
    return rows


def plot_curves(runs: list[Path], names: list[str], path: Path) -> None:
    """The validation loss of each training run (its metrics.jsonl) against tokens seen, one line per run."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run, name in zip(runs, names):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        valid = [r for r in rows if r.get("split") == "valid"]
        if not valid:
            raise QualityError(f"{run / 'metrics.jsonl'}: no validation rows to plot")
        ax.plot([r["tokens"] / 1e6 for r in valid], [r["loss"] for r in valid], marker="o", label=name)
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("validation loss (each run's own valid split)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.quality", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download and prepare every yardstick's data (package registries, pinned)")
    f.add_argument("--data", default="data/quality", type=Path)
    s = sub.add_parser("sequences", help="write every protein the yardsticks use as FASTA")
    s.add_argument("--data", default="data/quality", type=Path)
    s.add_argument("--out", required=True, type=Path)
    r = sub.add_parser("run", help="run the suite on a checkpoint and its random-init twin")
    r.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--data", default="data/quality", type=Path)
    r.add_argument("--twin", default="auto", help="auto (build it), none, or a model folder")
    r.add_argument("--only", nargs="+", choices=YARDSTICKS, default=list(YARDSTICKS))
    r.add_argument("--contacts-train-chains", type=int, default=20, help="structures the contact regression fits on")
    c = sub.add_parser("compare", help="one table over several `run` folders of models of one config")
    c.add_argument("runs", nargs="+", type=Path, help="output folders of `run`")
    c.add_argument("--names", nargs="+", help="a column name per run (default: the folder names)")
    c.add_argument("--out", required=True, type=Path, help="markdown file")
    c.add_argument(
        "--curves", nargs="+", type=Path, help="the runs' training folders: their validation curves, OUT.png"
    )
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "fetch":
            fetch(args.data)
            return 0
        if args.command == "sequences":
            found = sequences(args.data)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("".join(f">{k}\n{v}\n" for k, v in found.items()))
            print(f"wrote {len(found)} proteins ({len(set(found.values()))} distinct) to {args.out}")
            return 0
        if args.command == "compare":
            names = args.names or [run.name for run in args.runs]
            if len(names) != len(args.runs):
                raise QualityError(f"--names: {len(names)} names for {len(args.runs)} runs")
            rows = compare(args.runs, names)
            if args.curves and len(args.curves) != len(names):
                raise QualityError(f"--curves: {len(args.curves)} training folders for {len(names)} runs")
            table = markdown_table(rows, ["yardstick", "metric", *names, "twin", "baselines"])
            if args.curves:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                plot_curves(args.curves, names, args.out.with_suffix(".png"))
                table += f"\n\nValidation loss curves: {args.out.with_suffix('.png').name}"
            text = "\n".join([table, "", *stamp("python -m eval.quality " + shlex.join(argv))])
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
            print(text)
            return 0
        args.out.mkdir(parents=True, exist_ok=True)
        twin = None if args.twin == "none" else args.twin
        if twin == "auto":
            twin = make_twin(args.model, args.out / "twin")
        models = [args.model, *([twin] if twin else [])]
        seconds = run_yardsticks(models, args.data, args.out, tuple(args.only), args.contacts_train_chains)
        rows = summary_rows(args.out, args.model, twin)
        print(write_summary(args.out, rows, seconds, "python -m eval.quality " + shlex.join(argv)))
        return 0
    except QualityError as err:
        print(f"eval.quality: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
