"""alignkit and TRL side by side on the same work: throughput, peak memory and MFU, one table.

    bash benchmarks/setup_trl.sh                                   # once: benchmarks/.venv-trl
    nice -n 19 benchmarks/.venv-trl/bin/python benchmarks/compare_trl.py [--workloads sft,dpo]
        [--steps 10] [--repeats 3] [--quick]

Workloads (data from ``../shared/data``, read-only; a workload whose data is missing is skipped):

- ``sft``    Alpaca sample, prompt → completion conversations, loss on the completion.
- ``reward`` HH-RLHF pairs, Bradley–Terry reward model (a scalar head on the trunk).
- ``dpo``    HH-RLHF pairs, sigmoid DPO, β 0.1.
- ``rl``     HH-RLHF prompts; alignkit PPO, RLOO and GRPO vs TRL's RLOOTrainer and GRPOTrainer,
             all with the same prompts per rollout, samples per prompt, new tokens, minibatch,
             updates per rollout, KL β (0.05, a reference model in memory for every run) and
             reward (``alignkit.assets.rewards:positive_words``, a Python function, for all).

Same for every run of a workload: the model (the embedded SmolLM2-135M-Instruct folder, fp32
weights, full fine-tuning), the data file (written once per benchmark, one file both tools read:
TRL's conversational format, which alignkit reads too), the tokenizer's chat template, the batch
(no accumulation), the maximum length, bf16 autocast (alignkit ``precision bf16``, TRL
``bf16=True``: fp32 master weights both), the number of optimizer steps, the torch threads and the
seed (repeat r uses seed r for every run). Examples longer than the maximum length are filtered
out when the data file is written, so neither tool truncates and both train on the same tokens.

Each measurement is its own process (alignkit and TRL in the same virtual environment, one
torch), run in alternation (the order rotates each repeat), ``--repeats`` times. The process
times every optimizer step of its tool (a global ``torch.optim`` step hook, so the same clock
for both tools) and counts the non-pad tokens of every gradient-enabled forward of the decoder
trunk (``LlamaModel.forward``: the attention mask's sum; reference, generation and other no-grad
forwards are not counted). The throughput window runs from the end of the last warm-up step to
the end of the last step: model loading, tokenisation, alignkit's reward-head probe and both
tools' reference log-prob precompute happen before it and are excluded for both tools; warm-up
steps (``--warmup``; RL: the first rollout and its updates) are excluded too. Peak memory is
the process's peak resident set (``VmHWM``) read at its last optimizer step, so it includes
loading and the precompute but not alignkit's final save. MFU = model FLOPs/s ÷ the bf16 matmul
rate measured at the start (the best of a few large bf16 matmuls on the same threads):
6·N per trained token (N: parameters, tied embeddings once; the reward model's N leaves out the
unused LM head); RL: (2 generation + 2 reference + 6·updates)·N per sampled token (prompt and
completion), the critic of PPO not counted. The usual approximation: attention's T² term is
left out.

TRL runs twice per workload:

- ``trl-defaults``: TRL's own defaults for everything the work does not fix. That includes
  ``gradient_checkpointing=True`` (TRL's default since 1.0), Transformers' default attention
  (SDPA), and for DPO a reference model kept in memory and run every step.
- ``trl-best``: the fastest TRL settings found for a CPU: ``gradient_checkpointing=False``,
  eager attention (``model_init_kwargs``; SDPA's CPU backward is slower at these lengths, as
  alignkit measured for its own default), ``dataloader_pin_memory=False`` (nothing to pin to),
  ``train_sampling_strategy="group_by_length"`` for SFT, reward and DPO (length-grouped
  batches: less padding; for pairs TRL needs a ``length`` column and
  ``remove_unused_columns=False``, since its sampler cannot infer a pair's length; the sampler
  puts the longest batch first, so it lands in the warm-up and slightly flatters TRL's
  examples/s, not its tokens/s), and for DPO
  ``precompute_ref_log_probs=True`` (no reference in memory, no reference forward per step).
  Left off on purpose: ``padding_free`` (needs FlashAttention; TRL 1.x DPO ignores it),
  ``use_liger_kernel`` (Triton, GPU only), ``packing`` (changes the work), dataloader workers
  (the cores are the bottleneck), ``torch_compile`` (not a TRL default; its CPU compile time
  exceeds a short run).
alignkit runs with its defaults plus ``train.group_by_length`` for SFT, reward and DPO (off by
default, as TRL's sampler is; on here because TRL's best run groups by length too). Its DPO
uses prefix sharing (its default) and a precomputed reference (its default for full
fine-tuning).

Both TRL runs use ``disable_tqdm`` and ``report_to="none"`` (no progress bar or tracker in
the timings), ``save_strategy="no"``, and load the model from the folder path as a user would
(TRL's default dtype: fp32).

Output: a table of medians with min–max over repeats, the ratios alignkit ÷ TRL (per repeat,
then median and min–max), and a JSON file in ``benchmarks/results/``. Per-run logs go to
``benchmarks/results/<stamp>/``. None of this is a test: it needs the whole machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
DATA = ROOT.parent / "shared" / "data"
RESULTS = HERE / "results"
RESULT_TAG = "BENCH_RESULT "
UNITS = {"sft": "seq", "reward": "pairs", "dpo": "pairs", "rl": "prompts"}
RL_BETA = 0.05
DPO_BETA = 0.1


# ---------------------------------------------------------------------------------------------
# Data: one file per workload, written once, read by both tools


def _tokenizer():
    from alignkit.models.load import embedded_model_dir
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(embedded_model_dir())


def _chat_len(tok, messages: list[dict], *, generation_prompt: bool = False) -> int:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return len(ids)


def _hh_files() -> list[Path]:
    return sorted(DATA.glob("hh-rlhf/*/train.jsonl"))


def _sample_lines(files: list[Path], seed: int) -> list[str]:
    lines = [ln for f in files for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    random.Random(seed).shuffle(lines)
    return lines


def write_sft(out: Path, n: int, max_length: int, tok) -> dict:
    convs = []
    for line in _sample_lines([DATA / "alpaca" / "alpaca_train.jsonl"], seed=0):
        r = json.loads(line)
        user = r["instruction"] + (("\n\n" + r["input"]) if r.get("input", "").strip() else "")
        if not user.strip() or not r.get("output", "").strip():
            continue
        prompt = [{"role": "user", "content": user}]
        completion = [{"role": "assistant", "content": r["output"]}]
        length = _chat_len(tok, prompt + completion)
        if length <= max_length:
            convs.append(({"prompt": prompt, "completion": completion}, length))
        if len(convs) == n:
            break
    return _write(out, convs, n, "Alpaca records", max_length)


def _hh_pairs(n_wanted: int, tmp: Path) -> list:
    """HH transcripts → (prompt messages, chosen, rejected) through alignkit's own HH parser,
    on a seeded sample of lines (the whole files take minutes to parse)."""
    from alignkit.data.preference import load_preferences
    sample = tmp / "hh_sample.jsonl"
    sample.write_text("\n".join(_sample_lines(_hh_files(), seed=0)[: 8 * n_wanted + 64]) + "\n",
                      encoding="utf-8")
    items, _ = load_preferences(str(sample), fmt="hh")
    return items


def write_pairs(out: Path, n: int, max_length: int, tok, tmp: Path) -> dict:
    rows = []
    for it in _hh_pairs(n, tmp):
        prompt = list(it.prompt)
        chosen = [{"role": "assistant", "content": it.chosen}]
        rejected = [{"role": "assistant", "content": it.rejected}]
        lc, lr = _chat_len(tok, prompt + chosen), _chat_len(tok, prompt + rejected)
        if max(lc, lr) <= max_length:
            rows.append(({"prompt": prompt, "chosen": chosen, "rejected": rejected}, lc + lr))
        if len(rows) == n:
            break
    return _write(out, rows, n, "HH pairs", max_length)


def write_prompts(out: Path, n: int, max_prompt_length: int, tok, tmp: Path) -> dict:
    rows, seen = [], set()
    for it in _hh_pairs(n, tmp):
        key = json.dumps(it.prompt, sort_keys=True)
        length = _chat_len(tok, list(it.prompt), generation_prompt=True)
        if key not in seen and length <= max_prompt_length:
            seen.add(key)
            rows.append(({"prompt": list(it.prompt)}, length))
        if len(rows) == n:
            break
    return _write(out, rows, n, "HH prompts", max_prompt_length)


def _write(out: Path, rows: list, n: int, what: str, limit: int) -> dict:
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} {what} fit {limit} tokens, {n} needed: raise "
                         "--max-length or lower --steps/--batch")
    out.write_text("".join(json.dumps(r) + "\n" for r, _ in rows), encoding="utf-8")
    lengths = [x for _, x in rows]
    return {"path": str(out), "examples": n, "mean_tokens": statistics.mean(lengths),
            "max_tokens": max(lengths)}


# ---------------------------------------------------------------------------------------------
# The child: one measurement in its own process


class Probe:
    """Optimizer-step timestamps, trained tokens per step and the peak RSS at the last step."""

    def __init__(self, total_steps: int) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook
        from transformers.models.llama import modeling_llama
        self.total, self.t0 = total_steps, time.perf_counter()
        self.events: list[tuple[int, float, int]] = []  # (optimizer key, time, tokens so far)
        self.tokens, self.rss_at_last, self.keys = 0, None, set()
        register_optimizer_step_post_hook(self._on_step)
        original = modeling_llama.LlamaModel.forward

        def counted(module, *args, **kwargs):
            if torch.is_grad_enabled():
                mask = kwargs.get("attention_mask")
                ids = kwargs.get("input_ids", args[0] if args else None)
                pos = kwargs.get("position_ids")
                if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                    self.tokens += int(mask.sum())
                elif isinstance(mask, torch.Tensor) and isinstance(pos, torch.Tensor):
                    # alignkit's prefix-shared rows (4-D mask): padding sits at position 0
                    # after the first column, so the real tokens are the column-0 token of
                    # each row and every position > 0.
                    self.tokens += int((pos > 0).sum()) + pos.shape[0]
                elif ids is not None:  # padding-free: no mask, no pad
                    self.tokens += ids.numel()
            return original(module, *args, **kwargs)

        modeling_llama.LlamaModel.forward = counted

    def _on_step(self, optimizer, args, kwargs) -> None:
        # A key of our own, not id(): a freed optimizer's id can be reused by the next one.
        key = optimizer.__dict__.setdefault("_bench_key", len(self.keys))
        self.keys.add(key)
        self.events.append((key, time.perf_counter() - self.t0, self.tokens))
        # The training optimizer is the one that steps last (alignkit's reward-head probe steps
        # an L-BFGS before training starts).
        train = [e for e in self.events if e[0] == key]
        if len(train) == self.total:
            self.rss_at_last = vm_hwm_mib()

    def result(self) -> dict:
        if not self.events:
            return {"steps_t": [], "tokens": []}
        last = self.events[-1][0]
        train = [e for e in self.events if e[0] == last]
        prior = [e for e in self.events if e[0] != last and e[1] <= train[0][1]]
        before = prior[-1][2] if prior else 0
        counts = [e[2] for e in train]
        tokens = [counts[0] - before] + [b - a for a, b in zip(counts, counts[1:])]
        return {"steps_t": [round(e[1], 4) for e in train], "tokens": tokens,
                "rss_peak_mib": self.rss_at_last or vm_hwm_mib()}


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


TRL_SEEN: dict = {}  # the settings a TRL run actually trained with
RL_LENGTHS: list[list[int]] = []  # completion tokens per reward call (one call per rollout)
_TOK = []


def _completion_tokens(texts: list[str]) -> list[int]:
    if not _TOK:
        _TOK.append(_tokenizer())
    return [len(_TOK[0](t, add_special_tokens=False)["input_ids"]) for t in texts]


def rl_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """alignkit's reward_fn protocol; the same scores as :func:`rl_reward_trl`."""
    from alignkit.assets.rewards import positive_words
    RL_LENGTHS.append(_completion_tokens(responses))
    return positive_words(prompts, responses)


