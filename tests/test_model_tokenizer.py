"""SpeedPLMTokenizer applies prepare's input policy (training/data/validate.py), not turning bad input into <unk>."""

import pytest

from modeling_speedplm import build_tokenizer
from training.data.validate import ValidationPolicy, encode


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
        # the tokenizer upper-cases any lowercase, as prepare does with mixed_case="upper" (prepare's default rejects
        # lowercase inside an upper-case record: in curated data those are annotation marks)
        assert ids[1:-1] == encode(text.strip(), ValidationPolicy(mixed_case="upper")).tolist()
    masked = tokenizer("MK<mask>t")["input_ids"]
    assert masked == [tokenizer.cls_token_id, *encode("MK").tolist(), tokenizer.mask_token_id, *encode("T"), 2]


def test_too_long_is_an_error_unless_cropped():
    tokenizer = build_tokenizer(model_max_length=12)
    with pytest.raises(ValueError, match="13 tokens .* exceed the model's 12 positions; pass truncation=True"):
        tokenizer("M" * 11)
    assert tokenizer("M" * 10)["input_ids"][-1] == tokenizer.eos_token_id
    cropped = tokenizer(["M" * 40, "MK"], truncation=True, padding=True)["input_ids"]
    assert [len(row) for row in cropped] == [12, 12] and cropped[0][-1] == tokenizer.eos_token_id


ADDED_TOKENS = r"""
import json, sys
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

ckpt, saved = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)
model = AutoModelForMaskedLM.from_pretrained(ckpt, trust_remote_code=True).eval()
report = {"class": type(tokenizer).__name__, "added": tokenizer.add_tokens(["<new>"])}
model.resize_token_embeddings(len(tokenizer))
report["ids"] = tokenizer("mKT<new>AYIAK<mask>")["input_ids"]
with torch.no_grad():
    batch = tokenizer(["MKT<new>AYIAK", "MKTAYIAK"], padding=True, return_tensors="pt")
    report["logits"] = list(model(**batch).logits.shape)
errors = {}
for text in ("MKT<old>AYIAK", "MKT<NEW>AYIAK", "MK<cls>T", "MKT<new"):
    try:
        tokenizer(text)
    except ValueError as err:
        errors[text] = str(err)
report["errors"] = errors
tokenizer.save_pretrained(saved)
again = AutoTokenizer.from_pretrained(saved, trust_remote_code=True)
report["reloaded_class"] = type(again).__name__
report["reloaded_ids"] = again("MKT<new>AYIAK")["input_ids"]
try:
    again("MKT<old>AYIAK")
except ValueError as err:
    report["reloaded_error"] = str(err)
print(json.dumps(report))
"""


def test_added_tokens_through_a_checkpoint(tmp_path):
    """A user's `add_tokens` + `resize_token_embeddings` on a checkpoint loaded from disk with trust_remote_code:
    the added token is accepted (and kept through the tokenizer's save/reload), unknown `<...>` text still refused."""
    import json
    import subprocess
    import sys

    from conftest import randomized_tiny_model

    from training.publish.model_folder import write_model_folder

    write_model_folder(randomized_tiny_model(), tmp_path / "ckpt")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    args = [sys.executable, "-c", ADDED_TOKENS, str(tmp_path / "ckpt"), str(tmp_path / "saved")]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["class"] == report["reloaded_class"] == "SpeedPLMTokenizer" and report["added"] == 1
    tokenizer = build_tokenizer()
    mkt, ayiak = encode("MKT").tolist(), encode("AYIAK").tolist()
    assert report["ids"] == [0, *mkt, 33, *ayiak, tokenizer.mask_token_id, 2]  # residues upper-cased, <new> = 33
    assert report["reloaded_ids"] == [0, *mkt, 33, *ayiak, 2]
    assert report["logits"] == [2, 11, 34]  # the resized head scores the new token
    assert set(report["errors"]) == {"MKT<old>AYIAK", "MKT<NEW>AYIAK", "MK<cls>T", "MKT<new"}
    assert "'<' at position 4 of 'MKT<old>AYIAK': special-token text" in report["errors"]["MKT<old>AYIAK"]
    assert "the added tokens ['<new>']" in report["errors"]["MKT<old>AYIAK"]
    assert "'<' at position 4" in report["reloaded_error"]


def test_added_tokens_in_process():
    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match="special-token text"):
        tokenizer("MKT<new>AYIAK")  # before add_tokens: unknown text
    tokenizer.add_tokens(["<new>", "<newer>"])
    assert tokenizer("MKT<newer>A<new>")["input_ids"] == [0, *encode("MKT").tolist(), 34, *encode("A").tolist(), 33, 2]
    with pytest.raises(ValueError, match="'<' at position 2"):
        tokenizer("M<ne>K")
