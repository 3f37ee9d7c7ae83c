"""Attention over packed documents: mask_mod factories, one mask per forward, and the backends behind transformers'
attention dispatch.

The attention module picks its backend from `config._attn_implementation` at call time through
`ALL_ATTENTION_FUNCTIONS.get_interface(...)` (transformers' contract, so `set_attn_implementation()` takes effect).
Every backend takes (module, q, k, v (B, H, L, D), mask, scaling, ...) and returns ((B, L, H, D), probabilities or
None). Document ids are per token, (B, L): tokens attend only to tokens of the same document; padding carries
document id -1, so it attends only to other padding and no real token ever sees it.
"""

import torch
from transformers import AttentionInterface

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
    """Attention stays inside one protein (and padding, id -1, inside padding). document_ids: (B, L)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return document_ids[b, q_idx] == document_ids[b, kv_idx]

    return mask_mod


def sliding_window_mask_mod(window: int):
    """Bidirectional window: |q - k| <= window tokens (within a protein, token distance = position distance)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= window

    return mask_mod


# ---- which backend a forward uses, and its mask (built once per forward) ----


def attention_backend(requested: str | None, device: torch.device, output_attentions: bool = False) -> str:
    """The backend actually used for `requested` (config._attn_implementation). Called by the model (to build the
    matching mask) and by each attention module (to dispatch), with the same arguments, so both agree.
    - output_attentions: eager, the only backend that materialises the probabilities (transformers' sdpa and flex
      return none), for this call only;
    - flex_attention has no backward on CPU, so CPU forwards that record gradients use sdpa."""
    if output_attentions:
        return "eager"
    if requested == "flex_attention" and (flex_attention is None or (device.type == "cpu" and torch.is_grad_enabled())):
        return "sdpa"
    return requested or "sdpa"


def dense_attention_mask(document_ids: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean (B, 1, L, L), True = may attend. Padding attends to padding so no softmax row is empty."""
    allowed = document_ids[:, :, None] == document_ids[:, None, :]  # (B, L, L)
    if sliding_window is not None:
        idx = torch.arange(document_ids.shape[1], device=document_ids.device)
        allowed = allowed & ((idx[:, None] - idx[None, :]).abs() <= sliding_window)
    return allowed[:, None]


def flex_block_mask(document_ids: torch.Tensor, sliding_window: int | None):
    """BlockMask for flex_attention; fully masked 128x128 blocks are skipped, which is where packing pays off."""
    batch, length = document_ids.shape
    mask_mod = document_mask_mod(document_ids)
    if sliding_window is not None:
        mask_mod = and_masks(mask_mod, sliding_window_mask_mod(sliding_window))
    return create_block_mask(mask_mod, batch, None, length, length, device=document_ids.device)


def build_attention_mask(backend: str, document_ids: torch.Tensor, sliding_window: int | None):
    if backend == "flex_attention":
        return flex_block_mask(document_ids, sliding_window)
    return dense_attention_mask(document_ids, sliding_window)


# ---- backends: (module, q, k, v (B, H, L, D), mask, scaling) -> ((B, L, H, D), probabilities or None) ----


def eager_attention_forward(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """The reference: explicit softmax, whose probabilities (B, H, L, L) are returned (output_attentions)."""
    scores = (query @ key.transpose(-1, -2)) * scaling  # (B, H, L, L)
    scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), probs


def flex_attention_forward(module, query, key, value, attention_mask: "BlockMask", scaling: float, **kwargs):
    # Eager flex is a reference implementation; the fast path is a compiled kernel. Inside a compiled region (the
    # trainer compiles each block) dynamo captures flex_attention itself; called eagerly on CUDA, the module-level
    # compiled function is used (transformers' flex integration makes the same choice). On CPU (forward only) it
    # runs eagerly, where transformers' own flex backend would compile an Inductor CPU kernel first.
    fn = _flex() if query.is_cuda and not torch.compiler.is_compiling() else flex_attention
    out = fn(query, key, value, block_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# A local instance, as transformers does for a model that overrides a backend (e.g. Doge): "sdpa" is transformers'
# own (with our boolean document mask), "flex_attention" ours above, "eager" the default passed to get_interface.
ALL_ATTENTION_FUNCTIONS = AttentionInterface()
ALL_ATTENTION_FUNCTIONS["flex_attention"] = flex_attention_forward
