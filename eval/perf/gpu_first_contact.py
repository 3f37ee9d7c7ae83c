"""GPU first contact: one prepared command for a fresh H100/H200 without network that returns a trustworthy table
and a real training run in <= 540 s, and keeps whatever finished if something breaks.

    python -m eval.perf.gpu_first_contact OUT_DIR                      # CUDA node; data/builtin prepared and carried
    python -m eval.perf.gpu_first_contact OUT_DIR --dry-run            # the same parts on CPU: tiny shapes, interpreter
    python -m eval.perf.gpu_first_contact OUT_DIR --budget a=45,b=60,c=240,d=120,e=60 --total 540 --parts a,b,c,d

Parts, by priority, each in its own subprocess (own process group, hard timeout = its budget, never more than the
time left of --total); a part over its budget is killed and reported, and the next part runs:
  a  pre-flight: versions, GPU name / SMs / clocks / power limit (torch + nvidia-smi), an import check of exactly what
     the later parts import, the data folder, a compiled flex forward+backward on mixed-dtype inputs, and the model's
     attention inputs under bf16 autocast (one dtype, issue #23)
  b  kernel parity: eval.perf.gpu_benchmark's parity section (every Triton kernel and its torch twin vs fp64)
  c  the trainer's real step for speedrun-133m: training.trainer.Trainer built from configs/speedrun-133m.yaml with
     overrides, its own train_step on its own loader's batches (collator, accumulation, sparse LM head, optimizers
     once per step), one subprocess per kernel setting: torch, triton (all), then each kernel alone
  d  a short real training run: `python train_accelerate.py` (bf16, compile on, tracking off, ~30 steps), its
     metrics.jsonl copied here
  e  gpu_benchmark's micro-benchmarks (per-kernel time, Newton-Schulz, attention) while time is left
OUT_DIR gets <part>.md (+ .json) the moment a part (or one variant of c) finishes, logs/<part>.log, and summary.md,
rewritten after every part: what ran, what failed with its error tail, what was skipped for time, and the decision
table (which kernels pay end to end -> what AUTO_KERNELS / model.kernels should be; whether FP8 pays).
Needs only torch, triton, transformers, accelerate, PyYAML, numpy, tqdm, safetensors (no wandb, datasets, evaluate,
aaanalysis or scikit-learn). Big files (checkpoints) go to --work, never to OUT_DIR.
"""

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "speedrun-133m.yaml"
RECIPE_TOKENS_PER_STEP = 524_288  # configs/speedrun-133m.yaml: 8 micro-batches of 64 x 1024 (SpeedrunningPLMs)
PARTS = {
    "a": "pre-flight: versions, GPU, imports, compiled flex fwd+bwd with mixed dtypes",
    "b": "kernel parity vs fp64 (gpu_benchmark)",
    "c": "trainer's real step, speedrun-133m, per kernel setting",
    "d": "short real training run (train_accelerate.py)",
    "e": "micro-benchmarks (gpu_benchmark)",
}
DEFAULT_BUDGET = {"a": 60, "b": 60, "c": 240, "d": 120, "e": 60}  # e gets what --total leaves
# The decision needs each kernel alone against torch first; newton_schulz leaves the model graph as torch compiled it
# (inductor's on-disk cache hits); "triton" (all on) last.
# kernel settings of part c; "+fp8" adds model.fp8=mlp (the MLP projections in FP8) to a setting
VARIANTS = ("torch", "torch+fp8", "linear_relu2", "newton_schulz", "qk_norm_rotary", "triton")
KERNELS = ("linear_relu2", "qk_norm_rotary", "newton_schulz")  # configuration_speedplm.TRITON_KERNELS (no torch here)
PAYS = 1.02  # a kernel "pays" at >= 2% more tokens/s than kernels=torch in the same run (and parity ok)
MIN_PART_S = 5.0
# Optional packages the first contact must not need (issue #23): reported by pre-flight, never imported.
NOT_NEEDED = ("wandb", "datasets", "evaluate", "aaanalysis", "sklearn", "torchao")
# What parts b-e import; pre-flight imports exactly these.
NEEDED_MODULES = (
    "torch",
    "triton",
    "transformers",
    "accelerate",
    "yaml",
    "numpy",
    "tqdm",
    "safetensors",
    "torch.nn.attention.flex_attention",
    "modeling_speedplm",
    "modeling_speedplm.kernels_speedplm",
    "training.config",
    "training.trainer",
    "training.data_setup",
    "train_accelerate",
    "eval.tables",
    "eval.perf.gpu_benchmark",
)
DRY_MODEL = [
    "model.hidden_size=32",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.mlp_ratio=2.0",
    "model.value_embeddings=1",
    "model.max_position_embeddings=128",
    "data.max_length=64",
    "data.num_workers=0",
    "train.micro_batch_tokens=64",
    "train.compile=false",
    "optim.muon_ns_steps=1",  # Newton-Schulz in the interpreter is the slow part; the rehearsal needs the path only
]
# off, FP8 (the twin), a model kernel, the optimizer kernel (qk: slow here)
DRY_VARIANTS = ("torch", "torch+fp8", "linear_relu2", "newton_schulz")


