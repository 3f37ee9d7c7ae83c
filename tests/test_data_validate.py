"""Validation policy and the vectorised byte-LUT tokenizer (training/data/validate.py)."""

from pathlib import Path

import numpy as np
import pytest

from training.data.validate import (
    MASK,
    UNK,
    VOCAB,
    ValidationPolicy,
    build_lut,
    composition_problem,
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


def builtin_rows(stem: str) -> list[dict]:
    import csv

    from training.data.sources import builtin_dir

    with open(builtin_dir() / f"{stem}.tsv", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_composition_rule_takes_the_alphabet_reduced_set_and_keeps_real_proteins():
    location = [r["sequence"].encode() for r in builtin_rows("SEQ_LOCATION")]
    res = validate_batch(list(location), ValidationPolicy())
    reasons = [code(r) if r else None for r in res.reasons]
    assert reasons.count("composition") == 1810 and reasons.count(None) == 25
    assert max(len(s) for s, r in zip(location, reasons) if r is None) == 47  # only short ones (< 50) pass
    assert set(b"".join(location)) == set(b"ACDGHKMNRSTVWY")  # the 14 letters
    off = validate_batch(list(location), ValidationPolicy(composition_check=False))
    assert off.reasons.count(None) == 1835
    # real proteins of the other sequence-level sets: 5 of 28,157 distinct ones are taken (short repeat proteins)
    real = {r["sequence"].encode() for stem in ("SEQ_SOLUBLE", "SEQ_CAPSID", "SEQ_TAIL") for r in builtin_rows(stem)}
    res = validate_batch(sorted(real), ValidationPolicy())
    assert len(real) == 28157 and sum(r is not None and code(r) == "composition" for r in res.reasons) == 5
    assert composition_problem(UBIQUITIN.encode()) is None and composition_problem(FXYD3.encode()) is None


TDP43 = Path(__file__).parent / "fixtures" / "dms" / "tdp43.csv"


def test_composition_rule_thresholds():
    common = "ADEFGIKLNPQRSTV"
    five_absent = (common[5:] * 6)[:60]  # A D E F G absent: allowed (TDP-43 290-373 lacks five)
    assert composition_problem(five_absent.encode()) is None
    reason = composition_problem((common[6:] * 7)[:60].encode())  # A D E F G I absent
    assert reason.startswith("composition: 6 of the 15 common amino acids absent (A D E F G I) in 60 residues")
    assert composition_problem((common[6:] * 7)[:49].encode()) is None  # under 50 residues: not judged
    tdp43 = next(line.split(",")[1] for line in TDP43.read_text().splitlines()[1:2])  # a real assayed variant
    assert composition_problem(tdp43.encode()) is None
    assert composition_problem(b"X" * 50).startswith("composition: 15 of the 15")
    dna = b"ATGGCCATTGTAATGGGCCGCTGAAAGGGTGCCCGATAG"  # 39 nt
    assert composition_problem(dna) == (
        "composition: nucleotide-like, 100% A/C/G/T/U/N in 39 residues; "
        "composition_check=False (--no-composition-check) accepts it"
    )
    assert composition_problem(dna[:19]) is None  # under 20: not judged
    assert composition_problem(b"AAT" * 10 + b"A") is None  # an AAT-repeat protein: 2 nucleotide letters only
    assert composition_problem(b"A" * 40) is None  # poly-Ala peptide (< 50 residues)
    with pytest.raises(ValueError, match="in 60 residues"):
        encode((common[6:] * 7)[:60])


def test_mixed_case_annotation_marks_are_rejected_not_upper_cased():
    marked = {
        r["entry"]: r["sequence"] for r in builtin_rows("SEQ_DISULFIDE") if r["sequence"] != r["sequence"].upper()
    }
    assert sorted(marked) == ["DISULFIDE_1902", "DISULFIDE_1997", "DISULFIDE_2126", "DISULFIDE_2238"]
    res = validate_batch([s.encode() for s in marked.values()], ValidationPolicy())
    assert res.reasons == [
        "mixed_case: 1 lowercase letter(s) among upper-case ones, first 'i' at residue 232 "
        "(annotation marks? mixed_case='upper' / --mixed-case upper upper-cases them)",
        "mixed_case: 1 lowercase letter(s) among upper-case ones, first 'c' at residue 145 "
        "(annotation marks? mixed_case='upper' / --mixed-case upper upper-cases them)",
        "mixed_case: 1 lowercase letter(s) among upper-case ones, first 'c' at residue 98 "
        "(annotation marks? mixed_case='upper' / --mixed-case upper upper-cases them)",
        "mixed_case: 1 lowercase letter(s) among upper-case ones, first 'a' at residue 14 "
        "(annotation marks? mixed_case='upper' / --mixed-case upper upper-cases them)",
    ]
    upper = validate_batch([s.encode() for s in marked.values()], ValidationPolicy(mixed_case="upper"))
    assert upper.reasons == [None] * 4 and upper.uppercased == 4
    assert decode(encode(FXYD3.lower())) == FXYD3  # an all-lowercase sequence is still upper-cased
    with pytest.raises(ValueError, match="mixed_case must be"):
        ValidationPolicy(mixed_case="drop")
