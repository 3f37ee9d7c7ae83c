"""Recipe-v2 switches outside Muon: cautious weight decay on Adam, the global-batch-size warmup, the transform MLM head.
(Polar Express, NorMuon and cautious decay on Muon: tests/test_muon.py.)"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROTEINS, randomized_tiny_model
from test_model_hub import LOADER

from training.config import load_config
from training.data.batch_schedule import accumulation_steps
from training.optim.build import build_optimizers, parameter_groups
from training.optim.cautious import CautiousAdamW
from training.optim.config import OptimSection
from training.optim.muon import DistributedMuon

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- cautious Adam


def adam_step(cls, weight_decay=0.0, seed=3):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(12, 20)), torch.nn.Parameter(torch.randn(7))]
    before = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    kwargs = dict(weight_decay=weight_decay) if weight_decay else {}
    cls(params, lr=0.05, betas=(0.8, 0.95), eps=1e-10, **kwargs).step()
    return before, [p.detach().clone() for p in params]


def test_cautious_adam_decays_only_where_step_and_weight_agree():
    lr, wd = 0.05, 0.3
    before, plain = adam_step(torch.optim.Adam)
    _, cautious = adam_step(CautiousAdamW, weight_decay=wd)
    for p0, p_plain, p_cautious in zip(before, plain, cautious):
        agree = (p0 - p_plain) * p0 >= 0  # Adam's step moves the weight towards zero there
        assert 0 < agree.sum() < agree.numel()
        decay = p_cautious - p_plain
        assert torch.equal(decay[~agree], torch.zeros_like(decay[~agree]))
        torch.testing.assert_close(decay[agree], -lr * wd * p0[agree], rtol=1e-5, atol=1e-7)


def test_cautious_adam_without_decay_is_adam():
    _, plain = adam_step(torch.optim.Adam)
    _, cautious = adam_step(CautiousAdamW)
    assert all(torch.equal(a, b) for a, b in zip(plain, cautious))


@pytest.mark.parametrize(
    "switches, adam_type",
    [
        ({}, torch.optim.Adam),
        ({"adam_weight_decay": 0.1}, torch.optim.AdamW),
        ({"cautious_weight_decay": True, "adam_weight_decay": 0.1}, CautiousAdamW),
    ],
)
def test_build_optimizers_wires_the_switches(switches, adam_type):
    model = randomized_tiny_model()
    cfg = OptimSection(muon_ns="polar_express", muon_ns_steps=4, normuon=True, weight_decay=0.1, **switches)
    muon, adam = build_optimizers(model, cfg)
    assert type(adam) is adam_type
    group = muon.param_groups[0]
    assert isinstance(muon, DistributedMuon) and group["normuon"] and group["ns_steps"] == 4
    assert len(group["ns_coefficients"]) == 5 and group["ns_coefficients"][1][0] == pytest.approx(4.0429, abs=1e-4)
    assert group["cautious_weight_decay"] == bool(switches.get("cautious_weight_decay"))
    decays = [(g["weight_decay"], g.get("cautious_weight_decay")) for g in adam.param_groups]
    want = {torch.optim.Adam: (0, None), torch.optim.AdamW: (0.1, None), CautiousAdamW: (0.0, 0.1)}[adam_type]
    assert set(decays) == {want}


def test_recipe_switches_are_checked():
    with pytest.raises(ValueError, match="optim.muon_ns='newton'"):
        load_config(None, ["optim.muon_ns=newton"])
    with pytest.raises(ValueError, match="batch_warmup_start"):
        load_config(None, ["train.batch_warmup_start=0"])


# ---------------------------------------------------------------------------------------------------- batch warmup


def test_batch_warmup_schedule():
    assert [accumulation_steps(s, 4, 4, 0.25) for s in range(7)] == [1, 2, 3, 3, 4, 4, 4]
    assert [accumulation_steps(s, 8, 0, 0.25) for s in range(3)] == [8, 8, 8]  # off
    assert [accumulation_steps(s, 4, 10, 1.0) for s in range(3)] == [4, 4, 4]
    with pytest.raises(ValueError, match="lower train.micro_batch_tokens"):
        accumulation_steps(0, 1, 10, 0.25)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """~800 real proteins (aaanalysis benchmark sets) prepared into train/valid/test shards."""
    from training.data.prepare import PrepareOptions, prepare
    from training.data.sources import builtin_files

    out = tmp_path_factory.mktemp("data") / "prepared"
    fasta = out.parent / "proteins.fasta"
    with open(fasta, "w") as f:
        for path in sorted(builtin_files()):
            lines = path.read_text().splitlines()
            column = lines[0].split("\t").index("sequence")
            for n, line in enumerate(lines[1:120]):
                f.write(f">{path.stem}_{n}\n{line.split(chr(9))[column]}\n")
    prepare([fasta], out, PrepareOptions(split_fractions=(90, 5, 5), dedup=True, max_length=128), log=lambda *a: None)
    return out


def train(tmp_path, shards, name, *overrides):
    args = [
        *("--config", str(ROOT / "configs" / "default.yaml")),
        f"data.train={shards}",
        f"train.output_dir={tmp_path}",
        f"train.run_name={name}",
        *("model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=2"),
        *("model.value_embeddings=1", "model.max_position_embeddings=128", "data.max_length=128"),
        *("train.micro_batch_tokens=1024", "train.max_steps=6", "optim.warmup_steps=2", "train.log_every=1"),
        *("train.save_every=0", "eval.every=0", "eval.test_at_end=false", "train.cpu_threads=1"),
        *overrides,
    ]
    env = {**{k: v for k, v in os.environ.items() if k != "HF_TOKEN"}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_accelerate.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "split" not in r]


@pytest.mark.slow
def test_batch_warmup_end_to_end(tmp_path, shards):
    """Tokens per step follow the schedule (1, 2, 3, 3, 4, 4 micro-batches of 1024 tokens), and the first step -- one
    micro-batch -- is exactly a run whose step is that one micro-batch: same loss and the same gradient norm, so the
    gradient is the mean over the step's own scored tokens, not scaled down by the missing micro-batches."""
    warm = train(tmp_path, shards, "warm", "train.tokens_per_step=4096", "train.batch_warmup_steps=4")
    one = train(tmp_path, shards, "one", "train.tokens_per_step=1024")
    per_step = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + warm[:-1], warm)]
    micro = [t / 1024 for t in per_step]  # real tokens fill ~98% of a packed micro-batch
    for got, want in zip(micro, [1, 2, 3, 3, 4, 4]):
        assert want * 0.9 < got <= want, micro
    # non-finite losses are logged as null (None == None would pass): every loss a finite float, equal in both runs
    assert all(isinstance(r["loss"], float) and math.isfinite(r["loss"]) for r in warm + one), [r["loss"] for r in warm]
    assert warm[0]["loss"] == one[0]["loss"] and warm[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-6)
    assert all(r["bad_steps"] == 0 for r in warm)


