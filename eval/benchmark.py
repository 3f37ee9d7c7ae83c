"""Score masked-LM checkpoints on IDENTICAL masked positions of held-out proteins.

    python -m eval.benchmark --models runs/default/final facebook/esm2_t6_8M_UR50D --data builtin --split test \\
        --mask-rate 0.15 --seed 0 --out bench/ [--max-tokens N] [--batch-tokens N]
    accelerate launch --multi_gpu --num_processes 2 -m eval.benchmark ...   # ranks score disjoint batches, summed

Any checkpoint `AutoModelForMaskedLM` loads (ours through trust_remote_code, transformers' ESM2, local folders).
The masked batches are built ONCE, before any model is loaded, with the padded eval loader (one protein per row,
`packing=False`: ESM2 cannot take packed rows): every model sees the same input_ids and is scored on the same
labels. Each model passes only `input_ids` and `attention_mask`.

Protocol
    --data builtin (the built-in proteins, prepared once into --cache/builtin) or a prepared shard directory
    (DIR/<split> if it exists, else DIR itself); proteins in stored order; longer ones keep their first
    max_length - 2 residues, max_length = min(--max-length, every model's limit); masks: --mask-rate of the residues
    (80% <mask>, 10% random residue, 10% unchanged; --replacement mask: all <mask>), fixed by --seed and the batch
    index; a batch holds batch_tokens // max_length proteins padded to its longest; --max-tokens keeps the leading
    batches until that many real (non-padding) tokens.
Vocabularies: ids are ESM2's (modeling_speedplm.ESM2_VOCAB). A tokenizer with that exact vocabulary is used as is;
    one holding the same tokens under other ids gets its inputs mapped and its logits gathered back into ESM2 order
    (logits for tokens outside ESM2's vocabulary are merged into one "other" class, so the loss is still the model's
    full-vocabulary cross-entropy); a tokenizer missing an ESM2 token is refused, naming the model.
Outputs (main process): results.csv (one row per model), results.md (table, command, hardware), results.png.
    Precision/recall/F1 are reported both weighted (by class frequency) and macro (mean over amino acids);
    masked_positions_sha256 hashes every scored batch (input ids + labels, in ESM2 ids) in global batch order, so
    equal hashes prove two models were scored on the same positions.

Public API (also used by eval.probes and eval.speedrun)
    EvalError(Exception)
    resolve_split(source, split, cache="data", accelerator=None) -> Path
    MaskSpec(mask_rate=0.15, seed=0, replacement="80/10/10")   # which positions are masked, and how
    build_batches(shard_dir, masks=MaskSpec(), *, max_length=1024, batch_tokens=16384, max_tokens=None)
        -> list[dict]      # each: input_ids, attention_mask, labels (B, L) long
    VocabMap.identity(), vocab_map(name, tokenizer, logits_width) -> VocabMap
    inspect_model(name) -> ModelSpec;  load_model(spec, device) -> model (eval mode)
    score_model(model, vocab, indexed_batches, accelerator=None, desc=None) -> dict (metrics, tokens, sha256)
    write_outputs(rows, out_dir, command, hardware_text) -> None
"""

import argparse
import contextlib
import csv
import hashlib
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.checkpoints import EvalError, VocabMap, inspect_model, load_model
from eval.tables import hardware, markdown_table, short_name
from training.data.collator import EVAL_MASK_RATE, REPLACEMENTS
from training.data.shards import SHARD_MANIFEST
from training.metrics import MaskedLMAccumulator

COLUMNS = (
    "model",
    "parameters",
    "tokens_scored",
    "loss",
    "perplexity",
    "accuracy",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "mcc",
    "masked_positions_sha256",
    "seconds",
)


# ---------------------------------------------------------------------------------------------------- data


def resolve_split(source: str, split: str, cache: str = "data", accelerator=None) -> Path:
    """Shard directory of `split`. "builtin" is prepared once (main process) into cache/builtin."""
    if source == "builtin":
        from training.data_setup import builtin_root

        root = builtin_root(cache, accelerator)
        if split not in ("train", "valid", "test"):
            raise EvalError(f"--split {split!r}: the built-in set has train, valid and test")
        return root / split
    path = Path(source)
    if (path / split / SHARD_MANIFEST).exists():
        return path / split
    if (path / SHARD_MANIFEST).exists():
        return path
    raise EvalError(
        f"--data {source}: neither {path / split} nor {path} is a prepared shard directory "
        f"(python -m training.data prepare ... --out DIR)"
    )


