"""moe_robust.py: robust sparse Mixture-of-Experts training in one readable file.

A sparse top-k MoE layer (per image or per token), MoE-ResNet18 and a small MoE-ViT; PGD, APGD-CE, APGD-T, FAB-T,
Square, a soft-router surrogate and a routing-only attack; standard training, PGD-AT, TRADES, AdvMoE, RT-ER, the dual
model and JTDMoE; the evaluation an MoE needs (RA as the per-example minimum over a cascade of named attacks, masking
probes, RA-E / RA-R, per-expert SA/RA, route flips); Lipschitz estimates, bounds and route-stable certificates; a
CLI with atomic checkpoints, bit-identical --resume, data-parallel training under torchrun (GPUs or CPU processes)
and --benchmark, in which every flag is read or refused (Config's `where`), nothing is written before every input is
checked, and records only grow.

Reading order: the ideas first, then the machinery that runs them. 0 conventions (the one error type, precision,
eval mode); 1 the MoE layer; 2 models; 3 attacks; 4 training methods, each a plain function; 5 evaluation; 6
Lipschitz bounds and certificates; then 7 configuration, 8 setup (device, data parallelism, files), 9 data, 10 the
training loop, 11 benchmark and command line. A function may call one defined further down (Python looks a name
up when the call runs). README.md "How to read the file" gives what each piece costs when copied on its own.

Quick start (CPU, nothing downloaded): pip install -r requirements.txt; python moe_robust.py (the demo: standard vs
PGD-AT MoE-ResNet18 on `synthetic`); python -m pytest -q test_moe_robust.py
Measured (`python moe_robust.py`, 2 Intel Xeon cores, commit e5400b1, 77 s; README.md: each number, its command):
MoE-ResNet18 width 0.125, E=4 top-1 (centred router), synthetic test set, PGD-10 8/255: standard 0.958 clean / 0.000
robust; PGD-AT 0.482 / 0.480. On 3,677 real CIFAR-10 photographs (a small sample, README "Results on real images"),
10 epochs, 500 test images, the `full` cascade, 3 seeds each: PGD-AT 0.378 / 0.193 +- 0.025 with the centred router
and 0.377 / 0.211 +- 0.016 with the papers' linear one; AdvMoE (centred) 0.372 / 0.210 +- 0.009. The `autoattack`
suite against Croce & Hein's own code on two earlier models of that sample (200 images): the same RA after every
attack, image by image (README "The methods").
Speed (`--benchmark --device cpu [--precision bf16]`, 2 AVX512-BF16 cores, width 1, batch 128, commit 80557f2):
PGD-10 AT of MoE-ResNet18 (E=4, k=1) at 6.3 img/s in float32 and 16.0 in bf16 + channels_last, 1.03x and 1.02x the
dense ResNet-18's. Against commit 0819781 (`--benchmark --against`, AMD EPYC): the demo's PGD-AT step 1.55x, its
PGD-10 attack 1.71x, width 1 1.12x (attacks on a CPU: each BatchNorm folded into its convolution, run
channels_last). On CUDA: bf16 autocast, channels_last, fused SGD, data on the GPU, one host
sync per MoE layer and forward. One H200
(`--benchmark --batch-size 512`, width 1): PGD-10 AT of MoE-ResNet18 at 3,252 img/s, 0.58x the dense ResNet-18's
5,576; both steps are bound by the host, not the GPU (README "On a GPU").

Conventions: inputs are images in [0, 1]; every model normalises inside itself and returns logits; eps is in pixel
units (8/255 = 8 grey levels). Papers by short name: Shazeer 2017 (sparsely-gated MoE), Switch 2021 (Fedus et al.),
ST-MoE 2022 (z-loss), V-MoE 2021 (Riquelme et al.), Madry 2018 (PGD-AT), TRADES 2019 (Zhang et al.), APGD 2020
(Croce & Hein; APGD-T, AutoAttack), Square 2020 (Andriushchenko et al.), Gram iteration 2023 (Delattre et al.),
AdvMoE 2023 (Zhang et al., ICCV), Robust Experts 2025 (Pavlitska et al.), Dual model 2025 (Zhang, Xu, Hu, Wang,
ICML), Puigcerver 2022 (adversarial robustness of MoE, Lipschitz constants).
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
import signal
import sys
import threading
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

class UserError(Exception):
    """A mistake in what the user asked for. The CLI prints it as one line and exits 2."""

def check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)

# One precision rule, amp_dtype: auto is bf16 autocast on CUDA and float32 on CPU (README's CPU numbers were taken in
# it); bf16 on CPU is the fast path on a processor with AVX512-BF16 or AMX (README). A training step opens
# autocast_for(device, cfg.precision) around its forwards, attack included; float32_evaluation switches autocast off
# for every reported number; attacks and models never choose a precision.

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
    accuracies are float32 numbers: a bf16 forward is a slightly different, coarser function, and on three PGD-AT
    models its robust accuracy differed from the same weights in float32 by +1.5, +0.5 and -6.8 points (README)."""
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

@contextlib.contextmanager
def frozen(*models: nn.Module):
    """eval_mode, and every parameter without gradient (both restored on exit): how the training attacks and the
    evaluation hold a model. Its backward then takes input gradients only."""
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        with eval_mode(*models):
            yield
    finally:
        for p in params:
            p.requires_grad_(True)

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
# takes (nearly) every image at initialisation (README "Routing"). router="centred" standardises h per feature first
# (BatchNorm without affine parameters: batch statistics while training, running statistics at eval, so evaluation
# routing stays per image); router="linear" is the papers' router on the raw h.

class Routing(NamedTuple):  # what one MoE layer decided for its last batch (detached, for analysis)
    logits: torch.Tensor  # (N, E) router logits, float32
    probs: torch.Tensor  # (N, E) softmax of the logits
    indices: torch.Tensor  # (N, K') experts used per row, best first (K' = K, 1 when forced, E when soft)
    gates: torch.Tensor  # (N, K') their gate weights
    ranking: torch.Tensor  # (N, E) all experts by router probability, best first

class Route(NamedTuple):  # a route to force on one MoE layer: which experts each row uses, with which gates
    indices: torch.Tensor  # (N, K') long
    gates: torch.Tensor  # (N, K') float

class AuxLoss(NamedTuple):
    balance: torch.Tensor  # Switch load-balancing loss: 1 when balanced, E when collapsed
    z: torch.Tensor  # ST-MoE router z-loss: mean(logsumexp(r)^2)

def memory_order(x: torch.Tensor) -> tuple[Callable, Callable]:
    """Maps to a channels_last (N, C, H, W) x's memory order (N, H, W, C) and back (else identities): row gathers and
    adds there are 2-4x faster on CPU than on the strided 4-D view, and keep the layout."""
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return (lambda t: t.permute(0, 2, 3, 1) if cl and t.dim() == 4 else t), \
        (lambda t: t.permute(0, 3, 1, 2) if cl and t.dim() == 4 else t)

class MoE(nn.Module):
    """Sparse top-k mixture of experts around any expert modules. tokens=False: x is a feature map (B, C, H, W), the
    router sees its global average pool (per-image routing, as in the CNN-MoE papers); tokens=True: x is (B, T, D),
    every token routed on its own (V-MoE). Each expert runs only on its own rows. `control` (None in training), an
    analysis hook, replaces the top-k choice: (probs, ranking) -> (indices, gates, every); soft_routing and
    forced_routes/rank/expert set it for a `with` block.
    Records: each forward replaces `aux` (balance and z-losses, with gradient), `routing` (detached) and
    `router_logits`, so they describe the last forward only: take `aux` (moe_aux_loss) before the model's next
    forward (TRADES takes its clean forward's before the adversarial one). `counts` accumulates until reset."""

    def __init__(self, experts: list[nn.Module], dim: int, k: int = 1, tokens: bool = False, noisy: bool = False,
                 router: str = "linear"):
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
        if noisy:
            nn.init.zeros_(self.noise.weight), nn.init.zeros_(self.noise.bias)
        # hooks set from outside: control (above); fraction and run_idle by data_parallel under torchrun (section 8)
        self.control = self.fraction = self.run_idle = None
        self.routing = self.router_logits = self.aux = None  # the last forward's records
        self.counts = torch.zeros(E, dtype=torch.long)  # rows sent to each expert since reset

    def route(self, h: torch.Tensor):
        """h: (N, D) -> indices (N, K'), gates (N, K'), every; records routing and aux losses. every: when a control
        fixes every row's experts (soft: all E, forced_expert: [i]), those in slot order (no grouping); else None."""
        with torch.autocast(h.device.type, enabled=False):  # the router in float32 (Switch 2021, sec. 2.4): under
            h = self.centred(h.float())  # bf16 near-equal logits would tie
            logits = self.router(h)  # (N, E)
            if self.noise is not None and self.training:
                logits = logits + torch.randn_like(logits) * F.softplus(self.noise(h))
        probs = logits.softmax(-1)  # (N, E)
        ranking = probs.detach().argsort(dim=-1, descending=True, stable=True)  # (N, E), ties to the lower index
        if self.control is not None:
            indices, gates, every = self.control(probs, ranking)
        else:
            top, indices = probs.topk(self.k, dim=-1)  # (N, K)
            gates, every = (top if self.k == 1 else top / top.sum(-1, keepdim=True)), None
        # Switch eq. 4: E * sum_i f_i P_i, f_i the fraction whose top-1 is i (no gradient), P_i the mean probability
        # of i. ST-MoE z-loss: mean(logsumexp(r)^2). (index_add: bincount on CUDA reads its input's max to the host)
        E = self.num_experts
        frac = probs.new_zeros(E).index_add_(0, ranking[:, 0], probs.new_ones(len(h))) / len(h)  # (E,)
        frac = frac if self.fraction is None else self.fraction(frac)  # torchrun: the global batch's (data_parallel)
        self.aux = AuxLoss(E * (frac * probs.mean(0)).sum(), logits.logsumexp(-1).pow(2).mean())
        self.routing = Routing(logits.detach(), probs.detach(), indices.detach(), gates.detach(), ranking)
        self.router_logits = logits  # with gradient, for attacks on the routing itself
        return indices, gates, every

    def centred(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, D) standardised per feature (router="centred"), else h. A lone row in training has no batch variance:
        it is routed with the running statistics, as evaluation would route it, and leaves them as they are (a
        synchronised BatchNorm, which sees every process's rows, is called as it is)."""
        c = self.centre
        if c is None:
            return h
        if self.training and len(h) == 1 and isinstance(c, nn.BatchNorm1d):
            return F.batch_norm(h, c.running_mean, c.running_var, eps=c.eps)
        return c(h)

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor,
                 every: Optional[list[int]] = None) -> torch.Tensor:
        """x: (N, ...) -> sum_k gates[n, k] * expert_{indices[n, k]}(x[n]). Rows are grouped by expert (a stable sort)
        and each expert runs once, on its own rows; its row count is read to the host: the one sync per MoE layer and
        forward (a fixed-capacity dispatch pads or drops rows instead). With `every` nothing is grouped or read."""
        N, K = indices.shape
        bcast = lambda g, y: g.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))  # (N,) -> (N, 1, ...)
        if every is not None:
            self.counts[every] += N
            ys = [y * bcast(gates[:, k], y) for k, y in enumerate(self.experts[e](x) for e in every)]
            return sum(ys[1:], ys[0])
        flat = indices.reshape(-1)  # (N*K,) expert of each (row, slot)
        order = flat.argsort(stable=True)  # slots grouped by expert
        rows, slot_gates = order // K, gates.reshape(-1)[order]  # (N*K,) input row and gate of each sorted slot
        counts = flat.new_zeros(self.num_experts).index_add_(0, flat, torch.ones_like(flat)).tolist()  # the one sync
        self.counts += torch.tensor(counts)
        to_mem, back = memory_order(x)  # rows are gathered and added in memory order (channels_last: NHWC)
        xm, out, start = to_mem(x), None, 0
        for e, c in enumerate(counts):
            if c == 0 and self.run_idle is None:
                continue
            r = rows[start:start + c]
            xe = back(xm.index_select(0, r))  # (c, ...) its rows only
            y = self.experts[e](xe) if c else self.run_idle(self.experts[e], xe)
            ym = to_mem(y * bcast(slot_gates[start:start + c], y))
            out = ym.new_zeros((N,) + ym.shape[1:]) if out is None else out
            out.index_add_(0, r, ym)
            start += c
        return back(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            rows = x.reshape(-1, x.shape[-1])  # (B, T, D) -> (N, D), N = B*T
            return self.dispatch(rows, *self.route(rows)).reshape(*x.shape[:2], -1)  # (B, T, D')
        return self.dispatch(x, *self.route(x.mean(dim=(2, 3))))  # router input (B, C), N = B; out (B, C', H', W')

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
    return routing_control(model, lambda p, rank: (torch.arange(p.shape[1], device=p.device).expand_as(p), p,
                                                   list(range(p.shape[1]))))

def forced_routes(model: nn.Module, routes: list[Route]):
    """Context: MoE layer l uses routes[l] (indices and gates) for every row (e.g. the clean routes, for RA-E)."""
    def control(route):
        def choose(p, rank):
            check(len(route.indices) == len(p), f"forced route has {len(route.indices)} rows, batch has {len(p)}")
            return route.indices, route.gates, None
        return choose
    return routing_control(model, [control(r) for r in routes])

def take_routes(routes: list[Route], idx: torch.Tensor, B: int) -> list[Route]:
    """The routes of images idx out of a batch of B (per-token routes keep all of an image's rows)."""
    pick = lambda t: t.view(B, -1, t.shape[-1])[idx].flatten(0, 1)
    return [Route(pick(r.indices), pick(r.gates)) for r in routes]

def forced_rank(model: nn.Module, r: int):
    """Context: every MoE layer sends each row to its r-th ranked expert with gate 1 (r = 1: the runner-up)."""
    return routing_control(model, lambda p, rank: (rank[:, r:r + 1], p.new_ones(len(p), 1), None))

def forced_expert(model: nn.Module, i: int):
    """Context: every MoE layer uses expert i with gate 1, so it computes the network f_i of the papers."""
    for m in moe_layers(model):
        check(0 <= i < m.num_experts, f"expert {i} not allowed; this layer has {m.num_experts} experts")
    return routing_control(model, lambda p, rank: (rank.new_full((len(p), 1), i), p.new_ones(len(p), 1), [i]))

def current_routes(model: nn.Module, x: torch.Tensor, fixed_gates: Optional[float] = None) -> list[Route]:
    """The routes the model takes on x (eval mode, no gradient); gates as used, or all `fixed_gates`."""
    with torch.no_grad(), eval_mode(model):  # in the caller's precision
        model(x)
    return [Route(r.indices, r.gates if fixed_gates is None else torch.full_like(r.gates, fixed_gates))
            for r in last_routing(model)]

# ==== 2. Models: CIFAR ResNet-18, MoE-ResNet18, MoE-ViT ============================================================

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

def model_config(cfg, num_classes: int, image_size: int) -> ModelConfig:
    """A run's ModelConfig: the fields of the same name in its Config, the data's classes and size."""
    shared = {f.name for f in dataclasses.fields(ModelConfig)} - {"num_classes", "image_size", "norm"}
    return ModelConfig(num_classes=num_classes, image_size=image_size, norm=cfg.dataset if cfg.dataset in NORM_STATS
                       else "imagenet", **{k: getattr(cfg, k) for k in shared if hasattr(cfg, k)})

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
                 noisy: bool = False, router: str = "linear"):
        super().__init__()
        mid = max(1, round(expert_ratio * planes))
        self.branch = (MoE([residual_branch(inp, mid, planes, stride) for _ in range(experts)], inp, k, noisy=noisy,
                           router=router) if experts else residual_branch(inp, planes, planes, stride))
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
                 router: str = "linear"):
        super().__init__()
        self.ln1, self.ln2, self.attn = nn.LayerNorm(dim), nn.LayerNorm(dim), Attention(dim, heads)
        self.mlp = (MoE([mlp(dim, 4 * dim) for _ in range(experts)], dim, k, tokens=True, noisy=noisy, router=router)
                    if experts else mlp(dim, 4 * dim))

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
    """torch.compile in place (`--compile`; state_dict keys stay plain). The sparse dispatch reads the expert row
    counts back to the host, which a compiled graph cannot hold: traced through, it breaks the graph and recompiles
    for every new set of counts. So each MoE layer's routing and dispatch stay eager, each expert is compiled on its
    own with a dynamic batch size, and the dense network around the MoE layers is compiled as a whole."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    # an expert meets train/eval x grad/no-grad x bf16/float32 x batch 1/many: 16 variants, beyond dynamo's default
    # of 8, after which it would silently run eagerly
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 32))
    if not next(model.parameters()).is_cuda:  # inductor's NCHW -> channels_last rewrite of the convolutions
        torch._inductor.config.layout_optimization = False  # hung a CPU convolution backward (torch 2.15)
    for m in moe_layers(model):
        for expert in m.experts:
            expert.compile(dynamic=True)
        m.forward = torch.compiler.disable(m.forward)
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

def rows_rand(x: torch.Tensor, fill: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fill(torch.empty_like(x)): an attack's random numbers for the rows of x (data_shard swaps in shard_rand)."""
    return fill(torch.empty_like(x))

