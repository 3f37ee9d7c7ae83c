"""Attention over packed documents: mask_mod factories, one mask built per forward, and three interchangeable backends.

Every backend takes q, k, v of shape (B, H, L, D) and the mask object `build_attention_mask` made for it, and returns
(B, L, H, D). Document ids are per token, (B, L): tokens attend only to tokens of the same document; padding carries
document id -1, so it attends only to other padding and no real token ever sees it.
"""

import torch
import torch.nn.functional as F

try:  # FlexAttention exists from torch 2.5; the model still loads (sdpa/eager) where it does not.
    from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask, flex_attention
except ImportError:
    flex_attention = None

# Compiled once at module level (torchtitan style): the first CUDA call pays the compile, later calls reuse it.
_compiled_flex_attention = None


def _flex():
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


# ---- mask_mod factories (signature of torch's mask_mod: (b, h, q_idx, kv_idx) -> bool) ----


def document_mask_mod(document_ids: torch.Tensor):
    """Attention stays inside one protein. document_ids: (B, L)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return document_ids[b, q_idx] == document_ids[b, kv_idx]

    return mask_mod


def padding_mask_mod(document_ids: torch.Tensor):
    """Real tokens never attend to padding (document id -1)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return document_ids[b, kv_idx] >= 0

    return mask_mod


def sliding_window_mask_mod(window: int):
    """Bidirectional window: |q - k| <= window tokens (within a protein, token distance = position distance)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= window

    return mask_mod


# ---- one mask per forward ----


def dense_attention_mask(document_ids: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean (B, 1, L, L), True = may attend. Padding attends to padding so no softmax row is empty."""
    allowed = document_ids[:, :, None] == document_ids[:, None, :]  # (B, L, L)
    if sliding_window is not None:
        idx = torch.arange(document_ids.shape[1], device=document_ids.device)
        allowed &= (idx[:, None] - idx[None, :]).abs() <= sliding_window
    return allowed[:, None]


def flex_block_mask(document_ids: torch.Tensor, sliding_window: int | None):
    """BlockMask for flex_attention; fully masked 128x128 blocks are skipped, which is where packing pays off."""
    batch, length = document_ids.shape
    mask_mod = document_mask_mod(document_ids)  # padding (-1) == padding (-1): padding rows stay non-empty
    if sliding_window is not None:
        mask_mod = and_masks(mask_mod, sliding_window_mask_mod(sliding_window))
    return create_block_mask(mask_mod, batch, None, length, length, device=document_ids.device)


def build_attention_mask(implementation: str, document_ids: torch.Tensor, sliding_window: int | None):
    if implementation == "flex_attention":
        return flex_block_mask(document_ids, sliding_window)
    return dense_attention_mask(document_ids, sliding_window)


# ---- backends: (q, k, v (B, H, L, D), mask, scale) -> (B, L, H, D) ----


def sdpa_attention(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def eager_attention(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, L, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (probs @ v).transpose(1, 2)


def flex_attention_forward(q, k, v, mask: "BlockMask", scale: float) -> torch.Tensor:
    # Eager flex is a reference implementation; the fast path is a compiled kernel. Inside a compiled region (the
    # trainer compiles each block) dynamo captures flex_attention itself; called eagerly on CUDA, the module-level
    # compiled function is used (transformers' flex integration makes the same choice).
    fn = _flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    return fn(q, k, v, block_mask=mask, scale=scale).transpose(1, 2)


ATTENTION_FUNCTIONS = {"sdpa": sdpa_attention, "eager": eager_attention, "flex_attention": flex_attention_forward}


def resolve_implementation(requested: str | None, device: torch.device, training: bool) -> str:
    """The backend actually used. Flex has no backward on CPU, so CPU training silently uses SDPA."""
    implementation = requested or "sdpa"
    if implementation not in ATTENTION_FUNCTIONS:
        raise ValueError(f"attn_implementation={implementation!r}: choose one of {sorted(ATTENTION_FUNCTIONS)}")
    if implementation == "flex_attention" and (flex_attention is None or (device.type == "cpu" and training)):
        return "sdpa"
    return implementation
