"""Zero-shot variant-effect prediction: Spearman between a masked LM's scores and deep-mutational-scanning data.

    python -m eval.zeroshot --model CKPT [CKPT ...] --dms FILE.csv [...] [--builtin] --out DIR
                            [--scoring masked-marginal|wt-marginal] [--max-length 1024] [--batch-tokens 16384]

Input: ProteinGym's DMS CSV format (Notin et al. 2023): columns `mutant` (`A24C`, or `A24C:G30T` for a multiple
mutant; 1-based positions in the sequence), `mutated_sequence`, `DMS_score` (others ignored). The wild type is the
per-position consensus of the sequences with each row's mutations reverted. Refused, with file:line and the reason,
exit 2 and nothing written: a missing column, an unparsable mutant, a position named twice or beyond the sequence,
a mutant letter that is not in mutated_sequence, a wild-type letter that disagrees with the inferred WT, a sequence
differing from the WT where the mutant names no change, sequences of different lengths, a DMS_score that is not a
finite number, letters outside the ESM2 alphabet (training.data.validate). --builtin adds the mavenn set prepared by
`python -m eval.quality.dms fetch --out data/quality/dms` (GB1, TDP-43, Abeta42; prepared on first use if absent).

Scoring (Meier et al. 2021, "Language models enable zero-shot prediction of the effects of mutations on protein
function", ESM's `masked-marginals`): for every distinct mutated position i of an assay the WT is run once with i
masked, and a variant scores sum over its mutations of log p(mut at i) - log p(wt at i). The forwards are batched and
each position's log-probabilities are computed once per assay, so the cost is one forward per mutated position,
whatever the number of variants. --scoring wt-marginal: the same sum from unmasked WT forwards (one per window).
Proteins longer than the model's context: position i is scored inside a window of max_length - 2 residues centred
on i (start = i - width // 2) and clipped to the sequence ends (as ProteinGym's ESM scoring, `get_optimal_window`);
max_length = min(--max-length, the model's limit). Log-probabilities are over the model's whole vocabulary; ids
are ESM2's (modeling_speedplm.ESM2_VOCAB), mapped to the model's own through eval.checkpoints' VocabMap.

Any checkpoint AutoModelForMaskedLM loads with trust_remote_code (SpeedPLM, transformers' EsmForMaskedLM, Hub ids),
loaded by eval.checkpoints' inspect_model/load_model. Give a random-init twin as another --model to see the floor.

Outputs in DIR: zeroshot.csv (model, assay, variants, positions, spearman, ...), scores.csv (assay, mutant,
DMS_score, one score column per model), zeroshot.md (table + commit, date, machine and the exact command).

Public API
    DmsError(Exception);  Assay;  ScoreOptions(scoring, max_length, batch_tokens)
    parse_mutant(text) -> tuple[(position0, wt, mut), ...]      # ValueError(reason)
    read_dms(path) -> Assay
    window(position, length, width) -> (start, end)
    position_log_probs(model, vocab, wt, positions, options) -> (P, C) tensor, row k = positions[k]
    score_assay(model, vocab, assay, options) -> np.ndarray (n,)
    main(argv) -> exit code
"""

import argparse
import csv
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.checkpoints import EvalError, VocabMap, inspect_model, load_model
from eval.tables import markdown_table, short_name, stamp
from modeling_speedplm import ESM2_VOCAB
from training.data.validate import ValidationPolicy, encode

REQUIRED = ("mutant", "mutated_sequence", "DMS_score")
SCORINGS = ("masked-marginal", "wt-marginal")
CLS, EOS, MASK = (ESM2_VOCAB.index(t) for t in ("<cls>", "<eos>", "<mask>"))
MUTATION = re.compile(r"([A-Z])([1-9][0-9]*)([A-Z])")
# DMS sequences are stored uppercase and never carry a stop; anything else is a data error, not something to fix
# Variant scoring takes any real protein: the training-data composition rule is not a property of a protein to score
# (TDP-43 290-373, a ProteinGym assay, lacks 5 of the 15 common residues).
POLICY = ValidationPolicy(lowercase="reject", strip_terminal_stop=False, composition_check=False)
ROOT = Path(__file__).resolve().parents[1]


class DmsError(Exception):
    """Bad DMS input; the message starts with file:line and gives the reason."""


@dataclass(frozen=True)
class Assay:
    name: str  # the file's stem
    path: str
    wt: str  # (L,) inferred wild type
    mutants: tuple  # (n,) mutant strings as in the file
    mutations: tuple  # (n,) tuples of (position0, wt letter, mut letter)
    scores: np.ndarray  # (n,) float64 DMS_score


