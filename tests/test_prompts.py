"""A1111 prompt syntax and long prompts (sdrt.runtime.prompts): the parser's weights, the chunking, and whole
images against diffusers given the embeddings that a reference written here from A1111's description makes
(transformers' tokenizer, the torch text encoder, torch emphasis)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.runtime.cli import main  # noqa: E402
from sdrt.runtime.errors import InvalidInputError  # noqa: E402
from sdrt.runtime.pipeline import StableDiffusionPipeline  # noqa: E402
from sdrt.runtime.prompts import BREAK, chunks, parse  # noqa: E402
from sdrt.runtime.sdxl import StableDiffusionXLPipeline  # noqa: E402
from sdrt.runtime.tokenizer import ClipTokenizer  # noqa: E402

R, S = 1.1, 1 / 1.1

# (prompt, [(fragment, weight)...]) from A1111's documentation and its parser's docstring, and derived from its rules.
PARSER_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * R * R), (" ", R), ("on", 1.0), (" a ", R), ("hill", 0.55), (", sun, ", R),
      ("sky", R ** 4), (".", R)]),  # the first "(" never closes: everything after it x1.1
    ("((word))", [("word", R * R)]),
    ("(((word)))", [("word", R ** 3)]),
    ("[word]", [("word", S)]),
    ("[[word]]", [("word", S * S)]),
    ("(word:1.5)", [("word", 1.5)]),
    ("(word:0.25)", [("word", 0.25)]),
    ("(word: 1.5 )", [("word", 1.5)]),
    ("(word:-1)", [("word", -1.0)]),
    ("(a (b:2) c)", [("a ", R), ("b", 2 * R), (" c", R)]),
    ("[a (b) c]", [("a ", S), ("b", S * R), (" c", S)]),
    ("a) b", [("a) b", 1.0)]),
    ("a] b", [("a] b", 1.0)]),
    ("[unclosed square", [("unclosed square", S)]),
    ("((two unclosed", [("two unclosed", R * R)]),
    ("\\\\backslash", [("\\backslash", 1.0)]),
    ("a \\ b", [("a  b", 1.0)]),  # a lone backslash escapes nothing and vanishes, as in A1111
    ("time: 12", [("time: 12", 1.0)]),
    ("(colon: in text)", [("colon: in text", R)]),
    ("a BREAK b", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("(red BREAK blue:1.2)", [("red", 1.2), (BREAK, -1.0), ("blue", 1.2)]),
    ("BREAKFAST and BREAK", [("BREAKFAST and", 1.0), (BREAK, -1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("", [("", 1.0)]),
    ("((a:1.5) (b))", [("a", 1.5 * R), (" ", R), ("b", R * R)]),
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
]


@pytest.mark.parametrize("prompt,expected", PARSER_CASES, ids=[repr(p)[:40] for p, _ in PARSER_CASES])
def test_parser_weights(prompt, expected):
    got = parse(prompt)
    assert [f for f, _ in got] == [f for f, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12)


@pytest.mark.parametrize("prompt", ["a [cat:dog:0.5] b", "[cat:dog:10]", "[cat|dog]", "a [to:0.3] b"])
def test_prompt_editing_is_refused_by_name(prompt):
    with pytest.raises(InvalidInputError, match="prompt editing|alternation"):
        parse(prompt)


def test_escaped_editing_is_text():
    assert parse("\\[cat:dog\\]") == [("[cat:dog]", 1.0)]


# -- chunks ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(exported):
    return {name: ClipTokenizer.from_folder(exported[name] / "tokenizer") for name in ("sd1", "sd2")}


def words(n: int) -> str:
    """n single-token words (no commas)."""
    return " ".join(["cat", "dog", "red", "blue", "house"][k % 5] for k in range(n))


@pytest.mark.parametrize("n,lengths", [(75, [75]), (76, [75, 1]), (150, [75, 75]), (300, [75] * 4), (301, [75] * 4 + [1])])
def test_long_prompts_are_chunks_of_75(tokenizers, n, lengths):
    tok = tokenizers["sd1"]
    got = chunks(tok, words(n))
    assert [sum(1 for w in c.weights[1:-1]) - c.ids[1:-1].count(tok.eos_token_id) for c in got] == lengths
    for c in got:
        assert len(c.ids) == 77 and c.ids[0] == tok.bos_token_id and c.ids[-1] in (tok.eos_token_id, tok.pad_token_id)
    assert tok.token_ids([words(n)])[0] == [i for c in got for i in c.ids[1:1 + 75] if i != tok.eos_token_id]


def test_a_full_chunk_breaks_after_its_last_comma(tokenizers):
    tok = tokenizers["sd1"]
    prompt = words(70) + ", " + words(10)  # the comma is token 71: within the last 20 of the chunk
    got = chunks(tok, prompt)
    assert len(got) == 2
    assert got[0].ids[71] == tok.comma_token_id and got[0].ids[72] == tok.eos_token_id  # BOS + 70 words + ","
    far = chunks(tok, words(40) + ", " + words(50))  # comma at 41: more than 20 back, no relocation
    assert far[0].ids[75] != tok.eos_token_id


def test_break_starts_a_new_chunk_and_sd2_pads_after_the_first_eos(tokenizers):
    for name, tok in tokenizers.items():
        got = chunks(tok, "a red cat BREAK a blue dog")
        assert len(got) == 2
        first = got[0].ids
        assert first[:5] == (tok.bos_token_id, *tok.token_ids(["a red cat"])[0], tok.eos_token_id)
        assert set(first[5:]) == {tok.pad_token_id}
    assert tokenizers["sd2"].pad_token_id != tokenizers["sd2"].eos_token_id


def test_weights_follow_the_tokens(tokenizers):
    tok = tokenizers["sd1"]
    chunk = chunks(tok, "a (red:1.5) [cat]")[0]
    assert chunk.weights[:5] == (1.0, 1.0, 1.5, S, 1.0)


# -- images against diffusers, given reference embeddings -----------------------------------------------------------


def reference_fragments(prompt: str):
    """The reference's own reading of the test prompts (hand-written from A1111's rules)."""
    return REFERENCE[prompt]


REFERENCE = {
    "a (red:1.5) circle on a [blue] background": [("a ", 1.0), ("red", 1.5), (" circle on a ", 1.0), ("blue", S),
                                                   (" background", 1.0)],
    "blurry, (ugly:1.3)": [("blurry, ", 1.0), ("ugly", 1.3)],
    "((a house)) BREAK by the sea": [("a house", R * R), (BREAK, -1.0), ("by the sea", 1.0)],
    "": [("", 1.0)],
}
LONG = ", ".join(["a (red:1.2) circle", "a [green] square", "a blue triangle"] * 12)  # ~150 tokens, commas
REFERENCE[LONG] = [piece for k in range(12) for piece in (
    ("a " if k == 0 else ", a ", 1.0), ("red", 1.2), (" circle, a ", 1.0), ("green", S), (" square, a blue triangle", 1.0))]


def reference_chunks(hf_tokenizer, prompt: str) -> list[tuple[list[int], list[float]]]:
    """A1111's tokenize_line, as its description reads: 75 tokens a chunk, comma backtrack 20, BREAK, EOS fill."""
    comma = hf_tokenizer.convert_tokens_to_ids(",</w>")
    out, ids, weights, last_comma = [], [], [], -1

    def close():
        nonlocal ids, weights, last_comma
        fill = 75 - len(ids)
        out.append(([hf_tokenizer.bos_token_id] + ids + [hf_tokenizer.eos_token_id] * (fill + 1),
                    [1.0] + weights + [1.0] * (fill + 1)))
        ids, weights, last_comma = [], [], -1

    for text, weight in reference_fragments(prompt):
        if text is BREAK:
            close()
            continue
        for token in hf_tokenizer(text, add_special_tokens=False)["input_ids"]:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == 75 and last_comma != -1 and len(ids) - last_comma <= 20:
                ids, moved, weights, moved_w = ids[:last_comma + 1], ids[last_comma + 1:], \
                    weights[:last_comma + 1], weights[last_comma + 1:]
                close()
                ids, weights = moved, moved_w
            if len(ids) == 75:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not out:
        close()
    return out


