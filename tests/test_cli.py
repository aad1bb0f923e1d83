import pytest

from piip.cli import main


def test_models_lists_registry(capsys):
    assert main(["models", "piip_tsb*"]) == 0
    out = capsys.readouterr().out
    assert "piip_tsb_1120_896_448" in out and "1120/896/448" in out and "vitdet" not in out


def test_models_unknown_pattern_is_an_error(capsys):
    assert main(["models", "nothing_like_this*"]) == 2
    assert "no registered model" in capsys.readouterr().err


def test_demo_runs_real_photo(capsys):
    pytest.importorskip("skimage")
    assert main(["demo", "--img-size", "224"]) == 0
    out = capsys.readouterr().out
    assert "(1, 768, 56, 56)  stride 4" in out
    assert "(1, 768, 7, 7)  stride 32" in out
    assert "parameters" in out and "time" in out


def test_demo_rejects_classification_model(capsys):
    assert main(["demo", "--model", "deit_b_224_cls"]) == 2
    assert "dense backbones" in capsys.readouterr().err