def rl_reward_trl(prompts, completions, **kwargs) -> list[float]:
    """TRL's reward-function protocol (conversational completions: message lists)."""
    from alignkit.assets.rewards import positive_words
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    RL_LENGTHS.append(_completion_tokens(texts))
    return positive_words([""] * len(texts), texts)


def child(spec: dict) -> None:
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["tool"] == "peak":
        print(RESULT_TAG + json.dumps(matmul_peak(spec["sizes"])), flush=True)
        return
    sys.path.insert(0, str(HERE))  # alignkit imports the reward function as compare_trl:rl_reward
    import compare_trl as bench_module  # the module alignkit's reward_fn import will also find
    probe = Probe(spec["total_steps"])
    t0 = time.perf_counter()
    if spec["tool"] == "alignkit":
        _alignkit(spec)
    else:
        _trl(spec)
    out = probe.result() | {"wall_s": round(time.perf_counter() - t0, 2),
                            "rss_exit_mib": vm_hwm_mib(), "threads": torch.get_num_threads(),
                            "rl_lengths": bench_module.RL_LENGTHS or RL_LENGTHS,
                            "trl_settings": TRL_SEEN}
    print(RESULT_TAG + json.dumps(out), flush=True)


def matmul_peak(sizes: list[int]) -> dict:
    """Best bf16 matmul rate over a few large square products (TFLOP/s)."""
    import torch
    best = {}
    for n in sizes:
        a = torch.randn(n, n, dtype=torch.bfloat16)
        b = torch.randn(n, n, dtype=torch.bfloat16)
        a @ b  # warm-up: oneDNN picks its kernel
        rates = []
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            rates.append(2 * n**3 / (time.perf_counter() - t) / 1e12)
        best[n] = max(rates)
    return {"tflops": max(best.values()), "by_size": best, "threads": torch.get_num_threads()}


