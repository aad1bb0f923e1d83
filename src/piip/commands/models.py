"""``piip models``: list the registered configurations."""
from __future__ import annotations

import argparse

from ..registry import describe_model, get_config, list_models


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models")
    p.add_argument("pattern", nargs="?", default=None, help="shell wildcard, e.g. 'piip_tsb*'")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no registered model matches {args.pattern!r}")
    width = max(len(n) for n in names)
    print(f"{'name':{width}s}  {'resolutions':18s} description")
    for name in names:
        cfg = get_config(name)
        res = "/".join(str(round(b.img_size)) for b in cfg.branches)
        print(f"{name:{width}s}  {res:18s} {describe_model(name)}")
    return 0
