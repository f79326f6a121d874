"""Prompts as A1111 users write them: emphasis `(word)` `(word:1.5)` `[word]`, `BREAK`, and prompts of any length.

AUTOMATIC1111's semantics (modules/prompt_parser.py, sd_hijack_clip.py, sd_emphasis.py; read, not copied):
- `(text)` multiplies the weight of its tokens by 1.1, `[text]` divides it by 1.1, `(text:w)` multiplies by w;
  brackets nest (`((a))` is 1.21); `\\(` `\\)` `\\[` `\\]` `\\\\` are literal; an unclosed bracket applies to
  the end of the prompt, an unmatched closing one is literal text.
- `BREAK` (upper case, a word of its own) ends the current chunk.
- The prompt is tokenized fragment by fragment (no special tokens) into chunks of 75 tokens; a chunk that
  fills up breaks after its last comma when that comma is among its last 20 tokens (A1111's default
  comma_padding_backtrack). Each chunk becomes BOS + tokens + EOS, padded to 77 (after the first EOS with the
  tokenizer's pad token: EOS for CLIP-L, "!" for OpenCLIP), and is encoded on its own; the chunks' hidden
  states are concatenated along the sequence axis. Prompts in one batch (negatives included) are padded
  with empty chunks to the same count; the pooled output (SDXL) is the first chunk's.
- Emphasis "original": each chunk's hidden states are multiplied by their tokens' weights, then rescaled so
  that the chunk's mean is unchanged.
A1111's prompt editing `[from:to:when]` and alternation `[a|b]` change the prompt during sampling; they
are refused by name (escape the brackets to write them literally).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from sdrt.runtime.errors import InvalidInputError

EMPHASIS = ("original", "none")  # "none": the prompt is literal text, truncated at 77 tokens, as diffusers
CHUNK_LENGTH = 75
COMMA_PADDING_BACKTRACK = 20
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = object()  # the fragment that ends a chunk

# One token of A1111's attention syntax per match: escapes, brackets, ":weight)", plain text, a lone colon.
_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def check_emphasis(emphasis) -> str:
    if emphasis not in EMPHASIS:
        raise InvalidInputError(f"emphasis must be one of {EMPHASIS} (A1111's syntax, or the literal prompt), "
                                f"got {emphasis!r}")
    return emphasis


def refuse_scheduling(text: str) -> None:
    """InvalidInputError for A1111's prompt editing ([from:to:when]) and alternation ([a|b]): a ':' or '|' inside
    unescaped square brackets."""
    depth = 0
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[":
            depth += 1
        elif char == "]" and depth:
            depth -= 1
        elif depth and char in ":|":
            what = "prompt editing [from:to:when]" if char == ":" else "alternation [a|b]"
            raise InvalidInputError(
                f"the prompt uses A1111's {what}, which changes the prompt during sampling and is not supported; "
                f"write the brackets as \\[ \\] to keep them as text, or pass emphasis='none' (--emphasis none): {text!r}"
            )


def parse(text: str) -> list[tuple[object, float]]:
    """(fragment, weight) pairs of A1111's attention syntax, runs of equal weight merged; BREAK marks chunk ends."""
    refuse_scheduling(text)
    fragments: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if fragment[0] is not BREAK:  # A1111 weights its BREAK marker too, which then reads as the word "BREAK"
                fragment[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(fragments))
        elif token == "[":
            square_brackets.append(len(fragments))
        elif weight is not None and round_brackets:
            multiply(round_brackets.pop(), float(weight))
        elif token == ")" and round_brackets:
            multiply(round_brackets.pop(), ROUND)
        elif token == "]" and square_brackets:
            multiply(square_brackets.pop(), SQUARE)
        else:
            for k, part in enumerate(_BREAK.split(token)):
                if k:
                    fragments.append([BREAK, -1.0])
                if part:
                    fragments.append([part, 1.0])
    for start in round_brackets:
        multiply(start, ROUND)
    for start in square_brackets:
        multiply(start, SQUARE)
    merged: list[list] = []
    for fragment in fragments:
        if merged and fragment[0] is not BREAK and merged[-1][0] is not BREAK and merged[-1][1] == fragment[1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return [(f, w) for f, w in merged] or [("", 1.0)]


@dataclass(frozen=True)
class Chunk:
    """77 token ids (BOS, up to 75 tokens, EOS, padding) and each one's weight."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]


def chunks(tokenizer, text: str) -> list[Chunk]:
    """The prompt's chunks, as A1111's tokenize_line makes them (see the module's docstring)."""
    parsed = parse(text)
    pieces = [piece for piece, _ in parsed if piece is not BREAK]
    token_lists = iter(tokenizer.token_ids(pieces)) if pieces else iter(())
    comma = tokenizer.comma_token_id
    done: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        padding = CHUNK_LENGTH - len(ids)
        tokens = [tokenizer.bos_token_id, *ids, *[tokenizer.eos_token_id] * (padding + 1)]
        first_eos = len(ids) + 1  # after it, the pad token (A1111's id_pad replacement)
        tokens[first_eos + 1:] = [tokenizer.pad_token_id] * (len(tokens) - first_eos - 1)
        done.append(Chunk(tuple(tokens), (1.0, *weights, *[1.0] * (padding + 1))))
        ids, weights, last_comma = [], [], -1

    for piece, weight in parsed:
        if piece is BREAK:
            close()
            continue
        for token in next(token_lists):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_LENGTH and last_comma != -1 and len(ids) - last_comma <= COMMA_PADDING_BACKTRACK:
                moved_ids, moved_weights = ids[last_comma + 1:], weights[last_comma + 1:]
                ids, weights = ids[:last_comma + 1], weights[:last_comma + 1]
                close()
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK_LENGTH:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not done:
        close()
    return done


def empty_chunk(tokenizer) -> Chunk:
    return chunks(tokenizer, "")[0]


def chunk_count(tokenizer, texts) -> int:
    return max(len(chunks(tokenizer, text)) for text in texts)


def emphasize(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's "Original" emphasis on one chunk's hidden states (77, D): scale each token's row by its weight,
    then rescale the chunk to its former mean (means accumulated in float64: A1111's float32 means are as exact
    for real encoders, whose states have a clear mean). All weights 1 leave the states bit for bit."""
    original_mean = hidden.mean(dtype=np.float64)
    weighted = hidden * weights.astype(np.float32)[:, None]
    return weighted * np.float32(original_mean / weighted.mean(dtype=np.float64))


def encode(tokenizer, run: Callable[[np.ndarray], dict], texts: list[str], outputs: tuple[str, ...],
           min_chunks: int = 1) -> tuple[list[np.ndarray], int]:
    """Encode `texts` chunk by chunk in one batch of the text encoder (`run(input_ids) -> outputs`): for each name
    in `outputs`, the emphasized hidden states (N, chunks x 77, D) or, for a pooled output (2-D), the first chunk's
    (N, D). All texts are padded with empty chunks to the same count (at least min_chunks); returns the count too."""
    per_text = [chunks(tokenizer, text) for text in texts]
    count = max(min_chunks, *(len(c) for c in per_text))
    empty = empty_chunk(tokenizer)
    padded = [c + [empty] * (count - len(c)) for c in per_text]
    ids = np.array([chunk.ids for c in padded for chunk in c], dtype=np.int64)
    weights = np.array([chunk.weights for c in padded for chunk in c], dtype=np.float64)
    result = run(ids)
    encoded = []
    for name in outputs:
        value = result[name]
        if value.ndim == 2:  # pooled: one row per chunk, the first chunk's per text
            encoded.append(np.ascontiguousarray(value.reshape(len(texts), count, -1)[:, 0]))
            continue
        rows = [emphasize(value[k], weights[k]) for k in range(len(value))]
        encoded.append(np.stack(rows).reshape(len(texts), count * value.shape[1], value.shape[2]))
    return encoded, count