def _alignkit(spec: dict) -> None:
    from alignkit.config.load import build_config
    w = spec["workload"]
    common = {"output": spec["out"], "data.path": spec["data"], "data.template": "chat",
              "train.max_steps": spec["total_steps"], "train.batch_size": spec["batch"],
              "train.grad_accum": 1, "train.precision": "bf16", "train.device": "cpu",
              "train.seed": spec["seed"], "train.progress": False}
    if w != "rl":
        # length-grouped batches, as TRL's best settings have them (alignkit's default is off)
        common |= {"data.max_length": spec["max_length"], "data.eval_fraction": 0.0,
                   "train.group_by_length": True}
    match w:
        case "sft":
            from alignkit.config.schema import SFTConfig as schema
            from alignkit.stages.sft import run
            common["data.format"] = "prompt_completion"
        case "reward":
            from alignkit.config.schema import RewardConfig as schema
            from alignkit.stages.reward import run
            common["data.format"] = "pairs"
        case "dpo":
            from alignkit.config.schema import DPOConfig as schema
            from alignkit.stages.dpo import run
            common |= {"data.format": "pairs", "beta": DPO_BETA}
        case "rl":
            from alignkit.config.ppo import PPOConfig as schema
            from alignkit.stages.ppo import run
            rl = spec["rl"]
            common |= {"algo": spec["algo"], "data.format": "prompts",
                       "data.max_prompt_length": rl["max_prompt_length"],
                       "rollout.prompts": rl["prompts"], "rollout.group_size": rl["group"],
                       "rollout.max_new_tokens": rl["new_tokens"],
                       "rollout.batch_size": rl["prompts"] * rl["group"],
                       "ppo_epochs": rl["epochs"], "kl_coef": RL_BETA, "sample_every": 0,
                       "reward_fn": "compare_trl:rl_reward"}
    cfg = build_config(schema, overrides=common)
    run(cfg, overwrite=True, log=lambda s: print(s, file=sys.stderr, flush=True))


