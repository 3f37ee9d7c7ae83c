"""Validation and vectorised tokenization of protein sequences, before anything reaches a shard.

The stock EsmTokenizer silently turns bad input into `<unk>` (or one `<unk>` for an all-lowercase sequence, or a real
mask token for the text `<mask>`), so every sequence is checked here first and rejected with a reason instead.
Tokenization is a 256-entry byte lookup table applied to a whole batch of records at once (no loop per residue).

Public API
    ValidationPolicy(lowercase="upper", strip_terminal_stop=True, allow_gaps=False, allow_ambiguous=True,
                     min_length=1, reject_longer_than=None, duplicate_ids="report", mixed_case="reject",
                     composition_check=True)
    validate_batch(seqs: list[bytes], policy) -> BatchResult(tokens, lengths, reasons, uppercased, stops_stripped)
    encode(sequence: str | bytes, policy=None) -> np.ndarray   # (n,) uint8 residue ids; ValueError(reason) if bad
    decode(tokens) -> str                                       # residue ids -> letters
    composition_problem(letters: bytes) -> str | None   # the composition rule on one upper-case sequence
    REASONS: dict[code, meaning]; a rejection reason reads "<code>: <detail>"
    VOCAB, VOCAB_HASH, CLS, PAD, EOS, UNK, MASK, FIRST_RESIDUE (4), LAST_STANDARD (23), LAST_RESIDUE (30)

Policy (defaults suit pretraining)
    lowercase letters        upper-cased ("upper") or rejected ("reject")
    mixed case               a sequence with both upper- and lowercase letters is rejected ("mixed_case"): in curated
                             sets lowercase letters inside an upper-case sequence are annotation marks (aaanalysis
                             SEQ_DISULFIDE has single 'a', 'c', 'i' in four sequences; aaanalysis itself drops them
                             as non-canonical), not residues to upper-case silently; mixed_case="upper" upper-cases
                             them (soft-masked low-complexity regions, say)
    composition              a sequence that is not a natural protein (rejected, code "composition"; turned off
                             with composition_check=False / --no-composition-check):
                               - >= 50 residues with >= 6 of the 15 common amino acids A D E F G I K L N P Q R S T V
                                 absent (each >= 3.5% of UniProtKB/Swiss-Prot): an alphabet-reduced encoding such as
                                 aaanalysis SEQ_LOCATION (14 letters, no E F I L P Q), or a run of X;
                               - >= 20 residues, >= 90% of them A C G T U N, with >= 3 of A C G T U present:
                                 nucleotides.
                             Measured (README, Data): it takes SEQ_LOCATION's records of >= 50 residues (1,810 of
                             1,835), 5 records of the other built-in files (4 SEQ_SOLUBLE, 1 SEQ_CAPSID), 209 of
                             Swiss-Prot 2014's 435,059 (0.05%: mostly short coiled-coil, metallothionein-like and
                             repeat proteins), no nucleotide-like one. 5 absent is allowed: TDP-43 290-373 lacks 5.
    one terminal `*`         stripped (a translation stop); any other `*` is rejected (internal stop)
    digits, `J`, non-ASCII, `<...>` text, other symbols   rejected
    gaps `-` `.`             rejected unless allow_gaps=True (then they map to their own ids, 30 and 29)
    X B U Z O                accepted (ambiguous/rare residues, ids 24..28) unless allow_ambiguous=False
    empty / header-only      rejected (by the source readers and here)
    over-long                accepted and kept whole: the loader crops them (random window per epoch for training,
                             the first max_length-2 residues for eval); reject_longer_than=N rejects beyond N residues
    duplicate ids            reported in report.json ("report"), rejected ("reject") or not looked for ("ignore")
    whitespace, CR, UTF-8 BOM  removed by the readers before validation
"""

import dataclasses
import hashlib
import re
from typing import NamedTuple

import numpy as np

from modeling_speedplm.configuration_speedplm import AMBIGUOUS_RESIDUES, ESM2_VOCAB, GAP_CHARACTERS, STANDARD_RESIDUES

VOCAB = ESM2_VOCAB
CLS, PAD, EOS, UNK = (VOCAB.index(t) for t in ("<cls>", "<pad>", "<eos>", "<unk>"))
MASK = VOCAB.index("<mask>")
FIRST_RESIDUE, LAST_STANDARD, LAST_RESIDUE = 4, 23, 30  # L..C are the 20 standard residues; X..O, '.', '-' follow
# the alphabet's one home is configuration_speedplm, shared with the tokenizer shipped in every checkpoint
STANDARD, AMBIGUOUS, GAPS = STANDARD_RESIDUES, AMBIGUOUS_RESIDUES, GAP_CHARACTERS
# Shards record this hash so a shard written under another vocabulary order is refused when loaded.
VOCAB_HASH = hashlib.sha256("\n".join(VOCAB).encode()).hexdigest()[:32]
BAD = 255  # LUT value for a byte that is not an accepted residue

