"""coco_evaluate's class-agnostic mode: a box in the right place with the wrong label counts."""
import contextlib
import io

import pytest

pytest.importorskip("pycocotools", reason="pycocotools is in the 'detection' extra (pip install -e .[detection])")

from piip.evaluation import coco_evaluate  # noqa: E402


def _gt():
    from pycocotools.coco import COCO
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 64, "height": 64}],
                  "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
                  "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 20, 20], "area": 400,
                                   "iscrowd": 0}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def test_use_cats_false_ignores_the_label():
    wrong_label = [{"image_id": 1, "category_id": 2, "bbox": [8, 8, 20, 20], "score": 0.9}]
    assert coco_evaluate(_gt(), wrong_label, ["bbox"])["bbox"]["AP"] == 0.0
    assert coco_evaluate(_gt(), wrong_label, ["bbox"], use_cats=False)["bbox"]["AP"] == pytest.approx(1.0)