def _trl(spec: dict) -> None:
    import datasets
    import trl
    w, best = spec["workload"], spec["variant"] == "best"
    rows = [json.loads(x) for x in Path(spec["data"]).read_text(encoding="utf-8").splitlines()]
    ds = datasets.Dataset.from_list(rows)
    args = dict(output_dir=spec["out"], max_steps=spec["total_steps"],
                per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
                bf16=True, use_cpu=True, report_to="none", save_strategy="no",
                seed=spec["seed"], data_seed=spec["seed"], disable_tqdm=True)
    if best:
        args |= dict(gradient_checkpointing=False, dataloader_pin_memory=False,
                     model_init_kwargs={"attn_implementation": "eager"})
        if w != "rl":
            args["train_sampling_strategy"] = "group_by_length"
        if w in ("reward", "dpo"):
            # The sampler infers lengths only from an ``input_ids`` column, which TRL's pair
            # datasets lack; it reads a ``length`` column instead, which survives only without
            # TRL's column pruning (the pair collators take their own keys and ignore the rest).
            tok = _tokenizer()
            ds = ds.add_column("length", [max(_chat_len(tok, r["prompt"] + r["chosen"]),
                                              _chat_len(tok, r["prompt"] + r["rejected"]))
                                          for r in rows])
            args["remove_unused_columns"] = False
    if w != "rl":
        args["max_length"] = spec["max_length"]
    model = spec["model"]
    match w:
        case "sft":
            trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**args), train_dataset=ds)
        case "reward":
            trainer = trl.RewardTrainer(model=model, args=trl.RewardConfig(**args),
                                        train_dataset=ds)
        case "dpo":
            args |= dict(beta=DPO_BETA, precompute_ref_log_probs=best)
            trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**args), train_dataset=ds)
        case "rl":
            rl = spec["rl"]
            args |= dict(num_generations=rl["group"], max_completion_length=rl["new_tokens"],
                         steps_per_generation=rl["prompts"] * rl["group"] // spec["batch"],
                         num_iterations=rl["epochs"], beta=RL_BETA, temperature=1.0,
                         top_p=1.0)
            cls, cfg = ((trl.GRPOTrainer, trl.GRPOConfig) if spec["algo"] == "grpo"
                        else (trl.RLOOTrainer, trl.RLOOConfig))
            trainer = cls(model=model, reward_funcs=rl_reward_trl, args=cfg(**args),
                          train_dataset=ds)
    trainer.train()
    model = trainer.model
    # What actually ran, for the record: TRL maps deprecated names and model_init_kwargs itself.
    TRL_SEEN.update(activation_checkpointing=bool(getattr(model, "is_gradient_checkpointing",
                                                          False)),
                    attn_implementation=getattr(model.config, "_attn_implementation", None),
                    dtype=str(next(model.parameters()).dtype),
                    reference_model=getattr(trainer, "ref_model", None) is not None)


