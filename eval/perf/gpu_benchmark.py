"""GPU benchmark of the speedplm fast path: parity, per-kernel time, Newton-Schulz, attention, end-to-end train step.

    python -m eval.perf.gpu_benchmark              # fresh H100/H200 with torch, triton, transformers: < 8 minutes
    python -m eval.perf.gpu_benchmark --dry-run    # tiny shapes on CPU (Triton interpreter): a smoke test, < 1 minute

Nothing is installed or downloaded (only torch, triton, transformers, accelerate and PyYAML are imported). All tables
are printed at the end, after the progress log (and written to --out). Times are medians (triton.testing.do_bench on
CUDA; perf_counter on CPU), compared side by side in one run. Shapes are the speedrun-133m ones: hidden 768, MLP 2048,
6 heads x 128, 64 packed rows x 1024 = 65536 tokens per forward (configs/speedrun-133m.yaml's micro-batch). Sections
run by priority (parity, end-to-end kernels on/off, per kernel, Newton-Schulz, attention, end-to-end one kernel at a
time) and are skipped once the time budget is spent.
"""

import argparse
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU allowed (Triton interpreter)")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the model train-step table")
    parser.add_argument("--e2e-steps", type=int, default=10, help="timed train steps per variant")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (default: by GPU)")
    parser.add_argument("--budget-s", type=float, default=450, help="later sections are skipped past this")
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else parse_args([])

import torch  # noqa: E402  (torch does not import triton; the model's flex-attention import, via torch._dynamo, does)

if ARGS.dry_run and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch.nn.functional as F  # noqa: E402

from eval.tables import markdown_table  # noqa: E402
from modeling_speedplm import kernels_speedplm as K  # noqa: E402
from training.data.collator import EVAL_MASK_RATE, IGNORE_INDEX  # noqa: E402
from training.data.validate import FIRST_RESIDUE, LAST_STANDARD, MASK  # noqa: E402
from training.throughput import peak_flops  # noqa: E402

CUDA = torch.cuda.is_available()
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "speedrun-133m.yaml"
DEVICE = torch.device("cuda" if CUDA else "cpu")
START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - START


