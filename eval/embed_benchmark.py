"""Embedding throughput: `eval.embed` (packed rows) vs transformers' EsmModel of the same shape (padded batches).

    python -m eval.embed_benchmark       # esm2-8m-like vs its ESM2 twin, 2,000 proteins; CPU fp32 or CUDA bf16
    python -m eval.embed_benchmark --proteins 4000 --batch-tokens 16384 --threads 2 --json embed.json

Same proteins for every row: a seeded random sample of the built-in aaanalysis proteins (valid, unique, at most 1,022
residues so no row crops or rejects), written to one FASTA file. Same run, one process, models built from their
configs (random weights: speed does not depend on them) and saved, then loaded back the way a user loads them:
    eval.embed, SpeedPLM       the whole command path (read FASTA, validate, length-sort, pack, forward, mean-pool,
                               write parquet); several proteins per row with document_ids, no padding between them
    eval.embed, EsmModel       the same command on the ESM2 twin: one protein per row, length-sorted, padded
    EsmModel loop, sorted      a user's loop: tokenizer(padding=True) -> EsmModel -> mean over residues, batches of
                               proteins in length order (each at most --batch-tokens padded tokens)
    EsmModel loop, input order the same loop in file order (what most scripts do)
tokens/s counts real tokens (<cls> + residues + <eos>); padding = 1 - real / computed token positions. The ratio
columns divide tokens/s by that of the two EsmModel loops. Each figure is the median of --repeats full passes, after
one untimed warm-up batch per model. ESM twin: eval.throughput.esm_twin (ESM2-8M: 320 x 6, 20 heads, MLP 1280).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eval.benchmark import hardware, markdown_table
from eval.embed import embed_to_parquet, load_embedder, resolve_dtype
from eval.throughput import esm_twin
from modeling_speedplm import SpeedPLMConfig, SpeedPLMForMaskedLM, build_tokenizer
from training.sources import builtin_files, iter_records
from training.validate import decode, encode

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


def timed(fn, repeats: int) -> tuple[float, dict]:
    times, info = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        info = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), info


def measure(preset: str, n: int, batch_tokens: int, repeats: int, seed: int, device: str, log=print) -> list[dict]:
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()  # the ESM twin's unused LM head is expected
    transformers.logging.disable_progress_bar()
    dtype = resolve_dtype("auto", torch.device(device))

    config = SpeedPLMConfig.from_preset(preset)
    seqs = sample_proteins(n, seed, min(MAX_RESIDUES, config.max_position_embeddings - 2))
    real = sum(len(s) + 2 for s in seqs)
    log(f"{len(seqs)} proteins, {real:,} tokens (mean {real / len(seqs) - 2:.0f} residues)")
    torch.manual_seed(seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fasta = tmp / "proteins.fasta"
        fasta.write_text("".join(f">p{i}\n{s}\n" for i, s in enumerate(seqs)))
        SpeedPLMForMaskedLM(config).save_pretrained(tmp / "speedplm")
        esm = esm_twin(config)
        esm.save_pretrained(tmp / "esm")
        build_tokenizer().save_pretrained(tmp / "esm")
        params = {}
        for label, ckpt in [("SpeedPLM", tmp / "speedplm"), ("EsmModel", tmp / "esm")]:
            emb = load_embedder(str(ckpt), layer=None, device=device, dtype="auto")
            params[label] = emb.model.num_parameters()
            warm = tmp / "warm.fasta"
            warm.write_text("".join(f">w{i}\n{s}\n" for i, s in enumerate(seqs[:8])))
            embed_to_parquet(emb, [warm], tmp / "warm.parquet", progress=False)

            def run(emb=emb):
                report = embed_to_parquet(emb, [fasta], tmp / "emb.parquet", batch_tokens=batch_tokens, progress=False)
                return dict(real=report["residues"] + 2 * report["accepted"], padding=report["padding"])

            seconds, info = timed(run, repeats)
            assert info["real"] == real, "eval.embed did not embed every protein"
            layout = "packed" if emb.packed else "padded, length-sorted"
            rows.append(dict(run=f"eval.embed, {label}", layout=layout, padding=info["padding"], seconds=seconds))
            del emb
        model = AutoModel.from_pretrained(tmp / "esm", add_pooling_layer=False, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(tmp / "esm")
        padded_loop(model, tokenizer, seqs[:8], batch_tokens, True)  # warm-up
        for sort, name in [(True, "EsmModel loop, sorted"), (False, "EsmModel loop, input order")]:
            seconds, info = timed(lambda sort=sort: padded_loop(model, tokenizer, seqs, batch_tokens, sort), repeats)
            assert info["real"] == real
            layout = "padded, length-sorted" if sort else "padded, input order"
            padding = round(1 - info["real"] / info["slots"], 4)
            rows.append(dict(run=name, layout=layout, padding=padding, seconds=seconds))
    sorted_base, input_base = rows[2]["seconds"], rows[3]["seconds"]
    for r in rows:
        r["params_m"] = round(params["SpeedPLM" if "SpeedPLM" in r["run"] else "EsmModel"] / 1e6, 2)
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
        prog="python -m eval.embed_benchmark",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--preset", default="esm2-8m-like", help="SpeedPLM size preset; EsmModel gets the same shape")
    p.add_argument("--proteins", type=int, default=2000)
    p.add_argument("--batch-tokens", type=int, default=16384, help="computed token positions per forward, for all")
    p.add_argument("--repeats", type=int, default=1, help="full passes per row; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="bf16 on cuda, else fp32")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args.preset, args.proteins, args.batch_tokens, args.repeats, args.seed, args.device, log=print)
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
