"""Embed proteins with a checkpoint: mean-pooled, <cls> or per-residue vectors of any layer, streamed to parquet.

    python -m eval.embed --model CKPT_OR_HUB_ID --input FILE [FILE ...] --out emb.parquet \\
        [--pool mean|cls|none] [--layer N] [--batch-tokens N] [--chunk-proteins N] [--crop] [--dtype D]
        [--layout auto|packed|padded]

Models: any checkpoint `AutoModel` loads: speedplm checkpoints, transformers' EsmModel / ESM2 from the Hub.
Layouts: `packed` (models whose forward takes `document_ids`, i.e. speedplm): several proteins share a row, attention
stays inside each protein, positions restart per protein, no padding between them. `padded`: one protein per row,
padded to the longest row of its batch (proteins are length-sorted, so little padding). `auto` (default): packed when
the attention skips the masked blocks between packed proteins (speedplm with flex_attention, i.e. on CUDA), padded
otherwise: with a dense mask (SDPA on CPU) a packed row of max_length tokens pays attention over the whole row, which
costs more than the padding it saves (measured on CPU: python -m eval.perf.embed_benchmark). Both layouts give the same
vectors (within 1e-5 in float32).

Inputs: every source `python -m training.data prepare` reads (FASTA[.gz], CSV/TSV[.gz], parquet, arrow, dataset
folders, Hub datasets), validated by the same code with the same policy flags: a rejected record is never embedded;
it is listed (file, line, id, reason) in OUT with the suffix .report.json (the schema of prepare's report.json) and
the first ones are printed; accepted + rejected = read. A protein longer than the model allows (max_length - 2
residues, max_length = min(max_position_embeddings, tokenizer model_max_length)) is rejected ("too_long"), or with
--crop embedded from its first max_length - 2 residues (the eval loader's crop) and counted as `cropped`.

Streaming: the inputs are read in pieces of whole records (about 16 MiB of input each, as `prepare` reads them) and
validated piece by piece; the accepted proteins are taken in chunks of at most --chunk-proteins (default 16384);
each chunk is sorted by length (longest first), packed or padded into batches of about --batch-tokens
tokens, embedded and written before the next chunk is read. Memory is bounded by one chunk's tokens plus one row
group of output, whatever the number of proteins (the duplicate-id check, as in prepare, keeps one entry per id).

Output (parquet, written to OUT.partial and renamed to OUT only after the last row; removed on any error):
    index      int64   0-based position of the record among all records read (rejected ones included), in input
                       order across the --input files: sort by it to restore input order
    id, file, line     the record's id and where it is (as in report.json)
    length     int32   residues embedded (after --crop)
    embedding  fixed_size_list<float32>[hidden] (mean, cls) or list<fixed_size_list<float32>[hidden]> (none: one
               vector per residue, `length` of them)
Rows are in embedding order: chunk by chunk in input order, and within a chunk roughly longest first. One row group
per chunk at least (more when a chunk's output passes --row-group-mb).

Pooling: `mean` averages the residue tokens only (not <cls>, <eos> or padding), `cls` takes the <cls> token,
`none` keeps every residue token. --layer N takes hidden_states[N] (0 = embedding output, num_layers = last block,
negative counts from the end); without --layer, last_hidden_state (the final normed output; equal to
hidden_states[-1] in transformers' ESM). Vectors are computed in --dtype (auto: float32 on CPU, bfloat16 on CUDA),
pooled and stored in float32. Packed and one-protein-at-a-time outputs agree within 1e-5 in float32.

Devices: CUDA if available, else CPU (--device). On CUDA speedplm models run flex_attention (fully masked 128x128
blocks between packed proteins are skipped) on batches of one fixed shape (batch_tokens // max_length rows of
max_length tokens), so the compiled kernel is built once; on CPU (SDPA with a block-diagonal mask) a batch is cut to
its longest row.

Report (OUT.report.json): prepare's fields (read, accepted, rejected [{file, line, id, reason}], cropped,
rejected_by_reason, duplicate_ids, normalized, policy, ...) plus model, pool, layer, layout, output, row_groups,
residues (embedded), token_slots (token positions computed, padding included) and padding (their padding share).

Errors (missing model or input, bad --layer, existing OUT without --overwrite, unreadable input) print one line
naming the problem and exit 1 with no OUT file; argparse errors (unknown --pool) exit 2.

Public API
    load_embedder(name, *, layer=None, device=None, dtype="auto") -> Embedder   # EmbedError on a bad model/layer
    EmbedOptions(pool="mean", layer=None, batch_tokens=16384, policy=None, crop=False, chunk_proteins=16384,
                 row_group_mb=128, progress=True)      # what is embedded and how (the command's flags)
    embed_to_parquet(embedder, inputs, out, options=EmbedOptions(), *, source_kw=None, extra=None) -> report dict
    plan_batches(lengths, *, packed, max_length, batch_tokens, fixed_shape), build_inputs(...), embed_batch(...)
    main(argv=None) -> int
"""

