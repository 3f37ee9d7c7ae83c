"""The stock `EsmTokenizer` over the ESM2 vocabulary written by our code (never downloaded)."""

import os
import tempfile

from transformers import EsmTokenizer

from .configuration_speedplm import ESM2_VOCAB


def build_tokenizer(model_max_length: int = 1024) -> EsmTokenizer:
    """An `EsmTokenizer` whose ids equal ESM2's (`<cls>`0 `<pad>`1 `<eos>`2 `<unk>`3 ... `<mask>`32)."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, "vocab.txt")
        with open(vocab_file, "w") as f:
            f.write("\n".join(ESM2_VOCAB) + "\n")
        return EsmTokenizer(vocab_file, model_max_length=model_max_length)