@dataclass(frozen=True, kw_only=True)
class MaskSpec:
    """Which positions the eval batches mask, and how: --mask-rate of the residues, fixed by --seed (and the batch
    index), replaced as --replacement says (80/10/10: <mask>, random residue, unchanged; mask: all <mask>)."""

    mask_rate: float = EVAL_MASK_RATE
    seed: int = 0
    replacement: str = "80/10/10"


def build_batches(
    shard_dir,
    masks: MaskSpec = MaskSpec(),
    *,
    max_length: int = 1024,
    batch_tokens: int = 16384,
    max_tokens: int | None = None,
) -> list[dict]:
    """The fixed masked eval batches, one protein per row (padded), in stored order: a pure function of the args."""
    from training.data.collator import MLMCollator
    from training.data.loader import LoaderOptions, build_eval_loader

    mask_rate, seed, replacement = masks.mask_rate, masks.seed, masks.replacement
    if not 0.0 < mask_rate < 1.0:
        raise EvalError(f"--mask-rate {mask_rate}: must be in (0, 1)")
    if batch_tokens < max_length:
        raise EvalError(
            f"--batch-tokens {batch_tokens} < max length {max_length}: a batch holds "
            f"batch_tokens // max_length proteins"
        )
    collator = MLMCollator(mask_rate=mask_rate, replace=replacement, seed=seed)
    options = LoaderOptions(max_length=max_length, tokens_per_micro_batch=batch_tokens, seed=seed, packing=False)
    loader = build_eval_loader(shard_dir, collator, options)
    batches, real = [], 0
    for batch in loader:
        batches.append({k: batch[k] for k in ("input_ids", "attention_mask", "labels")})  # each (B, L)
        real += int(batch["attention_mask"].sum())
        if max_tokens and real >= max_tokens:
            break
    return batches


def batch_digest(batch: dict) -> bytes:
    digest = hashlib.sha256()
    for key in ("input_ids", "labels"):
        tensor = batch[key].to(torch.int64).contiguous()
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.digest()


# ---------------------------------------------------------------------------------------------------- models


@torch.no_grad()
def score_model(model, vocab: VocabMap, indexed_batches, accelerator=None, desc: str | None = None) -> dict:
    """Metrics over (global index, batch) pairs this rank scores, summed over ranks. Collective when distributed."""
    from tqdm.auto import tqdm

    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    accumulator = MaskedLMAccumulator(vocab.num_classes, device=device)
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    show = desc is not None and (accelerator is None or accelerator.is_main_process)
    digests, start = [], time.perf_counter()
    with autocast:
        for index, batch in tqdm(indexed_batches, desc=desc, disable=not show, dynamic_ncols=True):
            digests.append((index, batch_digest(batch)))
            ids = vocab.model_ids(batch["input_ids"]).to(device)
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits  # (B, L, W)
            accumulator.update(vocab.canonical_logits(logits), batch["labels"].to(device))
    accumulator.reduce(accelerator)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        digests = gather_object(digests)
    model.train(was_training)
    result = accumulator.compute()
    whole = hashlib.sha256(b"".join(d for _, d in sorted(digests)))
    result.update(masked_positions_sha256=whole.hexdigest(), seconds=time.perf_counter() - start)
    return result


# ---------------------------------------------------------------------------------------------------- outputs