def reference_embeddings(pipe, prompt: str, count: int, encoder: str = "text_encoder", tokenizer: str = "tokenizer",
                         penultimate: bool = False):
    """(1, count x 77, D) hidden states (and the first chunk's pooled output), emphasized per chunk in torch."""
    hf_tokenizer, text_encoder = getattr(pipe, tokenizer), getattr(pipe, encoder)
    made = reference_chunks(hf_tokenizer, prompt)
    empty = reference_chunks(hf_tokenizer, "")[0] if "" in REFERENCE else None
    made += [empty] * (count - len(made))
    states, pooled = [], None
    for ids, weights in made:
        tokens = torch.tensor([ids])
        first_eos = ids.index(hf_tokenizer.eos_token_id)
        tokens[0, first_eos + 1:] = hf_tokenizer.pad_token_id
        with torch.no_grad():
            out = text_encoder(tokens, output_hidden_states=True)
        z = out.hidden_states[-2] if penultimate else out.last_hidden_state
        if pooled is None:
            pooled = out[0] if penultimate else None  # CLIPTextModelWithProjection: text_embeds first
        mean = z.double().mean()
        z = z * torch.tensor(weights, dtype=z.dtype)[None, :, None]
        states.append(z * (mean / z.double().mean()).float())
    return torch.cat(states, dim=1), pooled


