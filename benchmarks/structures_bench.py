"""Micro-benchmark of the structured-matrix kernels (issue 2): every operation per
structure at d = 512 and 2048, and the optimizer's hot path at the sizes of the MLP
784-512-512-10 (natural gradient and factor update of its three layers).

    python -m benchmarks.structures_bench                    # this checkout only
    python -m benchmarks.structures_bench --baseline-rev HEAD  # and before/after

One intra-op thread. Cases that are compared with each other (all structures, and the
baseline next to the current code, for one operation and one size) run interleaved:
every round visits each of them once in a freshly shuffled order, so slow drifts of
the machine hit them alike. Reported: the median wall time per call (ms), the median
thread CPU time (less sensitive to other processes on the machine), the ratio to
dense, and with a baseline the median of the per-round paired ratios before/after.

The baseline (``--baseline-rev``) is the ``singd_functional`` package of a git revision,
extracted with ``git archive`` (read-only) into a temporary directory and imported
under another name, so both versions run in one process. Operations the baseline does
not have are timed through the formula its callers used (e.g. ``X @ K`` as
``K.rmatmat(X.mT).mT``).

Writes ``benchmarks/results/structures.md`` and ``structures.json`` (see ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STRUCTURES = [
    "dense",
    "diagonal",
    "block30diagonal",
    "hierarchical15_15",
    "triltoeplitz",
    "triutoeplitz",
    "triltopleftdiag",
    "triubottomrightdiag",
]
SIZES = (512, 2048)
R = 256  # rows of Y in Pi(Y Y^T) and of the statistics' a
N = 256  # columns of X in K @ X
# (name, d_C = d_out, d_K = d_in + 1) of the MLP 784-512-512-10 with biases
MLP_LAYERS = (("layer1", 512, 785), ("layer2", 512, 513), ("layer3", 10, 513))
MLP_ROWS = 128  # the batch size: rows of a and g in the statistics
T_UPDATE = 10  # factor update every T steps (for the amortized total)
MLP_WHATS = (
    "natural_gradient",
    "natural_gradient_cached",
    "natural_gradient_precondition_py",
    "factor_update",
)
OPS = (
    "project_outer",
    "project_inner",
    "matmat",
    "rmatmat",
    "matmat_right",
    "rmatmat_right",
    "outer_matmat",
    "outer_matmat_right",
    "matmul",
    "gram",
    "outer_self",
    "add_diag",
    "max_abs",
    "average_trace",
)


# --------------------------------------------------------------------------- packages
class Package:
    """One version of singd_functional: its structures, precondition and factors."""

    def __init__(self, label: str, name: str):
        self.label = label
        self.structures = importlib.import_module(f"{name}.structures")
        self.precondition = importlib.import_module(f"{name}.precondition")
        self.factors = importlib.import_module(f"{name}.factors")
        base = self.structures.StructuredMatrix
        self.has = {op: hasattr(base, op) for op in ("matmat_right", "outer_matmat")}

    # operations a baseline may lack, through the formula its callers used
    def matmat_right(self, K, Z):
        return K.matmat_right(Z) if self.has["matmat_right"] else K.rmatmat(Z.mT).mT

    def rmatmat_right(self, K, Z):
        return K.rmatmat_right(Z) if self.has["matmat_right"] else K.matmat(Z.mT).mT

    def outer_matmat(self, K, X):
        return K.outer_matmat(X) if self.has["outer_matmat"] else K.matmat(K.rmatmat(X))

    def outer_matmat_right(self, K, Z):
        if self.has["outer_matmat"]:
            return K.outer_matmat_right(Z)
        return K.matmat(K.rmatmat(Z.mT)).mT

    def natural_gradient(self, K, C, G, cached):
        """C C^T G K K^T as the optimizer computes it with this version's API: the
        cached K K^T / C C^T where given, else the fused two-sided products."""
        if not self.has["outer_matmat"]:
            return self.precondition.natural_gradient(K, C, G, cached)
        left = cached["C"].matmat(G) if "C" in cached else C.outer_matmat(G)
        return cached["K"].matmat_right(left) if "K" in cached else K.outer_matmat_right(left)


def load_baseline(rev: str, tmp: Path) -> str:
    """Extract singd_functional at ``rev`` into ``tmp`` as package ``_singd_baseline``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "singd_functional"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    shutil.move(str(tmp / "singd_functional"), str(tmp / "_singd_baseline"))
    sys.path.insert(0, str(tmp))
    return "_singd_baseline"


