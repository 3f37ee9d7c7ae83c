"""Validation policy and the vectorised byte-LUT tokenizer (training/data/validate.py)."""

import numpy as np
import pytest

from training.data.validate import (
    MASK,
    UNK,
    VOCAB,
    ValidationPolicy,
    build_lut,
    decode,
    encode,
    validate_batch,
)

UBIQUITIN = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"  # P0CG48
FXYD3 = "MQKVTLGLLVFLAGFPVLDANDLEDKNSPFYYDWHSLQVGGLICAGVLCAMGIIIVMSAKCKCKFGQKSGHHPGETPPLITPGSAQS"  # Q14802


def code(reason: str) -> str:
    return reason.split(":", 1)[0]


def test_lut_maps_letters_to_esm2_ids_and_never_to_unk():
    lut = build_lut(ValidationPolicy(allow_gaps=True))
    for letter in "LAGVSERTIDPKQNFYMHWCXBUZO.-":
        assert lut[ord(letter)] == VOCAB.index(letter)
    assert UNK not in lut and MASK not in lut


def test_matches_esm_tokenizer(tokenizer):
    for seq in (UBIQUITIN, FXYD3, "MXBUZOK"):
        expected = tokenizer(seq)["input_ids"]
        assert [0, *encode(seq).tolist(), 2] == expected


@pytest.mark.parametrize(
    "seq, expected",
    [
        (UBIQUITIN[:20] + "J" + UBIQUITIN[21:], "letter_J"),
        (UBIQUITIN[:20] + "7" + UBIQUITIN[21:], "digit"),
        (UBIQUITIN[:20] + "<mask>" + UBIQUITIN[21:], "special_token_text"),
        (UBIQUITIN[:20] + "<unk>", "special_token_text"),
        (UBIQUITIN[:20] + "é" + UBIQUITIN[21:], "non_ascii"),
        (UBIQUITIN[:20] + "Ω" + UBIQUITIN[21:], "non_ascii"),
        (UBIQUITIN[:20] + "*" + UBIQUITIN[21:], "internal_stop"),
        (UBIQUITIN + "**", "internal_stop"),
        ("--" + UBIQUITIN, "gap"),
        (UBIQUITIN[:20] + "." + UBIQUITIN[21:], "gap"),
        (UBIQUITIN[:20] + "#", "invalid_character"),
        ("*", "empty_sequence"),
        ("", "empty_sequence"),
    ],
)
def test_rejections_carry_a_reason_code(seq, expected):
    with pytest.raises(ValueError) as err:
        encode(seq)
    assert code(str(err.value)) == expected


def test_default_policy_normalizes():
    assert decode(encode(FXYD3.lower())) == FXYD3  # lowercase upper-cased
    assert decode(encode(UBIQUITIN + "*")) == UBIQUITIN  # one terminal stop stripped
    assert decode(encode("MQIF VKTL\tTGK\r\n")) == "MQIFVKTLTGK"  # whitespace removed
    assert decode(encode("MXBUZOK")) == "MXBUZOK"  # ambiguous/rare residues kept


def test_policy_switches():
    strict = ValidationPolicy(
        lowercase="reject", strip_terminal_stop=False, allow_ambiguous=False, min_length=10, reject_longer_than=50
    )
    cases = {
        FXYD3.lower(): "lowercase",
        UBIQUITIN[:40] + "*": "internal_stop",
        "MQIFXVKTLTGK": "ambiguous_residue",
        "MQIFV": "too_short",
        UBIQUITIN: "too_long",
    }
    for seq, expected in cases.items():
        with pytest.raises(ValueError) as err:
            encode(seq, strict)
        assert code(str(err.value)) == expected
    gaps = ValidationPolicy(allow_gaps=True)
    assert decode(encode("--MQ.IF", gaps)) == "--MQ.IF"
    with pytest.raises(ValueError):
        ValidationPolicy(lowercase="drop")


def test_batch_equals_one_by_one_and_drops_rejected_bytes():
    seqs = [UBIQUITIN, "MQIJ", FXYD3.lower(), "", UBIQUITIN[:30] + "*", "AC9D", FXYD3]
    res = validate_batch([s.encode() for s in seqs], ValidationPolicy())
    ok = [k for k, r in enumerate(res.reasons) if r is None]
    assert ok == [0, 2, 4, 6]
    assert res.uppercased == 1 and res.stops_stripped == 1
    assert (res.lengths[[1, 3, 5]] == -1).all()
    expected = np.concatenate([encode(seqs[k]) for k in ok])
    assert np.array_equal(res.tokens, expected)
    assert res.tokens.min() >= 4 and res.tokens.max() <= 30  # residues only: no <unk>, no specials


def test_reason_names_position():
    with pytest.raises(ValueError, match="at residue 21"):
        encode(UBIQUITIN[:20] + "J")
