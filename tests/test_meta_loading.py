"""Building on the meta device and materialising tensor by tensor from a memory-mapped checkpoint:
same weights as an ordinary load, no full read of the file, official ``.pth``, our safetensors,
sharded safetensors (index.json) and a bf16 file cast to the model's dtype."""
from __future__ import annotations

import json

import pytest
import torch

import piip
from piip.weights import save_state_dict, to_official_state_dict
from piip.weights.lazy import map_safetensors, map_state_dict

KW = dict(img_size=64, deform_num_heads=2,
          branches=[{"embed_dim": 48, "num_heads": 4, "depth": 2}, {"embed_dim": 64, "num_heads": 4, "depth": 2}])
NAME = "piip_h6b_1024_512"


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return piip.create_model(NAME, **KW).eval()


@pytest.fixture
def no_full_read(monkeypatch):
    """Fail if the ordinary reader (which loads the whole file into memory) is used."""
    import piip.weights as w
    import piip.weights.official as official

    def refuse(*a, **k):
        raise AssertionError("the checkpoint was read whole instead of memory-mapped")
    monkeypatch.setattr(w, "read_state_dict", refuse)
    monkeypatch.setattr(official, "read_state_dict", refuse)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert not sb[k].is_meta and sb[k].dtype == sa[k].dtype and torch.equal(sa[k], sb[k]), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        oa, ob = a(x), b.eval()(x)
    for k in oa:
        assert torch.equal(oa[k], ob[k])


def test_official_pth_is_mapped_and_materialised(tmp_path, source, no_full_read):
    path = str(tmp_path / "official.pth")
    torch.save({"state_dict": to_official_state_dict(source)}, path)
    _same(source, piip.create_model(NAME, checkpoint=path, **KW))


def test_safetensors_and_sharded_index(tmp_path, source, no_full_read):
    path = str(tmp_path / "model.safetensors")
    save_state_dict(source, path)
    loaded = piip.create_model(NAME, checkpoint=path, **KW)
    _same(source, loaded)
    # the loaded weights are the model's own memory, not views of the (private) file map
    p = loaded.branches[1].blocks[0].attn.qkv.weight
    with torch.no_grad():
        p.add_(1.0)
    assert not torch.equal(map_safetensors(path)["branches.1.blocks.0.attn.qkv.weight"], p)
    # Hugging Face sharded layout: two files and an index
    from safetensors.torch import save_file
    sd = {k: v.contiguous() for k, v in source.state_dict().items()}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / fname))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    _same(source, piip.create_model(NAME, checkpoint=str(index), **KW))


def test_bf16_file_is_cast_one_tensor_at_a_time(tmp_path, source):
    path = str(tmp_path / "official_bf16.pth")
    torch.save({"state_dict": {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                               for k, v in to_official_state_dict(source).items()}}, path)
    loaded = piip.create_model(NAME, checkpoint=path, **KW)
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, source.state_dict()[k].to(torch.bfloat16).float()), k


def test_legacy_pickle_falls_back_and_errors_stay_clear(tmp_path, source):
    path = str(tmp_path / "legacy.pth")
    torch.save({"state_dict": to_official_state_dict(source)}, path, _use_new_zipfile_serialization=False)
    assert map_state_dict(path) is None  # cannot be mapped: the ordinary reader loads it
    _same(source, piip.create_model(NAME, checkpoint=path, **KW))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        piip.create_model(NAME, checkpoint=str(tmp_path / "missing.safetensors"), **KW)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        piip.create_model(NAME, checkpoint=str(bad), **KW)
    wrong = str(tmp_path / "wrong.safetensors")
    save_state_dict(piip.create_model(NAME, **{**KW, "branches": [{**KW["branches"][0], "embed_dim": 32},
                                                                 KW["branches"][1]]}), wrong)
    with pytest.raises(ValueError, match="shape mismatch"):
        piip.create_model(NAME, checkpoint=wrong, **KW)


def test_file_pages_handed_back_only_for_mapped_tensors(tmp_path, source):
    from piip.registry import build_on_meta
    from piip.weights.lazy import materialize, releasing_file_pages
    path = str(tmp_path / "model.safetensors")
    save_state_dict(source, path)
    sd = map_state_dict(path)
    keep = dict(sd)
    plain = {k: v.clone() for k, v in source.state_dict().items()}  # ordinary memory: never released
    before = {k: v.clone() for k, v in plain.items()}
    model, other = build_on_meta(source.cfg), build_on_meta(source.cfg)
    with releasing_file_pages(sd):
        materialize(model, dict(sd))
        materialize(other, dict(plain))
    for k, v in keep.items():  # dropped pages read back from the file, unchanged
        assert torch.equal(v, model.state_dict()[k]) and torch.equal(v, source.state_dict()[k]), k
    assert all(torch.equal(plain[k], before[k]) for k in plain)
