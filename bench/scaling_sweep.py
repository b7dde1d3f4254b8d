#!/usr/bin/env python3
"""Expert-parallel scaling sweep: workers x batch size x placement x data plane (mpi, gloo).

For each configuration it starts a cluster of the model on this machine, decodes B streams
together through it, and writes one CSV row: decode tokens/s, ms per step, the per-layer
attention / dispatch / expert / combine microseconds per step, and the raw communicator round
trip of the same bytes measured by comm_alltoall_bench in the same sweep. A PNG (matplotlib,
bench/requirements.txt) shows tokens/s against workers and the per-layer split.

  python3 bench/scaling_sweep.py --workers 1 2 3 --batch-sizes 1 8 32 --data-planes mpi gloo \\
      --placements round-robin --replicas 2 --out build/scaling_sweep.csv

How a configuration is run (why not `epx bench decode`: it refuses a world size above one, its
byte model assumes every expert is read on its own device; and `epx generate` decodes one
sequence, batch 1 only):
- mpi: `mpirun -np 1+W epx serve` (rank 0 the coordinator, ranks 1..W the expert workers);
- gloo, no launcher: `epx serve --workers W --data-plane gloo` and W `epx worker --coordinator`.
The load is `epx bench serve --concurrency B --requests B --prompt-tokens 1`: B streams start
together, so after the one-token prompts every step decodes B tokens, and the time per output
token (TPOT) is the step time at batch B. A short warm-up load runs first (the first steps
fault the mmap'd expert weights in), and the per-layer times are the difference of two
`epx stats --json` snapshots around the measured load, so they cover only its steps.

The raw round trip is `mpirun -np 1+W comm_alltoall_bench BYTES` with BYTES the rows one worker
received per layer per step in this run (rows_received from Stats), as fp32 (the CPU backend's
activation dtype on the wire): the coordinator sends BYTES to every worker and every worker
sends BYTES back, once through epx's MPI communicator, once through its gloo communicator and
once through MPI_Alltoallv.
"""
import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The per-layer timings of `epx stats --json`, microseconds summed over the server's steps.
LAYER_KEYS = ("attention_us", "moe_us", "dispatch_us", "expert_us", "combine_us")


def mpirun(np_):
    """The mpirun prefix for np_ ranks on this host (oversubscribing: ranks may outnumber cores).

    Single-copy shared memory (CMA) is turned off because containers often forbid
    process_vm_readv; the copies then go through Open MPI's shared-memory buffers."""
    cmd = ["mpirun", "--oversubscribe", "-np", str(np_), "-x", "OMP_NUM_THREADS",
           "--mca", "btl_vader_single_copy_mechanism", "none"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


def run(cmd, env, timeout=600):
    """Runs cmd to completion; its stdout + stderr, or exits naming the command that failed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def config_of(model):
    """The model's config.json as a dict."""
    with open(os.path.join(model, "config.json")) as f:
        return json.load(f)


def ensure_model(epx, model, env):
    """Writes the `small` random checkpoint to `model` unless a config is already there."""
    if not os.path.exists(os.path.join(model, "config.json")):
        print(f"making {model} (epx make-model --preset small --seed 1)", flush=True)
        run([epx, "make-model", "--preset", "small", "--out", model, "--seed", "1"], env)


def placement_flags(placement):
    """epx flags for a placement name: round-robin, replicas=N, or a placement JSON file."""
    if placement == "round-robin":
        return ["--placement", "round-robin"]
    if placement.startswith("replicas="):
        return ["--placement", "round-robin", "--replicas", placement.split("=", 1)[1]]
    return ["--placement", placement]


def placement_fits(placement, workers):
    """Whether the placement can run on `workers` workers (replicas sit on distinct workers;
    a file names its ranks, which epx checks itself)."""
    if placement.startswith("replicas="):
        return int(placement.split("=", 1)[1]) <= workers
    return True


def parse_alltoall(text, sizes):
    """{bytes: {"mpi", "gloo", "mpi_alltoallv"}} median microseconds per round trip from the
    output of comm_alltoall_bench."""
    result = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) == 10 and f[0].isdigit():
            result[int(f[0])] = {"mpi": float(f[1]), "gloo": float(f[4]),
                                 "mpi_alltoallv": float(f[7])}
    if any(s not in result for s in sizes):
        sys.exit("unexpected comm_alltoall_bench output\n" + text)
    return result


