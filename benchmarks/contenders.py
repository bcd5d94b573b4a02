"""The optimizers under test, behind one small interface.

Every contender owns its own model copy (same seed, so the same initial weights) and
takes one training step per :meth:`Contender.step` call on the batch it is given. The
harness times ``step`` and nothing else; building, compiling and state accounting are
outside the timed region.

Contenders: forward+backward only, ``torch.optim.SGD`` (momentum), ``torch.optim.AdamW``
(foreach), the official ``singd`` 0.0.5, our stateful adapter ``sf.SINGD`` (when it is
importable), our pure core eager, and our pure core with ``torch.compile``.
"""

from __future__ import annotations

import inspect
import os
import signal
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import optree
import torch
from torch import Tensor
from torch.func import functional_call

import singd_functional as sf

from . import models

# One set of hyperparameters for everything (the timings do not depend on them, but
# the trajectories of the SINGD implementations are compared at the end).
HP = dict(lr=1e-3, momentum=0.9, damping=1e-3, alpha1=0.5, lr_cov=1e-2, weight_decay=0.0)

KINDS = ("fwd+bwd", "sgd", "adamw", "official", "adapter", "adapter+compile", "core",
         "core+cache", "compiled")
BASELINES = ("fwd+bwd", "sgd", "adamw")


@dataclass(frozen=True)
class Config:
    """One contender's identity: implementation, model, and (for SINGD) its settings."""

    kind: str
    model: str
    T: int
    structure: str | None = None  # None for the baselines
    method: str | None = None  # "singd" or "ikfac"

    @property
    def label(self) -> str:
        if self.structure is None:
            return self.kind
        return f"{self.kind}:{self.method}:{self.structure}"


def official_available() -> str | None:
    """None when ``singd`` 0.0.5 is importable, else the reason it is not."""
    try:
        import singd
        from singd.optim.optimizer import SINGD  # noqa: F401
    except Exception as err:  # pragma: no cover - depends on the environment
        return f"official singd not importable ({type(err).__name__}: {err})"
    version = getattr(singd, "__version__", None)
    if version is not None and version != "0.0.5":
        return f"official singd is {version}, the benchmark expects 0.0.5"
    return None


def adapter_available() -> str | None:
    """None when our stateful adapter ``sf.SINGD`` exists, else the reason."""
    if not hasattr(sf, "SINGD"):
        try:
            from singd_functional import optim  # noqa: F401
        except Exception as err:
            return f"sf.SINGD not importable yet ({type(err).__name__}: {err})"
        if not hasattr(optim, "SINGD"):
            return "singd_functional.optim has no SINGD yet"
    return None


def adapter_compile_available() -> str | None:
    """None when the drop-in ``sf.SINGD`` takes ``compile=`` (issue 14 item 2), else why."""
    reason = adapter_available()
    if reason:
        return reason
    if "compile" not in inspect.signature(_adapter_class()).parameters:
        return "not available: sf.SINGD has no compile= option"
    return None


def cache_available() -> str | None:
    """None when the pure core has the ``cache_preconditioner`` option, else the reason."""
    if "cache_preconditioner" not in inspect.signature(sf.singd).parameters:
        return "sf.singd has no cache_preconditioner option"
    return None


def caches(structure: str) -> bool:
    """Whether ``cache_preconditioner`` changes anything for this structure."""
    return bool(getattr(sf.structures.get(structure), "closed_under_outer", False))


def _adapter_class():
    return sf.SINGD if hasattr(sf, "SINGD") else __import__(
        "singd_functional.optim", fromlist=["SINGD"]
    ).SINGD


