"""Tests for moe_robust: invariants and known answers, CPU only, no download.

Run: python -m pytest -q test_moe_robust.py
"""
import ast
import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import moe_robust as mr

torch.set_num_threads(min(2, os.cpu_count() or 1))


# ==== Fixtures and helpers ============================================================================================
HERE = Path(__file__).resolve().parent
TINY = dict(dataset="synthetic", arch="moe-resnet18", width=0.0625, experts=2, top_k=1, epochs=2, batch_size=64,
            lr=0.05, train_limit=400, test_limit=100, val_size=64, train_steps=2, val_steps=2, eval_steps=3,
            eval_suite="pgd", device="cpu")

def conv_moe(E=4, k=1, C=8, router="linear"):
    return mr.MoE([mr.residual_branch(C, C, C, 1) for _ in range(E)], C, k=k, router=router).eval()

def token_moe(E=4, k=1, D=16, router="linear"):
    return mr.MoE([mr.mlp(D, 32) for _ in range(E)], D, k=k, tokens=True, router=router).eval()

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small standard-trained MoE-ResNet18 on synthetic data (a fixed model for attack tests)."""
    out = tmp_path_factory.mktemp("std")
    cfg = mr.Config(method="standard", out=str(out), **{**TINY, "width": 0.125, "train_limit": 1500, "epochs": 3})
    mr.train(cfg)
    model, _, _ = mr.load_model(str(out / "best.pt"), mr.make_runtime("cpu"))
    model.eval()  # attacks restore the caller's mode: a test that ran the model in train mode would change it
    data = mr.load_dataset("synthetic", test_limit=128)
    x, y = data.test_x.float() / 255, data.test_y
    return model, x, y, out

def robust_acc(model, x, y, **kw):
    torch.manual_seed(0)
    return mr.evaluate(model, (x * 255).round().byte(), y, mr.AttackConfig(**kw), torch.device("cpu"))

def write_fake_cifar(root: Path, n=20, batch=None) -> Path:
    """CIFAR-10's layout: five training batches and a test batch of n random images each (or `batch` in each)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump(batch or {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                  "labels": rng.integers(0, 10, n).tolist()}, f)
    return root

def write_images(folder: Path, n: int, size):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i}.JPEG")

def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(HERE / "moe_robust.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)

# Every row: what a user types ({name} is a path from `hostile_world`) and a piece the one-line
# error must contain. Each row must exit 2 with one line, no traceback, and leave the run in
# {run} byte for byte as it was. Add a case in one line.
T = ["--dataset", "synthetic", "--width", "0.0625", "--epochs", "1", "--train-limit", "128", "--test-limit", "32",
     "--train-steps", "1", "--val-steps", "1", "--eval-steps", "1", "--eval-suite", "pgd"]

TS = T[:T.index("--train-steps")] + T[T.index("--train-steps") + 2:]  # for --method standard, which runs no attack
BAD_INPUTS = [
    (["--eps", "8/0"], "'8/0'"), (["--alpha", "1/0"], "'1/0'"), (["--eps", "inf"], "'inf'"),
    (["--eps", "nan"], "'nan'"),
    (["--lr", "inf"], "--lr inf"), (["--beta", "nan"], "--beta nan"),
    (["--width", "1e6"], "--width 1000000.0"), (["--experts", "100000"], "--experts 100000"),
    (T + ["--train-limit", "1000000000000"], "--train-limit 1000000000000"),
    (T + ["--test-limit", "1000000000000"], "--test-limit 1000000000000"),
    (["--image-size", "100000"], "--image-size 100000"), (["--image-size", "8"], "--image-size 8"),
    (["--seed", "99999999999999999999"], "--seed 99999999999999999999"), (["--batch-size", "10000000"], "--batch-size"),
    (T + ["--out", "{file}"], "is a file"), (T + ["--out", "{file}/sub"], "not a writable folder"),
    (["--eval", "{run}/best.pt", "--out", "{file}"], "is a file"),
    (["--lipschitz", "{run}/best.pt", "--out", "{file}"], "is a file"),
    (["--benchmark", "--out", "{file}"], "is a file"),
    (["--dataset", "cifar10", "--data-dir", "{cifar_rows}"] + T[2:], "(N, 3072)"),
    (["--dataset", "cifar10", "--data-dir", "{cifar_nolabels}"] + T[2:], "'labels'"),
    (["--dataset", "cifar10", "--data-dir", "{cifar_list}"] + T[2:], "'labels'"),
    (["--dataset", "cifar10", "--data-dir", "{cifar_label99}"] + T[2:], "label 99"),
    (["--lipschitz", "{run}/best.pt", "--out", "{badjson}"], "not valid JSON"),
    (["--eval", "{run}/best.pt", "--eval-suite", "pgd", "--out", "{badjson}"], "not valid JSON"),
    (["--eval", "{nocls}"], "'num_classes'"), (["--eval", "{tmp}"], "is a folder"),
    (TS + ["--method", "standard", "--out", "{nolast}"], "already holds a run"),
    (T + ["--method", "dual", "--resume", "--out", "{run}"], "drop --dataset"),
    (["--method", "dual", "--robust-ckpt", "{run}/best.pt", "--out", "{tmp}/d"], "--standard-ckpt"),
    (["--method", "dual", "--standard-ckpt", "{run}/best.pt", "--robust-ckpt", "{run}/best.pt", "--out", "{run}"],
     "training run"),
    (["--resume", "--overwrite", "--out", "{run}"], "contradict"),
    (["--resume", "--epochs", "4", "--out", "{run}"], "--epochs"),
    (["--resume", "--out", "{tmp}"], "nothing to resume"),
    (["--eval", "{run}/best.pt", "--lipschitz", "{run}/best.pt"], "cannot be combined"),
    (["--benchmark", "--eval", "{run}/best.pt"], "cannot be combined"), (["--demo", "--epochs", "1"], "--epochs"),
    (["--lipschitz-n", "5"], "--lipschitz"),
    (["--moe-blocks", "", "--method", "rt-er"], "no MoE layer"),
    (T + ["--train-limit", "1"], "--train-limit 1"),
    (T + ["--dataset", "imagefolder", "--data-dir", "{emptyclass}"], "no valid file"),
    # rule 1: nothing on disk changes before every input (data, split, checkpoint) is checked
    (T + ["--dataset", "cifar10", "--data-dir", "{tmp}/typo", "--overwrite", "--out", "{run}"], "download failed"),
    (T + ["--val-size", "5000", "--overwrite", "--out", "{run}"], "--val-size 5000"),
    (T + ["--dataset", "cifar10", "--data-dir", "{cifar_float}", "--overwrite", "--out", "{run}"], "float32"),
    (T + ["--apgd-targets", "3", "--eval-suite", "full", "--dataset", "imagefolder", "--data-dir", "{twoclass}",
          "--overwrite", "--out", "{run}"], "--apgd-targets"),
    (["--demo", "--out", "{demo}"], "not the demo's"),
    # rule 4: values checked against their meaning
    (["--eps", "300"], "--eps 300"), (["--momentum", "5"], "--momentum 5"), (["--momentum", "1"], "--momentum 1"),
    (["--eval-steps", "0"], "--eval-steps 0"), (["--train-steps", "0"], "--train-steps 0"),
    (["--val-steps", "0"], "--val-steps 0"), (["--norm", "l2"], "explicit --eps"),
    (["--train-limit", "128", "--test-limit", "32", "--eval-suite", "autoattack", "--apgd-targets", "20"],
     "--apgd-targets 20"),
    (T + ["--norm", "l2", "--eps", "100"], "--eps 100"),
    # rule 5: data and models are what they claim to be
    (["--eval", "{nanckpt}"], "non-finite"), (["--lipschitz", "{nanckpt}"], "non-finite"),
    (["--method", "dual", "--standard-ckpt", "{nanckpt}", "--robust-ckpt", "{run}/best.pt", "--out", "{tmp}/d"],
     "non-finite"),
    (["--eval", "{badtype}"], "--width 'abc'"), (["--eval", "{folder10}"], "10 classes"),
    (["--method", "dual", "--standard-ckpt", "{cifarckpt}", "--robust-ckpt", "{run}/best.pt", "--out", "{tmp}/d"],
     "trained on cifar10"),
    (["--method", "dual", "--standard-ckpt", "{run}/best.pt", "--robust-ckpt", "{e4ckpt}", "--out", "{tmp}/d"],
     "does not fit its own config"),
    (["--resume", "--out", "{edited}"], "history"), (["--resume", "--out", "{edited2}"], "history"),
    # no flag that does nothing in this run, no empty path
    (T + ["--sync-bn"], "--sync-bn"), (["--eval", "{run}/best.pt", "--precision", "bf16"], "--precision"),
    (["--lipschitz", "{run}/best.pt", "--precision", "bf16"], "--precision"),
    (T + ["--out", ""], "--out: '' is empty"), (["--eval", " "], "--eval: ' ' is empty"),
    (["--lipschitz", ""], "--lipschitz: '' is empty"),
    (["--dataset", "cifar10", "--data-dir", ""] + T[2:], "--data-dir: '' is empty"),
    # unknown or out-of-range values of every kind, and a method's settings
    (["--method", "magic"], "'magic'"), (["--dataset", "mnist"], "'mnist'"), (["--arch", "vgg"], "'vgg'"),
    (["--experts", "2", "--top-k", "3"], "--top-k 3"), (["--eps", "-0.1"], "--eps -0.1"), (["--eps", "abc"], "'abc'"),
    (["--moe-blocks", "layer9.9"], "layer9.9"), (["--dataset", "imagefolder", "--data-dir", "/no/such"], "/no/such"),
    (["--method", "rt-er", "--experts", "1"], "--experts 1"), (["--method", "advmoe", "--arch", "resnet18"], "resnet"),
    (["--dual-a", "1.5"], "--dual-a 1.5"), (["--dual-sweep", "0,x"], "--dual-sweep"), (["--robust-loss", "mse"], "mse"),
    (["--apgd-steps", "0"], "--apgd-steps 0"), (["--apgd-targets", "0"], "--apgd-targets 0"),
    (["--square-queries", "0"], "--square-queries 0"), (["--expert-attack", "fgsm"], "--expert-attack"),
    (["--router-lr", "-1"], "--router-lr -1"), (["--lipschitz", "/no/such.pt", "--lipschitz-n", "0"], "-n 0"),
    (["--method", "dual", "--standard-ckpt", "/no/such.pt", "--test-limit", "8"], "/no/such.pt"),
    # a finished run is not replaced; a corrupt checkpoint is named and left as it is
    (TS + ["--method", "standard", "--out", "{run}"], "already holds a run"),
    # every file a run will write is checked before any work, a folder in its place included
    (T + ["--overwrite", "--out", "{metricsdir}"], "is a folder"),
    (["--benchmark", "--out", "{recdir}"], "is a folder"),
    (["--eval", "{run}/best.pt", "--eval-suite", "pgd", "--out", "{recdir}"], "is a folder"),
    (["--lipschitz", "{run}/best.pt", "--out", "{recdir}"], "is a folder"),
    (["--method", "dual", "--standard-ckpt", "{run}/best.pt", "--robust-ckpt", "{run}/best.pt", "--out", "{recdir}"],
     "is a folder"),
    (["--resume", "--out", "{corrupt}"], "corrupt"), (["--eval", "{corrupt}/last.pt"], "corrupt"),
    (["--method", "dual", "--standard-ckpt", "", "--robust-ckpt", "{run}/best.pt"], "--standard-ckpt: '' is empty"),
]

@pytest.fixture(scope="module")
def hostile_world(trained, tmp_path_factory):
    """Paths the BAD_INPUTS rows point at: a finished run, files, broken data and checkpoints."""
    root = tmp_path_factory.mktemp("hostile")
    w = {k: root / k for k in ("run", "nolast", "tmp", "badjson", "emptyclass")}
    shutil.copytree(trained[3], w["run"])
    shutil.copytree(trained[3], w["nolast"])
    shutil.copytree(trained[3], root / "demo" / "standard")  # a real run where the demo would write
    w["demo"] = root / "demo"
    (w["nolast"] / "last.pt").unlink()  # what a kill during the first last.pt write leaves
    w["tmp"].mkdir()
    w["corrupt"] = root / "corrupt"
    w["corrupt"].mkdir()
    (w["corrupt"] / "last.pt").write_bytes(b"not a checkpoint")
    w["file"] = root / "plain-file"
    w["file"].write_text("x")
    w["badjson"].mkdir()
    for f in ("metrics.json", "eval.json", "lipschitz.json"):
        (w["badjson"] / f).write_text("{not json")
    state = torch.load(w["run"] / "best.pt", weights_only=True)
    del state["num_classes"]
    w["nocls"] = root / "nocls.pt"
    torch.save(state, w["nocls"])
    zeros = np.zeros((4, 3072), np.uint8)
    for kind, batch in (("rows", {"data": np.zeros((4, 1000), np.uint8), "labels": [0] * 4}), ("list", [1, 2]),
                        ("nolabels", {"data": zeros}), ("label99", {"data": zeros, "labels": [0, 1, 99, 2]}),
                        ("float", {"data": np.random.rand(4, 3072).astype(np.float32), "labels": [0, 1, 2, 3]})):
        w[f"cifar_{kind}"] = write_fake_cifar(root / f"cifar_{kind}", batch=batch)  # float: a cast gives black images
    write_images(w["emptyclass"] / "train" / "cat", 2, (32, 32))
    (w["emptyclass"] / "train" / "dog").mkdir()
    write_images(w["emptyclass"] / "test" / "cat", 1, (32, 32))
    for c in ("cat", "dog"):  # a 2-class image folder
        write_images(root / "twoclass" / "train" / c, 30, (32, 32))
        write_images(root / "twoclass" / "test" / c, 2, (32, 32))
    w["twoclass"] = root / "twoclass"
    good = torch.load(w["run"] / "best.pt", weights_only=True)

    def variant(name, change):
        state = {**good, "config": dict(good["config"]), "model": dict(good["model"])}
        change(state)
        w[name] = root / f"{name}.pt"
        torch.save(state, w[name])
    variant("nanckpt", lambda s: s["model"].update({"fc.weight": s["model"]["fc.weight"] * float("nan")}))
    variant("badtype", lambda s: s["config"].update(width="abc"))
    variant("folder10", lambda s: s["config"].update(dataset="imagefolder", data_dir=str(w["twoclass"])))
    variant("cifarckpt", lambda s: s["config"].update(dataset="cifar10"))
    variant("e4ckpt", lambda s: s["config"].update(experts=4))
    shutil.copytree(trained[3], root / "metricsdir")
    (root / "metricsdir" / "metrics.json").unlink()
    (root / "metricsdir" / "metrics.json").mkdir()
    w["metricsdir"] = root / "metricsdir"
    for f in ("benchmark.json", "eval.json", "lipschitz.json", "metrics.json"):
        (root / "recdir" / f).mkdir(parents=True)
    w["recdir"] = root / "recdir"
    last = torch.load(w["run"] / "last.pt", weights_only=True)
    for name, change in (("edited", lambda s: s.update(history="x")),
                         ("edited2", lambda s: s.update(best={"epoch": "one"}))):
        shutil.copytree(trained[3], root / name)
        state = dict(last)
        change(state)
        torch.save(state, root / name / "last.pt")
        w[name] = root / name
    return {k: str(v) for k, v in w.items()}

def tree_hashes(root) -> dict:
    """Every file and folder under root with a hash of its bytes (folders: None)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(Path(root).rglob("*"))}

def copy_of_trained_run(trained, tmp_path) -> Path:
    """A copy of the shared fixture's run folder, so that a test writing records leaves the fixture as it was."""
    return Path(shutil.copytree(trained[3], tmp_path / "run"))

def small_moe(seed=0, E=3, k=1, router="linear"):
    torch.manual_seed(seed)
    return mr.build_model(mr.ModelConfig(width=0.0625, experts=E, top_k=k, moe_blocks="layer4.1", router=router))

def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}

def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}

def small_cfg(**kw):
    return mr.Config(**{**TINY, "lr": 0.1, **kw})

def E(cfg: mr.Config) -> mr.EvalConfig:
    """A Config's evaluation settings, as the runner passes them to evaluate_full."""
    return mr.eval_config(cfg)

class Recorder(nn.Module):
    """Wraps a model; records, for every forward, which examples it misclassifies."""

    def __init__(self, model, y):
        super().__init__()
        self.model, self.y, self.wrong = model, y, []
        self.train(model.training)

    def forward(self, x):
        out = self.model(x)
        if len(out) == len(self.y):
            self.wrong.append((out.argmax(1) != self.y).detach())
        return out

def linear_model(seed=0, classes=10):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, classes)).eval()

def minimal_linf(model, x, y):
    """The exact smallest L-inf perturbation that flips a linear model (no [0, 1] clipping)."""
    W, b = model[1].weight.detach(), model[1].bias.detach()
    z = x.flatten(1) @ W.T + b
    gap = z.gather(1, y[:, None]) - z  # (B, classes)
    dual = (W[y][:, None, :] - W[None]).abs().sum(-1)  # ||w_y - w_j||_1
    return (gap / dual.clamp_min(1e-12)).scatter(1, y[:, None], float("inf")).amin(1)

def count_host_reads(monkeypatch):
    """Count every Python-level read of a tensor's value into the host during a training step."""
    counts = {"item": 0, "tolist": 0, "bool": 0}
    for name, key in (("item", "item"), ("tolist", "tolist"), ("__bool__", "bool")):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, _original=original, _key=key, **kw):
            counts[_key] += 1
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return counts

def restore_dynamo_settings():
    """compile_model raises dynamo's recompile limit and switches an inductor option process-wide: put them back."""
    import torch._dynamo
    import torch._inductor.config
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    saved = getattr(torch._dynamo.config, limit), torch._inductor.config.layout_optimization
    yield
    setattr(torch._dynamo.config, limit, saved[0])
    torch._inductor.config.layout_optimization = saved[1]
    torch._dynamo.reset()

