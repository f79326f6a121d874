"""Train the tiny shapes text-to-image latent diffusion model (models/shapes-demo) on CPU, in diffusers format.

Data: bench/shapes.py (32x32 coloured shapes on plain backgrounds, captioned). Two phases, both seeded:

1. VAE: a small AutoencoderKL (3 levels, 4x downsampling -> 4x8x8 latents), L2 + L1 reconstruction
   plus a small KL term. Its latents' std over the training set sets `scaling_factor` (in the VAE config).
2. UNet + text encoder, jointly: a small UNet2DConditionModel (cross-attention) and a 2-layer CLIPTextModel
   over the real CLIP tokenizer (export/assets/clip), epsilon prediction on the SD1.5 DDPM schedule
   (scaled_linear 0.00085-0.012, 1000 steps), 10% caption dropout (empty prompt) for classifier-free
   guidance, EMA weights saved.

The result is a StableDiffusionPipeline (DPM++ 2M scheduler on SD1.5's noise schedule, no safety
checker) saved in fp16 safetensors. DPM++ 2M rather than SD1.5's PNDM: with this small model PNDM
over-saturates at guidance 5 and above (colour adherence 1.00 at guidance 1, 0.48 at 7), while DPM++ 2M and
Euler stay at 1.00 and guidance keeps raising shape adherence. Training runs for a time budget (or a fixed number of steps, for exact reruns):

    nice -n 10 .venv/bin/python tools/train_demo_model.py --vae-minutes 10 --unet-minutes 36 --out models/shapes-demo
    nice -n 10 .venv/bin/python tools/train_demo_model.py --vae-steps 900 --unet-steps 3500   # step-exact rerun

and then evaluates it with diffusers (a sample grid and the adherence table under bench/results):

    .venv/bin/python tools/train_demo_model.py --evaluate --out models/shapes-demo

The loss log is written to <out>/training_log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import shapes  # noqa: E402
from bench.adherence import score  # noqa: E402

CLIP_ASSETS = ROOT / "export" / "assets" / "clip"
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, timestep_spacing="leading",
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32,
)
UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(CLIP_ASSETS / "vocab.json"), str(CLIP_ASSETS / "merges.txt"),
                         pad_token="<|endoftext|>", model_max_length=77)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


class Budget:
    """Progress in [0, 1] by wall time, or by steps when a step count is given."""

    def __init__(self, minutes: float, steps: int | None):
        self.seconds, self.steps, self.t0 = minutes * 60.0, steps, time.time()

    def progress(self, step: int) -> float:
        if self.steps is not None:
            return step / self.steps
        return (time.time() - self.t0) / self.seconds

    def elapsed(self) -> float:
        return time.time() - self.t0


def lr_at(progress: float, step: int, base: float, warmup: int = 100, final: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `final` * base at the end of the budget."""
    w = min(1.0, (step + 1) / warmup)
    return base * w * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_vae(images, args, history):
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    log(f"VAE: {n_params(vae):,} params")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    budget = Budget(args.vae_minutes, args.vae_steps)
    step, acc = 0, []
    vae.train()
    while budget.progress(step) < 1.0:
        for g in opt.param_groups:
            g["lr"] = lr_at(budget.progress(step), step, args.vae_lr, warmup=50)
        idx = torch.randint(0, len(images), (args.vae_batch,), generator=gen)
        x = images[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        mse, l1 = F.mse_loss(rec, x), F.l1_loss(rec, x)
        kl = post.kl().mean()
        loss = mse + l1 + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc.append((mse.item(), l1.item(), kl.item()))
        step += 1
        if step % args.log_every == 0:
            m = np.mean(acc, axis=0)
            acc = []
            history.append({"phase": "vae", "step": step, "seconds": round(budget.elapsed(), 1),
                            "mse": float(m[0]), "l1": float(m[1]), "kl": float(m[2])})
            log(f"vae step {step} ({budget.elapsed():.0f}s) mse {m[0]:.5f} l1 {m[1]:.4f} kl {m[2]:.1f}")
    log(f"VAE done: {step} steps in {budget.elapsed():.0f}s")
    return vae.eval(), step, budget.elapsed()


def train_unet(latent_mean, latent_std, ids, empty_ids, args, history):
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed + 2)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(args.seed + 3)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    log(f"UNet: {n_params(unet):,} params, text encoder: {n_params(text_encoder):,} params")
    noise_sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000, prediction_type="epsilon")
    alphas = noise_sched.alphas_cumprod.float()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(args.seed + 4)
    budget = Budget(args.unet_minutes, args.unet_steps)
    step, acc = 0, []
    unet.train()
    text_encoder.train()
    while budget.progress(step) < 1.0:
        lr = lr_at(budget.progress(step), step, args.unet_lr, warmup=200)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(ids), (args.batch,), generator=gen)
        z = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * args.scaling
        tok = ids[idx].clone()
        drop = torch.rand(args.batch, generator=gen) < args.caption_dropout
        tok[drop] = empty_ids
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        cond = text_encoder(tok)[0]
        pred = unet(zt, t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        acc.append(loss.item())
        step += 1
        if step % args.log_every == 0:
            m = float(np.mean(acc))
            acc = []
            history.append({"phase": "unet", "step": step, "seconds": round(budget.elapsed(), 1), "loss": m,
                            "lr": lr})
            log(f"unet step {step} ({budget.elapsed():.0f}s) loss {m:.4f} lr {lr:.2e}")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    log(f"UNet done: {step} steps in {budget.elapsed():.0f}s")
    return unet.eval(), text_encoder.eval(), step, budget.elapsed()


def train(args) -> None:
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    t_start = time.time()
    log(f"dataset: {args.n_train} images, seed {args.seed}")
    imgs, caps, _ = shapes.sample(args.seed, args.n_train)
    images = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    history: list[dict] = []

    vae, vae_steps, vae_seconds = train_vae(images, args, history)

    with torch.no_grad():
        means, stds = [], []
        for i in range(0, len(images), 500):
            d = vae.encode(images[i:i + 500]).latent_dist
            means.append(d.mean)
            stds.append(d.std)
        latent_mean, latent_std = torch.cat(means), torch.cat(stds)
        g = torch.Generator().manual_seed(args.seed + 5)
        samples = latent_mean + latent_std * torch.randn(latent_mean.shape, generator=g)
        args.scaling = float(1.0 / samples.std())
        rec = vae.decode(latent_mean[:500]).sample
        rec_mse = float(((rec - images[:500]) ** 2).mean())
    log(f"latents: mean {float(samples.mean()):.3f} std {float(samples.std()):.3f} -> scaling_factor "
        f"{args.scaling:.5f}; reconstruction mse (first 500) {rec_mse:.5f}")
    vae.register_to_config(scaling_factor=round(args.scaling, 5))
    args.scaling = round(args.scaling, 5)

    tok = tokenizer()
    ids = torch.tensor(tok(caps, padding="max_length", max_length=77, truncation=True).input_ids)
    empty_ids = torch.tensor(tok([""], padding="max_length", max_length=77).input_ids[0])
    unet, text_encoder, unet_steps, unet_seconds = train_unet(latent_mean, latent_std, ids, empty_ids, args, history)

    pipe = StableDiffusionPipeline(
        vae=vae.half(), text_encoder=text_encoder.half(), tokenizer=tok, unet=unet.half(),
        scheduler=DPMSolverMultistepScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(args.out)
    pipe.save_pretrained(out, safe_serialization=True)
    # DPMSolverMultistepScheduler does not write the options other schedulers read, whose diffusers defaults
    # (clip_sample=True for DDIM/DDPM, set_alpha_to_one=True) do not fit this model: write SD1.5's values.
    sched = out / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "clip_sample": False, "set_alpha_to_one": False,
                                 "skip_prk_steps": True}, indent=2, sort_keys=True) + "\n")
    summary = {
        "command": " ".join(sys.argv), "seed": args.seed, "n_train": args.n_train, "batch": args.batch,
        "vae_batch": args.vae_batch,
        "params": {"vae": n_params(vae), "unet": n_params(unet), "text_encoder": n_params(text_encoder)},
        "vae": {"steps": vae_steps, "seconds": round(vae_seconds, 1), "lr": args.vae_lr,
                "kl_weight": args.kl_weight, "reconstruction_mse": rec_mse},
        "scaling_factor": args.scaling,
        "unet": {"steps": unet_steps, "seconds": round(unet_seconds, 1), "lr": args.unet_lr, "ema": args.ema,
                 "caption_dropout": args.caption_dropout},
        "total_seconds": round(time.time() - t_start, 1),
        "threads": args.threads, "torch": torch.__version__,
        "history": history,
    }
    (out / "training_log.json").write_text(json.dumps(summary, indent=1))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"saved {out} ({size / 1e6:.2f} MB) in {time.time() - t_start:.0f}s total")


