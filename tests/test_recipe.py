"""Recipes: the pruning options as a file that is checked, recorded in the package, and runs
again to the same package; flags and keywords given beside a recipe override its keys."""

from __future__ import annotations

import hashlib

import pytest
from conftest import EXAMPLES
from test_cli import assert_clean_error, sparsec as run_cli

import sparsec
from sparsec.errors import BadOptionError
from sparsec.recipe import Recipe

CALIB = EXAMPLES / "digits_calib.npz"


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_recipe_is_checked_on_construction():
    with pytest.raises(BadOptionError, match="unknown key 'ratoi'"):
        Recipe.from_dict({"ratoi": 0.3})
    for bad, key in (({"ratio": 1.5}, "ratio"), ({"reconstruct": "yes"}, "reconstruct"),
                     ({"ignore": "stem.*"}, "ignore"), ({"remove_layers": -1}, "remove_layers"),
                     ({"layer_ratios": {"a.*": 2}}, "layer_ratios"),
                     ({"max_drop": 0}, "max_drop")):
        with pytest.raises(BadOptionError, match=f"recipe key '{key}'"):
            Recipe.from_dict(bad)


def test_a_recipe_file_round_trips(tmp_path):
    recipe = Recipe(ratio=0.25, criterion="fluctuation", reconstruct=True, sensitivity=True,
                    head_ratio=0.5, ignore=("stem.*", 'quote".*'),
                    layer_ratios={"block1.*": 0.5, "block2.*": 0.1})
    path = tmp_path / "r.toml"
    path.write_text(recipe.to_toml())
    assert Recipe.from_file(path) == recipe
    assert "sensitivity = true" in path.read_text()
    assert Recipe.from_file(path).to_dict() == recipe.to_dict()


def test_recipe_files_that_are_not_recipes(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[prune\nratio = 0.3\n")
    assert_clean_error(run_cli("prune", EXAMPLES / "digits_mlp.onnx", "-o", tmp_path / "o.onnx",
                               "--recipe", bad), 6, "not a valid TOML file")
    bad.write_text("[compile]\nratio = 0.3\n")
    assert_clean_error(run_cli("prune", EXAMPLES / "digits_mlp.onnx", "-o", tmp_path / "o.onnx",
                               "--recipe", bad), 6, "unknown table 'compile'")
    bad.write_text("[prune]\nratoi = 0.3\n")
    assert_clean_error(run_cli("prune", EXAMPLES / "digits_mlp.onnx", "-o", tmp_path / "o.onnx",
                               "--recipe", bad), 6, "unknown key 'ratoi'")
    missing = run_cli("prune", EXAMPLES / "digits_mlp.onnx", "-o", tmp_path / "o.onnx",
                      "--recipe", tmp_path / "none.toml")
    assert missing.returncode != 0 and "recipe file not found" in missing.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_recipe_and_flags_build_the_same_package_and_the_manifest_reruns_it(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[prune]\nratio = 0.3\nreconstruct = true\ncriterion = "fluctuation"\n')
    model = EXAMPLES / "digits_cnn.onnx"
    a = run_cli("-q", "compile", model, "--recipe", recipe, "--calib", CALIB, "-o", tmp_path / "a")
    b = run_cli("-q", "compile", model, "--ratio", "0.3", "--reconstruct", "--criterion",
                "fluctuation", "--calib", CALIB, "-o", tmp_path / "b")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    shown = run_cli("inspect", tmp_path / "a", "--recipe")
    assert shown.returncode == 0 and "round_to = 8" in shown.stdout    # the target's multiple
    again = tmp_path / "again.toml"
    again.write_text(shown.stdout)
    c = run_cli("-q", "compile", model, "--recipe", again, "--calib", CALIB, "-o", tmp_path / "c")
    assert c.returncode == 0, c.stderr
    for name in ("model.so", "reference/outputs.bin"):
        assert digest(tmp_path / "a" / name) == digest(tmp_path / "b" / name) == \
            digest(tmp_path / "c" / name)


def test_keywords_beside_a_recipe_override_its_keys():
    base = {"ratio": 0.3, "reconstruct": True}
    result = sparsec.prune(EXAMPLES / "digits_mlp.onnx", recipe=base, ratio=0.5,
                           calibration=CALIB)
    assert result.recipe.ratio == 0.5 and result.recipe.reconstruct
    plain = sparsec.prune(EXAMPLES / "digits_mlp.onnx", ratio=0.5, reconstruct=True,
                          calibration=CALIB)
    assert plain.recipe == result.recipe and plain.after == result.after
    assert result.report()["recipe"] == {"ratio": 0.5, "reconstruct": True, "round_to": 1}


def test_prune_module_takes_a_recipe():
    import torch

    from test_prune_module import digits_cnn

    module, example = digits_cnn()
    calib = [torch.randn(1, 1, 8, 8) for _ in range(8)]
    _, a = sparsec.prune_module(module, example, recipe={"ratio": 0.5, "reconstruct": True},
                                calibration=calib)
    _, b = sparsec.prune_module(module, example, ratio=0.5, reconstruct=True, calibration=calib)
    assert a.after == b.after and a.fidelity == b.fidelity
    with pytest.raises(BadOptionError, match="does not take recipe key 'sparsity'"):
        sparsec.prune_module(module, example, recipe={"sparsity": 0.5})
