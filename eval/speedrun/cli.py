"""The judge's command line: `python -m eval.speedrun ...` (see eval/speedrun/campaign.py for what it runs).

The CLI sits above both halves of the judge, the campaign (runs) and the report (tables), so neither imports the
other's caller: campaign <- report <- cli.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

from eval.checkpoints import EvalError
from eval.quality.suite import QualityError, check_data
from eval.speedrun.campaign import (
    CONFIRM_SEEDS,
    MODES,
    SHAPES,
    Arm,
    Settings,
    SpeedrunError,
    check_arm,
    confirmation_arms,
    load_records,
    parse_variant,
    run_campaign,
    run_one,
)
from eval.speedrun.campaign import __doc__ as campaign_doc
from eval.speedrun.report import ReportNotReady, ReportOptions, write_report


def load_campaign(path: str) -> tuple[dict, list[Arm], str | None, str | None]:
    """A campaign file: {settings: {...}, control: NAME, arms: [{name, recipe?, overrides?: [...], seeds?}],
    fixed_on: TEXT?} -> (settings, arms, control, fixed_on). `fixed_on` says where every arm's definition was chosen
    before these runs (a confirmation campaign on fresh seeds): the report labels its numbers with it."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SpeedrunError(f"--campaign {path}: {err}") from None
    unknown = set(raw) - {"settings", "control", "arms", "fixed_on"}
    if unknown or not isinstance(raw.get("arms"), list):
        raise SpeedrunError(
            f"--campaign {path}: needs 'arms' (a list), optional 'settings', 'control', 'fixed_on'; got {sorted(raw)}"
        )
    arms = []
    for i, item in enumerate(raw["arms"]):
        if not isinstance(item, dict) or "name" not in item or set(item) - {"name", "recipe", "overrides", "seeds"}:
            raise SpeedrunError(f"--campaign {path}: arms[{i}]: keys name, recipe, overrides, seeds; got {item!r}")
        arms.append(
            Arm(str(item["name"]), item.get("recipe", "speedplm"), list(item.get("overrides") or []), item.get("seeds"))
        )
    fixed_on = raw.get("fixed_on")
    return raw.get("settings") or {}, arms, raw.get("control"), str(fixed_on) if fixed_on else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m eval.speedrun",
        description=campaign_doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=campaign_doc,
    )
    p.add_argument("--out", required=True, metavar="DIR", help="campaign directory (results.jsonl, reports)")
    p.add_argument("--variant", nargs="+", action="append", metavar="NAME key=value", help="add an arm (repeatable)")
    p.add_argument("--campaign", metavar="FILE", help="YAML with settings, control and arms")
    p.add_argument("--control", help="the SpeedPLM arm the switches are compared with (default: control)")
    p.add_argument("--target", type=float, help="target validation loss (default: the tuned ESM2 mean final loss)")
    p.add_argument("--report", action="store_true", help="only rebuild the report from results.jsonl")
    p.add_argument("--probes", action="store_true", help="also probe the control's and the baseline's models")
    p.add_argument(
        "--quality",
        metavar="DATA",
        type=Path,
        help="also run the quality yardsticks (eval.quality; DATA from `python -m eval.quality fetch`, e.g. "
        "data/quality) on the models the judge keeps, the control, the baseline and random-init twins",
    )
    p.add_argument("--quality-train-chains", type=int, default=20, help="structures the contact regression fits on")
    p.add_argument(
        "--confirm",
        nargs="+",
        metavar="ARM",
        help="run these kept SpeedPLM arms and the ESM2 baseline again on fresh seeds (--confirm-seeds) and report "
        "the confirmation apart from the selection (the same settings as the campaign; nothing else runs)",
    )
    p.add_argument("--confirm-seeds", type=int, nargs="+", default=CONFIRM_SEEDS, help="default 5 6 7 8 9")
    p.add_argument("--short", action="store_true", help="tiny models, 1 seed, a few seconds per run (tests)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds of every arm without its own (default 0 1 2 3 4)")
    p.add_argument("--budget-s", type=float, help="training seconds per run (default 300; --short 5)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default small; --short tiny)")
    p.add_argument("--max-length", type=int, help="tokens per row / protein (default 256; --short 128)")
    p.add_argument("--tokens-per-step", type=int, help="SpeedPLM batch in tokens; ESM2 gets as many real tokens")
    p.add_argument("--evals", type=int, help="validation points per run (default 16; --short 4)")
    p.add_argument("--eval-max-tokens", type=int, help="real tokens of the valid split scored (default: all)")
    p.add_argument("--lanes", type=int, help="runs at a time, each its own process (default 2; --short 1)")
    p.add_argument("--threads", type=int, help="torch threads per run (default 1)")
    p.add_argument("--data", default="builtin", help="'builtin' or a directory with prepared train/ and valid/")
    p.add_argument("--cache", default="data", help="where --data builtin is prepared once")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one run, arm as JSON
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if args.worker:
            run_one(Settings(**json.loads(args.settings)), out, Arm(**json.loads(args.worker)), args.seed)
            return 0
        mode = dict(MODES["short" if args.short else "full"])
        file_settings, arms, file_control, fixed_on = (
            load_campaign(args.campaign) if args.campaign else ({}, [], None, None)
        )
        unknown = set(file_settings) - set(mode)
        if unknown:
            raise SpeedrunError(
                f"--campaign {args.campaign}: unknown settings {sorted(unknown)}; valid: {sorted(mode)}"
            )
        mode.update(file_settings)
        for key in mode:
            if getattr(args, key, None) is not None:
                mode[key] = getattr(args, key)
        s = Settings(**mode, data=args.data, cache=args.cache, calibration_steps=2 if args.short else 8)
        if s.shape not in SHAPES:
            raise SpeedrunError(f"shape {s.shape!r}: choose one of {sorted(SHAPES)}")
        arms += [parse_variant(v) for v in args.variant or []]
        if args.confirm:  # only the confirmation arms run: the campaign's own arms were the selection
            arms = confirmation_arms(load_records(out), args.confirm, args.confirm_seeds)
        if not arms and not args.report:
            arms = [Arm("esm2", "esm2"), Arm("control")]
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise SpeedrunError(f"arm names must be unique, got {names}")
        for arm in arms:
            check_arm(arm, s)
        if args.quality is not None:  # before hours of runs, not after them
            try:
                check_data(args.quality)
            except QualityError as err:
                raise SpeedrunError(f"--quality {args.quality}: {err}") from None
        control = args.control or file_control or "control"
        command = "python -m eval.speedrun " + shlex.join(argv)
        ok = True
        if arms and not args.report:
            ok = run_campaign(s, arms, out)
        try:
            options = ReportOptions(
                control=control,
                target=args.target,
                probes=args.probes,
                quality=args.quality,
                contacts_train_chains=args.quality_train_chains,
                fixed_on=fixed_on,
            )
            write_report(s, out, command, options)
        except ReportNotReady as why:
            if args.report:
                raise
            print(f"eval.speedrun: no report yet: {why}")
        return 0 if ok else 1
    except (SpeedrunError, EvalError, QualityError, ValueError) as err:
        print(f"eval.speedrun: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