def _load(out: str):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompts, seeds, steps, guidance, batch=64) -> np.ndarray:
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch]]
        r = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                 output_type="np")
        out.append(r.images)
    return (np.clip(np.concatenate(out), 0, 1) * 255).round().astype(np.uint8)


GRID_PROMPTS = [
    "a red circle on a blue background",
    "a green square on a white background",
    "a yellow triangle on a black background",
    "a blue circle on a yellow background",
    "a white square on a red background",
    "a black triangle on a green background",
    "a small red square in the top left on a white background",
    "a large blue triangle in the centre on a yellow background",
    "a green circle in the bottom right on a black background",
    "a yellow square in the top right on a blue background",
    "a small white circle in the bottom left on a green background",
    "a large black circle on a red background",
]


def evaluate(args) -> None:
    import torch
    from PIL import Image, ImageDraw

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe = _load(args.out)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)

    # Grid: 12 prompts x 4 seeds, guidance 5, 25 steps, shown 4x (nearest), captions on the left.
    n_seeds, scale, text_w = 4, 4, 300
    prompts = [p for p in GRID_PROMPTS for _ in range(n_seeds)]
    seeds = [s for _ in GRID_PROMPTS for s in range(n_seeds)]
    t0 = time.time()
    imgs = _generate(pipe, prompts, seeds, steps=25, guidance=5.0)
    log(f"grid: {len(imgs)} images in {time.time() - t0:.1f}s")
    cell = 32 * scale
    sheet = Image.new("RGB", (text_w + n_seeds * (cell + 4), len(GRID_PROMPTS) * (cell + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, p in enumerate(GRID_PROMPTS):
        y = r * (cell + 4)
        draw.text((6, y + cell // 2 - 6), p, fill=(0, 0, 0))
        for c in range(n_seeds):
            im = Image.fromarray(imgs[r * n_seeds + c]).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(im, (text_w + c * (cell + 4), y))
    sheet.save(results / "shapes-demo-grid-diffusers.png")
    grid_scores = score(imgs, prompts)
    log(f"grid adherence: {grid_scores}")

    # Adherence: n random prompts (dataset caption style; about half name a position), one seed each.
    eval_prompts = shapes.prompts(seed=args.eval_seed, n=args.eval_n)
    eval_seeds = list(range(1000, 1000 + args.eval_n))
    rows = []
    for g in args.guidance:
        t0 = time.time()
        imgs = _generate(pipe, eval_prompts, eval_seeds, steps=args.eval_steps, guidance=g)
        s = score(imgs, eval_prompts)
        s["guidance"], s["seconds"] = g, round(time.time() - t0, 1)
        rows.append(s)
        log(f"guidance {g}: {s}")

    def f(v):
        return "-" if v is None else f"{v:.2f}"

    n_pos = sum(shapes.parse_prompt(p)["position"] is not None for p in eval_prompts)
    lines = [
        "# shapes-demo: prompt adherence (diffusers StableDiffusionPipeline)",
        "",
        f"Model: models/shapes-demo. {args.eval_n} prompts from `bench.shapes.prompts(seed={args.eval_seed}, "
        f"n={args.eval_n})` ({n_pos} name a position), one generator seed each ({eval_seeds[0]}..{eval_seeds[-1]}), "
        f"{type(pipe.scheduler).__name__}, {args.eval_steps} steps, 32x32, fp32 on CPU, torch {torch.__version__}. "
        "Checked by `bench.adherence.score` (reads the pixels; 1.00 agreement with the dataset's own images).",
        "",
        "| guidance | colour | background | shape | position | all | colour+background+shape | size (not in all) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in rows:
        lines.append(f"| {s['guidance']:g} | {f(s['colour'])} | {f(s['background'])} | {f(s['shape'])} | "
                     f"{f(s['position'])} | **{f(s['all'])}** | {f(s['objects'])} | {f(s['size'])} |")
    lines += [
        "",
        "`position` and `size` are rated over the prompts that name them; `all` = colour, background, shape "
        "and (where named) position all right; colour+background+shape leaves position out.",
        "",
        f"Grid (bench/results/shapes-demo-grid-diffusers.png: 12 prompts x seeds 0-3, guidance 5, 25 steps): "
        f"all {f(grid_scores['all'])}, colour {f(grid_scores['colour'])}, background "
        f"{f(grid_scores['background'])}, shape {f(grid_scores['shape'])}, position {f(grid_scores['position'])}.",
        "",
        "Reproduce: `.venv/bin/python tools/train_demo_model.py --evaluate --out models/shapes-demo`",
        "",
    ]
    (results / "shapes-demo-adherence-diffusers.md").write_text("\n".join(lines))
    log("wrote bench/results/shapes-demo-adherence-diffusers.md")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "models" / "shapes-demo"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=64, help="UNet batch size")
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-minutes", type=float, default=10.0)
    ap.add_argument("--unet-minutes", type=float, default=36.0)
    ap.add_argument("--vae-steps", type=int, default=None, help="train the VAE for exactly this many steps")
    ap.add_argument("--unet-steps", type=int, default=None, help="train the UNet for exactly this many steps")
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--unet-lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--evaluate", action="store_true", help="only evaluate a trained model (grid + adherence)")
    ap.add_argument("--eval-n", type=int, default=120)
    ap.add_argument("--eval-seed", type=int, default=2024)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0, 7.0])
    args = ap.parse_args(argv)
    if args.evaluate:
        evaluate(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
