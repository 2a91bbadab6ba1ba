"""Token merging (a request's `tomesd`): fewer tokens in the UNet's most expensive self-attention.

ToMe for Stable Diffusion (Bolya and Hoffman, "Token Merging for Fast Stable Diffusion", CVPR
2023 workshops, arXiv:2303.17604): before each self-attention of the highest-resolution level,
the tokens are split into destinations (one per 2x2 cell of the latent grid, at a random place
in the cell) and sources (the rest); the `ratio` x N sources most similar (cosine) to their best
destination are averaged into it, attention runs on the N - r tokens left, and its output is
copied back to the merged sources ("unmerge"), so the block's output has all N tokens again.
Self-attention cost falls with the square of the tokens kept.

Here the place in each cell is drawn from a generator seeded by the row's own timestep, so a
request's image does not depend on what shares its UNet forward, and the same seed gives the
same image. The level merged is the highest-resolution one that has attention (SD 2.0's first;
the tiny test model has none there, so its second). Hooks on those blocks' `attn1` are added
for one eager UNet call and removed after it, and act only on the thread that added them, so
compiled and graphed UNet calls never see them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MergePlan:
    """For one attention call: which tokens stay, and where merged ones go. All (rows, k)."""

    kept_positions: torch.Tensor  # sources that keep their own token
    merged_positions: torch.Tensor  # sources averaged into a destination
    merged_targets: torch.Tensor  # index into the destinations, per merged source
    dst_positions: torch.Tensor
    tokens: int

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, N, C) -> (rows, N - r, C): kept sources, then destinations averaged with the
        sources merged into them."""
        channels = x.shape[-1]
        kept = _take(x, self.kept_positions)
        dst = _take(x, self.dst_positions)
        merged = _take(x, self.merged_positions)
        targets = self.merged_targets[..., None].expand(-1, -1, channels)
        dst = dst.scatter_reduce(1, targets, merged, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(rows, N - r, C) -> (rows, N, C): each merged source gets its destination's output."""
        rows, _, channels = y.shape
        n_kept = self.kept_positions.shape[1]
        kept, dst = y[:, :n_kept], y[:, n_kept:]
        out = y.new_empty(rows, self.tokens, channels)
        _put(out, self.kept_positions, kept)
        _put(out, self.dst_positions, dst)
        _put(out, self.merged_positions, _take(dst, self.merged_targets))
        return out


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _put(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    out.scatter_(1, index[..., None].expand(-1, -1, out.shape[-1]), values)


def plan_merge(
    x: torch.Tensor, height: int, width: int, ratio: float, cell_choice: torch.Tensor
) -> MergePlan:
    """The bipartite soft matching of `x` (rows, height * width, C), tokens in row-major grid
    order, by cosine similarity of `x`. `cell_choice` (rows, cells) in 0..3 is each 2x2 cell's
    destination (row-major in the cell); tokens outside whole cells (an odd last row or column)
    are sources."""
    rows, tokens, _ = x.shape
    cells_y, cells_x = height // 2, width // 2
    device = x.device
    cell_y = torch.arange(cells_y, device=device).repeat_interleave(cells_x)
    cell_x = torch.arange(cells_x, device=device).repeat(cells_y)
    choice = cell_choice.to(device)
    dst_positions = (2 * cell_y + choice // 2) * width + 2 * cell_x + choice % 2  # (rows, cells)
    is_dst = torch.zeros(rows, tokens, dtype=torch.bool, device=device)
    is_dst.scatter_(1, dst_positions, True)
    src_positions = torch.nonzero(~is_dst)[:, 1].reshape(rows, -1)

    metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    scores = _take(metric, src_positions) @ _take(metric, dst_positions).transpose(1, 2)
    best, best_dst = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged_count = min(int(tokens * ratio), src_positions.shape[1])
    merged, kept = order[:, :merged_count], order[:, merged_count:]
    return MergePlan(
        kept_positions=src_positions.gather(1, kept),
        merged_positions=src_positions.gather(1, merged),
        merged_targets=best_dst.gather(1, merged),
        dst_positions=dst_positions,
        tokens=tokens,
    )


def cell_choices(timesteps: torch.Tensor, cells: int) -> torch.Tensor:
    """(rows, cells) destinations in 0..3, drawn per row from a generator seeded by the row's
    timestep: the same for a row whatever else is in the batch."""
    drawn: dict[int, torch.Tensor] = {}
    rows = []
    for t in timesteps.tolist():
        key = int(round(t * 1000))
        if key not in drawn:
            generator = torch.Generator().manual_seed(key)
            drawn[key] = torch.randint(0, 4, (cells,), generator=generator)
        rows.append(drawn[key])
    return torch.stack(rows)


def merged_level(unet: nn.Module) -> int:
    """The downsampling factor of the highest-resolution level that has attention."""
    for level, block_type in enumerate(unet.config.down_block_types):
        if "CrossAttn" in block_type:
            return 2**level
    return 2 ** (len(unet.config.down_block_types) - 1)  # the mid block's


@dataclass(frozen=True)
class TokenMerging:
    """ToMe's settings: the fraction of the merged level's tokens merged away."""

    ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 0.75:
            raise ValueError(f"tomesd ratio: must be in (0, 0.75], got {self.ratio}")

    @contextlib.contextmanager
    def applied(
        self, unet: nn.Module, latent_size: tuple[int, int], timesteps: torch.Tensor
    ) -> Iterator[None]:
        """Merge tokens in `unet`'s calls made by this thread inside the block, for latents of
        `latent_size` (h, w) whose rows are at `timesteps`."""
        factor = merged_level(unet)
        height, width = latent_size[0] // factor, latent_size[1] // factor
        if height < 2 or width < 2:
            yield
            return
        thread = threading.get_ident()
        choices = cell_choices(timesteps, (height // 2) * (width // 2))
        block_inputs: dict[int, torch.Tensor] = {}  # attention module -> its block's input
        pending: dict[int, MergePlan] = {}  # attention module -> its call's plan

        def block_entered(attention):
            def hook(_block, args, kwargs):
                if threading.get_ident() == thread:
                    hidden = args[0] if args else kwargs.get("hidden_states")
                    if hidden is not None:
                        block_inputs[id(attention)] = hidden
                return None

            return hook

        def before(module, args, kwargs):
            hidden = args[0]
            if threading.get_ident() != thread or hidden.shape[1] != height * width:
                return None
            # As ToMe for SD: tokens are matched by the transformer block's input, before
            # norm1, and what attention takes (after it) is what is merged.
            metric = block_inputs.pop(id(module), None)
            if metric is None or metric.shape != hidden.shape:
                metric = hidden
            plan = plan_merge(metric, height, width, self.ratio, choices)
            pending[id(module)] = plan
            return (plan.merge(hidden), *args[1:]), kwargs

        def after(module, args, kwargs, output):
            plan = pending.pop(id(module), None) if threading.get_ident() == thread else None
            return None if plan is None else plan.unmerge(output)

        handles = []
        try:
            for module in unet.modules():
                attention = getattr(module, "attn1", None)
                if attention is not None and hasattr(module, "attn2"):
                    handles.append(
                        module.register_forward_pre_hook(block_entered(attention), with_kwargs=True)
                    )
                    handles.append(attention.register_forward_pre_hook(before, with_kwargs=True))
                    handles.append(attention.register_forward_hook(after, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
