"""The training loop as one object: check -> build -> resume -> steps (accumulate, clip, skip non-finite, update) ->
eval, save, push -> final evals and final/.

Gradients are token-weighted: each micro-batch's mean loss is scaled by its share of the scored tokens of the whole
global step (all micro-batches, all ranks), so the update equals the gradient of the mean loss over every scored
token — the same with 1 rank or N, with or without accumulation.
"""

import contextlib
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from torch.distributed.tensor import DTensor
from transformers import AutoModelForMaskedLM

from modeling_speedplm import SpeedPLMForMaskedLM
from modeling_speedplm.kernels_speedplm import select_kernels

from .accelerate_compat import enable_cpu_fsdp2, fsdp_requested, local_world_size, use_cpu, world_size_from_env
from .checkpoint import CheckpointError, CheckpointManager, TrainerState, save_pretrained
from .config import ConfigError, RunConfig, resolve_batch
from .data_setup import build_eval_loader, build_train_loader, resolve_splits
from .metrics import evaluate, reach
from .optim.build import build_optimizers, build_schedulers, muon_momentum, set_muon_momentum
from .publish.hub import HubPushError
from .publish.publisher import ModelPublisher, check_hub
from .run_start import RunRefused, ScheduleExtension, StartPlan, plan_start
from .throughput import flops_per_token, mean_context, peak_flops
from .tracking import MetricsLog, tracker_init_kwargs, tracker_names, tracking_problems

logger = logging.getLogger("speedplm")


class TrainingStopped(Exception):
    """Raised after a signal-triggered save; carries the conventional exit code (128 + signal)."""

    def __init__(self, code: int):
        super().__init__(f"stopped by signal, exit code {code}")
        self.code = code


class NonFiniteLosses(RuntimeError):
    pass


class SignalFlag:
    """SIGTERM/SIGINT set a flag, for the whole of Trainer.train(): the step-0 eval, the loop, the final evals, final/
    and the last push each finish what they are doing (a push is cancelled), the run saves what it can and exits
    143/130."""

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
class StepResult:
    loss: float  # mean over all scored tokens of the step (NaN if skipped)
    grad_norm: float
    finite: bool
    tokens: int  # real (non-padding) tokens of the step, all ranks


def build_accelerator(config: RunConfig) -> Accelerator:
    cpu = use_cpu()
    accelerator = Accelerator(
        cpu=cpu,
        log_with=tracker_names(config.tracking) or None,
        project_config=ProjectConfiguration(project_dir=str(config.run_dir)),
    )
    if cpu and fsdp_requested():  # 1 rank too (a world of one: the sharded layout, e.g. to resume 2 ranks on 1)
        enable_cpu_fsdp2(accelerator)
    return accelerator


def check_topology(config: RunConfig, accelerator: Accelerator) -> None:
    """Switches the launch's topology cannot run, refused (ConfigError, exit 2) before anything is built."""
    if not accelerator.is_fsdp2:
        return
    if config.optim.normuon:
        raise ConfigError(
            "optim.normuon=true is not supported under FSDP2 (a launch with accelerate_configs/fsdp2*.yaml): "
            "NorMuon's per-neuron normalisation is not implemented for sharded (DTensor) matrices. Set "
            "optim.normuon=false, or launch with DDP (accelerate_configs/cpu_2ranks.yaml, multi_gpu.yaml)"
        )
    if accelerator.state.fsdp_plugin.activation_checkpointing:
        raise ConfigError(
            "fsdp_activation_checkpointing: true in the accelerate launch config: use train.gradient_checkpointing="
            "true instead (the same per-block, non-reentrant recomputation, applied by the model before sharding) "
            "and set fsdp_activation_checkpointing: false"
        )


