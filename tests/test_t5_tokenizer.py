"""T5Tokenizer (SD3/Flux's T5 tokenizer) against transformers' T5TokenizerFast on the tiny trained fixture
(export/fixtures_t5.py), and the export's copy of T5 tokenizer folders (export/t5_assets.py)."""

import hashlib
import importlib.util
import shutil
import time
import warnings

import numpy as np
import pytest

from sdrt.export.errors import ExportError
from sdrt.export.fixtures_t5 import EXTRA_IDS, save_tiny_t5_tokenizer
from sdrt.export.t5_assets import copy_t5_tokenizer
from sdrt.runtime.errors import InvalidInputError, ModelFolderError
from sdrt.runtime.tokenizer import PromptTruncatedWarning
from sdrt.runtime.tokenizer_t5 import T5Tokenizer

from conftest import run_without_torch

transformers = pytest.importorskip("transformers")

PAD, EOS = 0, 1

PROMPTS = [
    "",
    " ",
    "a photo of an astronaut riding a horse on mars",
    "A painting of a fox sitting in a field at sunrise, oil on canvas, highly detailed",
    "café naïve résumé Ångström crème brûlée",
    "cafe\u0301 (decomposed accent)",
    "東京の夜景, 漢字とひらがな",
    "🐱🔥 emoji 👍🏽 👨‍👩‍👧 flags 🇫🇷",
    "!!! ??? ... ,,, ;;; --- *** (((masterpiece))) [[best]] {{quality}}",
    "1234567 3.14 1,000,000 2nd 10x 1024x1024 $19.99 €5",
    "don't it's we're they've I'm you'll he'd DON'T IT'S",
    "curly apostrophe don’t it’s «guillemets» „quotes“",
    "multi   spaces\t\ttabs\n\nnewlines\r\n \u00a0nbsp\u3000ideographic",
    "   leading and trailing   ",
    "\n\nnewline first and last\n",
    "UPPERCASE WORDS MiXeD CaSe",
    "<extra_id_3> a sentinel typed in <extra_id_0>",
    "<extra_id_3>glued<extra_id_99>",
    "text with </s> and <pad> and <unk> typed in",
    "<EXTRA_ID_3> not a sentinel",
    "email someone@example.com, url https://example.org/path?q=1&x=2",
    "hash #tag @user ^caret ~tilde _under_score_ +plus =equals *star |pipe \\back/slash",
    "(masterpiece:1.2), [blurry], {beautiful}, ((intricate details))",
    "Ich möchte ein Stück Kuchen. Straße, Fuß, Mädchen",
    "¿Dónde está la biblioteca? ¡Qué bonito día!",
    "zzzzqqqq xylophone quizzical jukebox",
    "temperature 21°C, speed 60 km/h, ratio 16:9",
    "a" * 300,
    "word " * 300,
    " ".join(f"token{i}" for i in range(200)),
    "The quick brown fox jumps over the lazy dog. " * 40,
    "x",
    ".",
    "▁ metaspace character typed ▁▁ in",
    "tab\tseparated\tvalues",
    "zero\u200bwidth\u200bspace and soft\u00adhyphen",
    "Ω≈ç√∫˜µ≤≥÷ math symbols ∑∏∆",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ １２３",
    "a very long prompt about a castle on a hill, " * 30,
    "end with punctuation!",
]
MAX_LENGTHS = (256, 512, 77, 8)


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    return save_tiny_t5_tokenizer(tmp_path_factory.mktemp("t5") / "tokenizer")


@pytest.fixture(scope="module")
def reference(t5_folder):
    return transformers.T5TokenizerFast.from_pretrained(str(t5_folder))


@pytest.fixture(scope="module")
def t5(t5_folder):
    return T5Tokenizer.from_folder(t5_folder)


def _reference_ids(reference, prompts, max_length):
    encoded = reference(prompts, padding="max_length", max_length=max_length, truncation=True,
                        add_special_tokens=True)
    return np.array(encoded.input_ids, dtype=np.int64)


def test_fixture_is_t5_shaped_deterministic_and_fast(tmp_path, t5_folder, reference):
    start = time.perf_counter()
    again = save_tiny_t5_tokenizer(tmp_path / "again")
    assert time.perf_counter() - start < 3
    for name in ("tokenizer.json", "tokenizer_config.json"):
        digests = {hashlib.sha256((folder / name).read_bytes()).hexdigest() for folder in (t5_folder, again)}
        assert len(digests) == 1, name
    assert reference.convert_tokens_to_ids(["<pad>", "</s>", "<unk>"]) == [0, 1, 2]
    size = len(reference)
    assert reference.convert_tokens_to_ids("<extra_id_0>") == size - 1
    assert reference.convert_tokens_to_ids(f"<extra_id_{EXTRA_IDS - 1}>") == size - EXTRA_IDS
    assert reference.pad_token_id == PAD and reference.eos_token_id == EOS and reference.unk_token_id == 2
    assert reference("a photo").input_ids[-1] == EOS
    assert reference.model_max_length == 512


