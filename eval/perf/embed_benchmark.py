"""Embedding throughput: `eval.embed` (packed rows) vs transformers' EsmModel of the same shape (padded batches).

    python -m eval.perf.embed_benchmark       # esm2-8m-like vs its ESM2 twin, 2,000 proteins; CPU fp32 or CUDA bf16
    python -m eval.perf.embed_benchmark --proteins 4000 --batch-tokens 16384 --threads 2 --slices 4 --json embed.json

Same proteins for every row: a seeded random sample of the built-in aaanalysis proteins (valid, unique, short enough
that nothing is cropped or rejected). Same run, one process; the models are built from their configs (random
weights: speed does not depend on them), saved, and loaded back the way a user loads them:
    eval.embed, SpeedPLM, packed      the command's path with --layout packed (read FASTA, validate, length-sort,
                                      pack, forward, mean-pool, write parquet); several proteins per row, no padding
    eval.embed, SpeedPLM, one a row   the same with --layout padded (one protein per row; auto's choice on CPU)
    eval.embed, EsmModel              the same command on the ESM2 twin: one protein per row, length-sorted, padded
    EsmModel loop, sorted             a user's loop: tokenizer(padding=True) -> EsmModel -> mean over residues,
                                      proteins in length order, each batch at most --batch-tokens padded tokens
    EsmModel loop, input order        the same loop in file order (what most scripts do)
The proteins are cut into --slices parts (each sorted on its own by the sorting runs, as eval.embed sorts within a
chunk); every run embeds part 1, then part 2, ..., in an order rotated per part, so a busy machine slows all runs
alike. tokens/s counts real tokens (<cls> + residues + <eos>); padding = 1 - real / computed token positions. The
ratio columns divide by the two EsmModel loops. --repeats > 1 reports the median total. One untimed warm-up call per
run. ESM twin: eval.perf.throughput.esm_twin (ESM2-8M shape: 320 x 6, 20 heads, MLP 1280; SpeedPLM has 5 heads of 64).
"""

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.checkpoints import esm_twin
from eval.embed import EmbedOptions, embed_to_parquet, load_embedder, resolve_dtype
from eval.tables import hardware, markdown_table
from modeling_speedplm import SpeedPLMConfig, SpeedPLMForMaskedLM, build_tokenizer
from training.data.sources import builtin_files, iter_records
from training.data.validate import VOCAB, decode, encode

MAX_RESIDUES = 1022


def sample_proteins(n: int, seed: int = 0, max_residues: int = MAX_RESIDUES) -> list[str]:
    """n distinct valid built-in proteins of at most max_residues residues, a seeded random sample."""
    seen, seqs = set(), []
    for path in builtin_files():
        for rec in iter_records(path):
            try:
                seq = decode(encode(rec.seq))
            except ValueError:
                continue
            if len(seq) <= max_residues and seq not in seen:
                seen.add(seq)
                seqs.append(seq)
    pick = np.random.default_rng(seed).choice(len(seqs), size=min(n, len(seqs)), replace=False)
    return [seqs[i] for i in pick]


def padded_loop(model, tokenizer, seqs: list[str], batch_tokens: int, sort: bool) -> dict:
    """A user's EsmModel loop: padded batches, mean over residue tokens. Returns real and computed token counts."""
    order = np.argsort([len(s) for s in seqs], kind="stable") if sort else np.arange(len(seqs))
    real = slots = 0
    start = 0
    with torch.inference_mode():
        while start < len(order):
            stop, longest = start, 0
            while stop < len(order):  # grow while proteins x longest (+2) fits batch_tokens
                longest_next = max(longest, len(seqs[order[stop]]) + 2)
                if stop > start and (stop - start + 1) * longest_next > batch_tokens:
                    break
                stop, longest = stop + 1, longest_next
            batch = tokenizer([seqs[i] for i in order[start:stop]], padding=True, return_tensors="pt")
            hidden = model(**batch.to(model.device)).last_hidden_state  # (B, L, H)
            residues = batch["attention_mask"].clone()
            residues[:, 0] = 0
            residues[torch.arange(len(residues)), batch["attention_mask"].sum(1) - 1] = 0  # <eos>
            weights = residues.unsqueeze(-1).to(hidden.dtype)
            _ = ((hidden * weights).sum(1) / weights.sum(1)).float().cpu()  # (B, H)
            real += int(batch["attention_mask"].sum())
            slots += batch["input_ids"].numel()
            start = stop
    return dict(real=real, slots=slots)


@dataclass(frozen=True, kw_only=True)
class BenchmarkPlan:
    """What is timed (the command's flags): the size preset, how many proteins (seed: which ones, and the random
    weights), token positions per forward, full passes (the median is reported), parts the proteins are cut into."""

    preset: str = "esm2-8m-like"
    proteins: int = 2000
    batch_tokens: int = 16384
    repeats: int = 1
    seed: int = 0
    slices: int = 4


