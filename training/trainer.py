"""The training loop: build -> resume -> steps (accumulate, clip, skip non-finite, update) -> eval, save, push.

Gradients are token-weighted: each micro-batch's mean loss is scaled by its share of the scored tokens of the whole
global step (all micro-batches, all ranks), so the update equals the gradient of the mean loss over every scored
token — the same with 1 rank or N, with or without accumulation.
"""

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch.distributed.tensor import DTensor

from modeling_speedplm import SpeedPLMForMaskedLM

from .batch_warmup import accumulation_steps
from .checkpoint import CheckpointManager, save_pretrained
from .config import RunConfig
from .data_setup import build_eval_loader, build_train_loader, resolve_splits
from .evaluation import evaluate
from .optim import build_optimizers, build_schedulers, muon_momentum, set_muon_momentum
from .publish import ModelPublisher
from .throughput import flops_per_token, mean_context, peak_flops
from .tracking import MetricsLog, tracker_init_kwargs, tracker_names

logger = logging.getLogger("speedplm")


class TrainingStopped(Exception):
    """Raised after a signal-triggered save; carries the conventional exit code (128 + signal)."""

    def __init__(self, code: int):
        super().__init__(f"stopped by signal, exit code {code}")
        self.code = code


class NonFiniteLosses(RuntimeError):
    pass


class SignalFlag:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits 143/130."""

    def __init__(self):
        self.signum, self._previous = 0, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Progress:
    """What a checkpoint restores besides the accelerate state."""

    step: int = 0
    tokens: int = 0
    bad_steps: int = 0
    train_seconds: float = 0.0  # time in data + train steps only (no eval, checkpoint or push): time-to-loss clock


def build_accelerator(config: RunConfig) -> Accelerator:
    # accelerate 1.15 makes launched CPU processes a gloo group (MULTI_CPU) only when told cpu=True; without it,
    # `accelerate launch --multi_gpu` on a GPU-less machine gives N independent single-process runs.
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    accelerator = Accelerator(
        cpu=use_cpu,
        log_with=tracker_names(config.tracking) or None,
        project_config=ProjectConfiguration(project_dir=str(config.run_dir)),
    )
    if use_cpu and accelerator.num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        enable_cpu_fsdp2(accelerator)
    return accelerator


def enable_cpu_fsdp2(accelerator: Accelerator) -> None:
    """FSDP2 over gloo ranks on CPUs (accelerate_configs/fsdp2_cpu_2ranks.yaml: tests and laptops).

    accelerate 1.15 applies an FSDP plugin only to accelerator device types (AcceleratorState takes the FSDP branch
    for MULTI_GPU/XPU/..., never MULTI_CPU), so on CPU an FSDP launch silently became DDP. torch's fully_shard works
    on a gloo CPU mesh, and accelerate's FSDP2 code paths (prepare, clip_grad_norm_, save_state/load_state through
    torch.distributed.checkpoint, get_state_dict) run there unchanged once the state says FSDP; so set it, in both
    shared states (PartialState's is copied into AcceleratorState whenever one is constructed).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables that `accelerate launch` exported
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"FSDP on CPU: only fsdp_version 2 is supported, the launch config asks for "
            f"fsdp_version {plugin.fsdp_version}"
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def build_model(config: RunConfig) -> SpeedPLMForMaskedLM:
    model = SpeedPLMForMaskedLM(config.model_config())
    requested = config.model.get("attn_implementation")
    model.config._attn_implementation = requested or ("flex_attention" if torch.cuda.is_available() else "sdpa")
    return model


def resume(config: RunConfig, checkpoints: CheckpointManager, model, train_loader, metrics: MetricsLog) -> Progress:
    if config.train.resume == "none":
        return Progress()
    if config.train.resume == "auto":
        directory = checkpoints.newest_valid()
        if directory is None:
            return Progress()
    else:
        directory = Path(config.train.resume)
        problem = checkpoints.verify(directory)
        if problem:
            raise ValueError(f"train.resume={config.train.resume}: {problem}")
    loader_state, state = checkpoints.load(directory, model)
    if config.train.resume_data_state:
        train_loader.load_state_dict(loader_state)
    metrics.truncate_after(state["step"])
    logger.info("resumed from %s at step %d", directory, state["step"])
    return Progress(**state)


def train_step(accelerator, model, optimizers, micro_batches: list[dict], inject_nan: bool, grad_clip: float):
    """Forward/backward over the step's micro-batches, clip, then update only if everything is finite.

    Returns (mean loss over all scored tokens, grad norm, finite, real tokens of the step), all global.
    """
    world = accelerator.num_processes
    scored = [(b["labels"] != -100).sum() for b in micro_batches]
    scored_global = accelerator.reduce(torch.stack(scored).sum(), "sum").clamp_min(1)  # needed before backward
    loss_sum = torch.zeros((), device=accelerator.device)  # this rank's summed cross-entropy
    for i, (batch, n_scored) in enumerate(zip(micro_batches, scored)):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):  # all-reduce once per step
            with accelerator.autocast():
                loss = model(**batch).loss
            if inject_nan:
                loss = loss * float("nan")
            # DDP (and FSDP2's reduce-scatter) average gradients over ranks, hence x world: the result is
            # d(sum CE) / scored_global
            accelerator.backward(loss * n_scored * world / scored_global)
        loss_sum += loss.detach().float() * n_scored
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if isinstance(grad_norm, DTensor):  # FSDP2: a replicated DTensor, already reduced over the shards
        grad_norm = grad_norm.to_local()
    real = torch.stack([b["attention_mask"].sum() for b in micro_batches]).sum()
    finite = (torch.isfinite(loss_sum) & torch.isfinite(torch.as_tensor(grad_norm, device=loss_sum.device))).float()
    totals = accelerator.reduce(torch.stack([loss_sum.nan_to_num(), real.float(), finite]), "sum")  # one reduce
    is_finite = bool(totals[2].item() == world)
    if is_finite:
        for opt in optimizers:
            opt.step()
    for opt in optimizers:  # a skipped step leaves parameters and optimizer state untouched
        opt.zero_grad(set_to_none=True)
    loss = (totals[0] / scored_global).item() if is_finite else float("nan")
    return loss, float(grad_norm), is_finite, int(totals[1].item())


