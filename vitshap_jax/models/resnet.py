"""ResNet that takes an explicit patch mask: a classifier or surrogate of another architecture than the ViT.

The game is the same as the ViT's, `v_x(S) = link(f(x, S))` with S a set of visible square patches, but a
convolution has no tokens to drop: a held-out patch is removed from the *input*. Masking options
(`MASKINGS`):

* ``input``: the held-out patches' pixels are replaced by `mask_value`, a value outside the normalized
  data's support (-3 is below every normalized pixel of the supported normalizations), so that the
  network can learn to tell "held out" from "dark".
* ``zero``: they are replaced by 0, i.e. the mean pixel after normalization (the ViT's "zero" masking).

With `mask_channel=True` the patch mask itself, upsampled to pixels (1 visible, 0 held out), is appended
as a fourth input channel, so a surrogate is told exactly which pixels are missing. Either way the output
depends on a held-out patch's pixels in no way (tested). Any masking other than the ViT's "attention" is
evaluated by the game code as one plain masked pass per coalition.

Normalization (`norm`): ``group`` is GroupNorm, for training from scratch; each image is normalized on
its own, so a masked pass never depends on the other images of the batch. ``affine`` is a per-channel
scale and bias: a BatchNorm with its frozen statistics folded in, which is what imported timm weights
become (`resnet_pretrained.py`; our train state holds parameters only, no batch statistics). Both
have the same parameters (`scale`, `bias` per channel), so a folded checkpoint fine-tunes as it is.

Parameter names follow timm's ResNet (`conv1`, `norm1` for `bn1`, `layer{s}_{i}/conv{1,2,3}`,
`layer{s}_{i}/downsample_conv`, `downsample_norm`, `fc`), so that the import is a plain mapping.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax.numpy as jnp

from vitshap_jax import config
from vitshap_jax.models.vit import patch_mask_to_pixels

MASKINGS = config.MASKINGS["resnet"]  # ("input", "zero")
STEMS = tuple(s for s in config.RESNET_STEMS if s != "auto")  # "auto" is resolved by models.build_model
NORMS = config.RESNET_NORMS
# depth -> (bottleneck blocks?, blocks per stage), the torchvision / timm ResNets.
DEPTHS = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)), 50: (True, (3, 4, 6, 3))}
EXPANSION = 4  # output channels of a bottleneck block / its inner width


def group_count(channels: int) -> int:
    """Groups of the GroupNorm over `channels`: 32 (Wu & He's default), or channels / 2 when there are
    fewer than 64, so that small widths still normalize over 2 channels per group."""
    return math.gcd(32, max(channels // 2, 1))


class Affine(nn.Module):
    """Per-channel `x * scale + bias`: a BatchNorm in inference mode with its statistics folded in."""

    dtype: jnp.dtype = jnp.float32
    scale_init: nn.initializers.Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return x * scale.astype(self.dtype) + bias.astype(self.dtype)


def _norm(kind: str, x, dtype, name: str, *, last: bool = False):
    """Applies the normalization `kind` (module docstring) to `x` as a layer of the calling module.
    `last`: the final one of a residual branch, whose scale starts at zero so that each block starts as
    the identity (Goyal et al. 2017)."""
    scale_init = nn.initializers.zeros if last else nn.initializers.ones
    if kind == "affine":
        return Affine(dtype=dtype, scale_init=scale_init, name=name)(x)
    groups = group_count(x.shape[-1])  # statistics in float32 whatever the compute dtype (flax)
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype, scale_init=scale_init, name=name)(x)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34); `stride` in the first. Output channels: `planes`."""

    planes: int
    stride: int = 1
    norm: str = "group"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        y = conv(self.planes, (3, 3), strides=self.stride, padding=1, name="conv1")(x)
        y = nn.relu(_norm(self.norm, y, self.dtype, "norm1"))
        y = conv(self.planes, (3, 3), padding=1, name="conv2")(y)
        y = _norm(self.norm, y, self.dtype, "norm2", last=True)
        return nn.relu(y + _shortcut(x, self.planes, self.stride, self.norm, self.dtype))


class Bottleneck(nn.Module):
    """1x1, 3x3 (with `stride`), 1x1 convolutions (ResNet-50). Output channels: `planes * EXPANSION`."""

    planes: int
    stride: int = 1
    norm: str = "group"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        y = conv(self.planes, (1, 1), name="conv1")(x)
        y = nn.relu(_norm(self.norm, y, self.dtype, "norm1"))
        y = conv(self.planes, (3, 3), strides=self.stride, padding=1, name="conv2")(y)
        y = nn.relu(_norm(self.norm, y, self.dtype, "norm2"))
        y = conv(self.planes * EXPANSION, (1, 1), name="conv3")(y)
        y = _norm(self.norm, y, self.dtype, "norm3", last=True)
        return nn.relu(y + _shortcut(x, self.planes * EXPANSION, self.stride, self.norm, self.dtype))


def _shortcut(x, out: int, stride: int, norm: str, dtype):
    """The identity, or a strided 1x1 convolution + norm where the shape changes. Called inside a block's
    compact `__call__`, so its layers are the block's own (`downsample_conv`, `downsample_norm`)."""
    if stride == 1 and x.shape[-1] == out:
        return x
    y = nn.Conv(out, (1, 1), strides=stride, use_bias=False, dtype=dtype, name="downsample_conv")(x)
    return _norm(norm, y, dtype, "downsample_norm")


class ResNet(nn.Module):
    """ResNet classifier, evaluated on a coalition of visible patches.

    Attributes:
      num_classes: outputs of the head `fc` (1 for a binary target with a sigmoid link); the head starts
        at zero, like the ViT's.
      depth: 18 or 34 (basic blocks) or 50 (bottleneck blocks); `DEPTHS`.
      patch_size: side of a square patch (one player) in pixels.
      width: channels of the stem and the first stage; the stages have width * (1, 2, 4, 8) (times 4 at
        the output of bottleneck blocks).
      stem: "imagenet" (7x7 stride-2 convolution, 3x3 stride-2 max pool: /4) or "cifar" (3x3 stride-1
        convolution, no pool: small images keep their resolution).
      masking: how `patch_mask` removes patches, "input" or "zero" (module docstring).
      mask_value: the pixel value of held-out patches under "input" masking.
      mask_channel: append the pixel mask as a fourth input channel (1 visible, 0 held out; all ones
        without a `patch_mask`).
      norm: "group" (GroupNorm, training from scratch) or "affine" (folded BatchNorm, imported weights).
      dtype: compute dtype; parameters are float32, logits float32.
    """

    num_classes: int
    depth: int
    patch_size: int
    width: int = 64
    stem: str = "imagenet"
    masking: str = "input"
    mask_value: float = -3.0
    mask_channel: bool = False
    norm: str = "group"
    dtype: jnp.dtype = jnp.float32

    def _check(self):
        for field, value, allowed in (
            ("depth", self.depth, tuple(DEPTHS)),
            ("stem", self.stem, STEMS),
            ("masking", self.masking, MASKINGS),
            ("norm", self.norm, NORMS),
        ):
            if value not in allowed:
                raise ValueError(f"{field}={value!r}: must be one of {', '.join(map(str, allowed))}")

    def masked_input(self, images, patch_mask=None):
        """The network's input `[B, H, W, 3 (+1)]`: held-out patches replaced (`masking`), the mask
        channel appended (`mask_channel`). Arguments as in `__call__`."""
        self._check()
        b, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {p}")
        grid = (h // p, w // p)
        if patch_mask is None:
            pixels = jnp.ones((b, h, w, 1), images.dtype)
        else:
            n = grid[0] * grid[1]
            if patch_mask.shape != (b, n):
                raise ValueError(
                    f"patch_mask has shape {patch_mask.shape}; expected (batch, n_patches) = {(b, n)} "
                    f"for {h}x{w} images with {p}x{p} patches"
                )
            visible = patch_mask if patch_mask.dtype == jnp.bool_ else patch_mask > 0.5
            pixels = patch_mask_to_pixels(visible, grid, p).astype(images.dtype)
            fill = self.mask_value if self.masking == "input" else 0.0
            images = jnp.where(pixels > 0, images, jnp.asarray(fill, images.dtype))
        if self.mask_channel:
            images = jnp.concatenate([images, pixels], axis=-1)
        return images

    @nn.compact
    def __call__(self, images, patch_mask=None, *, train: bool = False):
        """Logits `[B, num_classes]` float32.

        Args:
          images: `[B, H, W, 3]` float, normalized; H and W multiples of `patch_size`.
          patch_mask: `[B, n_patches]` bool, or float with > 0.5 = visible; patches in row-major order.
            None means every patch is visible.
          train: accepted for the common model interface; the ResNet has no dropout and its norms keep
            no batch statistics, so training and inference compute the same function.
        """
        del train
        x = self.masked_input(images, patch_mask).astype(self.dtype)
        if self.stem == "imagenet":
            x = nn.Conv(
                self.width, (7, 7), strides=2, padding=3, use_bias=False, dtype=self.dtype, name="conv1"
            )(x)
            x = nn.relu(_norm(self.norm, x, self.dtype, "norm1"))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype, name="conv1")(x)
            x = nn.relu(_norm(self.norm, x, self.dtype, "norm1"))
        bottleneck, blocks = DEPTHS[self.depth]
        block = Bottleneck if bottleneck else BasicBlock
        for s, count in enumerate(blocks):
            for i in range(count):
                stride = 2 if s > 0 and i == 0 else 1
                x = block(self.width * 2**s, stride, self.norm, self.dtype, name=f"layer{s + 1}_{i}")(x)
        x = x.astype(jnp.float32).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="fc")(x)