def parse_budget(text: str) -> dict[str, float]:
    budget = dict(DEFAULT_BUDGET)
    for item in filter(None, (text or "").split(",")):
        name, _, seconds = item.partition("=")
        if name.strip() not in PARTS or not seconds:
            raise argparse.ArgumentTypeError(f"--budget {item!r}: use part=seconds with parts {list(PARTS)}")
        budget[name.strip()] = float(seconds)
    return budget


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (small files only: tables, logs, metrics.jsonl)")
    parser.add_argument("--dry-run", action="store_true", help="CPU allowed: tiny shapes, Triton interpreter")
    parser.add_argument("--budget", type=parse_budget, default=dict(DEFAULT_BUDGET), help="part=seconds,...")
    parser.add_argument("--total", type=float, default=540.0, help="seconds for the whole command")
    parser.add_argument("--parts", default="a,b,c,d,e", help="which parts, comma-separated")
    parser.add_argument("--variants", default=None, help="part c: kernel settings, in order (default: all)")
    parser.add_argument("--data", default="data/builtin", help="prepared built-in proteins (DIR/train, valid, test)")
    parser.add_argument("--work", type=Path, default=None, help="scratch for run dirs (default: $TMPDIR/speedplm_fc)")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="parts c, d (default 131072; dry 128)")
    parser.add_argument("--steps", type=int, default=None, help="part c: timed steps per variant (default 5; dry 1)")
    parser.add_argument("--train-steps", type=int, default=None, help="part d: steps (default 30; dry 4)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU peak override (train.peak_tflops)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    args.variants = [v for v in (args.variants or ",".join(DRY_VARIANTS if args.dry_run else VARIANTS)).split(",") if v]
    args.tokens_per_step = args.tokens_per_step or (128 if args.dry_run else 131_072)
    args.steps = args.steps or (1 if args.dry_run else 5)
    args.train_steps = args.train_steps or (4 if args.dry_run else 30)
    args.work = args.work or Path(tempfile.gettempdir()) / "speedplm_first_contact"
    return args


# ------------------------------------------------------------------------------------------------ small helpers


def md_table(headers, rows) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut by a kill
            rows.append(json.loads(line))
    return rows


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def child_env(cuda: bool) -> dict:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        # bf16 on CUDA (the trainer refuses fp32 there); fp32 on CPU, where bf16 is ~19x slower
        "ACCELERATE_MIXED_PRECISION": "bf16" if cuda else "no",
    }
    if not cuda:
        env["TRITON_INTERPRET"] = "1"  # before anything imports triton
    return env


def _cuda_available() -> bool:
    # The parent never imports torch (a broken CUDA stack must not take the orchestrator down): ask a child.
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(int(torch.cuda.is_available()))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return probe.stdout.strip().endswith("1")


# ------------------------------------------------------------------------------------------------ the parent


