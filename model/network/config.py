"""Network configuration: one dataclass and a registry of named configurations.

The same weights load in every sampling mode (`boltzmann`, `uniform`, `mask2former`, `dense`),
so ablations at inference time only change `sampling` / `token_ratio` / `tau0`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SAMPLING_MODES = ("boltzmann", "uniform", "mask2former", "dense")
ATTENTION_IMPLS = ("auto", "gather", "dense")


@dataclass
class BoltzFormerConfig:
    # Input
    image_size: int = 256  # slices are resized to image_size x image_size
    in_channels: int = 1  # the slice + one channel per context offset (set from context_offsets_mm)
    # 2.5D context: neighbouring slices at these offsets along z (mm), channels 1.. after the
    # slice itself (see boltzformer.context). () = a 2D model.
    context_offsets_mm: tuple[float, ...] = ()
    # Image encoder: channels of the stages at strides 2, 4, 8, 16
    encoder_channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    hidden_dim: int = 128  # decoder width (queries, tokens)
    pixel_dim: int = 64  # per-pixel embedding ("semantic map") width
    # Text
    text_dim: int = 384  # MiniLM sentence-encoder width
    max_text_tokens: int = 16  # word-piece tokens kept per prompt (plus the pooled token)
    # Decoder
    num_queries: int = 10
    num_layers: int = 6
    num_heads: int = 4
    ffn_dim: int = 256
    attention_strides: tuple[int, ...] = (16, 8, 4)  # attended round robin, coarse to fine
    # Stride of the per-pixel embedding map and of the final query masks. 0 = the finest
    # attention stride (the paper's layout); 2 adds a stride-2 detail branch so that nodules of
    # 2-4 pixels at network size cover whole mask cells.
    mask_stride: int = 0
    text_query_init: bool = True  # initialise queries by self-attention with the text tokens
    # Boltzmann sampling
    sampling: str = "boltzmann"
    token_ratio: float = 0.10  # K = max(min_tokens, round(ratio * H * W))
    min_tokens: int = 16
    tau0: float = 1.0  # tau_l = tau0 / (1 + l)
    attention_impl: str = "auto"  # gather (sparse, fixed K) | dense (SDPA + mask) | auto
    # Aggregation
    pigma: bool = True  # False: the final mask is the mean of the query masks only

    def __post_init__(self):
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, not {self.sampling!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}")
        if not 0.0 < self.token_ratio <= 1.0:
            raise ValueError("token_ratio must be in (0, 1]")
        if self.image_size % max(self.attention_strides) != 0:
            raise ValueError("image_size must be a multiple of the coarsest attention stride")
        self.encoder_channels = tuple(self.encoder_channels)
        self.context_offsets_mm = tuple(float(o) for o in self.context_offsets_mm)
        if self.in_channels != 1 + len(self.context_offsets_mm):
            raise ValueError(f"in_channels ({self.in_channels}) must be 1 + the number of context offsets "
                             f"{self.context_offsets_mm}")
        self.attention_strides = tuple(self.attention_strides)
        if self.mask_stride == 0:
            self.mask_stride = self.finest_stride
        if self.mask_stride not in (2, self.finest_stride):
            raise ValueError(f"mask_stride must be 2 or the finest attention stride ({self.finest_stride})")

    @property
    def finest_stride(self) -> int:
        """Stride of the finest token map the decoder attends to."""
        return min(self.attention_strides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BoltzFormerConfig":
        """The config a weights file's JSON records; keys of other versions are left out. A value
        of the wrong kind ("128" for 128) raises TypeError naming the option."""
        names = {f.name for f in dataclasses.fields(cls)}
        defaults = cls()
        for k, v in d.items():
            if k in names and not _same_kind(getattr(defaults, k), v):
                raise TypeError(f"{k} is {v!r}, where {type(getattr(defaults, k)).__name__} values are expected")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})

    def replace(self, **changes) -> "BoltzFormerConfig":
        if "attention_strides" in changes and "mask_stride" not in changes and self.mask_stride == self.finest_stride:
            changes["mask_stride"] = 0  # follow the new finest stride
        if "context_offsets_mm" in changes and "in_channels" not in changes:
            changes["in_channels"] = 1 + len(changes["context_offsets_mm"])
        return dataclasses.replace(self, **changes)


def _same_kind(default, value) -> bool:
    """Whether `value` (from JSON) can stand for an option whose default is `default`."""
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(default, bool):
        return isinstance(value, (bool, int))
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


CONFIGS: dict[str, BoltzFormerConfig] = {
    # The bundled model's architecture: ~1 M parameters, fast on a laptop CPU. The bundled weights
    # override mask_stride to 2 (resources/boltzformer-s.json, trained by boltzformer-s.stage3.json).
    "boltzformer-s": BoltzFormerConfig(),
    # A tiny variant for unit tests.
    "boltzformer-test": BoltzFormerConfig(
        image_size=64, encoder_channels=(8, 8, 16, 16), hidden_dim=32, pixel_dim=16,
        num_queries=4, num_layers=3, num_heads=2, ffn_dim=32, max_text_tokens=4,
    ),
}


def get_config(name: str = "boltzformer-s", **overrides) -> BoltzFormerConfig:
    if name not in CONFIGS:
        raise KeyError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name].replace(**overrides)