# ---------------------------------------------------------------------------------------------
# The parent: data, alternation, summary


def run_child(spec: dict, log_path: Path, tmp_root: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="run-", dir=tmp_root))
    cache = out / "alignkit-cache"  # a fresh reference-log-prob cache per run, the model shared
    (cache / "models").parent.mkdir(parents=True)
    from alignkit.models.load import embedded_model_dir
    (cache / "models").symlink_to(embedded_model_dir().parent)
    spec = spec | {"out": str(out / "run")}
    env = os.environ | {"ALIGNKIT_CACHE": str(cache), "PYTHONPATH": str(ROOT),
                        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log,
                                  text=True)
            log.write("\n--- stdout ---\n" + proc.stdout)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        return {"error": f"exit {proc.returncode}; log {log_path}:\n{tail}"}
    return json.loads(lines[-1][len(RESULT_TAG):])


def window(res: dict, spec: dict) -> dict:
    """Throughput over the steps after warm-up (see the module docstring)."""
    t, tok = res["steps_t"], res["tokens"]
    n, w = spec["total_steps"], spec["warmup_steps"]
    if len(t) != n:
        return {"error": f"{len(t)} optimizer steps seen, {n} expected"}
    secs = t[-1] - t[w - 1]
    tokens = sum(tok[w:])
    if spec["workload"] == "rl":
        rl = spec["rl"]
        units = (n - w) // spec["steps_per_rollout"] * rl["prompts"]
    else:
        units = (n - w) * spec["batch"]
    out = {"window_s": secs, "units_per_s": units / secs, "tokens_per_s": tokens / secs,
           "rss_mib": res["rss_peak_mib"], "wall_s": res["wall_s"]}
    if spec["workload"] == "rl":
        lens = [x for call in res["rl_lengths"][1:] for x in call] or [0]
        out["completion_tokens"] = statistics.mean(lens)
    return out


