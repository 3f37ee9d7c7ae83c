"""Run configuration: a YAML recipe plus `section.key=value` overrides, checked against one schema.

Sections: model (a preset and/or SpeedPLMConfig fields), data, train, eval, hub, tracking. Topology and precision
are not here: they come from `accelerate launch --config_file accelerate_configs/<topology>.yaml`.
"""

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from modeling_speedplm import PRESETS, SpeedPLMConfig

MODEL_FIELDS = {
    name for name in inspect.signature(SpeedPLMConfig.__init__).parameters if name not in ("self", "kwargs")
}


@dataclass
class DataSection:
    train: str = "builtin"  # "builtin" (aaanalysis proteins) or a directory written by `training.data prepare`
    valid: str | None = None  # default: the valid split next to `train` ("builtin" -> its valid split)
    test: str | None = None
    cache_dir: str = "data"  # where the built-in set is prepared once
    max_length: int = 512  # tokens per packed row; longer proteins get a random window each epoch
    num_workers: int = 0
    mask_rate: float = 0.2  # ESM2-style MLM; 0.2 pays off at speedrun budgets (SpeedrunningPLMs)
    mask_rate_end: float | None = None  # schedule mask_rate -> mask_rate_end over mask_schedule_steps
    mask_schedule_steps: int = 0
    replacement: str = "80/10/10"  # or "mask": every selected token becomes <mask>


@dataclass
class TrainSection:
    output_dir: str = "runs"
    run_name: str = "default"
    seed: int = 0
    max_steps: int = 300
    tokens_per_step: int = 16384  # global batch in tokens (all ranks, all accumulation micro-steps)
    micro_batch_tokens: int = 8192  # per rank per forward; accumulation = tokens_per_step / (ranks * this)
    schedule: str = "wsd"  # "wsd" (warmup-stable-decay) or "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.4  # wsd: share of steps spent decaying to 0
    muon_lr: float = 0.02  # hidden 2-D matrices
    embed_lr: float = 0.05  # token and value embeddings (Adam)
    head_lr: float = 0.004  # LM head (Adam)
    scalar_lr: float = 0.02  # mixing weights, U-Net skip weights (Adam)
    weight_decay: float = 0.0
    muon_momentum_start: float = 0.85  # momentum warmup (modded-nanogpt): 0.85 -> 0.95
    muon_momentum_end: float = 0.95
    muon_momentum_warmup_steps: int = 300
    # Recipe-v2 switches, off until `python -m eval.speedrun` keeps one (docs/ablations-cpu.md)
    muon_ns: str = "jordan"  # Newton-Schulz coefficients: "jordan" (one quintic, torch.optim.Muon's), "polar_express"
    muon_ns_steps: int = 5
    normuon: bool = False  # NorMuon: per-neuron second-moment normalisation of Muon's orthogonalised update
    normuon_beta2: float = 0.95
    cautious_weight_decay: bool = False  # Muon and Adam: decay only where the update and the weight agree in sign
    adam_weight_decay: float = 0.0  # decoupled (AdamW) weight decay of the Adam groups
    batch_warmup_steps: int = 0  # global batch grows linearly over these steps (0 = off; training/batch_warmup.py)
    batch_warmup_start: float = 0.25  # ... from this fraction of tokens_per_step (whole accumulation micro-steps)
    grad_clip: float = 1.0  # 0 = off
    compile: str = "auto"  # torch.compile of each block; "auto" = on CUDA only
    cpu_threads: int | None = None  # CPU runs: torch threads per rank; None = available cores / ranks on this node
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: str = "auto"  # "auto" (newest complete checkpoint, if any), "none", or a checkpoint directory
    resume_data_state: bool = True  # false: restore weights/optimizer but start the data from the top (new data)
    max_bad_steps: int = 5  # non-finite loss/grad steps in a row that stop the run
    peak_tflops: float | None = None  # for MFU; None = known GPUs' bf16 dense peak, no MFU on CPU
    inject_nan_at: list[int] = field(default_factory=list)  # fault injection for tests: loss becomes NaN there


@dataclass
class EvalSection:
    every: int = 100  # steps; 0 = only at the end
    mask_rate: float = 0.15  # ESM2's evaluation protocol
    seed: int = 1234  # fixed: every eval scores the same masked positions
    max_tokens: int | None = 200_000  # cap per split (None = whole split)
    test_at_end: bool = True


@dataclass
class HubSection:
    push: bool = False
    model_id: str | None = None
    push_every: int = 0  # steps; 0 = only at start and end
    private: bool = True
    max_retries: int = 8  # per push, on 5xx / 429 / connection errors, with exponential backoff
    backoff_s: float = 2.0  # first retry delay (doubles each time; a server's Retry-After wins)


