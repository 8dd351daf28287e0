"""Optimizers beyond PyTorch's AdamW: Muon for the hidden weight matrices, AdamW for the rest.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks"; Liu et al. 2025,
"Muon is scalable for LLM training") replaces each 2-D weight matrix's momentum update by its nearest
semi-orthogonal matrix, computed with a few Newton-Schulz iterations:

    M_t = mu M_{t-1} + G_t                          (momentum; Nesterov: use G_t + mu M_t)
    O_t = NewtonSchulz5(M_t) ~ U V^T  for  M_t = U S V^T
    W_t = (1 - lr wd) W_{t-1} - lr sqrt(max(1, rows / cols)) O_t

so every direction of the update has the same size, whatever the gradient's spectrum. Embeddings, the
output head, norms and biases are not "hidden" matrices and keep AdamW. Both live in one optimizer (one
state dict, one checkpoint, one learning-rate schedule: the trainer scales each group by ``lr_scale``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Quintic Newton-Schulz coefficients (Jordan et al.): pushes singular values towards [0.7, 1.2] in 5 steps,
# fast rather than exact, which is all an update direction needs.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximation of U V^T for G = U S V^T (the orthogonal factor of the polar decomposition); G is one
    matrix (r, c) or a stack of same-shape matrices (n, r, c), orthogonalised together in batched matmuls."""
    a, b, c = NS_COEFFS
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + eps)   # spectral norm <= Frobenius norm <= 1
    transposed = X.size(-2) > X.size(-1)
    if transposed:                                        # iterate on the smaller Gram matrix X X^T
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT                                      # (..., r, r), r = min(rows, cols)
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if transposed else X


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups marked ``muon=True``, AdamW (decoupled weight decay, bias-corrected) on the others.

    Group keys: ``lr``, ``weight_decay``, ``muon``, ``lr_scale`` (the trainer sets ``lr = schedule x lr_scale``),
    and ``momentum``/``nesterov`` (Muon) or ``betas``/``eps`` (AdamW)."""

    def __init__(self, groups: Iterable[dict], lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, momentum: float = 0.95, nesterov: bool = True,
                 ns_dtype: torch.dtype = torch.float32) -> None:
        self.ns_dtype = ns_dtype  # the precision of the Newton-Schulz matmuls (an approximation either way)
        defaults = dict(lr=lr, weight_decay=0.0, muon=False, lr_scale=1.0, betas=betas, eps=eps,
                        momentum=momentum, nesterov=nesterov)
        super().__init__(list(groups), defaults)
        for g in self.param_groups:
            if g["muon"] and any(p.dim() != 2 for p in g["params"]):
                raise ValueError("Muon updates 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            lr, wd = g["lr"], g["weight_decay"]
            if g["muon"]:
                mu = g["momentum"]
                by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = {}
                for p in params:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(p)
                    buf = st["momentum_buffer"]
                    buf.mul_(mu).add_(p.grad)
                    d = p.grad.add(buf, alpha=mu) if g["nesterov"] else buf
                    by_shape.setdefault(p.shape, []).append((p, d))
                for shape, items in by_shape.items():  # one batched Newton-Schulz per shape (n layers at once)
                    o = newton_schulz5(torch.stack([d.to(self.ns_dtype) for _, d in items]))
                    scale = -lr * max(1.0, shape[0] / shape[1]) ** 0.5
                    for (p, _), oi in zip(items, o):
                        p.mul_(1 - lr * wd).add_(oi.to(p.dtype), alpha=scale)
                continue
            b1, b2 = g["betas"]
            grads, m, v, steps = [], [], [], []
            for p in params:
                st = self.state[p]
                if "exp_avg" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                grads.append(p.grad)
                m.append(st["exp_avg"])
                v.append(st["exp_avg_sq"])
                steps.append(int(st["step"]))
            torch._foreach_lerp_(m, grads, 1 - b1)                      # m = b1 m + (1 - b1) g
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, 1 - b2)            # v = b2 v + (1 - b2) g^2
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            for p, mi, vi, t in zip(params, m, v, steps):
                c1, c2 = 1 - b1 ** t, 1 - b2 ** t
                denom = (vi.sqrt() / c2 ** 0.5).add_(g["eps"])
                p.addcdiv_(mi, denom, value=-lr / c1)
        return loss