def model_flops_per_unit(spec: dict, meta: dict, res_window: dict) -> float:
    """Model FLOPs per second of the window (see the module docstring)."""
    n_params = meta["params"] - (meta["lm_head"] if spec["workload"] == "reward" else 0)
    if spec["workload"] != "rl":
        return 6 * n_params * res_window["tokens_per_s"]
    rl = spec["rl"]
    seq = meta["rl_prompt_tokens"] + res_window.get("completion_tokens", 0)
    per_token = 2 + (2 if RL_BETA > 0 else 0) + 6 * rl["epochs"]
    return per_token * n_params * seq * rl["group"] * res_window["units_per_s"]


def model_meta() -> dict:
    from alignkit.models.load import embedded_model_dir
    from safetensors import safe_open
    folder = embedded_model_dir()
    cfg = json.loads((folder / "config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        params = 0
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            params += n
    return {"path": str(folder), "params": params,
            "lm_head": cfg["vocab_size"] * cfg["hidden_size"]}


def configs(args) -> dict[str, list[dict]]:
    """Workload → the runs to alternate."""
    trl_variants = [v for v in args.trl_variants.split(",") if v]
    out = {}
    for w in args.workloads.split(","):
        if w == "rl":
            algos = [a for a in args.rl_algos.split(",") if a]
            runs = [{"name": f"alignkit-{a}", "tool": "alignkit", "algo": a} for a in algos]
            runs += [{"name": f"trl-{a}-{v}", "tool": "trl", "algo": a, "variant": v}
                     for a in ("rloo", "grpo") if a in algos or "ppo" in algos
                     for v in trl_variants]
        else:
            runs = [{"name": "alignkit", "tool": "alignkit"}]
            runs += [{"name": f"trl-{v}", "tool": "trl", "variant": v} for v in trl_variants]
        out[w] = runs
    return out


def ratio_pairs(workload: str, names: list[str]) -> list[tuple[str, str]]:
    mine = [n for n in names if n.startswith("alignkit")]
    theirs = [n for n in names if n.startswith("trl")]
    if workload != "rl":
        return [(a, t) for a in mine for t in theirs]
    # RL: the same algorithm where TRL has it; PPO against both TRL algorithms.
    return [(a, t) for a in mine for t in theirs
            if a.endswith("-ppo") or t.split("-")[1] == a.split("-")[1]]


def spread(xs: list[float], fmt: str = "{:.1f}") -> str:
    if not xs:
        return "—"
    med = statistics.median(xs)
    return fmt.format(med) + (f" ({fmt.format(min(xs))}–{fmt.format(max(xs))})"
                              if len(xs) > 1 else "")


def summarise(results: dict, peak: float) -> tuple[str, dict]:
    lines, summary = [], {}
    lines.append(f"bf16 matmul peak: {peak:.2f} TFLOP/s\n")
    lines.append("| workload | run | units/s | tokens/s | peak RSS MiB | MFU % | window s |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for w, runs in results.items():
        summary[w] = {}
        for name, reps in runs.items():
            ok = [r for r in reps if "error" not in r]
            if not ok:
                lines.append(f"| {w} | {name} | failed | | | | |")
                summary[w][name] = {"error": reps[0]["error"] if reps else "not run"}
                continue
            col = {k: [r[k] for r in ok] for k in ("units_per_s", "tokens_per_s", "rss_mib",
                                                   "mfu", "window_s")}
            summary[w][name] = {k: {"median": statistics.median(v), "min": min(v),
                                    "max": max(v)} for k, v in col.items()}
            tok = "—" if w == "rl" else spread(col["tokens_per_s"], "{:.0f}")
            extra = (f" [{statistics.mean(r['completion_tokens'] for r in ok):.0f} new tok]"
                     if w == "rl" else "")
            lines.append(f"| {w} | {name} | {spread(col['units_per_s'], '{:.3g}')} "
                         f"{UNITS[w]}/s{extra} | {tok} | {spread(col['rss_mib'], '{:.0f}')} | "
                         f"{spread([100 * m for m in col['mfu']], '{:.2f}')} | "
                         f"{spread(col['window_s'], '{:.1f}')} |")
    lines.append("\nRatios alignkit ÷ TRL, per repeat (median, min–max): throughput "
                 "(>1: alignkit faster) and peak memory (<1: alignkit leaner).\n")
    lines.append("| workload | alignkit | vs | units/s | tokens/s | peak RSS |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for w, runs in results.items():
        for a, t in ratio_pairs(w, list(runs)):
            pairs = [(x, y) for x, y in zip(runs[a], runs[t]) if "error" not in x
                     and "error" not in y]
            if not pairs:
                continue
            r = {k: [x[k] / y[k] for x, y in pairs if y[k]] for k in
                 ("units_per_s", "tokens_per_s", "rss_mib")}
            summary[w][f"{a} / {t}"] = {k: {"median": statistics.median(v), "min": min(v),
                                            "max": max(v)} for k, v in r.items() if v}
            tok = "—" if w == "rl" else spread(r["tokens_per_s"], "{:.2f}×")
            lines.append(f"| {w} | {a} | {t} | {spread(r['units_per_s'], '{:.2f}×')} | {tok} | "
                         f"{spread(r['rss_mib'], '{:.2f}×')} |")
    return "\n".join(lines), summary


def machine() -> dict:
    import torch
    import transformers
    import trl
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    return {"cpu": cpu, "cores": os.cpu_count(), "amx_bf16": "amx_bf16" in flags,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "python": platform.python_version()}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="sft,reward,dpo,rl")
    ap.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps, not measured")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="examples (pairs) per step")
    ap.add_argument("--max-length", type=int, default=256,
                    help="tokens per sequence (prompt + one completion)")
    ap.add_argument("--rl-prompts", type=int, default=8, help="prompts per rollout")
    ap.add_argument("--rl-group", type=int, default=4, help="samples per prompt")
    ap.add_argument("--rl-new-tokens", type=int, default=64)
    ap.add_argument("--rl-batch", type=int, default=8, help="sequences per update")
    ap.add_argument("--rl-epochs", type=int, default=1, help="passes over each rollout")
    ap.add_argument("--rl-rollouts", type=int, default=3, help="measured rollouts (+1 warm-up)")
    ap.add_argument("--rl-max-prompt-length", type=int, default=128)
    ap.add_argument("--rl-algos", default="ppo,rloo,grpo", help="alignkit's RL algorithms")
    ap.add_argument("--trl-variants", default="defaults,best")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every run (default: torch's own choice)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 steps after 1 warm-up, 1 repeat, batch 2, length 96")
    ap.add_argument("--output", default=None, help="JSON file (default benchmarks/results/)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.batch, args.max_length = 2, 1, 1, 2, 96
        args.rl_prompts, args.rl_group, args.rl_new_tokens, args.rl_batch = 2, 2, 8, 4
        args.rl_rollouts, args.rl_max_prompt_length = 1, 64
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return
    try:
        import alignkit  # noqa: F401
        import trl  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"{err}: run `bash benchmarks/setup_trl.sh` and use "
                         "benchmarks/.venv-trl/bin/python") from None
    workloads = configs(args)
    needs = {"sft": [DATA / "alpaca" / "alpaca_train.jsonl"], "reward": _hh_files(),
             "dpo": _hh_files(), "rl": _hh_files()}
    for w in list(workloads):
        if w not in needs:
            raise SystemExit(f"unknown workload '{w}'; choose from {', '.join(needs)}")
        if not needs[w] or not all(p.is_file() for p in needs[w]):
            print(f"skipping {w}: its data is not under {DATA}", flush=True)
            del workloads[w]
    if not workloads:
        raise SystemExit("nothing to run")
    if args.rl_prompts * args.rl_group % args.rl_batch:
        raise SystemExit("--rl-prompts × --rl-group must be a multiple of --rl-batch")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / stamp
    logs.mkdir(parents=True, exist_ok=True)
    meta = model_meta()
    info = machine()
    print(f"machine: {info}\nmodel: {meta['params']:,} parameters ({meta['path']})", flush=True)
    with tempfile.TemporaryDirectory(prefix="compare-trl-") as tmp_s:
        tmp = Path(tmp_s)
        peak = run_child({"tool": "peak", "threads": args.threads,
                          "sizes": [1024] if args.quick else [2048, 4096]},
                         logs / "peak.log", tmp)
        if "error" in peak:
            raise SystemExit(peak["error"])
        print(f"bf16 matmul peak: {peak['tflops']:.2f} TFLOP/s ({peak['threads']} threads)",
              flush=True)
        tok = _tokenizer()
        steps_per_rollout = args.rl_epochs * args.rl_prompts * args.rl_group // args.rl_batch
        base = {"model": meta["path"], "threads": args.threads}
        specs, data_info = {}, {}
        for w in workloads:
            path = tmp / f"{w}.jsonl"
            if w == "rl":
                n = args.rl_prompts * (args.rl_rollouts + 1)
                data_info[w] = write_prompts(path, n, args.rl_max_prompt_length, tok, tmp)
                meta["rl_prompt_tokens"] = data_info[w]["mean_tokens"]
                specs[w] = base | {
                    "workload": w, "data": str(path), "batch": args.rl_batch,
                    "total_steps": steps_per_rollout * (args.rl_rollouts + 1),
                    "warmup_steps": steps_per_rollout, "steps_per_rollout": steps_per_rollout,
                    "rl": {"prompts": args.rl_prompts, "group": args.rl_group,
                           "new_tokens": args.rl_new_tokens, "epochs": args.rl_epochs,
                           "max_prompt_length": args.rl_max_prompt_length}}
                continue
            n = (args.steps + args.warmup) * args.batch
            data_info[w] = (write_sft(path, n, args.max_length, tok) if w == "sft" else
                            write_pairs(path, n, args.max_length, tok, tmp))
            specs[w] = base | {"workload": w, "data": str(path), "batch": args.batch,
                               "max_length": args.max_length,
                               "total_steps": args.steps + args.warmup,
                               "warmup_steps": args.warmup}
            print(f"{w} data: {data_info[w]['examples']} examples, mean "
                  f"{data_info[w]['mean_tokens']:.0f} tokens", flush=True)
        results: dict = {w: {r["name"]: [] for r in runs} for w, runs in workloads.items()}
        for w, runs in workloads.items():
            for rep in range(args.repeats):
                order = runs[rep % len(runs):] + runs[:rep % len(runs)]
                for run in order:
                    spec = specs[w] | {k: v for k, v in run.items() if k != "name"} | {
                        "seed": rep}
                    res = run_child(spec, logs / f"{w}-{run['name']}-r{rep}.log", tmp)
                    if "error" not in res:
                        res = window(res, spec) | {"raw": res}
                    if "error" not in res:
                        res["mfu"] = model_flops_per_unit(spec, meta, res) / (peak["tflops"] * 1e12)
                        print(f"{w} repeat {rep + 1} {run['name']}: "
                              f"{res['units_per_s']:.3g} {UNITS[w]}/s, "
                              f"{res['tokens_per_s']:.0f} tokens/s, peak RSS "
                              f"{res['rss_mib']:.0f} MiB, window {res['window_s']:.1f} s, "
                              f"run {res['wall_s']:.0f} s", flush=True)
                    else:
                        print(f"{w} repeat {rep + 1} {run['name']}: FAILED\n{res['error']}",
                              flush=True)
                    results[w][run["name"]].append(res)
    table, summary = summarise(results, peak["tflops"])
    print("\n" + table)
    out = Path(args.output) if args.output else RESULTS / f"compare_trl-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps({"args": vars(args), "machine": info, "model": meta,
                                   "peak": peak, "data": data_info, "summary": summary,
                                   "runs": results, "table": table}, indent=1),
                       encoding="utf-8")
    tmp_out.replace(out)
    print(f"\nwritten: {out} (logs in {logs})")
    if any("error" in r for runs in results.values() for reps in runs.values() for r in reps):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