@pytest.mark.parametrize("max_length", MAX_LENGTHS)
def test_ids_equal_transformers(t5, reference, max_length):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ours = t5(PROMPTS, max_length)
    assert ours.dtype == np.int64 and ours.shape == (len(PROMPTS), max_length)
    np.testing.assert_array_equal(ours, _reference_ids(reference, PROMPTS, max_length))


def test_each_prompt_alone_and_counts(t5, reference):
    for prompt in PROMPTS:
        untruncated = reference(prompt).input_ids
        assert t5.token_counts([prompt]) == [len(untruncated)], prompt
        assert t5.token_ids(prompt) == [untruncated[:-1]], prompt
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)
            np.testing.assert_array_equal(t5(prompt, 77), _reference_ids(reference, [prompt], 77))


def test_truncation_keeps_eos_and_warns(t5):
    prompts = ["word " * 300, "a short one"]
    with pytest.warns(PromptTruncatedWarning, match="prompt 0 was truncated .* 256 tokens") as caught:
        ids = t5(prompts, 256)
    assert len(caught) == 1
    assert ids[0, -1] == EOS and PAD not in ids[0]
    assert ids[1, t5.token_counts(prompts)[1] - 1] == EOS and (ids[1, t5.token_counts(prompts)[1]:] == PAD).all()
    assert t5.token_counts(prompts)[0] > 256
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t5(["a short one"], 256)


def test_empty_prompt_is_eos_then_padding(t5):
    ids = t5([""], 8)
    assert ids.tolist() == [[EOS] + [PAD] * 7]
    assert t5([], 8).shape == (0, 8)


def test_bad_input_refused(t5):
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(InvalidInputError, match="max_length"):
            t5(["a"], bad)
    with pytest.raises(InvalidInputError, match="list of strings"):
        t5([1, 2], 8)


def test_folder_without_tokenizer_json_refused(tmp_path, t5_folder):
    folder = tmp_path / "spiece_only"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(b"\x00")
    shutil.copy(t5_folder / "tokenizer_config.json", folder)
    with pytest.raises(ModelFolderError, match="lacks tokenizer.json.*spiece.model.*sdrt export"):
        T5Tokenizer.from_folder(folder)
    with pytest.raises(ModelFolderError, match="does not exist"):
        T5Tokenizer.from_folder(tmp_path / "nowhere")


def test_non_unigram_tokenizer_refused(tmp_path):
    from sdrt.export.fixtures import CLIP_ASSETS
    from sdrt.runtime.tokenizer import build_clip_tokenizer

    folder = tmp_path / "clip"
    folder.mkdir()
    build_clip_tokenizer(CLIP_ASSETS / "vocab.json", CLIP_ASSETS / "merges.txt", "<|endoftext|>").save(
        str(folder / "tokenizer.json"))
    with pytest.raises(ModelFolderError, match="Unigram"):
        T5Tokenizer.from_folder(folder)


def test_copy_keeps_tokenizer_json(tmp_path, t5_folder, reference):
    dst = copy_t5_tokenizer(t5_folder, tmp_path / "export" / "tokenizer_3")
    assert (dst / "tokenizer.json").read_bytes() == (t5_folder / "tokenizer.json").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        np.testing.assert_array_equal(T5Tokenizer.from_folder(dst)(PROMPTS, 256),
                                      _reference_ids(reference, PROMPTS, 256))


def test_copy_of_spiece_only_folder_names_sentencepiece(tmp_path, t5_folder):
    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed: transformers can convert spiece.model, the refusal is unreachable")
    src = tmp_path / "spiece_only"
    src.mkdir()
    (src / "spiece.model").write_bytes(b"\x00")
    shutil.copy(t5_folder / "tokenizer_config.json", src)
    with pytest.raises(ExportError, match="pip install sentencepiece protobuf"):
        copy_t5_tokenizer(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="neither tokenizer.json nor spiece.model"):
        copy_t5_tokenizer(tmp_path / "empty", tmp_path / "out")


def test_runtime_tokenizer_needs_no_transformers(t5_folder):
    result = run_without_torch("""
import sys
from sdrt.runtime.tokenizer_t5 import T5Tokenizer
ids = T5Tokenizer.from_folder(sys.argv[1])(["a photo of a cat"], 16)
assert ids.shape == (1, 16) and "transformers" not in sys.modules
print("ok")
""", str(t5_folder))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
