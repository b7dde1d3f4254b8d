#!/usr/bin/env python3
"""An analytic model of one decode step of an epx expert-parallel cluster.

epx's topology: a coordinator (rank 0) runs embedding, attention, the router, lm_head and
sampling for the whole batch and holds the KV cache; W workers (ranks 1..W) hold the experts
(round-robin or a placement file; replicas share their expert's rows in turn). Every layer the
coordinator sends each routed row to a worker holding its expert (dispatch: the counts, then the
rows), the workers run their experts, and the rows come back (combine). epx does not overlap the
exchange with compute: a layer is attention + router + dispatch + experts + combine, in that
order (`--overlap` models the ping-pong of two micro-batches that epx does not have yet).

--validate [--epx PATH] measures this machine's parts with short commands, predicts every
configuration of the sweep (bench/scaling_sweep.py, imported), runs the sweep and prints
predicted next to measured, with the worst relative error on the last line:
  - `epx bench decode --stats` on one process, per batch size (16 warm-up + 64 timed steps, so
    that the first touches of the mmap'd weights weigh little): ms/step, attention and MoE
    microseconds per layer, distinct experts hit, tokens per expert (the router's preference);
    an expert's time t(r) = weights / bandwidth + r rows x FLOPs / FLOP rate, fitted on the
    smallest and largest batch (weights only when the row term is lost in the noise);
  - two `epx bench decode` at once: the throughput two processes get together, relative to one
    (C_eff; the ranks of a cluster on this host share it);
  - one-process `epx serve` driven like the sweep (its harness, W = 0): the base step of a
    configuration (gRPC, sampling, the client on the same cores included) and its MoE time;
  - mpi: `mpirun -np 1+W comm_alltoall_bench` at three sizes: latency and bandwidth;
  - gloo: the per-layer dispatch + combine of `epx generate --workers W --data-plane gloo` on
    the tiny model (hidden 128: its compute is negligible), median of 3 runs.
    comm_alltoall_bench's gloo median is not used: on this 2-core VM it sits at a 4 ms
    scheduler wake-up that the engine's exchanges do not see (bench/README.md).
  A configuration's step = the one-process server's step - L x its MoE time + L x (the
  coordinator's share of the MoE layer + exchange + expert phase). With more ranks than
  effective cores an exchange's fixed cost is stretched by (1 + W) / C_eff (a message waits
  for a rank to be scheduled while others compute).
  The cluster's expert phase is a Monte Carlo over routing (tokens drawn with the measured
  per-layer expert preference, rows dealt to replicas as epx deals them): each worker's work is
  the sum of its hit experts' t(r); the workers that have work share C_eff cores (processor
  sharing, at most one core each), so compute of ranks sharing cores adds up. Waiting ranks
  (MPI polls, yielding when oversubscribed; gloo blocks) are counted as taking no core.

--predict (the default) applies the same step model to Mixtral-8x7B and 8x22B on N nodes of 8
GPUs (H100, H200; NVLink within a node, InfiniBand NDR or 100 Gb/s Ethernet between nodes):
GPU 0 is the coordinator and holds no expert, GPUs 1..8N-1 are the workers with epx's
round-robin placement. Tables (markdown), CSV and a chart go to --out-dir, next to the
published dispatch/combine figures they can be set against.

  python3 bench/cluster_model.py --validate            # this machine, about 2 minutes
  python3 bench/cluster_model.py --predict --out-dir build/cluster_model
"""
import argparse
import csv
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scaling_sweep  # noqa: E402  (the sweep's harness: one cluster per configuration)

ROOT = scaling_sweep.ROOT
TINY = os.path.join(ROOT, "tests/data/tiny-mixtral")


# ---- placement and routing ------------------------------------------------------------------

def round_robin(experts, workers, copies=1):
    """epx's round-robin placement (common/placement.cc): {expert: [worker ranks]}."""
    replicas = {e: [] for e in range(experts)}
    if workers < experts * copies:
        for e in range(experts):
            for j in range(copies):
                replicas[e].append(1 + (e * copies + j) % workers)
    else:
        for w in range(1, workers + 1):
            replicas[(w - 1) % experts].append(w)
    return {e: sorted(set(r)) for e, r in replicas.items()}


def placement_of(name, experts, workers):
    """The replicas of a sweep placement name: round-robin, replicas=N or a JSON file."""
    if name == "round-robin":
        return round_robin(experts, workers)
    if name.startswith("replicas="):
        return round_robin(experts, workers, int(name.split("=", 1)[1]))
    with open(name) as f:
        return {int(e): sorted(r) for e, r in json.load(f)["experts"].items()}


