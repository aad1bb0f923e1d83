"""Released weights by name, offline: each test lays out a Hugging Face cache folder (in tmp_path) holding
official-format files made in the test, switches the Hub client offline, and runs the real code
(``create_model(pretrained=True)``, ``piip predict --pretrained``, ``piip chat --model <repo>``)."""
import os

import pytest
import torch

import piip
from piip.cli import main
from piip.weights import to_official_state_dict
from piip.weights.hub import REPO, RELEASES, download

huggingface_hub = pytest.importorskip("huggingface_hub", reason="released weights need piip[hub]")

SMALL = {"embed_dim": 32, "num_heads": 2, "depth": 2, "interaction_groups": [[0, 0], [1, 1]]}
DENSE = dict(img_size=128, branches=SMALL, deform_num_heads=2)
CLS = dict(img_size=64, branches=SMALL, deform_num_heads=2)
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline (what HF_HUB_CACHE / HF_HUB_OFFLINE=1 set, for this process)."""
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _snapshot(cache, repo: str):
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(SHA)
    snap = root / "snapshots" / SHA
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _put(cache, filename: str, obj) -> str:
    path = _snapshot(cache, REPO) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return str(path)


def _mmdet_heads(in_ch: int, num_classes: int = 80, ch: int = 256) -> dict:
    """Random mmdet 2.x Mask R-CNN neck / RPN / RoI head tensors (the released layout)."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.01  # noqa: E731
    sd = {}
    for i in range(4):
        sd.update({f"neck.lateral_convs.{i}.conv.weight": r(ch, in_ch, 1, 1), f"neck.lateral_convs.{i}.conv.bias": r(ch),
                   f"neck.fpn_convs.{i}.conv.weight": r(ch, ch, 3, 3), f"neck.fpn_convs.{i}.conv.bias": r(ch),
                   f"roi_head.mask_head.convs.{i}.conv.weight": r(ch, ch, 3, 3),
                   f"roi_head.mask_head.convs.{i}.conv.bias": r(ch)})
    sd.update({"rpn_head.rpn_conv.weight": r(ch, ch, 3, 3), "rpn_head.rpn_conv.bias": r(ch),
               "rpn_head.rpn_cls.weight": r(3, ch, 1, 1), "rpn_head.rpn_cls.bias": r(3),
               "rpn_head.rpn_reg.weight": r(12, ch, 1, 1), "rpn_head.rpn_reg.bias": r(12),
               "roi_head.bbox_head.shared_fcs.0.weight": r(1024, ch * 49), "roi_head.bbox_head.shared_fcs.0.bias": r(1024),
               "roi_head.bbox_head.shared_fcs.1.weight": r(1024, 1024), "roi_head.bbox_head.shared_fcs.1.bias": r(1024),
               "roi_head.bbox_head.fc_cls.weight": r(num_classes + 1, 1024),
               "roi_head.bbox_head.fc_cls.bias": r(num_classes + 1),
               "roi_head.bbox_head.fc_reg.weight": r(4 * num_classes, 1024),
               "roi_head.bbox_head.fc_reg.bias": r(4 * num_classes),
               "roi_head.mask_head.upsample.weight": r(ch, ch, 2, 2), "roi_head.mask_head.upsample.bias": r(ch),
               "roi_head.mask_head.conv_logits.weight": r(num_classes, ch, 1, 1),
               "roi_head.mask_head.conv_logits.bias": r(num_classes)})
    return sd


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def test_pretrained_classifier_and_backbone_come_from_the_cache(hub_cache):
    name = "piip_tsb_368_192_128_cls"
    ref = _randomize(piip.create_model(name, **CLS)).eval()
    _put(hub_cache, RELEASES[name], {"model": to_official_state_dict(ref)})
    got = piip.create_model(name, pretrained=True, **CLS).eval()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in got.state_dict().items())
    ten = piip.create_model(name, pretrained=True, num_classes=10, **CLS)   # released backbone, a new head
    assert ten.num_classes == 10 and torch.equal(ten.backbone.branches[1].pos_embed, ref.backbone.branches[1].pos_embed)
    timm = pytest.importorskip("timm")
    via_timm = timm.create_model(name, pretrained=True, **CLS)
    assert torch.equal(via_timm.heads[0].fc.weight, ref.heads[0].fc.weight)

    det = "piip_tsb_1120_896_448"
    body = _randomize(piip.create_model(det, **DENSE))
    _put(hub_cache, RELEASES[det], {"state_dict": {**to_official_state_dict(body), **_mmdet_heads(32)}})
    bb = piip.create_model(det, pretrained=True, **DENSE)
    assert all(torch.equal(v, body.state_dict()[k]) for k, v in bb.state_dict().items())