def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, alpha: Optional[float] = None,
        steps: int = 10, norm: str = "linf", random_start: bool = True, loss_fn: Callable = ce_per_example,
        on_iterate: Optional[Callable] = None) -> torch.Tensor:
    """Projected gradient ascent on loss_fn(model(x'), y) over ||x' - x|| <= eps, x' in [0, 1] (Madry et al. 2018).
    alpha: the step; None: eps / 4 (2/255 at 8/255, Madry's CIFAR setting). on_iterate(x_t, logits_t) sees each
    iterate before its step (pgd_worst keeps the worst). -> the last iterate (B, C, H, W), detached (PGD-AT's)."""
    alpha = eps / 4 if alpha is None else alpha
    x, delta = x.detach(), torch.zeros_like(x)
    if random_start and eps > 0 and norm == "linf":  # uniform in the L-inf ball
        delta = rows_rand(x, lambda t: t.uniform_(-eps, eps))
    elif random_start and eps > 0:  # L2: a random direction, a uniform radius
        d = rows_rand(x, lambda t: t.normal_())
        delta = d / per_example_norm(d, "l2") * eps * rows_rand(x[:, :1, :1, :1], lambda t: t.uniform_())
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
        self.model(x)
        total = torch.zeros(len(x), device=x.device)
        for m, target in zip(moe_layers(self.model), self.clean_top1):
            total = total + F.cross_entropy(m.router_logits, target, reduction="none").view(len(x), -1).mean(1)
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
def sgd(params, cfg: Config, lr: Optional[float] = None) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; on CUDA the fused kernel (one launch for all parameters). (On CPU the default
    multi-tensor path, so CPU runs repeat README's numbers exactly.)"""
    params = list(params)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.SGD(params, lr=cfg.lr if lr is None else lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0, fused=fused or None)

def cosine(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the base learning rate to 0 over `total_steps` optimiser steps."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) /
                                                                                 total_steps)))

def aux(model: nn.Module, cfg: Config) -> torch.Tensor:
    return moe_aux_loss(model, cfg.balance_coef, cfg.z_coef)

def trades_kl(logits_adv: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """Per-example KL(p_clean || softmax(logits_adv)), float32. TRADES eq. 5's inner term."""
    return F.kl_div(F.log_softmax(logits_adv.float(), 1), p_clean, reduction="none").sum(1)

def trades_attack(model: nn.Module, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """TRADES' inner maximisation: PGD on KL(p(x) || p(x')), started at x + 0.001 N(0, I)."""
    with frozen(model):  # no weight gradients in an attack
        with torch.no_grad():
            p_clean = model(x).float().softmax(1)
        x0 = (x + 0.001 * rows_rand(x, lambda t: t.normal_())).clamp(0, 1)
        xa = pgd(model, x0, p_clean, cfg.eps, cfg.alpha, cfg.train_steps, cfg.norm, random_start=False,
                 loss_fn=trades_kl)
    return project(xa - x, cfg.eps, cfg.norm).add(x).clamp(0, 1)

def at_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config):
    """PGD-AT (Madry et al. 2018): CE(F(x_adv), y) + MoE aux losses of that forward, x_adv = PGD-`train_steps`
    against the current model (last iterate). -> (loss, logits)"""
    with frozen(model):  # no weight gradients in the attack
        xa = pgd(model, x, y, cfg.eps, cfg.alpha, cfg.train_steps, cfg.norm)
    logits = model(xa).float()
    return F.cross_entropy(logits, y) + aux(model, cfg), logits

def trades_term(model: nn.Module, x: torch.Tensor, cfg: Config, xa: Optional[torch.Tensor] = None):
    """(1/B) sum_n KL(p(x_n) || p(x'_n)), x' = xa, or TRADES' attack on `model` (whatever routes or experts are
    forced on it). -> (kl, clean logits, MoE aux losses of the clean forward)"""
    xa = trades_attack(model, x, cfg) if xa is None else xa
    logits = model(x).float()
    clean_aux = aux(model, cfg)
    return trades_kl(model(xa).float(), logits.softmax(1)).mean(), logits, clean_aux

def trades_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config):
    """TRADES (Zhang et al. 2019): CE(F(x), y) + beta KL(p(x) || p(x_adv)) + MoE aux losses. -> (loss, logits)"""
    kl, logits, clean_aux = trades_term(model, x, cfg)
    return F.cross_entropy(logits, y) + cfg.beta * kl + clean_aux, logits

def expert_path_term(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config) -> torch.Tensor:
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
              cfg: Config):
    """One training step of `opt` on loss_fn(model, x, y, cfg) -> (loss, logits): the forwards (the attack included)
    under the run's autocast, the backward outside it. -> (loss, logits)"""
    model.train()
    with autocast_for(x.device, cfg.precision):
        loss, logits = loss_fn(model, x, y, cfg)
    descend(opt, loss)
    return loss, logits

def standard_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config):
    """Empirical risk minimisation: CE(F(x), y) + MoE auxiliary losses. -> (loss, logits)"""
    logits = model(x).float()
    return F.cross_entropy(logits, y) + aux(model, cfg), logits

def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """theta_R: the parameters of every router (and noisy-gating layer)."""
    return [p for m in moe_layers(model) for part in (m.router, m.noise) if part is not None for p in part.parameters()]

def advmoe_step(model: nn.Module, router_opt: torch.optim.Optimizer, expert_opt: torch.optim.Optimizer,
                x: torch.Tensor, y: torch.Tensor, cfg: Config):
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
    -> (expert step's loss, its logits, router step's loss)"""
    robust_loss = trades_loss if cfg.robust_loss == "trades" else at_loss
    router_loss, _ = loss_step(model, router_opt, robust_loss, x, y, cfg)  # 1.
    loss, logits = loss_step(model, expert_opt, robust_loss, x, y, cfg)  # 2. x_adv against the updated routers
    return loss, logits, router_loss

def runner_up_routes(model: nn.Module, x: torch.Tensor) -> list[Route]:
    """The runner-up path on clean x: at every MoE layer the expert its router ranks second (given the runner-up
    choices of the layers before), with gate 1. (N, 1) per layer."""
    with forced_rank(model, 1):
        return current_routes(model, x, fixed_gates=1.0)

def runner_up_term(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config) -> torch.Tensor:
    """(1/B) sum_n KL(f_j(n)(x_n) || f_j(n)(x'_n)) with the runner-up routes j(n) fixed from clean x."""
    with forced_routes(model, runner_up_routes(model, x)):  # the attack and the forwards run f_j(n) alone
        return expert_path_term(model, x, y, cfg)

def rter_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config):
    """RT-ER (dual-model paper, Zhang, Xu, Hu, Wang 2025): PGD-AT of the whole MoE plus a TRADES term on the
    runner-up expert j(n), the one the router ranks second for example n:
        L = CE(F(x_adv), y) + (beta / B) sum_n KL(f_j(n)(x_n) || f_j(n)(x'_n)),  x'_n = PGD against f_j(n).
    The top-1 expert is made robust by the first term; the runner-up is where an input lands when a perturbation
    flips the route, so it is trained to be robust too. With several MoE layers the runner-up path takes the
    second-ranked expert at every layer. Trained by loss_step. -> (loss, logits)"""
    ce, logits = at_loss(model, x, y, cfg)
    return ce + cfg.beta * runner_up_term(model, x, y, cfg), logits

def jtdmoe_robust_step(dual: "DualModel", opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                       cfg: Config) -> torch.Tensor:
    """JTDMoE step (a) on f_R alone (f_S untouched): CE(f_R(PGD(f_R, x)), y)
    + (beta / B) sum_n sum_i KL(f_Ri(x_n) || f_Ri(PGD(f_Ri, x)_n)), every expert i made robust. -> loss"""
    f_r = dual.robust
    f_r.train()
    with autocast_for(x.device, cfg.precision):
        loss = at_loss(f_r, x, y, cfg)[0]
        for i in range(moe_layers(f_r)[0].num_experts):
            with forced_expert(f_r, i):
                loss = loss + cfg.beta * expert_path_term(f_r, x, y, cfg)
    descend(opt, loss)
    return loss

def jtdmoe_standard_step(dual: "DualModel", opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                         cfg: Config):
    """JTDMoE step (b) on f_S (f_R frozen, in eval mode so its BatchNorm statistics stay put): CE(f_D(x), y) on clean
    x, so f_S learns to complement a * f_R. -> (loss, f_D's logits)"""
    dual.standard.train()
    with frozen(dual.robust), autocast_for(x.device, cfg.precision):
        logits = dual(x).float()
        loss = F.cross_entropy(logits, y) + aux(dual.standard, cfg)
    descend(opt, loss)
    return loss, logits

def jtdmoe_step(dual: "DualModel", robust_opt: torch.optim.Optimizer, standard_opt: torch.optim.Optimizer,
                x: torch.Tensor, y: torch.Tensor, cfg: Config):
    """JTDMoE (dual-model paper): joint training of f_S and f_R inside f_D = (1 - a) f_S + a f_R, a fixed; per batch
    step (a) on f_R, then step (b) on f_S. -> (f_S step's loss, f_D's logits, f_R step's loss)"""
    robust_loss = jtdmoe_robust_step(dual, robust_opt, x, y, cfg)
    loss, logits = jtdmoe_standard_step(dual, standard_opt, x, y, cfg)
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
PROBE_FACTORS = (1, 2, 4, 8, 16)  # eps multiples of the probe; L-inf radii are capped at 1

def suite_attacks(cfg: Config, suite: str, num_classes: int, moe: bool) -> list[tuple[str, Callable]]:
    """The suite's attacks in the order they run: [(name, attack(model, x, y) -> x_adv)]."""
    a, e, n = AttackConfig(cfg.eps, cfg.alpha, cfg.eval_steps, cfg.eval_restarts, cfg.norm), cfg.eps, cfg.apgd_steps
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

def masking_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config) -> dict:
    """PGD's robust accuracy at growing eps (PROBE_FACTORS x eps) on float images x: it should fall with eps and
    reach 0 at a large eps; where it does not, the gradient is not finding adversarial examples that exist (gradient
    masking, Athalye et al. 2018)."""
    radii = [min(f * cfg.eps, 1.0) if cfg.norm == "linf" else f * cfg.eps for f in PROBE_FACTORS]
    ok = predict(model, x) == y
    attacks = [AttackConfig(r, None, cfg.eval_steps, 1, cfg.norm) for r in radii]
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
def evaluate_full(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config, device: torch.device,
                  batch_size: int = 256, suite: Optional[str] = None, analysis: bool = True) -> dict:
    """The evaluation report of a model on uint8 images x (N, 3, H, W) and labels y (N,): SA, RA under the suite
    (cfg.eval_suite unless given) with each attack's figure, and for the full suite with analysis=True the masking
    probe, RA-E, RA-R, per-expert numbers and routing statistics. Runs in true float32 whatever the training
    precision. Each batch's counts (the parts above) are added up; under torchrun each rank evaluates its share of
    the images (its attacks draw their own random starts) and the ranks' counts are added up; rank 0 runs the probe."""
    ranks, probe_x, probe_y = world()[1], x[:200], y[:200]
    if ranks > 1:
        check(len(x) >= ranks, f"{len(x)} test images cannot be shared by {ranks} processes")
        a, b = shard_rows(len(x))
        x, y = x[a:b], y[a:b]
    suite, layers = suite or cfg.eval_suite, moe_layers(model)
    moe = suite == "full" and analysis and len(layers) > 0
    attack = AttackConfig(cfg.eps, cfg.alpha, cfg.eval_steps, cfg.eval_restarts, cfg.norm)  # also the routing attack's
    attacks, sums = None, {"images": 0}
    with frozen(model):  # no weight gradients in the attacks
        for xb, yb in batches(x, y, batch_size, device):
            logits, ok, routes = clean_pass(model, xb, yb)
            if attacks is None:
                num_classes = logits.shape[1]
                attacks = suite_attacks(cfg, suite, num_classes, len(layers) > 0)
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
    if ranks > 1:  # every rank's counts, added up
        parts = [None] * ranks
        dist.all_gather_object(parts, sums)
        sums = functools.reduce(add_up, parts, {})
    names, n = [a for a, _ in attacks], sums["images"]
    acc = lambda k: sums.get(k, 0) / max(1, n)
    res = {"clean_acc": acc("clean"), "robust_acc": acc("robust"), "attack": "cascade: " + " > ".join(names),
           "attacks": names, "robust_after": {k: acc(k) for k in names}}
    res["fooled_by"] = {k: round(b - acc(k), 6) for k, b in zip(names, [acc("clean")] + [acc(k) for k in names])}
    if suite == "full" and analysis and is_main():
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

# ==== 7. Configuration: every setting, its flag, help and allowed values ===========================================
METHODS = ("standard", "at", "trades", "advmoe", "rt-er", "dual", "jtdmoe")
DATASETS = ("synthetic", "cifar10", "cifar100", "tinyimagenet", "imagefolder", "random")
ARCHS = ("resnet18", "moe-resnet18", "moe-vit")
NORMS = ("linf", "l2")
EVAL_SUITES = ("full", "autoattack", "pgd")
PRECISIONS = ("auto", "fp32", "bf16")
DUAL_MIXES = ("logits", "normalized")
ROUTERS = ("centred", "linear")  # see MoE: the router's input standardised, or raw (the papers')
DUAL = ("dual", "jtdmoe")
BLOCK_NAMES = tuple(f"layer{i}.{j}" for i in range(1, 5) for j in range(2))  # ResNet-18's BasicBlocks

MODES = ("train", "dual", "eval", "lipschitz", "benchmark", "demo", "resume")  # the ways of running (see run_context)
MOE_ARCHS = ("moe-resnet18", "moe-vit")
READ_FROM_DISK = ("cifar10", "cifar100", "tinyimagenet", "imagefolder")  # the data sets that --data-dir locates
SUITE_RUNS = ("train", "dual", "eval")  # the modes whose report runs an --eval-suite

KIND_NAMES = {"float": "a number", "int": "a whole number", "str": "a string", "bool": "true or false"}

def opt(default, help: str, choices=None, ge=None, gt=None, le=None, lt=None, group=None, where=None):
    """A Config field: its default, its --flag's help and allowed values (choices, ge/gt/le/lt bounds), the --help
    group it opens, and `where` it is read: {dimension: values} over the run's context (run_context: mode, method,
    arch, suite, norm, dataset, member), or a list of such dicts of which one must hold; None: in every run."""
    return field(default=default, metadata=dict(help=help, choices=choices, ge=ge, gt=gt, le=le, lt=lt, group=group,
                                                where=where))

