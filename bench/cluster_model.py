#!/usr/bin/env python3
"""An analytic model of one decode step of an epx expert-parallel cluster.

epx's topology: a coordinator runs attention, the router, the sampler and lm_head for the whole
batch; the experts live on W workers; every layer the coordinator sends each routed row to the
worker holding its expert (dispatch), the workers compute, and the rows come back (combine).
epx does not overlap the exchange with compute, so a step is the sum of its parts:

  step(B, W) = other(B) + L * [ expert(B, W) + exchange(B, W) ]
    other(B)       attention, norms, router, lm_head, sampling: the coordinator's own work
    expert(B, W)   the slowest worker's expert time: at decode batch sizes an expert's cost is
                   reading its weights, so a worker's time grows with the distinct experts its
                   rows hit; the expected maximum over workers comes from routing B tokens to
                   top-k of E experts uniformly over the placement (Monte Carlo)
    exchange(B, W) latency + 2 * B * k * hidden * element bytes / bandwidth (the messages to
                   the W workers go out together)
  On a machine with fewer cores C than ranks (as CI's 2 cores under 1 + W ranks), the ranks
  share the cores: the workers' expert time is stretched by max(1, W / C) and the exchange's
  latency (a receiver waits to be scheduled) by max(1, (1 + W) / C).

--validate measures this machine's parts on the same model and harness as the sweep
(bench/scaling_sweep.py): other(B) and the local MoE time from one process; the exchange's
latency and bandwidth per data plane from the 1-worker cluster at two batch sizes. It then
predicts every other configuration of the sweep, runs them, and prints predicted next to
measured, with the worst relative error last. --predict (the default) applies the same model to
Mixtral-8x7B and 8x22B on N nodes of 8 GPUs with datasheet and stated figures.

  python3 bench/cluster_model.py --validate            # this machine, minutes
  python3 bench/cluster_model.py --predict --out-dir build/cluster_model
"""
import argparse
import csv
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scaling_sweep  # noqa: E402  (the sweep's harness: one cluster per configuration)

ROOT = scaling_sweep.ROOT


# ---- routing: the slowest worker's share of the expert work --------------------------------

def placement_of(experts, workers, replicas):
    """Round-robin: expert e on workers (e + r * E) % W + 1 for r < replicas (ranks 1..W)."""
    return {e: sorted({(e + r * experts) % workers + 1 for r in range(replicas)})
            for e in range(experts)}


def slowest_share(batch, top_k, experts, placement, trials=4000, seed=1):
    """E[max over workers of the distinct experts its rows hit] / E[distinct experts hit]:
    the slowest worker's expert time relative to one process holding every expert. A
    replicated expert's rows are dealt to its replicas in turn (as epx does)."""
    rng = random.Random(seed)
    worst = total = 0
    for _ in range(trials):
        turn = {e: 0 for e in range(experts)}
        held = {}
        hit = set()
        for _ in range(batch):
            for e in rng.sample(range(experts), top_k):
                ranks = placement[e]
                w = ranks[turn[e] % len(ranks)]
                turn[e] += 1
                held.setdefault(w, set()).add(e)
                hit.add(e)
        worst += max(len(s) for s in held.values())
        total += len(hit)
    return worst / total


# ---- this machine: measure, predict, compare ------------------------------------------------

def step_model(parts, data_plane, workers, batch, placement_name, cfg):
    """Predicted step time (ms) of one configuration from the measured parts."""
    layers, k, experts = cfg["num_hidden_layers"], cfg["num_experts_per_tok"], \
        cfg["num_local_experts"]
    replicas = int(placement_name.split("=", 1)[1]) if placement_name.startswith("replicas=") else 1
    single = parts["single"][batch]
    share = slowest_share(batch, k, experts, placement_of(experts, workers, replicas))
    latency_us, gbps = parts["exchange"][data_plane]
    rows_bytes = 2 * batch * k * cfg["hidden_size"] * 4  # fp32 rows out and back
    cores = parts["cores"]
    # The coordinator's messages to its workers go out together: one latency per exchange,
    # stretched when the ranks outnumber the cores (a receiver waits to be scheduled).
    exchange_us = latency_us * max(1, (1 + workers) / cores) + rows_bytes / (gbps * 1e3)
    expert_us = single["moe_us"] * share * max(1, workers / cores)
    other_ms = single["step_ms"] - layers * single["moe_us"] / 1e3
    return other_ms + layers * (expert_us + exchange_us) / 1e3


