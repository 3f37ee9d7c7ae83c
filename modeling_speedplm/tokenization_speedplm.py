"""SpeedPLMTokenizer: ESM2's tokenizer (ids, special tokens) that applies `prepare`'s input policy instead of `<unk>`.

The stock `EsmTokenizer` turns bad input into `<unk>` without a word: an all-lowercase protein becomes ONE `<unk>`,
`J12` one `<unk>`, and a protein longer than the model only logs a warning. This subclass applies the policy of
`python -m training.data prepare` (training/data/validate.py; the alphabet lives in configuration_speedplm.py):

    lowercase letters          upper-cased
    one terminal `*`           stripped (a translation stop)
    surrounding whitespace     stripped
    `<mask>`                   kept: the mask token, for fill-mask
    tokens the user added      kept as written (`tokenizer.add_tokens(["<new>"])`, then `model.resize_token_embeddings`)
    anything else              ValueError naming the character and its 1-based position: digits, `J`, gaps `-` `.`,
                               whitespace inside, an internal `*`, other `<...>` text, non-ASCII; an empty sequence
    longer than the model      ValueError, unless the caller asks for the crop with `truncation=True` (then the first
                               model_max_length - 2 residues are kept, plus <cls> and <eos>)

Shipped in every checkpoint as Hub remote code, registered for AutoTokenizer, so
`AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)` and `pipeline("fill-mask", ...)` use it.
"""

import os
import re
import tempfile

from transformers import EsmTokenizer

from .configuration_speedplm import AMBIGUOUS_RESIDUES, ESM2_VOCAB, GAP_CHARACTERS, STANDARD_RESIDUES

MASK_TEXT = "<mask>"
_ACCEPTED = STANDARD_RESIDUES + AMBIGUOUS_RESIDUES
_ESM2_TOKENS = frozenset(ESM2_VOCAB)


def _valid_prefix(kept: tuple[str, ...]) -> re.Pattern:
    """The longest valid prefix: residues in either case and the kept token texts (the mask token, tokens a user
    added; longest first, so one that extends another wins); where it stops is the first bad character."""
    texts = "".join(f"{re.escape(t)}|" for t in sorted(kept, key=len, reverse=True))
    return re.compile(f"(?:{texts}[{_ACCEPTED}{_ACCEPTED.lower()}])*")


_VALID_PREFIX = _valid_prefix((MASK_TEXT,))


def _reason(ch: str) -> str:
    if ch.isspace():
        return "whitespace inside a sequence"
    if ch.isdigit():
        return "a digit"
    if ch in "Jj":
        return "J (Leu/Ile ambiguity) is not in the ESM2 vocabulary"
    if ch in GAP_CHARACTERS:
        return "a gap character (prepare accepts gaps only with allow_gaps=True)"
    if ch == "*":
        return "a '*' that is not the last character (internal stop)"
    if ch == "<":
        return f"special-token text; only {MASK_TEXT} and tokens added with tokenizer.add_tokens are allowed"
    if not ch.isascii():
        return f"a non-ASCII character (U+{ord(ch):04X})"
    return "not an amino-acid letter"


def normalize_sequence(text: str, added_tokens: tuple[str, ...] = ()) -> str:
    """One protein under `prepare`'s default policy (module docstring): upper-cased, a terminal '*' stripped; a
    ValueError naming the first rejected character and its 1-based position otherwise. `added_tokens`: token texts a
    user registered (`add_tokens`), kept as written like <mask>."""
    kept = (MASK_TEXT, *(t for t in added_tokens if t != MASK_TEXT))
    valid_prefix = _VALID_PREFIX if len(kept) == 1 else _valid_prefix(kept)
    sequence = text.strip()
    if sequence.endswith("*"):
        sequence = sequence[:-1]
    if not sequence:
        raise ValueError(f"SpeedPLMTokenizer: empty sequence {text!r}: a protein needs at least one residue")
    bad = valid_prefix.match(sequence).end()
    if bad < len(sequence):
        ch = sequence[bad]
        shown = sequence if len(sequence) <= 60 else sequence[:57] + "..."
        raise ValueError(
            f"SpeedPLMTokenizer: {ch!r} at position {bad + 1} of {shown!r}: {_reason(ch)}. Sequences follow "
            "`prepare`'s policy: the 25 letters of the ESM2 alphabet (either case), <mask>, one terminal '*'"
            + (f", the added tokens {list(kept[1:])}" if len(kept) > 1 else "")
        )
    if len(kept) == 1:
        return MASK_TEXT.join(part.upper() for part in sequence.split(MASK_TEXT))
    # upper-case the residues only: the kept token texts stay as written
    pieces = re.split(f"({'|'.join(re.escape(t) for t in sorted(kept, key=len, reverse=True))})", sequence)
    return "".join(piece if i % 2 else piece.upper() for i, piece in enumerate(pieces))


class SpeedPLMTokenizer(EsmTokenizer):
    """`EsmTokenizer` (same vocabulary, ids and special tokens) that validates its input; see the module docstring."""

    def prepare_for_tokenization(self, text: str, is_split_into_words: bool = False, **kwargs):
        return normalize_sequence(text, self.user_added_tokens()), kwargs

    def user_added_tokens(self) -> tuple[str, ...]:
        """Token texts registered with `add_tokens` / `add_special_tokens` beyond ESM2's 33 (kept through
        save_pretrained: added_tokens_decoder in tokenizer_config.json)."""
        return tuple(t for t in self.added_tokens_encoder if t not in _ESM2_TOKENS)

    def _eventual_warn_about_too_long_sequence(self, ids: list[int], max_length: int | None, verbose: bool):
        # transformers calls this after truncation, where the stock tokenizer only warns; running positions the
        # model was never trained on would give silently worse outputs, so this is an error.
        if self.model_max_length and len(ids) > self.model_max_length:
            raise ValueError(
                f"SpeedPLMTokenizer: {len(ids)} tokens (<cls> and <eos> included) exceed the model's "
                f"{self.model_max_length} positions; pass truncation=True to keep the first "
                f"{self.model_max_length - 2} residues, or split the protein"
            )


def build_tokenizer(model_max_length: int = 1024) -> SpeedPLMTokenizer:
    """A SpeedPLMTokenizer whose ids equal ESM2's (`<cls>`0 `<pad>`1 `<eos>`2 `<unk>`3 ... `<mask>`32)."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, "vocab.txt")
        with open(vocab_file, "w") as f:
            f.write("\n".join(ESM2_VOCAB) + "\n")
        return SpeedPLMTokenizer(vocab_file, model_max_length=model_max_length)


# Hub remote code: tokenizer_config.json gets auto_map {"AutoTokenizer": [...]} and this file is saved beside it.
SpeedPLMTokenizer.register_for_auto_class("AutoTokenizer")
