"""SpeedPLMConfig: validation names the field; presets are data with the parameter counts they promise."""

import pytest
import torch

from modeling_speedplm import PRESETS, SpeedPLMConfig, SpeedPLMForMaskedLM

INVALID = [
    (dict(hidden_size=100, num_attention_heads=3), "num_attention_heads"),
    (dict(hidden_size=96, num_attention_heads=32), "num_attention_heads"),  # head_dim 3: odd, no rotary pairs
    (dict(num_hidden_layers=5, value_embeddings=1), "unet"),
    (dict(num_hidden_layers=4, value_embeddings=3), "value_embeddings"),
    (dict(value_embeddings=-1), "value_embeddings"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(soft_logit_cap=-5.0), "soft_logit_cap"),
    (dict(token_dropout=True), "token_dropout"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(kernels="cuda"), "kernels"),
    (dict(kernels="linear_relu2+flash"), "kernels"),
    (dict(initializer_range=0.0), "initializer_range"),
    (dict(mask_token_id=33), "mask_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"),
]


@pytest.mark.parametrize("overrides,field", INVALID, ids=[f for _, f in INVALID])
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"SpeedPLMConfig\.{field}="):
        SpeedPLMConfig(**overrides)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="speedrun-133m"):
        SpeedPLMConfig.from_preset("esm2-3b")


def test_mlp_width_rounded_to_multiple():
    config = SpeedPLMConfig(hidden_size=768, mlp_ratio=8 / 3, mlp_multiple_of=256)
    assert config.intermediate_size == 2048
    assert SpeedPLMConfig(hidden_size=320, num_attention_heads=5, mlp_ratio=3.1).intermediate_size == 1024


def test_config_round_trips_through_dict():
    config = SpeedPLMConfig.from_preset(
        "tiny", sliding_window=16, tie_word_embeddings=True, kernels="linear_relu2+newton_schulz"
    )
    again = SpeedPLMConfig(**config.to_dict())
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "value_embeddings",
        "sliding_window",
        "tie_word_embeddings",
        "mask_token_id",
        "soft_logit_cap",
        "kernels",
    ):
        assert getattr(again, key) == getattr(config, key), key


def count_parameters(name: str) -> int:
    with torch.device("meta"):
        return SpeedPLMForMaskedLM(SpeedPLMConfig.from_preset(name)).num_parameters()


def test_preset_parameter_counts():
    counts = {name: count_parameters(name) for name in PRESETS}
    print("\npreset parameter counts:")
    for name, n in counts.items():
        print(f"  {name:16s} {n / 1e6:8.2f} M")
    assert abs(counts["speedrun-133m"] - 133e6) / 133e6 < 0.02
    # "-like" presets match ESM2 sizes (7.5 M, 35 M, 150 M, 650 M) within 5%
    for name, esm in [
        ("esm2-8m-like", 7.5e6),
        ("esm2-35m-like", 33.5e6),
        ("esm2-150m-like", 148e6),
        ("esm2-650m-like", 651e6),
    ]:
        assert abs(counts[name] - esm) / esm < 0.05, (name, counts[name])
    assert counts["tiny"] < 500_000