# ----------------------------------------------------------------------------- timing
def run_group(
    cases: dict[str, Callable[[], object]], budget_s: float, min_rounds: int, max_rounds: int
) -> dict[str, dict]:
    """Interleaved rounds over ``cases`` (label -> zero-argument call)."""
    for fn in cases.values():  # warm-up (plans, caches, lazy inits)
        fn()
        fn()
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    order = list(cases)
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        rounds = 0
        while rounds < min_rounds or (
            rounds < max_rounds and time.perf_counter() - start < budget_s
        ):
            random.shuffle(order)
            for k in order:
                fn = cases[k]
                c0, t0 = time.thread_time(), time.perf_counter()
                fn()
                t1, c1 = time.perf_counter(), time.thread_time()
                wall[k].append((t1 - t0) * 1e3)
                cpu[k].append((c1 - c0) * 1e3)
            rounds += 1
    finally:
        gc.enable()
    return {k: {"wall": wall[k], "cpu": cpu[k]} for k in cases}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]."""
    return median([x / y for x, y in zip(a, b) if y > 0])


# --------------------------------------------------------------------------- operands
def member(pkg: Package, name: str, d: int, gen: torch.Generator):
    """A random, well-conditioned member: I + 0.1 * random stored parameters."""
    T = pkg.structures.get(name)
    zero = T.zeros(d)
    leaves = [0.1 * torch.randn(leaf.shape, generator=gen) for leaf in zero.leaves]
    return T(*leaves).add_diag(1.0)


def op_calls(pkg: Package, name: str, d: int, seed: int) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(seed)
    T = pkg.structures.get(name)
    K, L = member(pkg, name, d, gen), member(pkg, name, d, gen)
    Y = torch.randn(d, R, generator=gen)
    a = torch.randn(R, d, generator=gen)
    X = torch.randn(d, N, generator=gen)
    Z = torch.randn(N, d, generator=gen)
    calls = {
        "project_outer": lambda: T.project_outer(Y),
        "project_inner": lambda: K.project_inner(a.mT),
        "matmat": lambda: K.matmat(X),
        "rmatmat": lambda: K.rmatmat(X),
        "matmat_right": lambda: pkg.matmat_right(K, Z),
        "rmatmat_right": lambda: pkg.rmatmat_right(K, Z),
        "outer_matmat": lambda: pkg.outer_matmat(K, X),
        "outer_matmat_right": lambda: pkg.outer_matmat_right(K, Z),
        "matmul": lambda: K.matmul(L),
        "gram": lambda: K.gram(),
        "add_diag": lambda: K.add_diag(0.5),
        "max_abs": lambda: K.max_abs(),
        "average_trace": lambda: K.average_trace(),
    }
    if getattr(T, "closed_under_outer", False):
        calls["outer_self"] = lambda: K.outer_self()
    return calls


def mlp_calls(pkg: Package, name: str, seed: int) -> dict[str, Callable[[], object]]:
    """The hot path on the MLP's three layers: the natural gradient (uncached and with
    K K^T, C C^T cached where the structure allows) and one factor update (statistics
    Pi(K^T a^T a K) with 128 rows plus the SINGD update of K and C)."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _, d_C, d_K in MLP_LAYERS:
        K, C = member(pkg, name, d_K, gen), member(pkg, name, d_C, gen)
        mK, mC = member(pkg, name, d_K, gen) * 0.1, member(pkg, name, d_C, gen) * 0.1
        G = torch.randn(d_C, d_K, generator=gen)
        a = torch.randn(MLP_ROWS, d_K, generator=gen)
        g = torch.randn(MLP_ROWS, d_C, generator=gen)
        cached = pkg.precondition.outer_products(K, C)
        layers.append((K, C, mK, mC, G, a, g, cached))
    Factors = pkg.factors.Factors
    LayerStatistics = importlib.import_module(
        pkg.factors.__name__.replace(".factors", ".statistics")
    ).LayerStatistics

    def natural(cache: bool):
        for K, C, _, _, G, _, _, cached in layers:
            pkg.natural_gradient(K, C, G, cached if cache else {})

    def update():
        for K, C, mK, mC, _, a, g, _ in layers:
            stats = LayerStatistics(
                K.project_inner(a.mT) * (1.0 / MLP_ROWS), C.project_inner(g.mT) * 128.0
            )
            pkg.factors.update_factors(
                Factors(K, C), Factors(mK, mC), stats, damping=1e-3, alpha1=0.9,
                lr_cov=1e-2, kfac_like=False, normalize_lr_cov=True,
            )  # fmt: skip

    def natural_precondition_py():  # precondition.natural_gradient as it is, uncached
        for K, C, _, _, G, _, _, _ in layers:
            pkg.precondition.natural_gradient(K, C, G, {})

    calls = {
        "natural_gradient": lambda: natural(False),
        "natural_gradient_precondition_py": natural_precondition_py,
        "factor_update": update,
    }
    if any(layer[-1] for layer in layers):
        calls["natural_gradient_cached"] = lambda: natural(True)
    return calls


