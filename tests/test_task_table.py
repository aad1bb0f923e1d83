"""The task table (piip.tasks.registry): every task builds, saves, recognises, loads and predicts
through the same five entry points, and hands piip export its entry."""
import pytest
import torch

from piip.tasks.registry import TASKS, checkpoint_task, find_task

TINY_BRANCHES = {"embed_dim": 32, "num_heads": 2, "depth": 1}


def _tiny(name: str) -> torch.nn.Module:
    from piip import create_model
    from piip.tasks.detection import DetectorConfig, build_detector
    from piip.tasks.segmentation import SegmentorConfig, build_segmentor
    if name == "classification":
        return create_model("piip_tsb_368_192_128_cls", num_classes=3, img_size=64, branches=TINY_BRANCHES,
                            deform_num_heads=2)
    backbone = dict(img_size=128, branches=TINY_BRANCHES, deform_num_heads=2)   # every branch's map > 1 px
    if name == "segmentation":
        return build_segmentor("piip_tsb_1120_896_448", 3, SegmentorConfig(channels=16, aux_channels=None), **backbone)
    return build_detector("piip_tsb_1120_896_448", 3, "faster_rcnn",
                          DetectorConfig(fpn_channels=16, box_head_dim=32, mask_head_dim=16), **backbone)


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_round_trips_through_the_table(name, tmp_path):
    task = TASKS[name]
    torch.manual_seed(0)
    model = _tiny(name).eval()
    path = str(tmp_path / "checkpoint.pt")
    torch.save({"model_config": task.config_dict(model), "model": model.state_dict()}, path)
    assert checkpoint_task(path) == name and task.recognises(path) and find_task(path) is task
    assert not any(TASKS[other].recognises(path) for other in TASKS if other != name)
    rebuilt = task.build(task.config_dict(model))
    assert sorted(rebuilt.state_dict()) == sorted(model.state_dict())
    loaded = task.load(path).eval()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    image = torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8)
    out = task.predict(loaded, image)
    if name == "classification":
        assert out.shape == (3,) and abs(float(out.sum()) - 1) < 1e-5
    elif name == "segmentation":
        assert out.shape == (48, 80) and int(out.max()) < 3
    else:
        assert {"boxes", "labels", "scores"} <= set(out)
    assert task.export_task().name == name


def test_task_lookup_maps_the_tensors(tmp_path, monkeypatch):
    """``piip predict`` looks the task up, then loads the file: the lookup maps the tensors instead of
    reading them (a training checkpoint with optimizer state is GBs); a legacy non-zip file, which
    cannot be mapped, is still recognised."""
    calls = []
    load = torch.load

    def recording(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", recording)
    ckpt = {"model_config": {"task": "segmentation"}, "model": {"w": torch.zeros(4)}}
    path, legacy = tmp_path / "checkpoint.pt", tmp_path / "legacy.pt"
    torch.save(ckpt, path)
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    assert checkpoint_task(str(path)) == "segmentation" and calls == [True]
    calls.clear()
    assert checkpoint_task(str(legacy)) == "segmentation" and calls == [True, False]


def test_unreadable_and_plain_files_belong_to_no_task(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(1)}, plain)
    assert checkpoint_task(str(bad)) is None and find_task(str(plain)) is None


def test_train_and_eval_offer_every_task():
    from piip.commands._tasks import TASKS as COMMANDS
    assert COMMANDS[:len(TASKS)] == [f"piip.commands.{name}" for name in TASKS]
