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
        ("optim.lr=1", r"config section .optim.: unknown key\(s\) \[.lr.\]"),
        ("train.muon_lr=0.01", r"train\.muon_lr is now optim\.muon_lr"),
        ("sched.x=1", r"unknown key\(s\) \[.sched.\]"),
        ("model.num_attention_heads=7", r"SpeedPLMConfig\.num_attention_heads=7"),
        ("model.preset=esm3", r"model\.preset='esm3'"),
        ("optim.schedule=linear", r"optim\.schedule='linear'"),
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


# ---- #13 item 3: every key's type and range, checked at load time, naming the key, the value and what is allowed


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.max_steps=abc", r"train\.max_steps='abc': must be an integer"),
        ("train.max_steps=2.5", r"train\.max_steps=2\.5: must be an integer"),
        ("optim.embed_lr=-1", r"optim\.embed_lr=-1: must be >= 0"),
        ("train.log_every=0", r"train\.log_every=0: must be >= 1"),
        ("train.keep_checkpoints=0", r"train\.keep_checkpoints=0: must be >= 1"),
        ("train.compile=maybe", r"train\.compile='maybe': must be true or false or one of 'auto'"),
        ("train.inject_nan_at=[1, -2]", r"train\.inject_nan_at\[1\]=-2: must be >= 0"),
        ("data.mask_rate=1.5", r"data\.mask_rate=1\.5: must be < 1"),
        ("eval.max_tokens=0", r"eval\.max_tokens=0: must be >= 1"),
        ("hub.push=yes please", r"hub\.push='yes please': must be true or false"),
        ("model.hidden_size=2.5", r"model\.hidden_size=2\.5: must be an integer"),
        ("model.unet=1", r"model\.unet=1: must be true or false"),
        ("model.attn_implementation=flash", r"model\.attn_implementation='flash': must be one of 'sdpa'"),
        ("train.micro_batch_tokens=100", r"train\.micro_batch_tokens=100: must be >= data\.max_length=512"),
    ],
)
def test_values_are_typed_and_ranged(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(str(ROOT / "configs" / "default.yaml"), [override])


def test_every_key_is_type_checked():
    """Generic, from the annotations: a mapping is the wrong type for every key of every section."""
    import dataclasses

    from training.config import MODEL_FIELDS, SECTIONS

    keys = [(name, f.name) for name, cls in SECTIONS.items() if name != "model" for f in dataclasses.fields(cls)]
    keys += [("model", name) for name in ("preset", "attn_implementation", *MODEL_FIELDS)]
    assert len(keys) > 60
    for section, key in keys:
        with pytest.raises(ValueError, match=rf"^{section}\.{key}=\{{'a': 1\}}: must be "):
            load_config(str(ROOT / "configs" / "default.yaml"), [f"{section}.{key}={{a: 1}}"])


def test_floats_accept_integers_and_ints_refuse_floats():
    config = load_config(str(ROOT / "configs" / "default.yaml"), ["optim.muon_lr=1", "model.mlp_ratio=3"])
    assert config.optim.muon_lr == 1.0 and type(config.optim.muon_lr) is float
    assert config.model_config().mlp_ratio == 3.0
    with pytest.raises(ValueError, match=r"train\.tokens_per_step=8192\.0: must be an integer"):
        load_config(str(ROOT / "configs" / "default.yaml"), ["train.tokens_per_step=8192.0"])


# ---- #13 item 2: the run name is a plain name, so a run cannot be written outside train.output_dir


@pytest.mark.parametrize("name", ["../../escape", "/tmp/abs", "a/b", "..", ".", "a\\b", "x/../y", "-x"])
def test_run_name_cannot_escape_the_output_dir(name):
    with pytest.raises(ValueError, match=r"train\.run_name=.*must be a plain directory name"):
        load_config(str(ROOT / "configs" / "default.yaml"), [f"train.run_name={name}"])


def test_plain_run_names_are_fine():
    config = load_config(str(ROOT / "configs" / "default.yaml"), ["train.run_name=esm2-8m_lr0.02+wsd"])
    assert config.run_dir == Path("runs") / "esm2-8m_lr0.02+wsd"


# ---- #13 item 10: the global batch is split for the world size found at launch


def readme_launch_pairs():
    """(accelerate config or None, recipe) of every `accelerate launch` line in the README."""
    import re

    pairs = set()
    for line in (ROOT / "README.md").read_text().splitlines():
        for command in re.findall(r"accelerate launch [^`|]*train_accelerate\.py[^`|]*", line):
            topology = re.search(r"--config_file (\S+)", command)
            recipe = re.search(r"--config (\S+)", command)
            pairs.add((topology and topology.group(1), recipe.group(1) if recipe else "configs/default.yaml"))
    return sorted(pairs, key=str)


def test_readme_names_every_topology():
    pairs = readme_launch_pairs()
    topologies = {t for t, _ in pairs if t}
    assert topologies == {f"accelerate_configs/{p.name}" for p in (ROOT / "accelerate_configs").glob("*.yaml")}
    assert len(pairs) >= 8, pairs


@pytest.mark.parametrize("topology,recipe", readme_launch_pairs(), ids=str)
def test_every_readme_launch_line_resolves_its_batch(topology, recipe):
    """accelerate's num_processes is the total over all machines (nproc_per_node = num_processes // num_machines)."""
    import yaml

    from training.config import resolve_batch

    world = yaml.safe_load((ROOT / topology).read_text())["num_processes"] if topology else 1
    config = load_config(str(ROOT / recipe))
    plan = resolve_batch(config.train, config.data.max_length, world)
    assert plan.tokens_per_step == config.train.tokens_per_step
    assert plan.world_size == world and plan.micro_batch_tokens <= config.train.micro_batch_tokens
    assert plan.micro_batch_tokens % config.data.max_length == 0


@pytest.mark.parametrize(
    "tokens,micro,length,world,expected",
    [
        (8192, 8192, 512, 1, (1, 16)),  # the default recipe on 1 rank: 16 rows of 512, no accumulation
        (8192, 8192, 512, 2, (1, 8)),  # ... on 2 ranks: 8 rows each
        (524288, 65536, 1024, 1, (8, 64)),  # speedrun on 1 GPU: 8 micro-steps of 64 x 1024
        (524288, 65536, 1024, 16, (1, 32)),  # ... on 2 nodes x 8 GPUs
        (7 * 512, 2048, 512, 1, (7, 1)),  # 7 rows, at most 4 a micro-batch: 7 is prime, so 7 x 1 row
        (12 * 512, 2048, 512, 1, (3, 4)),  # the largest micro-batch that fits
    ],
)
def test_batch_plan(tokens, micro, length, world, expected):
    from training.config import TrainSection, resolve_batch

    plan = resolve_batch(TrainSection(tokens_per_step=tokens, micro_batch_tokens=micro), length, world)
    assert (plan.accumulation, plan.rows_per_micro_batch) == expected
    assert plan.tokens_per_step == tokens


def test_indivisible_batch_names_the_fix():
    from training.config import TrainSection, resolve_batch

    with pytest.raises(ValueError) as err:
        resolve_batch(TrainSection(tokens_per_step=8192, micro_batch_tokens=8192), 512, 3)
    assert "multiple of 512 x 3 = 1536" in str(err.value)
    assert "train.tokens_per_step=7680 or train.tokens_per_step=9216" in str(err.value)