def sgd_step_call() -> Callable[[], object]:
    """One SGD step (forward, backward, update) of the MLP: the reference cost."""
    gen = torch.Generator().manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(MLP_ROWS, 784, generator=gen)
    y = torch.randint(0, 10, (MLP_ROWS,), generator=gen)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


# ------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-rev", help="git revision to compare against")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--structures", nargs="+", default=STRUCTURES)
    parser.add_argument("--ops", nargs="+", default=list(OPS))
    parser.add_argument("--budget", type=float, default=1.5, help="seconds per group")
    parser.add_argument("--min-rounds", type=int, default=7)
    parser.add_argument("--max-rounds", type=int, default=60)
    parser.add_argument("--no-mlp", action="store_true", help="skip the MLP hot path")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="what the report shows: thread CPU time (default; robust to other processes "
        "taking the cores) or wall time (both are in the JSON)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "structures"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    sys.path.insert(0, str(ROOT))
    pkgs = [Package("after", "singd_functional")]
    tmp = None
    if args.baseline_rev:
        tmp = Path(tempfile.mkdtemp(prefix="structures_bench_"))
        pkgs.insert(0, Package("before", load_baseline(args.baseline_rev, tmp)))
    timing = dict(budget=args.budget, min_rounds=args.min_rounds, max_rounds=args.max_rounds)
    results: list[dict] = []

    def record(kind, op, d, runs):
        for label, r in runs.items():
            name, version = label.split("|")
            results.append({
                "kind": kind, "op": op, "d": d, "structure": name, "version": version,
                "wall_ms": median(r["wall"]), "cpu_ms": median(r["cpu"]),
                "rounds": len(r["wall"]), "raw_wall_ms": r["wall"], "raw_cpu_ms": r["cpu"],
            })  # fmt: skip

    try:
        for d in args.sizes:
            per_pkg = {
                (s, p.label): op_calls(p, s, d, seed=d) for s in args.structures for p in pkgs
            }
            for op in args.ops:
                cases = {f"{s}|{v}": calls[op] for (s, v), calls in per_pkg.items() if op in calls}
                if not cases:
                    continue
                runs = run_group(cases, args.budget, args.min_rounds, args.max_rounds)
                record("op", op, d, runs)
                print(_progress(op, d, runs), flush=True)
        if not args.no_mlp:
            per_pkg = {(s, p.label): mlp_calls(p, s, seed=1) for s in args.structures for p in pkgs}
            sgd = sgd_step_call()
            for what in MLP_WHATS:
                cases = {f"{s}|{v}": c[what] for (s, v), c in per_pkg.items() if what in c}
                if what == "natural_gradient_cached":  # next to the uncached path
                    cases.update({
                        f"{s}|{v}": c["natural_gradient"] for (s, v), c in per_pkg.items()
                        if what not in c
                    })  # fmt: skip
                cases["sgd|reference"] = sgd
                runs = run_group(cases, 2 * args.budget, 2 * args.min_rounds, args.max_rounds)
                if what != "factor_update":  # the SGD reference is kept from one group
                    del runs["sgd|reference"]
                    record("mlp", what, 0, runs)
                else:
                    sgd_run = {"sgd|reference": runs.pop("sgd|reference")}
                    record("mlp", what, 0, runs)
                    record("mlp", "sgd_step", 0, sgd_run)
                print(_progress(what, "MLP", runs), flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "baseline_rev": args.baseline_rev,
        "R": R,
        "N": N,
        "mlp_layers": MLP_LAYERS,
        "mlp_rows": MLP_ROWS,
        "dtype": "float32",
        "timing": timing,
        "clock": args.clock,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(report(meta, results, args))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def _progress(op, d, runs) -> str:
    cells = ", ".join(f"{k} {median(r['wall']):.3f}" for k, r in runs.items())
    return f"{op} d={d}: {cells}"


# ----------------------------------------------------------------------------- report
def _fmt(ms: float) -> str:
    if ms != ms:
        return "-"
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _amortized(by: dict, s: str, v: str) -> dict | None:
    ng = by.get(("mlp", "natural_gradient_cached", 0, s, v))
    up = by.get(("mlp", "factor_update", 0, s, v))
    if not (ng and up):
        return None
    raw = [a + b / T_UPDATE for a, b in zip(ng["raw"], up["raw"])]
    return {"ms": ng["ms"] + up["ms"] / T_UPDATE, "raw": raw}


def _before_after(rs: dict, versions: list[str]) -> str:
    """ "before -> after (paired speed-up)", or the one time."""
    if any(rs[v] is None for v in versions):
        return "-"
    if len(versions) == 1:
        return _fmt(rs[versions[0]]["ms"])
    b, a = rs["before"], rs["after"]
    return f"{_fmt(b['ms'])} -> {_fmt(a['ms'])} ({paired_ratio(b['raw'], a['raw']):.2g}x)"


def report(meta: dict, results: list[dict], args) -> str:
    clock = meta["clock"]
    results = [dict(r, ms=r[f"{clock}_ms"], raw=r[f"raw_{clock}_ms"]) for r in results]
    by = {(r["kind"], r["op"], r["d"], r["structure"], r["version"]): r for r in results}
    versions = ["before", "after"] if meta["baseline_rev"] else ["after"]
    structs = args.structures
    lines = [
        "# Structured-matrix kernels: time per call",
        "",
        f"torch {meta['torch']}, {meta['threads']} thread, float32, {meta['machine']}, "
        f"{meta['cpu_count']} CPUs, load average at the end {meta['load_average']}. "
        f"Median {'thread CPU' if clock == 'cpu' else 'wall'} time per call in ms over "
        "interleaved rounds (all structures and versions of one row share every round); "
        "in brackets the ratio to dense. "
        f"Pi(Y Y^T): Y [d, {R}]; project_inner: Pi(K^T a^T a K) with a [{R}, d] (the "
        f"statistics' call, `K.project_inner(a.mT)`); K @ X: X [d, {N}]; `*_right`: "
        f"X [{N}, d]. Generated by `python -m benchmarks.structures_bench"
        + (f" --baseline-rev {meta['baseline_rev']}`" if meta["baseline_rev"] else "`")
        + ".",
        "",
    ]
    ops = [op for op in args.ops if any(r["op"] == op for r in results)]
    header = "| op | d | " + " | ".join(structs) + " |"
    sep = "|---|---|" + "---|" * len(structs)
    lines += ["## After: ms per call (ratio to dense)", "", header, sep]
    for op in ops:
        for d in args.sizes:
            dense = by.get(("op", op, d, "dense", "after"))
            cells = []
            for s in structs:
                r = by.get(("op", op, d, s, "after"))
                if r is None:
                    cells.append("-")
                    continue
                ratio = f" ({r['ms'] / dense['ms']:.2g}x)" if dense else ""
                cells.append(_fmt(r["ms"]) + ratio)
            lines.append(f"| {op} | {d} | " + " | ".join(cells) + " |")
    if "before" in versions:
        lines += [
            "",
            "## Before -> after: ms per call (median paired speed-up)",
            "",
            "Operations the baseline lacks are timed through the formula its callers used.",
            "",
            header,
            sep,
        ]
        for op in ops:
            for d in args.sizes:
                cells = []
                for s in structs:
                    b = by.get(("op", op, d, s, "before"))
                    a = by.get(("op", op, d, s, "after"))
                    if a is None or b is None:
                        cells.append("-")
                        continue
                    speed = paired_ratio(b["raw"], a["raw"])
                    cells.append(f"{_fmt(b['ms'])} -> {_fmt(a['ms'])} ({speed:.2g}x)")
                lines.append(f"| {op} | {d} | " + " | ".join(cells) + " |")
    mlp = [r for r in results if r["kind"] == "mlp"]
    if mlp:
        lines += [
            "",
            "## MLP 784-512-512-10 (all three layers), ms",
            "",
            "natural_gradient: C C^T G K K^T for G of every layer ([512, 785], [512, 513], "
            "[10, 513]) with the two-sided products `C.outer_matmat(G)`, "
            "`K.outer_matmat_right(left)` (a baseline without them: "
            "`precondition.natural_gradient`); `_cached`: with K K^T and C C^T kept between "
            "factor updates where the structure is closed under it (else the uncached "
            "path); `_precondition_py`: `precondition.natural_gradient(K, C, G)` as it is "
            "now (uncached: C.matmat(C.rmatmat(G)), then K.matmat(K.rmatmat(.)) on the "
            "transpose). factor_update: "
            f"Pi(K^T a^T a K), Pi(C^T g^T g C) with {MLP_ROWS} rows and the SINGD update "
            "(gram, matmul, add_diag, average_trace, max_abs) of K and C. amortized: "
            f"natural_gradient_cached + factor_update / {T_UPDATE}.",
            "",
            "| structure | " + " | ".join((*MLP_WHATS, "amortized")) + " |",
            "|---|" + "---|" * (len(MLP_WHATS) + 1),
        ]
        for s in structs:
            cells = []
            for what in (*MLP_WHATS, "amortized"):
                if what == "amortized":
                    rs = {v: _amortized(by, s, v) for v in versions}
                else:
                    rs = {v: by.get(("mlp", what, 0, s, v)) for v in versions}
                cells.append(_before_after(rs, versions))
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        sgd = by.get(("mlp", "sgd_step", 0, "sgd", "reference"))
        if sgd:
            lines += [
                "",
                f"Reference: one SGD step (forward, backward, update) of the MLP with batch "
                f"{MLP_ROWS}, timed in the same rounds as factor_update: {_fmt(sgd['ms'])} ms. "
                "The SINGD overhead per step, amortized (after), in SGD steps: "
                + ", ".join(
                    f"{s} {_amortized(by, s, 'after')['ms'] / sgd['ms']:.2f}"
                    for s in structs
                    if _amortized(by, s, "after")
                )
                + ".",
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
