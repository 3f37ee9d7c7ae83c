import atexit
import os
import shutil
import socket
import tempfile

import torch

# transformers copies a remote-code checkpoint's modules into HF_MODULES_CACHE under the checkpoint folder's name
# (`final`, `step-4`, ...): each test session (each xdist worker) gets its own, so two workers loading two
# checkpoints named `final` at once never read each other's half-copied files. Set before transformers is imported
# (it reads the variable once); the subprocesses the tests start inherit it.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")  # workers inherit the controller's environment
if os.environ.get("SPEEDPLM_TEST_MODULES_OF") != _worker:
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix=f"speedplm-test-modules-{_worker}-")
    os.environ["SPEEDPLM_TEST_MODULES_OF"] = _worker
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)
if "PYTEST_XDIST_WORKER" in os.environ:  # `-n 2` on 2 cores: one thread per worker, not two workers x all cores
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")  # the subprocesses' torch, numpy and scikit-learn
    torch.set_num_threads(1)

# Triton kernels run on CPU under the interpreter, which must be chosen before triton is first imported (importing
# the model's flex-attention path pulls triton in through torch._dynamo).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from modeling_speedplm import SpeedPLMConfig, SpeedPLMForMaskedLM  # noqa: E402

# Real proteins (UniProt): human ubiquitin, insulin B chain region, GFP N-terminus, lysozyme C fragment.
PROTEINS = [
    "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG",
    "FVNQHLCGSHLVEALYLVCGERGFFYTPKT",
    "MSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEGDATYGKLTLKFICTTGKLPVPWPTLVTTF",
    "KVFGRCELAAAMKRHGLDNYRGYSLGNWVCAAKFESNFNTQATNRNTDGSTDYGILQINSRWWCNDG",
]


@pytest.fixture
def tokenizer():
    from modeling_speedplm import build_tokenizer

    return build_tokenizer()


def randomized_tiny_model(seed: int = 0, **overrides) -> SpeedPLMForMaskedLM:
    """A tiny model whose zero-initialised projections and scalars are randomised, so every path affects outputs."""
    torch.manual_seed(seed)
    model = SpeedPLMForMaskedLM(SpeedPLMConfig.from_preset("tiny", **overrides))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def free_port() -> int:
    """A loopback TCP port nobody listens on, for a gloo process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
