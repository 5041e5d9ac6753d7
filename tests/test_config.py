"""Configs: the lr rule, recipes, overrides, and refusing bad keys and values."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import StudentConfig, TeachConfig, TransferConfig, resolve, to_dict
from distill.errors import DistillError


def test_lr_rule_scales_base_lr_by_global_batch_over_512():
    cfg = TeachConfig(lr=5e-4, batch_size=64, grad_accum=2)
    assert cfg.global_batch(4) == 512
    assert cfg.effective_lr(4) == pytest.approx(5e-4)
    assert cfg.effective_lr(8) == pytest.approx(1e-3)
    assert TeachConfig(lr=5e-4, batch_size=64, lr_scale=False).effective_lr(8) == pytest.approx(5e-4)


def test_recipe_then_flags(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('lr = 0.001\nepochs = 3\n[student]\nalpha = 0.1\ndistillation = "soft"\n[teach]\nepochs = 9\n')
    cfg = resolve(StudentConfig, recipe, {"epochs": 7, "tau": None})
    assert (cfg.lr, cfg.epochs, cfg.alpha, cfg.distillation, cfg.tau) == (0.001, 7, 0.1, "soft", 1.0)
    assert resolve(TeachConfig, recipe, {}).epochs == 9


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("lerning_rate = 0.1\nepoch = 3\n")
    with pytest.raises(DistillError, match="unknown key 'lerning_rate'|unknown key 'epoch'.*'epochs'"):
        resolve(TeachConfig, recipe, {})
    recipe.write_text("epoch = 3\n")
    with pytest.raises(DistillError, match="did you mean 'epochs'"):
        resolve(TeachConfig, recipe, {})


def test_wrong_types_and_ranges_are_sentences(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('epochs = "ten"\n')
    with pytest.raises(DistillError, match="'epochs' should be an integer"):
        resolve(TeachConfig, recipe, {})
    recipe.write_text('mixed_precision = "fp8"\n')
    with pytest.raises(DistillError, match="must be one of no, bf16, fp16"):
        resolve(TeachConfig, recipe, {})
    recipe.write_text("epochs = 3\n[teach\n")
    with pytest.raises(DistillError, match="not valid TOML"):
        resolve(TeachConfig, recipe, {})
    with pytest.raises(DistillError, match="--alpha must be between 0 and 1"):
        resolve(StudentConfig, None, {"alpha": 2.0})


def test_resolved_config_is_plain_values():
    values = to_dict(TeachConfig())
    assert values["workdir"] == "runs" and "name" not in values  # None is left out
    assert "workdir" not in to_dict(TeachConfig(), result_only=True)


def test_dataset_picks_a_transfer_target_of_a_recipe():
    recipe = Path(__file__).resolve().parent.parent / "distill" / "recipes" / "deit-b.toml"
    cfg = resolve(TransferConfig, recipe, {"dataset": "cifar100"})
    assert (cfg.dataset, cfg.opt, cfg.epochs, cfg.reprob, cfg.drop_path) == ("cifar100", "sgd", 1000, 0.0, 0.0)
    with pytest.raises(DistillError, match="several transfer targets .*--dataset NAME"):
        resolve(TransferConfig, recipe, {})