import argparse
import dataclasses
import inspect
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from eval.checkpoints import EvalError, VocabMap, inspect_model
from training.data.loader import pack_best_fit
from training.data.prepare import PrepareRun, add_policy_arguments, parse_piece, policy_from_args, rejection_lines
from training.data.sources import HUB_ID, SourceError, iter_chunks
from training.data.validate import CLS, EOS, PAD, ValidationPolicy

POOLS = ("mean", "cls", "none")
LAYOUTS = ("auto", "packed", "padded")
CHUNK_PROTEINS = 16384
ROW_GROUP_MB = 128
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EmbedError(Exception):
    """A problem with the request (model, inputs, options); the message names it."""


# ---------------------------------------------------------------------------------------------------- model


@dataclass
class Embedder:
    """A loaded model and how to feed it: packed rows (document_ids) or padded rows."""

    name: str
    model: torch.nn.Module
    vocab: VocabMap  # ESM2 ids -> the model's ids
    packed: bool  # the layout: several proteins per row (document_ids) or one protein per row (attention_mask)
    max_length: int  # tokens per protein, <cls> and <eos> included
    hidden_size: int
    device: torch.device
    fixed_shape: bool  # every batch (rows, max_length): compiled flex attention then compiles once


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[choice]


def check_layer(layer: int | None, num_layers: int, name: str) -> None:
    """hidden_states has num_layers + 1 entries (the embedding output, then one per block)."""
    if layer is not None and not -(num_layers + 1) <= layer <= num_layers:
        raise EmbedError(
            f"--layer {layer}: model {name} has {num_layers} layers, so hidden_states[N] needs "
            f"{-(num_layers + 1)} <= N <= {num_layers}"
        )