def test_missing_or_unreleased_is_one_line(hub_cache):
    with pytest.raises(OSError) as e:
        download("piip_tsb_1568_896_448")
    msg = str(e.value)
    assert "\n" not in msg and f"{REPO}/{RELEASES['piip_tsb_1568_896_448']}" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(ValueError, match="no checkpoint was released for deit_b_224_cls"):
        piip.create_model("deit_b_224_cls", pretrained=True)
    with pytest.raises(ValueError, match="PIIP-LLaVA_CLIP-BL_512-256_7B"):
        piip.create_model("piip_llava_clip_bl_512_256", pretrained=True)


def test_predict_pretrained_runs_the_released_mask_rcnn(hub_cache, tmp_path, capsys):
    from PIL import Image

    from piip.zoo.released import released_detector
    name = "piip_tsb_1120_896_448"
    body = _randomize(piip.create_model(name, **DENSE))
    heads = _mmdet_heads(32)
    heads["roi_head.bbox_head.fc_cls.bias"][0] = 8.0     # class 0 (person) wins every box
    _put(hub_cache, RELEASES[name], {"state_dict": {**to_official_state_dict(body), **heads}})
    det = released_detector(name, **DENSE)
    sd = det.state_dict()
    assert torch.equal(sd["roi_heads.box_predictor.cls_score.weight"][1:], heads["roi_head.bbox_head.fc_cls.weight"][:80])
    assert torch.equal(sd["backbone.body.branches.0.pos_embed"], body.branches[0].pos_embed)
    assert det.det_cfg.class_names[0] == "person"
    img = tmp_path / "img.png"
    Image.new("RGB", (128, 96), (120, 80, 40)).save(img)
    args = ["predict", str(img), "--model", name, "--pretrained", "--img-size", "128", "--override",
            '{"branches": {"embed_dim": 32, "num_heads": 2, "depth": 2, "interaction_groups": [[0, 0], [1, 1]]}, '
            '"deform_num_heads": 2}', "--score-thresh", "0.0", "--out", str(tmp_path / "out.png")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "drawn on" in out and "person" in out and (tmp_path / "out.png").is_file()
    assert main(["predict", str(img), "--model", "piip_tsb_1568_896_448", "--pretrained"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and RELEASES["piip_tsb_1568_896_448"] in err[0]


def test_chat_reads_a_released_llava_repo_from_the_cache(hub_cache, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    from piip.llava.loading import load_model
    from piip.llava.tiny import save_tiny_model
    repo = "OpenGVLab/PIIP-LLaVA_CLIP-BL_512-256_7B"
    save_tiny_model(str(_snapshot(hub_cache, repo)))
    model, proc = load_model(repo, "fp32", "cpu")
    assert proc.image_seq_length == 16 and model.config.model_type == "piip_llava"
    with pytest.raises(OSError, match="PIIP-LLaVA_ConvNeXt-B_CLIP-L_640-224_7B"):
        load_model("OpenGVLab/PIIP-LLaVA_ConvNeXt-B_CLIP-L_640-224_7B", "fp32", "cpu")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
