"""Compile time of the whole SINGD training step: cold (empty caches) and warm.

Two models, each step the pure core end to end (``sf.make_step``: fx capture +
``tx.update`` + ``apply_updates``) compiled with ``torch.compile(fullgraph=True)``
(inductor, CPU), hyperparameters as 0-d tensors:

* ``mlp``: the README's torch.compile example, Linear(20, 64)-ReLU-Linear(64, 3),
  batch 128, structures ("dense", "diagonal");
* ``gpt``: a 2-layer GPT (token + position embedding, 2 pre-norm blocks with 4-head
  causal attention and a 4x MLP, linear head), width 128, sequence 64, vocabulary 256,
  batch 8; 9 Linear layers with structures ("dense", "diagonal"), embeddings and
  LayerNorms with an AdamW ``fallback``.

Each model is measured in two fresh processes that share one new inductor cache
directory: the first compiles cold (what a user's first run pays), the second warm
(dynamo and AOT autograd trace again; inductor's FX-graph cache skips code generation
and the C++ builds). Per process: the first call of the step with statistics and of
the plain step (each a compilation), then eager vs compiled step time (medians over
interleaved rounds, process CPU time, one thread).

Usage::

    python -m benchmarks.compile_time                     # both models
    python -m benchmarks.compile_time --models mlp --rounds 5

Writes ``compile_time.md`` and ``.json`` into ``benchmarks/results/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

MODELS = ("mlp", "gpt")


def build(name: str):
    """(model, loss_fn, inputs, targets, transform) of one benchmark model."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import singd_functional as sf

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
        x, y = torch.randn(128, 20, generator=g), torch.randint(0, 3, (128,), generator=g)
        tx = sf.singd(sf.find_layers(model), structures=("dense", "diagonal"))
        return model, F.cross_entropy, x, y, tx
    model = _gpt_classes()()
    tokens = torch.randint(0, model.vocab, (8, model.seq + 1), generator=g)
    tx = sf.singd(
        sf.find_layers(model), structures=("dense", "diagonal"), loss_average="batch+sequence",
        fallback=sf.adamw(lr=1e-3),
    )

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.reshape(-1, model.vocab), targets.reshape(-1))

    return model, loss_fn, tokens[:, :-1], tokens[:, 1:], tx


