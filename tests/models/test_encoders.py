"""MiT sizes, pretrained weight loading in both layouts (against the real transformers), band adaptation."""

import pickle

import pytest
import torch
from transformers import SegformerConfig, SegformerForImageClassification, SegformerModel

from damformer.errors import DamformerError
from damformer.models.factory import ModelConfig, build_model, count_parameters
from damformer.models.heads import DAFormerHead
from damformer.models.mit import MIT_SPECS, MixTransformer
from damformer.models.weights import load_mit_weights

# method.md: b0 is given exactly (transformers' SegformerModel, 3,319,392), the others to 3 digits.
PUBLISHED_MILLIONS = {
    "mit_b0": 3.319392,
    "mit_b1": 13.2,
    "mit_b2": 24.2,
    "mit_b3": 44.1,
    "mit_b4": 60.8,
    "mit_b5": 81.4,
}


@pytest.mark.parametrize("size", list(MIT_SPECS))
def test_mit_parameter_counts_match_segformer(size):
    count = count_parameters(MixTransformer(size))
    assert abs(count / 1e6 - PUBLISHED_MILLIONS[size]) / PUBLISHED_MILLIONS[size] < 0.005
    if size == "mit_b0":
        assert count == count_parameters(SegformerModel(SegformerConfig())) == 3_319_392


def test_daformer_head_and_model_sizes():
    head = DAFormerHead(MIT_SPECS["mit_b5"].embed_dims, 13)
    assert abs(count_parameters(head) / 1e6 - 3.7) < 0.05
    model = build_model(ModelConfig(arch="daformer", bands="rgb", temporal=False))
    assert abs(count_parameters(model) / 1e6 - 85.2) / 85.2 < 0.005


def test_mit_outputs_four_strides_for_any_band_count():
    for bands in (3, 5, 7):
        features = MixTransformer("mit_b0", in_chans=bands).eval()(torch.randn(1, bands, 96, 64))
        assert [tuple(f.shape[1:]) for f in features] == [(32, 24, 16), (64, 12, 8), (160, 6, 4), (256, 3, 2)]


def _hf_reference(tmp_path, seed=0):
    torch.manual_seed(seed)
    reference = SegformerModel(SegformerConfig()).eval()  # the mit-b0 configuration
    reference.save_pretrained(tmp_path / "hf")
    return reference


def _features_match(reference, ours, x):
    with torch.no_grad():
        expected = reference(x, output_hidden_states=True).hidden_states
        found = ours(x)
    assert len(expected) == len(found) == 4
    for a, b in zip(expected, found, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_huggingface_checkpoint_gives_the_same_features(tmp_path):
    reference = _hf_reference(tmp_path)
    ours = MixTransformer("mit_b0").eval()
    report = load_mit_weights(ours, tmp_path / "hf", strict=True)
    assert report.layout == "huggingface" and report.loaded == len(ours.state_dict())
    _features_match(reference, ours, torch.randn(2, 3, 96, 128))


def test_huggingface_pytorch_model_bin_and_classification_prefix(tmp_path):
    torch.manual_seed(1)
    classifier = SegformerForImageClassification(SegformerConfig(num_labels=10)).eval()
    classifier.save_pretrained(tmp_path / "hub")  # hub layout: "segformer.encoder...", "classifier.*"
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "hub" / "model.safetensors"), tmp_path / "pytorch_model.bin")
    ours = MixTransformer("mit_b0").eval()
    report = load_mit_weights(ours, tmp_path)
    assert not report.missing and not report.unexpected
    assert report.ignored and all(k.startswith("classifier.") for k in report.ignored)
    _features_match(classifier.segformer, ours, torch.randn(1, 3, 64, 64))


