"""T5's SentencePiece-Unigram tokenizer (SD3's tokenizer_3, Flux's tokenizer_2), run by the `tokenizers` library.

`T5Tokenizer.from_folder` reads the folder's tokenizer.json; calling it with prompts and a max_length gives
the int64 (N, max_length) ids transformers' T5TokenizerFast gives with `padding="max_length",
truncation=True, add_special_tokens=True`, as diffusers' SD3 (max_sequence_length 256) and Flux (512)
pipelines call it: tokens, cut to max_length - 1, then </s>, then the pad id.

transformers 5 does not run a T5 tokenizer.json's pipeline as saved: it keeps the Unigram pieces and the
SentencePiece `Precompiled` normalizer and rebuilds the rest (WhitespaceSplit, then Metaspace "▁" prepended
to every word, `$A </s>`). So does this file, so that folders saved by older transformers (whose files carry
Replace/Strip normalizers and a bare Metaspace) give the same ids too.

A folder holding only spiece.model (SentencePiece's own file) is refused: reading it needs sentencepiece
and protobuf, which the runtime does not use; `sdrt export` writes tokenizer.json beside it.
"""

from __future__ import annotations

import base64
import json
import os
import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from sdrt.runtime.errors import InvalidInputError, ModelFolderError, UnsupportedConfigError
from sdrt.runtime.tokenizer import PromptTruncatedWarning, _add_config_tokens, _describe, _read_json, _special_ids, \
    _token_content

# T5Tokenizer's defaults, used where tokenizer_config.json does not name a token.
DEFAULT_SPECIAL_TOKENS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
METASPACE = "▁"


