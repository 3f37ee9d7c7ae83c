"""One protein gives the same logits padded or packed, under every attention backend, with every switch."""

import pytest
import torch
from conftest import PROTEINS, randomized_tiny_model

from modeling_speedplm.attention_speedplm import dense_attention_mask
from modeling_speedplm.modeling_speedplm import document_ids_from, positions_from, rms_norm


def padded_batch(tokenizer, proteins):
    enc = tokenizer(proteins, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def packed_row(tokenizer, proteins, trailing_pad=5):
    """All proteins in one row, then padding: (1, T) input_ids and document_ids (-1 on padding)."""
    ids, docs = [], []
    for i, protein in enumerate(proteins):
        tokens = tokenizer(protein)["input_ids"]
        ids += tokens
        docs += [i] * len(tokens)
    ids += [tokenizer.pad_token_id] * trailing_pad
    docs += [-1] * trailing_pad
    return torch.tensor([ids]), torch.tensor([docs], dtype=torch.int32)


SWITCHES = [
    dict(),
    dict(unet=False),
    dict(value_embeddings=0),
    dict(sliding_window=8),
    dict(qk_norm=False, x0_mixing=False, soft_logit_cap=0.0),
    dict(tie_word_embeddings=True),
]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_padded_equals_packed(tokenizer, switches):
    model = randomized_tiny_model(**switches).eval()
    input_ids, attention_mask = padded_batch(tokenizer, PROTEINS)
    packed_ids, document_ids = packed_row(tokenizer, PROTEINS)
    with torch.no_grad():
        padded = model(input_ids, attention_mask=attention_mask).logits  # (B, L, V)
        packed = model(packed_ids, document_ids=document_ids).logits  # (1, T, V)
    start = 0
    for row, protein in enumerate(PROTEINS):
        n = len(protein) + 2
        torch.testing.assert_close(packed[0, start : start + n], padded[row, :n], atol=1e-5, rtol=0)
        start += n


def test_protein_alone_equals_protein_in_batch(tokenizer):
    model = randomized_tiny_model().eval()
    input_ids, attention_mask = padded_batch(tokenizer, PROTEINS)
    alone = tokenizer(PROTEINS[1], return_tensors="pt")
    with torch.no_grad():
        batch_logits = model(input_ids, attention_mask=attention_mask).logits
        alone_logits = model(**alone).logits
    n = alone["input_ids"].shape[1]
    torch.testing.assert_close(batch_logits[1, :n], alone_logits[0], atol=1e-5, rtol=0)


def test_packing_changes_nothing_but_a_cross_attention_would(tokenizer):
    """Control: with one document id for the whole row, proteins see each other and logits move."""
    model = randomized_tiny_model().eval()
    packed_ids, document_ids = packed_row(tokenizer, PROTEINS, trailing_pad=0)
    with torch.no_grad():
        separate = model(packed_ids, document_ids=document_ids).logits
        merged = model(packed_ids, document_ids=torch.zeros_like(document_ids)).logits
    assert (separate - merged).abs().max() > 1e-3


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_backends_agree(tokenizer, sliding_window):
    model = randomized_tiny_model(sliding_window=sliding_window).eval()
    packed_ids, document_ids = packed_row(tokenizer, PROTEINS)
    logits = {}
    for implementation in ("sdpa", "eager", "flex_attention"):  # flex: forward only on CPU
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits[implementation] = model(packed_ids, document_ids=document_ids).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits["flex_attention"], logits["sdpa"], atol=1e-5, rtol=0)


def test_flex_requested_on_cpu_still_trains(tokenizer):
    model = randomized_tiny_model()
    model.set_attn_implementation("flex_attention")
    packed_ids, document_ids = packed_row(tokenizer, PROTEINS)
    labels = torch.full_like(packed_ids, -100)
    labels[0, 3:40:4] = packed_ids[0, 3:40:4]
    loss = model(packed_ids, document_ids=document_ids, labels=labels).loss
    loss.backward()  # SDPA is chosen for the backward-needing CPU forward
    assert torch.isfinite(loss) and model.lm_head.weight.grad is not None


def test_positions_restart_per_document():
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    assert positions_from(document_ids).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_every_parameter_gets_a_gradient(tokenizer, switches):
    """No unused parameters under DDP: each one is in the graph and (with randomised weights) gets a non-zero grad."""
    model = randomized_tiny_model(**switches).train()
    packed_ids, document_ids = packed_row(tokenizer, PROTEINS)
    labels = torch.full_like(packed_ids, -100)
    labels[0, 2:-6:3] = packed_ids[0, 2:-6:3]
    model(packed_ids, document_ids=document_ids, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} unused"
        assert param.grad.abs().sum() > 0, f"{name} has a zero gradient"


