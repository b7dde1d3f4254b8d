#!/usr/bin/env python3
"""The PyTorch peer of build/bench/cuda_moe_layer_bench: one Mixtral MoE layer.

transformers' MixtralSparseMoeBlock (router, top-2, the experts, the weighted sum) in bf16 on the
GPU, with random weights made on the GPU, for the same token counts T = 1, 2, 4, ..., 8192. Each
row is the mean of a timed run of repeats after warm-up, timed with torch.cuda.Event, and is
printed with the same columns as epx's bench, next to the same two limits measured in this
process: a 1 GiB device-to-device copy (read + write bytes counted) and a bf16 8192^3 matmul.

Bytes that must move: the bf16 weights of the experts hit (counted from the router's top-k on
the same inputs, after the timing), the router, the bf16 input read and the bf16 output written.
FLOPs: 2 x multiply-adds of the router and of the three expert GEMMs of every routed token.

Works with the transformers 4.x block (a Python loop over the experts hit, returning
(hidden, router_logits)) and the 5.x one (fused expert weights; returns hidden); a version whose
modeling_mixtral has no such class under a known name exits with a message naming what it has.
"""

import argparse
import importlib
import json
import sys

# Names the sparse MoE block has had in transformers' modeling_mixtral, newest guess last.
BLOCK_CLASS_NAMES = ("MixtralSparseMoeBlock", "MixtralMoeBlock", "MixtralMoE",
                     "MixtralSparseMoE")
COPY_BYTES = 1 << 30
SHAPES = {
    "mixtral": dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                    num_experts_per_tok=2),
    "small": dict(hidden_size=1024, intermediate_size=3584, num_local_experts=8,
                  num_experts_per_tok=2),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default=",".join(str(1 << i) for i in range(14)),
                   help="comma-separated token counts T, one row each (default 1..8192)")
    p.add_argument("--scale", default="mixtral", choices=sorted(SHAPES))
    p.add_argument("--min-ms", type=float, default=200.0, help="timed time per row, at least")
    p.add_argument("--gemm-size", type=int, default=8192, help="the matmul peak's n = m = k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experts-implementation",
                   help="transformers 5.x: eager, grouped_mm, batched_mm, ... (default: the "
                        "library's choice)")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    try:
        a.tokens = [int(t) for t in a.tokens.split(",") if t.strip()]
    except ValueError:
        p.error(f"--tokens: comma-separated integers, got {a.tokens!r}")
    if not a.tokens or min(a.tokens) <= 0:
        p.error("--tokens must be positive integers")
    if a.min_ms <= 0:
        p.error("--min-ms must be positive")
    return a


def find_block_class():
    module = importlib.import_module("transformers.models.mixtral.modeling_mixtral")
    for name in BLOCK_CLASS_NAMES:
        cls = getattr(module, name, None)
        if cls is not None:
            return name, cls
    import transformers
    similar = sorted(n for n in dir(module)
                     if any(s in n.lower() for s in ("moe", "expert", "sparse")))
    sys.exit(f"moe_layer_torch: transformers {transformers.__version__} has none of "
             f"{', '.join(BLOCK_CLASS_NAMES)} in transformers.models.mixtral.modeling_mixtral; "
             f"its MoE-like names: {', '.join(similar) or 'none'}. Add the new name to "
             "BLOCK_CLASS_NAMES if it takes (config) and maps [batch, seq, hidden] to the same.")


def best_ms(torch, fn, passes=5):
    fn()  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(passes):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def limits(torch, gemm_size):
    """(copy GB/s counting read + write bytes, matmul TFLOP/s), best passes."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.zeros_like(src)
    copy_ms = best_ms(torch, lambda: dst.copy_(src))
    del src, dst
    a = torch.rand(gemm_size, gemm_size, device="cuda", dtype=torch.bfloat16)
    b = torch.rand(gemm_size, gemm_size, device="cuda", dtype=torch.bfloat16)
    gemm_ms = best_ms(torch, lambda: torch.matmul(a, b))
    del a, b
    torch.cuda.empty_cache()
    return (2.0 * COPY_BYTES / (copy_ms * 1e-3) / 1e9,
            2.0 * gemm_size ** 3 / (gemm_ms * 1e-3) / 1e12)


def build_block(torch, cls, MixtralConfig, shape, experts_impl, seed):
    config = MixtralConfig(**shape, router_jitter_noise=0.0)
    for key, value in shape.items():  # older versions may ignore unknown keys silently
        if getattr(config, key, None) != value:
            setattr(config, key, value)
    if experts_impl:
        try:
            config._experts_implementation = experts_impl
        except Exception as e:  # noqa: BLE001 - reported, then the default is used
            print(f"moe_layer_torch: cannot set experts implementation {experts_impl}: {e}",
                  file=sys.stderr)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters are born bf16, on the GPU
    try:
        with torch.device("cuda"):
            block = cls(config)
    finally:
        torch.set_default_dtype(previous)
    # 5.x allocates its fused expert weights with torch.empty: give every parameter the same
    # uniform init as epx's dummy weights, scaled by its input width^-1/2 (the last dimension).
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.uniform_(-1.0, 1.0, generator=gen).mul_(p.shape[-1] ** -0.5)
    block = block.to(device="cuda", dtype=torch.bfloat16).eval()
    return config, block


def experts_hit(torch, block, x, top_k):
    """Distinct experts the router sends x's tokens to (None when the gate has no weight)."""
    weight = getattr(block.gate, "weight", None)
    if weight is None:
        return None
    logits = x.reshape(-1, x.shape[-1]).float() @ weight.float().t()
    return int(torch.unique(torch.topk(logits, top_k, dim=-1).indices).numel())


