"""Build any network of the paper's ablation from a typed config.

=============  =====================================  ==========================================
``arch``       HR network                             defaults
=============  =====================================  ==========================================
``unet_c``     ResNet-style CNN encoder + U-Net       no pretrained weights
``daformer``   MiT + DAFormer context-aware head      MiT-b5, bands inflated
``unet_t``     MiT + U-Net decoder                    MiT-b5, bands inflated
``damformer``  MiT + U-Net decoder                    MiT-b4, 1x1 adapter 5 -> 3 (as released)
=============  =====================================  ==========================================

``temporal: true`` ("+T") adds the U-TAE branch on Sentinel-2, deep temporal fusion into the HR
encoder and LR logits, to any of them. ``bands``: ``rgb`` or ``rgbne`` (RGB + NIR + elevation).
DAM-Former differs from U-Net (T) in its HR defaults above and, in training, in its mixed loss and
ensemble pseudo-labels (which need the LR logits, so they apply to its "+T" configs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from damformer.models.damformer import AERIAL_NORMS, BAND_SETS, DAMFormer
from damformer.models.fusion import FLAIR2_FOOTPRINT, DeepTemporalFusion
from damformer.models.heads import DAFormerHead, SegFormerHead
from damformer.models.mit import MIT_SPECS, MixTransformer
from damformer.models.unet import ResNetEncoder, UNetDecoder
from damformer.models.utae import UTAE
from damformer.models.weights import load_mit_weights

log = logging.getLogger(__name__)

ARCHS = ("unet_c", "daformer", "unet_t", "damformer")
ARCH_NAMES = {"unet_c": "U-Net (C)", "daformer": "DAFormer", "unet_t": "U-Net (T)", "damformer": "DAM-Former"}
BAND_NAMES = {"rgb": "RGB", "rgbne": "RGB+NIR+E"}


@dataclass
class ModelConfig:
    """The network: one of the ablation's HR networks, its inputs, and the optional temporal branch.

    Attributes:
        arch: ``unet_c``, ``daformer``, ``unet_t`` or ``damformer``.
        bands: ``rgb`` or ``rgbne``.
        temporal: add U-TAE + deep temporal fusion + LR logits ("+T").
        backbone: MiT size (``mit_b0`` .. ``mit_b5``); None takes the arch's default.
        pretrained: local ImageNet MiT weights (SegFormer ``mit_b*.pth``, or a HF folder or file);
            ``none``: random initialisation, on purpose. Training refuses None (unset) for a MiT arch:
            DAFormer's recipe assumes ImageNet weights, and a MiT-b4/b5 silently trained from random
            weights is a different experiment. (Built outside training, None means random too.)
        band_init: how 5 bands meet RGB weights: ``inflate`` the first conv or a 1x1 ``adapter`` to 3;
            None takes the arch's default.
        head: ``daformer`` or ``segformer`` (for arch ``daformer`` only).
        num_classes: output classes (13 for FLAIR-2).
        drop_path: MiT stochastic depth rate.
        fusion_levels: HR encoder levels that receive the fusion (negative counts from the deepest).
            Default: the four deepest (every MiT level), as FLAIR-2's U-T&T; the authors' release fuses
            into the deepest only (``[-1]``), which on the miniature left the HR head blind to what the
            Sentinel-2 branch had learnt (benchmarks/RESULTS.md, "time series"). ``[]``: no fusion.
        fusion_zero_init: DTF's output layers start at zero, so the temporal branch enters gradually
            (ours; the released code initialises them randomly).
        aerial_norm: ``flair2``: NIR and elevation standardised by FLAIR-2's train statistics (ours);
            ``released``: the authors' NIR / 255 and elevation / 3164.91 (elevation then spans ~0.005).
        footprint: aerial footprint as a fraction of the Sentinel-2 crop side.
        s2_bands: Sentinel-2 bands.
        utae_widths: U-TAE encoder = decoder widths.
        decoder_channels: U-Net decoder widths (stride 16 .. 1).
    """

    arch: str = "damformer"
    bands: str = "rgbne"
    temporal: bool = True
    backbone: str | None = None
    pretrained: str | None = None
    band_init: str | None = None
    head: str = "daformer"
    num_classes: int = 13
    drop_path: float = 0.1
    fusion_levels: list[int] = field(default_factory=lambda: [-4, -3, -2, -1])
    fusion_zero_init: bool = True
    aerial_norm: str = "flair2"
    footprint: float = FLAIR2_FOOTPRINT
    s2_bands: int = 10
    utae_widths: list[int] = field(default_factory=lambda: [64, 64, 128, 128])
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])

    def __post_init__(self) -> None:
        _choice("model.arch", self.arch, ARCHS)
        _choice("model.bands", self.bands, tuple(BAND_SETS))
        _choice("model.head", self.head, ("daformer", "segformer"))
        _choice("model.aerial_norm", self.aerial_norm, tuple(AERIAL_NORMS))
        if self.backbone is not None:
            _choice("model.backbone", self.backbone, tuple(MIT_SPECS))
        if self.band_init is not None:
            _choice("model.band_init", self.band_init, ("inflate", "adapter"))
        if self.num_classes < 2:
            raise ValueError(f"model.num_classes: expected >= 2, found {self.num_classes}")
        if not 0 < self.footprint <= 1:
            raise ValueError(f"model.footprint: expected a fraction in (0, 1], found {self.footprint}")

    @property
    def mit_size(self) -> str:
        """The MiT size used (the arch's default when ``backbone`` is None)."""
        return self.backbone or ("mit_b4" if self.arch == "damformer" else "mit_b5")

    @property
    def band_mode(self) -> str:
        """``inflate`` or ``adapter`` (the arch's default when ``band_init`` is None)."""
        return self.band_init or ("adapter" if self.arch == "damformer" else "inflate")

    @property
    def inputs(self) -> str:
        """The ablation's input set, e.g. ``RGB+NIR+E+T``."""
        return f"{BAND_NAMES[self.bands]}{'+T' if self.temporal else ''}"

    @property
    def name(self) -> str:
        """The ablation's name, e.g. ``DAM-Former RGB+NIR+E+T``."""
        return f"{ARCH_NAMES[self.arch]} {self.inputs}"


def is_none(pretrained: str | None) -> bool:
    """Whether ``model.pretrained`` asks for random initialisation (``none``, or unset)."""
    return pretrained is None or pretrained.strip().lower() in ("none", "null", "")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: expected one of {', '.join(allowed)}, found {value!r}")


def build_model(config: ModelConfig) -> DAMFormer:
    """Build the network described by ``config`` (loading pretrained MiT weights if given)."""
    bands = BAND_SETS[config.bands]
    adapter = None
    in_chans = len(bands)
    if config.arch != "unet_c" and config.band_mode == "adapter" and in_chans != 3:
        adapter = rgb_adapter(in_chans)
        in_chans = 3
    if config.arch == "unet_c":
        encoder: nn.Module = ResNetEncoder(in_chans)
        dims, strides = encoder.out_dims, encoder.out_strides
    else:
        encoder = MixTransformer(config.mit_size, in_chans=in_chans, drop_path=config.drop_path)
        dims, strides = encoder.embed_dims, [4, 8, 16, 32]
        if config.pretrained and not is_none(config.pretrained):
            load_mit_weights(encoder, config.pretrained)
    if config.arch == "daformer":
        head_class = DAFormerHead if config.head == "daformer" else SegFormerHead
        decoder: nn.Module = head_class(dims, config.num_classes)
    else:
        decoder = UNetDecoder(dims, strides, config.num_classes, channels=config.decoder_channels)
    temporal = fusion = lr_head = None
    if config.temporal:
        widths = config.utae_widths
        temporal = UTAE(config.s2_bands, encoder_widths=widths, decoder_widths=widths)
        fusion = DeepTemporalFusion(
            temporal.out_dim,
            dims,
            levels=config.fusion_levels,
            footprint=config.footprint,
            zero_init=config.fusion_zero_init,
        )
        lr_head = nn.Conv2d(temporal.out_dim, config.num_classes, 1)
    return DAMFormer(
        encoder=encoder,
        decoder=decoder,
        bands=bands,
        adapter=adapter,
        temporal=temporal,
        fusion=fusion,
        lr_head=lr_head,
        footprint=config.footprint,
        normalisation=config.aerial_norm,
    )


def rgb_adapter(in_chans: int) -> nn.Conv2d:
    """A 1x1 conv ``in_chans`` -> 3 that starts as "take the RGB bands".

    Pretrained RGB weights see what they were trained on at step 0; NIR and elevation are blended in as
    training finds them useful.
    """
    adapter = nn.Conv2d(in_chans, 3, 1)
    nn.init.zeros_(adapter.weight)
    nn.init.zeros_(adapter.bias)
    with torch.no_grad():
        for band in range(3):
            adapter.weight[band, band] = 1.0
    return adapter


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
