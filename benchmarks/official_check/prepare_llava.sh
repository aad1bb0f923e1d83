#!/usr/bin/env bash
# Lays out, in OUT, the released PIIP-LLaVA vision-tower modules (a fetched OpenGVLab/PIIP git dir),
# as the importable package llava.model.multimodal_encoder.piip, with the pure-PyTorch deformable-attention
# stand-in of ../shared/official_check/stubs. Nothing of the snapshot is ever committed; OUT is scratch.
# usage: prepare_llava.sh SNAPSHOT_GIT_DIR OUT
set -euo pipefail
SNAP=$1 OUT=$2 STUBS=${PIIP_OFFICIAL_CHECK:-"$(cd "$(dirname "$0")/../../../shared/official_check" && pwd)"}/stubs
g() { git --git-dir="$SNAP" show "HEAD:$1"; }
P=llava/llava/model/multimodal_encoder/piip
D="$OUT/llava/model/multimodal_encoder/piip"
mkdir -p "$D/ops/modules" "$D/ops/functions" "$OUT/configs"
for d in llava llava/model llava/model/multimodal_encoder; do : > "$OUT/$d/__init__.py"; done
: > "$D/__init__.py"; : > "$D/ops/__init__.py"
for f in clip_hf_wrapper configuration_piip_2branch convnext_timm_wrapper modeling_piip_2branch \
         modeling_piip_2branch_mix piip_modules; do g "$P/$f.py" > "$D/$f.py"; done
g "$P/ops/modules/__init__.py" > "$D/ops/modules/__init__.py"
g "$P/ops/modules/ms_deform_attn.py" > "$D/ops/modules/ms_deform_attn.py"
cp "$STUBS/ops/deformable_attention/functions/__init__.py" "$D/ops/functions/__init__.py"
g llava/llava/model/timm_convnext_monkey_patch.py > "$OUT/llava/model/timm_convnext_monkey_patch.py"
for f in $(git --git-dir="$SNAP" ls-tree -r --name-only HEAD llava/configs); do g "$f" > "$OUT/configs/$(basename "$f")"; done
echo "prepared $OUT"
