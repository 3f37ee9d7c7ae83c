"""Triton kernels for SpeedPLM, each with an autograd wrapper and a plain-torch reference twin (same signature).

    linear_relu2(x, weight)                  relu(x @ weight.T) ** 2, the MLP up-projection with its activation fused
    qk_norm_rotary(q, k, cos, sin, eps)      parameter-free RMSNorm of q and k per head + rotary (rotate-half), fused
    xxt(X, alpha, beta, C)                   alpha * X @ X.T + beta * C, only the upper triangle of tiles computed;
                                             X (M, K) or a stack (B, M, K)
    newton_schulz(G, steps, coefficients)    Muon's quintic orthogonalization built on xxt, one matrix or a stack
                                             (coefficients: one (a, b, c) for every step, or one per step)

`select_kernels("auto" | "triton" | "torch" | "linear_relu2+...")` resolves a choice once (the model keeps the result);
`triton_auto(device)` is the one "auto" rule.
Shipped as Hub remote code: the triton import is guarded and every kernel has a torch path, so checkpoints load where
triton is missing.
The Triton ops are registered with torch.library (namespace "speedplm") so torch.compile traces them as opaque ops.

On CPU the Triton kernels run only under the interpreter: TRITON_INTERPRET=1 must be in the environment before triton
is first imported (tests and `python -m eval.perf.gpu_benchmark --dry-run` do this).
"""

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .configuration_speedplm import TRITON_KERNELS, parse_kernels

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

HAS_TRITON = triton is not None

__all__ = [
    "AUTO_KERNELS",
    "HAS_TRITON",
    "INTERPRET",
    "NS_COEFFICIENTS",
    "Kernels",
    "TRITON_KERNELS",
    "apply_rotary",
    "linear_relu2",
    "linear_relu2_reference",
    "newton_schulz",
    "newton_schulz_reference",
    "parse_kernels",
    "qk_norm_rotary",
    "qk_norm_rotary_reference",
    "select_kernels",
    "triton_auto",
    "xxt",
    "xxt_reference",
]


def _interpreting() -> bool:
    # Triton's own @jit library (tl.zeros, tl.sum) is built when triton is imported: the interpreter works only if
    # TRITON_INTERPRET=1 was set by then (tl functions are then InterpretedFunction) and still is when we decorate.
    interpreted_lib = type(tl.zeros).__name__ == "InterpretedFunction"
    knobs = getattr(triton, "knobs", None)
    enabled = knobs.runtime.interpret if knobs is not None else os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(interpreted_lib and enabled)


INTERPRET = HAS_TRITON and _interpreting()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting, so Triton and torch agree at the same precision.
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _matmul_configs():
    if INTERPRET:  # one small config: autotuning under the interpreter would only cost time
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4)]
    shapes = [
        (128, 256, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 3, 4),
        (64, 256, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st, num_warps=w)
        for bm, bn, bk, st, w in shapes
    ]


