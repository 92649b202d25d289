"""The latent space, described once: which encoder made the latents, their shape, the pixels they decode to.

`rae encode` writes a `LatentSpec` into the store's manifest; every export (decoder, DiT) copies the
one it was trained on verbatim into its ``model.json``; `check_same_latents` is the one comparison
that decides whether two of them can work together, and names each field that differs.

The statistics reference (`stats`) says where the normalisation statistics of these latents live,
relative to the folder that holds the spec (a store, a DiT export); it is ``None`` for a model that
consumes raw latents (the decoder). It locates a file, it does not change the space, so it is not
compared.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PIXELS_PER_TOKEN = 16  # the decoder emits 16x16 pixels per latent token, whatever the encoder's patch
STATS_FILE = "stats.safetensors"  # the normalisation statistics (rae.normalization.LatentStats)


@dataclass(frozen=True, kw_only=True)
class LatentSpec:
    """What a latent is: (grid**2 tokens, channels) from `encoder` with the weights of `weights_digest`
    at `input_size` px, decoding to `image_size` px images. Made by `RepresentationEncoder.latent_spec`
    (a loaded encoder) or `EncoderSpec.latent_spec` (a preset and a weights digest)."""

    encoder: str                 # encoder preset name (rae.encoders.ENCODER_PRESETS)
    weights_digest: str          # rae.encoders.state_dict_digest of its weights ("random-init" for none)
    input_size: int              # the encoder's input side, px
    patch_size: int              # the encoder's ViT patch side, px
    grid: int                    # tokens per side: input_size // patch_size
    channels: int
    pixels_per_token: int = PIXELS_PER_TOKEN
    image_size: int              # pixel-space side: grid * pixels_per_token
    stats: str | None = None     # normalisation statistics file beside the spec; None: raw latents

    def __post_init__(self) -> None:
        for name in ("input_size", "patch_size", "grid", "channels", "pixels_per_token", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LatentSpec.{name} must be a positive integer, got {value!r}")
        if self.grid != self.input_size // self.patch_size or self.input_size % self.patch_size:
            raise ValueError(f"LatentSpec: grid {self.grid} is not input_size {self.input_size} / patch_size "
                             f"{self.patch_size}")
        if self.image_size != self.grid * self.pixels_per_token:
            raise ValueError(f"LatentSpec: image_size {self.image_size} is not grid {self.grid} x "
                             f"pixels_per_token {self.pixels_per_token}")

    @property
    def tokens(self) -> int:
        return self.grid**2

    @property
    def shape(self) -> tuple[int, int]:
        """One latent: (tokens, channels)."""
        return (self.tokens, self.channels)

    def describe(self) -> str:
        return (f"{self.encoder} at {self.input_size} px ({self.tokens} tokens x {self.channels} channels, "
                f"{self.image_size} px images)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "latent spec") -> LatentSpec:
        """The spec of a JSON object; ``where`` names its source in the error when a field is missing."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a latent spec object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"{where}: the latent spec lacks {', '.join(missing)}; expected the fields {names}")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{where}: the latent spec has unknown fields {', '.join(unknown)}; expected {names}")
        return cls(**data)

    def differences(self, other: LatentSpec) -> list[tuple[str, Any, Any]]:
        """(field, this value, other value) for each field of the latent space that differs."""
        return [(f.name, getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                if f.name != "stats" and getattr(self, f.name) != getattr(other, f.name)]


def check_same_latents(a: LatentSpec, b: LatentSpec, what_a: str, what_b: str) -> None:
    """Refuse two latent specs that differ, naming each differing field and both sides' values."""
    diff = a.differences(b)
    if diff:
        lines = [f"{name}: {what_a} has {have!r}, {what_b} has {want!r}" for name, have, want in diff]
        raise ValueError(f"{what_a} works on {a.describe()}; {what_b} on {b.describe()}. They differ in:\n  "
                         + "\n  ".join(lines)
                         + "\nUse models made on latents of the same encoder, weights and input size.")