def _to_original_layout(hf_state: dict) -> dict:
    """SegFormer's original mit_b*.pth names, written independently of the loader's rules."""
    out = {"head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)}
    renames = {
        "layer_norm_1": "norm1",
        "layer_norm_2": "norm2",
        "attention.self.query": "attn.q",
        "attention.self.sr": "attn.sr",
        "attention.self.layer_norm": "attn.norm",
        "attention.output.dense": "attn.proj",
        "mlp.dense1": "mlp.fc1",
        "mlp.dense2": "mlp.fc2",
        "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    }
    for key, value in hf_state.items():
        parts = key.split(".")
        if parts[1] == "patch_embeddings":
            name = {"proj": "proj", "layer_norm": "norm"}[parts[3]]
            out[f"patch_embed{int(parts[2]) + 1}.{name}.{parts[-1]}"] = value
        elif parts[1] == "layer_norm":
            out[f"norm{int(parts[2]) + 1}.{parts[-1]}"] = value
        elif parts[1] == "block":
            stage, block, inner = int(parts[2]) + 1, parts[3], ".".join(parts[4:-1])
            if inner in ("attention.self.key", "attention.self.value"):
                continue
            out[f"block{stage}.{block}.{renames[inner]}.{parts[-1]}"] = value
    for key, value in hf_state.items():  # key and value -> one kv layer
        if key.endswith("attention.self.key.weight") or key.endswith("attention.self.key.bias"):
            parts = key.split(".")
            stem = f"block{int(parts[2]) + 1}.{parts[3]}.attn.kv.{parts[-1]}"
            out[stem] = torch.cat([value, hf_state[key.replace(".key.", ".value.")]])
    return out


def test_original_segformer_checkpoint_gives_the_same_features(tmp_path):
    reference = _hf_reference(tmp_path)
    torch.save({"state_dict": _to_original_layout(_hf_state(tmp_path))}, tmp_path / "mit_b0.pth")
    ours = MixTransformer("mit_b0").eval()
    report = load_mit_weights(ours, tmp_path / "mit_b0.pth")
    assert report.layout == "segformer" and not report.missing and not report.unexpected
    assert report.ignored == ["head.weight", "head.bias"]
    _features_match(reference, ours, torch.randn(2, 3, 64, 96))


def _hf_state(tmp_path):
    from safetensors.torch import load_file

    return load_file(tmp_path / "hf" / "model.safetensors")


def test_five_bands_inflate_the_first_conv(tmp_path):
    _hf_reference(tmp_path)
    rgb = _hf_state(tmp_path)["encoder.patch_embeddings.0.proj.weight"]
    ours = MixTransformer("mit_b0", in_chans=5)
    report = load_mit_weights(ours, tmp_path / "hf")
    assert report.adapted == ["stages.0.embed.proj.weight (3 -> 5 bands)"]
    weight = ours.stages[0].embed.proj.weight.detach()
    torch.testing.assert_close(weight[:, :3], rgb * 3 / 5)
    torch.testing.assert_close(weight[:, 3], rgb.mean(dim=1) * 3 / 5)
    torch.testing.assert_close(weight[:, 4], rgb.mean(dim=1) * 3 / 5)


def test_adapter_mode_starts_as_the_rgb_model(tmp_path):
    reference = _hf_reference(tmp_path)
    config = ModelConfig(
        arch="damformer", bands="rgbne", temporal=False, backbone="mit_b0", pretrained=str(tmp_path / "hf")
    )
    model = build_model(config).eval()
    aerial = torch.randint(0, 256, (1, 5, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        found = model(aerial)["features"]
        expected = reference(model.normalise_aerial(aerial)[:, :3], output_hidden_states=True).hidden_states
    for a, b in zip(expected, found, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_checkpoint_of_another_size_is_refused_by_name(tmp_path):
    _hf_reference(tmp_path)
    with pytest.raises(DamformerError, match=r"hf: stages\.0\..*: expected shape \(64,.*another MiT size"):
        load_mit_weights(MixTransformer("mit_b1"), tmp_path / "hf")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_missing_file_and_crafted_pickle_are_refused(tmp_path):
    with pytest.raises(DamformerError, match="pretrained weights not found"):
        load_mit_weights(MixTransformer("mit_b0"), tmp_path / "nope.pth")

    class Payload:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').write('x')",))

    crafted = tmp_path / "evil.pth"
    crafted.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(DamformerError, match="cannot read weights"):
        load_mit_weights(MixTransformer("mit_b0"), crafted)
    assert not (tmp_path / "pwned").exists()
