import pytest

from piip.cli import main


def test_models_lists_registry(capsys):
    assert main(["models", "piip_tsb*"]) == 0
    out = capsys.readouterr().out
    assert "piip_tsb_1120_896_448" in out and "1120/896/448" in out and "vitdet" not in out


def test_models_unknown_pattern_is_an_error(capsys):
    assert main(["models", "nothing_like_this*"]) == 2
    assert "no registered model" in capsys.readouterr().err


def test_demo_runs_real_photo(capsys, tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    monkeypatch.chdir(tmp_path)   # the picture goes to the current folder by default
    assert main(["demo", "--img-size", "224", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "(1, 768, 56, 56)  stride 4" in out
    assert "(1, 768, 7, 7)  stride 32" in out
    assert "parameters" in out and "first forward pass" in out and "median of the 1 following" in out
    assert f"picture    {tmp_path / 'piip_demo_features.png'}" in out
    assert main(["demo", "--img-size", "224", "--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--repeats: expected an integer >= 1, got '0'" in err


def test_tune_malloc_is_optional(monkeypatch):
    from piip.runtime import tune_malloc
    monkeypatch.setenv("PIIP_TUNE_MALLOC", "0")
    assert tune_malloc() is False
    monkeypatch.delenv("PIIP_TUNE_MALLOC")
    assert tune_malloc() in (True, False)   # True on glibc Linux; never raises elsewhere


def test_demo_rejects_classification_model(capsys):
    assert main(["demo", "--model", "deit_b_224_cls"]) == 2
    assert "dense backbones" in capsys.readouterr().err