def log(msg):
    print(f"[{elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)


def shapes(dry: bool) -> dict:
    if dry:
        # one wide and one tall matrix: both Newton-Schulz orientations (the interpreter makes each cost seconds)
        return dict(batch=2, length=16, hidden=32, mlp=48, heads=2, head_dim=16, ns=[(32, 48), (48, 32)])
    # speedrun-133m; Muon matrices per block: o (768x768), up (2048x768), down (768x2048), qkv (2304x768)
    return dict(
        batch=64,
        length=1024,
        hidden=768,
        mlp=2048,
        heads=6,
        head_dim=128,
        ns=[(768, 768), (2048, 768), (768, 2048), (2304, 768)],
    )


def bench_ms(fn) -> float:
    """Median milliseconds of fn()."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    fn()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compiled(fn):
    # --dry-run: aot_eager exercises the same tracing (fake kernels, autograd) without inductor's C++ build on CPU.
    return torch.compile(fn, backend="inductor" if CUDA else "aot_eager", fullgraph=True, dynamic=False)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def parity_ok(triton_err: float, torch_err: float) -> str:
    # The Triton kernels round once where the twins round several times: they should never be clearly worse.
    return "ok" if triton_err <= 2 * torch_err + 1e-3 else "CHECK"


def table(title, headers, rows) -> str:
    return f"\n## {title}\n\n" + markdown_table(rows, headers, fmt=lambda c: c if isinstance(c, str) else f"{c:.4g}")


# ------------------------------------------------------------------------------------------------------ inputs


def protein_lengths(total: int, gen: torch.Generator, max_len: int = 1024) -> list[int]:
    """Protein-like lengths (log-normal, median ~300 residues, clipped to [30, max_len]) filling `total` tokens."""
    lengths = []
    while sum(lengths) < total:
        n = int(torch.empty(1).log_normal_(mean=5.7, std=0.6, generator=gen).clamp(30, max_len).item())
        lengths.append(min(n, total - sum(lengths)))
    return lengths


def document_ids(batch, length, gen):
    """(B, L) document id per token (packed, no padding) and the list of all document lengths."""
    rows, all_lengths = [], []
    for _ in range(batch):
        lengths = protein_lengths(length, gen)
        rows.append(torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]))
        all_lengths += lengths
    return torch.stack(rows), all_lengths


def rotary_tables(docs, dim):
    """cos, sin (B, L, D/2) for packed documents: the model's own positions and RotaryEmbedding."""
    from modeling_speedplm.modeling_speedplm import RotaryEmbedding, positions_from

    return RotaryEmbedding(dim, 10000.0)(positions_from(docs))


def qk_fp64(q, k, cos, sin, eps):
    cos, sin = cos.double()[:, :, None], sin.double()[:, :, None]

    def one(x):
        x = x.double()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    return one(q), one(k)


def ns_fp64(g, steps=5, coefficients=K.NS_COEFFICIENTS):
    a, b, c = coefficients
    x = g.double()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


# ------------------------------------------------------------------------------------------------------ sections


def kernel_inputs(s):
    gen = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    n_tok = s["batch"] * s["length"]
    x = torch.randn(n_tok, s["hidden"], generator=gen).to(DEVICE, dt).requires_grad_()
    w = (torch.randn(s["mlp"], s["hidden"], generator=gen) * s["hidden"] ** -0.5).to(DEVICE, dt).requires_grad_()
    g = torch.randn(n_tok, s["mlp"], generator=gen).to(DEVICE, dt)
    qkv = torch.randn(s["batch"], s["length"], 3, s["heads"], s["head_dim"], generator=gen).to(DEVICE, dt)
    q, k = (t.detach().requires_grad_() for t in qkv.unbind(2)[:2])  # strided views of a fused qkv, as in the model
    docs = document_ids(s["batch"], s["length"], gen)[0].to(DEVICE)
    cos, sin = rotary_tables(docs, s["head_dim"])
    gq, gk = (torch.randn(q.shape, generator=gen).to(DEVICE, dt) for _ in range(2))
    return dict(x=x, w=w, g=g, q=q, k=k, cos=cos, sin=sin, gq=gq, gk=gk, eps=1e-6)


def kernel_parity_rows(s):
    """Relative error of the Triton kernels and of their torch twins against an fp64 reference."""
    t = kernel_inputs(s)
    x, w, g, q, k, cos, sin, gq, gk, eps = (t[n] for n in ("x", "w", "g", "q", "k", "cos", "sin", "gq", "gk", "eps"))
    log("parity: linear_relu2")
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = F.relu(x64 @ w64.T).square()
    ref = (y64, *torch.autograd.grad(y64, (x64, w64), g.double()))
    errs = []
    for fn in (K.linear_relu2, K.linear_relu2_reference):
        y = fn(x, w)
        errs.append([rel_err(a, b) for a, b in zip((y, *torch.autograd.grad(y, (x, w), g)), ref)])
    parity = [["linear_relu2", name, *e] for name, *e in zip(("out", "grad x", "grad w"), *errs)]
    log("parity: qk_norm_rotary")
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    o64 = qk_fp64(q64, k64, cos, sin, eps)
    ref = (*o64, *torch.autograd.grad(o64, (q64, k64), (gq.double(), gk.double())))
    errs = []
    for fn in (K.qk_norm_rotary, K.qk_norm_rotary_reference):
        out = fn(q, k, cos, sin, eps)
        errs.append([rel_err(a, b) for a, b in zip((*out, *torch.autograd.grad(out, (q, k), (gq, gk))), ref)])
    parity += [["qk_norm_rotary", name, *e] for name, *e in zip(("q out", "k out", "grad q", "grad k"), *errs)]
    for shape in s["ns"]:
        gen = torch.Generator().manual_seed(1)
        G = torch.randn(*shape, generator=gen).to(DEVICE)
        xb = G.bfloat16()
        x64 = xb.double() @ xb.double().T
        parity.append(["xxt", f"{shape[0]}x{shape[1]}", rel_err(K.xxt(xb), x64), rel_err(K.xxt_reference(xb), x64)])
        ref = ns_fp64(G)
        parity.append(
            [
                "newton_schulz",
                f"{shape[0]}x{shape[1]}",
                rel_err(K.newton_schulz(G, use_triton=True), ref),
                rel_err(K.newton_schulz_reference(G), ref),
            ]
        )
    return parity


def kernel_timing_rows(s):
    """Forward and forward+backward time of each fused kernel vs its torch twin, eager and torch.compile'd."""
    t = kernel_inputs(s)
    x, w, g, q, k, cos, sin, gq, gk, eps = (t[n] for n in ("x", "w", "g", "q", "k", "cos", "sin", "gq", "gk", "eps"))
    timing = []
    n_tok = s["batch"] * s["length"]
    flops = 2 * n_tok * s["hidden"] * s["mlp"]
    impls = [
        ("triton", K.linear_relu2),
        ("torch eager", K.linear_relu2_reference),
        ("torch.compile", compiled(K.linear_relu2_reference)),
    ]
    for name, fn in impls:
        log(f"time: linear_relu2 {name}")
        fwd = bench_ms(lambda fn=fn: fn(x.detach(), w.detach()))
        fb = bench_ms(lambda fn=fn: torch.autograd.grad(fn(x, w), (x, w), g))
        timing.append(
            ["linear_relu2", name, fwd, fb, f"{flops / fwd / 1e9:.4g} TFLOP/s", f"{3 * flops / fb / 1e9:.4g} TFLOP/s"]
        )
    qk_bytes = 4 * q.numel() * q.element_size()  # read q, k; write q, k
    impls = [
        ("triton", K.qk_norm_rotary),
        ("torch eager", K.qk_norm_rotary_reference),
        ("torch.compile", compiled(K.qk_norm_rotary_reference)),
    ]
    for name, fn in impls:
        log(f"time: qk_norm_rotary {name}")
        fwd = bench_ms(lambda fn=fn: fn(q.detach(), k.detach(), cos, sin, eps))
        fb = bench_ms(lambda fn=fn: torch.autograd.grad(fn(q, k, cos, sin, eps), (q, k), (gq, gk)))
        timing.append(
            [
                "qk_norm_rotary",
                name,
                fwd,
                fb,
                f"{qk_bytes / fwd / 1e6:.4g} GB/s",
                f"{2.5 * qk_bytes / fb / 1e6:.4g} GB/s",
            ]
        )
    return timing


def newton_schulz_rows(s):
    """Muon's orthogonalisation per matrix shape, one matrix at a time and as a stack of the model's 24 blocks."""
    rows = []
    depth = 3 if ARGS.dry_run else 24  # speedrun-133m: 24 blocks, each with o, up, down, qkv
    for stack in (None, depth):
        for shape in s["ns"]:
            log(f"newton-schulz {shape} stack {stack}")
            # one compiled function per shape: a single one would recompile per shape (dynamic=False) and reach
            # dynamo's recompile limit (8 by default), past which the "torch.compile" column would silently be eager
            compiled_ref = compiled(K.newton_schulz_reference)
            g = torch.randn(*(() if stack is None else (stack,)), *shape, device=DEVICE)
            t_tri = bench_ms(lambda g=g: K.newton_schulz(g, use_triton=True))
            t_ref = bench_ms(lambda g=g: K.newton_schulz_reference(g))
            t_cmp = bench_ms(lambda g=g, f=compiled_ref: f(g))
            name = f"{shape[0]}x{shape[1]}" if stack is None else f"{stack} x {shape[0]}x{shape[1]} stacked"
            rows.append([name, t_tri, t_ref, t_cmp, t_ref / t_tri, t_cmp / t_tri])
    n = len(s["ns"])
    if len(rows) == 2 * n:  # a whole step of the model's Muon matrices, on one GPU
        one_by_one = [depth * sum(r[i] for r in rows[:n]) for i in (1, 2, 3)]
        stacked = [sum(r[i] for r in rows[n:]) for i in (1, 2, 3)]
        for name, t in (("all blocks, one at a time", one_by_one), ("all blocks, stacked by shape", stacked)):
            rows.append([name, *t, t[1] / t[0], t[2] / t[0]])
    return rows


def attention_rows(s):
    """FlexAttention (block mask over packed proteins, compiled) vs SDPA with a dense (B, 1, L, L) boolean mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    from modeling_speedplm import attention_speedplm as A

    gen = torch.Generator().manual_seed(2)
    batch, length, heads, dim = s["batch"], s["length"], s["heads"], s["head_dim"]
    q, k, v, grad = (torch.randn(batch, heads, length, dim, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    docs = document_ids(batch, length, gen)[0].to(DEVICE)
    scale = dim**-0.5
    log("attention: masks")
    block_mask = A.flex_block_mask(docs, None)
    dense = A.dense_attention_mask(docs, None)
    rows = [["block mask build (model: eager)", bench_ms(lambda: A.flex_block_mask(docs, None)), "", "", ""]]
    if CUDA:  # the compiled builder; the model uses the eager one unless this row shows it matters
        mod = A.document_mask_mod(docs)
        compiled_build = lambda: create_block_mask(mod, batch, None, length, length, device=DEVICE, _compile=True)  # noqa
        rows.append(["block mask build (_compile=True)", bench_ms(compiled_build), "", "", ""])
    rows.append(["dense mask build (SDPA)", bench_ms(lambda: A.dense_attention_mask(docs, None)), "", "", ""])
    flex = A._flex() if CUDA else A.flex_attention  # the CPU dry run: eager flex, forward only
    impls = [
        (
            "flex_attention (compiled, block mask)" if CUDA else "flex_attention (eager)",
            lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale),
        ),
        (
            "sdpa (dense bool mask)",
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale),
        ),
    ]
    # fp32 reference on the first row of the batch only: (H, L, L) scores fit in memory
    ref, _ = A.eager_attention_forward(None, *(t[:1].detach().float() for t in (q, k, v)), dense[:1], scale)
    ref = ref.transpose(1, 2)  # (1, H, L, D) like the backends below
    for name, fn in impls:
        log(f"attention: {name}")
        err = rel_err(fn(q.detach(), k.detach(), v.detach())[:1], ref)
        fwd = bench_ms(lambda fn=fn: fn(q.detach(), k.detach(), v.detach()))
        fb = bench_ms(lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), grad)) if CUDA else float("nan")
        rows.append([name, fwd, fb, err, ""])
    computed = block_mask.kv_num_blocks.sum() + (
        0 if block_mask.full_kv_num_blocks is None else block_mask.full_kv_num_blocks.sum()
    )
    n_blocks = -(-length // 128)
    rows[-2][4] = f"{100 * computed.item() / (batch * n_blocks * n_blocks):.1f}% of 128x128 blocks computed"
    return rows


def end_to_end_rows(s, variants) -> tuple[list, list[str]]:
    """Train-step tokens/s, MFU and peak memory of the model for each `kernels` setting in `variants`.

    SpeedPLMForMaskedLM(SpeedPLMConfig.from_preset("speedrun-133m", kernels=...)), bf16 autocast, flex attention,
    each block compiled (regional torch.compile, as the trainer does), the trainer's optimizers (Muon for the block
    matrices, Adam for the rest: training/optim/), gradient clipping, one host sync per step for the loss; packed
    batches of 64 x 1024 tokens with protein-like documents, 15% of tokens scored. FLOPs per token:
    training/throughput.py (matmul weights, LM head on the scored 15%, attention over the attended context
    C = sum(doc_len^2) / tokens with document masking).
    """
    notes = []
    preset, (batch, length) = ("tiny", (1, 48)) if ARGS.dry_run else ("speedrun-133m", (s["batch"], s["length"]))
    gen = torch.Generator().manual_seed(0)
    docs, lengths = document_ids(batch, length, gen)
    docs = docs.to(DEVICE)
    context = sum(n * n for n in lengths) / sum(lengths)
    input_ids = torch.randint(FIRST_RESIDUE, LAST_STANDARD + 1, (batch, length), generator=gen).to(DEVICE)
    scored = torch.rand(batch, length, generator=gen).to(DEVICE) < EVAL_MASK_RATE
    labels = torch.where(scored, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    masked_ids = torch.where(scored, torch.full_like(input_ids, MASK), input_ids)
    peak = peak_flops(DEVICE, ARGS.peak_tflops)  # FLOP/s: training/throughput.py's bf16 table, None on CPU
    rows = []
    for kernels in variants:
        if elapsed() > ARGS.budget_s - (15 if ARGS.dry_run else 75):
            notes.append(f"end-to-end kernels={kernels}: skipped, time budget")
            continue
        log(f"end-to-end: kernels={kernels}")
        try:
            step_batch = StepBatch(masked_ids=masked_ids, document_ids=docs, labels=labels, context=context)
            rows.append(train_step_row(preset, kernels, step_batch, peak))
        except Exception as e:  # e.g. out of memory: keep the other rows and the tables
            traceback.print_exc()
            notes.append(f"end-to-end kernels={kernels}: failed: {e!r}"[:300])
        if CUDA:
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    return rows, notes


@dataclass(frozen=True, kw_only=True)
class StepBatch:
    """The packed train-step batch: masked input ids, document ids and labels, each (batch, length) on DEVICE, and
    the attended context C = sum(doc_len^2) / tokens of its documents (for the FLOPs per token)."""

    masked_ids: torch.Tensor
    document_ids: torch.Tensor
    labels: torch.Tensor
    context: float

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.masked_ids.shape)


def train_step_row(preset, kernels, step_batch: StepBatch, peak):
    from modeling_speedplm import SpeedPLMConfig, SpeedPLMForMaskedLM
    from training.config import load_config
    from training.optim.build import build_optimizers
    from training.throughput import flops_per_token

    masked_ids, docs, labels = step_batch.masked_ids, step_batch.document_ids, step_batch.labels
    batch, length = step_batch.shape
    # the interpreter is slow: the dry run needs the path only (gpu_first_contact's DRY_MODEL, same reasons)
    small = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, value_embeddings=1) if ARGS.dry_run else {}
    attn_implementation = "flex_attention" if CUDA else "sdpa"
    config = SpeedPLMConfig.from_preset(
        preset, kernels=kernels, max_position_embeddings=1024, attn_implementation=attn_implementation, **small
    )
    torch.manual_seed(0)
    model = SpeedPLMForMaskedLM(config).to(DEVICE).train()
    if CUDA:
        for block in model.model.layers:
            block.compile()
    # the speedrun recipe's optimizer section, read through the trainer's typed config path
    ns_steps = ["optim.muon_ns_steps=1"] if ARGS.dry_run else []  # Newton-Schulz under the interpreter: the slow part
    optimizers = build_optimizers(model, load_config(str(RECIPE), ns_steps).optim)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    optimizer_s = []

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA):
            loss = model(input_ids=masked_ids, document_ids=docs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        loss_value = loss.item()  # the trainer's one host sync per step
        t0 = time.perf_counter()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        optimizer_s.append(time.perf_counter() - t0)
        return loss_value

    losses = [step() for _ in range(3 if CUDA else 1)]  # compile + warm-up
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    optimizer_s.clear()
    times = []
    for _ in range(ARGS.e2e_steps if CUDA else 1):
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens_s = batch * length / step_s
    # training/throughput.py's formula
    flops_token = flops_per_token(config, step_batch.context, scored_fraction=EVAL_MASK_RATE)
    mfu = f"{100 * tokens_s * flops_token / peak:.1f}%" if peak else "n/a"
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if CUDA else "n/a"
    return [
        kernels,
        f"{tokens_s:,.0f}",
        f"{1e3 * step_s:.1f}",
        f"{1e3 * statistics.median(optimizer_s):.1f}",
        mfu,
        memory,
        f"{losses[0]:.3f} -> {losses[-1]:.3f}",
    ]


def guarded(name, fn, empty, notes, reserve_s=0.0):
    """Run one section unless the budget is spent; on failure keep going so the other tables still print."""
    if elapsed() > ARGS.budget_s - reserve_s:
        notes.append(f"{name}: skipped, time budget")
        return empty
    try:
        return fn()
    except Exception as e:
        traceback.print_exc()
        notes.append(f"{name} failed: {e!r}"[:300])
        return empty


def main():
    s = shapes(ARGS.dry_run)
    if not CUDA and not ARGS.dry_run:
        sys.exit("no CUDA device: run with --dry-run for the CPU smoke test")
    device_name = torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)"
    log(f"device {device_name}; torch {torch.__version__}; triton available: {K.HAS_TRITON}")
    notes = []
    # By priority: correctness, then the headline number, then the evidence per kernel.
    parity = guarded("parity", lambda: kernel_parity_rows(s), [], notes)
    e2e, e2e_notes = (
        ([], ["end-to-end skipped (--skip-e2e)"])
        if ARGS.skip_e2e
        else guarded("end-to-end", lambda: end_to_end_rows(s, ["torch", "triton"]), ([], []), notes)
    )
    timing = guarded("per-kernel time", lambda: kernel_timing_rows(s), [], notes, reserve_s=60)
    ns_rows = guarded("newton-schulz", lambda: newton_schulz_rows(s), [], notes, reserve_s=30)
    attention = guarded("attention", lambda: attention_rows(s), [], notes, reserve_s=30)
    if not ARGS.skip_e2e:  # one kernel at a time: which of them pays inside the whole step
        singles = ["linear_relu2"] if ARGS.dry_run else list(K.TRITON_KERNELS)
        more, more_notes = guarded("end-to-end (single kernels)", lambda: end_to_end_rows(s, singles), ([], []), notes)
        e2e, e2e_notes = e2e + more, e2e_notes + more_notes
    notes += e2e_notes
    if not ARGS.dry_run:
        e2e += [
            ["SpeedrunningPLMs 1xH100 (published)", "275,900", "", "", "", "", ""],
            ["SpeedrunningPLMs 1xH200 (published)", "327,680", "", "", "", "", ""],
        ]
    n_tok = s["batch"] * s["length"]
    compile_note = "" if CUDA else "; dry run: torch.compile with backend aot_eager"
    out = [
        f"# speedplm GPU benchmark on {device_name} ({'dry run, tiny shapes' if ARGS.dry_run else 'speedrun-133m'})"
        f", torch {torch.__version__}, triton {getattr(K.triton, '__version__', 'n/a')}"
    ]
    out.append(
        table(
            f"Parity: max |err| / max |fp64 reference|, bf16 inputs (linear {n_tok}x{s['hidden']} @ "
            f"{s['mlp']}x{s['hidden']}.T; q, k {s['batch']}x{s['length']}x{s['heads']}x{s['head_dim']})",
            ["kernel", "tensor", "triton", "torch twin", "ok"],
            [r + [parity_ok(r[2], r[3])] for r in parity],
        )
    )
    out.append(
        table(
            f"Per-kernel time, median ms{compile_note}",
            ["kernel", "impl", "fwd ms", "fwd+bwd ms", "fwd throughput", "fwd+bwd throughput"],
            timing,
        )
    )
    out.append(
        table(
            f"Newton-Schulz, 5 steps bf16, median ms (triton = xxt symmetric products){compile_note}",
            ["matrices", "triton", "torch", "torch.compile", "speedup vs torch", "vs compile"],
            ns_rows,
        )
    )
    out.append(
        table(
            f"Attention over packed proteins, {s['batch']}x{s['length']} tokens, {s['heads']} heads x "
            f"{s['head_dim']}, bf16, median ms (error: first row vs fp32 eager)",
            ["implementation", "fwd ms", "fwd+bwd ms", "rel err", "note"],
            attention,
        )
    )
    out.append(
        table(
            "End-to-end train step (bf16 autocast, flex attention, regional torch.compile, Muon + Adam); "
            "kernels = which Triton kernels are on",
            ["kernels", "tokens/s", "step ms", "optimizer ms", "MFU", "peak GiB", "loss"],
            e2e,
        )
    )
    out += [f"note: {n}" for n in notes]
    out.append(f"\ntotal {elapsed():.0f} s")
    text = "\n".join(out)
    if ARGS.out:
        with open(ARGS.out, "w") as f:
            f.write(text + "\n")
    print(text, flush=True)
    bad = [r for r in parity if parity_ok(r[2], r[3]) != "ok"]
    return 1 if any("failed" in n for n in notes) or bad or not parity else 0


if __name__ == "__main__":
    sys.exit(main())
