"""A byte-level tokenizer (256 byte tokens + <bos>, <eos>, <pad>) for models without their own.

Every UTF-8 string round-trips, so it serves the tiny built-in model and tests with no file at all.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")  # ids 256, 257, 258


def byte_tokenizer() -> Tokenizer:
    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes, in byte order
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=_byte_of))}
    vocab.update({tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _byte_of(ch: str) -> int:
    """The byte that GPT-2's byte-to-unicode table maps to `ch`."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    if ord(ch) in printable:
        return ord(ch)
    others = [b for b in range(256) if b not in printable]
    return others[ord(ch) - 256]
