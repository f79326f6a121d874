"""Build tests/data/optimum-sd1: a tiny SD 1.x checkpoint (diffusers/) and its export by optimum (onnx/), made
with `optimum-cli export onnx` as users run it.

optimum-onnx pins transformers 4 and cannot be installed beside sdrt's environment (transformers 5), so the export
runs in a venv of its own:

    python3 -m venv /tmp/optimum-venv
    /tmp/optimum-venv/bin/pip install torch==2.13.0 && /tmp/optimum-venv/bin/pip install optimum-onnx diffusers
    python tools/make_optimum_fixture.py --optimum-venv /tmp/optimum-venv

The checkpoint is smaller than the test fixtures' (text hidden size 8) so that the committed folder stays small
(~7 MB: the 49408-token embedding and the CLIP vocabulary are most of it; diffusers/ has no tokenizer,
the tests give it the one in export/assets/clip). The tests compare sdrt on onnx/ with diffusers on diffusers/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "optimum-sd1"
CLIP = ROOT / "export" / "assets" / "clip"


def tiny_checkpoint(path: Path) -> None:
    """Run with the optimum venv's python: a checkpoint saved by transformers 4, as optimum reads it (transformers 4
    does not read a text encoder saved by transformers 5: it silently re-initializes it)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    )
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=4, sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=8, intermediate_size=16,
        num_attention_heads=2, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=8))
    tokenizer = CLIPTokenizer(str(CLIP / "vocab.json"), str(CLIP / "merges.txt"), pad_token="<|endoftext|>",
                              model_max_length=77)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimum-venv", required=True, type=Path, help="a venv with optimum-onnx (transformers 4)")
    p.add_argument("--checkpoint-only", type=Path, help=argparse.SUPPRESS)  # the first stage, in the optimum venv
    args = p.parse_args()
    if args.checkpoint_only:
        tiny_checkpoint(args.checkpoint_only)
        return 0
    cli = args.optimum_venv / "bin" / "optimum-cli"
    if not cli.is_file():
        p.error(f"{cli} does not exist: install optimum-onnx in that venv first (see this script's docstring)")
    tmp = OUT.with_name(OUT.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([str(args.optimum_venv / "bin" / "python"), __file__, "--optimum-venv", str(args.optimum_venv),
                    "--checkpoint-only", str(tmp / "diffusers")], check=True)
    subprocess.run([str(cli), "export", "onnx", "--model", str(tmp / "diffusers"), "--task", "text-to-image",
                    str(tmp / "onnx")], check=True)
    versions = subprocess.run([str(args.optimum_venv / "bin" / "python"), "-c",
                               "import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in "
                               "('optimum', 'optimum-onnx', 'transformers', 'diffusers', 'torch', 'onnx')}))"],
                              check=True, capture_output=True, text=True).stdout
    (tmp / "MADE_BY.json").write_text(json.dumps({"script": "tools/make_optimum_fixture.py",
                                                  "command": "optimum-cli export onnx --task text-to-image",
                                                  "versions": json.loads(versions)}, indent=2) + "\n")
    shutil.rmtree(tmp / "diffusers" / "tokenizer")  # 5 MB; the tests load it from export/assets/clip
    shutil.rmtree(OUT, ignore_errors=True)
    tmp.rename(OUT)
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
