"""Model-override arguments shared by the training / evaluation / prediction commands."""
from __future__ import annotations

import argparse
import json
from typing import Any


def add_model_args(p: argparse.ArgumentParser, default_model: str | None = None) -> None:
    p.add_argument("--model", default=default_model, help="registered model name (see `piip models`)")
    p.add_argument("--img-size", type=int, default=None, help="finest-branch resolution (rescales all branches)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE|JSON",
                   help="model config override, repeatable: 'branches.embed_dim=32', 'deform_num_heads=2' or a "
                        "JSON object such as '{\"branches\": {\"depth\": 2}}'")


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def parse_overrides(items: list[str], img_size: int | None = None) -> dict[str, Any]:
    """``['branches.embed_dim=32', '{"merge": "linear"}']`` -> ``{'branches': {'embed_dim': 32}, 'merge': 'linear'}``."""
    out: dict[str, Any] = {}
    for item in items:
        item = item.strip()
        if item.startswith("{"):
            try:
                obj = json.loads(item)
            except json.JSONDecodeError as e:
                raise ValueError(f"--override {item!r} is not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"--override JSON must be an object, got {item!r}")
            _merge(out, obj)
            continue
        if "=" not in item:
            raise ValueError(f"--override expects KEY=VALUE or a JSON object, got {item!r}")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = _parse_value(value.strip())
    if img_size is not None:
        out["img_size"] = img_size
    return out
