"""Text for PIIP-LLaVA: the conversation templates (and the equivalent Jinja chat template), the
processor that expands ``<image>`` and builds labels, and the training collator (llava_spec §3.2-3.4);
the image processor is in :mod:`piip.llava.image_processing`. Labels come from character offsets in
one tokenization per text chunk: every token overlapping an assistant answer (its leading space
included) or the ``</s>`` after it is supervised. The official length arithmetic is
tokenizer-version specific; offsets are not.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .configuration import IMAGE_TOKEN_ID
from .image_processing import PiipLlavaImageProcessor, _flatten, expand2square  # noqa: F401  (re-exported)

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


def jinja_template(template: str) -> Optional[str]:
    """The Jinja chat template that renders Hugging Face messages exactly as :func:`render` renders
    LLaVA turns (``None`` for 'plain', which has no conversation). Messages are ``{"role", "content"}``
    with string content or a list of ``{"type": "text"|"image"}`` parts; a system message replaces
    the template's system prompt."""
    t = get_template(template)
    if t.plain:
        return None
    q = json.dumps
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set sys = messages[0]['content'] if messages[0]['content'] is string else "
        "messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -%}"
        "{%- set msgs = messages[1:] -%}"
        f"{{%- else -%}}{{%- set sys = {q(t.system)} -%}}{{%- set msgs = messages -%}}{{%- endif -%}}"
        f"{{{{ sys }}}}{{{{ {q(t.sep)} }}}}"
        "{%- for m in msgs -%}"
        "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('messages must alternate user / assistant, starting with user') }}{%- endif -%}"
        "{%- if m['content'] is string -%}{%- set text = m['content'] -%}{%- set img = '<image>' in text -%}"
        "{%- else -%}{%- set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
        "| join('\\n') -%}{%- set img = (m['content'] | selectattr('type', 'equalto', 'image') | list | length > 0)"
        " or '<image>' in text -%}{%- endif -%}"
        "{%- if img -%}{%- set text = '<image>\\n' + (text | replace('<image>', '') | trim) -%}{%- endif -%}"
        f"{{%- if m['role'] == 'user' -%}}{{{{ {q(t.roles[0] + ': ')} + text + {q(t.sep)} }}}}"
        f"{{%- else -%}}{{{{ {q(t.roles[1] + ': ')} + text + {q(t.sep2)} }}}}{{%- endif -%}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {q(t.roles[1] + ':')} }}}}{{%- endif -%}}")


