"""Optimizer groups and schedules."""

import pytest
import torch

from modeling_speedplm import SpeedPLMConfig, SpeedPLMForMaskedLM
from training.optim.build import build_optimizers, build_schedulers, muon_momentum, parameter_groups
from training.optim.config import OptimSection
from training.optim.muon import DistributedMuon


@pytest.mark.parametrize("tie", [False, True])
def test_every_parameter_in_exactly_one_group(tie):
    model = SpeedPLMForMaskedLM(SpeedPLMConfig.from_preset("tiny", tie_word_embeddings=tie))
    groups = parameter_groups(model)
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    assert all(p.ndim == 2 for p in groups["muon"])
    assert len(groups["muon"]) == 4 * model.config.num_hidden_layers  # qkv, o, up, down per block
    assert all(p.ndim < 2 for p in groups["scalar"])
    assert len(groups["embed"]) == 1 + model.config.value_embeddings
    assert len(groups["head"]) == (0 if tie else 1)


def test_muon_and_adam_update_their_groups():
    torch.manual_seed(0)
    model = SpeedPLMForMaskedLM(SpeedPLMConfig.from_preset("tiny"))
    muon, adam = build_optimizers(model, OptimSection())
    assert isinstance(muon, DistributedMuon) and isinstance(adam, torch.optim.Adam)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(4, 24, (2, 16))
    model(ids, labels=ids).loss.backward()
    muon.step()
    adam.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "lm_head.weight" in changed and "model.embed_tokens.weight" in changed  # Adam
    assert all(f"model.layers.{i}.{m}.weight" in changed for i in range(4) for m in ("attn.o_proj", "mlp.down_proj"))
    # behind a zero-initialised output projection the input projections get no gradient at step 0
    assert not any(n.endswith(("qkv_proj.weight", "up_proj.weight")) for n in changed)


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_wsd_schedule_shape():
    cfg = OptimSection(warmup_steps=10, decay_fraction=0.3, schedule="wsd")
    model = SpeedPLMForMaskedLM(SpeedPLMConfig.from_preset("tiny"))
    optimizers = build_optimizers(model, cfg)
    (sched, _) = build_schedulers(optimizers, cfg, max_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        sched.step()
    assert lrs[0] == 0 and lrs[10] == pytest.approx(cfg.muon_lr)
    assert lrs[69] == pytest.approx(cfg.muon_lr)  # stable until decay starts at step 70
    assert lrs[85] < lrs[75] < cfg.muon_lr and lrs[99] < 0.05 * cfg.muon_lr


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_cosine_schedule_decays():
    cfg = OptimSection(warmup_steps=5, schedule="cosine")
    optimizers = build_optimizers(SpeedPLMForMaskedLM(SpeedPLMConfig.from_preset("tiny")), cfg)
    sched = build_schedulers(optimizers, cfg, max_steps=50)[1]
    lrs = []
    for _ in range(50):
        lrs.append(sched.get_last_lr()[0])
        sched.step()
    assert max(lrs) == pytest.approx(cfg.embed_lr) and lrs[30] < lrs[10] and lrs[-1] < 0.01 * cfg.embed_lr


def test_muon_momentum_warmup():
    cfg = OptimSection(muon_momentum_start=0.85, muon_momentum_end=0.95, muon_momentum_warmup_steps=100)
    assert muon_momentum(0, cfg) == pytest.approx(0.85)
    assert muon_momentum(50, cfg) == pytest.approx(0.90)
    assert muon_momentum(500, cfg) == pytest.approx(0.95)
