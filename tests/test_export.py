"""Export of the tiny fixtures: layout, ONNX validity, parity with torch at unseen shapes, manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from sdrt.engines.files import sha256_file
from sdrt.engines.onnxruntime import OrtEngine
from sdrt.engines.spec import spec_for
from sdrt.export.api import exported_config
from sdrt.export.checkpoint import load_module, open_checkpoint
from sdrt.export.trace import sample_inputs, wrap

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
SOURCE = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_layout_and_onnx_checker(exported, flavour):
    out = exported[flavour]
    for f in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
              "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"):
        assert (out / f).is_file(), f
    for c in COMPONENTS:
        onnx.checker.check_model(str(out / c / "model.onnx"), full_check=True)
        assert (out / c / "config.json").is_file()
    assert not list(out.parent.glob(".*partial")), "staging folder left behind"


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_onnx_names_follow_optimum(exported, flavour):
    names = {}
    for c in COMPONENTS:
        model = onnx.load(str(exported[flavour] / c / "model.onnx"), load_external_data=False)
        names[c] = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    # optimum's two outputs first; then each earlier layer through the final norm, for clip skip (sdrt's own)
    layers = len(names["text_encoder"][1]) - 2
    assert names["text_encoder"] == (["input_ids"], ["last_hidden_state", "pooler_output",
                                                     *(f"normed_hidden_states.{i}" for i in range(layers))])
    assert layers == json.loads((exported[flavour] / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    # optimum's three inputs; then a ControlNet's residuals (conv_in, each layer of each down block, each block's
    # downsampler but the last's; then the mid block), fed zeros without one
    config = json.loads((exported[flavour] / "unet" / "config.json").read_text())
    blocks = len(config["block_out_channels"])
    down = 1 + blocks * config["layers_per_block"] + blocks - 1
    assert names["unet"] == (["sample", "timestep", "encoder_hidden_states",
                              *(f"down_block_additional_residual_{i}" for i in range(down)),
                              "mid_block_additional_residual"], ["out_sample"])
    assert names["vae_decoder"] == (["latent_sample"], ["sample"])
    assert names["vae_encoder"] == (["sample"], ["latent_parameters"])


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_manifest_records_hashes_and_validation(exported, flavour):
    out = exported[flavour]
    manifest = json.loads((out / "sdrt.json").read_text())
    assert manifest["family"] == "stable-diffusion" and manifest["precision"] == "fp32"
    assert manifest["opset"] == 18 and manifest["versions"]["torch"]
    for rel, rec in manifest["files"].items():
        assert sha256_file(out / rel) == rec["sha256"]
    for c in COMPONENTS:
        assert rel_in(manifest["files"], f"{c}/model.onnx")
        report = manifest["validation"][c]
        assert report["passed"] and len({json.dumps(ch["dims"]) for ch in report["checks"]}) == 2
        assert all(ch["max_abs"] < 1e-4 for ch in report["checks"])


def rel_in(files, rel):
    return rel in files


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_onnx_matches_torch_at_unseen_shape(checkpoints, exported, flavour, component):
    """Batch 3 and a non-square 64x96 image: neither is a shape the export or its gate used."""
    ckpt = open_checkpoint(checkpoints[flavour])
    vae_config = ckpt.config("vae")
    spec = spec_for(component, exported_config(component, ckpt), vae_config=vae_config)
    module = wrap(component, load_module(ckpt, SOURCE[component]), spec)  # random residuals for a UNet
    dims = spec.dims(3, 64, 96, sequence=77)
    example = sample_inputs(spec, dims, seed=123)
    with torch.no_grad():
        ref = module(*example)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = OrtEngine(exported[flavour] / component / "model.onnx", spec).run(
        {n: t.numpy() for n, t in zip(spec.input_names, example)})
    for name, r in zip(spec.output_names, ref):
        assert got[name].shape == tuple(r.shape)
        np.testing.assert_allclose(got[name], r.numpy(), atol=1e-4 * max(1.0, float(r.abs().max())), rtol=0)
