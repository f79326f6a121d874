"""The generation core: one validated Request, a Family, Tasks, Guidance and ONE denoise loop.

    request.py   Request: every argument of a generation, checked once, with typed errors
    models.py    Models: the engines of a folder (lazy, low-memory lifetimes, the fp32 NaN fallback)
    codec.py     latents <-> pixels: VAE / TAESD, tiling
    loop.py      the denoise loop: family feed + task extras -> denoiser (with guidance) -> scheduler step
    generate.py  Generator: request -> (family, tasks) -> stages -> PipelineOutput

Families (sdrt.runtime.families) turn prompts into the denoiser's conditioning; tasks (sdrt.runtime.tasks)
decide how a run starts, what each step adds and how it ends. The diffusers-named pipelines
(StableDiffusionPipeline, ...) are thin facades over a Generator (sdrt.runtime.core.facade).
"""
