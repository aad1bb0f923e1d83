"""Official PIIP-LLaVA vision towers vs piip on the same random weights (the LLaVA half of
../shared/official_check/equivalence.py, which covers the detection / classification backbones).

Builds each released tower (PIIPTwoBranchModel / PIIPTwoBranchMixModel) from its LLaVA config with
random weights, maps the state dict (official LLaVA-fork names under model.vision_tower.vision_tower.)
with piip.weights.llava.tower_from_official into piip.create_model(name) and compares both branches'
final token maps on the same input.
Stand-ins, all for the offline / current-package environment, none changing the computation:
  - CLIP towers are built from a CLIPVisionConfig of the named checkpoint (no Hub download);
  - ConvNeXt branches come from timm.create_model(pretrained=False) with the released monkey patch
    (layer scales named `weight`) applied, as the released builder does, while the official model is built; timm 1.0 passes device/dtype
    factory kwargs to blocks, which the patched block (written for older timm) does not take: dropped;
  - transformers 5 CLIPVisionModel has no `.vision_model` wrapper: the stand-in adds the attribute;
  - transformers 5 CLIP layers return a tensor instead of a 1-tuple: the released CLIPLayerWrapper
    indexes [0], so the wrapper's call is adapted;
  - the deformable-attention op is the pure-PyTorch fallback of ../shared/official_check/stubs.
usage: python llava_equivalence.py PREPARED_DIR [--only PIIP_NAME]   (PIIP_EQ_TOL: goal, default 1e-5)
"""
import os, sys
import torch

PREP = os.path.abspath(sys.argv[1])
ONLY = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
sys.path.insert(0, os.environ.get("PIIP_OFFICIAL_CHECK", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "official_check")))
from equivalence import randomize, rel_err  # noqa: E402  (the same random weights and error as the main check)

TOWERS = [  # released LLaVA config, piip name; input = the fine branch's size
    ("piip-llava_clip-bl_512-256_7B.py", "piip_llava_clip_bl_512_256"),
    ("piip-llava_clip-bl_512-448_7B.py", "piip_llava_clip_bl_512_448"),        # 13B: the same tower
    ("piip-llava_convnext-b_clip-l_640-224_7B.py", "piip_llava_convnext_b_clip_l_640_224"),
    ("piip-llava_convnext-b_clip-l_1024-336_7B.py", "piip_llava_convnext_b_clip_l_1024_336"),
    ("piip-llava_convnext-b_clip-l_1024-336_13B.py", "piip_llava_convnext_b_clip_l_1024_336_i24"),
    ("piip-llava_convnext-l_clip-l_1024-336_7B.py", "piip_llava_convnext_l_clip_l_1024_336"),  # plus: same tower
    ("piip-llava_convnext-l_clip-l_1024-336_13B.py", "piip_llava_convnext_l_clip_l_1024_336_i24"),
]
CLIP = {  # name fragment -> (width, depth, heads, pretrain image size)
    "clip-vit-large-patch14to16-224": (1024, 24, 16, 224),
    "clip-vit-large-patch14to16-336": (1024, 24, 16, 336),
    "clip-vit-base-patch16": (768, 12, 12, 224),
}
TOWER = "model.vision_tower.vision_tower."


class _Wrapped(torch.nn.Module):
    def __init__(self, vision_model):
        super().__init__()
        self.vision_model = vision_model