def train(config: RunConfig) -> None:
    t, run_dir = config.train, config.run_dir
    accelerator = build_accelerator(config)
    is_main = accelerator.is_main_process
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    set_seed(t.seed)
    if accelerator.device.type == "cpu":
        # `accelerate launch` without a config file exports OMP_NUM_THREADS=1, which halves a 2-core CPU run.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(t.cpu_threads or max(1, cores // local_ranks))

    model = build_model(config)
    splits = resolve_splits(config.data, accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index
    train_loader = build_train_loader(config, splits["train"], rank, world)
    eval_loaders = {
        name: build_eval_loader(config, splits[name], rank, world) for name in ("valid", "test") if splits.get(name)
    }
    accum = train_loader.grad_accum_steps
    logger.info(
        "%d rank(s) x %d accumulation step(s) x %d tokens = %d tokens per step; %s attention",
        world,
        accum,
        t.micro_batch_tokens,
        t.tokens_per_step,
        model.config._attn_implementation,
    )
    if t.compile in ("true", True) or (t.compile == "auto" and accelerator.device.type == "cuda"):
        # Regional compilation (one compile serves every block): the LM head's scored-positions gather has a
        # data-dependent shape that would make a whole-model graph recompile or break every step.
        for block in model.model.layers:
            block.compile()
    optimizers = build_optimizers(model, t)
    schedulers = build_schedulers(optimizers, t)
    model, *optimizers = accelerator.prepare(model, *optimizers)
    accelerator.register_for_checkpointing(*schedulers)

    checkpoints = CheckpointManager(run_dir / "checkpoints", t.keep_checkpoints, accelerator)
    metrics = MetricsLog(run_dir / "metrics.jsonl", is_main)
    progress = resume(config, checkpoints, model, train_loader, metrics)
    if tracker_names(config.tracking):
        accelerator.init_trackers(
            config.tracking.project,
            config=flatten(config.to_dict()),
            init_kwargs=tracker_init_kwargs(config.tracking, run_dir, t.run_name),
        )
    publisher = ModelPublisher(config.hub, run_dir / "hub_staging", accelerator, model) if config.hub.push else None
    try:
        _loop(
            config,
            accelerator,
            model,
            optimizers,
            schedulers,
            train_loader,
            eval_loaders,
            checkpoints,
            metrics,
            progress,
            publisher,
        )
    except BaseException:
        if publisher is not None:  # crash or stop: drop queued pushes (finish() already awaited a clean stop's)
            publisher.abort()
        raise
    accelerator.end_training()


def _loop(
    config,
    accelerator,
    model,
    optimizers,
    schedulers,
    train_loader,
    eval_loaders,
    checkpoints,
    metrics,
    progress: Progress,
    publisher,
) -> None:
    t = config.train
    peak = peak_flops(accelerator.device, t.peak_tflops)
    flops = None  # per token, from the first step's real protein lengths and mask rate
    if progress.step == 0 and "valid" in eval_loaders and config.eval.every:
        run_eval(config, accelerator, model, eval_loaders, "valid", progress, metrics)  # the untrained baseline
    bar = _progress_bar(accelerator.is_main_process, progress.step, t.max_steps)
    batches = iter(train_loader)
    window = {"time": time.perf_counter(), "tokens": 0, "data_wait": 0.0}
    bad_in_row = 0
    with SignalFlag() as stop:
        while progress.step < t.max_steps:
            model.train()
            set_muon_momentum(optimizers[0], muon_momentum(progress.step, t))
            t0 = time.perf_counter()
            accum = accumulation_steps(
                progress.step, train_loader.grad_accum_steps, t.batch_warmup_steps, t.batch_warmup_start
            )
            micro_batches = [to_device(next(batches), accelerator.device) for _ in range(accum)]
            window["data_wait"] += time.perf_counter() - t0
            if flops is None:
                first = micro_batches[0]
                fraction = ((first["labels"] != -100).sum() / first["attention_mask"].sum()).item()
                flops = flops_per_token(
                    accelerator.unwrap_model(model).config, mean_context(first["document_ids"]), fraction
                )
            loss, grad_norm, finite, real_tokens = train_step(
                accelerator, model, optimizers, micro_batches, progress.step in t.inject_nan_at, t.grad_clip
            )
            for scheduler in schedulers:
                scheduler.step()
            progress.train_seconds += time.perf_counter() - t0
            progress.step += 1
            progress.tokens += real_tokens
            window["tokens"] += real_tokens
            bad_in_row = 0 if finite else bad_in_row + 1
            progress.bad_steps += not finite
            if not finite:
                logger.warning(
                    "step %d: non-finite loss or gradient norm, update skipped (%d in a row)", progress.step, bad_in_row
                )
            bar.update(1)
            step, last_step = progress.step, progress.step == t.max_steps
            if step % t.log_every == 0 or last_step or not finite:
                elapsed = max(time.perf_counter() - window["time"], 1e-9)
                tps = window["tokens"] / elapsed
                row = {
                    "step": step,
                    "tokens": progress.tokens,
                    "loss": loss,
                    "lr": schedulers[0].get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_s": tps,
                    "mask_rate": train_loader.collator.rate(step - 1),
                    "data_wait": window["data_wait"] / elapsed,
                    "mfu": tps * flops / peak if peak else None,
                    "bad_steps": progress.bad_steps,
                    "train_seconds": progress.train_seconds,
                }
                if publisher is not None:
                    publisher.check()
                    row.update({f"hub_{k}": v for k, v in publisher.status().items()})
                metrics.write(row)
                accelerator.log({f"train/{k}": v for k, v in row.items() if v is not None and k != "step"}, step=step)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
                window = {"time": time.perf_counter(), "tokens": 0, "data_wait": 0.0}
            if bad_in_row >= t.max_bad_steps:
                raise NonFiniteLosses(
                    f"{bad_in_row} non-finite steps in a row (train.max_bad_steps); stopping at step {step}"
                )
            if "valid" in eval_loaders and config.eval.every and step % config.eval.every == 0 and not last_step:
                run_eval(config, accelerator, model, eval_loaders, "valid", progress, metrics)
            stop_code = 128 + stop.signum if stop.signum else 0
            stop_code = int(accelerator.reduce(torch.tensor(stop_code, device=accelerator.device), "max").item())
            if (t.save_every and step % t.save_every == 0) or stop_code or last_step:
                checkpoints.save(step, model, train_loader.state_dict(), vars(progress))
            if publisher is not None and config.hub.push_every and step % config.hub.push_every == 0 and not last_step:
                publisher.push_model(step, training_summary(config, progress))
            if stop_code:
                bar.close()
                if publisher is not None:
                    publisher.finish()
                raise TrainingStopped(stop_code)
    bar.close()

    for split in ("valid", "test"):
        if split in eval_loaders and (split == "valid" or config.eval.test_at_end):
            run_eval(config, accelerator, model, eval_loaders, split, progress, metrics)
    accelerator.wait_for_everyone()
    save_pretrained(accelerator, model, config.run_dir / "final", training_summary=training_summary(config, progress))
    accelerator.wait_for_everyone()
    if publisher is not None:
        publisher.push_model(progress.step, training_summary(config, progress), final=True)
        publisher.finish()


def run_eval(config, accelerator, model, eval_loaders, split: str, progress: Progress, metrics: MetricsLog) -> None:
    result = evaluate(model, eval_loaders[split], accelerator, config.eval.max_tokens)
    result["scored_tokens"] = result.pop("tokens")
    metrics.write({"step": progress.step, "tokens": progress.tokens, "split": split, **result})
    accelerator.log({f"{split}/{k}": v for k, v in result.items()}, step=progress.step)
    logger.info(
        "step %d %s loss %.4f perplexity %.3f accuracy %.4f",
        progress.step,
        split,
        result["loss"],
        result["perplexity"],
        result["accuracy"],
    )


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out


def training_summary(config: RunConfig, progress: Progress) -> str:
    data = config.data.train
    if data == "builtin":
        data = "the built-in aaanalysis benchmark proteins (UniProt-derived, BSD-3)"
    return (
        f"Trained with speedplm for {progress.step} steps ({progress.tokens:,} tokens) on {data}, "
        f"max length {config.data.max_length}."
    )


def _progress_bar(enabled: bool, initial: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)