# ---------------------------------------------------------------------------------------------------- MLM head


def test_transform_head_parameters_and_optimizer_groups():
    linear, transform = randomized_tiny_model(), randomized_tiny_model(mlm_head="transform")
    names = {n for n, _ in transform.named_parameters()} - {n for n, _ in linear.named_parameters()}
    assert names == {"lm_head_dense.weight", "lm_head.bias"}
    hidden = transform.config.hidden_size
    assert transform.num_parameters() - linear.num_parameters() == hidden * hidden + transform.config.vocab_size
    groups = {id(p): g for g, ps in parameter_groups(transform).items() for p in ps}
    assert groups[id(transform.lm_head_dense.weight)] == "muon"  # a hidden matrix
    assert groups[id(transform.lm_head.bias)] == "scalar" and groups[id(transform.lm_head.weight)] == "head"
    with pytest.raises(ValueError, match="mlm_head"):
        randomized_tiny_model(mlm_head="mlp")


def test_transform_head_scored_positions_equal_full_logits(tokenizer):
    """Training runs the head on scored positions only; that must equal the full logits at those positions."""
    model = randomized_tiny_model(seed=4, mlm_head="transform")
    batch = tokenizer(PROTEINS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(torch.rand(batch["input_ids"].shape) > 0.2, -100)
    labels[:, 0] = -100
    model.train()
    train_loss = model(**batch, labels=labels, sparse_prediction=True).loss  # as the trainer calls it
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(train_loss.detach(), full, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_transform_head_checkpoint_loads_in_fresh_process(tmp_path, tokenizer):
    from training.publish.model_folder import write_model_folder

    model = randomized_tiny_model(seed=5, mlm_head="transform").eval()
    write_model_folder(model, tmp_path / "ckpt")  # weights, config, code, tokenizer: as the trainer writes it
    out = tmp_path / "out.pt"
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    args = [sys.executable, "-c", LOADER, str(tmp_path / "ckpt"), json.dumps(PROTEINS), str(out)]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    batch = tokenizer(PROTEINS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
    torch.testing.assert_close(torch.load(out)["logits"], expected, atol=1e-6, rtol=0)
