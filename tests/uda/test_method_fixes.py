"""The method defects of issue 19, each pinned with values: they weakened exactly DAM-Former's additions.

- the LR term of the mixed loss supervised pasted source pixels against the target's Sentinel-2 series;
- the ensemble pseudo-label was normalised, so its confidence collapsed whenever the LR branch was unsure;
- an evaluation of the teacher left its BatchNorm in eval mode for the rest of the training;
- MiT configs trained from random weights without saying so;
- the hue jitter was half DAFormer's range; U-TAE and DTF learnt at the encoder's (ImageNet) rate.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from damformer.config import ConfigError, UDAConfig, load_config
from damformer.engine.optim import parameter_groups
from damformer.engine.train import Trainer
from damformer.models.factory import ModelConfig, build_model
from damformer.uda.dacs import SelfTraining, weighted_cross_entropy
from damformer.uda.mixing import StrongAugment
from damformer.uda.teacher import ensemble_probabilities, pseudo_labels


def _logits(batch: int, classes: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, classes, size, size, generator=torch.Generator().manual_seed(seed))


def test_mixed_lr_loss_supervises_only_the_target_pixels():
    training = SelfTraining(nn.Conv2d(1, 1, 1), UDAConfig(hr_weight=1.0, lr_weight=1.0))
    hr, lr = _logits(2, 4, 8, 0), _logits(2, 4, 8, 1)
    labels = torch.randint(0, 4, (2, 8, 8), generator=torch.Generator().manual_seed(2))
    weight = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(3))
    pasted = torch.zeros(2, 8, 8, dtype=torch.bool)
    pasted[..., :4] = True  # ClassMix pasted the source into the left half
    total = training.supervised_loss({"hr": hr, "lr": lr}, labels, weight, lr_valid=~pasted)
    hr_term = weighted_cross_entropy(hr, labels, weight)  # unchanged: over every pixel
    lr_target_half = weighted_cross_entropy(lr[..., 4:], labels[..., 4:], weight[..., 4:])
    torch.testing.assert_close(total, hr_term + lr_target_half)


def _tiny_damformer() -> nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        arch="damformer", backbone="mit_b0", band_init="inflate", footprint=0.25, utae_widths=[16, 16, 16, 16]
    )
    return build_model(config)


def _batch(label_classes: list[int] | None, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "aerial": torch.randint(0, 256, (2, 5, 32, 32), dtype=torch.uint8, generator=generator),
        "s2": torch.rand(2, 3, 10, 16, 16, generator=generator) * 3000,
        "s2_mask": torch.ones(2, 3, dtype=torch.bool),
        "s2_day_offsets": torch.tensor([[0, 60, 120], [10, 70, 130]]),
    }
    if label_classes is not None:
        label = torch.full((2, 32, 32), label_classes[0], dtype=torch.uint8)
        label[..., 16:] = label_classes[-1]
        batch["label"] = label
    return batch


@pytest.mark.parametrize(("source_classes", "lr_term"), [([3], "zero"), ([3, 5], "positive")])
def test_mixed_batch_lr_term_in_the_uda_step(source_classes, lr_term):
    """Only the LR term (hr_weight 0): a source of one class is pasted whole, leaving nothing to it."""
    config = UDAConfig(hr_weight=0.0, lr_weight=1.0, strong_augment=False, pseudo_weight="pixel")
    config.pseudo_threshold = 0.01  # every pixel confident: only the ClassMix mask can zero the term
    training = SelfTraining(_tiny_damformer(), config)
    metrics = training.forward_backward(_batch(source_classes, 0), _batch(None, 1))
    if lr_term == "zero":
        assert metrics["loss_mixed"] == 0.0
    else:
        assert metrics["loss_mixed"] > 0.1


def test_released_ensemble_keeps_pixels_the_hr_branch_is_sure_of():
    hr = torch.log(torch.tensor([0.98, 0.02]))[None, :, None, None]
    lr = torch.log(torch.tensor([0.5, 0.5]))[None, :, None, None]  # the 10 m branch is unsure
    released = ensemble_probabilities(hr, lr, lr_weight=0.2)
    torch.testing.assert_close(released[0, :, 0, 0], torch.tensor([0.98 + 0.1, 0.02 + 0.1]))
    _, weight = pseudo_labels(released, threshold=0.968, mode="pixel")
    assert weight.item() == 1.0  # confidence 1.08
    normalised = ensemble_probabilities(hr, lr, lr_weight=0.2, form="normalised")
    _, weight = pseudo_labels(normalised, threshold=0.968, mode="pixel")
    assert weight.item() == 0.0  # 0.8 * 0.98 + 0.2 * 0.5 = 0.884: collapsed
    # The LR branch can still lift an unsure HR pixel over the threshold in the released form.
    unsure = torch.log(torch.tensor([0.85, 0.15]))[None, :, None, None]
    agreeing = torch.log(torch.tensor([0.9, 0.1]))[None, :, None, None]
    _, weight = pseudo_labels(ensemble_probabilities(unsure, agreeing), threshold=0.968, mode="pixel")
    assert weight.item() == 1.0  # 0.85 + 0.18 = 1.03
    with pytest.raises(ValueError, match="uda.ensemble"):
        ensemble_probabilities(hr, lr, form="mean")


def test_ensemble_form_is_a_config_value(tiny_overrides, tmp_path):
    assert load_config(None, tiny_overrides(tmp_path)).uda.ensemble == "released"
    with pytest.raises(ConfigError, match="uda.ensemble: expected released or normalised"):
        load_config(None, [*tiny_overrides(tmp_path), "uda.ensemble=average"])


def _modes(trainer: Trainer) -> dict[str, bool]:
    return {name: module.training for name, module in trainer.uda.named_modules()}


def test_an_evaluation_of_the_teacher_leaves_every_module_as_it_was(tiny_overrides, tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(tmp_path, eval={"teacher": True})))
    trainer.step()
    before = _modes(trainer)
    teacher_norms = [n for n, m in trainer.uda.teacher.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert teacher_norms and all(before[f"teacher.{n}"] for n in teacher_norms)  # batch statistics
    assert trainer.evaluate() is not None
    assert _modes(trainer) == before


def test_training_continues_exactly_as_without_the_evaluation(tiny_overrides, tmp_path):
    def history(folder: str, interval: int) -> list[dict]:
        sections = {"eval": {"teacher": True, "interval": interval}, "optim": {"max_iters": 5}}
        return Trainer(load_config(None, tiny_overrides(tmp_path / folder, **sections))).run().history

    assert history("evaluated", 2) == history("not-evaluated", 0)


def test_pretrained_weights_must_be_named_or_refused_explicitly(tiny_overrides, tmp_path):
    unset = [o for o in tiny_overrides(tmp_path) if not o.startswith("model.pretrained=")]
    with pytest.raises(ConfigError, match="model.pretrained: not set .* model.pretrained=none"):
        load_config(None, unset)
    missing = tmp_path / "weights" / "mit_b0.pth"
    with pytest.raises(ConfigError, match=f"model.pretrained: {missing} not found.*nvidia/mit-b0"):
        load_config(None, [*unset, f"model.pretrained={missing}"])
    assert load_config(None, [*unset, "model.arch=unet_c"]).model.pretrained is None  # a CNN: none needed


def test_training_a_large_mit_from_scratch_warns(tiny_overrides, tmp_path, caplog):
    overrides = [*tiny_overrides(tmp_path), "model.backbone=mit_b2", "model.temporal=false"]
    with caplog.at_level(logging.WARNING, logger="damformer.config"):
        load_config(None, overrides)
    assert "mit_b2 encoder trains from random weights" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="damformer.config"):
        load_config(None, tiny_overrides(tmp_path / "b0"))
    assert "random weights" not in caplog.text  # b0 / b1: no warning


def test_hue_jitter_spans_daformers_range():
    augment = StrongAugment(jitter=0.2)
    assert augment.jitter_factors([0.0, 0.0, 0.0, 0.0]) == pytest.approx((0.8, 0.8, 0.8, -0.2))
    assert augment.jitter_factors([1.0, 1.0, 1.0, 1.0]) == pytest.approx((1.2, 1.2, 1.2, 0.2))
    assert augment.jitter_factors([0.5] * 4) == pytest.approx((1.0, 1.0, 1.0, 0.0))


def test_temporal_branch_and_fusion_take_their_own_learning_rate():
    model = _tiny_damformer()
    groups = parameter_groups(model, lr=1e-4, weight_decay=0.01, head_lr_mult=10, temporal_lr_mult=5)
    lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        expected = {"temporal": 5e-4, "fusion": 5e-4, "decoder": 1e-3, "lr_head": 1e-3}.get(
            name.split(".")[0], 1e-4
        )
        assert lr_of[id(parameter)] == pytest.approx(expected), name
