"""Run configuration: a YAML recipe plus `section.key=value` overrides, checked against one typed schema.

Every key is a dataclass field. Its type annotation (int, float, bool, str, Literal choices, `X | None`, list[int])
and its range (field metadata: ge/gt/le/lt, or a `check` function) are checked generically when a section is built,
so a config is fully checked in `load_config` — before the trainer writes a file or creates a process group — and
an error names the key, the value and what is allowed (`train.max_steps=2.5: must be an integer`).

Sections: model (a preset and/or SpeedPLMConfig fields, typed by SpeedPLMConfig's signature and validated by
SpeedPLMConfig itself), data, train, optim (training/optim/config.py), eval, hub, tracking. The checking machinery
is training/schema.py. Topology and precision are not here: they come from
`accelerate launch --config_file accelerate_configs/<topology>.yaml`. The batch arithmetic for the world size found
at launch (micro-batch and accumulation from the global batch) is `resolve_batch`.
"""

import dataclasses
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import yaml

from modeling_speedplm import PRESETS, SpeedPLMConfig
from modeling_speedplm.configuration_speedplm import ATTN_IMPLEMENTATIONS

from .data.batch_schedule import BatchSchedule
from .optim.config import OptimSection
from .publish.config import HubSection
from .schema import ConfigError, Section, check_value, setting

# SpeedPLMConfig's own keyword arguments, with their annotated types: the model section is typed by them.
MODEL_FIELDS = {name: hint for name, hint in typing.get_type_hints(SpeedPLMConfig.__init__).items() if name != "return"}


def _plain_name(name: str) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", name) or ".." in name:
        return "must be a plain directory name (letters, digits, '.', '_', '-', '+', '='; no '/', no '..')"
    return None


def _resume_choice(value: str) -> str | None:
    if value in ("auto", "none") or Path(value).is_dir():
        return None
    return "must be 'auto', 'none' or an existing checkpoint directory"


def _not_empty(value: str) -> str | None:
    return "must not be empty" if not value.strip() else None


def _parameter_shapes(config: SpeedPLMConfig) -> dict:
    """{parameter name: shape} of the model a config builds, on the meta device (no memory, no initialisation)."""
    import torch

    from modeling_speedplm import SpeedPLMForMaskedLM

    with torch.device("meta"):
        model = SpeedPLMForMaskedLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _source_config(init_from: str) -> SpeedPLMConfig:
    """The model config of a speedplm checkpoint folder (final/, checkpoints/step-*) or Hub repo, or ConfigError
    naming model.init_from."""
    key = f"model.init_from={init_from}"
    if Path(init_from).exists() and not (Path(init_from) / "config.json").is_file():
        raise ConfigError(f"{key}: not a model folder (no config.json); give a run's final/ or checkpoints/step-*")
    try:
        raw, _ = SpeedPLMConfig.get_config_dict(init_from)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: cannot read its config.json ({err})") from None
    if raw.get("model_type") != SpeedPLMConfig.model_type:
        raise ConfigError(
            f"{key}: model_type {raw.get('model_type')!r}, not {SpeedPLMConfig.model_type!r}: model.init_from takes "
            f"a speedplm checkpoint (final/, checkpoints/step-*, or such a Hub repo)"
        )
    try:
        return SpeedPLMConfig(**{name: raw[name] for name in MODEL_FIELDS if name in raw})
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