_ALLTOALL_CACHE = {}


def alltoall(bench, np_, sizes, env):
    """Median round trips of comm_alltoall_bench at world size np_ for each size in bytes,
    through epx's MPI communicator, its gloo one and MPI_Alltoallv. Each (np_, size) is measured
    once per process and remembered."""
    missing = sorted({s for s in sizes if (np_, s) not in _ALLTOALL_CACHE})
    if missing:
        out = run(mpirun(np_) + [bench] + [str(s) for s in missing], env)
        for size, times in parse_alltoall(out, missing).items():
            _ALLTOALL_CACHE[(np_, size)] = times
    return {s: _ALLTOALL_CACHE[(np_, s)] for s in sizes}


class Cluster:
    """A coordinator (`epx serve`) with `workers` expert workers on this host, ready to serve.

    Use as a context manager: the cluster is shut down (Admin/Shutdown, then a bounded wait,
    then SIGKILL) when the block ends, also on an error."""

    def __init__(self, epx, model, data_plane, workers, placement, env, work):
        self.epx, self.env = epx, env
        port_file = os.path.join(work, "port")
        self.log = open(os.path.join(work, "cluster.log"), "w")
        serve = [epx, "serve", "--model", model, "--listen", "127.0.0.1:0", "--port-file",
                 port_file, *placement_flags(placement)]
        if workers == 0:
            launch = serve  # one process holding every expert (the baseline)
        elif data_plane == "mpi":
            launch = mpirun(1 + workers) + serve
        else:
            launch = serve + ["--workers", str(workers), "--data-plane", data_plane]
        self.procs = [subprocess.Popen(launch, stdout=self.log, stderr=subprocess.STDOUT,
                                       env=env)]
        try:
            # Bounded polling for the port file (written once the server listens).
            deadline = time.monotonic() + 120
            while not (os.path.exists(port_file) and open(port_file).read().strip()):
                if time.monotonic() > deadline or self.procs[0].poll() is not None:
                    raise RuntimeError("the cluster did not start: see " + self.log.name)
                time.sleep(0.05)
            self.address = "127.0.0.1:" + open(port_file).read().strip()
            if data_plane != "mpi" and workers > 0:
                for _ in range(workers):
                    self.procs.append(subprocess.Popen(
                        [epx, "worker", "--model", model, "--coordinator", self.address,
                         "--data-plane", data_plane], stdout=self.log, stderr=subprocess.STDOUT,
                        env=env))
            run([epx, "health", "--server", self.address, "--service", "epx.v1.Generation",
                 "--wait", "--timeout", "120"], env)
        except BaseException:
            self.close()
            raise

    def stats(self):
        """`epx stats --json` of the running server."""
        return json.loads(run([self.epx, "stats", "--server", self.address, "--json"], self.env))

    def bench_serve(self, batch, tokens):
        """B streams of `tokens` greedy tokens after a one-token prompt, all at once."""
        return run([self.epx, "bench", "serve", "--server", self.address, "--concurrency",
                    str(batch), "--requests", str(batch), "--max-tokens", str(tokens),
                    "--prompt-tokens", "1", "--ignore-eos"], self.env)

    def close(self):
        """Shuts the cluster down and waits for its processes (bounded; SIGKILL after)."""
        if getattr(self, "address", None):
            subprocess.run([self.epx, "shutdown", "--server", self.address],
                           capture_output=True, env=self.env, timeout=60)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parse_bench_serve(text):
    """Mean time per output token (ms) and the output throughput of `epx bench serve`."""
    tpot = re.search(r"^\s*TPOT \(ms\)\s+\d+\s+([0-9.]+)", text, re.M)
    tps = re.search(r"throughput\s+([0-9.]+) output tokens/s", text)
    if not tpot or not tps:
        sys.exit("no TPOT / throughput in `epx bench serve` output\n" + text)
    return {"tpot_ms": float(tpot.group(1)), "output_tokens_per_s": float(tps.group(1))}


