#!/usr/bin/env bash
# Two fixes to a folder laid out by ../shared/official_check/prepare.sh, both harness-side (neither
# changes what the released code computes on CPU in float32):
#  1. the released InternViT6B flash path casts float32 qkv to float16 for its CUDA kernel; prepare.sh
#     removes that cast from deit.py only, so AugReg / DINOv2 / MAE compared against fp16 attention;
#  2. the transformers-4.44 stand-in turns 5.x's empty ConvNeXt `downsampling_layer` ModuleList into an
#     nn.Identity, which 5.x's ConvNextStage.forward iterates (convnext_b_1024 then fails to run).
# usage: patch_harness.sh OUT
set -euo pipefail
OUT=$1
sed -i 's/qkv = qkv.to(torch.float16)/pass  # fp32 kept (harness)/' "$OUT/offpiip/internvit_6b.py"
python - "$OUT/build_official.py" <<'PY'
import sys
path = sys.argv[1]
src = open(path).read()
if "_NoLayers" not in src:
    src = src.replace("        for stage in model.encoder.stages:",
                      "        class _NoLayers(nn.Identity):   # 4.44's Identity, iterable for 5.x's ConvNextStage\n"
                      "            def __iter__(self):\n"
                      "                return iter(())\n"
                      "        for stage in model.encoder.stages:", 1)
    src = src.replace("if len(ds) else nn.Identity()", "if len(ds) else _NoLayers()")
    open(path, "w").write(src)
PY
echo "patched $OUT"