def measure(plan: BenchmarkPlan, device: str, log=print) -> list[dict]:
    import transformers
    from transformers import AutoModel, AutoTokenizer, EsmTokenizer

    transformers.logging.set_verbosity_error()  # the ESM twin's unused LM head is expected
    transformers.logging.disable_progress_bar()
    preset, n, batch_tokens = plan.preset, plan.proteins, plan.batch_tokens
    repeats, seed, slices = plan.repeats, plan.seed, plan.slices
    dtype = resolve_dtype("auto", torch.device(device))
    config = SpeedPLMConfig.from_preset(preset)
    seqs = sample_proteins(n, seed, min(MAX_RESIDUES, config.max_position_embeddings - 2))
    real = sum(len(s) + 2 for s in seqs)
    log(f"{len(seqs)} proteins, {real:,} tokens (mean {real / len(seqs) - 2:.0f} residues), {slices} slices")
    torch.manual_seed(seed)
    parts = [list(part) for part in np.array_split(np.arange(len(seqs)), slices)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = []
        for k, part in enumerate([list(range(8))] + parts):  # slice 0: the warm-up
            files.append(tmp / f"slice{k}.fasta")
            files[-1].write_text("".join(f">p{i}\n{seqs[i]}\n" for i in part))
        SpeedPLMForMaskedLM(config).save_pretrained(tmp / "speedplm")
        build_tokenizer().save_pretrained(tmp / "speedplm")
        esm_twin(config).save_pretrained(tmp / "esm")
        (tmp / "esm" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")  # ESM2's tokenizer, as ESM2 ships it
        EsmTokenizer(str(tmp / "esm" / "vocab.txt"), model_max_length=1024).save_pretrained(tmp / "esm")
        speedplm = load_embedder(str(tmp / "speedplm"), layer=None, device=device, layout="packed")
        one_a_row = dataclasses.replace(speedplm, packed=False, fixed_shape=False)  # = layout="padded"
        esm_embedder = load_embedder(str(tmp / "esm"), layer=None, device=device)
        model = AutoModel.from_pretrained(tmp / "esm", add_pooling_layer=False, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(tmp / "esm")

        def command(emb):
            def run(k):
                options = EmbedOptions(batch_tokens=batch_tokens, progress=False)
                report = embed_to_parquet(emb, [files[k]], tmp / "emb.parquet", options)
                return report["residues"] + 2 * report["accepted"], report["token_slots"]

            return run

        def loop(sort):
            def run(k):
                part = [list(range(8))] + parts
                info = padded_loop(model, tokenizer, [seqs[i] for i in part[k]], batch_tokens, sort)
                return info["real"], info["slots"]

            return run

        # name, layout, parameters, run(slice) -> (real tokens, computed token positions)
        runs = [
            ("eval.embed, SpeedPLM, packed", "packed", speedplm.model, command(speedplm)),
            (
                "eval.embed, SpeedPLM, one a row",
                "one protein a row, padded",
                speedplm.model,
                command(one_a_row),
            ),
            ("eval.embed, EsmModel", "one protein a row, padded", model, command(esm_embedder)),
            ("EsmModel loop, sorted", "one protein a row, padded", model, loop(True)),
            ("EsmModel loop, input order", "one protein a row, padded", model, loop(False)),
        ]
        for *_, run in runs:
            run(0)  # warm-up
        totals = []  # per repeat: [seconds per run]
        counts = [[0, 0] for _ in runs]
        for _ in range(repeats):
            seconds = [0.0] * len(runs)
            for k in range(1, slices + 1):  # interleaved, order rotated per slice: load drift hits every run alike
                for j in np.roll(np.arange(len(runs)), k):
                    start = time.perf_counter()
                    got, slots = runs[j][3](k)
                    seconds[j] += time.perf_counter() - start
                    counts[j] = [got, slots] if k == 1 else [counts[j][0] + got, counts[j][1] + slots]
            totals.append(seconds)
    rows = []
    for j, (name, layout, mdl, _) in enumerate(runs):
        assert counts[j][0] == real, f"{name}: embedded {counts[j][0]} of {real} tokens"
        secs = statistics.median(t[j] for t in totals)
        rows.append(
            dict(
                run=name,
                params_m=round(sum(p.numel() for p in mdl.parameters()) / 1e6, 2),
                layout=layout,
                padding=round(1 - counts[j][0] / counts[j][1], 4),
                seconds=secs,
            )
        )
    sorted_base, input_base = rows[3]["seconds"], rows[4]["seconds"]
    for r in rows:
        r["proteins/s"] = round(len(seqs) / r["seconds"], 1)
        r["tokens/s"] = round(real / r["seconds"])
        r["vs ESM loop sorted"] = round(sorted_base / r["seconds"], 2)  # same proteins: time ratio = rate ratio
        r["vs ESM loop input order"] = round(input_base / r["seconds"], 2)
        r["seconds"] = round(r["seconds"], 1)
    return rows


COLUMNS = (
    "run",
    "params_m",
    "layout",
    "padding",
    "seconds",
    "proteins/s",
    "tokens/s",
    "vs ESM loop sorted",
    "vs ESM loop input order",
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m eval.perf.embed_benchmark",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--preset", default="esm2-8m-like", help="SpeedPLM size preset; EsmModel gets the same shape")
    p.add_argument("--proteins", type=int, default=2000)
    p.add_argument("--batch-tokens", type=int, default=16384, help="computed token positions per forward, for all")
    p.add_argument("--repeats", type=int, default=1, help="full passes per row; the median is reported")
    p.add_argument("--slices", type=int, default=4, help="the proteins in this many parts, runs interleaved per part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="bf16 on cuda, else fp32")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = BenchmarkPlan(
        preset=args.preset,
        proteins=args.proteins,
        batch_tokens=args.batch_tokens,
        repeats=args.repeats,
        seed=args.seed,
        slices=args.slices,
    )
    rows = measure(plan, args.device, log=print)
    dtype = resolve_dtype("auto", torch.device(args.device))
    print(
        f"embedding, {args.device} {str(dtype).removeprefix('torch.')}, {args.preset}, {args.batch_tokens} tokens "
        f"per forward, median of {args.repeats}"
    )
    print(f"hardware: {hardware()}")
    shown = [
        {k: f"{v:.1%}" if k == "padding" else (str(v) if isinstance(v, float) else v) for k, v in r.items()}
        for r in rows
    ]
    print(markdown_table(shown, COLUMNS))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