# --------------------------------------------------------------------- state accounting
def _tensors(obj, seen: set[int]) -> Iterator[Tensor]:
    """Every tensor reachable from ``obj`` (dicts, sequences, pytrees, the official
    package's structured matrices); each object visited once."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen)
    elif hasattr(obj, "named_tensors"):  # the official package's StructuredMatrix
        for _, t in obj.named_tensors():
            yield from _tensors(t, seen)
    else:
        leaves = optree.tree_leaves(obj, none_is_leaf=False, namespace=sf.PYTREE_NAMESPACE)
        if len(leaves) != 1 or leaves[0] is not obj:
            for leaf in leaves:
                yield from _tensors(leaf, seen)


def tensor_bytes(*objs) -> int:
    """Bytes of the distinct storages of every tensor in ``objs`` (views count once)."""
    storages: dict[int, int] = {}
    seen: set[int] = set()
    for obj in objs:
        for t in _tensors(obj, seen):
            s = t.untyped_storage()
            storages[s.data_ptr() if s.data_ptr() else id(s)] = s.nbytes()
    return sum(storages.values())


def state_parts(held: dict[str, list], preconditioned: Iterable[str]) -> dict[str, dict]:
    """Per trained parameter: its role (``"preconditioned"`` when it is part of a layer's
    W~, else ``"momentum"``) and the bytes of the state ``held`` for it (a layer's
    factors and their momenta are held for its weight)."""
    pre = set(preconditioned)
    return {name: {"role": "preconditioned" if name in pre else "momentum",
                   "bytes": tensor_bytes(*objs)} for name, objs in held.items()}


def state_split(ours: Contender, official: Contender) -> dict:
    """Our state against the official's, parameter by parameter (:meth:`Contender.state_parts`):
    the bytes of the parameters both train in the same role (ours with what it holds in
    no part, its step counter), and ``{"name (role)": bytes}`` of the rest of each
    (left out when empty)."""
    mine, theirs = ours.state_parts(), official.state_parts()
    alike = [n for n in mine if n in theirs and mine[n]["role"] == theirs[n]["role"]]
    rest = ours.state_bytes() - sum(p["bytes"] for p in mine.values())

    def others(parts):
        return {f"{n} ({p['role']})": p["bytes"] for n, p in parts.items() if n not in alike}

    out = {"state_alike_bytes": sum(mine[n]["bytes"] for n in alike) + rest,
           "official_alike_bytes": sum(theirs[n]["bytes"] for n in alike),
           "state_only_ours": others(mine), "state_only_official": others(theirs)}
    return {k: v for k, v in out.items() if v != {}}


# ------------------------------------------------------------------------ contenders
class Contender:
    """Base: one model copy, a step counter, and the SINGD settings (if any)."""

    def __init__(self, cfg: Config, seed: int = 0):
        self.cfg = cfg
        self.model = models.build(cfg.model, seed)
        self.spec = models.SPECS[cfg.model]
        self.steps = 0
        self.failed: str | None = None
        self.compile_s: float | None = None

    def next_is_update(self) -> bool:
        """Whether the next step refreshes the SINGD statistics (step % T == 0)."""
        return self.cfg.structure is not None and self.steps % self.cfg.T == 0

    def step(self, x: Tensor, y: Tensor) -> None:
        self._step(x, y)
        self.steps += 1

    def _step(self, x, y):
        raise NotImplementedError

    def prepare(self, x, y) -> None:
        """Anything that must happen before timing (compilation); not timed."""

    def state_bytes(self) -> int:
        """Bytes of the optimizer state (0 for forward+backward only)."""
        return 0

    def state_parts(self) -> dict[str, dict]:
        """Per trained parameter its role and state bytes (:func:`state_parts`); empty but
        for SINGD. What :meth:`state_bytes` holds beyond their sum (a counter) is in none."""
        return {}

    def cache_bytes(self) -> int:
        """Bytes the optimizer holds outside its state (a cache), if any."""
        return 0

    def parameters(self) -> dict[str, Tensor]:
        return {k: p.detach() for k, p in self.model.named_parameters()}

    def _module_step(self, opt, x, y):
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)
        models.loss_fn(self.model(x), y).backward()
        if opt is not None:
            opt.step()


class ForwardBackward(Contender):
    def _step(self, x, y):
        self._module_step(None, x, y)


class TorchOptim(Contender):
    def __init__(self, cfg, seed=0):
        super().__init__(cfg, seed)
        params = self.model.parameters()
        if cfg.kind == "sgd":
            self.opt = torch.optim.SGD(params, lr=HP["lr"], momentum=HP["momentum"])
        else:
            self.opt = torch.optim.AdamW(params, lr=HP["lr"], foreach=True)

    def _step(self, x, y):
        self._module_step(self.opt, x, y)

    def state_bytes(self):
        return tensor_bytes(self.opt.state)


def _singd_kwargs(cfg: Config) -> dict:
    return dict(
        HP,
        structures=(cfg.structure, cfg.structure),
        kfac_like=cfg.method == "ikfac",
        loss_average=models.SPECS[cfg.model].loss_average,
    )


class Official(Contender):
    """``singd.optim.optimizer.SINGD`` 0.0.5, as its README uses it."""

    def __init__(self, cfg, seed=0):
        super().__init__(cfg, seed)
        import warnings

        from singd.optim.optimizer import SINGD

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unsupported layers (embedding, layer norm)
            self.opt = SINGD(self.model, T=cfg.T, **_singd_kwargs(cfg))

    def _step(self, x, y):
        self._module_step(self.opt, x, y)

    def state_bytes(self):
        o = self.opt
        return tensor_bytes(o.Ks, o.Cs, o.m_Ks, o.m_Cs, o.state)

    def state_parts(self):
        o = self.opt
        names = {p: n for n, p in self.model.named_parameters()}
        trained = [names[p] for group in o.param_groups for p in group["params"]]
        held: dict[str, list] = {n: [] for n in trained}
        for p, st in o.state.items():
            held[names[p]].append(st)
        for module in o.Ks:
            held[f"{module}.weight"] += [o.Ks[module], o.Cs[module], o.m_Ks.get(module),
                                         o.m_Cs.get(module)]
        return state_parts(held, [n for n in trained if n.rpartition(".")[0] in o.Ks])


class Adapter(Contender):
    """Our drop-in ``sf.SINGD`` (a torch.optim.Optimizer over the pure core);
    ``adapter+compile``: the same with ``compile=True`` (its own small functions
    compiled), whose first statistics and plain steps (the compilation) run in
    :meth:`prepare` and are reported as ``compile_s``."""

    def __init__(self, cfg, seed=0):
        super().__init__(cfg, seed)
        extra = {"compile": True} if cfg.kind == "adapter+compile" else {}
        self.opt = _adapter_class()(self.model, T=cfg.T, **_singd_kwargs(cfg), **extra)

    def prepare(self, x, y):
        if self.cfg.kind == "adapter+compile":
            t0 = time.perf_counter()
            for _ in range(min(2, self.cfg.T)):
                self.step(x, y)
            self.compile_s = time.perf_counter() - t0

    def _step(self, x, y):
        self._module_step(self.opt, x, y)

    def state_bytes(self):
        return tensor_bytes(self.opt.state_dict()["state"])

    def state_parts(self):
        named = dict(self.model.named_parameters())
        names = {p: n for n, p in named.items()}
        held = {names[p]: [st] for p, st in self.opt.state.items()}
        return state_parts(held, [k for info in sf.find_layers(self.model)
                                  if "K" in self.opt.state.get(named[info.weight], {})
                                  for k in info.params])

    def cache_bytes(self):
        # the adapter keeps K K^T, C C^T (T > 1) outside its state_dict
        return tensor_bytes(getattr(self.opt, "_products", {}))


class Core(Contender):
    """Our pure core: ``capture`` on update steps (a plain ``torch.func.grad`` on the
    others), ``tx.update`` with ``captures`` only every T steps, ``apply_updates``.

    ``tx`` may be shared between contenders (it is pure); ``compiled`` wraps update +
    apply_updates in ``torch.compile`` (two graphs: with and without captures);
    ``core+cache`` builds the transform with ``cache_preconditioner=True``.
    """

    def __init__(self, cfg, seed=0, tx_cache: dict | None = None):
        super().__init__(cfg, seed)
        self.layers = sf.find_layers(self.model)
        self.params = {k: p.detach().clone() for k, p in self.model.named_parameters()}
        # Train what the official package and the adapter train: the supported layers.
        # (The transformer's embedding and layer norms keep their initial values; their
        # gradients are still computed, as in the module-based contenders.)
        self.trained = [k for info in self.layers for k in info.params]
        cached = cfg.kind == "core+cache"
        key = (cfg.model, cfg.structure, cfg.method, cached)
        cache = tx_cache if tx_cache is not None else {}
        if key not in cache:
            kwargs = _singd_kwargs(cfg)
            if cached:
                kwargs["cache_preconditioner"] = True
            cache[key] = {"tx": sf.singd(self.layers, **kwargs)}
        self.shared = cache[key]
        self.tx = self.shared["tx"]
        self.state = self.tx.init({k: self.params[k] for k in self.trained})
        self.capture = sf.make_capture(self.model, models.loss_fn, self.layers)
        model = self.model

        def loss_of(params, x, y):
            return models.loss_fn(functional_call(model, params, (x,)), y)

        self.grad = torch.func.grad(loss_of)
        tx = self.tx

        def update_apply(grads, state, params, captures):
            updates, state = tx.update(grads, state, params, captures=captures)
            return sf.apply_updates(params, updates), state

        def plain_apply(grads, state, params):
            updates, state = tx.update(grads, state, params)
            return sf.apply_updates(params, updates), state

        self._update_apply, self._plain_apply = update_apply, plain_apply

    def _step(self, x, y):
        if self.steps % self.cfg.T == 0:
            _, grads, captures = self.capture(self.params, x, y)
            self.params, self.state = self._update_apply(grads, self.state, self.params, captures)
        else:
            grads = self.grad(self.params, x, y)
            self.params, self.state = self._plain_apply(grads, self.state, self.params)

    def state_bytes(self):
        return tensor_bytes(self.state)

    def state_parts(self):
        st = self.state
        held = {k: [v] for k, v in st.velocity.items()}
        for info in self.layers:
            held[info.weight] += [st.factors.get(info.name), st.momenta.get(info.name),
                                  st.products.get(info.name)]
        return state_parts(held, [k for info in self.layers for k in info.params])

    def parameters(self):
        return {k: self.params[k] for k in self.trained}


@contextmanager
def _time_limit(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds`` (POSIX only)."""
    if not hasattr(signal, "setitimer") or seconds <= 0:
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"compilation took longer than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