REASONS = {
    "empty_sequence": "a record whose sequence is empty (blank lines, empty cell, or only a stop '*')",
    "header_without_sequence": "a FASTA header followed directly by another header or the end of the file",
    "sequence_before_header": "FASTA sequence lines before the first '>' header",
    "special_token_text": "text such as '<mask>' or '<unk>' inside a sequence",
    "non_ascii": "a non-ASCII character",
    "internal_stop": "a '*' that is not the last character",
    "digit": "a digit",
    "letter_J": "'J' (Leu/Ile ambiguity) is not in the ESM2 vocabulary",
    "gap": "a gap character '-' or '.' (allowed only with allow_gaps=True)",
    "lowercase": "a lowercase letter (policy lowercase='reject')",
    "ambiguous_residue": "X B U Z O (policy allow_ambiguous=False)",
    "invalid_character": "any other character",
    "too_short": "fewer residues than min_length",
    "too_long": "more residues than reject_longer_than",
    "duplicate_id": "an id seen before (policy duplicate_ids='reject')",
    "duplicate_sequence": "a sequence seen before (deduplication on)",
    "mixed_case": "lowercase letters inside an upper-case sequence: annotation marks (policy mixed_case='reject')",
    "composition": "not a natural protein: many common amino acids absent, or nucleotide letters (composition_check)",
}

# The composition rule (module docstring; thresholds measured on real proteins, README "Data").
COMMON_RESIDUES = "ADEFGIKLNPQRSTV"  # each >= 3.5% of UniProtKB/Swiss-Prot residues; C H M W Y are rarer
COMPOSITION_MIN_LENGTH = 50  # residues: below this, natural proteins lack common letters too often
COMPOSITION_MAX_ABSENT = 5  # common residues a protein may lack (TDP-43 290-373 lacks 5); one more is rejected
NUCLEOTIDE_MIN_LENGTH = 20
NUCLEOTIDE_FRACTION = 0.9  # share of A C G T U N
NUCLEOTIDE_MIN_DISTINCT = 3  # of A C G T U present (poly-A and AAT repeats are proteins)


@dataclasses.dataclass(frozen=True)
class ValidationPolicy:
    """What counts as a valid protein; see the module docstring for the rule per kind of input."""

    lowercase: str = "upper"  # "upper" | "reject"
    strip_terminal_stop: bool = True
    allow_gaps: bool = False
    allow_ambiguous: bool = True
    min_length: int = 1
    reject_longer_than: int | None = None
    duplicate_ids: str = "report"  # "report" | "reject" | "ignore" (no id index: corpora with unique ids)
    mixed_case: str = "reject"  # "reject" | "upper": lowercase letters inside an upper-case sequence
    composition_check: bool = True  # reject sequences that are not natural proteins (see the module docstring)

    def __post_init__(self):
        if self.lowercase not in ("upper", "reject"):
            raise ValueError(f"lowercase must be 'upper' or 'reject', got {self.lowercase!r}")
        if self.duplicate_ids not in ("report", "reject", "ignore"):
            raise ValueError(f"duplicate_ids must be 'report', 'reject' or 'ignore', got {self.duplicate_ids!r}")
        if self.mixed_case not in ("reject", "upper"):
            raise ValueError(f"mixed_case must be 'reject' or 'upper', got {self.mixed_case!r}")
        if self.min_length < 1:
            raise ValueError(f"min_length must be >= 1, got {self.min_length}")


def build_lut(policy: ValidationPolicy) -> np.ndarray:
    """(256,) uint8: byte -> residue id, BAD for every byte the policy does not accept."""
    lut = np.full(256, BAD, dtype=np.uint8)
    letters = STANDARD + (AMBIGUOUS if policy.allow_ambiguous else "") + (GAPS if policy.allow_gaps else "")
    for ch in letters:
        lut[ord(ch)] = VOCAB.index(ch)
        if policy.lowercase == "upper" and ch.isalpha():
            lut[ord(ch.lower())] = VOCAB.index(ch)
    return lut


_LUT_CACHE: dict[ValidationPolicy, np.ndarray] = {}
_IS_LOWER = np.zeros(256, dtype=bool)
_IS_LOWER[ord("a") : ord("z") + 1] = True
_IS_UPPER = np.zeros(256, dtype=bool)
_IS_UPPER[ord("A") : ord("Z") + 1] = True
# the composition rule works on "letters present" masks: residue id i (4..30) is bit 1 << i
_COMMON_BITS = [(ch, 1 << VOCAB.index(ch)) for ch in COMMON_RESIDUES]
_NUCLEOTIDE_MASK = sum(1 << VOCAB.index(ch) for ch in "ACGTUN")
_NUCLEOTIDE_BITS = [1 << VOCAB.index(ch) for ch in "ACGTU"]
# residue id -> ASCII letter (0 for non-residues), to rebuild normalized sequences for hashing and display
ID_TO_BYTE = np.zeros(256, dtype=np.uint8)
for _i, _tok in enumerate(VOCAB):
    if len(_tok) == 1:
        ID_TO_BYTE[_i] = ord(_tok)
