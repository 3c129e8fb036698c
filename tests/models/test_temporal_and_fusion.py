"""U-TAE (sizes, padding invariance, per-sample independence), DTF (no cross-sample leakage), LR footprint."""

import pytest
import torch

from damformer.models.factory import ModelConfig, build_model, count_parameters
from damformer.models.fusion import DeepTemporalFusion, footprint_sample
from damformer.models.utae import UTAE


def _series(batch=3, steps=5, size=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    s2 = torch.rand(batch, steps, 10, size, size, generator=generator)
    mask = torch.ones(batch, steps, dtype=torch.bool)
    days = torch.sort(torch.randint(0, 365, (batch, steps), generator=generator), dim=1).values
    return s2, mask, days


def test_utae_parameter_counts():
    pastis = UTAE(10, encoder_widths=(64, 64, 64, 128), decoder_widths=(32, 32, 64, 128), out_conv=(32, 20))
    assert abs(count_parameters(pastis) / 1e6 - 1.09) / 1.09 < 0.005
    flair = UTAE(10, encoder_widths=(64, 64, 128, 128), decoder_widths=(64, 64, 128, 128), out_conv=(32, 13))
    assert abs(count_parameters(flair) / 1e6 - 2.28) / 2.28 < 0.005


def test_utae_output_is_the_last_decoder_map_at_input_resolution():
    model = UTAE(10).eval()
    s2, mask, days = _series()
    assert model(s2, mask, days).shape == (3, 64, 40, 40)


def test_padding_dates_do_not_change_the_output():
    torch.manual_seed(0)
    model = UTAE(10).eval()
    s2, mask, days = _series(steps=4)
    with torch.no_grad():
        reference = model(s2, mask, days)
        # the batch grows to 7 dates: 3 padding dates of garbage, zero and odd day offsets, masked
        padded = torch.cat([s2, torch.randn(3, 3, 10, 40, 40) * 1e4], dim=1)
        padded_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1)
        padded_days = torch.cat([days, torch.full((3, 3), 999)], dim=1)
        found = model(padded, padded_mask, padded_days)
        # padding in the middle of a series (masked), for one sample only
        shuffled = padded.clone()
        shuffled_mask = padded_mask.clone()
        shuffled_days = padded_days.clone()
        shuffled[1, 2], shuffled[1, 5] = padded[1, 5], padded[1, 2]
        shuffled_mask[1, 2], shuffled_mask[1, 5] = False, True
        shuffled_days[1, 2], shuffled_days[1, 5] = padded_days[1, 5], padded_days[1, 2]
        moved = model(shuffled, shuffled_mask, shuffled_days)
    torch.testing.assert_close(found, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moved, reference, rtol=1e-5, atol=1e-5)


def test_an_all_zero_real_date_is_not_padding():
    model = UTAE(10).eval()
    s2, mask, days = _series(batch=1, steps=3)
    s2[0, 1] = 0
    with torch.no_grad():
        kept = model(s2, mask, days)
        dropped = model(s2, torch.tensor([[True, False, True]]), days)
    assert not torch.allclose(kept, dropped)


def test_utae_samples_are_independent_of_each_other():
    model = UTAE(10).eval()
    s2, mask, days = _series(batch=3)
    mask[2, 3:] = False
    with torch.no_grad():
        together = model(s2, mask, days)
        alone = model(s2[2:3, :3], mask[2:3, :3], days[2:3, :3])
    torch.testing.assert_close(together[2:3], alone, rtol=1e-5, atol=1e-5)


def test_footprint_sample_is_centred_and_exact():
    ramp = torch.arange(40.0).expand(40, 40)[None, None]  # value = column index (pixel centre i + 0.5)
    full = footprint_sample(ramp, 1.0, (40, 40))
    torch.testing.assert_close(full, ramp)  # the whole map at its own size: identity
    # FLAIR-2: 102.4 m of a 400 m crop, sampled at 512 px: centred on the crop's centre (value 19.5)
    flair = footprint_sample(ramp, 0.256, (512, 512))[0, 0, 0]
    assert flair.mean().item() == pytest.approx(19.5) and flair[0].item() == pytest.approx(19.5 - 5.12 + 0.01)
    # the miniature: 25.6 m of a 160 m crop = 2.56 pixels; an integer crop [6, 9) was centred on 7.0
    small = footprint_sample(torch.arange(16.0).expand(16, 16)[None, None], 0.16, (128, 128))[0, 0, 0]
    assert small.mean().item() == pytest.approx(7.5) and small.min() > 6.2 and small.max() < 8.8
    rows = footprint_sample(ramp.transpose(-1, -2), 0.256, (4, 4))[0, 0, :, 0]  # the other axis, few pixels
    torch.testing.assert_close(rows, torch.tensor([19.5 - 3.84, 19.5 - 1.28, 19.5 + 1.28, 19.5 + 3.84]))


