"""Model-override arguments shared by the training / evaluation / prediction commands."""
from __future__ import annotations

import argparse
import json
from typing import Any


def add_model_args(p: argparse.ArgumentParser, default_model: str | None = None) -> None:
    p.add_argument("--model", default=default_model, help="registered model name (see `piip models`)")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="finest-branch resolution, a multiple of 16 (rescales all branches)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE|JSON",
                   help="model config override, repeatable: 'branches.embed_dim=32', 'deform_num_heads=2' or a "
                        "JSON object such as '{\"branches\": {\"depth\": 2}}'")


def add_run_args(p: argparse.ArgumentParser, output_dir: str) -> argparse._ArgumentGroup:
    """The 'run' options every ``piip train TASK`` shares (output, resume, workers, seed, ...)."""
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", default=output_dir)
    r.add_argument("--resume", default=None, help="checkpoint to continue from, or 'auto' (output-dir/checkpoint.pt)")
    r.add_argument("--workers", type=non_negative_int, default=2)
    r.add_argument("--seed", type=non_negative_int, default=0)
    r.add_argument("--device", default="auto")
    r.add_argument("--eval-every", type=non_negative_int, default=1, help="evaluate on the val set every N epochs (0 = never)")
    r.add_argument("--save-every-steps", type=non_negative_int, default=0, help="extra mid-epoch checkpoints")
    r.add_argument("--max-steps", type=positive_int, default=None, help="stop (and save) at this global step")
    r.add_argument("--log-every", type=positive_int, default=20)
    r.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="multi-process training under torchrun: ddp (replicated) or fsdp (weights, gradients and "
                        "optimizer state sharded per block / interaction unit; sharded checkpoints)")
    r.add_argument("--compile", action="store_true", help="torch.compile the PIIP backbone (piip.engine.compile)")
    return r


def _parse_value(item: str, v: str) -> Any:
    """JSON if it parses; a bare word stays a string; text that starts like JSON but does not parse
    is an error (a broken list must not become a string of characters)."""
    try:
        return json.loads(v)
    except json.JSONDecodeError as e:
        if v and v[0] in "[{\"":
            raise ValueError(f"--override {item!r}: the value is not valid JSON ({e.msg} at character {e.pos + 1} "
                             f"of {v!r}); close every bracket and quote every string") from None
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
        node[parts[-1]] = _parse_value(item, value.strip())
    if img_size is not None:
        out["img_size"] = img_size
    return out


def model_overrides(args: Any) -> dict[str, Any]:
    """What the options of :func:`add_model_args` (``--override``, ``--img-size``) ask of the
    model, as ``create_model`` keyword overrides: the one place that reads them."""
    return parse_overrides(args.override, args.img_size)


def _typed(kind: type, test: Any, want: str):  # noqa: ANN202
    def parse(text: str):  # noqa: ANN202
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value
    parse.__name__ = want   # argparse names the type in its messages
    return parse


positive_int = _typed(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _typed(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _typed(float, lambda v: v > 0 and v == v and v != float("inf"), "a number > 0")
non_negative_float = _typed(float, lambda v: v >= 0 and v != float("inf"), "a number >= 0")
unit_float = _typed(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def check_img_size(cfg: Any, flag: str = "--img-size") -> None:
    """:func:`piip.config.check_img_size` under the CLI's flag name."""
    from ..config import check_img_size as check
    check(cfg, flag)