@dataclass
class ModelSection(Section):
    """A preset and/or any SpeedPLMConfig field (YAML: flat keys beside `preset`), plus the attention backend.

    model.init_from=PATH_OR_HUB_ID: a new run that starts from a speedplm checkpoint's weights. The model is the
    checkpoint's config; the section's other keys (a preset's fields, explicit fields) are compared with it: a value
    that would change a parameter's shape is refused (ConfigError naming model.<key>), any other change (kernels,
    rope_theta, attn_implementation, ...) is applied and listed in `init_changes` (the trainer logs it)."""

    NAME: ClassVar[str] = "model"
    preset: Literal[tuple(PRESETS)] | None = None
    attn_implementation: Literal[ATTN_IMPLEMENTATIONS] | None = None  # None: flex_attention on CUDA, sdpa on CPU
    # a speedplm checkpoint folder (a run's final/ or checkpoints/step-*) or a Hub id: the new run's starting weights
    init_from: str | None = setting(None, check=_not_empty)
    fields: dict = setting(factory=dict)  # SpeedPLMConfig keyword arguments, typed by its __init__ signature

    def check(self) -> None:
        unknown = sorted(set(self.fields) - set(MODEL_FIELDS))
        if unknown:
            valid = sorted({"preset", "attn_implementation", "init_from", *MODEL_FIELDS})
            raise ConfigError(f"config section 'model': unknown key(s) {unknown}; valid keys: {valid}")
        for name, value in self.fields.items():
            self.fields[name] = check_value(f"model.{name}", value, MODEL_FIELDS[name])
        if self.init_from is not None and Path(self.init_from).exists():  # recorded where it is, whatever the cwd
            self.init_from = str(Path(self.init_from).absolute())
        self._built, self.init_changes = None, []
        self._built = self.build()  # SpeedPLMConfig checks ranges and combinations ("num_attention_heads=7: ...")

    def build(self) -> SpeedPLMConfig:
        if getattr(self, "_built", None) is not None:
            return self._built
        if self.init_from is not None:
            return self._continued()
        if self.preset:
            return SpeedPLMConfig.from_preset(self.preset, **self.fields)
        return SpeedPLMConfig(**self.fields)

    def _continued(self) -> SpeedPLMConfig:
        """The checkpoint's config with the section's non-shape changes; ConfigError naming each shape change."""
        source = _source_config(self.init_from)
        base = {name: getattr(source, name) for name in MODEL_FIELDS}
        origin = dict.fromkeys(PRESETS.get(self.preset, {}), f"model.preset={self.preset}")
        origin.update({name: f"model.{name}" for name in self.fields})
        requested = {**PRESETS.get(self.preset, {}), **self.fields}
        changed = {name: value for name, value in requested.items() if base[name] != value}
        shapes = _parameter_shapes(source)
        refused = [
            f"{origin[name]} sets {name}={value!r}, the checkpoint has {base[name]!r}"
            for name, value in changed.items()
            if _parameter_shapes(SpeedPLMConfig(**{**base, name: value})) != shapes
        ]
        if refused:
            raise ConfigError(
                f"model.init_from={self.init_from}: the model is the checkpoint's, and these keys would change the "
                f"shape of its weights: {'; '.join(refused)}. Remove them (model.preset=null drops a preset), or "
                f"train a new model without model.init_from"
            )
        config = SpeedPLMConfig(**{**base, **changed})
        if _parameter_shapes(config) != shapes:  # changes that only together alter a shape
            raise ConfigError(
                f"model.init_from={self.init_from}: together, {sorted(origin[n] for n in changed)} change the shape "
                f"of the checkpoint's weights; remove them"
            )
        self.init_changes = [f"{origin[n]}: {base[n]!r} -> {v!r}" for n, v in changed.items()]
        return config

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelSection":
        named = ("preset", "attn_implementation", "init_from")
        rest = {k: v for k, v in raw.items() if k not in named}
        return cls(**{k: raw.get(k) for k in named}, fields=rest)

    def to_dict(self) -> dict:
        named = {"preset": self.preset, "attn_implementation": self.attn_implementation, "init_from": self.init_from}
        return {**{k: v for k, v in named.items() if v is not None}, **self.fields}


