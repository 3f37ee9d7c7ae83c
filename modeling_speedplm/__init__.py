"""SpeedPLM model package: config, model + task heads, tokenizer. Importing it registers the Auto classes in-process.

The Hub remote-code registrations (register_for_auto_class: what save_pretrained writes into auto_map) live in the
shipped files themselves, so they hold where those files are loaded from a checkpoint too.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from .configuration_speedplm import ESM2_VOCAB, PRESETS, SpeedPLMConfig
from .modeling_speedplm import (
    SpeedPLMForMaskedLM,
    SpeedPLMForSequenceClassification,
    SpeedPLMForTokenClassification,
    SpeedPLMModel,
    SpeedPLMPreTrainedModel,
)
from .tokenization_speedplm import SpeedPLMTokenizer, build_tokenizer

# In-process Auto classes: AutoModelForMaskedLM.from_config(SpeedPLMConfig(...)), AutoTokenizer of a checkpoint, ...
AutoConfig.register("speedplm", SpeedPLMConfig, exist_ok=True)
AutoModel.register(SpeedPLMConfig, SpeedPLMModel, exist_ok=True)
AutoModelForMaskedLM.register(SpeedPLMConfig, SpeedPLMForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(SpeedPLMConfig, SpeedPLMForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(SpeedPLMConfig, SpeedPLMForTokenClassification, exist_ok=True)
AutoTokenizer.register(SpeedPLMConfig, slow_tokenizer_class=SpeedPLMTokenizer, exist_ok=True)

__all__ = [
    "ESM2_VOCAB",
    "PRESETS",
    "SpeedPLMConfig",
    "SpeedPLMForMaskedLM",
    "SpeedPLMForSequenceClassification",
    "SpeedPLMForTokenClassification",
    "SpeedPLMModel",
    "SpeedPLMPreTrainedModel",
    "SpeedPLMTokenizer",
    "build_tokenizer",
]