restore_dynamo = pytest.fixture(restore_dynamo_settings)
needs_compiler = pytest.mark.skipif(
    not any(__import__("shutil").which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")),
    reason="torch.compile on a CPU needs a C++ compiler (none found on PATH)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
F = nn.functional

def textbook_pgd(model, x, y, eps, alpha, steps, norm):
    """Madry et al.'s loop written out: a random start (uniform in the L-inf ball; L2: a random direction at a
    uniform radius), a signed / normalised gradient step, projection onto the ball, clipping to the image box."""
    model.eval()
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        d = torch.randn_like(x)
        delta = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * torch.rand(len(x), 1, 1, 1)
    xa = (x + delta).clamp(0, 1)
    for _ in range(steps):
        xa.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y, reduction="sum"), xa)
        with torch.no_grad():
            if norm == "linf":
                xa = torch.min(torch.max(xa + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
            else:
                d = xa + alpha * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) - x
                xa = (x + d * (eps / d.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)).clamp(0, 1)
    return xa.detach()

def explicit_matrix(module, shape):
    """The matrix of a linear map (bias removed) on inputs of `shape`, column by column."""
    n = math.prod(shape)
    with torch.no_grad():
        zero = module(torch.zeros(1, *shape))
        return torch.stack([(module(e.view(1, *shape)) - zero).flatten() for e in torch.eye(n)], 1).double()

def all_tensors_equal(a, b, path="state"):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            all_tensors_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            all_tensors_equal(u, v, f"{path}[{i}]")
    elif not (isinstance(a, float) and isinstance(b, float) and path.endswith(("time_s", "images_per_s"))):
        assert a == b, path

class Quantised(nn.Module):
    """A two-class linear model on inputs rounded to 8 grey levels (smooth=False): torch.round has no gradient, so
    every gradient attack is blind to it, the textbook case of gradient masking; smooth=True is the same without
    the rounding."""

    def __init__(self, smooth: bool):
        super().__init__()
        self.lin, self.smooth = nn.Linear(3 * 8 * 8, 2), smooth

    def forward(self, x):
        return 3 * self.lin((x if self.smooth else torch.round(x * 7) / 7).flatten(1))

# Two processes with one thread each, joined by gloo, through torchrun. `-k distributed` selects these tests.
DP = ["--dataset", "synthetic", "--width", "0.0625", "--experts", "4", "--epochs", "1", "--train-limit", "48",
      "--val-size", "16", "--test-limit", "16", "--batch-size", "16", "--val-steps", "1", "--eval-suite", "pgd",
      "--eval-steps", "1", "--device", "cpu"]

def torchrun(*args, cwd, n=2):
    """moe_robust.py under torchrun with n gloo processes of one thread each. A rank that crashes at teardown (SIGABRT,
    SIGSEGV, SIGBUS in gloo's exit) is reported as a warning with the ranks' own lines, and the command runs once more
    from the same state of its --out folder. A Python error, a stopped peer, a wrong number or a hang is never
    retried."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(HERE / "moe_robust.py"), *args]
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    kept = Path(cwd) / "before-torchrun"
    shutil.rmtree(kept, ignore_errors=True)
    if out is not None and out.exists():
        shutil.copytree(out, kept)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    if r.returncode != 0 and re.search(r"Signal \d+ \(SIG(ABRT|SEGV|BUS)\) received", r.stderr):
        warnings.warn(f"torchrun: a rank crashed; ran again. Its stderr:\n{rank_lines(r.stderr)}")
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
            if kept.exists():
                shutil.copytree(kept, out)
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    return r

def rank_lines(stderr: str) -> str:
    """What the ranks printed, without torchrun's own log lines (its summary at the end names only who failed)."""
    own = re.compile(r"^(\[?[WIE]\d{4}|W\d|\s*(traceback|host|rank|exitcode|error_file|time|root cause|failures)"
                     r"\s*:|=+$|-+$|\[\d+\]:|torch\.distributed)")
    return "\n".join(line for line in stderr.splitlines() if not own.search(line))[:3000]

def weights(path):
    return torch.load(path, weights_only=True)

def max_weight_gap(a, b) -> float:
    a, b = (torch.load(f, weights_only=True)["method"]["model"] for f in (a, b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

def copy_cost(source: str, roots: list) -> tuple[int, set]:
    """Lines a reader copies to use `roots` alone: each top-level definition reachable from them in the module
    (decorators and docstrings included; names in annotations and a function's own parameters and locals are not
    references). -> (lines, the definitions' names)"""
    defs = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if isinstance(t, ast.Name):
                    defs[t.id] = node

    def refs(node):
        local, out, stack = set(), set(), [node]
        for f in ast.walk(node):
            if isinstance(f, (ast.FunctionDef, ast.Lambda)):
                local |= {a.arg for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs}
            elif isinstance(f, ast.Name) and isinstance(f.ctx, ast.Store):
                local.add(f.id)
        while stack:
            n = stack.pop()
            if isinstance(n, ast.Name):
                out.add(n.id)
            for name, value in ast.iter_fields(n):
                if name not in ("annotation", "returns"):
                    stack += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, ast.AST)]
        return out - local

    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in defs and name not in seen:
            seen.add(name)
            todo += refs(defs[name]) & defs.keys()
    nodes = {id(defs[n]): defs[n] for n in seen}.values()
    first = lambda d: min([d.lineno] + [x.lineno for x in getattr(d, "decorator_list", [])])
    return sum(d.end_lineno - first(d) + 1 for d in nodes), seen

COPY_PIECES = [  # (the README's name of a piece, its top-level definitions, its line budget)
    ("MoE layer", ["MoE", "moe_layers", "moe_aux_loss"], 120),
    ("MoE layer with fused eval mode", ["FusedMoE", "moe_layers", "moe_aux_loss"], 200),
    ("PGD", ["pgd"], 50),
    ("APGD-CE + APGD-T", ["apgd", "apgd_targeted"], 140),
    ("Square L-inf", ["square_linf"], 60),
    ("Square L2 (on the L-inf search)", ["square_l2"], 100),
    ("AdvMoE step", ["advmoe_step"], 220),
    ("RT-ER step", ["rter_loss", "loss_step"], 220),
    ("JTDMoE step", ["jtdmoe_step"], 220),
    ("Dual model", ["DualModel"], 30),
    ("Lipschitz bound", ["LipschitzBound"], 200),
]

class Payload:
    """What a hostile pickle carries: loading it would run a shell command."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ==== 0. Conventions ==================================================================================================
def test_import_has_no_side_effects():
    code = ("import sys, torch; sys.argv = ['x', '--bogus']; import moe_robust; "
            "assert not torch.cuda.is_initialized(); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(HERE))
    assert r.stdout.strip() == "ok", r.stderr

def test_precision_is_chosen_in_one_place():
    rt = mr.make_runtime("cpu")
    assert rt.amp_dtype is None and not rt.channels_last  # float32 NCHW: BatchNorm's precise CPU kernel
    with mr.autocast_for(rt.device):
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    rt = mr.make_runtime("cpu", "bf16")  # bf16 autocast; a CPU runs NCHW in every precision
    assert rt.amp_dtype == torch.bfloat16 and not rt.channels_last
    with mr.autocast_for(rt.device, "bf16"):  # what a training step opens around its forwards
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    assert mr.main(["--precision", "fp16", "--device", "cpu"]) == 2

def test_library_use_without_traps(trained):
    """The MoE layer copied alone routes with the centred router (the papers' linear router sends every row of
    post-ReLU features, which share one large direction, to one expert); load_model returns a model in eval mode;
    evaluate takes uint8 pixels or floats in [0, 1] alike and refuses anything else."""
    torch.manual_seed(0)
    h = torch.relu(torch.randn(1, 64, 16) + 20)  # (B, T, D) rows with a large common direction
    for router, collapsed in (("centred", False), ("linear", True)):
        layer = mr.MoE([nn.Linear(16, 16) for _ in range(4)], 16, tokens=True, **({} if router == "centred" else
                                                                                   {"router": router})).train()
        layer(h)
        share = torch.bincount(layer.routing.indices[:, 0], minlength=4).max().item() / 64
        assert (share > 0.9) == collapsed, (router, share)
    model, _, _ = mr.load_model(str(trained[3] / "best.pt"), mr.make_runtime("cpu"))
    assert not model.training
    data = mr.load_dataset("synthetic", test_limit=32)
    a = mr.evaluate(model, data.test_x, data.test_y, None, torch.device("cpu"))
    b = mr.evaluate(model, data.test_x.float() / 255, data.test_y, None, torch.device("cpu"))
    assert a == b
    with pytest.raises(mr.UserError, match="uint8 pixels or floats in \\[0, 1\\]; got torch.float32 from"):
        mr.evaluate(model, data.test_x.float(), data.test_y, None, torch.device("cpu"))


# ==== 1. The sparse top-k MoE layer ===================================================================================
@pytest.mark.parametrize("router", ["centred", "linear"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("kind", ["image", "token", "unfused"])
def test_eval_mode_computes_the_sparse_dispatchs_function(kind, k, router):
    """Eval mode runs every expert on every row and keeps the chosen ones; FusedMoE (the models' layer) runs them as
    one wide network with the router folded. Both compute the sparse dispatch's function and input gradient (the
    training path, run here with every BatchNorm in eval mode), under top-k and every analysis control (soft, forced
    expert, forced rank, forced routes), per image and per token. Twice (the cached weights), and after a weight
    changes (the cache renewed)."""
    torch.manual_seed(0)
    experts = [mr.residual_branch(8, 8, 8, 1) if kind == "image" else mr.mlp(16, 32) if kind == "token" else
               nn.Linear(16, 16) for _ in range(4)]
    fused = mr.FusedMoE(experts, 8 if kind == "image" else 16, k=k, tokens=kind != "image", router=router)
    x = torch.randn(6, 8, 5, 5) if kind == "image" else torch.randn(3, 7, 16)
    fused.train()(x * 2 + 1)  # BatchNorm running statistics away from their start
    plain = mr.MoE(copy.deepcopy(experts), fused.router.in_features, k=k, tokens=fused.tokens, router=router)
    plain.load_state_dict(fused.state_dict())
    fused.eval(), plain.eval()
    assert (fused.eval_weights()[1] is None) == (kind == "unfused")
    rows_of = lambda v: v.reshape(-1, 16) if fused.tokens else v
    reference = lambda v: plain.sparse(rows_of(v), *plain.route(rows_of(v) if fused.tokens else v.mean((2, 3))))
    n = 21 if fused.tokens else 6
    route = mr.Route(torch.rand(n, 4).argsort(1)[:, :k], torch.rand(n, k))
    for control in (None, mr.soft_routing, lambda m: mr.forced_expert(m, 2), lambda m: mr.forced_rank(m, 1),
                    lambda m: mr.forced_routes(m, [route])):
        for _ in range(2):
            outs = []
            for layer, run in ((fused, fused), (plain, plain), (plain, reference)):
                with control(layer) if control else contextlib.nullcontext():
                    xa = x.clone().requires_grad_(True)
                    y = run(xa).reshape(x.shape[:2] + (-1,) if fused.tokens else x.shape)
                    outs.append((y, torch.autograd.grad(y.square().sum(), xa)[0]))
            for y, g in outs[:2]:
                assert torch.allclose(y, outs[2][0], atol=1e-5) and torch.allclose(g, outs[2][1], atol=1e-4)
    assert len(torch.unique(fused(x) is not None and fused.routing.indices)) > 1
    with torch.no_grad():
        for layer in (fused, plain):
            [next(e.parameters()).mul_(2) for e in layer.experts], layer.router.weight.neg_()
    assert torch.allclose(fused(x), plain(x), atol=1e-5) and not torch.allclose(fused(x), outs[0][0].detach())

@pytest.mark.parametrize("layout", ["moe", "advmoe"])
def test_an_eval_attack_pass_reads_nothing_back_and_is_one_captured_graph(monkeypatch, layout):
    """The default MoE-ResNet18 and the AdvMoE layout (every block, E = 2 half-width experts) at width 0.125, batch
    64: an eval-mode attack pass (forward + input gradient, each PGD/APGD iteration) reads no value back to the host,
    and torch.compile(fullgraph=True) captures it whole (no graph break), computing the same gradient."""
    torch.manual_seed(0)
    kw = dict(experts=4) if layout == "moe" else dict(moe_blocks="all", experts=2, expert_ratio=0.5)
    model = mr.build_model(mr.ModelConfig(width=0.125, **kw))
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))
    model.train()(x)
    model.eval()

    def attack_pass(a, b):
        xa = a.clone().requires_grad_(True)
        return torch.autograd.grad(nn.functional.cross_entropy(model(xa), b), xa)[0]
    ref = attack_pass(x, y)
    counts = count_host_reads(monkeypatch)
    attack_pass(x, y)
    monkeypatch.undo()
    assert counts == {"item": 0, "tolist": 0, "bool": 0}
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        g = torch.compile(attack_pass, fullgraph=True, backend="aot_eager")(x, y)
    torch._dynamo.reset()
    assert torch.allclose(g, ref, atol=1e-6)

def test_forcing_expert_equals_running_it_and_forced_route_is_used():
    torch.manual_seed(2)
    layer = conv_moe(E=3)
    x = torch.randn(5, 8, 4, 4)
    for i in range(3):
        with mr.forced_expert(layer, i):
            assert torch.allclose(layer(x), layer.experts[i](x), atol=1e-6)
    assert layer.control is None  # context restored
    route = mr.Route(torch.tensor([[2], [0], [1], [2], [0]]), torch.full((5, 1), 0.5))
    with mr.forced_routes(layer, [route]):
        y = layer(x)
    expected = torch.stack([0.5 * layer.experts[int(i)](x[n:n + 1])[0] for n, i in enumerate(route.indices[:, 0])])
    assert torch.allclose(y, expected, atol=1e-6)

def test_eval_routing_is_deterministic_and_batch_independent():
    torch.manual_seed(4)
    layer = mr.MoE([mr.mlp(16, 32) for _ in range(4)], 16, k=2, tokens=True, noisy=True, router="linear").eval()
    x = torch.randn(4, 6, 16)
    full = layer(x)
    assert torch.allclose(full[:1], layer(x[:1]), atol=1e-6)
    assert torch.allclose(full, layer(x))

@pytest.mark.parametrize("arch,method", [("resnet18", "at"), ("moe-resnet18", "at"), ("moe-resnet18", "advmoe"),
                                         ("moe-vit", "trades")])
def test_training_step_reads_back_only_the_expert_batch_sizes(monkeypatch, arch, method):
    """A training step never waits for the device except where the sparse dispatch must learn each expert's batch
    size: one read per MoE layer and training-mode forward, no .item() and no tensor truth test."""
    cfg = mr.Config(**{**TINY, "arch": arch, "method": method, "train_steps": 2, "experts": 2})
    model = mr.build_model(mr.model_config(cfg, 10, 32))
    m = mr.Trainer(model, cfg, total_steps=10)
    data = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (16,))
    calls = []  # training-mode forwards: an attack's eval-mode passes read nothing
    for layer in mr.moe_layers(model):
        layer.register_forward_hook(lambda m, *_: calls.append(1) if m.training else None)
    counts = count_host_reads(monkeypatch)
    xb, yb = next(mr.batches(*data, 8, torch.device("cpu"), shuffle=True, train_augment=True))
    logs = m.step(xb, yb)
    assert counts["item"] == 0 and counts["bool"] == 0, counts
    assert counts["tolist"] == len(calls), (counts, len(calls))
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in logs.values())

def test_sparse_layer_runs_each_row_through_its_experts_only():
    """Sparse compute, counted rather than timed (speed is --benchmark's job): with E = 8 and
    top-1 every expert sees exactly its own rows, N in all, not E x N as all-experts would."""
    layer = mr.MoE([mr.residual_branch(16, 16, 16, 1) for _ in range(8)], 16, k=1, router="linear").train()
    seen = [0] * 8
    for e, expert in enumerate(layer.experts):
        expert.register_forward_hook(lambda m, i, o, e=e: seen.__setitem__(e, seen[e] + len(i[0])))
    with torch.no_grad():
        layer(torch.rand(64, 16, 8, 8))
    top1 = layer.routing.indices[:, 0]
    assert sum(seen) == 64 and seen == torch.bincount(top1, minlength=8).tolist()

def test_router_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = mr.MoE([mr.mlp(16, 32) for _ in range(4)], 16, k=1, tokens=True, router="linear").eval()
    x = torch.randn(2, 64, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    r = layer.routing
    exact = x.reshape(-1, 16) @ layer.router.weight.T + layer.router.bias
    assert r.logits.dtype == torch.float32 and torch.equal(r.logits, exact)
    assert torch.equal(r.indices[:, 0], exact.argmax(1))
    ties = torch.zeros(3, 4)  # a stable ranking: equal probabilities rank by expert index
    assert torch.equal(ties.argsort(dim=-1, descending=True, stable=True), torch.arange(4).expand(3, 4))

def test_routes_and_usage_are_read_in_the_precision_of_their_use(monkeypatch, tmp_path):
    model = small_moe(E=3).eval()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)  # a bf16 training-style forward
    trained_logits = mr.last_routing(model)[0].logits
    with mr.autocast_for(x.device, "bf16"):  # RT-ER's step reads its runner-up routes inside its autocast
        mr.current_routes(model, x)
    assert torch.equal(mr.last_routing(model)[0].logits, trained_logits)
    seen = []  # the per-epoch expert-usage pass runs in float32, like every reported number
    real = mr.predict
    monkeypatch.setattr(mr, "predict", lambda m, xb: seen.append(torch.is_autocast_enabled("cpu")) or real(m, xb))
    mr.train(small_cfg(method="standard", epochs=1, precision="bf16", out=str(tmp_path)))
    assert seen and not any(seen)

def test_balance_and_z_losses_known_values_and_gradients():
    """Switch's balance loss E * sum_i f_i P_i and ST-MoE's z-loss mean(logsumexp(r)^2), from the module, against
    values and gradients worked out by hand (f_i carries no gradient, P_i does)."""
    E, c = 4, 2.0
    layer = mr.MoE([mr.mlp(E, 8) for _ in range(E)], E, k=1, tokens=True, router="linear").train()
    with torch.no_grad():  # router logits c * one-hot: every expert tops a quarter of the rows, P_i = 1/E
        layer.router.weight.copy_(c * torch.eye(E))
        layer.router.bias.zero_()
    layer(torch.eye(E).repeat(2, 1).view(2, E, E))
    assert layer.aux.balance.item() == pytest.approx(1.0, abs=1e-6)
    assert layer.aux.z.item() == pytest.approx(math.log(math.exp(c) + E - 1) ** 2, rel=1e-6)
    torch.manual_seed(0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(E, E))
        layer.router.bias.copy_(torch.randn(E))
    h = torch.randn(1, 6, E)
    rows, W, b = h.reshape(-1, E), layer.router.weight.detach(), layer.router.bias.detach()
    r = rows @ W.T + b
    p, N = r.softmax(-1), len(rows)
    f = torch.bincount(p.argmax(1), minlength=E).float() / N
    assert layer(h) is not None and layer.aux.balance.item() == pytest.approx(E * (f * p.mean(0)).sum().item(), 1e-6)
    jac = lambda pn: torch.diag(pn) - torch.outer(pn, pn)  # d softmax / d logits
    g_bal = torch.stack([jac(pn) @ (E * f / N) for pn in p])  # (N, E): d balance / d r_n
    g_z = 2 / N * r.logsumexp(-1, keepdim=True) * p  # d z / d r_n
    for loss, g in (("balance", g_bal), ("z", g_z)):
        layer.zero_grad()
        layer(h)
        getattr(layer.aux, loss).backward()
        assert torch.allclose(layer.router.weight.grad, g.T @ rows, atol=1e-6), loss
        assert torch.allclose(layer.router.bias.grad, g.sum(0), atol=1e-6), loss

@pytest.mark.parametrize("k", [1, 2, 3])
def test_gates_are_p_top_for_k1_and_renormalised_over_the_kept_for_k2(k):
    """y = sum_j g_j expert_j(x) with g = p_top (k = 1, Switch: not 1, so the router learns from the task) or the
    kept probabilities renormalised (k > 1), each row through its own experts, computed row by row here; the router
    gets a gradient."""
    torch.manual_seed(5)
    layer = token_moe(E=4, k=k)
    x = torch.randn(2, 5, 16)
    y = layer(x).reshape(10, -1)
    rows = x.reshape(10, 16)
    top, idx = layer.router(rows).softmax(-1).topk(k, -1)
    gates = top if k == 1 else top / top.sum(-1, keepdim=True)
    expected = torch.stack([sum(gates[n, j] * layer.experts[int(idx[n, j])](rows[n:n + 1])[0] for j in range(k))
                            for n in range(10)])
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.allclose(layer.routing.gates, gates.detach(), atol=1e-6) and (gates < 1).any()
    y.square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0

def test_noisy_gating_adds_softplus_scaled_noise_to_the_logits_in_training_only():
    """Shazeer 2017: H(x) = W x + N(0, 1) * softplus(W_noise x) before the softmax, in training; eval is noise-free."""
    torch.manual_seed(6)
    layer = mr.MoE([mr.mlp(16, 32) for _ in range(4)], 16, k=1, tokens=True, noisy=True, router="linear").train()
    with torch.no_grad():
        layer.noise.weight.normal_()
        layer.noise.bias.normal_()
    x = torch.randn(2, 5, 16)
    rows = x.reshape(10, 16)
    torch.manual_seed(7)
    layer(x).sum().backward()
    torch.manual_seed(7)
    expected = layer.router(rows) + torch.randn(10, 4) * F.softplus(layer.noise(rows))
    assert torch.allclose(layer.routing.logits, expected.detach(), atol=1e-6)
    assert layer.noise.weight.grad.abs().sum() > 0  # the noise scale is learned through the noisy logits
    layer.eval()
    layer(x)
    assert torch.allclose(layer.routing.logits, layer.router(rows).detach(), atol=1e-6)

def test_routing_health_known_answers():
    model = small_moe(E=2)
    name = mr.moe_names(model)[0]
    for counts, share, entropy, warned in [([50, 50], 0.5, 1.0, False), ([90, 10], 0.9, 0.469, False),
                                           ([91, 9], 0.91, 0.4365, True), ([100, 0], 1.0, 0.0, True)]:
        (stats,), warn = mr.routing_health(model, [counts], "the rows")
        assert stats == {"layer": name, "max_share": share, "entropy": pytest.approx(entropy, abs=1e-4)}
        assert bool(warn) == warned  # more than 90%: the run says so, naming the layer and the share
        assert not warn or (name in warn[0] and f"{share:.1%}" in warn[0])

@pytest.mark.parametrize("data_name", ["synthetic", "cifar10-sample"])
def test_centred_router_does_not_start_collapsed_and_the_papers_does(data_name):
    """At initialisation (the first training step's forward: training mode, 512 images), the centred router sends
    at most 60% of the images to any expert, for E = 2 and 4 and five seeds; the papers' linear router on the same
    images sends more than 60% to one expert in at least 8 of the 10 cases."""
    folder = HERE.parent / "shared" / "data" / "cifar10-subset"
    if data_name == "synthetic":
        d = mr.make_synthetic(512, 10)
    elif (folder / "cifar-10-batches-py").is_dir():
        d = mr.load_dataset("cifar10", str(folder), train_limit=512)
    else:
        pytest.skip(f"the real-image sample is not at {folder}")
    x, norm = d.train_x[:512].float() / 255, "cifar10" if data_name != "synthetic" else "synthetic"
    worst = {}
    for router in mr.ROUTERS:
        shares = []
        for E in (2, 4):
            for seed in range(5):
                torch.manual_seed(seed)
                model = mr.build_model(mr.ModelConfig(width=0.125, experts=E, norm=norm, router=router)).train()
                with torch.no_grad():
                    model(x)
                top1 = mr.last_routing(model)[0].indices[:, 0]
                shares.append(torch.bincount(top1, minlength=E).max().item() / 512)
        worst[router] = shares
    assert max(worst["centred"]) <= 0.6, worst
    assert sum(share > 0.6 for share in worst["linear"]) >= 8, worst  # the papers' router: most start collapsed

def test_moe_layer_records_describe_its_last_forward_only():
    """The contract stated at the MoE layer: each forward replaces aux, routing and router_logits with its own (the
    aux loss read after a forward is that forward's, with its gradient); counts accumulate until reset."""
    torch.manual_seed(0)
    layer = mr.MoE([nn.Linear(6, 6) for _ in range(3)], 6, k=1, tokens=True, router="linear")
    a, b = torch.randn(2, 5, 6), torch.randn(2, 7, 6) * 10
    alone = copy.deepcopy(layer)  # the same weights, no forward yet
    layer(a)
    aux_a, routing_a = layer.aux, layer.routing
    layer(b)
    assert layer.aux is not aux_a and layer.routing.logits.shape == (14, 3) and routing_a.logits.shape == (10, 3)
    alone(b)  # the same layer on b alone: the records equal those left by b after a
    assert torch.equal(alone.aux.balance, layer.aux.balance) and torch.equal(alone.aux.z, layer.aux.z)
    assert torch.equal(alone.routing.indices, layer.routing.indices)
    assert layer.aux.z.requires_grad and not layer.routing.logits.requires_grad
    assert layer.counts.sum() == 24 and alone.counts.sum() == 14
    assert mr.expert_counts(layer) == [layer.counts.tolist()]
    mr.reset_routing_stats(layer)
    assert mr.expert_counts(layer) == [[0, 0, 0]]
    model = nn.Sequential(layer)  # moe_aux_loss reads what the last forward left
    model(a)
    assert mr.moe_aux_loss(model, 1.0, 0.0).item() == pytest.approx(aux_a.balance.item())

@pytest.mark.parametrize("tokens", [False, True])
def test_centred_router_routes_a_lone_training_row_as_evaluation_would(tokens):
    """A batch of one in training mode: the centred router standardises the row with its running statistics (one row
    has no batch variance), routes it as evaluation would, and leaves the statistics as they are."""
    layer = token_moe() if tokens else conv_moe()
    layer.centre = nn.BatchNorm1d(layer.router.in_features, affine=False)
    layer.train()
    layer(torch.randn(16, 5, 16) if tokens else torch.randn(16, 8, 4, 4))  # running statistics away from 0, 1
    x = torch.randn(1, 1, 16) if tokens else torch.randn(1, 8, 4, 4)
    stats = layer.centre.running_mean.clone(), layer.centre.running_var.clone()
    layer(x)
    train_logits = layer.routing.logits
    assert torch.equal(stats[0], layer.centre.running_mean) and torch.equal(stats[1], layer.centre.running_var)
    layer.eval()
    layer(x)
    assert torch.allclose(layer.routing.logits, train_logits, atol=1e-6)


# ==== 2. Models and the dual model ====================================================================================
def test_forced_expert_on_whole_model_equals_dense_copy_with_that_expert():
    torch.manual_seed(3)
    cfg = mr.ModelConfig(width=0.0625, experts=3, moe_blocks="layer3.1,layer4.1")
    model = mr.build_model(cfg).eval()
    x = torch.rand(4, 3, 32, 32)
    dense = mr.build_model(mr.ModelConfig(arch="resnet18", width=0.0625)).eval()
    for i in range(3):
        state = {}
        for name, v in model.state_dict().items():
            if ".router." in name or ".centre." in name:  # the router and its input's centring
                continue
            state[name.replace(f"branch.experts.{i}.", "branch.")] = v
        dense.load_state_dict({k: v for k, v in state.items() if "branch.experts." not in k})
        with mr.forced_expert(model, i):
            assert torch.allclose(model(x), dense(x), atol=1e-5)

def test_models_return_logits_and_count_params():
    for arch, size in [("resnet18", 32), ("moe-resnet18", 32), ("moe-vit", 32), ("moe-vit", 64)]:
        model = mr.build_model(mr.ModelConfig(arch=arch, width=0.125, image_size=size, num_classes=7))
        out = model(torch.rand(2, 3, size, size))
        assert isinstance(out, torch.Tensor) and out.shape == (2, 7)
    moe = mr.build_model(mr.ModelConfig(width=0.125, experts=4, top_k=1))
    dense = mr.build_model(mr.ModelConfig(arch="resnet18", width=0.125))
    c = mr.count_params(moe)
    assert c["total"] > c["active"] and abs(c["active"] - mr.count_params(dense)["total"]) < 1000  # + router only
    advmoe_layout = mr.ModelConfig(width=0.125, moe_blocks="all", experts=2, expert_ratio=0.5)
    assert len(mr.moe_layers(mr.build_model(advmoe_layout))) == 8
    assert len(mr.moe_layers(mr.build_model(mr.ModelConfig(arch="moe-vit", width=0.125)))) == 3

@pytest.mark.parametrize("router", mr.ROUTERS)
def test_dual_model_endpoints(router):
    f_s, f_r = small_moe(1, router=router).eval(), small_moe(2, router=router).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(mr.DualModel(f_s, f_r, 0.0)(x), f_s(x))
        assert torch.equal(mr.DualModel(f_s, f_r, 1.0)(x), f_r(x))
        mid = mr.DualModel(f_s, f_r, 0.25)(x)
        assert torch.allclose(mid, 0.75 * f_s(x) + 0.25 * f_r(x), atol=1e-6)

def test_dual_model_normalized_mix_weighs_equally_scaled_votes():
    torch.manual_seed(0)
    f_s, f_r, x = nn.Linear(12, 5), nn.Linear(12, 5), torch.randn(9, 12)
    with torch.no_grad():
        for a in (0.0, 1.0):  # the endpoints predict exactly as the members
            member = f_s if a == 0 else f_r
            assert torch.equal(mr.DualModel(f_s, f_r, a, "normalized")(x).argmax(1), member(x).argmax(1))
        loud = nn.Linear(12, 5)
        loud.load_state_dict({k: 40 * v for k, v in f_s.state_dict().items()})  # f_S with 40x larger logits
        mix = lambda f: mr.DualModel(f, f_r, 0.5, "normalized")(x)
        assert torch.allclose(mix(loud), mix(f_s), atol=1e-5)
        assert not torch.allclose(mr.DualModel(loud, f_r, 0.5)(x), mr.DualModel(f_s, f_r, 0.5)(x))
    with pytest.raises(mr.UserError, match="logits only"):
        mr.lipschitz_bound(mr.DualModel(small_moe(1), small_moe(2), 0.5, "normalized"), torch.rand(2, 3, 32, 32))

@needs_compiler
def test_compiled_model_matches_eager_and_trains(restore_dynamo):
    """--compile: experts compiled with a dynamic batch size, the dispatch eager, the rest compiled."""
    torch.manual_seed(0)
    cfg = mr.Config(**{**TINY, "experts": 4, "train_steps": 1})
    model = mr.build_model(mr.model_config(cfg, 10, 32)).eval()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    ref = model(x)
    mr.compile_model(model)
    assert torch.allclose(model(x), ref, atol=1e-4)
    assert set(model.state_dict()) == set(mr.build_model(mr.model_config(cfg, 10, 32)).state_dict())  # plain keys
    logs = mr.Trainer(model, cfg, total_steps=4).step(x, y)  # PGD-AT
    assert torch.isfinite(logs["loss"])

@cuda
def test_cuda_and_cpu_agree_on_a_forward():
    torch.manual_seed(0)
    model = mr.build_model(mr.ModelConfig(width=0.125, experts=4)).eval()
    x = torch.rand(16, 3, 32, 32)
    ref = model(x)
    mr.make_runtime("cuda", "fp32")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true float32
    try:
        out = mr.Runtime(torch.device("cuda"), None, True).prepare(model)(x.cuda()).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    assert (out - ref).norm() / ref.norm() < 1e-4


# ==== 3. Attacks ======================================================================================================
def test_pgd_known_answers_and_monotonicity(trained):
    model, x, y, _ = trained
    zero = robust_acc(model, x, y, eps=0.0, steps=5)
    assert zero["robust_acc"] == zero["clean_acc"] > 0.5
    accs_steps = [robust_acc(model, x, y, eps=2 / 255, steps=s)["robust_acc"] for s in (1, 3, 10)]
    assert accs_steps == sorted(accs_steps, reverse=True)
    accs_eps = [robust_acc(model, x, y, eps=e / 255, steps=10)["robust_acc"] for e in (0, 1, 2, 4, 8)]
    assert accs_eps == sorted(accs_eps, reverse=True)
    assert accs_eps[-1] <= zero["clean_acc"]
    assert accs_eps[-1] < zero["clean_acc"]  # a standard model is not robust at 8/255

def test_apgd_stays_in_ball_and_is_at_least_as_strong_as_pgd(trained):
    model, x, y, _ = trained
    torch.manual_seed(0)
    model.eval()
    xa = mr.apgd(model, x[:64], y[:64], eps=2 / 255, steps=20)
    assert (xa - x[:64]).abs().max() <= 2 / 255 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        apgd_acc = (model(xa).argmax(1) == y[:64]).float().mean().item()
    pgd_acc = robust_acc(model, x[:64], y[:64], eps=2 / 255, steps=20)["robust_acc"]
    assert apgd_acc <= pgd_acc  # at the same budget APGD leaves no more examples robust than PGD

def test_apgd_never_loses_a_successful_point():
    """Every example that some APGD iterate misclassified comes back misclassified (30 random MLPs x 200 inputs)."""
    lost = fooled = 0
    for seed in range(30):
        torch.manual_seed(seed)
        mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
        x = torch.rand(200, 3, 2, 2)
        with torch.no_grad():
            y = mlp(x).argmax(1)
        rec = Recorder(mlp, y)
        xa = mr.apgd(rec, x, y, eps=0.03, steps=20)
        ever = torch.stack(rec.wrong).any(0)
        with torch.no_grad():
            now = mlp(xa).argmax(1) != y
        fooled += int(ever.sum())
        lost += int((ever & ~now).sum())
    assert fooled > 100 and lost == 0

@pytest.mark.parametrize("attack", ["apgd-t", "fab-t", "square"])
def test_new_attacks_find_a_flip_exactly_when_one_exists(attack):
    model = linear_model()
    x = 0.4 + 0.2 * torch.rand(64, 3, 4, 4)  # away from 0 and 1, so clipping never binds
    with torch.no_grad():
        y = model(x).argmax(1)
    rmin = minimal_linf(model, x, y)
    eps = rmin.quantile(0.75).item()
    run = {"apgd-t": lambda e: mr.apgd_targeted(model, x, y, e, steps=50),
           "fab-t": lambda e: mr.fab_targeted(model, x, y, e, steps=100, targets=9),
           "square": lambda e: mr.square(model, x, y, e, queries=1000)}[attack]
    torch.manual_seed(0)
    with torch.no_grad():
        fooled = model(run(eps)).argmax(1) != y
    assert not fooled[rmin > eps * 1.0001].any()  # none exists: none found
    inside = rmin < eps / (1.2 if attack == "square" else 1.05)  # random search needs some room
    assert inside.sum() >= 10 and fooled[inside].all()  # one exists well inside the ball: found

@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_attacks_stay_in_ball_repeat_with_a_seed_restore_mode_and_leave_no_gradient(trained, norm, eps):
    model, x, y, _ = trained
    x, y = x[:24], y[:24]
    attacks = {"pgd": lambda: mr.pgd_worst(model, x, y, eps=eps, steps=5, norm=norm, restarts=2),
               "apgd-ce": lambda: mr.apgd(model, x, y, eps, 5, norm),
               "apgd-t": lambda: mr.apgd_targeted(model, x, y, eps, 5, norm, targets=3),
               "fab-t": lambda: mr.fab_targeted(model, x, y, eps, 5, norm, targets=3),
               "square": lambda: mr.square(model, x, y, eps, queries=30, norm=norm)}
    for name, run in attacks.items():
        model.train()
        torch.manual_seed(0)
        xa = run()
        assert model.training and all(p.grad is None for p in model.parameters()), name
        torch.manual_seed(0)
        assert torch.equal(xa, run()), name
        d = (xa - x).flatten(1)
        assert ((d.abs().amax(1) if norm == "linf" else d.norm(dim=1)) <= eps + 1e-6).all(), name
        assert xa.min() >= 0 and xa.max() <= 1, name
    model.eval()

def test_router_attack_restores_mode_and_moves_routes():
    model = small_moe(E=4).train()
    layer = mr.moe_layers(model)[0]
    with torch.no_grad():  # a router that depends on its input, not on its bias alone
        layer.router.weight.normal_(0, 5.0)
        layer.router.bias.zero_()
    x = torch.rand(16, 3, 32, 32)
    xr = mr.router_attack(model, x, torch.zeros(16, dtype=torch.long), mr.AttackConfig(eps=16 / 255, steps=10))
    assert model.training
    clean = mr.current_routes(model, x)[0].indices
    adv = mr.current_routes(model, xr)[0].indices
    assert (xr - x).abs().max() <= 16 / 255 + 1e-6
    assert (clean != adv).any()

def test_bf16_pgd_is_no_weaker_than_float32(trained):
    """Adversarial examples made under bf16 autocast, scored by the float32 model, leave no more
    examples correct than float32 PGD does (small eps, where robust accuracy is in between)."""
    model, x, y, _ = trained
    accs = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        with mr.autocast_for(x.device, precision):  # as a training step runs its attack
            xa = mr.pgd_worst(model, x, y, eps=2 / 255, steps=10)
        accs[precision] = (mr.predict(model, xa) == y).float().mean().item()
    clean = (mr.predict(model, x) == y).float().mean().item()
    assert 0 < accs["fp32"] < clean - 4 / len(y)  # the attack is neither trivial nor total here
    assert accs["bf16"] <= accs["fp32"] + 2 / len(y) < clean, accs  # (an attack returning x would leave `clean`)

@pytest.mark.parametrize("norm,eps", [("linf", 4 / 255), ("l2", 0.25)])
def test_pgd_equals_the_textbook_loop(norm, eps):
    """Same seed, same random start, same steps: mr.pgd returns the textbook iterate; the projection binds."""
    torch.manual_seed(0)
    model = mr.build_model(mr.ModelConfig(arch="resnet18", width=0.0625)).eval()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    torch.manual_seed(1)
    ours = mr.pgd(model, x, y, eps, None, 10, norm)
    torch.manual_seed(1)
    ref = textbook_pgd(model, x, y, eps, eps / 4, 10, norm)
    # L-inf steps take signs; L2 steps are continuous in the gradient, so the last-bit differences of two orderings
    # of the same sums can grow over ten steps
    assert torch.allclose(ours, ref, atol=1e-6 if norm == "linf" else 1e-3 * eps)
    d = ours - x
    if norm == "linf":  # most coordinates end on the ball's surface (or the image box)
        assert ((d.abs() > eps - 1e-6) | (ours <= 1e-6) | (ours >= 1 - 1e-6)).float().mean() > 0.5
    else:
        assert (d.flatten(1).norm(dim=1) > eps * 0.99).float().mean() > 0.5
        assert (d.flatten(1).norm(dim=1) <= eps + 1e-5).all()

def test_pgd_restarts_draw_different_starts_and_keep_the_worst(monkeypatch):
    torch.manual_seed(0)
    model = mr.build_model(mr.ModelConfig(arch="resnet18", width=0.0625)).eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    real, starts, lasts = mr.pgd, [], []

    def spy(*args, on_iterate=None, **kw):
        first = []

        def record(xa, logits):
            first.append(xa.clone()) if not first else None
            on_iterate(xa, logits)
        out = real(*args, on_iterate=record, **kw)
        starts.append(first[0])
        lasts.append(out)
        return out
    monkeypatch.setattr(mr, "pgd", spy)
    worst = mr.pgd_worst(model, x, y, 8 / 255, None, 3, "linf", restarts=3)
    assert len(starts) == 3 and not torch.equal(starts[0], starts[1]) and not torch.equal(starts[1], starts[2])
    with torch.no_grad():
        loss = lambda xa: F.cross_entropy(model(xa), y, reduction="none")
        wrong = lambda xa: model(xa).argmax(1) != y
        for xa in lasts:  # per example the kept point is misclassified, or of no lower loss than any run's last
            assert (wrong(worst) | (~wrong(xa) & (loss(worst) >= loss(xa) - 1e-6))).all()

def test_dlr_targeted_and_margin_on_hand_made_logits():
    z = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0], [0.5, 4.0, 1.0, 2.0, -3.0]])
    y, t = torch.tensor([0, 0]), torch.tensor([2, 3])
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2): sorted (3, 2, 1, 0, -1) and (4, 2, 1, 0.5, -3)
    expected = torch.tensor([-(3 - 2) / (3 - (1 + 0) / 2), -(0.5 - 2) / (4 - (1 + 0.5) / 2)])
    assert torch.allclose(mr.dlr_targeted(z, y, t), expected, atol=1e-6)
    assert torch.allclose(mr.dlr_targeted(7 * z + 3, y, t), expected, atol=1e-5)  # shift and scale invariant
    assert mr.margin(z, torch.tensor([0, 0])).tolist() == [1.0, -3.5]  # z_y - max_{j != y} z_j
    assert mr.margin(z, torch.tensor([1, 1])).tolist() == [-2.0, 2.0]

