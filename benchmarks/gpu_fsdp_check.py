"""FSDP2 on one GPU: SFT and DPO through alignkit's engine on randomly initialised Llama models
of real shapes (SmolLM2-135M and SmolLM2-1.7B), in bf16; prints tokens/s, model-FLOPs
utilisation and peak GPU memory as a table.

    python benchmarks/gpu_fsdp_check.py            # a GPU machine: about 2 minutes
    python benchmarks/gpu_fsdp_check.py --smoke    # a tiny shape, on the CPU when there is no GPU

Runs from a plain copy of the repository (no install): the repository goes on ``sys.path``.
alignkit's engine needs pydantic and PyYAML besides torch and transformers; nothing else
optional (gguf, datasets, trl) is imported on this path. A GPU machine with no package index
and no pydantic can take wheels fetched beforehand on a machine that has one, e.g.

    pip download -d .whl --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 pydantic
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site

What runs is the stages' own code: ``TokenTask`` (SFT) and ``DPOTask`` with the precomputed
reference (its tables computed by the stage's ``compute_tables``) trained by
``alignkit.engine.loop.fit`` with ``train.parallel: fsdp`` (one process, a one-rank group:
``fully_shard`` per decoder layer, bf16 compute, fp32 shards and reduction), once with each
``train.fsdp_param_dtype`` (fp32: the default; bf16: gathered in bf16). Only the model
loading is bypassed: the weights are random, built on the GPU in code (no download, no disk).
The data are random token ids written to a temporary folder as JSONL and read back. Each run is
repeated without FSDP (``parallel: auto`` in one process: fp32 weights under bf16 autocast), so
the table shows what sharding costs on one GPU (``--no-baseline`` skips those).

MFU = 6·N·tokens/s ÷ peak, N = parameters (tied embeddings once), tokens = non-pad tokens
(prompt and completion; DPO counts both rows of a pair). The usual approximation: attention's
T² FLOPs are left out, and the LM head, which alignkit runs only on completion positions, is
counted on every token; at T = 1024 the two are a few per cent each and of opposite sign.
The step-1 loss of DPO is ln 2 = 0.6931 when the policy computes exactly as its precomputed
reference did.
Peak: 989 TFLOP/s dense bf16 for an H100/H200 SXM (756 for an H100 PCIe), and the bf16 matmul
rate measured here (8192³, the best this GPU reaches on a plain GEMM).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

T0 = time.perf_counter()

SHAPES = {  # SmolLM2 configurations (HuggingFaceTB/SmolLM2-*/config.json), tied embeddings
    "135M": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, intermediate_size=1536, vocab_size=49152),
    "1.7B": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, intermediate_size=8192, vocab_size=49152),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=512),
}
# (shape, stage) → (examples per step, micro-batches per step, sequence length, steps).
# DPO examples are pairs (two rows each). 1.7B: two micro-batches keep activations small
# enough for an 80 GB card without activation checkpointing.
PLAN = {
    ("135M", "sft"): (16, 1, 1024, 20), ("135M", "dpo"): (8, 1, 1024, 20),
    ("1.7B", "sft"): (8, 2, 1024, 16), ("1.7B", "dpo"): (4, 2, 1024, 16),
    ("tiny", "sft"): (4, 1, 64, 4), ("tiny", "dpo"): (4, 1, 64, 4),
}
WARMUP_STEPS = 3  # steps left out of the rate (allocator growth, kernel selection)


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def spec_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    if "H100" in name or "H200" in name:
        return 989e12
    return None


def measured_matmul_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 50
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3)


def build_model(shape: str, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=True,
                      rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "sdpa" if device.type == "cuda" else "eager"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)  # fp32 master weights; FSDP computes in bf16
    return model


def write_tokens(path: Path, stage: str, n: int, length: int, vocab: int) -> Path:
    """n random examples: a prompt of length/4 tokens and completions filling the rest."""
    rng = random.Random(0)
    prompt = length // 4

    def ids(k):
        return [rng.randrange(3, vocab) for _ in range(k)]

    with open(path, "w") as f:
        for _ in range(n):
            rec = ({"prompt_ids": ids(prompt), "completion_ids": ids(length - prompt)}
                   if stage == "sft" else
                   {"prompt_ids": ids(prompt), "chosen_ids": ids(length - prompt),
                    "rejected_ids": ids(length - prompt)})
            f.write(json.dumps(rec) + "\n")
    return path


def read_sft(path: Path):
    from alignkit.data.templates import Encoded
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        ids = r["prompt_ids"] + r["completion_ids"]
        out.append(Encoded(ids, [False] * len(r["prompt_ids"]) + [True] * len(r["completion_ids"])))
    return out


def read_pairs(path: Path):
    from alignkit.data.preference import EncodedPair
    return [EncodedPair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])
            for r in map(json.loads, path.read_text().splitlines())]


def train_one(shape: str, stage: str, parallel: str, rt, tmp: Path) -> dict:
    from alignkit.config.schema import DPOConfig, TrainConfig
    from alignkit.engine.loop import fit
    from alignkit.models.reference import Precomputed, compute_tables
    from alignkit.stages.dpo import DPOTask, PreferenceRows
    from alignkit.stages.sft import TokenTask

    batch, accum, length, steps = PLAN[(shape, stage)]
    train = TrainConfig(parallel="auto" if parallel == "none" else "fsdp",
                        fsdp_param_dtype="bf16" if parallel == "fsdp-bf16" else "fp32",
                        precision="bf16", device=rt.device.type,
                        batch_size=batch, grad_accum=accum, max_steps=steps, lr=1e-5,
                        warmup_steps=0, schedule="constant", progress=False, log_every=1,
                        max_grad_norm=1.0)
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(rt.device)
    say(f"{shape} {stage}: building the model")
    model = build_model(shape, rt.device)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights once
    vocab = model.config.vocab_size
    data = write_tokens(tmp / f"{shape}-{stage}.jsonl", stage, batch * steps, length, vocab)
    if stage == "sft":
        task = TokenTask(model, read_sft(data), [], pad_id=0)
    else:
        rows = PreferenceRows(read_pairs(data), [], pad_id=0, ranked=False)
        say(f"{shape} dpo: reference log-probs (before sharding)")
        ref = Precomputed(compute_tables(model, rows, rt, batch_size=batch // accum))
        task = DPOTask(rows, model, ref, DPOConfig(train=train, beta=0.1))
    say(f"{shape} {stage}: {n_params / 1e6:.4g}M parameters; {steps} steps of {batch} "
        f"{'pairs' if stage == 'dpo' else 'sequences'} × {length} tokens ({parallel}, bf16)")
    t = time.perf_counter()
    run = tmp / f"run-{shape}-{stage}-{parallel}"
    result = fit(task, model, train, rt, output=run, log=say)
    wall = time.perf_counter() - t
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    steady = rates[WARMUP_STEPS:] or rates
    losses = [r["loss"] for r in rows if "loss" in r]
    out = {"shape": shape, "stage": stage, "parallel": parallel, "params": n_params,
           "batch": batch, "length": length,
           "steps": result.steps, "tokens_per_s": statistics.median(steady), "wall_s": wall,
           "loss_first": losses[0], "loss_last": losses[-1],
           "peak_gib": (torch.cuda.max_memory_allocated(rt.device) / 2**30
                        if rt.device.type == "cuda" else None)}
    say(f"{shape} {stage} {parallel}: {out['tokens_per_s']:,.0f} tokens/s, loss "
        f"{losses[0]:.4f} → {losses[-1]:.4f}, {wall:.1f}s")
    del task, model, result
    gc.collect()
    return out


def table(results: list[dict], spec: float | None, measured: float | None, device: str) -> str:
    lines = [f"device: {device}; peak bf16: spec {spec / 1e12:.0f} TFLOP/s" if spec else
             f"device: {device}; no spec peak known",
             f"measured bf16 matmul (8192³): {measured / 1e12:.0f} TFLOP/s" if measured else
             "measured bf16 matmul: n/a", "",
             "| model | stage | parallel | params | batch × tokens | tokens/s | model TFLOP/s "
             "| MFU (spec) | MFU (measured) | peak GPU GiB | step-1 loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['stage']} | {r['parallel']} | | | "
                         f"{r['error']} | | | | | |")
            continue
        flops = 6 * r["params"] * r["tokens_per_s"]
        unit = "pairs" if r["stage"] == "dpo" else "seq"
        mfu = [f"{flops / p:.1%}" if p else "n/a" for p in (spec, measured)]
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        mode = {"fsdp": "FSDP2, fp32 gather", "fsdp-bf16": "FSDP2, bf16 gather"}.get(
            r["parallel"], "none")
        lines.append(f"| {r['shape']} | {r['stage']} | {mode} | {r['params'] / 1e6:.4g}M | "
                     f"{r['batch']} {unit} × {r['length']} | {r['tokens_per_s']:,.0f} | "
                     f"{flops / 1e12:.1f} | {mfu[0]} | {mfu[1]} | {peak} | "
                     f"{r['loss_first']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny shape (CPU without a GPU)")
    ap.add_argument("--shapes", default=None, help="comma-separated, of " + ", ".join(SHAPES))
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the unsharded runs (the same training without FSDP)")
    args = ap.parse_args()
    shapes = (args.shapes.split(",") if args.shapes else ["tiny"] if args.smoke
              else ["135M", "1.7B"])
    # One process: a one-rank group as torchrun would describe it (FSDP2 needs a group).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("ALIGNKIT_CACHE", tempfile.mkdtemp(prefix="alignkit-cache-"))
    from alignkit.engine.device import resolve_runtime
    rt = resolve_runtime("auto", "bf16")
    device = (torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda"
              else f"CPU ({torch.get_num_threads()} threads)")
    say(f"torch {torch.__version__} on {device}")
    spec, measured = spec_peak(rt.device), measured_matmul_peak(rt.device)
    if measured:
        say(f"bf16 matmul: {measured / 1e12:.0f} TFLOP/s")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        modes = ("fsdp", "fsdp-bf16") + (() if args.no_baseline else ("none",))
        for shape in shapes:
            for stage in ("sft", "dpo"):
                for parallel in modes:
                    try:
                        results.append(train_one(shape, stage, parallel, rt, Path(tmp)))
                    except torch.OutOfMemoryError:
                        say(f"{shape} {stage} {parallel}: out of GPU memory")
                        results.append({"shape": shape, "stage": stage, "parallel": parallel,
                                        "error": "out of memory"})
                        gc.collect()
                        torch.cuda.empty_cache()
    print("\n" + table(results, spec, measured, device), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__,
                                               "spec_peak": spec, "measured_peak": measured,
                                               "results": results}, indent=2))
    say("done")


if __name__ == "__main__":
    main()