SD_CASES = [
    ("a (red:1.5) circle on a [blue] background", "blurry, (ugly:1.3)", 1),
    ("((a house)) BREAK by the sea", "", 2),
    (LONG, "blurry, (ugly:1.3)", 2),
]


@pytest.fixture(scope="module")
def sd1_shifted(checkpoints, tmp_path_factory):
    """The tiny SD1 checkpoint with a random bias and gain on the text encoder's final layer norm, and its export.
    Randomly initialized, that norm has bias 0, so each token's states average to 0 up to rounding and A1111's
    rescale to the chunk's mean divides rounding noise by rounding noise; a trained encoder's states have a mean."""
    from sdrt.export.api import export_pipeline

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(checkpoints["sd1"], safety_checker=None)
    norm = dict(pipe.text_encoder.named_modules())[next(n for n, _ in pipe.text_encoder.named_modules()
                                                         if n.endswith("final_layer_norm"))]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=generator) + 0.3)
        norm.weight.copy_(1 + 0.2 * torch.randn(norm.weight.shape, generator=generator))
    root = tmp_path_factory.mktemp("sd1-shifted")
    pipe.save_pretrained(root / "checkpoint", safe_serialization=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, export_pipeline(root / "checkpoint", root / "exported", log=lambda m: None)


@pytest.mark.parametrize("prompt,negative,count", SD_CASES, ids=["weights", "break", "long"])
def test_sd_images_match_diffusers_given_a1111_embeddings(sd1_shifted, prompt, negative, count):
    sd1_reference, folder = sd1_shifted
    assert len(reference_chunks(sd1_reference.tokenizer, prompt)) == count
    embeds = reference_embeddings(sd1_reference, prompt, count)[0]
    negative_embeds = reference_embeddings(sd1_reference, negative, count)[0]
    expected = sd1_reference(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, num_inference_steps=4,
                             guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(3),
                             output_type="np").images
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    got = pipe(prompt, negative_prompt=negative, num_inference_steps=4, guidance_scale=7.5, seed=3,
               output_type="np").images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 2 / 255
    assert prompt in pipe(prompt, num_inference_steps=1, seed=3, output_type="latent").parameters[0]


def test_sdxl_images_match_diffusers_given_a1111_embeddings(tiny):
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny.checkpoint("xl-base"))
    reference.set_progress_bar_config(disable=True)
    prompt, negative = LONG, "blurry, (ugly:1.3)"
    count = len(reference_chunks(reference.tokenizer, prompt))
    first = reference_embeddings(reference, prompt, count, penultimate=True)[0]
    second, pooled = reference_embeddings(reference, prompt, count, "text_encoder_2", "tokenizer_2", True)
    negative_first = reference_embeddings(reference, negative, count, penultimate=True)[0]
    negative_second, negative_pooled = reference_embeddings(reference, negative, count, "text_encoder_2",
                                                            "tokenizer_2", True)
    expected = reference(prompt_embeds=torch.cat([first, second], -1), pooled_prompt_embeds=pooled,
                         negative_prompt_embeds=torch.cat([negative_first, negative_second], -1),
                         negative_pooled_prompt_embeds=negative_pooled, num_inference_steps=4, guidance_scale=5.0,
                         generator=torch.Generator("cpu").manual_seed(4), output_type="np").images
    got = StableDiffusionXLPipeline.from_pretrained(tiny["xl-base"])(
        prompt, negative_prompt=negative, num_inference_steps=4, guidance_scale=5.0, seed=4, output_type="np").images
    assert count == 2 and got.shape == expected.shape
    assert np.abs(got - expected).max() < 2 / 255


def test_plain_prompts_are_bit_identical_with_and_without_the_syntax(exported):
    """Emphasis "original" on a prompt without syntax, under 76 tokens, is today's literal encoding bit for bit."""
    kwargs = dict(negative_prompt="blurry", num_inference_steps=3, seed=1, output_type="np")
    plain = StableDiffusionPipeline.from_pretrained(exported["sd2"], emphasis="none")(["a red circle", "a cat"],
                                                                                      **kwargs).images
    parsed = StableDiffusionPipeline.from_pretrained(exported["sd2"])(["a red circle", "a cat"], **kwargs).images
    np.testing.assert_array_equal(parsed, plain)