def moe_block_set(spec: str) -> set:
    """'all' or a comma list of ResNet-18 block names -> the set of names."""
    wanted = set(BLOCK_NAMES) if spec == "all" else {b.strip() for b in spec.split(",") if b.strip()}
    bad = sorted(wanted - set(BLOCK_NAMES))
    check(not bad, f"unknown --moe-blocks {','.join(bad)}; allowed: all or a comma list of {', '.join(BLOCK_NAMES)}")
    return wanted

@dataclass
class Config:
    """Everything a run needs: each field is one --flag (underscores become dashes). The parser (build_parser) and
    `validate` read help and allowed values from here, refuse_unread where each is read; checkpoints store it."""

    method: str = opt("at", "training method", METHODS, group="what to run", where=dict(mode=("train", "dual")))
    dataset: str = opt("synthetic", "data set (random: noise in CIFAR-10's shape, for timing)", DATASETS, group="data",
                       where=dict(mode=("train", "dual")))
    data_dir: str = opt("data", "where data sets live (CIFAR is downloaded here)",
                        where=dict(mode=("train", "dual", "eval", "lipschitz"), dataset=READ_FROM_DISK))
    image_size: Optional[int] = opt(None, "tinyimagenet/imagefolder image side, 16..256 in steps of 8 (default 64/32)",
                                    where=dict(mode=("train", "dual"),
                                               dataset=("synthetic", "random", "tinyimagenet", "imagefolder")))
    train_limit: Optional[int] = opt(None, "use only the first N training examples", ge=1, where=dict(mode=("train",)))
    test_limit: Optional[int] = opt(None, "use only the first N test examples", ge=1, where=dict(mode=SUITE_RUNS))
    val_size: Optional[int] = opt(None, "held-out validation examples (default 10%%, at most 1000)", ge=1,
                                  where=dict(mode=("train",)))
    augment: bool = opt(True, "no random crop + flip", where=dict(mode=("train",)))
    arch: str = opt("moe-resnet18", "architecture; resnet18 is moe-resnet18 without MoE blocks", ARCHS, group="model",
                    where=dict(mode=("train",)))
    width: float = opt(1.0, "multiplier of every channel width (0.125 for CPU)", gt=0, le=8,
                       where=dict(mode=("train", "benchmark")))
    experts: int = opt(4, "experts E per MoE layer (Robust Experts: 4; AdvMoE: 2)", ge=1, le=64,
                       where=dict(mode=("train",), arch=MOE_ARCHS))
    top_k: int = opt(1, "experts K used per image/token (CNN-MoE papers: 1; V-MoE: 2)", ge=1,
                     where=dict(mode=("train",), arch=MOE_ARCHS))
    moe_blocks: str = opt("layer4.1", "ResNet blocks made MoE: 'all' or e.g. layer3.1,layer4.1 (Robust Experts: one)",
                          where=dict(mode=("train", "benchmark"), arch=("moe-resnet18",)))
    expert_ratio: float = opt(1.0, "expert inner width / block width (AdvMoE: 0.5)", gt=0, le=4,
                              where=dict(mode=("train",), arch=("moe-resnet18",)))
    noisy_gating: bool = opt(False, "Shazeer noisy top-k routing while training", where=dict(mode=("train",),
                                                                                             arch=MOE_ARCHS))
    router: str = opt("centred", "centred: the router's input standardised per feature (batch statistics in training, "
                                 "running ones at eval), so no expert starts with every image; linear: the papers' "
                                 "W h + b on the raw pooled features", ROUTERS,
                      where=dict(mode=("train",), arch=MOE_ARCHS))
    epochs: int = opt(10, "passes over the training split", ge=1, group="optimisation", where=dict(mode=("train",)))
    batch_size: int = opt(128, "images per training step", ge=1, le=65536, where=dict(mode=("train", "benchmark")))
    lr: float = opt(0.1, "SGD learning rate, cosine decay to 0 over all steps (Madry/Rice recipe, shortened)", ge=0,
                    where=dict(mode=("train",)))
    momentum: float = opt(0.9, "SGD (Nesterov) momentum", ge=0, lt=1, where=dict(mode=("train",)))
    weight_decay: float = opt(5e-4, "SGD weight decay", ge=0, where=dict(mode=("train",)))
    balance_coef: float = opt(1e-2, "Switch balance loss weight", ge=0, where=dict(mode=("train",), arch=MOE_ARCHS))
    z_coef: float = opt(1e-3, "router z-loss weight (ST-MoE)", ge=0, where=dict(mode=("train",), arch=MOE_ARCHS))
    beta: float = opt(6.0, "weight of the KL term: TRADES (also advmoe's), RT-ER's runner-up term, JTDMoE's expert "
                           "terms", ge=0, where=dict(mode=("train",), method=("trades", "rt-er", "jtdmoe")))
    seed: int = opt(0, "initial weights, data order, attacks' random starts", ge=0, le=2 ** 31 - 1,
                    where=dict(mode=("train", "dual", "eval", "lipschitz")))
    eps: Optional[float] = opt(None, "radius in pixel units; an L2 run must give one, e.g. 0.5 (default: 8/255)", ge=0,
                               group="attack", where=dict(mode=("train", "dual", "eval", "lipschitz")))
    alpha: Optional[float] = opt(None, "PGD step size, e.g. 2/255 (default eps/4)", gt=0,
                                 where=[dict(mode=("train",)), dict(mode=SUITE_RUNS, suite=("full", "pgd"))])
    norm: str = opt("linf", "threat model", NORMS, where=dict(mode=("train", "dual", "eval", "lipschitz")))
    train_steps: int = opt(10, "PGD steps while training (Madry: 10)", ge=1,
                           where=dict(mode=("train",), method=METHODS[1:]))
    val_steps: int = opt(10, "PGD steps on the validation split each epoch", ge=1, where=dict(mode=("train",)))
    eval_steps: int = opt(20, "PGD steps of the final test evaluation", ge=1,
                          where=dict(mode=SUITE_RUNS, suite=("full", "pgd")))
    eval_restarts: int = opt(1, "PGD restarts of the final test evaluation", ge=1,
                             where=dict(mode=SUITE_RUNS, suite=("full", "pgd")))
    eval_suite: str = opt("full", "autoattack: APGD-CE, APGD-T, FAB-T, Square; full: PGD, those and soft-router "
                                  "PGD, plus masking probes, RA-E, RA-R, per-expert and routing statistics; pgd",
                          EVAL_SUITES,
                          where=dict(mode=SUITE_RUNS))
    apgd_steps: int = opt(100, "APGD-CE, APGD-T and FAB-T iterations (AutoAttack: 100)", ge=1,
                          where=dict(mode=SUITE_RUNS, suite=("full", "autoattack")))
    apgd_targets: Optional[int] = opt(None, "APGD-T and FAB-T target classes, at most classes - 1; needs 4 classes "
                                            "(default: AutoAttack's 9, or classes - 1 if fewer)", ge=1,
                                      where=dict(mode=SUITE_RUNS, suite=("full", "autoattack")))
    square_queries: int = opt(5000, "Square attack queries per example (AutoAttack: 5000)", ge=1,
                              where=dict(mode=SUITE_RUNS, suite=("full", "autoattack")))
    router_lr: Optional[float] = opt(None, "router learning rate (default --lr)", ge=0,
                                     group="advmoe (router-expert alternating training)",
                                     where=dict(mode=("train",), method=("advmoe",)))
    router_schedule: str = opt("cosine", "router lr schedule", ("cosine", "constant"),
                               where=dict(mode=("train",), method=("advmoe",)))
    robust_loss: str = opt("at", "robust loss of both steps: PGD-AT or TRADES", ("at", "trades"),
                           where=dict(mode=("train",), method=("advmoe",)))
    dual_a: float = opt(0.5, "smoothing parameter a of f_D = (1-a) f_S + a f_R (fixed in jtdmoe)", ge=0, le=1,
                        group="dual model and jtdmoe", where=dict(mode=("train", "dual"), method=DUAL))
    dual_mix: str = opt("logits", "logits: f_D mixes logits (the paper); normalized: each member's logits scaled to "
                                  "unit std first", DUAL_MIXES, where=dict(mode=("train", "dual"), method=DUAL))
    dual_sweep: str = opt("0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", "values of a to evaluate",
                          where=dict(mode=("dual",)))
    standard_ckpt: Optional[str] = opt(None, "dual: f_S from this checkpoint (else trained)",
                                       where=dict(mode=("dual",)))
    robust_ckpt: Optional[str] = opt(None, "dual: f_R from this checkpoint (else trained)", where=dict(mode=("dual",)))
    robust_method: str = opt("rt-er", "dual: how f_R is trained without --robust-ckpt",
                             ("at", "trades", "advmoe", "rt-er"), where=dict(mode=("dual",), member=("robust",)))
    expert_attack: str = opt("pgd", "rt-er/jtdmoe: x' of each expert path's KL term by label PGD (the paper and its "
                                    "code) or TRADES' KL attack", ("pgd", "kl"),
                             where=dict(mode=("train",), method=("rt-er", "jtdmoe")))
    device: str = opt("auto", "auto: cuda when available", ("auto", "cpu", "cuda"), group="run")
    precision: str = opt("auto", "training's precision, auto: bf16 + channels_last on CUDA, float32 on CPU (bf16: fast "
                                 "CPUs); every reported number is float32", PRECISIONS,
                         where=dict(mode=("train", "benchmark")))
    compile: bool = opt(False, "torch.compile the dense parts and each expert (compile_model)",
                        where=dict(mode=("train", "benchmark")))
    sync_bn: bool = opt(False, "under torchrun: BatchNorm statistics over the global batch (every process's rows), so "
                               "N processes train what one would (default: each process's own rows)",
                        where=dict(mode=("train",)))
    out: str = opt("runs/default", "output folder (default runs/<dataset>-<arch>-<method>)")

    def __post_init__(self):
        if self.eps is None and self.norm == "linf":  # the L-inf default; an L2 radius has no default (validate)
            self.eps = 8 / 255

    def sweep_values(self) -> list[float]:
        bad = f"--dual-sweep {self.dual_sweep!r} must be a comma list of numbers in [0, 1]"
        try:
            values = [float(v) for v in self.dual_sweep.split(",") if v.strip()]
        except ValueError:
            raise UserError(bad) from None
        check(values and all(0 <= v <= 1 for v in values), bad)
        return values

    def validate(self) -> None:
        """Check every setting before anything is read or written: each field against its own allowed values (inf
        and nan pass no bound), then the settings that depend on each other."""
        for f in dataclasses.fields(self):
            v, m, flag = getattr(self, f.name), f.metadata, "--" + f.name.replace("_", "-")
            kind = f.type.removeprefix("Optional[").rstrip("]")
            if v is None:
                check(f.type.startswith("Optional") or f.name == "eps", f"{flag} needs a value ({kind})")
                continue
            check(isinstance(v, {"float": (int, float), "int": int, "str": str, "bool": bool}[kind]) and
                  (kind == "bool") == isinstance(v, bool), f"{flag} {v!r} is not {KIND_NAMES[kind]}")
            if kind == "bool":
                continue
            check(not isinstance(v, float) or math.isfinite(v), f"{flag} {v} is not a finite number")
            check(v in (m["choices"] or [v]), f"unknown {flag} {v!r}; allowed: {', '.join(m['choices'] or ())}")
            for op, b, ok in ((">=", m["ge"], operator.ge), (">", m["gt"], operator.gt), ("<=", m["le"], operator.le),
                              ("<", m["lt"], operator.lt)):
                check(b is None or ok(v, b), f"{flag} {v} not allowed; need {flag[2:]} {op} {b}")
        check(self.eps is not None, f"--norm {self.norm} needs an explicit --eps (an L2 radius, e.g. 0.5); the 8/255 "
                                    "default is an L-inf radius")
        check(self.norm != "linf" or self.eps <= 1, f"--eps {self.eps:g} not allowed under linf: images are in [0, 1], "
                                                    "so eps <= 1 (e.g. 8/255)")
        size = self.image_size
        check(size is None or (16 <= size <= 256 and size % 8 == 0),  # 16: layer4 still sees 2x2 maps;
              f"--image-size {size} not allowed; need a multiple of 8 from 16 to 256")  # 8: the ViT's 8x8 grid
        check(self.top_k <= self.experts, f"--top-k {self.top_k} not allowed with --experts {self.experts}; need k<=E")
        self.sweep_values()
        robust = self.robust_method if self.method == "dual" else self.method
        check(robust not in ("advmoe", "rt-er", "jtdmoe") or self.arch != "resnet18",
              f"--method {self.method} needs an MoE (--arch moe-resnet18 or moe-vit), not resnet18")
        check(robust != "rt-er" or self.experts >= 2,
              f"--method rt-er needs a runner-up expert: --experts {self.experts} must be >= 2")
        check(bool(moe_block_set(self.moe_blocks)) or self.arch != "moe-resnet18",
              f"--moe-blocks {self.moe_blocks!r} makes no MoE layer; name blocks (layer4.1) or use --arch resnet18")

def run_context(cfg: Config, mode: str, saved: Optional[Config] = None) -> dict:
    """Where a run stands, as sets of names, for each Config field's `where`: the mode; the methods whose steps run
    (a dual run's trained members' too; advmoe --robust-loss trades runs TRADES' loss); the architecture, suite,
    threat model and data set (eval and lipschitz: the checkpoint's `saved` config); the dual members trained here."""
    if mode in ("eval", "lipschitz"):
        return dict(mode={mode}, arch={saved.arch}, dataset={saved.dataset}, norm={cfg.norm},
                    suite={cfg.eval_suite} if mode == "eval" else set())
    if mode in ("benchmark", "demo", "resume"):
        return dict(mode={mode}, arch=set(ARCHS) if mode == "benchmark" else set())
    dual = cfg.method == "dual"
    trained = [m for m, ckpt in (("standard", cfg.standard_ckpt), ("robust", cfg.robust_ckpt)) if ckpt is None] \
        if dual else []
    methods = {cfg.method} | {cfg.robust_method if m == "robust" else "standard" for m in trained}
    methods |= {"trades"} if "advmoe" in methods and cfg.robust_loss == "trades" else set()
    return dict(mode={"dual"} | ({"train"} if trained else set()) if dual else {"train"}, method=methods,
                arch={cfg.arch}, suite={cfg.eval_suite}, norm={cfg.norm}, dataset={cfg.dataset}, member=set(trained))

CONTEXT_FLAGS = {"method": "--method", "arch": "--arch", "suite": "--eval-suite", "norm": "--norm",
                 "dataset": "--dataset"}
MODE_NAMES = {"train": "training", "dual": "--method dual", "eval": "--eval", "lipschitz": "--lipschitz",
              "benchmark": "--benchmark", "demo": "the demo", "resume": "--resume"}
MODE_WHERE = {"lipschitz_n": dict(mode=("lipschitz",)), "overwrite": dict(mode=("train", "dual")),  # not in Config
              "resume": dict(mode=("dual",)), "against": dict(mode=("benchmark",))}

def field_where(name: str):
    """A Config field's `where`, or that of a flag in MODE_WHERE."""
    return MODE_WHERE[name] if name in MODE_WHERE else Config.__dataclass_fields__[name].metadata["where"]

def unread_reason(where, ctx: dict) -> Optional[str]:
    """None if a setting with this `where` is read in the run `ctx`, else why not (the first condition that fails)."""
    alts = [where] if isinstance(where, dict) else where or [{}]
    fails = [[(k, v) for k, v in alt.items() if not ctx.get(k, set()) & set(v)] for alt in alts]
    if any(not f for f in fails):
        return None
    k, v = fails[0][0]
    if k == "mode":
        return f"it is read only by {' or '.join(MODE_NAMES[m] for m in v)}"
    if k == "member":
        return "it is read only when the dual model trains f_R (no --robust-ckpt)"
    return f"it applies to {CONTEXT_FLAGS[k]} {', '.join(v)}, not {', '.join(sorted(ctx.get(k, ())))}"

