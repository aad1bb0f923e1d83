"""PIIP as a Hugging Face AutoBackbone: the BackboneMixin contract, hidden states, and a saved UperNet
loaded in a fresh process (tiny models)."""
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", minversion="5.0", reason="piip[seg]: PIIP as a transformers AutoBackbone")

from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation  # noqa: E402

from piip.integrations.transformers import LEGACY_MODEL_TYPE, piip_backbone_config  # noqa: E402

TINY = dict(img_size=128, branches={"embed_dim": 32, "num_heads": 2, "depth": 2, "interaction_groups": [[0, 0], [1, 1]]},
            deform_num_heads=2)


def test_out_features_out_indices_and_hidden_states():
    bb = AutoBackbone.from_config(piip_backbone_config("piip_tsb_1120_896_448", out_features=["stage2", "stage4"],
                                                       **TINY)).eval()
    assert bb.out_indices == [1, 3] and bb.channels == [32, 32] and bb.stage_names == ["stage1", "stage2", "stage3",
                                                                                        "stage4"]
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        out = bb(x)
        full = bb(x, output_hidden_states=True)
        tup = bb(x, output_hidden_states=True, return_dict=False)
    assert [f.shape[-1] for f in out.feature_maps] == [16, 4] and out.hidden_states is None
    assert [h.shape[-1] for h in full.hidden_states] == [32, 16, 8, 4]
    assert torch.equal(full.hidden_states[1], out.feature_maps[0]) and torch.equal(tup[1][3], out.feature_maps[1])
    bb.out_indices = [0]          # the setter re-aligns out_features, as every transformers backbone
    assert bb.out_features == ["stage1"]
    with pytest.raises(ValueError, match="stage_names"):
        piip_backbone_config("piip_tsb_1120_896_448", out_features=["stem"], **TINY)


def test_saved_upernet_reloads_and_names_the_import_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(UperNetConfig(
        backbone_config=piip_backbone_config("piip_tsb_1120_896_448", **TINY), num_labels=3, hidden_size=32,
        auxiliary_channels=16)).eval()
    model.save_pretrained(tmp_path)
    code = "from transformers import UperNetForSemanticSegmentation as U; U.from_pretrained({!r})".format(str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "import piip.integrations.transformers" in r.stderr.strip().splitlines()[-1]
    back = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits)
    # a folder written before the rename ('piip' model type, an unused 'stem' stage) still loads
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["backbone_config"].update(model_type=LEGACY_MODEL_TYPE, out_indices=[1, 2, 3, 4], out_features=None,
                                  stage_names=["stem", "stage1", "stage2", "stage3", "stage4"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert old.backbone.out_features == ["stage1", "stage2", "stage3", "stage4"]
    with torch.no_grad():
        torch.testing.assert_close(old(x).logits, model(x).logits)