def load_embedder(name: str, *, layer: int | None, device=None, dtype: str = "auto", layout: str = "auto") -> Embedder:
    """Config, tokenizer and --layer are checked before the weights are loaded. layout: auto | packed | padded."""
    import transformers
    from transformers import AutoModel

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        spec = inspect_model(name)
    except EvalError as err:
        raise EmbedError(str(err)) from err
    check_layer(layer, spec.config.num_hidden_layers, name)
    kwargs = dict(trust_remote_code=True, dtype=resolve_dtype(dtype, device))
    if spec.config.model_type == "esm":
        kwargs["add_pooling_layer"] = False  # the pooler is never used here (and absent from MLM checkpoints)
    elif spec.config.model_type == "speedplm" and device.type == "cuda":
        kwargs["attn_implementation"] = "flex_attention"  # skips the 128x128 blocks between packed proteins
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the unused LM head of an MLM checkpoint is expected, not news
    transformers.logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(name, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise EmbedError(f"model {name}: cannot load weights: {err}") from err
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    model = model.to(device).eval()
    takes_documents = "document_ids" in inspect.signature(model.forward).parameters
    block_sparse = getattr(model.config, "_attn_implementation", None) == "flex_attention"
    if layout == "packed" and not takes_documents:
        raise EmbedError(f"--layout packed: model {name} ({type(model).__name__}) takes no document_ids; use padded")
    packed = layout == "packed" or (layout == "auto" and takes_documents and block_sparse)
    fixed = packed and block_sparse
    return Embedder(name, model, spec.vocab, packed, spec.max_length, spec.config.hidden_size, device, fixed)


# ---------------------------------------------------------------------------------------------------- batches


def plan_batches(lengths: np.ndarray, *, packed: bool, max_length: int, batch_tokens: int, fixed_shape: bool):
    """Group proteins (given longest first) into batches of rows.

    lengths: (N,) residues per protein. Returns a list of batches; a batch is (rows, L): rows a list of arrays of
    protein positions (a packed row holds several), L the row length. Packed rows are filled by best fit to
    max_length tokens; a batch takes rows while rows x L stays within batch_tokens (at least one row). fixed_shape:
    every batch is (batch_tokens // max_length) x max_length, so compiled attention sees one shape."""
    tokens = lengths + 2  # (N,) <cls> + residues + <eos>
    if packed:
        order, offsets = pack_best_fit(tokens, max_length)
        rows = [order[offsets[r] : offsets[r + 1]] for r in range(len(offsets) - 1)]
        used = np.array([int(tokens[row].sum()) for row in rows])
        rows = [rows[r] for r in np.argsort(-used, kind="stable")]  # similar rows together: little trailing padding
        used = -np.sort(-used, kind="stable")
    else:
        rows = [np.array([i]) for i in range(len(tokens))]
        used = tokens
    if fixed_shape:
        per = max(1, batch_tokens // max_length)
        return [(rows[i : i + per], max_length) for i in range(0, len(rows), per)]
    batches, start = [], 0
    while start < len(rows):
        L = int(used[start])  # the longest row of the batch comes first
        stop = start + max(1, batch_tokens // L)
        batches.append((rows[start:stop], L))
        start = stop
    return batches


def build_inputs(tokens: list, rows: list, length: int, n_rows: int | None = None) -> dict:
    """Numpy inputs of one batch. tokens: (n,) uint8 residue ids per protein (ESM2 ids).

    Returns input_ids (B, L) uint8, document_ids (B, L) int32 (-1 on padding), position_ids (B, L) int64 (0 at each
    <cls>), owner (B, L) int64 (protein index within the batch on residue tokens, -1 elsewhere) and cls (P, 2) the
    (row, column) of each protein's <cls>; proteins are numbered in row order."""
    B = n_rows or len(rows)
    ids = np.full((B, length), PAD, dtype=np.uint8)
    doc = np.full((B, length), -1, dtype=np.int32)
    pos = np.zeros((B, length), dtype=np.int64)
    owner = np.full((B, length), -1, dtype=np.int64)
    cls, ramp, p_index = [], np.arange(length, dtype=np.int64), 0
    for r, row in enumerate(rows):
        p = 0
        for k, i in enumerate(row):
            n = len(tokens[i])
            ids[r, p], ids[r, p + 1 : p + 1 + n], ids[r, p + 1 + n] = CLS, tokens[i], EOS
            doc[r, p : p + n + 2] = k
            pos[r, p : p + n + 2] = ramp[: n + 2]
            owner[r, p + 1 : p + 1 + n] = p_index
            cls.append((r, p))
            p, p_index = p + n + 2, p_index + 1
    return dict(input_ids=ids, document_ids=doc, position_ids=pos, owner=owner, cls=np.array(cls, dtype=np.int64))


@torch.inference_mode()
def embed_batch(emb: Embedder, inputs: dict, pool: str, layer: int | None) -> np.ndarray:
    """float32 vectors of one batch, proteins in row order: (P, hidden) for mean/cls, (residues, hidden) for none."""
    dev = emb.device
    input_ids = emb.vocab.model_ids(torch.from_numpy(inputs["input_ids"]).long()).to(dev)
    document_ids = torch.from_numpy(inputs["document_ids"]).to(dev)
    if emb.packed:
        kwargs = dict(document_ids=document_ids, position_ids=torch.from_numpy(inputs["position_ids"]).to(dev))
    else:  # one protein a row: positions are the default ones
        kwargs = dict(attention_mask=(document_ids >= 0).long())
    out = emb.model(input_ids=input_ids, output_hidden_states=layer is not None, **kwargs)
    hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]  # (B, L, H)
    if pool == "cls":
        cls = torch.from_numpy(inputs["cls"]).to(dev)
        return hidden[cls[:, 0], cls[:, 1]].float().cpu().numpy()  # (P, H)
    owner = torch.from_numpy(inputs["owner"]).to(dev)
    residues = owner >= 0  # (B, L)
    flat = hidden[residues].float()  # (T, H) residue vectors, proteins in row order
    if pool == "none":
        return flat.cpu().numpy()
    who = owner[residues]  # (T,)
    count = len(inputs["cls"])
    sums = torch.zeros(count, flat.shape[1], dtype=torch.float32, device=dev).index_add_(0, who, flat)
    n = torch.bincount(who, minlength=count).clamp(min=1).unsqueeze(1)
    return (sums / n).cpu().numpy()  # (P, H)


# ---------------------------------------------------------------------------------------------------- output


class ParquetSink:
    """Buffered rows -> one parquet row group per flush; see the module docstring for the schema."""

    def __init__(self, path: Path, hidden: int, per_residue: bool, row_group_bytes: int):
        self.hidden, self.per_residue, self.limit = hidden, per_residue, row_group_bytes
        vector = pa.list_(pa.float32(), hidden)
        self.schema = pa.schema(
            [
                ("index", pa.int64()),
                ("id", pa.string()),
                ("file", pa.string()),
                ("line", pa.int64()),
                ("length", pa.int32()),
                ("embedding", pa.list_(vector) if per_residue else vector),
            ]
        )
        self.writer = pq.ParquetWriter(path, self.schema)
        self.parts: list[dict] = []
        self.bytes = 0
        self.row_groups = 0

    def add(self, index, ids, files, lines, lengths, vectors: np.ndarray) -> None:
        """One batch: per-protein columns and vectors (P, H) or (sum of lengths, H) for per-residue output."""
        self.parts.append(dict(index=index, id=ids, file=files, line=lines, length=lengths, vectors=vectors))
        self.bytes += vectors.nbytes
        if self.bytes >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        column = {k: np.concatenate([p[k] for p in self.parts]) for k in ("index", "line", "length")}
        vectors = np.concatenate([p["vectors"] for p in self.parts]).astype(np.float32, copy=False)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.hidden)
        if self.per_residue:
            offsets = np.zeros(len(column["length"]) + 1, dtype=np.int32)
            np.cumsum(column["length"], out=offsets[1:])
            embedding = pa.ListArray.from_arrays(pa.array(offsets), embedding)
        table = pa.Table.from_arrays(
            [
                pa.array(column["index"], pa.int64()),
                pa.array([x for p in self.parts for x in p["id"]], pa.string()),
                pa.array([x for p in self.parts for x in p["file"]], pa.string()),
                pa.array(column["line"], pa.int64()),
                pa.array(column["length"], pa.int32()),
                embedding,
            ],
            schema=self.schema,
        )
        self.writer.write_table(table, row_group_size=len(table))  # one row group
        self.row_groups += 1
        self.parts, self.bytes = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


class _Collect:
    """PrepareRun's "shard writer" for embedding: keeps the accepted piece's tokens instead of writing shards."""

    def add(self, tokens: np.ndarray, lengths: np.ndarray, crcs: np.ndarray) -> None:
        self.tokens, self.lengths = tokens, lengths


class Window(NamedTuple):
    """Accepted records, in input order: where they are and their residue ids."""

    index: np.ndarray  # (A,) int64 position of each record among all records read
    ids: list  # (A,) str
    files: list  # (A,) str
    lines: np.ndarray  # (A,) int64
    tokens: list  # (A,) of (n,) uint8 residue ids


def accepted_windows(run: PrepareRun, inputs, chunk_proteins: int, **source_kw) -> Iterator[Window]:
    """The accepted records of `inputs` (read in training.data.sources' pieces of whole records and validated by
    prepare's own code), in input order, in windows of `chunk_proteins` (the last one shorter)."""
    collect = run.writers[""]
    buffer: list[Window] = []  # windows of one piece each, chunk_proteins records at most in all
    held = 0
    for source in inputs:
        for chunk in iter_chunks(source, **source_kw):
            first = run.read  # index of the piece's first record among all records read
            piece = parse_piece(chunk, run.policy, run.ids is not None, run.needs_seq_keys)
            kept = run.feed(piece)  # (A,) indexes in the piece of the accepted records
            if not len(kept):
                continue
            ends = np.cumsum(collect.lengths).tolist()
            tokens = [collect.tokens[e - n : e] for e, n in zip(ends, collect.lengths.tolist())]
            ids = [piece.id(i) for i in kept.tolist()]
            whole = Window(first + kept, ids, [piece.file] * len(kept), piece.lines[kept], tokens)
            start = 0
            while start < len(kept):
                take = min(chunk_proteins - held, len(kept) - start)
                buffer.append(Window(*(field[start : start + take] for field in whole)))
                held, start = held + take, start + take
                if held == chunk_proteins:
                    yield _joined(buffer)
                    buffer, held = [], 0
    if buffer:
        yield _joined(buffer)


def _joined(parts: list) -> Window:
    return Window(
        np.concatenate([p.index for p in parts]),
        [x for p in parts for x in p.ids],
        [x for p in parts for x in p.files],
        np.concatenate([p.lines for p in parts]),
        [x for p in parts for x in p.tokens],
    )


# ---------------------------------------------------------------------------------------------------- run


def check_inputs(inputs) -> None:
    for source in inputs:
        if not Path(source).exists() and not HUB_ID.match(str(source)):
            raise EmbedError(f"--input {source}: no such file or directory")


@dataclass(frozen=True, kw_only=True)
class EmbedOptions:
    """What is embedded and how (the command's flags): pooling, layer (None: last_hidden_state), token slots per
    forward, validation policy (None: the default one), --crop, proteins per chunk, row-group size, progress bar."""

    pool: str = "mean"
    layer: int | None = None
    batch_tokens: int = 16384
    policy: ValidationPolicy | None = None
    crop: bool = False
    chunk_proteins: int = CHUNK_PROTEINS
    row_group_mb: float = ROW_GROUP_MB
    progress: bool = True


def embed_to_parquet(
    emb: Embedder,
    inputs,
    out,
    options: EmbedOptions = EmbedOptions(),
    *,
    source_kw: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Validate, embed and write `inputs` to `out` (parquet) and `out`.report.json; returns the report.
    source_kw: the readers' options (split, sequence_column, id_column); extra: more fields for the report."""
    from tqdm.auto import tqdm

    pool, layer, batch_tokens, policy = options.pool, options.layer, options.batch_tokens, options.policy
    crop, chunk_proteins = options.crop, options.chunk_proteins

    if pool not in POOLS:
        raise EmbedError(f"--pool {pool!r}: choose one of {', '.join(POOLS)}")
    check_layer(layer, emb.model.config.num_hidden_layers, emb.name)
    out = Path(out)
    limit = emb.max_length - 2  # residues a protein may have
    policy = policy or ValidationPolicy()
    if not crop:
        user = policy.reject_longer_than
        policy = dataclasses.replace(policy, reject_longer_than=min(limit, user or limit))
    run = PrepareRun({"": _Collect()}, policy, emb.max_length, dedup=False, fractions=None)
    partial = out.with_name(out.name + ".partial")
    sink = ParquetSink(partial, emb.hidden_size, pool == "none", int(options.row_group_mb * 2**20))
    bar = tqdm(desc="embed", unit=" proteins", disable=not options.progress, dynamic_ncols=True, file=sys.stderr)
    done, residues, slots = False, 0, 0  # slots: token positions computed, padding included
    try:
        for window in accepted_windows(run, inputs, chunk_proteins, **(source_kw or {})):
            tokens = [t[:limit] for t in window.tokens]  # (n,) each
            lengths = np.array([len(t) for t in tokens], dtype=np.int64)
            order = np.argsort(-lengths, kind="stable")  # longest first: an out-of-memory shows at once
            for rows, L in plan_batches(
                lengths[order],
                packed=emb.packed,
                max_length=emb.max_length,
                batch_tokens=batch_tokens,
                fixed_shape=emb.fixed_shape,
            ):
                rows = [order[row] for row in rows]  # positions among the accepted records of the chunk
                n_rows = max(1, batch_tokens // L) if emb.fixed_shape else None
                batch = build_inputs(tokens, rows, L, n_rows)  # (B, L) tensors; `inputs` stays the input files
                vectors = embed_batch(emb, batch, pool, layer)
                slots += batch["input_ids"].size
                which = np.concatenate(rows)  # (P,) in row order, as the vectors
                sink.add(
                    window.index[which],
                    [window.ids[i] for i in which.tolist()],
                    [window.files[i] for i in which.tolist()],
                    window.lines[which],
                    lengths[which].astype(np.int32),
                    vectors,
                )
                residues += int(lengths[which].sum())
                bar.update(len(which))
                bar.set_postfix_str(f"{residues / max(bar.format_dict['elapsed'], 1e-9):,.0f} residues/s")
            sink.flush()  # the chunk is on disk before the next one is read
        sink.close()
        done = True
    except SourceError as err:
        raise EmbedError(str(err)) from err
    finally:
        bar.close()
        if not done:
            sink.writer.close()
            partial.unlink(missing_ok=True)
    extra = dict(
        model=emb.name,
        pool=pool,
        layer=layer,
        layout="packed" if emb.packed else "padded",
        output=str(out),
        row_groups=sink.row_groups,
        residues=residues,
        token_slots=slots,
        padding=round(1 - (residues + 2 * run.accepted) / slots, 4) if slots else 0.0,
        too_long=("crop" if crop else "reject") + f" beyond {limit} residues",
        **(extra or {}),
    )
    report = run.report(list(inputs), extra)
    report_path = out.with_suffix(".report.json")
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(partial, out)
    return report


def summary(report: dict, out: Path, show: int = 10) -> str:
    """prepare's stdout summary, for an embedding run."""
    layer = "last_hidden_state" if report["layer"] is None else f"hidden_states[{report['layer']}]"
    groups = f"{report['row_groups']} row group" + ("" if report["row_groups"] == 1 else "s")
    head = (
        f"embedded {out}: read {report['read']}  accepted {report['accepted']}  rejected {len(report['rejected'])}  "
        f"cropped {report['cropped']}  ({report['pool']} pooling, {layer}, {report['layout']} rows, {groups}, "
        f"{report['padding']:.1%} padding)"
    )
    return "\n".join([head] + rejection_lines(report, out.with_suffix(".report.json"), show))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.embed",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--model", required=True, help="checkpoint folder or Hub id (speedplm or transformers ESM)")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="FASTA/CSV/TSV/parquet/arrow/dir/Hub id")
    p.add_argument("--out", required=True, help="output parquet file")
    p.add_argument("--pool", choices=POOLS, default="mean")
    p.add_argument("--layer", type=int, help="hidden_states[N] (default: last_hidden_state)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="token slots per forward (padding included)")
    p.add_argument("--chunk-proteins", type=int, default=CHUNK_PROTEINS, help="proteins read, sorted and embedded")
    p.add_argument("--row-group-mb", type=float, default=ROW_GROUP_MB, help="flush a row group beyond this size")
    p.add_argument("--crop", action="store_true", help="embed the first max_length - 2 residues of longer proteins")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: float32 on CPU, bf16 on CUDA")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--layout", choices=LAYOUTS, default="auto", help="auto: packed on flex_attention, else padded")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--split", help="split of a dataset dir / Hub dataset to read")
    p.add_argument("--sequence-column", default="sequence")
    p.add_argument("--id-column")
    add_policy_arguments(p)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    try:
        if args.batch_tokens < 1 or args.chunk_proteins < 1:
            raise EmbedError("--batch-tokens and --chunk-proteins must be >= 1")
        if out.exists() and not args.overwrite:
            raise EmbedError(f"--out {out}: already exists (pass --overwrite to replace it)")
        if not out.parent.is_dir():
            raise EmbedError(f"--out {out}: folder {out.parent} does not exist")
        check_inputs(args.input)
        policy = policy_from_args(args)
        emb = load_embedder(args.model, layer=args.layer, device=args.device, dtype=args.dtype, layout=args.layout)
        options = EmbedOptions(
            pool=args.pool,
            layer=args.layer,
            batch_tokens=args.batch_tokens,
            policy=policy,
            crop=args.crop,
            chunk_proteins=args.chunk_proteins,
            row_group_mb=args.row_group_mb,
            progress=not args.no_progress,
        )
        report = embed_to_parquet(
            emb,
            args.input,
            out,
            options,
            source_kw=dict(split=args.split, sequence_column=args.sequence_column, id_column=args.id_column),
        )
    except (EmbedError, ValueError) as err:
        print(f"eval.embed: error: {err}", file=sys.stderr)
        return 1
    print(summary(report, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