_SPECIAL_TEXT = re.compile(rb"<[^<>\s]{0,32}>")


def _lut(policy: ValidationPolicy) -> np.ndarray:
    if policy not in _LUT_CACHE:
        _LUT_CACHE[policy] = build_lut(policy)
    return _LUT_CACHE[policy]


def explain(seq: bytes, policy: ValidationPolicy) -> str:
    """Reason ("<code>: <detail>") for the first byte of `seq` the policy rejects (slow path, bad records only)."""
    bad = np.flatnonzero(_lut(policy)[np.frombuffer(seq, dtype=np.uint8)] == BAD)
    if bad.size == 0:
        raise ValueError("explain() called on a valid sequence")
    i = int(bad[0])
    c = seq[i]
    at = f"at residue {i + 1}"
    ch = chr(c)
    if ch == "<":
        m = _SPECIAL_TEXT.match(seq, i)
        if m:
            return f"special_token_text: {m.group().decode('ascii', 'replace')!r} {at}"
        return f"invalid_character: '<' {at}"
    if c >= 0x80:
        text = seq[i : i + 4].decode("utf-8", "replace")[0]
        if text == "\ufffd":  # not valid UTF-8: name the byte
            return f"non_ascii: byte 0x{c:02X} {at}"
        return f"non_ascii: {text!r} (U+{ord(text):04X}) {at}"
    if ch == "*":
        return f"internal_stop: '*' {at}"
    if ch.isdigit():
        return f"digit: {ch!r} {at}"
    if ch in "Jj":
        return f"letter_J: {ch!r} {at} (J is not in the ESM2 vocabulary)"
    if ch in GAPS:
        return f"gap: {ch!r} {at} (allow_gaps=False)"
    if ch.islower() and ch.upper() in STANDARD + AMBIGUOUS:
        return f"lowercase: {ch!r} {at} (lowercase='reject')"
    if ch.upper() in AMBIGUOUS:
        return f"ambiguous_residue: {ch!r} {at} (allow_ambiguous=False)"
    return f"invalid_character: {ch!r} {at}"


def _composition(tokens: np.ndarray, lengths: np.ndarray) -> list:
    """(k, reason) of the records (residue ids back to back, `lengths` >= 1 each) that fail the composition rule."""
    if not len(lengths):
        return []
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))  # (n,)
    ids = tokens.astype(np.uint32)  # (total,) residue ids 4..30
    present = np.bitwise_or.reduceat(np.left_shift(np.uint32(1), ids), starts)  # (n,) bit i: residue id i present
    absent = sum(((present & bit) == 0).astype(np.int64) for _, bit in _COMMON_BITS)  # (n,) common letters absent
    is_nucleotide = np.right_shift(np.uint32(_NUCLEOTIDE_MASK), ids) & np.uint32(1)  # (total,) 0/1
    nucleotides = np.add.reduceat(is_nucleotide, starts).astype(np.int64)  # (n,)
    distinct = sum(((present & bit) != 0).astype(np.int64) for bit in _NUCLEOTIDE_BITS)  # (n,) of A C G T U
    reduced = (lengths >= COMPOSITION_MIN_LENGTH) & (absent > COMPOSITION_MAX_ABSENT)
    nucleic = (lengths >= NUCLEOTIDE_MIN_LENGTH) & (nucleotides >= NUCLEOTIDE_FRACTION * lengths)
    nucleic &= distinct >= NUCLEOTIDE_MIN_DISTINCT
    out = []
    for k in np.flatnonzero(reduced | nucleic).tolist():
        n = int(lengths[k])
        if reduced[k]:
            missing = " ".join(ch for ch, bit in _COMMON_BITS if not int(present[k]) & bit)
            what = (
                f"{int(absent[k])} of the {len(COMMON_RESIDUES)} common amino acids absent ({missing}) in {n} "
                "residues: not a natural protein (an alphabet-reduced encoding?)"
            )
        else:
            what = f"nucleotide-like, {100 * int(nucleotides[k]) / n:.0f}% A/C/G/T/U/N in {n} residues"
        out.append((k, f"composition: {what}; composition_check=False (--no-composition-check) accepts it"))
    return out


def composition_problem(letters: bytes) -> str | None:
    """The composition rule's reason for one sequence of upper-case residue letters, or None if it passes."""
    tokens = build_lut(ValidationPolicy())[np.frombuffer(letters, dtype=np.uint8)]
    if not len(tokens) or (tokens == BAD).any():
        raise ValueError("composition_problem() takes upper-case residue letters only")
    found = _composition(tokens, np.array([len(tokens)]))
    return found[0][1] if found else None


