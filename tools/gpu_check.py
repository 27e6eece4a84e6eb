"""Exercise every GPU path of the book on a machine with a CUDA GPU, and record what happened.

    python tools/gpu_check.py [--steps N] [--out FILE]

    --steps N   optimizer steps of the "gpu" preset's model in check 5 (default 300)
    --out FILE  the JSON file of results (default build/gpu_check.json under the repository root;
                its folder is created)

This script is for a machine with a CUDA GPU. Without one (torch.cuda.is_available() is False,
for instance with the CPU build of torch that the project pins) it prints one line saying that
no CUDA GPU was found and nothing was run, writes {"cuda": false, "reason": ...} to --out, and
exits with status 0. On a GPU it runs six checks, each in its own try/except, so that one failure
is recorded and the others still run:

  1. cuda_basics        device, capability, memory, torch/CUDA versions, bf16 support, and the
                        TFLOP/s of a large bf16 and fp32 matmul
  2. sdpa_flash         F.scaled_dot_product_attention restricted to the flash kernel (bf16,
                        causal), forward and backward, against the math kernel in fp32
  3. gpt_bf16_autocast  the book's GPT (the "gpu" preset's shape) under bf16 autocast, attention
                        restricted to the flash kernel, against the same model in fp32
  4. torch_compile      torch.compile of the book's GPT (the "book" preset's shape): the losses of
                        the first training steps agree with eager mode; tokens/s of each
  5. gpu_preset_training  the "gpu" preset's model and TrainConfig (only max_steps and the
                        evaluation settings changed) trained with llmbook.train.train under
                        precision "auto": tokens/s, first and last losses, validation loss, MFU
  6. nccl               a one-process nccl group: all_reduce and the other collectives the book
                        uses, checked, then destroyed

The "gpu" preset trains on TinyStories, a download; the GPU machine may have no network, so check 5
trains on the book's offline corpus instead (the standard library's prose, split into train and
validation documents by llmbook.corpus.split_documents), tokenized as UTF-8 bytes: ids 0-255 of
the model's 16384, real text with no tokenizer to train and nothing to fetch. Its losses are
per byte, not comparable with the preset's per-token losses.

Model FLOPs utilisation (MFU) follows benchmarks/bench_model.py: the model FLOPs of a training step
are 3 x llmbook.model.matmul_flops(config, batch, seq), divided by the step time and by the
device's dense bf16 peak from its PEAK_BF16_FLOPS table (no MFU for a device not in the table).

Every result is a dict with "ok", the numbers measured, "seconds", and "error" and "traceback"
when the check raised. The JSON file is rewritten after each check (a run cut short still leaves
the checks done so far) and ends with "all_ok". Sized to take a few minutes on an H100 (an
estimate: most of it torch.compile and the training run), well under 8; the exit status is 0 when
every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import socket
import statistics
import sys
import time
import traceback
from datetime import UTC, datetime, timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "shared")]  # benchmarks/ and llmbook, run from anywhere

from llmbook.corpus import load_corpus, split_documents
from llmbook.model import GPT, matmul_flops, parameter_count
from llmbook.train import (
    PRESETS,
    autocast_dtype,
    has_fast_bf16,
    make_optimizer,
    random_batch,
    train,
    train_step,
)

from benchmarks.bench_model import PEAK_BF16_FLOPS, peak_flops

DEFAULT_OUT = ROOT / "build" / "gpu_check.json"


# ---- helpers ----------------------------------------------------------------------------------

def cuda_time(fn, repeats: int, warmup: int = 3) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup` calls, synchronizing the GPU
    around each call so that the time covers the kernels, not just their launch."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in fp32."""
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def device_peak_flops() -> float | None:
    """The dense bf16 peak of this GPU from benchmarks/bench_model.py's table, or None."""
    return peak_flops(torch.cuda.get_device_name())


