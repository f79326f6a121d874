"""Adapters of one opened folder: the LoRAs loaded, which are active at what weights, and the weights the engines
run with.

Weights are always computed from the folder's own (read back from the ONNX file for the initializers a LoRA
touches), never from a previous merge: switching from LoRA A to B gives exactly B, and no LoRA gives the
folder's weights bit for bit (the engines simply drop their replaced initializers). Only the networks whose
weights change get a new session; the merged arrays of the current set are kept for the next run with it.

A run's set is the active adapters (`set_adapters`), the fused ones (`fuse_lora`) and the request's own
`loras={name_or_path: scale}`. Concurrent runs with the same set run together; a run that needs another set
waits until the runs using the current one are done (sdrt.runtime.core.generate holds `using`).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import InvalidInputError, UnsupportedConfigError
from sdrt.runtime.lora import COMPONENTS, LoraFile, LoraFileError, Resolver

TOKEN_EMBEDDING = "embeddings.token_embedding"  # the CLIP module textual inversion extends


def _check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"an adapter name must be a non-empty string, got {name!r}")
    return name


def check_loras(value) -> tuple[tuple[str, float], ...] | None:
    """A request's `loras`: None, or {name_or_path: scale} (a list of names or (name, scale) pairs also works)."""
    from sdrt.runtime.core.request import real

    if value is None:
        return None
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = [(v, 1.0) if isinstance(v, (str, os.PathLike)) else tuple(v) if isinstance(v, (list, tuple)) and
                 len(v) == 2 else (v, None) for v in value]
    else:
        raise InvalidInputError(f"loras must be a dict {{name or path: scale}}, got {type(value).__name__}")
    out = []
    for name, scale in items:
        if isinstance(name, os.PathLike):
            name = os.fspath(name)
        out.append((_check_name(name), real(f"loras[{name!r}]", scale)))
    return tuple(out)


def merged_weights(path, changes: dict, finish=None) -> dict:
    """initializer -> the file's value plus each (Target, module, scale) change of `changes[initializer]`, in the
    initializer's layout and dtype; computed in float32 in place, one initializer at a time (`finish(name, out)`
    may replace the result, e.g. a grown token-embedding table)."""
    from sdrt.engines.weights import weight_file

    merged = {}
    for initializer, weight in weight_file(path).read_each(changes):
        out = weight if weight.dtype == np.float32 and weight.flags.writeable else weight.astype(np.float32)
        for target, module, scale in changes[initializer]:
            target.add_delta(out, module, scale)
        if finish is not None:
            out = finish(initializer, out)
        merged[initializer] = out if out.dtype == weight.dtype else out.astype(weight.dtype)
    return merged


