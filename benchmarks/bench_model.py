"""One training step of our GPT against Hugging Face's GPT2LMHeadModel of the same shape.

    python benchmarks/bench_model.py                    GPT-2 small (124M), batch 2 x 256 tokens
    python benchmarks/bench_model.py --n-layer 4 --seq 128 --repeats 5   a quicker look

Both models get the same weights (ours is loaded from the Hugging Face state dict with
llmbook.model.load_gpt2_state_dict), the same batch, the same loss (cross-entropy over every
position) and their own AdamW step; dropout is off in both. A step is forward + backward +
optimizer step. Steps alternate between the two models, so a noisy neighbour slows both alike,
and each model's median step time is reported, with tokens/s and the ratio ours / Hugging Face.
Target on a CPU: ours at least as fast (ratio of throughputs >= 1.0).

On a GPU (CUDA), steps run under bf16 autocast; --compile also times torch.compile'd versions;
model FLOPs utilisation (MFU) is printed against the dense bf16 peak in PEAK_BF16_FLOPS. The model
FLOPs of a step are 3 x the forward matmul FLOPs of llmbook.model.matmul_flops (attention counted
over all T x T scores), the convention of PaLM's appendix B (Chowdhery et al., 2022).
The script prints its results and writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from llmbook.model import load_gpt2_state_dict, matmul_flops

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in FLOP/s.
PEAK_BF16_FLOPS = {
    "A100": 312e12,     # A100 SXM/PCIe
    "H100": 989.4e12,   # H100 SXM5 (the PCIe card is lower: 756e12)
    "H200": 989.4e12,   # same compute as H100 SXM
}


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def hugging_face_gpt2(n_layer: int, n_head: int, d_model: int, vocab_size: int, context_length: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=d_model, vocab_size=vocab_size,
                        n_positions=context_length, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def ours_step_loss(model, x, y):
    return model(x, y)


def hf_step_loss(model, x, y):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def make_step(model, loss_fn, dtype):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=next(model.parameters()).is_cuda or None)

    def step(x, y):
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def timed(step, x, y, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = step(x, y)
    loss.item()  # waits for the device
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    hf = hugging_face_gpt2(args.n_layer, args.n_head, args.d_model, args.vocab, max(1024, args.seq))
    ours = load_gpt2_state_dict(hf.state_dict(), n_head=args.n_head)
    hf, ours = hf.to(device).train(), ours.to(device).train()
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():  # same weights, same batch: the same loss before any step
        difference = abs(ours_step_loss(ours, x, y).item() - hf_step_loss(hf, x, y).item())
    assert difference < 1e-4, f"the two models disagree before training (|loss difference| = {difference})"

    contenders = {"ours": make_step(ours, ours_step_loss, dtype), "hugging face": make_step(hf, hf_step_loss, dtype)}
    if args.compile:
        contenders["ours (compiled)"] = make_step(torch.compile(ours), ours_step_loss, dtype)
        contenders["hugging face (compiled)"] = make_step(torch.compile(hf), hf_step_loss, dtype)
    times = {name: [] for name in contenders}
    for name, step in contenders.items():  # warm-up: allocator, kernels, compilation
        for _ in range(2):
            timed(step, x, y, device)
    for _ in range(args.repeats):
        for name, step in contenders.items():
            times[name].append(timed(step, x, y, device))

    tokens = args.batch * args.seq
    config = ours.config
    step_flops = 3 * matmul_flops(config, args.batch, args.seq)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = peak_flops(device_name) if device.type == "cuda" else None
    print(f"device: {device_name} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}, "
          f"{'bf16 autocast' if dtype else 'fp32'}")
    print(f"shape: {args.n_layer} layers, d_model {args.d_model}, {args.n_head} heads, vocab {args.vocab}, "
          f"batch {args.batch} x {args.seq} tokens; {sum(p.numel() for p in ours.parameters()):,} parameters; "
          f"{step_flops / 1e9:.1f} GFLOP per step; median of {args.repeats} steps")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in medians.items():
        line = f"  {name:<24} {seconds * 1e3:9.1f} ms/step {tokens / seconds:10.0f} tokens/s {step_flops / seconds / 1e9:8.1f} GFLOP/s"
        if peak:
            line += f"   MFU {step_flops / seconds / peak:6.1%} of {peak / 1e12:.0f} TFLOP/s"
        print(line)
    ratio = medians["hugging face"] / medians["ours"]
    print(f"throughput ours / hugging face: {ratio:.2f}x (target >= 1.0)")


if __name__ == "__main__":
    main()
