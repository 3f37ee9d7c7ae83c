"""Load any masked-LM checkpoint for evaluation: SpeedPLM (remote code) or transformers' ESM2, a local folder or a
Hub id, with a map between its vocabulary and ESM2's ids (the ids every eval batch is built in).

Public API (eval.benchmark, probes, finetune, embed, zeroshot and quality all load models here)
    EvalError(Exception)                            # a bad request: data, model, vocabulary; the message names it
    inspect_model(name) -> ModelSpec                # config + tokenizer only (cheap): check every model first
    load_model(spec, device) -> model (eval mode)   # AutoModelForMaskedLM, trust_remote_code=True
    VocabMap.identity(), vocab_map(name, tokenizer, logits_width) -> VocabMap
    esm_twin(speedplm_config) -> EsmForMaskedLM     # ESM2 of the same shape (the baseline every comparison uses)
"""

from dataclasses import dataclass

import torch

from modeling_speedplm import ESM2_VOCAB

NUM_TOKENS = len(ESM2_VOCAB)  # 33
OPTIONAL_TOKENS = ("<null_1>",)  # never in an input or a label: a model may lack it


class EvalError(Exception):
    """A problem with the request (data, model, vocabulary); the message names what is wrong."""


class VocabMap:
    """ESM2 ids (the batches') <-> one model's ids. Logits come back as (..., 33) in ESM2 order, or (..., 34) with
    a last "other" class (logsumexp of the model's extra outputs) when the model has outputs beyond those tokens."""

    def __init__(self, to_model: list[int], logits_width: int):
        self.to_model = torch.tensor(to_model, dtype=torch.long)  # (33,) model id per ESM2 id, -1 = absent
        self.logits_width = logits_width
        self.is_identity = to_model == list(range(NUM_TOKENS)) and logits_width == NUM_TOKENS
        used = {i for i in to_model if i >= 0}
        self.other = torch.tensor([i for i in range(logits_width) if i not in used], dtype=torch.long)
        self.missing = self.to_model < 0  # (33,)
        self.num_classes = NUM_TOKENS + (1 if len(self.other) else 0)

    @classmethod
    def identity(cls) -> "VocabMap":
        return cls(list(range(NUM_TOKENS)), NUM_TOKENS)

    def model_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return input_ids
        return self.to_model.to(input_ids.device)[input_ids]

    def canonical_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., W) model logits -> (..., num_classes), fp32."""
        logits = logits.float()
        if self.is_identity:
            return logits
        device = logits.device
        out = logits.index_select(-1, self.to_model.clamp(min=0).to(device))  # (..., 33)
        out = out.masked_fill(self.missing.to(device), float("-inf"))
        if len(self.other):
            rest = logits.index_select(-1, self.other.to(device)).logsumexp(-1, keepdim=True)  # (..., 1)
            out = torch.cat([out, rest], dim=-1)
        return out


def vocab_map(name: str, tokenizer, logits_width: int) -> VocabMap:
    vocab = tokenizer.get_vocab()
    missing = [t for t in ESM2_VOCAB if t not in vocab and t not in OPTIONAL_TOKENS]
    if missing:
        raise EvalError(
            f"model {name}: its tokenizer lacks ESM2 tokens {missing}; it cannot be scored on the "
            f"same masked positions as the other models"
        )
    to_model = [int(vocab.get(t, -1)) for t in ESM2_VOCAB]
    beyond = [t for t, i in zip(ESM2_VOCAB, to_model) if i >= logits_width]
    if beyond:
        raise EvalError(f"model {name}: tokens {beyond} have ids beyond its {logits_width} output logits")
    if len({i for i in to_model if i >= 0}) != sum(i >= 0 for i in to_model):
        raise EvalError(f"model {name}: its tokenizer maps several ESM2 tokens to one id")
    return VocabMap(to_model, logits_width)


@dataclass
class ModelSpec:
    name: str
    config: object
    vocab: VocabMap
    max_length: int  # tokens per protein, <cls> and <eos> included


def inspect_model(name: str) -> ModelSpec:
    """Config + tokenizer only (cheap), so every model is checked before any is scored."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=True)
    except (OSError, ValueError) as err:
        raise EvalError(f"model {name}: cannot load its config: {err}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=True)
    except (OSError, ValueError, TypeError) as err:
        raise EvalError(f"model {name}: cannot load its tokenizer, so its vocabulary can't be checked: {err}") from err
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]  # tokenizers say 1e30 for "none"
    return ModelSpec(name, config, vocab_map(name, tokenizer, config.vocab_size), min(limits, default=1024))


def load_model(spec: ModelSpec, device) -> torch.nn.Module:
    from transformers import AutoModelForMaskedLM

    try:
        model = AutoModelForMaskedLM.from_pretrained(spec.name, trust_remote_code=True)
    except (OSError, ValueError) as err:
        raise EvalError(f"model {spec.name}: cannot load weights: {err}") from err
    return model.to(device).eval()


def esm_twin(config):
    """The EsmForMaskedLM of a SpeedPLMConfig's shape, ESM2's own architecture: what SpeedPLM is compared with."""
    from transformers import EsmConfig, EsmForMaskedLM

    from training.data.validate import MASK, PAD

    """ESM2 at the same hidden size, depth and MLP width (ESM2-8M: 320 x 6, 20 heads, MLP 1280)."""
    heads = 20 if config.hidden_size % 20 == 0 else config.num_attention_heads
    return EsmForMaskedLM(
        EsmConfig(
            vocab_size=len(ESM2_VOCAB),
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=1026,
            position_embedding_type="rotary",
            pad_token_id=PAD,
            mask_token_id=MASK,
            token_dropout=False,
            emb_layer_norm_before=False,
            attn_implementation="sdpa",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,  # as the released ESM2 configs
        )
    )
