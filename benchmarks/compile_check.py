"""Does ``torch.compile`` pay for alignkit's training step? Eager vs compiled forward+backward.

    nice -n 19 .venv/bin/python benchmarks/compile_check.py [--model PATH|tiny] [--batch 8]
        [--lengths 128,192,256] [--batches 6] [--repeats 3] [--modes eager,layers,trunk]

The step measured is the one every alignkit stage runs: the decoder trunk over a right-padded
batch, then the LM head and an fp32 log-softmax on the completion positions only
(:func:`alignkit.models.logps.sequence_logps`, the second half of each row is the completion),
the summed log-prob as the loss, and its backward, under bf16 autocast (fp32 on a machine
without bf16 autocast). The batches are random token ids of ``--batch`` rows whose widths cycle
through ``--lengths`` (ragged rows inside each batch), so a compiled model meets several
shapes, as it does in training: the first pass over them pays the compilation (and any
recompilation for a new shape), later passes run the compiled kernels.

Modes, each its own copy of the model with the same weights:

- ``eager``: the model as alignkit trains it today;
- ``layers``: regional compilation, each decoder layer compiled in place
  (``layer.compile(dynamic=True)``; parameter names unchanged, one graph reused by every layer);
- ``trunk``: the whole decoder trunk compiled in place (``trunk.compile(dynamic=True)``).

Prints per mode the first pass's seconds (compilation included), then the steady-state
tokens/s (median and min–max over ``--repeats`` passes, modes alternating, the first of each
repeat rotating) and the ratio to eager per repeat. Not a test: give it a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def load_model(name: str | None):
    from alignkit.config.schema import ModelConfig
    from alignkit.models.load import load_causal_lm
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ModelConfig() if name is None else ModelConfig(name_or_path=name)
    model, _ = load_causal_lm(cfg, device=device)
    return model.train()


def make_batches(vocab: int, batch: int, lengths: list[int], n: int, device,
                 seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of ``batch`` rows; batch i is padded to lengths[i % len], its rows
    between half that width and all of it; loss_mask on the second half of each row."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        width = lengths[i % len(lengths)]
        real = torch.randint(width // 2, width + 1, (batch,), generator=gen)
        real[0] = width  # the batch really is this wide
        ids = torch.randint(3, vocab, (batch, width), generator=gen)
        pos = torch.arange(width).unsqueeze(0)
        attention = (pos < real.unsqueeze(1)).long()
        loss_mask = (pos >= (real // 2).unsqueeze(1)) & attention.bool()
        out.append({"input_ids": ids.to(device), "attention_mask": attention.to(device),
                    "loss_mask": loss_mask.to(device)})
    return out


def one_pass(model, batches, autocast_dtype) -> tuple[float, int]:
    """(seconds, non-pad tokens) of forward+backward over every batch."""
    from alignkit.models.logps import sequence_logps
    device = batches[0]["input_ids"].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, tokens = time.perf_counter(), 0
    for b in batches:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            out = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
        (-out.logps.sum() / out.n_tokens.sum()).backward()
        tokens += int(b["attention_mask"].sum())
    sync()
    return time.perf_counter() - t0, tokens


def compiled(model, mode: str):
    """A copy of ``model`` compiled as ``mode`` says (see the module docstring)."""
    if mode == "eager":
        return model
    from alignkit.models.logps import split_lm
    copy_ = copy.deepcopy(model)
    trunk = split_lm(copy_)[0]
    if mode == "layers":
        for layer in trunk.layers:
            layer.compile(dynamic=True)
    elif mode == "trunk":
        trunk.compile(dynamic=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}: eager, layers or trunk")
    return copy_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF id or folder, 'tiny'; default: embedded")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lengths", default="128,192,256")
    ap.add_argument("--batches", type=int, default=6, help="batches per pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="eager,layers,trunk")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from alignkit.engine.device import resolve_runtime
    base = load_model(args.model)
    device = next(base.parameters()).device
    dtype = resolve_runtime(device.type).autocast_dtype  # bf16 where the hardware is fast at it
    batches = make_batches(base.config.vocab_size, args.batch,
                           [int(x) for x in args.lengths.split(",")], args.batches, device)
    modes = [m for m in args.modes.split(",") if m]
    print(f"{device.type}, {'bf16 autocast' if dtype else 'fp32'}, "
          f"{base.config._attn_implementation} attention, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {args.batches} batches of {args.batch} rows, widths "
          f"{args.lengths}", flush=True)
    models, first = {}, {}
    for mode in modes:
        models[mode] = compiled(base, mode)
        secs, _ = one_pass(models[mode], batches, dtype)  # compiles every shape it meets
        first[mode] = secs
        print(f"{mode}: first pass {secs:.1f} s (compilation included)", flush=True)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeats):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for mode in order:
            secs, tokens = one_pass(models[mode], batches, dtype)
            rates[mode].append(tokens / secs)
        print(f"repeat {r + 1}: " + ", ".join(f"{m} {rates[m][-1]:.0f} tok/s" for m in modes),
              flush=True)
    print("\n| mode | first pass s | tokens/s (median) | min–max | ÷ eager (median, min–max) |")
    print("| --- | --- | --- | --- | --- |")
    for mode in modes:
        v = rates[mode]
        ratio = "—"
        if "eager" in rates and mode != "eager":
            rs = [a / b for a, b in zip(v, rates["eager"])]
            ratio = f"{statistics.median(rs):.2f}x ({min(rs):.2f}–{max(rs):.2f})"
        print(f"| {mode} | {first[mode]:.1f} | {statistics.median(v):.0f} | "
              f"{min(v):.0f}–{max(v):.0f} | {ratio} |")


if __name__ == "__main__":
    main()