def refuse_unread(given: set, ctx: dict) -> None:
    """Every setting given is read by this run, or the run is refused before anything happens (rule: no flag is
    silently ignored). `given`: field names (and lipschitz_n / overwrite) the user set."""
    for name in sorted(given):
        why = unread_reason(field_where(name), ctx)
        flag = "--" + ("no-augment" if name == "augment" else name.replace("_", "-"))
        if why and ctx["mode"] == {"resume"}:
            raise UserError(f"--resume continues the saved run with its own settings; drop {flag} (only --out and "
                            "--device may change)")
        check(why is None, f"{flag} is not read by this run: {why}; leave it out")

# ==== 8. Setup: the device chosen in one place, data parallelism, files written atomically =========================
def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm's per-channel map y = x * s + t: s = w / sqrt(running_var + eps),
    t = b - running_mean * s. -> (s, t), each (C,)"""
    s = (bn.running_var + bn.eps).rsqrt()
    return (s * bn.weight, bn.bias - bn.running_mean * s * bn.weight) if bn.affine else (s, -bn.running_mean * s)

def folds(conv: nn.Module, bn: nn.Module, x: torch.Tensor) -> bool:
    """Whether a Conv2d and the BatchNorm2d right after it (paired by Runtime.prepare) run as one convolution: both in
    eval mode, x a float32 CPU feature map, no autocast. The BatchNorm then passes its input on (affine_eval)."""
    return (not conv.training and not bn.training and x.is_cpu and x.dim() == 4 and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))

def affine_eval(bn: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """An eval-mode BatchNorm on a float32 CPU feature map as the per-channel affine map it then is: y = x * s + t
    (bn_scale_shift), or x itself where the convolution before it folded it in (`pair`, FoldingConv2d); None where
    neither applies. Same function up to float rounding; its backward (every attack step's) is one multiply, where
    PyTorch's CPU batch-norm backward is a reduction kernel (PGD-10 on the demo's model: 5-10% faster on CPU). Every
    eval-mode BatchNorm of a prepared model on a CPU runs it, the --sync-bn SyncBatchNorm included."""
    if bn.training or bn.running_mean is None or x.dtype != torch.float32 or not x.is_cpu or x.dim() != 4:
        return None
    if hasattr(bn, "pair") and folds(bn.pair[0], bn, x):
        return x
    s, t = bn_scale_shift(bn)
    return torch.addcmul(t.view(1, -1, 1, 1), x, s.view(1, -1, 1, 1))

class AffineEvalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that runs in eval mode on a CPU as affine_eval; same parameters and buffers, training unchanged."""
    def forward(self, x):
        y = affine_eval(self, x)
        return super().forward(x) if y is None else y

class SubsamplingConv2d(nn.Conv2d):
    """A Conv2d on a CPU (Runtime.prepare gives every one this class): where a strided 1x1 convolution (a ResNet
    shortcut) can take a weight gradient, it runs as what it is, subsampling and then a 1x1 convolution: the same
    sums. oneDNN's channels_last weight gradient of the strided one corrupts the heap at 3-8 input channels (torch
    2.14, float32 and bf16: `--precision bf16` on a CPU crashed at width 0.125; README "Speed"). Passes without
    weight gradients (the attacks, `frozen`) keep the strided kernel."""
    def _conv_forward(self, x, w, b):
        if w.requires_grad and self.kernel_size == (1, 1) and self.stride != (1, 1) and self.padding == (0, 0):
            return F.conv2d(x[:, :, ::self.stride[0], ::self.stride[1]], w, b, 1, 0, self.dilation, self.groups)
        return super()._conv_forward(x, w, b)

class FoldingConv2d(SubsamplingConv2d):
    """A Conv2d followed by a BatchNorm2d: in eval mode on a float32 CPU one convolution with the BatchNorm folded in,
    W' = W * s (per output channel), b' = t (bn_scale_shift), and the BatchNorm passes its input on: an attack
    step's forward and backward skip a pass over each feature map (README "Speed" has the measurement). Same
    function up to float rounding; training is unchanged. `pair` holds the BatchNorm (in a tuple: not a submodule;
    a BatchNorm swapped by class, as --sync-bn does, stays paired; one replaced by another module does not)."""
    def forward(self, x):
        bn = self.pair[0]
        if not folds(self, bn, x):
            return super().forward(x)
        s, t = bn_scale_shift(bn)
        w = self.weight * s.view(-1, 1, 1, 1)
        # channels_last: oneDNN's NHWC kernels are 1.3-3x faster at few channels (the attacks' passes)
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
        return self._conv_forward(x, w, t if self.bias is None else t + self.bias * s)

class FoldedBatchNorm(AffineEvalBatchNorm):
    """The BatchNorm2d after a FoldingConv2d (its `pair`): where the convolution folded it in, the identity; else as
    before (both decided by affine_eval)."""

@dataclass
class Runtime:
    """Device, autocast dtype and memory format: chosen once here, used everywhere."""
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # bf16 on CUDA, None (float32) on CPU unless --precision bf16
    channels_last: bool  # NHWC activations: faster convolutions on tensor cores and in oneDNN. Not the whole
    # model in float32 on CPU: BatchNorm's channels_last training kernel normalises less exactly (3e-6 to 4e-5
    # from float64, NCHW 4e-7) and a training step ran no faster (README "Speed"); eval-mode passes, whose
    # BatchNorm is folded, run channels_last there per folded convolution (FoldingConv2d)

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.device.type == "cuda":  # autotune convolutions per shape, except in an MoE (a module with experts),
            # where every step brings new per-expert batch sizes, each a synchronising tuning
            torch.backends.cudnn.benchmark = not any(hasattr(m, "experts") for m in model.modules())
        else:  # CPU: every Conv2d a SubsamplingConv2d; eval-mode BatchNorm as an affine map or folded into the
            # convolution before it (the attacks')
            for m in model.modules():
                if type(m) in (nn.BatchNorm2d, nn.Conv2d):
                    m.__class__ = AffineEvalBatchNorm if type(m) is nn.BatchNorm2d else SubsamplingConv2d
            for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
                for conv, bn in zip(seq, seq[1:]):
                    if type(conv) is SubsamplingConv2d and type(bn) is AffineEvalBatchNorm:
                        conv.__class__, bn.__class__ = FoldingConv2d, FoldedBatchNorm
                        conv.pair, bn.pair = (bn,), (conv,)
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

def make_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """`auto` picks CUDA when present. bf16 autocast and channels_last on CUDA (float32 leftovers on TF32 tensor
    cores); on CPU float32 in the default layout, or bf16 + channels_last."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    check(device != "cuda" or torch.cuda.is_available(), "--device cuda asked for, but torch sees no CUDA GPU; "
                                                         "use --device cpu or auto")
    dev, dtype = torch.device(device), amp_dtype(device, precision)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return Runtime(dev, dtype, dev.type == "cuda" or dtype is not None)

def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA) and numpy. Called at the start of every epoch with a seed derived from (run seed,
    epoch), so a resumed run repeats the uninterrupted one."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)

# ---- Data parallelism (torchrun): N processes ("ranks"), each with its share of every global batch ----------------
# `torchrun --nproc_per_node=N moe_robust.py ...` starts N copies with RANK, WORLD_SIZE and LOCAL_RANK set; without
# it everything below is a no-op and a run is exactly the single-process one. What a rank does differently:
#  - it trains on rows [start, stop) of each global batch (Shard, set by data_shard around each step); every rank
#    draws the batch's order, augmentation and the attacks' random starts for the whole global batch and keeps its
#    rows (shard_rand), so N ranks draw what one process would;
#  - before each optimiser step, one all-reduce makes every gradient the global batch's (sync_gradients), and the
#    balance loss uses the global batch's routing fractions (global_fraction);
#  - BatchNorm statistics are per rank, or the global batch's with --sync-bn (SyncBatchNorm);
#  - only rank 0 validates, writes files and logs; the final evaluation is split across ranks and added up.
# None of it is in the pieces people copy: data_parallel sets it from outside, through the optimisers' step hooks,
# the MoE layers' two hook slots and rows_rand (section 3), as forced_routes sets an MoE's `control`.
class Shard(NamedTuple):
    start: int  # this rank's rows [start, stop) of a global batch of `total` rows
    stop: int
    total: int

SHARD: Optional[Shard] = None  # set by data_shard around each training step under torchrun

def world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)

def is_main() -> bool:
    return world()[0] == 0

def start_distributed(device: str) -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL on GPUs (one per process: cuda:LOCAL_RANK) or
    gloo on CPUs. Called once by main before anything else."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")

def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """t reduced over every rank (sum by default), on t's device; t itself in one process. (NCCL reduces CUDA
    tensors only, so host tensors travel through the GPU there.)"""
    if world()[1] == 1:
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    r = t.detach().to(dev).clone()
    dist.all_reduce(r, op or dist.ReduceOp.SUM)
    return r.to(t.device)

def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()

@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (a download happens once), then the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()

def shard_rows(n: int) -> tuple[int, int]:
    """This rank's rows [start, stop) of n rows: N near-equal contiguous parts."""
    rank, size = world()
    return rank * n // size, (rank + 1) * n // size

def shard_rand(x: torch.Tensor, fill: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """rows_rand under torchrun: when x is this rank's share of the global batch (SHARD), the random numbers are
    drawn for the whole global batch and this rank's rows kept: N ranks draw exactly what one process would, and
    their generators stay in step."""
    s = SHARD
    if s is None or len(x) != s.stop - s.start:
        return fill(torch.empty_like(x))
    return fill(x.new_empty((s.total,) + x.shape[1:]))[s.start:s.stop]

@contextlib.contextmanager
def data_shard(total: int):
    """Around one training step under torchrun: this rank's rows of a global batch of `total` (SHARD), and the
    attacks' random draws made for the global batch (rows_rand -> shard_rand). -> the Shard"""
    global SHARD, rows_rand
    plain, SHARD, rows_rand = rows_rand, Shard(*shard_rows(total), total), shard_rand
    try:
        yield SHARD
    finally:
        SHARD, rows_rand = None, plain

def share() -> float:
    """This rank's share of the current global batch (1 outside a data-parallel step)."""
    return 1.0 if SHARD is None else (SHARD.stop - SHARD.start) / SHARD.total

def global_fraction(frac: torch.Tensor) -> torch.Tensor:
    """The MoE layers' `fraction` hook: f_i of the balance loss (Switch eq. 4) over the global batch's rows. Each
    rank's term E sum_i f_i P_i,r, weighted by its share as sync_gradients weighs the ranks, then adds up to the
    global batch's balance loss and gradient: the loss means the same at any N. (Switch and GShard compute it per
    device instead, which at N = 1 is the same.)"""
    return frac if SHARD is None else all_reduce(frac * share())

def sync_gradients(params: list[nn.Parameter], weight: float) -> None:
    """Data parallelism's one collective per optimiser step (data_parallel hooks it before each step): each gradient
    becomes sum over ranks of weight_r * grad_r, weight_r = this rank's rows / the global batch's rows, which is the
    gradient of the global batch's mean loss whatever the shares. An expert idle on this rank sends zeros; a
    parameter that no rank used (an expert without rows anywhere) keeps no gradient, as in one process, where SGD
    then leaves it alone. One flat buffer, one all-reduce. torch's DistributedDataParallel would overlap it with the
    backward, but it needs find_unused_parameters (a graph walk per step) for idle experts and hooks every backward
    through the model, the attacks' input-gradient ones included; an adversarial step makes ~11 forward-backward
    passes per optimiser step, so the overlap would buy little here."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    flat = all_reduce(torch.cat([g.reshape(-1).float() * weight for g in grads] + [used]))
    anywhere = flat[-len(params):].tolist()  # one read-back per optimiser step, under torchrun only
    for p, g, u in zip(params, flat[:-len(params)].split([g.numel() for g in grads]), anywhere):
        p.grad = g.view_as(p).to(p.dtype) if u > 0 else None

class AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable. Every rank's loss depends on the sum, so its gradient is the sum over ranks of
    their gradients, each weighted by its rank's share w_s; divided by this rank's w_r, which sync_gradients
    multiplies back. (Equal shares: the plain sum.)"""
    @staticmethod
    def forward(ctx, t):
        return all_reduce(t)

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g * share()) / share()

def run_idle_expert(expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An expert on zero rows with its parameters detached: it takes part in every BatchNorm collective, forward and
    backward, like the ranks where it has rows, and gets no gradient here (a parameter no rank used keeps none)."""
    return torch.func.functional_call(expert, {n: p.detach() for n, p in expert.named_parameters()}, (x,))

class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """--sync-bn: BatchNorm whose training statistics are the global batch's, per channel over every rank's rows
    (two differentiable all-reduces: the sum, then the squared deviations), so N ranks train what one process
    would (to float rounding: on a CPU in float64, as BatchNorm's own CPU kernel effectively is; in float32 a
    channel that barely varies turns the rounding of its mean into visible differences); eval uses the running
    statistics. An expert's BatchNorm then takes the statistics of all rows routed to it on any rank, so every rank
    must run every expert, idle ones on zero rows (MoE.run_idle). torch.nn.SyncBatchNorm does the same with fused
    kernels, on CUDA only; this one runs on gloo too."""

    def _check_input_dim(self, x):
        check(x.dim() >= 2, f"SyncBatchNorm needs (N, C, ...) input, got {tuple(x.shape)}")

    def forward(self, x):
        if not (self.training and world()[1] > 1):  # eval: as one process computes it (Runtime.prepare, on a CPU)
            y = affine_eval(self, x)
            return super().forward(x) if y is None else y
        dims, shape = [0] + list(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2)
        h = x.double() if x.is_cpu else x.float()  # as precise as BatchNorm's own kernel there (CPU: float64)
        local = torch.cat([h.sum(dims), h.new_tensor([h.numel() / h.shape[1]])])  # (C + 1,): sums, row count
        total = AllReduceSum.apply(local)
        count = total[-1].detach()
        mean = total[:-1] / count.clamp(min=1)
        var = AllReduceSum.apply((h - mean.view(shape)).pow(2).sum(dims)) / count.clamp(min=1)
        out = (h - mean.view(shape)) * (var + self.eps).rsqrt().view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:  # nothing routed anywhere: the statistics stay as they are
            with torch.no_grad():
                m, seen = self.momentum, count > 1
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_mean.copy_(torch.where(seen, (1 - m) * self.running_mean + m * mean.detach(),
                                                    self.running_mean))
                self.running_var.copy_(torch.where(seen, (1 - m) * self.running_var + m * unbiased,
                                                   self.running_var))
                self.num_batches_tracked += (count > 0).long()  # as in one process, which skips such an expert
        return out.to(x.dtype)

def data_parallel(model: nn.Module, opts: list, sync_bn: bool) -> None:
    """Under torchrun, make a method's model and optimisers data-parallel: each optimiser syncs its gradients before
    it steps, each MoE layer takes its routing fractions over the global batch, and with sync_bn every BatchNorm
    becomes a SyncBatchNorm (same parameters and buffers: checkpoints do not change) and every MoE layer runs its
    idle experts on zero rows."""
    if world()[1] == 1:
        return
    for o in opts:
        o.register_step_pre_hook(lambda o, args, kwargs: sync_gradients(
            [p for g in o.param_groups for p in g["params"]], share()) if SHARD is not None else None)
    for m in model.modules():
        if hasattr(m, "fraction"):
            m.fraction, m.run_idle = global_fraction, run_idle_expert if sync_bn else None
        if sync_bn and type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, AffineEvalBatchNorm, FoldedBatchNorm):
            m.__class__ = SyncBatchNorm

def average_buffers(model: nn.Module) -> None:
    """Per-rank BatchNorm: every float buffer (running statistics) set to its mean over the ranks, so that every
    rank evaluates, and rank 0 saves, the same model. (With --sync-bn they are equal already.)"""
    size = world()[1]
    for b in model.buffers() if size > 1 else ():
        if b.is_floating_point():
            b.copy_(all_reduce(b) / size)

def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file, and an interrupted
    write leaves no temporary file (a SIGKILL can: see remove_stale_temps). Under torchrun only rank 0 writes."""
    if not is_main():
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def remove_stale_temps(folder: Path) -> None:
    """Remove the temporary files of writes that a killed process never finished."""
    for p in Path(folder).glob(".*.tmp*"):
        p.unlink(missing_ok=True)

def strict_json(obj):
    """obj with every non-finite float replaced by None: JSON has no NaN or Infinity."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj

def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(strict_json(obj), indent=1, allow_nan=False)))

def read_json(path: Path) -> dict:
    """A JSON object from `path`; a clear error if it is not one (nothing is overwritten)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}); move it away or use another --out") from None
    check(isinstance(obj, dict), f"{path} does not hold a JSON object; move it away or choose another --out")
    return obj