def test_emphasis_none_is_the_literal_prompt(exported):
    literal = StableDiffusionPipeline.from_pretrained(exported["sd1"], emphasis="none")
    parsed = StableDiffusionPipeline.from_pretrained(exported["sd1"])
    kwargs = dict(num_inference_steps=2, seed=1, output_type="np")
    a = literal("a (red:1.5) circle", **kwargs).images
    assert not np.array_equal(a, parsed("a (red:1.5) circle", **kwargs).images)
    np.testing.assert_array_equal(a, literal("a (red:1.5) circle", **kwargs).images)
    with pytest.raises(InvalidInputError, match="emphasis must be one of"):
        StableDiffusionPipeline.from_pretrained(exported["sd1"], emphasis="A1111")


def test_generate_reads_the_syntax_and_keeps_the_prompt_as_written(exported, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "weighted.png"
    prompt = "a (red:1.4) circle BREAK on blue"
    assert main(["generate", str(exported["sd1"]), prompt, "-o", str(out), "--steps", "2", "--seed", "1", "-q"]) == 0
    with Image.open(out) as png:
        assert png.info["parameters"].startswith(prompt)
    assert main(["generate", str(exported["sd1"]), "a [cat:dog:0.5]", "-o", str(out), "-q"]) == 2
    assert "prompt editing" in capsys.readouterr().err


# -- clip skip -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_skip", [1])  # the tiny encoders have 2 layers: 1 is the only skip they allow
def test_sdxl_clip_skip_matches_diffusers(tiny, clip_skip):
    """diffusers' meaning: the prompt's embeddings from hidden_states[-(clip_skip + 2)] of both encoders; the
    negatives' stay the penultimate layer's, the pooled embedding the last layer's."""
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny.checkpoint("xl-base"))
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0)
    expected = reference(clip_skip=clip_skip, generator=torch.Generator("cpu").manual_seed(2), output_type="np",
                         **kwargs).images
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny["xl-base"])
    got = pipe(clip_skip=clip_skip, seed=2, output_type="np", **kwargs).images
    assert np.abs(got - expected).max() < 1e-3
    assert not np.array_equal(got, pipe(seed=2, output_type="np", **kwargs).images)


@pytest.mark.parametrize("flavour,clip_skip", [("sd1", 1), ("sd1", 2), ("sd2", 1)])
def test_sd_clip_skip_matches_diffusers(checkpoints, exported, flavour, clip_skip):
    """diffusers' meaning for SD 1.x/2.x: the prompt's embeddings are hidden_states[-(clip_skip + 1)] through the
    final layer norm; the negatives' stay the last hidden state. (diffusers 0.42's own clip_skip path reads
    text_encoder.text_model, which transformers 5 removed, so the reference embeddings are made here the same way.)"""
    reference = diffusers.StableDiffusionPipeline.from_pretrained(checkpoints[flavour], safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    prompt, negative = "a red circle on a blue square", "blurry"

    def ids(text):
        return reference.tokenizer(text, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids

    encoder = reference.text_encoder
    with torch.no_grad():
        hidden = encoder(ids(prompt), output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        prompt_embeds = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
        negative_embeds = encoder(ids(negative))[0]
    kwargs = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np")
    expected = reference(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                         generator=torch.Generator("cpu").manual_seed(2), **kwargs).images
    pipe = StableDiffusionPipeline.from_pretrained(exported[flavour])
    got = pipe(prompt, negative_prompt=negative, clip_skip=clip_skip, seed=2, **kwargs).images
    assert np.abs(got - expected).max() < 1e-3
    assert not np.array_equal(got, pipe(prompt, negative_prompt=negative, seed=2, **kwargs).images)
    literal = StableDiffusionPipeline.from_pretrained(exported[flavour], emphasis="none")
    np.testing.assert_array_equal(got, literal(prompt, negative_prompt=negative, clip_skip=clip_skip, seed=2,
                                               **kwargs).images)


def test_clip_skip_refusals(exported, tiny, tmp_path):
    sd1 = StableDiffusionPipeline.from_pretrained(exported["sd1"])
    for bad in (0, 3, 1.5):  # 3: past the tiny encoder's embeddings
        with pytest.raises(InvalidInputError, match="clip_skip"):
            sd1("a cat", clip_skip=bad, num_inference_steps=1)
    xl = StableDiffusionXLPipeline.from_pretrained(tiny["xl-base"])
    for bad in (0, 1.5, "2", 2, 99):  # 2: past the tiny encoders' first layer (diffusers: IndexError)
        with pytest.raises(InvalidInputError, match="clip_skip"):
            xl("a cat", clip_skip=bad, num_inference_steps=1)
    # A folder exported before the encoder gave its earlier layers (or by optimum) says to re-export.
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(exported["sd1"], old)
    config = json.loads((old / "text_encoder" / "config.json").read_text())
    config.pop("sdrt_normed_hidden_states")
    (old / "text_encoder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="re-export"):
        StableDiffusionPipeline.from_pretrained(old, verify="none")("a cat", clip_skip=1, num_inference_steps=1)
