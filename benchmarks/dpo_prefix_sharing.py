"""DPO forward+backward with and without prefix sharing: pairs/s and tokens computed per pair.

    nice -n 19 .venv/bin/python benchmarks/dpo_prefix_sharing.py [--model PATH|tiny]
        [--pairs 8] [--batches 4] [--repeats 5] [--max-length 256] [--threads N]

The pairs are the first ``--pairs × --batches`` that DPO keeps of HH-RLHF
(``../shared/data/hh-rlhf/*/train.jsonl``, the first file; skipped with a message when absent),
loaded and tokenised by DPO's own code (:func:`alignkit.stages.dpo.preference_rows`: chat
template, ``--max-length``, truncate_left), in data order. One measurement is a
forward+backward of DPO's loss module (sigmoid, a precomputed reference of zeros: the policy
forward is all that runs, as in training) over every batch, under bf16 autocast where the
hardware is fast at it (alignkit's ``precision auto``; fp32 elsewhere), full
fine-tuning of the model loaded by :func:`alignkit.models.load.load_causal_lm` (default: the
embedded model; ``tiny``: the random test model) with the attention alignkit picks for the device.
Plain (2B rows prompt + reply) and shared (B rows ``[prompt | chosen | rejected]``) alternate,
the first of each repeat rotating, after one unmeasured warm-up pass of each.

Prints per layout the median pairs/s and its min–max, the ratio shared ÷ plain (per repeat,
then median and min–max), and per pair the tokens computed (non-pad) and the padded positions
the trunk runs over. Not a test: give it a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
LAYOUTS = ("plain", "shared")


def load(args):
    """(model, {layout: PreferenceRows}) or None when the data is missing."""
    from alignkit.config.schema import DPOConfig, ModelConfig
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.stages import dpo

    files = sorted(DATA.glob("hh-rlhf/*/train.jsonl"))
    if not files:
        print(f"skipped: no HH-RLHF data at {DATA}/hh-rlhf/*/train.jsonl")
        return None
    cfg = DPOConfig(model=ModelConfig(name_or_path=args.model), prefix_sharing="off",
                    data={"path": str(files[0]), "max_length": args.max_length,
                          # twice the records needed: loading drops a few (empty sides, …)
                          "max_examples": 2 * args.pairs * args.batches, "eval_fraction": 0.0})
    tokenizer = load_tokenizer(cfg.model)
    rows, _ = dpo.preference_rows(cfg, tokenizer, log=lambda msg: print(msg, flush=True))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_causal_lm(cfg.model, device=device)
    train = rows.splits["train"]
    layouts = {name: dpo.PreferenceRows(train, [], pad_id=rows.pad_id, ranked=False,
                                        shared=name == "shared") for name in LAYOUTS}
    return model.train(), layouts


def batches(rows, n_pairs: int, n_batches: int,
            device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The loss module's inputs for up to ``n_batches`` consecutive batches of ``n_pairs``, on
    ``device``, with reference log-probs of 0 (a precomputed reference costs nothing per step)."""
    n = min(rows.num_examples("train") // n_pairs, n_batches) * n_pairs
    out = []
    for start in range(0, n, n_pairs):
        inputs, _ = rows.model_inputs(list(range(start, start + n_pairs)), "train")
        inputs["ref_logps"] = torch.zeros(2 * n_pairs)  # (2B,)
        out.append({k: v.to(device) for k, v in inputs.items()})
    return out


def positions(batch: dict[str, torch.Tensor]) -> int:
    """Padded positions the trunk runs over: rows × width."""
    return batch["input_ids"].numel()


def one_pass(loss_module, model, data: list[dict[str, torch.Tensor]], rt) -> float:
    """Seconds for forward+backward over every batch under ``rt.autocast()``."""
    device = data[0]["input_ids"].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for inputs in data:
        model.zero_grad(set_to_none=True)
        with rt.autocast():
            loss, _ = loss_module(**inputs)
        loss.backward()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF id or folder, 'tiny'; default: embedded")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per batch")
    ap.add_argument("--batches", type=int, default=4, help="batches per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args)
    if loaded is None:
        return
    model, layouts = loaded
    from alignkit.config.schema import DPOConfig
    from alignkit.engine.device import resolve_runtime
    from alignkit.models.reference import Precomputed
    from alignkit.stages.dpo import PairDPOLoss

    device = next(model.parameters()).device
    rt = resolve_runtime(device.type)
    loss_module = PairDPOLoss(model, Precomputed({}), DPOConfig())
    data = {name: batches(rows, args.pairs, args.batches, device)
            for name, rows in layouts.items()}
    n_pairs = args.pairs * len(data["plain"])
    if n_pairs == 0:
        sys.exit(f"fewer than {args.pairs} pairs in the data; lower --pairs")
    n_idx = list(range(n_pairs))
    tokens = {name: rows.tokens(n_idx, "train") / n_pairs for name, rows in layouts.items()}
    padded = {name: sum(map(positions, d)) / n_pairs for name, d in data.items()}
    attn = model.config._attn_implementation
    print(f"{n_pairs} pairs ({len(data['plain'])} batches of {args.pairs}), {device.type}, "
          f"{'bf16 autocast' if rt.autocast_dtype else 'fp32'}, {attn} attention, "
          f"{torch.get_num_threads()} threads", flush=True)
    for name in LAYOUTS:  # warm-up: allocator, kernels, lazy init
        one_pass(loss_module, model, data[name], rt)
    rates: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for r in range(args.repeats):
        order = LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]
        for name in order:
            rates[name].append(n_pairs / one_pass(loss_module, model, data[name], rt))
        print(f"repeat {r + 1}: " + ", ".join(f"{n} {rates[n][-1]:.2f} pairs/s" for n in LAYOUTS),
              flush=True)
    ratios = [s / p for s, p in zip(rates["shared"], rates["plain"])]
    print("\n| layout | pairs/s (median) | min–max | tokens/pair | padded positions/pair |")
    print("| --- | --- | --- | --- | --- |")
    for name in LAYOUTS:
        v = rates[name]
        print(f"| {name} | {statistics.median(v):.2f} | {min(v):.2f}–{max(v):.2f} | "
              f"{tokens[name]:.1f} | {padded[name]:.1f} |")
    print(f"\nshared ÷ plain pairs/s: {statistics.median(ratios):.2f}x "
          f"(min–max {min(ratios):.2f}–{max(ratios):.2f} over {args.repeats} repeats)")


if __name__ == "__main__":
    main()