def check_writable(folder: str, flag: str = "--out") -> Path:
    """Prove that `folder` is, or can be created as, a writable folder, without writing anything."""
    p = Path(folder)
    check(not p.is_file(), f"{flag} {folder} is a file; give a folder")
    base = next(a for a in (p, *p.parents) if a.exists())
    why = "read-only" if base.is_dir() else "not a folder"
    check(base.is_dir() and os.access(base, os.W_OK | os.X_OK), f"{flag} {folder} is not a writable folder ({base} is "
                                                                 f"{why})")
    return p

def check_targets(folder: str, files: tuple, flag: str = "--out") -> Path:
    """check_writable, and no file a run will write in `folder` is blocked by a folder of that name."""
    p = check_writable(folder, flag)
    for f in files:
        check(not (p / f).is_dir(), f"{flag} {folder}: {p / f} is a folder where a file must go; move it away")
    return p

LOCKS: dict = {}  # folder -> this process's open lock file on it

def lock_folder(folder: Path, flag: str = "--out") -> None:
    """Create `folder` and hold it for this process (an advisory lock on folder/.lock, gone when the process is): a
    second run into a folder in use is refused, so it neither clobbers files nor loses a record. Released when the
    run that took it returns (holds_folders); rank 0 alone writes, so it alone locks."""
    if not is_main() or str(Path(folder).resolve()) in LOCKS:
        return
    writable_folder(str(folder), flag)
    f = open(Path(folder) / ".lock", "a+")
    try:
        import fcntl  # POSIX; elsewhere no lock is taken
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise UserError(f"{flag} {folder} is in use by another run (process {holder}); wait for it to end or choose "
                        "another folder") from None
    f.seek(0), f.truncate(), f.write(str(os.getpid())), f.flush()
    LOCKS[str(Path(folder).resolve())] = f

def holds_folders(fn: Callable) -> Callable:
    """Decorator: the folders `fn` locks (lock_folder) are released when it returns or raises."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        before = set(LOCKS)
        try:
            return fn(*args, **kwargs)
        finally:
            for k in set(LOCKS) - before:
                LOCKS.pop(k).close()
    return run

def writable_folder(folder: str, flag: str = "--out") -> Path:
    """Create `folder` (checked by check_writable) and prove it is writable: the first write of a run."""
    p = check_writable(folder, flag)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {folder} is not a writable folder ({e.strerror or type(e).__name__})") from None
    return p

def read_records(path: Path) -> list:
    """The entries of a record file (eval.json, lipschitz.json: {"records": [...]}), read before the work so that a
    broken file stops the run early, and again by add_record. Records only grow."""
    if not Path(path).exists():
        return []
    obj = read_json(path)
    entries = obj.get("records", [obj])  # a file of one entry, as earlier versions wrote it
    check(isinstance(entries, list), f"{path} is not a record file (its 'records' is not a list); move it away")
    return entries

def add_record(path: Path, entry: dict) -> int:
    """Append `entry` to the record file (its folder locked by this run). -> the number of records now"""
    entries = read_records(path) + [entry]
    write_json(path, {"records": entries})
    return len(entries)

# ==== 9. Data: uint8 tensors in memory, float [0, 1] batches on the device =========================================
# Every loader returns a `Dataset` of uint8 images (N, 3, H, W) and int64 labels (N,). Batches are cast to float in
# [0, 1] on the device and augmented there (random crop with zero padding + horizontal flip, the CIFAR recipe).
NORM_STATS = {  # per-channel mean/std of the Normalize layer inside each model
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # for imagefolder
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    "random": ((0.5, 0.5, 0.5), (0.2887, 0.2887, 0.2887)),  # uniform [0, 1]: std 1/sqrt(12)
}

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
    plus smooth per-image noise (`noise` per cell) and 1/255 pixel noise. A robust model can trust only the pair
    (robust accuracy near 0.5). Layouts are fixed (seed 1234); `seed` draws the examples."""
    check(num_classes % 2 == 0, f"synthetic needs an even number of classes, got {num_classes}")
    base, pairs = torch.Generator().manual_seed(1234), num_classes // 2
    strong_layouts = strong * (torch.rand(pairs, 3, 4, 4, generator=base) * 2 - 1)  # (C/2, 3, 4, 4)
    weak_layouts = weak * (torch.randint(0, 2, (num_classes, 3, 4, 4), generator=base).float() * 2 - 1)  # (C, 3, 4, 4)
    cells = 0.5 + strong_layouts[torch.arange(num_classes) % pairs] + weak_layouts  # (C, 3, 4, 4)

    def draw(n: int, g: torch.Generator):
        y = torch.randint(0, num_classes, (n,), generator=g)
        low = cells[y] + noise * torch.randn(n, 3, 4, 4, generator=g)  # (n, 3, 4, 4)
        x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        x = x + torch.randn(n, 3, size, size, generator=g) / 255
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y
    tx, ty = draw(n_train, torch.Generator().manual_seed(seed * 2 + 1))
    return Dataset(tx, ty, *draw(n_test, torch.Generator().manual_seed(seed * 2 + 2)), num_classes, "synthetic")

def make_random(n_train: int = 50000, n_test: int = 10000, seed: int = 0, size: int = 32) -> Dataset:
    """Uniform noise with random labels in CIFAR-10's shape: for timing a full-size epoch offline."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: (torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (n,), generator=g))
    return Dataset(*draw(n_train), *draw(n_test), 10, "random")

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
    (offline, the error says where to put the archive). Read here, so that only the layout matters."""
    root, classes = Path(data_dir), 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if not folder.is_dir():
        made = next(a for a in (root, *root.parents) if a.exists())  # a failed download leaves no folder behind
        try:
            import torchvision  # only needed for the download
            (torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100)(
                str(root), train=True, download=True)
        except Exception as e:  # offline, or no write access
            if made != root:
                import shutil
                shutil.rmtree(made / root.relative_to(made).parts[0], ignore_errors=True)
            raise UserError(f"{name} not found in {root}/ and the download failed ({type(e).__name__}); put "
                            f"{name.replace('cifar', 'cifar-')}-python.tar.gz from https://www.cs.toronto.edu/~kriz/ "
                            f"extracted into {root}/") from None

    def read(fn):
        bad = lambda why: UserError(f"{name}: {folder / fn} is not a CIFAR batch ({why}); re-extract the archive")
        try:
            with open(folder / fn, "rb") as f:
                d = CifarUnpickler(f, encoding="latin1").load()
        except Exception as e:
            raise bad(f"cannot read it: {e if isinstance(e, pickle.UnpicklingError) else type(e).__name__}") from None
        if not isinstance(d, dict) or "data" not in d or not ({"labels", "fine_labels"} & set(d)):
            raise bad("expected a dict with 'data' and 'labels'")
        try:
            x, y = np.asarray(d["data"]), np.asarray(d.get("labels", d.get("fine_labels")))
        except (TypeError, ValueError, OverflowError):
            raise bad("data or labels are not numbers") from None
        if x.dtype != np.uint8:  # a cast would turn floats in [0, 1] into black images
            raise bad(f"pixels are {x.dtype}; expected uint8 values 0..255")
        if y.dtype.kind not in "iu":
            raise bad(f"labels are {y.dtype}; expected whole numbers")
        y = y.astype(np.int64)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (len(x),):
            raise bad(f"data {tuple(x.shape)}, labels {tuple(y.shape)}; expected (N, 3072) and (N,)")
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise bad(f"label {int(y.max() if y.max() >= classes else y.min())} outside 0..{classes - 1}")
        return torch.from_numpy(x.reshape(-1, 3, 32, 32)), torch.from_numpy(y)
    parts = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]) if name == "cifar10" else (["train"], ["test"])
    (tx, ty), (vx, vy) = [map(torch.cat, zip(*map(read, files))) for files in parts]
    return Dataset(tx, ty, vx, vy, classes, name)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

def read_images(paths: list[Path], size: int) -> torch.Tensor:
    """Images as RGB, shorter side resized to `size`, centre-cropped: (N, 3, size, size) uint8."""
    from PIL import Image  # Pillow comes with torchvision
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                s = size / min(im.size)
                im = im.convert("RGB").resize(tuple(max(size, round(v * s)) for v in im.size), Image.BILINEAR)
                left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
                im = im.crop((left, top, left + size, top + size))
                out[i] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
        except Exception as e:
            raise UserError(f"cannot read image {p} ({type(e).__name__}: {e})") from None
    return out

def class_images(folder: Path, classes: list[str], what: str, need_all: bool) -> tuple[list[Path], list[int]]:
    """The images of folder/<class>/ (or folder/<class>/images/, TinyImageNet's layout), with class indices."""
    paths, labels, kinds = [], [], ", ".join(IMAGE_EXTENSIONS)
    for c in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        check(c in classes, f"{what}: class {c!r} in {folder}/ is not in train/")
        sub = folder / c / "images" if (folder / c / "images").is_dir() else folder / c
        imgs = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        check(len(imgs) > 0 or not need_all, f"{what}: class folder {sub}/ has no images ({kinds}); remove it or "
                                              "add images")
        paths, labels = paths + imgs, labels + [classes.index(c)] * len(imgs)
    check(len(paths) > 0, f"{what}: no images ({kinds}) under {folder}/")
    return paths, labels