def stats_delta(before, after):
    """Per-layer means per step over the steps between two Stats snapshots, and the rows each
    worker received per layer per step."""
    steps = int(after["steps"]) - int(before["steps"])
    if steps <= 0:
        sys.exit("no steps between the two stats snapshots")
    layers = len(after["layers"])
    out = {"steps": steps}
    for key in LAYER_KEYS:
        total = sum(float(a[key]) - float(b[key])
                    for a, b in zip(after["layers"], before["layers"]))
        out[key] = total / layers / steps
    rows = {}
    before_rows = {w["rank"]: int(w["rows_received"]) for w in before.get("workers", [])}
    for w in after.get("workers", []):
        rows[w["rank"]] = (int(w["rows_received"]) - before_rows.get(w["rank"], 0)) / layers / steps
    out["worker_rows"] = rows
    return out


def run_config(build, model, data_plane, workers, batch, placement, tokens, warmup_tokens, env):
    """One configuration, measured: a CSV row (a dict). workers = 0 runs one process holding
    every expert (data_plane "local"), with no exchange and no raw round trip."""
    epx = os.path.join(build, "cli/epx")
    cfg = config_of(model)
    with tempfile.TemporaryDirectory(prefix="epx_sweep_") as work:
        with Cluster(epx, model, data_plane, workers, placement, env, work) as cluster:
            cluster.bench_serve(batch, warmup_tokens)
            before = cluster.stats()
            served = parse_bench_serve(cluster.bench_serve(batch, tokens))
            after = cluster.stats()
    delta = stats_delta(before, after)
    row = {"data_plane": data_plane, "workers": workers, "batch": batch, "placement": placement,
           "decode_tokens_per_s": batch * 1e3 / served["tpot_ms"],
           "ms_per_step": served["tpot_ms"],
           "output_tokens_per_s": served["output_tokens_per_s"], "steps": delta["steps"]}
    row.update({k: delta[k] for k in LAYER_KEYS})
    rows = [r for r in delta["worker_rows"].values() if r > 0]
    row["rows_per_worker"] = sum(rows) / len(rows) if rows else 0.0
    row["max_rows_per_worker"] = max(rows) if rows else 0.0
    # The bytes one worker gets (and sends back) per layer: its mean rows as fp32.
    row["bytes_per_worker"] = max(1, math.ceil(row["rows_per_worker"])) * cfg["hidden_size"] * 4
    if workers == 0:
        row["bytes_per_worker"] = 0
        for key in ("raw_alltoall_us", "raw_mpi_us", "raw_gloo_us", "raw_mpi_alltoallv_us"):
            row[key] = 0.0
        return row
    bench = os.path.join(build, "bench/comm_alltoall_bench")
    raw = alltoall(bench, 1 + workers, [row["bytes_per_worker"]], env)[row["bytes_per_worker"]]
    row["raw_alltoall_us"] = raw[data_plane]
    row["raw_mpi_us"], row["raw_gloo_us"] = raw["mpi"], raw["gloo"]
    row["raw_mpi_alltoallv_us"] = raw["mpi_alltoallv"]
    return row


