"""moe_robust.py: robust sparse Mixture-of-Experts training in one readable file.

A sparse top-k MoE layer, MoE-ResNet18 and a small MoE-ViT; PGD and AutoAttack's attacks (APGD-CE, APGD-T, FAB-T,
Square) with attacks on the routing; standard training, PGD-AT, TRADES, AdvMoE, RT-ER, the dual model and JTDMoE;
the evaluation an MoE needs (robust accuracy as the per-example minimum over named attacks, masking probes, RA-E,
RA-R, per-expert figures, route flips); Lipschitz estimates, bounds and route-stable certificates.

Reading order: the ideas first, each usable on its own: 0 conventions, 1 the MoE layer, 2 models, 3 attacks,
4 training methods, 5 evaluation, 6 Lipschitz bounds and certificates. Then the runner: 7 configuration, 8 setup
(device, torchrun, files), 9 data, 10 the training loop, 11 benchmark and command line.

Run: `python moe_robust.py` (the demo, about three minutes on 2 CPU cores: standard training vs PGD-AT of a small
MoE-ResNet18 on generated data); `python moe_robust.py --method advmoe --dataset cifar10` (for a GPU).
Claim: PGD-AT makes the demo's MoE robust where standard training leaves it at 0 (README "The demo").

Conventions: images in [0, 1]; every model normalises inside itself and returns logits; eps in pixel units.
Papers by short name: Shazeer 2017, Switch 2021, ST-MoE 2022, V-MoE 2021, Madry 2018, TRADES 2019, APGD 2020,
Square 2020, AdvMoE 2023 (ICCV), Robust Experts 2025, Dual model 2025 (ICML), Puigcerver 2022 (MoE robustness).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import operator
import os
import pickle
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ==== 0. Conventions: errors a user can read, precision, eval mode =================================================

PRECISIONS = ("auto", "fp32", "bf16")

class UserError(Exception):
    """A mistake in what the user asked for. The CLI prints it as one line and exits 2."""

def check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)

# One precision rule, amp_dtype: auto is bf16 autocast on CUDA and float32 on CPU (bf16 there on request). A training
# step opens autocast_for(device, cfg.precision) around its forwards, attack included; float32_evaluation switches
# autocast off for every reported number; attacks and models never choose a precision.

def amp_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype of `precision` (auto, fp32, bf16) on this device; None: float32."""
    check(precision in PRECISIONS, f"unknown --precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    on = precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")
    return torch.bfloat16 if on else None

def autocast_for(device: torch.device, precision: str = "auto"):
    """Autocast by amp_dtype. Under bf16 the matrix products and convolutions run in bf16; every loss casts logits to
    float32 first, and input gradients arrive in float32 (bf16 has float32's exponent range: no loss scaling is
    needed and no gradient sign is lost to underflow)."""
    dtype = amp_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)

@contextlib.contextmanager
def float32_evaluation():
    """Context (and decorator): true float32 inside (no autocast, TF32 off on CUDA), restored on exit. Reported
    accuracies are float32 numbers: a bf16 forward is a slightly different, coarser function, whose robust accuracy
    can differ from the same weights' in float32 by points."""
    cuda = torch.backends.cuda.matmul
    tf32 = cuda.allow_tf32, torch.backends.cudnn.allow_tf32
    cuda.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # TF32 has a 10-bit mantissa
    try:  # and an autocast region the caller opened (a training step's) switched off inside
        with torch.autocast("cpu", enabled=False), (torch.autocast("cuda", enabled=False) if torch.cuda.is_available()
                                                     else contextlib.nullcontext()):
            yield
    finally:
        cuda.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Put models in eval mode, restoring each one's previous mode on exit."""
    was = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, w in zip(models, was):
            m.train(w)

def frozen(*models: nn.Module):
    """How the attacks and the evaluation hold a model: eval_mode. The weights keep requires_grad, so that autocast
    reuses its weight casts across an attack's iterations (it caches those of leaf weights that require grad); the
    attacks take input gradients only (autograd.grad), so no weight gradient is computed or left behind."""
    return eval_mode(*models)

def augment(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding `pad`) + horizontal flip of a float batch (B, C, H, W) on its device."""
    B, C, H, W = x.shape
    dy, dx = (torch.randint(0, 2 * pad + 1, (B,), device=x.device) for _ in range(2))
    rows = torch.arange(H, device=x.device)[None] + dy[:, None]  # (B, H)
    cols = torch.arange(W, device=x.device)[None] + dx[:, None]  # (B, W)
    b, c = torch.arange(B, device=x.device)[:, None, None, None], torch.arange(C, device=x.device)[None, :, None, None]
    out = F.pad(x, (pad, pad, pad, pad))[b, c, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)
    return torch.where((torch.rand(B, device=x.device) < 0.5)[:, None, None, None], out.flip(3), out)

def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device,
            shuffle: bool = False, train_augment: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Images, uint8 pixels or floats in [0, 1], -> (float images in [0, 1], labels) on `device`, with the global RNG
    (seeded per epoch). Training keeps the whole uint8 set on the device: a batch is a gather, a cast and the
    augmentation there."""
    check(x.dtype == torch.uint8 or (x.is_floating_point() and (len(x) == 0 or 0 <= x.min() <= x.max() <= 1)),
          f"images must be uint8 pixels or floats in [0, 1]; got {x.dtype}" + (f" from {x.min():.3g} to {x.max():.3g}"
                                                                              if x.is_floating_point() else ""))
    order = torch.randperm(len(x), device=x.device) if shuffle else torch.arange(len(x), device=x.device)
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        xb = x[idx].to(device, non_blocking=True).float()
        xb = xb.div_(255) if x.dtype == torch.uint8 else xb
        xb = augment(xb, pad=max(1, xb.shape[-1] // 8)) if train_augment else xb
        yield xb, y[idx].to(device, non_blocking=True)

# ==== 1. The sparse top-k MoE layer ================================================================================
# Letters used in shape comments: B batch, T tokens per image, N rows routed (N = B per image, N = B*T per token),
# E experts, K experts kept per row (top-k), D router input width, C/H/W channels/height/width.
#
# Routing (Shazeer 2017; Switch 2021 eq. 1-2): logits r = W h + b, p = softmax(r), keep the K largest. Gates carry
# the task gradient to the router: K = 1 uses g = p_i (Switch); K > 1 renormalises over the kept experts (the
# straight-through one-hot of the AdvMoE and dual-model official codes gives the router no task gradient). No
# capacity limit and no token dropping: evaluation routing is deterministic and independent of the rest of the batch.
# The router's input h is the block input pooled over space (or a token). Pooled post-ReLU features share one large
# common direction mu, so W h + b = W mu + W (h - mu) + b is dominated by the same W mu for every image and one expert
# takes (nearly) every image at initialisation (the notebook shows it). router="centred" standardises h per feature
# first (BatchNorm without affine parameters: batch statistics while training, running statistics at eval, so
# evaluation routing stays per image); router="linear" is the papers' router on the raw h.

ROUTERS = ("centred", "linear")

class Routing(NamedTuple):  # what one MoE layer decided for its last batch (detached, for analysis)
    logits: torch.Tensor  # (N, E) router logits, float32
    probs: torch.Tensor  # (N, E) softmax of the logits
    indices: torch.Tensor  # (N, K') experts used per row, best first (K' = K, 1 when forced, E when soft)
    gates: torch.Tensor  # (N, K') their gate weights

    ranking = property(lambda self: rank_experts(self.probs))  # (N, E) every expert by probability, best first

def rank_experts(probs: torch.Tensor) -> torch.Tensor:  # (N, E) -> (N, E), ties to the lower index
    return probs.detach().argsort(dim=-1, descending=True, stable=True)

class Route(NamedTuple):  # a route to force on one MoE layer: which experts each row uses, with which gates
    indices: torch.Tensor  # (N, K') long
    gates: torch.Tensor  # (N, K') float

class AuxLoss(NamedTuple):
    balance: torch.Tensor  # Switch load-balancing loss: 1 when balanced, E when collapsed
    z: torch.Tensor  # ST-MoE router z-loss: mean(logsumexp(r)^2)

class MoE(nn.Module):
    """Sparse top-k mixture of experts around any expert modules. tokens=False: x is a feature map (B, C, H, W), routed
    per image on its global average pool (CNN-MoE papers); tokens=True: x is (B, T, D), each token routed (V-MoE).
    Training runs each expert on its own rows (`sparse`): its BatchNorm statistics come from them. In eval mode
    BatchNorm is affine: every expert runs on every row and the chosen outputs are kept, the same function with static
    shapes and no read-back to the host. `control`, an analysis hook, replaces top-k: probs -> (indices, gates).
    Records of the last forward: `routing` (detached), `router_logits` (when keep_logits) and, from a training forward,
    `aux` (balance and z-losses, with gradient). `counts` (on the device) adds up training rows until reset."""

    def __init__(self, experts: list[nn.Module], dim: int, k: int = 1, tokens: bool = False, noisy: bool = False,
                 router: str = "centred"):
        super().__init__()
        E = len(experts)
        check(1 <= k <= E, f"top-k {k} not allowed with {E} experts; need at least one expert and 1 <= k <= {E}")
        check(router in ROUTERS, f"unknown router {router!r}; allowed: {', '.join(ROUTERS)}")
        self.experts, self.num_experts, self.k, self.tokens = nn.ModuleList(experts), E, k, tokens
        self.centre = nn.BatchNorm1d(dim, affine=False) if router == "centred" else None  # (h - mean) / std
        self.router = nn.Linear(dim, E)
        if router == "centred":  # zero-mean logits over a batch: no expert starts ahead (Switch's router has no bias)
            nn.init.zeros_(self.router.bias)
        self.noise = nn.Linear(dim, E) if noisy else None  # Shazeer's noisy top-k, training only; starts at zero
        for p in self.noise.parameters() if noisy else ():
            nn.init.zeros_(p)
        self.control = self.routing = self.router_logits = self.aux = None
        self.keep_logits = False
        self.register_buffer("counts", torch.zeros(E, dtype=torch.long), persistent=False)

    def __getstate__(self):  # a copy (deepcopy, pickle) takes the weights, not the last forward's graph
        return {**self.__dict__, "aux": None, "router_logits": None}

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: (N, D) -> router logits (N, E), in float32 (Switch 2021, sec. 2.4: under bf16 near-equal logits tie). A
        lone training row has no batch variance: the running statistics centre it, as at eval."""
        with torch.autocast(h.device.type, enabled=False):
            h, c = h.float(), self.centre
            lone = self.training and len(h) == 1 and isinstance(c, nn.BatchNorm1d)  # (SyncBatchNorm: every rank's)
            h = h if c is None else F.batch_norm(h, c.running_mean, c.running_var, eps=c.eps) if lone else c(h)
            logits = self.router(h)
            noise = self.noise is not None and self.training
            return logits + torch.randn_like(logits) * F.softplus(self.noise(h)) if noise else logits

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (N, D) -> indices (N, K'), gates (N, K'); records the routing and, in training, the aux losses."""
        logits = self.logits(h)
        probs = logits.softmax(-1)  # (N, E)
        if self.control is not None:
            indices, gates = self.control(probs)
        else:
            top, indices = probs.topk(self.k, dim=-1)  # (N, K)
            gates = top if self.k == 1 else top / top.sum(-1, keepdim=True)
        if self.training:  # Switch eq. 4: E * sum_i f_i P_i, f_i the fraction whose top-1 is i (no gradient), P_i
            E = self.num_experts  # the mean probability of i. ST-MoE z-loss: mean(logsumexp(r)^2)
            frac = probs.new_zeros(E).index_add_(0, probs.detach().argmax(-1), probs.new_ones(len(h))) / len(h)
        self.aux = AuxLoss(E * (frac * probs.mean(0)).sum(), logits.logsumexp(-1).pow(2).mean()) if self.training \
            else None
        self.routing = Routing(logits.detach(), probs.detach(), indices.detach(), gates.detach())
        self.router_logits = logits if self.keep_logits else None  # for attacks on the routing itself
        return indices, gates

    def sparse(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x: (N, ...) -> sum_k gates[n, k] * expert_{indices[n, k]}(x[n]), each expert run once on its own rows
        (grouped by a stable sort). Its row count is read to the host: one sync per layer and forward."""
        N, K = indices.shape
        flat = indices.reshape(-1)  # (N*K,) expert of each (row, slot)
        order = flat.argsort(stable=True)  # slots grouped by expert
        rows, slot_gates = order // K, gates.reshape(-1)[order]  # (N*K,) input row and gate of each sorted slot
        counts = flat.new_zeros(self.num_experts).index_add_(0, flat, torch.ones_like(flat))
        self.counts += counts
        out, start = None, 0
        for e, c in enumerate(counts.tolist()):  # the one sync
            r = rows[start:start + c]
            if c:
                y = self.experts[e](x.index_select(0, r))  # (c, ...) its rows only
                y = y * slot_gates[start:start + c].to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
                out = y.new_zeros((N,) + y.shape[1:]) if out is None else out
                out.index_add_(0, r, y)
            start += c
        return out

    def all_experts(self, x: torch.Tensor) -> torch.Tensor:  # (N, ...) -> (N, E, ...): every expert on every row
        return torch.stack([e(x) for e in self.experts], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]) if self.tokens else x  # (B, T, D) -> (N, D), N = B*T; or (B, C, H, W)
        indices, gates = self.route(rows if self.tokens else x.mean(dim=(2, 3)))  # router input (N, D) or (B, C)
        if self.training:
            y = self.sparse(rows, indices, gates)
        else:  # y (N, E, ...) and the gates as (N, E), zero where an expert is not chosen: sum_e g_e y_e
            y, g = self.all_experts(rows), gates.new_zeros(len(rows), self.num_experts).scatter(1, indices, gates)
            y = torch.bmm(g.to(y.dtype)[:, None], y.flatten(2)).view(len(rows), *y.shape[2:])
        return y.reshape(*x.shape[:2], -1) if self.tokens else y  # (B, T, D') or (B, C', H', W')

FUSABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.GELU, nn.SiLU, nn.Identity)

class FusedMoE(MoE):
    """MoE with a faster eval mode, the same function (tested): experts that are equal nn.Sequential stacks of Conv2d
    / Linear (groups 1), BatchNorm2d and activations run as one network E times as wide, as the official AdvMoE code
    runs its experts (the first layer on the shared input, each later one grouped by expert, groups=E; BatchNorm on
    the concatenated statistics), and the centred router as one affine map (W / sigma, b - W mu / sigma). The
    concatenated weights are kept until a weight, the grad mode or autocast changes: an attack's passes reuse them."""

    def __getstate__(self):
        return {**super().__getstate__(), "cache": None}

    def eval_weights(self) -> tuple:
        """(the router's affine map, each layer's (module, concatenated tensors...), or None if not fusable)."""
        amp = torch.get_autocast_dtype(self.router.weight.device.type) if torch.is_autocast_enabled(
            self.router.weight.device.type) else None

        def make():
            c, w, b, first = self.centre, self.router.weight, self.router.bias, self.experts[0]
            s = None if c is None else (c.running_var + c.eps).rsqrt()  # (D,)
            kind = lambda e: [(type(m), [p.shape for p in m.parameters()], [getattr(m, a, 0) for a in (
                "stride", "padding", "dilation", "groups", "eps", "padding_mode", "track_running_stats")]) for m in e]
            fusable = isinstance(first, nn.Sequential) and isinstance(first[0], (nn.Conv2d, nn.Linear)) and all(
                isinstance(m, FUSABLE) and getattr(m, "groups", 1) == 1 and getattr(m, "padding_mode", "zeros") ==
                "zeros" and getattr(m, "track_running_stats", True) for m in first) and all(
                isinstance(e, nn.Sequential) and kind(e) == kind(first) for e in self.experts)
            cat = lambda ms, a: None if getattr(ms[0], a) is None else torch.cat([getattr(m, a) for m in ms])
            cast = lambda t: t if amp is None else t.to(amp)
            layers = None if not fusable else [
                (ms[0], cast(cat(ms, "weight")), cat(ms, "bias")) if isinstance(ms[0], (nn.Conv2d, nn.Linear)) else
                (ms[0], *(cat(ms, a) for a in ("running_mean", "running_var", "weight", "bias")))
                if isinstance(ms[0], nn.BatchNorm2d) else (ms[0],) for ms in zip(*self.experts)]
            return (w, b) if c is None else (w * s, b - (w * s) @ c.running_mean), layers
        if torch.compiler.is_compiling():  # a captured graph holds its own
            return make()
        key = [(t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers())] + [torch.is_grad_enabled(),
                                                                                            amp]
        if getattr(self, "cache", None) is None or self.cache[0] != key:
            self.cache = (key, make())
        return self.cache[1]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().logits(h)
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), *self.eval_weights()[0])

    def all_experts(self, x: torch.Tensor) -> torch.Tensor:
        layers, E, wide = self.eval_weights()[1], self.num_experts, False
        if layers is None:
            return super().all_experts(x)
        for m, *t in layers:
            if isinstance(m, nn.Conv2d):
                x = F.conv2d(x, *t, m.stride, m.padding, m.dilation, E if wide else 1)
            elif isinstance(m, nn.Linear):  # a grouped linear map is a grouped 1x1 convolution
                x = F.conv1d(x[..., None], t[0][..., None], t[1], groups=E if wide else 1)[..., 0]
            elif isinstance(m, nn.BatchNorm2d):
                x = F.batch_norm(x, *t, False, 0.0, m.eps)
            else:  # an elementwise activation
                x = m(x)
            wide = wide or isinstance(m, (nn.Conv2d, nn.Linear))
        return x.view(len(x), E, -1, *x.shape[2:])  # (N, E*C, ...) -> (N, E, C, ...)

def is_moe(m: nn.Module) -> bool:
    """An MoE layer: a module with experts and a router (this file's MoE, or yours with the same attributes)."""
    return hasattr(m, "experts") and hasattr(m, "router")

def moe_layers(model: nn.Module) -> list[MoE]:
    """All MoE layers of a model, in forward order (module registration order)."""
    return [m for m in model.modules() if is_moe(m)]

def moe_aux_loss(model: nn.Module, balance_coef: float = 1e-2, z_coef: float = 1e-3) -> torch.Tensor:
    """Sum of balance_coef * L_bal + z_coef * L_z over every MoE layer of the last forward."""
    terms = [balance_coef * m.aux.balance + z_coef * m.aux.z for m in moe_layers(model) if m.aux is not None]
    return sum(terms[1:], terms[0]) if terms else torch.zeros(())  # (a CPU scalar adds to CUDA without a copy)

def last_routing(model: nn.Module) -> list[Routing]:
    """The routing of every MoE layer for the model's last forward call."""
    return [m.routing for m in moe_layers(model)]

def reset_routing_stats(model: nn.Module) -> None:
    for m in moe_layers(model):
        m.counts.zero_()

def expert_counts(model: nn.Module) -> list[list[int]]:
    """Rows sent to each expert of each MoE layer since the last reset."""
    return [m.counts.tolist() for m in moe_layers(model)]

COLLAPSE = 0.9  # an expert with more than this share of a layer's rows: the run says the routing has collapsed

def moe_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_moe(m)]

def routing_health(model: nn.Module, counts: list[list[int]], what: str) -> tuple[list[dict], list[str]]:
    """Per MoE layer, from its rows per expert: the largest expert's share and the routing entropy over experts,
    normalised to [0, 1] (1: uniform, 0: one expert takes every row); and a warning for each layer where one expert
    takes more than COLLAPSE of `what` (then the MoE is, in effect, one small dense network)."""
    stats, warn = [], []
    for name, c in zip(moe_names(model), counts):
        p = torch.tensor(c, dtype=torch.float64) / max(1, sum(c))
        entropy = max(0.0, float(-(p * p.clamp_min(1e-12).log()).sum() / math.log(len(c)))) if len(c) > 1 else 1.0
        stats.append({"layer": name, "max_share": round(float(p.max()), 4), "entropy": round(entropy, 4)})
        if float(p.max()) > COLLAPSE:
            warn.append(f"routing collapse in {name}: expert {int(p.argmax())} took {float(p.max()):.1%} of {what}")
    return stats, warn

@contextlib.contextmanager
def routing_control(model: nn.Module, controls):
    """Context: MoE layer l of the model routes by controls[l] (one control: every layer)."""
    layers = moe_layers(model)
    controls = controls if isinstance(controls, list) else [controls] * len(layers)
    check(len(controls) == len(layers), f"{len(controls)} controls given for {len(layers)} MoE layers")
    old = [m.control for m in layers]
    try:
        for m, c in zip(layers, controls):
            m.control = c
        yield model
    finally:
        for m, c in zip(layers, old):
            m.control = c

def soft_routing(model: nn.Module):
    """Context: every MoE layer runs all experts, gated by the full softmax (a differentiable surrogate of hard
    top-k routing)."""
    return routing_control(model, lambda p: (torch.arange(p.shape[1], device=p.device).expand_as(p), p))

def forced_routes(model: nn.Module, routes: list[Route]):
    """Context: MoE layer l uses routes[l] (indices and gates) for every row (e.g. the clean routes, for RA-E)."""
    def control(route):
        def choose(p):
            check(len(route.indices) == len(p), f"forced route has {len(route.indices)} rows, batch has {len(p)}")
            return route.indices, route.gates
        return choose
    return routing_control(model, [control(r) for r in routes])

