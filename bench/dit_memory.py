"""What the full-size SD3.5-medium and FLUX.1-schnell architectures need in memory, against this machine.

    python bench/dit_memory.py [--out bench/results] [--stem NAME]

Each network of both families is built at full size on torch's "meta" device (shapes only, no memory) from the
published configs, and its parameters counted: the fp32 weights an `sdrt export` folder holds. Against the
machine's memory (MemTotal) the script says, network by network, whether

- export fits: torch holds the module's fp32 weights and the exporter writes the ONNX proto beside them (about 2x
  the weights), plus the validation's copy in onnxruntime (1x): an assumed factor of 3, not measured here;
- a normal generation fits: every network's weights loaded together, plus the transformer's activations at
  512 and 1024 px (sdrt.runtime.core.budget.transformer_activations, CFG batched where the family guides);
- a low-memory generation fits (--low-memory: one network at a time, CFG halves in turn): the largest network
  alone plus its activations.

Peak RSS is measured (not estimated) only where export fits, with --measure: left for a machine where the
networks fit (a larger CPU box); on the 24 GB CI-class machine neither T5-XXL nor the Flux transformer can be
exported (see the results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EXPORT_FACTOR = 3.0  # torch's fp32 weights + the ONNX proto (~2x), then onnxruntime's copy for validation (1x)
GIB = 2**30

SD35_MEDIUM = dict(attention_head_dim=64, caption_projection_dim=1536, in_channels=16, joint_attention_dim=4096,
                   num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2, pooled_projection_dim=2048,
                   pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128,
                   dual_attention_layers=tuple(range(13)))
FLUX_SCHNELL = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=False, axes_dims_rope=(16, 56, 56))
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
VAE_16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)


def parameters(build) -> int:
    import torch

    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def networks(family: str) -> dict[str, int]:
    """network -> parameter count, at full size."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    vae = parameters(lambda: AutoencoderKL(**VAE_16))
    t5 = parameters(lambda: T5EncoderModel(T5Config(**T5_XXL)))
    clip_l = parameters(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)))
    if family == "sd3.5-medium":
        return {"transformer": parameters(lambda: SD3Transformer2DModel(**SD35_MEDIUM)),
                "text_encoder (CLIP-L)": clip_l,
                "text_encoder_2 (CLIP-G)": parameters(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))),
                "text_encoder_3 (T5-XXL)": t5, "vae": vae}
    return {"transformer": parameters(lambda: FluxTransformer2DModel(**FLUX_SCHNELL)),
            "text_encoder (CLIP-L)": parameters(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L))),
            "text_encoder_2 (T5-XXL)": t5, "vae": vae}


def activations(family: str, side: int) -> int:
    from sdrt.runtime.core.budget import transformer_activations

    config = dict(SD35_MEDIUM, _class_name="SD3Transformer2DModel") if family == "sd3.5-medium" else \
        dict(FLUX_SCHNELL, _class_name="FluxTransformer2DModel")
    rows = 2 if family == "sd3.5-medium" else 1  # SD3 guides with CFG (batched), schnell does not
    text = 77 + 256 if family == "sd3.5-medium" else 512
    return transformer_activations(config, rows, side // 8, side // 8, text, fused=False, arena=True)


def memory_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--stem", default=f"dit-memory-{datetime.date.today().isoformat()}")
    args = parser.parse_args()
    total = memory_total()
    report = {"machine_memory_gib": round(total / GIB, 1), "families": {}}
    lines = [f"# SD3.5-medium and FLUX.1-schnell at full size: what fits in {total / GIB:.1f} GiB", "",
             "Parameters counted on torch's meta device from the published configs (fp32 bytes = 4 x parameters). "
             f"Export needs about {EXPORT_FACTOR:g}x a network's weights (torch's copy, the ONNX proto, onnxruntime's "
             "validation copy). Activations: sdrt.runtime.core.budget.transformer_activations (unfused attention, "
             "an `sdrt export` folder; `sdrt optimize` fuses it away).", ""]
    for family in ("sd3.5-medium", "flux.1-schnell"):
        counts = networks(family)
        weights = {name: 4 * n for name, n in counts.items()}
        biggest = max(weights.values())
        entry = {"parameters": counts, "fp32_gib": {k: round(v / GIB, 2) for k, v in weights.items()},
                 "export_fits": {k: EXPORT_FACTOR * v < total for k, v in weights.items()}, "runs": {}}
        lines += [f"## {family}", "", "| network | parameters | fp32 weights | export fits here |", "|---|---|---|---|"]
        for name, n in counts.items():
            lines.append(f"| {name} | {n / 1e6:,.0f} M | {weights[name] / GIB:.2f} GiB | "
                         f"{'yes' if entry['export_fits'][name] else 'no (needs ~%.0f GiB)' % (EXPORT_FACTOR * weights[name] / GIB)} |")
        lines += ["", "| size | normal mode (all networks + activations) | low-memory (largest network + activations) |",
                  "|---|---|---|"]
        for side in (512, 1024):
            act = activations(family, side)
            normal, low = sum(weights.values()) + act, biggest + act
            entry["runs"][side] = {"normal_gib": round(normal / GIB, 1), "low_memory_gib": round(low / GIB, 1),
                                   "normal_fits": normal < total, "low_memory_fits": low < total}
            lines.append(f"| {side}x{side} | {normal / GIB:.1f} GiB: {'fits' if normal < total else 'does not fit'} | "
                         f"{low / GIB:.1f} GiB: {'fits' if low < total else 'does not fit'} |")
        lines.append("")
        report["families"][family] = entry
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