if HAS_TRITON:
    # Interpreter fidelity (triton 3.9): its tl.dot mis-multiplies bf16 operands (upcast first: bf16 products are exact
    # in fp32, so the math is unchanged) and its fp32 -> bf16 cast truncates where GPUs round to nearest even.
    _INTERPRET = tl.constexpr(INTERPRET)

    @triton.jit
    def _cast(x, dtype: tl.constexpr):
        if _INTERPRET:  # noqa: SIM102 (two constexpr branches: the outer one removes the block from GPU code)
            if dtype == tl.bfloat16:  # round to nearest even by hand, then the truncating cast is exact
                bits = x.to(tl.uint32, bitcast=True)
                x = (bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _dot_tile(
        a_ptr,
        sam,
        sak,
        b_ptr,
        sbn,
        sbk,
        rm,
        rn,
        M,
        N,
        K,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """fp32 (BLOCK_M, BLOCK_N) tile of A @ B.T for rows rm of A (M, K) and rows rn of B (N, K); masked edges."""
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(
                a_ptr + rm[:, None] * sam + kk[None, :] * sak, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0
            )
            b = tl.load(
                b_ptr + rn[None, :] * sbn + kk[:, None] * sbk, mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0
            )
            if _INTERPRET:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    # ---------------------------------------------------------------------------------------------------------------
    # (a) relu(x @ w.T)^2: a tiled matmul whose epilogue applies ReLU^2 in fp32 registers before the single store.
    # Saves the up-projection output round trip to memory (eager: matmul -> write, relu -> r/w, square -> r/w).
    # ---------------------------------------------------------------------------------------------------------------
    @triton.autotune(configs=_matmul_configs(), key=["M", "N", "K"])
    @triton.jit
    def _linear_relu2_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        pre_ptr,
        M,
        N,
        K,
        sxm,
        sxk,
        swn,
        swk,
        som,
        son,
        STORE_PRE: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # x (M tokens, K), w (N features, K), out (M, N). Grouped launch order (Triton's matmul tutorial): GROUP_M
        # row-tiles sweep all column-tiles together, so their x rows and w stay in L2.
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = GROUP_M * tiles_n
        first = (pid // group) * GROUP_M
        rows_in_group = min(tiles_m - first, GROUP_M)
        pid_m = first + (pid % group) % rows_in_group
        pid_n = (pid % group) // rows_in_group
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 65536 tokens x 2048: offsets beyond int32
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _dot_tile(x_ptr, sxm, sxk, w_ptr, swn, swk, rm, rn, M, N, K, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if STORE_PRE:  # backward needs only the pre-activation: d(relu(p)^2)/dp = 2 relu(p)
            tl.store(pre_ptr + rm[:, None] * som + rn[None, :] * son, _cast(acc, pre_ptr.dtype.element_ty), mask=mask)
        r = tl.maximum(acc, 0.0)
        tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, _cast(r * r, out_ptr.dtype.element_ty), mask=mask)

    # ---------------------------------------------------------------------------------------------------------------
    # (b) RMSNorm(q), RMSNorm(k) per head + rotary, one program per token doing all heads of q and k (Liger-Kernel /
    # unsloth fuse the same pair). Inputs may be strided views of the fused qkv output; outputs are contiguous.
    # ---------------------------------------------------------------------------------------------------------------
    @triton.jit
    def _norm_rotate(x_ptr, sh, y_ptr, c, s, h, d, mask, eps, HALF: tl.constexpr):
        x1 = tl.load(x_ptr + h * sh + d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + h * sh + d + HALF, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
        n1, n2 = x1 * rstd, x2 * rstd
        dt = y_ptr.dtype.element_ty
        tl.store(y_ptr + h * (2 * HALF) + d, _cast(n1 * c - n2 * s, dt), mask=mask)
        tl.store(y_ptr + h * (2 * HALF) + d + HALF, _cast(n1 * s + n2 * c, dt), mask=mask)

    @triton.jit
    def _norm_rotate_backward(x_ptr, sh, dy_ptr, sdh, dx_ptr, c, s, h, d, mask, eps, HALF: tl.constexpr):
        # y = R n, n = x * rstd  =>  dn = R^T dy,  dx = rstd * (dn - n * mean(dn * n)). rstd is recomputed from x:
        # the kernel reads x anyway and a D-long reduction is free next to the memory traffic, so nothing is saved.
        x1 = tl.load(x_ptr + h * sh + d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + h * sh + d + HALF, mask=mask, other=0.0).to(tl.float32)
        g1 = tl.load(dy_ptr + h * sdh + d, mask=mask, other=0.0).to(tl.float32)
        g2 = tl.load(dy_ptr + h * sdh + d + HALF, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
        n1, n2 = x1 * rstd, x2 * rstd
        dn1, dn2 = g1 * c + g2 * s, g2 * c - g1 * s
        dot = ((tl.sum(dn1 * n1, axis=1) + tl.sum(dn2 * n2, axis=1)) / (2 * HALF))[:, None]
        dt = dx_ptr.dtype.element_ty
        tl.store(dx_ptr + h * (2 * HALF) + d, _cast(rstd * (dn1 - n1 * dot), dt), mask=mask)
        tl.store(dx_ptr + h * (2 * HALF) + d + HALF, _cast(rstd * (dn2 - n2 * dot), dt), mask=mask)

    @triton.jit
    def _qk_norm_rotary_kernel(
        q_ptr,
        k_ptr,
        cos_ptr,
        sin_ptr,
        qo_ptr,
        ko_ptr,
        dq_ptr,
        dk_ptr,
        L,
        H,
        sqb,
        sql,
        sqh,
        skb,
        skl,
        skh,
        scb,
        scl,
        sgqb,
        sgql,
        sgqh,
        sgkb,
        sgkl,
        sgkh,
        eps,
        BACKWARD: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        # Forward: (q, k) -> (qo, ko). Backward: grads (dq_ptr, dk_ptr) of the outputs -> (qo, ko) = input grads.
        row = tl.program_id(0).to(tl.int64)
        b, t = row // L, row % L  # batch row, token
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (h < H) & (d < HALF)
        c = tl.load(cos_ptr + b * scb + t * scl + d, mask=d < HALF, other=0.0)
        s = tl.load(sin_ptr + b * scb + t * scl + d, mask=d < HALF, other=0.0)
        out = row * H * 2 * HALF  # outputs are contiguous (B, L, H, D)
        if BACKWARD:
            _norm_rotate_backward(
                q_ptr + b * sqb + t * sql,
                sqh,
                dq_ptr + b * sgqb + t * sgql,
                sgqh,
                qo_ptr + out,
                c,
                s,
                h,
                d,
                mask,
                eps,
                HALF,
            )
            _norm_rotate_backward(
                k_ptr + b * skb + t * skl,
                skh,
                dk_ptr + b * sgkb + t * sgkl,
                sgkh,
                ko_ptr + out,
                c,
                s,
                h,
                d,
                mask,
                eps,
                HALF,
            )
        else:
            _norm_rotate(q_ptr + b * sqb + t * sql, sqh, qo_ptr + out, c, s, h, d, mask, eps, HALF)
            _norm_rotate(k_ptr + b * skb + t * skl, skh, ko_ptr + out, c, s, h, d, mask, eps, HALF)

    # ---------------------------------------------------------------------------------------------------------------
    # (c) out = alpha * X @ X.T + beta * C for symmetric C: the product is symmetric, so only tiles with
    # pid_m <= pid_n are computed and each is stored twice (itself and its transpose): ~half the FLOPs. Idea from
    # modded-nanogpt's XXT / ba_plus_cAA kernels (@byronxu99, microsoft/dion's newton_schulz_triton).
    # ---------------------------------------------------------------------------------------------------------------
    @triton.jit
    def _xxt_kernel(
        x_ptr,
        c_ptr,
        out_ptr,
        M,
        K,
        sxb,
        sxm,
        sxk,
        scb,
        scm,
        scn,
        sob,
        som,
        son,
        alpha,
        beta,
        HAS_C: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # Grid (tiles, tiles, batch): a stack of same-shape matrices (Muon's 24 blocks x 4 shapes) in one launch.
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        if pid_m > pid_n:  # lower-triangle tile: written by its mirror
            return
        pid_b = tl.program_id(2).to(tl.int64)
        x_ptr += pid_b * sxb
        c_ptr += pid_b * scb
        out_ptr += pid_b * sob
        rm = pid_m * BLOCK + tl.arange(0, BLOCK)
        rn = pid_n * BLOCK + tl.arange(0, BLOCK)
        acc = _dot_tile(x_ptr, sxm, sxk, x_ptr, sxm, sxk, rm, rn, M, M, K, PRECISION, BLOCK, BLOCK, BLOCK_K)
        mask = (rm[:, None] < M) & (rn[None, :] < M)
        acc = acc * alpha
        if HAS_C:
            acc += beta * tl.load(c_ptr + rm[:, None] * scm + rn[None, :] * scn, mask=mask, other=0.0).to(tl.float32)
        acc = _cast(acc, out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, acc, mask=mask)
        if pid_m != pid_n:
            tl.store(
                out_ptr + rn[:, None] * som + rm[None, :] * son,
                tl.trans(acc),
                mask=(rn[:, None] < M) & (rm[None, :] < M),
            )


def _require_triton():
    if not HAS_TRITON:
        raise RuntimeError(
            "speedplm kernels='triton' needs the `triton` package (pip install triton); "
            "use kernels='torch' or 'auto' without it"
        )


def _check_device(t: torch.Tensor):
    if t.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported")


# -------------------------------------------------------------------------------------------------------------------
# Launchers + torch.library ops (opaque to torch.compile; the fake kernels give it shapes)
# -------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("speedplm::linear_relu2", mutates_args=())
def _linear_relu2_op(x: torch.Tensor, weight: torch.Tensor, save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), weight (N, K) -> out (M, N) and, if save_pre, the pre-activation (M, N) for backward (else empty)."""
    _require_triton()
    _check_device(x)
    (m, k), n = x.shape, weight.shape[0]
    if weight.shape[1] != k or x.dtype != weight.dtype:
        raise ValueError(f"linear_relu2: x {tuple(x.shape)} {x.dtype} vs weight {tuple(weight.shape)} {weight.dtype}")
    out = x.new_empty(m, n)
    pre = x.new_empty(m, n) if save_pre else x.new_empty(0)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _linear_relu2_kernel[grid](
        x,
        weight,
        out,
        pre,
        m,
        n,
        k,
        *x.stride(),
        *weight.stride(),
        *out.stride(),
        STORE_PRE=save_pre,
        PRECISION=_dot_precision(x.dtype),
    )
    return out, pre


@_linear_relu2_op.register_fake
def _(x, weight, save_pre):
    out = x.new_empty(x.shape[0], weight.shape[0])
    return out, (torch.empty_like(out) if save_pre else x.new_empty(0))


def _linear_relu2_setup(ctx, inputs, output):
    x, weight, save_pre = inputs
    ctx.save_for_backward(x, weight, output[1])


def _linear_relu2_backward(ctx, grad_out, _grad_pre):
    # grad_pre = grad * 2 relu(pre); then the two matmuls go to cuBLAS (as fast as any Triton matmul here).
    x, weight, pre = ctx.saved_tensors
    if pre.numel() == 0 and x.numel():
        raise RuntimeError("linear_relu2: backward through a call made without grad (pre-activation not saved)")
    grad_pre = grad_out * pre.clamp_min(0) * 2
    grad_x = grad_pre @ weight if ctx.needs_input_grad[0] else None
    grad_w = grad_pre.t() @ x if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_linear_relu2_op.register_autograd(_linear_relu2_backward, setup_context=_linear_relu2_setup)


def _qk_launch(q, k, cos, sin, eps, dq=None, dk=None):
    _require_triton()
    _check_device(q)
    batch, length, heads, dim = q.shape
    if dim % 2 or k.shape != q.shape or cos.shape != (batch, length, dim // 2) or cos.shape != sin.shape:
        raise ValueError(
            f"qk_norm_rotary: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin "
            f"{tuple(sin.shape)}: need q, k (B, L, H, D), D even, and cos, sin (B, L, D/2)"
        )
    # Any strides, except that the head dim must be unit-stride (a grad can arrive expanded, with stride 0).
    q, k, cos, sin, dq, dk = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin, dq, dk))
    backward = dq is not None
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty_like(qo)
    g_q, g_k = (dq, dk) if backward else (q, k)  # unused pointers in forward
    half = dim // 2
    _qk_norm_rotary_kernel[(batch * length,)](
        q,
        k,
        cos,
        sin,
        qo,
        ko,
        g_q,
        g_k,
        length,
        heads,
        *q.stride()[:3],
        *k.stride()[:3],
        cos.stride(0),
        cos.stride(1),
        *g_q.stride()[:3],
        *g_k.stride()[:3],
        eps,
        BACKWARD=backward,
        HALF=half,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_HALF=triton.next_power_of_2(half),
    )
    return qo, ko


@torch.library.custom_op("speedplm::qk_norm_rotary", mutates_args=())
def _qk_norm_rotary_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _qk_launch(q, k, cos, sin, eps)


@torch.library.custom_op("speedplm::qk_norm_rotary_backward", mutates_args=())
def _qk_norm_rotary_backward_op(
    dq: torch.Tensor,
    dk: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _qk_launch(q, k, cos, sin, eps, dq, dk)


@_qk_norm_rotary_op.register_fake
def _(q, k, cos, sin, eps):
    return q.new_empty(q.shape), q.new_empty(q.shape)


@_qk_norm_rotary_backward_op.register_fake
def _(dq, dk, q, k, cos, sin, eps):
    return q.new_empty(q.shape), q.new_empty(q.shape)


def _qk_setup(ctx, inputs, output):
    q, k, cos, sin, eps = inputs
    ctx.save_for_backward(q, k, cos, sin)  # the inputs, not the outputs: rstd is recomputed in the backward kernel
    ctx.eps = eps


def _qk_backward(ctx, dq, dk):
    q, k, cos, sin = ctx.saved_tensors
    gq, gk = torch.ops.speedplm.qk_norm_rotary_backward(dq, dk, q, k, cos, sin, ctx.eps)
    return gq, gk, None, None, None  # cos/sin come from integer positions: no gradient


_qk_norm_rotary_op.register_autograd(_qk_backward, setup_context=_qk_setup)


@torch.library.custom_op("speedplm::xxt", mutates_args=())
def _xxt_op(x: torch.Tensor, alpha: float, beta: float, c: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) or a stack (B, M, K) -> (M, M) or (B, M, M); c (like the output) or None."""
    _require_triton()
    _check_device(x)
    x3 = x if x.dim() == 3 else x[None]
    batch, m, k = x3.shape
    out = x3.new_empty(batch, m, m)
    # 128-wide tiles, or 64 for a small Gram matrix (768x768: 78 active tiles instead of 21 on a 132-SM H100).
    block, block_k = (16, 16) if INTERPRET else ((64, 64) if m <= 1024 else (128, 64))
    cc = out if c is None else (c if c.dim() == 3 else c[None])
    tiles = triton.cdiv(m, block)
    _xxt_kernel[(tiles, tiles, batch)](
        x3,
        cc,
        out,
        m,
        k,
        *x3.stride(),
        *cc.stride(),
        *out.stride(),
        alpha,
        beta,
        HAS_C=c is not None,
        PRECISION=_dot_precision(x.dtype),
        BLOCK=block,
        BLOCK_K=block_k,
        num_warps=4 if block == 64 else 8,
        num_stages=3,
    )
    return out if x.dim() == 3 else out[0]


@_xxt_op.register_fake
def _(x, alpha, beta, c):
    return x.new_empty(*x.shape[:-1], x.shape[-2])


# -------------------------------------------------------------------------------------------------------------------
# Public API: Triton paths and their torch twins (same signatures)
# -------------------------------------------------------------------------------------------------------------------


def _autocast_inputs(x: torch.Tensor, weight: torch.Tensor):
    # nn.Linear is autocast by torch; a custom op is not, so mirror autocast here for drop-in use in the MLP.
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), weight.to(dtype)
    return x, weight


def linear_relu2(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """relu(x @ weight.T) ** 2 with the Triton matmul; x (..., K), weight (M, K) -> (..., M)."""
    x, weight = _autocast_inputs(x, weight)
    lead = x.shape[:-1]
    save_pre = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    out, _ = torch.ops.speedplm.linear_relu2(x.reshape(-1, x.shape[-1]), weight, save_pre)
    return out.view(*lead, weight.shape[0])


def linear_relu2_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Torch twin: exactly SpeedPLMMLP's up-projection + activation."""
    return F.relu(F.linear(x, weight)).square()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, L, H, D), cos/sin: (B, L, D/2); rotate-half convention, fp32 math."""
    cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def qk_norm_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6):
    """q, k (B, L, H, D) (any strides: views of a fused qkv are fine); cos, sin (B, L, D/2) from per-token positions
    -> normalized and rotated (q, k), contiguous (B, L, H, D), in the input dtype."""
    cos, sin = (t.float().expand(q.shape[0], q.shape[1], -1) for t in (cos, sin))  # batch may broadcast
    q_out, k_out = torch.ops.speedplm.qk_norm_rotary(q, k, cos, sin, float(eps))
    return q_out, k_out


def qk_norm_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6):
    """Torch twin: parameter-free RMSNorm, then apply_rotary, exactly the model's unfused path."""
    return tuple(apply_rotary(F.rms_norm(t, (t.size(-1),), eps=eps), cos.float(), sin.float()) for t in (q, k))


def xxt(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0, c: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * x @ x^T + beta * c (c symmetric or None), x (M, K) or (B, M, K); Triton, upper tiles only."""
    return torch.ops.speedplm.xxt(x, float(alpha), float(beta), c)


def xxt_reference(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0, c: torch.Tensor | None = None):
    if x.dim() == 3:
        return alpha * (x @ x.mT) if c is None else torch.baddbmm(c, x, x.mT, beta=beta, alpha=alpha)
    return alpha * (x @ x.T) if c is None else torch.addmm(c, x, x.T, beta=beta, alpha=alpha)


# Quintic Newton-Schulz coefficients tuned by Keller Jordan for Muon (modded-nanogpt; torch.optim.Muon defaults).
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)


def ns_schedule(coefficients, steps: int) -> list[tuple[float, float, float]]:
    """(a, b, c) of each of `steps` iterations: one triple used every time, or one triple per iteration (the first
    `steps` of a list, e.g. Polar Express's, Amsel et al. 2025)."""
    if len(coefficients) == 3 and not isinstance(coefficients[0], (tuple, list)):
        return [tuple(coefficients)] * steps
    if steps > len(coefficients):
        raise ValueError(f"newton_schulz: {steps} steps but only {len(coefficients)} per-iteration coefficient triples")
    return [tuple(c) for c in coefficients[:steps]]


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients=NS_COEFFICIENTS,
    eps: float = 1e-7,
    use_triton: bool | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Orthogonalize G (~U V^T of its SVD) in bf16, like torch.optim.Muon, with X X^T and b A + c A A (A symmetric,
    so A A = A A^T) on the symmetric xxt kernel. G is one matrix (M, N) or a stack of same-shape matrices (B, M, N),
    orthogonalised each on its own in one launch per product. use_triton=None: triton_auto(G.device)."""
    if use_triton is None:
        use_triton = triton_auto(G.device)
    if not use_triton:
        return newton_schulz_reference(G, steps, coefficients, eps, dtype)
    schedule = ns_schedule(coefficients, steps)
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # work on the wide orientation: the Gram matrix is then the smaller one
        X = X.mT
    # Frobenius norm >= spectral norm, so singular values end up <= 1
    X = X / (X.norm() if X.dim() == 2 else X.norm(dim=(-2, -1), keepdim=True)).clamp(min=eps)
    for a, b, c in schedule:
        A = xxt(X)
        B = xxt(A, alpha=c, beta=b, c=A)
        X = torch.addmm(X, B, X, beta=a) if X.dim() == 2 else torch.baddbmm(X, B, X, beta=a)
    return X.mT if tall else X


def newton_schulz_reference(
    G: torch.Tensor,
    steps: int = 5,
    coefficients=NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
):
    """Torch twin: for one matrix, the same operations as torch.optim.Muon's `_zeropower_via_newtonschulz`
    (bit-identical in bf16; CPUs run bf16 matmuls ~19x slower than fp32, so the CPU path may ask for fp32); a stack
    (B, M, N) runs the same steps as batched products."""
    schedule = ns_schedule(coefficients, steps)
    X = G.to(dtype)
    if X.dim() == 3:
        tall = X.size(-2) > X.size(-1)
        X = X.mT if tall else X
        X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        for a, b, c in schedule:
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
        return X.mT if tall else X
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T
    X = X.div(X.norm().clamp(min=eps))
    for a, b, c in schedule:
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    return X.T if tall else X


# "auto" on CUDA uses these: only kernels that a measured table showed paying END TO END in the trainer's real step
# (`python -m eval.perf.gpu_first_contact`, part (c): tokens/s with the kernel alone vs kernels=torch, parity ok).
# None has been measured on a GPU yet, so "auto" is torch everywhere (inductor already fuses ReLU^2 and norm + rotary
# inside the compiled blocks); the first-contact summary names what to put here. Every kernel stays available by name
# (model.kernels=triton or a "+"-joined subset of TRITON_KERNELS, configuration_speedplm.py).
AUTO_KERNELS: tuple[str, ...] = ()


def triton_auto(device) -> bool:
    """The "auto" rule, its only home: Triton for tensors on a CUDA device when triton is importable."""
    return HAS_TRITON and torch.device(device).type == "cuda"


def linear_relu2_auto(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Under "auto": Triton on CUDA tensors, the torch twin elsewhere (x.device is static under torch.compile)."""
    return linear_relu2(x, weight) if triton_auto(x.device) else linear_relu2_reference(x, weight)


def qk_norm_rotary_auto(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6):
    """Under "auto": Triton on CUDA tensors, the torch twin elsewhere."""
    fn = qk_norm_rotary if triton_auto(q.device) else qk_norm_rotary_reference
    return fn(q, k, cos, sin, eps)


class Kernels(NamedTuple):
    """One kernel choice, resolved: the model keeps it (SpeedPLMModel.kernels), DistributedMuon reads newton_schulz."""

    name: str
    linear_relu2: Callable
    qk_norm_rotary: Callable
    newton_schulz: bool | None  # use_triton for newton_schulz(): True, False, or None = per tensor (triton_auto)


def select_kernels(choice: str, device=None) -> Kernels:
    """The implementation of each kernel for `choice` (see parse_kernels).

    auto: AUTO_KERNELS in Triton where `triton_auto` holds; with `device` given it is decided for that device,
    without one it is decided per call from the tensors' device (what the model keeps, so one model serves any
    device). Named kernels ("triton" or a subset) run in Triton everywhere (on CPU only under TRITON_INTERPRET=1: how
    the tests run them) and raise without triton.
    """
    names = parse_kernels(choice)
    if names is None and device is None:  # decided per tensor
        auto = AUTO_KERNELS if HAS_TRITON else ()
        return Kernels(
            name="auto" if auto else "torch",
            linear_relu2=linear_relu2_auto if "linear_relu2" in auto else linear_relu2_reference,
            qk_norm_rotary=qk_norm_rotary_auto if "qk_norm_rotary" in auto else qk_norm_rotary_reference,
            newton_schulz=None if "newton_schulz" in auto else False,
        )
    if names is None:
        names = AUTO_KERNELS if triton_auto(device) else ()
    elif names:
        _require_triton()
    return Kernels(
        name="torch" if not names else "triton" if set(names) == set(TRITON_KERNELS) else "+".join(names),
        linear_relu2=linear_relu2 if "linear_relu2" in names else linear_relu2_reference,
        qk_norm_rotary=qk_norm_rotary if "qk_norm_rotary" in names else qk_norm_rotary_reference,
        newton_schulz="newton_schulz" in names,
    )
