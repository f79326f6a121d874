"""CLIP's BPE tokenizer, run by the `tokenizers` library, giving the ids transformers' CLIPTokenizer gives.

A model folder's `tokenizer/` (and SDXL's `tokenizer_2/`) holds tokenizer.json, or vocab.json and
merges.txt, or both, plus tokenizer_config.json (model_max_length, special tokens) and, in folders written
by transformers 4, special_tokens_map.json. `ClipTokenizer.from_folder` reads them; calling the
tokenizer turns prompts into the (N, model_max_length) int64 `input_ids` the text encoder takes:
BOS + tokens + EOS, cut to model_max_length (EOS kept last) and padded with the folder's pad token,
as transformers does with `padding="max_length", truncation=True`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from sdrt.runtime.errors import InvalidInputError, ModelFolderError, UnsupportedConfigError

# CLIPTokenizer's defaults, used where the folder's config does not name a token.
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}

# CLIP's word split, as transformers' CLIPTokenizer gives it to the tokenizers library.
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
END_OF_WORD_SUFFIX = "</w>"


def _special_ids(tokenizer: Tokenizer, **tokens: str) -> dict[str, int]:
    """{"eos_token": id, ...} of the named special tokens; ModelFolderError for one the vocabulary lacks."""
    ids = {}
    for name, token in tokens.items():
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelFolderError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        ids[name] = token_id
    return ids


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder takes; the end was dropped."""


class ClipTokenizer:
    """Prompts -> int64 input_ids of shape (N, model_max_length), identical to transformers' CLIPTokenizer."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        model_max_length: int,
        bos_token: str,
        eos_token: str,
        pad_token: str,
    ):
        if model_max_length < 2:
            raise InvalidInputError(f"model_max_length must be at least 2 (BOS and EOS), got {model_max_length}")
        ids = _special_ids(tokenizer, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
        # The library must neither cut nor pad: __call__ does both, so that it can tell what it dropped.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.model_max_length = int(model_max_length)
        self.bos_token_id = ids["bos_token"]
        self.eos_token_id = ids["eos_token"]
        self.pad_token_id = ids["pad_token"]
        self._expansions: dict[str, str] = {}  # multi-vector textual-inversion tokens -> "tok tok_1 tok_2"

    @classmethod
    def from_folder(cls, path: str | os.PathLike, model_max_length: int | None = None) -> "ClipTokenizer":
        """Load a tokenizer folder: tokenizer.json (as transformers 5 does) or vocab.json + merges.txt, and configs.

        model_max_length overrides the config's value (needed when the config does not give one).
        """
        folder = Path(path)
        if not folder.is_dir():
            raise ModelFolderError(f"tokenizer folder {folder} does not exist")
        config = _read_special_tokens_config(folder)
        config_file = folder / "tokenizer_config.json"
        sides = {key: config[key] for key in ("padding_side", "truncation_side") if config.get(key, "right") != "right"}
        if sides:
            raise UnsupportedConfigError(f"{config_file}: only right padding and truncation are supported, got {sides}")
        if model_max_length is None:
            model_max_length = config.get("model_max_length")
            # transformers writes int(1e30) when the tokenizer was made without a limit.
            if not isinstance(model_max_length, int) or model_max_length > 1_000_000:
                raise ModelFolderError(
                    f"{config_file} gives no usable model_max_length "
                    f"({model_max_length!r}); CLIP takes 77: pass model_max_length=77 or fix the config"
                )
        tokens = {key: _token_content(key, config.get(key, default)) for key, default in DEFAULT_SPECIAL_TOKENS.items()}

        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        tokenizer_file = folder / "tokenizer.json"
        if tokenizer_file.is_file():
            # transformers 5 saves added tokens (textual-inversion words, ...) in tokenizer.json only.
            try:
                tokenizer = Tokenizer.from_file(str(tokenizer_file))
            except Exception as error:  # the library raises plain Exception on a malformed file
                raise ModelFolderError(f"cannot read {tokenizer_file}: {error}") from error
        elif vocab_file.is_file() and merges_file.is_file():
            tokenizer = build_clip_tokenizer(vocab_file, merges_file, tokens["unk_token"])
        else:
            missing = [f.name for f in (vocab_file, merges_file) if not f.is_file()]
            raise ModelFolderError(
                f"tokenizer folder {folder} lacks {' and '.join(missing)} (and has no tokenizer.json to use instead)"
            )
        _add_config_tokens(tokenizer, config.get("added_tokens_decoder") or {})
        unknown = {key: token for key, token in tokens.items() if tokenizer.token_to_id(token) is None}
        if unknown:
            # transformers would give them new ids, past the end of the text encoder's embedding table.
            raise ModelFolderError(f"{config_file} names special tokens that are not in the vocabulary: {unknown}")
        # Like transformers, every named special token (the pad token "!" of SD2/SDXL's tokenizer_2
        # included) becomes an added token: typed in a prompt, it is matched whole and never merged.
        tokenizer.add_special_tokens([_special(token) for token in dict.fromkeys(tokens.values())])
        return cls(tokenizer, model_max_length, tokens["bos_token"], tokens["eos_token"], tokens["pad_token"])

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        """Token ids, int64 (N, model_max_length); warns with PromptTruncatedWarning for each prompt cut short."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError(f"prompts must be a string or a list of strings, got {_describe(prompts)}")
        length = self.model_max_length
        input_ids = np.full((len(prompts), length), self.pad_token_id, dtype=np.int64)
        encodings = self._tokenizer.encode_batch([self._expand(p) for p in prompts], add_special_tokens=False)
        for row, encoding in enumerate(encodings):
            tokens = encoding.ids
            kept = tokens[: length - 2]
            input_ids[row, 0] = self.bos_token_id
            input_ids[row, 1 : len(kept) + 1] = kept
            input_ids[row, len(kept) + 1] = self.eos_token_id
            if len(tokens) > len(kept):
                self._warn_truncated(row, tokens[len(kept) :])
        return input_ids

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, without BOS/EOS, neither cut nor padded (sdrt.runtime.prompts chunks them)."""
        expanded = [self._expand(t) for t in texts]
        return [encoding.ids for encoding in self._tokenizer.encode_batch(expanded, add_special_tokens=False)]

    @property
    def vocab_size(self) -> int:
        """Ids in use, added tokens included (the next added token gets this id)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def knows(self, token: str) -> bool:
        return self._tokenizer.token_to_id(token) is not None

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """New words (textual-inversion tokens), matched whole in prompts, with the next ids, as transformers'
        add_tokens; a word the vocabulary has already is refused. Several tokens `t, t_1, ..., t_n` are one
        multi-vector embedding: `t` in a prompt then stands for all of them (diffusers' maybe_convert_prompt)."""
        taken = [t for t in tokens if self.knows(t)]
        if taken:
            raise InvalidInputError(f"token {taken[0]!r} is in the tokenizer's vocabulary already; give another "
                                    "token name (token=...)")
        self._tokenizer.add_tokens([AddedToken(t, normalized=True, special=False) for t in tokens])
        if len(tokens) > 1:
            self._expansions[tokens[0]] = " ".join(tokens)
        return [self._tokenizer.token_to_id(t) for t in tokens]

    def _expand(self, text: str) -> str:
        for token, replacement in self._expansions.items():
            text = text.replace(token, replacement)
        return text

    @property
    def comma_token_id(self) -> int | None:
        """The id of "," as a word of its own (A1111 breaks long prompts after it), None if the vocabulary lacks it."""
        return self._tokenizer.token_to_id(",</w>")

    def decode(self, ids) -> str:
        """Text of token ids (special tokens included), words joined by spaces as CLIPTokenizer.decode does."""
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
        return text.replace(END_OF_WORD_SUFFIX, " ").strip()

    def _warn_truncated(self, row: int, dropped: list[int]) -> None:
        warnings.warn(
            f"The following part of prompt {row} was truncated because CLIP can only handle sequences up to "
            f"{self.model_max_length} tokens ({len(dropped)} token{'s' if len(dropped) != 1 else ''} dropped): "
            f"{self.decode(dropped)!r}",
            PromptTruncatedWarning,
            stacklevel=3,
        )


