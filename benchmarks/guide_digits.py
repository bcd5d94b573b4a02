"""How T and the structure trade accuracy against time on the demo's task (for the guide).

The demo's CNN on scikit-learn's digits (``singd_functional.demo``: same data split,
batches, initial weights and SINGD hyperparameters), trained with the drop-in SINGD for
dense and diagonal factors at T in {1, 2, 10, 50}, and SGD / AdamW, 8 epochs each, one
thread. Per run: test accuracy and loss, optimizer state, and the thread CPU time of the
run (training and the per-epoch evaluation) as a ratio to SGD's, after a warm-up run.
The runs go one after another in one process, not interleaved: on a loaded machine the
time column is rough (use benchmarks/results/bench.md for step times).

    python -m benchmarks.guide_digits          # writes benchmarks/results/guide_digits.md
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import singd_functional as sf
from singd_functional import demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    data = demo.load_digits(0, device)
    hp = {k: v for k, v in demo.SINGD_HP.items() if k != "T"}

    def singd(structure: str, T: int):
        return lambda m: sf.SINGD(m, structures=(structure, structure), T=T, **hp)

    runs = {"SGD (momentum)": lambda m: torch.optim.SGD(m.parameters(), **demo.SGD_HP),
            "AdamW": lambda m: torch.optim.AdamW(m.parameters(), **demo.ADAMW_HP)}
    for structure in ("dense", "diagonal"):
        for T in (1, 2, 10, 50):
            runs[f"SINGD {structure}, T={T}"] = singd(structure, T)
    load_start = os.getloadavg()
    # warm-up (lazy initialisation, first-call costs), not reported
    demo.train("warm-up", runs["SGD (momentum)"], data, epochs=1, batch_size=64, seed=0,
               device=device)
    rows = []
    for name, factory in runs.items():
        cpu = time.thread_time()
        run = demo.train(name, factory, data, epochs=args.epochs, batch_size=64, seed=0,
                         device=device)
        rows.append((name, run, time.thread_time() - cpu))
    sgd_cpu = rows[0][2]
    lines = [
        "# T and structure on the demo's digits CNN",
        "",
        f"torch {torch.__version__}; one thread; {args.epochs} epochs of batch 64; the demo's "
        f"hyperparameters (SINGD {demo.SINGD_HP}, T varied). Load average "
        f"{[round(v, 1) for v in load_start]} at start, "
        f"{[round(v, 1) for v in os.getloadavg()]} at end (a shared machine: CPU-time "
        "ratios, runs one after another in one process). "
        "Produced by `python -m benchmarks.guide_digits`.",
        "",
        "| optimizer | test acc | test loss | state KiB | CPU time x SGD |",
        "|---|---|---|---|---|",
    ]
    for name, run, cpu in rows:
        lines.append(
            f"| {name} | {100 * run.test_acc[-1]:.2f} % | {run.test_loss[-1]:.4f} "
            f"| {run.state_bytes / 1024:.1f} | {cpu / sgd_cpu:.2f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "guide_digits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