class PiipLlavaProcessor(ProcessorMixin):
    """Image processor + tokenizer + template: text with ``<image>`` -> ids with the image expanded to
    ``image_seq_length`` placeholders, plus offset-based labels. A transformers ``ProcessorMixin``:
    ``save_pretrained`` / ``AutoProcessor.from_pretrained`` round-trip it (with its chat template),
    ``apply_chat_template`` and the ``image-text-to-text`` pipeline use it."""


    def __init__(self, image_processor: Optional[PiipLlavaImageProcessor] = None, tokenizer: Any = None,
                 image_seq_length: int = 576, template: str = "vicuna_v1", image_token_id: int = IMAGE_TOKEN_ID,
                 model_max_length: int = 2048, ignore_index: int = -100, chat_template: Optional[str] = None
                 ) -> None:
        get_template(template)
        if image_processor is None or tokenizer is None:
            raise ValueError("PiipLlavaProcessor needs an image_processor and a tokenizer "
                             "(PiipLlavaProcessor.from_config(tokenizer, model.config) builds both)")
        self.image_seq_length, self.template, self.image_token_id = int(image_seq_length), template, int(image_token_id)
        self.model_max_length, self.ignore_index = int(model_max_length), int(ignore_index)
        if tokenizer.pad_token_id is None:  # the official rule: pad = unk (id 0)
            tokenizer.pad_token = tokenizer.unk_token
        super().__init__(image_processor, tokenizer,
                         chat_template=chat_template if chat_template is not None else jinja_template(template))

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    @classmethod
    def from_config(cls, tokenizer: Any, config: Any, template: Optional[str] = None) -> "PiipLlavaProcessor":
        """Everything but the tokenizer from a :class:`PiipLlavaConfig`."""
        ip = PiipLlavaImageProcessor(config.image_size, config.image_mean, config.image_std,
                                     config.image_aspect_ratio == "pad", config.pad_color)
        return cls(ip, tokenizer, image_seq_length=config.image_seq_length,
                   template=template or config.conv_template, image_token_id=config.image_token_id,
                   model_max_length=config.model_max_length, ignore_index=config.ignore_index)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> "PiipLlavaProcessor":
        """A saved processor; folders written by earlier piip versions (``piip_llava_processor.json``)
        or holding only a model config and a tokenizer load too."""
        if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "processor_config.json")):
            return super().from_pretrained(path, **kwargs)
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
        legacy = os.path.join(path, LEGACY_FILE)
        if not os.path.isfile(legacy):
            from .configuration import PiipLlavaConfig
            return cls.from_config(tok, PiipLlavaConfig.from_pretrained(path))
        with open(legacy) as f:
            d = json.load(f)
        return cls(PiipLlavaImageProcessor(**d.pop("image_processor")), tok, **d)

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

    def __call__(self, text: Any = None, images: Any = None, return_labels: bool = False,
                 return_tensors: Optional[str] = "pt", padding: Any = True, add_special_tokens: bool = True,
                 **kwargs: Any) -> BatchFeature:
        """Prompt text(s) with ``<image>`` (+ one image per text) -> a left-padded batch for ``generate``
        / ``forward``. Text comes first; ``processor(images, text)`` (transformers' order) works too.
        Every ``<image>`` is expanded to the model's visual tokens; an image without its ``<image>`` is
        an error, never silently dropped."""
        if _is_text(images) or (text is not None and not _is_text(text)):
            images, text = text, images
        if text is None:
            raise ValueError("PiipLlavaProcessor needs text (a prompt holding <image> where the image goes)")
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _IGNORED_KWARGS)
        if unknown:
            raise ValueError(f"PiipLlavaProcessor does not take {unknown}")
        if padding not in (True, "longest"):
            raise ValueError(f"padding={padding!r}: PiipLlavaProcessor always left-pads to the longest prompt")
        texts = [text] if isinstance(text, str) else list(text)
        n_img = [t.count(IMAGE) for t in texts]
        pixel_values = self.image_processor.pixel_values(images) if images is not None and \
            any(True for _ in _flatten(images)) else None
        n_given = 0 if pixel_values is None else pixel_values.shape[0]
        # prompts with <image> and no images give ids only (pixel_values come separately; the model
        # refuses placeholders without them); images without their tag would be dropped: refused
        if any(n > 1 for n in n_img) or (n_given and n_given != sum(n_img)):
            raise ValueError(f"{n_given} image(s) for prompts holding {n_img} <image> tags: each prompt takes at "
                             "most one <image> and one image per <image> (processor.prompt(question) or "
                             "apply_chat_template writes the tag)")
        if n_given and n_given != len(texts):
            raise ValueError(f"{n_given} image(s) for {len(texts)} prompts: batch prompts with an image each, or "
                             "run text-only prompts separately")
        rows = [self.tokenize(t) for t in texts]
        n = max(len(r[0]) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for b, (r, _) in enumerate(rows):
            ids[b, n - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[b, n - len(r):] = 1
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if return_labels:
            lab = torch.full((len(rows), n), self.ignore_index, dtype=torch.long)
            for b, (_, r) in enumerate(rows):
                lab[b, n - len(r):] = torch.tensor(r, dtype=torch.long)
            out["labels"] = lab
        if pixel_values is not None:
            out["pixel_values"] = pixel_values
        return BatchFeature(out, tensor_type=return_tensors)

    def decode(self, ids: Any, **kwargs: Any) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode(_drop_placeholders(ids), **kwargs).strip()

    def batch_decode(self, ids: Any, **kwargs: Any) -> list[str]:
        return [self.decode(row, **kwargs) for row in ids]

    def post_process_image_text_to_text(self, generated_outputs: Any, skip_special_tokens: bool = True,
                                        **kwargs: Any) -> list[str]:
        """Decode (the pipeline also decodes the prompt: its image placeholders are dropped)."""
        return [self.tokenizer.decode(_drop_placeholders(row), skip_special_tokens=skip_special_tokens, **kwargs)
                for row in generated_outputs]


LEGACY_FILE = "piip_llava_processor.json"   # written by piip before the processor was a ProcessorMixin
# options transformers' callers (apply_chat_template, pipelines) pass that do not change this processor's output
_IGNORED_KWARGS = {"truncation", "max_length", "videos", "audio", "text_kwargs", "images_kwargs", "common_kwargs",
                   "processor_kwargs"}


def _is_text(x: Any) -> bool:
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and bool(x) and all(isinstance(t, str) for t in x))


def _drop_placeholders(ids: Any) -> list[int]:
    """Token ids without the image placeholders (negative, outside every vocabulary)."""
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids) if int(i) >= 0]


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