def configurations(args):
    """(data plane, placement, workers, batch) tuples of the sweep, in run order; placements
    that cannot run on a worker count (more replicas than workers) are left out."""
    placements = list(args.placements) + [f"replicas={r}" for r in (args.replicas or [])]
    out = []
    for dp in args.data_planes:
        for placement in placements:
            for w in args.workers:
                if not placement_fits(placement, w):
                    print(f"skipping {placement} on {w} worker(s): needs distinct workers")
                    continue
                for b in args.batch_sizes:
                    out.append((dp, placement, w, b))
    return out


def format_row(row):
    """One line of `key=value` for the log."""
    return ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in row.items())


def sweep(args, env, configs=None):
    """Runs every configuration (configurations(args) unless given); the CSV rows."""
    rows = []
    for dp, placement, w, b in configs if configs is not None else configurations(args):
        row = run_config(args.build, args.model, dp, w, b, placement, args.tokens,
                         args.warmup_tokens, env)
        print(format_row(row), flush=True)
        rows.append(row)
    return rows


def write_csv(rows, path):
    """Writes the rows (dicts with the same keys) to a CSV file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def plot(rows, path):
    """Two panels: decode tokens/s against workers (a line per data plane, batch and
    placement), and the per-layer split of each configuration with its raw round trip."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -r bench/requirements.txt): no plot")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    series = sorted({(r["data_plane"], r["batch"], r["placement"]) for r in rows})
    for dp, batch, placement in series:
        pts = sorted((r["workers"], r["decode_tokens_per_s"]) for r in rows
                     if (r["data_plane"], r["batch"], r["placement"]) == (dp, batch, placement))
        a.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if dp == "mpi" else "s--",
               label=f"{dp}, batch {batch}, {placement}")
    a.set_xlabel("expert workers W")
    a.set_xticks(sorted({r["workers"] for r in rows}))
    a.set_ylabel("decode tokens/s (batch / time per step)")
    a.set_title("throughput")
    a.legend(fontsize=7)
    labels = [f"{r['data_plane']} W{r['workers']} B{r['batch']}" +
              ("" if r["placement"] == "round-robin" else f" {r['placement']}") for r in rows]
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for key in ("attention_us", "dispatch_us", "expert_us", "combine_us"):
        vals = [r[key] for r in rows]
        b.bar(x, vals, bottom=bottom, label=key.replace("_us", ""))
        bottom = [p + q for p, q in zip(bottom, vals)]
    b.plot(x, [r["moe_us"] + r["attention_us"] for r in rows], "r_", markersize=14,
           label="attention + MoE (wall)")
    b.plot(x, [r["raw_alltoall_us"] for r in rows], "k^",
           label="raw round trip, same bytes (its data plane)")
    b.set_xticks(list(x))
    b.set_xticklabels(labels, rotation=70, fontsize=7)
    b.set_ylabel("microseconds per layer per step (dispatch overlaps expert when the\n"
                 "ranks share cores: the red mark is the layer's wall time)")
    b.set_title("per layer: where the time goes")
    b.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def add_arguments(ap):
    """The sweep's flags (shared with bench/cluster_model.py --validate)."""
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--data-planes", nargs="+", default=["mpi", "gloo"], choices=["mpi", "gloo"])
    ap.add_argument("--placements", nargs="+", default=["round-robin"],
                    help="round-robin, replicas=N, or placement JSON files")
    ap.add_argument("--replicas", type=int, nargs="+",
                    help="also run round-robin with N copies of every expert (replicas=N)")
    ap.add_argument("--model", default=os.path.join(ROOT, "build/models/small"))
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--tokens", type=int, default=32, help="tokens each stream generates")
    ap.add_argument("--warmup-tokens", type=int, default=8,
                    help="tokens of the warm-up load before the measured one")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--out", default=os.path.join(ROOT, "build/scaling_sweep.csv"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "build/scaling_sweep.png"))
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    ensure_model(os.path.join(args.build, "cli/epx"), args.model, env)
    rows = sweep(args, env)
    if not rows:
        sys.exit("no configuration to run")
    write_csv(rows, args.out)
    plot(rows, args.plot)


if __name__ == "__main__":
    main()
