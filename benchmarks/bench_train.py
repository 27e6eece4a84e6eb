"""Speed of the book's CPU training step: tokens/s and "CPU MFU" against this machine's matmul peak.

    python benchmarks/bench_train.py                         the "book" preset, batch 16 x 256 tokens
    python benchmarks/bench_train.py --preset cpu --steps 3  a quick look at the tiny preset

Peak: the best of a few timed square matmuls (--matmul-size, 2048 by default; 2 n^3 FLOPs each,
after warm-ups) in fp32 and in bf16, in GFLOP/s, measured in the same run on the same threads.
A CPU without AVX-512 BF16 or AMX (llmbook.train.has_fast_bf16 is False) emulates bf16 matmuls,
orders of magnitude slower than fp32; there the bf16 peak is taken from one small matmul (512) so
that it costs a fraction of a second, and the script says that the CPU has no fast bf16.

Step: llmbook.train.train_step (forward and loss under autocast, backward, gradient clipping,
AdamW from llmbook.train.make_optimizer) on the preset's GPTConfig with its TrainConfig's batch
size and sequence length, on synthetic batches. Steps are timed after --warmup steps, in fp32 and,
only where the CPU has fast bf16 (or with --force-bf16), under bf16 autocast; with both, steps
alternate between the precisions so that a noisy neighbour slows both alike. Reported per precision:
the median step time, tokens/s, achieved GFLOP/s and MFU = achieved / measured peak of the same
precision (bf16 also against the fp32 peak). The model FLOPs of a step are 3 x the forward matmul
FLOPs of llmbook.model.matmul_flops (attention counted over all T x T scores), the convention of
PaLM's appendix B (Chowdhery et al., 2022), as in bench_model.py; the elementwise work (norms,
activations, softmax, AdamW) is not counted, so a small model's MFU is low even on an idle machine.

Loss: where bf16 runs, --loss-steps steps (20 by default) of fp32 and of bf16 from the same initial
weights on the same batches, with the preset's learning-rate schedule; the final losses and their
difference are reported. The batches are windows of a token stream drawn from a fixed random
sparse bigram table (each token has 4 likely successors), so the loss falls as it would on text.

The script prints its results and writes nothing, unless --json FILE asks for them in a file.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from llmbook.model import GPT, matmul_flops
from llmbook.train import (
    PRESETS,
    get_preset,
    has_fast_bf16,
    learning_rate,
    make_optimizer,
    matmul_peak,
    random_batch,
    train_step,
)

SLOW_BF16_MATMUL_SIZE = 512  # ~0.27 GFLOP: a fraction of a second even at ~1 GFLOP/s of emulated bf16


def bigram_stream(vocab_size: int, length: int, seed: int, successors: int = 4) -> torch.Tensor:
    """A token stream from a random sparse bigram table: after token t comes one of `successors`
    fixed tokens, chosen uniformly (1 time in 10 any token, so every token keeps appearing)."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab_size, (vocab_size, successors), generator=generator).tolist()
    picks = torch.randint(0, successors, (length,), generator=generator).tolist()
    jumps = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
    escape = (torch.rand(length, generator=generator) < 0.1).tolist()
    tokens, token = [], 0
    for i in range(length):
        token = jumps[i] if escape[i] else table[token][picks[i]]
        tokens.append(token)
    return torch.tensor(tokens, dtype=torch.long)