def build_model(config: RunConfig, init_weights: bool = False) -> SpeedPLMForMaskedLM:
    """A freshly initialised model; with init_weights, the weights of model.init_from (a new run continuing a
    checkpoint: its config with the section's non-shape changes, training/config.py)."""
    requested = config.model.attn_implementation
    attn_implementation = requested or ("flex_attention" if torch.cuda.is_available() else "sdpa")
    if not init_weights:
        return AutoModelForMaskedLM.from_config(config.model_config(), attn_implementation=attn_implementation)
    source = config.model.init_from
    try:
        model, info = SpeedPLMForMaskedLM.from_pretrained(
            source,
            config=config.model_config(),
            attn_implementation=attn_implementation,
            dtype=torch.float32,  # the training copy: fp32 (bf16 is autocast's)
            output_loading_info=True,
        )
    except (OSError, ValueError) as err:
        raise RunRefused(f"model.init_from={source}: cannot load its weights ({err})") from None
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = sorted(set(info.get("missing_keys", ())) - tied)
    mismatched = info.get("mismatched_keys") or []
    if missing or info.get("unexpected_keys") or mismatched:
        raise RunRefused(
            f"model.init_from={source}: its weights do not fit the model (missing {missing}, unexpected "
            f"{sorted(info.get('unexpected_keys') or [])}, mismatched {mismatched})"
        )
    logger.info("model.init_from=%s: starting from its weights (fresh optimizer and schedule)", source)
    return model


