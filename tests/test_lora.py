"""LoRA without re-export: images against diffusers with the LoRA merged into its torch modules (W + scale *
alpha/r * up @ down, what fuse_lora computes), and against diffusers' own load_lora_weights + fuse_lora where
peft can load the file; switching and unloading; files that do not fit."""

from __future__ import annotations

import copy

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from sdrt.export import fixtures_lora as fl  # noqa: E402
from sdrt.runtime.errors import InvalidInputError, UnsupportedConfigError  # noqa: E402
from sdrt.runtime.lora import LoraFileError  # noqa: E402
from sdrt.runtime.pipeline import StableDiffusionPipeline  # noqa: E402

KW = dict(prompt="a red cube on a blue table", num_inference_steps=3, guidance_scale=7.5, output_type="np")
SEED = 7
TOLERANCE = 2e-3  # float outputs in [0, 1]; what remains is float32 rounding (observed ~1e-6)


@pytest.fixture(scope="module")
def sd1_reference(checkpoints):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(checkpoints["sd1"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def loras(sd1_reference, tmp_path_factory):
    """Random LoRAs for the tiny SD1 model: A (UNet linear + text encoder, kohya), B (UNet with 3x3 convs,
    diffusers/PEFT naming), as factors and as files."""
    root = tmp_path_factory.mktemp("loras")
    unet, text = sd1_reference.unet, sd1_reference.text_encoder
    a_unet = fl.random_lora(unet, fl.module_names(unet, fl.UNET_LINEAR), rank=4, alpha=2.0, seed=1)
    a_text = fl.random_lora(text, fl.module_names(text, fl.TEXT_LINEAR), rank=4, alpha=8.0, seed=2)
    b_unet = fl.rounded(fl.random_lora(unet, fl.module_names(unet, ("to_q", "to_v"), convs=True), rank=2,
                                       alpha=None, seed=3), torch.float16)
    files = {
        "a": fl.save(root / "style_a.safetensors", {**fl.kohya_state_dict(a_unet),
                                                    **fl.kohya_state_dict(a_text, "lora_te_", text_model=True)}),
        "b": fl.save(root / "style_b.safetensors", fl.peft_state_dict(b_unet), dtype=torch.float16),
    }
    return {"a": (a_unet, a_text), "b": (b_unet, {})}, files


def expected(reference, merges) -> np.ndarray:
    """diffusers' image with each (unet LoRA, text LoRA, scale) merged into a copy of its modules."""
    pipe = copy.deepcopy(reference)
    for unet_lora, text_lora, scale in merges:
        fl.merge(pipe.unet, unet_lora, scale)
        fl.merge(pipe.text_encoder, text_lora, scale)
    return pipe(generator=torch.Generator("cpu").manual_seed(SEED), **KW).images


@pytest.fixture(scope="module")
def pipe(exported):
    return StableDiffusionPipeline.from_pretrained(exported["sd1"])


def test_kohya_lora_with_text_encoder_matches_merged_diffusers(pipe, sd1_reference, loras):
    factors, files = loras
    want = expected(sd1_reference, [(*factors["a"], 0.7)])
    out = pipe(seed=SEED, loras={str(files["a"]): 0.7}, **KW)
    assert np.abs(out.images - want).max() < TOLERANCE
    base = expected(sd1_reference, [])
    assert np.abs(out.images - base).max() > 20 * TOLERANCE  # the LoRA changed the image
    assert 'Lora hashes: "style_a: ' in out.parameters[0]


def test_two_loras_with_their_scales_and_conv_lora(pipe, sd1_reference, loras):
    factors, files = loras
    want = expected(sd1_reference, [(*factors["a"], 0.5), (*factors["b"], 1.3)])
    pipe.load_lora_weights(files["a"], adapter_name="a")
    pipe.load_lora_weights(files["b"], adapter_name="b")
    try:
        pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.3])
        assert np.abs(pipe(seed=SEED, **KW).images - want).max() < TOLERANCE
    finally:
        pipe.unload_lora_weights()


