"""Classification evaluation sharded over 2 gloo processes equals one process's (CPU)."""
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from piip.data.synthetic import make_image_folder


def _model():
    from piip.registry import create_model
    torch.manual_seed(0)
    return create_model("deit_b_224_cls", img_size=32, num_classes=3,
                        branches={"embed_dim": 16, "num_heads": 2, "depth": 1, "pos_grid": 2}).eval()


def _evaluate(root: str, out: str):
    from piip.data.classification import ImageClassification, build_transforms
    from piip.tasks.classification_train import evaluate_classifier
    ds = ImageClassification(root, build_transforms(32, False))
    return evaluate_classifier(_model(), ds, torch.device("cpu"), batch_size=4, workers=0, out_path=out)


def _worker(r: int, world: int, init: str, root: str, out: str) -> None:
    from piip.engine.distributed import cleanup
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=r, world_size=world)
    try:
        res = _evaluate(root, out)
        with open(f"{out}.rank{r}", "w") as f:
            json.dump(res, f)
    finally:
        cleanup()  # the library's teardown: barrier, then destroy


def test_sharded_classification_eval_equals_single_process(tmp_path):
    root = make_image_folder(str(tmp_path / "data"), per_class=5, image_size=32, seed=1)
    val = os.path.join(root, "val") if os.path.isdir(os.path.join(root, "val")) else root
    with open(os.path.join(val, "rectangle", "broken.png"), "wb") as f:
        f.write(b"not an image")  # skipped (with a warning) by whichever process reads it
    single = _evaluate(val, str(tmp_path / "single.json"))
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'init'}", val, str(tmp_path / "two.json")), nprocs=2)
    two = json.load(open(tmp_path / "two.json"))
    for r in range(2):
        assert json.load(open(tmp_path / f"two.json.rank{r}")) == two  # every rank returns the total
    assert two == json.loads(json.dumps(single)) and two["images"] == single["images"] > 0
    assert two["skipped"] == 1