def offline_byte_tokens(val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) token streams: the offline corpus, split by document, as UTF-8 bytes."""
    train_docs, val_docs = split_documents(load_corpus("offline"), val_fraction)

    def as_bytes(documents) -> torch.Tensor:
        data = bytearray("\n\n".join(d.text for d in documents).encode("utf-8"))
        return torch.frombuffer(data, dtype=torch.uint8).to(torch.int64)

    return as_bytes(train_docs), as_bytes(val_docs)


def run_check(name: str, check, results: dict, out: Path) -> None:
    """Run one check, record its dict (or the exception it raised) under results["checks"][name],
    print one line, and rewrite the JSON file."""
    print(f"[{name}] running ...", flush=True)
    start = time.perf_counter()
    try:
        record = check()
    except Exception as error:  # noqa: BLE001 -- every failure is a result to record
        record = {"ok": False, "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc()}
    record["seconds"] = round(time.perf_counter() - start, 2)
    results["checks"][name] = record
    status = "ok  " if record["ok"] else "FAIL"
    detail = record.get("summary") or record.get("error", "")
    print(f"[{name}] {status} {record['seconds']:7.1f} s  {detail}", flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    write_json(results, out)


def write_json(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")


# ---- 1. CUDA basics ---------------------------------------------------------------------------

def check_cuda_basics(n: int = 8192) -> dict:
    """What the GPU is, and how fast it multiplies n x n matrices in bf16 and in fp32."""
    props = torch.cuda.get_device_properties(0)
    record = {
        "device_name": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "total_memory_gib": round(props.total_memory / 2**30, 2),
        "multiprocessors": props.multi_processor_count,
        "device_count": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "has_fast_bf16": has_fast_bf16(torch.device("cuda")),
        "autocast_dtype_auto": str(autocast_dtype("auto", torch.device("cuda"))),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "highest": no TF32
        "flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled(),
        "peak_bf16_flops": device_peak_flops(),
        "peak_table": PEAK_BF16_FLOPS,
    }
    def matmul_tflops(dtype) -> float:
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        return round(2 * n**3 / cuda_time(lambda: a @ b, repeats=10) / 1e12, 1)

    record["matmul_size"] = n
    record["matmul_bf16_tflops"] = matmul_tflops(torch.bfloat16)
    record["matmul_fp32_tflops"] = matmul_tflops(torch.float32)
    record["ok"] = record["bf16_supported"] and record["matmul_bf16_tflops"] > record["matmul_fp32_tflops"]
    record["summary"] = (f"{record['device_name']} (sm_{props.major}{props.minor}, "
                         f"{record['total_memory_gib']} GiB), torch {torch.__version__}; {n}^3 matmul "
                         f"bf16 {record['matmul_bf16_tflops']} TFLOP/s, fp32 {record['matmul_fp32_tflops']} TFLOP/s")
    return record


# ---- 2 and 3. SDPA's flash kernel, alone and in the book's GPT ------------------------------------

def check_sdpa_flash(batch=4, heads=8, seq=1024, head_dim=64, tolerance=(1e-2, 5e-2)) -> dict:
    """Causal attention in bf16 on the flash kernel alone vs the math kernel in fp32: forward
    outputs and the gradients of q, k, v, as errors relative to the largest reference value."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, heads, seq, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", generator=generator) for _ in range(3))
    grad_out = torch.randn(shape, device="cuda", generator=generator)

    def attention(dtype, backend):
        inputs = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(*inputs, is_causal=True)
        out.backward(grad_out.to(dtype))
        return out, [t.grad for t in inputs]

    flash_out, flash_grads = attention(torch.bfloat16, SDPBackend.FLASH_ATTENTION)
    ref_out, ref_grads = attention(torch.float32, SDPBackend.MATH)
    forward_tol, backward_tol = tolerance
    record = {
        "shape": list(shape),
        "forward_max_abs_error": (flash_out.float() - ref_out).abs().max().item(),
        "forward_rel_error": relative_error(flash_out, ref_out),
        "grad_rel_error": {name: relative_error(g, r) for name, g, r in zip("qkv", flash_grads, ref_grads)},
        "forward_tolerance": forward_tol, "grad_tolerance": backward_tol,
    }
    flash_seconds = cuda_time(lambda: attention(torch.bfloat16, SDPBackend.FLASH_ATTENTION), repeats=10)
    record["flash_fwd_bwd_ms"] = round(flash_seconds * 1e3, 3)
    record["ok"] = (record["forward_rel_error"] <= forward_tol
                    and max(record["grad_rel_error"].values()) <= backward_tol)
    record["summary"] = (f"flash bf16 vs math fp32: forward rel. error {record['forward_rel_error']:.1e}, "
                         f"worst grad rel. error {max(record['grad_rel_error'].values()):.1e}")
    return record


