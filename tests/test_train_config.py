"""Run config: recipes + overrides against one schema; unknown keys fail with the valid ones listed."""

from pathlib import Path

import pytest

from training.config import load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(recipe):
    config = load_config(str(recipe))
    assert config.model_config().num_hidden_layers >= 1


def test_speedrun_recipe_is_the_anchor_setting():
    config = load_config(str(ROOT / "configs" / "speedrun-133m.yaml"))
    model = config.model_config()
    assert (model.num_hidden_layers, model.hidden_size, model.unet, model.value_embeddings) == (24, 768, True, 3)
    assert config.train.tokens_per_step == 524_288 and config.data.max_length == 1024


def test_overrides_are_yaml_typed():
    config = load_config(
        str(ROOT / "configs" / "default.yaml"),
        [
            "train.max_steps=7",
            "eval.max_tokens=null",
            "model.sliding_window=32",
            "train.inject_nan_at=[3, 4]",
            "tracking.wandb=offline",
        ],
    )
    assert config.train.max_steps == 7 and config.eval.max_tokens is None
    assert config.model_config().sliding_window == 32 and config.train.inject_nan_at == [3, 4]
    assert parse_override("data.train=/x/y") == ("data", "train", "/x/y")


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.max_stepz=5", r"section 'train': unknown key\(s\) \['max_stepz'\]; valid keys: .*'max_steps'"),
        ("model.hidden=5", r"section 'model': unknown key\(s\) \['hidden'\]; valid keys: .*'hidden_size'"),
        ("optim.lr=1", r"unknown key\(s\) \['optim'\]"),
        ("model.num_attention_heads=7", r"SpeedPLMConfig\.num_attention_heads=7"),
        ("model.preset=esm3", r"model\.preset='esm3'"),
        ("train.schedule=linear", r"train\.schedule='linear'"),
        ("tracking.wandb=yes", r"tracking\.wandb="),
        ("hub.push=true", r"hub\.model_id"),
        ("max_steps=5", r"expected section\.key=value"),
    ],
)
def test_bad_config_fails_clearly(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(str(ROOT / "configs" / "default.yaml"), [override])


def test_bad_recipe_file_names_itself(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match=str(bad)):
        load_config(str(bad))


@pytest.mark.parametrize("topology", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(topology):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(topology))
    assert config.num_processes >= 1 and config.mixed_precision in ("no", "bf16")
