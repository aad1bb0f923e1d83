"""PIIP-LLaVA through Hugging Face's own entry points: AutoProcessor / AutoImageProcessor, the chat
template, the image-text-to-text pipeline and accelerate disk offload (tiny random model)."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="PIIP-LLaVA needs transformers (pip install 'piip[llava]')")
pytest.importorskip("sentencepiece", reason="the tiny tokenizer needs sentencepiece (pip install 'piip[llava]')")

from PIL import Image  # noqa: E402
from transformers import AutoImageProcessor, AutoProcessor  # noqa: E402

from piip.llava import (IMAGE_TOKEN_ID, PiipLlavaForConditionalGeneration, PiipLlavaImageProcessor,  # noqa: E402
                        PiipLlavaProcessor)
from piip.llava.tiny import save_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save_tiny_model(str(tmp_path_factory.mktemp("tiny_llava"))))


def _image(w=60, h=40, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _messages(img):
    return [{"role": "user", "content": [{"type": "image", "image": img},
                                         {"type": "text", "text": "What is in the image?"}]}]


def test_auto_classes_load_the_saved_processor_with_its_chat_template(folder):
    assert os.path.isfile(os.path.join(folder, "chat_template.jinja"))
    proc = AutoProcessor.from_pretrained(folder)
    assert isinstance(proc, PiipLlavaProcessor) and proc.image_seq_length == 16
    ip = AutoImageProcessor.from_pretrained(folder)
    assert isinstance(ip, PiipLlavaImageProcessor) and ip.size == 64
    img = _image()
    # the chat template renders exactly the released conversation format
    assert proc.apply_chat_template(_messages(img), add_generation_prompt=True) == proc.prompt("What is in the image?")
    two = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nHi"},
           {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again?"}]
    assert proc.apply_chat_template(two, add_generation_prompt=True) == \
        "Be brief. USER: <image>\nHi ASSISTANT: Hello</s>USER: Again? ASSISTANT:"
    out = proc.apply_chat_template(_messages(img), add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")
    assert int((out["input_ids"] == IMAGE_TOKEN_ID).sum()) == 16     # the image is in the sequence
    assert torch.equal(out["pixel_values"], ip(img, return_tensors="pt")["pixel_values"])
    with pytest.raises(ValueError, match="image"):    # an image without its <image> tag is never dropped
        proc(text="no tag here", images=img)


def test_pipeline_answers_as_generate(folder):
    from transformers import pipeline
    pipe = pipeline("image-text-to-text", model=folder)
    img = _image()
    got = pipe(text=_messages(img), max_new_tokens=4, generate_kwargs={"do_sample": False})[0]["generated_text"][-1]["content"]
    model = PiipLlavaForConditionalGeneration.from_pretrained(folder).eval()
    proc = AutoProcessor.from_pretrained(folder)
    ids = model.generate(**proc(proc.prompt("What is in the image?"), images=img), max_new_tokens=4, do_sample=False)
    assert got == proc.post_process_image_text_to_text(ids)[0]


def test_disk_offload_matches_in_memory(folder, tmp_path):
    proc = AutoProcessor.from_pretrained(folder)
    inputs = proc(proc.prompt("What is in the image?"), images=_image())
    ref = PiipLlavaForConditionalGeneration.from_pretrained(folder).eval()
    dm = {"model.vision_tower": "disk", "model.multi_modal_projector": "disk", "model.language_model": "cpu",
          "lm_head": "cpu"}
    off = PiipLlavaForConditionalGeneration.from_pretrained(folder, device_map=dm,
                                                            offload_folder=str(tmp_path / "off")).eval()
    assert any(p.is_meta for p in off.model.vision_tower.parameters())   # really offloaded
    with torch.no_grad():
        torch.testing.assert_close(off(**inputs).logits, ref(**inputs).logits)


def test_folder_saved_by_earlier_piip_still_loads(folder, tmp_path):
    proc = PiipLlavaProcessor.from_pretrained(folder)
    old = tmp_path / "old"
    proc.tokenizer.save_pretrained(old)
    (old / "piip_llava_processor.json").write_text(json.dumps(
        {"image_processor": {"size": 64, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "pad": False,
                             "pad_color": [0, 0, 0]},
         "image_seq_length": 16, "template": "vicuna_v1", "image_token_id": IMAGE_TOKEN_ID,
         "model_max_length": 100, "ignore_index": -100}))
    back = PiipLlavaProcessor.from_pretrained(str(old))
    assert back.model_max_length == 100 and back.image_processor.image_mean == [0.5] * 3