class Adapters:
    """LoRAs of one Generator; see the module docstring."""

    def __init__(self, models):
        self.models = models
        self.loaded: dict[str, LoraFile] = {}  # adapter name -> file
        self.active: dict[str, float] = {}  # set_adapters / load_lora_weights
        self.fused: dict[str, float] = {}  # fuse_lora: applied under every set
        self._by_path: dict[str, str] = {}  # resolved path -> adapter name
        self.disabled = False  # disable_lora: the active adapters are not applied (fused and per-run ones are)
        self._resolver: Resolver | None = None
        self._applied: tuple = ()  # the (name, scale) set the engines run with, and the embeddings' version
        # Textual inversion: rows appended to each text encoder's token-embedding table, from row `start`.
        self.embeddings: dict[str, list[np.ndarray]] = {}
        self._embedding_start: dict[str, int] = {}
        self.tokens: list[str] = []
        self._users = 0
        self._condition = threading.Condition()

    # -- loading ------------------------------------------------------------------------------------------

    def _targets(self) -> dict:
        from sdrt.engines.weights import weight_file

        folder = self.models.folder
        if folder.precision == "int8" or folder.manifest and folder.manifest.get("quantization"):
            raise UnsupportedConfigError(
                f"{folder.path} is an int8 (quantized) folder; its weights are integers that a LoRA cannot change. "
                "Apply the LoRA to the fp32 or fp16 folder it was quantized from")
        targets = {}
        for component in COMPONENTS:
            if component in folder.components:
                weights = weight_file(folder.onnx_path(component))
                if weights.quantized:
                    raise UnsupportedConfigError(
                        f"{folder.onnx_path(component)} is quantized (int8); a LoRA cannot change integer weights. "
                        "Apply the LoRA to the fp32 or fp16 folder it was quantized from")
                targets[component] = weights.targets
        return targets

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:
            folder = self.models.folder
            hint = ""
            if ((folder.manifest or {}).get("optimize") or {}).get("profile") == "gpu":
                hint = ("this folder was optimized with the gpu profile by an sdrt that did not record the modules of "
                        "its packed attention projections: run `sdrt optimize --optimize gpu` on the export again, "
                        "or apply the LoRA to the plain export")
            self._resolver = Resolver(self._targets(), folder.unet_config, hint)
        return self._resolver

    def load(self, path, adapter_name: str | None = None) -> str:
        """Read a LoRA file and check that every key fits this folder; returns its adapter name."""
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(f"a LoRA must be given as a .safetensors path, got {type(path).__name__}")
        resolved = str(Path(path).expanduser().resolve())
        name = _check_name(adapter_name) if adapter_name is not None else Path(path).stem
        if name in self.loaded and str(self.loaded[name].path.resolve()) != resolved:
            raise InvalidInputError(f"an adapter named {name!r} is loaded already (from {self.loaded[name].path}); "
                                    "give another adapter_name, or delete_adapters it first")
        lora = LoraFile.read(Path(path).expanduser(), name)
        lora.targets(self.resolver)  # every module fits, shapes included: refused now, not mid-generation
        self.loaded[name] = lora
        self._by_path[resolved] = name
        return name

    def find(self, name_or_path: str) -> str:
        """The adapter a request names: a loaded adapter's name, else a file path (loaded now)."""
        if name_or_path in self.loaded:
            return name_or_path
        resolved = str(Path(name_or_path).expanduser().resolve())
        if resolved in self._by_path:
            return self._by_path[resolved]
        if not Path(name_or_path).expanduser().is_file():
            raise InvalidInputError(f"no adapter named {name_or_path!r}: it is neither a loaded adapter (loaded: "
                                    f"{', '.join(self.loaded) or 'none'}) nor an existing LoRA file")
        stem, n = Path(name_or_path).stem, 1
        name = stem
        while name in self.loaded:
            n += 1
            name = f"{stem}_{n}"
        return self.load(name_or_path, name)

    def delete(self, names) -> None:
        for name in [names] if isinstance(names, str) else list(names):
            if name not in self.loaded:
                raise InvalidInputError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.loaded)})")
            lora = self.loaded.pop(name)
            self._by_path.pop(str(lora.path.resolve()), None)
            self.active.pop(name, None)
            self.fused.pop(name, None)

    def set_active(self, names, weights=None) -> None:
        from sdrt.runtime.core.request import real

        names = [names] if isinstance(names, str) else list(names)
        if weights is None:
            weights = [1.0] * len(names)
        elif not isinstance(weights, (list, tuple)):
            weights = [weights] * len(names)
        if len(weights) != len(names):
            raise InvalidInputError(f"adapter_weights has {len(weights)} entries for {len(names)} adapters")
        for name in names:
            if name not in self.loaded:
                raise InvalidInputError(f"no adapter named {name!r} is loaded (loaded: "
                                        f"{', '.join(self.loaded) or 'none'}); load_lora_weights(path) first")
        self.active = {name: real(f"adapter_weights[{name!r}]", w) for name, w in zip(names, weights)}

    def fuse(self, lora_scale, adapter_names=None) -> None:
        from sdrt.runtime.core.request import real

        lora_scale = real("lora_scale", lora_scale)
        names = list(self.active) if adapter_names is None else \
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.loaded:
                raise InvalidInputError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.loaded)})")
        if not names:
            raise InvalidInputError("fuse_lora: no adapter is active; load_lora_weights(path) first")
        for name in names:
            self.fused[name] = lora_scale * self.active.get(name, 1.0)

    # -- a run's set ------------------------------------------------------------------------------------------

    def wanted(self, request_loras) -> tuple[tuple[str, float], ...]:
        """The (adapter, scale) set a run uses: fused + active + the request's (files loaded and checked now)."""
        total: dict[str, float] = dict(self.fused)
        for name, scale in ({} if self.disabled else self.active).items():
            if name not in self.fused:
                total[name] = total.get(name, 0.0) + scale
        for name_or_path, scale in request_loras or ():
            name = self.find(name_or_path)
            total[name] = total.get(name, 0.0) + scale
        return tuple(sorted((n, s) for n, s in total.items() if s != 0.0))

    def describe(self, wanted) -> dict:
        """PNG metadata fields for a set (A1111's `Lora hashes: "name: hash, ..."`)."""
        if not wanted:
            return {}
        return {"lora_hashes": ", ".join(f"{name}: {self.loaded[name].short_hash}" for name, _ in wanted),
                "loras": ", ".join(f"{name}:{scale:g}" for name, scale in wanted)}

    @contextmanager
    def using(self, wanted):
        """Run with the engines' weights set to `wanted`; waits for runs with another set to finish first."""
        wanted = (wanted, sum(len(rows) for rows in self.embeddings.values()))
        with self._condition:
            while self._users and self._applied != wanted:
                self._condition.wait()
            if self._applied != wanted:
                self._apply(wanted)
            self._users += 1
        try:
            yield
        finally:
            with self._condition:
                self._users -= 1
                self._condition.notify_all()

    def _apply(self, key) -> None:
        """Give the engines the weights of `key`: for each initializer a set changes, the folder's value plus each
        LoRA's scaled change, added in place one module at a time (peak: the merged weights plus one layer)."""
        wanted = key[0]
        folder = self.models.folder
        plan: dict[str, dict[str, list]] = {}  # component -> initializer -> [(Target, module, scale)]
        for name, scale in wanted:
            for component, target, module in self.loaded[name].targets(self.resolver):
                plan.setdefault(component, {}).setdefault(target.initializer, []).append((target, module, scale))
        for component in self.embeddings:
            plan.setdefault(component, {}).setdefault(self.resolver.targets[component][TOKEN_EMBEDDING].initializer, [])
        for component in COMPONENTS:
            engine = getattr(self.models, component, None)
            if engine is None:
                continue
            if getattr(engine, "initializers", None):
                engine.set_initializers({})  # drop the previous set (and its session) before making the next
            if component not in plan:
                continue
            grow = None
            if component in self.embeddings and TOKEN_EMBEDDING in self.resolver.targets[component]:
                table = self.resolver.targets[component][TOKEN_EMBEDDING].initializer
                grown = _Grown(self._embedding_start[component], self.embeddings[component])
                grow = lambda name, out: grown.table(out) if name == table else out  # noqa: E731
            engine.set_initializers(merged_weights(folder.onnx_path(component), plan[component], grow))
        self._applied = key
        _trim_heap()

    # -- textual inversion ----------------------------------------------------------------------------------

    def load_embedding(self, path, token: str | None = None) -> list[str]:
        """Add a textual-inversion embedding (A1111 `emb_params`, diffusers' {token: vectors}, SDXL `clip_l` +
        `clip_g`): its token(s) to the tokenizer(s), its vectors to the text encoder(s)' token embeddings.
        Returns the tokens added (`t`, `t_1`, ... for a multi-vector embedding; `t` stands for all in prompts)."""
        from sdrt.runtime.lora import read_safetensors

        if not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(f"an embedding must be given as a .safetensors path, got {type(path).__name__}")
        if token is not None and (not isinstance(token, str) or not token.strip() or " " in token):
            raise InvalidInputError(f"token must be one word (no spaces), got {token!r}")
        path = Path(path).expanduser()
        tensors, _ = read_safetensors(path, "embedding")
        per_component = self._embedding_vectors(path, tensors)
        name = token
        if name is None:
            keys = [k for k in tensors if k not in ("emb_params", "clip_l", "clip_g")]
            name = keys[0] if len(keys) == 1 else path.stem
        tokens = [name] + [f"{name}_{i}" for i in range(1, len(next(iter(per_component.values()))))]
        checks = []
        for component, vectors in per_component.items():
            tokenizer = self._tokenizer_of(component)
            target = self.resolver.targets.get(component, {}).get(TOKEN_EMBEDDING)
            if tokenizer is None or target is None:
                raise LoraFileError(f"{path} has vectors for {component} (SDXL's clip_g encoder), which "
                                    f"{self.models.folder.path} lacks: an SDXL embedding on another model?")
            if vectors.shape[1] != target.shape[1]:
                raise LoraFileError(f"{path}: its vectors have {vectors.shape[1]} dimensions, {component}'s token "
                                    f"embeddings {target.shape[1]}: an embedding for another model?")
            checks.append((component, tokenizer, vectors))
        taken = [t for _, tokenizer, _ in checks for t in tokens if tokenizer.knows(t)]
        if taken:  # checked for every tokenizer before any changes: nothing half-added
            raise InvalidInputError(f"token {taken[0]!r} is in the tokenizer's vocabulary already; give another "
                                    "token name (token=...)")
        for component, tokenizer, vectors in checks:
            self._embedding_start.setdefault(component, tokenizer.vocab_size)
            tokenizer.add_tokens(tokens)
            self.embeddings.setdefault(component, []).append(vectors.astype(np.float32))
        self.tokens += tokens
        return tokens

    def _tokenizer_of(self, component: str):
        return getattr(self.models, "tokenizer" if component == "text_encoder" else "tokenizer_2", None)

    def _embedding_vectors(self, path: Path, tensors: dict) -> dict[str, np.ndarray]:
        """{text component: vectors [n, dim]} of an embedding file."""
        two_d = {k: np.atleast_2d(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()}
        if set(two_d) >= {"clip_l", "clip_g"}:
            found = {"text_encoder": two_d["clip_l"], "text_encoder_2": two_d["clip_g"]}
        elif "emb_params" in two_d:
            found = {"text_encoder": two_d["emb_params"]}
        elif len(two_d) == 1:
            found = {"text_encoder": next(iter(two_d.values()))}
        else:
            raise LoraFileError(f"{path} is not a textual-inversion embedding sdrt knows (keys: {sorted(tensors)[:5]}; "
                                "expected emb_params, one {token: vectors} entry, or clip_l + clip_g)")
        if "text_encoder" in found and self.models.text_encoder is None and "text_encoder_2" in found:
            found.pop("text_encoder")  # the SDXL refiner has the second encoder only
        counts = {v.shape[0] for v in found.values()}
        if any(v.ndim != 2 for v in found.values()) or len(counts) != 1:
            raise LoraFileError(f"{path}: its vectors have shapes {[v.shape for v in found.values()]}, not [n, dim]")
        return found


def _trim_heap() -> None:
    """Hand the merge's freed temporaries back to the system (glibc keeps freed heap otherwise: GBs for a full
    SD1.5 LoRA); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Grown:
    """A token-embedding table with textual-inversion rows appended from row `start` (transformers' resize)."""

    def __init__(self, start: int, rows: list[np.ndarray]):
        self.start, self.rows = start, rows

    def table(self, base: np.ndarray) -> np.ndarray:
        if base.shape[0] < self.start:
            raise LoraFileError(f"the token-embedding table has {base.shape[0]} rows, fewer than the tokenizer's "
                                f"{self.start} ids")
        return np.ascontiguousarray(np.concatenate([base[: self.start], *self.rows]).astype(base.dtype))