def load_tinyimagenet(data_dir: str, size: int = 64) -> Dataset:
    """TinyImageNet-200 from its raw layout: train/<wnid>/images/*.JPEG, and val/images/*.JPEG with
    val/val_annotations.txt (file, wnid, box). Val is the test set."""
    root = Path(data_dir)
    if not (root / "train").is_dir() and (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    ann = root / "val" / "val_annotations.txt"
    check((root / "train").is_dir() and ann.is_file(),
          f"tinyimagenet not found in {data_dir}/: expected train/<wnid>/images/ and val/val_annotations.txt "
          "(unzip tiny-imagenet-200.zip from http://cs231n.stanford.edu/tiny-imagenet-200.zip there)")
    wnids = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    check(len(wnids) >= 2, f"tinyimagenet: {root / 'train'}/ has {len(wnids)} class folders; need at least 2")
    paths, labels = class_images(root / "train", wnids, "tinyimagenet", need_all=False)
    val = [line.split()[:2] for line in ann.read_text().splitlines() if len(line.split()) >= 2]
    for _, w in val:
        check(w in wnids, f"tinyimagenet: {ann} names class {w!r} that train/ lacks")
    check(len(val) > 0, f"tinyimagenet: no images found under {root}/")
    vx = read_images([root / "val" / "images" / f for f, _ in val], size)
    return Dataset(read_images(paths, size), torch.tensor(labels), vx, torch.tensor([wnids.index(w) for _, w in val]),
                   len(wnids), "tinyimagenet")

def load_imagefolder(data_dir: str, size: int = 32) -> Dataset:
    """Any `data_dir` with train/ and test/ (or val/) holding one sub-folder per class; images of any size are
    resized (shorter side) and centre-cropped to `size`."""
    root, train_dir = Path(data_dir), Path(data_dir) / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    check(train_dir.is_dir() and test_dir is not None,
          f"imagefolder: {data_dir}/ must hold train/ and test/ (or val/) with one sub-folder per class")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    check(len(classes) >= 2, f"imagefolder: {train_dir}/ has {len(classes)} class folders; need at least 2")
    (tp, tl), (vp, vl) = (class_images(d, classes, "imagefolder", d is train_dir) for d in (train_dir, test_dir))
    return Dataset(read_images(tp, size), torch.tensor(tl), read_images(vp, size), torch.tensor(vl), len(classes),
                   "imagefolder")

def load_dataset(name: str, data_dir: str = "data", image_size: Optional[int] = None, seed: int = 0,
                 train_limit: Optional[int] = None, test_limit: Optional[int] = None) -> Dataset:
    """Load by name; `train_limit`/`test_limit` keep only the first N examples."""
    check(name in DATASETS, f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if name in ("synthetic", "random"):  # generated in memory: keep the request to what fits
        for flag, v in (("--train-limit", train_limit), ("--test-limit", test_limit)):
            check(v is None or v <= 100_000, f"{flag} {v} too large for generated data ({name}); allowed: 1..100000")
        make, n = (make_synthetic, (6000, 1000)) if name == "synthetic" else (make_random, (50000, 10000))
        data = make(train_limit or n[0], test_limit or n[1], seed=0, size=image_size or 32)
    else:
        cifar = name in ("cifar10", "cifar100")
        check(cifar or Path(data_dir).is_dir(), f"--data-dir {data_dir!r} does not exist or is not a directory "
                                                f"(needed for {name})")
        check(not cifar or image_size in (None, 32), f"{name} images are 32x32; --image-size {image_size} not allowed")
        data = (load_cifar(name, data_dir) if cifar else load_tinyimagenet(data_dir, image_size or 64)
                if name == "tinyimagenet" else load_imagefolder(data_dir, image_size or 32))
    data.train_x, data.train_y = data.train_x[:train_limit], data.train_y[:train_limit]  # [:None] keeps all
    data.test_x, data.test_y = data.test_x[:test_limit], data.test_y[:test_limit]
    return check_dataset(data)

def check_dataset(d: Dataset) -> Dataset:
    """A Dataset is what it claims: uint8 images (N, 3, S, S) of one size, int64 labels 0..classes-1, a train and a
    test split that are not empty. Every loader's result passes here before any training."""
    what = f"data set {d.name}"
    check(isinstance(d.num_classes, int) and d.num_classes >= 2, f"{what}: {d.num_classes} classes; need at least 2")
    for split, x, y in (("train", d.train_x, d.train_y), ("test", d.test_x, d.test_y)):
        check(torch.is_tensor(x) and x.dtype == torch.uint8, f"{what}: {split} images are "
              f"{getattr(x, 'dtype', type(x).__name__)}; expected uint8 pixel values 0..255")
        check(x.dim() == 4 and x.shape[1] == 3 and x.shape[2] == x.shape[3] == d.train_x.shape[-1],
              f"{what}: {split} images have shape {tuple(x.shape)}; expected (N, 3, S, S) with the train split's S")
        check(torch.is_tensor(y) and y.dtype == torch.int64 and y.shape == (len(x),),
              f"{what}: {split} labels must be int64 of shape ({len(x)},)")
        check(len(x) > 0, f"{what}: the {split} split is empty")
        check(int(y.min()) >= 0 and int(y.max()) < d.num_classes,
              f"{what}: {split} label {int(y.max() if y.max() >= d.num_classes else y.min())} outside "
              f"0..{d.num_classes - 1}")
    return d

def split_validation(x: torch.Tensor, y: torch.Tensor, n_val: int, seed: int):
    """Hold out `n_val` training examples (a fixed random subset) for model selection: the test set never chooses a
    checkpoint (robust overfitting, Rice et al. 2020)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[n_val:]], y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]]

def augment(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding `pad`) + horizontal flip of a float batch (B, C, H, W), on its device, with the
    global torch RNG (seeded per epoch)."""
    B, C, H, W = x.shape
    dy, dx = (torch.randint(0, 2 * pad + 1, (B,), device=x.device) for _ in range(2))
    rows = torch.arange(H, device=x.device)[None] + dy[:, None]  # (B, H)
    cols = torch.arange(W, device=x.device)[None] + dx[:, None]  # (B, W)
    b, c = torch.arange(B, device=x.device)[:, None, None, None], torch.arange(C, device=x.device)[None, :, None, None]
    out = F.pad(x, (pad, pad, pad, pad))[b, c, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)
    return torch.where((torch.rand(B, device=x.device) < 0.5)[:, None, None, None], out.flip(3), out)

def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device,
            shuffle: bool = False, train_augment: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float images in [0,1], labels) on `device`; shuffling uses the global RNG. Training keeps the whole
    uint8 set on the device (150 MB for CIFAR-10), so a batch is a gather, a cast and the augmentation there: no
    host work, no copy, no sync per step."""
    order = torch.randperm(len(x), device=x.device) if shuffle else torch.arange(len(x), device=x.device)
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        xb = x[idx].to(device, non_blocking=True).float().div_(255)
        xb = augment(xb, pad=max(1, xb.shape[-1] // 8)) if train_augment else xb
        yield xb, y[idx].to(device, non_blocking=True)

# ==== 10. The training loop: checkpoints, validation, resume, the dual model =======================================
CHECKPOINT_VERSION = 1
RUN_FILES = ("last.pt", "best.pt", "metrics.json")  # a folder holding any of these holds a run

def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then rename: an interruption never leaves a broken file."""
    atomic_write(path, lambda p: torch.save(state, p))

def check_checkpoint_file(path: str) -> Path:
    p = Path(path)
    check(not p.is_dir(), f"checkpoint {path!r} is a folder; give a checkpoint file such as {p / 'best.pt'}")
    check(p.is_file(), f"checkpoint {path!r} does not exist")
    return p

def load_checkpoint(path: str) -> dict:
    p = check_checkpoint_file(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path!r} is corrupt or not a moe-robust checkpoint ({type(e).__name__})") from None
    check(isinstance(state, dict) and state.get("version") == CHECKPOINT_VERSION and "config" in state,
          f"checkpoint {path!r} is not a moe-robust checkpoint (version {CHECKPOINT_VERSION})")
    missing = [k for k in ("num_classes", "image_size", "epoch") if k not in state]
    missing += [] if "model" in state or "method" in state else ["model"]
    check(not missing, f"checkpoint {path!r} is incomplete (no {', '.join(missing)}); not written by moe_robust.py")
    check(isinstance(state["config"], dict), f"checkpoint {path!r} is incomplete (its config is not a dict)")
    try:
        config_from_dict(state["config"]).validate()
    except UserError as e:
        raise UserError(f"checkpoint {path!r} holds an invalid config ({e})") from None
    for k in ("num_classes", "image_size", "epoch"):
        check(type(state[k]) is int and state[k] >= 0, f"checkpoint {path!r} has a bad {k} {state[k]!r}")
    weights = state["model"] if "model" in state else state["method"].get("model") \
        if isinstance(state["method"], dict) else None
    check(isinstance(weights, dict), f"checkpoint {path!r} is incomplete (no model weights)")
    bad = [k for k, t in weights.items() if torch.is_tensor(t) and t.is_floating_point() and not t.isfinite().all()]
    check(not bad, f"checkpoint {path!r} has non-finite weights ({(bad or [''])[0]}): the run that wrote it "
                   "diverged; use an earlier checkpoint")
    return state

def check_fits(state: dict, saved: Config, data: "Dataset", what: str) -> None:
    """A checkpoint's model meets the data it is evaluated on: its classes, image size and normalisation (the data
    set it was trained on)."""
    check(saved.dataset == data.name, f"{what} was trained on {saved.dataset}, not on the {data.name} data it would be "
                                      "evaluated on (each data set has its own normalisation)")
    check(state["num_classes"] == data.num_classes, f"{what} has {state['num_classes']} classes; the {data.name} data "
                                                    f"has {data.num_classes}")
    check(state["image_size"] == data.image_size, f"{what} takes {state['image_size']}x{state['image_size']} images; "
                                                  f"the {data.name} data has {data.image_size}x{data.image_size}")

def config_from_dict(d: dict) -> Config:
    """A saved config; fields it predates take the value that reproduces it (the papers' router)."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{"router": "linear", **{k: v for k, v in d.items() if k in known}})

def build_run_model(cfg: Config, num_classes: int, image_size: int) -> nn.Module:
    """The model a run trains and evaluates: one network, or for jtdmoe a DualModel of two."""
    mc = model_config(cfg, num_classes, image_size)
    if cfg.method == "jtdmoe":
        return DualModel(build_model(mc), build_model(mc), cfg.dual_a, cfg.dual_mix)
    return build_model(mc)

def log(msg: str) -> None:
    if is_main():  # under torchrun rank 0 speaks for all
        print(msg, flush=True)

def check_resume(resume: bool, overwrite: bool) -> None:
    check(not (resume and overwrite), "--resume and --overwrite contradict each other; give one")

class Trainer:
    """What the training loop holds for one method: the model, its optimisers and cosine schedules. `step` trains on
    one batch with the method's step function (section 4) and returns 0-dim tensors to log, left on the device (the
    loop reads them once per epoch, so a step never waits for the GPU). Optimisers: one over every parameter; advmoe
    [experts, routers] (--router-lr; the routers' schedule per --router-schedule); jtdmoe [f_R, f_S]."""

    def __init__(self, model: nn.Module, cfg: Config, total_steps: int):
        self.model, self.cfg = model, cfg
        if cfg.method == "advmoe":
            router = router_parameters(model)
            check(len(router) > 0, "advmoe needs MoE layers (--arch moe-resnet18 or moe-vit)")
            ids = {id(p) for p in router}
            self.opts = [sgd([p for p in model.parameters() if id(p) not in ids], cfg),
                         sgd(router, cfg, cfg.router_lr)]  # router_lr None: --lr
        elif cfg.method == "jtdmoe":
            self.opts = [sgd(model.robust.parameters(), cfg), sgd(model.standard.parameters(), cfg)]
        else:
            self.opts = [sgd(model.parameters(), cfg)]
        scheduled = self.opts[:1] if cfg.method == "advmoe" and cfg.router_schedule != "cosine" else self.opts
        self.scheds = [cosine(o, total_steps) for o in scheduled]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        model, cfg, opts, extra = self.model, self.cfg, self.opts, {}
        if cfg.method == "advmoe":
            loss, logits, extra["router_loss"] = advmoe_step(model, opts[1], opts[0], x, y, cfg)
        elif cfg.method == "jtdmoe":
            loss, logits, extra["robust_loss"] = jtdmoe_step(model, opts[0], opts[1], x, y, cfg)
        else:  # looked up at call time, so a test can stand in for a loss
            loss_fn = {"standard": standard_loss, "at": at_loss, "trades": trades_loss, "rt-er": rter_loss}
            loss, logits = loss_step(model, opts[0], loss_fn[cfg.method], x, y, cfg)
        for s in self.scheds:
            s.step()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in extra.items()},
                "acc": (logits.argmax(1) == y).float().mean()}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opts": [o.state_dict() for o in self.opts],
                "scheds": [s.state_dict() for s in self.scheds]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint, whichever device wrote it: each optimiser keeps the kernel choice (fused / foreach)
        made for this device, not the one saved with its state."""
        self.model.load_state_dict(state["model"])
        for o, st in zip(self.opts, state["opts"]):
            here = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in o.param_groups]
            o.load_state_dict(st)
            for g, h in zip(o.param_groups, here):
                g.update(h)
        for s, st in zip(self.scheds, state["scheds"]):
            s.load_state_dict(st)

EXPLODED = 100.0  # a loss or weight this many times the run's first (at least 1) stops training like a non-finite one

def diverged(cfg: Config, epoch: int, where: str, what: str) -> UserError:
    kept = f"epoch {epoch} is kept in {Path(cfg.out) / 'last.pt'}" if epoch > 0 else "nothing was saved"
    return UserError(f"training diverged in epoch {epoch + 1}, {where}: {what} (lr {cfg.lr}); lower --lr; {kept}")

def largest_weight(model: nn.Module) -> float:
    return torch.stack([p.detach().abs().max().float() for p in model.parameters()]).max().item()

def check_intact(model: nn.Module, vx: torch.Tensor, vy: torch.Tensor, cfg: Config, device: torch.device, epoch: int,
                 start_loss: float, start_weight: float) -> None:
    """After an epoch, on every rank: a model whose weights or clean validation loss are non-finite or EXPLODED times
    the run's start (its first step loss, its largest initial weight; at least 1) is destroyed, however normal its
    last step loss looked (one huge step), and stops the run as divergence does, before anything of it is saved."""
    w, loss = largest_weight(model), evaluate(model, vx, vy, None, device)["clean_loss"]
    for name, v, start in (("largest weight", w, start_weight), ("clean validation loss", loss, start_loss)):
        if not math.isfinite(v) or v > EXPLODED * max(start, 1.0):
            raise diverged(cfg, epoch, "after its last step", f"the {name} is {v:.3g} (the run started at {start:.3g})")
def train_epoch(method: "Trainer", x: torch.Tensor, y: torch.Tensor, cfg: Config, device: torch.device,
                epoch: int, start_loss: Optional[float] = None) -> dict:
    """One pass over (x, y) with method.step. Logs are summed on the device and read back once. Divergence stops the
    run before anything of this epoch is saved (the last good checkpoint stays): a non-finite loss or weight, or a
    loss EXPLODED times the run's first step loss (`start_loss`; None: this epoch's first step is the run's first).
    -> {"train_loss": mean, ..., "images": n, "seconds": training time, "start_loss": the reference}"""
    t0, sums, n = time.time(), {}, 0
    first_bad = torch.tensor(-1, device=device)  # first step with a non-finite or exploded loss, found on the device
    bad_loss = torch.tensor(0.0, device=device)
    limit = torch.tensor(math.inf if start_loss is None else EXPLODED * max(start_loss, 1.0), device=device)
    for step, (xb, yb) in enumerate(batches(x, y, cfg.batch_size, device, shuffle=True, train_augment=cfg.augment)):
        total = len(xb)
        if world()[1] > 1:  # torchrun: every rank drew and augmented the global batch; it trains on its rows
            with data_shard(total) as s:
                xb, yb = xb[s.start:s.stop], yb[s.start:s.stop]
                logs = method.step(xb, yb)
        else:
            logs = method.step(xb, yb)
        if step == 0 and start_loss is None:
            first = logs["loss"].float()
            first = all_reduce(first * len(xb)) / total if world()[1] > 1 else first  # the global batch's
            limit = EXPLODED * first.clamp(min=1.0)
        for k, v in logs.items():  # summed on the device: no host sync per step
            sums[k] = sums.get(k, 0.0) + v.double() * len(xb)
        bad = ~torch.isfinite(torch.stack([v.float() for v in logs.values()])).all() | (logs["loss"].float() > limit)
        new = bad & (first_bad < 0)
        first_bad, bad_loss = torch.where(new, step + 1, first_bad), torch.where(new, logs["loss"].float(), bad_loss)
        n += len(xb)
    if world()[1] > 1:  # every rank's sums and the first bad step of any rank
        sums = dict(zip(sums, all_reduce(torch.stack(list(sums.values()))))) if sums else sums
        n = int(all_reduce(torch.tensor(n)))
        first_bad = -all_reduce(-torch.where(first_bad < 0, 2 ** 40, first_bad), dist.ReduceOp.MAX)
        first_bad = torch.where(first_bad == 2 ** 40, -1, first_bad)
        bad_loss = all_reduce(bad_loss, dist.ReduceOp.MAX)
    sums, bad_step = {k: v.item() for k, v in sums.items()}, first_bad.item()  # the epoch's one read-back
    start_loss = first.item() if start_loss is None else start_loss
    if bad_step > 0:
        loss = bad_loss.item()
        raise diverged(cfg, epoch, f"step {bad_step}/{math.ceil(len(x) / cfg.batch_size)}",
                       f"the loss exploded to {loss:.3g} (the run started at {start_loss:.3g})" if math.isfinite(loss)
                       else "a value is not finite")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {**{f"train_{k}": v / n for k, v in sums.items()}, "images": n, "seconds": time.time() - t0,
            "start_loss": start_loss}

RECORD_FILES = ("eval.json", "lipschitz.json")  # what --eval and --lipschitz add to a run's folder

def record_config(cfg: Config, ctx: dict) -> dict:
    """The settings a run read (each field whose `where` holds in ctx): what a record states as its configuration."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if unread_reason(f.metadata["where"], ctx) is None}

def data_record(cfg: Config, data: Dataset, **sizes) -> dict:
    """Which data a record's numbers come from."""
    return {"dataset": data.name, "data_dir": cfg.data_dir if data.name in READ_FROM_DISK else None,
            "num_classes": data.num_classes, "image_size": data.image_size, **sizes}

def check_run_data(cfg: Config, data: Dataset) -> None:
    """Settings whose meaning depends on the data: APGD-T's targets, an L2 radius."""
    if cfg.eval_suite != "pgd" and cfg.apgd_targets is not None:  # APGD-T's DLR loss needs 4 classes
        check(4 <= data.num_classes and cfg.apgd_targets <= data.num_classes - 1,
              f"--apgd-targets {cfg.apgd_targets} not allowed: {data.name} has {data.num_classes} classes; APGD-T "
              f"runs on 4 or more, with at most classes - 1 targets")
    diameter = math.sqrt(3) * data.image_size  # the L2 distance between a black and a white image
    check(cfg.norm != "l2" or cfg.eps <= diameter, f"--eps {cfg.eps:g} not allowed under l2: no two {data.image_size}x"
                                                   f"{data.image_size} images are further apart than {diameter:.1f}")

def run_data(cfg: Config, data: Optional[Dataset] = None) -> Dataset:
    """The run's data, loaded (or the one given, checked), and the settings that depend on it checked."""
    with main_first():
        data = check_dataset(data) if data is not None else load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size,
                                                                         cfg.seed, cfg.train_limit, cfg.test_limit)
    check_run_data(cfg, data)
    return data

def check_run_folder(cfg: Config, resume: bool, overwrite: bool) -> Optional[dict]:
    """What --out holds agrees with resume/overwrite; for resume, its last.pt (checked). Reads, never writes."""
    out, last = Path(cfg.out), Path(cfg.out) / "last.pt"
    check_targets(cfg.out, RUN_FILES + RECORD_FILES)
    if resume:
        check(last.is_file(), f"nothing to resume: {last} does not exist (an interrupted first epoch saves nothing)")
        state = load_checkpoint(str(last))
        check("method" in state and "history" in state, f"{last} is not a training checkpoint (no optimiser state)")
        hist, best, number = state["history"], state.get("best"), (int, float)
        check(isinstance(hist, list) and len(hist) == state["epoch"] + 1
              and all(isinstance(r, dict) and r.get("epoch") == i + 1 for i, r in enumerate(hist))
              and isinstance(best, dict) and type(best.get("epoch")) is int and isinstance(best.get("score"), number)
              and all(v is None or isinstance(v, number) for v in (state.get("start_loss"), state.get("start_weight"))),
              f"{last} has a damaged or edited history (epochs, best epoch, start loss); it cannot be resumed")
        return state
    found = [f for f in RUN_FILES if (out / f).exists()]
    check(overwrite or not found, f"--out {cfg.out} already holds a run ({', '.join(found)}); pass --resume to "
                                  "continue it, --overwrite to start afresh, or choose another --out")
    return None

def start_writing(out: Path, overwrite: bool, files: tuple) -> None:
    """The first write of a run, after every check: create --out, clear dead temporary files and, with --overwrite,
    remove the earlier run's files (named in the log)."""
    barrier()  # under torchrun every rank has checked its inputs; then rank 0 alone writes
    if not is_main():
        return
    lock_folder(out)
    remove_stale_temps(out)
    gone = [f for f in files if (out / f).exists()] if overwrite else []
    for f in gone:
        (out / f).unlink()
    if gone:
        log(f"--overwrite: removed {', '.join(gone)} of the earlier run in {out}")

