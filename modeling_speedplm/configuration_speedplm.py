"""SpeedPLM configuration: one class, validated on construction, with named size presets as data.

Shipped inside every checkpoint as Hub remote code: no torch import, relative imports only.
"""

from transformers import PretrainedConfig

# Triton kernels (kernels_speedplm.py) a `kernels` setting can name.
TRITON_KERNELS = ("linear_relu2", "qk_norm_rotary", "newton_schulz")

# ESM2 vocabulary, in ESM2's order (fair-esm `Alphabet`), so that token ids match ESM2 checkpoints one for one.
# fmt: off
ESM2_VOCAB = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>",
)
# fmt: on

# The residue alphabet of the input policy that `prepare` (training/data/validate.py) and the shipped tokenizer
# (tokenization_speedplm.py) both apply: by default lowercase is upper-cased, one terminal '*' is stripped, the 20
# standard and 5 ambiguous residues are accepted, gaps and everything else are rejected.
STANDARD_RESIDUES = "".join(ESM2_VOCAB[4:24])  # "LAGVSERTIDPKQNFYMHWC", ids 4..23
AMBIGUOUS_RESIDUES = "XBUZO"  # ids 24..28
GAP_CHARACTERS = ".-"  # ids 29, 30: accepted by `prepare` only with allow_gaps=True

# Size presets: architecture fields only. The "esm2-*-like" rows match ESM2's parameter counts (same hidden size,
# depth and MLP width) with wider heads (64) because 16-dim heads waste tensor-core time; `speedrun-133m` is the
# SpeedrunningPLMs default (24 blocks, hidden 768, MLP 8/3 -> 2048, U-Net + value embeddings).
# fmt: off
PRESETS = {
    "tiny":           dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2.0,
                           value_embeddings=2, max_position_embeddings=256),
    "esm2-8m-like":   dict(hidden_size=320, num_hidden_layers=6, num_attention_heads=5, mlp_ratio=4.0),
    "esm2-35m-like":  dict(hidden_size=480, num_hidden_layers=12, num_attention_heads=8, mlp_ratio=4.0),
    "esm2-150m-like": dict(hidden_size=640, num_hidden_layers=30, num_attention_heads=10, mlp_ratio=4.0),
    "speedrun-133m":  dict(hidden_size=768, num_hidden_layers=24, num_attention_heads=6, mlp_ratio=8 / 3),
    # ESM2-650M has 33 layers; an odd depth has no U-Net mirror, so this preset keeps 33 and turns the skips off.
    "esm2-650m-like": dict(hidden_size=1280, num_hidden_layers=33, num_attention_heads=20, mlp_ratio=4.0, unet=False),
}
# fmt: on

ATTN_IMPLEMENTATIONS = ("sdpa", "flex_attention", "eager")