def plot_results(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [short_name(r["model"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(rows), 3.6))
    for ax, key, label in [(axes[0], "loss", "loss (cross-entropy, nats)"), (axes[1], "accuracy", "accuracy")]:
        values = [r[key] for r in rows]
        bars = ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_ylim(0, max(values) * 1.15 if max(values) > 0 else 1)
    fig.suptitle(f"masked-LM on identical masked positions ({rows[0]['tokens_scored']:,} tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows: list[dict], out_dir: Path, command: str, hardware_text: str, notes: str = "") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: r[c] for c in COLUMNS} for r in rows)
    shown = [c for c in COLUMNS if c not in ("masked_positions_sha256", "recall_weighted")]
    text = [
        "# Masked-LM benchmark",
        "",
        markdown_table(rows, shown),
        "",
        "Loss: token-weighted mean cross-entropy (nats) over the masked positions; perplexity = exp(loss). "
        "precision/recall/f1 `_weighted`: averaged over amino-acid classes weighted by their frequency among the "
        "masked positions; `_macro`: unweighted mean over the classes present (weighted recall equals accuracy, "
        "so only the CSV has it). MCC: multiclass Matthews correlation.",
        "",
        f"Masked positions (sha256 of every scored batch, same for all models): `{rows[0]['masked_positions_sha256']}`"
        if len({r["masked_positions_sha256"] for r in rows}) == 1
        else "WARNING: models were scored on different masked positions (hashes differ; see results.csv)",
        "",
        notes,
        "",
        f"Command: `{command}`",
        "",
        f"Hardware: {hardware_text}",
        "",
    ]
    (out_dir / "results.md").write_text("\n".join(text))
    plot_results(rows, out_dir / "results.png")


# ---------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.benchmark",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--models", nargs="+", required=True, metavar="M", help="checkpoint folders or Hub ids")
    p.add_argument("--data", default="builtin", help="'builtin' or a prepared shard directory")
    p.add_argument("--split", default="test", help="split folder inside --data (default: test)")
    p.add_argument("--mask-rate", type=float, default=EVAL_MASK_RATE, help="share of residues scored (ESM2: 0.15)")
    p.add_argument("--replacement", choices=tuple(REPLACEMENTS), default="80/10/10")
    p.add_argument("--seed", type=int, default=0, help="mask seed")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after the batch reaching N real tokens")
    p.add_argument("--batch-tokens", type=int, default=16384, help="token slots per batch (proteins = N // max length)")
    p.add_argument("--max-length", type=int, default=1024, help="upper bound on tokens per protein")
    p.add_argument("--cache", default="data", help="where --data builtin is prepared once")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        specs = [inspect_model(name) for name in args.models]  # every vocabulary checked before anything runs
        from accelerate import Accelerator

        # cpu=True on GPU-less machines makes `accelerate launch --multi_gpu` ranks one gloo group (training/trainer)
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        max_length = min([args.max_length] + [s.max_length for s in specs])
        shard_dir = resolve_split(args.data, args.split, args.cache, accelerator)
        batches = build_batches(
            shard_dir,
            MaskSpec(mask_rate=args.mask_rate, seed=args.seed, replacement=args.replacement),
            max_length=max_length,
            batch_tokens=args.batch_tokens,
            max_tokens=args.max_tokens,
        )
        if not batches:
            raise EvalError(f"{shard_dir}: no proteins")
        # every rank builds the same global list and takes every world-th batch: same positions for any rank count
        mine = list(enumerate(batches))[accelerator.process_index :: accelerator.num_processes]
        rows = []
        for spec in specs:
            model = load_model(spec, accelerator.device)
            result = score_model(model, spec.vocab, mine, accelerator, desc=short_name(spec.name))
            rows.append(
                {
                    "model": spec.name,
                    "parameters": model.num_parameters(),
                    "tokens_scored": result["tokens"],
                    **{c: result[c] for c in COLUMNS[3:]},
                }
            )
            del model
    except (EvalError, ValueError) as err:
        print(f"eval.benchmark: error: {err}", file=sys.stderr)
        return 1
    if accelerator.is_main_process:
        command = "python -m eval.benchmark " + shlex.join(argv)
        notes = (
            f"Data: `{shard_dir}`, {sum(int(b['attention_mask'].sum()) for b in batches):,} real tokens in "
            f"{len(batches)} padded batches of {args.batch_tokens // max_length} proteins; max length "
            f"{max_length} tokens (longer proteins keep their first {max_length - 2} residues); mask rate "
            f"{args.mask_rate} ({args.replacement}), seed {args.seed}."
        )
        write_outputs(rows, Path(args.out), command, hardware(accelerator), notes)
        print(markdown_table(rows, [c for c in COLUMNS if c not in ("masked_positions_sha256", "recall_weighted")]))
        print(f"wrote {Path(args.out) / 'results.csv'}, results.md, results.png")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
