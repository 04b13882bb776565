"""torch-ucp inspect URL: every key of a checkpoint with its dtype, shape, bytes, stored
pieces and saved layout, and the checkpoint's totals, without reading any tensor data.

Reads torch_ucp checkpoints (JSON .metadata: fragments per tensor, the mesh and placements
each tensor was saved from), stock DCP checkpoints (pickled .metadata: chunks per tensor;
the layout too when saved with UCPSavePlanner; a stock .metadata is a pickle, read only with
--trust-pickle), DeepSpeed universal checkpoints and safetensors weights.

Examples:
  torch-ucp inspect ./step-100
  torch-ucp inspect s3://bucket/run/step-100 --keys 'model.layers.0.*' -o endpoint_url=...
  torch-ucp inspect ./step-100 --json | jq '.tensors | keys'
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from torch_ucp.cli.common import (
    add_keys_argument,
    add_storage_arguments,
    add_trust_argument,
    plural,
    storage_options,
)
from torch_ucp.metadata.dtypes import dtype_to_name
from torch_ucp.metadata.fields import mesh_to_json, placement_to_json
from torch_ucp.metadata.schema import MeshInfo
from torch_ucp.sizes import human_bytes
from torch_ucp.tools.sources import CheckpointSource, TensorInfo, open_source, select_keys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="checkpoint folder: path or fsspec URL")
    parser.add_argument("--json", action="store_true", help="print everything as one JSON object")
    add_keys_argument(
        parser,
        "show only keys matching any of these shell patterns, e.g. --keys 'model.*' "
        "'optim.state.model.output.*' (give it after URL; totals then count the shown keys)",
    )
    add_trust_argument(parser)
    add_storage_arguments(parser)


def _dtype(t: TensorInfo) -> str:
    try:
        return dtype_to_name(t.dtype)
    except ValueError:
        return str(t.dtype).removeprefix("torch.")


def _mesh(mesh: MeshInfo) -> str:
    if mesh.dim_names:
        return "(" + ", ".join(f"{n}={s}" for n, s in zip(mesh.dim_names, mesh.shape)) + ")"
    return "(" + ", ".join(str(s) for s in mesh.shape) + ")"


_SAVED_AS = {"sharded_tensor": "ShardedTensor"}


def _layout(t: TensorInfo) -> str:
    held = _SAVED_AS.get(t.saved_as, t.saved_as) if t.saved_as else None
    if t.mesh is None or t.placements is None:
        return f"{held} ({plural(t.pieces, 'shard')})" if held else "-"
    layout = f"mesh{_mesh(t.mesh)} [{', '.join(str(p) for p in t.placements)}]"
    return f"{held} {layout}" if held else layout


def describe(source: CheckpointSource, patterns: list[str] | None = None) -> dict[str, Any]:
    """Everything ``inspect`` shows, as JSON-ready data."""
    keys = select_keys(source.keys(), patterns)
    tensors = {}
    values = {}
    for key in keys:
        t = source.tensors.get(key)
        if t is not None:
            tensors[key] = {
                "dtype": _dtype(t),
                "shape": list(t.shape),
                "bytes": t.nbytes,
                source.pieces_name: t.pieces,
                "mesh": mesh_to_json(t.mesh, ranks=False) if t.mesh else None,
                "placements": [placement_to_json(p) for p in t.placements] if t.placements else None,
            }
            if t.saved_as:  # only where it says something (a ShardedTensor), as in the header
                tensors[key]["saved_as"] = t.saved_as
        else:
            v = source.values[key]
            values[key] = {"encoding": v.encoding, "bytes": v.nbytes}
    summary = source.summary()
    return {
        "url": source.url,
        **summary,
        "meshes": [mesh_to_json(m, ranks=False) for m in source.meshes()],
        "tensors": tensors,
        "values": values,
        "totals": {
            "tensors": len(tensors),
            "values": len(values),
            "bytes": sum(t["bytes"] for t in tensors.values()),
            source.pieces_name: sum(t[source.pieces_name] for t in tensors.values()),
            "keys_in_checkpoint": len(source.keys()),
        },
    }


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def render_text(source: CheckpointSource, info: dict[str, Any]) -> str:
    lines = []
    fmt = info["format"] + (f" (format version {info['version']})" if info["version"] is not None else "")
    lines.append(f"{info['url']}: {fmt}")
    facts = []
    if info["save_id"]:
        facts.append(f"save id {info['save_id']}")
    if info["world_size"] is not None:
        facts.append(f"world size {info['world_size']}")
    if info["data_objects"] is not None:
        facts.append(plural(info["data_objects"], "data object"))
    if info.get("indexes") is not None:
        facts.append(plural(info["indexes"], "fragment index", "fragment indexes"))
    if info["torch_version"]:
        facts.append(f"torch {info['torch_version']}")
    if info["created"]:
        facts.append("saved " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["created"])))
    if facts:
        lines.append(", ".join(facts))
    lines.append("")
    pieces = source.pieces_name
    rows = [["key", "dtype", "shape", "bytes", pieces, "saved layout"]]
    for key, t in info["tensors"].items():
        rows.append(
            [
                key,
                t["dtype"],
                "[" + ", ".join(str(s) for s in t["shape"]) + "]",
                human_bytes(t["bytes"]),
                str(t[pieces]),
                _layout(source.tensors[key]),
            ]
        )
    for key, v in info["values"].items():
        rows.append([key, "value", v["encoding"] or "-", human_bytes(v["bytes"]), "", ""])
    if len(rows) > 1:
        lines.extend(_table(rows, right={3, 4}))
        lines.append("")
    totals = info["totals"]
    selected = ""
    if totals["tensors"] + totals["values"] != totals["keys_in_checkpoint"]:
        selected = f" (selected from {totals['keys_in_checkpoint']} keys)"
    lines.append(
        f"{plural(totals['tensors'], 'tensor')} ({human_bytes(totals['bytes'])}, "
        f"{plural(totals[pieces], pieces.removesuffix('s'))}), "
        f"{plural(totals['values'], 'value')}{selected}"
    )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    source = open_source(args.url, storage_options(args), trust_pickle=args.trust_pickle)
    info = describe(source, args.keys)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(render_text(source, info))
    return 0