def parse_kernels(choice: str) -> tuple[str, ...] | None:
    """The Triton kernels `choice` asks for: "torch" -> (), "triton" -> all, "auto" -> None (decided by the device),
    "linear_relu2+newton_schulz" -> just those (torch twins for the rest). Raises ValueError for anything else."""
    if choice == "auto":
        return None
    if choice == "torch":
        return ()
    if choice == "triton":
        return TRITON_KERNELS
    names = tuple(choice.split("+")) if isinstance(choice, str) else ()
    unknown = [n for n in names if n not in TRITON_KERNELS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(
            f"kernels={choice!r}: use 'auto', 'triton', 'torch' or a '+'-joined subset of {list(TRITON_KERNELS)}"
        )
    return names


class SpeedPLMConfig(PretrainedConfig):
    r"""Configuration of a SpeedPLM masked-language model.

    Args:
        vocab_size: tokens in the vocabulary (33: the ESM2 alphabet, `ESM2_VOCAB`).
        hidden_size, num_hidden_layers, num_attention_heads: transformer shape; head_dim = hidden / heads (even).
        mlp_ratio, mlp_multiple_of: MLP width = hidden * ratio rounded up to a multiple of `mlp_multiple_of`.
        max_position_embeddings: longest protein (in tokens, <cls> and <eos> included) the model is trained for.
        rope_theta: base of the rotary embedding frequencies.
        unet: skip connections from block i to block L-1-i with learned weights (needs an even layer count).
        value_embeddings: number of value-embedding tables (0 = off); table j feeds block j and block L-1-j.
        qk_norm: RMSNorm of queries and keys per head before rotary.
        x0_mixing: each block mixes the normalized embedding x0 back into its input with learned weights.
        soft_logit_cap: logits = cap * tanh(logits / cap); 0 turns it off.
        mlm_head: "linear" (one matrix, no bias) or "transform" (dense -> GELU -> RMSNorm -> decoder with a bias: the
            BERT / RoBERTa / ESM2 masked-LM head, and SpeedrunningPLMs' LMHead); the soft cap applies to both.
        tie_word_embeddings: LM head shares the input embedding matrix.
        token_dropout: ESM2's rescaling of embeddings by the observed mask rate. Not supported (must be False): the
            RMSNorm applied to the embedding right after cancels any per-sequence rescale, so it would be a no-op.
        sliding_window: bidirectional window (tokens each side) for every layer; None = global attention.
        kernels: "auto" (Triton for CUDA tensors where triton exists, else torch), "triton", "torch", or the Triton
            kernels to use joined by "+" (e.g. "linear_relu2+newton_schulz"; torch for the others). Resolved once,
            when the model is built (kernels_speedplm.select_kernels; SpeedPLMModel.kernels).
        fp8: "none" or "mlp": in training, the MLP's two projections run as FP8 matmuls (e4m3 activations and weights,
            e5m2 gradients, tensorwise dynamic scales; fp8_speedplm.py); attention, embeddings and the LM head stay
            in the working precision, and inference never uses FP8.
    Base-class fields used here: num_labels and problem_type (task heads), attn_implementation (constructor
    argument; "sdpa", "flex_attention" or "eager").
    """

    model_type = "speedplm"

    def __init__(
        self,
        vocab_size: int = 33,
        hidden_size: int = 768,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 6,
        mlp_ratio: float = 8 / 3,
        mlp_multiple_of: int = 64,
        max_position_embeddings: int = 1024,
        rope_theta: float = 10000.0,
        unet: bool = True,
        value_embeddings: int = 3,
        qk_norm: bool = True,
        x0_mixing: bool = True,
        soft_logit_cap: float = 30.0,
        mlm_head: str = "linear",
        tie_word_embeddings: bool = False,
        token_dropout: bool = False,
        sliding_window: int | None = None,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        kernels: str = "auto",
        fp8: str = "none",
        cls_token_id: int = 0,
        pad_token_id: int = 1,
        eos_token_id: int = 2,
        mask_token_id: int = 32,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.mlp_multiple_of = mlp_multiple_of
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.unet = unet
        self.value_embeddings = value_embeddings
        self.qk_norm = qk_norm
        self.x0_mixing = x0_mixing
        self.soft_logit_cap = soft_logit_cap
        self.mlm_head = mlm_head
        self.tie_word_embeddings = tie_word_embeddings
        self.token_dropout = token_dropout
        self.sliding_window = sliding_window
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.kernels = kernels
        self.fp8 = fp8
        self.cls_token_id = cls_token_id
        self.mask_token_id = mask_token_id
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings  # some base-class versions reset it from kwargs
        self.check()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        width = int(self.hidden_size * self.mlp_ratio + 0.5)
        return -(-width // self.mlp_multiple_of) * self.mlp_multiple_of

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SpeedPLMConfig":
        if name not in PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def check(self) -> None:
        """Raise ValueError naming the first invalid field."""

        def fail(field, why):
            raise ValueError(f"SpeedPLMConfig.{field}={getattr(self, field)!r}: {why}")

        for field in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "mlp_multiple_of",
            "max_position_embeddings",
        ):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                fail(field, "must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"must divide hidden_size={self.hidden_size}")
        if self.head_dim % 2:
            fail("num_attention_heads", f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.mlp_ratio > 0:
            fail("mlp_ratio", "must be > 0")
        if not self.rope_theta > 0:
            fail("rope_theta", "must be > 0")
        if self.unet and self.num_hidden_layers % 2:
            fail("unet", f"U-Net skips need an even num_hidden_layers, got {self.num_hidden_layers}")
        if not isinstance(self.value_embeddings, int) or self.value_embeddings < 0:
            fail("value_embeddings", "must be an integer >= 0 (number of tables)")
        if 2 * self.value_embeddings > self.num_hidden_layers:
            fail("value_embeddings", f"needs 2 blocks per table, only {self.num_hidden_layers} blocks")
        if self.soft_logit_cap is None or self.soft_logit_cap < 0:
            fail("soft_logit_cap", "must be >= 0 (0 = off)")
        if self.mlm_head not in ("linear", "transform"):
            fail("mlm_head", "choose 'linear' or 'transform'")
        if self.token_dropout:
            fail("token_dropout", "not supported: the RMSNorm after the embedding cancels ESM2's rescale")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            fail("sliding_window", "must be None (global) or a positive integer")
        try:
            parse_kernels(self.kernels)
        except ValueError as e:
            fail("kernels", str(e))
        if self.fp8 not in ("none", "mlp"):
            fail(
                "fp8",
                "choose 'none' or 'mlp' (FP8 MLP projections in training; 'off' would be YAML's false)",
            )
        if not 0 < self.initializer_range < 1:
            fail("initializer_range", "must be in (0, 1)")
        for field in ("cls_token_id", "pad_token_id", "eos_token_id", "mask_token_id"):
            value = getattr(self, field)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                fail(field, f"must be a token id in [0, {self.vocab_size})")


# Hub remote code: config.json's auto_map gets "AutoConfig" from every save, in-repo or loaded from a checkpoint.
SpeedPLMConfig.register_for_auto_class()
