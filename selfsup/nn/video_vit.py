"""A Vision Transformer over space-time tubelets, the encoder of VideoMAE (Tong et al. 2022, arXiv:2203.12602), and
the tubelet geometry masked video modelling needs: tubelets as pixel rows, tube masks, 3-D sin-cos positions.

Tokens. A ``Conv3d`` of kernel = stride = (t, p, p) cuts clips (B, C, T, H, W) into (T/t)·(H/p)·(W/p) tubelets
(VideoMAE §3.2: t = 2, p = 16 for 224 px; here p = 8 for 64 px by default), one token each, in raster order over
(time, row, column): token index = i·(h·w) + j·w + k for tubelet (i, j, k) of a (T/t, h, w) grid — the order
``Conv3d(...).flatten(2)`` gives, and the order of :func:`tubelet_patchify`'s rows.

Positions. Fixed, separable 3-D sin-cos embeddings (:func:`sincos_pos_embed_3d`), not VideoMAE's 1-D sinusoid
table over the flattened token index: the 1-D table gives tubelet (i, j, k) a position that depends on the grid's
width and length, so it cannot be evaluated for another clip length or frame size without changing every token's
code; the separable one encodes each axis on its own channels (a quarter for time, 3/8 each for row and column, the
2-D MAE layout of :func:`~selfsup.nn.vit.sincos_pos_embed_2d` with a temporal quarter), so it is defined for any
grid. Clip lengths: any T divisible by the tubelet runs; the table is *built for the T seen* (tubelet i at temporal
position i, extended rather than interpolated), because views sample frames at a fixed stride, so a tubelet spans
the same time in a longer clip and should keep the spacing of training. Frame sizes other than ``image_size``
spread the spatial positions over the training grid's range, as the image ViT does for local crops
(:mod:`selfsup.nn.vit_model`: a crop covers the same scene at coarser spacing). Tables are cached per grid, device
and dtype; nothing is stored in the state dict, so a checkpoint loads into a model built for another clip length.

Encoder. timm's transformer ``Block`` s (pre-norm, qkv bias, MLP ratio 4, as the image ViT), a final LayerNorm,
no CLS token (VideoMAE has none). ``forward`` → the mean of the normalised tokens, (B, width) (VideoMAE's
fine-tuning head pools the mean; its LayerNorm after the mean is this final norm before it). The module imports
timm only when one is built, so registering the name costs nothing at import.
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from selfsup.nn.backbones import register_backbone
from selfsup.nn.masking import check_mask_ratio, gather_tokens, random_masking
from selfsup.nn.vit import _sincos_1d, _spread

Grid = tuple[int, int, int]
"""(T/t, H/p, W/p): tubelets along time, rows and columns."""


def _split_channels(dim: int) -> tuple[int, int, int]:
    """(time, row, column) channel counts of a ``dim``-wide 3-D sin-cos table: a quarter for time, the rest
    halved between row and column, each even (half sines, half cosines)."""
    if dim % 2 or dim < 8:
        raise ValueError(f"3-D sin-cos position embeddings need an even width ≥ 8, got {dim}")
    dt = dim // 4 // 2 * 2
    dh = (dim - dt) // 2 // 2 * 2
    return dt, dh, dim - dt - dh


def sincos_pos_embed_3d(dim: int, grid: Grid, extent: tuple[int, int] | None = None) -> Tensor:
    """Fixed separable space-time sin-cos embeddings, (t·h·w, dim) float32 in token order (time, row, column).

    Channels ``[time | row | column]`` (see :func:`_split_channels`); each block is the 1-D sin-cos code of its
    axis' position (half sines, half cosines over frequencies 1/10000^(2i/d)). Tubelet i along time is at
    position i; ``extent`` (H, W) spreads an h×w grid over an H×W grid's positions, as
    :func:`~selfsup.nn.vit.sincos_pos_embed_2d` does (by default cell (j, k) is at (j, k))."""
    gt, gh, gw = grid
    eh, ew = (gh, gw) if extent is None else extent
    dt, dh, dw = _split_channels(dim)
    t = torch.arange(gt, dtype=torch.float64).repeat_interleave(gh * gw)
    rows = _spread(gh, eh).repeat_interleave(gw).repeat(gt)
    cols = _spread(gw, ew).repeat(gt * gh)
    return torch.cat([_sincos_1d(dt, t), _sincos_1d(dh, rows), _sincos_1d(dw, cols)], dim=1).float()


def tubelet_patchify(x: Tensor, tubelet: int, p: int) -> Tensor:
    """(B, C, T, H, W) → (B, L, t·p·p·C): each row one tubelet's pixels as (frame, row, column, channel), rows in
    token order (module docstring). VideoMAE's reconstruction target layout ``(t p p) c`` (arXiv:2203.12602)."""
    b, c, t, h, w = x.shape
    if t % tubelet or h % p or w % p:
        raise ValueError(f"a {t}-frame {h}×{w} clip does not split into {tubelet}×{p}×{p} tubelets")
    y = x.reshape(b, c, t // tubelet, tubelet, h // p, p, w // p, p)
    y = y.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, T/t, h, w, t, p, p, C)
    return y.reshape(b, (t // tubelet) * (h // p) * (w // p), tubelet * p * p * c)


def tubelet_unpatchify(rows: Tensor, tubelet: int, p: int, grid: Grid) -> Tensor:
    """(B, L, t·p·p·C) → (B, C, T, H, W), the exact inverse of :func:`tubelet_patchify` on a (T/t, h, w) grid."""
    b, n, k = rows.shape
    gt, gh, gw = grid
    if gt * gh * gw != n or k % (tubelet * p * p):
        raise ValueError(f"cannot unpatchify (B, {n}, {k}) with tubelet {tubelet}×{p}×{p} and grid {grid}")
    c = k // (tubelet * p * p)
    y = rows.reshape(b, gt, gh, gw, tubelet, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return y.reshape(b, c, gt * tubelet, gh * p, gw * p)


class TubeMask(NamedTuple):
    keep: Tensor
    """(B, K) token indices of the visible tubes, K = (T/t)·k, ascending within each time step."""
    mask: Tensor
    """(B, L) bool in token order, True where the token is hidden."""
    spatial: Tensor
    """(B, h·w) bool, True where the tube through that spatial position is hidden (the same at every time)."""


def tube_masking(batch: int, grid: Grid, ratio: float, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> TubeMask:
    """VideoMAE's tube masking (arXiv:2203.12602 §3.3): one random spatial mask per sample, the same at every
    temporal position, so a hidden patch cannot be copied from its neighbour in time.

    The spatial mask is :func:`~selfsup.nn.masking.random_masking` over the h·w positions, so every sample keeps
    exactly k = int(h·w·(1 − ratio)) of them (MAE's rounding; VideoMAE's generator rounds the hidden count down
    instead, e.g. 57 rather than 58 hidden of 64 at 0.9) and the visible tokens stack into (B, (T/t)·k)."""
    gt, gh, gw = grid
    s = gh * gw
    check_mask_ratio(ratio, s)
    m = random_masking(batch, s, ratio, device, generator)
    spatial_keep = m.keep.sort(dim=1).values  # (B, k)
    offsets = torch.arange(gt, device=spatial_keep.device)[None, :, None] * s  # (1, T/t, 1)
    keep = (offsets + spatial_keep[:, None, :]).flatten(1)  # (B, T/t·k)
    return TubeMask(keep, m.mask.repeat(1, gt), m.mask)


class VideoViT(nn.Module):
    """A ViT on tubelets of clips (module docstring): (B, C, T, H, W) → (B, width), T any multiple of ``tubelet``,
    H and W multiples of ``patch_size``. Built for ``frames``-frame ``image_size`` clips (the dry-run size and the
    default grid); other sizes run as the module docstring says.

    Method-facing: :meth:`token_grid`, :meth:`tokens` (positioned embeddings, before the blocks),
    :meth:`encode` (any subset of them), :meth:`forward_visible` (the encoder on the kept tokens only, MAE-style)
    and :meth:`forward_tokens` (every token encoded)."""

    input_kind: ClassVar[str] = "clips"

    def __init__(self, in_chans: int, image_size: int, patch_size: int = 8, tubelet: int = 2, width: int = 192,
                 depth: int = 6, heads: int = 3, frames: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        problems = []
        if patch_size < 1 or image_size % patch_size:
            problems.append(f"image size {image_size} is not divisible by the patch size {patch_size}")
        if tubelet < 1 or frames < tubelet or frames % tubelet:
            problems.append(f"frames ({frames}) must be a positive multiple of the tubelet ({tubelet})")
        if heads < 1 or width % heads:
            problems.append(f"width {width} is not divisible by heads {heads}")
        if width % 2 or width < 8:
            problems.append(f"width must be even and ≥ 8 (its 3-D sin-cos positions), got {width}")
        if depth < 1:
            problems.append(f"depth must be ≥ 1, got {depth}")
        if problems:
            raise ValueError("video_vit: " + "; ".join(problems))
        from timm.models.vision_transformer import Block  # here, not at import: timm costs ~2 s of every command

        self.in_chans, self.image_size, self.frames = int(in_chans), int(image_size), int(frames)
        self.patch_size, self.tubelet, self.width = int(patch_size), int(tubelet), int(width)
        self.num_features = self.width
        self.min_frames = self.tubelet
        self.grid = (frames // tubelet, image_size // patch_size, image_size // patch_size)
        """The token grid of the clips it was built for."""
        tube = (tubelet, patch_size, patch_size)
        self.patch_embed = nn.Conv3d(in_chans, width, tube, tube)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.pos_cache: dict[tuple, Tensor] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        # VideoMAE's (and MAE's) initialisation: Xavier-uniform linear layers and tubelet projection (as a linear
        # map of the flattened tubelet), zero biases, unit LayerNorms.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.width, -1))
        nn.init.zeros_(self.patch_embed.bias)

    @property
    def spatial_grid(self) -> tuple[int, int]:
        return self.grid[1], self.grid[2]

    def input_problem(self, size: int) -> str | None:
        """Why ``size``×``size`` frames cannot be encoded (None when they can), for the run checks."""
        p = self.patch_size
        if size < p or size % p:
            return (f"{size}px frames are not divisible by the video ViT patch size {p}: set the view size to a "
                    f"multiple of {p} (e.g. views.size={max(p, size // p * p)}) or pick another patch size")
        return None

    def token_grid(self, x: Tensor) -> Grid:
        """The (T/t, H/p, W/p) tubelet grid of clips ``x`` (B, C, T, H, W); a ValueError naming the problem."""
        if x.dim() != 5:
            raise ValueError(f"video_vit takes clips (B, C, T, H, W), got a {x.dim()}-d tensor of shape "
                             f"{tuple(x.shape)}" + ("; images need an image backbone" if x.dim() == 4 else ""))
        _, c, t, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(f"video_vit was built for {self.in_chans}-channel clips, got {c} channels")
        if t < self.tubelet or t % self.tubelet:
            raise ValueError(f"video_vit: {t} frames do not split into tubelets of {self.tubelet}; use a clip length "
                             f"that is a multiple of {self.tubelet} (views.clip_len)")
        p = self.patch_size
        if h % p or w % p or h < p or w < p:
            raise ValueError(f"video_vit: {h}×{w} frames are not divisible by the patch size {p}; resize the views "
                             f"to a multiple of {p}")
        return t // self.tubelet, h // p, w // p

    def pos_embed_for(self, grid: Grid, dim: int | None = None) -> Tensor:
        """(1, L, dim) fixed positions of a token ``grid`` (module docstring), ``dim`` = width by default (a
        decoder asks for its own width); cached per grid, width, device and dtype."""
        dim = self.width if dim is None else dim
        ref = self.patch_embed.weight
        key = (tuple(grid), dim, ref.device, ref.dtype)
        if key not in self.pos_cache:
            extent = None if tuple(grid[1:]) == self.spatial_grid else self.spatial_grid
            self.pos_cache[key] = sincos_pos_embed_3d(dim, grid, extent)[None].to(ref.device, ref.dtype)
        return self.pos_cache[key]

    def tokens(self, x: Tensor) -> Tensor:
        """(B, C, T, H, W) → (B, L, width) tubelet embeddings plus their positions, in token order."""
        grid = self.token_grid(x)
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed_for(grid)

    def encode(self, tokens: Tensor) -> Tensor:
        """(B, N, width) positioned tokens (any subset) → (B, N, width) normalised outputs, in the same order."""
        return self.norm(self.blocks(tokens))

    def forward_visible(self, x: Tensor, keep: Tensor) -> Tensor:
        """The encoder on the kept tokens only, ``keep`` (B, K) token indices → (B, K, width) (VideoMAE: the
        encoder never sees the hidden tubes, nor mask tokens)."""
        return self.encode(gather_tokens(self.tokens(x), keep))

    def forward_tokens(self, x: Tensor) -> Tensor:
        """(B, C, T, H, W) → (B, L, width): every token encoded."""
        return self.encode(self.tokens(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_tokens(x).mean(dim=1)


def require_video_vit(backbone: nn.Module, method: str) -> VideoViT:
    """The backbone, if it is a :class:`VideoViT`; otherwise the ValueError naming what to use."""
    if not isinstance(backbone, VideoViT):
        raise ValueError(f"{method}: needs the tubelet video ViT (--backbone video_vit; backbone.params: patch_size, "
                         f"tubelet, width, depth, heads), which encodes a subset of tubelets; got "
                         f"{getattr(backbone, 'name', type(backbone).__name__)}")
    return backbone


@register_backbone("video_vit")
def video_vit(in_chans: int, image_size: int, patch_size: int = 8, tubelet: int = 2, width: int = 192, depth: int = 6,
              heads: int = 3, frames: int = 8, mlp_ratio: float = 4.0) -> VideoViT:
    """:class:`VideoViT`: tubelets of ``tubelet`` frames × ``patch_size``² pixels (VideoMAE, arXiv:2203.12602:
    2 × 16²), ViT-Ti width 192 and 3 heads, ``depth`` lowered for CPU recipes (ViT-Ti: 12)."""
    return VideoViT(in_chans, image_size, patch_size, tubelet, width, depth, heads, frames, mlp_ratio)
