"""``piip chat``: talk to a PIIP-LLaVA model about one image (needs ``piip[llava]``).

Greedy by default (the official evaluation settings), tokens streamed to the terminal; with
``--prompt`` one answer, otherwise a multi-turn session (the image goes with the first turn).
"""
from __future__ import annotations

import argparse
import os
import sys

from ._model_args import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a PIIP-LLaVA model about an image",
                       description="--model: a piip.llava folder, a released PIIP-LLaVA folder or hub id (converted "
                                   "on the fly), or 'tiny' / 'tiny-convnext' (random, for smoke tests)")
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", default=None, help="one question (omit for an interactive session)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--max-new-tokens", type=positive_int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--template", default="vicuna_v1", choices=["vicuna_v1"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.image):
        raise ValueError(f"--image {args.image}: no such file")
    from PIL import Image

    from ..llava.loading import answer, byte_safe_streamer, load_model
    try:
        image = Image.open(args.image).convert("RGB")
    except OSError as e:
        raise ValueError(f"--image {args.image}: not a readable image ({e})") from None
    model, processor = load_model(args.model, args.dtype, args.device)
    processor.template = args.template
    pixels = processor.image_processor.pixel_values(image)
    streamer = byte_safe_streamer(processor.tokenizer)
    history: list[tuple[str, str]] = []

    def turn(question: str) -> None:
        prompt = processor.prompt(question, image=True, history=history)
        history.append((question, answer(model, processor, prompt, pixels, args.max_new_tokens, args.temperature,
                                         streamer)))
        sys.stdout.flush()

    if args.prompt is not None:
        turn(args.prompt)
        return 0
    print("PIIP-LLaVA chat: empty line or Ctrl-D ends the session", file=sys.stderr)
    while True:
        try:
            q = input("USER: ").strip()
        except EOFError:
            break
        if not q:
            break
        print("ASSISTANT: ", end="", flush=True)
        turn(q)
    return 0
