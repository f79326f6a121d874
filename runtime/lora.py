"""LoRA files, read without torch and applied to an exported folder's weights without re-exporting it.

A LoRA changes some linear and convolution weights of the UNet and the text encoders by a low-rank
product: W' = W + scale * (alpha / rank) * up @ down. sdrt reads the file (safetensors only: pickled
`.pt`/`.ckpt` files can run code and are never loaded), finds the ONNX initializer each key changes
(sdrt.engines.weights reads the map from the graph) and computes the new weights in NumPy, in fp32,
cast to the initializer's dtype. The engines then run with those initializers in place of the file's
(`Engine.set_initializers`); nothing is written to the folder.

Formats:
- kohya / A1111 (`lora_unet_…`, `lora_te_…`, SDXL's `lora_te1_…` / `lora_te2_…`; `.lora_down.weight`,
  `.lora_up.weight`, `.alpha`, LoCon's `.lora_mid.weight`). Module names are matched against the folder's
  own modules with dots written as underscores, in diffusers' names (SD 1.x as kohya trains it) or the
  original LDM/SGM names (`input_blocks_4_1_…`, SDXL as kohya trains it).
- diffusers / PEFT (`unet.<module>.lora_A.weight` / `lora_B.weight`, `text_encoder(_2).…`, the older
  `…processor.to_q_lora.down.weight`); alpha from `.alpha` keys or the file's `lora_adapter_metadata`,
  else alpha = rank.
- LyCORIS LoHa (`hada_w1_a` …) and LoKr (`lokr_w1` …), without their Tucker factors.
Refused by name: DoRA (`dora_scale`), Tucker-decomposed LoHa/LoKr, bias or norm diffs.

Every key must change a weight of this folder with the right shape: a key that maps to nothing, or a
shape from another base, is an error naming it, never a partial LoRA.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import InvalidInputError, UnsupportedConfigError

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet", *TEXT_COMPONENTS)
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# The suffix of each tensor a module's LoRA has, per format, and the role it plays.
SUFFIXES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid", ".alpha": "alpha",
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".hada_w1_a": "w1a", ".hada_w1_b": "w1b", ".hada_w2_a": "w2a", ".hada_w2_b": "w2b",
    ".lokr_w1": "k1", ".lokr_w1_a": "k1a", ".lokr_w1_b": "k1b", ".lokr_w2": "k2", ".lokr_w2_a": "k2a",
    ".lokr_w2_b": "k2b",
}
REFUSED = {".dora_scale": "DoRA (weight-decomposed LoRA)", ".hada_t1": "LoHa with Tucker factors",
           ".hada_t2": "LoHa with Tucker factors", ".lokr_t2": "LoKr with Tucker factors",
           ".diff_b": "bias diffs", ".bias": "bias diffs", ".w_norm": "norm diffs", ".b_norm": "norm diffs",
           ".diff": "full weight diffs"}
METADATA_KEY = "lora_adapter_metadata"
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": None}


class LoraFileError(InvalidInputError):
    """A LoRA (or embedding) file that cannot be read, or does not fit the model."""


# -- reading safetensors ---------------------------------------------------------------------------------------


def read_safetensors(path: str | os.PathLike, what: str = "LoRA") -> tuple[dict[str, np.ndarray], dict]:
    """(tensors as float arrays, metadata) of a .safetensors file; pickles and truncated files refused."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{what} file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80" or path.suffix.lower() in (".pt", ".ckpt", ".bin", ".pth"):
        raise LoraFileError(
            f"{path} is a pickled torch file; sdrt never loads pickles (they can run code). Convert it to "
            ".safetensors (e.g. with safetensors.torch.save_file) and pass that file"
        )
    if len(head) < 9 or head[8:9] != b"{":
        raise LoraFileError(f"{path} is not a .safetensors file (it does not start with a safetensors header)")
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as e:
        raise LoraFileError(f"reading {what} files needs the safetensors package: pip install 'sdrt[lora]'") from e
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            names = list(f.keys())
            header = None
            tensors = {}
            for name in names:
                try:
                    tensors[name] = f.get_tensor(name)
                except TypeError:  # bfloat16: NumPy has no such dtype
                    header = header or _header(path)
                    tensors[name] = _bf16(path, header, name)
    except SafetensorError as e:
        raise LoraFileError(f"{path} is not a readable .safetensors file (truncated or corrupted?): {e}") from e
    return tensors, metadata


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def _bf16(path: Path, header: tuple[dict, int], name: str) -> np.ndarray:
    entries, start = header
    entry = entries[name]
    if entry["dtype"] != "BF16":
        raise LoraFileError(f"{path}: tensor {name} has dtype {entry['dtype']}, which sdrt cannot read")
    begin, end = entry["data_offsets"]
    raw = np.fromfile(path, dtype="<u2", count=(end - begin) // 2, offset=start + begin)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def addnet_hash(path: str | os.PathLike) -> str:
    """A1111's LoRA hash: sha256 of the tensor data after the safetensors header (the "addnet" hash); its first
    12 hex digits are what `Lora hashes:` records."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + size)
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# -- the modules a file changes --------------------------------------------------------------------------------


@dataclass
class ModuleLora:
    """One module's low-rank change as the file holds it: tensors by role (down/up/mid, w1a.., k1..), alpha."""

    key: str  # the file's name for the module (its keys without the suffix), for messages
    component: str  # unet | text_encoder | text_encoder_2
    name: str  # the module's name in the file's convention (see Resolver)
    tensors: dict = field(default_factory=dict)
    alpha: float | None = None

    @property
    def kind(self) -> str:
        roles = set(self.tensors)
        if roles & {"w1a", "w1b", "w2a", "w2b"}:
            return "loha"
        if roles & {"k1", "k1a", "k1b", "k2", "k2a", "k2b"}:
            return "lokr"
        return "lora"

    def check_complete(self, path) -> None:
        needed = {"lora": ({"down", "up"},), "loha": ({"w1a", "w1b", "w2a", "w2b"},),
                  "lokr": ({"k1", "k2"}, {"k1a", "k1b", "k2"}, {"k1", "k2a", "k2b"}, {"k1a", "k1b", "k2a", "k2b"})}
        if not any(set(option) <= set(self.tensors) for option in needed[self.kind]):
            raise LoraFileError(f"{path}: module {self.key} has tensors {sorted(self.tensors)}, an incomplete "
                                f"{self.kind} (truncated or hand-edited file?)")

    def _factors(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float32) for k, v in self.tensors.items()}

    def size(self) -> int:
        """How many weights the change covers, from the factors' shapes alone (nothing multiplied)."""
        t = self.tensors
        if self.kind == "lora":
            down, up = t["down"], t["up"]
            kernel = t["mid"].shape[2:] if "mid" in t else ()
            return int(up.shape[0] * np.prod(down.shape[1:]) * int(np.prod(kernel)))
        if self.kind == "loha":
            return int(t["w1a"].shape[0] * t["w1b"].shape[1])
        w1 = t["k1"].shape if "k1" in t else (t["k1a"].shape[0], t["k1b"].shape[1])
        w2 = t["k2"].shape if "k2" in t else (t["k2a"].shape[0], *t["k2b"].shape[1:])
        return int(np.prod(w1) * np.prod(w2))

    def check(self, shape: tuple[int, ...]) -> None:
        if self.size() != int(np.prod(shape)):
            raise LoraFileError(f"module {self.key}: the LoRA changes {self.size()} weights, but the model's weight has "
                                f"shape {tuple(shape)} ({int(np.prod(shape))}): a LoRA for another base model?")

    def delta(self, shape: tuple[int, ...], scale: float = 1.0, transposed: bool = False) -> np.ndarray:
        """scale * the change to the weight, float32: (alpha / rank) * up @ down and kin, in torch's layout
        (`shape`), or its transpose (a linear weight as a MatMul holds it). The scale goes into the smallest
        factor, so a plain LoRA costs one matrix product per module."""
        self.check(shape)
        t = self._factors()
        if self.kind == "lora":
            down, up = t["down"], t["up"]
            rank = down.shape[0]
            s = np.float32(scale * (1.0 if self.alpha is None else self.alpha / rank))
            up = up.reshape(up.shape[0], -1) * s
            if "mid" in t:  # LoCon with a CP-decomposed kernel: up [o, r], mid [r, r, kh, kw], down [r, i]
                d = np.einsum("oa,abkl,bi->oikl", up, t["mid"], down.reshape(rank, -1))
            elif down.ndim == 4 and (down.shape[2:] != (1, 1) or len(shape) == 4):  # conv: up is 1x1
                d = np.tensordot(up, down, axes=(1, 0))
            elif transposed:
                return down.reshape(rank, -1).T @ up.T  # [in, out], contiguous
            else:
                d = up @ down.reshape(rank, -1)
        elif self.kind == "loha":
            rank = t["w1b"].shape[0]
            s = np.float32(scale * (1.0 if self.alpha is None else self.alpha / rank))
            d = (t["w1a"] * s @ t["w1b"]) * (t["w2a"] @ t["w2b"])
        else:
            w1 = t["k1"] if "k1" in t else t["k1a"] @ t["k1b"]
            w2 = t["k2"] if "k2" in t else t["k2a"] @ t["k2b"].reshape(t["k2b"].shape[0], -1)
            rank = t["k1b"].shape[0] if "k1b" in t else t["k2b"].shape[0] if "k2b" in t else None
            s = np.float32(scale * (1.0 if rank is None or self.alpha is None else self.alpha / rank))
            if len(shape) == 4 and w2.ndim == 2:
                w2 = w2.reshape(shape[0] // w1.shape[0], shape[1] // w1.shape[1], *shape[2:])
            d = np.kron(w1.reshape(*w1.shape, *([1] * (w2.ndim - 2))) * s, w2)
        d = d.reshape(shape)
        return d.T if transposed else d


def _split(key: str) -> tuple[str, str] | None:
    for suffix, role in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _metadata_alphas(metadata: dict) -> dict[str, float]:
    """Alphas diffusers records in the file's header: {component: lora_alpha} (PEFT's adapter configs)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        configs = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    alphas = {}
    for key, value in configs.items():  # "unet.lora_alpha": 8, or nested {"unet": {"lora_alpha": 8}}
        component, _, field_name = key.rpartition(".")
        if field_name == "lora_alpha" and isinstance(value, (int, float)):
            alphas[component or "unet"] = float(value)
        elif isinstance(value, dict) and isinstance(value.get("lora_alpha"), (int, float)):
            alphas[key] = float(value["lora_alpha"])
    return alphas


def parse_modules(path, tensors: dict[str, np.ndarray], metadata: dict) -> list[ModuleLora]:
    """The modules a LoRA state dict changes, grouped from its keys (kohya or diffusers/PEFT naming)."""
    refused = sorted({why for key in tensors for suffix, why in REFUSED.items() if key.endswith(suffix)})
    if refused:
        raise UnsupportedConfigError(f"{path} holds {', '.join(refused)}, which sdrt does not apply; use a plain "
                                     "LoRA / LoCon / LoHa / LoKr file")
    modules: dict[str, ModuleLora] = {}
    unknown = []
    alphas = _metadata_alphas(metadata)
    for key, value in tensors.items():
        split = _split(key)
        component = name = None
        if split is not None:
            stem, role = split
            kohya = next((p for p in KOHYA_PREFIXES if stem.startswith(p)), None)
            if kohya is not None:
                component, name = KOHYA_PREFIXES[kohya], stem[len(kohya):]
            else:
                prefix = next((p for p in sorted(DIFFUSERS_PREFIXES, key=len, reverse=True) if stem.startswith(p)),
                              None)
                component, name = (DIFFUSERS_PREFIXES[prefix], stem[len(prefix):]) if prefix else ("unet", stem)
                name = name.replace(".processor", "")
                for old, new in (("to_out_lora", "to_out.0"), ("to_q_lora", "to_q"), ("to_k_lora", "to_k"),
                                 ("to_v_lora", "to_v")):
                    if name.endswith(old):
                        name = name[: -len(old)] + new
        if component is None:
            unknown.append(key)
            continue
        module = modules.setdefault(stem, ModuleLora(stem, component, name))
        if role == "alpha":
            module.alpha = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
        else:
            module.tensors[role] = value
    if unknown:
        raise LoraFileError(f"{path}: {len(unknown)} keys are not LoRA weights sdrt knows "
                            f"(first: {', '.join(unknown[:5])})")
    if not modules:
        raise LoraFileError(f"{path} holds no LoRA weights")
    for module in modules.values():
        module.check_complete(path)
        if module.alpha is None and module.kind == "lora" and module.component in alphas:
            module.alpha = alphas[module.component]
    return list(modules.values())


# -- matching the file's module names to the folder's -----------------------------------------------------------


def _ldm_unet_name(module: str, layers: int, up_attention: list[bool], blocks: int) -> str | None:
    """The original LDM/SGM name of a diffusers UNet module (what kohya writes for SDXL), or None."""
    resnet_names = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if module in fixed:
        return fixed[module]
    parts = module.split(".")

    def resnet(rest):
        return ".".join([resnet_names.get(rest[0], rest[0]), *rest[1:]])

    if parts[0] == "down_blocks" and len(parts) >= 4:
        b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "resnets":
            return f"input_blocks.{1 + b * (layers + 1) + j}.0.{resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{1 + b * (layers + 1) + j}.1.{'.'.join(rest)}"
        if kind == "downsamplers" and rest == ["conv"]:
            return f"input_blocks.{(b + 1) * (layers + 1)}.0.op"
    if parts[0] == "mid_block" and len(parts) >= 4:
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets":
            return f"middle_block.{2 * j}.{resnet(rest)}"
        if kind == "attentions":
            return f"middle_block.1.{'.'.join(rest)}"
    if parts[0] == "up_blocks" and len(parts) >= 4:
        u, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "resnets":
            return f"output_blocks.{u * (layers + 1) + j}.0.{resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{u * (layers + 1) + j}.1.{'.'.join(rest)}"
        if kind == "upsamplers" and rest == ["conv"] and u < blocks:
            return f"output_blocks.{u * (layers + 1) + layers}.{2 if up_attention[u] else 1}.conv"
    return None


class Resolver:
    """Finds the folder module a file's module name means, per component: the names as they are (diffusers),
    with dots as underscores (kohya), with CLIP's `text_model.` (either way), and the UNet's LDM names."""

    def __init__(self, targets: dict[str, dict], unet_config: dict | None = None, hint: str = ""):
        self.targets = targets  # component -> {module: Target}
        self.hint = hint  # said when a module matches nothing (why this folder may lack it)
        self._names: dict[str, dict[str, str]] = {}
        for component, modules in targets.items():
            names = {}
            for module in modules:
                spellings = [module]
                if component in TEXT_COMPONENTS:
                    spellings.append("text_model." + module)
                if component == "unet" and unet_config:
                    ldm = _ldm_unet_name(module, *_unet_layout(unet_config))
                    if ldm:
                        spellings.append(ldm)
                for s in spellings:
                    names.setdefault(s, module)
                    names.setdefault(s.replace(".", "_"), module)
            self._names[component] = names

    def resolve(self, module: ModuleLora) -> str | None:
        return self._names.get(module.component, {}).get(module.name)


def _unet_layout(config: dict) -> tuple[int, list[bool], int]:
    layers = config.get("layers_per_block", 2)
    layers = layers[0] if isinstance(layers, (list, tuple)) else layers
    up_types = config.get("up_block_types") or []
    up_attention = ["CrossAttn" in t for t in up_types]
    return int(layers), up_attention, len(up_types) - 1


@dataclass
class LoraFile:
    """A LoRA file read once: its modules, and where it came from (for PNG metadata)."""

    path: Path
    name: str
    modules: list[ModuleLora]
    short_hash: str

    @classmethod
    def read(cls, path: str | os.PathLike, name: str | None = None) -> "LoraFile":
        path = Path(path)
        tensors, metadata = read_safetensors(path)
        modules = parse_modules(path, tensors, metadata)
        return cls(path, name or path.stem, modules, addnet_hash(path)[:12])

    def components(self) -> set[str]:
        return {m.component for m in self.modules}

    def targets(self, resolver: Resolver) -> list[tuple[str, "object", ModuleLora]]:
        """(component, Target, module) for every module; each must map to a weight of the right size (checked from
        the shapes, nothing computed), else the file is refused naming the first few that do not."""
        unmapped, out = [], []
        for module in self.modules:
            if module.component not in resolver.targets:
                unmapped.append(f"{module.key} ({module.component}: not in this folder)")
                continue
            target_name = resolver.resolve(module)
            if target_name is None:
                unmapped.append(module.key)
                continue
            target = resolver.targets[module.component][target_name]
            if target.shared:
                raise UnsupportedConfigError(
                    f"{self.path}: {module.key} changes {target_name}, whose weight the exported graph shares with "
                    "other modules (identical weights merged at export); re-export without weight sharing")
            try:
                module.check(target.torch_shape)
            except LoraFileError as e:
                raise LoraFileError(f"{self.path}: {e}") from None
            out.append((module.component, target, module))
        if unmapped:
            raise LoraFileError(
                f"{self.path}: {len(unmapped)} of its {len(self.modules)} modules match no weight of this model "
                f"(first: {', '.join(unmapped[:5])}); {resolver.hint or 'is it a LoRA for another model family?'}")
        return out


# -- the A1111 prompt tag -----------------------------------------------------------------------------------------

TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def extract_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(the prompt without its `<lora:NAME:WEIGHT>` tags, [(NAME, WEIGHT)]); WEIGHT defaults to 1."""
    found = []
    for match in TAG.finditer(prompt):
        name, weight = match.group(1).strip(), match.group(2)
        try:
            value = 1.0 if weight is None or not weight.strip() else float(weight)
        except ValueError:
            raise InvalidInputError(f"prompt tag {match.group(0)}: the weight must be a number") from None
        if not np.isfinite(value):
            raise InvalidInputError(f"prompt tag {match.group(0)}: the weight must be finite")
        found.append((name, value))
    return TAG.sub("", prompt), found


def find_in_dir(directory: str | os.PathLike, name: str) -> Path:
    """The file a `<lora:NAME:…>` tag names in `directory`: NAME.safetensors (or NAME as given)."""
    directory = Path(directory)
    for candidate in (directory / f"{name}.safetensors", directory / name):
        if candidate.is_file() and candidate.resolve().parent == directory.resolve():
            return candidate
    known = sorted(p.stem for p in directory.glob("*.safetensors")) if directory.is_dir() else []
    raise InvalidInputError(f"no LoRA named {name!r} in {directory} (it has: {', '.join(known[:10]) or 'none'})")
