"""Images and text for PIIP-LLaVA: the image processor, the conversation templates, the processor
that expands ``<image>`` and builds labels, and the training collator (llava_spec §1.4, §3.2-3.4).

The image processor is pure PIL + torch (no transformers image-processor backend, whose defaults
changed between v4 and v5). Labels come from character offsets in one tokenization per text chunk:
every token overlapping an assistant answer (its leading space included) or the ``</s>`` after it
is supervised. The official length arithmetic is tokenizer-version specific; offsets are not.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .configuration import IMAGE_TOKEN_ID, IMAGENET_MEAN, IMAGENET_STD, PAD_COLOR

IMAGE = "<image>"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Template:
    """A conversation format: ``system + sep`` then ``ROLE: message`` + (sep after a user turn,
    sep2 after an assistant turn); ``plain`` (stage 1) is ``<image>`` + caption + ``\\n``."""

    name: str
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"
    plain: bool = False


TEMPLATES = {"vicuna_v1": Template("vicuna_v1", VICUNA_SYSTEM),
             "plain": Template("plain", sep="\n", sep2="\n", plain=True)}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; available: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def render(turns: Sequence[dict[str, str]], template: str = "vicuna_v1",
           add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """LLaVA-format turns (``{"from": "human"|"gpt", "value": ...}``) -> (text, supervised character spans).

    ``<image>`` is moved to the front of its message (``"<image>\\n" + rest``, as the official
    preprocessing does). With ``add_generation_prompt`` the text ends with ``"ASSISTANT:"``."""
    t = get_template(template)
    if t.plain:  # stage 1: the caption after the image, no roles, no system prompt
        if len(turns) != 2 or IMAGE not in turns[0]["value"]:
            raise ValueError("the 'plain' template takes exactly 2 turns, the first holding <image>")
        text = IMAGE
        start = len(text)
        text += turns[1]["value"] + t.sep
        return text, [(start, len(text))]
    text, spans = t.system + t.sep, []
    for i, turn in enumerate(turns):
        role_i = 0 if turn["from"] in ("human", "user") else 1
        if role_i != i % 2:
            raise ValueError(f"turn {i} is from {turn['from']!r}: turns must alternate human / gpt, starting with human")
        msg = turn["value"]
        if IMAGE in msg:
            msg = IMAGE + "\n" + msg.replace(IMAGE, "").strip()
        text += t.roles[role_i] + ":"
        if role_i == 1:  # supervise " answer</s>" (the space belongs to the answer's first token)
            start = len(text)
            text += " " + msg + t.sep2
            spans.append((start, len(text)))
        else:
            text += " " + msg + t.sep
    if add_generation_prompt:
        text += t.roles[1] + ":"
    return text, spans


def expand2square(img: Any, color: Sequence[int]) -> Any:
    """Paste ``img`` centred on a square canvas of ``color`` (the official pad preprocessing)."""
    from PIL import Image
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), tuple(color))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


class PiipLlavaImageProcessor:
    """RGB -> (pad to square) -> bicubic resize of the shortest edge to ``size`` -> centre crop -> /255
    -> ImageNet normalisation (the official CLIPImageProcessor settings, llava_spec §1.4)."""

    def __init__(self, size: int, image_mean: Sequence[float] = IMAGENET_MEAN,
                 image_std: Sequence[float] = IMAGENET_STD, pad: bool = True,
                 pad_color: Sequence[int] = PAD_COLOR) -> None:
        self.size, self.pad = int(size), bool(pad)
        self.image_mean, self.image_std, self.pad_color = list(image_mean), list(image_std), list(pad_color)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "image_mean": self.image_mean, "image_std": self.image_std, "pad": self.pad,
                "pad_color": self.pad_color}

    def preprocess_one(self, img: Any) -> Tensor:
        from PIL import Image
        img = img.convert("RGB")
        if self.pad:
            img = expand2square(img, self.pad_color)
        w, h = img.size
        s = self.size
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - s) // 2, (nh - s) // 2
        img = img.crop((left, top, left + s, top + s))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(s, s, 3)
        x = x.permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (x - mean) / std

    def __call__(self, images: Any) -> Tensor:
        images = images if isinstance(images, (list, tuple)) else [images]
        return torch.stack([self.preprocess_one(im) for im in images])

    def blank(self) -> Tensor:
        """The zero image a text-only sample gets (normalised zeros, as the official collator)."""
        return torch.zeros(3, self.size, self.size)


class PiipLlavaProcessor:
    """Tokenizer + image processor + template: text with ``<image>`` -> ids with the image expanded to
    ``image_seq_length`` placeholders, plus offset-based labels."""

    def __init__(self, tokenizer: Any, image_processor: PiipLlavaImageProcessor, image_seq_length: int,
                 template: str = "vicuna_v1", image_token_id: int = IMAGE_TOKEN_ID,
                 model_max_length: int = 2048, ignore_index: int = -100) -> None:
        get_template(template)
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_seq_length, self.template, self.image_token_id = int(image_seq_length), template, int(image_token_id)
        self.model_max_length, self.ignore_index = int(model_max_length), int(ignore_index)
        if tokenizer.pad_token_id is None:  # the official rule: pad = unk (id 0)
            tokenizer.pad_token = tokenizer.unk_token

    @classmethod
    def from_config(cls, tokenizer: Any, config: Any, template: Optional[str] = None) -> "PiipLlavaProcessor":
        """Everything but the tokenizer from a :class:`PiipLlavaConfig`."""
        ip = PiipLlavaImageProcessor(config.image_size, config.image_mean, config.image_std,
                                     config.image_aspect_ratio == "pad", config.pad_color)
        return cls(tokenizer, ip, config.image_seq_length, template or config.conv_template, config.image_token_id,
                   config.model_max_length, config.ignore_index)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, "piip_llava_processor.json"), "w") as f:
            json.dump({"image_processor": self.image_processor.to_dict(), "image_seq_length": self.image_seq_length,
                       "template": self.template, "image_token_id": self.image_token_id,
                       "model_max_length": self.model_max_length, "ignore_index": self.ignore_index}, f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str) -> "PiipLlavaProcessor":
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
        cfg_path = os.path.join(path, "piip_llava_processor.json")
        if not os.path.isfile(cfg_path):
            from .configuration import PiipLlavaConfig
            return cls.from_config(tok, PiipLlavaConfig.from_pretrained(path))
        with open(cfg_path) as f:
            d = json.load(f)
        return cls(tok, PiipLlavaImageProcessor(**d.pop("image_processor")), **d)

    # ------------------------------------------------------------------ text
    def tokenize(self, text: str, spans: Sequence[tuple[int, int]] = ()) -> tuple[list[int], list[int]]:
        """``text`` -> (ids, labels). Chunks between ``<image>`` are tokenized separately (each with
        BOS, only the first kept: the official ``tokenizer_image_token``); each ``<image>`` becomes
        ``image_seq_length`` placeholders. Tokens overlapping ``spans`` keep their id as label."""
        ids: list[int] = []
        labels: list[int] = []
        pos = 0
        for k, chunk in enumerate(text.split(IMAGE)):
            if k > 0:
                ids += [self.image_token_id] * self.image_seq_length
                labels += [self.ignore_index] * self.image_seq_length
                pos += len(IMAGE)
            if chunk or k == 0:
                enc = self.tokenizer(chunk, return_offsets_mapping=True, add_special_tokens=True)
                c_ids, offs = list(enc["input_ids"]), list(enc["offset_mapping"])
                if k > 0 and c_ids and c_ids[0] == self.tokenizer.bos_token_id:
                    c_ids, offs = c_ids[1:], offs[1:]
                for i, (a, b) in zip(c_ids, offs):
                    a, b = a + pos, b + pos
                    sup = b > a and any(a < e and b > s for s, e in spans)
                    ids.append(i)
                    labels.append(i if sup else self.ignore_index)
            pos += len(chunk)
        if len(ids) > self.model_max_length:
            cut = self.model_max_length
            if ids[cut - 1] == self.image_token_id and cut < len(ids) and ids[cut] == self.image_token_id:
                raise ValueError(f"a sample of {len(ids)} tokens cannot be truncated to model_max_length={cut} "
                                 "inside its image span; raise model_max_length or shorten the text")
            ids, labels = ids[:cut], labels[:cut]
        return ids, labels

    def encode_conversation(self, turns: Sequence[dict[str, str]], template: Optional[str] = None
                            ) -> tuple[list[int], list[int]]:
        """A LLaVA-format conversation -> (ids, labels) for training."""
        text, spans = render(turns, template or self.template)
        return self.tokenize(text, spans)

    def prompt(self, question: str, image: bool = True, history: Sequence[tuple[str, str]] = ()) -> str:
        """The generation prompt for ``question`` after earlier (question, answer) rounds; the image
        goes with the first user turn."""
        turns: list[dict[str, str]] = []
        for i, (q, a) in enumerate(list(history) + [(question, None)]):
            turns.append({"from": "human", "value": (IMAGE + "\n" + q) if image and i == 0 else q})
            if a is not None:
                turns.append({"from": "gpt", "value": a})
        return render(turns, self.template, add_generation_prompt=True)[0]

    def __call__(self, text: str | Sequence[str], images: Any = None, return_labels: bool = False
                 ) -> dict[str, Tensor]:
        """Prompt text(s) with ``<image>`` (+ images) -> a left-padded batch for ``generate`` / ``forward``."""
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.tokenize(t) for t in texts]
        n = max(len(r[0]) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for b, (r, _) in enumerate(rows):
            ids[b, n - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[b, n - len(r):] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if images is not None:
            out["pixel_values"] = self.image_processor(images)
        return out

    def decode(self, ids: Any) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


@dataclass
class LlavaCollator:
    """Right-pads ids with ``pad_token_id`` and labels with -100; ``attention_mask = ids != pad`` (the
    official rule; placeholders are never the pad id). Text-only samples get a blank image."""

    pad_token_id: int
    blank: Tensor
    ignore_index: int = -100

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        n = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), n), self.ignore_index, dtype=torch.long)
        for b, s in enumerate(samples):
            ids[b, :len(s["input_ids"])] = torch.as_tensor(s["input_ids"])
            labels[b, :len(s["labels"])] = torch.as_tensor(s["labels"])
        pix = torch.stack([s["pixel_values"] if s.get("pixel_values") is not None else self.blank for s in samples])
        return {"input_ids": ids, "labels": labels, "attention_mask": (ids != self.pad_token_id).long(),
                "pixel_values": pix}
