"""CaiT's talking-heads attention through torch's fused ``scaled_dot_product_attention`` (``model.talking_heads=sdpa``).

timm's ``TalkingHeadAttn`` (CaiT's self-attention layers, [CaiT] sec. 3 after Shazeer et al. 2020) mixes the
heads' attention logits with a learned H x H matrix before the softmax (``proj_l``) and the attention
weights with another after it (``proj_w``). So it cannot call a fused attention kernel, and it writes and
reads a B x H x N x N tensor at each of its five steps (logits, mix, softmax, mix, weights @ values), in
the forward and again in the backward. That is why CaiT trains at a fraction of a ViT of its FLOPs
(issue 8: CaiT-S24 726 img/s eager on one H100, DeiT-S 5,218).

The same function, rewritten so that one fused attention call does the N x N part (exact in real
arithmetic; ``q`` already carries the 1/sqrt(d) scale, ``W_l, b_l, W_w, b_w`` are ``proj_l`` and ``proj_w``):

* before the softmax, head h's logits ``sum_g W_l[h,g] q_g k_g^T + b_l[h]`` are ``Q'_h K^T + b_l[h]`` with
  ``Q'_h = [W_l[h,0] q_0 | ... | W_l[h,H-1] q_{H-1}]`` (N x C) and ``K = [k_0 | ... | k_{H-1}]``, the
  unsplit keys (N x C). ``b_l[h]`` is one constant per row of the softmax, which it cancels exactly.
* so ``A_h = softmax(Q'_h K^T)``, and one ``scaled_dot_product_attention`` with H query heads of width C
  over a single key and value head ``K``, ``V = [v_0 | ... | v_{H-1}]`` gives ``O_h = A_h V`` (N x C),
  whose h'-th slice of width d is ``A_h v_h'``.
* after the softmax, head h's output ``(sum_g W_w[h,g] A_g + b_w[h]) v_h`` is
  ``sum_g W_w[h,g] O_g[:, h] + b_w[h] * sum_j v_h[j]``.

What it costs and saves: the attention's FLOPs grow H-fold (its heads are C wide, not C/H), while no
N x N tensor is written at all (the kernel keeps it on chip) and the pointwise passes over it are gone.
Whether that is a win depends on the device and on N, C and H: ``python -m trainer.bench_gpu`` times it
beside timm's eager and compiled step, and the recipes keep timm's path until that says otherwise.

The parameters and their names are timm's (the modules keep their class's ``__init__``; only ``forward``
changes), so checkpoints load either way. ``b_l`` stays in the graph with its exact gradient, zero (DDP
wants a gradient for every parameter). With attention dropout in training (no CaiT recipe has any) the
layer falls back to timm's forward, whose dropout acts on the mixed N x N weights.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["SdpaTalkingHeadAttn", "check_against_timm", "use_sdpa_talking_heads"]

try:  # timm is a dependency of the trainer; the module stays importable for the config's checks without it
    from timm.models.cait import TalkingHeadAttn
except ImportError:  # pragma: no cover - timm is installed wherever a model is built
    TalkingHeadAttn = torch.nn.Module


class SdpaTalkingHeadAttn(TalkingHeadAttn):
    """timm's ``TalkingHeadAttn`` with the forward of this module's docstring; same parameters, same outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.attn_drop.p > 0:  # dropout on the mixed weights: only timm's path has them
            return super().forward(x)
        batch, tokens, width = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, width).unbind(2)  # each [B, N, C]: heads side by side
        q = q * self.scale
        mix_l = self.proj_l.weight.to(q.dtype)  # [h, g]
        # Q'[b, h, n, g*d:(g+1)*d] = W_l[h, g] q[b, n, g*d:(g+1)*d]
        q_mixed = (mix_l[None, :, None, :, None] * q.reshape(batch, 1, tokens, heads, width // heads))
        q_mixed = q_mixed.reshape(batch, heads, tokens, width)
        shared = (batch, heads, tokens, width)  # one key and one value head, seen by every query head
        o = F.scaled_dot_product_attention(q_mixed, k[:, None].expand(shared), v[:, None].expand(shared),
                                           scale=1.0)  # [B, g, N, C]: A_g V
        mix_w = self.proj_w.weight.to(o.dtype)  # [h, g]
        o = o.reshape(batch, heads, tokens, heads, width // heads)  # [b, g, n, h, d]: A_g v_h
        out = torch.einsum("hg,bgnhd->bnhd", mix_w, o)
        # [B, 1, h, d]; summed in fp32 and cast back: CUDA autocast runs sum() in fp32, and an fp32 term
        # here would turn the whole output fp32
        v_sum = v.reshape(batch, tokens, heads, width // heads).sum(1, keepdim=True, dtype=torch.float32)
        out = out + (self.proj_w.bias[:, None] * v_sum).to(o.dtype)
        out = out + self.proj_l.bias.sum() * 0  # the softmax cancels b_l: its gradient is exactly zero
        return self.proj_drop(self.proj(out.reshape(batch, tokens, width)))


def check_against_timm(model: torch.nn.Module, device: torch.device, tokens: int = 196, batch: int = 4,
                       tolerance: float = 3.0) -> float:
    """The first fused layer of ``model`` against timm's forward of the same weights, on ``device`` under
    bf16 autocast (the kernels a GPU picks for these head widths and strides, which CI's CPU never runs):
    forward and input gradient, each as its error against an fp32 run of timm's, divided by timm's own
    bf16 error. Raises ``AssertionError`` if that ratio exceeds ``tolerance`` or if the layer's output
    projection is fed anything but bf16; returns the worse ratio."""
    layer = next(m for m in model.modules() if isinstance(m, SdpaTalkingHeadAttn))
    fed: list[torch.dtype] = []
    hook = layer.proj.register_forward_pre_hook(lambda module, args: fed.append(args[0].dtype))
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, tokens, layer.qkv.in_features, device=device, generator=generator)
    cotangent = torch.randn(x.shape, device=device, generator=generator)
    was_training = layer.training
    layer.eval()  # no dropout either way

    def run(forward, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = forward(leaf)
        (out.float() * cotangent).sum().backward()
        return out.detach().float(), leaf.grad.float()

    try:
        reference = run(super(SdpaTalkingHeadAttn, layer).forward, bf16=False)
        timm_bf16 = run(super(SdpaTalkingHeadAttn, layer).forward, bf16=True)
        fed.clear()
        fused_bf16 = run(layer.forward, bf16=True)
    finally:
        hook.remove()
        layer.train(was_training)
        layer.zero_grad(set_to_none=True)
    if fed != [torch.bfloat16]:
        raise AssertionError(f"the fused layer fed its projection {fed}, not bf16")

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).abs().max() / b.abs().max()).item()

    ratio = max(err(f, r) / max(err(t, r), 1e-6) for f, t, r in zip(fused_bf16, timm_bf16, reference, strict=True))
    if ratio > tolerance:
        raise AssertionError(f"the fused layer's bf16 error is {ratio:.1f}x timm's own (limit {tolerance})")
    return ratio


def use_sdpa_talking_heads(model: torch.nn.Module) -> int:
    """Switch every timm ``TalkingHeadAttn`` of ``model`` to :class:`SdpaTalkingHeadAttn` in place; how many.

    Parameters, buffers and the state dict are untouched (the class changes, not the module)."""
    count = 0
    for module in model.modules():
        if type(module) is TalkingHeadAttn:
            module.__class__ = SdpaTalkingHeadAttn
            count += 1
    return count
