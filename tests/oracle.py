"""Dense SINGD oracle, written in the tests straight from docs/algorithm.md.

Every factor is a dense float64 matrix; a structure enters only through its
projection (tests/_dense_projection.py) and through closure under products. Layer
inputs and output gradients are taken with ordinary autograd (forward hooks plus
`retain_grad`), patches of convolutions are built by explicit padding + unfold.
Slow and simple on purpose. Supports several calls of a layer per forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tests._dense_projection import project


def conv_rows(mod, x):
    """Unfolded patches [N, positions, C_in/groups * prod(k)] of a Conv1d/Conv2d."""
    if isinstance(mod, nn.Conv1d):
        x = x.unsqueeze(2)
        k, s, d = (1, mod.kernel_size[0]), (1, mod.stride[0]), (1, mod.dilation[0])
        pads = [(0, 0)]
        pads.append(_pad_pair(mod.padding, k[1], d[1], 0))
    else:
        k, s, d = mod.kernel_size, mod.stride, mod.dilation
        pads = [_pad_pair(mod.padding, k[i], d[i], i) for i in range(2)]
    if mod.groups > 1:
        N, Cin = x.shape[:2]
        x = x.reshape(N, mod.groups, Cin // mod.groups, *x.shape[2:]).mean(1)
    mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
    x = F.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]), mode=mode)
    return F.unfold(x, k, dilation=d, stride=s).transpose(1, 2)


def _pad_pair(padding, k, d, i):
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = d * (k - 1)
        return (total // 2, total - total // 2)
    p = padding[i] if isinstance(padding, tuple) else padding
    return (p, p)


class DenseOracle:
    """SINGD/IKFAC with dense float64 factors, updating ``model`` in place."""

    def __init__(self, model, lr=1e-3, momentum=0.9, damping=1e-3, alpha1=0.5,
                 weight_decay=0.0, T=10, loss_average="batch", lr_cov=1e-2,
                 structures=("dense", "dense"), kfac_approx="expand", kfac_like=False,
                 normalize_lr_cov=False):
        self.model = model
        self.lr, self.mom, self.lam, self.wd, self.T = lr, momentum, damping, weight_decay, T
        self.alpha1 = 0.0 if kfac_like else alpha1
        self.loss_average, self.lr_cov, self.approx = loss_average, lr_cov, kfac_approx
        self.kfac_like, self.normalize = kfac_like, normalize_lr_cov
        self.structures = structures
        self.t = 0
        self.layers = {n: m for n, m in model.named_modules()
                       if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d) and m.weight.requires_grad}
        self.state = {}
        for n, m in self.layers.items():
            dK = m.weight[0].numel() + self._has_bias(m)
            dC = m.weight.shape[0]
            self.state[n] = dict(K=torch.eye(dK, dtype=torch.float64), C=torch.eye(dC, dtype=torch.float64),
                                 mK=torch.zeros(dK, dK, dtype=torch.float64),
                                 mC=torch.zeros(dC, dC, dtype=torch.float64))
        self.buf = {id(p): torch.zeros_like(p) for p in model.parameters()}

    @staticmethod
    def _has_bias(m):
        return m.bias is not None and m.bias.requires_grad

    def _struct(self, name):
        s = self.structures
        return s[name] if isinstance(s, dict) else s

    def _A_G(self, mod, calls):
        """A_hat, G_hat from the (input, output grad) of every call of the layer.

        Calls of one batch size are pooled as positions; calls of another batch size
        are another loss term: A_hat averages all a-rows, G_hat sums c_j g g^T per group.
        """
        groups = {}
        for x, g in calls:
            unbatched = {nn.Linear: 1, nn.Conv1d: 2, nn.Conv2d: 3}[type(mod)]
            if x.dim() == unbatched:
                x, g = x[None], g[None]
            groups.setdefault(x.shape[0], []).append((x, g))
        A_sum, G, R = 0.0, 0.0, 0
        for group in groups.values():
            a, g, c = self._rows(mod, group)
            A_sum, G, R = A_sum + a.T @ a, G + c * g.T @ g, R + a.shape[0]
        return (A_sum / R, G) if R else None  # an empty batch: no statistics

    def _rows(self, mod, calls):
        a_parts, g_parts = [], []
        for x, g in calls:
            if isinstance(mod, nn.Linear):
                N = x.shape[0]
                S = math.prod(x.shape[1:-1])
                a, gg = x.reshape(N, S, x.shape[-1]), g.reshape(N, S, g.shape[-1])
            else:
                a = conv_rows(mod, x)
                gg = g.flatten(2).transpose(1, 2)
            a_parts.append(a)
            g_parts.append(gg)
        a, g = torch.cat(a_parts, 1), torch.cat(g_parts, 1)
        N, S = a.shape[0], a.shape[1]
        if self.approx == "expand":
            a, g = a.reshape(N * S, a.shape[-1]), g.reshape(N * S, g.shape[-1])
        else:
            a, g = a.mean(1), g.sum(1)
        if self._has_bias(mod):
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
        c = {None: 1.0, "batch": N, "batch+sequence": N * S}.get(self.loss_average, self.loss_average) \
            if isinstance(self.loss_average, (str, type(None))) else self.loss_average
        return a, g, c

    def step(self, loss_closure):
        """loss_closure() -> loss, run with capture hooks; then one SINGD step."""
        calls = {n: [] for n in self.layers}
        outs = {n: [] for n in self.layers}
        due = self.t % self.T == 0
        handles = []
        for n, m in self.layers.items():
            def hook(mod, inp, out, n=n):
                calls[n].append(inp[0].detach())
                out.retain_grad()
                outs[n].append(out)
            handles.append(m.register_forward_hook(hook))
        self.model.zero_grad()
        loss = loss_closure()
        loss.backward()
        for h in handles:
            h.remove()
        directions = {}
        with torch.no_grad():
            for n, m in self.layers.items():
                st = self.state[n]
                sK, sC = self._struct(n)
                AG = self._A_G(m, [(x, o.grad) for x, o in zip(calls[n], outs[n])]) if due else None
                if AG is not None:
                    A, G = AG
                    K, C = st["K"], st["C"]
                    HK, HC = project(sK, K.T @ A @ K), project(sC, C.T @ G @ C)
                    KtK, CtC = project(sK, K.T @ K), project(sC, C.T @ C)
                    IK, IC = torch.eye(K.shape[0], dtype=K.dtype), torch.eye(C.shape[0], dtype=C.dtype)
                    rho = (1 - self.alpha1) / 2 if self.normalize else 0.5
                    avg = lambda M: torch.trace(M) / M.shape[0]  # noqa: E731
                    if self.kfac_like:
                        DK = rho * (HK + self.lam * KtK - IK)
                        DC = rho * (HC + self.lam * CtC - IC)
                    else:
                        DK = rho * (avg(HC) * HK + self.lam * avg(CtC) * KtK - IK)
                        DC = rho * (avg(HK) * HC + self.lam * avg(KtK) * CtC - IC)
                    st["mK"] = self.alpha1 * st["mK"] + DK
                    st["mC"] = self.alpha1 * st["mC"] + DC
                    beta = self.lr_cov(self.t) if callable(self.lr_cov) else self.lr_cov
                    bK = bC = beta
                    if self.normalize:
                        bK = beta / max(1.0, st["mK"].abs().max().item())
                        bC = beta / max(1.0, st["mC"].abs().max().item())
                    st["K"] = K - bK * K @ st["mK"]
                    st["C"] = C - bC * C @ st["mC"]
                Gm = m.weight.grad.reshape(m.weight.shape[0], -1)
                if self._has_bias(m):
                    Gm = torch.cat([Gm, m.bias.grad[:, None]], 1)
                K, C = st["K"], st["C"]
                D = C @ C.T @ Gm @ K @ K.T
                directions[id(m.weight)] = D[:, : m.weight[0].numel()].reshape(m.weight.shape)
                if self._has_bias(m):
                    directions[id(m.bias)] = D[:, -1]
            for p in self.model.parameters():
                if not p.requires_grad or p.grad is None:
                    continue
                d = directions.get(id(p), p.grad)  # outside supported layers: identity
                self.buf[id(p)] = self.mom * self.buf[id(p)] + d + self.wd * p
                p.sub_(self.lr * self.buf[id(p)])
        self.t += 1
        return loss.detach()
