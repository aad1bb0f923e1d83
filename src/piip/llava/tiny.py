"""Tiny random PIIP-LLaVA models and tokenizers: for tests, ``--tiny`` CLI runs and smoke checks.

Nothing is downloaded: the tokenizer is a SentencePiece BPE model trained in well under a second
on a few sentences (needs ``sentencepiece`` + ``protobuf``, part of ``piip[llava]``) and loaded as
transformers' ``LlamaTokenizer`` (unk/bos/eos = 0/1/2, as Vicuna's).
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

from ..branches.flavours import flavour_settings
from ..config import BranchConfig, PIIPConfig
from .configuration import PiipLlavaConfig

SENTENCES = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A red cat sitting on a mat.",
    "a dog runs in the park", "two birds fly over the blue sea",
    "What color is the car? Answer the question using a single word or phrase.",
    "yes no maybe red green blue one two three A B C D", "The image shows a small house with a garden.",
    "Describe the picture in detail.", "caption of a photo",
]


def tiny_tower(kind: str = "clip") -> PIIPConfig:
    """Two tiny branches with the released structure: 'clip' (CLIP+CLIP) or 'convnext' (ConvNeXt+CLIP);
    16 visual tokens either way."""
    if kind not in _TINY_FINE:
        raise ValueError(f"tiny tower kind must be 'clip' or 'convnext', got {kind!r}")
    clip = flavour_settings("clip")
    coarse_size, fine = _TINY_FINE[kind](clip)
    coarse = BranchConfig(img_size=coarse_size, embed_dim=48, depth=4, num_heads=4, pos_grid=2,
                          interaction_groups=[[0, 1], [2, 3]], **clip)
    return PIIPConfig(branches=[fine, coarse], deform_num_heads=4, merge=None, pyramid=None, task="features",
                      image_norm="imagenet")


# tower variant -> (coarse CLIP branch's resolution, fine branch), 16 visual tokens each
_TINY_FINE = {
    "clip": lambda clip: (32, BranchConfig(img_size=64, embed_dim=32, depth=2, num_heads=2, pos_grid=2,
                                           interaction_groups=[[0, 0], [1, 1]], **clip)),
    "convnext": lambda clip: (64, BranchConfig(img_size=128, kind="convnext", stage_dims=[16, 32, 48, 64],
                                               stage_depths=[1, 1, 2, 1], layer_scale=1e-6, pos_grid=None,
                                               interaction_groups=[[0, 3], [4, 7]])),
}


def tiny_config(kind: str = "clip", vocab_size: int = 400, **kwargs: Any) -> PiipLlavaConfig:
    """A 2-layer, 64-wide Llama on a tiny tower."""
    from transformers import LlamaConfig
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return PiipLlavaConfig(vision_config=tiny_tower(kind).to_dict(), text_config=text, **kwargs)


def train_tiny_tokenizer(path: str, vocab_size: int = 400) -> Any:
    """Train a SentencePiece BPE model into ``path`` (``tokenizer.model`` + config) and load it."""
    try:
        import sentencepiece as spm
    except ImportError as e:
        from ..errors import MissingDependency
        raise MissingDependency(f"a tiny tokenizer needs sentencepiece ({e}); pip install 'piip[llava]'") from None
    from transformers import AutoTokenizer
    os.makedirs(path, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 3), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False}, f)
    return AutoTokenizer.from_pretrained(path)


def save_tiny_model(path: str, kind: str = "clip", seed: int = 0) -> str:
    """A random tiny PIIP-LLaVA folder (model + tokenizer + processor) that ``from_pretrained`` loads."""
    import torch

    from .modeling import PiipLlavaForConditionalGeneration
    from .processing import PiipLlavaProcessor
    tok = train_tiny_tokenizer(path)
    torch.manual_seed(seed)
    model = PiipLlavaForConditionalGeneration(tiny_config(kind))
    _ungate(model)
    model.save_pretrained(path)
    PiipLlavaProcessor.from_config(tok, model.config).save_pretrained(path)
    return path


def _ungate(model: Any) -> None:
    """Give the zero-initialised interaction gates random values (so tests see the interactions)."""
    import torch
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("ca_gamma", "cffn_gamma")):
                p.normal_(0, 0.1)


def make_tiny_llava_data(path: str, n: int = 8, seed: int = 0) -> str:
    """A synthetic LLaVA-format set in ``path``: ``n`` random PNGs, ``captions.json`` (stage 1:
    image-caption pairs) and ``data.json`` (stage 2: the same as one-round conversations plus one
    text-only sample). Returns ``path``."""
    import numpy as np
    from PIL import Image
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions, convs = [], []
    for i in range(n):
        w, h = int(rng.integers(32, 96)), int(rng.integers(32, 96))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(path, f"{i}.png"))
        text = SENTENCES[3 + i % 5]
        captions.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": text}]})
        convs.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": text}]})
    convs.append({"id": "text", "conversations": [{"from": "human", "value": "Say yes."},
                                                  {"from": "gpt", "value": "yes"}]})
    for name, rows in (("captions.json", captions), ("data.json", convs)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(rows, f)
    return path