def take_routes(routes: list[Route], idx: torch.Tensor, B: int) -> list[Route]:
    """The routes of images idx out of a batch of B (per-token routes keep all of an image's rows)."""
    pick = lambda t: t.view(B, -1, t.shape[-1])[idx].flatten(0, 1)
    return [Route(pick(r.indices), pick(r.gates)) for r in routes]

def forced_rank(model: nn.Module, r: int):
    """Context: every MoE layer sends each row to its r-th ranked expert with gate 1 (r = 1: the runner-up)."""
    return routing_control(model, lambda p: (rank_experts(p)[:, r:r + 1], p.new_ones(len(p), 1)))

def forced_expert(model: nn.Module, i: int):
    """Context: every MoE layer uses expert i with gate 1, so it computes the network f_i of the papers."""
    for m in moe_layers(model):
        check(0 <= i < m.num_experts, f"expert {i} not allowed; this layer has {m.num_experts} experts")
    return routing_control(model, lambda p: (torch.full((len(p), 1), i, device=p.device), p.new_ones(len(p), 1)))

def current_routes(model: nn.Module, x: torch.Tensor, fixed_gates: Optional[float] = None) -> list[Route]:
    """The routes the model takes on x (eval mode, no gradient); gates as used, or all `fixed_gates`."""
    with torch.no_grad(), eval_mode(model):  # in the caller's precision
        model(x)
    return [Route(r.indices, r.gates if fixed_gates is None else torch.full_like(r.gates, fixed_gates))
            for r in last_routing(model)]

# ==== 2. Models: CIFAR ResNet-18, MoE-ResNet18, MoE-ViT ============================================================

NORM_STATS = {  # per-channel mean/std of the Normalize layer inside each model
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # for imagefolder
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}

BLOCK_NAMES = tuple(f"layer{i}.{j}" for i in range(1, 5) for j in range(2))  # ResNet-18's BasicBlocks
DUAL_MIXES = ("logits", "normalized")

def moe_block_set(spec: str) -> set:
    """'all' or a comma list of ResNet-18 block names -> the set of names."""
    wanted = set(BLOCK_NAMES) if spec == "all" else {b.strip() for b in spec.split(",") if b.strip()}
    bad = sorted(wanted - set(BLOCK_NAMES))
    check(not bad, f"unknown --moe-blocks {','.join(bad)}; allowed: all or a comma list of {', '.join(BLOCK_NAMES)}")
    return wanted

@dataclass
class ModelConfig:
    arch: str = "moe-resnet18"  # one of ARCHS; resnet18 is moe-resnet18 with no MoE block
    num_classes: int = 10
    image_size: int = 32  # 32 (CIFAR) or 64 (TinyImageNet); the ViT's patch grid depends on it
    norm: str = "cifar10"  # key of NORM_STATS: the mean/std the model normalises with
    width: float = 1.0  # multiplier of every channel width (0.125 for quick CPU runs)
    experts: int = 4  # E. Robust Experts: 4 experts; AdvMoE: 2
    top_k: int = 1  # K. CNN-MoE papers use top-1; V-MoE top-2
    moe_blocks: str = "layer4.1"  # BasicBlocks that become MoE, or "all". Robust Experts 2025: one block of the last
    #                               stage (deeper helps robustness); AdvMoE: "all" with experts=2, expert_ratio=0.5
    expert_ratio: float = 1.0  # each expert's inner width = ratio * planes (AdvMoE r = 0.5)
    noisy_gating: bool = False  # Shazeer noisy top-k (training only)
    router: str = "centred"  # "centred" or the papers' "linear" (see MoE)
    vit_dim: int = 192  # ViT embedding width before `width` scaling
    vit_depth: int = 6  # transformer blocks; MoE MLP in every other one (V-MoE)
    vit_heads: int = 3

class Normalize(nn.Module):
    """(x - mean) / std per channel, inside the model so attacks work in pixel units."""
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std

    def lipschitz(self, lb, before: float) -> float:  # LipschitzBound's rule for this module (section 6)
        return (1 / self.std).max().item()

def residual_branch(inp: int, mid: int, out: int, stride: int) -> nn.Sequential:
    """conv3x3-BN-ReLU-conv3x3-BN: the residual branch of a BasicBlock (He et al. 2016)."""
    return nn.Sequential(nn.Conv2d(inp, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Conv2d(mid, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out))

class BasicBlock(nn.Module):
    """relu(branch(x) + shortcut(x)). With experts > 0 the branch is an MoE of E branches, routed per image on the
    pooled block input, and the shortcut is shared: the MoE replaces the residual function, as MoE replaces the MLP
    inside a transformer's residual block. (Robust Experts copies the whole block, skip included; with layer4.1's
    identity skip the two differ only in whether the skip is scaled by the gate.)"""

    def __init__(self, inp: int, planes: int, stride: int, experts: int = 0, k: int = 1, expert_ratio: float = 1.0,
                 noisy: bool = False, router: str = "centred"):
        super().__init__()
        mid = max(1, round(expert_ratio * planes))
        self.branch = FusedMoE([residual_branch(inp, mid, planes, stride) for _ in range(experts)], inp, k,
                               noisy=noisy, router=router) if experts else residual_branch(inp, planes, planes, stride)
        self.shortcut = nn.Identity() if stride == 1 and inp == planes else nn.Sequential(
            nn.Conv2d(inp, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        return F.relu(self.branch(x) + self.shortcut(x))

    def lipschitz(self, lb, before: float) -> float:  # ReLU is 1-Lipschitz; the sum adds the two bounds
        return lb.bound(self.branch, before) + lb.bound(self.shortcut, before)

class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, no max-pool, stages of 64/128/256/512 x width channels. Blocks are named
    layer{1..4}.{0,1}; those in `moe_blocks` become MoE blocks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.normalize = Normalize(*NORM_STATS[cfg.norm])
        c = [max(1, round(w * cfg.width)) for w in (64, 128, 256, 512)]
        wanted = set() if cfg.arch == "resnet18" else moe_block_set(cfg.moe_blocks)
        self.stem = nn.Sequential(nn.Conv2d(3, c[0], 3, 1, 1, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU(inplace=True))
        inp, stages = c[0], []
        for i, (planes, stride) in enumerate(zip(c, (1, 2, 2, 2)), start=1):
            blocks = []
            for j, s in enumerate((stride, 1)):
                e = cfg.experts if f"layer{i}.{j}" in wanted else 0
                blocks.append(BasicBlock(inp, planes, s, e, cfg.top_k, cfg.expert_ratio, cfg.noisy_gating, cfg.router))
                inp = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c[3], cfg.num_classes)

    def forward(self, x):  # (B, 3, H, W) in [0, 1] -> logits (B, classes)
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(self.normalize(x))))))  # (B, 8*c0, H/8, W/8)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def lipschitz(self, lb, before: float) -> float:
        L = lb.chain([self.normalize, self.stem, self.layer1, self.layer2, self.layer3, self.layer4], before)
        _, H, W = lb.shapes[self.layer4[-1]]  # the last block keeps its input's spatial size
        pool = 1.0 if lb.norm == "linf" else 1.0 / math.sqrt(H * W)  # the average pool
        return L * pool * lb.bound(self.fc, before * L * pool)

class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, D/h)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, D/h)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

class ViTBlock(nn.Module):
    """Pre-LN transformer block; the MLP is an MoE of MLPs (per-token routing) when experts > 0."""
    def __init__(self, dim: int, heads: int, experts: int = 0, k: int = 1, noisy: bool = False,
                 router: str = "centred"):
        super().__init__()
        self.ln1, self.ln2, self.attn = nn.LayerNorm(dim), nn.LayerNorm(dim), Attention(dim, heads)
        self.mlp = (FusedMoE([mlp(dim, 4 * dim) for _ in range(experts)], dim, k, tokens=True, noisy=noisy,
                             router=router) if experts else mlp(dim, 4 * dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

class MoEViT(nn.Module):
    """A small ViT for 32x32 or 64x64 inputs: an 8x8 grid of patches (patch = size / 8) plus a class token, MoE MLPs
    in every other block (V-MoE: the odd-numbered blocks)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check(cfg.image_size % 8 == 0, f"moe-vit needs an image size divisible by 8, got {cfg.image_size}")
        h, p = cfg.vit_heads, cfg.image_size // 8
        dim = max(8 * h, round(cfg.vit_dim * cfg.width / h) * h)
        self.normalize, self.patch = Normalize(*NORM_STATS[cfg.norm]), nn.Conv2d(3, dim, p, p)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 65, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, h, cfg.experts if i % 2 == 1 else 0, cfg.top_k, cfg.noisy_gating,
                                               cfg.router) for i in range(cfg.vit_depth)])
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, cfg.num_classes)

    def forward(self, x):  # (B, 3, H, W) -> logits (B, classes)
        t = self.patch(self.normalize(x)).flatten(2).transpose(1, 2)  # (B, 64, D)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos  # (B, T=65, D)
        return self.head(self.ln(self.blocks(t))[:, 0])

    def lipschitz(self, lb, before: float) -> float:
        raise UserError("no global Lipschitz bound for moe-vit: dot-product self-attention is not globally "
                        "Lipschitz (Kim et al. 2021)")

def build_model(cfg: ModelConfig) -> nn.Module:
    """The network of a ModelConfig (its values are checked where a run's Config is validated)."""
    return MoEViT(cfg) if cfg.arch == "moe-vit" else ResNet18(cfg)

def count_params(model: nn.Module) -> dict:
    """Total parameters, and active ones per example (an MoE layer counts K of its E experts)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum((m.num_experts - m.k) * sum(p.numel() for p in m.experts[0].parameters()) for m in moe_layers(model))
    return {"total": total, "active": total - inactive}

def compile_model(model: nn.Module) -> nn.Module:
    """torch.compile in place (`--compile`; state_dict keys stay plain). An eval-mode pass (every attack iteration,
    evaluation) has static shapes and no host read: the whole network is one captured graph. The training-mode
    sparse dispatch reads its row counts to the host, so it stays eager, each expert compiled with a dynamic batch."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    # an expert meets train/eval x grad/no-grad x bf16/float32 x batch 1/many: 16 variants, beyond dynamo's default
    # of 8, after which it would silently run eagerly
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 32))
    if not next(model.parameters()).is_cuda:  # inductor's NCHW -> channels_last rewrite of the convolutions
        torch._inductor.config.layout_optimization = False  # hung a CPU convolution backward
    for m in moe_layers(model):
        for expert in m.experts:
            expert.compile(dynamic=True)
        m.sparse = torch.compiler.disable(m.sparse)
    model.compile()
    return model

class DualModel(nn.Module):
    """The dual model (Zhang, Xu, Hu, Wang, ICML 2025): f_D(x) = (1 - a) f_S(x) + a f_R(x) on logits, f_S a
    standard-trained and f_R a robust MoE; the smoothing parameter a in [0, 1] trades clean accuracy (a -> 0) for
    robustness (a -> 1). moe_layers sees both members' MoE layers (f_S's first): routing controls apply to both.
    mix="logits" is the paper's form; a standard model's logits are several times larger than a robust model's, so
    f_S dominates until a is close to 1. mix="normalized" (not in the paper) first divides each member's logits by
    their per-example std over the classes, so a weighs two equally scaled votes (a = 0, 1 still predict as f_S,
    f_R). The Lipschitz bound (1-a) K_S + a K_R holds for "logits" only."""

    def __init__(self, standard: nn.Module, robust: nn.Module, a: float = 0.5, mix: str = "logits"):
        super().__init__()
        check(0 <= a <= 1, f"dual-model a={a} not allowed; need 0 <= a <= 1")
        check(mix in DUAL_MIXES, f"dual-model mix {mix!r} not allowed; allowed: {', '.join(DUAL_MIXES)}")
        self.standard, self.robust, self.a, self.mix = standard, robust, a, mix

    def forward(self, x):  # (B, 3, H, W) -> (B, classes)
        zs, zr = self.standard(x), self.robust(x)
        if self.mix == "normalized":  # (B, classes) / (B, 1)
            zs, zr = zs / zs.std(-1, keepdim=True).clamp_min(1e-6), zr / zr.std(-1, keepdim=True).clamp_min(1e-6)
        return (1 - self.a) * zs + self.a * zr

    def lipschitz(self, lb, before: float) -> float:
        check(self.mix == "logits", "the Lipschitz bound of a dual model holds for --dual-mix logits only")
        return (1 - self.a) * lb.bound(self.standard, before) + self.a * lb.bound(self.robust, before)

# ==== 3. Attacks: PGD (Madry et al. 2018); AutoAttack's APGD-CE, APGD-T, FAB-T and Square ==========================
# x_0 = x + U(-eps, eps); x_{t+1} = clip_[0,1](Proj_eps(x_t + alpha * sign(grad_x loss))). The model is put in eval
# mode (BatchNorm frozen, routing deterministic) and its mode is restored afterwards; gradients are taken with
# respect to the input only (autograd.grad), so no parameter gradient is left behind; the loss is computed on float32
# logits, in whatever precision the caller runs (a training step's autocast, or evaluation's float32).

NORMS = ("linf", "l2")

def per_example_norm(t: torch.Tensor, norm: str, keepdim: bool = True) -> torch.Tensor:
    """(B, ...) -> per-example L-inf or L2 norm in float32, (B, 1, ..., 1) or with keepdim=False (B,)."""
    n = t.flatten(1).float()
    n = n.abs().amax(1) if norm == "linf" else n.norm(dim=1)
    return n.view(-1, *([1] * (t.dim() - 1))) if keepdim else n

def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project a perturbation onto the eps-ball of the given norm."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / per_example_norm(delta, "l2").clamp_min(1e-12)).clamp(max=1.0)

def ce_per_example(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")

def rows_of(model: nn.Module, idx: torch.Tensor) -> nn.Module:
    """The model to run on rows idx of the batch an attack was given. A model whose forward depends on which example
    a row is (FixedRoutes: each example's own routes) offers for_rows(idx); any other model is itself. Every attack
    that works on a subset of its batch goes through this, so per-example state follows the examples."""
    return model.for_rows(idx) if hasattr(model, "for_rows") else model

def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, alpha: Optional[float] = None,
        steps: int = 10, norm: str = "linf", random_start: bool = True, loss_fn: Callable = ce_per_example,
        on_iterate: Optional[Callable] = None) -> torch.Tensor:
    """Projected gradient ascent on loss_fn(model(x'), y) over ||x' - x|| <= eps, x' in [0, 1] (Madry et al. 2018).
    alpha: the step; None: eps / 4 (2/255 at 8/255, Madry's CIFAR setting). on_iterate(x_t, logits_t) sees each
    iterate before its step (pgd_worst keeps the worst). -> the last iterate (B, C, H, W), detached (PGD-AT's)."""
    alpha = eps / 4 if alpha is None else alpha
    x, delta = x.detach(), torch.zeros_like(x)
    if random_start and eps > 0 and norm == "linf":  # uniform in the L-inf ball
        delta = torch.empty_like(x).uniform_(-eps, eps)
    elif random_start and eps > 0:  # L2: a random direction, a uniform radius
        d = torch.randn_like(x)
        delta = d / per_example_norm(d, "l2") * eps * torch.rand_like(x[:, :1, :1, :1])
    delta = (x + delta).clamp(0, 1) - x
    with eval_mode(model):  # BatchNorm frozen, routing deterministic; the caller's mode comes back
        for _ in range(steps):
            xa = (x + delta).requires_grad_(True)
            logits = model(xa).float()
            if on_iterate is not None:
                on_iterate(xa.detach(), logits.detach())
            (g,) = torch.autograd.grad(loss_fn(logits, y).sum(), xa)  # the input's gradient only
            step = alpha * g.sign() if norm == "linf" else alpha * g / per_example_norm(g, "l2").clamp_min(1e-12)
            delta = (x + project(delta + step, eps, norm)).clamp(0, 1) - x  # in the ball, a valid image
    return (x + delta).detach()

def pgd_worst(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, alpha: Optional[float] = None,
              steps: int = 10, norm: str = "linf", restarts: int = 1, loss_fn: Callable = ce_per_example,
              judge: Optional[nn.Module] = None) -> torch.Tensor:
    """PGD for evaluation: `restarts` random starts, and per example the worst of every iterate (the clean point and
    each run's last one included): a misclassified one if any, else the one of highest loss, so with a fixed seed
    more steps or restarts never help the model (soft targets `y` with a custom loss_fn: the loss only). judge: a
    model whose misclassification and CE pick the worst instead: the soft-router attack follows the surrogate's
    gradient but keeps what the hard-routed model gets worst; the routing attack ascends a routing score and keeps
    what the routing-only model gets wrong."""
    x, judge_model = x.detach(), judge if judge is not None else model
    best_x, best = x.clone(), torch.full((len(x),), -float("inf"), device=x.device)

    def keep(xa, logits):
        nonlocal best_x, best
        if judge is not None:
            with torch.no_grad():
                logits = judge(xa).float()
        score = ce_per_example(logits, y) if judge is not None else loss_fn(logits, y)
        if y.dtype == torch.long:  # a misclassified point beats any loss
            score = score + 1e6 * (logits.argmax(1) != y).float()
        best_x = torch.where((score > best).view(-1, 1, 1, 1), xa, best_x)
        best = torch.maximum(score, best)

    with eval_mode(model, judge_model):
        for r in range(restarts + 1):  # r = 0: the clean point
            xa = x if r == 0 else pgd(model, x, y, eps, alpha, steps, norm, loss_fn=loss_fn, on_iterate=keep)
            with torch.no_grad():
                keep(xa, model(xa).float())
    return best_x

@dataclass
class AttackConfig:
    """An L-inf or L2 PGD attack; `describe()` names it in reports."""
    eps: float = 8 / 255
    alpha: Optional[float] = None  # None: eps / 4
    steps: int = 20
    restarts: int = 1
    norm: str = "linf"

    def describe(self) -> str:
        e = f"{self.eps * 255:g}/255" if self.norm == "linf" else f"{self.eps:g}"
        return f"PGD-{self.steps} {self.norm} eps={e} restarts={self.restarts}"

    def __call__(self, model, x, y, **kw):
        return pgd_worst(model, x, y, self.eps, self.alpha, self.steps, self.norm, self.restarts, **kw)

@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with eval_mode(model):
        return model(x).argmax(1)

@float32_evaluation()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Optional[AttackConfig],
             device: torch.device, batch_size: int = 256) -> dict:
    """Clean accuracy, mean clean cross-entropy and, with an attack, robust accuracy (fractions in [0, 1]) on uint8 x
    (N, 3, H, W) on any device; an example counts as robust only if the prediction is right on the clean image and on
    the attack's worst case. Runs in float32."""
    clean = robust = loss = 0
    with frozen(model):  # no weight gradients in the attacks
        for xb, yb in batches(x, y, batch_size, device):
            with torch.no_grad():
                logits = model(xb).float()
            ok = logits.argmax(1) == yb
            clean, loss = clean + ok.sum().item(), loss + F.cross_entropy(logits, yb, reduction="sum").item()
            robust += (ok & (predict(model, attack(model, xb, yb)) == yb)).sum().item() if attack is not None else 0
    out = {"clean_acc": clean / max(1, len(x)), "clean_loss": loss / max(1, len(x))}
    return out if attack is None else {**out, "robust_acc": robust / max(1, len(x)), "attack": attack.describe()}

def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss (Croce & Hein 2020, eq. 7), per example, to maximise: -(z_y - z_t) / (z_pi1 - (z_pi3 +
    z_pi4) / 2), pi the classes sorted by logit. Invariant to shifting and scaling the logits, so a model cannot hide
    behind large or flat logits."""
    z = logits.float()
    s = z.sort(1, descending=True).values
    zy, zt = z.gather(1, y[:, None])[:, 0], z.gather(1, target[:, None])[:, 0]
    return -(zy - zt) / (s[:, 0] - 0.5 * (s[:, 2] + s[:, 3]) + 1e-12)

def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations (1-based) after which APGD checks its progress: the first after 22% of the steps, each next
    interval 3% of the steps shorter, down to 6% (the authors' code). 100 steps: 22, 41, 57, 70, 80, 87, 93, 99."""
    k, k_min, k_dec = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    out, at = [], k
    while at <= steps:
        out.append(at)
        k = max(k - k_dec, k_min)
        at += k
    return out

def apgd_halve(increases: torch.Tensor, k: int, halved: torch.Tensor, best_then: torch.Tensor,
               best_now: torch.Tensor, rho: float = 0.75) -> torch.Tensor:
    """APGD's rule at a checkpoint k steps after the last (Croce & Hein 2020, Sec. 3.2), per example: halve the step
    where at most rho k of those steps increased the loss (condition 1), or where it was not halved at the last
    checkpoint and the best loss has not improved since (condition 2)."""
    return (increases <= rho * k) | (~halved & (best_then >= best_now))