@dataclass
class DataSection(Section):
    NAME: ClassVar[str] = "data"
    train: str = setting("builtin", check=_not_empty)  # "builtin" (aaanalysis proteins) or a `prepare`d directory
    valid: str | None = None  # default: the valid split next to `train` ("builtin" -> its valid split)
    test: str | None = None
    cache_dir: str = "data"  # where the built-in set is prepared once
    max_length: int = setting(512, ge=3)  # tokens per packed row; longer proteins get a random window each epoch
    num_workers: int = setting(0, ge=0)
    mask_rate: float = setting(0.2, gt=0, lt=1)  # ESM2-style MLM; 0.2 pays off at speedrun budgets (SpeedrunningPLMs)
    mask_rate_end: float | None = setting(None, gt=0, lt=1)  # schedule mask_rate -> mask_rate_end over ...
    mask_schedule_steps: int = setting(0, ge=0)  # ... this many steps (0 = no schedule)
    replacement: Literal["80/10/10", "mask"] = "80/10/10"  # "mask": every selected token becomes <mask>

    def check(self) -> None:
        end, steps = self.mask_rate_end, self.mask_schedule_steps
        if (end is None) != (steps == 0):  # a schedule needs both keys; one alone would be ignored
            given = f"data.mask_rate_end={end}" if end is not None else f"data.mask_schedule_steps={steps}"
            missing = "data.mask_schedule_steps (> 0)" if end is not None else "data.mask_rate_end"
            raise ConfigError(
                f"{given} without {missing}: a mask-rate schedule needs both data.mask_rate_end and "
                f"data.mask_schedule_steps (data.mask_rate -> data.mask_rate_end over that many steps)"
            )


@dataclass
class TrainSection(Section):
    NAME: ClassVar[str] = "train"
    output_dir: str = setting("runs", check=_not_empty)
    run_name: str = setting("default", check=_plain_name)  # the run lives in output_dir/run_name
    seed: int = setting(0, ge=0)
    max_steps: int = setting(300, ge=1)
    tokens_per_step: int = setting(16384, ge=1)  # the global batch in tokens (all ranks, all accumulation micro-steps)
    micro_batch_tokens: int = setting(8192, ge=1)  # most tokens per rank per forward; see resolve_batch
    batch_warmup_steps: int = setting(
        0, ge=0
    )  # global batch grows linearly over these steps (training/data/batch_schedule.py)
    batch_warmup_start: float = setting(0.25, gt=0, le=1)  # ... from this fraction of tokens_per_step
    grad_clip: float = setting(1.0, ge=0)  # 0 = off
    compile: bool | Literal["auto"] = "auto"  # torch.compile of each block; "auto" = on CUDA only
    cpu_threads: int | None = setting(None, ge=1)  # CPU: torch threads per rank; None = cores / ranks on this node
    log_every: int = setting(10, ge=1)
    save_every: int = setting(100, ge=0)  # 0 = only at the end (and on a stop signal)
    keep_checkpoints: int = setting(2, ge=1)  # the newest N verified checkpoints of this run are kept
    resume: str = setting("auto", check=_resume_choice)  # "auto" (newest intact checkpoint), "none", or a directory
    overwrite: bool = False  # true: a start that would mix two histories deletes the other one (training/run_start.py)
    resume_data_state: bool = True  # false: restore weights/optimizer but start the data from the top (new data)
    max_bad_steps: int = setting(5, ge=1)  # non-finite loss/grad steps in a row that stop the run
    peak_tflops: float | None = setting(None, gt=0)  # for MFU; None = the SKU's peak (training/throughput.py)
    allow_fp32: bool = False  # CUDA without bf16/fp16 mixed precision is refused unless this is true
    inject_nan_at: list[int] = setting(factory=list, ge=0)  # fault injection for tests: loss becomes NaN there
    # fault injection for tests: the run sends itself SIGTERM as that phase starts (the step-0 eval, the final evals,
    # writing final/)
    inject_sigterm_at: Literal["start_eval", "final_eval", "final"] | None = None
    # true: a resume may change train.max_steps (only it): the run continues with a fresh schedule that starts at the
    # checkpoint's learning rate (training/run_start.py, README "Training")
    extend: bool = False
    # transformers' per-block activation checkpointing (non-reentrant): less memory, one more forward per block
    gradient_checkpointing: bool = False
    # stop once the validation loss (evaluated every eval.every steps) is <= this: save, final evals, final/, and
    # time_to_target / tokens_to_target interpolated between the two evals that bracket it (part of the recipe)
    target_loss: float | None = setting(None, gt=0)