def test_dtf_permuting_the_batch_permutes_the_output():
    torch.manual_seed(0)
    fusion = DeepTemporalFusion(64, [32, 64, 160, 256], levels=[-1, 1], zero_init=False).eval()
    hr = [torch.randn(4, c, s, s) for c, s in ((32, 16), (64, 8), (160, 4), (256, 2))]
    lr = torch.randn(4, 64, 40, 40)
    order = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        straight = fusion(hr, lr)
        permuted = fusion([h[order] for h in hr], lr[order])
    for a, b in zip(straight, permuted, strict=True):
        torch.testing.assert_close(a[order], b)
    assert torch.equal(straight[0], hr[0]) and torch.equal(straight[2], hr[2])  # other levels untouched
    assert not torch.equal(straight[3], hr[3]) and not torch.equal(straight[1], hr[1])
    # the collapsed path is each sample's own mean: changing sample 0's series leaves the others alone
    changed = lr.clone()
    changed[0] += 5
    with torch.no_grad():
        after = fusion(hr, changed)
    torch.testing.assert_close(after[3][1:], straight[3][1:])
    assert not torch.allclose(after[3][0], straight[3][0])


def test_whole_model_has_no_cross_sample_leakage():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="damformer", backbone="mit_b0")).eval()
    aerial = torch.randint(0, 256, (3, 5, 64, 64), dtype=torch.uint8)
    s2, mask, days = _series(batch=3, steps=4, size=16)
    mask[1, 2:] = False
    order = torch.tensor([1, 2, 0])
    with torch.no_grad():
        straight = model(aerial, s2, mask, days)
        permuted = model(aerial[order], s2[order], mask[order], days[order])
    torch.testing.assert_close(straight["hr"][order], permuted["hr"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(straight["lr"][order], permuted["lr"], rtol=1e-4, atol=1e-4)


def test_hr_loss_trains_the_temporal_branch_through_the_fusion():
    aerial = torch.randint(0, 256, (2, 5, 64, 64), dtype=torch.uint8)
    s2, mask, days = _series(batch=2, steps=3, size=16)
    random = build_model(ModelConfig(arch="unet_t", backbone="mit_b0", fusion_zero_init=False))
    random(aerial, s2, mask, days)["hr"].sum().backward()
    assert random.temporal.in_conv[0][0].weight.grad.abs().sum() > 0
    assert random.lr_head.weight.grad is None  # the HR loss alone does not reach the LR head
    # Zero-initialised fusion (the default): nothing reaches U-TAE at step 0, then the first step opens it.
    model = build_model(ModelConfig(arch="unet_t", backbone="mit_b0"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(aerial, s2, mask, days)["hr"].square().mean().backward()
    assert (
        model.temporal.in_conv[0][0].weight.grad is None
        or model.temporal.in_conv[0][0].weight.grad.abs().sum() == 0
    )
    optimizer.step()
    optimizer.zero_grad()
    model(aerial, s2, mask, days)["hr"].square().mean().backward()
    assert model.temporal.in_conv[0][0].weight.grad.abs().sum() > 0


def test_temporal_model_without_s2_is_a_clear_error():
    model = build_model(ModelConfig(arch="unet_c"))
    with pytest.raises(ValueError, match="pass s2, s2_mask and s2_days"):
        model(torch.zeros(1, 5, 64, 64, dtype=torch.uint8))


def test_masked_group_norm_equals_group_norm_on_real_dates():
    from damformer.models.utae import masked_group_norm

    norm = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(6, 16, 5)
    full = masked_group_norm(x, torch.ones(6, 5, dtype=torch.bool), norm)
    torch.testing.assert_close(full, norm(x))
    real = torch.tensor([True, True, False, True, False])
    part = masked_group_norm(x, real.expand(6, 5), norm)
    torch.testing.assert_close(part[:, :, real], norm(x[:, :, real]))


def test_zero_initialised_fusion_starts_as_the_aerial_features_and_learns():
    torch.manual_seed(0)
    fusion = DeepTemporalFusion(64, [32, 64, 160, 256], levels=[-1])
    hr = [torch.randn(2, c, s, s) for c, s in ((32, 16), (64, 8), (160, 4), (256, 2))]
    lr = torch.randn(2, 64, 40, 40, requires_grad=True)
    out = fusion(hr, lr)
    torch.testing.assert_close(out[3], hr[3])  # adds nothing at step 0
    out[3].square().sum().backward()
    assert fusion.cropped["3"].weight.grad.abs().sum() > 0  # ... but its output layers get gradients
    assert fusion.collapsed["3"][-1].weight.grad.abs().sum() > 0