def test_apgd_t_targets_the_nine_highest_classes_after_the_label_in_order(monkeypatch):
    """100 classes, a model no attack can move (constant logits): every target runs, best-ranked first, 9 of them."""
    logits = torch.randn(100)

    class Constant(nn.Module):
        def forward(self, x):
            return logits.expand(len(x), -1) + 0 * x.flatten(1)[:, :1]
    y = logits.argmax().repeat(4)
    seen = []
    real = mr.dlr_targeted
    monkeypatch.setattr(mr, "dlr_targeted", lambda z, yy, t: (seen.append(int(t[0])), real(z, yy, t))[1])
    mr.apgd_targeted(Constant(), torch.rand(4, 3, 4, 4), y, steps=2, targets=9)
    order = [c for i, c in enumerate(seen) if i == 0 or seen[i - 1] != c]
    ranked = [c for c in logits.argsort(descending=True).tolist() if c != int(y[0])]
    assert order == ranked[:9]
    assert mr.target_ranking(logits.expand(4, -1), y)[0].tolist() == ranked  # FAB-T's order too

def test_box_projection_known_answers():
    """The smallest L-inf / L2 step onto w.z = w.t - c that stays in [0, 1], worked out by hand."""
    t, w = torch.tensor([[0.5, 0.5], [0.1, 0.5]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    d = mr.box_projection(t, w, torch.tensor([0.4, 0.4]), "linf")
    assert torch.allclose(d, torch.tensor([[-0.2, -0.2], [-0.1, -0.3]]), atol=1e-6)  # the box stops coordinate 0 at 0
    assert torch.allclose(mr.box_projection(t[:1], w[:1], torch.tensor([-0.4]), "linf"), torch.tensor([[0.2, 0.2]]))
    t, w = torch.tensor([[0.5, 0.5], [0.5, 0.1]]), torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    d = mr.box_projection(t, w, torch.tensor([0.5, 0.5]), "l2")  # free: -c w / ||w||^2; boxed: -min(lam w, room)
    assert torch.allclose(d, torch.tensor([[-0.1, -0.2], [-0.3, -0.1]]), atol=1e-6)
    for norm in ("linf", "l2"):  # out of the box's reach: every coordinate as far as it can go
        d = mr.box_projection(torch.tensor([[0.5, 0.2]]), torch.tensor([[1.0, -1.0]]), torch.tensor([5.0]), norm)
        assert torch.allclose(d, torch.tensor([[-0.5, 0.8]]), atol=1e-6)

def test_square_p_halves_at_autoattacks_breakpoints_and_is_not_rescaled(monkeypatch):
    expected = [(0, 1), (10, 1), (11, 2), (50, 2), (51, 4), (200, 4), (201, 8), (500, 8), (501, 16), (1000, 16),
                (1001, 32), (2000, 32), (2001, 64), (4000, 64), (4001, 128), (4999, 128), (6000, 128), (6001, 256),
                (8000, 256), (8001, 512)]
    assert [mr.square_p(q) for q, _ in expected] == pytest.approx([0.8 / d for _, d in expected])
    seen, real = [], mr.square_p  # Square asks for p at each query index itself, whatever its budget
    monkeypatch.setattr(mr, "square_p", lambda q, p_init=0.8: seen.append(q) or real(q, p_init))
    model = linear_model()
    x = 0.4 + 0.2 * torch.rand(4, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    for norm in ("linf", "l2"):
        seen.clear()
        mr.square(model, x, y, eps=1e-4, queries=60, norm=norm)  # too small to fool anything: every query runs
        assert seen == list(range(60))

def test_square_l2_pattern_is_the_papers():
    """s = 3: rows (1/4, 5/4, 1/4) over [[1/4, 1/4, 1/4], [1/4, 5/4, 1/4]] with the opposite sign, each rectangle
    scaled to unit norm, the whole to unit norm (Andriushchenko et al. 2020, Sec. 3.2)."""
    top = torch.tensor([[0.25, 1.25, 0.25]])
    bottom = torch.tensor([[0.25, 0.25, 0.25], [0.25, 1.25, 0.25]])
    eta = torch.cat([top / top.norm(), -bottom / bottom.norm()])
    assert torch.allclose(mr.square_eta(3), eta / eta.norm(), atol=1e-6)
    for s in (5, 8, 13):
        e = mr.square_eta(s)
        assert e.shape == (s, s) and e.norm() == pytest.approx(1, abs=1e-5)
        assert (e[: s // 2] > 0).all() and (e[s // 2:] < 0).all()

def test_apgd_halving_rule_and_its_checkpoints_the_authors_schedule(monkeypatch):
    assert mr.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert mr.apgd_checkpoints(50) == [11, 21, 30, 38, 45]  # 22% of 50 is 11, 3% rounds down to 1, then 51 > 50
    assert mr.apgd_checkpoints(3) == [1, 2, 3]
    # k = 22, rho = 0.75: 16 increases <= 16.5 halve (condition 1); 17 with the best loss improved keep; 17 without
    # improvement keep if halved last time, else halve (condition 2)
    increases, halved = torch.tensor([16.0, 17, 17, 17]), torch.tensor([False, False, True, False])
    then, now = torch.ones(4), torch.tensor([2.0, 2, 1, 1])
    assert mr.apgd_halve(increases, 22, halved, then, now).tolist() == [True, False, False, True]
    ks, real = [], mr.apgd_halve
    monkeypatch.setattr(mr, "apgd_halve", lambda inc, k, *a: ks.append(k) or real(inc, k, *a))
    model = linear_model()
    x = torch.rand(8, 3, 4, 4)
    mr.apgd(model, x, model(x).argmax(1).detach(), eps=1e-3, steps=100)
    assert ks == [22, 19, 16, 13, 10, 7, 6, 6]  # the steps between the checkpoints 22, 41, ..., 99

def test_fab_t_runs_the_nine_highest_targets_after_the_label_in_order(monkeypatch):
    """100 classes whose logits are 1 apart and barely move with x: FAB-T can flip nothing within eps, so it runs
    every target; the boundary direction w it projects onto names the target (w = v_t - v_y)."""
    torch.manual_seed(0)
    base, V = torch.randperm(100).float(), torch.randn(100, 48) * 1e-3

    class Nearly(nn.Module):
        def forward(self, z):
            return base + z.flatten(1) @ V.T
    model = Nearly()
    x = torch.rand(4, 3, 4, 4)
    y = model(x).argmax(1)
    ws, real = [], mr.box_projection
    monkeypatch.setattr(mr, "box_projection", lambda t, w, c, norm: ws.append(w[0].clone()) or real(t, w, c, norm))
    with torch.no_grad():
        xa = mr.fab_targeted(model, x, y, eps=8 / 255, steps=2, targets=9)
    assert torch.equal(xa, x)
    named = [int(((V - V[y[0]]) - w).norm(dim=1).argmin()) for w in ws]
    order = [c for i, c in enumerate(named) if i == 0 or named[i - 1] != c]
    ranked = [c for c in base.argsort(descending=True).tolist() if c != int(y[0])]
    assert order == ranked[:9] and len(named) == 9 * 2 * 2  # 9 targets x 2 steps x 2 projections

def test_constants_the_papers_and_their_code_fix_are_pinned(monkeypatch):
    """Madry/Rice's SGD recipe, TRADES' beta 6 and its 0.001 N(0, I) start, PGD's alpha = eps/4 (2/255 at 8/255),
    Switch's and ST-MoE's coefficients, AutoAttack's budgets (APGD 100 steps and rho 0.75, 9 targets, Square 5000
    queries from p 0.8, FAB's alpha_max 0.1, eta 1.05, beta 0.9) and the cosine schedule."""
    c, default = mr.Config(), lambda f, p: inspect.signature(f).parameters[p].default
    assert (c.lr, c.momentum, c.weight_decay, c.beta, c.train_steps, c.eps) == (0.1, 0.9, 5e-4, 6.0, 10, 8 / 255)
    assert (c.balance_coef, c.z_coef, c.apgd_steps, c.square_queries) == (1e-2, 1e-3, 100, 5000)
    assert default(mr.moe_aux_loss, "balance_coef") == 1e-2 and default(mr.moe_aux_loss, "z_coef") == 1e-3
    assert default(mr.apgd, "rho") == 0.75 and default(mr.apgd_targeted, "targets") == 9
    assert [default(mr.fab_targeted, p) for p in ("alpha_max", "eta", "beta")] == [0.1, 1.05, 0.9]
    assert default(mr.square, "p_init") == default(mr.square_linf, "p_init") == 0.8
    opt = mr.sgd([nn.Parameter(torch.zeros(1))], c.lr, c.momentum, c.weight_decay)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    sched = mr.cosine(opt, 10)
    factors = [sched.lr_lambdas[0](t) for t in (0, 5, 10)]
    assert factors == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    starts = []
    monkeypatch.setattr(mr, "pgd", lambda model, x0, *a, **k: starts.append(x0) or x0)
    x = torch.full((64, 3, 8, 8), 0.5)
    mr.trades_attack(nn.Sequential(nn.Flatten(), nn.Linear(192, 10)), x, c)
    assert (starts[0] - x).std().item() == pytest.approx(0.001, rel=0.05)

def test_apgd_first_steps_are_the_papers_replayed_by_hand():
    """APGD (Croce & Hein 2020, Alg. 1) on a linear model, its iterates recorded: x1 = P(x0 + eta sign(g0)) with eta =
    2 eps and no momentum, then x_{k+1} = P(x_k + 0.75 (z_{k+1} - x_k) + 0.25 (x_k - x_{k-1})), z_{k+1} = P(x_k +
    eta sign(g_k)); no checkpoint comes before step 4 of 20."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    seen = []
    rec = lambda m, inp: seen.append(inp[0].detach().clone())
    lin.register_forward_pre_hook(rec)
    x, y, eps = torch.rand(6, 3, 4, 4), torch.randint(0, 10, (6,)), 4 / 255
    mr.apgd(lin, x, y, eps, steps=20)
    P = lambda z: torch.min(torch.max(z, x - eps), x + eps).clamp(0, 1)

    def grad(z):
        z = z.clone().requires_grad_(True)
        return torch.autograd.grad(mr.ce_per_example(lin(z), y).sum(), z)[0]
    x0, x1, x2, x3 = seen[:4]
    assert torch.allclose(x1, P(x0 + 2 * eps * grad(x0).sign()), atol=1e-7)
    for prev, cur, nxt in ((x0, x1, x2), (x1, x2, x3)):
        z = P(cur + 2 * eps * grad(cur).sign())
        assert torch.allclose(nxt, P(cur + 0.75 * (z - cur) + 0.25 * (cur - prev)), atol=1e-6)


# ==== 4. Training methods =============================================================================================
def test_jtdmoe_steps_leave_the_other_member_unchanged():
    dual = mr.DualModel(small_moe(1, E=2), small_moe(2, E=2), 0.5)
    cfg = small_cfg(method="jtdmoe", experts=2)
    robust_opt, standard_opt = mr.Trainer(dual, cfg, total_steps=10).opts
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    s_before, r_before = snapshot(dual.standard), snapshot(dual.robust)
    mr.loss_step(dual.robust, robust_opt, mr.jtdmoe_robust_loss, x, y, cfg)
    assert not changed(s_before, dual.standard) and changed(r_before, dual.robust)
    s_before, r_before = snapshot(dual.standard), snapshot(dual.robust)
    mr.loss_step(dual, standard_opt, mr.jtdmoe_standard_loss, x, y, cfg)
    assert not changed(r_before, dual.robust) and changed(s_before, dual.standard)

@pytest.mark.parametrize("method", ["rt-er", "jtdmoe"])
def test_expert_path_terms_use_label_pgd_against_that_path(monkeypatch, method):
    calls = []
    real = mr.pgd

    def spy(m, x, y, *a, **k):
        layers = mr.moe_layers(m)
        forced = any(l.control is not None for l in layers)
        calls.append((forced, k.get("loss_fn", mr.ce_per_example), k.get("random_start", True), y.dtype))
        return real(m, x, y, *a, **k)
    monkeypatch.setattr(mr, "pgd", spy)
    cfg = small_cfg(method=method, experts=3)
    model = mr.build_run_model(cfg, 10, 32)
    step = mr.Trainer(model, cfg, 10)
    data = mr.make_synthetic(16, 8)
    step.step(data.train_x.float() / 255, data.train_y)
    on_path = [c for c in calls if c[0]]
    assert on_path and all(c[1] is mr.ce_per_example and c[2] and c[3] == torch.long for c in on_path)
    if method == "jtdmoe":
        assert len(on_path) == 3  # one per expert of f_R

def test_bf16_training_step_matches_float32():
    """One step from the same weights on the same batch. Standard: the update points the same way
    (cosine > 0.95). PGD-AT: the loss agrees to 2% (its update differs more, because sign steps
    turn bf16 rounding into different adversarial examples, as a different random start would)."""
    data = mr.make_synthetic(n_train=64, n_test=8)
    x, y = data.train_x.float() / 255, data.train_y
    for method in ("standard", "at"):
        updates, losses = {}, {}
        for precision in ("fp32", "bf16"):
            rt = mr.make_runtime("cpu", precision)
            torch.manual_seed(0)
            model = rt.prepare(mr.build_model(mr.ModelConfig(width=0.125, experts=2)))
            before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
            trainer = mr.Trainer(model, mr.Config(**{**TINY, "width": 0.125, "precision": precision, "method": method}),
                                 total_steps=10)
            torch.manual_seed(1)
            losses[precision] = trainer.step(x, y)["loss"].item()
            updates[precision] = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
        assert abs(losses["bf16"] - losses["fp32"]) < 0.02 * losses["fp32"], losses
        if method == "standard":
            cos = nn.functional.cosine_similarity(updates["bf16"], updates["fp32"], dim=0).item()
            assert cos > 0.95, cos

def test_bf16_training_on_a_cpu_survives(tmp_path):
    """bf16 training on a CPU, NCHW as in every precision, in a child process under MALLOC_CHECK_=3 (glibc aborts on
    heap corruption): oneDNN's channels_last weight gradient of a strided 1x1 convolution once corrupted it."""
    code = ("import sys, moe_robust as mr; sys.exit(mr.main(['--method', 'standard', '--width', '0.125', '--epochs', "
            "'1', '--train-limit', '96', '--test-limit', '16', '--eval-suite', 'pgd', '--eval-steps', '1', "
            "'--val-steps', '1', '--precision', 'bf16', '--device', 'cpu', '--out', sys.argv[1]]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o")], cwd=HERE, capture_output=True, text=True,
                       env=dict(os.environ, MALLOC_CHECK_="3"), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

@cuda
def test_cuda_step_is_bf16_channels_last_fused_and_syncs_only_in_dispatch():
    rt = mr.make_runtime("cuda")
    assert rt.amp_dtype == torch.bfloat16 and rt.channels_last
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    for arch in ("resnet18", "moe-resnet18"):
        cfg = mr.Config(**{**TINY, "arch": arch, "experts": 4, "train_steps": 3, "device": "cuda"})
        model = rt.prepare(mr.build_model(mr.model_config(cfg, 10, 32)))
        m = mr.Trainer(model, cfg, total_steps=10)  # PGD-AT
        assert m.opts[0].param_groups[0]["fused"]
        xb, yb = next(mr.batches(x, y, 32, rt.device, shuffle=True, train_augment=True))
        torch.backends.cudnn.benchmark = False  # autotuning a new expert batch size synchronises
        m.step(xb, yb)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                logs = m.step(xb, yb)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [str(v.message) for v in w if "synchroniz" in str(v.message)]
        assert len(syncs) == (0 if arch == "resnet18" else cfg.train_steps + 1), syncs
        assert torch.isfinite(logs["loss"]).item()

def test_rt_er_term_is_kl_clean_to_adversarial_on_the_runner_up_path_of_every_layer_times_beta():
    torch.manual_seed(10)
    model = mr.build_model(mr.ModelConfig(width=0.0625, experts=3, moe_blocks="layer3.1,layer4.1")).eval()
    with torch.no_grad():  # peaked predictions, so that KL(p || q) and KL(q || p) differ
        model.fc.weight.mul_(100)
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    cfg = small_cfg(method="rt-er", experts=3, train_steps=2, beta=2.5)
    routes = mr.runner_up_routes(model, x)  # each layer's second-ranked expert, given the runner-up layers before
    with torch.no_grad(), mr.forced_rank(model, 1):
        model(x)
    second = [r.ranking[:, 1] for r in mr.last_routing(model)]
    assert len(routes) == 2 and all(torch.equal(r.indices[:, 0], s) for r, s in zip(routes, second))
    assert (routes[0].indices[:, 0] != mr.current_routes(model, x)[0].indices[:, 0]).all()
    torch.manual_seed(11)
    term = mr.runner_up_term(model, x, y, cfg).item()
    torch.manual_seed(11)
    with mr.forced_routes(model, routes), torch.enable_grad():
        xa = mr.pgd(model, x, y, cfg.eps, cfg.alpha, cfg.train_steps, cfg.norm)  # label PGD against that path
        with torch.no_grad():
            log_p, log_q = model(x).log_softmax(1), model(xa).log_softmax(1)
    kl = lambda a, b: (a.exp() * (a - b)).sum(1).mean().item()
    assert term == pytest.approx(kl(log_p, log_q), rel=1e-4, abs=1e-7)  # KL(f_j(x) || f_j(x')): clean first
    assert kl(log_q, log_p) != pytest.approx(term, rel=1e-2)  # (the reverse KL would differ)
    torch.manual_seed(12)
    loss = mr.rter_loss(model, x, y, cfg)[0].item()
    torch.manual_seed(12)
    at = mr.at_loss(model, x, y, cfg)[0].item()
    assert loss == pytest.approx(at + 2.5 * mr.runner_up_term(model, x, y, cfg).item(), rel=1e-5)

def test_jtdmoe_robust_step_is_at_plus_beta_times_every_experts_kl_term_on_f_r_only(monkeypatch):
    dual = mr.DualModel(small_moe(1, E=2), small_moe(2, E=2), 0.5)
    cfg = small_cfg(method="jtdmoe", experts=2, train_steps=2, beta=3.0)
    robust_opt = mr.Trainer(dual, cfg, total_steps=10).opts[0]
    seen = []
    monkeypatch.setattr(mr, "descend", lambda opt, loss: seen.append((opt, loss.detach())))
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    f_r = dual.robust
    start = copy.deepcopy(f_r.state_dict())  # the step's forwards move BatchNorm statistics: replay from here
    torch.manual_seed(13)
    mr.loss_step(f_r, robust_opt, mr.jtdmoe_robust_loss, x, y, cfg)
    f_r.load_state_dict(start)
    torch.manual_seed(13)
    f_r.train()
    loss = mr.at_loss(f_r, x, y, cfg)[0]
    for i in range(2):
        with mr.forced_expert(f_r, i):
            xa = mr.pgd(f_r, x, y, cfg.eps, cfg.alpha, cfg.train_steps, cfg.norm)
            log_p, log_q = f_r(x).log_softmax(1), f_r(xa).log_softmax(1)
            loss = loss + 3.0 * (log_p.exp() * (log_p - log_q)).sum(1).mean()
    [(opt, got)] = seen
    assert opt is robust_opt and {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for p in f_r.parameters()}
    assert got.item() == pytest.approx(loss.item(), rel=1e-4)

def test_advmoe_step_is_its_algorithm_1_replayed_by_hand():
    """AdvMoE Alg. 1 by hand on a copy: (1) PGD against the current model, a step of the routers' own optimiser (lr
    --router-lr) on the robust loss; (2) PGD again, against the updated routers, a step of the experts' optimiser
    (lr --lr) on everything else. Trainer.step must leave the same weights: the order, the parameters each update
    moves and the optimiser of each are all pinned."""
    model = small_moe(router="centred")
    cfg = small_cfg(method="advmoe", lr=0.05, router_lr=0.4)
    replay = copy.deepcopy(model)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    torch.manual_seed(3)
    mr.Trainer(model, cfg, total_steps=10).step(x, y)
    router_ids = {id(p) for p in mr.router_parameters(replay)}
    parts = [[p for p in replay.parameters() if id(p) in router_ids], [p for p in replay.parameters()
                                                                        if id(p) not in router_ids]]
    torch.manual_seed(3)
    for params, lr in zip(parts, (0.4, 0.05)):
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        replay.train()
        with mr.frozen(replay):
            xa = mr.pgd(replay, x, y, cfg.eps, None, cfg.train_steps, "linf")
        loss = torch.nn.functional.cross_entropy(replay(xa), y) + mr.moe_aux_loss(replay, 1e-2, 1e-3)
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        opt.step()
    for (k, a), b in zip(model.state_dict().items(), replay.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k

def test_trades_attack_moves_every_example_and_raises_the_kl_above_noise(trained):
    """TRADES' inner maximisation starts at x + 0.001 N(0, I), where the KL's gradient is not zero: every example
    moves, and the KL it reaches beats a random corner of the same ball."""
    model, x, y, _ = trained
    x = x[:32]
    cfg = small_cfg(method="trades", train_steps=5)
    torch.manual_seed(0)
    xa = mr.trades_attack(model, x, cfg)
    assert (xa - x).flatten(1).abs().amax(1).min() > 1 / 255
    assert (xa - x).abs().max() <= cfg.eps + 1e-6
    with torch.no_grad():
        p = model(x).softmax(1)
        kl = lambda z: mr.trades_kl(model(z), p).mean().item()
        assert kl(xa) > 2 * kl((x + cfg.eps * torch.randn_like(x).sign()).clamp(0, 1)) > 0


# ==== 5. Evaluating an MoE ============================================================================================
def test_full_report_robust_is_minimum_over_named_attacks():
    model = small_moe(E=2).eval()
    data = mr.make_synthetic(16, 48)
    cfg = small_cfg(eval_steps=3, apgd_steps=4, apgd_targets=2, square_queries=20, eval_suite="full")
    res = mr.evaluate_full(model, data.test_x, data.test_y, E(cfg), torch.device("cpu"))
    assert [a.split("-")[0].split(" ")[0] for a in res["attacks"]] == ["PGD", "APGD", "APGD", "FAB", "soft", "Square"]
    assert all(a in res["attack"] for a in res["attacks"])
    after = list(res["robust_after"].values())  # the cascade: each attack only lowers RA
    assert res["robust_acc"] == after[-1] and after == sorted(after, reverse=True) and after[0] <= res["clean_acc"]
    assert sum(res["fooled_by"].values()) == pytest.approx(res["clean_acc"] - res["robust_acc"], abs=1e-5)  # 6 digits
    assert len(res["probe"]["robust_acc"]) == len(mr.PROBE_FACTORS) and isinstance(res["warnings"], list)
    assert 0 <= res["ra_e"] <= res["clean_acc"] and 0 <= res["ra_r"] <= res["clean_acc"]
    assert sum(res["routing"]["usage"][0]) == 48
    assert np.array(res["routing"]["class_expert"][0]).sum() == 48
    text = mr.format_report(res)  # every figure names the attacks behind it
    assert "RA-E (clean routes fixed; PGD-3" in text and "> FAB-T-4 x2 > Square-20)" in text
    assert "per expert SA/RA (PGD-3" in text and "RA-R (routing-only PGD-3" in text
    assert res["per_expert_attacks"] == res["ra_e_attacks"] == [a for a in res["attacks"] if "soft" not in a]

def test_autoattack_suite_runs_in_order_only_on_robust_points(monkeypatch):
    model = small_moe(E=2).eval()
    data = mr.make_synthetic(16, 40)
    sizes = {}
    for name in ("apgd", "apgd_targeted", "fab_targeted", "square"):
        real = getattr(mr, name)
        monkeypatch.setattr(mr, name, lambda m, x, y, *a, _r=real, _n=name, **k:
                            sizes.setdefault(_n, len(x)) and _r(m, x, y, *a, **k))
    cfg = small_cfg(eval_suite="autoattack", apgd_steps=3, apgd_targets=2, square_queries=5)
    res = mr.evaluate_full(model, data.test_x, data.test_y, E(cfg), torch.device("cpu"))
    assert [a.split("-")[0] for a in res["attacks"]] == ["APGD", "APGD", "FAB", "Square"]
    assert "ra_e" not in res and "probe" not in res
    after = list(res["robust_after"].values())
    n = len(data.test_y)
    assert sizes["apgd"] == round(res["clean_acc"] * n)  # APGD-CE on the clean-correct points
    assert sizes.get("apgd_targeted", 0) <= round(after[0] * n)  # APGD-T on what APGD-CE left
    assert sizes.get("fab_targeted", 0) <= round(after[1] * n)  # FAB-T on what APGD-T left

def test_full_suite_runs_on_a_model_that_apgd_t_only_partly_breaks():
    """RA-E keeps per-example clean routes while the cascade shrinks the batch: an MoE of linear
    experts that the attacks break only in part, so APGD-T re-batches per target class."""
    torch.manual_seed(0)
    model = mr.MoE([nn.Sequential(mr.Normalize((0.5,) * 3, (0.1,) * 3), nn.Flatten(), nn.Linear(48, 10))
                    for _ in range(3)], 3, k=1, router="linear").eval()
    xq = (0.4 + 0.2 * torch.rand(128, 3, 4, 4)).mul(255).round().byte()
    with torch.no_grad():
        y = model(xq.float() / 255).argmax(1)
    res = mr.evaluate_full(model, xq, y, E(small_cfg(eval_suite="full", eps=2 / 255, eval_steps=1, apgd_steps=2,
                                                   apgd_targets=5, square_queries=2)), torch.device("cpu"))
    assert 0 < res["robust_acc"] < res["clean_acc"] == 1 and 0 < res["ra_e"] <= 1

def test_soft_router_attack_is_scored_on_the_hard_model(monkeypatch, trained):
    model, x, y, _ = trained  # a trained model: a random one's near-tied logits flip with the batch's grouping
    model.eval()
    judge = Recorder(model, y)
    torch.manual_seed(0)
    xa = mr.pgd_worst(mr.SoftRouted(model), x, y, eps=4 / 255, steps=5, judge=judge)
    assert not model.training  # the wrapper restores the model's own mode
    ever = torch.stack(judge.wrong).any(0)  # some iterate fooled the hard-routed model
    with torch.no_grad():
        assert ((model(xa).argmax(1) != y) | ~ever).all()
    calls = []  # the full suite's soft-router attack passes the hard model as judge
    real, model = mr.pgd_worst, small_moe(E=3).eval()
    monkeypatch.setattr(mr, "pgd_worst", lambda m, *a, **k: calls.append((type(m), k.get("judge"))) or real(m, *a, **k))
    data = mr.make_synthetic(16, 16)
    mr.evaluate_full(model, data.test_x, data.test_y, E(small_cfg(eval_suite="full", eval_steps=2, apgd_steps=2,
                                                                apgd_targets=1, square_queries=2)), torch.device("cpu"))
    soft = [j for t, j in calls if t is mr.SoftRouted]
    assert soft and all(j is model for j in soft)

def test_evaluation_is_true_float32_and_restores_tf32():
    seen, model = [], nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    model.register_forward_pre_hook(lambda m, i: seen.append(flags() + (torch.is_autocast_enabled("cpu"),)))
    old = flags()
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        data = mr.make_synthetic(8, 8, size=8)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's bf16 region (a training step's)
            mr.evaluate(model, data.test_x, data.test_y, mr.AttackConfig(steps=1), torch.device("cpu"))
        assert seen and all(s == (False, False, False) for s in seen) and flags() == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

def test_per_expert_figures_are_those_of_each_forced_expert_network(trained):
    model = copy.deepcopy(trained[0]).eval()
    layer = mr.moe_layers(model)[0]
    with torch.no_grad():  # expert 1 outputs nothing: f_1 is a different network from f_0
        for p in layer.experts[1].parameters():
            p.zero_()
    data = mr.make_synthetic(16, 64)
    cfg = small_cfg(eval_steps=3, apgd_steps=3, apgd_targets=2, square_queries=20, eval_suite="full")
    res = mr.evaluate_full(model, data.test_x, data.test_y, E(cfg), torch.device("cpu"))
    x, y = data.test_x.float() / 255, data.test_y
    clean = []
    for i in range(2):
        with torch.no_grad(), mr.forced_expert(model, i):
            clean.append((model(x).argmax(1) == y).float().mean().item())
        assert res["per_expert"][i]["clean_acc"] == pytest.approx(clean[i])
        assert res["per_expert"][i]["robust_acc"] <= clean[i]
    assert clean[0] != clean[1]

def test_ra_e_is_exact_on_linear_experts():
    """Two linear experts f_e(x) = W_e x + b_e on 2 classes, routes fixed at the clean ones: the strongest L-inf
    attack in the image box lowers the margin of example n by sum_p |dw_p| * (room to move pixel p the bad way, at
    most eps), which PGD reaches; RA-E is the fraction of examples whose margin survives that."""
    torch.manual_seed(14)
    moe = mr.MoE([nn.Sequential(nn.Flatten(), nn.Linear(48, 2)) for _ in range(2)], 3, k=1, router="linear")
    model = nn.Sequential(moe).eval()
    xu = torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8)
    x, eps = xu.float() / 255, 8 / 255
    m0 = x[:, 0].mean((1, 2)).median()
    with torch.no_grad():  # the router splits the images at the median red level
        moe.router.weight.copy_(torch.tensor([[30.0, 0, 0], [-30.0, 0, 0]]))
        moe.router.bias.copy_(torch.tensor([-30.0, 30.0]) * m0)
    with torch.no_grad():
        z = model(x)
    route, gate = moe.routing.indices[:, 0], moe.routing.gates[:, 0]  # the output is gate * f_e(x); gate > 0
    y = torch.where(torch.rand(64) < 0.8, z.argmax(1), 1 - z.argmax(1))  # mostly right, some wrong
    assert 0 < (route == 0).sum() < 64
    W = torch.stack([e[1].weight.detach() for e in moe.experts])[route]  # (64, 2, 48): each example's expert
    dw = W[torch.arange(64), y] - W[torch.arange(64), 1 - y]  # (64, 48)
    room = torch.where(dw > 0, x.flatten(1).clamp(max=eps), (1 - x.flatten(1)).clamp(max=eps))
    margin = (z[torch.arange(64), y] - z[torch.arange(64), 1 - y]) / gate  # of f_e itself
    worst = margin - (dw.abs() * room).sum(1)
    assert worst.abs().min() > 1e-3  # no example on the edge
    exact = ((margin > 0) & (worst > 0)).float().mean().item()
    cfg = small_cfg(eval_steps=20, apgd_steps=20, square_queries=10, eval_suite="full")
    res = mr.evaluate_full(model, xu, y, E(cfg), torch.device("cpu"))
    assert res["ra_e"] == pytest.approx(exact) and 0 < exact < res["clean_acc"]

@pytest.mark.parametrize("smooth", [False, True])
def test_masking_warnings_fire_on_a_masked_model_and_stay_silent_on_a_smooth_one(smooth):
    torch.manual_seed(0)
    model = Quantised(smooth).eval()
    xu = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        y = model(xu.float() / 255).argmax(1)
    cfg = mr.Config(eval_suite="full", eval_steps=20, apgd_steps=20, square_queries=300, device="cpu")
    res = mr.evaluate_full(model, xu, y, E(cfg), torch.device("cpu"))
    if smooth:  # two-class linear: PGD reaches the exact optimum, nothing beats it, large eps breaks everything
        assert res["warnings"] == []
    else:
        text = " ".join(res["warnings"])
        assert "Square, which uses no gradient" in text and "PGD overstates" in text and "masked" in text
        assert res["robust_after"]["Square-300"] < res["robust_after"]["PGD-20 linf eps=8/255 restarts=1"] - 0.1

def test_ra_e_carries_each_examples_clean_routes_through_every_attack(trained):
    """RA-E's cascade re-batches (APGD-T and FAB-T per target, Square per query): every forward of every attack
    routes each row exactly as that row's example was routed clean."""
    model, x = copy.deepcopy(trained[0]).eval(), trained[1][:48]
    layer = mr.moe_layers(model)[0]
    with torch.no_grad():  # routes that depend on the input: the pooled features share one large direction, which
        layer.router.weight.normal_(0, 5.0)  # the bias cancels
        model(x)
        layer.router.bias -= layer.routing.logits.median(0).values
        y = model(x).argmax(1)  # all right on clean x: every attack has work
    clean = mr.current_routes(model, x)[0].indices[:, 0]
    assert len(clean.unique()) > 1
    inputs, used = [], []
    pre = model.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    post = layer.register_forward_hook(lambda m, i, o: used.append(m.routing.indices[:, 0].clone()))
    cfg = small_cfg(eval_suite="autoattack", eps=1 / 255, apgd_steps=3, apgd_targets=3, square_queries=10)
    torch.manual_seed(0)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    after, _ = mr.attack_cascade(mr.FixedRoutes(model, mr.current_routes(model, x), 48), x, y,
                                 mr.suite_attacks(E(cfg), 10, True), ok)
    pre.remove(), post.remove()
    subsets = 0
    for xb, r in zip(inputs, used):
        example = ((xb[:, None] - x[None]).flatten(2).abs().amax(2)).argmin(1)  # each row's example
        assert torch.equal(r, clean[example])
        subsets += not torch.equal(example, torch.arange(len(xb)))
    assert subsets >= 20  # APGD-T, FAB-T and Square ran on subsets of the rows, not on the batch or a prefix

def test_ra_r_keeps_an_iterate_the_routing_only_model_gets_wrong(monkeypatch):
    """RA-R judges the routing attack's iterates by the hard-routed model (experts on clean x, routes of x'): an
    example that some iterate broke comes back broken, and RA-R is that model's accuracy on the returned x'."""
    model = small_moe(E=4).eval()
    layer = mr.moe_layers(model)[0]
    with torch.no_grad():
        layer.router.weight.normal_(0, 5.0)
        for p in layer.experts.parameters():  # experts far apart: a route change changes the prediction
            p.normal_(0, 1.0)
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)  # every example right on clean x
    wrong = []

    class Recording(mr.RoutesOf):
        def forward(self, xa):
            out = super().forward(xa)
            wrong.append(out.argmax(1) != y)
            return out
    monkeypatch.setattr(mr, "RoutesOf", Recording)
    xr = mr.router_attack(model, x, y, mr.AttackConfig(eps=16 / 255, steps=10))
    ever = torch.stack(wrong).any(0)
    with torch.no_grad():
        now = Recording(model, x)(xr).argmax(1) != y
    assert ever.any() and torch.equal(now, ever)

def test_autoattack_suite_breaks_what_the_official_autoattack_breaks(tmp_path):
    """Parity with Croce & Hein's own AutoAttack (`pip install pyautoattack`, a test-only requirement that CI
    installs): a PGD-AT MoE-ResNet18 (width 0.0625, E = 2) trained here on 16 x 16 synthetic images in about 20 s,
    100 test images, L-inf eps 8/255, the standard suite on both sides (APGD-CE, APGD-T, FAB-T, Square at the
    official budgets). Every image the official code breaks, the file's `autoattack` suite breaks too, up to one:
    the two draw different random starts and Square windows, so an image on the edge can fall to one draw only."""
    aa = pytest.importorskip("pyautoattack", reason="the official AutoAttack is not installed (pip install "
                             "pyautoattack): the parity test is skipped")
    data = mr.make_synthetic(2400, 100, size=16)
    cfg = mr.Config(method="at", out=str(tmp_path), **{**TINY, "train_limit": 2400, "epochs": 4, "train_steps": 5,
                                                        "val_steps": 5})
    mr.train(cfg, data=data)
    model, _, _ = mr.load_model(str(tmp_path / "best.pt"), mr.make_runtime("cpu"))
    model.eval()
    x, y = data.test_x.float() / 255, data.test_y
    torch.manual_seed(0)
    with mr.float32_evaluation():
        ok = mr.predict(model, x) == y
        attacks = mr.suite_attacks(mr.EvalConfig(suite="autoattack"), 10, True)
        assert [a for a, _ in attacks] == ["APGD-CE-100", "APGD-T-100 x9", "FAB-T-100 x9", "Square-5000"]
        ours = mr.attack_cascade(model, x, y, attacks, ok)[0]["Square-5000"]
        official = aa.AutoAttack(model, norm="Linf", eps=8 / 255, version="standard", seed=0, device="cpu")
        xa, _ = official.run_standard_evaluation(x, y, batch_size=100)
        theirs = ok & (mr.predict(model, xa) == y)
    assert 0.1 < theirs.float().mean() < ok.float().mean() - 0.05  # a model the attacks break only in part
    assert (ours & ~theirs).sum() <= 1

def test_every_reported_number_is_true_float32(tmp_path, monkeypatch, capsys):
    """A probe inside the model records autocast and the TF32 flags at every forward. With TF32 allowed (as on CUDA)
    and bf16 training: every forward outside a training step (validation, the test report, --eval, the dual sweep,
    --lipschitz) runs in true float32, and the flags come back."""
    seen, in_step = [], []
    probe = lambda m, inp: seen.append((bool(in_step), torch.is_autocast_enabled("cpu"),
                                        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
    build = mr.build_model

    def probed(cfg):
        model = build(cfg)
        model.normalize.register_forward_pre_hook(probe)
        return model
    step = mr.Trainer.step

    def marked(self, x, y):
        in_step.append(1)
        try:
            return step(self, x, y)
        finally:
            in_step.pop()
    monkeypatch.setattr(mr, "build_model", probed)
    monkeypatch.setattr(mr.Trainer, "step", marked)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    out, ck = tmp_path / "run", str(tmp_path / "run" / "best.pt")
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        runs = {"training (validation, test report)": T + ["--precision", "bf16", "--out", str(out)],
                "--eval": ["--eval", ck, "--eval-suite", "full", "--eval-steps", "1", "--apgd-steps", "1",
                           "--apgd-targets", "3", "--square-queries", "2", "--test-limit", "8"],
                "dual sweep": ["--method", "dual", "--standard-ckpt", ck, "--robust-ckpt", ck, "--dual-sweep", "0,1",
                               "--eval-suite", "pgd", "--eval-steps", "1", "--test-limit", "8", "--out",
                               str(tmp_path / "dual")],
                "--lipschitz": ["--lipschitz", ck, "--lipschitz-n", "4"]}
        for name, argv in runs.items():
            seen.clear()
            assert mr.main(argv + ["--device", "cpu"]) == 0, (name, capsys.readouterr().err)
            reports = [s[1:] for s in seen if not s[0]]
            assert reports and all(s == (False, False, False) for s in reports), name
            assert name != "training (validation, test report)" or any(s[1] for s in seen if s[0])  # bf16 steps
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

@pytest.mark.parametrize("archs", [("moe-vit", "moe-resnet18"), ("resnet18", "moe-vit"), ("resnet18", "resnet18")])
def test_a_dual_model_of_any_two_architectures_gets_the_full_report(archs):
    """Per-image and per-token MoE layers route different numbers of rows; each layer's route flips are counted on its
    own rows."""
    torch.manual_seed(0)
    members = [mr.build_model(mr.ModelConfig(arch=a, width=0.0625, experts=2, vit_depth=2)).eval() for a in archs]
    data = mr.make_synthetic(8, 8)
    cfg = small_cfg(eval_suite="full", eval_steps=1, apgd_steps=1, apgd_targets=3, square_queries=2)
    r = mr.evaluate_full(mr.DualModel(*members, 0.5), data.test_x, data.test_y, E(cfg), torch.device("cpu"))
    layers = len(mr.moe_layers(mr.DualModel(*members)))
    assert len(r.get("routing", {}).get("route_flip_attack", [])) == layers
    assert ("per_expert" in r) == (layers > 0) and 0 <= r["robust_acc"] <= r["clean_acc"] <= 1

def test_masking_warnings_fire_exactly_past_their_thresholds():
    """Square breaking what every gradient attack missed: warned from 1% of the examples and at least 2; the suite
    beating PGD: warned above 0.02; the probe: warned when RA is left at the largest eps, or rises by over 0.02."""
    def res(square_fooled, gap, probe):
        return {"attacks": ["PGD-20", "APGD-CE-100", "Square-5000"], "robust_acc": 0.40,
                "robust_after": {"PGD-20": 0.40 + gap, "APGD-CE-100": 0.40, "Square-5000": 0.40},
                "fooled_by": {"PGD-20": 0.1, "APGD-CE-100": gap, "Square-5000": square_fooled},
                "probe": {"eps": [1, 2, 4], "robust_acc": probe}}
    quiet = res(0.0, 0.0199, [0.4, 0.4199, 0.0])
    assert mr.masking_warnings(quiet, 200) == []
    assert len(mr.masking_warnings(res(0.01, 0.0199, [0.4, 0.4199, 0.0]), 200)) == 1  # 2 of 200 images
    assert mr.masking_warnings(res(0.01, 0.0199, [0.4, 0.4199, 0.0]), 100) == []  # 1 image: not yet
    assert "PGD overstates" in mr.masking_warnings(res(0.0, 0.0201, [0.4, 0.4199, 0.0]), 200)[0]
    assert "rises with eps" in mr.masking_warnings(res(0.0, 0.0, [0.4, 0.4201, 0.0]), 200)[0]
    assert "attack success should reach 100%" in mr.masking_warnings(res(0.0, 0.0, [0.4, 0.2, 0.005]), 200)[0]


# ==== 6. Lipschitz constants and certificates =========================================================================
def test_gram_iteration_bounds_explicit_svd_of_small_convolutions():
    torch.manual_seed(0)
    A = torch.randn(20, 7, 5, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(A, 2)
    gram = mr.gram_spectral_bound(A, 12)
    assert (gram >= exact * (1 - 1e-12)).all() and (gram <= exact * 1.002).all()
    for cin, cout, k, stride, pad, hw in [(2, 3, 3, 1, 1, 5), (3, 4, 3, 2, 1, 6), (2, 2, 1, 2, 0, 4),
                                          (4, 2, 3, 1, 0, 5)]:
        conv = nn.Conv2d(cin, cout, k, stride, pad, bias=False).double()
        zero = torch.zeros(cin, hw, hw, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(lambda v: conv(v[None])[0], zero)
        sigma = torch.linalg.matrix_norm(J.reshape(J[..., 0, 0, 0].numel(), -1), 2).item()
        bound = mr.conv_spectral_bound(conv.weight, (hw, hw), (pad, pad))
        assert sigma * (1 - 1e-9) <= bound <= sigma * 1.6
        # power iteration approaches sigma from below: no bound
        v = torch.randn(1, cin, hw, hw, dtype=torch.float64)
        for _ in range(3):
            v = torch.autograd.grad(conv(v.requires_grad_(True)).square().sum() / 2, v)[0].detach()
            v = v / v.norm()
        assert conv(v).norm().item() <= sigma * (1 + 1e-9)

def test_hard_moe_bound_is_route_stable_not_global():
    """Two points a hair apart on either side of a route switch: the ratio blows past the bound."""
    torch.manual_seed(5)
    layer = mr.MoE([mr.residual_branch(3, 4, 3, 1) for _ in range(3)], 3, k=1, router="linear").eval()
    model = nn.Sequential(layer).eval()
    x = torch.rand(4, 3, 6, 6)
    bound = mr.lipschitz_bound(model, x, "linf")["bound"]
    r = mr.route_stability_radius(layer, x, "linf")
    d = mr.route_flip_direction(layer, x, "linf")
    a, b = x + (r * 0.999).view(-1, 1, 1, 1) * d, x + (r * 1.001).view(-1, 1, 1, 1) * d
    with torch.no_grad():
        ratio = (model(a) - model(b)).flatten(1).abs().amax(1) / (a - b).flatten(1).abs().amax(1)
    assert (ratio > bound).any()

def test_linear_model_known_constants():
    torch.manual_seed(0)
    lin = nn.Linear(30, 6)
    x = torch.rand(4, 30)
    W = lin.weight.detach()
    linf, l2 = W.abs().sum(1).max().item(), torch.linalg.matrix_norm(W, 2).item()
    rel = lambda a, b: abs(a - b) / b
    assert all(rel(v, linf) < 1e-3 for v in mr.local_lipschitz(lin, x, 0.1, "linf", 5).tolist())
    assert all(rel(v, l2) < 1e-3 for v in mr.local_lipschitz(lin, x, 0.1, "l2", 60).tolist())
    assert all(rel(v, l2) < 1e-3 for v in mr.jacobian_spectral_norm(lin, x, 60).tolist())
    assert rel(mr.lipschitz_bound(lin, x, "linf")["bound"], linf) < 1e-6
    assert rel(mr.lipschitz_bound(lin, x, "l2", iters=100)["bound"], l2) < 1e-3

@pytest.mark.parametrize("arch", ["resnet18", "moe-resnet18"])
def test_power_iteration_matches_explicit_jacobian_and_bound_dominates(arch):
    torch.manual_seed(1)
    model = mr.build_model(mr.ModelConfig(arch=arch, width=0.0625, experts=2, moe_blocks="layer2.0,layer4.1")).eval()
    with torch.no_grad():  # random BatchNorm statistics, so eval-mode BN is not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_(0, 0.1)
    x = torch.rand(3, 3, 32, 32)
    sig = mr.jacobian_spectral_norm(model, x, 60)
    for n in range(3):
        J = torch.autograd.functional.jacobian(lambda z: model(z[None])[0], x[n]).reshape(10, -1)
        assert abs(sig[n].item() - torch.linalg.matrix_norm(J, 2).item()) / sig[n].item() < 1e-3
    for norm, eps in (("linf", 4 / 255), ("l2", 0.5)):
        bound = mr.lipschitz_bound(model, x, norm)["bound"]
        local = mr.local_lipschitz(model, x, eps, norm, 10)
        assert (local <= bound).all() and local.min() > 0
    assert (sig <= mr.lipschitz_bound(model, x, "l2")["bound"]).all()

def test_moe_bound_reports_per_expert_terms_and_dual_combines():
    f_s, f_r = small_moe(1, E=3).eval(), small_moe(2, E=3).eval()
    x = torch.rand(4, 3, 32, 32)
    b = mr.lipschitz_bound(f_s, x, "l2")
    moe = b["moe"][0]
    assert len(moe["experts_L"]) == 3 and len(moe["M"]) == 3
    assert moe["soft_bound"] >= moe["hard_route_bound"] >= max(moe["experts_L"])
    ks, kr = b["bound"], mr.lipschitz_bound(f_r, x, "l2")["bound"]
    kd = mr.lipschitz_bound(mr.DualModel(f_s, f_r, 0.3), x, "l2")["bound"]
    assert kd == pytest.approx(0.7 * ks + 0.3 * kr, rel=1e-9)

@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("router", mr.ROUTERS)
def test_route_stability_radius_is_exact_for_a_linear_router(norm, router):
    """Exact for the papers' router and for the centred one, whose running statistics fold into W and b at eval."""
    torch.manual_seed(2)
    layer = mr.MoE([mr.residual_branch(8, 8, 8, 1) for _ in range(4)], 8, k=1, router=router).eval()
    if router == "centred":  # statistics that are not the identity, as after training
        layer.centre.running_mean.uniform_(-1, 1), layer.centre.running_var.uniform_(0.2, 3)
    h = torch.randn(10, 8, 5, 5)
    r = mr.route_stability_radius(layer, h, norm)
    d = mr.route_flip_direction(layer, h, norm)
    route = lambda z: mr.current_routes(layer, z)[0].indices[:, 0]
    base = route(h)
    assert torch.allclose(mr.per_example_norm(d, norm, keepdim=False), torch.ones(10))
    assert (route(h + (r * 1.001).view(-1, 1, 1, 1) * d) != base).all()  # just above, worst direction: flips
    assert (route(h + (r * 0.999).view(-1, 1, 1, 1) * d) == base).all()  # just below: stays
    for _ in range(20):  # nothing just below flips: random directions at 0.999 r
        u = torch.randn_like(h)
        u = u / mr.per_example_norm(u, norm)
        if norm == "linf":
            u = u.sign()
        assert (route(h + (r * 0.999).view(-1, 1, 1, 1) * u) == base).all()

def test_certificate_survives_pgd_just_below_its_radius():
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x, y = torch.rand(200, 3, 4, 4), torch.randint(0, 5, (200,))
    with torch.no_grad():
        y = mlp(x).argmax(1)  # every prediction right, so each example gets a radius
    for norm in ("linf", "l2"):
        cert = mr.certify(mlp, x, y, norm)
        rad = cert["radius"]
        assert (rad > 0).all()
        for n in range(0, 200, 20):
            xa = mr.pgd_worst(mlp, x[n:n + 1], y[n:n + 1], eps=0.999 * rad[n].item(), steps=30, norm=norm, restarts=2)
            assert mlp(xa).argmax(1).item() == y[n].item()
    # the same check for an MoE model, where the route-stable radius also binds
    model = small_moe(4, E=3).eval()
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    cert = mr.certify(model, x, y, "linf")
    assert (cert["radius"] <= cert["route_radius"]).all() and (cert["radius"] > 0).all()
    for n in range(4):
        xa = mr.pgd_worst(model, x[n:n + 1], y[n:n + 1], eps=0.999 * cert["radius"][n].item(), steps=10)
        assert model(xa).argmax(1).item() == y[n].item()
        assert torch.equal(mr.current_routes(model, xa)[0].indices, mr.current_routes(model, x[n:n + 1])[0].indices)

def test_vit_has_local_estimates_but_no_global_bound():
    model = mr.build_model(mr.ModelConfig(arch="moe-vit", width=0.125)).eval()
    x = torch.rand(2, 3, 32, 32)
    assert (mr.jacobian_spectral_norm(model, x, 3) > 0).all()
    with pytest.raises(mr.UserError, match="attention"):
        mr.lipschitz_bound(model, x)

def test_certificate_is_the_exact_minimal_radius_of_a_symmetric_two_class_linear_model():
    """f(x) = (w.x + b0, -w.x + b1): the margin 2 w.x + b0 - b1 moves at 2 ||w||_1 per unit of L-inf, so the
    smallest flipping perturbation has radius margin / (2 ||w||_1) = margin / (2 K), K = max_i ||w_i||_1 the
    bound. The certificate must equal it: a step just beyond it along -sign flips every example, just short of it
    none (margin / K, or a bound too small, fails one side)."""
    torch.manual_seed(8)
    w = torch.randn(48)
    lin = nn.Linear(48, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([w, -w]))
        lin.bias.copy_(torch.tensor([0.3, -0.1]))
    model = nn.Sequential(nn.Flatten(), lin).eval()
    x = torch.rand(32, 3, 4, 4)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    exact = (z[:, 0] - z[:, 1]).abs() / (2 * w.abs().sum())
    cert = mr.certify(model, x, y, "linf")
    assert torch.allclose(cert["radius"], exact, rtol=1e-5)
    direction = (torch.where(y == 0, -1.0, 1.0)[:, None] * w.sign()).view(-1, 3, 4, 4)
    flips = lambda r: (model(x + r.view(-1, 1, 1, 1) * direction).argmax(1) != y)
    with torch.no_grad():
        assert flips(exact * 1.001).all() and not flips(exact * 0.999).any()
    l2 = mr.certify(model, x, y, "l2")["radius"]  # L2: K = ||W||_2 = sqrt(2) ||w||, a bound sqrt(2) below exact
    exact_l2 = (z[:, 0] - z[:, 1]).abs() / (2 * w.norm())
    assert torch.allclose(l2, exact_l2 / math.sqrt(2), rtol=1e-4)

@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_each_module_bound_is_its_exact_norm_and_the_network_bound_their_product(norm):
    """Per module: the bound equals the exact operator norm (inf: largest row L1 norm; L2: largest singular value,
    which the Gram iteration bounds from above to 1e-4) of its explicit matrix; a k x k convolution's L2 bound is
    that of the circular convolution on the padded grid, an upper bound (equal for a 1 x 1 kernel). A chain
    multiplies the bounds, a residual block adds branch and shortcut."""
    torch.manual_seed(9)
    exact = lambda M: (M.abs().sum(1).max() if norm == "linf" else torch.linalg.matrix_norm(M, 2)).item()
    conv1, bn, conv2, lin = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3, stride=2), nn.Linear(8, 5)
    with torch.no_grad():
        bn.weight.normal_()
        bn.running_var.uniform_(0.2, 2.0)
    net = nn.Sequential(mr.Normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.25)), conv1, bn, nn.ReLU(), conv2, nn.Flatten(),
                        lin).eval()
    x = torch.rand(2, 3, 5, 5)
    lb = mr.LipschitzBound(net, norm).measure(x)
    shapes = [(3, 5, 5), (3, 5, 5), (4, 5, 5), (4, 5, 5), (4, 5, 5), (2, 2, 2), (8,)]
    per = []
    for m, shape in zip(net, shapes):
        linear_part = (lambda t, m=m: m(t) if not isinstance(m, nn.ReLU) else t)
        e = 1.0 if isinstance(m, (nn.ReLU, nn.Flatten)) else exact(explicit_matrix(linear_part, shape))
        b = lb.bound(m, 1.0)
        upper_only = norm == "l2" and isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
        assert e * (1 - 1e-6) <= b <= (math.inf if upper_only else e * (1 + 1e-4) + 1e-9), (type(m).__name__, b, e)
        per.append(b)
    assert lb() == pytest.approx(math.prod(per), rel=1e-9)
    block = mr.BasicBlock(4, 4, 2).eval()
    lb = mr.LipschitzBound(block, norm).measure(torch.rand(2, 4, 6, 6))
    assert lb() == pytest.approx(lb.bound(block.branch, 1.0) + lb.bound(block.shortcut, 1.0))

def test_network_bound_is_the_exact_product_along_the_chain():
    """ResNet18's bound is normalisation x stem x stages x pool x fc, each factor its own bound (the normalisation's
    1 / min std included); a top-1 MoE layer takes the largest expert term, a top-2 layer their sum."""
    torch.manual_seed(0)
    for norm in ("linf", "l2"):
        model = mr.build_model(mr.ModelConfig(arch="resnet18", width=1 / 32, norm="synthetic")).eval()
        x = torch.rand(2, 3, 16, 16)
        lb = mr.LipschitzBound(model, norm).measure(x)
        total = lb()
        assert lb.bound(model.normalize, 1.0) == pytest.approx(1 / 0.25)
        chain = [model.normalize, model.stem, model.layer1, model.layer2, model.layer3, model.layer4]
        L = math.prod(lb.bound(m, 1.0) for m in chain)
        pool = 1.0 if norm == "linf" else 1 / math.sqrt(2 * 2)
        assert total == pytest.approx(L * pool * lb.bound(model.fc, 1.0), rel=1e-9)
    for k in (1, 2):
        torch.manual_seed(1)
        layer = mr.MoE([nn.Linear(6, 4) for _ in range(3)], 6, k=k, tokens=True, router="linear").eval()
        h = torch.randn(2, 5, 6)
        lb = mr.LipschitzBound(layer, "linf").measure(h)
        Ls = [m.weight.abs().sum(1).max().item() for m in layer.experts]
        Ms = [m(h).abs().amax(-1).max().item() for m in layer.experts]
        r = 0.5 * layer.router.weight.abs().sum(1).max().item()
        terms = [L + M * r for L, M in zip(Ls, Ms)]
        assert lb() == pytest.approx(max(terms) if k == 1 else sum(terms), rel=1e-6)

def test_a_certificate_counts_only_correct_examples_and_eps_0_gives_the_accuracy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    x, y = torch.rand(16, 3, 4, 4), torch.randint(0, 10, (16,))
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert 0 < acc < 1
    rep = mr.lipschitz_report(model, x, y, eps=0.0, local_steps=1, jacobian_iters=2)
    assert rep["certified_acc"] == pytest.approx(acc)
    assert mr.lipschitz_report(model, x, y, eps=1e-4, local_steps=1, jacobian_iters=2)["certified_acc"] <= acc


# ==== 7. Configuration ================================================================================================
def test_help_explains_every_flag_and_shows_each_default_once(capsys):
    assert mr.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
    assert "(default: 8/255)" in text and "0.0313" not in text
    for action in mr.build_parser()._actions:
        assert action.help and all(flag in text for flag in action.option_strings), action.option_strings


# ==== 8. Setup: files, errors, torchrun ===============================================================================
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_out_is_refused_before_any_work(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert mr.main(T + ["--out", str(ro / "sub"), "--device", "cpu"]) == 2
        assert "not a writable folder" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)

def test_out_of_memory_is_one_line_and_other_errors_are_not_disguised(tmp_path, capsys, monkeypatch):
    def oom(*args, **kw):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried "
                           "to allocate 1099511627776 bytes.")
    monkeypatch.setattr(mr, "train", oom)
    argv = TS + ["--method", "standard", "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert mr.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: out of memory") and "--batch-size" in err and len(err.splitlines()) == 1

    def bug(*args, **kw):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(mr, "train", bug)
    with pytest.raises(RuntimeError, match="shapes"):
        mr.main(argv)

def test_json_is_strict(tmp_path):
    mr.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"a": None, "b": [1.0, None], "c": {"d": None}}

def test_interrupted_write_leaves_no_temporary_file(tmp_path):
    def broken(p):
        Path(p).write_bytes(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        mr.atomic_write(tmp_path / "last.pt", broken)
    assert list(tmp_path.iterdir()) == []

@cuda
def test_cuda_torchrun_one_process_equals_the_plain_run(tmp_path):
    """`torchrun --nproc_per_node=1` on a GPU: the same run as without torchrun (one process forms no process
    group), to bf16 autocast's and cuDNN's run-to-run rounding."""
    args = DP[:-1] + ["cuda", "--method", "advmoe", "--train-steps", "1"]
    one = run_cli(*args, "--out", str(tmp_path / "one"))
    two = torchrun(*args, "--out", str(tmp_path / "two"), cwd=tmp_path, n=1)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], rank_lines(two.stderr))
    assert max_weight_gap(tmp_path / "one" / "last.pt", tmp_path / "two" / "last.pt") < 1e-2
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert mb["history"][0]["train_loss"] == pytest.approx(ma["history"][0]["train_loss"], abs=1e-2)