@holds_folders
def train(cfg: Config, resume: bool = False, overwrite: bool = False, data: Optional[Dataset] = None) -> dict:
    """Train with `cfg.method`, validate each epoch, keep the best checkpoint, test it. Files in cfg.out: last.pt
    (everything, every epoch), best.pt (best validation epoch), metrics.json (the settings read, the data, per-epoch
    history, final test report). resume=True continues from last.pt and repeats, on CPU, what the uninterrupted run
    would have done: every epoch reseeds the RNG from (seed, epoch). Every input (settings, folder, checkpoint, data,
    split) is checked before the first write. Method 'dual' is run by run_dual (below)."""
    check_resume(resume, overwrite)
    check(cfg.method != "dual", "method 'dual' trains nothing itself: call run_dual")
    out, previous = Path(cfg.out), {}
    state = check_run_folder(cfg, resume, overwrite)
    if state is not None:
        cfg = dataclasses.replace(config_from_dict(state["config"]), out=cfg.out, device=cfg.device)
        previous = read_json(out / "metrics.json") if (out / "metrics.json").exists() else {}
        if state["epoch"] + 1 >= cfg.epochs and "test" in previous:
            remove_stale_temps(out)
            log(f"{out} is finished and tested (epoch {state['epoch'] + 1}/{cfg.epochs}); nothing to do")
            return previous
    cfg.validate()
    runtime = make_runtime(cfg.device, cfg.precision)
    data = run_data(cfg, data)
    n_val = cfg.val_size or min(1000, max(1, len(data.train_x) // 10))
    check(n_val < len(data.train_x), f"--val-size {n_val} leaves no training data ({len(data.train_x)} examples)"
          if cfg.val_size else f"{len(data.train_x)} training example(s) (--train-limit {cfg.train_limit}) leave none "
          f"after the {n_val} held out for validation; need at least 2")
    tx, ty, vx, vy = (t.to(runtime.device) for t in split_validation(data.train_x, data.train_y, n_val, cfg.seed))
    ranks, last = world()[1], len(tx) % cfg.batch_size
    check(cfg.batch_size % ranks == 0, f"--batch-size {cfg.batch_size} is the global batch and does not split into "
                                       f"{ranks} processes; give a multiple of {ranks}")
    check(last == 0 or last >= ranks, f"the last batch of an epoch has {last} examples, fewer than the {ranks} "
                                      "processes; change --batch-size or --train-limit")
    seed_everything(cfg.seed)  # the initial weights
    shape = (data.num_classes, data.image_size)
    model = runtime.prepare(build_run_model(cfg, *shape))
    method = Trainer(model, cfg, cfg.epochs * math.ceil(len(tx) / cfg.batch_size))
    data_parallel(model, method.opts, cfg.sync_bn)  # under torchrun; nothing in one process
    history, best, start, start_loss, start_weight = [], {"epoch": -1, "score": -1.0}, 0, None, largest_weight(model)
    if state is not None:
        check(state["num_classes"] == data.num_classes and state["image_size"] == data.image_size,
              f"{out / 'last.pt'} was trained on data of another shape than {cfg.dataset} in {cfg.data_dir} now has")
        try:
            method.load_state_dict(state["method"])
        except Exception as e:
            raise UserError(f"{out / 'last.pt'} does not fit its own config ({type(e).__name__})") from None
        history, best, start, start_loss = state["history"], state["best"], state["epoch"] + 1, state.get("start_loss")
        start_weight = state.get("start_weight") or largest_weight(model)
    start_writing(out, overwrite, RUN_FILES + RECORD_FILES)  # every input is checked: from here on the run writes
    if state is not None:
        log(f"resumed {out / 'last.pt'} at epoch {start}/{cfg.epochs}"
            + ": all epochs done, testing" * (start >= cfg.epochs))
    if cfg.compile:
        compile_model(method.model)
    selection, params = "val_clean_acc" if cfg.method == "standard" else "val_robust_acc", count_params(model)
    metrics = {**previous, "config": record_config(cfg, run_context(cfg, "train")),
               "data": data_record(cfg, data, train=len(tx), val=n_val, test=len(data.test_x)),
               "model": dataclasses.asdict(model_config(cfg, *shape)), "params": params, "selection": selection,
               "history": history, "best_epoch": best["epoch"]}
    log(f"{cfg.method} | {cfg.arch} on {cfg.dataset} ({len(tx)} train / {n_val} val / {len(data.test_x)} test) | "
        f"{params['total'] / 1e6:.2f}M params ({params['active'] / 1e6:.2f}M active) | {runtime.device}")
    saved = {"version": CHECKPOINT_VERSION, "config": dataclasses.asdict(cfg), "num_classes": data.num_classes,
             "image_size": data.image_size}
    for epoch in range(start, cfg.epochs):
        seed_everything(cfg.seed * 100003 + epoch)
        reset_routing_stats(model)
        t0, row = time.time(), train_epoch(method, tx, ty, cfg, runtime.device, epoch, start_loss)
        n, seconds, start_loss = row.pop("images"), row.pop("seconds"), row.pop("start_loss")
        for m in moe_layers(model):  # torchrun: rows routed on every rank; one model on every rank
            m.counts = all_reduce(m.counts)
        average_buffers(model)
        check_intact(model, vx, vy, cfg, runtime.device, epoch, start_loss, start_weight)
        if not is_main():  # rank 0 validates, saves and logs; the others go on to the next epoch
            continue
        routing, collapsed = routing_health(model, expert_counts(model), f"the rows of epoch {epoch + 1} (attacks "
                                            "included)")
        reset_routing_stats(model)  # expert usage on the clean validation split, in float32 like every report
        with float32_evaluation():
            for xb, _ in batches(vx, vy, 256, runtime.device):
                predict(model, xb)
        usage = expert_counts(model)
        val = evaluate(model, vx, vy, AttackConfig(cfg.eps, cfg.alpha, cfg.val_steps, 1, cfg.norm), runtime.device)
        row = {"epoch": epoch + 1, **row, "val_clean_acc": val["clean_acc"], "val_robust_acc": val["robust_acc"],
               "lr": method.opts[0].param_groups[0]["lr"], "time_s": round(time.time() - t0, 2),
               "images_per_s": round(n / seconds, 1), "expert_usage": usage, "routing": routing}
        history.append(row)
        if row[selection] > best["score"]:
            best = {"epoch": epoch + 1, "score": row[selection]}
            save_checkpoint(out / "best.pt", {**saved, "epoch": epoch, "model": model.state_dict()})
        save_checkpoint(out / "last.pt", {**saved, "epoch": epoch, "method": method.state_dict(), "history": history,
                                          "best": best, "start_loss": start_loss,
                                          "start_weight": start_weight})
        metrics["best_epoch"] = best["epoch"]
        write_json(out / "metrics.json", metrics)
        worst = max(routing, key=lambda r: r["max_share"], default=None)  # every layer's figures: metrics.json
        share = (f" | routing: max share {worst['max_share']:.2f} ({worst['layer']}), min entropy "
                 f"{min(r['entropy'] for r in routing):.2f}") if worst else ""
        log(f"epoch {epoch + 1:3d}/{cfg.epochs} | loss {row['train_loss']:.3f} acc {row['train_acc']:.3f} | val "
            f"clean {row['val_clean_acc']:.3f} robust {row['val_robust_acc']:.3f} | {row['time_s']:.1f}s "
            f"{row['images_per_s']:.0f} img/s{share}")
        for w in collapsed:
            log(f"WARNING: {w}")
    barrier()  # rank 0 has written best.pt
    best_state = load_checkpoint(str(out / "best.pt"))  # the final test: best validation epoch, the full evaluation
    model.load_state_dict(best_state["model"])
    metrics["test"] = {**evaluate_full(model, data.test_x, data.test_y, cfg, runtime.device),
                       "epoch": best_state["epoch"] + 1}
    write_json(out / "metrics.json", metrics)
    log(format_report(metrics["test"], f"test (best val epoch {metrics['test']['epoch']})"))
    return metrics

def load_model(path: str, runtime: Optional[Runtime] = None) -> tuple[nn.Module, Config, dict]:
    """Rebuild the evaluated model of a checkpoint (best.pt or last.pt): (model, config, state)."""
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    model = build_run_model(cfg, state["num_classes"], state["image_size"])
    try:
        model.load_state_dict(state["model"] if "model" in state else state["method"]["model"])
    except Exception as e:
        raise UserError(f"checkpoint {path!r} does not fit its own config ({type(e).__name__})") from None
    return (runtime or make_runtime("auto")).prepare(model), cfg, state

DUAL_ROLES = ("standard", "robust")

@holds_folders
def run_dual(cfg: Config, resume: bool = False, overwrite: bool = False, data: Optional[Dataset] = None) -> dict:
    """--method dual: f_S and f_R from --standard-ckpt / --robust-ckpt, or trained here into OUT/standard (standard
    training) and OUT/robust (--robust-method, RT-ER by default); then f_D = (1 - a) f_S + a f_R is evaluated for
    every a of --dual-sweep (SA, and RA as the minimum over the suite's attacks) and fully at a = --dual-a. Both
    members, their folders and the data are checked before anything is trained or written. metrics.json states the
    dual settings read, each member's checkpoint and saved config, and the data."""
    check_resume(resume, overwrite)
    cfg.validate()
    out = Path(cfg.out)
    check_targets(cfg.out, ("metrics.json",) + RECORD_FILES)
    training = [f for f in ("last.pt", "best.pt") if (out / f).exists()]
    check(not training, f"--out {cfg.out} holds a training run ({', '.join(training)}), not a dual run; "
                        "choose another --out")
    if (out / "metrics.json").exists():
        check(overwrite or resume, f"--out {cfg.out} already holds a dual run; pass --overwrite to redo it, "
                                   "--resume to finish it, or choose another --out")
        check(overwrite or "dual_sweep" in read_json(out / "metrics.json"),
              f"--out {cfg.out} holds a training run's metrics.json, not a dual run; choose another --out")
    runtime = make_runtime(cfg.device, cfg.precision)
    data = run_data(cfg, data)
    plan, sizes = {}, set()  # role -> a checkpoint to load, or the Config to train it with; the members' E
    for role, ckpt in zip(DUAL_ROLES, (cfg.standard_ckpt, cfg.robust_ckpt)):
        if ckpt is not None:
            state = load_checkpoint(ckpt)
            saved = config_from_dict(state["config"])
            check_fits(state, saved, data, f"--{role}-ckpt {ckpt}")
            plan[role], sizes = ckpt, sizes | ({saved.experts} if saved.arch != "resnet18" else set())
            continue
        sizes |= {cfg.experts} if cfg.arch != "resnet18" else set()
        sub = dataclasses.replace(cfg, method="standard" if role == "standard" else cfg.robust_method,
                                  out=str(out / role))
        sub.validate()
        again = resume and (out / role / "last.pt").exists()
        saved = check_run_folder(sub, again, overwrite)
        if saved is not None:  # a resumed member keeps its settings: the flags given must say the same
            kept, ctx = config_from_dict(saved["config"]), run_context(sub, "train")
            differ = [f"--{k.replace('_', '-')} {v!r} (saved: {getattr(kept, k)!r})" for k, v in
                      record_config(sub, ctx).items() if k not in ("out", "device") and getattr(kept, k) != v]
            check(not differ, f"f_{role[0].upper()} in {sub.out} was trained with other settings: {'; '.join(differ)}; "
                              "give the flags of the run you resume")
        plan[role] = sub
    check(len(sizes) <= 1 or cfg.eval_suite != "full", f"f_S and f_R have MoE layers of "
          f"{' and '.join(map(str, sorted(sizes)))} experts: the full suite's per-expert figures force expert i in "
          "every layer; use members with the same --experts or --eval-suite autoattack")
    members = {}
    start_writing(out, overwrite, ("metrics.json",) + RECORD_FILES)
    for role, how in plan.items():
        if isinstance(how, Config):
            log(f"\n== dual model: training f_{role[0].upper()} ({how.method}) into {how.out} ==")
            train(how, resume=resume and (Path(how.out) / "last.pt").exists(), overwrite=overwrite, data=data)
        path = how if isinstance(how, str) else str(Path(how.out) / "best.pt")
        model, saved, state = load_model(path, runtime)
        check_fits(state, saved, data, f"f_{role[0].upper()} ({path})")
        members[role] = (model, {"checkpoint": path, "trained_here": not isinstance(how, str),
                                 "epoch": state["epoch"] + 1,
                                 "config": record_config(saved, run_context(saved, "train"))})
    seed_everything(cfg.seed)  # the attacks' random starts
    models = [members[r][0] for r in DUAL_ROLES]
    report = lambda a, **kw: evaluate_full(DualModel(*models, a, cfg.dual_mix), data.test_x, data.test_y, cfg,
                                           runtime.device, **kw)
    metrics = {"config": record_config(cfg, run_context(cfg, "dual")),
               "data": data_record(cfg, data, test=len(data.test_x)),
               "members": {r: members[r][1] for r in DUAL_ROLES}, "dual_sweep": []}
    log("\n== dual model sweep over a (f_D = (1 - a) f_S + a f_R) ==")
    for a in cfg.sweep_values():
        r = report(a, analysis=False)
        metrics["dual_sweep"].append({"a": a, **{k: r[k] for k in ("clean_acc", "robust_acc", "robust_after")}})
        log(f"a={a:4.2f}  SA {r['clean_acc']:.3f}  RA {r['robust_acc']:.3f}")
    metrics["test"] = {**report(cfg.dual_a), "a": cfg.dual_a}
    write_json(out / "metrics.json", metrics)
    log(format_report(metrics["test"], f"dual model at a={cfg.dual_a}"))
    return metrics

# ==== 11. Benchmark, demo and command line =========================================================================

def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of fn, waiting for the device before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t

def benchmark_moe(device: str = "auto", batch: int = 256, channels: int = 64, size: int = 8,
                  experts: tuple = (1, 2, 4, 8, 16), repeats: int = 10, precision: str = "auto") -> dict:
    """The MoE layer's cost versus E at k = 1: forward + backward time per example of an MoE of conv residual
    branches on (B, C, 8, 8) maps, sparse top-1 against all E experts (soft routing), best of `repeats`. Sparse
    dispatch keeps top-1 flat in E; all-experts grows linearly. -> {"E=4 top-1": us/example, "E=4 all": ...}"""
    rt = make_runtime(device, precision)
    x = torch.rand(batch, channels, size, size, device=rt.device)
    x, results = x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x, {}
    for E in experts:
        torch.manual_seed(0)
        layer = rt.prepare(MoE([residual_branch(channels, channels, channels, 1) for _ in range(E)], channels, k=1))
        for name, ctx in ((f"E={E} top-1", contextlib.nullcontext), (f"E={E} all", lambda: soft_routing(layer))):
            def fwd_bwd():
                with autocast_for(rt.device, precision), ctx():
                    out = layer(x)
                out.float().square().mean().backward()
            fwd_bwd()  # warm-up
            results[name] = round(min(timed(fwd_bwd, rt.device) for _ in range(repeats)) / batch * 1e6, 2)
            layer.zero_grad(set_to_none=True)
        log(f"MoE layer E={E:2d}: top-1 {results[f'E={E} top-1']:8.1f} us/example | "
            f"all experts {results[f'E={E} all']:8.1f}")
    return results

BENCH_ARCHS = ("resnet18", "moe-resnet18", "moe-vit")
BENCH_MODELS = {a: dict(arch=a, experts=4, top_k=1) for a in BENCH_ARCHS}  # name -> settings
BENCH_MODELS["advmoe-layout"] = dict(arch="moe-resnet18", moe_blocks="all", experts=2, expert_ratio=0.5, top_k=1)

def benchmark_training(cfg: Config, iters: Optional[int] = None, warmup: Optional[int] = None,
                       models: tuple = BENCH_ARCHS) -> dict:
    """Images per second of a training step, standard and PGD-10 AT, for ResNet-18, MoE-ResNet18 and MoE-ViT (E = 4,
    k = 1), and with models=tuple(BENCH_MODELS) also AdvMoE's layout (every block an MoE of two half-width experts),
    at cfg's width, batch size, device, precision and --compile, on random CIFAR-10-shaped uint8 data on the
    device fed through the real loop (batches + augment + Trainer.step).
    -> {model: {"standard": img/s, "at": img/s, "at_step_s": seconds, ...}}"""
    rt = make_runtime(cfg.device, cfg.precision)
    cuda = rt.device.type == "cuda"
    iters = iters or (20 if cuda else 2)
    warmup = warmup or ((10 if cfg.compile else 3) if cuda else (3 if cfg.compile else 1))  # compiling happens here
    B, n, gen = cfg.batch_size, cfg.batch_size * (iters + warmup), torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen).to(rt.device)
    y = torch.randint(0, 10, (n,), generator=gen).to(rt.device)
    results = {name: {} for name in models}
    for arch, method in [(a, m) for a in models for m in ("standard", "at")]:
        c = dataclasses.replace(cfg, method=method, train_steps=10, **BENCH_MODELS[arch])
        seed_everything(0)
        model = rt.prepare(build_model(model_config(c, 10, 32)))
        step = Trainer(compile_model(model) if cfg.compile else model, c, total_steps=10 ** 6).step
        data = batches(x, y, B, rt.device, shuffle=True, train_augment=True)
        for _ in range(warmup):
            step(*next(data))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = sum(timed(lambda: step(*next(data)), rt.device) for _ in range(iters))
        r = results[arch]
        r[method], r[f"{method}_step_s"] = round(B * iters / seconds, 1), round(seconds / iters, 4)
        if cuda:
            r[f"{method}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        log(f"{arch:13s} {method:8s} {r[method]:9.1f} img/s  ({seconds / iters * 1e3:.1f} ms/step, batch {B})")
    return results

@holds_folders
def benchmark(cfg: Config, out: str = "runs/benchmark") -> dict:
    """`--benchmark`: training throughput and the MoE layer's cost versus E on this device; printed and written to
    OUT/benchmark.json (named in the log when it replaces an earlier one)."""
    dest = check_targets(out, ("benchmark.json",)) / "benchmark.json"
    rt = make_runtime(cfg.device, cfg.precision)
    lock_folder(dest.parent)
    cuda = rt.device.type == "cuda"
    name = torch.cuda.get_device_name(rt.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    res = {"device": name, "torch": torch.__version__, "precision": str(rt.amp_dtype or torch.float32),
           "channels_last": rt.channels_last, "compile": cfg.compile, "width": cfg.width, "batch_size": cfg.batch_size}
    log("benchmark: " + " | ".join(f"{k} {v}" for k, v in res.items()))
    res["train_images_per_s"] = steps = benchmark_training(cfg, models=tuple(BENCH_MODELS))
    res["moe_over_dense"] = ratio = {m: round(steps["moe-resnet18"][m] / steps["resnet18"][m], 3)
                                     for m in ("standard", "at")}
    res["advmoe_layout_step_over_dense"] = layout = {  # step time, so below 1 is faster than dense
        m: round(steps["advmoe-layout"][f"{m}_step_s"] / steps["resnet18"][f"{m}_step_s"], 3) for m in ("standard", "at")}
    log(f"MoE-ResNet18 / ResNet-18 throughput: standard {ratio['standard']:.2f}, PGD-10 AT {ratio['at']:.2f}; "
        f"AdvMoE layout / ResNet-18 step time: standard {layout['standard']:.2f}, PGD-10 AT {layout['at']:.2f}")
    res["moe_layer_us_per_example"] = benchmark_moe(cfg.device, precision=cfg.precision)
    res["moe_layer_shape"] = "batch 256, 64 channels, 8x8 maps, forward + backward"
    replaced = " (replaces the earlier benchmark there)" * dest.exists()
    write_json(dest, res)
    log(f"-> {dest}{replaced}")
    return res

def run_demo(out: str = "runs/demo", device: str = "auto") -> dict:
    """Standard training vs PGD-AT of a small MoE-ResNet18 on `synthetic`, about a minute on 2 CPU cores."""
    common = dict(dataset="synthetic", arch="moe-resnet18", width=0.125, experts=4, top_k=1, epochs=4, batch_size=64,
                  lr=0.05, train_limit=2400, test_limit=500, train_steps=5, val_steps=5, eval_steps=10,
                  eval_suite="pgd", device=device)
    runs = {m: Config(method=m, out=f"{out}/{m}", **common) for m in ("standard", "at")}
    for cfg in runs.values():  # the demo replaces an earlier demo, never another run
        cfg.validate()
        check_writable(cfg.out)
        here, ctx = Path(cfg.out), run_context(cfg, "train")
        ours = {k: v for k, v in record_config(cfg, ctx).items() if k not in ("out", "device")}
        found = [record_config(config_from_dict(load_checkpoint(str(here / f))["config"]), ctx)
                 for f in ("last.pt", "best.pt") if (here / f).is_file()]
        found += [read_json(here / "metrics.json").get("config", {})] if (here / "metrics.json").exists() else []
        check(all({k: c.get(k) for k in ours} == ours for c in found),
              f"{cfg.out} holds a run that is not the demo's; give the demo another --out")
    results = {}
    for method, cfg in runs.items():
        log(f"\n== demo: {method} ==")
        results[method] = train(cfg, overwrite=True)["test"]
    log(f"\n{'method':10s} {'clean':>6s} {'robust':>7s}   ({results['at']['attack']}, synthetic test set)")
    for method, r in results.items():
        log(f"{method:10s} {r['clean_acc']:6.3f} {r['robust_acc']:7.3f}")
    return results

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)

class _Help(argparse.HelpFormatter):
    """--help shows a default only where there is one worth showing, and only once."""
    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or any(action.default is v for v in (None, True, False, argparse.SUPPRESS)):
            return h
        return h + " (default: %(default)s)"

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

def build_parser() -> argparse.ArgumentParser:
    """One --flag per Config field (help, type, default and choices from the field), grouped as the fields are,
    plus the flags that choose what to run."""
    p = _Parser(prog="moe_robust.py", formatter_class=_Help, allow_abbrev=False,
                description="Robust sparse Mixture-of-Experts training. With no arguments: a one-minute CPU demo "
                            "(standard vs PGD-AT on the built-in synthetic data).")
    groups, types = {}, {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(Config):
        m, flag = f.metadata, "--" + f.name.replace("_", "-")
        if m["group"]:
            g = groups[m["group"]] = p.add_argument_group(m["group"])
        if f.type == "bool":  # a switch: --flag turns it on, --no-flag turns a default True off
            g.add_argument(f"--no-{flag[2:]}" if f.default else flag, dest=f.name, help=m["help"],
                           action="store_false" if f.default else "store_true")
            continue
        kind = _eps if f.name in ("eps", "alpha") else types[f.type.removeprefix("Optional[").rstrip("]")]
        default = None if f.name == "out" else f.default
        g.add_argument(flag, type=kind, default=default, choices=m["choices"], help=m["help"])
    g = groups["what to run"]
    g.add_argument("--eval", metavar="CKPT", help="only evaluate this checkpoint (best.pt or last.pt) on the test set")
    g.add_argument("--benchmark", action="store_true", help="images/s of standard and PGD-10 AT steps (ResNet-18, "
                   "MoE-ResNet18, MoE-ViT at --width, --batch-size) and the MoE layer's cost versus E; writes "
                   "OUT/benchmark.json")
    g.add_argument("--lipschitz", metavar="CKPT", help="Lipschitz estimates, bounds, certified accuracy of a CKPT")
    g.add_argument("--lipschitz-n", type=int, default=64, metavar="N", help="test examples the --lipschitz report uses")
    g.add_argument("--demo", action="store_true", help="run the demo (what no arguments does)")
    g = groups["run"]
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last.pt with its saved settings (only --device may change)")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    return p

def checkpoint_and_data(path: str, overrides: Config, test_limit: Optional[int], out: Optional[str],
                        data_dir: Optional[str], record: str):
    """A checkpoint's model on the CLI's device, the first `test_limit` test examples of its data set (from
    `data_dir`, else the checkpoint's), checked against each other, and the record file the report is added to (its
    folder proven writable, its entries read, before the work: --out, else the checkpoint's folder).
    -> (runtime, model, saved config, Dataset, record path, data record)"""
    rt = make_runtime(overrides.device, overrides.precision)
    model, saved, state = load_model(path, rt)
    saved.data_dir = data_dir or saved.data_dir
    with main_first():
        data = load_dataset(saved.dataset, saved.data_dir, saved.image_size, saved.seed, None, test_limit)
    check_fits(state, saved, data, f"checkpoint {path}")
    check_run_data(overrides, data)
    flag = "--out" if out else "the checkpoint's folder"
    dest = check_targets(out or str(Path(path).parent), (record,), flag) / record
    read_records(dest)  # a broken record file stops us before the work
    lock_folder(dest.parent, flag)  # every input is checked: the folder is ours until the record is written
    seed_everything(overrides.seed)  # attacks' random starts and power iterations repeat run to run
    head = {"checkpoint": path, "checkpoint_epoch": state["epoch"] + 1,
            "model_config": record_config(saved, run_context(saved, "train")),
            "data": data_record(saved, data, test=len(data.test_x))}
    return rt, model, saved, data, dest, head

@holds_folders
def evaluate_checkpoint(path: str, overrides: Config, out: Optional[str], data_dir: Optional[str] = None) -> dict:
    """Test-set report of a saved checkpoint, with the attack and suite settings given on the CLI, added to
    OUT/eval.json (OUT: the checkpoint's folder by default); earlier evaluations there are kept."""
    rt, model, saved, data, dest, head = checkpoint_and_data(path, overrides, overrides.test_limit, out, data_dir,
                                                             "eval.json")
    ctx = run_context(overrides, "eval", saved)
    result = {**head, "settings": record_config(overrides, ctx),
              "test": evaluate_full(model, data.test_x, data.test_y, overrides, rt.device)}
    n = add_record(dest, result)
    log(format_report(result["test"], path) + f"\n-> {dest} (evaluation {n})")
    return result

@holds_folders
def lipschitz_checkpoint(path: str, overrides: Config, n: int, out: Optional[str],
                         data_dir: Optional[str] = None) -> dict:
    """lipschitz_report on the first n test examples of a checkpoint's data set, added to OUT/lipschitz.json (OUT:
    the checkpoint's folder by default); earlier reports there are kept."""
    rt, model, saved, data, dest, head = checkpoint_and_data(path, overrides, n, out, data_dir, "lipschitz.json")
    x, y = data.test_x.to(rt.device).float() / 255, data.test_y.to(rt.device)
    rep = lipschitz_report(model, x, y, overrides.eps, overrides.norm)
    add_record(dest, {**head, "settings": record_config(overrides, run_context(overrides, "lipschitz", saved)),
                               **rep})
    keys = ("local_linf", "local_l2", "jacobian_l2", "global_linf", "global_l2", "route_stable_linf", "route_stable_l2",
            "certified_acc", "median_route_radius")
    log(f"{path}: " + " | ".join(f"{k} {rep[k]:.4g}" for k in keys if k in rep)
        + f" | expert spread {', '.join(f'{v:.3f}' for v in rep.get('expert_spread', []))} -> {dest}")
    return {**rep, "checkpoint": path}

def check_flags(args: argparse.Namespace, argv: list[str], cfg: Config) -> tuple[str, set]:
    """One way of running at a time, and no setting that it would not read (refuse_unread, from each field's
    `where`). The settings given are found by a second parse without defaults. -> (the mode, the names given)"""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    modes = [m for m in ("eval", "lipschitz", "benchmark", "demo") if m in given]
    check(len(modes) <= 1, f"{' and '.join('--' + m for m in modes)} cannot be combined; give one")
    check_resume("resume" in given, "overwrite" in given)
    resume = "resume" in given and cfg.method != "dual"  # a dual run is resumed with its flags given again
    mode = modes[0] if modes else "resume" if resume else "dual" if cfg.method == "dual" else "train"
    saved = config_from_dict(load_checkpoint(args.eval or args.lipschitz)["config"]) if mode in ("eval", "lipschitz") \
        else None
    refuse_unread(given - set(modes) - ({"resume"} if mode == "resume" else set()), run_context(cfg, mode, saved))
    return mode, given

def _interrupt(signum, frame):  # SIGTERM (how schedulers stop jobs) goes the way of Ctrl-C
    raise KeyboardInterrupt(signum)

def interrupted_note(args: argparse.Namespace, cfg: Optional[Config]) -> str:
    """What an interruption left behind, naming the real folder."""
    if cfg is None or args.eval or args.lipschitz or args.benchmark or args.demo:
        return "interrupted; nothing was written"
    out = Path(cfg.out)
    lasts = [out / "last.pt"] + [out / r / "last.pt" for r in ("standard", "robust") if cfg.method == "dual"]
    if any(p.is_file() for p in lasts):
        return f"interrupted; every finished epoch is saved in {out}: continue with --resume --out {out}"
    return f"interrupted before the first epoch finished; nothing to resume in {out}"

def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag already reported in one line
        return int(e.code or 0)
    in_main_thread = threading.current_thread() is threading.main_thread()  # (signal handlers need it)
    old_term = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        start_distributed(args.device)  # under torchrun: join the other processes
        cfg = config_from_dict(vars(args))
        cfg.out = args.out or f"runs/{cfg.dataset}-{cfg.arch}-{cfg.method}"
        cfg.validate()
        for flag in ("out", "data_dir", "eval", "lipschitz", "standard_ckpt", "robust_ckpt"):
            v = getattr(args, flag)
            check(v is None or v.strip() != "", f"--{flag.replace('_', '-')} {v!r} is empty; give a path")
        check(not cfg.sync_bn or world()[1] > 1, "--sync-bn shares BatchNorm statistics between torchrun's processes "
                                                 "and does nothing in one; leave it out or start with torchrun")
        check(args.lipschitz_n >= 1, f"--lipschitz-n {args.lipschitz_n} must be >= 1")
        for ckpt in (args.eval, args.lipschitz, cfg.standard_ckpt, cfg.robust_ckpt):  # inputs before outputs
            if ckpt is not None:
                check_checkpoint_file(ckpt)
        mode, given = check_flags(args, argv, cfg)
        data_dir = args.data_dir if "data_dir" in given else None
        if mode in ("train", "dual", "eval", "lipschitz") and cfg.norm == "linf" and cfg.eps > 32 / 255:
            log(f"note: --eps {cfg.eps * 255:g}/255 is far beyond the usual L-inf radii (2/255 to 16/255)")
        alone = "the demo" if not argv or args.demo else "--benchmark" if args.benchmark else None
        check(world()[1] == 1 or alone is None, f"{alone} runs in one process; start it without torchrun")
        if not argv or args.demo:
            run_demo(args.out or "runs/demo", args.device)
        elif args.benchmark:
            benchmark(cfg, args.out or "runs/benchmark")
        elif args.eval:
            evaluate_checkpoint(args.eval, cfg, args.out, data_dir)
        elif args.lipschitz:
            lipschitz_checkpoint(args.lipschitz, cfg, args.lipschitz_n, args.out, data_dir)
        else:
            (run_dual if cfg.method == "dual" else train)(cfg, resume=args.resume, overwrite=args.overwrite)
        barrier()  # torchrun: every rank done before any tears the process group down (one leaving early can
        # make gloo abort a peer that is still shutting down)
    except UserError as e:  # every rank meets the same checks: rank 0 reports
        if is_main():
            sys.stderr.write(f"error: {e}\n")
        return 2
    except (MemoryError, RuntimeError) as e:  # CUDA's OutOfMemoryError and the CPU allocator's are RuntimeErrors
        oom = isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or ("alloc" in str(e) and "memory" in str(e))
        if not oom:
            raise
        rank = f"process {world()[0]}: " if world()[1] > 1 else ""
        sys.stderr.write(f"error: {rank}out of memory ({type(e).__name__}); lower --batch-size, --width, --experts "
                         "or the image size\n")
        return 2
    except KeyboardInterrupt as e:
        sig = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        if is_main():
            sys.stderr.write(f"{signal.Signals(sig).name}: {interrupted_note(args, cfg)}\n")
        return 128 + int(sig)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0

if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: every file is written and the process group is gone;
        # leave without the interpreter's teardown, in which a finished rank was seen to abort ("terminate called
        # without an active exception", 2 runs in 64 on a 2-core CPU: a torch.distributed thread still joinable)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
