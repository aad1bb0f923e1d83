"""piip models through timm (registry, features, data config, optimizer layer decay) and through
torchvision's custom-backbone detectors (tiny models)."""
import subprocess
import sys

import pytest
import torch

import piip

timm = pytest.importorskip("timm")

SMALL = {"embed_dim": 32, "num_heads": 2, "depth": 2, "interaction_groups": [[0, 0], [1, 1]]}
DENSE = dict(img_size=128, branches=SMALL, deform_num_heads=2)
CLS = dict(img_size=64, branches=SMALL, deform_num_heads=2)


def test_import_piip_leaves_timm_alone_and_registers_when_timm_loads():
    # an availability probe first (transformers runs one on import): the hook must survive it
    code = ("import sys, importlib.util, piip; assert 'timm' not in sys.modules; importlib.util.find_spec('timm'); "
            "import timm; "
            "print(timm.is_model('piip_tsb_1120_896_448'), len(timm.list_models('piip_*')) + "
            "len(timm.list_models('vit*_1024')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ok, n = r.stdout.split()
    assert ok == "True" and int(n) >= len(piip.list_models("piip_*")) + 2
    assert set(piip.list_models()) <= set(timm.list_models())   # this process: timm imported after piip


def test_timm_create_model_dense_backbone_features_and_data_config():
    m = timm.create_model("piip_tsb_1120_896_448", **DENSE).eval()
    assert [f["reduction"] for f in m.feature_info] == [4, 8, 16, 32] and m.num_features == 32
    cfg = timm.data.resolve_model_data_config(m)
    assert cfg["input_size"] == (3, 128, 128) and cfg["mean"] == (0.5, 0.5, 0.5) and cfg["crop_pct"] == 1.0
    full = timm.data.resolve_model_data_config(timm.create_model("piip_tsb_1568_896_448", pretrained=False,
                                                                 branches=SMALL, deform_num_heads=2))
    assert full["input_size"] == (3, 1568, 1568)
    built = piip.build_from_config(piip.get_config("piip_tsb_1120_896_448", **{**DENSE, "img_size": 224}))
    assert timm.data.resolve_model_data_config(built)["input_size"] == (3, 224, 224)   # no create_model needed
    assert m.pretrained_cfg["hf_hub_id"] == "OpenGVLab/PIIP" and m.pretrained_cfg["hf_hub_filename"] == \
        "detection/mask_rcnn_deit_tsb_1120_896_448_fpn_1x_coco_bs16.pth"
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        maps = list(m(x).values())
        f = timm.create_model("piip_tsb_1120_896_448", features_only=True, out_indices=(1, 3), **DENSE).eval()
        f.model.load_state_dict(m.state_dict())
        got = f(x)
        final, inter = m.forward_intermediates(x, indices=2)
    assert f.feature_info.channels() == [32, 32] and f.feature_info.reduction() == [8, 32]
    assert torch.equal(got[0], maps[1]) and torch.equal(got[1], maps[3])
    assert torch.equal(inter[0], maps[2]) and torch.equal(final, maps[3])
    assert [t.shape[-1] for t in piip.create_model("piip_tsb_1120_896_448", features_only=True, **DENSE)(x)] == \
        [32, 16, 8, 4]
    with pytest.raises(ValueError, match="without a classifier"):
        timm.create_model("piip_tsb_1120_896_448", num_classes=10, **DENSE)
    with pytest.raises(ValueError, match="features_only"):
        piip.create_model("piip_tsb_1120_896_448", out_indices=(1,), **DENSE)
    with pytest.raises(ValueError, match="no classifier"):
        m.reset_classifier(5)


def test_timm_classifier_head_layer_decay_and_checkpointing():
    from timm.optim import create_optimizer_v2
    m = timm.create_model("piip_tsb_368_192_128_cls", num_classes=10, drop_path_rate=0.1, **CLS)
    assert m.num_classes == 10 and m.num_features == 96 and all(b.drop_path == 0.1 for b in m.cfg.branches)
    assert timm.data.resolve_model_data_config(m)["input_size"] == (3, 64, 64)
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales == pytest.approx([0.75 ** 3, 0.75 ** 2, 0.75, 1.0])   # embeddings, 2 blocks, the rest
    pos = m.backbone.branches[0].pos_embed
    assert [g["weight_decay"] for g in opt.param_groups if any(p is pos for p in g["params"])] == [0.0]
    x = torch.randn(2, 3, 64, 64)
    m.eval()
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        assert torch.allclose(m.forward_head(final), m(x)) and [t.shape[1] for t in inter] == [32, 32, 32]
    m.reset_classifier(4)
    assert m.get_classifier()[0].out_features == 4 and m(x).shape == (2, 4)
    m.train().set_grad_checkpointing(True)
    assert all(b.with_cp for b in m.backbone.cfg.branches)
    m(x).sum().backward()
    assert m.backbone.branches[0].blocks[0].attn.qkv.weight.grad is not None


def test_torchvision_detectors_on_backbone_with_fpn():
    from torchvision.models.detection import FasterRCNN, MaskRCNN

    from piip.tasks.detection import backbone_with_fpn
    torch.manual_seed(0)
    bb = backbone_with_fpn("piip_tsb_1120_896_448", out_channels=32, **DENSE)
    assert bb.out_channels == 32 and list(bb(torch.randn(1, 3, 128, 128))) == ["0", "1", "2", "3", "pool"]
    imgs = [torch.rand(3, 100, 120), torch.rand(3, 128, 90)]
    targets = [{"boxes": torch.tensor([[10., 10., 50., 60.]]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, 100, 120, dtype=torch.uint8)},
               {"boxes": torch.tensor([[5., 5., 40., 40.]]), "labels": torch.tensor([2]),
                "masks": torch.zeros(1, 128, 90, dtype=torch.uint8)}]
    for cls, n_losses in ((FasterRCNN, 4), (MaskRCNN, 5)):
        # torchvision's default anchors, RoI pooling and heads; fewer proposals keep the test fast on CPU
        det = cls(bb, num_classes=3, min_size=128, max_size=128, rpn_pre_nms_top_n_train=100,
                  rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20,
                  box_batch_size_per_image=32)
        losses = det.train()(imgs, targets)
        assert len(losses) == n_losses and all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        with torch.no_grad():
            out = det.eval()(imgs)
        assert len(out) == 2 and {"boxes", "labels", "scores"} <= set(out[0])
    with pytest.raises(ValueError, match="dense backbone"):
        backbone_with_fpn("piip_tsb_368_192_128_cls", **CLS)