def test_distributed_eval_and_dual_are_sharded_and_add_up(trained, tmp_path):
    """--eval (full suite) and --method dual under torchrun: each rank takes half of the test images and the counts
    are added up. Clean accuracy, expert usage, class x expert counts and per-expert clean accuracy equal the
    single-process report exactly; robust figures come from attacks whose random starts each rank draws itself,
    so they agree within a few images; one record is written, once."""
    ckpt = str(trained[3] / "best.pt")
    args = ["--eval", ckpt, "--eval-suite", "full", "--eval-steps", "2", "--apgd-steps", "2", "--apgd-targets", "3",
            "--square-queries", "5", "--test-limit", "24", "--device", "cpu"]
    one = run_cli(*args, "--out", str(tmp_path / "one"))
    two = torchrun(*args, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], rank_lines(two.stderr))
    ra, rb = (json.loads((tmp_path / d / "eval.json").read_text())["records"] for d in ("one", "two"))
    assert len(rb) == 1 and two.stdout.count("-> ") == 1
    ta, tb = ra[0]["test"], rb[0]["test"]
    assert tb["clean_acc"] == ta["clean_acc"] and tb["routing"]["usage"] == ta["routing"]["usage"]
    assert tb["routing"]["class_expert"] == ta["routing"]["class_expert"]
    assert [e["clean_acc"] for e in tb["per_expert"]] == [e["clean_acc"] for e in ta["per_expert"]]
    for k in ("robust_acc", "ra_e", "ra_r"):
        assert abs(tb[k] - ta[k]) <= 3 / 24, (k, ta[k], tb[k])
    dual = ["--method", "dual", "--standard-ckpt", ckpt, "--robust-ckpt", ckpt, "--dual-sweep", "0,1",
            "--eval-suite", "pgd", "--eval-steps", "1", "--test-limit", "24", "--device", "cpu"]
    one = run_cli(*dual, "--out", str(tmp_path / "d1"))
    two = torchrun(*dual, "--out", str(tmp_path / "d2"), cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], rank_lines(two.stderr))
    da, db = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("d1", "d2"))
    assert [r["clean_acc"] for r in db["dual_sweep"]] == [r["clean_acc"] for r in da["dual_sweep"]]

