"""How the training side writes a model folder: transformers' `save_pretrained`, then the tokenizer and the card.

`save_pretrained` itself is transformers' (weights, config, remote code; the model does not override it); every
folder the run writes (each checkpoint, final/, each Hub push) also gets the tokenizer and the model card (README.md)
through `write_model_folder`, so it is self-contained for AutoTokenizer, pipelines and the Hub page.
"""

from pathlib import Path

import torch

from modeling_speedplm import SpeedPLMConfig, build_tokenizer

WEIGHTS = "model.safetensors"  # accelerate's save_state name, also the from_pretrained one
WEIGHT_FILES = (WEIGHTS, "model.safetensors.index.json")


def model_card(
    config: SpeedPLMConfig,
    num_parameters: int,
    repo_id: str = "<checkpoint dir or hub id>",
    training_summary: str | None = None,
) -> str:
    switches = ", ".join(
        name
        for name, on in [
            ("U-Net skips", config.unet),
            (f"{config.value_embeddings} value-embedding tables", config.value_embeddings),
            ("QK-norm", config.qk_norm),
            ("x0 mixing", config.x0_mixing),
            (f"logit soft-cap {config.soft_logit_cap:g}", config.soft_logit_cap),
            (f"sliding window {config.sliding_window}", config.sliding_window is not None),
            ("tied embeddings", config.tie_word_embeddings),
        ]
        if on
    )
    heads = f"{config.num_attention_heads} heads of {config.head_dim}"
    return f"""---
library_name: transformers
tags: [protein, masked-lm, speedplm, esm2]
pipeline_tag: fill-mask
---
# SpeedPLM protein language model

A masked-language-model encoder over amino-acid sequences (ESM2 vocabulary and tokenizer), trained with
[speedplm](https://github.com/speedplm/speedplm).

| | |
|---|---|
| parameters | {num_parameters:,} ({num_parameters / 1e6:.1f} M) |
| blocks x hidden | {config.num_hidden_layers} x {config.hidden_size}, {heads} |
| MLP | ReLU², width {config.intermediate_size} |
| attention | rotary (theta {config.rope_theta:g}), bidirectional, per-protein document masking |
| switches | {switches or "none"} |
| max length | {config.max_position_embeddings} tokens (<cls> and <eos> included) |

## Use

```python
from transformers import AutoModelForMaskedLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)
model = AutoModelForMaskedLM.from_pretrained("{repo_id}", trust_remote_code=True)
batch = tokenizer(["MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"], return_tensors="pt")
logits = model(**batch).logits  # (batch, length, 33)
```

The tokenizer applies the training data's policy: lowercase is upper-cased, one terminal `*` stripped, anything
outside the ESM2 alphabet (digits, `J`, gaps, whitespace inside) raises a ValueError naming its position, and a
protein longer than {config.max_position_embeddings - 2} residues raises unless you pass `truncation=True`.

Task heads: `AutoModelForSequenceClassification` (one prediction per protein, mean over its residues) and
`AutoModelForTokenClassification` load this checkpoint with `num_labels=k` and a new head. Embeddings:
`AutoModel.from_pretrained(..., trust_remote_code=True)` (`last_hidden_state`, or `output_hidden_states=True`);
attention maps: `attn_implementation="eager"` and `output_attentions=True`. Several proteins can share one row: pass
`document_ids` (protein index per token, -1 on padding); positions and the attention mask are derived per protein.

## Training data

{training_summary or "See the training run's config.yaml."}
"""


def write_model_folder(model, directory: Path, training_summary: str | None = None, **save_kwargs) -> None:
    """The one way the training side writes a model folder: transformers' `save_pretrained` (weights, config, remote
    code; `save_kwargs` such as max_shard_size, or state_dict={} for no weight file), then the tokenizer
    (SpeedPLMTokenizer, remote code, ESM2 ids) and README.md beside it."""
    model.save_pretrained(directory, **save_kwargs)
    config = model.config
    build_tokenizer(config.max_position_embeddings).save_pretrained(directory)
    card = model_card(config, model.num_parameters(), training_summary=training_summary)
    (Path(directory) / "README.md").write_text(card)


def plain_model(model: torch.nn.Module, state_dict: dict | None = None) -> torch.nn.Module:
    """A fresh instance of the model's own class holding `state_dict` (a full one), built on the meta device (no
    second initialisation: load_state_dict assigns the given tensors); without a state dict it stays on meta (enough
    for config, code, tokenizer and card). fully_shard swaps the module's class for a generated `FSDP<Name>`
    subclass, and save_pretrained would ship that class (and torch's FSDP sources) as the checkpoint's remote code;
    the plain class saves the same weights as a loadable model."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if isinstance(model, FSDPModule):
        cls = next(base for base in cls.__bases__ if not issubclass(base, FSDPModule))
    with torch.device("meta"):
        plain = cls(model.config)
    if state_dict is not None:
        missing, unexpected = plain.load_state_dict(state_dict, strict=False, assign=True)
        tied = set(getattr(plain, "_tied_weights_keys", None) or {})
        if unexpected or set(missing) - tied:
            raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
        if getattr(plain.config, "tie_word_embeddings", False):
            plain.tie_weights()  # assign=True replaced the shared tensor by two equal ones
    return plain
