"""Decoding-time weight layouts: batch-1 decoding reads every weight once per token, so it is bound
by memory bandwidth, and what matters is how many bytes are read and how fast the kernel streams them.

``prepare_for_decoding(model, dtype)`` rewrites a model's Linear layers in place, for inference only:

* ``fp32``: weights stored transposed, (in, out), so that the matrix-vector product ``x @ W^T`` streams
  W's rows as whole contiguous output vectors. Measured here (GPT-2-124M's matrices, batch 1, 1
  thread): 19.6 GB/s against 15.3 GB/s for ``F.linear`` on the (out, in) layout.
* ``bf16``: the whole model in bf16 (half the bytes), on the usual (out, in) layout (on an AVX2 CPU
  PyTorch's bf16 product with the transposed layout is pathologically slow: 1.6 tokens/s).
* ``int8``: weight-only int8 with one fp scale per output channel (``w ~ scale[o] * q[o, i]``), and
  bf16 activations, through PyTorch's ``_weight_int8pack_mm`` kernel: a quarter of fp32's bytes.
  Rounding to 8 bits changes the logits slightly (greedy outputs may differ from fp32's).

The model keeps working through the common protocol (``forward_logits``, KV cache, generation), but
cannot be trained or saved afterwards (the state dict no longer has the original weight names).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LMForgeError

DECODE_DTYPES = ("fp32", "bf16", "int8")


class DecodeLinear(nn.Module):
    """y = x W^T + b with W stored for decoding: transposed fp32/bf16, or int8 with per-row scales."""

    def __init__(self, linear: nn.Linear, mode: str) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.mode = mode
        self.out_features = w.shape[0]
        bias = linear.bias.detach() if linear.bias is not None else None
        if mode == "int8":
            wf = w.float()
            scale = wf.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            self.register_buffer("qweight", torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scale", scale.to(torch.bfloat16))
            self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))
        elif mode == "bf16":  # bf16 GEMV is fastest on the (out, in) layout (F.linear)
            self.register_buffer("weight", w.to(torch.bfloat16))
            self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))
        else:
            self.register_buffer("weight_t", w.t().contiguous())
            self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.mode == "int8":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scale)
        elif self.mode == "bf16":
            return F.linear(x.to(torch.bfloat16), self.weight, self.bias)
        else:
            y = x2.to(self.weight_t.dtype) @ self.weight_t
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def prepare_for_decoding(model: nn.Module, dtype: str = "fp32") -> nn.Module:
    """Rewrite ``model``'s Linear layers for fast decoding (in place; returns the model)."""
    if dtype not in DECODE_DTYPES:

        raise LMForgeError(f"unknown decoding dtype {dtype!r}; choose {', '.join(DECODE_DTYPES)}")
    if model.decode_dtype is not None:
        return model
    model.eval()
    for parent in list(model.modules()):  # quantize/transposes from the original (fp32) weights
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, DecodeLinear(child, dtype))
    if dtype in ("bf16", "int8"):
        model.to(torch.bfloat16)  # norms, embeddings and the KV cache in bf16 too (int8 stays int8)
    for p in model.parameters():
        p.requires_grad_(False)
    model.decode_dtype = dtype  # type: ignore[assignment]
    return model
