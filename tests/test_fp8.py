"""FP8 MLP (config.fp8="mlp", modeling_speedplm/fp8_speedplm.py) through its CPU twin: the roundings are real FP8
(not a no-op, not worse than the format allows), a few training steps follow the full-precision run closely,
inference never uses FP8, and a checkpoint trained with it loads as Hub remote code outside the repository.
The CUDA path (torch._scaled_mm) is measured against the twin by the GPU first-contact check (eval.perf)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import PROTEINS, randomized_tiny_model

from modeling_speedplm import SpeedPLMConfig, build_tokenizer
from modeling_speedplm.fp8_speedplm import E4M3, E5M2, fp8_linear, fp8_linear_reference, to_fp8


@pytest.mark.parametrize("dtype, step", [(E4M3, 2**-3), (E5M2, 2**-2)])
def test_to_fp8_rounds_to_the_format_and_puts_amax_on_its_top(dtype, step):
    torch.manual_seed(0)
    t = torch.randn(512, 64) * 3
    t8, scale = to_fp8(t, dtype)
    assert t8.dtype == dtype and t8.float().abs().max() == torch.finfo(dtype).max
    back = t8.float() * scale
    normal = t.abs() > torch.finfo(dtype).smallest_normal * scale  # below it: subnormals, absolute error
    rel = ((back - t).abs() / t.abs())[normal]
    assert rel.max() <= step / 2 + 1e-6  # round to nearest: half a mantissa step (e4m3: 3 bits, e5m2: 2)
    assert rel.mean() > step / 20  # and it really rounds
    zero8, zero_scale = to_fp8(torch.zeros(4), dtype)
    assert zero_scale == 1 and zero8.float().abs().max() == 0


def test_fp8_linear_forward_and_gradients_within_the_format_error():
    torch.manual_seed(0)
    x = torch.randn(64, 96, requires_grad=True)
    w = (torch.randn(128, 96) * 0.1).requires_grad_()
    g = torch.randn(64, 128)
    y = fp8_linear(x, w)  # CPU: the twin
    assert torch.equal(y, fp8_linear_reference(x, w))
    y.backward(g)
    got = (y.detach(), x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    (x @ w.T).backward(g)
    exact = ((x @ w.T).detach(), x.grad, w.grad)
    errors = [((a - b).norm() / b.norm()).item() for a, b in zip(got, exact)]
    # measured: forward 0.037 (e4m3 x e4m3), gradients 0.058 (e5m2 gradient): rounding error, not a wrong formula
    assert all(0.005 < e < 0.1 for e in errors), errors
    assert y.dtype == x.dtype and x.grad.shape == x.shape and w.grad.shape == w.shape


def batches(n: int, seed: int = 0) -> list[dict]:
    """n batches of the 4 real proteins, 15% of residues masked (fixed by seed)."""
    tok = build_tokenizer()
    enc = tok(PROTEINS, padding=True, return_tensors="pt")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = enc["input_ids"].clone()
        residue = (ids > 3) & (ids < 24)
        masked = residue & (torch.rand(ids.shape, generator=gen) < 0.15)
        labels = torch.where(masked, ids, -100)
        out.append(
            dict(
                input_ids=ids.masked_fill(masked, tok.mask_token_id),
                attention_mask=enc["attention_mask"],
                labels=labels,
            )
        )
    return out


def train(fp8: str, steps: int = 12) -> tuple[list[float], torch.nn.Module]:
    model = randomized_tiny_model(seed=1, fp8=fp8).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for batch in batches(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model


def test_a_few_fp8_steps_follow_the_full_precision_run():
    full, _ = train("none")
    fp8, model = train("mlp")
    assert fp8[0] != full[0]  # FP8 really ran in training (the MLP's outputs change the loss)
    rel = [abs(a - b) / b for a, b in zip(fp8, full)]
    assert max(rel) < 0.02, rel  # measured on CPU: ~1e-3
    assert fp8[-1] < 0.9 * fp8[0]  # and it learns
    # inference never uses FP8: the same weights in a model without it give identical eval outputs
    plain = randomized_tiny_model(seed=1)
    plain.load_state_dict(model.state_dict())
    batch = batches(1)[0]
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, plain.eval()(**batch).logits)


def test_config_refuses_an_unknown_fp8_mode():
    with pytest.raises(ValueError, match=r"SpeedPLMConfig.fp8='all': choose 'none' or 'mlp'"):
        SpeedPLMConfig.from_preset("tiny", fp8="all")


def test_fp8_checkpoint_loads_as_remote_code_outside_the_repo(tmp_path):
    from training.publish.model_folder import write_model_folder

    _, model = train("mlp", steps=2)
    write_model_folder(model.eval(), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "fp8_speedplm.py").exists()
    code = (
        "import torch, sys\n"
        "from transformers import AutoModelForMaskedLM, AutoTokenizer\n"
        "m = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        "assert m.config.fp8 == 'mlp'\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "b = t(['MKTAYIAKQRQISFVKSHFSRQ'], return_tensors='pt')\n"
        "m.train(); loss = m(**b, labels=b['input_ids']).loss; loss.backward()\n"
        "print('ok', torch.isfinite(loss).item())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ckpt")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "ok True" in proc.stdout, proc.stderr[-3000:]
