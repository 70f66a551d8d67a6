"""A UNet explainer (FastSHAP's image explainer): per-pixel values averaged to one value per patch.

FastSHAP (Jethani et al. 2022) amortizes Shapley values with a convolutional UNet instead of a ViT:
the image goes through convolution blocks at `levels` resolutions (each down-sampling step halves the
side and doubles the channels), comes back up through transposed convolutions with skip connections,
and a 1x1 convolution gives C values per pixel. Those are averaged over each patch's pixels, so the
output has the contract of the ViT explainer (`explainer_head.Explainer`):

    UNetExplainer(num_classes=C, patch_size=p).apply({"params": params}, images)  # -> phi_raw [B, n, C]

with n = (H/p) * (W/p) patches in row-major order, made efficient afterwards by
`shapley.additive_efficient_normalization` like the ViT's values. It shares no parameters with the
classifier or surrogate: it is trained from scratch.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

NORMS = ("group", "none")


def unet_levels(height: int, width: int, levels: int) -> int:
    """The down-sampling steps a `height` x `width` image gets: the largest k <= `levels` such that both
    sides are divisible by 2^k and the coarsest map is still at least 2x2 (8 px images: 2 steps;
    32 px: 3; 224 px: 3). Odd sides get none."""
    k = 0
    while k < levels and all(s % 2 ** (k + 1) == 0 and s // 2 ** (k + 1) >= 2 for s in (height, width)):
        k += 1
    return k


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by GroupNorm (`norm="group"`) and ReLU."""

    features: int
    norm: str = "group"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            # A bias is redundant before a normalization that subtracts the mean.
            x = nn.Conv(
                self.features, (3, 3), use_bias=self.norm == "none", dtype=self.dtype, name=f"conv_{i}"
            )(x)
            if self.norm == "group":
                # 8 groups where the channels allow (fewer for tiny widths): stable at batch size 1, and no
                # running statistics, so the train state holds parameters only.
                x = nn.GroupNorm(math.gcd(8, self.features), dtype=self.dtype, name=f"norm_{i}")(x)
            x = nn.relu(x)
        return x


class UNetExplainer(nn.Module):
    """FastSHAP's UNet explainer: `images [B, H, W, 3]` -> `phi_raw [B, n, C]` float32.

    Attributes:
      num_classes: C, values per patch (every class is explained at once).
      patch_size: side of a square patch (a player) in pixels; H and W must be multiples of it.
      width: channels of the first level; each down-sampling step doubles them.
      levels: the most down-sampling steps (2x2 max pooling each). Fewer are used when the image is
        small or its side not divisible by 2^levels (`unet_levels`): an 8x8 image gets 2 (down to 2x2),
        32 and 224 px images get 3. The parameters depend on the steps used, so initialize the model at
        the image size it will run on.
      norm: "group" (GroupNorm after every convolution) or "none". No BatchNorm: a train state holds
        parameters only.
      dropout_rate: dropout before the output convolution, active only with `train=True`.
      dtype: compute dtype; parameters and the output are float32.

    The per-pixel values end in `tanh`, like the ViT explainer head, and are then averaged per patch.
    The bound is true of the target: the game's values are probabilities, so every marginal
    contribution, and hence every Shapley value, lies in [-1, 1]; a patch value is a mean of per-pixel
    values in (-1, 1), so it respects it too. It also keeps the two explainers interchangeable in one
    stage: the same output range, loss scale and learning rates.
    """

    num_classes: int
    patch_size: int
    width: int = 32
    levels: int = 3
    norm: str = "group"
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def pixel_values(self, images, *, train: bool = False):
        """Per-pixel values `[B, H, W, C]` float32 in (-1, 1), before the patch average."""
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}: must be one of {', '.join(NORMS)}")
        _, h, w, _ = images.shape
        steps = unet_levels(h, w, self.levels)
        block = lambda i, name: ConvBlock(self.width * 2**i, self.norm, self.dtype, name=name)  # noqa: E731
        x = block(0, "block_0")(images.astype(self.dtype))
        skips = []
        for i in range(1, steps + 1):
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = block(i, f"down_{i}")(x)
        for i in range(steps, 0, -1):
            x = nn.ConvTranspose(
                self.width * 2 ** (i - 1), (2, 2), strides=(2, 2), dtype=self.dtype, name=f"upsample_{i}"
            )(x)
            x = block(i - 1, f"up_{i}")(jnp.concatenate([skips.pop(), x], axis=-1))
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="out")(x)
        return jnp.tanh(x.astype(jnp.float32))

    def __call__(self, images, *, train: bool = False):
        """`images [B, H, W, 3]` (normalized pixels) -> `phi_raw [B, n, C]` float32: the mean of
        `pixel_values` over each patch's pixels, patches row-major."""
        b, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {p}")
        x = self.pixel_values(images, train=train)
        x = x.reshape(b, h // p, p, w // p, p, self.num_classes).mean(axis=(2, 4))
        return x.reshape(b, (h // p) * (w // p), self.num_classes)
