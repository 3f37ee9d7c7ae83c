"""The training loop: build -> resume -> steps (accumulate, clip, skip non-finite, step) -> eval, save, push.

Gradients are token-weighted: each micro-batch's mean loss is scaled by its share of the scored tokens of the whole
global step (all micro-batches, all ranks), so the update equals the gradient of the mean loss over every scored
token — the same with 1 rank or N, with or without accumulation.
"""

import contextlib
import logging
import math
import os
import signal
import time

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from modeling_speedplm import SpeedPLMForMaskedLM

from .checkpoint import CheckpointManager
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
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def attention_backend(config: RunConfig) -> str:
    requested = config.model.get("attn_implementation")
    return requested or ("flex_attention" if torch.cuda.is_available() else "sdpa")


def train(config: RunConfig) -> None:
    run_dir = config.run_dir
    # accelerate 1.15 makes launched CPU processes a gloo group (MULTI_CPU) only when told cpu=True; without it,
    # `accelerate launch --multi_gpu` on a GPU-less machine gives N independent single-process runs.
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    accelerator = Accelerator(
        cpu=use_cpu,
        log_with=tracker_names(config.tracking) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir)),
    )
    is_main = accelerator.is_main_process
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    set_seed(config.train.seed)

    model = SpeedPLMForMaskedLM(config.model_config())
    model.config._attn_implementation = attention_backend(config)
    splits = resolve_splits(config.data, accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index
    train_loader = build_train_loader(config, splits["train"], rank, world)
    accum = train_loader.grad_accum_steps
    logger.info("%d rank(s) x %d accumulation step(s) x %d tokens = %d tokens per step; %s attention",
                world, accum, config.train.micro_batch_tokens, config.train.tokens_per_step,
                model.config._attn_implementation)  # fmt: skip
    optimizers = build_optimizers(model, config.train)
    schedulers = build_schedulers(optimizers, config.train)
    model, *optimizers = accelerator.prepare(model, *optimizers)
    accelerator.register_for_checkpointing(*schedulers)
    if config.train.compile in ("true", True) or (config.train.compile == "auto" and accelerator.device.type == "cuda"):
        model = torch.compile(model)

    checkpoints = CheckpointManager(run_dir / "checkpoints", config.train.keep_checkpoints, accelerator)
    metrics = MetricsLog(run_dir / "metrics.jsonl", is_main)
    step, tokens_seen, bad_in_row, bad_total = 0, 0, 0, 0
    resume_from = None
    if config.train.resume == "auto":
        resume_from = checkpoints.newest_valid()
    elif config.train.resume != "none":
        resume_from = checkpoints.root.__class__(config.train.resume)
        problem = checkpoints.verify(resume_from)
        if problem:
            raise ValueError(f"train.resume={config.train.resume}: {problem}")
    if resume_from is not None:
        loader_state, state = checkpoints.load(resume_from, model)
        if config.train.resume_data_state:
            train_loader.load_state_dict(loader_state)
        step, tokens_seen, bad_total = state["step"], state["tokens"], state["bad_steps"]
        metrics.truncate_after(step)
        logger.info("resumed from %s at step %d", resume_from, step)

    pusher = None
    if config.hub.push:
        pusher = ModelPublisher(config.hub, run_dir / "hub_staging", accelerator, model)

    if tracker_names(config.tracking):
        accelerator.init_trackers(
            config.tracking.project, config=flatten(config.to_dict()),
            init_kwargs=tracker_init_kwargs(config.tracking, run_dir, config.train.run_name),
        )  # fmt: skip
    eval_loaders = {name: build_eval_loader(config, splits[name], rank, world) for name in ("valid", "test")
                    if splits.get(name)}  # fmt: skip
    peak = peak_flops(accelerator.device, config.train.peak_tflops)
    fpt = None  # FLOPs per token, from the first step's real protein lengths
    progress = _progress(is_main, step, config.train.max_steps)

    batches = iter(train_loader)
    window = {"time": time.perf_counter(), "tokens": 0, "data_wait": 0.0}
    with SignalFlag() as stop:
        while step < config.train.max_steps:
            model.train()
            set_muon_momentum(optimizers[0], muon_momentum(step, config.train))
            t0 = time.perf_counter()
            micro_batches = [to_device(next(batches), accelerator.device) for _ in range(accum)]
            window["data_wait"] += time.perf_counter() - t0

            if fpt is None:
                first = micro_batches[0]
                scored_fraction = ((first["labels"] != -100).sum() / first["attention_mask"].sum()).item()
                fpt = flops_per_token(accelerator.unwrap_model(model).config, mean_context(first["document_ids"]),
                                      scored_fraction)  # fmt: skip
            scored_local = torch.stack([(b["labels"] != -100).sum() for b in micro_batches]).sum()
            scored_global = accelerator.reduce(scored_local.clone(), "sum").clamp_min(1)
            loss_sum = torch.zeros((), device=accelerator.device)  # sum of CE over this rank's scored tokens
            for i, batch in enumerate(micro_batches):
                n_scored = (batch["labels"] != -100).sum()
                sync = i == accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss = model(**batch).loss
                    if step in config.train.inject_nan_at:
                        loss = loss * float("nan")
                    accelerator.backward(loss * n_scored * world / scored_global)
                loss_sum += loss.detach().float() * n_scored
            clip = config.train.grad_clip if config.train.grad_clip > 0 else float("inf")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
            finite = torch.isfinite(loss_sum) & torch.isfinite(torch.as_tensor(grad_norm, device=loss_sum.device))
            finite = bool(accelerator.reduce(finite.float(), "sum").item() == world)
            if finite:
                for opt in optimizers:
                    opt.step()
                bad_in_row = 0
            else:  # skip: parameters and optimizer state untouched
                bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
                logger.warning("step %d: non-finite loss or gradient norm, update skipped (%d in a row)", step, bad_in_row)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            for sched in schedulers:
                sched.step()
            step += 1

            real_tokens = accelerator.reduce(
                torch.stack([b["attention_mask"].sum() for b in micro_batches]).sum(), "sum"
            ).item()
            tokens_seen += real_tokens
            window["tokens"] += real_tokens
            global_loss = (accelerator.reduce(loss_sum, "sum") / scored_global).item()
            progress.update(1)
            if step % config.train.log_every == 0 or step == config.train.max_steps or not finite:
                elapsed = time.perf_counter() - window["time"]
                tps = window["tokens"] / max(elapsed, 1e-9)
                row = {
                    "step": step, "tokens": tokens_seen, "loss": global_loss, "lr": schedulers[0].get_last_lr()[0],
                    "grad_norm": float(grad_norm), "tokens_per_s": tps,
                    "mask_rate": train_loader.collator.rate(step - 1), "data_wait": window["data_wait"] / max(elapsed, 1e-9),
                    "mfu": tps * fpt / peak if peak else None, "bad_steps": bad_total,
                }  # fmt: skip
                if pusher is not None:
                    row.update({f"hub_{k}": v for k, v in pusher.status().items()})
                    pusher.check()
                metrics.write(row)
                accelerator.log({f"train/{k}": v for k, v in row.items() if v is not None and k != "step"}, step=step)
                progress.set_postfix(loss=f"{global_loss:.4f}", tok_s=f"{tps:,.0f}")
                window = {"time": time.perf_counter(), "tokens": 0, "data_wait": 0.0}
            if bad_in_row >= config.train.max_bad_steps:
                raise NonFiniteLosses(f"{bad_in_row} non-finite steps in a row (train.max_bad_steps); stopping at step {step}")

            every = config.eval.every
            if "valid" in eval_loaders and every and step % every == 0 and step < config.train.max_steps:
                _log_eval(evaluate(model, eval_loaders["valid"], accelerator, config.eval.max_tokens), "valid", step, tokens_seen, metrics, accelerator)
            stop_code = 128 + stop.signum if stop.signum else 0
            stop_code = int(accelerator.reduce(torch.tensor(stop_code, device=accelerator.device), "max").item())
            last_step = step == config.train.max_steps
            save_now = (config.train.save_every and step % config.train.save_every == 0) or stop_code
            if save_now or last_step:
                checkpoints.save(step, model, train_loader.state_dict(),
                                 {"step": step, "tokens": tokens_seen, "bad_steps": bad_total})  # fmt: skip
            if pusher is not None and config.hub.push_every and step % config.hub.push_every == 0 and not last_step:
                pusher.push_model(step, training_summary(config, step, tokens_seen))
            if stop_code:
                progress.close()
                if pusher is not None:
                    pusher.finish()
                raise TrainingStopped(stop_code)
    progress.close()

    for name in ("valid", "test"):
        if name in eval_loaders and (name == "valid" or config.eval.test_at_end):
            _log_eval(evaluate(model, eval_loaders[name], accelerator, config.eval.max_tokens), name, step, tokens_seen, metrics, accelerator)
    final_dir = run_dir / "final"
    accelerator.wait_for_everyone()
    if is_main:
        accelerator.unwrap_model(model).save_pretrained(final_dir, training_summary=training_summary(config, step, tokens_seen))
    accelerator.wait_for_everyone()
    if pusher is not None:
        pusher.push_model(step, training_summary(config, step, tokens_seen), final=True)
        pusher.finish()
    accelerator.end_training()


def _log_eval(result: dict, split: str, step: int, tokens: int, metrics: MetricsLog, accelerator) -> None:
    row = {"step": step, "tokens": tokens, "split": split, **{("scored_tokens" if k == "tokens" else k): v
                                                                for k, v in result.items()}}
    metrics.write(row)
    accelerator.log({f"{split}/{k}": v for k, v in result.items() if isinstance(v, (int, float))}, step=step)
    logger.info("step %d %s loss %.4f perplexity %.3f accuracy %.4f", step, split, result["loss"],
                result["perplexity"], result["accuracy"])  # fmt: skip


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


def training_summary(config: RunConfig, step: int, tokens: int) -> str:
    data = "built-in aaanalysis benchmark proteins (UniProt-derived, BSD-3)" if config.data.train == "builtin" else config.data.train
    return f"Trained for {step} steps ({tokens:,} tokens) on {data}, max length {config.data.max_length}."


def _progress(enabled: bool, initial: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)
