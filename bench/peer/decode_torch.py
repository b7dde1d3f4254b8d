#!/usr/bin/env python3
"""The Hugging Face transformers peer of `epx bench decode`.

MixtralForCausalLM at a preset's shape (the same presets as `epx make-model`, with the same
--num-layers override), random bf16 weights made on the GPU, SDPA attention. For each batch size:
prefill random prompts, run warm-up decode steps, then time decode steps, each one forward with
past_key_values and one new token per sequence, torch.cuda.synchronize() after every step (as
epx's Engine::Step returns only when the logits are on the host). The bytes a step must read use
the same model as epx (bench/README.md, "Whole-model decode"), with the experts hit counted from
the router's outputs; the copy bandwidth is a 1 GiB device-to-device tensor copy, counted as
read + write bytes (2 x bytes / time). Prints the same table as epx and, with --json, the same
JSON layout.

Runs with the transformers 4.x and 5.x APIs (checked at run time: `dtype` or `torch_dtype`, the
router's output, the cache class). A batch size that runs out of GPU memory gets an "OOM" row.
"""

import argparse
import gc
import inspect
import json
import sys
import time

FIRST_ORDINARY_TOKEN = 3  # after <unk>, <s>, </s>, as epx picks its random prompts
COPY_BYTES = 1 << 30
COPY_WARMUPS = 3
COPY_REPEATS = 5