class Trainer:
    """One training run. It owns the accelerator, model, optimizers, schedulers, loaders, checkpoints, metrics and
    the run's only step counter, `self.progress.step` (optimizer steps taken; every logged step, schedule, save and
    eval is counted by it).

        Trainer(config)        check and build, in this order, writing nothing until all of it succeeded: batch
                               arithmetic for the launch's world size -> accelerator -> data directories -> start
                               plan (fresh or resume: ownership, intact checkpoint, same model and recipe, metrics
                               history; training/run_start.py) -> external preconditions (output dir writable,
                               trackers, Hub token and write access) -> model, loaders (shards verified), optimizers
                               -> restored state; only then the run directory is written (train.overwrite=true
                               deletes the old run there first). A finished run stops after the plan, writing nothing
        train()                steps until train.max_steps or a stop signal (save, TrainingStopped), then finish()
        train_step(batches)    one optimizer step over the step's micro-batches -> StepResult
        log(result)            a metrics row every train.log_every steps, at the last step and on a skipped step
        maybe_eval()           the valid split every eval.every steps
        maybe_save(stop_code)  a checkpoint every train.save_every steps, at the last step, on a stop signal and
                               when a push is due
        maybe_push(saved)      that checkpoint to the Hub every hub.push_every steps (staged in the background)
        evaluate(split)        one evaluation of a split, logged
        finish()               final evals, final/ (the save_pretrained folder), the last push awaited
    """

    def __init__(self, config: RunConfig):
        self.config, t = config, config.train
        self.run_dir = config.run_dir
        self.batch = resolve_batch(t, config.data.max_length, world_size_from_env())  # before any process exists
        self.accelerator = acc = build_accelerator(config)
        if acc.num_processes != self.batch.world_size:
            raise RuntimeError(
                f"launcher environment said {self.batch.world_size} rank(s), accelerate has {acc.num_processes}"
            )
        check_topology(config, acc)
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        logger.setLevel(logging.INFO if acc.is_main_process else logging.WARNING)
        refuse_silent_fp32(acc, t.allow_fp32)
        if acc.device.type == "cpu":
            # `accelerate launch` without a config file exports OMP_NUM_THREADS=1, which halves a 2-core CPU run.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            torch.set_num_threads(t.cpu_threads or max(1, cores // local_world_size(acc.num_processes)))

        splits = resolve_splits(config.data, acc)  # the directories exist ("builtin": prepared once, data cache)
        if t.target_loss is not None and not splits.get("valid"):
            raise ConfigError(
                f"train.target_loss={t.target_loss} needs a validation split: data.valid=<prepared directory>, or "
                f"data.train=<a directory prepared with --split-fractions> (it holds valid/); data.train="
                f"{config.data.train} has none"
            )
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", t.keep_checkpoints, acc)
        start = self._plan_start()  # fresh or resume, from the files: refused here, nothing is built or written
        self.start, self.finished = start, start.finished
        if start.finished:
            return  # train() says so and returns: nothing is built or written
        self._decide(self._external_problems)  # every outside precondition, before the first write
        set_seed(t.seed)  # right before the model's initialisation, whatever the data preparation drew
        for change in config.model.init_changes:
            logger.info("model.init_from: the checkpoint's model with %s", change)
        # a resume restores the run's own checkpoint: the source's weights are loaded only by a fresh start
        model = build_model(config, init_weights=config.model.init_from is not None and start.checkpoint is None)
        if t.gradient_checkpointing:  # the model's own (transformers') mechanism; under FSDP2 too (check_topology)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            logger.info("gradient checkpointing: each block's activations are recomputed in the backward")
        rank, world = acc.process_index, acc.num_processes
        self.train_loader = build_train_loader(config, self.batch, splits["train"], rank)  # shards verified
        self.eval_loaders = {
            name: build_eval_loader(config, splits[name], rank, world) for name in ("valid", "test") if splits.get(name)
        }
        logger.info("%s; %s attention", self.batch.describe(), model.config._attn_implementation)
        if t.compile is True or (t.compile == "auto" and acc.device.type == "cuda"):
            # Regional compilation (one compile serves every block): the LM head's scored-positions gather has a
            # data-dependent shape that would make a whole-model graph recompile or break every step.
            for block in model.model.layers:
                block.compile()
        log_precision_and_kernels(acc, model, t.compile is True or (t.compile == "auto" and acc.device.type == "cuda"))
        optimizers = build_optimizers(model, config.optim)
        self.schedulers = build_schedulers(optimizers, config.optim, t.max_steps)
        self.model, *self.optimizers = acc.prepare(model, *optimizers)
        acc.register_for_checkpointing(*self.schedulers)
        self.progress = self._restore(start)
        self._extend_schedule()
        self.progress.recipe = config.recipe()  # what this run's checkpoints record (extended: the new max_steps)
        self._write_run_dir(start)  # the first write of the run
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", acc.is_main_process, start.run_id)
        if tracker_names(config.tracking):
            acc.init_trackers(
                config.tracking.project,
                config={**flatten(config.to_dict()), "run_id": start.run_id},
                init_kwargs=tracker_init_kwargs(config.tracking, self.run_dir, t.run_name),
            )
        self.publisher = (
            ModelPublisher(config.hub, self.run_dir / "hub_staging", acc, self.model) if config.hub.push else None
        )
        self.flops_per_token = None  # from the first step's real protein lengths and mask rate
        self.peak = peak_flops(acc.device, t.peak_tflops)
        self.bad_in_row, self._step_started, self.bar = 0, 0.0, None
        # the validation curve for train.target_loss: {loss, time (train_seconds), tokens} of each valid eval so far
        self.valid_points = [
            {"loss": r["loss"], "time": r["train_seconds"], "tokens": r["tokens"]}
            for r in start.metrics_rows or []
            if r.get("split") == "valid" and "train_seconds" in r
        ]
        self._valid_at = None  # the step of this process's last valid eval (finish() does not repeat it)
        self.stop = SignalFlag()
        self.window = {"time": time.perf_counter(), "tokens": 0, "data_wait": 0.0}

    # ---- start: decide, restore, then write ----

    def _decide(self, decide):
        """The main process runs `decide()`; every rank gets its result or the same exception."""
        acc, decision = self.accelerator, [None]
        if acc.is_main_process:
            try:
                decision[0] = decide()
            except Exception as err:  # every rank must leave the broadcast, refused or not
                decision[0] = err
        if acc.num_processes > 1:
            broadcast_object_list(decision)
        if isinstance(decision[0], Exception):
            raise decision[0]
        return decision[0]

    def _plan_start(self) -> StartPlan:
        """The main process decides from the files; every rank gets the same plan or the same refusal."""
        acc = self.accelerator
        plan = self._decide(lambda: plan_start(self.config, self.checkpoints, acc.num_processes, acc.is_fsdp2))
        for warning in plan.warnings:
            logger.warning("%s", warning)
        logger.info("%s", plan.describe())
        return plan

    def _external_problems(self) -> None:
        """RunRefused naming every outside precondition that fails: the output directory writable, the trackers
        (wandb login for online, tensorboard importable), the Hub (token, write access to hub.model_id)."""
        problems = []
        existing = next(p for p in (self.run_dir.absolute(), *self.run_dir.absolute().parents) if p.exists())
        if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
            problems.append(f"train.output_dir={self.config.train.output_dir}: {existing} is not a writable directory")
        problems += tracking_problems(self.config.tracking)
        if self.config.hub.push:
            try:
                check_hub(self.config.hub)
            except HubPushError as err:
                problems.append(f"hub.push=true: {err}")
        if problems:
            raise RunRefused("the run cannot start, nothing was written: " + "; ".join(problems))

    def _restore(self, start: StartPlan) -> TrainerState:
        if start.checkpoint is None:
            return TrainerState(start.run_id, self.accelerator.num_processes)
        problem = None
        try:
            loader_state, state = self.checkpoints.load(start.checkpoint, self.model)
            if self.config.train.resume_data_state:
                if state.world_size != self.accelerator.num_processes:  # rank 0's position, converted
                    loader_state = self.train_loader.resharded(loader_state)
                self.train_loader.load_state_dict(loader_state)
            self.train_loader.set_optimizer_step(state.step)  # the mask-rate clock, data restored or not
            if start.extend_to is not None:  # the checkpoint's LR: where its (restored) schedule stands
                factors = [lr / base for s in self.schedulers for lr, base in zip(s.get_last_lr(), s.base_lrs) if base]
                factor = factors[0] if factors else 0.0
                state.extension = {"from_step": state.step, "lr_factor": factor, "max_steps": start.extend_to}
                if not factor > 0:
                    problem = (
                        f"train.extend=true: at step {state.step} the schedule of {start.checkpoint} has decayed the "
                        f"learning rate to 0, so an extension from it would not train. Extend from a checkpoint of "
                        f"the run before the decay ended: train.resume=<checkpoint> train.overwrite=true "
                        f"train.extend=true train.max_steps={start.extend_to} (the run's checkpoints: "
                        f"{', '.join(d.name for d in self.checkpoints.step_dirs())}; train.keep_checkpoints keeps more)"
                    )
        except (ValueError, CheckpointError) as err:
            problem = f"{start.checkpoint}: {err}"
        problems = [p for p in gather_object([problem]) if p] if self.accelerator.num_processes > 1 else [problem]
        if any(problems):
            raise RunRefused(next(p for p in problems if p))
        logger.info("resumed from %s at step %d", start.checkpoint, state.step)
        return state

    def _extend_schedule(self) -> None:
        """An extended run (train.extend=true, now or in the checkpoint) follows its ScheduleExtension from here on;
        the restored scheduler state keeps counting the steps."""
        extension = self.progress.extension
        if extension is None:
            return
        schedule = ScheduleExtension(**extension)
        optim = self.config.optim

        def factor(step: int) -> float:
            return schedule.factor(step, optim.schedule, optim.decay_fraction)

        for scheduler in self.schedulers:
            scheduler.lr_lambdas = [factor] * len(scheduler.base_lrs)
        logger.info(
            "schedule extension from step %d: %s at %.4g x each group's peak LR, to 0 at step %d",
            schedule.from_step,
            "stable" if optim.schedule == "wsd" else "cosine",
            schedule.lr_factor,
            schedule.max_steps,
        )

    def _write_run_dir(self, start: StartPlan) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            for path in start.delete:  # train.overwrite=true: the old history goes before the new one starts
                logger.warning("train.overwrite=true: deleting %s", path)
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            source = f"; continued from {self.config.model.init_from}" if self.config.model.init_from else ""
            header = f"# run {start.run_id}: {start.describe()}{source}; {self.batch.describe()}\n"
            (self.run_dir / "config.yaml").write_text(header + yaml.safe_dump(self.config.to_dict(), sort_keys=False))
            if start.metrics_rows is not None:
                MetricsLog(self.run_dir / "metrics.jsonl", True, start.run_id).rewrite(start.metrics_rows)
        acc.wait_for_everyone()

    # ---- the loop ----

    def train(self) -> None:
        if self.finished:
            logger.warning("%s", self.start.describe())
            return
        try:
            with self.stop:
                self._loop()
                self.finish()
        except BaseException:
            if self.publisher is not None:  # crash or stop: drop queued pushes (a clean stop awaited its own)
                self.publisher.abort()
            raise
        self.accelerator.end_training()

    def _inject_sigterm(self, phase: str) -> None:
        if self.config.train.inject_sigterm_at == phase:  # fault injection (tests): a real signal to this process
            os.kill(os.getpid(), signal.SIGTERM)

    def _signals(self) -> tuple[int, bool]:
        """(exit code of a stop signal on any rank or 0, whether a push failed for good): one collective, so every
        rank takes the same branch."""
        acc = self.accelerator
        code = 128 + self.stop.signum if self.stop.signum else 0
        push_failed = self.publisher is not None and self.publisher.fatal() is not None
        flags = torch.tensor([code, int(push_failed)], device=acc.device)
        if acc.num_processes > 1:
            flags = acc.reduce(flags, "max")
        return int(flags[0]), bool(flags[1])

    def _stop_if_asked(self, where: str) -> None:
        """Outside the step loop: on a stop signal (or a push refused for good), save the current step's checkpoint
        unless it is on disk, then TrainingStopped (HubPushError)."""
        code, push_failed = self._signals()
        if code or push_failed:
            self._stop(code, push_failed, where, self._save_once())

    def _save_once(self) -> Path:
        step = self.progress.step
        existing = self.checkpoints.root / f"step-{step:06d}"
        if (existing / "COMPLETE").exists() and existing.name in self.checkpoints.verified:
            return existing
        return self.checkpoints.save(self.model, self.train_loader.state_dict(), self.progress, self.summary())

    def _stop(self, code: int, push_failed: bool, where: str, saved: Path) -> None:
        if self.bar is not None:
            self.bar.close()
        if push_failed:
            message = self.publisher.fatal() if self.publisher is not None else None
            raise HubPushError(
                f"{message or 'a Hub push (on the main process) failed for good'}; training stopped during {where} "
                f"at step {self.progress.step}, checkpoint {saved} saved: fix the token (HF_TOKEN) or hub.model_id "
                f"and start the run again to resume it"
            )
        name = signal.Signals(code - 128).name
        logger.warning("%s during %s: checkpoint %s saved, exit %d", name, where, saved, code)
        raise TrainingStopped(code)

    def _loop(self) -> None:
        t = self.config.train
        if self.start.checkpoint is None and "valid" in self.eval_loaders and self.config.eval.every:
            self._inject_sigterm("start_eval")
            self.evaluate("valid")  # the untrained baseline (with model.init_from: the source's loss)
            self._stop_if_asked("the step-0 evaluation")
            if self.progress.target is not None:  # a model.init_from source already at the target
                self._save_once()
        self.bar = _progress_bar(self.accelerator.is_main_process, self.progress.step, t.max_steps)
        batches = iter(self.train_loader)
        while self.progress.step < t.max_steps and self.progress.target is None:
            result = self.train_step(self._next_batches(batches))
            self.bar.update(1)
            self.log(result)
            if self.bad_in_row >= t.max_bad_steps:
                raise NonFiniteLosses(
                    f"{self.bad_in_row} non-finite steps in a row (train.max_bad_steps); stopping at step "
                    f"{self.progress.step}"
                )
            self.maybe_eval()
            stop_code, push_failed = self._signals()
            reached = self.progress.target is not None  # train.target_loss: save here, then the final evals
            saved = self.maybe_save(stop_code or push_failed or reached)
            self.maybe_push(saved)
            if stop_code or push_failed:
                if stop_code and not push_failed and self.publisher is not None:
                    self.publisher.finish()  # a clean stop awaits the pushes already queued
                self._stop(stop_code, push_failed, f"the training loop (step {self.progress.step})", saved)
        self.bar.close()

    def _next_batches(self, batches) -> list[dict]:
        """The step's micro-batches for this rank, masked at the rate of optimizer step self.progress.step (the
        loader counts from the step it was given at resume: set_optimizer_step)."""
        t0 = time.perf_counter()
        device = self.accelerator.device
        count = self.batch.schedule.at(
            self.progress.step
        )  # fewer during a batch warmup (training/data/batch_schedule.py)
        micro_batches = [to_device(next(batches), device) for _ in range(count)]
        self.window["data_wait"] += time.perf_counter() - t0
        self._step_started = t0
        return micro_batches

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        """Forward/backward over the step's micro-batches, clip, update only if everything is finite, advance the
        schedules and the step counter. Loss, grad norm and tokens are global (all ranks)."""
        acc, t, model = self.accelerator, self.config.train, self.model
        set_muon_momentum(self.optimizers[0], muon_momentum(self.progress.step, self.config.optim))
        if self.flops_per_token is None:
            first = micro_batches[0]
            fraction = ((first["labels"] != -100).sum() / first["attention_mask"].sum()).item()
            config = acc.unwrap_model(model).config
            self.flops_per_token = flops_per_token(config, mean_context(first["document_ids"]), fraction)
        model.train()
        world = acc.num_processes
        scored = [(b["labels"] != -100).sum() for b in micro_batches]
        scored_global = acc.reduce(torch.stack(scored).sum(), "sum").clamp_min(1)  # needed before backward
        loss_sum = torch.zeros((), device=acc.device)  # this rank's summed cross-entropy
        inject_nan = self.progress.step in t.inject_nan_at
        for i, (batch, n_scored) in enumerate(zip(micro_batches, scored)):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(model):  # all-reduce once per step
                with acc.autocast():
                    loss = model(**batch, sparse_prediction=True).loss  # LM head on scored tokens only
                if inject_nan:
                    loss = loss * float("nan")
                # DDP (and FSDP2's reduce-scatter) average gradients over ranks, hence x world: the result is
                # d(sum CE) / scored_global
                acc.backward(loss * n_scored * world / scored_global)
            loss_sum += loss.detach().float() * n_scored
        grad_norm = acc.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        if isinstance(grad_norm, DTensor):  # FSDP2: a replicated DTensor, already reduced over the shards
            grad_norm = grad_norm.to_local()
        real = torch.stack([b["attention_mask"].sum() for b in micro_batches]).sum()
        finite = (torch.isfinite(loss_sum) & torch.isfinite(torch.as_tensor(grad_norm, device=loss_sum.device))).float()
        totals = acc.reduce(torch.stack([loss_sum.nan_to_num(), real.float(), finite]), "sum")  # one reduce
        is_finite = bool(totals[2].item() == world)
        if is_finite:
            for opt in self.optimizers:
                opt.step()
        for opt in self.optimizers:  # a skipped step leaves parameters and optimizer state untouched
            opt.zero_grad(set_to_none=True)
        for scheduler in self.schedulers:
            scheduler.step()
        result = StepResult(
            loss=(totals[0] / scored_global).item() if is_finite else float("nan"),
            grad_norm=float(grad_norm),
            finite=is_finite,
            tokens=int(totals[1].item()),
        )
        self.progress.train_seconds += time.perf_counter() - self._step_started
        self.progress.step += 1
        self.progress.tokens += result.tokens
        self.progress.bad_steps += not is_finite
        self.bad_in_row = 0 if is_finite else self.bad_in_row + 1
        self.window["tokens"] += result.tokens
        if not is_finite:
            logger.warning(
                "step %d: non-finite loss or gradient norm, update skipped (%d in a row)",
                self.progress.step,
                self.bad_in_row,
            )
        return result

    def log(self, result: StepResult) -> None:
        step = self.progress.step
        if not (step % self.config.train.log_every == 0 or step == self.config.train.max_steps or not result.finite):
            return
        elapsed = max(time.perf_counter() - self.window["time"], 1e-9)
        tps = self.window["tokens"] / elapsed  # global: every rank's tokens
        tps_device = tps / self.accelerator.num_processes  # torchtitan's per-device rate; MFU is per device
        row = {
            "step": step,
            "tokens": self.progress.tokens,
            "loss": result.loss,
            "lr": self.schedulers[0].get_last_lr()[0],
            "grad_norm": result.grad_norm,
            "tokens_per_s": tps,
            "tokens_per_s_per_device": tps_device,
            "mask_rate": self.train_loader.last_mask_rate,  # the rate the step's last batch was masked with
            "data_wait": self.window["data_wait"] / elapsed,
            "mfu": tps_device * self.flops_per_token / self.peak if self.peak else None,
            "bad_steps": self.progress.bad_steps,
            "train_seconds": self.progress.train_seconds,
        }
        if self.publisher is not None:  # a push refused for good stops the loop after this step (_signals)
            row.update({f"hub_{k}": v for k, v in self.publisher.status().items()})
        self.metrics.write(row)
        self.accelerator.log({f"train/{k}": v for k, v in row.items() if v is not None and k != "step"}, step=step)
        self.bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tps:,.0f}")
        self.window = {"time": time.perf_counter(), "tokens": 0, "data_wait": 0.0}

    def maybe_eval(self) -> None:
        every, step = self.config.eval.every, self.progress.step
        if "valid" in self.eval_loaders and every and step % every == 0 and step != self.config.train.max_steps:
            self.evaluate("valid")

    def _push_due(self) -> bool:
        every = self.config.hub.push_every
        return self.publisher is not None and bool(every) and self.progress.step % every == 0

    def maybe_save(self, stop_code: int = 0) -> Path | None:
        """A checkpoint every train.save_every steps, at the last step, on a stop signal (or the target reached: any
        truthy `stop_code`), and at each step a Hub push is due (the push is staged from it). Returns its directory,
        or None."""
        t, step = self.config.train, self.progress.step
        if (t.save_every and step % t.save_every == 0) or stop_code or step == t.max_steps or self._push_due():
            return self.checkpoints.save(self.model, self.train_loader.state_dict(), self.progress, self.summary())
        return None

    def maybe_push(self, saved: Path | None) -> None:
        """Queue a Hub push of the checkpoint just saved: the pusher's thread stages and uploads it, off the step
        path (the last step's model is pushed from final/ by finish())."""
        if self._push_due() and saved is not None and self.progress.step != self.config.train.max_steps:
            self.publisher.push_checkpoint(self.progress.step, saved, self.summary())

    def evaluate(self, split: str) -> dict:
        acc, step = self.accelerator, self.progress.step
        result = evaluate(self.model, self.eval_loaders[split], acc, self.config.eval.max_tokens)
        result["scored_tokens"] = result.pop("tokens")
        clock = {"train_seconds": self.progress.train_seconds}  # the training clock at this eval (time-to-loss)
        self.metrics.write({"step": step, "tokens": self.progress.tokens, "split": split, **result, **clock})
        acc.log({f"{split}/{k}": v for k, v in result.items()}, step=step)
        logger.info(
            "step %d %s loss %.4f perplexity %.3f accuracy %.4f",
            step,
            split,
            result["loss"],
            result["perplexity"],
            result["accuracy"],
        )
        if split == "valid":
            self._valid_at = step
            self._check_target(result["loss"])
        return result

    def _check_target(self, loss: float) -> None:
        """Add a valid eval to the curve; at the first one <= train.target_loss, record where the curve crossed it
        (training/metrics.py `reach`: linear between the two evals that bracket it, as the recipe judge does)."""
        target = self.config.train.target_loss
        if target is None or self.progress.target is not None:
            return
        self.valid_points.append({"loss": loss, "time": self.progress.train_seconds, "tokens": self.progress.tokens})
        if loss > target:
            return
        self.progress.target = {
            "target_loss": target,
            "step": self.progress.step,
            "time_to_target": reach(self.valid_points, target, "time"),
            "tokens_to_target": reach(self.valid_points, target, "tokens"),
        }
        logger.info(
            "train.target_loss=%g reached at step %d: time_to_target %.2f s (training clock), tokens_to_target %.0f",
            target,
            self.progress.step,
            self.progress.target["time_to_target"],
            self.progress.target["tokens_to_target"],
        )

    def target_summary(self) -> dict:
        """The run's summary row (train.target_loss set): reached or not, and where."""
        target, reached = self.progress.target or {}, self.progress.target is not None
        best = min((p["loss"] for p in self.valid_points), default=None)
        return {
            "step": self.progress.step,
            "tokens": self.progress.tokens,
            "split": "summary",  # not a train row (no split) nor an eval row: readers of either skip it
            "target_loss": self.config.train.target_loss,
            "target_reached": reached,
            "time_to_target": target.get("time_to_target"),
            "tokens_to_target": target.get("tokens_to_target"),
            "target_step": target.get("step"),
            "best_valid_loss": best,
            "train_seconds": self.progress.train_seconds,
        }

    def finish(self) -> None:
        """Final evals, then final/ (written as .tmp-final/, renamed once the last push is awaited: final/ exists only
        for a finished run). A stop signal at any point: the last step's checkpoint is on disk, exit 143/130, and a
        restart resumes at train.max_steps and redoes this."""
        self._stop_if_asked("the last training step")
        self._inject_sigterm("final_eval")
        for split in ("valid", "test"):
            if split == "valid" and self._valid_at == self.progress.step:
                continue  # evaluated at this step already (the eval that reached train.target_loss)
            if split in self.eval_loaders and (split == "valid" or self.config.eval.test_at_end):
                self.evaluate(split)
                self._stop_if_asked(f"the final {split} evaluation")
        if self.config.train.target_loss is not None:
            row = self.target_summary()
            self.metrics.write(row)
            if not row["target_reached"]:
                logger.warning(
                    "train.target_loss=%g not reached by step %d (best validation loss %s)",
                    row["target_loss"],
                    row["step"],
                    row["best_valid_loss"],
                )
        acc = self.accelerator
        final, tmp = self.run_dir / "final", self.run_dir / ".tmp-final"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        self._inject_sigterm("final")
        logger.info("writing %s", final)
        save_pretrained(acc, self.model, tmp, training_summary=self.summary())
        acc.wait_for_everyone()
        try:
            self._stop_if_asked("writing final/")
            pushed = True
            if self.publisher is not None:
                self.publisher.push_final(tmp, self.progress.step)
                logger.info("awaiting the last Hub push")
                try:
                    pushed = self.publisher.finish(stop=lambda: bool(self.stop.signum))
                except HubPushError:
                    self._rename_final(tmp, final)  # the local model is complete; the run exits non-zero
                    raise
            if not pushed:  # cancelled by a stop signal on the main process; the others learn it here
                logger.warning("the last Hub push was cancelled")
            self._stop_if_asked("the last Hub push")
        except BaseException:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._rename_final(tmp, final)

    def _rename_final(self, tmp: Path, final: Path) -> None:
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)

    def summary(self) -> str:
        """One sentence for the model card."""
        data = self.config.data.train
        if data == "builtin":
            data = "the built-in aaanalysis benchmark proteins (UniProt-derived, BSD-3)"
        text = (
            f"Trained with speedplm for {self.progress.step} steps ({self.progress.tokens:,} tokens) on {data}, "
            f"max length {self.config.data.max_length}."
        )
        if self.config.model.init_from:
            text += (
                f" Continued from {self.config.model.init_from} (its weights; a fresh optimizer and learning-rate "
                f"schedule, warmup included)."
            )
        target, reached = self.config.train.target_loss, self.progress.target
        if reached:
            text += (
                f" Target validation loss {target:g} reached after {reached['time_to_target']:.2f} s of training "
                f"(time_to_target, without eval and checkpoint time) and {reached['tokens_to_target']:,.0f} tokens "
                f"(tokens_to_target), interpolated between the two evaluations that bracket it; stopped at step "
                f"{reached['step']}."
            )
        elif target is not None:
            text += f" Target validation loss {target:g} not reached (by step {self.progress.step})."
        return text