def _mixed_case(seq: bytes) -> str:
    lower = np.flatnonzero(_IS_LOWER[np.frombuffer(seq, dtype=np.uint8)])
    i = int(lower[0])
    return (
        f"mixed_case: {len(lower)} lowercase letter(s) among upper-case ones, first {chr(seq[i])!r} at residue "
        f"{i + 1} (annotation marks? mixed_case='upper' / --mixed-case upper upper-cases them)"
    )


class BatchResult(NamedTuple):
    tokens: np.ndarray  # (sum of accepted lengths,) uint8 residue ids, accepted records back to back
    lengths: np.ndarray  # (n,) int64 residues per record; -1 where rejected
    reasons: list  # (n,) None where accepted, else "<code>: <detail>"
    uppercased: int  # accepted records that held lowercase letters
    stops_stripped: int  # records whose terminal '*' was removed


def validate_batch(seqs: list[bytes], policy: ValidationPolicy) -> BatchResult:
    """Validate and tokenize many records at once; `seqs` are whitespace-free bytes from the readers."""
    n = len(seqs)
    reasons: list = [None] * n
    stripped = []  # records whose terminal '*' was removed
    if policy.strip_terminal_stop:
        for k, s in enumerate(seqs):
            if s.endswith(b"*"):
                seqs[k] = s[:-1]
                stripped.append(k)
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=n)
    buf = np.frombuffer(b"".join(seqs), dtype=np.uint8)  # (total,)
    tokens = _lut(policy)[buf]  # (total,) one gather for the whole batch
    ends = np.cumsum(lengths)  # (n,) end offset of each record in buf
    bad_pos = np.flatnonzero(tokens == BAD)
    if bad_pos.size:
        for k in np.unique(np.searchsorted(ends, bad_pos, side="right")):
            reasons[k] = explain(seqs[k], policy)
    for k in np.flatnonzero(lengths == 0):
        reasons[k] = "empty_sequence: no residues" + (" (only a stop '*')" if k in stripped else "")
    for k in np.flatnonzero((lengths > 0) & (lengths < policy.min_length)):
        reasons[k] = reasons[k] or f"too_short: {lengths[k]} residues < min_length {policy.min_length}"
    if policy.reject_longer_than is not None:  # a bad letter is the more useful reason, so it wins
        for k in np.flatnonzero(lengths > policy.reject_longer_than):
            limit = policy.reject_longer_than
            reasons[k] = reasons[k] or f"too_long: {lengths[k]} residues > reject_longer_than {limit}"
    lower_pos = np.flatnonzero(_IS_LOWER[buf])
    lower_recs = np.unique(np.searchsorted(ends, lower_pos, side="right")) if lower_pos.size else lower_pos
    if lower_recs.size and policy.mixed_case == "reject":
        upper_recs = np.unique(np.searchsorted(ends, np.flatnonzero(_IS_UPPER[buf]), side="right"))
        for k in np.intersect1d(lower_recs, upper_recs).tolist():
            reasons[k] = reasons[k] or _mixed_case(seqs[k])
    rejected = np.array([r is not None for r in reasons], dtype=bool)  # (n,)
    if policy.composition_check:  # on the records that passed every other check
        ok = np.flatnonzero(~rejected)
        checked = tokens[np.repeat(~rejected, lengths)] if rejected.any() else tokens
        for j, reason in _composition(checked, lengths[ok]):
            reasons[ok[j]] = reason
            rejected[ok[j]] = True
    uppercased = int((~rejected[lower_recs]).sum()) if lower_recs.size else 0
    if rejected.any():
        tokens = tokens[np.repeat(~rejected, lengths)]  # drop rejected records' bytes
        lengths = np.where(rejected, -1, lengths)
    return BatchResult(tokens, lengths, reasons, uppercased, len(stripped))


def encode(sequence: str | bytes, policy: ValidationPolicy | None = None) -> np.ndarray:
    """(n,) uint8 residue ids of one sequence (no <cls>/<eos>); ValueError carrying the reason if it is rejected."""
    raw = sequence.encode("utf-8", "surrogateescape") if isinstance(sequence, str) else bytes(sequence)
    result = validate_batch([raw.translate(None, b" \t\r\n\v\f")], policy or ValidationPolicy())
    if result.reasons[0] is not None:
        raise ValueError(result.reasons[0])
    return result.tokens


def decode(tokens: np.ndarray) -> str:
    """Residue ids -> letters (the normalized sequence); inverse of `encode` for accepted input."""
    return ID_TO_BYTE[np.asarray(tokens, dtype=np.uint8)].tobytes().decode("ascii")