def test_sparse_prediction_runs_the_head_on_scored_positions_only(tokenizer):
    """The trainer's switch: head on scored positions, (N_scored, V), same loss; without it (B, L, V) in any mode."""
    model = randomized_tiny_model()
    input_ids, attention_mask = padded_batch(tokenizer, PROTEINS)
    labels = torch.full_like(input_ids, -100)
    labels[:, 5] = input_ids[:, 5]
    labels[0, 9] = input_ids[0, 9]
    sparse = model.train()(input_ids, attention_mask=attention_mask, labels=labels, sparse_prediction=True)
    assert sparse.logits.shape == (len(PROTEINS) + 1, 33)
    train_out = model.train()(input_ids, attention_mask=attention_mask, labels=labels)
    eval_out = model.eval()(input_ids, attention_mask=attention_mask, labels=labels)
    assert train_out.logits.shape == eval_out.logits.shape == (*input_ids.shape, 33)
    torch.testing.assert_close(sparse.loss, eval_out.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(train_out.loss, eval_out.loss, atol=1e-6, rtol=0)
    # hand-computed cross-entropy over the 5 scored positions
    scored = labels != -100
    expected = torch.nn.functional.cross_entropy(eval_out.logits[scored], labels[scored])
    torch.testing.assert_close(eval_out.loss, expected)
    torch.testing.assert_close(sparse.logits, eval_out.logits[scored], atol=1e-5, rtol=0)


def test_soft_cap_bounds_logits(tokenizer):
    model = randomized_tiny_model(soft_logit_cap=2.0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
        logits = model(**tokenizer(PROTEINS[:1], return_tensors="pt")).logits
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9


def test_hidden_states_cover_every_layer(tokenizer):
    """hidden_states = (embedding output, block 1 output, ..., block L output after the final norm); each one equals
    the block applied by hand to the previous one (plus its U-Net skip), and hidden_states[-1] is last_hidden_state."""
    model = randomized_tiny_model().eval()
    batch = tokenizer(PROTEINS[:2], padding=True, return_tensors="pt")
    base, eps = model.model, model.config.rms_norm_eps
    with torch.no_grad():
        out = base(**batch, output_hidden_states=True)
        hidden = out.hidden_states
        assert len(hidden) == model.config.num_hidden_layers + 1
        assert torch.equal(hidden[-1], out.last_hidden_state)
        documents = document_ids_from(batch["input_ids"], batch["attention_mask"], None)
        cos, sin = base.rotary(positions_from(documents))
        mask = dense_attention_mask(documents, None)
        x0 = rms_norm(base.embed_tokens(batch["input_ids"]), eps)
        torch.testing.assert_close(hidden[0], x0, atol=0, rtol=0)
        # The U-Net wiring written out for the 4-block tiny preset (not re-derived from the model's own indexing):
        # the encoder half (blocks 0, 1) keeps its outputs; the decoder half adds them back in mirror order, block 2
        # the output of block 1 (hidden[2]), block 3 the output of block 0 (hidden[1]), each times its skip weight.
        assert len(base.layers) == 4 and base.skip_weights.shape == (2,)
        w = base.skip_weights
        block_inputs = [hidden[0], hidden[1], hidden[2] + w[0] * hidden[2], hidden[3] + w[1] * hidden[1]]
        x, outputs = x0, []
        for i, block in enumerate(base.layers):
            table = base.value_table_of_layer[i]
            ve = base.value_embeds[table](batch["input_ids"]) if table is not None else None
            expected = block(block_inputs[i], x0, ve, cos, sin, mask)
            expected = rms_norm(expected, eps) if i == 3 else expected
            torch.testing.assert_close(hidden[i + 1], expected, atol=1e-6, rtol=0, msg=f"hidden state {i + 1}")
            # and chained from x0 alone, without the recorded states: the same wiring end to end
            skip = {2: outputs[1], 3: outputs[0]}[i] if i >= 2 else None  # block 2 <- block 1, block 3 <- block 0
            x = block(x if skip is None else x + w[i - 2] * skip, x0, ve, cos, sin, mask)
            outputs.append(x)
        torch.testing.assert_close(out.last_hidden_state, rms_norm(x, eps), atol=1e-5, rtol=0)


def test_unet_skips_start_at_one_and_carry_signal(tokenizer):
    """A freshly initialised model starts with every U-Net skip weight at 1 (the skips carry the encoder outputs
    from step 0), and the skips change the outputs (zeroing them moves last_hidden_state)."""
    from modeling_speedplm import SpeedPLMConfig, SpeedPLMForMaskedLM

    torch.manual_seed(0)
    fresh = SpeedPLMForMaskedLM(SpeedPLMConfig.from_preset("tiny"))
    assert torch.equal(fresh.model.skip_weights, torch.ones(2))
    model = randomized_tiny_model().eval()
    batch = tokenizer(PROTEINS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model.model(**batch).last_hidden_state
        model.model.skip_weights.zero_()
        after = model.model(**batch).last_hidden_state
    assert (before - after).abs().max() > 1e-2


def test_zero_initialised_projections():
    from modeling_speedplm import SpeedPLMConfig, SpeedPLMForMaskedLM

    model = SpeedPLMForMaskedLM(SpeedPLMConfig.from_preset("tiny"))
    for block in model.model.layers:
        assert block.attn.o_proj.weight.abs().sum() == 0 and block.mlp.down_proj.weight.abs().sum() == 0
        assert block.attn.qkv_proj.weight.std() > 0.01