def refuse_silent_fp32(accelerator: Accelerator, allow_fp32: bool) -> None:
    """On CUDA, fp32 (no mixed precision) is ~10x slower than bf16 and is never what a plain `python
    train_accelerate.py` meant: refuse it unless asked for (issue #23)."""
    if accelerator.device.type == "cuda" and accelerator.mixed_precision == "no" and not allow_fp32:
        raise ConfigError(
            "CUDA device with mixed_precision 'no' (fp32): launch with `accelerate launch --mixed_precision bf16` "
            "(or a config file from accelerate_configs/, or ACCELERATE_MIXED_PRECISION=bf16), or pass "
            "train.allow_fp32=true to train in fp32 on purpose"
        )


def log_precision_and_kernels(accelerator: Accelerator, model, compiled: bool) -> None:
    """One start line with what really runs: precision, attention backend, Triton kernels (the "auto" choice
    resolved for this device), compile."""
    precision = accelerator.mixed_precision
    precision = "fp32" if precision == "no" else f"{precision} autocast (fp32 weights)"
    choice = model.config.kernels
    kernels = select_kernels(choice, accelerator.device).name
    logger.info(
        "precision %s; attention %s; kernels %s%s; torch.compile of each block %s; device %s",
        precision,
        model.config._attn_implementation,
        f"{choice} -> {kernels}" if choice != kernels else kernels,
        "" if kernels == "torch" else " (Triton)",
        "on" if compiled else "off",
        torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else accelerator.device,
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


def _progress_bar(enabled: bool, initial: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)
