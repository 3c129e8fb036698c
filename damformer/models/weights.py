"""Pretrained MiT weights from a local file, in SegFormer's original layout or Hugging Face's.

Accepted files (never downloaded: pass a path):

* SegFormer's ``mit_b*.pth`` (keys ``patch_embed1.proj``, ``block1.0.attn.kv``, ``norm1``, ...; the
  ImageNet classifier ``head.*`` is ignored);
* a Hugging Face ``transformers`` SegFormer checkpoint: ``model.safetensors`` or ``pytorch_model.bin``,
  or the folder holding it (keys ``encoder.patch_embeddings.0.proj``,
  ``encoder.block.0.0.attention.self.{query,key,value}``, ..., optionally prefixed ``segformer.``;
  decode-head and classifier keys are ignored). HF's separate key and value layers are concatenated
  into our single ``kv`` layer.

Pickle is never executed: ``.pth``/``.bin`` go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from damformer.errors import DamformerError

log = logging.getLogger(__name__)

_ORIGINAL = [  # original SegFormer name -> ours (stage index is 1-based there)
    (r"^patch_embed(\d)\.(proj|norm)\.", lambda m: f"stages.{int(m[1]) - 1}.embed.{m[2]}."),
    (r"^block(\d)\.(\d+)\.attn\.norm\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.attn.sr_norm."),
    (
        r"^block(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.",
        lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.ffn.dwconv.",
    ),
    (r"^block(\d)\.(\d+)\.mlp\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.ffn."),
    (r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
    (r"^norm(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.norm."),
]
_HF = [  # Hugging Face hub layout -> ours (0-based)
    (r"^encoder\.patch_embeddings\.(\d)\.proj\.", lambda m: f"stages.{m[1]}.embed.proj."),
    (r"^encoder\.patch_embeddings\.(\d)\.layer_norm\.", lambda m: f"stages.{m[1]}.embed.norm."),
    (r"^encoder\.block\.(\d)\.(\d+)\.layer_norm_1\.", lambda m: f"stages.{m[1]}.blocks.{m[2]}.norm1."),
    (r"^encoder\.block\.(\d)\.(\d+)\.layer_norm_2\.", lambda m: f"stages.{m[1]}.blocks.{m[2]}.norm2."),
    (
        r"^encoder\.block\.(\d)\.(\d+)\.attention\.self\.query\.",
        lambda m: f"stages.{m[1]}.blocks.{m[2]}.attn.q.",
    ),
    (
        r"^encoder\.block\.(\d)\.(\d+)\.attention\.self\.sr\.",
        lambda m: f"stages.{m[1]}.blocks.{m[2]}.attn.sr.",
    ),
    (
        r"^encoder\.block\.(\d)\.(\d+)\.attention\.self\.layer_norm\.",
        lambda m: f"stages.{m[1]}.blocks.{m[2]}.attn.sr_norm.",
    ),
    (
        r"^encoder\.block\.(\d)\.(\d+)\.attention\.output\.dense\.",
        lambda m: f"stages.{m[1]}.blocks.{m[2]}.attn.proj.",
    ),
    (r"^encoder\.block\.(\d)\.(\d+)\.mlp\.dense1\.", lambda m: f"stages.{m[1]}.blocks.{m[2]}.ffn.fc1."),
    (
        r"^encoder\.block\.(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.",
        lambda m: f"stages.{m[1]}.blocks.{m[2]}.ffn.dwconv.",
    ),
    (r"^encoder\.block\.(\d)\.(\d+)\.mlp\.dense2\.", lambda m: f"stages.{m[1]}.blocks.{m[2]}.ffn.fc2."),
    (r"^encoder\.layer_norm\.(\d)\.", lambda m: f"stages.{m[1]}.norm."),
]
_HF_KV = re.compile(r"^encoder\.block\.(\d)\.(\d+)\.attention\.self\.(key|value)\.(weight|bias)$")
_IGNORED = re.compile(r"^(head\.|classifier\.|decode_head\.)")


@dataclass
class LoadReport:
    """What a weight load did: the layout found, keys loaded, missing from the file, left unused."""

    layout: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One paragraph for the log."""
        parts = [f"{self.loaded} tensors loaded ({self.layout} layout)"]
        for name in ("missing", "unexpected", "adapted"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{len(keys)} {name}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
        if self.ignored:
            parts.append(f"{len(self.ignored)} head/classifier tensors ignored")
        return "; ".join(parts)


def read_checkpoint(path: Path | str) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint file or HF folder (safetensors or weights-only torch pickle)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DamformerError(f"{path}: expected model.safetensors or pytorch_model.bin in this folder")
        path = found
    if not path.is_file():
        raise DamformerError(
            f"{path}: pretrained weights not found (nothing is downloaded at run time: copy SegFormer's "
            "ImageNet mit_b*.pth, or a Hugging Face nvidia/mit-b* folder, to this path; README: "
            "pretrained weights)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DamformerError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(tensors, dict) and isinstance(tensors.get(wrapper), dict):
            tensors = tensors[wrapper]
    if not isinstance(tensors, dict):
        raise DamformerError(f"{path}: expected a dict of tensors, found {type(tensors).__name__}")
    return tensors


def convert_to_ours(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename a SegFormer (original or HF) state dict to our MiT names."""
    tensors = {k.removeprefix("segformer.").removeprefix("backbone."): v for k, v in tensors.items()}
    hf = any(k.startswith("encoder.") for k in tensors)
    report = LoadReport(layout="huggingface" if hf else "segformer")
    rules = _HF if hf else _ORIGINAL
    out: dict[str, torch.Tensor] = {}
    pairs: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if _IGNORED.match(key):
            report.ignored.append(key)
            continue
        kv = _HF_KV.match(key) if hf else None
        if kv:
            pairs.setdefault((kv[1], kv[2], kv[4]), {})[kv[3]] = value
            continue
        for pattern, replace in rules:
            match = re.match(pattern, key)
            if match:
                out[replace(match) + key[match.end() :]] = value
                break
        else:
            report.unexpected.append(key)
    for (stage, block, kind), parts in pairs.items():
        if set(parts) != {"key", "value"}:
            report.unexpected.extend(
                f"encoder.block.{stage}.{block}.attention.self.{p}.{kind}" for p in parts
            )
            continue
        out[f"stages.{stage}.blocks.{block}.attn.kv.{kind}"] = torch.cat(
            [parts["key"], parts["value"]], dim=0
        )
    return out, report


def inflate_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Widen an RGB patch-embedding kernel (O, 3, k, k) to ``in_chans`` inputs.

    Extra bands start from the mean RGB filter; the whole kernel is then scaled by 3 / in_chans so a
    response to inputs of similar statistics keeps its magnitude (ours, method.md section 1).
    """
    extra = weight.mean(dim=1, keepdim=True).expand(-1, in_chans - weight.shape[1], -1, -1)
    return torch.cat([weight, extra], dim=1) * (weight.shape[1] / in_chans)


def load_mit_weights(encoder: torch.nn.Module, path: Path | str, *, strict: bool = False) -> LoadReport:
    """Load pretrained weights into a :class:`MixTransformer`, adapting the input bands if needed.

    Args:
        encoder: the MiT (its ``in_chans`` may exceed the checkpoint's 3: the first conv is inflated).
        path: local file or HF folder.
        strict: raise if any encoder weight is missing or any file tensor is unused.

    Raises:
        DamformerError: unreadable file, a shape that does not fit (e.g. another MiT size), or, with
            ``strict``, missing/unexpected keys.
    """
    tensors, report = convert_to_ours(read_checkpoint(path))
    own = encoder.state_dict()
    first = "stages.0.embed.proj.weight"
    file_bands, own_bands = (tensors[first].shape[1], own[first].shape[1]) if first in tensors else (0, 0)
    if file_bands != own_bands:
        if file_bands != 3 or own_bands < 3:
            raise DamformerError(f"{path}: first conv has {file_bands} input bands, the encoder {own_bands}")
        tensors[first] = inflate_first_conv(tensors[first], own_bands)
        report.adapted.append(f"{first} (3 -> {own_bands} bands)")
    for key, value in tensors.items():
        if (
            key in own
            and value.dim() == 4
            and value.shape[1] == 1
            and own[key].shape == value.squeeze(1).shape
        ):
            tensors[key] = value = value.squeeze(
                1
            )  # a depthwise kernel, stored (C, k, k) here (depthwise.py)
        if key in own and own[key].shape != value.shape:
            raise DamformerError(
                f"{path}: {key}: expected shape {tuple(own[key].shape)}, found {tuple(value.shape)} "
                f"(a checkpoint of another MiT size? this encoder is {getattr(encoder, 'size', '?')})"
            )
    report.unexpected.extend(k for k in tensors if k not in own)
    usable = {k: v for k, v in tensors.items() if k in own}
    report.missing = [k for k in own if k not in usable]
    report.loaded = len(usable)
    if strict and (report.missing or report.unexpected):
        raise DamformerError(f"{path}: {report.summary()}")
    encoder.load_state_dict(usable, strict=False)
    log.info("%s: %s", path, report.summary())
    return report
