"""Textual-inversion embeddings against diffusers' load_textual_inversion: single and multi-vector, A1111's
emb_params and diffusers' {token: vectors} files, SDXL's clip_l + clip_g; with and without A1111 emphasis; files
that do not fit."""

from __future__ import annotations

import copy

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from sdrt.export import fixtures_lora as fl  # noqa: E402
from sdrt.runtime.errors import InvalidInputError  # noqa: E402
from sdrt.runtime.lora import LoraFileError  # noqa: E402
from sdrt.runtime.pipeline import StableDiffusionPipeline  # noqa: E402

KW = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np")
SEED = 3
PROMPT = "a photo of <cat-toy> on a table, in mystyle"


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("embeddings")
    rng = np.random.default_rng(0)
    dim = diffusers.StableDiffusionPipeline.from_pretrained(checkpoints["sd1"]).text_encoder.config.hidden_size
    vectors = rng.standard_normal((3, dim)).astype(np.float32)
    return {
        "multi": fl.save(root / "mystyle.safetensors", {"emb_params": vectors}),  # A1111: the token is the stem
        "single": fl.save(root / "learned_embeds.safetensors", {"<cat-toy>": vectors[1:2] * 2}),  # diffusers
    }


@pytest.fixture(scope="module")
def reference(checkpoints, embeddings):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(checkpoints["sd1"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(embeddings["multi"]), token="mystyle")
    pipe.load_textual_inversion(str(embeddings["single"]))
    return pipe


@pytest.mark.parametrize("prompt", [PROMPT, "mystyle mystyle, <cat-toy>", "a plain prompt"])
def test_embeddings_match_diffusers(reference, exported, embeddings, prompt):
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"], emphasis="none")
    assert pipe.load_textual_inversion(embeddings["multi"]) == ["mystyle", "mystyle_1", "mystyle_2"]
    assert pipe.load_textual_inversion(embeddings["single"]) == ["<cat-toy>"]
    want = reference(prompt, generator=torch.Generator("cpu").manual_seed(SEED), **KW).images
    assert np.abs(pipe(prompt, seed=SEED, **KW).images - want).max() < 2e-3


def test_embeddings_with_a1111_emphasis_and_a_lora(reference, exported, embeddings, tmp_path):
    """Tokens inside weighted text, and a text-encoder LoRA on top: against diffusers given the same embeddings."""
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"])
    pipe.load_textual_inversion(embeddings["multi"])
    pipe.load_textual_inversion(embeddings["single"])
    ref = copy.deepcopy(reference)
    text_lora = fl.random_lora(ref.text_encoder, fl.module_names(ref.text_encoder, fl.TEXT_LINEAR), rank=2, seed=9)
    path = fl.save(tmp_path / "te.safetensors", fl.kohya_state_dict(text_lora, "lora_te_", text_model=True))
    fl.merge(ref.text_encoder, text_lora, 0.5)
    want = ref(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), **KW).images
    got = pipe(PROMPT, seed=SEED, loras={str(path): 0.5}, **KW).images  # no weights in PROMPT: same embeddings
    assert np.abs(got - want).max() < 2e-3
    weighted = pipe("a photo of (<cat-toy>:1.3) on a table, in [mystyle]", seed=SEED, loras={str(path): 0.5}, **KW)
    assert np.abs(weighted.images - got).max() > 1e-3  # the weights reach the embedding's tokens


def test_sdxl_clip_l_and_clip_g(tiny, tmp_path):
    from sdrt.runtime.sdxl import StableDiffusionXLPipeline

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny.checkpoint("xl-base"))
    ref.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(1)
    vectors = {"clip_l": rng.standard_normal((2, ref.text_encoder.config.hidden_size)).astype(np.float32),
               "clip_g": rng.standard_normal((2, ref.text_encoder_2.config.hidden_size)).astype(np.float32)}
    path = fl.save(tmp_path / "xlstyle.safetensors", vectors)
    ref.load_textual_inversion(torch.from_numpy(vectors["clip_l"]), token="xlstyle", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(torch.from_numpy(vectors["clip_g"]), token="xlstyle",
                               text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    prompt = "a xlstyle house"
    want = ref(prompt, generator=torch.Generator("cpu").manual_seed(SEED), **KW).images
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny["xl-base"], emphasis="none")
    assert pipe.load_textual_inversion(path) == ["xlstyle", "xlstyle_1"]
    assert np.abs(pipe(prompt, seed=SEED, **KW).images - want).max() < 2e-3


def test_embeddings_that_do_not_fit(exported, embeddings, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(exported["sd1"])
    wide = fl.save(tmp_path / "wide.safetensors", {"emb_params": np.zeros((1, 1024), np.float32)})
    with pytest.raises(LoraFileError, match="1024 dimensions"):
        pipe.load_textual_inversion(wide)
    with pytest.raises(LoraFileError, match="clip_g"):
        pipe.load_textual_inversion(fl.save(tmp_path / "xl.safetensors", {
            "clip_l": np.zeros((1, 32), np.float32), "clip_g": np.zeros((1, 64), np.float32)}))
    (tmp_path / "a1111.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(LoraFileError, match="pickle"):
        pipe.load_textual_inversion(tmp_path / "a1111.pt")
    with pytest.raises(LoraFileError, match="not a textual-inversion embedding"):
        pipe.load_textual_inversion(fl.save(tmp_path / "two.safetensors", {"a": np.zeros((1, 32), np.float32),
                                                                          "b": np.zeros((1, 32), np.float32)}))
    pipe.load_textual_inversion(embeddings["single"])
    with pytest.raises(InvalidInputError, match="vocabulary already"):
        pipe.load_textual_inversion(embeddings["single"])
    with pytest.raises(InvalidInputError, match="one word"):
        pipe.load_textual_inversion(embeddings["multi"], token="two words")
