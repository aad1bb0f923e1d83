"""PIIP-LLaVA as a Hugging Face model: projector, forward/loss masking, generate, save/load, processor.

Tokenizer: a SentencePiece BPE model trained in the test (sentencepiece), loaded through AutoTokenizer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="PIIP-LLaVA is a Hugging Face transformers model")
pytest.importorskip("sentencepiece", reason="the test tokenizer is a SentencePiece model trained in the test")

from PIL import Image  # noqa: E402

from piip.llava import (IMAGE_TOKEN_ID, PiipLlavaForConditionalGeneration, PiipLlavaImageProcessor,  # noqa: E402
                        PiipLlavaProcessor, TwoBranchProjector)
from piip.llava.processing import LlavaCollator, render  # noqa: E402
from piip.llava.tiny import _ungate, tiny_config, train_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _model(kind: str = "clip", seed: int = 0) -> PiipLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    m = PiipLlavaForConditionalGeneration(tiny_config(kind))
    _ungate(m)
    return m.eval()


def _image(w: int = 50, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_projector_equals_functional_reference_and_keeps_float32_resize():
    torch.manual_seed(0)
    proj = TwoBranchProjector([32, 48], 64)
    for p in proj.parameters():
        torch.nn.init.normal_(p, std=0.1)
    f0, f1 = torch.randn(2, 32, 4, 4), torch.randn(2, 48, 2, 2)

    def mlp(k, x):
        p = proj.projs[k]
        y = F.linear(x.permute(0, 2, 3, 1), p.fc1.weight, p.fc1.bias).permute(0, 3, 1, 2)
        y = F.gelu(F.group_norm(y, 32, p.norm.weight, p.norm.bias))
        return F.linear(y.permute(0, 2, 3, 1), p.fc2.weight, p.fc2.bias).permute(0, 3, 1, 2)

    want = mlp(0, f0) + mlp(1, F.interpolate(f1, size=(4, 4), mode="bilinear", align_corners=False))
    got = proj([f0, f1])
    assert got.shape == (2, 16, 64)
    assert torch.allclose(got, want.flatten(2).transpose(1, 2), atol=1e-6)
    proj16 = proj.to(torch.bfloat16)
    out = proj16([f0.bfloat16(), f1.bfloat16()])
    assert out.dtype == torch.bfloat16 and (out.float() - got).abs().max() < 0.1


def test_zero_gates_make_the_tower_two_independent_branches():
    torch.manual_seed(0)
    m = PiipLlavaForConditionalGeneration(tiny_config("convnext")).eval()   # fresh: gates are zero
    tower = m.vision_tower
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        states = tower.forward_branches(x)
        views = tower.resize_inputs(x)
        alone = [br.forward_tokens(v) for br, v in zip(tower.branches, views)]
    for s, a in zip(states, alone):
        assert torch.equal(s.x, a.x)


def test_forward_backward_and_loss_ignores_masked_tokens(tok):
    m = _model().train()
    proc = PiipLlavaProcessor.from_config(tok, m.config)
    turns = [{"from": "human", "value": "What is in the image?\n<image>"}, {"from": "gpt", "value": "A red cat."}]
    ids, labels = proc.encode_conversation(turns)
    assert ids.count(IMAGE_TOKEN_ID) == m.config.image_seq_length == 16
    batch = LlavaCollator(tok.pad_token_id, proc.image_processor.blank())(
        [{"input_ids": ids, "labels": labels, "pixel_values": proc.image_processor.pixel_values(_image())[0]}])
    out = m(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # the loss equals cross-entropy on the supervised positions only
    lab = batch["labels"][0, 1:]
    keep = lab != -100
    want = F.cross_entropy(out.logits[0, :-1][keep].float(), lab[keep])
    assert torch.allclose(out.loss, want)
    for part in ("vision_tower", "multi_modal_projector", "language_model"):
        grads = [p.grad for n, p in m.named_parameters() if f".{part}." in f".{n}"]
        assert grads and all(g is not None for g in grads), part


def test_text_only_sample_in_a_batch_keeps_the_tower_in_the_graph(tok):
    m = _model().train()
    proc = PiipLlavaProcessor.from_config(tok, m.config)
    a = proc.encode_conversation([{"from": "human", "value": "<image>\nDescribe the picture."},
                                  {"from": "gpt", "value": "a dog runs"}])
    b = proc.encode_conversation([{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}])
    col = LlavaCollator(tok.pad_token_id, proc.image_processor.blank())
    batch = col([{"input_ids": a[0], "labels": a[1], "pixel_values": proc.image_processor.pixel_values(_image())[0]},
                 {"input_ids": b[0], "labels": b[1]}])
    assert batch["attention_mask"][1].sum() == len(b[0]) and (batch["labels"][1, len(b[0]):] == -100).all()
    m(**batch).loss.backward()
    assert all(p.grad is not None for p in m.vision_tower.parameters())
    with pytest.raises(ValueError, match="0 or 16 image placeholders"):
        m(input_ids=torch.tensor([[1] + [IMAGE_TOKEN_ID] * 5]), pixel_values=torch.zeros(1, 3, 64, 64))


def test_vicuna_and_plain_masks_supervise_exactly_the_answers(tok):
    m = _model()
    proc = PiipLlavaProcessor.from_config(tok, m.config)
    turns = [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A red cat."},
             {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "red"}]
    text, spans = render(turns, "vicuna_v1")
    assert text.startswith("A chat between") and "USER: <image>\nWhat is in the image? ASSISTANT: A red cat.</s>" \
        "USER: What color? ASSISTANT: red</s>" in text
    ids, labels = proc.tokenize(text, spans)
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            cur.append(lab)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    decoded = [tok.decode(r).strip() for r in runs]
    assert decoded == ["A red cat.</s>", "red</s>"]
    plain_ids, plain_labels = proc.encode_conversation([{"from": "human", "value": "<image>"},
                                                        {"from": "gpt", "value": "a dog runs in the park"}], "plain")
    assert plain_ids[0] == tok.bos_token_id and plain_ids[1:17] == [IMAGE_TOKEN_ID] * 16
    assert plain_labels[:17] == [-100] * 17
    assert tok.decode([x for x in plain_labels if x != -100]).strip() == "a dog runs in the park"
    assert tok.decode([x for x in plain_labels if x != -100]).endswith("\n")
    assert proc.prompt("Hi?").endswith("USER: <image>\nHi? ASSISTANT:")


def test_truncation_after_expansion_never_cuts_an_image(tok):
    m = _model()
    proc = PiipLlavaProcessor.from_config(tok, m.config)
    proc.model_max_length = 10
    with pytest.raises(ValueError, match="inside its image span"):
        proc.tokenize("a <image> b")
    proc.model_max_length = 20
    ids, labels = proc.tokenize("<image> a dog runs in the park " * 2)
    assert len(ids) == 20 and len(labels) == 20


def test_image_processor_pads_resizes_and_normalises_like_numpy():
    img = _image(50, 30)
    ip = PiipLlavaImageProcessor(24)
    got = ip(img)["pixel_values"][0]
    canvas = np.zeros((50, 50, 3), np.uint8)
    canvas[:] = (123, 116, 103)
    canvas[10:40] = np.asarray(img)
    ref = np.asarray(Image.fromarray(canvas).resize((24, 24), Image.BICUBIC)).astype(np.float32) / 255.0
    ref = (ref - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    assert np.abs(got.permute(1, 2, 0).numpy() - ref).max() < 1e-5
    sq = PiipLlavaImageProcessor(24, pad=False)(img)["pixel_values"][0]   # square: shortest edge 24, centre crop
    ref2 = np.asarray(img.resize((40, 24), Image.BICUBIC))[:, 8:32].astype(np.float32) / 255.0
    ref2 = (ref2 - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    assert np.abs(sq.permute(1, 2, 0).numpy() - ref2).max() < 1e-5


def test_generate_equals_manual_greedy_loop(tok):
    m = _model("convnext")
    proc = PiipLlavaProcessor.from_config(tok, m.config)
    inputs = proc(proc.prompt("What is in the image?"), images=_image(60, 40))
    got = m.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    ids, emb_ids = [], inputs["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([emb_ids, torch.tensor([ids], dtype=torch.long)], 1) if ids else emb_ids
            logits = m(input_ids=seq, pixel_values=inputs["pixel_values"]).logits
            ids.append(int(logits[0, -1].argmax()))
    assert got[0].tolist() == ids


def test_save_and_from_pretrained_are_bit_exact(tok, tmp_path):
    m = _model()
    m.save_pretrained(tmp_path)
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN_ID] * 16 + [7, 8]])
    pix = torch.randn(1, 3, 64, 64)
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is PiipLlavaForConditionalGeneration
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids, pixel_values=pix).logits, loaded(input_ids=ids, pixel_values=pix).logits)
    assert transformers.AutoConfig.from_pretrained(tmp_path).image_seq_length == 16


def test_from_llm_takes_over_a_causal_lm_without_copying():
    from piip.llava.tiny import tiny_tower
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(tiny_config().text_config).eval()
    model = PiipLlavaForConditionalGeneration.from_llm(lm, tiny_tower("convnext")).eval()
    assert model.lm_head is lm.lm_head and model.language_model is lm.model
    assert not any(t.is_meta for t in model.state_dict().values())
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, lm(input_ids=ids).logits)
        out = model(input_ids=torch.tensor([[1] + [IMAGE_TOKEN_ID] * 16 + [9]]), pixel_values=torch.randn(1, 3, 128, 128))
    assert torch.isfinite(out.logits).all()
