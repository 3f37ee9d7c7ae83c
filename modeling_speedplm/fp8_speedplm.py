"""FP8 matmuls for the MLP projections in training (config.fp8 = "mlp"): launcher, autograd wrapper, torch twin.

    fp8_linear(x, weight)             x @ weight.T with x, weight in float8_e4m3fn and the gradient in float8_e5m2;
                                      torch._scaled_mm on CUDA GPUs that have it (sm_89+), the twin elsewhere
    fp8_linear_reference(x, weight)   the twin: the same roundings through torch's float8 dtypes, matmuls in fp32
    to_fp8(t, dtype) -> (t8, scale)   tensorwise dynamic scaling: t ~= t8.float() * scale

The recipe is modded-nanogpt's FP8 MLP (records since #66, and the FP8 forward-and-backward of the later ones) with
torchao's tensorwise *dynamic* scales (amax of each tensor at each call) instead of modded-nanogpt's fixed ones, so no
scale is tuned per model: activations and weights go to e4m3 (more mantissa) forward, the output gradient to e5m2
(more range) backward, and every matmul accumulates in fp32 inside _scaled_mm. Only the MLP's two projections use it
(the largest matmuls of a block); attention, embeddings and the LM head stay in the working precision: BioNeMo keeps
ESM-2's LM head out of FP8 because its logits underflow. Inference (model.eval() or no grad) never uses FP8.

Shipped as Hub remote code: plain torch only, and the CUDA path is taken only where _scaled_mm exists, so a
checkpoint trained with fp8="mlp" loads and runs anywhere.
"""

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t8, scale): t8 = t / scale rounded to `dtype`, scale = amax(|t|) / the dtype's largest finite value (fp32
    scalar), so the tensor's largest entry lands on the top of the FP8 range; an all-zero tensor gets scale 1."""
    amax = t.detach().abs().amax().float()
    scale = torch.where(amax > 0, amax / torch.finfo(dtype).max, torch.ones_like(amax))
    top = torch.finfo(dtype).max
    return (t.float() / scale).clamp(-top, top).to(dtype), scale


def _scaled_mm_available(t: torch.Tensor) -> bool:
    """_scaled_mm on this tensor's device: CUDA with compute capability 8.9 (Ada) or newer."""
    return t.is_cuda and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(t.device) >= (8, 9)


def _mm(a8, a_scale, b8, b_scale, out_dtype, cuda: bool) -> torch.Tensor:
    """(a8 * a_scale) @ (b8 * b_scale): a (M, K), b (K, N). _scaled_mm wants a row-major and b column-major."""
    if cuda:
        b_col = b8.t().contiguous().t()
        return torch._scaled_mm(a8.contiguous(), b_col, scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)
    return ((a8.float() * a_scale) @ (b8.float() * b_scale)).to(out_dtype)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, cuda: bool):
        # x (..., K), weight (N, K) -> (..., N) in x's dtype
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        x8, xs = to_fp8(x2, E4M3)
        w8, ws = to_fp8(weight, E4M3)
        ctx.save_for_backward(x8, xs, w8, ws)
        ctx.cuda, ctx.shape, ctx.dtypes = cuda, x.shape, (x.dtype, weight.dtype)
        return _mm(x8, xs, w8.t(), ws, x.dtype, cuda).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x8, xs, w8, ws = ctx.saved_tensors
        g8, gs = to_fp8(grad.reshape(-1, grad.shape[-1]), E5M2)  # (M, N)
        grad_x = _mm(g8, gs, w8, ws, ctx.dtypes[0], ctx.cuda).reshape(ctx.shape)  # (M, N) @ (N, K)
        grad_w = _mm(g8.t(), gs, x8, xs, torch.float32, ctx.cuda).to(ctx.dtypes[1])  # (N, M) @ (M, K)
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T through FP8 (module docstring): _scaled_mm where the GPU has it and every dimension is a multiple
    of 16 (its layout rule), else the twin's roundings."""
    aligned = x.numel() // x.shape[-1] % 16 == 0 and x.shape[-1] % 16 == 0 and weight.shape[0] % 16 == 0
    return _FP8Linear.apply(x, weight, aligned and _scaled_mm_available(x))


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The twin: the same FP8 roundings of x, weight (forward) and the gradient (backward), fp32 matmuls."""
    return _FP8Linear.apply(x, weight, False)