class Runner:
    """Starts each part as a child with a hard timeout and keeps summary.md current."""

    def __init__(self, args, argv):
        self.args, self.argv = args, argv
        self.start = time.monotonic()
        self.records: list[dict] = []  # one per part or variant: name, status, seconds, budget, note
        self.out = args.out
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        args.work.mkdir(parents=True, exist_ok=True)
        self.cuda = _cuda_available()
        self.env = child_env(self.cuda)

    def left(self) -> float:
        return self.args.total - (time.monotonic() - self.start)

    def run(self, name: str, cmd: list[str], limit: float) -> dict:
        """Run cmd with a hard timeout; the whole process group is SIGKILLed past it."""
        log = self.out / "logs" / f"{name}.log"
        t0 = time.monotonic()
        with open(log, "w") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=limit)
                killed = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc, killed = proc.wait(), True
        seconds = time.monotonic() - t0
        with contextlib.suppress(ProcessLookupError):  # leftovers (loader workers) must not hold the GPU
            os.killpg(proc.pid, signal.SIGKILL)
        if killed:
            status = f"KILLED: over its budget of {limit:.0f} s"
        elif rc == 0:
            status = "ok"
        elif rc < 0:
            status = f"CRASHED: signal {-rc} ({signal.Signals(-rc).name})"
        else:
            status = f"FAILED: exit {rc}"
        record = {"name": name, "status": status, "seconds": round(seconds, 1), "budget": round(limit), "log": log}
        self.records.append(record)
        return record

    def skip(self, name: str, why: str) -> None:
        self.records.append({"name": name, "status": f"SKIPPED: {why}", "seconds": 0, "budget": 0, "log": None})

    def child_cmd(self, part: str, variant: str | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "eval.perf.gpu_first_contact", str(self.out), "--child", part]
        cmd += ["--data", self.args.data, "--work", str(self.args.work)]
        cmd += ["--tokens-per-step", str(self.args.tokens_per_step), "--steps", str(self.args.steps)]
        if self.args.dry_run:
            cmd.append("--dry-run")
        if self.args.peak_tflops:
            cmd += ["--peak-tflops", str(self.args.peak_tflops)]
        if variant:
            cmd += ["--variant", variant]
        return cmd

    def main(self) -> int:
        if not self.cuda and not self.args.dry_run:
            print("no CUDA device: run with --dry-run for the CPU rehearsal", file=sys.stderr)
            return 2
        for part in PARTS:
            if part not in self.args.parts:
                continue
            budget = self.args.budget[part]
            if part == "c":
                self.part_c(budget)
            else:
                limit = min(budget, self.left() - 1)
                if limit < min(MIN_PART_S, budget):
                    self.skip(part, f"no time left ({self.left():.0f} s of --total {self.args.total:.0f})")
                else:
                    cmd = self.train_cmd() if part == "d" else self.child_cmd(part)
                    self.run(part, cmd, limit)
                    if part == "d":
                        self.collect_d()
            self.write_summary()
            print(f"[{time.monotonic() - self.start:6.1f}s] part {part}: {self.records[-1]['status']}", flush=True)
        self.write_summary(final=True)
        print((self.out / "summary.md").read_text(), flush=True)
        bad = [r for r in self.records if not r["status"].startswith(("ok", "SKIPPED"))]
        return 1 if bad else 0

    def part_c(self, budget: float) -> None:
        deadline = time.monotonic() + min(budget, self.left() - 1)
        for variant in self.args.variants:
            limit = deadline - time.monotonic()
            name = f"c-{variant}"
            if limit < min(MIN_PART_S, 0.9 * budget):
                self.skip(name, "part c's budget spent")
                continue
            self.run(name, self.child_cmd("c", variant), limit)
            self.write_summary()

    # ---- part d: the real entry point ----

    def train_dir(self) -> Path:
        return self.args.work / "d" / "smoke"

    def train_cmd(self) -> list[str]:
        a = self.args
        shutil.rmtree(self.train_dir(), ignore_errors=True)
        overrides = [
            f"data.train={a.data}",
            f"train.output_dir={a.work / 'd'}",
            "train.run_name=smoke",
            f"train.max_steps={a.train_steps}",
            f"train.log_every={max(1, a.train_steps // 6)}",
            "train.save_every=0",
            f"train.tokens_per_step={a.tokens_per_step}",
            "eval.every=0",
            f"eval.max_tokens={512 if a.dry_run else 100_000}",
            "tracking.wandb=disabled",
        ]
        overrides += DRY_MODEL if a.dry_run else ["train.compile=true"]
        if a.peak_tflops:
            overrides.append(f"train.peak_tflops={a.peak_tflops}")
        return [sys.executable, "train_accelerate.py", "--config", str(RECIPE), *overrides]

    def collect_d(self) -> None:
        run = self.train_dir()
        dest = self.out / "d"
        dest.mkdir(exist_ok=True)
        for name in ("metrics.jsonl", "config.yaml"):
            if (run / name).exists():
                shutil.copy(run / name, dest / name)
        rows = read_jsonl(dest / "metrics.jsonl")
        train = [r for r in rows if "split" not in r]
        evals = [r for r in rows if "split" in r]
        text = ["## d. Short real training run (train_accelerate.py, speedrun-133m recipe, built-in proteins)\n"]
        text.append(f"`{' '.join(self.train_cmd_text())}`\n")
        text.append(
            md_table(
                ["step", "tokens", "loss", "grad norm", "tokens/s", "MFU", "data wait", "lr"],
                [
                    [
                        r["step"],
                        f"{r['tokens']:,}",
                        f"{r['loss']:.4f}",
                        f"{r['grad_norm']:.3g}",
                        f"{r['tokens_per_s']:,.0f}",
                        "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
                        f"{100 * r['data_wait']:.1f}%",
                        f"{r['lr']:.3g}",
                    ]
                    for r in train
                ],
            )
        )
        if evals:
            text.append(
                "\n"
                + md_table(
                    ["step", "split", "loss", "perplexity", "accuracy"],
                    [
                        [r["step"], r["split"], f"{r['loss']:.4f}", f"{r['perplexity']:.3f}", f"{r['accuracy']:.4f}"]
                        for r in evals
                    ],
                )
            )
        if not rows:
            text.append("\n(no metrics rows: see logs/d.log)\n")
        write_atomic(self.out / "d.md", "\n".join(text))

    def train_cmd_text(self) -> list[str]:
        cmd = self.train_cmd()
        return ["python", *cmd[1:]]

    # ---- summary ----

    def write_summary(self, final: bool = False) -> None:
        a = self.args
        pre = read_json(self.out / "a.json") or {}
        device = pre.get("device", {}).get("name", "?")
        lines = [
            f"# speedplm GPU first contact{' (DRY RUN: CPU, tiny shapes, Triton interpreter)' if a.dry_run else ''}",
            "",
            f"device: {device}; torch {pre.get('versions', {}).get('torch', '?')}; "
            f"triton {pre.get('versions', {}).get('triton', '?')}; "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
            f"{time.monotonic() - self.start:.0f} s of --total {a.total:.0f}{'' if final else ' (running)'}",
            "",
            f"command: `python -m eval.perf.gpu_first_contact {' '.join(self.argv)}`",
            "",
            "## Parts",
            "",
        ]
        rows = []
        for r in self.records:
            part = r["name"][0]
            table = f"{part}.md" if (self.out / f"{part}.md").exists() else "-"
            rows.append([r["name"], PARTS[part], r["status"], r["seconds"], r["budget"], table])
        ran = {r["name"][0] for r in self.records}
        rows += [
            [p, PARTS[p], "not reached yet" if not final else "not requested", "", "", ""]
            for p in PARTS
            if p not in ran
        ]
        lines.append(md_table(["part", "what", "status", "seconds", "budget s", "table"], rows))
        failures = [r for r in self.records if not r["status"].startswith(("ok", "SKIPPED")) and r["log"]]
        if failures:
            lines += ["## Failures (last lines of each log)", ""]
            for r in failures:
                lines += [f"### {r['name']}: {r['status']}", "", "```", tail(r["log"]), "```", ""]
        lines += self.decision()
        for part in PARTS:
            if (self.out / f"{part}.md").exists():
                lines += ["", (self.out / f"{part}.md").read_text()]
        write_atomic(self.out / "summary.md", "\n".join(lines) + "\n")

    def decision(self) -> list[str]:
        parity = (read_json(self.out / "b.json") or {}).get("kernel_ok", {})
        rows = {r["variant"]: r for r in read_jsonl(self.out / "c.jsonl") if r.get("tokens_per_s")}
        lines = [
            "",
            "## Decision: what `kernels=auto` should be (AUTO_KERNELS, modeling_speedplm/kernels_speedplm.py)",
            "",
        ]
        if self.args.dry_run:
            lines += [
                "DRY RUN: CPU interpreter timings say nothing about a GPU; the table only exercises the logic.",
                "",
            ]
        base = rows.get("torch")
        if base is None:
            lines += ["kernels=torch was not measured in part c: no decision (keep AUTO_KERNELS = (), i.e. torch)."]
            return lines + self.fp8_lines()
        table, paying = [], []
        for variant in ("triton", *[v for v in VARIANTS if v not in ("torch", "triton") and "fp8" not in v]):
            row = rows.get(variant)
            names = KERNELS if variant == "triton" else [n for n in variant.split("+") if n in KERNELS]
            ok = all(parity.get(n) for n in names) if parity else None
            if row is None:
                table.append([variant, _yes(ok), "not measured", "", "", "unknown: keep it out of auto"])
                continue
            ratio = row["tokens_per_s"] / base["tokens_per_s"]
            opt = f"{row['optimizer_ms']:.1f} vs {base['optimizer_ms']:.1f}"
            pays = ratio >= PAYS and ok is not False
            verdict = "PAYS" if pays else ("parity CHECK: never in auto" if ok is False else "does not pay")
            if pays and variant != "triton":
                paying.append(variant)
            table.append([variant, _yes(ok), f"{row['tokens_per_s']:,.0f}", f"{ratio:.3f}x", opt, verdict])
        lines.append(
            f"Rule: a kernel goes into auto when, alone, it gives >= {PAYS:.2f}x the tokens/s of kernels=torch "
            f"({base['tokens_per_s']:,.0f} tokens/s) in the same run, and its parity (part b) is ok.\n"
        )
        lines.append(
            md_table(["kernels", "parity ok", "tokens/s", "vs torch", "optimizer ms (vs torch)", "verdict"], table)
        )
        auto = "(" + ", ".join(f'"{k}"' for k in paying) + ("," if len(paying) == 1 else "") + ")"
        lines.append(
            f"\n**Set `AUTO_KERNELS = {auto}`**"
            + (
                f" (then confirm the combination with `model.kernels={'+'.join(paying)}` in part c)"
                if len(paying) > 1
                else ""
            )
            + ("" if paying else ": torch, inductor's fusions, as now")
            + "."
        )
        return lines + self.fp8_lines()

    def fp8_lines(self) -> list[str]:
        """Whether FP8 pays: its tokens/s against the same kernel setting without it, its loss beside that run's
        (the quality floor of the speed claim), and the CUDA path's parity with the twin."""
        rows = {r["variant"]: r for r in read_jsonl(self.out / "c.jsonl") if r.get("tokens_per_s")}
        fp8 = [v for v in rows if "fp8" in v.split("+")]
        if not fp8:
            return ["", "FP8: not measured (no `+fp8` variant ran in part c)."]
        lines = ["", "## FP8 (`model.fp8=mlp`; quality floor: its loss beside the same run without FP8)", ""]
        lines += [
            "| variant | tokens/s | vs without FP8 | last loss (without) | parity vs twin | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for variant in fp8:
            row, base = rows[variant], rows.get("+".join(p for p in variant.split("+") if p != "fp8") or "torch")
            ratio = row["tokens_per_s"] / base["tokens_per_s"] if base else None
            loss = f"{row['loss_last']:.4f} ({base['loss_last']:.4f})" if base else f"{row['loss_last']:.4f}"
            parity = row.get("fp8_parity")
            pays = ratio is not None and ratio >= PAYS and parity is not None and parity < 0.05
            verdict = "pays: consider model.fp8=mlp" if pays else "does not pay here: keep model.fp8=none"
            shown = [f"{ratio:.3f}x" if ratio else "?", f"{parity:.4f}" if parity is not None else "?"]
            lines.append(f"| {variant} | {row['tokens_per_s']:,.0f} | {shown[0]} | {loss} | {shown[1]} | {verdict} |")
        return lines


def _yes(ok) -> str:
    return "?" if ok is None else ("ok" if ok else "CHECK")


# ------------------------------------------------------------------------------------------------ the children


def child_main(args) -> int:
    import torch

    torch.manual_seed(0)
    return {"a": part_a, "b": part_b, "c": part_c, "e": part_e}[args.child](args)


def part_a(args) -> int:
    """Pre-flight. Writes a.md/a.json even when a check fails (exit 1 then)."""
    import importlib
    import importlib.util
    import platform

    import torch

    result = {"versions": {"python": platform.python_version()}, "device": {}, "imports": {}, "checks": {}}
    versions = result["versions"]
    for name in ("torch", "triton", "transformers", "accelerate", "yaml", "numpy", "safetensors", "huggingface_hub"):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as e:  # noqa: BLE001  (reported, not fatal)
            versions[name] = f"MISSING ({type(e).__name__})"
    versions["cuda"] = torch.version.cuda or "none"
    versions["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"
    for name in NOT_NEEDED:
        result["checks"][f"optional {name}"] = "present" if importlib.util.find_spec(name) else "absent (not needed)"
    cuda = torch.cuda.is_available()
    dev = result["device"]
    if cuda:
        props = torch.cuda.get_device_properties(0)
        dev.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
        from training.throughput import sku_peak

        found = sku_peak(props.name)
        dev["peak_bf16_tflops"] = args.peak_tflops or (found[1] / 1e12 if found else None)
        dev["sku"] = "override" if args.peak_tflops else (found[0] if found else "unknown: pass --peak-tflops")
        dev["nvidia_smi"] = nvidia_smi()
    else:
        dev.update(name="cpu (dry run, Triton interpreter)", sm_count=os.cpu_count())
    failed = False

    def flush():  # after every stage: a kill mid-check keeps what was found
        write_atomic(args.out / "a.json", json.dumps(result, indent=1, default=str))
        text = ["## a. Pre-flight\n"]
        rows = [[k, v] for k, v in {**versions, **dev}.items() if k != "nvidia_smi"]
        text.append(md_table(["item", "value"], rows))
        if dev.get("nvidia_smi"):
            text.append("\nnvidia-smi: " + dev["nvidia_smi"] + "\n")
        text.append("\n" + md_table(["import (what parts b-e need)", "result"], list(result["imports"].items())))
        text.append("\n" + md_table(["check", "result"], list(result["checks"].items())))
        write_atomic(args.out / "a.md", "\n".join(text))

    flush()
    for module in NEEDED_MODULES:
        t0 = time.perf_counter()
        try:
            importlib.import_module(module)
            result["imports"][module] = f"ok ({time.perf_counter() - t0:.1f} s)"
        except BaseException as e:  # noqa: BLE001  (SystemExit from a script is a failure too)
            result["imports"][module] = f"FAILED: {type(e).__name__}: {e}"[:300]
            failed = True
    data = Path(args.data)
    missing = [s for s in ("train", "valid", "test") if not (ROOT / data / s / "manifest.json").exists()]
    result["checks"]["data"] = (
        f"ok ({data})"
        if not missing
        else f"MISSING {missing} under {data}: run `python -m training.data prepare --builtin --out {data}` "
        "where aaanalysis is installed, and carry the folder"
    )
    failed |= bool(missing)
    flush()
    for name, fn in (("flex mixed dtypes", check_flex_mixed), ("model attention dtypes", check_model_dtypes)):
        t0 = time.perf_counter()
        try:
            result["checks"][name] = f"{fn(cuda)} ({time.perf_counter() - t0:.1f} s)"
        except Exception as e:  # noqa: BLE001
            result["checks"][name] = f"FAILED: {type(e).__name__}: {e}"[:400]
            failed = True
        flush()
    return 1 if failed else 0


def nvidia_smi() -> str:
    fields = (
        "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,mig.mode.current"
    )
    for query in (fields, "name,driver_version,clocks.sm,clocks.max.sm,power.limit"):
        try:
            proc = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"not available ({type(e).__name__})"
        if proc.returncode == 0:
            header, *values = proc.stdout.strip().splitlines()
            return "; ".join(f"{k.strip()}={v.strip()}" for k, v in zip(header.split(","), values[0].split(",")))
    return f"failed: {proc.stderr.strip()[:200]}"


def check_flex_mixed(cuda: bool) -> str:
    """What this torch build does with q, k bf16 and v fp32 in (compiled) flex attention, and the uniform case."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    device = "cuda" if cuda else "cpu"
    B, H, L, D = (2, 6, 256, 128) if cuda else (1, 2, 32, 16)
    docs = (torch.arange(L, device=device) // (L // 4)).expand(B, L)
    mask = create_block_mask(lambda b, h, q, k: docs[b, q] == docs[b, k], B, None, L, L, device=device)
    fn = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
    report = []
    for label, v_dtype in (("mixed q,k bf16 + v fp32", torch.float32), ("uniform bf16", torch.bfloat16)):
        q, k = (torch.randn(B, H, L, D, device=device, dtype=torch.bfloat16, requires_grad=cuda) for _ in range(2))
        v = torch.randn(B, H, L, D, device=device, dtype=v_dtype, requires_grad=cuda)
        try:
            with torch.set_grad_enabled(cuda):  # flex has no backward on CPU
                out = fn(q, k, v, block_mask=mask)
                if cuda:
                    out.float().sum().backward()
                    torch.cuda.synchronize()
            report.append(f"{label}: ran, out {str(out.dtype).removeprefix('torch.')}{' fwd+bwd' if cuda else ' fwd'}")
        except Exception as e:  # noqa: BLE001  (the finding, not a failure: the model casts first)
            report.append(f"{label}: raises {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            if label.startswith("uniform"):
                raise
    return "; ".join(report)


def check_model_dtypes(cuda: bool) -> str:
    """The model's attention inputs under bf16 autocast: one dtype (the backend sees what the hook records)."""
    import torch

    from modeling_speedplm import SpeedPLMConfig, SpeedPLMForMaskedLM
    from modeling_speedplm import attention_speedplm as A

    device = torch.device("cuda" if cuda else "cpu")
    backend = "flex_attention"
    seen = []
    original = A.ALL_ATTENTION_FUNCTIONS[backend]

    def recording(module, q, k, v, *rest, **kw):
        seen.append({str(t.dtype).removeprefix("torch.") for t in (q, k, v)})
        return original(module, q, k, v, *rest, **kw)

    A.ALL_ATTENTION_FUNCTIONS[backend] = recording
    try:
        config = SpeedPLMConfig.from_preset("tiny", attn_implementation=backend, kernels="torch")
        model = SpeedPLMForMaskedLM(config).to(device)
        ids = torch.randint(4, 24, (2, 64), device=device)
        docs = (torch.arange(64, device=device) // 20).expand(2, 64).int()
        with torch.set_grad_enabled(cuda), torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(input_ids=ids, document_ids=docs, labels=ids)
        if cuda:
            out.loss.backward()
    finally:
        A.ALL_ATTENTION_FUNCTIONS[backend] = original
    if any(len(s) != 1 for s in seen) or not seen:
        raise AssertionError(f"attention backend got mixed dtypes: {seen}")
    return f"{len(seen)} layers, all {seen[0].pop()} ({'fwd+bwd' if cuda else 'fwd'}, flex)"


def part_b(args) -> int:
    from eval.perf import gpu_benchmark as GB

    GB.ARGS = GB.parse_args(["--dry-run"] if args.dry_run else [])
    rows = GB.kernel_parity_rows(GB.shapes(args.dry_run))
    verdicts = [GB.parity_ok(r[2], r[3]) for r in rows]
    kernel_ok = {}
    for row, verdict in zip(rows, verdicts):
        name = "newton_schulz" if row[0] == "xxt" else row[0]
        kernel_ok[name] = kernel_ok.get(name, True) and verdict == "ok"
    write_atomic(args.out / "b.json", json.dumps({"rows": rows, "kernel_ok": kernel_ok}, indent=1))
    text = GB.table(
        "b. Kernel parity: max |err| / max |fp64 reference|, bf16 inputs (gpu_benchmark shapes)",
        ["kernel", "tensor", "triton", "torch twin", "ok"],
        [r + [v] for r, v in zip(rows, verdicts)],
    )
    write_atomic(args.out / "b.md", text.lstrip("\n"))
    return 0 if all(v == "ok" for v in verdicts) else 1


def fp8_parity() -> float:
    """Relative difference of the FP8 matmul as it runs here (torch._scaled_mm on an sm_89+ GPU) from its twin (the
    same FP8 roundings, fp32 matmuls): the speedrun-133m MLP's shape, forward and both gradients."""
    import torch

    from modeling_speedplm.fp8_speedplm import fp8_linear, fp8_linear_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(4096, 768, device=device, generator=gen, dtype=torch.bfloat16)
    w = torch.randn(3072, 768, device=device, generator=gen, dtype=torch.bfloat16) * 0.02
    g = torch.randn(4096, 3072, device=device, generator=gen, dtype=torch.bfloat16)
    outs = []
    for fn in (fp8_linear, fp8_linear_reference):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi)
        y.backward(g)
        outs.append([y.float(), xi.grad.float(), wi.grad.float()])
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(*outs))


def part_c(args) -> int:
    """One kernel setting: the trainer built from the speedrun recipe, its own train_step on its own batches."""
    import torch

    from training.config import load_config
    from training.trainer import Trainer

    variant, cuda = args.variant, torch.cuda.is_available()
    fp8 = "fp8" in variant.split("+")
    kernels = "+".join(p for p in variant.split("+") if p != "fp8") or "torch"
    overrides = [
        f"data.train={args.data}",
        f"train.output_dir={args.work / 'c'}",
        f"train.run_name={variant.replace('+', '-')}",
        "train.max_steps=1000",
        "train.save_every=0",
        "train.overwrite=true",
        f"train.tokens_per_step={args.tokens_per_step}",
        "eval.every=0",
        "tracking.wandb=disabled",
        f"model.kernels={kernels}",
        f"model.fp8={'mlp' if fp8 else 'none'}",
    ]
    overrides += DRY_MODEL if args.dry_run else ["train.compile=true"]
    if args.peak_tflops:
        overrides.append(f"train.peak_tflops={args.peak_tflops}")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    trainer = Trainer(load_config(str(RECIPE), overrides))
    setup_s = time.perf_counter() - t0
    optimizer_s = []
    for opt in trainer.optimizers:  # time the optimizer inside the trainer's own step (it syncs right before)
        opt.step = _timed(opt.step, optimizer_s, sync)
    batches = iter(trainer.train_loader)

    def step():
        t = time.perf_counter()
        result = trainer.train_step(trainer._next_batches(batches))
        sync()
        return time.perf_counter() - t, result

    first_s, first = step()
    losses = [first.loss]
    for _ in range(1 if args.dry_run else 2):  # warm-up (recompiles, autotune, allocator)
        losses.append(step()[1].loss)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    optimizer_s.clear()
    trainer.window["data_wait"] = 0.0
    times, tokens = [], 0
    for _ in range(args.steps):
        dt, result = step()
        times.append(dt)
        tokens += result.tokens
        losses.append(result.loss)
    step_s = statistics.median(times)
    opt_s = sum(optimizer_s) / len(times)  # Muon + Adam, per optimizer step
    tokens_s = tokens / sum(times)
    micro = trainer.batch.schedule.at(trainer.progress.step)
    scale = RECIPE_TOKENS_PER_STEP / args.tokens_per_step
    projected = tokens / len(times) * scale / ((step_s - opt_s) * scale + opt_s)
    model = trainer.accelerator.unwrap_model(trainer.model)
    row = {
        "variant": variant,
        "fp8_parity": fp8_parity() if fp8 else None,
        "kernels": model.model.kernels.name,
        "precision": trainer.accelerator.mixed_precision,
        "attention": model.config._attn_implementation,
        "tokens_per_step": tokens // len(times),
        "micro_batches": micro,
        "tokens_per_s": tokens_s,
        "projected_recipe_tokens_per_s": projected,
        "step_ms": 1e3 * step_s,
        "optimizer_ms": 1e3 * opt_s,
        "data_wait": trainer.window["data_wait"] / sum(times),
        "mfu": tokens_s * trainer.flops_per_token / trainer.peak if trainer.peak else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "setup_s": setup_s,
        "compile_s": first_s - step_s,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    with open(args.out / "c.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    render_c(args)
    return 0


def _timed(step, sink: list, sync):
    def timed(*a, **kw):
        sync()
        t = time.perf_counter()
        out = step(*a, **kw)
        sync()
        sink.append(time.perf_counter() - t)
        return out

    return timed


def render_c(args) -> None:
    rows = read_jsonl(args.out / "c.jsonl")
    title = (
        f"## c. The trainer's real step: speedrun-133m recipe{' (dry: tiny model)' if args.dry_run else ''}, "
        f"{args.tokens_per_step:,} tokens per optimizer step, median of {args.steps} timed steps after warm-up\n\n"
        "Trainer(load_config(configs/speedrun-133m.yaml, overrides)).train_step on its own loader's batches "
        "(collator, accumulation, sparse LM head, clip, Muon + Adam once per step). `@524k proj.`: the recipe's "
        f"{RECIPE_TOKENS_PER_STEP:,}-token step projected from the measured forward/backward and optimizer times "
        "(SpeedrunningPLMs: 275,900 tokens/s on 1xH100, 327,680 on 1xH200). compile s = first step - median step.\n"
    )
    table = md_table(
        ["kernels", "resolved", "tokens/s", "@524k proj.", "step ms", "optimizer ms", "data wait", "MFU", "peak GiB"]
        + ["setup s", "compile s", "loss", "precision", "attention"],
        [
            [
                r["variant"],
                r["kernels"],
                f"{r['tokens_per_s']:,.0f}",
                f"{r['projected_recipe_tokens_per_s']:,.0f}",
                f"{r['step_ms']:.1f}",
                f"{r['optimizer_ms']:.1f}",
                f"{100 * r['data_wait']:.1f}%",
                "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
                f"{r['setup_s']:.1f}",
                f"{r['compile_s']:.1f}",
                f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}",
                r["precision"],
                r["attention"],
            ]
            for r in rows
        ],
    )
    write_atomic(args.out / "c.md", title + "\n" + table)


def part_e(args) -> int:
    from eval.perf import gpu_benchmark as GB

    GB.ARGS = GB.parse_args(["--dry-run"] if args.dry_run else [])
    s = GB.shapes(args.dry_run)
    if args.dry_run:
        s["ns"] = s["ns"][:1]  # one Newton-Schulz shape: the interpreter makes this section the slow one
    sections = [
        (
            "Per-kernel time, median ms",
            ["kernel", "impl", "fwd ms", "fwd+bwd ms", "fwd throughput", "fwd+bwd throughput"],
            GB.kernel_timing_rows,
        ),
        (
            "Newton-Schulz, 5 steps bf16, median ms",
            ["matrices", "triton", "torch", "torch.compile", "speedup vs torch", "vs compile"],
            GB.newton_schulz_rows,
        ),
        (
            "Attention over packed proteins, median ms",
            ["implementation", "fwd ms", "fwd+bwd ms", "rel err", "note"],
            GB.attention_rows,
        ),
    ]
    text, failed = ["## e. Micro-benchmarks (gpu_benchmark)\n"], False
    for title, headers, fn in sections:
        try:
            text.append(GB.table(title, headers, fn(s)))
        except Exception as e:  # noqa: BLE001  (keep the other sections)
            text.append(f"\n{title}: FAILED {type(e).__name__}: {e}"[:400])
            failed = True
        write_atomic(args.out / "e.md", "\n".join(text) + "\n")  # after every section
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return child_main(args)
    return Runner(args, argv).main()


if __name__ == "__main__":
    sys.exit(main())
