#!/usr/bin/env python3
"""Expert-parallel scaling sweep: `mpirun -np 1+W epx generate --stats` for each W.

Writes a CSV (one row per W: decode tokens/s, per-layer dispatch / expert / combine microseconds
per step averaged over layers, and the raw communicator round trip of the same bytes measured by
comm_alltoall_bench in the same sweep) and a PNG plot (matplotlib, if installed).

  python3 bench/scaling_sweep.py --workers 1 2 4 8 --model build/models/small \
      --out build/sweep.csv --plot build/sweep.png
"""
import argparse
import csv
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpirun(np_, oversubscribe):
    cmd = ["mpirun", "-np", str(np_), "-x", "OMP_NUM_THREADS"]
    if oversubscribe:
        cmd.append("--oversubscribe")
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


def run(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def parse_generate(text):
    tps = float(re.search(r"decode ([0-9.]+) tokens/s", text).group(1))
    rows = re.findall(
        r"^\s*(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s", text, re.M)
    if not rows:
        sys.exit("no per-layer stats in the output (is --stats working?)\n" + text)
    layers = [[float(x) for x in r[1:]] for r in rows]
    mean = lambda i: sum(r[i] for r in layers) / len(layers)
    return {"decode_tokens_per_s": tps, "attention_us": mean(0), "moe_us": mean(1),
            "dispatch_us": mean(2), "expert_us": mean(3), "combine_us": mean(4)}


def parse_comm(text):
    for line in text.splitlines():
        f = line.split()
        # bytes, then median/p90/GB/s for epx's MPI communicator, its gloo one, MPI_Alltoallv
        if len(f) == 10 and f[0].isdigit():
            return {"raw_alltoall_us": float(f[1]), "gloo_alltoall_us": float(f[4]),
                    "mpi_alltoallv_us": float(f[7])}
    sys.exit("no result from comm_alltoall_bench\n" + text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--model", default=os.path.join(ROOT, "build/models/small"))
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--tokens", type=int, default=256,
                    help="tokens to generate per run (the prefill step is averaged in too)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    ap.add_argument("--no-oversubscribe", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "build/scaling_sweep.csv"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "build/scaling_sweep.png"))
    args = ap.parse_args()

    epx = os.path.join(args.build, "cli/epx")
    bench = os.path.join(args.build, "bench/comm_alltoall_bench")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if not os.path.exists(os.path.join(args.model, "config.json")):
        run([epx, "make-model", "--preset", "small", "--out", args.model, "--seed", "1"], env)
    hidden = int(re.search(r'"hidden_size":\s*(\d+)', open(os.path.join(args.model, "config.json")).read()).group(1))

    rows = []
    for w in args.workers:
        launch = mpirun(1 + w, not args.no_oversubscribe)
        out = run(launch + [epx, "generate", "--model", args.model, "--prompt",
                            "The experts of every layer", "--max-tokens", str(args.tokens),
                            "--stats"], env)
        row = {"workers": w, **parse_generate(out)}
        # Batch-1 decode: top-2 rows of `hidden` fp32 per layer; a worker gets at most 2 rows.
        row["bytes_per_worker"] = 2 * hidden * 4
        row.update(parse_comm(run(launch + [bench, str(row["bytes_per_worker"])], env)))
        rows.append(row)
        print(", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()), flush=True)

    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install matplotlib): no plot")
        return
    ws = [r["workers"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(ws, [r["decode_tokens_per_s"] for r in rows], "o-")
    a.set_xlabel("expert workers W")
    a.set_ylabel("decode tokens/s (batch 1)")
    a.set_title("throughput")
    bottom = [0.0] * len(rows)
    for key in ["dispatch_us", "expert_us", "combine_us"]:
        vals = [r[key] for r in rows]
        b.bar([str(w) for w in ws], vals, bottom=bottom, label=key)
        bottom = [x + y for x, y in zip(bottom, vals)]
    b.plot([str(w) for w in ws], [r["raw_alltoall_us"] for r in rows], "k^--",
           label="raw all-to-all round trip")
    b.set_xlabel("expert workers W")
    b.set_ylabel("microseconds per layer per step")
    b.set_title("MoE layer: where the time goes")
    b.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
