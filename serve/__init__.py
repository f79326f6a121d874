"""sdrt serve: an HTTP image server over the generation core, with continuous batching.

    models.py    ServedModel: a folder opened once (one Generator), API fields -> a checked Request and its task
    batcher.py   Batcher: iteration-level scheduling; the UNet calls of every request in flight as ONE call per step
    gather.py    Gather: an engine whose concurrent calls run as one batched call (text encoders, VAE)
    limits.py    Limits: the request limits (pixels, steps, images, prompt length, body size)
    app.py       create_app: FastAPI app (auth, JSON errors, /healthz, /metrics) with the two APIs below
    openai_api.py  /v1/images/generations, /v1/images/edits, /v1/models (OpenAI Images)
    a1111.py     /sdapi/v1/... (AUTOMATIC1111's web UI API)
    metrics.py   Prometheus metrics (queue depth, batch sizes, per-stage latency, images served)
    cli.py       `sdrt serve` (uvicorn, or Ray Serve with --ray)
    ray.py       the same app as a Ray Serve deployment (`serve run sdrt.serve.ray:app`)

Needs the serve extra (pip install "sdrt[serve]"); nothing here imports torch.
"""
