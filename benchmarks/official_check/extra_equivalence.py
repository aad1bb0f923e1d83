"""The two released backbone configs that ../shared/official_check/equivalence.py does not list, run
through that same script (its DET / CLS lists replaced; nothing else changes).
usage: python extra_equivalence.py PREPARED_DIR [--only NAME]   (PREPARED_DIR from prepare.sh)
"""
import os
import sys

sys.path.insert(0, os.environ.get("PIIP_OFFICIAL_CHECK", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "official_check")))
import equivalence  # noqa: E402

equivalence.DET = [("mask_rcnn_deit_vit_l_fpn_1x_coco_bs16.py", "vitdet_l_1024", 512)]
equivalence.CLS = [("piip_3branch_sbl_384-192-128_cls_token_augreg.py", "piip_sbl_384_192_128_cls", 384)]

if __name__ == "__main__":
    equivalence.main()
