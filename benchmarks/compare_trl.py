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
(no accumulation), the maximum length, the precision (``--precision``; auto: bf16 autocast
where the hardware is fast at it — a GPU, a CPU with AMX or AVX512-BF16 — else fp32; bf16 is
alignkit ``precision bf16`` and TRL ``bf16=True``, fp32 master weights both; fp32 is alignkit
``precision fp32`` and TRL ``bf16=False``), the number of optimizer steps, the torch threads and the
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
loading and the precompute but not alignkit's final save. MFU = model FLOPs/s ÷ the matmul rate
measured at the start in the run's precision (the best of a few large products on the same
threads):
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

On a GPU (``--gpu``, or ``--device cuda`` by hand; ``benchmarks/gpu_compare.sh`` wraps it for a
machine without a package index or ``../shared/data``): alignkit ``train.device: cuda``, TRL
without ``use_cpu``; the step hook calls ``torch.cuda.synchronize()`` before it reads the clock
(and the token counts are summed on the GPU, read back at that synchronisation only); peak
memory is ``torch.cuda.max_memory_allocated()`` at the last step (reserved and the host's VmHWM
are reported too); the bf16 matmul peak is measured on the GPU (4096³ and 8192³, ten products
between synchronisations, best of five); trl-best keeps Transformers' default SDPA attention and
pinned memory (eager attention and no pinning were CPU choices). ``--model`` names another
model folder or a SmolLM2 shape (``135M``, ``360M``, ``1.7B``, ``tiny``); a shape, or
``--random-init``, writes one folder with the config, the tokenizer files and random fp32 weights
(seed 0) into the run's temporary folder, and both tools load that folder by path, so they train
the same weights. ``--data-dir`` reads the workload data from a bundle that ``--prepare-bundle``
wrote (the same rows, in the same order, that this script selects from ``../shared/data``; a
pool larger than one run needs, filtered at the bundle's maximum length) together with the
embedded model's config and tokenizer files. ``--budget-s`` stops starting runs after that many
seconds (repeat-major order then: every workload's first repeat comes first) and kills a run that
overruns it by more than a minute; the table covers what finished.
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
MODEL_ENV = "COMPARE_TRL_MODEL"  # set by the parent when the model is not the embedded one
BUNDLE_DATA = {"sft": "sft.jsonl", "reward": "pairs.jsonl", "dpo": "pairs.jsonl",
               "rl": "prompts.jsonl"}  # --data-dir/--prepare-bundle: DIR/data/<file>
# SmolLM2 shapes (HuggingFaceTB/SmolLM2-*/config.json) over the embedded model's config (135M):
# for --model SHAPE, random weights. Vocabulary and tied embeddings as the tokenizer needs them.
SHAPES = {
    "135M": {},
    "360M": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, intermediate_size=2560, head_dim=64),
    "1.7B": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, intermediate_size=8192, head_dim=64),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, head_dim=16),
}
# --gpu: defaults for one short run on one H100/H200 (explicit options still win). Process
# start, imports, CUDA and model loading (an estimated 10-20 s per run, not yet measured on a
# GPU) dominate the steps of a 135M model (well under a second each), so the preset keeps the
# number of runs down (RL: GRPO against TRL's GRPO only; 2 repeats: 24 runs) and spends the
# time on longer windows: 3 + 30 steps of 16 sequences (pairs) of up to 512 tokens; RL 16
# prompts × 4 samples, 64 new tokens, 4 updates per rollout, 1 + 3 rollouts. --budget-s 420
# keeps the whole run inside about 8 minutes: runs go repeat-major, so a cut drops only
# second repeats.
GPU_PRESET = dict(device="cuda", model="135M", steps=30, warmup=3, repeats=2, batch=16,
                  max_length=512, rl_prompts=16, rl_group=4, rl_new_tokens=64, rl_batch=16,
                  rl_epochs=1, rl_rollouts=3, rl_max_prompt_length=128, rl_algos="grpo",
                  budget_s=420.0, data_dir=str(RESULTS / "gpu_bundle" / "files"))


# ---------------------------------------------------------------------------------------------
# Data: one file per workload, written once, read by both tools


