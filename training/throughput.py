"""FLOPs per token and peak FLOP/s, for MFU.

FLOPs per trained token (forward + backward = 3x forward, PaLM appendix B convention):
    6 * N_matmul                      every weight matrix of the blocks (2 FLOPs per multiply-add, x3)
  + 6 * hidden * vocab * scored_frac  LM head, run only on the scored (masked) positions
  + 12 * layers * hidden * context    QK^T and AV: 2 * 2 * context * hidden per token per layer, x3
where `context` is the mean number of keys a token attends to: sum(len^2) / sum(len) over the proteins of a batch
with document masking (not the row length: masked-out blocks are skipped by flex and are no work).
Embedding lookups, norms and elementwise work are not counted (they are not matrix FLOPs).
"""

import torch

# bf16 dense tensor-core peak, FLOP/s (no sparsity)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def flops_per_token(config, context: float, scored_fraction: float) -> float:
    hidden, layers = config.hidden_size, config.num_hidden_layers
    n_matmul = layers * (4 * hidden * hidden + 2 * hidden * config.intermediate_size)
    return 6 * n_matmul + 6 * hidden * config.vocab_size * scored_fraction + 12 * layers * hidden * context


def mean_context(document_ids: torch.Tensor) -> float:
    """sum(len^2) / sum(len) over the documents of a (B, L) batch (padding, id -1, excluded)."""
    total, squares = 0, 0
    for row in document_ids:
        ids = row[row >= 0]
        if ids.numel():
            counts = torch.unique_consecutive(ids, return_counts=True)[1].double()
            total += counts.sum().item()
            squares += counts.square().sum().item()
    return squares / max(total, 1)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None  # MFU is a GPU notion; CPU runs report tokens/s only
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)