class T5Tokenizer:
    """Prompts -> int64 input_ids of shape (N, max_length), identical to transformers' T5TokenizerFast."""

    def __init__(self, tokenizer: Tokenizer, eos_token: str = "</s>", pad_token: str = "<pad>",
                 model_max_length: int | None = None):
        ids = _special_ids(tokenizer, eos_token=eos_token, pad_token=pad_token)
        # The library must neither cut nor pad nor add </s>: __call__ does all three, so it can tell what it dropped.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.eos_token_id = ids["eos_token"]
        self.pad_token_id = ids["pad_token"]
        self.model_max_length = model_max_length  # the config's value, for information: callers pass max_length

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "T5Tokenizer":
        """Load a T5 tokenizer folder: tokenizer.json, and tokenizer_config.json's special tokens if it has one."""
        folder = Path(path)
        if not folder.is_dir():
            raise ModelFolderError(f"tokenizer folder {folder} does not exist")
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            found = " (only spiece.model, SentencePiece's file, which needs sentencepiece to read)" if (
                folder / "spiece.model").is_file() else ""
            raise ModelFolderError(
                f"T5 tokenizer folder {folder} lacks tokenizer.json{found}; re-export the model with `sdrt export`, "
                "which writes tokenizer.json"
            )
        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        sides = {key: config[key] for key in ("padding_side", "truncation_side") if config.get(key, "right") != "right"}
        if sides:
            raise UnsupportedConfigError(f"{config_file}: only right padding and truncation are supported, got {sides}")
        tokens = {key: _token_content(key, config.get(key, default)) for key, default in DEFAULT_SPECIAL_TOKENS.items()}

        tokenizer = build_t5_tokenizer(tokenizer_file)
        _add_config_tokens(tokenizer, config.get("added_tokens_decoder") or {})
        unknown = {key: token for key, token in tokens.items() if tokenizer.token_to_id(token) is None}
        if unknown:
            raise ModelFolderError(f"{config_file} names special tokens that are not in the vocabulary: {unknown}")
        tokenizer.post_processor = processors.TemplateProcessing(
            single=["$A", tokens["eos_token"]], pair=["$A", tokens["eos_token"], "$B", tokens["eos_token"]],
            special_tokens=[(tokens["eos_token"], tokenizer.token_to_id(tokens["eos_token"]))],
        )
        model_max_length = config.get("model_max_length")
        # transformers writes int(1e30) when the tokenizer was made without a limit.
        if not isinstance(model_max_length, int) or model_max_length > 1_000_000:
            model_max_length = None
        return cls(tokenizer, tokens["eos_token"], tokens["pad_token"], model_max_length)

    def __call__(self, prompts: str | list[str], max_length: int) -> np.ndarray:
        """Token ids, int64 (N, max_length): tokens cut to max_length - 1, </s>, then padding; warns with
        PromptTruncatedWarning for each prompt cut short."""
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise InvalidInputError(f"max_length must be a positive integer (room for </s>), got {max_length!r}")
        max_length = int(max_length)
        input_ids = np.full((len(_check_prompts(prompts)), max_length), self.pad_token_id, dtype=np.int64)
        for row, tokens in enumerate(self.token_ids(prompts)):
            kept = tokens[: max_length - 1]
            input_ids[row, : len(kept)] = kept
            input_ids[row, len(kept)] = self.eos_token_id
            if len(tokens) > len(kept):
                self._warn_truncated(row, max_length, tokens[len(kept):])
        return input_ids

    def token_ids(self, prompts: str | list[str]) -> list[list[int]]:
        """Each prompt's token ids, without </s>, neither cut nor padded."""
        encodings = self._tokenizer.encode_batch(_check_prompts(prompts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def token_counts(self, prompts: str | list[str]) -> list[int]:
        """Each prompt's untruncated length, </s> included: a prompt is cut when this exceeds max_length."""
        return [len(ids) + 1 for ids in self.token_ids(prompts)]

    @property
    def vocab_size(self) -> int:
        """Ids in use, added tokens (T5's <extra_id_N> sentinels) included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def decode(self, ids) -> str:
        """Text of token ids, special tokens included, as T5TokenizerFast.decode gives it."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _warn_truncated(self, row: int, max_length: int, dropped: list[int]) -> None:
        # diffusers' wording (_get_t5_prompt_embeds), with the prompt's row and the count.
        warnings.warn(
            f"The following part of prompt {row} was truncated because `max_sequence_length` is set to "
            f"{max_length} tokens ({len(dropped)} token{'s' if len(dropped) != 1 else ''} dropped): "
            f"{self.decode(dropped)!r}",
            PromptTruncatedWarning,
            stacklevel=3,
        )


def build_t5_tokenizer(tokenizer_file: Path) -> Tokenizer:
    """tokenizer.json's Unigram pieces and added tokens, in the pipeline transformers 5's T5Tokenizer builds."""
    try:
        text = tokenizer_file.read_text(encoding="utf-8")
        tokenizer = Tokenizer.from_str(text)
        saved = json.loads(text)
    except Exception as error:  # the library raises plain Exception on a malformed file
        raise ModelFolderError(f"cannot read {tokenizer_file}: {error}") from error
    if not isinstance(tokenizer.model, Unigram):
        raise ModelFolderError(
            f"{tokenizer_file}: expected T5's SentencePiece Unigram model, found {type(tokenizer.model).__name__}"
        )
    charsmap = _precompiled_charsmap(saved.get("normalizer"))
    tokenizer.normalizer = normalizers.Precompiled(charsmap) if charsmap is not None else None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
    ])
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    return tokenizer


def _precompiled_charsmap(normalizer: dict | None) -> bytes | None:
    """SentencePiece's normalization table, from a tokenizer.json normalizer (alone or in a Sequence)."""
    if not normalizer:
        return None
    for entry in normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]:
        if entry.get("type") == "Precompiled" and entry.get("precompiled_charsmap"):
            return base64.b64decode(entry["precompiled_charsmap"])
    return None


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise InvalidInputError(f"prompts must be a string or a list of strings, got {_describe(prompts)}")
    return list(prompts)
