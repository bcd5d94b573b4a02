"""How much of SINGD's result on the character GPT is its settings?

    python -m benchmarks.transformer_settings [--steps 600]

On the nanoGPT-style model of :mod:`benchmarks.transformer_bench` (seed 0, the same
batches, AdamW for the embeddings and norms at ``--adamw-lr``), in order:

A. damping x lr_cov (``A_PAIRS``) at lr 3e-2, SINGD dense: ONE vmapped sweep;
B. warm-up (30 steps) + cosine decay to 10 % of the lr, at three lrs: one sweep whose
   per-member lr is rescaled every step (``state._replace(hyperparams=...)``);
C. T (how often the factors are updated): 1, 2, 10 (static: one run each);
D. weight decay (coupled, SINGD's gamma): one sweep;
E. which layers get which structure: the head diagonal (rest dense); the MLP layers
   block-diagonal (rest dense); everything diagonal but the attention projections;
F. the AdamW fallback at lr 1e-2 (AdamW's best on this model) instead of 3e-3.

B-E use the best (lr, damping, lr_cov) of A. Each finished run is appended to
``results/transformer_settings.jsonl``; the report is ``transformer_settings.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import singd_functional as sf
from singd_functional.examples import chargpt

from .transformer_bench import RESULTS, Store, curve_record

MODEL = "nanogpt"
# (damping, lr_cov) of study A: the preconditioner moves faster (lr_cov) and is damped
# less or more than the default (1e-3, 1e-2); small, because the machine was shared
A_PAIRS = ((1e-3, 1e-1), (1e-2, 1e-1), (1e-4, 1e-1), (1e-3, 3e-1))


class Study:
    def __init__(self, args):
        self.args = args
        self.store = Store(Path(args.out).with_suffix(".jsonl"), args.fresh)
        self.data = chargpt.load_corpus(chargpt.DEFAULT_BUDGET)
        self.windows = chargpt.val_windows(self.data, 64)
        self.batches = chargpt.batch_stream(self.data, args.steps, 32, 64, 0)

    def model(self):
        return chargpt.make_model(MODEL, len(self.data.vocab), seed=0)

    def sweep(self, study: str, members: list[dict], *, structures="dense", T=5,
              schedule=None, schedule_name: str = "constant", static: dict | None = None,
              fallback_lr: float | None = None):
        """``members`` (dicts of swept hyperparameters) in one vmapped run; cached."""
        static = static or {}
        fallback_lr = self.args.adamw_lr if fallback_lr is None else fallback_lr
        keys = [Store.key(study=study, steps=self.args.steps, adamw_lr=fallback_lr,
                          structures=str(structures), T=T, schedule=schedule_name,
                          static=static, member=m) for m in members]
        todo = [(k, m) for k, m in zip(keys, members) if self.store.get(k) is None]
        if todo and self.args.report_only:
            return [r for k in keys if (r := self.store.get(k)) is not None]
        if todo:
            start = time.perf_counter()
            model = self.model()
            tx, capture, _ = chargpt.core_optimizer(
                model, structures=structures, fallback_lr=fallback_lr, T=T, **static
            )
            names = list(todo[0][1])
            # SINGD's values only ("singd" label): the AdamW fallback keeps --adamw-lr
            hp = sf.HyperParams(**{n: torch.tensor([float(m[n]) for _, m in todo],
                                                   dtype=torch.float64) for n in names})
            if len(todo) == 1:
                only = {n: float(v[0]) for n, v in hp._asdict().items() if v is not None}
                tx, capture, _ = chargpt.core_optimizer(
                    model, structures=structures, fallback_lr=fallback_lr, T=T,
                    **{**static, **only},
                )
                hp = sf.HyperParams(lr=torch.tensor([only.get("lr", 1e-2)],
                                                    dtype=torch.float64))
            curves, _ = chargpt.sweep_core(model, tx, capture, T, {"singd": hp}, self.batches,
                                           self.windows, schedule=schedule)
            for (k, m), c in zip(todo, curves):
                rec = curve_record(k, dict(study=study, member=m, structures=str(structures),
                                           T=T, schedule=schedule_name, static=static,
                                           fallback_lr=fallback_lr), c)
                self.store.add(rec)
            print(f"{study}: {len(todo)} members, {time.perf_counter() - start:.0f} s: "
                  f"{[round(c.val[-1], 4) for c in curves]}", flush=True)
        return [self.store.get(k) for k in keys]


def warmup_cosine(steps: int, warmup: int = 30, floor: float = 0.1):
    def schedule(t: int, base: dict) -> dict:
        if t < warmup:
            f = (t + 1) / warmup
        else:
            f = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (t - warmup) /
                                                          max(1, steps - warmup)))
        return {label: {**hp, "lr": hp["lr"] * f} for label, hp in base.items()}
    return schedule


def best(records: list[dict]) -> dict:
    return min(records, key=lambda r: r["final_val"] if r["final_val"] == r["final_val"]
               else math.inf)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transformer_settings")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--adamw-lr", type=float, default=3e-3,
                   help="lr of the AdamW fallback (embeddings, norms)")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the runs recorded so far; train nothing")
    p.add_argument("--studies", default="F,A", help="F first (two runs); A and B-E follow A")
    p.add_argument("--out", default=str(RESULTS / "transformer_settings"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s = Study(args)
    lines = ["# SINGD settings on the character GPT (nanoGPT-style, seed 0)", "",
             f"{args.steps} steps, batch 32, context 64; AdamW (lr {args.adamw_lr:g}) for "
             "embeddings and norms; final validation loss. Members of one sweep share "
             "weights and batches.", ""]

    def table(title, recs, cols):
        lines.extend([f"## {title}", "", "| " + " | ".join([*cols, "val loss"]) + " |",
                      "|" + "---|" * (len(cols) + 1)])
        for r in recs:
            cells = [str(r["member"].get(c, r.get(c, ""))) for c in cols]
            lines.append("| " + " | ".join([*cells, f"{r['final_val']:.4f}"]) + " |")
        lines.append("")

    # the default (damping 1e-3, lr_cov 1e-2) at lr 3e-2 is a member of the benchmark's grid
    if "F" in args.studies:
        f = s.sweep("F", [dict(lr=lr) for lr in (1e-2, 3e-2)], fallback_lr=1e-2)
        table("F. the AdamW fallback at lr 1e-2 (AdamW's own best) instead of 3e-3 "
              "(dense, defaults)", f, ["lr", "fallback_lr"])
    if "A" not in args.studies:
        Path(args.out).with_suffix(".md").write_text("\n".join(lines))
        print("\n".join(lines))
        return 0
    a = s.sweep("A", [dict(lr=3e-2, damping=d, lr_cov=c) for d, c in A_PAIRS])
    table("A. damping x lr_cov (dense, T=5, lr 3e-2, constant lr)", a,
          ["lr", "damping", "lr_cov"])
    if not a:  # --report-only before A finished
        Path(args.out).with_suffix(".md").write_text("\n".join(lines))
        print("\n".join(lines))
        return 0
    top = best(a)["member"]
    damp_cov = {k: top[k] for k in ("damping", "lr_cov")}
    b = s.sweep("B", [dict(lr=top["lr"] * f) for f in (1.0, 3.0)],
                schedule=warmup_cosine(args.steps), schedule_name="warmup30+cosine0.1",
                static=damp_cov)
    table("B. warm-up + cosine schedule (best damping, lr_cov of A)", b, ["lr", "schedule"])
    c = []
    for T in (1, 2, 10):
        c += s.sweep("C", [dict(lr=top["lr"])], T=T, static=damp_cov)
    table("C. T (best of A otherwise)", c, ["lr", "T"])
    d = s.sweep("D", [dict(weight_decay=w) for w in (1e-4, 1e-3, 1e-2)],
                static={**damp_cov, "lr": top["lr"]})
    table("D. coupled weight decay (best of A otherwise)", d, ["weight_decay"])

    def head_diagonal(name):
        return ("diagonal", "diagonal") if name == "head" else ("dense", "dense")

    def mlp_block(name):
        return ("block16diagonal",) * 2 if name.endswith((".fc", ".out")) else ("dense",) * 2

    def attn_dense(name):
        return ("dense",) * 2 if ".attn." in name else ("diagonal",) * 2

    e = []
    for label, rule in (("head diagonal", head_diagonal), ("MLP block16", mlp_block),
                        ("attention dense, rest diagonal", attn_dense)):
        recs = s.sweep("E", [dict(lr=top["lr"])], structures=rule, static=damp_cov)
        for r in recs:
            r = dict(r, member={**r["member"], "layers": label})
            e.append(r)
    table("E. structures per layer (best of A otherwise)", e, ["lr", "layers"])
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines))
    summary = dict(best_A=top, records=len(s.store.records))
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