def build_clip_tokenizer(vocab_file: str | os.PathLike, merges_file: str | os.PathLike, unk_token: str) -> Tokenizer:
    """The tokenizers pipeline of transformers' CLIPTokenizer, from vocab.json and merges.txt."""
    try:
        model = BPE.from_file(
            str(vocab_file),
            str(merges_file),
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD_SUFFIX,
            fuse_unk=False,
            unk_token=unk_token,
        )
    except Exception as error:  # the library raises plain Exception on malformed files
        raise ModelFolderError(f"cannot read {vocab_file} / {merges_file}: {error}") from error
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _read_special_tokens_config(folder: Path) -> dict:
    """tokenizer_config.json, with special_tokens_map.json over it where transformers reads that file.

    transformers (4 and 5) reads special_tokens_map.json only when tokenizer_config.json has no
    added_tokens_decoder, and then lets its values win.
    """
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        raise ModelFolderError(f"tokenizer folder {folder} lacks tokenizer_config.json")
    config = _read_json(config_file)
    special_tokens_file = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and special_tokens_file.is_file():
        config.update(_read_json(special_tokens_file))
    return config


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"cannot read {path}: {error}") from error
    if not isinstance(value, dict):
        raise ModelFolderError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _token_content(name: str, value) -> str:
    """A token as configs write it: a string, or a serialized AddedToken {"content": ...}."""
    content = value.get("content") if isinstance(value, dict) else value
    if not isinstance(content, str):
        raise ModelFolderError(f"the tokenizer config gives {name} as {value!r}; it must be a token string")
    return content


def _special(content: str) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def _add_config_tokens(tokenizer: Tokenizer, added_tokens_decoder: dict) -> None:
    """Add tokenizer_config.json's added tokens (textual-inversion words, ...) at their saved ids."""
    for token_id, token in sorted(added_tokens_decoder.items(), key=lambda item: int(item[0])):
        content = _token_content(f"added token {token_id}", token)
        known_id = tokenizer.token_to_id(content)
        if known_id is not None and known_id != int(token_id):
            raise ModelFolderError(
                f"added token {content!r} has id {token_id} in tokenizer_config.json but {known_id} in the vocabulary"
            )
        if known_id is None and int(token_id) != tokenizer.get_vocab_size(with_added_tokens=True):
            raise ModelFolderError(
                f"added token {content!r} has id {token_id}, but the next free id is "
                f"{tokenizer.get_vocab_size(with_added_tokens=True)}"
            )
        fields = token if isinstance(token, dict) else {"content": content}
        special = bool(fields.get("special", False))
        added = AddedToken(
            content,
            single_word=bool(fields.get("single_word", False)),
            lstrip=bool(fields.get("lstrip", False)),
            rstrip=bool(fields.get("rstrip", False)),
            normalized=bool(fields.get("normalized", not special)),
            special=special,
        )
        if special:
            tokenizer.add_special_tokens([added])
        else:
            tokenizer.add_tokens([added])


def _describe(value) -> str:
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(item).__name__ for item in value})
        return f"a {type(value).__name__} of {', '.join(kinds) or 'nothing'}"
    return type(value).__name__