@dataclass
class EvalSection(Section):
    NAME: ClassVar[str] = "eval"
    every: int = setting(100, ge=0)  # steps; 0 = only at the end
    mask_rate: float = setting(0.15, gt=0, lt=1)  # ESM2's evaluation protocol
    seed: int = setting(1234, ge=0)  # fixed: every eval scores the same masked positions
    # cap per split on the SCORED tokens (masked positions, all ranks; ~mask_rate of the residues): whole batches are
    # evaluated until this many have been scored (None = the whole split); metrics' `tokens` is the exact count
    max_tokens: int | None = setting(30_000, ge=1)
    test_at_end: bool = True


@dataclass
class TrackingSection(Section):
    NAME: ClassVar[str] = "tracking"
    wandb: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "speedplm"
    tensorboard: bool = False


SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "optim": OptimSection,
    "eval": EvalSection,
    "hub": HubSection,
    "tracking": TrackingSection,
}


@dataclass
class RunConfig:
    model: ModelSection
    data: DataSection
    train: TrainSection
    optim: OptimSection
    eval: EvalSection
    hub: HubSection
    tracking: TrackingSection

    def __post_init__(self):
        if self.train.target_loss is not None and not self.eval.every:
            raise ConfigError(
                f"train.target_loss={self.train.target_loss} needs eval.every > 0 (the validation loss is compared "
                f"with it at every eval.every steps), got eval.every={self.eval.every}"
            )
        if self.train.micro_batch_tokens < self.data.max_length:
            raise ConfigError(
                f"train.micro_batch_tokens={self.train.micro_batch_tokens}: must be >= data.max_length="
                f"{self.data.max_length} (a micro-batch holds whole rows)"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / self.train.run_name

    def model_config(self) -> SpeedPLMConfig:
        return self.model.build()

    def to_dict(self) -> dict:
        out = {"model": self.model.to_dict()}
        out.update({name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS if name != "model"})
        return out

    def recipe(self) -> dict:
        """Every key that changes the training trajectory, flat (`optim.muon_lr`), as JSON values: what a checkpoint
        records and a resume compares (training/run_start.py). The model is every SpeedPLMConfig field, resolved."""
        model = self.model_config()
        flat = {f"model.{name}": getattr(model, name) for name in MODEL_FIELDS if name not in MODEL_IMPLEMENTATION}
        flat["model.init_from"] = self.model.init_from
        for section in ("data", "train", "optim", "eval"):
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                if f"{section}.{key}" not in NOT_RECIPE:
                    flat[f"{section}.{key}"] = value
        for key in RECORDED_WHEN_SET:  # absent when unset: checkpoints written before these keys existed still match
            if flat[key] is None:
                del flat[key]
        return json.loads(json.dumps(flat))  # tuples -> lists: equal to what a checkpoint reads back


# How a run is computed, stored or watched, not which trajectory it follows: free to change on a resume. hub.* and
# tracking.* are not part of the recipe either.
NOT_RECIPE = {
    *(f"train.{k}" for k in ("output_dir", "run_name", "resume", "overwrite", "log_every", "save_every")),
    *(f"train.{k}" for k in ("keep_checkpoints", "cpu_threads", "compile", "micro_batch_tokens", "max_bad_steps")),
    *(f"train.{k}" for k in ("peak_tflops", "inject_nan_at", "inject_sigterm_at", "extend", "resume_data_state")),
    "train.gradient_checkpointing",
    "data.num_workers",
    "data.cache_dir",
    "eval.every",
    "eval.test_at_end",
}
# Recipe keys recorded only when set (newer than the recipe record itself).
RECORDED_WHEN_SET = ("model.init_from", "train.target_loss")
MODEL_IMPLEMENTATION = ("kernels",)  # the model's implementation choice (also free on resume: training/checkpoint.py)


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's tokens are laid out: world_size ranks x accumulation micro-steps x micro-batch."""

    world_size: int
    accumulation: int  # micro-steps of a full step
    rows_per_micro_batch: int
    max_length: int
    schedule: BatchSchedule  # micro-steps of each step (fewer during a batch warmup)

    @property
    def micro_batch_tokens(self) -> int:
        return self.rows_per_micro_batch * self.max_length

    @property
    def tokens_per_step(self) -> int:
        return self.world_size * self.accumulation * self.micro_batch_tokens

    def describe(self) -> str:
        return (
            f"{self.world_size} rank(s) x {self.accumulation} accumulation step(s) x {self.micro_batch_tokens} "
            f"tokens = {self.tokens_per_step} tokens per step"
            + (f" (from step {self.schedule.warmup_steps} on)" if self.schedule.warmup_steps else "")
        )


def resolve_batch(train: TrainSection, max_length: int, world_size: int) -> BatchPlan:
    """The global batch (`train.tokens_per_step`) split for `world_size` ranks: whole rows of `max_length` tokens,
    the same number per rank, as few accumulation micro-steps as keep each micro-batch within
    `train.micro_batch_tokens`. Refuses only a batch that cannot be split that way, naming the override that fixes
    it."""
    unit = max_length * world_size  # one row per rank
    if train.tokens_per_step % unit:
        lower, upper = train.tokens_per_step // unit * unit, -(-train.tokens_per_step // unit) * unit
        fixes = " or ".join(f"train.tokens_per_step={n}" for n in (lower, upper) if n > 0)
        raise ConfigError(
            f"train.tokens_per_step={train.tokens_per_step} cannot be split into rows of data.max_length={max_length} "
            f"tokens over {world_size} rank(s): it must be a multiple of {max_length} x {world_size} = {unit}; "
            f"use {fixes}"
        )
    rows_per_rank = train.tokens_per_step // unit
    max_rows = train.micro_batch_tokens // max_length
    accumulation = next(
        a for a in range(1, rows_per_rank + 1) if rows_per_rank % a == 0 and rows_per_rank // a <= max_rows
    )
    try:
        schedule = BatchSchedule(accumulation, train.batch_warmup_steps, train.batch_warmup_start)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return BatchPlan(world_size, accumulation, rows_per_rank // accumulation, max_length, schedule)


def parse_override(text: str) -> tuple[str, str, object]:
    """'train.max_steps=50' -> ('train', 'max_steps', 50); the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.max_steps=50")
    path, value = text.split("=", 1)
    section, key = path.split(".", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from None
    return section, key, parsed


# Keys that moved to another section: an old recipe or override gets an error naming the new key.
MOVED = {("train", f.name): "optim" for f in dataclasses.fields(OptimSection)}


def _check_keys(section: str, given: dict, valid) -> None:
    unknown = sorted(set(given) - set(valid))
    moved = [f"{section}.{key} is now {MOVED[section, key]}.{key}" for key in unknown if (section, key) in MOVED]
    if moved:
        raise ConfigError(f"config section '{section}': " + "; ".join(moved))
    if unknown:
        raise ConfigError(f"config section '{section}': unknown key(s) {unknown}; valid keys: {sorted(valid)}")


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Read a recipe, apply overrides, check every key's type and range. Raises ConfigError (a ValueError)."""
    raw = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a run config is a mapping of sections, got {type(raw).__name__}")
    _check_keys("<top level>", raw, SECTIONS)
    for name, value in raw.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}: section '{name}' must be a mapping of keys, got {type(value).__name__}")
    raw = {name: dict(raw.get(name) or {}) for name in SECTIONS}
    for text in overrides:
        section, key, value = parse_override(text)
        _check_keys("<top level>", {section: None}, SECTIONS)
        raw[section][key] = value

    _check_keys("model", raw["model"], {"preset", "attn_implementation", "init_from", *MODEL_FIELDS})
    sections = {"model": ModelSection.from_dict(raw["model"])}
    for name, cls in SECTIONS.items():
        if name != "model":
            _check_keys(name, raw[name], {f.name for f in dataclasses.fields(cls)})
            sections[name] = cls(**raw[name])
    return RunConfig(**sections)