@dataclass(frozen=True)
class ScoreOptions:
    scoring: str = "masked-marginal"
    max_length: int = 1024  # tokens per forward, <cls> and <eos> included
    batch_tokens: int = 16384  # token slots per forward batch (rows = batch_tokens // window tokens)


# ---------------------------------------------------------------------------------------------------- input


def parse_mutant(text: str) -> tuple:
    """'A24C:G30T' -> ((23, 'A', 'C'), (29, 'G', 'T')); ValueError naming what is wrong."""
    if not text:
        raise ValueError("empty mutant")
    mutations, seen = [], set()
    for part in text.split(":"):
        match = MUTATION.fullmatch(part)
        if match is None:
            raise ValueError(f"cannot parse {part!r} (expected wild-type letter, 1-based position, mutant letter)")
        wt, position, mut = match.group(1), int(match.group(2)) - 1, match.group(3)
        if wt == mut:
            raise ValueError(f"{part!r} names no change")
        if position in seen:
            raise ValueError(f"position {position + 1} is named twice")
        seen.add(position)
        mutations.append((position, wt, mut))
    return tuple(mutations)


def _check_row(mutations: tuple, sequence: str) -> str | None:
    """Reason a parsed row is inconsistent with its own mutated_sequence, else None."""
    for position, _, mut in mutations:
        if position >= len(sequence):
            return f"position {position + 1} is beyond the mutated_sequence's {len(sequence)} residues"
        if sequence[position] != mut:
            return f"mutated_sequence has {sequence[position]!r} at position {position + 1}, the mutant says {mut!r}"
    return None