def measure_single(args, env, batches):
    """One process holding every expert (W = 0 in the sweep's harness): step time and the
    per-layer MoE time, per batch size."""
    out = {}
    for b in batches:
        row = scaling_sweep.run_config(args.build, args.model, "local", 0, b, "round-robin",
                                       args.tokens, env)
        out[b] = row
        print(f"measured one process, batch {b}: step {row['step_ms']:.2f} ms, MoE "
              f"{row['moe_us']:.0f} us/layer", flush=True)
    return out


def fit_exchange(single, one_worker, cfg):
    """Latency (us) and bandwidth (GB/s) of a data plane from its 1-worker cluster at two batch
    sizes: what the cluster adds per layer over one process is one exchange."""
    layers, k, hidden = cfg["num_hidden_layers"], cfg["num_experts_per_tok"], cfg["hidden_size"]
    points = []
    for b, row in sorted(one_worker.items()):
        extra_us = (row["step_ms"] - single[b]["step_ms"]) * 1e3 / layers
        points.append((2 * b * k * hidden * 4, max(extra_us, 1.0)))
    (x0, y0), (x1, y1) = points[0], points[-1]
    slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0  # us per byte
    latency = max(y0 - slope * x0, 1.0)
    gbps = 1e-3 / slope if slope > 1e-9 else float("inf")
    return latency, gbps


def validate(args, env):
    cfg = scaling_sweep.config_of(args.model)
    batches = sorted(set(args.batch_sizes))
    if len(batches) < 2:
        sys.exit("--validate needs two batch sizes or more (the exchange is fitted on two)")
    parts = {"single": measure_single(args, env, batches), "exchange": {},
             "cores": args.cores}
    measured = {}
    for dp in args.data_planes:
        one = {b: scaling_sweep.run_config(args.build, args.model, dp, 1, b, "round-robin",
                                           args.tokens, env) for b in (batches[0], batches[-1])}
        parts["exchange"][dp] = fit_exchange(parts["single"], one, cfg)
        lat, bw = parts["exchange"][dp]
        print(f"measured {dp}: exchange latency {lat:.0f} us, bandwidth "
              f"{bw:.2f} GB/s (from the 1-worker cluster at batch {batches[0]} and "
              f"{batches[-1]})", flush=True)
    rows = []
    for dp in args.data_planes:
        for placement in args.placements:
            for w in args.workers:
                if w == 1 and placement == "round-robin":
                    continue  # fitted on, not predicted
                if placement.startswith("replicas=") and int(placement.split("=")[1]) > w:
                    continue
                for b in batches:
                    m = scaling_sweep.run_config(args.build, args.model, dp, w, b, placement,
                                                 args.tokens, env)
                    p = step_model(parts, dp, w, b, placement, cfg)
                    err = abs(p - m["step_ms"]) / m["step_ms"]
                    rows.append({"data_plane": dp, "workers": w, "batch": b,
                                 "placement": placement, "predicted_ms": round(p, 3),
                                 "measured_ms": m["step_ms"], "relative_error": round(err, 4),
                                 "predicted_tokens_per_s": round(b / p * 1e3, 1),
                                 "measured_tokens_per_s": round(b / m["step_ms"] * 1e3, 1)})
                    print(f"{dp:5s} W={w} B={b:<3d} {placement:12s} predicted {p:7.2f} ms  "
                          f"measured {m['step_ms']:7.2f} ms  error {100 * err:5.1f}%",
                          flush=True)
                    measured[(dp, w, b, placement)] = m
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "validate.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    worst = max(rows, key=lambda r: r["relative_error"])
    print(f"worst relative error: {100 * worst['relative_error']:.1f}% "
          f"({worst['data_plane']}, {worst['workers']} workers, batch {worst['batch']}, "
          f"{worst['placement']})")