def _gpt_classes():
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        """Pre-norm block: causal self-attention (plain ops, fx-traceable) and a 4x MLP."""

        def __init__(self, width: int, heads: int, seq: int):
            super().__init__()
            self.width, self.heads, self.seq = width, heads, seq
            self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
            self.register_buffer("causal", torch.ones(seq, seq, dtype=torch.bool).triu(1))

        def forward(self, h):
            w, nh, s = self.width, self.heads, self.seq
            qkv = self.qkv(self.norm1(h)).reshape(-1, s, 3, nh, w // nh).permute(2, 0, 3, 1, 4)
            scores = (qkv[0] @ qkv[1].transpose(-1, -2)) * (1.0 / math.sqrt(w // nh))
            att = torch.softmax(scores.masked_fill(self.causal, float("-inf")), dim=-1)
            h = h + self.proj((att @ qkv[2]).transpose(1, 2).reshape(-1, s, w))
            return h + self.fc2(F.gelu(self.fc1(self.norm2(h))))

    class TinyGPT(nn.Module):
        vocab, seq, width, heads, depth = 256, 64, 128, 4, 2

        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(self.vocab, self.width)
            self.pos = nn.Parameter(torch.randn(self.seq, self.width) * 0.02)
            self.blocks = nn.Sequential(
                *(Block(self.width, self.heads, self.seq) for _ in range(self.depth))
            )
            self.norm = nn.LayerNorm(self.width)
            self.head = nn.Linear(self.width, self.vocab)

        def forward(self, tokens):
            return self.head(self.norm(self.blocks(self.embed(tokens) + self.pos)))

    return TinyGPT


def child(name: str, rounds: int) -> dict:
    """One process's measurements (printed as JSON by ``--child``)."""
    import torch

    import singd_functional as sf

    torch.set_num_threads(1)
    model, loss_fn, x, y, tx = build(name)
    capture = sf.make_capture(model, loss_fn, sf.find_layers(model))
    eager = sf.make_step(tx, capture)
    compiled = [torch.compile(f, fullgraph=True) for f in eager]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    runs = {"eager": [params, tx.init(params)], "compiled": [params, tx.init(params)]}
    fns = {"eager": eager, "compiled": compiled}

    def call(side: str, i: int, t: int) -> tuple[float, float]:
        run = runs[side]
        hp = sf.HyperParams(lr=torch.tensor(1e-3 / (1 + t)))
        w, c = time.perf_counter(), time.process_time()
        run[0], run[1], _ = fns[side][i](run[0], run[1], x, y, hyperparams=hp)
        return time.perf_counter() - w, time.process_time() - c

    out: dict = {"model": name, "params": sum(p.numel() for p in params.values())}
    out["layers"] = len(sf.find_layers(model))
    t = 0
    for i, step in enumerate(("stats", "plain")):
        call("eager", i, t)
        out[f"compile_wall_s_{step}"], out[f"compile_cpu_s_{step}"] = call("compiled", i, t)
        t += 1
    cpu: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for i, step in enumerate(("stats", "plain")):
            for side in fns:
                cpu.setdefault((side, step), []).append(call(side, i, t)[1])
            t += 1
    for (side, step), v in cpu.items():
        out[f"{side}_ms_{step}"] = 1e3 * statistics.median(v)
    for side in fns:  # T = 10: one step with statistics, nine plain ones
        out[f"{side}_ms_T10"] = (out[f"{side}_ms_stats"] + 9 * out[f"{side}_ms_plain"]) / 10
    out["speedup_T10"] = out["eager_ms_T10"] / out["compiled_ms_T10"]
    diff = max(
        ((runs["compiled"][0][k] - runs["eager"][0][k]).norm() / runs["eager"][0][k].norm()).item()
        for k in params
    )
    out["max_rel_param_diff"] = diff
    return out


def measure(name: str, rounds: int) -> dict:
    cache = tempfile.mkdtemp(prefix=f"singd_compile_time_{name}_")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
    result = {}
    for phase in ("cold", "warm"):
        cmd = [sys.executable, "-m", "benchmarks.compile_time", "--child", name,
               "--rounds", str(rounds)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} ({phase}) failed:\n{proc.stderr[-4000:]}")
        result[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name} {phase}: {json.dumps(result[phase])}", flush=True)
    return result


def report(results: dict, meta: dict) -> str:
    lines = [
        "# Compile time of the whole SINGD step (torch.compile, CPU)",
        "",
        f"{meta['date']}; torch {meta['torch']}, Python {meta['python']}; {meta['machine']} "
        f"({meta['cpus']} CPUs); one thread; load average {meta['load_start']} at start, "
        f"{meta['load_end']} at end (**the machine was shared with other jobs**: absolute "
        "seconds are slower than on an idle machine; the eager/compiled ratios come from "
        "interleaved rounds in one process). Produced by `python -m benchmarks.compile_time`.",
        "",
        "Cold: a fresh process with an empty inductor cache. Warm: a fresh process reusing "
        "that cache (dynamo and AOT autograd still trace; code generation and C++ builds "
        "are skipped). `stats`: the step with the preconditioner update; `plain`: the steps "
        "between two updates. Step times: medians of process CPU time, T = 10 mix.",
        "",
        "| model | params | layers | cold: stats + plain (s) | warm: stats + plain (s) "
        "| eager ms/step (T=10) | compiled ms/step (T=10) | speed-up | max rel. param diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        cold, warm = r["cold"], r["warm"]
        lines.append(
            f"| {name} | {cold['params']:,} | {cold['layers']} "
            f"| {cold['compile_wall_s_stats']:.1f} + {cold['compile_wall_s_plain']:.1f} "
            f"| {warm['compile_wall_s_stats']:.1f} + {warm['compile_wall_s_plain']:.1f} "
            f"| {warm['eager_ms_T10']:.2f} | {warm['compiled_ms_T10']:.2f} "
            f"| {warm['speedup_T10']:.2f}x | {warm['max_rel_param_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rounds)))
        return
    import torch

    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_start": [round(v, 2) for v in os.getloadavg()],
    }
    results = {name: measure(name, args.rounds) for name in args.models}
    meta["load_end"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_time.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "compile_time.md").write_text(report(results, meta))
    print(out / "compile_time.md")


if __name__ == "__main__":
    main()