INDUCTOR_CACHE = os.path.join(tempfile.gettempdir(), "singd_functional_bench_inductor")


def use_private_inductor_cache() -> str:
    """Point inductor at a cache directory of the benchmark's own.

    A compile stopped by the time limit can leave a truncated shared object behind,
    which every later load of that kernel fails on; keeping the benchmark's compiles
    apart means such leftovers never reach the user's (or the tests') cache.
    """
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = INDUCTOR_CACHE
    return INDUCTOR_CACHE


def _drop_partial_artifacts() -> None:
    """Remove empty shared objects an interrupted compile left in the private cache."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != INDUCTOR_CACHE:
        return
    for root, _, files in os.walk(INDUCTOR_CACHE):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".so") and os.path.getsize(path) == 0:
                os.remove(path)


class Compiled(Core):
    """Core with ``torch.compile`` of update + apply_updates (the capture and the plain
    gradient stay eager: compiling the whole step, torch.func.grad and hooks included,
    took ~100 s per structure and ran slower than eager on this machine)."""

    compile_timeout_s = 60.0

    def prepare(self, x, y):
        if "compiled" not in self.shared:
            self.shared["compiled"] = (
                torch.compile(self._update_apply, dynamic=False),
                torch.compile(self._plain_apply, dynamic=False),
            )
            t0 = time.perf_counter()
            try:
                with _time_limit(self.compile_timeout_s):
                    _, grads, captures = self.capture(self.params, x, y)
                    self.shared["compiled"][0](grads, self.state, self.params, captures)
                    self.shared["compiled"][1](grads, self.state, self.params)
            except Exception as err:
                self.shared["failed"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                _drop_partial_artifacts()
            self.shared["compile_s"] = time.perf_counter() - t0
        self.compile_s = self.shared["compile_s"]
        self.failed = self.shared.get("failed")
        self._update_apply, self._plain_apply = self.shared["compiled"]


def make(cfg: Config, seed: int = 0, tx_cache: dict | None = None) -> Contender:
    """Build the contender for ``cfg`` (may raise; the harness records the reason)."""
    if cfg.kind == "fwd+bwd":
        return ForwardBackward(cfg, seed)
    if cfg.kind in ("sgd", "adamw"):
        return TorchOptim(cfg, seed)
    if cfg.kind == "official":
        return Official(cfg, seed)
    if cfg.kind in ("adapter", "adapter+compile"):
        return Adapter(cfg, seed)
    if cfg.kind in ("core", "core+cache"):
        return Core(cfg, seed, tx_cache)
    if cfg.kind == "compiled":
        return Compiled(cfg, seed, tx_cache)
    raise ValueError(f"unknown contender kind {cfg.kind!r}; expected one of {KINDS}")


# ------------------------------------------------------------------ storage formulas
def storage_numel(structure: str, d: int) -> int:
    """Stored entries of a d x d factor (the storage column of docs/algorithm.md#structures)."""
    import re

    if structure == "dense":
        return d * d
    if structure in ("diagonal", "triltoeplitz", "triutoeplitz"):
        return d
    if m := re.fullmatch(r"block(\d+)diagonal", structure):
        B = int(m[1])
        return (d // B) * B * B + (d % B) ** 2
    if m := re.fullmatch(r"hierarchical(\d+)_(\d+)", structure):
        k1 = min(d, int(m[1]))
        k2 = min(d - k1, int(m[2]))
        n = d - k1 - k2
        return k1 * k1 + k1 * (n + k2) + n + k2 * n + k2 * k2
    if structure in ("triltopleftdiag", "trilbottomrightdiag", "triutopleftdiag",
                     "triubottomrightdiag"):
        return 2 * d - 1
    raise ValueError(f"no storage formula for {structure!r}")


@dataclass
class StateFormula:
    """Expected optimizer-state bytes of our core, term by term."""

    factors: int = 0
    momenta: int = 0
    velocity: int = 0
    counter: int = 8
    parts: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.factors + self.momenta + self.velocity + self.counter


def expected_state(cfg: Config, model: torch.nn.Module) -> StateFormula:
    """K, C per layer from the storage formula (x2 with Riemannian momenta), plus one
    heavy-ball buffer per parameter and the int64 step counter (float32 everywhere)."""
    layers = sf.find_layers(model)
    f = StateFormula()
    for info in layers:
        n = storage_numel(cfg.structure, info.d_K) + storage_numel(cfg.structure, info.d_C)
        f.factors += 4 * n
        f.parts[info.name] = (info.d_K, info.d_C, n)
    if cfg.method == "singd" and HP["alpha1"] != 0:
        f.momenta = f.factors
    f.velocity = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f