def _model_dir() -> Path:
    """The model folder both tools load: the embedded model unless the parent chose another."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    from alignkit.models.load import embedded_model_dir
    return embedded_model_dir()


def _tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(_model_dir())


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


def write_from_pool(out: Path, pool: Path, workload: str, n: int, limit: int, tok) -> dict:
    """The first ``n`` rows of a bundle's pool that fit ``limit``: the rows the ``write_*``
    functions above select, since the pool holds their candidates in their order."""
    rows = []
    for line in pool.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if workload == "sft":
            length = _chat_len(tok, r["prompt"] + r["completion"])
            fits = length <= limit
        elif workload == "rl":
            length = _chat_len(tok, r["prompt"], generation_prompt=True)
            fits = length <= limit
        else:
            lc = _chat_len(tok, r["prompt"] + r["chosen"])
            lr = _chat_len(tok, r["prompt"] + r["rejected"])
            length, fits = lc + lr, max(lc, lr) <= limit
        if fits:
            rows.append((r, length))
        if len(rows) == n:
            break
    return _write(out, rows, n, f"rows of {pool}", limit)


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
    """Optimizer-step timestamps, trained tokens per step and the peak RSS at the last step
    (on a GPU also the peak GPU memory, the clock read after a synchronisation)."""

    def __init__(self, total_steps: int, device: str = "cpu") -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook
        from transformers.models.llama import modeling_llama
        self.total, self.t0 = total_steps, time.perf_counter()
        self.events: list[tuple[int, float, int]] = []  # (optimizer key, time, tokens so far)
        self.tokens, self.rss_at_last, self.keys = 0, None, set()
        self.cuda, self.pending, self.gpu_at_last = device == "cuda", [], None
        register_optimizer_step_post_hook(self._on_step)
        original = modeling_llama.LlamaModel.forward
        # TRL's torch_compile compiles the whole model, this wrapper included: the count's int()
        # runs outside the graph (one clean break before the trunk, none inside it).
        count = torch.compiler.disable(self._count)

        def counted(module, *args, **kwargs):
            if torch.is_grad_enabled():
                mask = kwargs.get("attention_mask")
                ids = kwargs.get("input_ids", args[0] if args else None)
                pos = kwargs.get("position_ids")
                if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                    count(mask.sum())
                elif isinstance(mask, torch.Tensor) and isinstance(pos, torch.Tensor):
                    # alignkit's prefix-shared rows (4-D mask): padding sits at position 0
                    # after the first column, so the real tokens are the column-0 token of
                    # each row and every position > 0.
                    count((pos > 0).sum() + pos.shape[0])
                elif ids is not None:  # padding-free: no mask, no pad
                    self.tokens += ids.numel()
            return original(module, *args, **kwargs)

        modeling_llama.LlamaModel.forward = counted

    def _count(self, n) -> None:
        # On a GPU a count stays there until the next step's synchronisation: int() here would
        # stall every forward.
        if self.cuda and n.is_cuda:
            self.pending.append(n.detach())
        else:
            self.tokens += int(n)

    def _on_step(self, optimizer, args, kwargs) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize()  # the step's kernels have run: the clock means something
            self.tokens += sum(int(n) for n in self.pending)
            self.pending.clear()
        # A key of our own, not id(): a freed optimizer's id can be reused by the next one.
        key = optimizer.__dict__.setdefault("_bench_key", len(self.keys))
        self.keys.add(key)
        self.events.append((key, time.perf_counter() - self.t0, self.tokens))
        # The training optimizer is the one that steps last (alignkit's reward-head probe steps
        # an L-BFGS before training starts).
        train = [e for e in self.events if e[0] == key]
        if len(train) == self.total:
            self.rss_at_last = vm_hwm_mib()
            if self.cuda:
                self.gpu_at_last = gpu_peak_mib()

    def result(self) -> dict:
        if not self.events:
            return {"steps_t": [], "tokens": []}
        last = self.events[-1][0]
        train = [e for e in self.events if e[0] == last]
        prior = [e for e in self.events if e[0] != last and e[1] <= train[0][1]]
        before = prior[-1][2] if prior else 0
        counts = [e[2] for e in train]
        tokens = [counts[0] - before] + [b - a for a, b in zip(counts, counts[1:])]
        out = {"steps_t": [round(e[1], 4) for e in train], "tokens": tokens,
               "rss_peak_mib": self.rss_at_last or vm_hwm_mib()}
        if self.cuda:
            out |= self.gpu_at_last or gpu_peak_mib()
        return out


def gpu_peak_mib() -> dict:
    import torch
    return {"gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20,
            "gpu_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


TRL_SEEN: dict = {}  # the settings a TRL run actually trained with
ROLLOUT_SPLIT: list = []  # alignkit RL: each rollout's sampling, scoring, evaluation, update seconds
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
        print(RESULT_TAG + json.dumps(matmul_peak(spec["sizes"], spec.get("device", "cpu"),
                                                  spec.get("precision", "bf16"))),
              flush=True)
        return
    sys.path.insert(0, str(HERE))  # alignkit imports the reward function as compare_trl:rl_reward
    import compare_trl as bench_module  # the module alignkit's reward_fn import will also find
    probe = Probe(spec["total_steps"], spec.get("device", "cpu"))
    t0 = time.perf_counter()
    if spec["tool"] == "alignkit":
        _alignkit(spec)
    else:
        _trl(spec)
    out = probe.result() | {"wall_s": round(time.perf_counter() - t0, 2),
                            "rss_exit_mib": vm_hwm_mib(), "threads": torch.get_num_threads(),
                            "rl_lengths": bench_module.RL_LENGTHS or RL_LENGTHS,
                            "trl_settings": TRL_SEEN, "rollout_split": ROLLOUT_SPLIT}
    print(RESULT_TAG + json.dumps(out), flush=True)


def matmul_peak(sizes: list[int], device: str = "cpu", precision: str = "bf16") -> dict:
    """Best matmul rate in ``precision`` (bf16 or fp32) over a few large square products
    (TFLOP/s)."""
    import torch
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device == "cuda":
        return matmul_peak_cuda(sizes, dtype=dtype)
    best = {}
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up: oneDNN picks its kernel
        rates = []
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            rates.append(2 * n**3 / (time.perf_counter() - t) / 1e12)
        best[n] = max(rates)
    return {"tflops": max(best.values()), "by_size": best, "threads": torch.get_num_threads()}


def matmul_peak_cuda(sizes: list[int], reps: int = 10, dtype=None) -> dict:
    """The GPU's best matmul rate in ``dtype`` (bf16 by default): ``reps`` products between
    synchronisations, best of 5."""
    import torch
    dtype = dtype or torch.bfloat16
    best = {}
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device="cuda")
        b = torch.randn(n, n, dtype=dtype, device="cuda")
        c = torch.empty(n, n, dtype=dtype, device="cuda")
        for _ in range(3):  # warm-up: cuBLAS handle, kernel choice, clocks up
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        rates = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b, out=c)
            torch.cuda.synchronize()
            rates.append(2 * n**3 * reps / (time.perf_counter() - t) / 1e12)
        best[n] = max(rates)
        del a, b, c
    props = torch.cuda.get_device_properties(0)
    return {"tflops": max(best.values()), "by_size": best, "threads": torch.get_num_threads(),
            "gpu": {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                    "count": torch.cuda.device_count()}}


def _alignkit(spec: dict) -> None:
    from alignkit.config.load import build_config
    w = spec["workload"]
    common = {"output": spec["out"], "data.path": spec["data"], "data.template": "chat",
              "train.max_steps": spec["total_steps"], "train.batch_size": spec["batch"],
              "train.grad_accum": 1, "train.precision": spec.get("precision", "bf16"),
              "train.device": spec.get("device", "cpu"),
              "train.seed": spec["seed"], "train.progress": False}
    if spec.get("custom_model"):  # otherwise alignkit's default: the embedded model
        common["model.name_or_path"] = spec["model"]
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
            algo, _, critic = spec["algo"].partition("-")  # ppo-shared: critic_init shared
            if critic:
                common["critic_init"] = critic
            common |= {"algo": algo, "data.format": "prompts",
                       "data.max_prompt_length": rl["max_prompt_length"],
                       "rollout.prompts": rl["prompts"], "rollout.group_size": rl["group"],
                       "rollout.max_new_tokens": rl["new_tokens"],
                       "rollout.batch_size": rl["prompts"] * rl["group"],
                       "ppo_epochs": rl["epochs"], "kl_coef": RL_BETA, "sample_every": 0,
                       "reward_fn": "compare_trl:rl_reward"}
            if spec.get("device", "cpu") != "cpu":  # the default (1k tokens) suits a CPU only
                common["rollout.forward_tokens"] = 16384
    if spec.get("variant") == "compile":
        common["train.compile"] = True
    cfg = build_config(schema, overrides=common)
    folder = run(cfg, overwrite=True, log=lambda s: print(s, file=sys.stderr, flush=True))
    if w == "rl":  # opt_s of rollout i: the updates of rollout i - 1
        for line in (Path(folder) / "rollouts.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            ROLLOUT_SPLIT.append({k: r[k] for k in ("gen_s", "score_s", "eval_s", "opt_s")
                                  if k in r})


def _trl(spec: dict) -> None:
    import datasets
    import trl
    w, best = spec["workload"], spec["variant"] in ("best", "best-compile")
    cpu = spec.get("device", "cpu") == "cpu"
    rows = [json.loads(x) for x in Path(spec["data"]).read_text(encoding="utf-8").splitlines()]
    ds = datasets.Dataset.from_list(rows)
    args = dict(output_dir=spec["out"], max_steps=spec["total_steps"],
                per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
                bf16=spec.get("precision", "bf16") == "bf16", report_to="none",
                save_strategy="no",
                seed=spec["seed"], data_seed=spec["seed"], disable_tqdm=True)
    if cpu:
        args["use_cpu"] = True
    if best:
        args["gradient_checkpointing"] = False
        if cpu:  # on a GPU: Transformers' default SDPA attention and pinned memory
            args |= dict(dataloader_pin_memory=False,
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
    if spec["variant"] == "best-compile":
        args["torch_compile"] = True
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
                    device=str(next(model.parameters()).device),
                    reference_model=getattr(trainer, "ref_model", None) is not None)


# ---------------------------------------------------------------------------------------------
# The parent: data, alternation, summary


def run_child(spec: dict, log_path: Path, tmp_root: Path, timeout: float | None = None) -> dict:
    out = Path(tempfile.mkdtemp(prefix="run-", dir=tmp_root))
    cache = out / "alignkit-cache"  # a fresh reference-log-prob cache per run, the model shared
    (cache / "models").parent.mkdir(parents=True)
    if not os.environ.get(MODEL_ENV):  # another model is loaded by path: no embedded one needed
        from alignkit.models.load import embedded_model_dir
        (cache / "models").symlink_to(embedded_model_dir().parent)
    spec = spec | {"out": str(out / "run")}
    # The checkout first; a PYTHONPATH of the caller's (gpu_compare.sh's packages) after it.
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                          if os.environ.get("PYTHONPATH") else []))
    env = os.environ | {"ALIGNKIT_CACHE": str(cache), "PYTHONPATH": path,
                        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            try:
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log,
                                      text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return {"error": f"killed after {timeout:.0f} s (--budget-s); log {log_path}"}
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
    if "gpu_peak_mib" in res:
        out["gpu_mib"] = res["gpu_peak_mib"]
    if spec["workload"] == "rl":
        lens = [x for call in res["rl_lengths"][1:] for x in call] or [0]
        out["completion_tokens"] = statistics.mean(lens)
    return out


def rollout_split(res: dict) -> str:
    """alignkit RL: the median seconds of a measured rollout's sampling, its evaluation (the
    reference's and critic's forwards) and its updates (rollouts.jsonl's gen_s, eval_s and the
    next rollout's opt_s)."""
    split = res["raw"].get("rollout_split") or []
    if len(split) < 3:
        return ""
    gen = statistics.median(r["gen_s"] for r in split[1:])
    ev = statistics.median(r["eval_s"] for r in split[1:])
    opt = statistics.median(r["opt_s"] for r in split[2:])
    return f"; a rollout: sampling {gen:.1f} s, evaluation {ev:.1f} s, updates {opt:.1f} s"


def model_flops_per_unit(spec: dict, meta: dict, res_window: dict) -> float:
    """Model FLOPs per second of the window (see the module docstring)."""
    n_params = meta["params"] - (meta["lm_head"] if spec["workload"] == "reward" else 0)
    if spec["workload"] != "rl":
        return 6 * n_params * res_window["tokens_per_s"]
    rl = spec["rl"]
    seq = meta["rl_prompt_tokens"] + res_window.get("completion_tokens", 0)
    per_token = 2 + (2 if RL_BETA > 0 else 0) + 6 * rl["epochs"]
    return per_token * n_params * seq * rl["group"] * res_window["units_per_s"]


def model_meta(folder: Path | None = None) -> dict:
    from safetensors import safe_open
    if folder is None:
        from alignkit.models.load import embedded_model_dir
        folder = embedded_model_dir()
    cfg = json.loads((folder / "config.json").read_text())
    params = 0
    for file in sorted(folder.glob("*.safetensors")):  # one file, or the shards of a big model
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                n = 1
                for d in f.get_slice(k).get_shape():
                    n *= d
                params += n
    return {"path": str(folder), "params": params,
            "lm_head": cfg["vocab_size"] * cfg["hidden_size"]}


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def build_random_model(out: Path, base: Path, shape: str | None, seed: int = 0) -> Path:
    """A model folder at ``out``: ``base``'s config (with ``shape``'s sizes) and tokenizer files,
    and random fp32 weights (Transformers' own initialisation, ``seed``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    out.mkdir(parents=True)
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf", ".index.json",
                                                 ".pt")) and f.name != "alignkit-complete.json":
            shutil.copy2(f, out / f.name)
    cfg = json.loads((base / "config.json").read_text()) | SHAPES.get(shape or "135M", {})
    cfg["dtype"] = "float32"
    cfg.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out),
                                             dtype=torch.float32)
    model.save_pretrained(out)
    return out


def choose_model(args, tmp: Path) -> tuple[Path | None, dict]:
    """``--model``/``--random-init`` → the folder both tools load (None: the embedded model)."""
    if args.model is None and not args.random_init:
        return None, {}
    bundle_model = Path(args.data_dir) / "model" if args.data_dir else None
    if args.model in SHAPES or args.model is None:
        if bundle_model is not None and (bundle_model / "config.json").is_file():
            base = bundle_model.resolve()
        else:
            from alignkit.models.load import embedded_model_dir
            base = embedded_model_dir()
        shape = args.model or "135M"
    else:
        base, shape = Path(args.model).expanduser().resolve(), None
        if not (base / "config.json").is_file():
            raise SystemExit(f"--model {args.model}: neither a shape ({', '.join(SHAPES)}) nor "
                             "a model folder with a config.json")
        if _has_weights(base) and not args.random_init:
            return base, {"random_init": None}
    t = time.perf_counter()
    folder = build_random_model(tmp / f"random-init-{shape or base.name}", base, shape)
    print(f"random-init model written in {time.perf_counter() - t:.1f} s: {folder} (config and "
          f"tokenizer from {base}{', shape ' + shape if shape else ''})", flush=True)
    return folder, {"random_init": {"shape": shape, "base": str(base), "seed": 0}}


def configs(args) -> dict[str, list[dict]]:
    """Workload → the runs to alternate."""
    trl_variants = [v for v in args.trl_variants.split(",") if v]
    mine = [v for v in args.alignkit_variants.split(",") if v]
    out = {}
    for w in args.workloads.split(","):
        if w == "rl":
            algos = [a for a in args.rl_algos.split(",") if a]
            runs = [{"name": f"alignkit-{a}" + ("" if v == "plain" else f"-{v}"),
                     "tool": "alignkit", "algo": a, "variant": v} for a in algos for v in mine]
            runs += [{"name": f"trl-{a}-{v}", "tool": "trl", "algo": a, "variant": v}
                     for a in ("rloo", "grpo")
                     if a in algos or any(x.startswith("ppo") for x in algos)
                     for v in trl_variants]
        else:
            runs = [{"name": "alignkit" + ("" if v == "plain" else f"-{v}"), "tool": "alignkit",
                     "variant": v} for v in mine]
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
            if a.split("-")[1] in ("ppo", t.split("-")[1])]


def spread(xs: list[float], fmt: str = "{:.1f}") -> str:
    if not xs:
        return "—"
    med = statistics.median(xs)
    return fmt.format(med) + (f" ({fmt.format(min(xs))}–{fmt.format(max(xs))})"
                              if len(xs) > 1 else "")


def summarise(results: dict, peak: float, where: str = "", precision: str = "bf16"
              ) -> tuple[str, dict]:
    lines, summary = [], {}
    # On a GPU: a peak GPU memory column and ratio (max_memory_allocated at the last step).
    gpu = any("gpu_mib" in r for runs in results.values() for reps in runs.values()
              for r in reps)
    g_head, g_rule, g_none = (" peak GPU MiB |", " --- |", " |") if gpu else ("", "", "")
    lines.append(f"{precision} matmul peak: {peak:.2f} TFLOP/s{where}\n")
    lines.append(f"| workload | run | units/s | tokens/s | peak RSS MiB |{g_head} MFU % | "
                 "window s |")
    lines.append(f"| --- | --- | --- | --- | --- |{g_rule} --- | --- |")
    for w, runs in results.items():
        summary[w] = {}
        for name, reps in runs.items():
            ok = [r for r in reps if "error" not in r]
            if not ok:
                lines.append(f"| {w} | {name} | failed | | |{g_none} | |")
                summary[w][name] = {"error": reps[0]["error"] if reps else "not run"}
                continue
            col = {k: [r[k] for r in ok] for k in ("units_per_s", "tokens_per_s", "rss_mib",
                                                   "mfu", "window_s") + (("gpu_mib",) if gpu
                                                                         else ())}
            summary[w][name] = {k: {"median": statistics.median(v), "min": min(v),
                                    "max": max(v)} for k, v in col.items()}
            tok = "—" if w == "rl" else spread(col["tokens_per_s"], "{:.0f}")
            extra = (f" [{statistics.mean(r['completion_tokens'] for r in ok):.0f} new tok]"
                     if w == "rl" else "")
            g_col = f" {spread(col['gpu_mib'], '{:.0f}')} |" if gpu else ""
            lines.append(f"| {w} | {name} | {spread(col['units_per_s'], '{:.3g}')} "
                         f"{UNITS[w]}/s{extra} | {tok} | {spread(col['rss_mib'], '{:.0f}')} |"
                         f"{g_col} {spread([100 * m for m in col['mfu']], '{:.2f}')} | "
                         f"{spread(col['window_s'], '{:.1f}')} |")
    lines.append("\nRatios alignkit ÷ TRL, per repeat (median, min–max): throughput "
                 "(>1: alignkit faster) and peak memory (<1: alignkit leaner).\n")
    lines.append(f"| workload | alignkit | vs | units/s | tokens/s | peak RSS |"
                 f"{' peak GPU |' if gpu else ''}")
    lines.append(f"| --- | --- | --- | --- | --- | --- |{g_rule}")
    for w, runs in results.items():
        for a, t in ratio_pairs(w, list(runs)):
            pairs = [(x, y) for x, y in zip(runs[a], runs[t]) if "error" not in x
                     and "error" not in y]
            if not pairs:
                continue
            r = {k: [x[k] / y[k] for x, y in pairs if y[k]] for k in
                 ("units_per_s", "tokens_per_s", "rss_mib") + (("gpu_mib",) if gpu else ())}
            summary[w][f"{a} / {t}"] = {k: {"median": statistics.median(v), "min": min(v),
                                            "max": max(v)} for k, v in r.items() if v}
            tok = "—" if w == "rl" else spread(r["tokens_per_s"], "{:.2f}×")
            g_col = f" {spread(r['gpu_mib'], '{:.2f}×')} |" if gpu else ""
            lines.append(f"| {w} | {a} | {t} | {spread(r['units_per_s'], '{:.2f}×')} | {tok} | "
                         f"{spread(r['rss_mib'], '{:.2f}×')} |{g_col}")
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
            "avx512_bf16": "avx512_bf16" in flags,
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
    ap.add_argument("--rl-algos", default="ppo,rloo,grpo",
                    help="alignkit's RL algorithms: ppo, rloo, grpo, and ppo-shared (PPO with "
                         "critic_init shared: the value head on the policy's trunk)")
    ap.add_argument("--trl-variants", default="defaults,best",
                    help="defaults, best, best-compile (best + torch_compile)")
    ap.add_argument("--alignkit-variants", default="plain",
                    help="plain, compile (train.compile)")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="both tools: bf16 autocast or fp32 (auto: bf16 on a GPU or a CPU with "
                         "AMX or AVX512-BF16, where it is fast; fp32 elsewhere)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every run (default: torch's own choice)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 steps after 1 warm-up, 1 repeat, batch 2, length 96")
    ap.add_argument("--output", default=None, help="JSON file (default benchmarks/results/)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where both tools train (cuda: one GPU, peak GPU memory, GPU matmul "
                         "peak)")
    ap.add_argument("--model", default=None,
                    help="a model folder (HF layout) instead of the embedded model, or a "
                         f"SmolLM2 shape ({', '.join(SHAPES)}): random weights of that shape")
    ap.add_argument("--random-init", action="store_true",
                    help="random weights from the model's config (--model's folder, or the "
                         "embedded model's config) and its tokenizer")
    ap.add_argument("--data-dir", default=None,
                    help="read the data (DIR/data) and the shapes' config and tokenizer "
                         "(DIR/model) from a bundle written by --prepare-bundle")
    ap.add_argument("--prepare-bundle", default=None, metavar="DIR",
                    help="write the data pools for these options (from ../shared/data) and the "
                         "embedded model's config and tokenizer files into DIR, then exit")
    ap.add_argument("--bundle-pool", type=float, default=2.0,
                    help="--prepare-bundle: rows per pool, as a multiple of what one run needs")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no run after this many seconds (repeat-major order); kill a "
                         "run 60 s past it")
    ap.add_argument("--logs", default=None, help="per-run logs (default benchmarks/results/"
                                                 "<stamp>/)")
    ap.add_argument("--gpu", action="store_true",
                    help="GPU preset (explicit options win): " + ", ".join(
                        f"{k.replace('_', '-')} {v}" for k, v in GPU_PRESET.items()
                        if k != "data_dir") + ", data from benchmarks/results/gpu_bundle/files")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.gpu:
        ap.set_defaults(**GPU_PRESET)
        args = ap.parse_args(argv)
    for opt, known in (("trl_variants", {"defaults", "best", "best-compile"}),
                       ("alignkit_variants", {"plain", "compile"}),
                       ("rl_algos", {"ppo", "ppo-shared", "rloo", "grpo"})):
        bad = sorted(set(getattr(args, opt).split(",")) - known - {""})
        if bad:
            ap.error(f"--{opt.replace('_', '-')}: unknown {', '.join(bad)} "
                     f"(known: {', '.join(sorted(known))})")
    if args.quick:
        args.steps, args.warmup, args.repeats, args.batch, args.max_length = 2, 1, 1, 2, 96
        args.rl_prompts, args.rl_group, args.rl_new_tokens, args.rl_batch = 2, 2, 8, 4
        args.rl_rollouts, args.rl_max_prompt_length = 1, 64
    if args.precision == "auto" and not args.child:
        args.precision = resolve_precision(args.device)
    return args


def resolve_precision(device: str) -> str:
    """``--precision auto``: bf16 on a GPU, and on a CPU where alignkit's own ``precision auto``
    picks it (AMX or AVX512-BF16); fp32 on other CPUs, where bf16 matmuls are emulated (measured
    on an AVX2-only AMD EPYC: 0.9 GFLOP/s in bf16 against 105 in fp32)."""
    if device == "cuda":
        return "bf16"
    from alignkit.engine.device import resolve_runtime
    return "bf16" if resolve_runtime("cpu", "auto").autocast_dtype is not None else "fp32"


def _pool_sizes(args) -> dict[str, int]:
    """Rows each bundle pool holds: --bundle-pool times what one run with these options needs."""
    import math
    f = args.bundle_pool
    pairs = math.ceil(f * (args.steps + args.warmup) * args.batch)
    return {"sft.jsonl": pairs, "pairs.jsonl": pairs,
            "prompts.jsonl": math.ceil(f * args.rl_prompts * (args.rl_rollouts + 1))}


def prepare_bundle(args) -> None:
    """DIR/data: the candidate rows of each workload, in selection order, filtered at these
    options' maximum lengths; DIR/model: the embedded model's config and tokenizer files (no
    weights); DIR/bundle.json: what was written from what."""
    from alignkit.models.load import embedded_model_dir
    out = Path(args.prepare_bundle)
    data, model = out / "data", out / "model"
    data.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(model, ignore_errors=True)
    model.mkdir()
    src = embedded_model_dir()
    for f in src.iterdir():
        if (f.is_file() and not f.name.endswith(".safetensors")
                and f.name != "alignkit-complete.json"):
            shutil.copy2(f, model / f.name)
    tok = _tokenizer()
    sizes = _pool_sizes(args)
    wanted = {BUNDLE_DATA[w] for w in args.workloads.split(",") if w in BUNDLE_DATA}
    written = {}
    with tempfile.TemporaryDirectory(prefix="compare-trl-bundle-") as tmp_s:
        tmp = Path(tmp_s)
        for name in sorted(wanted):
            path, n = data / name, sizes[name]
            if name == "sft.jsonl":
                written[name] = write_sft(path, n, args.max_length, tok)
            elif name == "pairs.jsonl":
                written[name] = write_pairs(path, n, args.max_length, tok, tmp)
            else:
                written[name] = write_prompts(path, n, args.rl_max_prompt_length, tok, tmp)
            written[name]["path"] = f"data/{name}"
            print(f"{name}: {n} rows, mean {written[name]['mean_tokens']:.0f} tokens", flush=True)
    manifest = {"max_length": args.max_length, "rl_max_prompt_length": args.rl_max_prompt_length,
                "pools": written, "data_source": str(DATA), "model_files_from": str(src),
                "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "bundle.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    print(f"bundle written: {out}", flush=True)


def main(argv=None) -> None:
    t_main = time.perf_counter()
    args = parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return
    if args.prepare_bundle:
        prepare_bundle(args)
        return
    try:
        import alignkit  # noqa: F401
        import trl  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"{err}: run `bash benchmarks/setup_trl.sh` and use "
                         "benchmarks/.venv-trl/bin/python") from None
    workloads = configs(args)
    bundle = Path(args.data_dir) if args.data_dir else None
    if bundle is not None:
        source = bundle / "data"
        needs = {w: [source / f] for w, f in BUNDLE_DATA.items()}
    else:
        source = DATA
        needs = {"sft": [DATA / "alpaca" / "alpaca_train.jsonl"], "reward": _hh_files(),
                 "dpo": _hh_files(), "rl": _hh_files()}
    for w in list(workloads):
        if w not in needs:
            raise SystemExit(f"unknown workload '{w}'; choose from {', '.join(needs)}")
        if not needs[w] or not all(p.is_file() for p in needs[w]):
            print(f"skipping {w}: its data is not under {source}", flush=True)
            del workloads[w]
    if not workloads:
        raise SystemExit("nothing to run")
    if args.rl_prompts * args.rl_group % args.rl_batch:
        raise SystemExit("--rl-prompts × --rl-group must be a multiple of --rl-batch")
    if bundle is not None and (bundle / "bundle.json").is_file():
        made = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
        if (args.max_length > made["max_length"]
                or args.rl_max_prompt_length > made["rl_max_prompt_length"]):
            print(f"warning: the bundle's rows were filtered at {made['max_length']} "
                  f"(prompts {made['rl_max_prompt_length']}) tokens: a run from "
                  f"{DATA} at these lengths would select other rows", flush=True)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = Path(args.logs) if args.logs else RESULTS / stamp
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compare-trl-") as tmp_s:
        tmp = Path(tmp_s)
        folder, model_info = choose_model(args, tmp)
        if folder is not None:
            os.environ[MODEL_ENV] = str(folder)  # the children load it by path, tokenizer too
        meta = model_meta(folder) | model_info
        info = machine()
        print(f"machine: {info}\nmodel: {meta['params']:,} parameters ({meta['path']})",
              flush=True)
        sizes = ([2048] if args.quick else [4096, 8192]) if args.device == "cuda" else (
            [1024] if args.quick else [2048, 4096])
        peak_spec = {"tool": "peak", "threads": args.threads, "sizes": sizes,
                     "precision": args.precision}
        if args.device != "cpu":
            peak_spec["device"] = args.device
        peak = run_child(peak_spec, logs / "peak.log", tmp)
        if "error" in peak:
            raise SystemExit(peak["error"])
        where = f" on {peak['gpu']['name']}" if "gpu" in peak else ""
        if "gpu" in peak:
            info["gpu"] = peak["gpu"]
        print(f"{args.precision} matmul peak: {peak['tflops']:.2f} TFLOP/s{where} "
              f"({peak['threads']} threads)", flush=True)
        tok = _tokenizer()
        steps_per_rollout = args.rl_epochs * args.rl_prompts * args.rl_group // args.rl_batch
        base = {"model": meta["path"], "threads": args.threads, "precision": args.precision}
        if args.device != "cpu":
            base["device"] = args.device
        if folder is not None:
            base["custom_model"] = True
        specs, data_info = {}, {}
        for w in workloads:
            path = tmp / f"{w}.jsonl"
            if w == "rl":
                n = args.rl_prompts * (args.rl_rollouts + 1)
                data_info[w] = (write_from_pool(path, bundle / "data" / BUNDLE_DATA[w], w, n,
                                                args.rl_max_prompt_length, tok)
                                if bundle is not None else
                                write_prompts(path, n, args.rl_max_prompt_length, tok, tmp))
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
            if bundle is not None:
                data_info[w] = write_from_pool(path, bundle / "data" / BUNDLE_DATA[w], w, n,
                                               args.max_length, tok)
            else:
                data_info[w] = (write_sft(path, n, args.max_length, tok) if w == "sft" else
                                write_pairs(path, n, args.max_length, tok, tmp))
            specs[w] = base | {"workload": w, "data": str(path), "batch": args.batch,
                               "max_length": args.max_length,
                               "total_steps": args.steps + args.warmup,
                               "warmup_steps": args.warmup}
            print(f"{w} data: {data_info[w]['examples']} examples, mean "
                  f"{data_info[w]['mean_tokens']:.0f} tokens", flush=True)
        results: dict = {w: {r["name"]: [] for r in runs} for w, runs in workloads.items()}
        # Workload-major (every repeat of one workload, then the next); with a time budget
        # repeat-major, so that what fits holds every workload's first repeat.
        plan = [(w, rep) for w in workloads for rep in range(args.repeats)]
        if args.budget_s is not None:
            plan = [(w, rep) for rep in range(args.repeats) for w in workloads]
        skipped = []
        for w, rep in plan:
            runs = workloads[w]
            order = runs[rep % len(runs):] + runs[:rep % len(runs)]
            for run in order:
                timeout = None
                if args.budget_s is not None:
                    left = args.budget_s - (time.perf_counter() - t_main)
                    if left <= 0:
                        skipped.append(f"{w}-{run['name']}-r{rep}")
                        continue
                    timeout = left + 60
                spec = specs[w] | {k: v for k, v in run.items() if k != "name"} | {
                    "seed": rep}
                res = run_child(spec, logs / f"{w}-{run['name']}-r{rep}.log", tmp, timeout)
                if "error" not in res:
                    res = window(res, spec) | {"raw": res}
                if "error" not in res:
                    res["mfu"] = model_flops_per_unit(spec, meta, res) / (peak["tflops"] * 1e12)
                    gpu_mem = (f", peak GPU {res['gpu_mib']:.0f} MiB" if "gpu_mib" in res
                               else "")
                    print(f"{w} repeat {rep + 1} {run['name']}: "
                          f"{res['units_per_s']:.3g} {UNITS[w]}/s, "
                          f"{res['tokens_per_s']:.0f} tokens/s, peak RSS "
                          f"{res['rss_mib']:.0f} MiB{gpu_mem}, window {res['window_s']:.1f} s, "
                          f"run {res['wall_s']:.0f} s{rollout_split(res)}", flush=True)
                else:
                    print(f"{w} repeat {rep + 1} {run['name']}: FAILED\n{res['error']}",
                          flush=True)
                results[w][run["name"]].append(res)
        if skipped:
            print(f"--budget-s {args.budget_s:.0f} reached: {len(skipped)} runs not started "
                  f"({', '.join(skipped)})", flush=True)
    table, summary = summarise(results, peak["tflops"], where, args.precision)
    print("\n" + table)
    out = Path(args.output) if args.output else RESULTS / f"compare_trl-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    record = {"args": vars(args), "machine": info, "model": meta, "peak": peak,
              "data": data_info, "summary": summary, "runs": results, "table": table}
    if skipped:
        record["skipped"] = skipped
    tmp_out.write_text(json.dumps(record, indent=1), encoding="utf-8")
    tmp_out.replace(out)
    print(f"\nwritten: {out} (logs in {logs})")
    if any("error" in r for runs in results.values() for reps in runs.values() for r in reps):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