def check_gpt_bf16_autocast(batch=4, seq=512, loss_tol=2e-2, logits_tol=5e-2) -> dict:
    """The "gpu" preset's GPT: logits and loss under bf16 autocast (attention on the flash kernel
    only, so the book's attention is shown to run on it) against the same model in fp32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = PRESETS["gpu"].model
    torch.manual_seed(0)
    model = GPT(config).cuda().eval()
    x = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():
        logits32 = model(x)
        loss32 = model(x, y).item()
        with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            logits16 = model(x)
            loss16 = model(x, y).item()
    record = {"config": dataclasses.asdict(config), "batch": [batch, seq],
              "loss_fp32": loss32, "loss_bf16": loss16, "loss_abs_diff": abs(loss16 - loss32),
              "logits_dtype_bf16": str(logits16.dtype), "logits_rel_error": relative_error(logits16, logits32),
              "loss_tolerance": loss_tol, "logits_tolerance": logits_tol}
    record["ok"] = (math.isfinite(loss16) and record["loss_abs_diff"] <= loss_tol
                    and record["logits_rel_error"] <= logits_tol)
    record["summary"] = (f"loss fp32 {loss32:.4f} vs bf16 {loss16:.4f}; logits rel. error "
                         f"{record['logits_rel_error']:.1e}")
    return record


# ---- 4. torch.compile -------------------------------------------------------------------------

def check_torch_compile(batch=16, seq=256, compare_steps=3, timed_steps=10, loss_tol=5e-2) -> dict:
    """The book's GPT ("book" preset's shape), eager and torch.compile'd, from the same weights:
    the losses of the first training steps on one batch agree (the first from identical weights;
    the later ones also cover backward and the optimizer), then tokens/s of each."""
    config = PRESETS["book"].model
    cfg = dataclasses.replace(PRESETS["book"].train, batch_size=batch, seq_len=seq)
    dtype = autocast_dtype("auto", torch.device("cuda"))
    torch.manual_seed(0)
    eager = GPT(config).cuda().train()
    compiled = torch.compile(copy.deepcopy(eager))
    optimizers = {"eager": make_optimizer(eager, cfg), "compiled": make_optimizer(compiled, cfg)}
    models = {"eager": eager, "compiled": compiled}
    generator = torch.Generator().manual_seed(0)
    x, y = random_batch(torch.randint(0, config.vocab_size, (100_000,), generator=generator),
                        batch, seq, generator)

    def step(name):
        return train_step(models[name], optimizers[name], (x, y), cfg.lr, cfg.grad_clip, dtype)

    start = time.perf_counter()
    first = step("compiled")  # compiles forward and backward
    compile_seconds = time.perf_counter() - start
    losses = {"eager": [step("eager")], "compiled": [first]}
    for _ in range(compare_steps - 1):
        for name in models:
            losses[name].append(step(name))
    worst = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"]))
    tokens = batch * seq
    tokens_per_s = {name: tokens / cuda_time(lambda name=name: step(name), repeats=timed_steps)
                    for name in models}
    record = {"config": dataclasses.asdict(config), "batch": [batch, seq], "autocast": str(dtype),
              "losses": losses, "first_step_loss_abs_diff": abs(losses["eager"][0] - losses["compiled"][0]),
              "max_loss_abs_diff": worst, "loss_tolerance": loss_tol,
              "first_compiled_step_seconds": round(compile_seconds, 2),
              "tokens_per_s": {k: round(v) for k, v in tokens_per_s.items()},
              "speedup": round(tokens_per_s["compiled"] / tokens_per_s["eager"], 3)}
    record["ok"] = all(map(math.isfinite, losses["compiled"])) and worst <= loss_tol
    record["summary"] = (f"max |loss diff| {worst:.1e} over {compare_steps} steps; compile "
                         f"{compile_seconds:.0f} s; {tokens_per_s['eager']:,.0f} tokens/s eager, "
                         f"{tokens_per_s['compiled']:,.0f} compiled ({record['speedup']:.2f}x)")
    return record


# ---- 5. the "gpu" preset's model, trained -----------------------------------------------------

def check_gpu_preset_training(steps: int, eval_batches: int = 8, timed_steps: int = 10) -> dict:
    """The "gpu" preset's model and TrainConfig, only max_steps and the evaluation changed, trained
    with llmbook.train.train under precision "auto" on the offline corpus as bytes."""
    preset = PRESETS["gpu"]
    cfg = dataclasses.replace(preset.train, max_steps=steps, eval_interval=steps, eval_batches=eval_batches)
    train_tokens, val_tokens = offline_byte_tokens(preset.val_fraction)
    torch.manual_seed(cfg.seed)
    model = GPT(preset.model).cuda()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    log = train(model, train_tokens, val_tokens, cfg, progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    tokens_per_step = cfg.batch_size * cfg.seq_len
    step_flops = 3 * matmul_flops(preset.model, cfg.batch_size, cfg.seq_len)
    # Steady state: more steps of the same model and batch shape, timed one by one (the run's
    # average above includes the first steps' warm-up and the final evaluation).
    optimizer = make_optimizer(model, cfg)
    batch = random_batch(train_tokens, cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(1))
    dtype = autocast_dtype(cfg.precision, torch.device("cuda"))
    step_seconds = cuda_time(lambda: train_step(model, optimizer, batch, cfg.min_lr, cfg.grad_clip, dtype),
                             repeats=timed_steps)
    peak = device_peak_flops()
    last = statistics.mean(log.train_loss[-10:])
    record = {
        "config": dataclasses.asdict(preset.model), "train_config": dataclasses.asdict(cfg),
        "parameters": parameter_count(preset.model), "data": "offline corpus as UTF-8 bytes",
        "train_tokens": len(train_tokens), "val_tokens": len(val_tokens), "autocast": str(dtype),
        "steps": steps, "train_seconds": round(seconds, 2),
        "tokens_per_s": round(steps * tokens_per_step / seconds),
        "steady_tokens_per_s": round(tokens_per_step / step_seconds),
        "step_model_flops": step_flops, "peak_bf16_flops": peak,
        "mfu": step_flops / step_seconds / peak if peak else None,
        "mfu_whole_run": step_flops * steps / seconds / peak if peak else None,
        "first_loss": log.train_loss[0], "last_loss": log.train_loss[-1], "last10_mean_loss": last,
        "val_loss": log.val_loss[-1], "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    record["ok"] = (all(map(math.isfinite, log.train_loss)) and math.isfinite(record["val_loss"])
                    and last < record["first_loss"] and record["val_loss"] < record["first_loss"])
    mfu = f", MFU {record['mfu']:.1%}" if record["mfu"] is not None else ", no MFU (GPU not in the table)"
    record["summary"] = (f"{steps} steps: loss {record['first_loss']:.3f} -> {last:.3f} (val {record['val_loss']:.3f}); "
                         f"{record['tokens_per_s']:,} tokens/s whole run, {record['steady_tokens_per_s']:,} "
                         f"steady{mfu}")
    return record


# ---- 6. nccl ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_nccl() -> dict:
    """A one-process nccl group, made as llmbook.launch.init_worker makes one (device_id given),
    running the collectives the book's parallel code uses; each result is checked."""
    if not dist.is_nccl_available():
        raise RuntimeError("this torch build has no nccl backend")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60), device_id=device)
    try:
        results = {}
        t = torch.full((1 << 20,), 2.5, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        results["all_reduce_sum"] = bool((t == 2.5).all())
        work = dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True)  # as data_parallel overlaps it
        work.wait()
        results["all_reduce_avg_async"] = bool((t == 2.5).all())
        b = torch.arange(16.0, device=device)
        dist.broadcast(b, src=0)
        results["broadcast"] = bool((b == torch.arange(16.0, device=device)).all())
        gathered = torch.empty(16, device=device)
        dist.all_gather_into_tensor(gathered, b)
        results["all_gather_into_tensor"] = bool((gathered == b).all())
        scattered = torch.empty(16, device=device)
        dist.reduce_scatter_tensor(scattered, b)
        results["reduce_scatter_tensor"] = bool((scattered == b).all())
        objects = [None]
        dist.all_gather_object(objects, {"rank": 0})
        results["all_gather_object"] = objects == [{"rank": 0}]
        dist.barrier()
        torch.cuda.synchronize()
        results["barrier"] = True
    finally:
        dist.destroy_process_group()
    nccl_version = torch.cuda.nccl.version()
    record = {"results": results, "nccl_version": ".".join(map(str, nccl_version))
              if isinstance(nccl_version, tuple) else str(nccl_version),
              "destroyed": not dist.is_initialized(), "ok": all(results.values()) and not dist.is_initialized()}
    failed = [name for name, passed in results.items() if not passed]
    record["summary"] = (f"nccl {record['nccl_version']}: {len(results)} collectives "
                         + ("all correct" if not failed else f"wrong: {failed}"))
    return record