def _offline():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    def from_pretrained(name, **kw):
        w, d, h, size = next(v for k, v in CLIP.items() if name.endswith(k))
        cfg = CLIPVisionConfig(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=d, num_attention_heads=h,
                               image_size=size, patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
        model = CLIPVisionModel(cfg)
        # transformers 5 dropped the `.vision_model` wrapper the released code unwraps: restore the attribute
        return model if hasattr(model, "vision_model") else _Wrapped(model)
    CLIPVisionModel.from_pretrained = staticmethod(from_pretrained)
    from llava.model import timm_convnext_monkey_patch as patch
    init = patch.ConvNeXtBlockWithoutGamma.__init__
    def init_no_factory_kwargs(self, *args, device=None, dtype=None, **kwargs):
        init(self, *args, **kwargs)
    patch.ConvNeXtBlockWithoutGamma.__init__ = init_no_factory_kwargs
    from llava.model.multimodal_encoder.piip import clip_hf_wrapper
    def layer_forward(self, x, H, W):
        out = self.clip_layer(x, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out
    clip_hf_wrapper.CLIPLayerWrapper.forward = layer_forward


def build(cfg_file):
    ns = {}
    exec(compile(open(cfg_file).read(), cfg_file, "exec"), ns)
    bb = dict(ns["model"]["backbone"])
    from llava.model.multimodal_encoder.piip.configuration_piip_2branch import PIIPTwoBranchConfig
    from llava.model.multimodal_encoder.piip.modeling_piip_2branch import PIIPTwoBranchModel
    from llava.model.multimodal_encoder.piip.modeling_piip_2branch_mix import PIIPTwoBranchMixModel
    cls = {"2branch_v1": PIIPTwoBranchModel, "2branch_mix": PIIPTwoBranchMixModel}[bb.pop("model_cls", "2branch_v1")]
    for k in ("branch1", "branch2"):
        bb[k] = dict(bb[k], load_timm_weights=False)
    # the released builder's monkey patch (replace_timm_convnext), held only while the official model is
    # built: left in place it would also rename the layer scales of piip's own timm ConvNeXt branch
    import timm.models.convnext as tc
    from llava.model.timm_convnext_monkey_patch import ConvNeXtBlockWithoutGamma
    original, tc.ConvNeXtBlock = tc.ConvNeXtBlock, ConvNeXtBlockWithoutGamma
    try:
        return cls(PIIPTwoBranchConfig(**bb)), bb["branch2"]["img_size"]
    finally:
        tc.ConvNeXtBlock = original


def compare(official, name, size):
    import piip
    from piip.weights.llava import tower_from_official
    gen = torch.Generator().manual_seed(0)
    sd = randomize(official.state_dict(), gen)
    official.load_state_dict(sd)
    official.eval()
    x = torch.randn(1, 3, size, size, generator=gen)
    with torch.no_grad():
        ref = official(x)                                   # (CLIP-L map, fine map)
    ours = piip.create_model(name).eval()
    mapped = tower_from_official({TOWER + k: v for k, v in sd.items()}, ours, "official tower")
    missing, unexpected = ours.load_state_dict({k[len("model.vision_tower."):]: v for k, v in mapped.items()},
                                               strict=False)
    if missing or unexpected:
        return f"llava {name}: load: missing {missing[:3]} unexpected {unexpected[:3]}", 1.0
    with torch.no_grad():
        states = ours.forward_branches(x)
    gots = [states[1].x, states[0].x]                       # piip branch 1 = official branch1 (CLIP-L)
    refs = [r.flatten(2).transpose(1, 2) for r in ref]
    errs = [rel_err(g.float(), r.float()) if g.shape == r.shape else float("inf") for g, r in zip(gots, refs)]
    return f"llava {name}: max rel err {max(errs):.2e}", max(errs)


def main():
    sys.path.insert(0, PREP)
    _offline()
    worst, n = 0.0, 0
    for cfg, name in TOWERS:
        if ONLY and ONLY != name:
            continue
        try:
            m, size = build(os.path.join(PREP, "configs", cfg))
        except Exception as exc:
            line, e = f"llava {name}: HARNESS cannot build the official model: {type(exc).__name__}: {str(exc)[:120]}", 1.0
        else:
            try:
                line, e = compare(m, name, size)
            except Exception as exc:
                line, e = f"llava {name}: {type(exc).__name__}: {str(exc)[:150]}", 1.0
        worst, n = max(worst, e), n + 1
        print(line, flush=True)
    tol = float(os.environ.get("PIIP_EQ_TOL", "1e-5"))
    print(f"official llava equivalence: worst rel err {worst:.2e} over {n} towers (goal <= {tol:g})")
    sys.exit(0 if worst <= tol else 1)


if __name__ == "__main__":
    main()
