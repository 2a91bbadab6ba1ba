"""The upscaler (a request's `upscale`): super-resolution of the decoded images, 2x to 4x.

The network is ESRGAN's generator, RRDBNet (Wang et al., "ESRGAN: Enhanced Super-Resolution
Generative Adversarial Networks", ECCV 2018 workshops, arXiv:1809.00219): a conv, a trunk of
Residual-in-Residual Dense Blocks with a long skip, then two nearest x2 upsamplings with convs.
Real-ESRGAN (arXiv:2107.10833) trains it on real-world degradations and, for its x2 and x1
models, pixel-unshuffles the input first. The operator points `SDSERVE_UPSCALER` at weights in
that release layout (`RealESRGAN_x4plus.pth`, `RealESRGAN_x2plus.pth`: a `params_ema` dict of
`conv_first.*`, `body.N.rdbK.convJ.*`, ... tensors; or the same tensors as .safetensors). Width,
depth, growth and scale are read from the tensors' shapes. `.pth` files are read with
`weights_only`, so a pickle cannot run code.

Images are upscaled in tiles (`tile` input pixels, each with `tile_pad` pixels of context that
are cut off again), so memory is bounded whatever the size; when the network's own scale is not
the requested factor, its output is resized to the factor with Lanczos.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

UPSCALE_FACTORS = (2, 3, 4)
_UNSHUFFLE_OF_CHANNELS = {3: 1, 12: 2, 48: 4}  # input channels -> pixel-unshuffle factor


class UpscalerError(RuntimeError):
    """The configured upscaler file is missing, unreadable or not an RRDBNet; says which."""


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def _conv(channels_in: int, channels_out: int) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, 1, 1)


class ResidualDenseBlock(nn.Module):
    """Five convs, each seeing the block input and every earlier conv's output (dense); the
    result is scaled by 0.2 and added to the input."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.conv1 = _conv(features, growth)
        self.conv2 = _conv(features + growth, growth)
        self.conv3 = _conv(features + 2 * growth, growth)
        self.conv4 = _conv(features + 3 * growth, growth)
        self.conv5 = _conv(features + 4 * growth, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            seen.append(_lrelu(conv(torch.cat(seen, 1))))
        return x + 0.2 * self.conv5(torch.cat(seen, 1))


class RRDB(nn.Module):
    """Three dense blocks in a residual of their own (residual in residual)."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(features, growth)
        self.rdb2 = ResidualDenseBlock(features, growth)
        self.rdb3 = ResidualDenseBlock(features, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """RGB in [0, 1] of (N, 3, H, W) -> (N, 3, H * scale, W * scale)."""

    def __init__(self, scale: int, features: int = 64, blocks: int = 23, growth: int = 32):
        super().__init__()
        unshuffle = {4: 1, 2: 2, 1: 4}[scale]
        self.scale, self.unshuffle = scale, unshuffle
        self.conv_first = _conv(3 * unshuffle**2, features)
        self.body = nn.Sequential(*(RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = _conv(features, features)
        self.conv_up1 = _conv(features, features)
        self.conv_up2 = _conv(features, features)
        self.conv_hr = _conv(features, features)
        self.conv_last = _conv(features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        features = self.conv_first(x)
        features = features + self.conv_body(self.body(features))
        for conv in (self.conv_up1, self.conv_up2):
            features = _lrelu(conv(F.interpolate(features, scale_factor=2, mode="nearest")))
        return self.conv_last(_lrelu(self.conv_hr(features)))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> RRDBNet:
        """The network the tensors describe (scale, width, depth, growth), loaded with them."""
        first = state.get("conv_first.weight")
        if first is None or first.ndim != 4:
            raise ValueError(
                "not an RRDBNet in the Real-ESRGAN key layout (no 4-d conv_first.weight)"
            )
        unshuffle = _UNSHUFFLE_OF_CHANNELS.get(first.shape[1])
        if unshuffle is None:
            raise ValueError(
                f"conv_first takes {first.shape[1]} channels; an RRDBNet takes 3, 12 or 48"
            )
        blocks = {int(m[1]) for key in state if (m := re.match(r"body\.(\d+)\.rdb1\.", key))}
        growth = state.get("body.0.rdb1.conv1.weight")
        if not blocks or growth is None:
            raise ValueError("no body.N.rdb1.* weights: not an RRDBNet")
        net = cls(4 // unshuffle, first.shape[0], max(blocks) + 1, growth.shape[0])
        net.load_state_dict(state, strict=True)
        return net


def read_upscaler_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a Real-ESRGAN release file (`params_ema`/`params` unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("params_ema", "params"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ValueError("expected a dict of tensors (or one under params_ema / params)")
    return state


class Upscaler:
    """Upscales HxWx3 uint8 images by 2, 3 or 4 with an RRDBNet file, in tiles."""

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tile: int = 512,
        tile_pad: int = 32,
    ) -> None:
        path = Path(path)
        try:
            self.net = RRDBNet.from_state_dict(read_upscaler_weights(path))
        except Exception as exc:
            raise UpscalerError(
                f"upscaler could not be loaded from {path}: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            ) from exc
        self.net.to(device, dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        # tiles and their context stay multiples of 8, so the pixel unshuffle always divides
        self.tile = max(64, tile // 8 * 8)
        self.tile_pad = max(0, tile_pad // 8 * 8)

    @property
    def scale(self) -> int:
        """The network's own factor; other factors are resized from its output."""
        return self.net.scale

    def upscale(self, images: list[np.ndarray], factor: int) -> list[np.ndarray]:
        if factor not in UPSCALE_FACTORS:
            raise ValueError(f"upscale: a factor of 2, 3 or 4, got {factor}")
        return [self._upscale_one(image, factor) for image in images]

    def _upscale_one(self, image: np.ndarray, factor: int) -> np.ndarray:
        height, width = image.shape[:2]
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        pixels = pixels.to(self.device, self.dtype) / 255
        with torch.inference_mode():
            out = self._run_tiled(pixels).clamp(0, 1)
        result = (out[0].permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
        if self.scale != factor:
            size = (width * factor, height * factor)
            result = np.asarray(Image.fromarray(result).resize(size, Image.Resampling.LANCZOS))
        return result

    def _run_tiled(self, pixels: torch.Tensor) -> torch.Tensor:
        _, _, height, width = pixels.shape
        if height <= self.tile and width <= self.tile:
            return self.net(pixels)
        scale, pad = self.scale, self.tile_pad
        out = pixels.new_empty(1, 3, height * scale, width * scale)
        for top in range(0, height, self.tile):
            for left in range(0, width, self.tile):
                bottom, right = min(top + self.tile, height), min(left + self.tile, width)
                top_in, left_in = max(top - pad, 0), max(left - pad, 0)
                piece = self.net(
                    pixels[
                        :, :, top_in : min(bottom + pad, height), left_in : min(right + pad, width)
                    ]
                )
                rows = slice((top - top_in) * scale, (bottom - top_in) * scale)
                cols = slice((left - left_in) * scale, (right - left_in) * scale)
                out[:, :, top * scale : bottom * scale, left * scale : right * scale] = piece[
                    :, :, rows, cols
                ]
        return out