def test_switching_never_stacks_and_no_lora_is_the_base_bit_for_bit(pipe, exported, loras):
    _, files = loras
    base = pipe(seed=SEED, **KW).images
    pipe(seed=SEED, loras={str(files["a"]): 1.0}, **KW)
    then_b = pipe(seed=SEED, loras={str(files["b"]): 0.8}, **KW).images
    fresh_b = StableDiffusionPipeline.from_pretrained(exported["sd1"])(seed=SEED, loras={str(files["b"]): 0.8},
                                                                       **KW).images
    assert np.array_equal(then_b, fresh_b)
    assert np.array_equal(pipe(seed=SEED, **KW).images, base)


def test_fuse_and_unfuse(pipe, sd1_reference, loras):
    factors, files = loras
    pipe.load_lora_weights(files["a"], adapter_name="a")
    try:
        pipe.fuse_lora(lora_scale=0.4)
        pipe.set_adapters(["a"], [3.0])  # fused adapters keep their fused scale
        want = expected(sd1_reference, [(*factors["a"], 0.4)])
        assert np.abs(pipe(seed=SEED, **KW).images - want).max() < TOLERANCE
        pipe.unfuse_lora()
        pipe.disable_lora()
        assert np.abs(pipe(seed=SEED, **KW).images - expected(sd1_reference, [])).max() < TOLERANCE
    finally:
        pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == []


def test_diffusers_load_lora_weights_agrees(sd1_reference, pipe, loras, tmp_path):
    """diffusers' own loader (peft) on the UNet part of the kohya file gives the same image as the hand merge."""
    pytest.importorskip("peft")
    factors, _ = loras
    path = fl.save(tmp_path / "unet_only.safetensors", fl.kohya_state_dict(factors["a"][0]))
    reference = copy.deepcopy(sd1_reference)
    try:
        reference.load_lora_weights(str(path))
        reference.fuse_lora(lora_scale=0.6)
    except (ImportError, ValueError) as e:  # a peft / transformers pairing diffusers refuses
        pytest.skip(f"diffusers cannot load LoRAs here: {e}")
    theirs = reference(generator=torch.Generator("cpu").manual_seed(SEED), **KW).images
    ours = pipe(seed=SEED, loras={str(path): 0.6}, **KW).images
    assert np.abs(ours - theirs).max() < TOLERANCE


# -- files that do not fit ---------------------------------------------------------------------------------------


def test_lora_for_another_base_names_the_key_and_shapes(pipe, checkpoints, tmp_path):
    other = diffusers.UNet2DConditionModel.from_pretrained(checkpoints["sd2"], subfolder="unet")
    path = fl.save(tmp_path / "sd2.safetensors", fl.kohya_state_dict(
        fl.random_lora(other, fl.module_names(other, ("attn2.to_k",)), rank=2)))
    with pytest.raises(LoraFileError, match=r"attn2_to_k.*shape .*\(16, 32\)|another base"):
        pipe.load_lora_weights(path)


@pytest.mark.parametrize("content,message", [
    (b"\x80\x04\x95 pickle", "pickle"),
    (b"PK\x03\x04 zip", "pickle"),
    (b"hello world, not a model", "not a .safetensors"),
])
def test_non_safetensors_files_are_refused(pipe, tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoraFileError, match=message):
        pipe(seed=SEED, loras={str(path): 1.0}, **KW)