@dataclass
class TrackingSection:
    wandb: str = "disabled"  # "online", "offline" or "disabled"
    project: str = "speedplm"
    tensorboard: bool = False


SECTIONS = {
    "data": DataSection,
    "train": TrainSection,
    "eval": EvalSection,
    "hub": HubSection,
    "tracking": TrackingSection,
}


@dataclass
class RunConfig:
    model: dict
    data: DataSection
    train: TrainSection
    eval: EvalSection
    hub: HubSection
    tracking: TrackingSection

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / self.train.run_name

    def model_config(self) -> SpeedPLMConfig:
        fields = {k: v for k, v in self.model.items() if k not in ("preset", "attn_implementation")}
        preset = self.model.get("preset")
        return SpeedPLMConfig.from_preset(preset, **fields) if preset else SpeedPLMConfig(**fields)

    def to_dict(self) -> dict:
        out = {"model": dict(self.model)}
        out.update({name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS})
        return out


def _check_keys(section: str, given: dict, valid: set[str]) -> None:
    unknown = sorted(set(given) - valid)
    if unknown:
        raise ValueError(f"config section '{section}': unknown key(s) {unknown}; valid keys: {sorted(valid)}")


def parse_override(text: str) -> tuple[str, str, object]:
    """'train.max_steps=50' -> ('train', 'max_steps', 50); the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"override {text!r}: expected section.key=value, e.g. train.max_steps=50")
    path, value = text.split("=", 1)
    section, key = path.split(".", 1)
    return section, key, yaml.safe_load(value) if value != "" else None


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    raw = {}
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a run config is a mapping of sections, got {type(raw).__name__}")
    _check_keys("<top level>", raw, {"model", *SECTIONS})
    raw = {name: dict(raw.get(name) or {}) for name in ("model", *SECTIONS)}
    for text in overrides:
        section, key, value = parse_override(text)
        _check_keys("<top level>", {section: None}, {"model", *SECTIONS})
        raw[section][key] = value

    _check_keys("model", raw["model"], MODEL_FIELDS | {"preset", "attn_implementation"})
    if raw["model"].get("preset") not in (None, *PRESETS):
        raise ValueError(f"model.preset={raw['model']['preset']!r}: choose one of {sorted(PRESETS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        _check_keys(name, raw[name], {f.name for f in dataclasses.fields(cls)})
        sections[name] = cls(**raw[name])
    config = RunConfig(model=raw["model"], **sections)
    config.model_config()  # validate the model fields now, not after data preparation
    _check_values(config)
    return config


def _check_values(config: RunConfig) -> None:
    t = config.train
    if t.schedule not in ("wsd", "cosine"):
        raise ValueError(f"train.schedule={t.schedule!r}: choose 'wsd' or 'cosine'")
    if t.compile not in ("auto", "true", "false", True, False):
        raise ValueError(f"train.compile={t.compile!r}: choose auto, true or false")
    if t.resume not in ("auto", "none") and not Path(t.resume).is_dir():
        raise ValueError(f"train.resume={t.resume!r}: 'auto', 'none' or an existing checkpoint directory")
    if t.max_steps < 1 or t.tokens_per_step < 1 or t.micro_batch_tokens < config.data.max_length:
        raise ValueError(
            "train.max_steps, train.tokens_per_step must be >= 1 and micro_batch_tokens >= data.max_length"
        )
    if t.muon_ns not in ("jordan", "polar_express") or not 1 <= t.muon_ns_steps <= 5:
        raise ValueError(
            f"train.muon_ns={t.muon_ns!r}, muon_ns_steps={t.muon_ns_steps}: 'jordan' or 'polar_express', 1-5"
        )
    if t.adam_weight_decay < 0 or not 0 <= t.normuon_beta2 < 1 or not 0 < t.batch_warmup_start <= 1:
        raise ValueError("train.adam_weight_decay >= 0, 0 <= normuon_beta2 < 1 and 0 < batch_warmup_start <= 1")
    if config.tracking.wandb not in ("online", "offline", "disabled"):
        raise ValueError(f"tracking.wandb={config.tracking.wandb!r}: choose online, offline or disabled")
    if config.hub.push and not config.hub.model_id:
        raise ValueError("hub.push=true needs hub.model_id=org/name")
    if config.data.replacement not in ("80/10/10", "mask"):
        raise ValueError(f"data.replacement={config.data.replacement!r}: choose '80/10/10' or 'mask'")