def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, steps: int = 100,
         norm: str = "linf", loss_fn: Callable = ce_per_example, rho: float = 0.75) -> torch.Tensor:
    """APGD (Croce & Hein 2020, Alg. 1), L-inf or L2: PGD with momentum 0.75 and a per-example step size that starts
    at 2 eps and halves where progress stalls (apgd_halve), restarting from the best point, at apgd_checkpoints(steps).
    No step size to tune, so it exposes defences that only fool fixed-step PGD. Maximises loss_fn(logits, y) -> (B,)
    (CE: APGD-CE). Returns per example the first misclassified iterate (every iterate is scored right after its
    forward), else the highest-loss one."""
    check(norm in NORMS, f"unknown attack norm {norm!r}; allowed: {', '.join(NORMS)}")
    check(eps >= 0 and steps >= 1, f"APGD needs eps >= 0 and steps >= 1, got {eps}, {steps}")
    x = x.detach()
    view = lambda t: t.view(-1, *([1] * (x.dim() - 1)))
    unit = (lambda g: g.sign()) if norm == "linf" else (lambda g: g / per_example_norm(g, "l2").clamp_min(1e-12))
    proj = lambda z: (x + project(z - x, eps, norm)).clamp(0, 1)
    checkpoints, last_check = apgd_checkpoints(steps), 0

    def forward(xa):  # -> loss (B,), its input gradient, misclassified (B,)
        xa = xa.clone().requires_grad_(True)
        logits = model(xa).float()
        loss = loss_fn(logits, y)
        (g,) = torch.autograd.grad(loss.sum(), xa)
        return loss.detach(), g, logits.argmax(1) != y

    with eval_mode(model):
        t = torch.randn_like(x) if norm == "l2" else torch.rand_like(x) * 2 - 1
        cur = proj(x + eps * t / per_example_norm(t, norm).clamp_min(1e-12))  # a random point on the sphere
        loss, grad, wrong = forward(cur)
        found, adv = wrong.clone(), cur.clone()  # the first misclassified iterate of each example
        eta = torch.full((len(x),), 2.0 * eps, device=x.device)
        f_max, x_max, g_max = loss.clone(), cur.clone(), grad.clone()
        prev, increases = cur.clone(), torch.zeros(len(x), device=x.device)
        halved, f_max_at_check = torch.ones_like(found), f_max.clone()
        for i in range(steps):
            z = proj(cur + view(eta) * unit(grad))
            a = 1.0 if i == 0 else 0.75  # no momentum on the first step
            prev, cur = cur, proj(cur + a * (z - cur) + (1 - a) * (cur - prev))
            new_loss, grad, wrong = forward(cur)
            adv = torch.where(view(wrong & ~found), cur, adv)
            found |= wrong
            increases += (new_loss > loss).float()
            loss = new_loss
            up = loss > f_max
            f_max = torch.where(up, loss, f_max)
            x_max, g_max = torch.where(view(up), cur, x_max), torch.where(view(up), grad, g_max)
            if i + 1 in checkpoints:  # k steps since the last one
                k, last_check = i + 1 - last_check, i + 1
                stalled = apgd_halve(increases, k, halved, f_max_at_check, f_max, rho)
                halved, f_max_at_check = stalled, f_max.clone()
                eta = torch.where(stalled, eta / 2, eta)
                cur, grad = torch.where(view(stalled), x_max, cur), torch.where(view(stalled), g_max, grad)
                increases.zero_()
    return torch.where(view(found), adv, x_max).detach()

