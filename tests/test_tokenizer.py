"""ClipTokenizer against transformers' CLIPTokenizer built from the same vocab.json and merges.txt."""

import json
import random
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sdrt.runtime.errors import InvalidInputError, ModelFolderError, UnsupportedConfigError
from sdrt.runtime.tokenizer import ClipTokenizer, PromptTruncatedWarning

transformers = pytest.importorskip("transformers")

CLIP_FILES = Path(__file__).resolve().parents[1] / "export" / "assets" / "clip"
BOS, EOS = 49406, 49407

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "café naïve résumé Ångström crème brûlée",
    "cafe\u0301 (decomposed accent)",
    "東京の夜景, 漢字とひらがな",
    "🐱🔥 emoji 👍🏽 👨‍👩‍👧 flags 🇫🇷",
    "!!! ??? ... ,,, ;;; --- *** (((masterpiece))) [[best]] {{quality}}",
    "1234567 3.14 1,000,000 2nd 10x",
    "don't it's we're they've I'm you'll he'd DON'T IT'S",
    "curly apostrophe don’t it’s",
    "multi   spaces\t\ttabs\n\nnewlines\r\n \u00a0nbsp\u3000ideographic",
    "   leading and trailing   ",
    "UPPERCASE Words MiXeD",
    "",
    " ",
    "a <|endoftext|> b <|startoftext|> c <|ENDOFTEXT|>",
    "hello! wow!! ok!!! !",
    "html &amp; entities &lt;3",
    " ".join(["word"] * 200),
    " ".join(f"token{i}" for i in range(60)),
]


def clip_reference(**kwargs):
    """transformers' CLIPTokenizer over the bundled CLIP vocabulary."""
    vocab, merges = str(CLIP_FILES / "vocab.json"), str(CLIP_FILES / "merges.txt")
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)


def save_reference(folder: Path, **kwargs) -> Path:
    """A tokenizer folder as transformers 5 writes it, plus the vocab files our exporter keeps beside it."""
    clip_reference(model_max_length=77, **kwargs).save_pretrained(folder)
    shutil.copy(CLIP_FILES / "vocab.json", folder)
    shutil.copy(CLIP_FILES / "merges.txt", folder)
    return folder


def reference_ids(folder_or_tokenizer, prompts) -> np.ndarray:
    reference = folder_or_tokenizer
    if isinstance(reference, Path):
        reference = transformers.CLIPTokenizer.from_pretrained(reference)
    encoded = reference(prompts, padding="max_length", truncation=True, max_length=reference.model_max_length)
    return np.array(encoded.input_ids, dtype=np.int64)


def only(folder: Path, names: set[str], into: Path) -> Path:
    """A copy of folder holding only the named files."""
    into.mkdir()
    for name in names:
        shutil.copy(folder / name, into)
    return into


def fuzz_prompts(count: int, seed: int = 0) -> list[str]:
    pieces = list("abcXYZ019 '’!?.,;:-_()[]{}<>|/\\\"#@&*+=~\t\n") + [
        "é", "e\u0301", "ß", "İ", "ǅ", "東", "京", "ー", "한", "ا", "щ", "Ω", "😀", "👍🏽", "‍", "\u00a0",
        "\u3000", "'s", "'ll", "<|endoftext|>", "<|startoftext|>", "photo", "  ", "１２", "½", "²",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["sd1-pad-eos", "sd2-pad-bang"])
def saved(request, tmp_path_factory):
    """A saved tokenizer folder for a pad token, transformers' tokenizer loaded from it, and its ids for
    PROMPTS and fuzz prompts."""
    folder = save_reference(tmp_path_factory.mktemp("tokenizer") / "full", pad_token=request.param)
    reference = transformers.CLIPTokenizer.from_pretrained(folder)
    prompts = PROMPTS + fuzz_prompts(300)
    return SimpleNamespace(folder=folder, reference=reference, prompts=prompts, ids=reference_ids(reference, prompts))