# ---- Mixtral on GPU nodes -------------------------------------------------------------------

MODELS = {
    # hidden, intermediate, layers, experts, top-k, heads, kv heads, head dim, vocab
    "Mixtral-8x7B": dict(hidden=4096, inter=14336, layers=32, experts=8, k=2, heads=32, kv=8,
                         head_dim=128, vocab=32000),
    "Mixtral-8x22B": dict(hidden=6144, inter=16384, layers=56, experts=8, k=2, heads=48, kv=8,
                          head_dim=128, vocab=32768),
}
GPUS = {
    # HBM copy bandwidth (GB/s) and dense bf16 FLOP/s: H100 as measured in docs/ARCHITECTURE.md
    # ("Performance targets": about 3.0 TB/s and 798 TFLOP/s; datasheet 3.35 TB/s, 989 TFLOP/s);
    # H200: 4.3 TB/s measured copy, the same compute as H100 (datasheet 4.8 TB/s, 989 TFLOP/s).
    "H100": dict(hbm=3000.0, flops=798e12),
    "H200": dict(hbm=4300.0, flops=798e12),
}
NETWORKS = {
    # per-GPU bandwidth (GB/s, one direction) and one message's latency (us), stated figures:
    # NVLink 4 (900 GB/s per GPU both directions), InfiniBand NDR 400 Gb/s, 100 Gb/s Ethernet.
    "NVLink": dict(gbps=450.0, latency=15.0),
    "IB-400G": dict(gbps=50.0, latency=25.0),
    "Eth-100G": dict(gbps=12.5, latency=40.0),
}
CONTEXT = 1024  # tokens of KV each sequence reads per step