def draw_topk(rng, weights, k):
    """k distinct experts, drawn one after another in proportion to `weights`."""
    chosen, w = [], list(weights)
    for _ in range(k):
        total = sum(w)
        x, acc = rng.random() * total, 0.0
        for e, we in enumerate(w):
            acc += we
            if we > 0 and x <= acc:
                break
        chosen.append(e)
        w[e] = 0.0
    return chosen


def routed_steps(batch, k, prefs, placement, steps, seed=1):
    """Yields, per simulated (step, layer), {worker: {expert: rows}}: B tokens routed to top-k
    experts with the layer's preference, a replicated expert's rows dealt to its replicas in
    turn starting at a replica that rotates with step and layer (coordinator/
    distributed_expert_executor.cc)."""
    rng = random.Random(seed)
    for step in range(steps):
        for layer, pref in enumerate(prefs):
            seen = {}
            held = {}
            for _ in range(batch):
                for e in draw_topk(rng, pref, k):
                    reps = placement[e]
                    w = reps[(seen.get(e, 0) + step + layer) % len(reps)]
                    seen[e] = seen.get(e, 0) + 1
                    held.setdefault(w, {}).setdefault(e, 0)
                    held[w][e] += 1
            yield held


def makespan(works, cores):
    """Completion time of independent works sharing `cores` (processor sharing, at most one
    core each): the works of ranks that share cores add up."""
    works = sorted(w for w in works if w > 0)
    t = done = 0.0
    n = len(works)
    for i, w in enumerate(works):
        rate = min(1.0, cores / (n - i))
        t += (w - done) / rate
        done = w
    return t


# ---- this machine: measure the parts --------------------------------------------------------

def bench_decode(epx, model, batch, steps, env, warmup=8):
    """One `epx bench decode --stats` run on one process: ms/step of the timed steps, the steps
    the stats cover, per-layer attention and MoE means and tokens per expert."""
    proc = subprocess.run([epx, "bench", "decode", "--model", model, "--batch-sizes", str(batch),
                           "--context", "1", "--warmup", str(warmup), "--steps", str(steps),
                           "--stats"], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        sys.exit(f"epx bench decode failed\n{proc.stdout}\n{proc.stderr}")
    text = proc.stdout + proc.stderr
    row = re.search(rf"^\s+{batch}\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s", text, re.M)
    covered = re.search(r"epx stats: (\d+) steps", text)
    layers = []
    for line in text.splitlines():
        f = line.split()
        if len(f) > 6 and f[0].isdigit() and f[3] == "-" and f[4] == "(in":
            layers.append({"attention_us": float(f[1]), "moe_us": float(f[2]),
                           "tokens": [int(x) for x in f[7:]]})
    if not row or not covered or not layers:
        sys.exit("unexpected `epx bench decode --stats` output\n" + text)
    return {"ms_per_step": float(row.group(1)), "experts_hit": float(row.group(3)),
            "steps": int(covered.group(1)), "layers": layers}


def measure_single(epx, model, batch, env, warmup=16, steps=64):
    """One process at one batch size (one run; a long warm-up so that the first touches of the
    mmap'd experts weigh little in the per-step means): ms/step of the timed steps, attention
    and MoE us per layer per step, experts hit per layer, and each layer's tokens per expert.
    (Differencing two runs of different length cancels the first touches exactly but doubles
    the run-to-run noise of this VM, which is larger.)"""
    b = bench_decode(epx, model, batch, steps, env, warmup)
    mean = lambda key: sum(layer[key] for layer in b["layers"]) / len(b["layers"])
    return {"ms_per_step": b["ms_per_step"], "experts_hit": b["experts_hit"],
            "attention_us": mean("attention_us"), "moe_us": mean("moe_us"),
            "prefs": [[max(t, 1) for t in layer["tokens"]] for layer in b["layers"]]}


def measure_concurrency(epx, model, batch, env, steps=48):
    """C_eff: the throughput of two one-process decodes run at once, relative to one alone."""
    cmd = [epx, "bench", "decode", "--model", model, "--batch-sizes", str(batch), "--context",
           "1", "--warmup", "8", "--steps", str(steps)]
    alone = _decode_ms(subprocess.run(cmd, capture_output=True, text=True, env=env), batch)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=env) for _ in range(2)]
    together = [_decode_ms(subprocess.CompletedProcess(p.args, p.wait(), p.stdout.read(), ""),
                           batch) for p in procs]
    return min(2.0, 2 * alone / (sum(together) / 2))