def target_ranking(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, classes - 1): every class but y, highest clean logit first: APGD-T's and FAB-T's target order."""
    order = logits.argsort(1, descending=True)
    return order[order != y[:, None]].view(len(y), -1)

@torch.no_grad()
def apgd_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, steps: int = 100,
                  norm: str = "linf", targets: int = 9) -> torch.Tensor:
    """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss, once per target class: the `targets` classes with
    the highest clean logits after the label (AutoAttack: 9), each run only on the examples no earlier target has
    fooled. Needs at least 4 classes (DLR). Returns x_adv (B, C, H, W): a misclassified point where one was found,
    else the input."""
    with eval_mode(model):
        logits = model(x).float()
    check(logits.shape[1] >= 4, f"APGD-T's DLR loss needs at least 4 classes, the model has {logits.shape[1]}")
    ranked = target_ranking(logits, y)  # (B, classes - 1)
    x_adv, robust = x.detach().clone(), logits.argmax(1) == y
    for t in range(min(targets, ranked.shape[1])):
        idx = robust.nonzero()[:, 0]
        if len(idx) == 0:
            break
        tgt, m = ranked[idx, t], rows_of(model, idx)
        with torch.enable_grad():
            xa = apgd(m, x[idx], y[idx], eps, steps, norm, loss_fn=lambda z, yy: dlr_targeted(z, yy, tgt))
        fooled = predict(m, xa) != y[idx]
        x_adv[idx[fooled]], robust[idx[fooled]] = xa[fooled], False
    return x_adv

def box_projection(t: torch.Tensor, w: torch.Tensor, c: torch.Tensor, norm: str) -> torch.Tensor:
    """The smallest perturbation d (L-inf or L2) with w.d = -c that keeps t + d in the box [0, 1]: t (B, D) onto the
    hyperplane {z: w.z = w.t - c} (FAB's projections, Croce & Hein 2020). Oriented so that w.z must fall by |c|, each
    coordinate moves against the sign of its w by min(lam s_i, room_i), room_i its distance to the box, s_i = 1 in
    L-inf and |w_i| in L2 (the KKT solution). The fall F(lam) = sum_i |w_i| min(lam s_i, room_i) is piecewise linear
    with breaks at room_i / s_i: sorting them gives F at every break, and the smallest lam with F(lam) = |c| follows
    exactly. Where the box does not reach the hyperplane, every coordinate moves as far as it can."""
    w = w * torch.where(c >= 0, 1.0, -1.0)[:, None]
    c, mag = c.abs()[:, None], w.abs()
    room = torch.where(w > 0, t, 1 - t)  # (B, D)
    s = torch.ones_like(mag) if norm == "linf" else mag
    brk, order = torch.where(s > 0, room / s.clamp_min(1e-30), math.inf).sort(1)  # (B, D) breaks, ascending
    total = (mag * s).sum(1, keepdim=True)  # the slope of F before the first break
    done = (mag * room).gather(1, order).cumsum(1)  # the fall of the coordinates saturated up to each break
    rest = total - (mag * s).gather(1, order).cumsum(1)  # the slope of F after each break
    fall = done + torch.where(rest > 0, brk * rest, 0.0)  # F at each break, non-decreasing
    j = torch.searchsorted(fall, c)  # the first break with F >= |c| (D: none)
    before = lambda v, first: torch.cat([first, v], 1).gather(1, j.clamp(max=v.shape[1]))  # at break j - 1
    lam = (c - before(done, torch.zeros_like(c))) / before(rest, total).clamp_min(1e-30)
    lam = torch.where(j >= brk.shape[1], brk.nan_to_num(posinf=0.0).amax(1, keepdim=True), lam)  # out of reach
    return -w.sign() * torch.minimum(lam * s, room)

@torch.no_grad()
def fab_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, steps: int = 100,
                 norm: str = "linf", targets: int = 9, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9) -> torch.Tensor:
    """FAB-T (Croce & Hein 2020, "Minimally distorted adversarial examples with a fast adaptive boundary attack";
    AutoAttack's third attack), L-inf or L2, per target class in APGD-T's order. Each step linearises the boundary
    f_t = f_y at the current point z, projects z and the clean x onto it within the image box (d1, d2), and moves to
    (1 - a)(z + eta d1) + a (x + eta d2), a = ||d1|| / (||d1|| + ||d2||) capped at alpha_max (biased towards x, so
    the perturbation stays small); after a success it steps back towards x by beta and keeps the smallest success.
    A success counts if it is within eps. Returns x_adv (B, C, H, W)."""
    with eval_mode(model):  # once: BatchNorm frozen, routing deterministic; the caller's mode comes back
        logits = model(x).float()
        ranked, x_adv, robust = target_ranking(logits, y), x.detach().clone(), logits.argmax(1) == y
        for k in range(min(targets, ranked.shape[1])):
            idx = robust.nonzero()[:, 0]
            if len(idx) == 0:
                break
            x0, yy, tt, m = x[idx], y[idx], ranked[idx, k], rows_of(model, idx)
            flat, view = (lambda t: t.flatten(1)), (lambda t: t.view(-1, *([1] * (x.dim() - 1))))
            cur, best, best_norm = x0.clone(), x0.clone(), torch.full((len(idx),), math.inf, device=x.device)
            for _ in range(steps):
                with torch.enable_grad():
                    z = cur.clone().requires_grad_(True)
                    out = m(z).float()
                    df = out.gather(1, tt[:, None])[:, 0] - out.gather(1, yy[:, None])[:, 0]  # >= 0: classified as t
                    (g,) = torch.autograd.grad(df.sum(), z)
                w = flat(g)  # the boundary df + w.(p - z) = 0, at signed distances df from z and df + w.(x - z) from x
                d1 = box_projection(flat(cur), w, df, norm).view_as(x0)
                d2 = box_projection(flat(x0), w, df + (w * flat(x0 - cur)).sum(1), norm).view_as(x0)
                a1, a2 = (per_example_norm(d, norm).clamp_min(1e-8) for d in (d1, d2))
                a = (a1 / (a1 + a2)).clamp(0, alpha_max)
                cur = ((cur + eta * d1) * (1 - a) + (x0 + eta * d2) * a).clamp(0, 1)
                wrong = m(cur).argmax(1) != yy
                dist = per_example_norm(cur - x0, norm, keepdim=False)
                better = wrong & (dist < best_norm)
                best, best_norm = torch.where(view(better), cur, best), torch.where(better, dist, best_norm)
                cur = torch.where(view(wrong), x0 + (cur - x0) * beta, cur)
            ok = best_norm <= eps * (1 + 1e-6)
            x_adv[idx[ok]], robust[idx[ok]] = best[ok], False
    return x_adv

def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per example: negative exactly when x is misclassified."""
    z = logits.float()
    return z.gather(1, y[:, None])[:, 0] - z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -float("inf")).amax(1)

SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # queries after which Square's p halves

def square_p(q: int, p_init: float = 0.8) -> float:
    """The fraction of the image Square's window covers at query q (0-based): p_init, halved after each query in
    SQUARE_HALVINGS. Not rescaled to the budget (AutoAttack's standard suite): at 5,000 queries p ends at p_init/128."""
    return p_init / 2 ** sum(q > m for m in SQUARE_HALVINGS)

def square_eta(s: int) -> torch.Tensor:
    """Square-L2's window pattern (s, s) with unit L2 norm: an upper and a lower rectangle of opposite signs, each a
    sum of centred squares of weight 1 / (k + 1)^2 (Andriushchenko et al. 2020, Sec. 3.2)."""
    def rect(a, b):  # entry (i, j): sum_{k >= max(|i - a//2|, |j - b//2|)} 1 / (k + 1)^2
        d = torch.maximum((torch.arange(a) - a // 2).abs()[:, None], (torch.arange(b) - b // 2).abs()[None, :])
        w = 1 / torch.arange(1, max(a // 2, b // 2) + 2, dtype=torch.float32) ** 2
        r = w.flip(0).cumsum(0).flip(0)[d]
        return r / r.norm()
    eta = torch.cat([rect(s // 2, s), -rect(s - s // 2, s)])
    return eta / eta.norm()

def square_windows(n: int, s: int, x: torch.Tensor):
    """n random s x s windows in x's H x W: (row, column) of each pixel in its window, and the mask; (n, 1, H, W)."""
    H, W = x.shape[-2:]
    r, c = torch.arange(H, device=x.device).view(1, 1, H, 1), torch.arange(W, device=x.device).view(1, 1, 1, W)
    top = torch.randint(0, H - s + 1, (n, 1, 1, 1), device=x.device)
    left = torch.randint(0, W - s + 1, (n, 1, 1, 1), device=x.device)
    return (r - top).clamp(0, s - 1), (c - left).clamp(0, s - 1), (r >= top) & (r < top + s) & (c >= left) & (
        c < left + s)

def random_signs(n: int, x: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, (n, x.shape[1], 1, 1), device=x.device) * 2.0 - 1  # (n, C, 1, 1) of +-1

@torch.no_grad()
def square_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, queries: int = 5000,
                p_init: float = 0.8, start: Optional[Callable] = None, propose: Optional[Callable] = None):
    """Square attack (Andriushchenko et al. 2020, Alg. 1), L-inf: random search, no gradient for routing to mask. From
    vertical stripes of +-eps, each query gives one random s x s window per image (s^2 = square_p(q) of it; AutoAttack
    draws one per batch) random +-eps per channel, kept if the margin falls. start, propose: square_l2's."""
    B, C, H, W = x.shape
    with eval_mode(model):
        stripes = lambda x: (x + eps * torch.randint(0, 2, (B, C, 1, W), device=x.device) * 2 - eps).clamp(0, 1)
        x_best = (start or stripes)(x)
        best = margin(model(x_best), y)
        for q in range(queries):
            idx = (best > 0).nonzero()[:, 0]
            if len(idx) == 0:
                break
            x0, side = x[idx], math.sqrt(square_p(q, p_init) * H * W)
            if propose is None:
                mask = square_windows(len(idx), min(max(round(side), 1), H, W), x)[2]  # then the signs
                x_new = torch.where(mask, (x0 + eps * random_signs(len(idx), x)).clamp(0, 1), x_best[idx])
            else:
                x_new = propose(x0, x_best[idx], side)
            new = margin(rows_of(model, idx)(x_new), y[idx])
            better = new < best[idx]
            x_best[idx[better]], best[idx[better]] = x_new[better], new[better]
    return x_best  # (B, C, H, W), ||x_best - x|| <= eps, in [0, 1]

def square_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int = 5000,
              p_init: float = 0.8) -> torch.Tensor:
    """Square-L2 (Andriushchenko et al. 2020, Sec. 3.2) on square_linf's search: start from a 5 x 5 grid of square_eta
    patterns; a window gets square_eta (random sign per channel, random transpose) plus its old content, rescaled to
    carry the old mass of it and of a second window that is zeroed, so ||delta||_2 = eps."""
    B, C, H, W = x.shape
    l2 = lambda t, dims=(1, 2, 3): t.pow(2).sum(dims, keepdim=True).sqrt()  # per image, or per channel (2, 3)

    def start(x):
        s, delta = max(H // 5, 1), torch.zeros_like(x)
        for i in range((H - 5 * s) // 2, H - s + 1, s):
            for j in range((W - 5 * s) // 2, W - s + 1, s):
                eta = square_eta(s).to(x)
                delta[:, :, i:i + s, j:j + s] += (eta.T if torch.rand(()) > 0.5 else eta) * random_signs(B, x)
        return (x + delta * eps / (l2(delta) + 1e-12)).clamp(0, 1)

    def propose(x0, x_best, side):  # (n, C, H, W) -> the new images, ||x_new - x0||_2 = eps
        n, s, delta = len(x0), min(max(round(side), 3) | 1, H, W), x_best - x0  # s odd, at least 3
        ri, ci, m1 = square_windows(n, s, x0)
        m2 = square_windows(n, s, x0)[2]
        e = square_eta(s).to(x0)
        eta = torch.stack([e, e.T])[torch.randint(0, 2, (n,), device=x.device)]  # (n, s, s), some transposed
        new = eta[torch.arange(n).view(-1, 1, 1, 1), ri, ci] * m1 * random_signs(n, x0)
        new = new + delta * m1 / (l2(delta * m1, (2, 3)) + 1e-12)
        mass = ((eps ** 2 - l2(delta) ** 2).clamp_min(0) / C + l2(delta * (m1 | m2), (2, 3)) ** 2).sqrt()
        delta = torch.where(m1, new / (l2(new, (2, 3)) + 1e-12) * mass, torch.where(m2, 0.0, delta))
        return (x0 + delta * eps / (l2(delta) + 1e-12)).clamp(0, 1)
    return square_linf(model, x, y, eps, queries, p_init, start, propose)

def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, queries: int = 5000,
           norm: str = "linf", p_init: float = 0.8) -> torch.Tensor:
    """Square in `norm` (square_linf, square_l2), as the suites run it."""
    check(norm in NORMS and queries >= 1 and 0 < p_init <= 1,
          f"Square needs a norm in {NORMS}, queries >= 1 and 0 < p_init <= 1, got {norm!r}, {queries}, {p_init}")
    return (square_linf if norm == "linf" else square_l2)(model, x, y, eps, queries, p_init)

class SoftRouted(nn.Module):
    """The model with every MoE layer running all experts gated by the full softmax: a differentiable surrogate of
    hard top-k routing, whose gradient sees route changes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.train(model.training)  # so that an attack restores the model's own mode

    def forward(self, x):
        with soft_routing(self.model):
            return self.model(x)

class FixedRoutes(nn.Module):
    """The model with every MoE layer's routes fixed per example (RA-E: the clean routes of x): its forward takes a
    batch of the examples the routes belong to, in order; for_rows(idx) is the model of a subset (see rows_of), so
    attacks that re-batch (APGD-T, FAB-T, Square, the cascade) carry each example's routes along."""

    def __init__(self, model: nn.Module, routes: list[Route], B: int):
        super().__init__()
        self.model, self.routes, self.B = model, routes, B
        self.train(model.training)  # so that an attack restores the model's own mode

    def forward(self, x):
        check(len(x) == self.B, f"FixedRoutes holds the routes of {self.B} examples, got a batch of {len(x)}")
        with forced_routes(self.model, self.routes):
            return self.model(x)

    def for_rows(self, idx: torch.Tensor) -> "FixedRoutes":
        return FixedRoutes(self.model, take_routes(self.routes, idx, self.B), len(idx))

class RouterDeviation(nn.Module):
    """Per-example score of how far the routing of x has moved from given routes: the sum over MoE layers of
    CE(router logits, clean top-1 expert), averaged over an image's tokens. The hard route has no gradient, so the
    routing-only attack (router_attack) ascends this surrogate, which pushes each router away from its clean choice."""

    def __init__(self, model: nn.Module, clean_top1: list[torch.Tensor]):
        super().__init__()
        self.model, self.clean_top1 = model, clean_top1

    def forward(self, x):  # (B, 3, H, W) -> (B, 1)
        layers, total = moe_layers(self.model), torch.zeros(len(x), device=x.device)
        for m in layers:
            m.keep_logits = True  # the router logits with their gradient
        self.model(x)
        for m, target in zip(layers, self.clean_top1):
            total = total + F.cross_entropy(m.router_logits, target, reduction="none").view(len(x), -1).mean(1)
            m.keep_logits, m.router_logits = False, None
        return total[:, None]

class RoutesOf(nn.Module):
    """The routing-only model of clean images x: forward(x') runs the experts on x with the routes that x' gets.
    What RA-R judges: its examples misclassified for some x' in the ball are the ones the routing alone can break."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        super().__init__()
        self.model, self.x = model, x
        self.train(model.training)

    def forward(self, xa):
        with forced_routes(self.model, current_routes(self.model, xa)):
            return self.model(self.x)

def router_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig) -> torch.Tensor:
    """The routing-only attack behind RA-R: PGD (`attack`'s budget) on RouterDeviation, keeping per example the
    iterate that RoutesOf(model, x), the experts on clean x with the routes of the iterate, gets wrong (else the one of
    highest loss). -> x' (B, C, H, W)."""
    clean_top1 = [r.indices[:, 0] for r in current_routes(model, x)]
    score = RouterDeviation(model, clean_top1).train(model.training)  # so pgd restores the model's own mode
    return attack(score, x, y, loss_fn=lambda out, _: out[:, 0], judge=RoutesOf(model, x))

# ==== 4. Training methods: standard, PGD-AT, TRADES, AdvMoE, RT-ER, JTDMoE =========================================
# Each method is a loss, loss_fn(model, x, y, mc) -> (loss, logits), or a step of its own (AdvMoE, JTDMoE) built on
# loss_step; `mc` holds the few settings a step reads.

@dataclass
class MethodConfig:
    eps: float = 8 / 255  # the training attack's radius (pixel units) and norm
    alpha: Optional[float] = None  # its PGD step; None: eps / 4
    norm: str = "linf"
    train_steps: int = 10  # its PGD steps (Madry: 10)
    beta: float = 6.0  # TRADES' KL weight (TRADES eq. 5); RT-ER's runner-up and JTDMoE's expert terms
    balance_coef: float = 1e-2  # Switch balance loss weight
    z_coef: float = 1e-3  # ST-MoE router z-loss weight
    robust_loss: str = "at"  # AdvMoE's robust loss: PGD-AT's CE or TRADES
    expert_attack: str = "pgd"  # RT-ER / JTDMoE expert paths: label PGD (the paper's code) or TRADES' KL attack
    precision: str = "auto"  # the forwards' autocast (amp_dtype)

def sgd(params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (Madry/Rice's recipe); on CUDA the fused kernel."""
    params = list(params)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0,
                           fused=fused or None)

def cosine(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the base learning rate to 0 over `total_steps` optimiser steps."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) /
                                                                                 total_steps)))

def aux(model: nn.Module, cfg: MethodConfig) -> torch.Tensor:
    return moe_aux_loss(model, cfg.balance_coef, cfg.z_coef)

def trades_kl(logits_adv: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """Per-example KL(p_clean || softmax(logits_adv)), float32. TRADES eq. 5's inner term."""
    return F.kl_div(F.log_softmax(logits_adv.float(), 1), p_clean, reduction="none").sum(1)

def trades_attack(model: nn.Module, x: torch.Tensor, cfg: MethodConfig) -> torch.Tensor:
    """TRADES' inner maximisation: PGD on KL(p(x) || p(x')), started at x + 0.001 N(0, I)."""
    with frozen(model):  # no weight gradients in an attack
        with torch.no_grad():
            p_clean = model(x).float().softmax(1)
        x0 = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        xa = pgd(model, x0, p_clean, cfg.eps, cfg.alpha, cfg.train_steps, cfg.norm, random_start=False,
                 loss_fn=trades_kl)
    return project(xa - x, cfg.eps, cfg.norm).add(x).clamp(0, 1)

def at_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MethodConfig):
    """PGD-AT (Madry et al. 2018): CE(F(x_adv), y) + MoE aux losses of that forward, x_adv = PGD-`train_steps`
    against the current model (last iterate). -> (loss, logits)"""
    with frozen(model):  # no weight gradients in the attack
        xa = pgd(model, x, y, cfg.eps, cfg.alpha, cfg.train_steps, cfg.norm)
    logits = model(xa).float()
    return F.cross_entropy(logits, y) + aux(model, cfg), logits

def trades_term(model: nn.Module, x: torch.Tensor, cfg: MethodConfig, xa: Optional[torch.Tensor] = None):
    """(1/B) sum_n KL(p(x_n) || p(x'_n)), x' = xa, or TRADES' attack on `model` (whatever routes or experts are
    forced on it). -> (kl, clean logits, MoE aux losses of the clean forward)"""
    xa = trades_attack(model, x, cfg) if xa is None else xa
    logits = model(x).float()
    clean_aux = aux(model, cfg)
    return trades_kl(model(xa).float(), logits.softmax(1)).mean(), logits, clean_aux

def trades_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MethodConfig):
    """TRADES (Zhang et al. 2019): CE(F(x), y) + beta KL(p(x) || p(x_adv)) + MoE aux losses. -> (loss, logits)"""
    kl, logits, clean_aux = trades_term(model, x, cfg)
    return F.cross_entropy(logits, y) + cfg.beta * kl + clean_aux, logits

def expert_path_term(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MethodConfig) -> torch.Tensor:
    """RT-ER / JTDMoE's KL term on one expert path (the routes or expert forced on `model`): (1/B) sum_n KL(f(x_n) ||
    f(x'_n)), x' = label PGD (cross-entropy, random start) against that path, as in the dual-model paper and its
    code; --expert-attack kl: TRADES' KL attack."""
    xa = None
    if cfg.expert_attack == "pgd":
        with frozen(model):  # no weight gradients in the attack
            xa = pgd(model, x, y, cfg.eps, cfg.alpha, cfg.train_steps, cfg.norm)
    return trades_term(model, x, cfg, xa)[0]

def descend(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One step of `opt` on `loss`. The backward computes only `opt`'s parameters' gradients (AdvMoE's router step:
    no expert weight gradients), only they move, and no gradient is left behind."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = None
    loss.backward(inputs=params)
    opt.step()
    for p in params:
        p.grad = None

def loss_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
              cfg: MethodConfig):
    """One training step of `opt` on loss_fn(model, x, y, cfg) -> (loss, logits): the parameters outside `opt` held
    without gradient (AdvMoE's router step trains theta_R alone), the forwards (the attack included) under the run's
    autocast, the backward outside it. -> (loss, logits)"""
    model.train()
    mine = {id(p) for g in opt.param_groups for p in g["params"]}
    held = [p for p in model.parameters() if p.requires_grad and id(p) not in mine]
    try:
        for p in held:
            p.requires_grad_(False)
        with autocast_for(x.device, cfg.precision):
            loss, logits = loss_fn(model, x, y, cfg)
    finally:
        for p in held:
            p.requires_grad_(True)
    descend(opt, loss)
    return loss, logits

def standard_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MethodConfig):
    """Empirical risk minimisation: CE(F(x), y) + MoE auxiliary losses. -> (loss, logits)"""
    logits = model(x).float()
    return F.cross_entropy(logits, y) + aux(model, cfg), logits

def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """theta_R: the parameters of every router (and noisy-gating layer)."""
    return [p for m in moe_layers(model) for part in (m.router, m.noise) if part is not None for p in part.parameters()]

def advmoe_step(model: nn.Module, router_opt: torch.optim.Optimizer, expert_opt: torch.optim.Optimizer,
                x: torch.Tensor, y: torch.Tensor, cfg: MethodConfig, step: Callable = None):
    """AdvMoE (Zhang et al., ICCV 2023, Alg. 1): router-expert alternating adversarial training. theta_R = all
    routers (router_parameters), theta_E = everything else, each with its own optimiser. Per batch:
      1. router step: x_adv = PGD against the current model; update theta_R only on the robust loss;
      2. expert step: regenerate x_adv against the updated model; update theta_E only.
    The robust loss is PGD-AT's CE or TRADES (--robust-loss). The paper's finding: plain AT of an MoE-CNN fails
    because routers and experts cannot adapt to each other; alternating lets each adapt to the other's latest state.
    The official code differs: ONE image-level router (a small ResNet shared by all layers) learns y mod E under
    TRADES, so the classification loss never reaches it (that repository's issues report the mismatch, and NaN router
    scores that collapse routing onto expert 0). Here every MoE layer has its own router and both steps minimise the
    same robust loss, as the paper says. BatchNorm statistics update in both steps (buffers, not parameters).
    step: how one optimiser step is taken (loss_step; the runner's data-parallel one under torchrun).
    -> (expert step's loss, its logits, router step's loss)"""
    robust_loss, step = trades_loss if cfg.robust_loss == "trades" else at_loss, step or loss_step
    router_loss, _ = step(model, router_opt, robust_loss, x, y, cfg)  # 1.
    loss, logits = step(model, expert_opt, robust_loss, x, y, cfg)  # 2. x_adv against the updated routers
    return loss, logits, router_loss

def runner_up_routes(model: nn.Module, x: torch.Tensor) -> list[Route]:
    """The runner-up path on clean x: at every MoE layer the expert its router ranks second (given the runner-up
    choices of the layers before), with gate 1. (N, 1) per layer."""
    with forced_rank(model, 1):
        return current_routes(model, x, fixed_gates=1.0)

def runner_up_term(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MethodConfig) -> torch.Tensor:
    """(1/B) sum_n KL(f_j(n)(x_n) || f_j(n)(x'_n)) with the runner-up routes j(n) fixed from clean x."""
    with forced_routes(model, runner_up_routes(model, x)):  # the attack and the forwards run f_j(n) alone
        return expert_path_term(model, x, y, cfg)

def rter_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MethodConfig):
    """RT-ER (dual-model paper, Zhang, Xu, Hu, Wang 2025): PGD-AT of the whole MoE plus a TRADES term on the
    runner-up expert j(n), the one the router ranks second for example n:
        L = CE(F(x_adv), y) + (beta / B) sum_n KL(f_j(n)(x_n) || f_j(n)(x'_n)),  x'_n = PGD against f_j(n).
    The top-1 expert is made robust by the first term; the runner-up is where an input lands when a perturbation
    flips the route, so it is trained to be robust too. With several MoE layers the runner-up path takes the
    second-ranked expert at every layer. Trained by loss_step. -> (loss, logits)"""
    ce, logits = at_loss(model, x, y, cfg)
    return ce + cfg.beta * runner_up_term(model, x, y, cfg), logits

def jtdmoe_robust_loss(f_r: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MethodConfig):
    """JTDMoE step (a)'s loss on f_R alone: CE(f_R(PGD(f_R, x)), y) + (beta / B) sum_n sum_i KL(f_Ri(x_n) ||
    f_Ri(PGD(f_Ri, x)_n)), every expert i made robust. -> (loss, f_R's adversarial logits)"""
    loss, logits = at_loss(f_r, x, y, cfg)
    for i in range(moe_layers(f_r)[0].num_experts):
        with forced_expert(f_r, i):
            loss = loss + cfg.beta * expert_path_term(f_r, x, y, cfg)
    return loss, logits

def jtdmoe_standard_loss(dual: "DualModel", x: torch.Tensor, y: torch.Tensor, cfg: MethodConfig):
    """JTDMoE step (b)'s loss, f_R frozen (in eval mode, so its BatchNorm statistics stay put): CE(f_D(x), y) on
    clean x, so f_S learns to complement a * f_R. -> (loss, f_D's logits)"""
    with frozen(dual.robust):
        logits = dual(x).float()
    return F.cross_entropy(logits, y) + aux(dual.standard, cfg), logits

def jtdmoe_step(dual: "DualModel", robust_opt: torch.optim.Optimizer, standard_opt: torch.optim.Optimizer,
                x: torch.Tensor, y: torch.Tensor, cfg: MethodConfig, step: Callable = None):
    """JTDMoE (dual-model paper): joint training of f_S and f_R inside f_D = (1 - a) f_S + a f_R, a fixed; per batch
    step (a) on f_R with its optimiser, then step (b) on f_S with its own. -> (f_S step's loss, f_D's logits, f_R
    step's loss)"""
    step = step or loss_step
    robust_loss, _ = step(dual.robust, robust_opt, jtdmoe_robust_loss, x, y, cfg)
    loss, logits = step(dual, standard_opt, jtdmoe_standard_loss, x, y, cfg)
    return loss, logits, robust_loss

# ==== 5. Evaluating an MoE honestly ================================================================================
# SA: clean accuracy. RA: robust accuracy under a cascade of named attacks, each run only on the examples every
# earlier attack left robust (AutoAttack's protocol): the per-example minimum. Suites: pgd (validation, quick looks);
# autoattack: APGD-CE, APGD-T, FAB-T, Square, AutoAttack's standard suite (L-inf and L2); full: PGD, APGD-CE,
# APGD-T, FAB-T, PGD through a soft all-experts surrogate of the router, Square, then the analyses below.
# Hard top-k routing hides gradients (a route change is a jump the gradient does not see), so the suites end with
# Square, which uses none. Masking probes (full): PGD's success must grow with eps and reach 100% at a large eps;
# the report warns when APGD/Square beat PGD widely or Square breaks what every gradient attack missed.
# RA-E: every example's routes fixed at its clean routes (FixedRoutes, carried through re-batching), the experts
# attacked by the whole suite but the soft-router PGD. RA-R: only the routing attacked (RoutesOf: experts on the
# clean input, routes from the perturbed one), by PGD on a routing surrogate whose iterates the routing-only model
# judges: an RA of that model under that one attack. Per-expert SA/RA: every f_i (all MoE layers forced to expert i)
# meets the same attacks as RA-E anew; with no routing decision left, nothing hides them.
# Routing: expert usage, class x expert counts, and the fraction of routes that the suite's adversarial examples and
# the routing attack flip (Puigcerver 2022 report the overlap of experts before and after an attack).
EVAL_SUITES = ("full", "autoattack", "pgd")
PROBE_FACTORS = (1, 2, 4, 8, 16)  # eps multiples of the probe; L-inf radii are capped at 1

@dataclass
class EvalConfig:
    """A test report's attacks: the suite and its budgets."""
    suite: str = "full"  # pgd (quick looks), autoattack (AutoAttack's standard suite), full (with the MoE analyses)
    eps: float = 8 / 255
    alpha: Optional[float] = None  # PGD's step; None: eps / 4
    norm: str = "linf"
    steps: int = 20  # PGD steps
    restarts: int = 1  # PGD restarts
    apgd_steps: int = 100  # APGD-CE, APGD-T and FAB-T iterations (AutoAttack: 100)
    apgd_targets: Optional[int] = None  # APGD-T's and FAB-T's target classes; None: 9, or classes - 1 if fewer
    square_queries: int = 5000  # AutoAttack: 5000

    def pgd(self) -> AttackConfig:
        return AttackConfig(self.eps, self.alpha, self.steps, self.restarts, self.norm)

def suite_attacks(cfg: EvalConfig, num_classes: int, moe: bool) -> list[tuple[str, Callable]]:
    """The suite's attacks in the order they run: [(name, attack(model, x, y) -> x_adv)]."""
    a, e, n, suite = cfg.pgd(), cfg.eps, cfg.apgd_steps, cfg.suite
    if suite == "pgd":
        return [(a.describe(), a)]
    out = [(a.describe(), a)] if suite == "full" else []
    out.append((f"APGD-CE-{n}", lambda m, x, y: apgd(m, x, y, e, n, cfg.norm)))
    t = cfg.apgd_targets or min(9, num_classes - 1)  # target classes of APGD-T and FAB-T
    if num_classes >= 4:  # the DLR loss needs 4 classes
        out.append((f"APGD-T-{n} x{t}", lambda m, x, y: apgd_targeted(m, x, y, e, n, cfg.norm, t)))
    out.append((f"FAB-T-{n} x{t}", lambda m, x, y: fab_targeted(m, x, y, e, n, cfg.norm, t)))
    if suite == "full" and moe:
        out.append((f"soft-router {a.describe()}", lambda m, x, y: a(SoftRouted(m), x, y, judge=m)))
    q = cfg.square_queries
    out.append((f"Square-{q}", lambda m, x, y: square(m, x, y, e, q, cfg.norm)))
    return out

def attack_cascade(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list, ok: torch.Tensor):
    """Run `attacks` in order, each on the examples still robust (correct on x, ok (B,), and not fooled by an earlier
    attack), through rows_of (a FixedRoutes model keeps each example's routes). -> ({name: robust after it (B,)
    bool}, x_adv (B, ...): what fooled each example, else the last attack's output)"""
    robust, x_adv, after = ok.clone(), x.clone(), {}
    for name, attack in attacks:
        idx = robust.nonzero()[:, 0]
        if len(idx):
            m = rows_of(model, idx)
            xa = attack(m, x[idx], y[idx])
            fooled = predict(m, xa) != y[idx]
            x_adv[idx] = xa
            robust[idx[fooled]] = False
        after[name] = robust.clone()
    return after, x_adv

def masking_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig) -> dict:
    """PGD's robust accuracy at growing eps (PROBE_FACTORS x eps) on float images x: it should fall with eps and
    reach 0 at a large eps; where it does not, the gradient is not finding adversarial examples that exist (gradient
    masking, Athalye et al. 2018)."""
    radii = [min(f * cfg.eps, 1.0) if cfg.norm == "linf" else f * cfg.eps for f in PROBE_FACTORS]
    ok = predict(model, x) == y
    attacks = [AttackConfig(r, None, cfg.steps, 1, cfg.norm) for r in radii]
    accs = [(ok & (predict(model, a(model, x, y)) == y)).float().mean().item() for a in attacks]
    return {"n": len(x), "eps": radii, "robust_acc": accs}

def masking_warnings(res: dict, n: int) -> list[str]:
    """What a reviewer should be told: signs that a gradient attack, or the suite, is fooled."""
    warn, after, fooled = [], list(res["robust_after"].items()), res["fooled_by"]
    square_name = next((k for k in fooled if k.startswith("Square")), None)
    if square_name and fooled[square_name] * n >= max(2, 0.01 * n):
        warn.append(f"Square, which uses no gradient, broke {fooled[square_name]:.1%} of the examples every "
                    "gradient attack left robust: gradients are masked; the RA rests on a black-box attack")
    if res["attacks"][0].startswith("PGD") and len(after) > 1 and after[0][1] - res["robust_acc"] > 0.02:
        warn.append(f"the suite's other attacks lower RA {after[0][1] - res['robust_acc']:.3f} below PGD alone: "
                    "PGD overstates this model's robustness")
    if "probe" in res:
        radii, accs = res["probe"]["eps"], res["probe"]["robust_acc"]
        if accs[-1] > 0:
            warn.append(f"PGD at eps={radii[-1]:.3g} leaves {accs[-1]:.1%} robust: attack success should reach 100% "
                        "at a large eps; gradients may be masked")
        if any(b > a + 0.02 for a, b in zip(accs, accs[1:])):
            warn.append("PGD's robust accuracy rises with eps somewhere in the probe: gradients may be masked")
    return warn

def add_up(total: dict, part: dict) -> dict:
    """total[k] += part[k] for every key of part (whole numbers and count tensors alike). -> total"""
    for k, v in part.items():
        total[k] = total[k] + v if k in total else v
    return total

def clean_pass(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
    """One clean forward in eval mode. -> (logits, correct (B,) bool, the routes it took at each MoE layer)"""
    with torch.no_grad(), eval_mode(model):
        logits = model(xb)
    return logits, logits.argmax(1) == yb, [Route(r.indices, r.gates) for r in last_routing(model)]

def robust_counts(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, attacks: list, ok: torch.Tensor):
    """Robust accuracy's counts on one batch: the cascade of named attacks on the clean-correct examples `ok`.
    -> ({"clean": n, each attack's name: n robust after it, "robust": n robust after all}, adversarial batch)"""
    after, xa = attack_cascade(model, xb, yb, attacks, ok)
    counts = {"clean": int(ok.sum()), **{name: int(robust.sum()) for name, robust in after.items()}}
    return {**counts, "robust": counts[attacks[-1][0]]}, xa

def flip_counts(kind: str, routes: list[Route], new_routes: list[Route], rows: list[torch.Tensor]) -> dict:
    """How many of each MoE layer's `rows` (a bool per row it routes) changed their top-1 expert. -> {("flips", kind,
    layer): n}"""
    return {("flips", kind, l): int((new.indices[:, 0] != r.indices[:, 0])[rw].sum())
            for l, (r, new, rw) in enumerate(zip(routes, new_routes, rows))}

def routing_counts(layers: list, routes: list[Route], yb: torch.Tensor, num_classes: int) -> dict:
    """Routing statistics of one clean batch, on the host: each MoE layer's top-1 expert usage, and how each class
    spreads over the experts (per-token rows count for their image's class).
    -> {("usage", layer): (E,), ("class_expert", layer): (classes, E)} long tensors"""
    counts = {}
    for l, (layer, r) in enumerate(zip(layers, routes)):
        top1 = r.indices[:, 0].cpu()
        cls = yb.cpu().repeat_interleave(len(top1) // len(yb))
        counts["usage", l] = torch.bincount(top1, minlength=layer.num_experts)
        counts["class_expert", l] = torch.zeros(num_classes, layer.num_experts, dtype=torch.long).index_put_(
            (cls, top1), torch.ones_like(top1), accumulate=True)
    return counts

def moe_counts(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, ok: torch.Tensor, routes: list[Route],
               rows: list[torch.Tensor], fixed: list, attack: AttackConfig) -> dict:
    """The MoE diagnostics on one batch (the full suite): RA-E (every example keeps its clean `routes` through the
    attacks `fixed`, those with no routing decision left), RA-R (the routing attacked, the experts judged on clean
    x) with its route flips, and each forced expert network f_i's SA and RA (attacked anew). -> counts"""
    ra_e, _ = attack_cascade(FixedRoutes(model, routes, len(xb)), xb, yb, fixed, ok)
    counts = {"ra_e": int(ra_e[fixed[-1][0]].sum())}
    xr = router_attack(model, xb, yb, attack)
    counts.update(flip_counts("router_attack", routes, current_routes(model, xr), rows))
    counts["ra_r"] = int((ok & (predict(RoutesOf(model, xb), xr) == yb)).sum())
    for i in range(moe_layers(model)[0].num_experts):
        with forced_expert(model, i):
            ok_i = predict(model, xb) == yb
            counts[f"expert{i}_clean"] = int(ok_i.sum())
            counts[f"expert{i}_robust"] = int(attack_cascade(model, xb, yb, fixed, ok_i)[0][fixed[-1][0]].sum())
    return counts

@float32_evaluation()
def evaluate_full(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, device: torch.device,
                  batch_size: int = 256, analysis: bool = True, combine: Optional[Callable[[dict], dict]] = None,
                  progress: Optional[Callable[[str], None]] = None) -> dict:
    """The evaluation report of a model on images x (N, 3, H, W), uint8 or float in [0, 1], and labels y (N,): SA,
    RA under cfg.suite with each attack's figure, and for the full suite with analysis=True the masking probe (on the
    first 200 images), RA-E, RA-R, per-expert numbers and routing statistics. Runs in true float32 whatever the
    training precision. Each batch's counts (the parts above) are added up, then passed through `combine` (the
    runner's: every process's counts, when each evaluated its share). progress(line): each attack as it starts on
    the first batch, then the batches done with an ETA, every 30 s."""
    probe_x, probe_y, suite, layers = x[:200], y[:200], cfg.suite, moe_layers(model)
    say, nb, t0, shown, b = progress or (lambda line: None), math.ceil(len(x) / batch_size), time.time(), time.time(), 0

    def named(name: str, attack: Callable) -> Callable:
        def run(m, xb, yb):
            if b == 0:
                say(f"  {name} on {len(xb)} images of test batch 1/{nb}")
            return attack(m, xb, yb)
        return run
    moe = suite == "full" and analysis and len(layers) > 0
    attack = cfg.pgd()  # also the routing attack's
    attacks, sums = None, {"images": 0}
    with frozen(model):  # no weight gradients in the attacks
        for b, (xb, yb) in enumerate(batches(x, y, batch_size, device)):
            if b and time.time() - shown > 30:
                shown, left = time.time(), (time.time() - t0) / b * (nb - b)
                say(f"  test batch {b + 1}/{nb} | evaluation ends in {left / 60:.1f} min")
            logits, ok, routes = clean_pass(model, xb, yb)
            if attacks is None:
                num_classes = logits.shape[1]
                attacks = [(k, named(k, a)) for k, a in suite_attacks(cfg, num_classes, len(layers) > 0)]
                fixed = [(k, a) for k, a in attacks if not k.startswith("soft-router")]  # with no routing decision left
            # each layer's rows of clean-correct images (per image, or per token: layers may differ in a dual model)
            rows = [ok.repeat_interleave(len(r.indices) // len(xb)) for r in routes]
            add_up(sums, {"images": len(xb), **{("rows", l): int(r.sum()) for l, r in enumerate(rows)},
                          **routing_counts(layers, routes, yb, num_classes)})
            counts, xa = robust_counts(model, xb, yb, attacks, ok)
            add_up(sums, counts)
            add_up(sums, flip_counts("attack", routes, current_routes(model, xa) if layers else [], rows))
            if moe:
                add_up(sums, moe_counts(model, xb, yb, ok, routes, rows, fixed, attack))
    sums = combine(sums) if combine is not None else sums
    names, n = [a for a, _ in attacks], sums["images"]
    acc = lambda k: sums.get(k, 0) / max(1, n)
    res = {"clean_acc": acc("clean"), "robust_acc": acc("robust"), "attack": "cascade: " + " > ".join(names),
           "attacks": names, "robust_after": {k: acc(k) for k in names}}
    res["fooled_by"] = {k: round(b - acc(k), 6) for k, b in zip(names, [acc("clean")] + [acc(k) for k in names])}
    if suite == "full" and analysis:
        with frozen(model):
            res["probe"] = masking_probe(model, probe_x.to(device).float() / 255, probe_y.to(device), cfg)
    rate = lambda kind: [sums.get(("flips", kind, l), 0) / max(1, sums["rows", l]) for l in range(len(layers))]
    collapsed = []
    if layers:
        usage = [sums["usage", l].tolist() for l in range(len(layers))]
        health, collapsed = routing_health(model, usage, "the clean test images")
        res["routing"] = {"usage": usage, "health": health, "route_flip_attack": rate("attack")}
    if moe:
        res.update(ra_e=acc("ra_e"), ra_r=acc("ra_r"), ra_e_attacks=[k for k, _ in fixed],
                   ra_r_attack=f"routing-only {attack.describe()} on the router-deviation score, iterates judged by "
                   "the experts on clean x with the iterate's routes", per_expert_attacks=[k for k, _ in fixed],
                   per_expert=[{"expert": i, "clean_acc": acc(f"expert{i}_clean"),
                                "robust_acc": acc(f"expert{i}_robust")} for i in range(layers[0].num_experts)])
        res["routing"].update(class_expert=[sums["class_expert", l].tolist() for l in range(len(layers))],
                              route_flip_router_attack=rate("router_attack"))
    res["warnings"] = (masking_warnings(res, n) if suite != "pgd" else []) + collapsed
    return res

def format_report(res: dict, title: str = "test") -> str:
    """The evaluation report as readable lines."""
    lines = [f"{title}: SA {res['clean_acc']:.3f} | RA {res['robust_acc']:.3f} ({res['attack']})"]
    if len(res.get("robust_after", {})) > 1:
        lines.append("  RA after each attack: " + ", ".join(f"{k}: {v:.3f}" for k, v in res["robust_after"].items()))
    if "probe" in res:
        lines.append(f"  masking probe, PGD RA by eps ({res['probe']['n']} images): "
                     + ", ".join(f"{e:.3g}: {a:.3f}" for e, a in zip(res["probe"]["eps"], res["probe"]["robust_acc"])))
    if "ra_e" in res:
        lines.append(f"  RA-E (clean routes fixed; {' > '.join(res['ra_e_attacks'])}) {res['ra_e']:.3f}")
        lines.append(f"  RA-R ({res['ra_r_attack']}) {res['ra_r']:.3f}")
        per = ", ".join(f"f{e['expert']} {e['clean_acc']:.3f}/{e['robust_acc']:.3f}" for e in res["per_expert"])
        lines.append(f"  per expert SA/RA ({' > '.join(res['per_expert_attacks'])}): {per}")
    if "routing" in res:
        r, fmt = res["routing"], lambda fs: ", ".join(f"{f:.2f}" for f in fs)
        lines.append("  expert usage per MoE layer: " + "; ".join(
            f"{'/'.join(str(c) for c in u)} (max share {h['max_share']:.2f}, entropy {h['entropy']:.2f})"
            for u, h in zip(r["usage"], r.get("health", []))))
        extra = f", routing attack {fmt(r['route_flip_router_attack'])}" if "route_flip_router_attack" in r else ""
        lines.append(f"  routes flipped per layer: suite's adversarial examples {fmt(r['route_flip_attack'])}{extra}")
    lines += [f"  WARNING: {w}" for w in res.get("warnings", [])]
    return "\n".join(lines)

# ==== 6. Lipschitz constants, route stability and certified radii (Puigcerver 2022; dual model) ====================
# How fast can the logits F change with the input, in a norm p (linf or l2; output in the same)? local_lipschitz:
# max ||F(x') - F(x)|| / ||x' - x|| over an eps-ball by gradient ascent, a lower bound on the local constant;
# jacobian_spectral_norm: ||J_F(x)||_2 by power iteration with jvp and vjp; lipschitz_bound: an upper bound, the
# product of per-layer operator norms (L2: Gram iteration, provable; L-inf: row sums; BatchNorm in eval as
# max |gamma / sigma|; residual blocks L_shortcut + L_branch).
# For a dense network the bound is global. An MoE layer F = sum_i g_i f_i with L_i-Lipschitz experts, r_i-Lipschitz
# gates and outputs bounded by M_i is K-Lipschitz with K = sum_i (L_i + M_i r_i) (dual-model paper; soft gates); with
# hard top-1 routing, where the route cannot change only the chosen expert and its gate move: K = max_i (L_i + M_i
# r_i). A hard router is not Lipschitz across route changes (two inputs a hair apart on either side of a switch differ
# by the gap between two experts), and M_i is measured on the given inputs, so for an MoE the bound is *route-stable*,
# not global: it holds within one route region near the measured inputs (`route_stable_{norm}` in the report), and a
# certificate only inside the route-stable radius.

def local_lipschitz(model: nn.Module, x: torch.Tensor, eps: float = 8 / 255, norm: str = "linf",
                    steps: int = 20) -> torch.Tensor:
    """Per-example lower bound (B,) on the local Lipschitz constant of x -> logits in the eps-ball, in `norm`. linf:
    for every output j and sign s, sign-gradient ascent on s * (F_j(x + d) - F_j(x)) (the inf-norm of the change is
    the largest such term); l2: normalised-gradient ascent on ||F(x + d) - F(x)||_2 (power iteration for a linear
    F). The ratio is taken at every iterate; images are not clipped. Exact for F = Wx + b."""
    x, best = x.detach(), torch.zeros(len(x), device=x.device)
    ratio = lambda out, inp: per_example_norm(out, norm, False) / per_example_norm(inp, norm, False).clamp_min(1e-12)
    with eval_mode(model):
        with torch.no_grad():
            f0 = model(x).float()
        for obj in [(j, s) for j in range(f0.shape[1]) for s in (1.0, -1.0)] if norm == "linf" else [None]:
            d = torch.randn_like(x)
            d = eps * d / per_example_norm(d, norm).clamp_min(1e-12)
            for _ in range(steps):
                d.requires_grad_(True)
                diff = model(x + d).float() - f0
                best = torch.maximum(best, ratio(diff, d).detach())
                (g,) = torch.autograd.grad((diff[:, obj[0]] * obj[1] if obj else diff.pow(2).sum(1)).sum(), d)
                with torch.no_grad():  # linf: a sign step, clipped; l2: to the eps-sphere along the gradient
                    if obj:
                        d = (d + eps * g.sign()).clamp(-eps, eps)
                    else:
                        d = eps * g / per_example_norm(g, "l2").clamp_min(1e-12)
            with torch.no_grad():
                best = torch.maximum(best, ratio(model(x + d).float() - f0, d))
    return best

def jacobian_spectral_norm(model: nn.Module, x: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """||J_F(x)||_2 per example by power iteration on J^T J: J v by forward-mode AD (jvp), J^T u by reverse mode
    (vjp); examples are independent in eval mode, so one batched pass serves all. (B,)"""
    import warnings
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention import SDPBackend, sdpa_kernel
    x = x.detach()
    unit = lambda t: t / t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    v, sigma = unit(torch.randn_like(x)), torch.zeros(len(x), device=x.device)
    with eval_mode(model), sdpa_kernel([SDPBackend.MATH]), warnings.catch_warnings():
        # MATH: the fused attention kernels have no jvp; torch's jvp decompositions warn about torch.jit
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
        xr = x.clone().requires_grad_(True)
        out = model(xr).float()  # for the vjp, built once
        for _ in range(iters):
            with fwAD.dual_level():
                jv = fwAD.unpack_dual(model(fwAD.make_dual(x, v))).tangent.float()  # (B, classes)
            sigma = jv.norm(dim=1)
            v = unit(torch.autograd.grad(out, xr, jv, retain_graph=True)[0])  # J^T J v, normalised
    return sigma.detach()

def gram_spectral_bound(K: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """Upper bounds on the spectral norms of a batch of matrices K (..., m, n), real or complex, by Gram iteration
    (Delattre et al. 2023): with G_0 = K, G_{t+1} = G_t^H G_t, ||G_t||_2 = ||K||_2^(2^t) <= ||G_t||_F, so ||K||_2 <=
    ||G_t||_F^(1 / 2^t) for every t, tightening geometrically. Each G_t is rescaled by its Frobenius norm (tracked in
    log space), float64. Power iteration, in contrast, approaches ||K||_2 from below and is no bound."""
    G = K.to(torch.complex128 if K.is_complex() else torch.float64)
    log_scale = torch.zeros(G.shape[:-2], dtype=torch.float64, device=G.device)
    for _ in range(iters):
        f = torch.linalg.matrix_norm(G, "fro").clamp_min(1e-300)
        G, log_scale = G / f[..., None, None], 2 * (log_scale + f.log())
        G = G.mH @ G
    return ((torch.linalg.matrix_norm(G, "fro").clamp_min(1e-300).log() + log_scale) / 2.0 ** iters).exp()

def conv_spectral_bound(weight: torch.Tensor, in_hw: tuple[int, int], padding: tuple[int, int],
                        iters: int = 10) -> float:
    """A provable upper bound on the L2 operator norm of a (strided, zero-padded) convolution on (C, H, W) inputs.
    Padding embeds the input isometrically in an (H + 2p) x (W + 2p) grid, where the convolution is a crop of the
    circular one, and the stride keeps a subset of its outputs: neither increases the norm. The 2-D DFT
    block-diagonalises the circular convolution (Sedghi et al. 2019): its norm is the largest spectral norm of the
    per-frequency C_out x C_in matrices."""
    n = [max(s + 2 * p, k) for s, p, k in zip(in_hw, padding, weight.shape[-2:])]
    freq = torch.fft.fft2(weight.detach().double(), s=n).permute(2, 3, 0, 1)  # (H', W', C_out, C_in)
    return gram_spectral_bound(freq, iters).max().item()

GELU_SLOPE = 1.1290  # max |d/dx x * Phi(x)|

def operator_norm(W: torch.Tensor, norm: str, iters: int = 12) -> float:
    """||W|| of a matrix: inf -> inf is the largest row L1 norm; L2 a Gram-iteration bound."""
    return W.abs().sum(1).max().item() if norm == "linf" else gram_spectral_bound(W.detach(), iters).item()

def forward_inputs(model: nn.Module, x: torch.Tensor, modules: list) -> dict:
    """{module: the input it received} for one eval-mode, no-grad forward of x (a module called twice: the last)."""
    inputs = {}
    record = lambda mod, inp, out: inputs.__setitem__(mod, inp[0].detach())
    hooks = [m.register_forward_hook(record) for m in modules]
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return inputs

def router_affine(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An MoE layer's router at eval as logits = W h + b on its raw input h, float32: W (E, D), b (E,), the centring's
    running statistics folded in (W diag(1/s), b - W diag(1/s) mean). What the certificates and bounds use."""
    W, b = layer.router.weight.detach().float(), layer.router.bias.detach().float()
    if layer.centre is not None:
        W = W * (layer.centre.running_var.float() + layer.centre.eps).rsqrt()
        b = b - W @ layer.centre.running_mean.float()
    return W, b

def conv_lipschitz(lb: "LipschitzBound", m: nn.Conv2d, before: float) -> float:
    check(m.groups == 1 and m.dilation == (1, 1), "the Lipschitz bound handles plain convolutions only")
    if lb.norm == "linf":  # each output is a row of C_in x k x k weights
        return operator_norm(m.weight.flatten(1), "linf")
    return conv_spectral_bound(m.weight, lb.shapes[m][1:], m.padding, lb.iters)

def batchnorm_lipschitz(lb: "LipschitzBound", m: nn.Module, before: float) -> float:
    """Eval-mode BatchNorm is the per-channel map x * gamma / sigma + const: max |gamma / sigma|."""
    return (m.weight.detach().abs() / torch.sqrt(m.running_var + m.eps)).max().item()

# A rule per module type: rule(lb, module, before) -> its bound, or a constant. Looked up along the module's class
# hierarchy (a BatchNorm subclass takes BatchNorm's rule). A module of your own either adds a rule here or carries a
# method `lipschitz(self, lb, before)` (as this file's models do); MoE layers are recognised by their experts.
RULES: dict[type, object] = {
    nn.Linear: lambda lb, m, before: operator_norm(m.weight, lb.norm, lb.iters),
    nn.Conv2d: conv_lipschitz,
    nn.modules.batchnorm._BatchNorm: batchnorm_lipschitz,
    nn.Sequential: lambda lb, m, before: lb.chain(list(m), before),
    nn.ReLU: 1.0, nn.Identity: 1.0, nn.Flatten: 1.0, nn.Dropout: 1.0, nn.GELU: GELU_SLOPE,
}

class LipschitzBound:
    """Upper bound of a network in norm p, composed from a bound per module: global for a dense model, route-stable
    with MoE layers (the section's comment). `measure(x)` first records each module's input shape and, for MoE
    layers, M_i = max ||f_i(h)|| over the inputs. Calling the object returns the bound and fills `moe` (per-MoE-layer
    terms) and `prefix` (the bound of the map from the model input to each MoE layer's input)."""

    def __init__(self, model: nn.Module, norm: str = "l2", iters: int = 12):
        self.model, self.norm, self.iters = model, norm, iters
        self.shapes, self.M, self.moe, self.prefix = {}, {}, [], {}

    @torch.no_grad()
    def measure(self, x: torch.Tensor) -> "LipschitzBound":
        def hook(m, inp, out):  # (every expert runs on the MoE layer's input, so its modules' shapes are seen too)
            self.shapes[m] = tuple(inp[0].shape[1:])
            if is_moe(m):  # M_i = max ||f_i(h)|| over the inputs seen so far
                M = [per_example_norm(e(inp[0]), self.norm, keepdim=False).max().item() for e in m.experts]
                self.M[m] = [max(a, b) for a, b in zip(self.M.get(m, M), M)]
        hooks = [m.register_forward_hook(hook) for m in self.model.modules()]
        with eval_mode(self.model):
            self.model(x)
        for h in hooks:
            h.remove()
        return self

    def __call__(self) -> float:
        check(len(self.shapes) > 0, "call LipschitzBound.measure(x) first")
        self.moe = []
        return self.bound(self.model, 1.0)

    def bound(self, m: nn.Module, before: float) -> float:
        """Bound of module m; `before` is the bound of everything up to m's input."""
        if is_moe(m):
            return self.moe_bound(m, before)
        if hasattr(m, "lipschitz"):
            return m.lipschitz(self, before)
        for cls in type(m).__mro__:
            if cls in RULES:
                rule = RULES[cls]
                return rule(self, m, before) if callable(rule) else rule
        raise UserError(f"no Lipschitz bound for layer type {type(m).__name__}")

    def chain(self, modules: list, before: float) -> float:
        """Bound of modules applied in order: the product of theirs."""
        L = 1.0
        for sub in modules:
            L *= self.bound(sub, before * L)
        return L

    def moe_bound(self, m: nn.Module, before: float) -> float:
        """Soft-gate bound sum_i (L_i + M_i r_i) and hard-route bound max_i (L_i + M_i r_i). r_i: the gate g_i =
        softmax(W pool(h))_i has |dg_i| <= 1/2 ||dr|| (a row of the softmax Jacobian has norm <= 1/2), so r_i <=
        ||W|| / 2 (l2: times 1 / sqrt(HW) for the pool)."""
        self.prefix[m] = before
        Ls = [self.bound(e, before) for e in m.experts]
        pool = 1.0 if (self.norm == "linf" or m.tokens) else 1.0 / math.sqrt(self.shapes[m][1] * self.shapes[m][2])
        r = 0.5 * operator_norm(router_affine(m)[0], self.norm, self.iters) * pool  # W with the centring folded in
        M = self.M.get(m, [float("inf")] * len(m.experts))
        terms = [L + Mi * r for L, Mi in zip(Ls, M)]
        self.moe.append(dict(experts_L=Ls, M=M, gate_r=r, soft_bound=sum(terms), hard_route_bound=max(terms)))
        return max(terms) if m.k == 1 else sum(terms)

def lipschitz_bound(model: nn.Module, x: torch.Tensor, norm: str = "l2", iters: int = 12) -> dict:
    """The upper bound of LipschitzBound measured on x, with the per-MoE-layer terms."""
    lb = LipschitzBound(model, norm, iters).measure(x)
    return {"bound": lb(), "moe": lb.moe}

def router_view(layer: MoE, h: torch.Tensor, norm: str):
    """The layer's router on its input h, in float32: (logits (N, E), router weight W (E, D), the input-norm scale
    of the pooling, B). Rows are pooled images, or tokens."""
    rows = h.reshape(-1, h.shape[-1]) if layer.tokens else h.mean(dim=(2, 3))  # (N, D)
    scale = 1.0 if layer.tokens or norm == "linf" else math.sqrt(h.shape[2] * h.shape[3])
    W, b = router_affine(layer)
    return rows.float() @ W.T + b, W, scale, h.shape[0]

def route_stability_radius(layer: MoE, h: torch.Tensor, norm: str = "linf") -> torch.Tensor:
    """Per image, the smallest perturbation of the layer's input h (in `norm`) that can change its set of top-k
    experts. The router is linear in the pooled input (or the token): a kept expert i is overtaken by a dropped j
    when the gap r_i - r_j, which moves at most ||w_i - w_j||_* per unit of input (dual norm: L1 for linf, L2 for
    l2), closes. Exact for the layer: min over i kept, j dropped of (r_i - r_j) / ||w_i - w_j||_*, times sqrt(HW) in
    l2 for the pooling (a constant-over-space perturbation is the worst case). h: (B, C, H, W) or (B, T, D) -> (B,)"""
    logits, W, scale, B = router_view(layer, h, norm)  # (N, E)
    E = layer.num_experts
    if layer.k == E:
        return torch.full((B,), float("inf"), device=h.device)
    kept = logits.topk(layer.k, dim=1).indices  # (N, K)
    diff_w = W[:, None, :] - W[None, :, :]  # (E, E, D)
    dual = diff_w.abs().sum(-1) if norm == "linf" else diff_w.norm(dim=-1)  # (E, E)
    ratio = (logits[:, :, None] - logits[:, None, :]) / dual.clamp_min(1e-12)  # (N, E, E): (r_i - r_j) / ||.||_*
    valid = torch.zeros_like(ratio, dtype=torch.bool).scatter_(1, kept[:, :, None].expand(-1, -1, E), True)
    valid &= torch.ones_like(logits, dtype=torch.bool).scatter(1, kept, False)[:, None, :]  # i kept, j dropped
    return (ratio.masked_fill(~valid, float("inf")).flatten(1).amin(1) * scale).view(B, -1).amin(1)

def route_flip_direction(layer: MoE, h: torch.Tensor, norm: str = "linf") -> torch.Tensor:
    """For per-image top-1 routing: the unit perturbation of h (constant over space) that closes the binding logit
    gap fastest; h + (radius + a bit) * direction flips the route."""
    check(not layer.tokens and layer.k == 1, "route_flip_direction is for per-image top-1 routing")
    logits, W, _, B = router_view(layer, h, norm)
    i = logits.argmax(1)  # (B,)
    diff = W[i][:, None, :] - W[None, :, :]  # (B, E, D): w_i - w_j
    dual = diff.abs().sum(-1) if norm == "linf" else diff.norm(dim=-1)
    ratio = ((logits.gather(1, i[:, None]) - logits) / dual.clamp_min(1e-12)).scatter(1, i[:, None], float("inf"))
    d = diff[torch.arange(B), ratio.argmin(1)]  # (B, D)
    u = -d.sign() if norm == "linf" else -d / d.norm(dim=1, keepdim=True) / math.sqrt(h.shape[2] * h.shape[3])
    return u[:, :, None, None].expand_as(h).clone()

def certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str = "linf") -> dict:
    """Certified radius per example: a right prediction keeps its label within min(margin / (2 K), route-stable
    radius), K the bound (dual model: K_D = (1 - a) K_S + a K_R), since each logit moves by at most K ||d||; 0 if
    wrong. (margin: top-1 minus top-2 logit.) The route-stable radius is the smallest over MoE layers of the layer's
    own radius divided by the bound of the map from x to that layer's input: exact for an MoE layer that sees the
    input directly, a bound otherwise."""
    lb = LipschitzBound(model, norm).measure(x)
    K = lb()
    with torch.no_grad(), eval_mode(model):
        top2 = model(x).float().topk(2, dim=1)
    correct, gap = top2.indices[:, 0] == y, top2.values[:, 0] - top2.values[:, 1]
    route = torch.full((len(x),), float("inf"), device=x.device)
    for m, h in forward_inputs(model, x, moe_layers(model)).items():
        route = torch.minimum(route, route_stability_radius(m, h, norm) / lb.prefix.get(m, 1.0))
    radius = torch.where(correct, torch.minimum(gap / (2 * K), route), torch.zeros_like(gap))
    return {"radius": radius, "K": K, "lipschitz_radius": gap / (2 * K), "route_radius": route, "correct": correct}

def expert_spread(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Per MoE layer, mean over rows of ||f_top1(h) - f_top2(h)|| / ||f_top1(h)||: how different the two
    top-weighted experts' outputs are (Puigcerver 2022: large spread hurts robustness)."""
    spreads, inputs = [], forward_inputs(model, x, moe_layers(model))  # also leaves each layer's routing in m.routing
    with torch.no_grad(), eval_mode(model):
        for m in (m for m in moe_layers(model) if m.num_experts >= 2):
            rows = inputs[m].reshape(-1, inputs[m].shape[-1]) if m.tokens else inputs[m]
            outs, n, rank = torch.stack([e(rows) for e in m.experts], 1), torch.arange(len(rows)), m.routing.ranking
            a, b = outs[n, rank[:, 0]].flatten(1), outs[n, rank[:, 1]].flatten(1)  # (N, E, ...) -> top-1, top-2
            spreads.append(((a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)).mean().item())
    return spreads

@float32_evaluation()
def lipschitz_report(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, norm: str = "linf",
                     local_steps: int = 5, jacobian_iters: int = 15) -> dict:
    """Everything above on a batch: local estimates, Jacobian norm, upper bounds (`global_l2`, `global_linf` for a
    dense model; `route_stable_l2`, `route_stable_linf` with an MoE), per-expert constants, expert spread, and
    certified accuracy at eps (route-stable certificate)."""
    rep = {"n": len(x), "eps": eps, "norm": norm}
    rep["local_linf"] = local_lipschitz(model, x, eps, "linf", local_steps).mean().item()
    rep["local_l2"] = local_lipschitz(model, x, eps * math.sqrt(x[0].numel()) / 4, "l2", local_steps).mean().item()
    rep["jacobian_l2"] = jacobian_spectral_norm(model, x, jacobian_iters).mean().item()
    if any(isinstance(m, Attention) for m in model.modules()):
        return rep  # no global bound for attention
    kind = "route_stable" if moe_layers(model) else "global"  # see the section's comment
    for p in NORMS:
        b = lipschitz_bound(model, x, p)
        rep[f"{kind}_{p}"] = b["bound"]
        if b["moe"]:
            rep[f"moe_{p}"] = b["moe"]
    rep["expert_spread"] = expert_spread(model, x)
    cert = certify(model, x, y, norm)
    rep.update(certified_acc=(cert["correct"] & (cert["radius"] >= eps)).float().mean().item(),
               median_certified_radius=cert["radius"].median().item(),
               median_route_radius=cert["route_radius"].median().item())
    return rep

# ==== 7. Configuration: one flat dataclass, each field a --flag ====================================================
METHODS = ("standard", "at", "trades", "advmoe", "rt-er", "dual", "jtdmoe")
DATASETS = ("synthetic", "cifar10", "cifar100", "imagefolder")
ARCHS = ("resnet18", "moe-resnet18", "moe-vit")

def opt(default, help: str, choices=None, ge=None, gt=None, le=None, lt=None, group=None):
    """A Config field: its default, --help text, allowed values (choices, bounds) and the --help group it opens."""
    return field(default=default, metadata=dict(help=help, choices=choices, bounds=(ge, gt, le, lt), group=group))

@dataclass
class Config:
    """Everything a run needs; each field is one --flag (underscores become dashes). Checkpoints store it."""
    method: str = opt("at", "training method", METHODS, group="what to train")
    dataset: str = opt("synthetic", "data set (imagefolder: --data-dir holds train/ and test/)", DATASETS, group="data")
    data_dir: str = opt("data", "where data sets live (CIFAR is downloaded here)")
    image_size: Optional[int] = opt(None, "image side of imagefolder and synthetic (default 32)")
    train_limit: Optional[int] = opt(None, "use only the first N training examples", ge=1)
    test_limit: Optional[int] = opt(None, "use only the first N test examples", ge=1)
    val_size: Optional[int] = opt(None, "held-out validation examples (default 10%%, at most 1000)", ge=1)
    augment: bool = opt(True, "no random crop + flip")
    arch: str = opt("moe-resnet18", "architecture; resnet18 has no MoE block", ARCHS, group="model")
    width: float = opt(1.0, "multiplier of every channel width (0.125 for CPU)", gt=0, le=8)
    experts: int = opt(4, "experts E per MoE layer (Robust Experts: 4; AdvMoE: 2)", ge=1, le=64)
    top_k: int = opt(1, "experts K per image/token (CNN-MoE papers: 1; V-MoE: 2)", ge=1)
    moe_blocks: str = opt("layer4.1", "ResNet blocks made MoE: all, or e.g. layer3.1,layer4.1")
    expert_ratio: float = opt(1.0, "expert inner width / block width (AdvMoE: 0.5)", gt=0, le=4)
    noisy_gating: bool = opt(False, "Shazeer's noisy top-k routing while training")
    router: str = opt("centred", "centred: the router's input standardised; linear: the papers' W h + b", ROUTERS)
    epochs: int = opt(10, "passes over the training split", ge=1, group="optimisation")
    batch_size: int = opt(128, "images per step (the global batch under torchrun)", ge=1, le=65536)
    lr: float = opt(0.1, "SGD learning rate, cosine decay to 0 (Madry/Rice recipe, shortened)", ge=0)
    momentum: float = opt(0.9, "SGD (Nesterov) momentum", ge=0, lt=1)
    weight_decay: float = opt(5e-4, "SGD weight decay", ge=0)
    balance_coef: float = opt(1e-2, "Switch balance loss weight", ge=0)
    z_coef: float = opt(1e-3, "router z-loss weight (ST-MoE)", ge=0)
    beta: float = opt(6.0, "KL weight: TRADES (and advmoe's), RT-ER's runner-up and JTDMoE's expert terms", ge=0)
    seed: int = opt(0, "initial weights, data order, attacks' random starts", ge=0, le=2 ** 31 - 1)
    train_steps: int = opt(10, "PGD steps while training (Madry: 10)", ge=1)
    val_steps: int = opt(10, "PGD steps on the validation split each epoch", ge=1)
    router_lr: Optional[float] = opt(None, "router learning rate (default --lr)", ge=0, group="advmoe")
    router_schedule: str = opt("cosine", "router lr schedule", ("cosine", "constant"))
    robust_loss: str = opt("at", "robust loss of both steps: PGD-AT or TRADES", ("at", "trades"))
    dual_a: float = opt(0.5, "smoothing parameter a of f_D = (1-a) f_S + a f_R", ge=0, le=1, group="dual and jtdmoe")
    dual_mix: str = opt("logits", "mix logits (the paper) or each member's unit-std logits", DUAL_MIXES)
    dual_sweep: str = opt("0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", "--method dual: values of a to evaluate")
    standard_ckpt: Optional[str] = opt(None, "--method dual: f_S, a checkpoint (e.g. of --method standard)")
    robust_ckpt: Optional[str] = opt(None, "--method dual: f_R, a checkpoint (e.g. of --method rt-er)")
    expert_attack: str = opt("pgd", "rt-er/jtdmoe expert paths: label PGD (the paper) or TRADES' KL attack",
                             ("pgd", "kl"))
    eps: Optional[float] = opt(None, "radius in pixel units: L-inf (default: 8/255), L2 (give one: 0.5)", ge=0,
                               group="attack (training, the test report, --eval, --lipschitz)")
    alpha: Optional[float] = opt(None, "PGD step size, e.g. 2/255 (default eps/4)", gt=0)
    norm: str = opt("linf", "threat model", NORMS)
    eval_suite: str = opt("full", "pgd; autoattack: APGD-CE, APGD-T, FAB-T, Square; full: PGD, those, soft-router "
                                  "PGD and the MoE analyses (section 5)", EVAL_SUITES,
                          group="test report (training, --method dual, --eval)")
    eval_steps: int = opt(20, "PGD steps of the test evaluation", ge=1)
    eval_restarts: int = opt(1, "PGD restarts of the test evaluation", ge=1)
    apgd_steps: int = opt(100, "APGD-CE, APGD-T and FAB-T iterations (AutoAttack: 100)", ge=1)
    apgd_targets: Optional[int] = opt(None, "APGD-T/FAB-T target classes (default 9, or classes-1)", ge=1)
    square_queries: int = opt(5000, "Square attack queries per example (AutoAttack: 5000)", ge=1)
    device: str = opt("auto", "auto: cuda when available", ("auto", "cpu", "cuda"), group="run")
    precision: str = opt("auto", "training's; auto: bf16 on CUDA, float32 on CPU (reports: float32)", PRECISIONS)
    compile: bool = opt(False, "torch.compile the model (compile_model)")
    sync_bn: bool = opt(False, "torchrun on CUDA: torch's SyncBatchNorm outside the experts")
    out: str = opt("runs/default", "output folder (default runs/<dataset>-<arch>-<method>)")

    def __post_init__(self):
        if self.eps is None and self.norm == "linf":  # the L-inf default; an L2 radius has no default
            self.eps = 8 / 255

    def sweep_values(self) -> list[float]:
        try:
            values = [float(v) for v in self.dual_sweep.split(",") if v.strip()]
        except ValueError:
            values = []
        check(values and all(0 <= v <= 1 for v in values), f"--dual-sweep {self.dual_sweep!r} must be a comma list "
                                                           "of numbers in [0, 1]")
        return values

    def validate(self) -> "Config":
        """Every setting against its type and allowed values (inf and nan pass no bound), then those that depend on
        each other. -> self"""
        for f in dataclasses.fields(self):
            v, m, flag = getattr(self, f.name), f.metadata, "--" + f.name.replace("_", "-")
            kind = f.type.strip("]").removeprefix("Optional[")
            if v is None:
                check(f.type.startswith("Optional"), f"{flag} needs a value ({kind})")
                continue
            check(isinstance(v, {"float": (int, float), "int": int, "str": str, "bool": bool}[kind]) and
                  (kind == "bool") == isinstance(v, bool), f"{flag} {v!r} is not a {kind}")
            check(not isinstance(v, float) or math.isfinite(v), f"{flag} {v} is not a finite number")
            check(v in (m["choices"] or [v]), f"unknown {flag} {v!r}; allowed: {', '.join(m['choices'] or ())}")
            for (sign, op), b in zip(((">=", operator.ge), (">", operator.gt), ("<=", operator.le), ("<", operator.lt)),
                                     m["bounds"]):
                check(b is None or op(v, b), f"{flag} {v} not allowed; need {flag[2:]} {sign} {b}")
        check(self.eps is not None, f"--norm {self.norm} needs an explicit --eps (an L2 radius, e.g. 0.5)")
        check(self.norm != "linf" or self.eps <= 1, f"--eps {self.eps:g} not allowed under linf: images are in [0, 1]")
        size = self.image_size  # 16: layer4 still sees 2x2 maps; 8: the ViT's 8x8 grid
        check(size is None or (16 <= size <= 256 and size % 8 == 0), f"--image-size {size} not allowed; need a "
                                                                     "multiple of 8 from 16 to 256")
        check(self.top_k <= self.experts, f"--top-k {self.top_k} not allowed with --experts {self.experts}; need k<=E")
        self.sweep_values()
        check(self.method not in ("advmoe", "rt-er", "jtdmoe") or self.arch != "resnet18",
              f"--method {self.method} needs an MoE (--arch moe-resnet18 or moe-vit), not resnet18")
        check(self.method != "rt-er" or self.experts >= 2,
              f"--method rt-er needs a runner-up: --experts {self.experts} must be >= 2")
        check(bool(moe_block_set(self.moe_blocks)) or self.arch != "moe-resnet18",
              f"--moe-blocks {self.moe_blocks!r} makes no MoE layer; name blocks (layer4.1) or use --arch resnet18")
        return self

def method_config(cfg: Config) -> MethodConfig:
    return MethodConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(MethodConfig)})

def eval_config(cfg: Config) -> EvalConfig:
    return EvalConfig(cfg.eval_suite, cfg.eps, cfg.alpha, cfg.norm, cfg.eval_steps, cfg.eval_restarts, cfg.apgd_steps,
                      cfg.apgd_targets, cfg.square_queries)

# ==== 8. Setup: the device chosen in one place, torchrun, files ===================================================
@dataclass
class Runtime:
    """Device, autocast dtype and memory format: chosen once here, used everywhere."""
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # bf16 autocast on CUDA, None (float32) on CPU unless --precision bf16
    channels_last: bool  # NHWC activations on CUDA (tensor cores); a CPU runs NCHW in every precision

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.device.type == "cuda":  # autotune each convolution shape once: eval passes (attacks) are static; the
            torch.backends.cudnn.benchmark = True  # sparse training dispatch brings at most batch-size row counts
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

def make_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """auto: CUDA when present, with bf16 autocast, channels_last and TF32; a CPU in float32 (or bf16)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    check(device != "cuda" or torch.cuda.is_available(), "--device cuda asked for, but torch sees no CUDA GPU")
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return Runtime(dev, amp_dtype(dev, precision), dev.type == "cuda")

def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)

# torchrun --nproc_per_node=N starts N processes (ranks); each trains on its rows of every global batch and torch's
# DistributedDataParallel averages the gradients. DDP's unit is one forward and one backward, while a robust step
# makes many forwards (attacks, clean and adversarial passes, expert paths), so DDP wraps a whole step's loss
# (StepLoss); find_unused_parameters, since an expert idle on a rank takes no part in its backward. BatchNorm
# statistics and the balance loss are per rank, as Switch computes them. Rank 0 validates, writes and logs; the test
# evaluation is split over the ranks.
def world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)

def is_main() -> bool:
    return world()[0] == 0

def log(msg: str) -> None:
    print(msg, flush=True) if is_main() else None  # under torchrun rank 0 speaks for all

def start_distributed(device: str) -> None:
    """Under torchrun: join the process group, NCCL on GPUs (one each) or gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None
        dist.init_process_group("nccl" if cuda else "gloo")

def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """t reduced over the ranks, a sum by default (NCCL reduces CUDA tensors only)."""
    if world()[1] == 1:
        return t
    r = t.detach().to("cuda" if dist.get_backend() == "nccl" else "cpu").clone()
    dist.all_reduce(r, op or dist.ReduceOp.SUM)
    return r.to(t.device)

def barrier() -> None:
    dist.barrier() if world()[1] > 1 else None

def shard_rows(n: int) -> tuple[int, int]:
    rank, size = world()
    return rank * n // size, (rank + 1) * n // size

class StepLoss(nn.Module):
    """One optimiser step's loss as one forward, for DDP: loss_fn(model, x, y, mc) -> (loss, logits)."""
    def __init__(self, model: nn.Module, loss_fn: Callable, mc: MethodConfig):
        super().__init__()
        self.model, self.loss_fn, self.mc = model, loss_fn, mc

    def forward(self, x, y):
        return self.loss_fn(self.model, x, y, self.mc)

def data_parallel_step(runtime: Runtime) -> Callable:
    """A `step` for the methods, loss_step's signature, that computes each loss inside DDP: a wrapper per model, loss
    and optimiser, made at first use inside loss_step, so that it holds the parameters that step trains only."""
    wrapped = {}

    def step(model, opt, loss_fn, x, y, mc):
        def in_ddp(m, xb, yb, c):
            if (key := (id(model), id(opt), loss_fn)) not in wrapped:
                wrapped[key] = nn.parallel.DistributedDataParallel(StepLoss(model, loss_fn, mc), [
                    runtime.device.index] if runtime.device.type == "cuda" else None, find_unused_parameters=True)
            return wrapped[key](xb, yb)
        return loss_step(model, opt, in_ddp, x, y, mc)
    return step

def sync_batchnorm(m: nn.Module) -> nn.Module:
    """--sync-bn: torch's SyncBatchNorm for every BatchNorm outside the MoE layers (an expert idle on one rank would
    leave the others waiting in its collective)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(m)
    for name, child in m.named_children():
        setattr(m, name, child if is_moe(child) else sync_batchnorm(child))
    return m

def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file. Rank 0 alone writes."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
    try:
        if is_main():
            write(str(tmp))
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def write_json(path: Path, obj) -> None:  # JSON has no NaN or Infinity: null instead
    clean = lambda o: {k: clean(v) for k, v in o.items()} if isinstance(o, dict) else [clean(v) for v in o] if \
        isinstance(o, (list, tuple)) else None if isinstance(o, float) and not math.isfinite(o) else o
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(clean(obj), indent=1, allow_nan=False)))

def read_json(path: Path, records: bool = False) -> dict:
    """A JSON object from `path` ({} or, for a record file, {"records": []} when there is no file)."""
    if not Path(path).exists():
        return {"records": []} if records else {}
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}); move it away or use another --out") from None
    check(isinstance(obj, dict) and (not records or isinstance(obj.get("records"), list)),
          f"{path} does not hold a JSON object{' with a records list' if records else ''}; move it away")
    return obj

def check_out(folder: str, flag: str = "--out", files: tuple = ()) -> Path:
    """Prove, without writing, that `folder` is or can be made a writable folder where no file a run will write
    (`files`) is blocked by a folder of that name."""
    p = Path(folder)
    check(not p.is_file(), f"{flag} {folder} is a file; give a folder")
    base = next(a for a in (p, *p.parents) if a.exists())
    check(base.is_dir() and os.access(base, os.W_OK | os.X_OK),
          f"{flag} {folder} is not a writable folder ({base} is {'read-only' if base.is_dir() else 'not a folder'})")
    for f in files:
        check(not (p / f).is_dir(), f"{flag} {folder}: {p / f} is a folder where a file must go; move it away")
    return p

# ==== 9. Data: uint8 tensors in memory ==============================================================================
# Every loader returns a `Dataset` of uint8 images (N, 3, H, W) and int64 labels (N,); `batches` (section 0) casts
# them to float [0, 1] on the device and augments them there.
@dataclass
class Dataset:
    train_x: torch.Tensor  # (N, 3, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (M, 3, H, W) uint8
    test_y: torch.Tensor  # (M,) int64
    num_classes: int
    name: str

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

def make_synthetic(n_train: int = 6000, n_test: int = 1000, seed: int = 0, size: int = 32, num_classes: int = 10,
                   strong: float = 0.2, weak: float = 4 / 255, noise: float = 0.02) -> Dataset:
    """A deterministic 10-class 32x32 image set, no download, on which standard training is accurate but not robust
    and adversarial training robust, for the reason Ilyas et al. (2019) give: data holds robust and non-robust
    features, and standard training uses both. Each image is a smooth colour layout (4x4x3 cells, upsampled) of
      * a strong layout (cell contrast up to `strong`) shared by classes c and c + 5: a robust feature naming the pair;
      * a weak layout of the class (contrast up to `weak` = 4/255): it alone tells the pair apart, and an L-inf
        attack of 8/255 can turn it into the other class's;
    plus smooth per-image noise (`noise` per cell) and 1/255 pixel noise. Within a pair, class c is twice as common
    as c + C/2. A robust model can trust only the pair and then names its common class, whatever the attack does:
    clean and robust accuracy near 2/3. Layouts are fixed (seed 1234); `seed` draws the examples."""
    check(num_classes % 2 == 0, f"synthetic needs an even number of classes, got {num_classes}")
    base, pairs = torch.Generator().manual_seed(1234), num_classes // 2
    strong_layouts = strong * (torch.rand(pairs, 3, 4, 4, generator=base) * 2 - 1)  # (C/2, 3, 4, 4)
    weak_layouts = weak * (torch.randint(0, 2, (num_classes, 3, 4, 4), generator=base).float() * 2 - 1)  # (C, 3, 4, 4)
    cells = 0.5 + strong_layouts[torch.arange(num_classes) % pairs] + weak_layouts  # (C, 3, 4, 4)

    def draw(n: int, g: torch.Generator):
        y = torch.randint(0, pairs, (n,), generator=g) + pairs * (torch.rand(n, generator=g) < 1 / 3).long()
        low = cells[y] + noise * torch.randn(n, 3, 4, 4, generator=g)  # (n, 3, 4, 4)
        x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        x = x + torch.randn(n, 3, size, size, generator=g) / 255
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y
    tx, ty = draw(n_train, torch.Generator().manual_seed(seed * 2 + 1))
    return Dataset(tx, ty, *draw(n_test, torch.Generator().manual_seed(seed * 2 + 2)), num_classes, "synthetic")

class CifarUnpickler(pickle.Unpickler):
    """Reads what CIFAR's batches hold (dicts, lists, strings, bytes, numpy arrays) and nothing else: a pickle may
    name any callable, and plain pickle.load calls it."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}  # (bytes, in protocol 2)

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which CIFAR's format never holds")
        return super().find_class(module, name)

def load_cifar(name: str, data_dir: str) -> Dataset:
    """CIFAR-10/100 from the python-pickle layout under `data_dir`, downloaded there through torchvision when missing
    (offline, the error says where to put the archive)."""
    root, classes = Path(data_dir), 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if not folder.is_dir():
        made = next(a for a in (root, *root.parents) if a.exists())  # a failed download leaves no folder behind
        try:
            from torchvision import datasets  # only needed for the download
            (datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100)(str(root), train=True, download=True)
        except Exception as e:  # offline, or no write access
            shutil.rmtree(made / root.relative_to(made).parts[0], ignore_errors=True) if made != root else None
            raise UserError(f"{name} not found in {root}/ and the download failed ({type(e).__name__}); put "
                            f"{name.replace('cifar', 'cifar-')}-python.tar.gz from https://www.cs.toronto.edu/~kriz/ "
                            f"extracted into {root}/") from None

    def read(fn):
        bad = lambda why: UserError(f"{name}: {folder / fn} is not a CIFAR batch ({why}); re-extract the archive")
        try:
            with open(folder / fn, "rb") as f:
                d = CifarUnpickler(f, encoding="latin1").load()
            x, y = np.asarray(d["data"]), np.asarray(d["labels" if "labels" in d else "fine_labels"])
        except Exception as e:  # the restricted unpickler's refusal, or not CIFAR's dict of data and labels
            raise bad(e if isinstance(e, pickle.UnpicklingError) else f"expected a dict with 'data' and 'labels', "
                      f"{type(e).__name__}") from None
        if x.dtype != np.uint8 or y.dtype.kind not in "iu":  # a cast would turn floats in [0, 1] into black images
            raise bad(f"pixels are {x.dtype}, labels {y.dtype}; expected uint8 values 0..255 and whole numbers")
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (len(x),):
            raise bad(f"data {tuple(x.shape)}, labels {tuple(y.shape)}; expected (N, 3072) and (N,)")
        return torch.from_numpy(x.reshape(-1, 3, 32, 32)), torch.from_numpy(y.astype(np.int64))
    parts = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]) if name == "cifar10" else (["train"], ["test"])
    (tx, ty), (vx, vy) = [map(torch.cat, zip(*map(read, files))) for files in parts]
    return Dataset(tx, ty, vx, vy, classes, name)

def read_folder(root: Path, size: int, classes: Optional[list] = None):
    """The images of root/<class>/ (torchvision's ImageFolder) as RGB, the shorter side resized to `size` and
    centre-cropped, labelled by the names in `classes` (default: root's own). -> (x (N, 3, size, size) uint8, y,
    classes)"""
    from torchvision import datasets, transforms as T  # image folders only
    load = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    try:
        ds = datasets.ImageFolder(str(root), allow_empty=classes is not None)
        classes = classes or ds.classes
        check(ds.samples and set(ds.classes) <= set(classes) and len(classes) >= 2, f"imagefolder: {root}/ needs "
              "images in at least 2 class folders, each a class of train/")
        x = torch.stack([load(datasets.folder.pil_loader(p)) for p, _ in ds.samples])
    except (OSError, ValueError, RuntimeError) as e:  # no class folder, an unreadable image
        raise UserError(f"imagefolder: {root}/: {str(e).splitlines()[0][:200]}") from None
    return x, torch.tensor([classes.index(ds.classes[t]) for _, t in ds.samples]), classes

def load_dataset(name: str, data_dir: str = "data", image_size: Optional[int] = None, seed: int = 0,
                 train_limit: Optional[int] = None, test_limit: Optional[int] = None) -> Dataset:
    """Load by name: synthetic (drawn with `seed`), cifar10, cifar100, or imagefolder (any `data_dir` with train/
    and test/ (or val/) holding one sub-folder per class); `train_limit`/`test_limit` keep the first N examples."""
    check(name in DATASETS, f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    root = Path(data_dir)
    if name == "synthetic":  # generated in memory: keep the request to what fits
        for flag, v in (("--train-limit", train_limit), ("--test-limit", test_limit)):
            check(v is None or v <= 100_000, f"{flag} {v} too large for synthetic data; allowed: 1..100000")
        data = make_synthetic(train_limit or 6000, test_limit or 1000, seed=seed, size=image_size or 32)
    elif name.startswith("cifar"):
        check(image_size in (None, 32), f"{name} images are 32x32; --image-size {image_size} not allowed")
        data = load_cifar(name, data_dir)
    else:
        test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
        check((root / "train").is_dir() and test_dir is not None,
              f"imagefolder: --data-dir {data_dir}/ must hold train/ and test/ (or val/) with a sub-folder per class")
        tx, ty, classes = read_folder(root / "train", image_size or 32)
        data = Dataset(tx, ty, *read_folder(test_dir, image_size or 32, classes)[:2], len(classes), name)
    data.train_x, data.train_y = data.train_x[:train_limit], data.train_y[:train_limit]  # [:None] keeps all
    data.test_x, data.test_y = data.test_x[:test_limit], data.test_y[:test_limit]
    return check_dataset(data)

def check_dataset(d: Dataset) -> Dataset:
    """A Dataset is what it claims: uint8 images (N, 3, S, S) of one size, int64 labels 0..classes-1, a train and a
    test split that are not empty. Every loader's result passes here before any training."""
    what = f"data set {d.name}"
    check(isinstance(d.num_classes, int) and d.num_classes >= 2, f"{what}: {d.num_classes} classes; need at least 2")
    for split, x, y in (("train", d.train_x, d.train_y), ("test", d.test_x, d.test_y)):
        check(torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3 and len(x) > 0 and
              x.shape[2] == x.shape[3] == d.train_x.shape[-1], f"{what}: {split} images are {getattr(x, 'dtype', x)} "
              f"{tuple(getattr(x, 'shape', ()))}; expected uint8 pixels (N > 0, 3, S, S), one S for both splits")
        check(torch.is_tensor(y) and y.dtype == torch.int64 and y.shape == (len(x),),
              f"{what}: {split} labels must be int64 of shape ({len(x)},)")
        bad = y[(y < 0) | (y >= d.num_classes)]
        check(len(bad) == 0, f"{what}: {split} label {int(bad[0]) if len(bad) else 0} outside 0..{d.num_classes - 1}")
    return d

# ==== 10. The training loop: checkpoints, validation, resume, the dual model =======================================
CHECKPOINT_VERSION = 1
RUN_FILES = ("last.pt", "best.pt", "metrics.json")  # a folder holding any of these holds a run
RECORD_FILES = ("eval.json", "lipschitz.json")  # what --eval and --lipschitz add to a folder
EXPLODED = 100.0  # a loss or weight this many times the run's first (at least 1) stops training like a non-finite one

def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda p: torch.save(state, p))

def load_checkpoint(path: str) -> dict:
    """A checkpoint written by this file, its parts checked: a one-line error for anything else."""
    p, finite = Path(path), False
    check(p.is_file(), f"checkpoint {path!r} is {'a folder' if p.is_dir() else 'not there'}; give a checkpoint file "
                       "such as runs/demo/at/best.pt")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
        weights = state["model"] if "model" in state else state["method"]["model"]
        finite = all(t.isfinite().all() for t in weights.values() if t.is_floating_point())
        problem = None if state["version"] == CHECKPOINT_VERSION and all(
            type(state[k]) is int and state[k] >= 0 for k in ("num_classes", "image_size", "epoch")) else "a bad part"
        config_from_dict(state["config"]).validate()
    except UserError as e:
        problem = f"an invalid config: {e}"
    except Exception as e:  # not a checkpoint at all, or a part missing or of the wrong kind
        problem = f"{type(e).__name__} {str(e)[:80]}"
    check(problem is None, f"checkpoint {path!r} is corrupt or not a moe-robust checkpoint (version "
                           f"{CHECKPOINT_VERSION}): {problem}")
    check(finite, f"checkpoint {path!r} has non-finite weights: the run that wrote it diverged")
    return state

def check_fits(state: dict, saved: Config, data: Dataset, what: str) -> None:
    """A checkpoint's model meets the data it is evaluated on: its classes, image size and normalisation."""
    check(saved.dataset == data.name, f"{what} was trained on {saved.dataset}, not on the {data.name} data it would be "
                                      "evaluated on (each data set has its own normalisation)")
    check((state["num_classes"], state["image_size"]) == (data.num_classes, data.image_size),
          f"{what} takes {state['num_classes']} classes of {state['image_size']} px images; the {data.name} data has "
          f"{data.num_classes} classes of {data.image_size} px")

def config_from_dict(d: dict) -> Config:
    """A saved config; fields it predates take the value that reproduces it (the papers' router)."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{"router": "linear", **{k: v for k, v in d.items() if k in known}})

def model_config(cfg: Config, num_classes: int, image_size: int) -> ModelConfig:
    """A run's ModelConfig: the fields of the same name in its Config, the data's classes and size."""
    shared = {f.name for f in dataclasses.fields(ModelConfig)} - {"num_classes", "image_size", "norm"}
    return ModelConfig(num_classes=num_classes, image_size=image_size, norm=cfg.dataset if cfg.dataset in NORM_STATS
                       else "imagenet", **{k: getattr(cfg, k) for k in shared if hasattr(cfg, k)})

def build_run_model(cfg: Config, num_classes: int, image_size: int) -> nn.Module:
    """The model a run trains and evaluates: one network, or for jtdmoe a DualModel of two."""
    mc = model_config(cfg, num_classes, image_size)
    return DualModel(build_model(mc), build_model(mc), cfg.dual_a, cfg.dual_mix) if cfg.method == "jtdmoe" \
        else build_model(mc)

def load_model(path: str, runtime: Optional[Runtime] = None) -> tuple[nn.Module, Config, dict]:
    """The evaluated model of a checkpoint (best.pt or last.pt), in eval mode: (model, config, state)."""
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    model = build_run_model(cfg, state["num_classes"], state["image_size"])
    try:
        model.load_state_dict(state["model"] if "model" in state else state["method"]["model"])
    except Exception as e:
        raise UserError(f"checkpoint {path!r} does not fit its own config ({type(e).__name__})") from None
    return (runtime or make_runtime("auto")).prepare(model).eval(), cfg, state

def data_record(data: Dataset, data_dir: str, **sizes) -> dict:
    """Which data a record's numbers come from."""
    return {"dataset": data.name, "data_dir": None if data.name == "synthetic" else data_dir, **sizes}

def run_data(cfg: Config, data: Optional[Dataset] = None) -> Dataset:
    """The run's data, loaded (rank 0 first: a download happens once) or checked, and the settings that depend on it
    checked."""
    barrier() if not is_main() else None
    data = check_dataset(data) if data is not None else load_dataset(
        cfg.dataset, cfg.data_dir, cfg.image_size, train_limit=cfg.train_limit, test_limit=cfg.test_limit)
    barrier() if is_main() else None
    check(cfg.apgd_targets is None or cfg.eval_suite == "pgd" or 4 <= data.num_classes > cfg.apgd_targets,
          f"--apgd-targets {cfg.apgd_targets} not allowed: {data.name} has {data.num_classes} classes; APGD-T needs "
          "4 or more, with at most classes - 1 targets")
    diameter = math.sqrt(3) * data.image_size  # the L2 distance between a black and a white image
    check(cfg.norm != "l2" or cfg.eps <= diameter, f"--eps {cfg.eps:g} not allowed under l2: no two images are "
                                                   f"further apart than {diameter:.1f}")
    return data

class Trainer:
    """A method's model, optimisers and cosine schedules; `step` trains on one batch with the method's step (section
    4) and returns 0-dim tensors to log, left on the device. Optimisers: one over every parameter; advmoe [experts,
    routers] (--router-lr, --router-schedule); jtdmoe [f_R, f_S]. `take`: how one optimiser step is taken (loss_step,
    or under torchrun data_parallel_step's)."""

    def __init__(self, model: nn.Module, cfg: Config, total_steps: int, take: Callable = loss_step):
        self.model, self.cfg, self.mc, self.take = model, cfg, method_config(cfg), take
        new = lambda params, lr=None: sgd(params, cfg.lr if lr is None else lr, cfg.momentum, cfg.weight_decay)
        if cfg.method == "advmoe":
            router = router_parameters(model)
            check(len(router) > 0, "advmoe needs MoE layers (--arch moe-resnet18 or moe-vit)")
            self.opts = [new([p for p in model.parameters() if all(p is not q for q in router)]),
                         new(router, cfg.router_lr)]
        else:
            self.opts = [new(model.robust.parameters()), new(model.standard.parameters())] \
                if cfg.method == "jtdmoe" else [new(model.parameters())]
        fixed = cfg.method == "advmoe" and cfg.router_schedule != "cosine"
        self.scheds = [cosine(o, total_steps) for o in (self.opts[:1] if fixed else self.opts)]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        model, mc, opts, extra, method = self.model, self.mc, self.opts, {}, self.cfg.method
        if method == "advmoe":
            loss, logits, extra["router_loss"] = advmoe_step(model, opts[1], opts[0], x, y, mc, self.take)
        elif method == "jtdmoe":
            loss, logits, extra["robust_loss"] = jtdmoe_step(model, opts[0], opts[1], x, y, mc, self.take)
        else:
            loss_fn = {"standard": standard_loss, "at": at_loss, "trades": trades_loss, "rt-er": rter_loss}[method]
            loss, logits = self.take(model, opts[0], loss_fn, x, y, mc)
        for s in self.scheds:
            s.step()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in extra.items()},
                "acc": (logits.argmax(1) == y).float().mean()}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opts": [o.state_dict() for o in self.opts],
                "scheds": [s.state_dict() for s in self.scheds]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint from any device: each optimiser keeps this device's kernel choice (fused/foreach)."""
        self.model.load_state_dict(state["model"])
        for o, st in zip(self.opts, state["opts"]):
            here = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in o.param_groups]
            o.load_state_dict(st)
            for g, h in zip(o.param_groups, here):
                g.update(h)
        for s, st in zip(self.scheds, state["scheds"]):
            s.load_state_dict(st)

def diverged(cfg: Config, epoch: int, where: str, what: str) -> UserError:
    kept = f"epoch {epoch} is kept in {Path(cfg.out) / 'last.pt'}" if epoch > 0 else "nothing was saved"
    return UserError(f"training diverged in epoch {epoch + 1}, {where}: {what} (lr {cfg.lr}); lower --lr; {kept}")

def largest_weight(model: nn.Module) -> float:
    return torch.stack([p.detach().abs().max().float() for p in model.parameters()]).max().item()

def check_intact(model: nn.Module, clean_loss: float, cfg: Config, epoch: int, start_loss: float,
                 start_weight: float) -> None:
    """After an epoch, on every rank: a model whose weights or clean validation loss are non-finite or EXPLODED times
    the run's start (its first step loss, its largest initial weight; at least 1) is destroyed, however normal its
    last step loss looked (one huge step), and stops the run as divergence does, before anything of it is saved."""
    for name, v, start in (("largest weight", largest_weight(model), start_weight),
                           ("clean validation loss", clean_loss, start_loss)):
        if not math.isfinite(v) or v > EXPLODED * max(start, 1.0):
            raise diverged(cfg, epoch, "after its last step", f"the {name} is {v:.3g} (the run started at {start:.3g})")

def train_epoch(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, cfg: Config, device: torch.device, epoch: int,
                start_loss: Optional[float]) -> dict:
    """One pass over (x, y); every rank draws the global batch's order and augmentation and trains on its rows. Logs
    are summed on the device and read once; progress every 30 s. A non-finite loss, or one EXPLODED times the run's
    first (start_loss; None: this is the run's first epoch) stops the run before anything of this epoch is saved."""
    t0, shown, sums, n, first, steps = time.time(), time.time(), {}, 0, None, math.ceil(len(x) / cfg.batch_size)
    bad, bad_loss = torch.tensor(1 << 40, device=device), torch.tensor(0.0, device=device)  # first bad step, its loss
    for i, (xb, yb) in enumerate(batches(x, y, cfg.batch_size, device, shuffle=True, train_augment=cfg.augment)):
        a, b = shard_rows(len(xb))
        logs = trainer.step(xb[a:b], yb[a:b])
        if start_loss is None and i == 0:
            first = all_reduce(logs["loss"].float() * (b - a)) / len(xb)
        limit = EXPLODED * (first.clamp(min=1.0) if start_loss is None else max(start_loss, 1.0))
        wrong = (~torch.isfinite(torch.stack([v.float() for v in logs.values()])).all() | (logs["loss"] > limit)) & (
            bad == 1 << 40)
        bad, bad_loss = torch.where(wrong, i + 1, bad), torch.where(wrong, logs["loss"].float(), bad_loss)
        for k, v in logs.items():  # summed on the device: no host sync per step
            sums[k] = sums.get(k, 0.0) + v.double() * (b - a)
        n += len(xb)
        hours = (time.time() - t0) * steps * cfg.epochs / 3600 if i == 0 else 0  # the run, from its first step
        if epoch == 0 and device.type == "cpu" and hours > 1:
            log(f"note: on this CPU the run takes about {hours:.1f} h ({cfg.epochs} epochs of {steps} steps); a GPU, "
                "--width 0.125, --train-limit or fewer --epochs make it shorter")
        if time.time() - shown > 30 and i + 1 < steps:
            shown, rate = time.time(), n / (time.time() - t0)
            log(f"  epoch {epoch + 1} step {i + 1}/{steps} | {rate:.1f} img/s | epoch ends in "
                f"{(len(x) - n) / rate / 60:.1f} min, the run in {(len(x) * (cfg.epochs - epoch) - n) / rate / 60:.1f}")
    sums, bad = dict(zip(sums, all_reduce(torch.stack(list(sums.values()))))), int(all_reduce(bad, dist.ReduceOp.MIN))
    start_loss = first.item() if start_loss is None else start_loss
    if bad < 1 << 40:  # the first bad step of any rank
        loss = all_reduce(bad_loss, dist.ReduceOp.MAX).item()
        raise diverged(cfg, epoch, f"step {bad}/{steps}", f"the loss exploded to {loss:.3g} (the run started at "
                       f"{start_loss:.3g})" if math.isfinite(loss) else "a value is not finite")
    return {**{f"train_{k}": v.item() / n for k, v in sums.items()}, "images": n, "seconds": time.time() - t0,
            "start_loss": start_loss}

def check_run_folder(cfg: Config, resume: bool, overwrite: bool) -> Optional[dict]:
    """What --out holds agrees with resume/overwrite; for resume, its last.pt (checked). Reads, never writes."""
    out, last = check_out(cfg.out, files=RUN_FILES + RECORD_FILES), Path(cfg.out) / "last.pt"
    check(not (resume and overwrite), "--resume and --overwrite contradict each other; give one")
    if not resume:
        found = [f for f in RUN_FILES if (out / f).exists()]
        check(overwrite or not found, f"--out {cfg.out} already holds a run ({', '.join(found)}); pass --resume to "
                                      "continue it, --overwrite to start afresh, or choose another --out")
        return None
    check(last.is_file(), f"nothing to resume: {last} does not exist (an interrupted first epoch saves nothing)")
    state = load_checkpoint(str(last))
    hist, best = state.get("history"), state.get("best")
    check("method" in state and isinstance(hist, list) and isinstance(best, dict) and [
        r.get("epoch") for r in hist if isinstance(r, dict)] == list(range(1, state["epoch"] + 2)) and
          type(best.get("epoch")) is int and isinstance(best.get("score"), (int, float)),
          f"{last} is not a training checkpoint with an intact history (epochs, best epoch); cannot resume it")
    return state

def start_writing(out: Path, overwrite: bool, files: tuple) -> None:
    """The first write of a run, after every check (on every rank): make --out, clear dead temporary files and, with
    --overwrite, remove the earlier run's files."""
    barrier()
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        for p in [*out.glob(".*.tmp*"), *[out / f for f in files if overwrite and (out / f).exists()]]:
            p.unlink()

def train(cfg: Config, resume: bool = False, overwrite: bool = False, data: Optional[Dataset] = None) -> dict:
    """Train with cfg.method, validate each epoch, keep the best checkpoint (validation robust accuracy; clean for
    standard), test it. In cfg.out: last.pt (everything, every epoch), best.pt, metrics.json (settings, data,
    history, the test report). resume=True continues from last.pt and repeats, in one process, what the
    uninterrupted run would have done. Nothing is written before every input is checked."""
    check(cfg.method != "dual", "method 'dual' trains nothing itself: call run_dual")
    out, state = Path(cfg.out), check_run_folder(cfg, resume, overwrite)
    files, previous = RUN_FILES + RECORD_FILES, read_json(out / "metrics.json") if state else {}
    if state is not None:
        cfg = dataclasses.replace(config_from_dict(state["config"]), out=cfg.out, device=cfg.device)
        if state["epoch"] + 1 >= cfg.epochs and "test" in previous:
            start_writing(out, False, files)  # clears what a killed write left
            log(f"{out} is finished and tested (epoch {state['epoch'] + 1}/{cfg.epochs}); nothing to do")
            return previous
    rt, ranks = make_runtime(cfg.validate().device, cfg.precision), world()[1]
    check(not cfg.sync_bn or (ranks > 1 and rt.device.type == "cuda"), "--sync-bn shares BatchNorm statistics between "
          "torchrun's processes on CUDA (torch's SyncBatchNorm); on a CPU or in one process leave it out")
    data = run_data(cfg, data)
    n_val = cfg.val_size or min(1000, max(1, len(data.train_x) // 10))
    check(n_val < len(data.train_x), f"--val-size {n_val} leaves no training data of {len(data.train_x)} examples "
                                     f"(--train-limit {cfg.train_limit}); need at least one more")
    perm = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(cfg.seed))  # a fixed held-out
    tx, ty, vx, vy = (t.to(rt.device) for t in (data.train_x[perm[n_val:]], data.train_y[perm[n_val:]],  # subset
                                                  data.train_x[perm[:n_val]], data.train_y[perm[:n_val]]))  # selects
    last = len(tx) % cfg.batch_size
    check(cfg.batch_size >= ranks and (last == 0 or last >= ranks), f"a batch of {last or cfg.batch_size} examples "
          f"cannot be shared by {ranks} processes; change --batch-size or --train-limit")
    seed_everything(cfg.seed)  # the initial weights
    shape = (data.num_classes, data.image_size)
    model = rt.prepare(build_run_model(cfg, *shape))
    model = sync_batchnorm(model) if cfg.sync_bn else model
    trainer = Trainer(model, cfg, cfg.epochs * math.ceil(len(tx) / cfg.batch_size),
                      data_parallel_step(rt) if ranks > 1 else loss_step)
    history, best, start, start_loss, start_weight = [], {"epoch": -1, "score": -1.0}, 0, None, largest_weight(model)
    if state is not None:
        try:
            trainer.load_state_dict(state["method"])
        except Exception as e:
            raise UserError(f"{out / 'last.pt'} does not fit its own config or data ({type(e).__name__})") from None
        history, best, start, start_loss = state["history"], state["best"], state["epoch"] + 1, state.get("start_loss")
        start_weight = state.get("start_weight") or largest_weight(model)
    start_writing(out, overwrite, files)  # every input is checked: from here on the run writes
    compile_model(model) if cfg.compile else None
    selection, params = "val_clean_acc" if cfg.method == "standard" else "val_robust_acc", count_params(model)
    metrics = {**previous, "config": dataclasses.asdict(cfg), "selection": selection, "params": params,
               "data": data_record(data, cfg.data_dir, train=len(tx), val=n_val, test=len(data.test_x)),
               "model": dataclasses.asdict(model_config(cfg, *shape))}
    log(f"{cfg.method} | {cfg.arch} on {cfg.dataset} ({len(tx)} train / {n_val} val / {len(data.test_x)} test) | "
        f"{params['total'] / 1e6:.2f}M params ({params['active'] / 1e6:.2f}M active) | {rt.device} | writes {out}"
        + (f" | resumed at epoch {start + 1}" if state is not None else ""))
    saved = {"version": CHECKPOINT_VERSION, "config": dataclasses.asdict(cfg), "num_classes": shape[0],
             "image_size": shape[1]}
    t_run = time.time()
    for epoch in range(start, cfg.epochs):
        seed_everything(cfg.seed * 100003 + epoch)
        reset_routing_stats(model)
        t0, row = time.time(), train_epoch(trainer, tx, ty, cfg, rt.device, epoch, start_loss)
        n, seconds, start_loss = row.pop("images"), row.pop("seconds"), row.pop("start_loss")
        for m in moe_layers(model):  # rows routed on every rank
            m.counts = all_reduce(m.counts)
        routing, collapsed = routing_health(model, expert_counts(model), f"the rows of epoch {epoch + 1}")
        attack = None if not is_main() else AttackConfig(cfg.eps, cfg.alpha, cfg.val_steps, 1, cfg.norm)
        val = evaluate(model, vx, vy, attack, rt.device)  # rank 0 validates (in float32, like every report)
        check_intact(model, val["clean_loss"], cfg, epoch, start_loss, start_weight)
        if not is_main():  # rank 0 saves and logs
            continue
        row = {"epoch": epoch + 1, **row, "val_clean_acc": val["clean_acc"], "val_robust_acc": val["robust_acc"],
               "lr": trainer.opts[0].param_groups[0]["lr"], "time_s": round(time.time() - t0, 2),
               "images_per_s": round(n / seconds, 1), "routing": routing}
        history.append(row)
        if row[selection] >= best["score"]:  # a tie goes to the later, longer-trained epoch
            best = {"epoch": epoch + 1, "score": row[selection]}
            save_checkpoint(out / "best.pt", {**saved, "epoch": epoch, "model": model.state_dict()})
        save_checkpoint(out / "last.pt", {**saved, "epoch": epoch, "method": trainer.state_dict(), "history": history,
                                          "best": best, "start_loss": start_loss, "start_weight": start_weight})
        write_json(out / "metrics.json", {**metrics, "history": history, "best_epoch": best["epoch"]})
        worst = max(routing, key=lambda r: r["max_share"], default=None)  # every layer's figures: metrics.json
        log(f"epoch {epoch + 1:3d}/{cfg.epochs} | loss {row['train_loss']:.3f} acc {row['train_acc']:.3f} | val clean "
            f"{row['val_clean_acc']:.3f} robust {row['val_robust_acc']:.3f} | {row['time_s']:.1f}s {n / seconds:.0f} "
            "img/s" + (f" | routing: max share {worst['max_share']:.2f} ({worst['layer']}), min entropy "
                       f"{min(r['entropy'] for r in routing):.2f}" if worst else "")
            + f" | run ends in {(time.time() - t_run) / (epoch + 1 - start) * (cfg.epochs - epoch - 1) / 60:.1f} min"
            + "".join(f"\nWARNING: {w}" for w in collapsed))
    barrier()  # rank 0 has written best.pt
    best_state = load_checkpoint(str(out / "best.pt"))  # the final test: the best validation epoch
    model.load_state_dict(best_state["model"])
    metrics.update(history=history, best_epoch=best_state["epoch"] + 1,
                   test={**test_report(model, data, cfg, rt.device), "epoch": best_state["epoch"] + 1})
    write_json(out / "metrics.json", metrics)
    log(format_report(metrics["test"], f"test (best val epoch {metrics['best_epoch']})") + f"\n-> {out}")
    return metrics

def test_report(model: nn.Module, data: Dataset, cfg: Config, device: torch.device, analysis: bool = True) -> dict:
    """evaluate_full on the test set; under torchrun each rank takes its slice and the counts are added up."""
    a, b, ranks = *shard_rows(len(data.test_x)), world()[1]
    check(a < b, f"{len(data.test_x)} test images cannot be shared by {ranks} processes")

    def gather(sums: dict) -> dict:  # every rank's counts, added up
        parts = [None] * ranks
        dist.all_gather_object(parts, sums)
        return functools.reduce(add_up, parts, {})
    return evaluate_full(model, data.test_x[a:b], data.test_y[a:b], eval_config(cfg), device, analysis=analysis,
                         combine=gather if ranks > 1 else None, progress=log)

def run_dual(cfg: Config, overwrite: bool = False, data: Optional[Dataset] = None) -> dict:
    """--method dual: f_D = (1 - a) f_S + a f_R of the checkpoints --standard-ckpt and --robust-ckpt (each trained
    first, e.g. with --method standard and --method rt-er), evaluated for every a of --dual-sweep (SA, RA) and fully
    at a = --dual-a. metrics.json names each member's checkpoint and saved config."""
    out = check_out(cfg.validate().out, files=("metrics.json",) + RECORD_FILES)
    check(cfg.standard_ckpt and cfg.robust_ckpt, "--method dual combines two trained models: give --standard-ckpt "
                                                 "and --robust-ckpt (train them with --method standard and rt-er)")
    check(not (out / "last.pt").exists(), f"--out {cfg.out} holds a training run, not a dual run; choose another")
    check(not (out / "metrics.json").exists() or overwrite,
          f"--out {cfg.out} already holds a dual run; pass --overwrite to redo it, or choose another --out")
    rt, data, members, sizes = make_runtime(cfg.device), run_data(cfg, data), {}, set()
    for role, path in (("standard", cfg.standard_ckpt), ("robust", cfg.robust_ckpt)):
        model, saved, state = load_model(path, rt)
        check_fits(state, saved, data, f"--{role}-ckpt {path}")
        sizes |= {saved.experts} if saved.arch != "resnet18" else set()
        members[role] = (model, {"checkpoint": path, "epoch": state["epoch"] + 1, "config": dataclasses.asdict(saved)})
    check(len(sizes) <= 1 or cfg.eval_suite != "full", f"f_S and f_R have MoE layers of {sorted(sizes)} experts: the "
          "full suite's per-expert figures force expert i in every layer; use one --experts or --eval-suite autoattack")
    start_writing(out, overwrite, ("metrics.json",) + RECORD_FILES)
    seed_everything(cfg.seed)  # the attacks' random starts
    f_d = lambda a: DualModel(members["standard"][0], members["robust"][0], a, cfg.dual_mix)
    metrics = {"config": dataclasses.asdict(cfg), "data": data_record(data, cfg.data_dir, test=len(data.test_x)),
               "members": {r: m[1] for r, m in members.items()}, "dual_sweep": []}
    log(f"dual model sweep over a (f_D = (1 - a) f_S + a f_R) -> {out / 'metrics.json'}")
    for a in cfg.sweep_values():
        r = test_report(f_d(a), data, cfg, rt.device, analysis=False)
        metrics["dual_sweep"].append({"a": a, **{k: r[k] for k in ("clean_acc", "robust_acc", "robust_after")}})
        log(f"a={a:4.2f}  SA {r['clean_acc']:.3f}  RA {r['robust_acc']:.3f}")
    metrics["test"] = {**test_report(f_d(cfg.dual_a), data, cfg, rt.device), "a": cfg.dual_a}
    write_json(out / "metrics.json", metrics)
    log(format_report(metrics["test"], f"dual model at a={cfg.dual_a}"))
    return metrics

# ==== 11. Benchmark, demo and command line =========================================================================
BENCH_MODELS = {"resnet18": dict(arch="resnet18"), "moe-resnet18": dict(arch="moe-resnet18", experts=4, top_k=1),
                "moe-vit": dict(arch="moe-vit", experts=4, top_k=1),
                "advmoe-layout": dict(arch="moe-resnet18", moe_blocks="all", experts=2, expert_ratio=0.5, top_k=1)}

def benchmark(cfg: Config, out: str = "runs/benchmark", iters: Optional[int] = None) -> dict:
    """--benchmark: images/s of a standard and a PGD-10 AT step (Trainer.step) of each BENCH_MODELS network at
    --width, --batch-size, --precision and --compile on this device, on a random CIFAR-10-shaped batch drawn as
    training draws one (batches: gather, cast, augmentation); printed and written to OUT/benchmark.json."""
    dest, rt = check_out(out, files=("benchmark.json",)) / "benchmark.json", make_runtime(cfg.device, cfg.precision)
    cuda, B, g = rt.device.type == "cuda", cfg.batch_size, torch.Generator().manual_seed(0)
    iters, warmup = iters or (100 if cuda else 2), 100 if cuda else 1
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res = {"device": torch.cuda.get_device_name(rt.device) if cuda else f"CPU, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "precision": str(rt.amp_dtype or torch.float32), "compile": cfg.compile,
           "width": cfg.width, "batch_size": B, "warmup_steps": warmup, "timed_steps": iters}
    log("benchmark: " + " | ".join(f"{k} {v}" for k, v in res.items()) + f" -> {dest}")
    x = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=g).to(rt.device)  # as training holds data
    y = torch.randint(0, 10, (B,), generator=g).to(rt.device)
    ips = res["train_images_per_s"] = {}
    for name, method in [(n, m) for n in BENCH_MODELS for m in ("standard", "at")]:
        c = dataclasses.replace(cfg, method=method, train_steps=10, **BENCH_MODELS[name])
        seed_everything(0)
        model = rt.prepare(build_model(model_config(c, 10, 32)))
        step = Trainer(compile_model(model) if cfg.compile else model, c, 10 ** 6).step
        for i in range(warmup + iters):
            if i == warmup:
                sync()
                t = time.perf_counter()
            step(*next(batches(x, y, B, rt.device, shuffle=True, train_augment=True)))  # the training loop's batch
        sync()
        r = ips.setdefault(name, {})[method] = round(B * iters / (time.perf_counter() - t), 1)
        log(f"{name:13s} {method:8s} {r:9.1f} img/s  ({B / r * 1e3:.1f} ms/step)")
    res["over_dense"] = {n: {m: round(v[m] / ips["resnet18"][m], 3) for m in v} for n, v in ips.items()}
    log("throughput / dense ResNet-18: " + "; ".join(f"{n} {v['standard']:.2f} standard, {v['at']:.2f} PGD-10 AT"
                                                     for n, v in res["over_dense"].items() if n != "resnet18"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_json(dest, res)
    return res

def run_demo(out: str = "runs/demo", device: str = "auto") -> dict:
    """Standard training (12 epochs) vs PGD-AT (6) of a small MoE-ResNet18 on `synthetic`, about three minutes on 2
    CPU cores: each trained until its figures no longer move with the seed or the processor."""
    common = dict(dataset="synthetic", arch="moe-resnet18", width=0.125, experts=4, top_k=1, batch_size=64, lr=0.05,
                  train_limit=2400, test_limit=500, train_steps=5, val_steps=5, eval_steps=10, eval_suite="pgd",
                  device=device)
    runs = {m: Config(method=m, out=f"{out}/{m}", epochs=e, **common).validate() for m, e in (("standard", 12),
                                                                                               ("at", 6))}
    for cfg in runs.values():  # the demo replaces an earlier demo, never another run
        found = read_json(Path(cfg.out) / "metrics.json").get("config", {})
        check(all(found.get(k, v) == v for k, v in common.items() if k != "device"),
              f"{cfg.out} holds a run that is not the demo's; give another --out")
        check_run_folder(cfg, False, True)
    results = {}
    for method, cfg in runs.items():
        log(f"\n== demo: {method} ==")
        results[method] = train(cfg, overwrite=True)["test"]
    log(f"\n{'method':10s} {'clean':>6s} {'robust':>7s}   ({results['at']['attack']}, synthetic test set)")
    for method, r in results.items():
        log(f"{method:10s} {r['clean_acc']:6.3f} {r['robust_acc']:7.3f}")
    return results

def evaluate_checkpoint(path: str, cfg: Config, out: Optional[str], data_dir: Optional[str] = None,
                        lipschitz_n: int = 0) -> dict:
    """--eval: the test report of a checkpoint under the attacks given, added to OUT/eval.json; --lipschitz
    (lipschitz_n > 0): lipschitz_report on its first n test examples, added to OUT/lipschitz.json. OUT: the
    checkpoint's folder by default. Records only grow: earlier ones are kept."""
    rt, flag = make_runtime(cfg.device), "--out" if out else "the checkpoint's folder"
    model, saved, state = load_model(path, rt)
    data_dir = data_dir or saved.data_dir
    data = load_dataset(saved.dataset, data_dir, saved.image_size, test_limit=lipschitz_n or cfg.test_limit)
    run_data(dataclasses.replace(cfg, eval_suite="pgd") if lipschitz_n else cfg, data)
    check_fits(state, saved, data, f"checkpoint {path}")
    dest = check_out(out or str(Path(path).parent), flag, RECORD_FILES) / RECORD_FILES[lipschitz_n > 0]
    records = read_json(dest, records=True)["records"]  # a broken record file stops us before the work
    seed_everything(cfg.seed)  # attacks' random starts and power iterations repeat run to run
    settings = ("eps", "norm", "seed") + (() if lipschitz_n else ("alpha", "eval_suite", "eval_steps", "eval_restarts",
                                                                  "apgd_steps", "apgd_targets", "square_queries"))
    rec = {"checkpoint": path, "checkpoint_epoch": state["epoch"] + 1, "model_config": dataclasses.asdict(saved),
           "data": data_record(data, data_dir, test=len(data.test_x)),
           "settings": {k: getattr(cfg, k) for k in settings} | ({"lipschitz_n": lipschitz_n} if lipschitz_n else {})}
    if lipschitz_n:
        rec.update(lipschitz_report(model, data.test_x.to(rt.device).float() / 255, data.test_y.to(rt.device),
                                    cfg.eps, cfg.norm))
        text = f"{path}: " + " | ".join(f"{k} {v:.4g}" for k, v in rec.items() if isinstance(v, float) and k != "eps")
    else:
        rec["test"] = test_report(model, data, cfg, rt.device)
        text = format_report(rec["test"], path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_json(dest, {"records": records + [rec]})
    log(text + f"\n-> {dest} (record {len(records) + 1})")
    return rec

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)

class _Help(argparse.HelpFormatter):
    def _get_help_string(self, action):  # a default only where there is one worth showing
        h = action.help or ""
        return h if "default" in h or action.default in (None, True, False, argparse.SUPPRESS) else h + \
            " (default: %(default)s)"

def _eps(s: str) -> float:
    """'8/255' or '0.031' -> float."""
    try:
        a, _, b = s.partition("/")
        v = float(a) / float(b) if b else float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{s!r} is not a number or a fraction like 8/255") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v

def _path(s: str) -> str:
    if not s.strip():
        raise argparse.ArgumentTypeError(f"{s!r} is empty; give a path")
    return s

def build_parser() -> argparse.ArgumentParser:
    """One --flag per Config field (help, type, default and choices from it), in its groups, and the other runs."""
    p = _Parser(prog="moe_robust.py", allow_abbrev=False, formatter_class=_Help,
                description="Robust sparse Mixture-of-Experts training. With no arguments: a three-minute CPU demo.")
    g, types = None, {"int": int, "float": float, "str": str}
    special = dict(eps=_eps, alpha=_eps, out=_path, data_dir=_path, standard_ckpt=_path, robust_ckpt=_path)
    for f in dataclasses.fields(Config):
        m, flag = f.metadata, "--" + f.name.replace("_", "-")
        g = p.add_argument_group(m["group"]) if m["group"] else g
        if f.type == "bool":  # a switch: --flag turns it on, --no-flag turns a default True off
            g.add_argument(f"--no-{flag[2:]}" if f.default else flag, dest=f.name, help=m["help"],
                           action="store_false" if f.default else "store_true")
        else:
            kind = special.get(f.name) or types[f.type.strip("]").removeprefix("Optional[")]
            g.add_argument(flag, type=kind, default=None if f.name == "out" else f.default, choices=m["choices"],
                           help=m["help"])
    g = p.add_argument_group("other runs (each reads the settings of its checkpoint, the attack and the test report)")
    g.add_argument("--eval", metavar="CKPT", type=_path, help="test report of a checkpoint; adds to OUT/eval.json")
    g.add_argument("--lipschitz", metavar="CKPT", type=_path, help="Lipschitz estimates, bounds, certified accuracy "
                                                                   "of a CKPT; adds to OUT/lipschitz.json")
    g.add_argument("--lipschitz-n", type=int, default=64, metavar="N", help="test examples --lipschitz uses")
    g.add_argument("--benchmark", action="store_true", help="training images/s of each BENCH_MODELS network")
    g.add_argument("--demo", action="store_true", help="run the demo (what no arguments does)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out with its saved settings")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    return p

def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag already reported in one line
        return int(e.code or 0)
    runs = [m for m in ("eval", "lipschitz", "benchmark", "demo") if getattr(args, m)]
    run, cfg = runs[0] if runs else "demo" if not argv else "train", None
    given = sorted({a.split("=")[0] for a in argv if a[:2] == "--"} - {"--out", "--device", "--resume", "--demo",
                                                                        "--overwrite"})
    try:
        start_distributed(args.device)  # under torchrun: join the other processes
        check(len(runs) <= 1, f"{' and '.join('--' + m for m in runs)} cannot be combined; give one")
        cfg = config_from_dict(vars(args))
        cfg.out = args.out or f"runs/{cfg.dataset}-{cfg.arch}-{cfg.method}"
        cfg.validate()
        check(args.lipschitz_n >= 1 and (run == "lipschitz" or "--lipschitz-n" not in given),
              f"--lipschitz-n {args.lipschitz_n}: give a number >= 1, with --lipschitz only")
        for ckpt in (args.eval, args.lipschitz, cfg.standard_ckpt, cfg.robust_ckpt):  # inputs before outputs
            load_checkpoint(ckpt) if ckpt is not None else None
        what = "--resume continues the saved run with its own settings" if args.resume else "the demo has its own"
        check(not given or not (args.resume or run == "demo"), f"{what}; drop {' '.join(given)} (--out and --device "
                                                               "may change)")
        check(run not in ("eval", "lipschitz") or "--precision" not in given, "--precision sets training's autocast; "
              "--eval and --lipschitz report in float32 whatever it is: leave it out")
        check(world()[1] == 1 or run in ("train", "eval", "lipschitz"), "the demo and --benchmark run in one process; "
              "start without torchrun")
        if run == "demo":
            run_demo(args.out or "runs/demo", args.device)
        elif run == "benchmark":
            benchmark(cfg, args.out or "runs/benchmark")
        elif run in ("eval", "lipschitz"):
            evaluate_checkpoint(args.eval or args.lipschitz, cfg, args.out, args.data_dir if "--data-dir" in argv
                                else None, args.lipschitz_n if run == "lipschitz" else 0)
        else:
            run_dual(cfg, args.overwrite) if cfg.method == "dual" else train(cfg, args.resume, args.overwrite)
        barrier()  # torchrun: every rank done before any tears the process group down
    except UserError as e:  # every rank meets the same checks: rank 0 reports
        sys.stderr.write(f"error: {e}\n") if is_main() else None
        return 2
    except (MemoryError, RuntimeError) as e:  # CUDA's OutOfMemoryError and the CPU allocator's are RuntimeErrors
        if not isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) and "alloc" not in str(e):
            raise
        sys.stderr.write(f"error: out of memory ({type(e).__name__}); lower --batch-size, --width, --experts or the "
                         "image size\n")
        return 2
    except KeyboardInterrupt as e:
        sig = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        note = "nothing was written" if runs or not cfg else f"every finished epoch is saved in {cfg.out}: continue " \
            f"with --resume --out {cfg.out}" if (Path(cfg.out) / "last.pt").is_file() else \
            f"before the first epoch finished; nothing to resume in {cfg.out}"
        sys.stderr.write(f"{signal.Signals(sig).name}: interrupted; {note}\n") if is_main() else None
        return 128 + int(sig)
    finally:
        dist.destroy_process_group() if dist.is_available() and dist.is_initialized() else None
    return 0

def _interrupt(signum, frame):  # SIGTERM (how schedulers stop jobs) goes the way of Ctrl-C
    raise KeyboardInterrupt(signum)

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: leave without the interpreter's teardown, in which a
        sys.stdout.flush(), sys.stderr.flush()  # finished rank can abort (a torch.distributed thread still joinable)
        os._exit(code)
    sys.exit(code)
