"""SpeedPLM model package: config, model, tokenizer. Importing it registers the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .configuration_speedplm import ESM2_VOCAB, PRESETS, SpeedPLMConfig
from .modeling_speedplm import SpeedPLMForMaskedLM, SpeedPLMModel, SpeedPLMPreTrainedModel
from .tokenization_speedplm import build_tokenizer

# In-process Auto classes (AutoModelForMaskedLM.from_config(SpeedPLMConfig(...))) ...
AutoConfig.register("speedplm", SpeedPLMConfig, exist_ok=True)
AutoModel.register(SpeedPLMConfig, SpeedPLMModel, exist_ok=True)
AutoModelForMaskedLM.register(SpeedPLMConfig, SpeedPLMForMaskedLM, exist_ok=True)
# ... and remote code: save_pretrained writes auto_map and copies the modeling files beside the weights.
SpeedPLMConfig.register_for_auto_class()
SpeedPLMModel.register_for_auto_class("AutoModel")
SpeedPLMForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")

__all__ = [
    "ESM2_VOCAB",
    "PRESETS",
    "SpeedPLMConfig",
    "SpeedPLMForMaskedLM",
    "SpeedPLMModel",
    "SpeedPLMPreTrainedModel",
    "build_tokenizer",
]