@pytest.mark.parametrize("files", ["all", "tokenizer_json", "vocab_merges"])
def test_ids_match_transformers(saved, files, tmp_path):
    folder, prompts, expected = saved.folder, saved.prompts, saved.ids
    if files == "tokenizer_json":
        folder = only(folder, {"tokenizer.json", "tokenizer_config.json"}, tmp_path / "json")
    elif files == "vocab_merges":
        folder = only(folder, {"vocab.json", "merges.txt", "tokenizer_config.json"}, tmp_path / "files")
    tokenizer = ClipTokenizer.from_folder(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ids = tokenizer(prompts)
    assert ids.dtype == np.int64 and ids.shape == (len(prompts), 77)
    mismatched = [prompts[i] for i in np.flatnonzero((ids != expected).any(axis=1))]
    assert not mismatched
    assert tokenizer.model_max_length == 77


def test_pad_token_read_from_config(saved):
    tokenizer = ClipTokenizer.from_folder(saved.folder)
    expected_pad = saved.reference.pad_token_id
    assert tokenizer.pad_token_id == expected_pad
    ids = tokenizer("a cat")
    assert ids[0, :4].tolist() == [BOS, 320, 2368, EOS]
    assert (ids[0, 4:] == expected_pad).all()


def test_single_prompt_and_batch_of_mixed_lengths(saved):
    tokenizer = ClipTokenizer.from_folder(saved.folder)
    batch = ["", "a cat", " ".join(["dog"] * 75), " ".join(["dog"] * 90)]
    with pytest.warns(PromptTruncatedWarning):
        ids = tokenizer(batch)
    np.testing.assert_array_equal(ids, reference_ids(saved.reference, batch))
    np.testing.assert_array_equal(tokenizer("a cat"), ids[1:2])
    assert ids[2, -1] == EOS and ids[3, -1] == EOS
    assert tokenizer([]).shape == (0, 77)


def test_bang_typed_in_prompt_is_the_pad_token_when_pad_is_bang(tmp_path):
    """transformers makes every named special token an added token: with pad "!" (SD2, SDXL's
    tokenizer_2) a "!" in the prompt becomes id 0 instead of BPE's "!</w>" (256) or "!!!</w>"."""
    sd1 = ClipTokenizer.from_folder(save_reference(tmp_path / "sd1"))
    sd2 = ClipTokenizer.from_folder(save_reference(tmp_path / "sd2", pad_token="!"))
    assert sd1("hi!")[0, :4].tolist() == [BOS, 1883, 256, EOS]
    assert sd2("hi!")[0, :4].tolist() == [BOS, 1883, 0, EOS]


def test_transformers4_layout_with_special_tokens_map(tmp_path):
    """Hub folders of SD 1.x/2.x: no tokenizer.json, AddedToken dicts, pad token in special_tokens_map.json."""
    folder = tmp_path / "legacy"
    folder.mkdir()
    shutil.copy(CLIP_FILES / "vocab.json", folder)
    shutil.copy(CLIP_FILES / "merges.txt", folder)
    added = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    config = {
        "bos_token": {**added, "content": "<|startoftext|>"},
        "eos_token": {**added, "content": "<|endoftext|>"},
        "unk_token": {**added, "content": "<|endoftext|>"},
        "pad_token": "<|endoftext|>",
        "model_max_length": 77,
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "!"}))
    tokenizer = ClipTokenizer.from_folder(folder)
    assert tokenizer.pad_token_id == 0
    prompts = PROMPTS[:8] + ["hi!"]
    np.testing.assert_array_equal(tokenizer(prompts), reference_ids(folder, prompts))


