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

# bf16 dense tensor-core peak per SKU, TFLOP/s (no 2:4 sparsity: NVIDIA's datasheets print the sparse figure, twice
# this), matched against torch.cuda.get_device_name() in this order (the first substring found wins, so the specific
# names come before their family: "H100 PCIe" before "H100", "GH200"/"GB200" before "H200"/"B200"). Sources: NVIDIA's
# H100 datasheet (SXM 1,979 / PCIe 1,513 / NVL 1,671 sparse), H200 datasheet (SXM 1,979 / NVL 1,671), GH200 (the H100
# SXM's Hopper GPU), A100 datasheet (312 dense), HGX B200 (4.5 PFLOP/s sparse per GPU), GB200 NVL72 (5 PFLOP/s
# sparse per GPU). Device names as torch reports them: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
# "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB", "NVIDIA B200".
# A card not listed gets no MFU unless train.peak_tflops (or --peak-tflops) names its peak.
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    # (substring of the device name, SKU, bf16 dense TFLOP/s)
    ("GH200", "GH200", 989.0),
    ("H200 NVL", "H200 NVL", 835.0),
    ("H200", "H200 SXM", 989.0),
    ("H100 NVL", "H100 NVL", 835.0),
    ("H100 PCIe", "H100 PCIe", 756.0),
    ("H100", "H100 SXM", 989.0),
    ("H800", "H800 SXM", 989.0),
    ("A100", "A100", 312.0),
    ("GB200", "GB200", 2500.0),
    ("B200", "B200", 2250.0),
    ("L40S", "L40S", 362.0),
    ("A10G", "A10G", 125.0),
    ("4090", "RTX 4090", 165.0),
)


def sku_peak(device_name: str) -> tuple[str, float] | None:
    """(SKU, bf16 dense peak in FLOP/s) for a CUDA device name, or None for a card not in PEAK_BF16_TFLOPS."""
    upper = device_name.upper()
    for key, sku, tflops in PEAK_BF16_TFLOPS:
        if key.upper() in upper:
            return sku, tflops * 1e12
    return None


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
    found = sku_peak(torch.cuda.get_device_name(device))
    return found[1] if found else None
