"""Task heads: one prediction per protein (residue mean) or per token, padded and packed rows alike; the losses of
EsmForSequenceClassification's problem types; and the export-friendly positions equal the cummax formula."""

import pytest
import torch
import torch.nn.functional as F
from conftest import PROTEINS
from test_model_forward import packed_row, padded_batch

from modeling_speedplm import SpeedPLMConfig, SpeedPLMForSequenceClassification, SpeedPLMForTokenClassification
from modeling_speedplm.modeling_speedplm import positions_from


def randomized(cls, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = cls(SpeedPLMConfig.from_preset("tiny", **overrides))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def test_sequence_head_one_prediction_per_protein_packed_or_padded(tokenizer):
    model = randomized(SpeedPLMForSequenceClassification, num_labels=3)
    input_ids, attention_mask = padded_batch(tokenizer, PROTEINS)
    packed_ids, document_ids = packed_row(tokenizer, PROTEINS)
    two_rows_ids = torch.cat([packed_ids, packed_ids.flip(1)])  # second row: the same proteins in reverse order
    two_rows_docs = torch.cat([document_ids, document_ids.flip(1)])
    with torch.no_grad():
        padded = model(input_ids, attention_mask=attention_mask).logits  # (B, 3)
        packed = model(packed_ids, document_ids=document_ids).logits  # (P, 3)
        two_rows = model(two_rows_ids, document_ids=two_rows_docs).logits
    assert padded.shape == packed.shape == (len(PROTEINS), 3)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    # row by row, then by document id: row 1 holds reversed sequences, so only its shape and order are checked
    assert two_rows.shape == (2 * len(PROTEINS), 3)
    torch.testing.assert_close(two_rows[: len(PROTEINS)], padded, atol=1e-5, rtol=0)


def test_sequence_head_pools_residues_only(tokenizer):
    """The classifier sees the mean of last_hidden_state over residues: not <cls>, <eos> or padding."""
    model = randomized(SpeedPLMForSequenceClassification, num_labels=2)
    input_ids, attention_mask = padded_batch(tokenizer, PROTEINS)
    seen = []
    model.classifier.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask)
        hidden = model.model(input_ids, attention_mask=attention_mask).last_hidden_state
    expected = torch.stack([hidden[i, 1 : len(p) + 1].mean(0) for i, p in enumerate(PROTEINS)])
    torch.testing.assert_close(seen[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "num_labels, labels, problem_type, loss_fn",
    [
        (1, torch.tensor([0.5, -1.0, 2.0, 0.0]), "regression", lambda z, y: F.mse_loss(z.squeeze(-1), y)),
        (3, torch.tensor([0, 2, 1, 2]), "single_label_classification", F.cross_entropy),
        (
            3,
            torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]]),
            "multi_label_classification",
            F.binary_cross_entropy_with_logits,
        ),
    ],
)
def test_sequence_problem_types(tokenizer, num_labels, labels, problem_type, loss_fn):
    model = randomized(SpeedPLMForSequenceClassification, num_labels=num_labels)
    input_ids, attention_mask = padded_batch(tokenizer, PROTEINS)
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert model.config.problem_type == problem_type
    torch.testing.assert_close(out.loss, loss_fn(out.logits, labels))


def test_sequence_labels_must_match_the_proteins(tokenizer):
    model = randomized(SpeedPLMForSequenceClassification, num_labels=2)
    packed_ids, document_ids = packed_row(tokenizer, PROTEINS)
    with pytest.raises(ValueError, match="labels have 1 rows, the batch holds 4 proteins"):
        model(packed_ids, document_ids=document_ids, labels=torch.tensor([1]))


def test_token_head_packed_equals_padded_and_ignores_minus_100(tokenizer):
    model = randomized(SpeedPLMForTokenClassification, num_labels=4)
    input_ids, attention_mask = padded_batch(tokenizer, PROTEINS)
    packed_ids, document_ids = packed_row(tokenizer, PROTEINS)
    labels = (input_ids % 4).masked_fill(attention_mask == 0, -100)
    labels[:, 0] = -100
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, labels=labels)
        packed = model(packed_ids, document_ids=document_ids).logits
    assert out.logits.shape == (*input_ids.shape, 4)
    scored = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[scored], labels[scored]))
    start = 0
    for row, protein in enumerate(PROTEINS):
        n = len(protein) + 2
        torch.testing.assert_close(packed[0, start : start + n], out.logits[row, :n], atol=1e-5, rtol=0)
        start += n


def cummax_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """The formula positions_from replaced (cummax has no ONNX lowering)."""
    idx = torch.arange(document_ids.shape[1]).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values


def test_positions_equal_the_cummax_formula():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(1, 12, (6,), generator=generator).tolist()
        row = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((5,), -1)])
        other = torch.randint(-1, 3, row.shape, generator=generator)  # arbitrary ids, runs of any length
        document_ids = torch.stack([row, other]).int()
        assert torch.equal(positions_from(document_ids), cummax_positions(document_ids))