def main(argv):
    args = parse_args(argv)
    try:
        import torch
        import transformers
        from transformers import MixtralConfig
    except ImportError as e:
        sys.exit(f"moe_layer_torch: needs torch and transformers ({e}); "
                 "pip install torch transformers")
    if not torch.cuda.is_available():
        sys.exit("moe_layer_torch: no CUDA device is visible to torch")
    class_name, cls = find_block_class()
    shape = SHAPES[args.scale]
    H, I = shape["hidden_size"], shape["intermediate_size"]
    E, K = shape["num_local_experts"], shape["num_experts_per_tok"]
    torch.manual_seed(args.seed)

    with torch.inference_mode():
        copy_gbps, gemm_tflops = limits(torch, args.gemm_size)
    config, block = build_block(torch, cls, MixtralConfig, shape, args.experts_implementation,
                                args.seed)
    experts_impl = getattr(config, "_experts_implementation", None) or "eager (4.x loop)"
    device = f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}"
    print(f"device: {device}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {class_name}, experts {experts_impl}")
    print(f"layer: {args.scale}, hidden {H}, intermediate {I}, {E} experts, top-{K}, bf16")
    print(f"limits: device-to-device copy {copy_gbps:.0f} GB/s (1 GiB, read + write counted); "
          f"torch.matmul bf16 {args.gemm_size}^3 {gemm_tflops:.1f} TFLOP/s")
    print()
    print(f"{'T':>6} {'rows':>6} {'hit':>4} {'dtype':<5} {'impl':<15} {'us':>10} {'MB':>9} "
          f"{'GB/s':>9} {'frac_cp':>8} {'TFLOP/s':>9} {'frac_gemm':>9}", flush=True)

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(args.seed + 1)
    for t in args.tokens:
        row = dict(T=t, dtype="bf16", impl="torch")
        try:
            with torch.inference_mode():
                x = (torch.rand(1, t, H, device="cuda", generator=gen) * 2 - 1).to(torch.bfloat16)
                run = lambda: block(x)  # noqa: E731 - 4.x returns a tuple, 5.x a tensor
                for _ in range(2):
                    run()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                once = max(start.elapsed_time(end), 1e-3)
                repeats = int(min(max(args.min_ms / once, 3), 2000))
                start.record()
                for _ in range(repeats):
                    run()
                end.record()
                end.synchronize()
                us = 1e3 * start.elapsed_time(end) / repeats
                hit = experts_hit(torch, block, x, K)
                del x
        except RuntimeError as e:
            if "out of memory" not in str(e):
                raise
            torch.cuda.empty_cache()
            row["error"] = "OOM"
            print(f"{t:>6} {t * K:>6} {'':>4} {'bf16':<5} {'torch':<15} {'OOM':>10}", flush=True)
            rows.append(row)
            continue
        flops = 2.0 * t * H * E + 2.0 * t * K * 3 * H * I
        nbytes = None if hit is None else hit * 3.0 * H * I * 2 + E * H * 2 + t * H * 2 * 2
        seconds = us * 1e-6
        row.update(experts_hit=hit, repeats=repeats, us=us, bytes=nbytes, flops=flops,
                   TFLOPs=flops / seconds * 1e-12,
                   frac_gemm_peak=flops / seconds * 1e-12 / gemm_tflops)
        if nbytes is not None:
            row.update(GBps=nbytes / seconds * 1e-9,
                       frac_copy_bw=nbytes / seconds * 1e-9 / copy_gbps)
        rows.append(row)

        def f(key, spec):
            return "-" if row.get(key) is None else format(row[key], spec)

        mb = "-" if nbytes is None else format(nbytes * 1e-6, ".1f")
        print(f"{t:>6} {t * K:>6} {f('experts_hit', 'd'):>4} {'bf16':<5} {'torch':<15} "
              f"{us:>10.1f} {mb:>9} {f('GBps', '.1f'):>9} {f('frac_copy_bw', '.3f'):>8} "
              f"{row['TFLOPs']:>9.2f} {row['frac_gemm_peak']:>9.3f}", flush=True)

    if args.json:
        report = dict(bench="bench/peer/moe_layer_torch.py", device=device,
                      torch=torch.__version__, transformers=transformers.__version__,
                      block_class=class_name, experts_implementation=experts_impl,
                      layer=dict(name=args.scale, hidden=H, intermediate=I, num_experts=E,
                                 num_topk=K),
                      copy_GBps=copy_gbps, gemm_peak_TFLOPs=gemm_tflops, rows=rows)
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
            out.write("\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