def make_batches(stream: torch.Tensor, n: int, batch_size: int, seq_len: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [random_batch(stream, batch_size, seq_len, generator) for _ in range(n)]


def timed_step(model, optimizer, batch, lr, grad_clip, dtype) -> float:
    start = time.perf_counter()
    train_step(model, optimizer, batch, lr, grad_clip, dtype)  # returns loss.item(): the step is done
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="book", choices=list(PRESETS), help="model and batch shape (default: book)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per precision")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per precision first")
    parser.add_argument("--loss-steps", type=int, default=20, help="steps of the fp32 vs bf16 loss comparison (0: skip)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n matmuls that measure the peak")
    parser.add_argument("--matmul-repeats", type=int, default=5, help="timed matmuls per precision (best is kept)")
    parser.add_argument("--force-bf16", action="store_true",
                        help="also run bf16 (full-size peak matmuls, steps, loss) on a CPU without fast bf16: slow")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.loss_steps < 0:
        parser.error("--steps must be >= 1, --warmup and --loss-steps >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    cpu = torch.device("cpu")
    fast_bf16 = has_fast_bf16(cpu)
    run_bf16 = fast_bf16 or args.force_bf16
    preset = get_preset(args.preset)
    config, cfg = preset.model, preset.train
    batch_size, seq_len = cfg.batch_size, cfg.seq_len
    tokens = batch_size * seq_len
    step_flops = 3 * matmul_flops(config, batch_size, seq_len)

    # The peak, measured before the steps, on the same threads.
    peak = {"fp32": matmul_peak(torch.float32, args.matmul_size, args.matmul_repeats) / 1e9}
    if fast_bf16 or args.force_bf16:
        bf16_size, bf16_repeats = args.matmul_size, args.matmul_repeats
    else:
        bf16_size, bf16_repeats = min(args.matmul_size, SLOW_BF16_MATMUL_SIZE), 1
    peak["bf16"] = matmul_peak(torch.bfloat16, bf16_size, bf16_repeats) / 1e9

    # Models: the same initial weights for every precision.
    torch.manual_seed(args.seed)
    initial = GPT(config).train()
    n_params = sum(p.numel() for p in initial.parameters())
    precisions = {"fp32": None, **({"bf16": torch.bfloat16} if run_bf16 else {})}
    n_batches = max(args.warmup + args.steps, args.loss_steps)
    stream = bigram_stream(config.vocab_size, max(n_batches * tokens, 20 * (seq_len + 1)), args.seed)
    batches = make_batches(stream, n_batches, batch_size, seq_len, args.seed + 1)

    runs = {}
    for name in precisions:
        model = copy.deepcopy(initial)  # deepcopy keeps the tied head tied
        runs[name] = (model, make_optimizer(model, cfg))
    for i in range(args.warmup):  # allocator, oneDNN primitives
        for name, dtype in precisions.items():
            model, optimizer = runs[name]
            timed_step(model, optimizer, batches[i], cfg.lr, cfg.grad_clip, dtype)
    times = {name: [] for name in precisions}
    for i in range(args.steps):  # alternate precisions: a noisy neighbour slows both alike
        batch = batches[args.warmup + i]
        for name, dtype in precisions.items():
            model, optimizer = runs[name]
            times[name].append(timed_step(model, optimizer, batch, cfg.lr, cfg.grad_clip, dtype))
    del runs

    # Loss comparison: fresh copies of the same weights, the same batches, the preset's schedule.
    losses = {}
    if run_bf16 and args.loss_steps:
        for name, dtype in precisions.items():
            model = copy.deepcopy(initial)
            optimizer = make_optimizer(model, cfg)
            losses[name] = [train_step(model, optimizer, batches[step], learning_rate(step, cfg), cfg.grad_clip, dtype)
                            for step in range(args.loss_steps)]

    # Report.
    results = {"preset": args.preset, "threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
               "fast_bf16": fast_bf16, "parameters": n_params, "batch_size": batch_size, "seq_len": seq_len,
               "step_gflop": step_flops / 1e9, "steps": args.steps, "warmup": args.warmup,
               "peak_gflops": {"fp32": peak["fp32"], "bf16": peak["bf16"]},
               "peak_matmul_size": {"fp32": args.matmul_size, "bf16": bf16_size}, "precisions": {}}
    print(f"CPU: {results['threads']} threads, capability {results['cpu_capability']}, torch {torch.__version__}; "
          f"fast bf16 (AVX-512 BF16 / AMX): {'yes' if fast_bf16 else 'no'}")
    print(f"preset {args.preset!r}: {config.n_layer} layers, d_model {config.d_model}, {config.n_head} heads, "
          f"vocab {config.vocab_size}; {n_params:,} parameters; batch {batch_size} x {seq_len} = {tokens:,} tokens; "
          f"{step_flops / 1e9:.2f} GFLOP per step (3 x forward matmuls)")
    print(f"matmul peak: fp32 {peak['fp32']:8.1f} GFLOP/s (best of {args.matmul_repeats}, n={args.matmul_size})")
    if fast_bf16 or args.force_bf16:
        note = "" if fast_bf16 else "  [no fast bf16: emulated]"
        print(f"             bf16 {peak['bf16']:8.1f} GFLOP/s (best of {bf16_repeats}, n={bf16_size}){note}")
    else:
        print(f"             bf16 {peak['bf16']:8.1f} GFLOP/s (one matmul, n={bf16_size}): this CPU has no fast "
              f"bf16 (no AVX-512 BF16 / AMX), bf16 is emulated; bf16 steps skipped (--force-bf16 to run them)")
    print()
    print(f"median of {args.steps} steps after {args.warmup} warm-up steps")
    header = f"{'precision':<10} {'ms/step':>10} {'tokens/s':>10} {'GFLOP/s':>9} {'MFU':>8}   {'MFU vs fp32 peak':>16}"
    print(header)
    print("-" * len(header))
    for name in precisions:
        seconds = statistics.median(times[name])
        achieved = step_flops / seconds / 1e9
        row = {"median_step_s": seconds, "step_times_s": times[name], "tokens_per_s": tokens / seconds,
               "achieved_gflops": achieved, "mfu": achieved / peak[name], "mfu_vs_fp32_peak": achieved / peak["fp32"]}
        results["precisions"][name] = row
        vs_fp32 = f"{row['mfu_vs_fp32_peak']:16.1%}" if name != "fp32" else ""
        print(f"{name:<10} {seconds * 1e3:10.1f} {row['tokens_per_s']:10.0f} {achieved:9.1f} {row['mfu']:8.1%}   {vs_fp32}".rstrip())
    if run_bf16:
        ratio = statistics.median(times["fp32"]) / statistics.median(times["bf16"])
        results["bf16_speedup"] = ratio
        print(f"bf16 speed-up over fp32: {ratio:.2f}x")
    print()
    if losses:
        final = {name: values[-1] for name, values in losses.items()}
        max_diff = max(abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"]))
        results["loss"] = {"steps": args.loss_steps, "fp32": losses["fp32"], "bf16": losses["bf16"],
                           "final_difference": final["bf16"] - final["fp32"], "max_abs_difference": max_diff}
        print(f"loss after {args.loss_steps} steps from the same weights and batches: fp32 {final['fp32']:.4f}, "
              f"bf16 {final['bf16']:.4f}, bf16 - fp32 = {final['bf16'] - final['fp32']:+.4f} "
              f"(largest |difference| over the steps {max_diff:.4f}; first loss {losses['fp32'][0]:.4f})")
    elif not run_bf16:
        results["loss"] = None
        print("loss comparison bf16 vs fp32: skipped, this CPU has no fast bf16 (--force-bf16 runs it emulated)")
    else:
        results["loss"] = None
        print("loss comparison bf16 vs fp32: skipped (--loss-steps 0)")

    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
