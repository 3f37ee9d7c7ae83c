"""SpeedPLMTokenizer applies prepare's input policy (training/data/validate.py), not turning bad input into <unk>."""

import pytest

from modeling_speedplm import build_tokenizer
from training.data.validate import encode


@pytest.mark.parametrize(
    "text, where",
    [
        ("MKTJ12AYI", "'J' at position 4"),
        ("MKT1", "'1' at position 4"),
        ("MK.T", "'.' at position 3"),
        ("M*KT", "'*' at position 2"),
        ("MK<cls>T", "'<' at position 3"),
        ("MKé", "'é' at position 3"),
        ("*", "empty sequence"),
    ],
)
def test_rejected_like_prepare(text, where):
    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match="SpeedPLMTokenizer") as err:
        tokenizer(text)
    assert where in str(err.value)
    with pytest.raises(ValueError):  # prepare rejects the same record
        encode(text)


def test_whitespace_inside_is_an_error():
    """prepare's readers join a record's lines; text handed to a tokenizer with a blank inside is a mistake."""
    with pytest.raises(ValueError) as err:
        build_tokenizer()("MK\tT")
    assert "'\\t' at position 3 of 'MK\\tT': whitespace inside a sequence" in str(err.value)


def test_accepted_input_gives_prepare_ids():
    tokenizer = build_tokenizer()
    for text in ("mktayiakqrq*", "MKTAYIAKQRQ", " MkTxBuZo\n"):
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.eos_token_id
        assert ids[1:-1] == encode(text.strip()).tolist()
    masked = tokenizer("MK<mask>t")["input_ids"]
    assert masked == [tokenizer.cls_token_id, *encode("MK").tolist(), tokenizer.mask_token_id, *encode("T"), 2]


def test_too_long_is_an_error_unless_cropped():
    tokenizer = build_tokenizer(model_max_length=12)
    with pytest.raises(ValueError, match="13 tokens .* exceed the model's 12 positions; pass truncation=True"):
        tokenizer("M" * 11)
    assert tokenizer("M" * 10)["input_ids"][-1] == tokenizer.eos_token_id
    cropped = tokenizer(["M" * 40, "MK"], truncation=True, padding=True)["input_ids"]
    assert [len(row) for row in cropped] == [12, 12] and cropped[0][-1] == tokenizer.eos_token_id