def test_distributed_user_error_is_one_line_from_rank_0(tmp_path):
    """A setting that does not fit N processes ends every rank with the one-line error, printed once, and no
    traceback from the ranks (torchrun adds its own summary of the failed processes)."""
    r = torchrun(*DP, "--method", "at", "--train-limit", "49", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.count("error: a batch of 1 examples cannot be shared by 2 processes") == 1
    assert 'moe_robust.py", line' not in r.stderr and not (tmp_path / "o").exists()
    r = torchrun("--benchmark", "--device", "cpu", cwd=tmp_path)
    assert r.stderr.count("error: the demo and --benchmark run in one process; start without torchrun") == 1
    r = torchrun(*DP, "--sync-bn", "--out", str(tmp_path / "o"), cwd=tmp_path)  # torch's SyncBatchNorm: CUDA only
    assert r.stderr.count("error: --sync-bn shares BatchNorm statistics between torchrun's processes on CUDA") == 1

def test_distributed_sigterm_keeps_the_last_finished_epoch(tmp_path):
    """SIGTERM to torchrun (how schedulers stop jobs) reaches every rank: the run stops with the interruption
    note, printed once, the last finished epoch is kept, and --resume under torchrun finishes the run."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = tmp_path / "o"
    i = DP.index("--epochs")
    args = DP[:i] + ["--epochs", "20"] + DP[i + 2:]  # a fast machine is still running when the signal comes
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(HERE / "moe_robust.py"), *args, "--method", "at", "--train-steps", "1", "--out",
                          str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         env=env)
    deadline = time.time() + 300
    while not (out / "last.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0 and err.count("SIGTERM: interrupted; every finished epoch is saved in") == 1, err[-3000:]
    assert 'moe_robust.py", line' not in err
    done = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert 0 <= done < 19
    r = torchrun("--resume", "--out", str(out), "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == list(range(1, 21)) and "test" in m

@pytest.mark.parametrize("method", ["standard", "at", "trades", "advmoe", "rt-er", "jtdmoe"])
def test_distributed_every_method_trains_and_reports(tmp_path, method):
    """torchrun with 2 processes: each training method trains through DDP, rank 0 alone logs and writes, and the
    report is the test set's, counted over both ranks' slices (dual: test_distributed_eval_and_dual_...)."""
    r = torchrun(*DP, "--method", method, "--train-steps", "1", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 0, rank_lines(r.stderr)
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["test"]["clean_acc"] * 16 == round(m["test"]["clean_acc"] * 16) and r.stdout.count("-> ") == 1

def test_distributed_deterministic_step_equals_one_process(tmp_path):
    """Where nothing is drawn per rank and nothing is per rank (no attack; the ViT's LayerNorms, a linear router, no
    balance loss, which Switch computes per device), DDP's averaged gradient is the global batch's: 2 processes train
    the weights one process trains, to float rounding."""
    args = DP + ["--method", "standard", "--arch", "moe-vit", "--router", "linear", "--balance-coef", "0",
                 "--train-limit", "80", "--batch-size", "32"]
    one = run_cli(*args, "--out", str(tmp_path / "one"))
    two = torchrun(*args, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], rank_lines(two.stderr))
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True)["method"]["model"] for d in ("one", "two"))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5

@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_distributed_resume_at_another_number_of_processes(tmp_path, first, then):
    """A run stopped after epoch 1 of 2 by N processes is finished by M: the checkpoint holds no rank."""
    out, args = tmp_path / "o", DP + ["--method", "at", "--train-steps", "1"]
    r = run_cli(*args, "--out", str(out)) if first == 1 else torchrun(*args, "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    state = torch.load(out / "last.pt", weights_only=True)
    state["config"]["epochs"] = 2  # as if it had been stopped after its first of two epochs
    torch.save(state, out / "last.pt")
    (out / "metrics.json").unlink()
    resume = ("--resume", "--out", str(out), "--device", "cpu")
    r = run_cli(*resume) if then == 1 else torchrun(*resume, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [1, 2] and "test" in m

def test_distributed_rank_with_one_row_trains(tmp_path):
    """torchrun with 2 processes and a last batch of 2 images: each rank routes one row."""
    r = torchrun(*DP, "--method", "at", "--train-limit", "34", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 0, rank_lines(r.stderr)
    assert "test" in json.loads((tmp_path / "o" / "metrics.json").read_text())


# ==== 9. Data =========================================================================================================
def test_synthetic_is_deterministic_and_in_range():
    a, b = mr.make_synthetic(64, 16), mr.make_synthetic(64, 16)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape == (64, 3, 32, 32)
    assert set(a.train_y.tolist()) <= set(range(10))
    assert not torch.equal(a.train_x[:16], a.test_x)

def test_augment_shapes_and_values():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    y = mr.augment(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.equal(x, y)

def test_cifar_layout_is_read(tmp_path):
    write_fake_cifar(tmp_path)
    d = mr.load_dataset("cifar10", str(tmp_path), test_limit=7)
    assert d.train_x.shape == (100, 3, 32, 32) and d.test_x.shape == (7, 3, 32, 32) and d.num_classes == 10

def test_imagefolder_any_size(tmp_path):
    write_images(tmp_path / "train" / "cat", 2, (50, 40))
    write_images(tmp_path / "train" / "dog", 2, (31, 77))
    write_images(tmp_path / "val" / "dog", 1, (100, 100))
    d = mr.load_dataset("imagefolder", str(tmp_path), image_size=24)
    assert d.train_x.shape == (4, 3, 24, 24) and d.test_y.tolist() == [1] and d.num_classes == 2

def test_a_cifar_pickle_that_asks_for_code_is_refused_and_its_payload_never_runs(tmp_path, capsys):
    write_fake_cifar(tmp_path / "evil")
    marker = tmp_path / "payload-ran"
    batch = tmp_path / "evil" / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3], "x": Payload(marker)}, f)
    assert mr.main(T[2:] + ["--dataset", "cifar10", "--data-dir", str(tmp_path / "evil"), "--out",
                            str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data_batch_2" in err and "system" in err, err
    assert not marker.exists() and not (tmp_path / "o").exists()


# ==== 10. The training loop ===========================================================================================
def test_training_writes_metrics_and_checkpoints(trained):
    _, _, _, out = trained
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["history"]) == 3
    assert {"val_clean_acc", "val_robust_acc", "images_per_s", "time_s"} <= set(m["history"][0])
    assert 0 <= m["test"]["robust_acc"] <= m["test"]["clean_acc"] <= 1
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()

def test_divergence_stops_training_keeps_the_last_good_epoch(tmp_path, capsys, monkeypatch):
    out = tmp_path / "div"
    assert mr.main(T + ["--epochs", "3", "--lr", "1e6", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()  # lr 1e6: the loss explodes within the first epoch
    assert "diverged in epoch" in err and "lower --lr" in err and len(err.splitlines()) == 1
    assert not (out / "metrics.json").exists() or "test" not in json.loads((out / "metrics.json").read_text())
    real, calls = mr.standard_loss, []

    def nan_in_epoch_2(model, x, y, cfg):  # one step per epoch here: the second epoch's loss is NaN
        loss, logits = real(model, x, y, cfg)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 1 else loss), logits
    monkeypatch.setattr(mr, "standard_loss", nan_in_epoch_2)
    out = tmp_path / "div2"
    assert mr.main(TS + ["--method", "standard", "--epochs", "3", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "diverged in epoch 2, step 1/1" in err and f"epoch 1 is kept in {out / 'last.pt'}" in err
    m = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert "test" not in m and len(m["history"]) == 1 and math.isfinite(m["history"][0]["train_loss"])
    assert mr.load_checkpoint(str(out / "last.pt"))["epoch"] == 0 and mr.load_checkpoint(str(out / "best.pt"))

def test_an_exploding_finite_loss_stops_training_in_its_first_epoch(tmp_path, capsys, monkeypatch):
    """A loss 100x the run's first stops the run even though every number is finite (lr 1e6 reached 2.4e14)."""
    real = mr.standard_loss
    calls = []

    def exploding(model, x, y, cfg):  # finite, but from the third step on far above where the run started
        loss, logits = real(model, x, y, cfg)
        calls.append(1)
        return (loss * 1e6 if len(calls) >= 3 else loss), logits
    monkeypatch.setattr(mr, "standard_loss", exploding)
    out = tmp_path / "boom"
    assert mr.main(TS + ["--method", "standard", "--batch-size", "16", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "diverged in epoch 1, step 3/" in err and "exploded" in err and len(err.splitlines()) == 1
    assert not (out / "last.pt").exists() and not (out / "metrics.json").exists()

def test_resume_of_a_finished_run_keeps_best_epoch_and_clears_stale_temps(tmp_path):
    out = tmp_path / "run"
    first = mr.train(mr.Config(method="standard", out=str(out), **{**TINY, "epochs": 1}))
    (out / ".last.pt.tmp4242").write_bytes(b"")  # what a SIGKILL during a save leaves
    again = mr.train(mr.Config(out=str(out), device="cpu"), resume=True)
    assert again["best_epoch"] == first["best_epoch"] == 1 and again["test"] == first["test"]
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == 1
    assert not list(out.glob(".*.tmp*"))

def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, str(HERE / "moe_robust.py"), *T, "--epochs", "50", "--out", str(out),
                             "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900  # generous: on a slow or busy machine the first epoch can take minutes
    while not (out / "metrics.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=900)[1]
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert f"--resume --out {out}" in err and "<dir>" not in err
    assert not list(out.glob(".*.tmp*")) and mr.load_checkpoint(str(out / "last.pt"))["epoch"] >= 0

def test_ctrl_c_in_the_first_epoch_does_not_advise_a_resume(tmp_path, monkeypatch, capsys):
    def interrupted(self, x, y):
        raise KeyboardInterrupt
    monkeypatch.setattr(mr.Trainer, "step", interrupted)
    out = tmp_path / "cut"
    assert mr.main(TS + ["--method", "standard", "--out", str(out), "--device", "cpu"]) == 130
    err = capsys.readouterr().err
    assert f"nothing to resume in {out}" in err and "--resume" not in err
    assert list(out.iterdir()) == []

def test_eval_only_of_a_checkpoint_adds_records_and_keeps_earlier_ones(trained, tmp_path):
    out = copy_of_trained_run(trained, tmp_path)
    metrics = (out / "metrics.json").read_bytes()
    args = ["--eval-steps", "2", "--eval-suite", "pgd", "--test-limit", "50", "--device", "cpu"]
    assert mr.main(["--eval", str(out / "best.pt")] + args) == 0
    first = json.loads((out / "eval.json").read_text())["records"]
    assert len(first) == 1 and first[0]["checkpoint"] == str(out / "best.pt")
    res = first[0]
    assert 0 <= res["test"]["robust_acc"] <= res["test"]["clean_acc"] <= 1
    # the record says what ran: the eval settings read (no training flag), the data used, the checkpoint's epoch
    assert res["settings"]["eval_steps"] == 2 and res["settings"]["eval_suite"] == "pgd"
    assert "epochs" not in res["settings"] and "lr" not in res["settings"]
    assert res["data"]["dataset"] == "synthetic" and res["data"]["test"] == 50 and res["data"]["data_dir"] is None
    assert res["checkpoint_epoch"] == mr.load_checkpoint(str(out / "best.pt"))["epoch"] + 1
    torch.manual_seed(123)  # whatever the process did before, --seed fixes the attack's random starts
    assert mr.main(["--eval", str(out / "best.pt")] + args) == 0
    assert mr.main(["--eval", str(out / "last.pt")] + args) == 0  # another checkpoint of the same run
    records = json.loads((out / "eval.json").read_text())["records"]
    assert len(records) == 3 and records[0] == res and records[1]["test"] == res["test"]
    assert records[2]["checkpoint"] == str(out / "last.pt")
    assert (out / "metrics.json").read_bytes() == metrics  # the training record is not touched

def test_eval_on_other_data_records_the_data_it_used(tmp_path, capsys):
    for d in ("a", "b"):
        write_fake_cifar(tmp_path / d)
    out = tmp_path / "run"
    assert mr.main(TS + ["--method", "standard", "--dataset", "cifar10", "--data-dir", str(tmp_path / "a"), "--out",
                         str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "metrics.json").read_text())["data"]["data_dir"] == str(tmp_path / "a")
    assert mr.main(["--eval", str(out / "best.pt"), "--data-dir", str(tmp_path / "b"), "--eval-suite", "pgd",
                    "--eval-steps", "1", "--device", "cpu"]) == 0
    [rec] = json.loads((out / "eval.json").read_text())["records"]
    assert rec["data"]["data_dir"] == str(tmp_path / "b") and rec["data"]["dataset"] == "cifar10"

@pytest.mark.parametrize("method", ["advmoe", "rt-er", "jtdmoe"])
def test_robust_moe_methods_run_from_the_cli(tmp_path, method):
    args = ["--method", method, "--width", "0.0625", "--experts", "2", "--epochs", "1", "--train-limit", "200",
            "--test-limit", "32", "--val-size", "32", "--train-steps", "2", "--val-steps", "2", "--eval-steps", "2",
            "--apgd-steps", "3", "--apgd-targets", "1", "--square-queries", "10", "--device", "cpu",
            "--out", str(tmp_path)]
    assert mr.main(args) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert {"ra_e", "ra_r", "per_expert", "routing", "robust_after", "probe", "warnings"} <= set(m["test"])
    # the checkpoint can be evaluated on its own (jtdmoe rebuilds its dual model)
    assert mr.main(["--eval", str(tmp_path / "best.pt"), "--eval-suite", "pgd", "--eval-steps", "2",
                    "--device", "cpu"]) == 0

def test_dual_method_combines_two_checkpoints_and_sweeps(tmp_path):
    common = ["--width", "0.0625", "--experts", "2", "--epochs", "1", "--train-limit", "200", "--test-limit", "32",
              "--val-size", "32", "--train-steps", "2", "--val-steps", "2", "--eval-steps", "2", "--eval-suite", "pgd",
              "--device", "cpu"]
    for method in ("standard", "rt-er"):
        assert mr.main(["--method", method, "--out", str(tmp_path / method)] + common) == 0
    std = json.loads((tmp_path / "standard" / "metrics.json").read_text())["test"]
    out = tmp_path / "dual"
    args = ["--method", "dual", "--standard-ckpt", str(tmp_path / "standard" / "best.pt"), "--robust-ckpt",
            str(tmp_path / "rt-er" / "best.pt"), "--test-limit", "32", "--eval-suite", "pgd", "--eval-steps", "2",
            "--dual-sweep", "0,0.5,1", "--device", "cpu", "--out", str(out)]
    assert mr.main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [r["a"] for r in m["dual_sweep"]] == [0.0, 0.5, 1.0]
    assert m["dual_sweep"][0]["clean_acc"] == std["clean_acc"]  # a = 0 is f_S
    # the record states what ran: the dual settings read and each member's own config
    assert m["config"]["dual_sweep"] == "0,0.5,1" and m["data"]["test"] == 32
    assert m["members"]["robust"]["config"]["method"] == "rt-er"
    assert m["members"]["standard"]["config"]["width"] == 0.0625 and m["members"]["standard"]["config"]["method"] == \
        "standard"
    before = tree_hashes(out)  # a finished dual run is redone only with --overwrite
    assert mr.main(args) == 2 and tree_hashes(out) == before
    assert mr.main(args + ["--overwrite"]) == 0

def test_lipschitz_cli_on_a_checkpoint(trained, tmp_path):
    out = copy_of_trained_run(trained, tmp_path)
    metrics = (out / "metrics.json").read_bytes()
    assert mr.main(["--lipschitz", str(out / "best.pt"), "--lipschitz-n", "8", "--device", "cpu"]) == 0
    [rep] = json.loads((out / "lipschitz.json").read_text())["records"]
    assert rep["checkpoint"] == str(out / "best.pt") and rep["data"]["test"] == 8 and rep["settings"]["norm"] == "linf"
    # an MoE's bound holds only where no route changes: it is named for that, never "global"
    assert {"local_linf", "local_l2", "jacobian_l2", "route_stable_linf", "route_stable_l2", "certified_acc",
            "expert_spread"} <= set(rep) and "global_l2" not in rep
    assert rep["route_stable_l2"] >= rep["jacobian_l2"] and 0 <= rep["certified_acc"] <= 1
    torch.manual_seed(123)  # whatever the process did before, --seed fixes the random estimates
    assert mr.main(["--lipschitz", str(out / "best.pt"), "--lipschitz-n", "8", "--device", "cpu"]) == 0
    first, again = json.loads((out / "lipschitz.json").read_text())["records"]
    assert first == rep and again == rep and (out / "metrics.json").read_bytes() == metrics

def test_resume_keeps_this_devices_optimizer_kernel():
    """A last.pt written on CUDA says fused=True; resumed on a CPU the optimiser keeps its own choice."""
    cfg = small_cfg(method="at")
    model = mr.build_run_model(cfg, 10, 32)
    method = mr.Trainer(model, cfg, 10)
    state = method.state_dict()
    for g in state["opts"][0]["param_groups"]:
        g["fused"] = True  # as if saved on a GPU
    again = mr.Trainer(mr.build_run_model(cfg, 10, 32), cfg, 10)
    again.load_state_dict(state)
    assert all(not g["fused"] for g in again.opts[0].param_groups)
    data = mr.make_synthetic(8, 8)
    assert torch.isfinite(again.step(data.train_x.float() / 255, data.train_y)["loss"])

@pytest.mark.parametrize("method,arch", [(m, "moe-resnet18") for m in ("standard", "at", "trades", "advmoe", "rt-er",
                                                                         "jtdmoe")] + [("at", "moe-vit")])
def test_resume_is_bit_identical_for_every_method(tmp_path, monkeypatch, method, arch):
    """Interrupted after epoch 1 and resumed: last.pt (weights, every optimiser's and schedule's state, history)
    and best.pt equal, tensor by tensor, those of the uninterrupted run; AdvMoE and JTDMoE have two optimisers. An
    entry another tool added to metrics.json is kept."""
    cfg = dict(TINY, method=method, arch=arch, epochs=2, train_limit=160, batch_size=32)
    full = tmp_path / "full"
    mr.train(mr.Config(out=str(full), **cfg))
    real_save = mr.save_checkpoint

    def interrupted_save(path, state):
        real_save(path, state)
        if path.name == "last.pt":
            raise KeyboardInterrupt
    monkeypatch.setattr(mr, "save_checkpoint", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        mr.train(mr.Config(out=str(tmp_path / "cut"), **cfg))
    monkeypatch.setattr(mr, "save_checkpoint", real_save)
    (tmp_path / "cut" / "metrics.json").write_text(json.dumps({"note": {"kept": True}}))
    resumed = mr.train(mr.Config(out=str(tmp_path / "cut"), device="cpu"), resume=True)
    assert resumed["note"] == {"kept": True}
    assert resumed["test"] == json.loads((full / "metrics.json").read_text())["test"]
    for f in ("last.pt", "best.pt"):
        a, b = (torch.load(d / f, weights_only=True) for d in (full, tmp_path / "cut"))
        a["config"]["out"] = b["config"]["out"]
        all_tensors_equal(a, b, f)
    if method in ("advmoe", "jtdmoe"):  # two optimisers, each with its cosine schedule
        state = torch.load(full / "last.pt", weights_only=True)["method"]
        assert len(state["opts"]) == len(state["scheds"]) == 2

def test_a_collapsed_run_says_so_in_its_log_metrics_and_report(tmp_path, capsys):
    """synthetic with E = 2 and the papers' router: routing collapses (README), and every epoch's line, its
    metrics.json row and the test report carry the largest share and the entropy, with a warning."""
    cfg = mr.Config(method="standard", out=str(tmp_path), router="linear", **{**TINY, "epochs": 1})
    m = mr.train(cfg)
    out = capsys.readouterr().out
    row = m["history"][0]["routing"][0]
    assert row["layer"] == "layer4.1.branch" and row["max_share"] > mr.COLLAPSE and 0 <= row["entropy"] < 0.5
    assert f"routing: max share {row['max_share']:.2f} (layer4.1.branch)" in out
    assert "WARNING: routing collapse in layer4.1.branch" in out
    test = m["test"]["routing"]["health"][0]
    assert test["max_share"] > mr.COLLAPSE
    assert any("routing collapse in layer4.1.branch" in w for w in m["test"]["warnings"])
    assert "WARNING: routing collapse" in mr.format_report(m["test"])
    assert json.loads((tmp_path / "metrics.json").read_text())["history"][0]["routing"] == m["history"][0]["routing"]

@pytest.mark.parametrize("argv", [
    ["--train-limit", "180", "--val-size", "64", "--batch-size", "115"],  # the last batch of each epoch: one image
    ["--train-limit", "72", "--val-size", "64", "--batch-size", "1"],
    ["--train-limit", "65", "--val-size", "64"],  # the validation split leaves one training image
    ["--train-limit", "72", "--val-size", "64", "--batch-size", "1", "--arch", "moe-vit"],  # per token
], ids=["last-batch-one", "batch-size-1", "val-leaves-one", "vit-batch-size-1"])
def test_training_on_batches_of_one_image(tmp_path, capsys, argv):
    assert mr.main(T + ["--method", "at", "--out", str(tmp_path / "o"), "--device", "cpu"] + argv) == 0, \
        capsys.readouterr().err
    assert "test" in json.loads((tmp_path / "o" / "metrics.json").read_text())

def test_validation_counts_as_robust_only_examples_correct_when_clean():
    """An attack that hands back a correctly classified image cannot make a clean error robust."""
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with torch.no_grad():
        lin[1].weight.zero_(), lin[1].bias.copy_(torch.tensor([0.0, 0.0]))
        lin[1].weight[1].fill_(1.0)  # class 1 when the image is bright, class 0 when it is black
    x = torch.tensor([[[[0]]], [[[255]]]], dtype=torch.uint8).expand(2, 3, 8, 8).contiguous()
    y = torch.tensor([1, 1])  # the black image is misclassified when clean

    class Brighten:
        def __call__(self, model, xb, yb):
            return torch.ones_like(xb)

        def describe(self):
            return "brighten"
    r = mr.evaluate(lin, x, y, Brighten(), torch.device("cpu"))
    assert (r["clean_acc"], r["robust_acc"]) == (0.5, 0.5)

def test_a_destroyed_model_is_never_reported(tmp_path, capsys):
    """lr 1e30 for a single step: the step's own loss looked normal, but the weights it left are astronomically large;
    the run stops as divergence does and reports no test figures."""
    out = tmp_path / "o"
    assert mr.main(T + ["--lr", "1e30", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diverged in epoch 1" in err and "nothing was saved" in err, err
    assert not (out / "metrics.json").exists() and not (out / "best.pt").exists()

def test_a_model_is_intact_up_to_exploded_times_its_start_and_destroyed_past_it():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    data = mr.make_synthetic(8, 8, size=4)
    cfg, dev = small_cfg(), torch.device("cpu")
    with torch.no_grad():
        model[1].weight.zero_(), model[1].bias.zero_()
        model[1].bias[0] = 500.0  # every image called class 0: a loss of 500 on the others
    loss = mr.evaluate(model, data.train_x, data.train_y, None, dev)["clean_loss"]
    mr.check_intact(model, loss, cfg, 0, loss / mr.EXPLODED, 5.0)  # exactly at the limit
    with pytest.raises(mr.UserError, match="clean validation loss"):
        mr.check_intact(model, loss, cfg, 0, loss / mr.EXPLODED * 0.999, 5.0)
    with torch.no_grad():
        model[1].bias[0] = mr.EXPLODED * 2.0
    mr.check_intact(model, loss, cfg, 0, 1e9, 2.0)
    with pytest.raises(mr.UserError, match="largest weight is 200"):
        mr.check_intact(model, loss, cfg, 0, 1e9, 1.999)


# ==== 11. Benchmark and command line ==================================================================================
@pytest.mark.parametrize("argv,needle", BAD_INPUTS, ids=[" ".join(a)[-60:] for a, _ in BAD_INPUTS])
def test_hostile_input_gives_one_line_error_and_damages_nothing(hostile_world, argv, needle, capsys, tmp_path,
                                                                monkeypatch):
    """Each row: exit 2, one line naming the problem, and nothing on disk changed: every file and folder under the
    world (runs, data, checkpoints) and under the working directory (where runs/ would go) hashes as before."""
    root, cwd = Path(hostile_world["run"]).parent, tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = tree_hashes(root), tree_hashes(cwd)
    rc = mr.main([a.format(**hostile_world) for a in argv] + ["--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert (tree_hashes(root), tree_hashes(cwd)) == before

def test_benchmark_cli_writes_its_numbers(tmp_path):
    assert mr.main(["--benchmark", "--device", "cpu", "--width", "0.0625", "--batch-size", "8",
                    "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "benchmark.json").read_text())
    ips = res["train_images_per_s"]
    assert set(ips) == set(mr.BENCH_MODELS)  # the three architectures and AdvMoE's all-block layout
    for arch, r in ips.items():
        assert r["standard"] > 0 and r["at"] > 0
        assert res["over_dense"][arch]["at"] == round(r["at"] / ips["resnet18"]["at"], 3)

@cuda
@pytest.mark.parametrize("arch", ["moe-resnet18", "moe-vit", "resnet18"])
def test_cuda_cli_runs_every_method_and_reports_float32(tmp_path, arch):
    """Every entry point on CUDA, tiny: each training method (bf16 autocast, channels_last, fused SGD) with the
    full suite on its test split, --resume of the finished run, --eval, --lipschitz and the dual model from two
    checkpoints. What is reported is float32: the clean accuracy a CUDA --eval records equals a CPU --eval's."""
    G = T + ["--arch", arch, "--device", "cuda"]
    G[G.index("pgd")] = "full"
    G += ["--apgd-steps", "2", "--apgd-targets", "2", "--square-queries", "4"]
    G += ["--experts", "2"] if arch != "resnet18" else []
    methods = [m for m in mr.METHODS if m != "dual" and (arch != "resnet18" or m not in ("advmoe", "rt-er", "jtdmoe"))]
    i = G.index("--train-steps")
    for method in methods:
        argv = G if method != "standard" else G[:i] + G[i + 2:]  # standard training runs no attack
        out = tmp_path / method
        assert mr.main(argv + ["--method", method, "--out", str(out)]) == 0, method
        test = json.loads((out / "metrics.json").read_text())["test"]
        assert 0 <= test["robust_acc"] <= test["clean_acc"] <= 1, (method, test)
    assert mr.main(["--resume", "--out", str(tmp_path / "at"), "--device", "cuda"]) == 0  # nothing to do
    ckpt = str(tmp_path / "at" / "best.pt")
    for device in ("cuda", "cpu"):
        assert mr.main(["--eval", ckpt, "--eval-suite", "pgd", "--eval-steps", "2", "--test-limit", "32",
                        "--device", device]) == 0
    on_cuda, on_cpu = json.loads((tmp_path / "at" / "eval.json").read_text())["records"]
    assert on_cuda["test"]["clean_acc"] == on_cpu["test"]["clean_acc"]
    assert mr.main(["--lipschitz", ckpt, "--lipschitz-n", "4", "--device", "cuda"]) == 0
    assert mr.main(["--method", "dual", "--standard-ckpt", str(tmp_path / "standard" / "best.pt"), "--robust-ckpt",
                    ckpt, "--test-limit", "16", "--eval-suite", "pgd", "--eval-steps", "1", "--dual-sweep", "0,1",
                    "--device", "cuda", "--out", str(tmp_path / "dual")]) == 0

def test_each_piece_copies_within_its_line_budget_and_readme_quotes_the_cost():
    source = (HERE / "moe_robust.py").read_text()
    readme = (HERE / "README.md").read_text()
    for label, roots, budget in COPY_PIECES:
        lines, names = copy_cost(source, roots)
        assert lines <= budget, (label, lines, budget, sorted(names))
        assert f"| {label} | {lines} |" in readme, f"README Layout: the row of {label} should say {lines} lines"
    for label, roots, _ in COPY_PIECES[6:9]:  # the methods copy without the training loop, configuration or the CLI
        names = copy_cost(source, roots)[1]
        assert not names & {"Config", "Trainer", "train", "main", "sgd", "LipschitzBound", "MoE"}, (label, names)
    names = copy_cost(source, ["LipschitzBound"])[1]  # a rule per module type, not the project's model classes
    assert not names & {"ResNet18", "BasicBlock", "MoEViT", "DualModel", "Normalize", "MoE", "Attention"}, names
    # the reading order: the MoE layer within the first 200 lines, the ideas before the machinery
    order = [source.index(s) for s in ("\nclass MoE(", "\nclass ResNet18(", "\ndef pgd(", "\ndef advmoe_step(",
                                       "\ndef evaluate_full(", "\nclass LipschitzBound", "\nclass Config",
                                       "\ndef load_dataset(", "\ndef train(", "\ndef main(")]
    assert order == sorted(order) and source[:order[0]].count("\n") < 200