def _decode_ms(proc, batch):
    m = re.search(rf"^\s+{batch}\s+([0-9.]+)\s", proc.stdout, re.M)
    if proc.returncode != 0 or not m:
        sys.exit("epx bench decode failed\n" + proc.stdout + (proc.stderr or ""))
    return float(m.group(1))


def fit_expert(single, cfg):
    """t(r) = t0 + r * t_row (us) of one expert on one core from the one-process MoE time at the
    smallest and largest batch: moe(B) = experts_hit(B) * t0 + k * B * t_row."""
    k = cfg["num_experts_per_tok"]
    (b0, s0), (b1, s1) = min(single.items()), max(single.items())
    h0, h1 = s0["experts_hit"], s1["experts_hit"]
    det = h0 * k * b1 - h1 * k * b0
    t0 = (s0["moe_us"] * k * b1 - s1["moe_us"] * k * b0) / det
    t_row = (h0 * s1["moe_us"] - h1 * s0["moe_us"]) / det
    if t0 <= 0 or t_row < 0:  # noisy points: all of it as weight reads
        t0, t_row = s0["moe_us"] / h0, 0.0
    return t0, t_row


def fit_line(points):
    """Least-squares (intercept, slope) of (x, y) points."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, max(slope, 0.0)


def measure_mpi(bench, workers, hidden, env):
    """{W: (latency us, us per byte)} of epx's MPI communicator: comm_alltoall_bench round trips
    at 1, 8 and 64 fp32 rows per worker, fitted to latency + bytes x cost."""
    sizes = [hidden * 4 * r for r in (1, 8, 64)]
    out = {}
    for w in workers:
        times = scaling_sweep.alltoall(bench, 1 + w, sizes, env)
        out[w] = fit_line([(2 * s * w, times[s]["mpi"]) for s in sizes])
    return out


def free_port():
    """A TCP port nothing listens on now (the coordinator binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_gloo(epx, workers, env, tokens=96, repeats=3):
    """{W: us per layer} of a gloo exchange (dispatch + combine) inside epx: a launcher-free
    `epx generate --workers W --data-plane gloo --stats` of the tiny model, batch 1, mean over
    layers 1.. (layer 0 also carries the first touches); the median of `repeats` runs."""
    runs = {w: [] for w in workers}
    for _ in range(repeats):
        for w, us in _gloo_once(epx, workers, env, tokens).items():
            runs[w].append(us)
    return {w: sorted(v)[len(v) // 2] for w, v in runs.items()}


def _gloo_once(epx, workers, env, tokens):
    out = {}
    for w in workers:
        port = free_port()
        coord = subprocess.Popen(
            [epx, "generate", "--model", TINY, "--workers", str(w), "--listen",
             f"127.0.0.1:{port}", "--data-plane", "gloo", "--stats", "--prompt",
             "The experts of every layer", "--max-tokens", str(tokens), "--ignore-eos"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        peers = [subprocess.Popen([epx, "worker", "--model", TINY, "--coordinator",
                                   f"127.0.0.1:{port}", "--data-plane", "gloo"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
                 for _ in range(w)]
        try:
            text, _ = coord.communicate(timeout=300)
        finally:
            for p in peers:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        rows = []
        for line in text.splitlines():
            f = line.split()
            if len(f) > 6 and f[0].isdigit() and f[3] != "-":
                rows.append(float(f[3]) + float(f[5]))
        if coord.returncode != 0 or not rows:
            sys.exit("epx generate --workers (gloo, tiny model) failed\n" + text)
        out[w] = sum(rows[1:]) / len(rows[1:]) if len(rows) > 1 else rows[0]
    return out


def measure_parts(args, env, cfg):
    """Every part the validation model takes from this machine, measured with short runs."""
    epx = os.path.join(args.build, "cli/epx")
    bench = os.path.join(args.build, "bench/comm_alltoall_bench")
    batches = sorted(set(args.batch_sizes))
    parts = {"single": {}, "serve_overhead_ms": {}, "c_eff": {}, "served": {}}
    for b in batches:
        s = measure_single(epx, args.model, b, env)
        parts["single"][b] = s
        print(f"part: one process, batch {b}: {s['ms_per_step']:.2f} ms/step, attention "
              f"{s['attention_us']:.0f} us/layer, MoE {s['moe_us']:.0f} us/layer, "
              f"{s['experts_hit']:.2f} experts hit", flush=True)
        parts["c_eff"][b] = measure_concurrency(epx, args.model, b, env)
        print(f"part: two processes at once, batch {b}: C_eff = {parts['c_eff'][b]:.2f}",
              flush=True)
        served = scaling_sweep.run_config(args.build, args.model, "local", 0, b, "round-robin",
                                          args.tokens, args.warmup_tokens, env)
        parts["serve_overhead_ms"][b] = served["ms_per_step"] - s["ms_per_step"]
        parts["served"][b] = {"ms_per_step": served["ms_per_step"], "moe_us": served["moe_us"],
                              "attention_us": served["attention_us"]}
        print(f"part: one-process serve, batch {b}: {served['ms_per_step']:.2f} ms/step "
              f"(+{parts['serve_overhead_ms'][b]:.2f} ms over bench decode)", flush=True)
    t0, t_row = fit_expert(parts["single"], cfg)
    parts["t0_us"], parts["t_row_us"] = t0, t_row
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    flop = (f"{6 * H * I / t_row / 1e3:.1f} GFLOP/s per row" if t_row else
            "the per-row term did not resolve above the noise: weights only")
    print(f"part: expert t(r) = {t0:.0f} + {t_row:.1f} r us (weights read at "
          f"{3 * H * I * 2 / t0 / 1e3:.1f} GB/s; {flop})", flush=True)
    parts["mpi"] = measure_mpi(bench, args.workers, H, env) if "mpi" in args.data_planes else {}
    for w, (lat, cost) in parts["mpi"].items():
        print(f"part: mpi, 1+{w} ranks: round trip {lat:.1f} us + "
              f"{1e-3 / cost if cost else float('inf'):.2f} GB/s", flush=True)
    parts["gloo"] = measure_gloo(epx, args.workers, env) if "gloo" in args.data_planes else {}
    for w, us in parts["gloo"].items():
        print(f"part: gloo, 1+{w} ranks: {us:.0f} us per layer (tiny model, batch 1)", flush=True)
    return parts


# ---- this machine: the step model -----------------------------------------------------------

def predict_config(parts, cfg, data_plane, workers, batch, placement_name, overlap=False,
                   steps=150):
    """Predicted ms/step and per-layer parts (us) of one sweep configuration."""
    L, k, E, H = (cfg["num_hidden_layers"], cfg["num_experts_per_tok"],
                  cfg["num_local_experts"], cfg["hidden_size"])
    s = parts["single"][batch]
    t = lambda rows: parts["t0_us"] + rows * parts["t_row_us"]
    placement = placement_of(placement_name, E, workers)
    expert = local = rows_per_worker = 0.0
    n = 0
    for held in routed_steps(batch, k, s["prefs"], placement, steps):
        works = [sum(t(r) for r in ex.values()) for ex in held.values()]
        expert += makespan(works, parts["c_eff"][batch])
        rows_per_worker += sum(sum(ex.values()) for ex in held.values()) / len(held)
        n += 1
    expert, rows_per_worker = expert / n, rows_per_worker / n
    # The coordinator's share of the MoE layer (router, permutation, combine): what one
    # process spends beyond its experts' t(r).
    for held in routed_steps(batch, k, s["prefs"], {e: [1] for e in range(E)}, steps):
        local += sum(t(r) for r in held[1].values())
    coordinator_moe = max(0.0, s["moe_us"] - local / n)
    bytes_per_worker = rows_per_worker * H * 4
    # With more ranks than (effective) cores, a message waits for its receiver or sender to be
    # scheduled while other ranks compute: the fixed cost is stretched by ranks / cores.
    stretch = max(1.0, (1 + workers) / parts["c_eff"][batch])
    if data_plane == "mpi":
        lat, cost = parts["mpi"][workers]
        exchange = lat * 1.5 * stretch + 2 * bytes_per_worker * workers * cost  # + counts
    else:
        cost = min((c for _, c in parts["mpi"].values()), default=0.0)
        exchange = parts["gloo"][workers] * stretch + 2 * bytes_per_worker * workers * cost
    layer_moe = coordinator_moe + (max(exchange, expert) if overlap else exchange + expert)
    # The base: the one-process server's step at this batch (gRPC, sampling and the client on
    # the same cores included), less its own MoE layers, plus the cluster's.
    served = parts["served"][batch]
    step_ms = served["ms_per_step"] + L * (layer_moe - served["moe_us"]) / 1e3
    return {"ms_per_step": step_ms, "attention_us": served["attention_us"], "expert_us": expert,
            "exchange_us": exchange, "moe_us": layer_moe}


def validate(args, env):
    """Measure the parts, predict the sweep, run it, print and write both side by side."""
    started = time.monotonic()
    cfg = scaling_sweep.config_of(args.model)
    if len(set(args.batch_sizes)) < 2:
        sys.exit("--validate needs two batch sizes or more (t(r) is fitted on two)")
    parts = measure_parts(args, env, cfg)
    configs = scaling_sweep.configurations(args)
    predicted = {c: predict_config(parts, cfg, c[0], c[2], c[3], c[1], args.overlap)
                 for c in configs}
    measured = scaling_sweep.sweep(args, env, configs)
    rows = []
    for (dp, placement, w, b), m in zip(configs, measured):
        p = predicted[(dp, placement, w, b)]
        err = abs(p["ms_per_step"] - m["ms_per_step"]) / m["ms_per_step"]
        rows.append({"data_plane": dp, "workers": w, "batch": b, "placement": placement,
                     "predicted_ms": round(p["ms_per_step"], 2),
                     "measured_ms": round(m["ms_per_step"], 2), "relative_error": round(err, 4),
                     "predicted_tokens_per_s": round(b / p["ms_per_step"] * 1e3, 1),
                     "measured_tokens_per_s": round(m["decode_tokens_per_s"], 1),
                     "predicted_expert_us": round(p["expert_us"]),
                     "measured_expert_us": round(m["expert_us"]),
                     "predicted_exchange_us": round(p["exchange_us"]),
                     "measured_dispatch_combine_us": round(m["dispatch_us"] + m["combine_us"]),
                     "predicted_moe_us": round(p["moe_us"]), "measured_moe_us": round(m["moe_us"]),
                     "raw_alltoall_us": round(m["raw_alltoall_us"], 1)})
    os.makedirs(args.out_dir, exist_ok=True)
    scaling_sweep.write_csv(measured, os.path.join(args.out_dir, "sweep.csv"))
    scaling_sweep.plot(measured, os.path.join(args.out_dir, "sweep.png"))
    scaling_sweep.write_csv(rows, os.path.join(args.out_dir, "validate.csv"))
    with open(os.path.join(args.out_dir, "parts.json"), "w") as f:
        json.dump({k: v for k, v in parts.items() if k != "single"} |
                  {"single": {b: {k: v for k, v in s.items() if k != "prefs"}
                              for b, s in parts["single"].items()}}, f, indent=1)
    lines = ["| data plane | W | batch | placement | predicted ms | measured ms | error | "
             "expert us pred / meas | exchange us pred / dispatch+combine meas | "
             "MoE us pred / meas |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['data_plane']} | {r['workers']} | {r['batch']} | {r['placement']} | "
                     f"{r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | "
                     f"{100 * r['relative_error']:.1f}% | {r['predicted_expert_us']} / "
                     f"{r['measured_expert_us']} | {r['predicted_exchange_us']} / "
                     f"{r['measured_dispatch_combine_us']} | {r['predicted_moe_us']} / "
                     f"{r['measured_moe_us']} |")
    worst = max(rows, key=lambda r: r["relative_error"])
    lines += ["", f"validate took {time.monotonic() - started:.0f} s",
              f"worst relative error: {100 * worst['relative_error']:.1f}% (config "
              f"{worst['data_plane']}, {worst['workers']} workers, batch {worst['batch']}, "
              f"{worst['placement']})"]
    text = "\n".join(lines)
    with open(os.path.join(args.out_dir, "validate.md"), "w") as f:
        f.write(text + "\n")
    print(text)


# ---- Mixtral on GPU nodes -------------------------------------------------------------------

MODELS = {
    # cli/make_model.cc presets mixtral-8x7b and mixtral-8x22b
    "Mixtral-8x7B": dict(hidden=4096, inter=14336, layers=32, experts=8, k=2, heads=32, kv=8,
                         head_dim=128, vocab=32000),
    "Mixtral-8x22B": dict(hidden=6144, inter=16384, layers=56, experts=8, k=2, heads=48, kv=8,
                          head_dim=128, vocab=32768),
}
GPUS = {
    # HBM bandwidth (GB/s), dense bf16 FLOP/s and memory (GB). H100 SXM: about 3.0 TB/s copy
    # and 798 TFLOP/s measured (datasheet 3.35 TB/s, 989 TFLOP/s, 80 GB); H200: about 4.3 TB/s
    # measured (datasheet 4.8 TB/s, 141 GB), compute taken equal to H100's (the same GH100).
    "H100": dict(hbm=3000.0, flops=798e12, memory=80.0),
    "H200": dict(hbm=4300.0, flops=798e12, memory=141.0),
}
NVLINK_GBPS = 450.0  # NVLink 4: 900 GB/s per GPU, 450 per direction
NETWORKS = {"IB NDR 400G": 50.0, "Ethernet 100G": 12.5}  # GB/s per GPU, one direction
# One exchange's fixed cost (us): the published dispatch / combine of one token per GPU
# (pplx-kernels README, Perplexity, 2025): NVLink EP8 41.6 / 41.7; IBGDA EP16 102.7 / 62.7.
# No published figure for 100 Gb/s Ethernet: InfiniBand's is used (a floor).
LATENCY_US = {"nvlink": (41.6, 41.7), "network": (102.7, 62.7)}
CONTEXT = 1024  # KV tokens each sequence attends to per step
NODES = (1, 2, 4, 8)
BATCHES = (1, 8, 64, 256)


def gpu_step(model, gpu, nodes, batch, network, overlap=False, steps=60):
    """One decode step of Mixtral on `nodes` x 8 GPUs in epx's topology: a dict with step us,
    per-layer dispatch / combine / expert / attention us and the memory each role needs."""
    m, g = MODELS[model], GPUS[gpu]
    H, I, L, E, k = m["hidden"], m["inter"], m["layers"], m["experts"], m["k"]
    q, kv = m["heads"] * m["head_dim"], m["kv"] * m["head_dim"]
    bw, flops = g["hbm"] * 1e3, g["flops"] / 1e6  # bytes and FLOPs per us
    workers = 8 * nodes - 1
    # The coordinator, per layer: q/k/v/o and the router read once, the KV cache of B sequences.
    attn_w = H * (q + 2 * kv) + q * H + E * H
    attention = max((2 * attn_w + batch * CONTEXT * 2 * kv * 2) / bw,
                    (2 * batch * attn_w + 4 * batch * CONTEXT * q) / flops)
    lm_head = max(2 * H * m["vocab"] / bw, 2 * batch * H * m["vocab"] / flops)
    # The workers: rows by uniform routing over epx's round-robin placement; a worker reads each
    # hit expert once and multiplies its rows (per-expert GEMMs, max of bytes and FLOPs).
    placement = round_robin(E, workers)
    ebytes, eflops = 3 * H * I * 2, 6 * H * I
    expert = remote_rows = 0.0
    n = 0
    for held in routed_steps(batch, k, [[1.0] * E], placement, steps):
        expert += max(sum(max(ebytes / bw, r * eflops / flops) for r in ex.values())
                      for ex in held.values())
        remote_rows += sum(sum(ex.values()) for w, ex in held.items() if w // 8 > 0)
        n += 1
    expert, remote_rows = expert / n, remote_rows / n
    row_bytes = H * 2  # bf16 rows on the wire
    local_b, remote_b = (batch * k - remote_rows) * row_bytes, remote_rows * row_bytes
    net = NETWORKS[network]
    lat = LATENCY_US["network" if nodes > 1 else "nvlink"]
    move = max(local_b / (NVLINK_GBPS * 1e3), remote_b / (net * 1e3))
    dispatch, combine = lat[0] + move, lat[1] + move
    layer = (max(attention, dispatch + combine, expert) if overlap
             else attention + dispatch + expert + combine)
    held_max = max(sum(1 for r in placement.values() if w in r) for w in range(1, workers + 1))
    mem_worker = held_max * L * ebytes / 1e9
    mem_coord = (L * 2 * attn_w + 2 * 2 * H * m["vocab"] + batch * CONTEXT * L * 2 * kv * 2) / 1e9
    return {"step_us": L * layer + lm_head, "dispatch_us": dispatch, "combine_us": combine,
            "expert_us": expert, "attention_us": attention,
            "fits": mem_worker <= g["memory"] and mem_coord <= g["memory"],
            "mem_worker_gb": mem_worker, "mem_coordinator_gb": mem_coord}


def a2a_model(tokens, topk, hidden, dispatch_bytes, combine_bytes, ranks, gbps, lat):
    """The exchange term at a published all-to-all setting: every rank sends `tokens` x topk rows
    to the ranks of their experts over its NIC (all of them remote but 1/ranks) and gets them
    back: (dispatch us, combine us)."""
    remote = (ranks - 1) / ranks
    d = lat[0] + tokens * topk * hidden * dispatch_bytes * remote / (gbps * 1e3)
    c = lat[1] + tokens * topk * hidden * combine_bytes * remote / (gbps * 1e3)
    return d, c


# Published dispatch / combine figures (us per layer), each with its source and setting.
DEEPEP = ("DeepEP V1 low-latency kernels, README performance table (now docs/legacy.md), "
          "DeepSeek-AI, 2025", "H800, CX7 InfiniBand 400 Gb/s per GPU, 128 tokens per rank, "
          "hidden 7168, top-8, FP8 dispatch, BF16 combine",
          [(8, 77, 114), (16, 118, 195), (32, 155, 273), (64, 173, 314), (128, 192, 369),
           (256, 194, 360)])
PPLX_1 = ("pplx-kernels README, benchmark results, Perplexity AI, 2025", "1 token per GPU; GPU "
          "and model shape not stated", [("EP8 NVLink", 41.6, 41.7), ("EP16 IBGDA", 102.7, 62.7),
                                         ("EP32 IBGDA", 115.7, 55.4), ("EP64 IBGDA", 121.0, 58.6),
                                         ("EP128 IBGDA", 125.9, 63.2)])
PPLX_128 = ("pplx-kernels README, benchmark results, Perplexity AI, 2025", "128 tokens per GPU; "
            "GPU and model shape not stated", [("EP8 NVLink", 83.6, 102.3),
                                               ("EP16 IBGDA", 622.4, 668.1),
                                               ("EP32 IBGDA", 427.6, 481.4),
                                               ("EP64 IBGDA", 317.4, 529.9),
                                               ("EP128 IBGDA", 307.7, 593.9)])
TRITON_DIST = ("Triton-distributed README, ByteDance Seed, 2025", "32 H800, 128 tokens per rank, "
               "top-8, hidden 7168, FP8: low-latency all-to-all 137 us (DeepEP 182 us in the "
               "same sentence)")
MEGASCALE = ("MegaScale-Infer: Serving Mixture-of-Experts at Scale with Disaggregated Expert "
             "Parallelism, ByteDance Seed and Peking University, 2025 (arXiv 2504.02263)",
             "abstract: up to 1.90x higher per-GPU decoding throughput than state-of-the-art "
             "solutions; no per-layer dispatch time or tokens/s found in what could be read here")


def predict(args):
    """Tables, CSV and chart of Mixtral on N x 8 GPUs, next to the published figures."""
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for model in MODELS:
        for gpu in GPUS:
            for net in NETWORKS:
                for nodes in NODES:
                    if nodes == 1 and net != next(iter(NETWORKS)):
                        continue  # one node: NVLink only, the network does not enter
                    for batch in BATCHES:
                        r = gpu_step(model, gpu, nodes, batch, net, args.overlap)
                        rows.append({"model": model, "gpu": gpu,
                                     "network": "NVLink only" if nodes == 1 else net,
                                     "nodes": nodes, "batch": batch,
                                     "tokens_per_s": round(batch / r["step_us"] * 1e6, 1),
                                     "step_ms": round(r["step_us"] / 1e3, 3),
                                     "dispatch_us": round(r["dispatch_us"], 1),
                                     "combine_us": round(r["combine_us"], 1),
                                     "expert_us": round(r["expert_us"], 1),
                                     "attention_us": round(r["attention_us"], 1),
                                     "fits": r["fits"],
                                     "worker_gb": round(r["mem_worker_gb"], 1),
                                     "coordinator_gb": round(r["mem_coordinator_gb"], 1)})
    mode = "with ping-pong overlap (epx has none)" if args.overlap else "no overlap (as epx)"
    lines = [f"# Predicted decode of Mixtral on N nodes of 8 GPUs, epx topology, {mode}", "",
             "GPU 0: the coordinator (attention, router, lm_head, KV cache of every sequence; "
             f"{CONTEXT} tokens of context each), no expert; GPUs 1..8N-1: the workers, epx's "
             "round-robin placement (7 workers: worker 1 holds experts 0 and 7; 15 or more: "
             "replicas, rows dealt in turn); uniform routing; bf16 weights and rows. H100 3.0 "
             "TB/s / 798 TFLOP/s, H200 4.3 TB/s / 798 TFLOP/s; NVLink 450 GB/s per direction; "
             "InfiniBand NDR 50 GB/s or Ethernet 100G 12.5 GB/s per GPU (the coordinator's one "
             "NIC carries every remote row); exchange fixed costs from pplx-kernels (NVLink "
             "41.6/41.7 us, network 102.7/62.7 us). Each cell: tokens/s, then dispatch us per "
             "layer; * = the slowest role does not fit the GPU's memory.", ""]
    for model in MODELS:
        lines += [f"## {model}", "", "| GPU | network | nodes | " +
                  " | ".join(f"B={b} tok/s (dispatch us)" for b in BATCHES) + " |",
                  "|---|---|---:|" + "---:|" * len(BATCHES)]
        keys = sorted({(r["gpu"], r["network"], r["nodes"]) for r in rows if r["model"] == model},
                      key=lambda x: (x[0], x[2] > 1, x[1], x[2]))
        for gpu, net, nodes in keys:
            cells = []
            for b in BATCHES:
                r = next(r for r in rows if (r["model"], r["gpu"], r["network"], r["nodes"],
                                             r["batch"]) == (model, gpu, net, nodes, b))
                cells.append(f"{r['tokens_per_s']:,.0f} ({r['dispatch_us']:.0f})"
                             + ("" if r["fits"] else "*"))
            lines.append(f"| {gpu} | {net} | {nodes} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Published dispatch / combine times, and this model's exchange at their setting",
              "", "The model's exchange term (fixed cost + bytes / link bandwidth) evaluated at "
              "each published setting; the published systems exchange among all ranks (each "
              "sends its own tokens), epx from one coordinator to its workers.", "",
              "| source | setting | EP | published dispatch / combine us | model us |",
              "|---|---|---|---:|---:|"]
    src, setting, pts = DEEPEP
    for ep, d, c in pts:
        md, mc = a2a_model(128, 8, 7168, 1 + 4 / 128, 2, ep, 50.0, LATENCY_US["network"])
        lines.append(f"| {src} | {setting} | {ep} | {d} / {c} | {md:.0f} / {mc:.0f} |")
    for src, setting, pts in (PPLX_1, PPLX_128):
        for ep, d, c in pts:
            lines.append(f"| {src} | {setting} | {ep} | {d} / {c} | shape not stated |")
    md, mc = a2a_model(128, 8, 7168, 1 + 4 / 128, 2, 32, 50.0, LATENCY_US["network"])
    lines.append(f"| {TRITON_DIST[0]} | {TRITON_DIST[1]} | 32 | 137 (dispatch + combine? not "
                 f"stated) | {md:.0f} / {mc:.0f} |")
    lines += [f"| {MEGASCALE[0]} | {MEGASCALE[1]} | - | - | - |", "",
              "No published Mixtral-8x7B or 8x22B decode tokens/s with a configuration like "
              "these (expert parallel over N x 8 GPUs) was found: the tokens/s columns have no "
              "published peer here. None of the GPU predictions has been checked against an "
              "epx run on a GPU.", ""]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out_dir, "predict.md"), "w") as f:
        f.write(text)
    scaling_sweep.write_csv(rows, os.path.join(args.out_dir, "predict.csv"))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -r bench/requirements.txt): no chart")
        return
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for col, model in enumerate(MODELS):
        for gpu in GPUS:
            for net in NETWORKS:
                for batch, marker in zip(BATCHES, "o^sD"):
                    pts = sorted((r["nodes"], r) for r in rows
                                 if (r["model"], r["gpu"], r["batch"]) == (model, gpu, batch)
                                 and r["network"] in (net, "NVLink only"))
                    style = "-" if net.startswith("IB") else "--"
                    label = f"{gpu} {net.split()[0]} B={batch}"
                    axes[0][col].plot([n for n, _ in pts], [r["tokens_per_s"] for _, r in pts],
                                      marker + style, label=label, markersize=4)
                    axes[1][col].plot([n for n, _ in pts], [r["dispatch_us"] for _, r in pts],
                                      marker + style, label=label, markersize=4)
        for row, ylabel in enumerate(("decode tokens/s (predicted)",
                                      "dispatch us per layer (predicted)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(NODES)
            ax.set_xticklabels([str(n) for n in NODES])
            ax.set_xlabel("nodes of 8 GPUs")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model}, epx topology, {'overlap' if args.overlap else 'no overlap'}")
            ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    path = os.path.join(args.out_dir, "predict.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scaling_sweep.add_arguments(ap)
    ap.add_argument("--validate", action="store_true",
                    help="measure this machine's parts, predict the sweep, run it, compare")
    ap.add_argument("--predict", action="store_true", help="Mixtral on GPU nodes (the default)")
    ap.add_argument("--overlap", action="store_true",
                    help="model the exchange overlapped with compute (epx does not do it)")
    ap.add_argument("--epx", help="the epx binary (default: BUILD/cli/epx); its build directory "
                                  "also gives bench/comm_alltoall_bench")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "build/cluster_model"))
    args = ap.parse_args()
    if args.epx:
        args.build = os.path.dirname(os.path.dirname(os.path.abspath(args.epx)))
    if args.validate:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        scaling_sweep.ensure_model(os.path.join(args.build, "cli/epx"), args.model, env)
        validate(args, env)
    if args.predict or not args.validate:
        predict(args)


if __name__ == "__main__":
    main()