# ---- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the gpu preset's model")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file of results")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    results = {"cuda": torch.cuda.is_available(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
               "started": datetime.now(UTC).isoformat(timespec="seconds"), "command": sys.argv}
    if not results["cuda"]:
        build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        reason = f"No CUDA GPU found (torch.cuda.is_available() is False, {build}): nothing was run."
        results.update(reason=reason, all_ok=None, checks={})
        write_json(results, args.out)
        print(f"{reason} Wrote {args.out}.")
        return 0

    results["checks"] = {}
    start = time.perf_counter()
    run_check("cuda_basics", check_cuda_basics, results, args.out)
    run_check("sdpa_flash", check_sdpa_flash, results, args.out)
    run_check("gpt_bf16_autocast", check_gpt_bf16_autocast, results, args.out)
    run_check("torch_compile", check_torch_compile, results, args.out)
    run_check("gpu_preset_training", lambda: check_gpu_preset_training(args.steps), results, args.out)
    run_check("nccl", check_nccl, results, args.out)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["all_ok"] = all(check["ok"] for check in results["checks"].values())
    write_json(results, args.out)

    failed = [name for name, check in results["checks"].items() if not check["ok"]]
    print(f"\n{len(results['checks']) - len(failed)}/{len(results['checks'])} checks passed in "
          f"{results['seconds']:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else "")
          + f". Results in {args.out}.")
    return 0 if results["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