def _read_rows(path: Path):
    """(mutants, mutations, sequences, scores, lines) of a DMS CSV, each row checked on its own."""
    if not path.is_file():
        raise DmsError(f"{path}: no such file")
    mutants, mutations, sequences, scores, lines = [], [], [], [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DmsError(f"{path}:1: missing column(s) {missing} (header: {reader.fieldnames})")
        for row in reader:
            line, mutant, sequence = reader.line_num, (row["mutant"] or "").strip(), row["mutated_sequence"] or ""
            try:
                parsed = parse_mutant(mutant)
            except ValueError as err:
                raise DmsError(f"{path}:{line}: mutant {mutant!r}: {err}") from err
            try:
                encode(sequence, POLICY)
            except ValueError as err:
                raise DmsError(f"{path}:{line}: mutant {mutant!r}: mutated_sequence rejected: {err}") from err
            reason = _check_row(parsed, sequence)
            try:
                score = float(row["DMS_score"])
            except (TypeError, ValueError):
                score = math.nan
            if reason is None and not math.isfinite(score):
                reason = f"DMS_score {row['DMS_score']!r} is not a finite number"
            if reason is None and sequences and len(sequence) != len(sequences[0]):
                reason = f"mutated_sequence has {len(sequence)} residues, line {lines[0]}'s has {len(sequences[0])}"
            if reason:
                raise DmsError(f"{path}:{line}: mutant {mutant!r}: {reason}")
            mutants.append(mutant)
            mutations.append(parsed)
            sequences.append(sequence)
            scores.append(score)
            lines.append(line)
    if not mutants:
        raise DmsError(f"{path}: no variants")
    return mutants, mutations, sequences, scores, lines


def read_dms(path) -> Assay:
    """A ProteinGym-format DMS CSV, every row checked against the inferred wild type."""
    path = Path(path)
    mutants, mutations, sequences, scores, lines = _read_rows(path)
    reverted = np.frombuffer("".join(sequences).encode("ascii"), dtype=np.uint8).reshape(len(sequences), -1).copy()
    rows = [i for i, muts in enumerate(mutations) for _ in muts]
    positions = [p for muts in mutations for p, _, _ in muts]
    reverted[rows, positions] = [ord(w) for muts in mutations for _, w, _ in muts]  # (n, L) each row's wild type
    wt = bytes(int(np.bincount(column, minlength=256).argmax()) for column in reverted.T)  # consensus, (L,)
    differ = reverted != np.frombuffer(wt, dtype=np.uint8)  # (n, L)
    bad = np.flatnonzero(differ.any(1))
    if bad.size:
        i = int(bad[0])
        position = int(np.flatnonzero(differ[i])[0])
        named = {p: (w, m) for p, w, m in mutations[i]}
        inferred = chr(wt[position])
        if position in named:
            w, m = named[position]
            reason = (
                f"wild-type letter {w!r} of {w}{position + 1}{m} disagrees with the inferred WT {inferred!r} at "
                f"position {position + 1}"
            )
        else:
            reason = (
                f"mutated_sequence has {sequences[i][position]!r} at position {position + 1}, where the inferred WT "
                f"has {inferred!r} and the mutant names no change"
            )
        raise DmsError(
            f"{path}:{lines[i]}: mutant {mutants[i]!r}: {reason} (WT = consensus of {len(mutants):,} variants "
            f"with their mutations reverted; {bad.size:,} rows disagree)"
        )
    return Assay(path.stem, str(path), wt.decode("ascii"), tuple(mutants), tuple(mutations), np.array(scores))


# ---------------------------------------------------------------------------------------------------- scoring


def window(position: int, length: int, width: int) -> tuple[int, int]:
    """[start, end) of the `width`-residue window centred on `position` (0-based), clipped to [0, length)."""
    if length <= width:
        return 0, length
    start = min(max(position - width // 2, 0), length - width)
    return start, start + width


def _forward(model, vocab: VocabMap, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) ESM2 ids -> (B, T, C) log-probabilities in ESM2 order (C = 33, or 34 with the model's 'other')."""
    device = next(model.parameters()).device
    ids = vocab.model_ids(tokens).to(device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (B, T, W)
    return torch.log_softmax(vocab.canonical_logits(logits), dim=-1).cpu()


@torch.no_grad()
def position_log_probs(model, vocab: VocabMap, wt: str, positions: list, options: ScoreOptions) -> torch.Tensor:
    """(P, C) log-probabilities at each of `positions` (0-based, distinct): masked there (masked-marginal) or not."""
    if options.scoring not in SCORINGS:
        raise ValueError(f"scoring {options.scoring!r}: one of {SCORINGS}")
    width = options.max_length - 2
    if width < 1:
        raise ValueError(f"max_length {options.max_length}: must be >= 3")
    residues = torch.from_numpy(encode(wt, POLICY).astype(np.int64))  # (L,)
    windows = [window(p, len(wt), width) for p in positions]
    masked = options.scoring == "masked-marginal"
    # one forward row per position (masked), or per distinct window (unmasked: every position in it is read off)
    keys = list(range(len(positions))) if masked else sorted(set(windows))
    row_of = {k: r for r, k in enumerate(keys)}
    tokens = torch.stack(
        [
            torch.cat([torch.tensor([CLS]), residues[slice(*(windows[k] if masked else k))], torch.tensor([EOS])])
            for k in keys
        ]
    )  # (R, T), T = window + 2 (all windows have one width)
    if masked:
        relative = torch.tensor([p - s for p, (s, _) in zip(positions, windows)])
        tokens[torch.arange(len(keys)), relative + 1] = MASK
    per_batch = max(1, options.batch_tokens // tokens.shape[1])
    out = torch.empty(len(positions), vocab.num_classes)
    for lo in range(0, len(keys), per_batch):
        log_probs = _forward(model, vocab, tokens[lo : lo + per_batch])  # (b, T, C)
        for k in range(lo, min(lo + per_batch, len(keys))):
            if masked:
                out[k] = log_probs[k - lo, positions[k] - windows[k][0] + 1]
        if not masked:
            for j, (p, w) in enumerate(zip(positions, windows)):
                if lo <= row_of[w] < lo + per_batch:
                    out[j] = log_probs[row_of[w] - lo, p - w[0] + 1]
    return out


def score_assay(model, vocab: VocabMap, assay: Assay, options: ScoreOptions) -> np.ndarray:
    """(n,) sum over each variant's mutations of log p(mut) - log p(wt) at that position."""
    positions = sorted({p for muts in assay.mutations for p, _, _ in muts})
    table = position_log_probs(model, vocab, assay.wt, positions, options).double().numpy()  # (P, C)
    row = {p: k for k, p in enumerate(positions)}
    index = {
        letter: ESM2_VOCAB.index(letter) for letter in set(assay.wt) | {m for ms in assay.mutations for *_, m in ms}
    }
    return np.array(
        [sum(table[row[p], index[m]] - table[row[p], index[w]] for p, w, m in muts) for muts in assay.mutations]
    )


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(spearmanr(x, y).statistic)


# ---------------------------------------------------------------------------------------------------- outputs


def write_outputs(out: Path, rows: list, assays: list, scores: dict, text: str) -> None:
    """zeroshot.csv (rows), scores.csv (assay, mutant, DMS_score, one column per model), zeroshot.md (text)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "zeroshot.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    models = list(scores)
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["assay", "mutant", "DMS_score", *models])
        for assay in assays:
            columns = [scores[m][assay.name] for m in models]  # each (n,)
            for i, mutant in enumerate(assay.mutants):
                writer.writerow(
                    [assay.name, mutant, repr(float(assay.scores[i])), *(repr(float(c[i])) for c in columns)]
                )
    (out / "zeroshot.md").write_text(text)


def report(rows: list, assays: list, options: ScoreOptions, command: str) -> str:
    """Markdown: one row per assay, one Spearman column per model, then how the numbers were made."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    rho = {(r["model"], r["assay"]): r["spearman"] for r in rows}
    columns = ["assay", "variants", "positions", *[f"Spearman {short_name(m)}" for m in models]]
    table = markdown_table(
        [
            [a.name, len(a.mutants), len({p for ms in a.mutations for p, *_ in ms}), *[rho[m, a.name] for m in models]]
            for a in assays
        ],
        columns,
    )
    params = "; ".join(f"`{m}`: {next(r['parameters'] for r in rows if r['model'] == m):,} parameters" for m in models)
    return (
        f"# Zero-shot variant effects ({options.scoring})\n\n{table}\n\n"
        f"Spearman between the model score and DMS_score (sign as the assay publishes it). Scoring: "
        f"{options.scoring} (Meier et al. 2021), windows of max_length - 2 residues centred on each position where a "
        f"protein is longer than the model's context. Models: {params}.\n\n" + "\n".join(stamp(command))
    )


# ---------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.zeroshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", action="extend", required=True, metavar="CKPT", help="checkpoint dirs/ids")
    p.add_argument("--dms", nargs="+", action="extend", default=[], metavar="FILE.csv", help="ProteinGym DMS CSVs")
    p.add_argument("--builtin", action="store_true", help="add the mavenn set (GB1, TDP-43, Abeta42)")
    p.add_argument("--builtin-dir", default="data/quality/dms", help="where --builtin is prepared once")
    p.add_argument("--scoring", choices=SCORINGS, default="masked-marginal")
    p.add_argument("--max-length", type=int, default=1024, help="upper bound on tokens per forward (<cls>+<eos> in)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="token slots per forward batch")
    p.add_argument("--out", required=True, metavar="DIR")
    return p


def _inputs(args) -> list:
    files = [Path(f) for f in args.dms]
    if args.builtin:
        from eval.quality.dms import DmsFetchError, prepare, prepared_files

        try:
            files += prepared_files(args.builtin_dir)
        except DmsFetchError:
            print(f"eval.zeroshot: preparing the built-in DMS set into {args.builtin_dir}", file=sys.stderr)
            try:
                prepare(args.builtin_dir)
                files += prepared_files(args.builtin_dir)
            except DmsFetchError as err:
                raise DmsError(f"--builtin: {err}") from err
    if not files:
        raise DmsError("no assays: give --dms FILE.csv and/or --builtin")
    assays = [read_dms(f) for f in files]
    names = [a.name for a in assays]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise DmsError(f"assay names (file stems) {clash} occur twice; rename a file")
    return assays


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        if len(set(args.model)) != len(args.model):
            raise DmsError(f"--model: a checkpoint is named twice ({args.model})")
        assays = _inputs(args)  # every file checked before any model is loaded
        specs = [inspect_model(name) for name in args.model]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rows, scores = [], {}
        for spec in specs:
            model = load_model(spec, device)
            options = ScoreOptions(args.scoring, min(args.max_length, spec.max_length), args.batch_tokens)
            scores[spec.name] = {}
            for assay in assays:
                start = time.perf_counter()
                values = score_assay(model, spec.vocab, assay, options)
                scores[spec.name][assay.name] = values
                rows.append(
                    {
                        "model": spec.name,
                        "assay": assay.name,
                        "variants": len(assay.mutants),
                        "positions": len({p for ms in assay.mutations for p, *_ in ms}),
                        "spearman": spearman(values, assay.scores),
                        "scoring": options.scoring,
                        "max_length": options.max_length,
                        "windowed": len(assay.wt) + 2 > options.max_length,
                        "parameters": model.num_parameters(),
                        "seconds": round(time.perf_counter() - start, 3),
                    }
                )
                print(f"{short_name(spec.name)} {assay.name}: Spearman {rows[-1]['spearman']:.4f}", file=sys.stderr)
            del model
    except (DmsError, EvalError, ValueError) as err:
        print(f"eval.zeroshot: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    text = report(rows, assays, options, "python -m eval.zeroshot " + shlex.join(argv))
    write_outputs(out, rows, assays, scores, text)
    print(text)
    print(f"wrote {out / 'zeroshot.csv'}, scores.csv, zeroshot.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