_COMMON = dict(num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5)
# cli/make_model.cc PresetConfig(); keep the two in step.
PRESETS = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=448, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 max_position_embeddings=4096, sliding_window=None, **_COMMON),
    "small": dict(vocab_size=512, hidden_size=512, intermediate_size=1792, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                  max_position_embeddings=32768, sliding_window=4096, **_COMMON),
    "mixtral-8x7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, max_position_embeddings=32768, sliding_window=None,
                         **_COMMON),
    "mixtral-8x22b": dict(vocab_size=32768, hidden_size=6144, intermediate_size=16384,
                          num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8,
                          head_dim=128, max_position_embeddings=65536, sliding_window=None,
                          **_COMMON),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mixtral-8x7b", choices=sorted(PRESETS))
    p.add_argument("--num-layers", type=int, help="override num_hidden_layers")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256",
                   help="comma-separated batch sizes, one row each")
    p.add_argument("--context", type=int, default=512, help="random prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    p.add_argument("--warmup", type=int, default=3, help="decode steps before the timed ones")
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prompt tokens per prefill forward at most (batch x positions)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and token ids")
    p.add_argument("--attn-implementation", default="sdpa", help="sdpa (default), eager, ...")
    p.add_argument("--experts-implementation",
                   help="transformers 5.x: eager, grouped_mm, batched_mm, ... (default: the "
                        "library's choice, grouped_mm where torch has it)")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    try:
        a.batch_sizes = [int(b) for b in a.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes: comma-separated integers, got {a.batch_sizes!r}")
    if not a.batch_sizes or min(a.batch_sizes) <= 0:
        p.error("--batch-sizes must be positive integers")
    for name in ("context", "steps", "prefill_chunk"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if a.warmup < 0:
        p.error("--warmup must not be negative")
    if a.num_layers is not None and a.num_layers <= 0:
        p.error("--num-layers must be positive")
    return a


def shape_of(args):
    shape = dict(PRESETS[args.preset])
    if args.num_layers is not None:
        shape["num_hidden_layers"] = args.num_layers
    return shape


def is_oom(exc, torch):
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc)


def copy_bandwidth(torch):
    """Best of COPY_REPEATS 1 GiB device-to-device copies, GB/s counting read + write bytes."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.zeros_like(src)
    for _ in range(COPY_WARMUPS):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best_ms = float("inf")
    for _ in range(COPY_REPEATS):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best_ms = min(best_ms, start.elapsed_time(end))
    del src, dst
    torch.cuda.empty_cache()
    return 2.0 * COPY_BYTES / (best_ms * 1e-3) / 1e9


def make_config(MixtralConfig, shape, attn):
    kwargs = dict(shape, tie_word_embeddings=False, use_cache=True, output_router_logits=False,
                  router_jitter_noise=0.0, attention_dropout=0.0)
    config = MixtralConfig(**kwargs)
    # Older versions ignore unknown keys silently; make sure the shape is what was asked.
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_local_experts",
                "num_experts_per_tok", "num_key_value_heads", "vocab_size"):
        if getattr(config, key, None) != shape[key]:
            setattr(config, key, shape[key])
    config.sliding_window = shape["sliding_window"]
    try:
        config._attn_implementation = attn
    except Exception:  # noqa: BLE001 - a read-only property in some versions; set at load instead
        pass
    return config


def build_model(torch, MixtralForCausalLM, config, attn, experts):
    """Random bf16 weights allocated and initialised on the GPU (never on the host)."""
    dtype = torch.bfloat16
    extra = {"experts_implementation": experts} if experts else {}
    attempts = [
        ("_from_config(dtype=)",
         lambda: MixtralForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn,
                                                 **extra)),
        ("_from_config(torch_dtype=)",
         lambda: MixtralForCausalLM._from_config(config, torch_dtype=dtype,
                                                 attn_implementation=attn)),
        ("MixtralForCausalLM(config)", lambda: MixtralForCausalLM(config)),
    ]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # whatever the path, parameters are born bf16
    model, errors = None, []
    try:
        with torch.device("cuda"):
            for name, make in attempts:
                try:
                    model = make()
                    break
                except TypeError as e:  # this version does not take these arguments
                    errors.append(f"{name}: {e}")
    finally:
        torch.set_default_dtype(previous)
    if model is None:
        raise RuntimeError("cannot build MixtralForCausalLM: " + "; ".join(errors))
    # Only if needed: a blanket .to(bf16) would also round the float32 RoPE buffers.
    if any(p.dtype != dtype or p.device.type != "cuda" for p in model.parameters()):
        model = model.to(device="cuda", dtype=dtype)
    model.eval()
    if getattr(model.config, "_attn_implementation", None) != attn:
        setter = getattr(model, "set_attn_implementation", None)
        if setter is not None:
            try:
                setter(attn)
            except Exception as e:  # noqa: BLE001 - reported in the header below
                print(f"decode_torch: could not set attn_implementation={attn}: {e}",
                      file=sys.stderr)
    return model


def moe_blocks(model):
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        return []
    blocks = []
    for layer in layers:
        moe = getattr(layer, "block_sparse_moe", None) or getattr(layer, "mlp", None)
        if moe is None or getattr(moe, "gate", None) is None:
            return []
        blocks.append(moe)
    return blocks


class RouterRecorder:
    """Keeps each router call's output (references only: no work in the timed step) so that the
    experts hit can be counted afterwards. transformers 4.x: the gate is a Linear, its output the
    logits [tokens, experts]; 5.x: a router returning (logits, weights, top-k indices)."""

    def __init__(self, blocks, top_k, num_experts):
        self.top_k, self.num_experts = top_k, num_experts
        self.recording = False
        self.calls = []
        self.handles = [b.gate.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, module, inputs, output):
        if self.recording:
            self.calls.append(output)

    def take(self):
        calls, self.calls = self.calls, []
        return calls

    def experts_hit(self, torch, output):
        """Distinct experts one router call sent tokens to; None if the output is not known."""
        ids = None
        if isinstance(output, (tuple, list)):
            for t in output:
                if torch.is_tensor(t) and not t.is_floating_point() and t.shape[-1] == self.top_k:
                    ids = t
                    break
            if ids is None:
                output = next((t for t in output if torch.is_tensor(t) and t.is_floating_point()
                               and t.shape[-1] == self.num_experts), None)
        if ids is None and torch.is_tensor(output) and output.shape[-1] == self.num_experts:
            ids = torch.topk(output.float(), self.top_k, dim=-1).indices
        if ids is None:
            return None
        return int(torch.unique(ids).numel())


def byte_model(shape):
    """The bytes one decode step must read, as epx counts them for bf16 (norms are bf16 here)."""
    H, I, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    E = shape["num_local_experts"]
    per_layer = (q + 2 * kv) * H * 2 + H * q * 2 + E * H * 2 + 2 * H * 2
    return dict(non_expert_bytes=shape["vocab_size"] * H * 2 + L * per_layer + H * 2,
                embedding_row_bytes=H * 2, expert_bytes=3 * H * I * 2,
                kv_bytes_per_token=2 * L * kv * 2)


def new_cache(model):
    try:
        from transformers import DynamicCache
    except ImportError:
        return None  # old versions: the model makes its own (tuples)
    for kwargs in ({"config": model.config}, {}):
        try:
            return DynamicCache(**kwargs)
        except TypeError:
            continue
    return None


def run_batch(torch, model, args, shape, bytes_model, recorder, logits_kw, batch):
    vocab, L = shape["vocab_size"], shape["num_hidden_layers"]
    gen = torch.Generator(device="cpu").manual_seed(args.seed * 1000003 + batch)
    first = min(FIRST_ORDINARY_TOKEN, vocab - 1)
    prompts = torch.randint(first, vocab, (batch, args.context), generator=gen).cuda()
    decode_ids = torch.randint(first, vocab, (batch, args.warmup + args.steps),
                               generator=gen).cuda()

    def forward(ids, past):
        kwargs = dict(input_ids=ids, past_key_values=past, use_cache=True)
        if logits_kw:
            kwargs[logits_kw] = 1
        return model(**kwargs).past_key_values

    past = new_cache(model)
    # Prefill: all sequences advance together (one cache), at most --prefill-chunk tokens a
    # forward, as epx chunks its prefill.
    chunk = max(1, args.prefill_chunk // batch)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prefill_steps = 0
    for s in range(0, args.context, chunk):
        past = forward(prompts[:, s:s + chunk], past)
        prefill_steps += 1
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    print(f"batch {batch}: prefilled {batch} x {args.context} tokens in {prefill_steps} "
          f"forwards, {prefill_s:.2f} s", file=sys.stderr, flush=True)

    for i in range(args.warmup):
        past = forward(decode_ids[:, i:i + 1], past)
    torch.cuda.synchronize()

    window = shape["sliding_window"] or float("inf")
    step_ms, step_calls, total_bytes = [], [], 0.0
    for i in range(args.steps):
        ids = decode_ids[:, args.warmup + i:args.warmup + i + 1]
        recorder.recording = True
        t0 = time.perf_counter()
        past = forward(ids, past)
        torch.cuda.synchronize()
        step_ms.append((time.perf_counter() - t0) * 1e3)
        recorder.recording = False
        step_calls.append(recorder.take())
        attended = min(args.context + args.warmup + i + 1, window)
        total_bytes += (bytes_model["non_expert_bytes"]
                        + batch * bytes_model["embedding_row_bytes"]
                        + batch * attended * bytes_model["kv_bytes_per_token"])
    del past

    hits, known = 0, True
    for calls in step_calls:
        if len(calls) != L:
            known = False
            break
        for output in calls:
            h = recorder.experts_hit(torch, output)
            if h is None:
                known = False
                break
            hits += h
    if known:
        total_bytes += hits * bytes_model["expert_bytes"]
    total_s = sum(step_ms) / 1e3
    row = dict(batch=batch, ms_per_step=sum(step_ms) / len(step_ms),
               tokens_per_s=batch * len(step_ms) / total_s,
               step_ms_min=min(step_ms), step_ms_p50=sorted(step_ms)[len(step_ms) // 2],
               prefill_s=prefill_s, prefill_steps=prefill_steps)
    if known:
        row.update(experts_hit_per_layer=hits / (len(step_ms) * L),
                   GB_per_step=total_bytes / len(step_ms) / 1e9,
                   achieved_GBps=total_bytes / total_s / 1e9)
    else:
        row.update(experts_hit_per_layer=None, GB_per_step=None, achieved_GBps=None)
    return row


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main(argv):
    args = parse_args(argv)
    shape = shape_of(args)
    per_seq = args.context + args.warmup + args.steps
    if per_seq > shape["max_position_embeddings"]:
        sys.exit(f"decode_torch: --context {args.context} + {args.warmup} warm-up + {args.steps} "
                 f"timed steps exceed max_position_embeddings {shape['max_position_embeddings']}")
    try:
        import torch
        import transformers
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError as e:
        sys.exit(f"decode_torch: needs torch and transformers ({e}); "
                 "pip install torch transformers")
    if not torch.cuda.is_available():
        sys.exit("decode_torch: no CUDA device is visible to torch")
    torch.manual_seed(args.seed)

    with torch.no_grad():
        copy_gbps = copy_bandwidth(torch)
        config = make_config(MixtralConfig, shape, args.attn_implementation)
        t0 = time.perf_counter()
        model = build_model(torch, MixtralForCausalLM, config, args.attn_implementation,
                            args.experts_implementation)
        torch.cuda.synchronize()
    print(f"model built on the GPU in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    # Parameters are made outside inference mode (it forbids them); the forwards run inside.
    with torch.inference_mode():
        attn = getattr(model.config, "_attn_implementation", "?")
        # 4.x: a Python loop over the experts hit, one Linear each; 5.x: a choice, see above.
        experts = getattr(model.config, "_experts_implementation", None) or "eager (4.x loop)"
        params = inspect.signature(model.forward).parameters
        logits_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params),
                         None)
        blocks = moe_blocks(model)
        recorder = RouterRecorder(blocks, shape["num_experts_per_tok"],
                                  shape["num_local_experts"])
        bm = byte_model(shape)
        probe = new_cache(model)
        cache_kind = type(probe).__name__ if probe is not None else "the model's own (tuples)"
        del probe

        L, E, H, I = (shape["num_hidden_layers"], shape["num_local_experts"],
                      shape["hidden_size"], shape["intermediate_size"])
        full = PRESETS[args.preset]["num_hidden_layers"]
        layers = f"{L} of {full} layers" if L != full else f"{L} layers"
        device = f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}"
        print("transformers peer of epx bench decode: MixtralForCausalLM forward per decode "
              "step, torch.cuda.synchronize() after each")
        print(f"device        {device}; torch {torch.__version__}, transformers "
              f"{transformers.__version__}, attention {attn}, experts {experts}")
        print(f"model         {args.preset} (random weights): {layers}, hidden {H}, "
              f"intermediate {I}, {E} experts top-{shape['num_experts_per_tok']}, heads "
              f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} x "
              f"{shape['head_dim']}, vocab {shape['vocab_size']}")
        print(f"weights       experts bf16: {L} x {E} x {bm['expert_bytes'] / 1e6:.1f} MB = "
              f"{L * E * bm['expert_bytes'] / 1e9:.2f} GB; non-expert "
              f"{bm['non_expert_bytes'] / 1e9:.2f} GB")
        print(f"run           per batch size: {args.context} random prompt tokens per sequence "
              f"(prefill forwards of <= {args.prefill_chunk} tokens), {args.warmup} warm-up + "
              f"{args.steps} timed decode steps; KV cache {cache_kind}")
        print(f"copy BW       {copy_gbps:.1f} GB/s: device-to-device copy of 1 GiB, best of "
              f"{COPY_REPEATS}, counting read + write bytes (2 x bytes / time), as bandwidth "
              "tests do")
        print(f"bytes/step    non-expert weights {bm['non_expert_bytes'] / 1e9:.3f} GB + B "
              f"embedding rows + experts hit x {bm['expert_bytes'] / 1e6:.1f} MB + KV read "
              f"(B x length x {bm['kv_bytes_per_token']} B)")
        if not blocks:
            print("              (no router found in this transformers version: bytes not "
                  "counted)")
        print()
        print(f"{'batch':>7} {'ms/step':>10} {'tok/s':>11} {'experts/layer':>13} "
              f"{'GB/step':>9} {'GB/s':>9} {'frac_bw':>8}", flush=True)

        report = dict(tool="bench/peer/decode_torch.py", engine="transformers", device=device,
                      backend="cuda", torch=torch.__version__,
                      transformers=transformers.__version__, attn_implementation=attn,
                      experts_implementation=experts,
                      model=dict(name=args.preset, load_format="random", **{
                          k: shape[k] for k in (
                              "num_hidden_layers", "hidden_size", "intermediate_size",
                              "num_local_experts", "num_experts_per_tok",
                              "num_attention_heads", "num_key_value_heads", "head_dim",
                              "vocab_size")}),
                      expert_dtype="bf16", context=args.context, warmup_steps=args.warmup,
                      steps=args.steps, prefill_chunk_tokens=args.prefill_chunk, seed=args.seed,
                      copy_bandwidth_GBps=copy_gbps,
                      copy_bandwidth_note="device-to-device copy of 1 GiB, best of 5, counting "
                                          "read + write bytes (2 x bytes / time)",
                      bytes_model=bm, rows=[])

        for batch in args.batch_sizes:
            error = None
            try:
                row = run_batch(torch, model, args, shape, bm, recorder, logits_kw, batch)
            except Exception as e:  # noqa: BLE001 - OOM is a row; anything else ends the run
                if not is_oom(e, torch):
                    raise
                error = "OOM"
                row = dict(batch=batch, error=f"OOM: {str(e).splitlines()[0]}")
            # The failed batch's cache and activations are freed only once the exception (and
            # its traceback's frames) are gone, i.e. here.
            recorder.recording = False
            recorder.take()
            gc.collect()
            torch.cuda.empty_cache()
            if error:
                print(f"{batch:>7}  OOM", flush=True)
            else:
                gbps = row["achieved_GBps"]
                row["fraction_of_copy_bw"] = None if gbps is None else gbps / copy_gbps
                print(f"{batch:>7} {row['ms_per_step']:>10.3f} {row['tokens_per_s']:>11.1f} "
                      f"{fmt(row['experts_hit_per_layer'], '>13.2f'):>13} "
                      f"{fmt(row['GB_per_step'], '>9.3f'):>9} {fmt(gbps, '>9.1f'):>9} "
                      f"{fmt(row['fraction_of_copy_bw'], '>8.3f'):>8}", flush=True)
            report["rows"].append(row)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=2)
                    f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
