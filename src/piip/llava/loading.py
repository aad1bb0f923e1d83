"""One entry point for chat / eval: a native folder, a released (official-layout) folder or hub id,
or ``tiny`` / ``tiny-convnext`` (a random tiny model and a tokenizer trained on the spot)."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

import torch

TINY = {"tiny": "clip", "tiny-convnext": "convnext"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    return torch.device(device)


def load_model(spec: str, dtype: str = "auto", device: str = "auto") -> tuple[Any, Any]:
    """(model in eval mode on ``device``, processor) for ``spec``."""
    from .modeling import PiipLlavaForConditionalGeneration
    from .official import from_official
    from .processing import PiipLlavaProcessor
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # chat / eval print answers, not loading bars
    dev = resolve_device(device)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)} or auto, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    if spec in TINY:
        import shutil

        from .tiny import save_tiny_model
        path = save_tiny_model(tempfile.mkdtemp(prefix="piip_llava_tiny_"), TINY[spec])
        try:
            return load_model(path, dtype, device)
        finally:
            shutil.rmtree(path, ignore_errors=True)
    if not os.path.isdir(spec):
        spec = _hub_snapshot(spec)
    cfg_path = os.path.join(spec, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"--model {spec}: no config.json; expected a piip.llava or released PIIP-LLaVA folder")
    with open(cfg_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type == "piip_llava":
        model = PiipLlavaForConditionalGeneration.from_pretrained(spec, dtype=torch_dtype)
        processor = PiipLlavaProcessor.from_pretrained(spec)
    else:  # a released folder: converted on the fly
        model, processor = from_official(spec, dtype=torch_dtype)
        if processor is None:
            raise ValueError(f"--model {spec}: the folder has no tokenizer (tokenizer.model / tokenizer.json)")
    return model.to(dev).eval(), processor


def _hub_snapshot(spec: str) -> str:
    """The local folder of hub id ``spec`` (cache first, one-line errors); a path-looking ``spec`` that is
    not a folder is reported as such, not as a network failure."""
    if os.path.exists(spec):
        raise ValueError(f"--model {spec}: is a file; give the model folder (config.json + weights)")
    first = spec.split("/")[0]
    if spec.count("/") != 1 or spec.startswith((".", "~", os.sep)) or os.path.isdir(first):
        raise ValueError(f"--model {spec}: no such folder (and not a hub id owner/name or one of {sorted(TINY)})")
    from ..weights.hub import _hub, from_hub
    hf = _hub()
    return from_hub(lambda: hf.snapshot_download(spec), f"--model {spec} (no such local folder; as a hub id)",
                    "check the path, or download the model on a connected machine first", error=OSError)


def greedy_kwargs(processor: Any, max_new_tokens: int, temperature: float = 0.0) -> dict[str, Any]:
    """Generation settings of the official evaluation: greedy unless a temperature is given."""
    tok = processor.tokenizer
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": 1, "eos_token_id": tok.eos_token_id,
                          "pad_token_id": tok.pad_token_id}
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=None, top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def byte_safe_streamer(tokenizer: Any) -> Any:
    """A ``TextStreamer`` (prompt skipped, special tokens dropped) that prints exactly the text ``answer``
    returns. A run of byte-fallback tokens (``<0xNN>``, how Llama tokenizers spell characters outside
    the vocabulary) is decoded as a whole: a later byte can turn the characters already shown into
    U+FFFD, and transformers >= 5.2x prints letters and digits as soon as they appear. So nothing is
    printed while the newest token is a byte token; the run is shown once it is complete."""
    import re

    from transformers import TextStreamer
    byte_ids = {i for t, i in tokenizer.get_vocab().items() if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t)}

    class ByteSafeStreamer(TextStreamer):
        def put(self, value: torch.Tensor) -> None:
            row = value[0] if value.dim() > 1 else value
            if not (self.skip_prompt and self.next_tokens_are_prompt) and row.numel() and int(row[-1]) in byte_ids:
                self.token_cache.extend(row.tolist())   # held back; printed with the next non-byte token or at end()
                return
            super().put(value)

    return ByteSafeStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def answer(model: Any, processor: Any, prompt: str, pixel_values: Optional[torch.Tensor], max_new_tokens: int,
           temperature: float = 0.0, streamer: Any = None) -> str:
    """Generate an answer for one rendered prompt (batch size 1, as the official evaluation)."""
    inputs = processor(prompt)
    dev = next(model.parameters()).device
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values.to(dev)
    out = model.generate(**inputs, streamer=streamer, **greedy_kwargs(processor, max_new_tokens, temperature))
    return processor.decode(out[0])
