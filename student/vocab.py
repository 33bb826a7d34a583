"""Map teacher tokens to student token ids by their bytes.

An API teacher names its tokens by text and bytes, never by a student token id, and its
vocabulary (and logit width) may differ from the student's. Bytes are the one
representation both sides share, so this module builds a ``bytes -> student id`` table
from the student tokenizer's pieces and looks teacher tokens up in it. A teacher token
maps only when exactly one student piece has the same bytes. A token that the student
spells with several pieces does not map, and the caller decides what to do with it.

Pieces are turned into bytes according to the tokenizer's spelling scheme:

- SentencePiece-style (``metaspace``): ``▁`` stands for a space, and byte-fallback
  pieces ``<0xNN>`` stand for the single byte NN.
- GPT-2 byte-level (``byte_level``): every byte is written as one printable character
  (``Ġ`` is the space), so each character maps back to one byte.

Special tokens (BOS, EOS, UNK, chat markers flagged special) never map: a teacher's
text never contains them. Ids at or beyond ``vocab_limit`` (the width of the student's
logits) are left out, so a mapped id can always index the student's logits.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

SCHEME_METASPACE = "metaspace"
SCHEME_BYTE_LEVEL = "byte_level"
METASPACE = "\u2581"

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_decoding() -> dict[str, int]:
    """Return the inverse of GPT-2's byte-to-printable-character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def piece_to_bytes(piece: str, scheme: str) -> bytes | None:
    """Return the bytes a vocabulary piece stands for, or None if it has no byte form."""
    fallback = _BYTE_FALLBACK.fullmatch(piece)
    if fallback is not None:
        return bytes([int(fallback.group(1), 16)])
    if scheme == SCHEME_BYTE_LEVEL:
        table = _byte_level_decoding()
        try:
            return bytes(table[char] for char in piece)
        except KeyError:
            return None
    return piece.replace(METASPACE, " ").encode("utf-8")


def detect_piece_scheme(tokenizer: Any) -> str:
    """Return how the tokenizer spells bytes in its pieces: metaspace or byte_level."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for part in ("pre_tokenizer", "decoder"):
            if _mentions_type(spec.get(part), "ByteLevel"):
                return SCHEME_BYTE_LEVEL
        return SCHEME_METASPACE

    # A slow tokenizer exposes no pipeline; the pieces themselves tell the scheme.
    pieces = list(tokenizer.get_vocab())
    metaspace = sum(METASPACE in piece for piece in pieces)
    gpt2_space = sum(piece.startswith("\u0120") for piece in pieces)
    return SCHEME_BYTE_LEVEL if gpt2_space > metaspace else SCHEME_METASPACE


def _mentions_type(node: Any, type_name: str) -> bool:
    if isinstance(node, dict):
        if node.get("type") == type_name:
            return True
        return any(_mentions_type(value, type_name) for value in node.values())
    if isinstance(node, list):
        return any(_mentions_type(value, type_name) for value in node)
    return False


@dataclass
class StudentVocab:
    """Lookup table from token bytes to the student's token id."""

    ids_by_bytes: dict[bytes, int]
    vocab_limit: int
    scheme: str
    # Pieces whose bytes another piece already claimed; kept for diagnostics.
    duplicate_pieces: int = 0
    pieces_beyond_limit: int = 0
    special_ids: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_limit: int | None = None) -> StudentVocab:
        """Build the table from a transformers tokenizer.

        ``vocab_limit`` is the width of the student's logits; ids at or above it are
        left out. When two pieces have the same bytes, an ordinary piece wins over a
        byte-fallback piece (``▁`` over ``<0x20>``), then the lower id wins, because
        that is the piece the tokenizer itself produces for those bytes.
        """
        scheme = detect_piece_scheme(tokenizer)
        vocab: dict[str, int] = tokenizer.get_vocab()
        limit = vocab_limit if vocab_limit is not None else max(vocab.values()) + 1
        special_ids = frozenset(tokenizer.all_special_ids)
        added = {
            token_id: token
            for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
        }

        best: dict[bytes, tuple[int, int]] = {}
        duplicates = 0
        beyond = 0
        for piece, token_id in vocab.items():
            if token_id in special_ids or getattr(added.get(token_id), "special", False):
                continue
            if token_id >= limit:
                beyond += 1
                continue
            if token_id in added:
                # Added tokens hold literal text, not pieces in the model's spelling.
                piece_bytes = getattr(added[token_id], "content", str(added[token_id])).encode("utf-8")
            else:
                piece_bytes = piece_to_bytes(piece, scheme)
            if not piece_bytes:
                continue
            rank = (1 if _BYTE_FALLBACK.fullmatch(piece) else 0, token_id)
            if piece_bytes in best:
                duplicates += 1
                if rank >= best[piece_bytes]:
                    continue
            best[piece_bytes] = rank

        ids_by_bytes = {piece_bytes: rank[1] for piece_bytes, rank in best.items()}
        return cls(
            ids_by_bytes=ids_by_bytes,
            vocab_limit=limit,
            scheme=scheme,
            duplicate_pieces=duplicates,
            pieces_beyond_limit=beyond,
            special_ids=special_ids,
        )

    def lookup(self, token_bytes: bytes | None) -> int | None:
        """Return the one student id with exactly these bytes, or None."""
        if not token_bytes:
            return None
        return self.ids_by_bytes.get(token_bytes)


def teacher_token_bytes(text: str | None, raw: bytes | None) -> bytes | None:
    """Return a teacher token's bytes: the reported bytes when present, else its UTF-8 text.

    Reported bytes are the truth: a token that ends inside a multi-byte character has
    text such as ``"\\ufffd"`` or ``""`` but correct bytes.
    """
    if raw is not None:
        return bytes(raw)
    if text is None:
        return None
    return text.encode("utf-8")