def test_truncated_and_foreign_files(pipe, loras, tmp_path):
    _, files = loras
    data = files["a"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraFileError, match="truncated|corrupted"):
        pipe.load_lora_weights(tmp_path / "cut.safetensors")
    fl.save(tmp_path / "other.safetensors", {"model.layers.0.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(LoraFileError, match="not LoRA weights"):
        pipe.load_lora_weights(tmp_path / "other.safetensors")
    fl.save(tmp_path / "unknown.safetensors", {"lora_unet_nowhere_to_q.lora_down.weight": np.zeros((2, 16), np.float32),
                                               "lora_unet_nowhere_to_q.lora_up.weight": np.zeros((16, 2), np.float32)})
    with pytest.raises(LoraFileError, match="match no weight.*lora_unet_nowhere_to_q"):
        pipe.load_lora_weights(tmp_path / "unknown.safetensors")
    fl.save(tmp_path / "dora.safetensors", {**fl.kohya_state_dict({}),
                                            "lora_unet_x.dora_scale": np.ones((1, 4), np.float32)})
    with pytest.raises(UnsupportedConfigError, match="DoRA"):
        pipe.load_lora_weights(tmp_path / "dora.safetensors")
    assert not {"cut", "other", "unknown", "dora"} & set(pipe.get_list_adapters())  # nothing half-loaded


@pytest.mark.parametrize("loras_arg,message", [
    ({"a": float("nan")}, "finite"),
    ({"a": "1"}, "number"),
    ("style.safetensors", "dict"),
    ({"no_such_adapter": 1.0}, "no adapter named"),
])
def test_bad_loras_arguments(pipe, loras_arg, message):
    with pytest.raises(InvalidInputError, match=message):
        pipe(seed=SEED, loras=loras_arg, **KW)


def test_set_adapters_checks_names_and_weights(pipe, loras):
    _, files = loras
    with pytest.raises(InvalidInputError, match="no adapter named 'x'"):
        pipe.set_adapters(["x"])
    pipe.load_lora_weights(files["a"], adapter_name="a")
    try:
        with pytest.raises(InvalidInputError, match="2 entries for 1"):
            pipe.set_adapters(["a"], [0.5, 0.5])
        with pytest.raises(InvalidInputError, match="loaded already"):
            pipe.load_lora_weights(files["b"], adapter_name="a")
    finally:
        pipe.unload_lora_weights()


# -- the CLI -------------------------------------------------------------------------------------------------------


def test_cli_lora_file_and_prompt_tag_match_diffusers(exported, sd1_reference, loras, tmp_path):
    from PIL import Image

    from sdrt.runtime.cli import main

    factors, files = loras
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "style b.safetensors").write_bytes(files["b"].read_bytes())
    out = tmp_path / "out.png"
    prompt = KW["prompt"] + " <lora:style b:1.3>"
    assert main(["generate", str(exported["sd1"]), prompt, "--lora", f"{files['a']}:0.5", "--lora-dir", str(folder),
                 "--steps", str(KW["num_inference_steps"]), "--seed", str(SEED), "-o", str(out), "-q"]) == 0
    want = expected(sd1_reference, [(*factors["a"], 0.5), (*factors["b"], 1.3)])
    with Image.open(out) as image:
        got, text = np.asarray(image).astype(np.float64), image.text["parameters"]
    assert np.abs(got - np.round(want[0] * 255)).max() <= 2
    assert text.startswith(prompt + "\n")  # the prompt as written, tag included (A1111)
    assert 'Lora hashes: "style b: ' in text and "style_a: " in text


@pytest.mark.parametrize("arguments,message", [
    (["a cat <lora:missing:1>"], "--lora-dir"),
    (["a cat <lora:missing:1>", "--lora-dir", "."], "no LoRA named 'missing'"),
    (["a cat <lora:x:heavy>", "--lora-dir", "."], "must be a number"),
    (["a cat", "--lora", "/no/such/file.safetensors:0.5"], "nor an existing LoRA file"),
])
def test_cli_lora_errors_are_one_line(exported, tmp_path, capsys, arguments, message):
    from sdrt.runtime.cli import main

    out = tmp_path / "never.png"
    assert main(["generate", str(exported["sd1"]), *arguments, "--steps", "2", "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# -- SDXL: two text encoders (lora_te1_ / lora_te2_) and kohya's SGM names for the UNet ----------------------------


@pytest.fixture(scope="module")
def xl_reference(tiny):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny.checkpoint("xl-base"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sgm_state_dict(lora, unet_config) -> dict:
    """kohya's SDXL naming: the original (SGM/LDM) UNet module names, lora_unet_input_blocks_4_1_..."""
    from sdrt.runtime.lora import _ldm_unet_name, _unet_layout

    renamed = {_ldm_unet_name(name, *_unet_layout(unet_config)): entry for name, entry in lora.items()}
    assert None not in renamed
    return fl.kohya_state_dict(renamed)


def test_sdxl_kohya_lora_with_both_text_encoders(tiny, xl_reference, tmp_path):
    from sdrt.runtime.sdxl import StableDiffusionXLPipeline

    ref = copy.deepcopy(xl_reference)
    unet_lora = fl.random_lora(ref.unet, fl.module_names(ref.unet, fl.UNET_LINEAR, convs=True), rank=4, seed=4)
    te1 = fl.random_lora(ref.text_encoder, fl.module_names(ref.text_encoder, fl.TEXT_LINEAR), rank=4, seed=5)
    te2 = fl.random_lora(ref.text_encoder_2, fl.module_names(ref.text_encoder_2, fl.TEXT_LINEAR), rank=4, seed=6)
    path = fl.save(tmp_path / "xl.safetensors", {
        **sgm_state_dict(unet_lora, dict(ref.unet.config)), **fl.kohya_state_dict(te1, "lora_te1_", text_model=True),
        **fl.kohya_state_dict(te2, "lora_te2_", text_model=True)})
    for model, lora in ((ref.unet, unet_lora), (ref.text_encoder, te1), (ref.text_encoder_2, te2)):
        fl.merge(model, lora, 0.8)
    want = ref(generator=torch.Generator("cpu").manual_seed(SEED), **KW).images
    got = StableDiffusionXLPipeline.from_pretrained(tiny["xl-base"])(seed=SEED, loras={str(path): 0.8}, **KW).images
    assert np.abs(got - want).max() < TOLERANCE


def test_sdxl_sgm_names_as_diffusers_reads_them(tiny, xl_reference, tmp_path):
    """diffusers' own loader maps kohya's SGM UNet names (an independent check of sdrt's mapping)."""
    pytest.importorskip("peft")
    from sdrt.runtime.sdxl import StableDiffusionXLPipeline

    ref = copy.deepcopy(xl_reference)
    unet_lora = fl.random_lora(ref.unet, fl.module_names(ref.unet, fl.UNET_LINEAR, convs=True), rank=4, seed=8)
    path = fl.save(tmp_path / "xl_unet.safetensors", sgm_state_dict(unet_lora, dict(ref.unet.config)))
    try:
        ref.load_lora_weights(str(path))
        ref.fuse_lora(lora_scale=0.9)
    except (ImportError, ValueError) as e:
        pytest.skip(f"diffusers cannot load LoRAs here: {e}")
    theirs = ref(generator=torch.Generator("cpu").manual_seed(SEED), **KW).images
    ours = StableDiffusionXLPipeline.from_pretrained(tiny["xl-base"])(seed=SEED, loras={str(path): 0.9}, **KW).images
    assert np.abs(ours - theirs).max() < TOLERANCE


# -- LyCORIS: LoHa and LoKr, against their definitions written in torch ---------------------------------------------


def test_loha_and_lokr_match_their_definitions(pipe, sd1_reference, tmp_path):
    ref = copy.deepcopy(sd1_reference)
    modules = dict(ref.unet.named_modules())
    rng = np.random.default_rng(11)
    state, rank, alpha = {}, 2, 3.0
    loha = fl.module_names(ref.unet, ("attn1.to_q", "ff.net.2"), convs=True)[:6]
    lokr = fl.module_names(ref.unet, ("attn2.to_out.0", "attn1.to_v"))
    with torch.no_grad():
        for name in loha:  # (w1a @ w1b) * (w2a @ w2b) * alpha / r, kernels flattened into w*b
            weight = modules[name].weight
            out_dim, rest = weight.shape[0], int(np.prod(weight.shape[1:]))
            f = {k: rng.standard_normal(s).astype(np.float32) * 0.5 for k, s in
                 (("w1a", (out_dim, rank)), ("w1b", (rank, rest)), ("w2a", (out_dim, rank)), ("w2b", (rank, rest)))}
            stem = "lora_unet_" + name.replace(".", "_")
            state.update({f"{stem}.hada_w1_a": f["w1a"], f"{stem}.hada_w1_b": f["w1b"], f"{stem}.hada_w2_a": f["w2a"],
                          f"{stem}.hada_w2_b": f["w2b"], f"{stem}.alpha": np.array(alpha, np.float32)})
            t = {k: torch.from_numpy(v).double() for k, v in f.items()}
            change = (t["w1a"] @ t["w1b"]) * (t["w2a"] @ t["w2b"]) * alpha / rank
            weight.copy_((weight.double() + 0.9 * change.reshape(weight.shape)).float())
        for name in lokr:  # kron(w1, w2a @ w2b) * alpha / r
            weight = modules[name].weight
            out_dim, in_dim = weight.shape
            w1 = rng.standard_normal((2, 2)).astype(np.float32)
            w2a = rng.standard_normal((out_dim // 2, rank)).astype(np.float32)
            w2b = rng.standard_normal((rank, in_dim // 2)).astype(np.float32)
            stem = "lora_unet_" + name.replace(".", "_")
            state.update({f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b,
                          f"{stem}.alpha": np.array(alpha, np.float32)})
            change = torch.kron(torch.from_numpy(w1).double(), torch.from_numpy(w2a @ w2b).double()) * alpha / rank
            weight.copy_((weight.double() + 0.9 * change).float())
    path = fl.save(tmp_path / "lycoris.safetensors", state)
    want = ref(generator=torch.Generator("cpu").manual_seed(SEED), **KW).images
    assert np.abs(pipe(seed=SEED, loras={str(path): 0.9}, **KW).images - want).max() < TOLERANCE


def test_a_gpu_profile_folder_takes_loras_into_its_packed_and_nhwc_weights(exported, loras, tmp_path):
    """`sdrt optimize --optimize gpu` packs Q/K/V (K/V) into one MatMul, columns interleaved head by head, and makes
    convolutions NHWC: every weight a LoRA changes there equals the plain export's merged weight, read back in the
    module's layout (the gpu folder's networks run on CUDA only, so the weights are compared, not images)."""
    from sdrt.engines.weights import weight_file
    from sdrt.export.optimize import optimize_folder
    from sdrt.runtime.adapters import merged_weights
    from sdrt.runtime.config import ModelFolder
    from sdrt.runtime.lora import LoraFile, Resolver

    gpu = optimize_folder(exported["sd1"], tmp_path / "gpu", profile="gpu", log=lambda m: None)

    def merged_modules(path, lora_path, scale):
        folder = ModelFolder.open(path)
        targets = {c: weight_file(folder.onnx_path(c)).targets for c in ("text_encoder", "unet")}
        plan, layouts = {}, {}
        for component, target, module in LoraFile.read(lora_path).targets(Resolver(targets, folder.unet_config)):
            plan.setdefault(component, {}).setdefault(target.initializer, []).append((target, module, scale))
            layouts[target.layout] = layouts.get(target.layout, 0) + 1
        out = {}
        for component, changes in plan.items():
            merged = merged_weights(folder.onnx_path(component), changes)
            for initializer, items in changes.items():
                for target, module, _ in items:
                    out[(component, module.key)] = target.to_torch(merged[initializer])
        return out, layouts

    for name, scale in (("a", 0.7), ("b", 1.3)):
        plain, _ = merged_modules(exported["sd1"], loras[1][name], scale)
        packed, layouts = merged_modules(gpu, loras[1][name], scale)
        assert plain.keys() == packed.keys()
        for key, value in plain.items():
            np.testing.assert_allclose(packed[key], value, rtol=0, atol=1e-6, err_msg=str(key))
        assert layouts.get("packed_linear_t", 0) > 0, layouts
        if name == "b":
            assert layouts.get("conv_nhwc", 0) > 0, layouts
