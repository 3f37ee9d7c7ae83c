"""What `accelerate launch` and Accelerator do that accelerate does not say, and our workarounds, in one room.

Checked on accelerate 1.15 (TESTED_ACCELERATE). The two workarounds that reach into accelerate's internals
(`enable_cpu_fsdp2`, `one_model_for_every_optimizer`) check that those internals are still there and warn once on
any other accelerate version; tests/test_fsdp2.py exercises both. The rest reads the launcher's environment (world
size before the process group exists, CPU and FSDP requests) or works around the launcher's process handling
(`die_with_launcher`).
"""

import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import accelerate
import torch
from accelerate.utils import get_int_from_env

logger = logging.getLogger("speedplm")

TESTED_ACCELERATE = "1.15"


def check_accelerate_version(workaround: str) -> None:
    """Warn (once per workaround) when accelerate is not the version the workaround was written against."""
    if not accelerate.__version__.startswith(TESTED_ACCELERATE + "."):
        warnings.warn(
            f"training/accelerate_compat.py: {workaround} works around accelerate {TESTED_ACCELERATE} internals; "
            f"installed accelerate {accelerate.__version__}: check that it is still needed and still right "
            "(tests/test_fsdp2.py)",
            stacklevel=3,
        )


def world_size_from_env() -> int:
    """Number of ranks, from the variables every launcher sets (torchrun: WORLD_SIZE; MPI: PMI_SIZE, ...), read
    before the process group exists: the batch arithmetic is checked before anything is created or written."""
    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def local_world_size(default: int) -> int:
    """Ranks on this node (for CPU threads per rank)."""
    return get_int_from_env(["LOCAL_WORLD_SIZE"], default)


def use_cpu() -> bool:
    """accelerate 1.15 makes launched CPU processes a gloo group (MULTI_CPU) only when the script asks for
    Accelerator(cpu=True); without it `accelerate launch --multi_gpu` (or a MULTI_GPU config file) on a GPU-less
    machine gives N independent single-process runs."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")


def fsdp_requested() -> bool:
    """An FSDP launch config exports ACCELERATE_USE_FSDP=true (also where accelerate itself ignores it: on CPU)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def enable_cpu_fsdp2(accelerator) -> None:
    """FSDP2 over gloo ranks on CPUs (accelerate_configs/fsdp2_cpu_2ranks.yaml: tests and laptops).

    accelerate 1.15 applies an FSDP plugin only to accelerator device types (AcceleratorState takes the FSDP branch
    for MULTI_GPU/XPU/..., never MULTI_CPU), so on CPU an FSDP launch silently became DDP. torch's fully_shard works
    on a gloo CPU mesh, and accelerate's FSDP2 code paths (prepare, clip_grad_norm_, save_state/load_state through
    torch.distributed.checkpoint, get_state_dict) run there unchanged once the state says FSDP; so set it, in both
    shared states (PartialState's is copied into AcceleratorState whenever one is constructed).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    check_accelerate_version("enable_cpu_fsdp2")
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
    if not accelerator.is_fsdp2:
        raise RuntimeError(
            f"enable_cpu_fsdp2: accelerate {accelerate.__version__} did not take the FSDP2 state; "
            "this workaround needs updating (training/accelerate_compat.py)"
        )


class _SameModelForEveryIndex(list):
    """The model list, iterated as is, but indexing past its end gives the one model."""

    def __getitem__(self, index):
        if isinstance(index, int) and index >= len(self):
            index = 0
        return super().__getitem__(index)


@contextlib.contextmanager
def one_model_for_every_optimizer(accelerator):
    """accelerate 1.15's FSDP save_state/load_state pair optimizer i with model i (`self._models[i]`), so our two
    optimizers (Muon, Adam) over one model raise IndexError there. Pair every optimizer with the one model while
    saving or loading; iteration over the models (what gets saved as a model) is unchanged."""
    if not accelerator.is_fsdp2:
        yield
        return
    check_accelerate_version("one_model_for_every_optimizer")
    models = getattr(accelerator, "_models", None)
    if not isinstance(models, list):
        raise RuntimeError(
            f"one_model_for_every_optimizer: accelerate {accelerate.__version__} has no Accelerator._models list; "
            "this workaround needs updating (training/accelerate_compat.py)"
        )
    if len(models) != 1:
        yield
        return
    accelerator._models = _SameModelForEveryIndex(models)
    try:
        yield
    finally:
        accelerator._models = models


# `accelerate launch ...` (console script or `python -m accelerate.commands.launch`) and torchrun.
_LAUNCHER = re.compile(r"accelerate(\.commands\.launch|\S*\s+launch)|torch\.distributed\.run|torchrun")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_launcher(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send this process `sig` when its launcher dies. Returns whether it did.

    accelerate's simple launcher (one process: `accelerate launch train_accelerate.py`) runs the script with
    subprocess.Popen and wait(): a SIGTERM to the launcher kills it at once (exit 143) and is not forwarded, so the
    trainer ran on orphaned and saved nothing. With PR_SET_PDEATHSIG the launcher's death delivers SIGTERM to the
    trainer, whose handler finishes the step, saves a checkpoint and exits 143. torchrun (multi-process configs)
    forwards SIGTERM itself and kills its workers 30 s later; this also covers a torchrun agent that was SIGKILLed.
    Only under a launcher (Linux): a plain `python train_accelerate.py` under nohup must outlive its shell.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    if not _LAUNCHER.search(cmdline):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        logger.warning(
            "prctl(PR_SET_PDEATHSIG) failed (errno %d): a killed launcher will not stop this run", ctypes.get_errno()
        )
        return False
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), sig)
    return True
