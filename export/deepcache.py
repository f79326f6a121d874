"""Step caching (DeepCache, Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for Free"): the exported UNet
split in two ONNX graphs, beside its own file, at build time (needs `onnx`; no torch, no re-export).

- `unet/model_deepcache.onnx`: the whole UNet, with one more output, `deep_feature`: the hidden state that enters
  the last up block (the output of every deeper block, upsampled to the latent resolution).
- `unet/model_shallow.onnx`: the shallow branch alone: the time embedding, conv_in and the first down block's
  layers (whose outputs are the last up block's skip connections), then the last up block on `deep_feature` given
  as an input, and the output convolution. With the `deep_feature` of the same call it returns `out_sample` of
  the whole UNet; with one from an earlier step it is DeepCache's cheap step.

Both files read the UNet's weights from its own `model.onnx_data` (no copy; tiny UNets keep weights inline).
sdrt.json records them under "deepcache"; the runtime (sdrt.runtime.deepcache) runs a full step every
`cache_interval` steps and the shallow graph in between, with any engine.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from sdrt.engines.files import MANIFEST, atomic_write_json
from sdrt.export.errors import ExportError

FEATURE = "deep_feature"
FULL_FILE, SHALLOW_FILE = "model_deepcache.onnx", "model_shallow.onnx"
MANIFEST_KEY = "deepcache"


def _scopes(node) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                return list(ast.literal_eval(prop.value))
            except (ValueError, SyntaxError):
                return []
    return []


def find_deep_feature(graph, last_up_block: int) -> str:
    """The tensor entering up block `last_up_block`: the first input of its first skip-connection Concat (dynamo's
    name scopes `unet.up_blocks.N`, or TorchScript's node names `/up_blocks.N/...` as optimum writes)."""
    prefix = f"up_blocks.{last_up_block}"
    for node in graph.node:
        if node.op_type != "Concat":
            continue
        in_block = any(s.endswith("unet." + prefix) or s == prefix for s in _scopes(node)) or \
            node.name.startswith(f"/{prefix}/")
        if in_block:
            return node.input[0]
    raise ExportError(f"no skip-connection Concat found in up_blocks.{last_up_block} of the UNet graph; "
                      "step caching needs a UNet exported by sdrt (or optimum)")


def _needed(graph, outputs: list[str], stop: set[str]) -> tuple[list, set[str]]:
    """The nodes that compute `outputs` from the graph's inputs and `stop`, in graph order, and the graph inputs
    they read."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    graph_inputs = {i.name for i in graph.input}
    keep, inputs, todo = set(), set(), list(outputs)
    while todo:
        name = todo.pop()
        if name in stop or not name:
            continue
        if name in graph_inputs:
            inputs.add(name)
            continue
        index = producer.get(name)
        if index is None or index in keep:
            continue
        keep.add(index)
        node = graph.node[index]
        todo.extend(node.input)
        for attr in node.attribute:  # subgraphs (If/Loop) read outer names too
            for sub in list(attr.g.node if attr.HasField("g") else []) + [n for g in attr.graphs for n in g.node]:
                todo.extend(sub.input)
    return [graph.node[i] for i in sorted(keep)], inputs


def split_unet(folder: str | Path, log=print) -> dict:
    """Write the two graphs into FOLDER/unet and record them in sdrt.json; returns the record."""
    import onnx
    from onnx import TensorProto, helper

    folder = Path(folder)
    unet_dir = folder / "unet"
    source = unet_dir / "model.onnx"
    if not source.is_file():
        raise ExportError(f"{folder} has no unet/model.onnx; give a folder written by `sdrt export`")
    config = json.loads((unet_dir / "config.json").read_text())
    if config.get("in_channels", 4) != 4 or config.get("addition_embed_type"):
        log("note: step caching is measured on SD 1.x/2.x UNets; this one is split the same way")
    last = len(config.get("up_block_types", ())) - 1
    if last < 1:
        raise ExportError(f"{source}: a UNet with {last + 1} up blocks has no deep part to cache")
    model = onnx.load(str(source), load_external_data=False)  # weights stay in model.onnx_data, referenced
    graph = model.graph
    feature = find_deep_feature(graph, last)
    channels = list(reversed(config["block_out_channels"]))[last - 1]  # the up block before the last one's width
    feature_info = helper.make_tensor_value_info(FEATURE, TensorProto.FLOAT,
                                                 ["batch", channels, "latent_height", "latent_width"])

    # The full graph: the UNet + an Identity giving the feature its public name.
    full = onnx.ModelProto()
    full.CopyFrom(model)
    full.graph.node.append(helper.make_node("Identity", [feature], [FEATURE], name="sdrt_deepcache_feature"))
    full.graph.output.append(feature_info)
    # The shallow graph: what out_sample needs once the feature is given.
    nodes, inputs = _needed(graph, [o.name for o in graph.output], {feature})
    if "sample" not in inputs or len(nodes) >= len(graph.node):
        raise ExportError(f"{source}: cutting at {feature!r} did not leave a shallow branch")
    used = {name for node in nodes for name in node.input}
    shallow_graph = helper.make_graph(
        nodes, f"{graph.name}_shallow",
        [i for i in graph.input if i.name in inputs] + [helper.make_tensor_value_info(
            feature, TensorProto.FLOAT, ["batch", channels, "latent_height", "latent_width"])],
        list(graph.output),
        initializer=[t for t in graph.initializer if t.name in used],
        value_info=[v for v in graph.value_info if v.name in used],
    )
    shallow = helper.make_model(shallow_graph, opset_imports=model.opset_import, producer_name="sdrt deepcache")
    shallow.ir_version = model.ir_version
    for f in model.functions:  # local functions the kept nodes call
        shallow.functions.append(f)
    # The shallow graph's feature input under its public name.
    for node in shallow.graph.node:
        for k, name in enumerate(node.input):
            if name == feature:
                node.input[k] = FEATURE
    shallow.graph.input[-1].name = FEATURE
    onnx.save(full, str(unet_dir / FULL_FILE))
    onnx.save(shallow, str(unet_dir / SHALLOW_FILE))
    record = {"full": f"unet/{FULL_FILE}", "shallow": f"unet/{SHALLOW_FILE}", "feature": FEATURE,
              "feature_channels": channels, "cut_at": feature, "up_block": last,
              "nodes": {"unet": len(graph.node), "shallow": len(shallow.graph.node)}}
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[MANIFEST_KEY] = record
    atomic_write_json(manifest_path, manifest)
    log(f"step caching: {FULL_FILE} (+ {FEATURE}, {channels} channels) and {SHALLOW_FILE} "
        f"({len(shallow.graph.node)} of {len(graph.node)} nodes) in {unet_dir}")
    return record
