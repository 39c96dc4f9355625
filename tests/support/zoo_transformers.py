"""Small faithful replicas of Vision Transformer families (timm's layout and module names).

ViT (Dosovitskiy et al.): patch embedding, CLS token, position embedding, pre-norm blocks of
multi-head attention (`attn_drop` after the softmax, as timm names it) and a GELU MLP. With
`fused_attn` (timm's default) attention is one F.scaled_dot_product_attention call, and attn_drop never runs;
`gelu="tanh"` uses GELU's tanh approximation.
DeiT (Touvron et al.): the same with a distillation token, so two tokens precede the patches.
Swin (Liu et al.): channels-last stages of windowed attention with relative position bias, shifted
windows (torch.roll and an attention mask) every other block, and patch merging (strided slices).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, fused_attn: bool = False):
        super().__init__()
        self.heads, self.scale, self.fused_attn = heads, (dim // heads) ** -0.5, fused_attn
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if bias is not None:
            attn = attn + bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: int = 2, gelu: str = "none"):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, dim * ratio), nn.GELU(gelu), nn.Linear(dim * ratio, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, fused_attn: bool = False, gelu: str = "none"):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, fused_attn)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, gelu=gelu)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image=32, patch=8, dim=32, depth=3, heads=4, classes=6, distilled=False, fused_attn=False,
                 gelu="none"):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.prefix = 2 if distilled else 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.dist_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5) if distilled else None
        self.pos_embed = nn.Parameter(torch.randn(1, self.prefix + (image // patch) ** 2, dim) * 0.5)
        self.blocks = nn.Sequential(*[Block(dim, heads, fused_attn, gelu) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = self.norm(self.blocks(torch.cat([*prefix, x], dim=1) + self.pos_embed))
        return self.head(x[:, :self.prefix].mean(dim=1))


def window_partition(x, size):
    batch, height, width, channels = x.shape
    x = x.view(batch, height // size, size, width // size, size, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size * size, channels)


def window_reverse(windows, size, batch, height, width):
    x = windows.view(batch, height // size, width // size, size, size, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height, width, -1)


class WindowAttention(nn.Module):
    """Multi-head attention inside windows, with a learned relative position bias gathered from a table."""

    def __init__(self, dim, heads, size):
        super().__init__()
        self.attention = Attention(dim, heads)
        self.bias_table = nn.Parameter(torch.randn((2 * size - 1) ** 2, heads) * 0.5)
        coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + size - 1
        self.register_buffer("bias_index", relative[..., 0] * (2 * size - 1) + relative[..., 1], persistent=False)

    def forward(self, windows, mask=None):
        tokens = windows.shape[1]
        bias = self.bias_table[self.bias_index.reshape(-1)].reshape(tokens, tokens, -1).permute(2, 0, 1)[None]
        if mask is not None:  # the shift mask differs per window; windows come image by image
            bias = (bias + mask[:, None]).repeat(windows.shape[0] // mask.shape[0], 1, 1, 1)
        return self.attention(windows, bias)


class SwinBlock(nn.Module):
    def __init__(self, dim, heads, resolution, size, shift):
        super().__init__()
        self.size, self.shift, self.resolution = size, shift, resolution
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, heads, size)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim)
        if shift:
            region = torch.zeros(1, resolution, resolution, 1)
            cuts = (slice(0, -size), slice(-size, -shift), slice(-shift, None))
            for n, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
                region[:, h, w, :] = n
            ids = window_partition(region, size)[..., 0]
            self.register_buffer("mask", (ids[:, None, :] != ids[:, :, None]).float() * -100.0, persistent=False)
        else:
            self.mask = None

    def forward(self, x):
        batch, height, width, channels = x.shape
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, self.size), self.mask), self.size, batch, height, width)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


class SwinStage(nn.Module):
    def __init__(self, dim, heads, resolution, size, downsample):
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
        shift = size // 2 if resolution > size else 0
        self.blocks = nn.Sequential(SwinBlock(dim, heads, resolution, size, 0),
                                    SwinBlock(dim, heads, resolution, size, shift))

    def forward(self, x):
        return self.blocks(self.downsample(x))


class SwinTransformer(nn.Module):
    def __init__(self, image=32, patch=4, dim=16, heads=(2, 4), size=4, classes=6):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.patch_norm = nn.LayerNorm(dim)
        grid = image // patch
        self.layers = nn.Sequential(SwinStage(dim, heads[0], grid, size, False),
                                    SwinStage(dim * 2, heads[1], grid // 2, size, True))
        self.norm = nn.LayerNorm(dim * 2)
        self.head = nn.Linear(dim * 2, classes)

    def forward(self, x):
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        x = self.norm(self.layers(x))
        return self.head(x.mean(dim=(1, 2)))


def vit(fused_attn: bool = False, gelu: str = "none"):
    """gelu="tanh": the tanh approximation, as in SigLIP's vision towers (exported as opset 20's Gelu)."""
    torch.manual_seed(0)
    return VisionTransformer(fused_attn=fused_attn, gelu=gelu).eval()


def deit():
    torch.manual_seed(1)
    return VisionTransformer(distilled=True).eval()


def swin():
    torch.manual_seed(2)
    return SwinTransformer().eval()
