"""Peak memory of one training step with and without gradient (activation) checkpointing.

    python -m eval.perf.checkpointing_memory [--preset esm2-35m-like] [--rows 8] [--length 1024] [--doc-length 256]

Each arm runs in a FRESH subprocess (one process, no workers), so its peak resident set is its own: on CPU the table
reports the process's peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) and the rise over the RSS measured right before
the step (model and inputs built: what the step's activations and gradients add); on CUDA
`torch.cuda.max_memory_allocated`. One step = forward + backward of the masked-LM loss (15% scored tokens, the
trainer's sparse LM head) over rows x length packed tokens (proteins of --doc-length tokens, document masking), fp32.
Checkpointing is transformers' `gradient_checkpointing_enable()`: each block's activations are recomputed in the
backward instead of kept.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from eval.tables import hardware, markdown_table


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one_arm(args) -> dict:
    """Runs in the child: build, measure the baseline, one step, measure the peak."""
    from modeling_speedplm import SpeedPLMConfig, SpeedPLMForMaskedLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = SpeedPLMConfig.from_preset(args.preset, max_position_embeddings=args.length)
    model = SpeedPLMForMaskedLM(config).to(device).train()
    if args.arm == "on":
        model.gradient_checkpointing_enable()
    ids = torch.randint(4, 24, (args.rows, args.length), device=device)  # residue ids
    documents = (torch.arange(args.length, device=device) // args.doc_length).expand(args.rows, -1).int()
    labels = ids.masked_fill(torch.rand(ids.shape, device=device) > 0.15, -100)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else rss_mib()
    start = time.perf_counter()
    model(ids, document_ids=documents, labels=labels, sparse_prediction=True).loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "arm": args.arm,
        "device": device.type,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "before_step_mib": before,
        "peak_mib": peak,
        "step_rise_mib": peak - before,
        "step_seconds": time.perf_counter() - start,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.perf.checkpointing_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="esm2-35m-like")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--doc-length", type=int, default=256, help="tokens per packed protein")
    p.add_argument("--arm", choices=["off", "on"], help=argparse.SUPPRESS)  # internal: run one arm in this process
    args = p.parse_args(argv)
    if args.arm:
        print(json.dumps(one_arm(args)))
        return 0
    rows = []
    for arm in ("off", "on"):
        cmd = [sys.executable, "-m", "eval.perf.checkpointing_memory", "--arm", arm]
        cmd += ["--preset", args.preset, "--rows", str(args.rows), "--length", str(args.length)]
        cmd += ["--doc-length", str(args.doc_length)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"eval.perf.checkpointing_memory: arm {arm} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for row in rows:
        row["rise_vs_off"] = row["step_rise_mib"] / rows[0]["step_rise_mib"]
        row["time_vs_off"] = row["step_seconds"] / rows[0]["step_seconds"]
    measure = "CUDA max_memory_allocated" if rows[0]["device"] == "cuda" else "peak RSS of a fresh process per arm"
    print(
        f"{args.preset}, {args.rows} x {args.length} tokens (proteins of {args.doc_length}), one training step, "
        f"fp32; memory: {measure}; {hardware()}\n"
    )
    columns = ["arm", "parameters_m", "before_step_mib", "peak_mib", "step_rise_mib", "rise_vs_off", "step_seconds"]
    print(markdown_table(rows, columns + ["time_vs_off"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