def gpu_step(model, gpu, nodes, batch, inter_node):
    """(step us, dispatch+combine us per layer) of Mixtral on `nodes` x 8 GPUs: GPU 0 is the
    coordinator, every GPU holds experts (replicas of the 8 beyond 8 GPUs), no overlap."""
    m, g = MODELS[model], GPUS[gpu]
    H, I, L, E, k = m["hidden"], m["inter"], m["layers"], m["experts"], m["k"]
    q, kv = m["heads"] * m["head_dim"], m["kv"] * m["head_dim"]
    gpus = 8 * nodes
    bw = g["hbm"] * 1e3  # bytes per us
    # Attention on the coordinator: its weights once, and every sequence's KV cache.
    attn_bytes = 2 * (H * (q + 2 * kv) + q * H) + batch * CONTEXT * 2 * kv * 2
    attn_flops = 2 * batch * (H * (q + 2 * kv) + q * H) + 4 * batch * CONTEXT * q
    attention = max(attn_bytes / bw, attn_flops / g["flops"] * 1e6)
    # Experts: each GPU holds one expert copy (gpus / 8 replicas); its rows are the expected
    # maximum of the batch's k rows per token over the copies of the expert.
    copies = max(1, gpus // E)
    rows = max(1.0, batch * k / E / copies * 1.3)  # 1.3: the imbalance of uniform routing
    expert_bytes = 3 * H * I * 2
    expert = max(expert_bytes / bw, 2 * 3 * H * I * rows / g["flops"] * 1e6)
    # The exchange: the coordinator sends B*k rows of bf16 and gets them back; rows for other
    # nodes leave through its NIC, the rest over NVLink.
    row_bytes = batch * k * H * 2
    remote = (nodes - 1) / nodes
    nvl, net = NETWORKS["NVLink"], NETWORKS[inter_node]
    one_way = max(nvl["latency"] + row_bytes * (1 - remote) / (nvl["gbps"] * 1e3),
                  (net["latency"] + row_bytes * remote / (net["gbps"] * 1e3)) if nodes > 1 else 0)
    exchange = 2 * one_way
    lm_head = max(2 * H * m["vocab"] / bw, 2 * batch * H * m["vocab"] / g["flops"] * 1e6)
    return L * (attention + expert + exchange) + lm_head, exchange


# Published figures the dispatch/combine times can be set against (different models and
# settings: stated next to each number).
PUBLISHED = [
    ("DeepEP V1 low-latency kernels (deepseek-ai/DeepEP, docs/legacy.md, 2025)",
     "H800, CX7 InfiniBand 400 Gb/s, 128 tokens, hidden 7168, top-8, FP8 dispatch, BF16 combine",
     [("EP 8", 77, 114), ("EP 16", 118, 195), ("EP 32", 155, 273), ("EP 64", 173, 314)]),
    ("Triton-distributed low-latency all-to-all V2 (triton-distributed.readthedocs.io, 2025)",
     "8x H800, 128 tokens per rank, top-8, hidden 7168, FP8", [("EP 8", 76, 126)]),
]
NOT_FOUND = ("pplx-kernels (Perplexity) and MegaScale-Infer (ByteDance, 2025) dispatch/combine "
             "numbers were not in the sources available here: not quoted.")


def predict(args):
    os.makedirs(args.out_dir, exist_ok=True)
    lines = ["# Predicted decode of Mixtral on N nodes of 8 GPUs (epx topology, no overlap)", "",
             f"KV context {CONTEXT} tokens per sequence; bf16 weights and rows; the GPU and "
             "network figures are stated in bench/cluster_model.py (GPUS, NETWORKS).", ""]
    rows = []
    for model in MODELS:
        for gpu in GPUS:
            for net in ("IB-400G", "Eth-100G"):
                lines += [f"## {model}, {gpu}, inter-node {net}", "",
                          "| nodes | batch | tokens/s | step ms | dispatch+combine us/layer |",
                          "|---:|---:|---:|---:|---:|"]
                for nodes in (1, 2, 4, 8):
                    for batch in (1, 8, 64, 256):
                        step, xchg = gpu_step(model, gpu, nodes, batch, net)
                        tps = batch / step * 1e6
                        rows.append({"model": model, "gpu": gpu, "network": net, "nodes": nodes,
                                     "batch": batch, "tokens_per_s": round(tps, 1),
                                     "step_ms": round(step / 1e3, 3),
                                     "exchange_us_per_layer": round(xchg, 1)})
                        lines.append(f"| {nodes} | {batch} | {tps:,.0f} | {step / 1e3:.2f} | "
                                     f"{xchg:.0f} |")
                lines.append("")
    lines += ["## Published dispatch and combine times, for comparison", "",
              "| source | setting | EP | dispatch us | combine us |", "|---|---|---|---:|---:|"]
    for source, setting, points in PUBLISHED:
        for ep, d, c in points:
            lines.append(f"| {source} | {setting} | {ep} | {d} | {c} |")
    lines += ["", NOT_FOUND, ""]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out_dir, "predict.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out_dir, "predict.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -r bench/requirements.txt): no chart")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, model in zip(axes, MODELS):
        for gpu in GPUS:
            for net in ("IB-400G", "Eth-100G"):
                for batch in (1, 64, 256):
                    pts = [r for r in rows if (r["model"], r["gpu"], r["network"], r["batch"])
                           == (model, gpu, net, batch)]
                    ax.plot([r["nodes"] for r in pts], [r["tokens_per_s"] for r in pts],
                            "o-" if net == "IB-400G" else "x--",
                            label=f"{gpu} {net} B={batch}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("nodes of 8 GPUs")
        ax.set_ylabel("decode tokens/s (predicted)")
        ax.set_title(model)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = os.path.join(args.out_dir, "predict.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scaling_sweep.add_arguments(ap)
    ap.add_argument("--validate", action="store_true",
                    help="measure this machine's parts, predict the sweep, run it, compare")
    ap.add_argument("--predict", action="store_true", help="Mixtral on GPU nodes (default)")
    ap.add_argument("--epx", help="the epx binary (default: BUILD/cli/epx)")
    ap.add_argument("--cores", type=int, default=os.cpu_count(),
                    help="cores the ranks share (default: this machine's)")
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
