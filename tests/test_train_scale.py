"""Multi-GPU figures and the one training clock, from real runs' metrics.jsonl: tokens/s and MFU per device with 2 gloo
ranks; the mask-rate schedule follows the optimizer step, also when a resume does not restore the data position."""

import shutil

import pytest
from test_train_e2e import rows, run_training, shards  # noqa: F401  (shards is a fixture)

pytestmark = pytest.mark.slow


def test_tokens_per_s_and_mfu_are_per_device_with_two_ranks(tmp_path, shards):  # noqa: F811
    # a tiny made-up peak (1 GFLOP/s) so that CPU runs report an MFU at all
    common = ["train.max_steps=3", "eval.every=0", "train.save_every=100", "train.peak_tflops=0.001"]
    code, out = run_training(tmp_path, shards, *common, name="one")
    assert code == 0, out[-3000:]
    code, out = run_training(tmp_path, shards, *common, name="two", ranks=2)
    assert code == 0, out[-3000:]
    assert "2 rank(s) x 1 accumulation step(s)" in out
    one, two = rows(tmp_path, "one"), rows(tmp_path, "two")
    for r in one:
        assert r["tokens_per_s_per_device"] == r["tokens_per_s"]
    flops_per_peak = one[0]["mfu"] / one[0]["tokens_per_s"]  # FLOPs per token / peak: the same model and first batch
    for r in two:
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 2, rel=1e-12)  # global / 2
        assert r["mfu"] == pytest.approx(r["tokens_per_s_per_device"] * flops_per_peak, rel=1e-9)  # per device
    # Not the trainer's own formula again: the tokens counted with 2 ranks are every rank's, measured against the
    # recipe (2048 tokens per optimizer step, packed rows ~98% real) and against the 1-rank run of the same recipe.
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for a, b in zip(one, two):
        assert 0.9 * 2048 * a["step"] < b["tokens"] <= 2048 * a["step"], (a["tokens"], b["tokens"])
        assert b["tokens"] == pytest.approx(a["tokens"], rel=0.05)


def test_mask_rate_follows_the_optimizer_step_across_a_resume_without_data_state(tmp_path, shards):  # noqa: F811
    schedule = ["data.mask_rate=0.1", "data.mask_rate_end=0.3", "data.mask_schedule_steps=8", "eval.every=0"]
    expected = {step: pytest.approx(0.1 + 0.2 * (step - 1) / 8) for step in range(1, 9)}  # the batch of step s: s - 1
    code, out = run_training(tmp_path, shards, *schedule, "train.max_steps=8", "train.save_every=4", name="straight")
    assert code == 0, out[-3000:]
    assert {r["step"]: r["mask_rate"] for r in rows(tmp_path, "straight")} == expected

    # the same checkpoint at step 4, resumed with train.resume_data_state=false: new data order, same schedule
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-000004", resumed / "step-000004")
    overrides = [*schedule, "train.max_steps=8", "train.save_every=100", "train.resume_data_state=false"]
    code, out = run_training(tmp_path, shards, *overrides, name="resumed")
    assert code == 0, out[-3000:]
    assert "resumed from" in out
    got = {r["step"]: r["mask_rate"] for r in rows(tmp_path, "resumed")}
    assert got == {s: expected[s] for s in range(5, 9)}  # not 0.1 again: the clock is the optimizer step

    # ... and step 5 really trained on masks drawn at step 4's rate: its logged loss is the loss of the step-4
    # weights on the top-of-data batches masked for step 4, not for step 0 (what a restarted loader clock gives)
    def step_loss(clock: int) -> float:
        return recompute_loss(tmp_path / "straight", shards, schedule, clock)

    logged = next(r["loss"] for r in rows(tmp_path, "resumed") if r["step"] == 5)
    assert logged == pytest.approx(step_loss(4), rel=1e-5) and logged != pytest.approx(step_loss(0), rel=1e-3)


def recompute_loss(run_dir, shards, overrides, clock: int) -> float:  # noqa: F811
    """The loss of the first optimizer step of the data (2 micro-batches, token-weighted, as the trainer computes it)
    under the step-4 checkpoint's weights, with the loader's mask clock at `clock`."""
    import torch
    from safetensors.torch import load_file
    from test_train_e2e import ROOT, SMALL

    from modeling_speedplm import SpeedPLMForMaskedLM
    from training.config import load_config
    from training.data.batch_schedule import BatchSchedule
    from training.data.collator import MaskRateSchedule, MLMCollator
    from training.data.loader import LoaderOptions, build_loader

    config = load_config(str(ROOT / "configs/default.yaml"), [f"data.train={shards}", *SMALL, *overrides])
    d, t = config.data, config.train
    torch.manual_seed(0)
    model = SpeedPLMForMaskedLM._from_config(config.model_config(), attn_implementation="sdpa")
    model.load_state_dict(load_file(run_dir / "checkpoints" / "step-000004" / "model.safetensors"))
    model.train()
    collator = MLMCollator(MaskRateSchedule(d.mask_rate, d.mask_rate_end, d.mask_schedule_steps), seed=t.seed)
    options = LoaderOptions(
        max_length=d.max_length,
        tokens_per_micro_batch=t.micro_batch_tokens,
        seed=t.seed,
        schedule=BatchSchedule(t.tokens_per_step // t.micro_batch_tokens),
    )
    loader = build_loader(shards / "train", collator, options)
    loader.set_optimizer_step(clock)
    it = iter(loader)
    total = scored = 0.0
    with torch.no_grad():
        for _ in range(loader.grad_accum_steps):
            batch = next(it)
            n = int((batch["labels"] != -100).sum())
            total += model(**batch).loss.item() * n
            scored += n
    return total / scored
