"""Each UDA piece pinned with values: EMA, pseudo-labels, ensemble, ClassMix, augmentation, RCS, schedule."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from damformer.engine.optim import build_optimizer, lr_factor, parameter_groups, set_learning_rate
from damformer.eval.metrics import ConfusionMatrix, scores
from damformer.loading.rcs import RareClassSampler, class_probabilities
from damformer.uda.mixing import StrongAugment, classmix_masks, mix
from damformer.uda.teacher import EMATeacher, ensemble_probabilities, pseudo_labels


def _scalar_model(value: float) -> nn.Module:
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(value)
    return model


def test_ema_rate_ramps_up_then_caps():
    teacher = EMATeacher(_scalar_model(0.0), alpha=0.999)
    assert [teacher.rate(t) for t in (0, 1, 3, 9)] == [0.0, 0.5, 0.75, 0.9]
    assert teacher.rate(10_000) == 0.999


def test_ema_update_arithmetic():
    student = _scalar_model(1.0)
    teacher = EMATeacher(student, alpha=0.9, norm="running")
    with torch.no_grad():
        student[0].weight.fill_(3.0)
        student[1].running_mean.fill_(7.0)
    teacher.update(student, iteration=0)  # rate 0: the teacher becomes the student
    assert teacher.model[0].weight.item() == 3.0
    with torch.no_grad():
        student[0].weight.fill_(5.0)
    teacher.update(student, iteration=1)  # rate 0.5
    assert teacher.model[0].weight.item() == pytest.approx(4.0)
    teacher.update(student, iteration=100)  # rate capped at 0.9: 0.9 * 4 + 0.1 * 5
    assert teacher.model[0].weight.item() == pytest.approx(4.1)
    assert teacher.model[1].running_mean.item() == 7.0  # buffers copied
    assert not teacher.model[0].weight.requires_grad


def test_teacher_dropout_stays_off():
    for norm in ("batch", "running"):
        parent = nn.Module()
        parent.teacher = EMATeacher(nn.Sequential(nn.Dropout(0.5)), norm=norm)
        parent.train()
        assert not parent.teacher.model[0].training
        x = torch.ones(4, 3)
        assert torch.equal(parent.teacher(x), x)


def test_teacher_batch_norm_uses_the_labelled_batch_statistics():
    student = _scalar_model(1.0)
    x = torch.tensor([[1.0], [2.0], [3.0], [6.0]])  # mean 3, biased variance 3.5
    parent = nn.Module()
    parent.teacher = EMATeacher(student, alpha=0.9, norm="batch")
    parent.train()
    out = parent.teacher(x)
    expected = (x - 3.0) / math.sqrt(3.5 + 1e-5)
    torch.testing.assert_close(out, expected)
    # its own running statistics follow the batches it saw (momentum 0.1), not the student's
    assert parent.teacher.model[1].running_mean.item() == pytest.approx(0.3)
    with torch.no_grad():
        student[1].running_mean.fill_(7.0)
    parent.teacher.update(student, iteration=5)
    assert parent.teacher.model[1].running_mean.item() == pytest.approx(0.3)
    parent.eval()  # evaluating the teacher: running statistics
    torch.testing.assert_close(parent.teacher(x), (x - 0.3) / math.sqrt(0.9 + 0.1 * 3.5 * 4 / 3 + 1e-5))
    running = EMATeacher(student, norm="running")
    parent.running = running
    parent.train()
    torch.testing.assert_close(running(x), (x - 7.0) / math.sqrt(1.0 + 1e-5))
    with pytest.raises(ValueError, match="uda.teacher_norm"):
        EMATeacher(student, norm="group")


def test_ensemble_weighting():
    hr = torch.log(torch.tensor([0.6, 0.4]))[None, :, None, None]
    lr = torch.log(torch.tensor([0.1, 0.9]))[None, :, None, None]
    probs = ensemble_probabilities(hr, lr, lr_weight=0.2, form="normalised")
    torch.testing.assert_close(
        probs[0, :, 0, 0], torch.tensor([0.8 * 0.6 + 0.2 * 0.1, 0.8 * 0.4 + 0.2 * 0.9])
    )
    released = ensemble_probabilities(hr, lr, lr_weight=0.2)  # the default: the authors' sum
    torch.testing.assert_close(released[0, :, 0, 0], torch.tensor([0.6 + 0.2 * 0.1, 0.4 + 0.2 * 0.9]))
    torch.testing.assert_close(ensemble_probabilities(hr, None)[0, :, 0, 0], torch.tensor([0.6, 0.4]))
    flipped = ensemble_probabilities(hr, lr, lr_weight=0.5)  # a strong LR branch can change the label
    assert flipped[0, :, 0, 0].argmax() == 1


def test_pseudo_label_weights():
    # image 0: confidences 0.99, 0.99, 0.5, 0.5; image 1: all 0.99
    probs = torch.zeros(2, 2, 2, 2)
    probs[0, 0] = torch.tensor([[0.99, 0.99], [0.5, 0.5]])
    probs[0, 1] = 1 - probs[0, 0]
    probs[1, 1] = 0.99
    probs[1, 0] = 0.01
    labels, weight = pseudo_labels(probs, threshold=0.968, mode="batch")
    assert labels.tolist() == [[[0, 0], [0, 0]], [[1, 1], [1, 1]]]
    assert torch.all(weight == 0.75)  # 6 of 8 pixels confident
    _, per_image = pseudo_labels(probs, threshold=0.968, mode="image")
    assert per_image[0].unique().tolist() == [0.5] and per_image[1].unique().tolist() == [1.0]
    _, per_pixel = pseudo_labels(probs, threshold=0.968, mode="pixel")
    assert per_pixel[0].tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_classmix_takes_half_the_classes_of_each_image():
    labels = torch.tensor(
        [
            [[0, 0, 1, 1], [2, 2, 3, 3]],  # four classes: two chosen
            [[5, 5, 5, 5], [7, 7, 7, 255]],  # two classes (255 ignored): one chosen
        ]
    )
    masks = classmix_masks(labels, torch.Generator().manual_seed(0))
    for image, mask in zip(labels, masks, strict=True):
        present = set(image[image != 255].tolist())
        chosen = set(image[mask].tolist())
        assert len(chosen) == math.ceil(len(present) / 2) and chosen <= present
        assert torch.equal(mask, torch.isin(image, torch.tensor(sorted(chosen))))  # whole classes
    assert not masks[1, 1, 3]  # ignore pixels never pasted
    again = classmix_masks(labels, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


def test_mix_images_and_labels():
    mask = torch.tensor([[[True, False]]])
    inside, outside = torch.ones(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)
    assert mix(mask, inside, outside)[0, :, 0].tolist() == [[1.0, 0.0]] * 3
    assert mix(mask, torch.tensor([[[4, 4]]]), torch.tensor([[[9, 9]]])).tolist() == [[[4, 9]]]


def test_strong_augment_leaves_elevation_alone_and_is_seeded():
    aerial = torch.rand(4, 5, 32, 32) * 255
    augment = StrongAugment(jitter_p=1.0, blur_p=1.0)
    out = augment(aerial, torch.Generator().manual_seed(1))
    assert torch.equal(out[:, 4], aerial[:, 4])
    assert not torch.allclose(out[:, :4], aerial[:, :4])
    assert out.min() >= 0 and out.max() <= 255
    assert torch.equal(out, augment(aerial, torch.Generator().manual_seed(1)))


def test_rcs_probabilities_from_counts():
    probs = class_probabilities([900, 90, 10, 0], temperature=0.01)
    freq = np.array([0.9, 0.09, 0.01])
    expected = np.exp((1 - freq) / 0.01 - (1 - freq).max() / 0.01)
    np.testing.assert_allclose(probs[:3], expected / expected.sum())
    assert probs[3] == 0.0
    assert probs[2] > probs[1] > probs[0]
    np.testing.assert_allclose(class_probabilities([1, 1], temperature=0.5), [0.5, 0.5])


def test_rcs_draws_samples_holding_the_class():
    samples = {"a": [100, 0, 0], "b": [50, 50, 0], "c": [10, 0, 90]}
    sampler = RareClassSampler(samples, temperature=0.1, min_pixels=20, seed=0)
    assert sampler.candidates[1].tolist() == [1] and sampler.candidates[2].tolist() == [2]
    draws = [sampler.draw(i) for i in range(300)]
    for key, cls in draws:
        assert samples[key][cls] > 20
    counts = {c: sum(1 for _, d in draws if d == c) for c in range(3)}
    assert counts[2] > counts[0]  # rarer class drawn more often
    assert draws == [sampler.draw(i) for i in range(300)]  # seeded
    assert RareClassSampler({"a": [262144 - 10, 10]}).min_pixels == 3000  # DAFormer's value at 512 x 512


def test_rcs_warns_when_draws_concentrate_on_few_samples(caplog):
    common = {f"s{i}": [1000, 0] for i in range(9)}
    with caplog.at_level("WARNING", logger="damformer.loading.rcs"):
        sampler = RareClassSampler({**common, "rare": [900, 100]}, temperature=0.01, min_pixels=20)
    assert sampler.sample_shares()[sampler.keys.index("rare")] > 0.99
    assert sampler.sample_shares().sum() == pytest.approx(1.0)
    assert "fall on 2 of 10 source samples" in caplog.text and "uda.rcs=false" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="damformer.loading.rcs"):
        RareClassSampler({f"s{i}": [500, 500] for i in range(10)}, temperature=0.01, min_pixels=20)
    assert caplog.text == ""


def test_warmup_and_poly_schedule_values():
    assert lr_factor(0, warmup=10, max_iters=100) == pytest.approx(1e-6)
    assert lr_factor(5, warmup=10, max_iters=100) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert lr_factor(10, warmup=10, max_iters=100) == pytest.approx(0.9)
    assert lr_factor(50, warmup=10, max_iters=100) == pytest.approx(0.5)
    assert lr_factor(100, warmup=10, max_iters=100) == 0.0


def test_parameter_groups_head_multiplier_and_no_decay_on_norms():
    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model.decoder = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    groups = parameter_groups(model, lr=1e-4, weight_decay=0.01, head_lr_mult=10)
    by_key = {(g["lr"], g["weight_decay"]): sum(p.numel() for p in g["params"]) for g in groups}
    assert by_key == {(1e-4, 0.0): 4 + 8, (1e-4, 0.01): 16, (1e-3, 0.0): 4 + 8, (1e-3, 0.01): 16}
    optimizer = build_optimizer(model, lr=1e-4)
    set_learning_rate(optimizer, 1e-4, 0.5)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [5e-5, 5e-4]


def test_miou_accumulates_over_the_set_and_ignores_absent_classes():
    matrix = ConfusionMatrix(4)
    labels = torch.tensor([[0, 0, 1, 255]])
    matrix.update(torch.tensor([[0, 1, 1, 3]]), labels)
    matrix.update(torch.tensor([[0, 0]]), torch.tensor([[0, 1]]))
    result = scores(matrix.matrix)
    # class 0: TP 2, FP 1, FN 1 -> 2/4; class 1: TP 1, FP 1, FN 1 -> 1/3; classes 2, 3: absent -> NaN
    # (the prediction 3 falls on an ignored pixel: not counted)
    assert result.iou[0] == pytest.approx(0.5) and result.iou[1] == pytest.approx(1 / 3)
    assert math.isnan(result.iou[2]) and math.isnan(result.iou[3])
    assert result.miou == pytest.approx((0.5 + 1 / 3) / 2)
    assert result.accuracy == pytest.approx(3 / 5)
    # a bad label is counted on the device (no host sync per batch) and reported when the matrix is read
    matrix.update(torch.tensor([[0]]), torch.tensor([[7]]))
    with pytest.raises(ValueError, match="labels: expected 0..3"):
        matrix.matrix  # noqa: B018 (the property read is what raises)


def test_dice_loss_values():
    from damformer.uda.dacs import dice_loss

    labels = torch.tensor([[[0, 1], [1, 255]]])
    perfect = torch.nn.functional.one_hot(labels.clamp_max(2), 3).permute(0, 3, 1, 2).float() * 100
    assert dice_loss(perfect, labels).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(1, 3, 2, 2)
    # 3 valid pixels, p = 1/3 each; labelled classes 0 and 1: 2*(1/3) / (1 + 1) and 2*(2/3) / (1 + 2)
    expected = 1 - (2 * (1 / 3) / 2 + 2 * (2 / 3) / 3) / 2
    assert dice_loss(uniform, labels).item() == pytest.approx(expected)
    # zero-weight pixels do not count: only the first pixel (class 0) is left
    weight = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    only = 1 - 2 * (1 / 3) / (1 / 3 + 1)
    assert dice_loss(uniform, labels, weight).item() == pytest.approx(only)


def test_mic_hides_the_ratio_of_blocks_but_never_a_whole_image():
    from damformer.config import UDAConfig
    from damformer.models.damformer import AERIAL_MEAN
    from damformer.uda.dacs import SelfTraining

    training = SelfTraining(nn.Conv2d(1, 1, 1), UDAConfig(mic=True, mic_ratio=0.99, mic_block=32), seed=0)
    aerial = torch.rand(64, 5, 64, 64) * 200 + 30  # never equal to a band mean
    masked = training._mask_blocks(aerial)
    hidden = (masked == torch.tensor(AERIAL_MEAN)[None, :, None, None]).all(dim=1)  # (B, H, W)
    assert (~hidden).flatten(1).any(dim=1).all()  # at least one block of every image is visible
    assert hidden.float().mean() > 0.7  # most blocks hidden at ratio 0.99 (4 blocks: 3 of 4 at most)
    training.config.mic_ratio = 0.7
    big = training._mask_blocks(torch.rand(4, 5, 512, 512) * 200 + 30)
    share = (big == torch.tensor(AERIAL_MEAN)[None, :, None, None]).all(dim=1).float().mean()
    assert 0.6 < share < 0.8
