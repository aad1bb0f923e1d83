"""FSDP (``fully_shard``) training with 2 gloo CPU processes on a tiny InternViT-like PIIP-H6B: the same
loss trajectory and weights as one process with the whole batch, sharded checkpoints that resume
exactly on 2 processes and on 1 process, and one FSDP unit per block / interaction group (+ merging, pyramid)."""
from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

import piip
from piip.engine import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

# MAE-H-like (2 blocks) and InternViT-6B-like (3 blocks: RMSNorm, q/k norm, no qkv bias) -> skip stride 1.5
TINY = dict(img_size=64, deform_num_heads=2, interaction_drop_path=0.0,
            branches=[{"embed_dim": 32, "num_heads": 2, "depth": 2, "interaction_groups": [[0, 0], [1, 1]],
                       "drop_path": 0.0, "pos_grid": None},
                      {"embed_dim": 64, "num_heads": 2, "depth": 3, "interaction_groups": [[0, 1], [2, 2]],
                       "drop_path": 0.0, "pos_grid": None}])
N_IMAGES, STEPS = 16, 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = piip.create_model("piip_h6b_1024_512", **TINY)
    # interaction gammas start at 0: their first AdamW step is ~lr * sign(grad), which float noise in
    # near-zero gradients flips between process counts; start them non-zero for a well-posed comparison
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("ca_gamma", "cffn_gamma")):
                p.fill_(0.1)
    return model


def _data() -> TensorDataset:
    return TensorDataset(torch.randn(N_IMAGES, 3, 64, 64, generator=torch.Generator().manual_seed(1)))


def _trainer(out: str, batch: int, strategy: str, max_steps: int, losses: list) -> Trainer:
    def forward(model, batch, device):
        maps = model(batch[0].to(device))
        loss = sum(((v - 0.1) ** 2).mean() for v in maps.values())
        losses.append(loss.item())
        return {"mse": loss}
    cfg = TrainConfig(output_dir=out, epochs=1, batch_size=batch, lr=1e-3, layer_decay=0.85, warmup_iters=0,
                      lr_steps=[], clip_grad=1.0, workers=0, device="cpu", max_steps=max_steps, log_every=100,
                      strategy=strategy)
    return Trainer(_model(), _data(), cfg, forward)


