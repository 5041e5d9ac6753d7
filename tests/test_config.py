"""Configs: the lr rule, recipes, overrides, and refusing bad keys and values."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import (FinetuneConfig, FixResConfig, StudentConfig, TeachConfig, TransferConfig, resolve, resolve_auto,
                            to_dict)
from distill.errors import DistillError


def test_lr_rule_scales_base_lr_by_global_batch_over_512():
    cfg = TeachConfig(lr=5e-4, batch_size=64, grad_accum=2)
    assert cfg.images_per_step(4) == 512 and TeachConfig(global_batch=1024, batch_size=64).images_per_step(4) == 1024
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
    with pytest.raises(DistillError, match="must be one of auto, no, bf16, fp16"):
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


@pytest.mark.parametrize("cls, paper", [(TeachConfig, 1e-3), (StudentConfig, 1e-3), (FinetuneConfig, 1e-5),
                                        (TransferConfig, 0.01 * 1024 / 768), (FixResConfig, 4e-3 * 1024 / 256)])
def test_no_default_rate_exceeds_the_papers_at_a_global_batch_of_1024(cls, paper):
    """16 processes x 64: DeiT's own batch. Every default rate is the paper's linear rule there, none above."""
    cfg, _ = resolve_auto(cls(batch_size=64), world=16)
    assert cfg.effective_lr(16) == pytest.approx(paper)
    reference = cls.reference_lr
    assert cfg.effective_lr(16) == pytest.approx(reference.rate * 1024 / reference.batch)


def test_the_auto_rate_is_held_below_the_reference_batch_and_linear_above():
    small, notes = resolve_auto(TeachConfig(batch_size=32), world=1)
    assert small.effective_lr(1) == pytest.approx(1e-3)  # DeiT's rule would give 3.1e-5
    assert small.lr == pytest.approx(1e-3 * 512 / 32)  # recorded as the base per 512, so config.toml rebuilds it
    assert "lr 0.001 at global batch 32" in notes[0] and "held" in notes[0]
    big, notes = resolve_auto(TeachConfig(batch_size=256), world=16)
    assert big.effective_lr(16) == pytest.approx(4e-3) and "scaled linearly" in notes[0]
    unscaled, _ = resolve_auto(TeachConfig(batch_size=32, lr_scale=False), world=1)
    assert unscaled.lr == pytest.approx(1e-3) and unscaled.effective_lr(1) == pytest.approx(1e-3)
    given, notes = resolve_auto(TeachConfig(batch_size=32, lr=5e-4), world=1)
    assert given.effective_lr(1) == pytest.approx(5e-4 * 32 / 512) and not any("lr" in n for n in notes)


def test_the_profile_follows_the_run_size_and_flags_win():
    short, notes = resolve_auto(TeachConfig(epochs=15), world=1, train_size=720)
    assert (short.aa, short.mixup, short.cutmix, short.reprob, short.scale_min, short.warmup_epochs) == \
        ("none", 0.0, 0.0, 0.0, 0.5, 1.0)
    assert any("short profile (15 epoch(s) x 720 images < 10M)" in n for n in notes)
    long, notes = resolve_auto(TeachConfig(epochs=300), world=1, train_size=1_281_167)  # DeiT on ImageNet-1k
    assert (long.aa, long.mixup, long.cutmix, long.reprob, long.scale_min, long.warmup_epochs) == \
        ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.25, 0.08, 5.0)
    assert resolve_auto(TeachConfig(epochs=100), world=1, train_size=720)[0].mixup == 0.0  # flowers12, 100 epochs
    unknown, notes = resolve_auto(TeachConfig(epochs=300), world=1)
    assert unknown.mixup == 0.0 and any("unknown" in n for n in notes)
    mixed, _ = resolve_auto(TeachConfig(epochs=15, mixup=0.2, profile="deit"), world=1)
    assert (mixed.mixup, mixed.cutmix, mixed.aa) == (0.2, 1.0, "rand-m9-mstd0.5-inc1")


def test_the_training_set_is_counted_without_loading(folder):
    from distill.data.sources import peek_train_size

    assert peek_train_size(None, folder) == 36 and peek_train_size(None, folder, ["circle"]) == 12
    assert peek_train_size("digits", None) == 1437 and peek_train_size("imagenet-1k", None) == 1_281_167
    assert peek_train_size("cifar10", None, train_subset=8000) == 8000 and peek_train_size("org/any", None) is None


def test_a_flag_data_source_replaces_the_recipes_other_kind(tmp_path):
    recipe = Path(__file__).resolve().parent.parent / "distill" / "recipes" / "deit-b.toml"
    cfg = resolve(TeachConfig, recipe, {"data_dir": tmp_path})
    assert cfg.data_dir == tmp_path and cfg.dataset is None


def test_a_pipeline_recipes_shared_resolution_does_not_reach_finetune_or_transfer():
    recipe = Path(__file__).resolve().parent.parent / "distill" / "recipes" / "deit-b.toml"
    assert resolve(StudentConfig, recipe, {}).img_size == 224
    assert resolve(FinetuneConfig, recipe, {}).img_size == 384  # its own section's target, not the shared 224
    assert resolve(TransferConfig, recipe, {"dataset": "cifar10"}).img_size is None


def test_deit3_options_are_checked_before_any_run():
    assert resolve(StudentConfig, None, {"loss": "bce", "bce_target_thresh": 0.0, "smoothing": 0.0}).bce_target_thresh == 0.0
    with pytest.raises(DistillError, match="undoes --smoothing 0.1.*pass --smoothing 0"):
        resolve(StudentConfig, None, {"loss": "bce", "bce_target_thresh": 0.0})
    with pytest.raises(DistillError, match="applies to --loss bce only"):
        resolve(StudentConfig, None, {"bce_target_thresh": 0.0, "smoothing": 0.0})
    with pytest.raises(DistillError, match=r"'loss' must be one of ce, bce, not 'focal'"):
        resolve(TeachConfig, None, {"loss": "focal"})
    with pytest.raises(DistillError, match=r"'crop' must be one of rrc, src"):
        resolve(TeachConfig, None, {"crop": "center"})
    with pytest.raises(DistillError, match=r"'distillation' must be one of none, soft, hard, feature, soft\+feature"):
        resolve(StudentConfig, None, {"distillation": "token"})
    with pytest.raises(DistillError, match=r"'feature_loss' must be one of mse, cosine"):
        resolve(FinetuneConfig, None, {"feature_loss": "l1"})


def test_finetunes_older_spelling_res_is_img_size_in_every_layer(tmp_path):
    """`res` (recipes, --set, --res) and `img_size` are one setting: a later layer replaces an earlier one whichever
    spelling each uses; a flat recipe's img_size is the fine-tune's; only two values in one layer are refused."""
    quickstart = Path(__file__).resolve().parent.parent / "distill" / "recipes" / "quickstart.toml"
    assert resolve(FinetuneConfig, quickstart, {}).img_size == 48
    assert resolve(FinetuneConfig, quickstart, {"res": 64}).img_size == 64  # --res over the recipe's img_size
    assert resolve(FinetuneConfig, quickstart, {}, recipe_values={"res": 24}).img_size == 24  # --set finetune.res=24
    flat = tmp_path / "flat.toml"
    flat.write_text("img_size = 384\nepochs = 2\n")
    assert resolve(FinetuneConfig, flat, {}).img_size == 384
    rebuilt = tmp_path / "config.toml"  # what a fine-tune records: both spellings, one value
    rebuilt.write_text("res = 48\nimg_size = 48\n")
    assert resolve(FinetuneConfig, rebuilt, {"img_size": 64}).img_size == 64
    with pytest.raises(DistillError, match="--res is the older spelling of --img-size"):
        resolve(FinetuneConfig, None, {"res": 24, "img_size": 32})