def test_added_tokens_are_kept(tmp_path):
    """A textual-inversion word added to the tokenizer: in tokenizer.json (transformers 5) or in
    tokenizer_config.json's added_tokens_decoder (transformers 4)."""
    reference = clip_reference(model_max_length=77)
    reference.add_tokens(["<cat-toy>"])
    reference.save_pretrained(tmp_path / "v5")
    prompts = ["a <cat-toy> photo", "A <CAT-TOY>", "<cat-toy>s"]
    expected = reference_ids(tmp_path / "v5", prompts)
    assert (expected == 49408).any()
    np.testing.assert_array_equal(ClipTokenizer.from_folder(tmp_path / "v5")(prompts), expected)

    v4 = only(tmp_path / "v5", {"tokenizer_config.json"}, tmp_path / "v4")
    shutil.copy(CLIP_FILES / "vocab.json", v4)
    shutil.copy(CLIP_FILES / "merges.txt", v4)
    config = json.loads((v4 / "tokenizer_config.json").read_text())
    entry = {"lstrip": False, "rstrip": False, "single_word": False}
    config["added_tokens_decoder"] = {
        "49406": {**entry, "content": "<|startoftext|>", "normalized": False, "special": True},
        "49407": {**entry, "content": "<|endoftext|>", "normalized": False, "special": True},
        "49408": {**entry, "content": "<cat-toy>", "normalized": True, "special": False},
    }
    (v4 / "tokenizer_config.json").write_text(json.dumps(config))
    np.testing.assert_array_equal(ClipTokenizer.from_folder(v4)(prompts), expected)


def test_truncation_warns_with_dropped_count_and_text(saved):
    tokenizer = ClipTokenizer.from_folder(saved.folder)
    words = "a photo of a cat".split() * 20  # one token per word: 100 tokens, 75 fit
    prompt = " ".join(words)
    with pytest.warns(PromptTruncatedWarning) as record:
        ids = tokenizer(["short", prompt])
    assert len(record) == 1
    message = str(record[0].message)
    dropped_text = " ".join(words[75:])
    assert "prompt 1" in message and "up to 77 tokens" in message and "(25 tokens dropped)" in message
    assert message.endswith(repr(dropped_text))
    assert record[0].filename == __file__

    # The dropped text is what diffusers' pipelines report: decode(untruncated[:, 76:-1]).
    untruncated = saved.reference(prompt).input_ids
    assert saved.reference.decode(untruncated[76:-1]) == dropped_text
    assert ids[1, -1] == EOS and ids[1, 1:76].tolist() == untruncated[1:76]


def test_no_warning_when_prompt_just_fits(saved):
    tokenizer = ClipTokenizer.from_folder(saved.folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenizer(" ".join(["cat"] * 75))
    assert ids[0, -1] == EOS
    with pytest.warns(PromptTruncatedWarning, match=r"\(1 token dropped\): 'cat'$"):
        tokenizer(" ".join(["cat"] * 76))


@pytest.mark.parametrize(
    "remove, message",
    [
        ({"tokenizer_config.json"}, "tokenizer_config.json"),
        ({"tokenizer.json", "merges.txt"}, "lacks merges.txt"),
        ({"tokenizer.json", "vocab.json"}, "lacks vocab.json"),
        ({"tokenizer.json", "vocab.json", "merges.txt"}, "lacks vocab.json and merges.txt"),
    ],
)
def test_missing_files_are_named(saved, remove, message, tmp_path):
    kept = {p.name for p in saved.folder.iterdir()} - remove
    with pytest.raises(ModelFolderError, match=message):
        ClipTokenizer.from_folder(only(saved.folder, kept, tmp_path / "partial"))


def test_folder_errors(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        ClipTokenizer.from_folder(tmp_path / "nowhere")

    folder = tmp_path / "tok"
    clip_reference().save_pretrained(folder)
    with pytest.raises(ModelFolderError, match="model_max_length"):
        ClipTokenizer.from_folder(folder)  # transformers wrote model_max_length=1e30
    assert ClipTokenizer.from_folder(folder, model_max_length=77)("a").shape == (1, 77)

    config = {**json.loads((folder / "tokenizer_config.json").read_text()), "model_max_length": 77}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<pad>"}))
    with pytest.raises(ModelFolderError, match="not in the vocabulary.*<pad>"):
        ClipTokenizer.from_folder(folder)

    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    with pytest.raises(UnsupportedConfigError, match="padding_side"):
        ClipTokenizer.from_folder(folder)

    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="cannot read"):
        ClipTokenizer.from_folder(folder)


@pytest.mark.parametrize("prompts", [None, 3, ["a", None], [b"bytes"]])
def test_invalid_prompts(saved, prompts):
    tokenizer = ClipTokenizer.from_folder(saved.folder)
    with pytest.raises(InvalidInputError, match="string or a list of strings"):
        tokenizer(prompts)