def _full_weights(trainer: Trainer) -> dict:
    from piip.engine.fsdp import full_model_state_dict
    return full_model_state_dict(trainer.model)


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from piip.engine.fsdp import fsdp_units
    losses: list = []
    t = _trainer(os.path.join(tmp, "fsdp"), N_IMAGES // 8, "fsdp", STEPS - 1, losses)
    assert t.fsdp and all(type(u).__name__.startswith("FSDP") for u in fsdp_units(t.model))
    t.fit()                                   # steps 1-2, then a sharded checkpoint
    step2 = _full_weights(t)
    torch.distributed.barrier()
    if rank == 0:                             # keep the step-2 checkpoint for the 1-process resume
        shutil.copytree(os.path.join(tmp, "fsdp"), os.path.join(tmp, "step2"))
    torch.distributed.barrier()
    resumed: list = []
    t2 = _trainer(os.path.join(tmp, "fsdp"), N_IMAGES // 8, "fsdp", STEPS, resumed)
    t2.resume(t2.checkpoint_path)
    if rank == 0:                             # exact: the resumed shards hold the step-2 weights
        assert all(torch.equal(v, step2[k]) for k, v in _full_weights(t2).items())
    else:
        _full_weights(t2)
    t2.fit()                                  # step 3 from the shards
    full = _full_weights(t2)
    if rank == 0:
        torch.save({"losses": losses, "resumed": resumed, "weights": full, "step2": step2,
                    "units": len(fsdp_units(t.model))}, os.path.join(tmp, f"rank{rank}.pt"))
    else:
        torch.save({"losses": losses, "resumed": resumed}, os.path.join(tmp, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.heavy
def test_fsdp_two_processes_match_one_and_resume_across_process_counts(tmp_path):
    tmp = str(tmp_path)
    mp.spawn(_worker, args=(2, _free_port(), tmp), nprocs=2, join=True)
    r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in (0, 1))
    # one unit per block (2 + 3), per interaction group (2), the merging and the pyramid
    assert r0["units"] == 9
    # reference: one process, whole batch (the union of both ranks' batches), plain training
    ref_losses: list = []
    ref = _trainer(os.path.join(tmp, "ref"), N_IMAGES // 4, "ddp", STEPS, ref_losses)
    ref.fit()
    two = [(a + b) / 2 for a, b in zip(r0["losses"] + r0["resumed"], r1["losses"] + r1["resumed"])]
    assert len(two) == STEPS and two == pytest.approx(ref_losses, rel=1e-4, abs=1e-6)
    assert ref_losses[-1] < ref_losses[0]
    # weights: AdamW turns gradients near zero into ~lr-sized steps, so float noise in those shows up
    # at the scale of lr (1e-3) after 3 steps; everything else agrees far tighter
    ref_sd = ref.model.state_dict()
    for k, v in r0["weights"].items():
        torch.testing.assert_close(v, ref_sd[k], rtol=0, atol=1e-3, msg=k)
    # the 2-process shards written after step 2 resume on 1 process (no FSDP) to the same step 3
    one: list = []
    t = _trainer(os.path.join(tmp, "step2"), N_IMAGES // 4, "fsdp", STEPS, one)
    assert not t.fsdp
    t.resume(t.checkpoint_path)
    assert t.step == STEPS - 1
    for k, v in t.model.state_dict().items():  # exactly the 2-process step-2 weights
        assert torch.equal(v, r0["step2"][k]), k
    t.fit()
    assert one == pytest.approx([two[-1]], rel=1e-5) and one == pytest.approx([ref_losses[-1]], rel=1e-4)


def test_cli_train_detection_strategy_fsdp_one_process_then_eval_and_resume(tmp_path):
    """``piip train detection --strategy fsdp`` on one process (unsharded) writes the sharded checkpoint
    layout; evaluation reads it (weights gathered from the shards) and ``--resume`` continues it."""
    import json
    import warnings

    from piip.cli import main
    from piip.data.synthetic import make_coco
    ann = make_coco(str(tmp_path / "coco"), num_images=2, image_size=(64, 64), max_objects=2, min_object=8, seed=0)
    images = str(tmp_path / "coco" / "train")
    tiny = {"branches": [{"embed_dim": 32, "num_heads": 2, "depth": 2, "interaction_groups": [[0, 0], [1, 1]]},
                         {"embed_dim": 64, "num_heads": 2, "depth": 2, "interaction_groups": [[0, 0], [1, 1]]}],
            "deform_num_heads": 2}
    out = tmp_path / "run"
    args = ["train", "detection", "--model", "piip_h6b_1024_512", "--img-size", "64", "--override", json.dumps(tiny),
            "--train-ann", ann, "--train-images", images, "--epochs", "1", "--batch-size", "1", "--workers", "0",
            "--warmup-iters", "1", "--output-dir", str(out), "--eval-every", "0", "--fpn-channels", "32",
            "--box-head-dim", "32", "--mask-head-dim", "16", "--strategy", "fsdp"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args + ["--max-steps", "1"]) == 0
        ck = torch.load(out / "checkpoint.pt", weights_only=True)
        assert ck["model"] == "sharded" and (out / ck["shards"]).is_dir() and ck["step"] == 1
        assert main(args + ["--resume", "auto"]) == 0          # continues to the end of the epoch
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
        assert main(["eval", "detection", "--checkpoint", str(out / "checkpoint.pt"), "--val-ann", ann,
                     "--val-images", images, "--workers", "0", "--out-dir", str(out / "eval")]) == 0
    assert (out / "eval" / "metrics.json").exists()
