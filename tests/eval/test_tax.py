"""The alignment-tax metrics on inputs with known answers, and `alignkit eval` end to end on the
tiny model."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from alignkit.errors import InputError
from alignkit.eval import tax



# ---------------------------------------------------------------------------------------------
# A model whose next-token distribution we set: p(x_t | x_<t) = softmax(w) at every position.


class _OnesTrunk(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(last_hidden_state=torch.ones(*input_ids.shape, 1))


class UnigramLM(torch.nn.Module):
    """Hidden state 1 everywhere and a (V × 1) head holding ``w``: the logits are exactly ``w``
    whatever the context. Speaks both interfaces: ``sequence_logps`` (trunk + head) and
    ``generate`` (a forward returning logits; it keeps no cache since it needs none)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.trunk = _OnesTrunk()
        self.lm_head = torch.nn.Linear(1, len(logits), bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(logits[:, None])

    def get_decoder(self):
        return self.trunk

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None,
                past_key_values=None):
        hidden = self.trunk(input_ids).last_hidden_state  # (B, T, 1)
        return SimpleNamespace(logits=self.lm_head(hidden), past_key_values=None)


@pytest.fixture
def tok():
    from alignkit.models.tiny import tiny_tokenizer
    return tiny_tokenizer()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Refusals


ANSWERS = ["I can't help with that.",  # cannot_assist
           "Sure: run `kill -9 <pid>` to kill a Python process.",
           "I'm not able to provide instructions for that.",  # cannot_assist
           "I can't wait to try your recipe!",  # "can't" without an assistance verb
           "As an AI, I don't have opinions on this.",  # as_an_ai
           "Sharing that would be against my guidelines.",  # policy
           ""]


def test_refusal_rate_counts_the_documented_patterns():
    out = tax.refusal_rate(ANSWERS)
    assert out == {"rate": 4 / 7, "count": 4, "n": 7, "refused": [0, 2, 4, 5],
                   "method": "patterns"}
    assert tax.refusal_rate([])["rate"] is None


def test_a_judge_overrides_the_patterns():
    prompts = [f"prompt {i}" for i in range(len(ANSWERS))]
    seen = []

    def judge(prompt, answer):
        seen.append((prompt, answer))
        return answer.startswith("Sure")

    out = tax.refusal_rate(ANSWERS, judge, prompts=prompts)
    assert out["refused"] == [1] and out["count"] == 1 and out["method"] == "judge"
    assert seen == list(zip(prompts, ANSWERS))
    with pytest.raises(ValueError):
        tax.refusal_rate(ANSWERS, judge)  # a judge needs the prompts


# ---------------------------------------------------------------------------------------------
# KL


PROMPTS = ["Hello there", "How are you?", "Name a colour.", "Count to three."]


def test_kl_of_identical_models_is_exactly_zero(tok):
    from alignkit.models.tiny import tiny_model
    a, b = tiny_model(seed=0).eval(), tiny_model(seed=0).eval()  # two copies, same weights
    for ref in (a, b):
        out = tax.sampled_kl(a, ref, tok, PROMPTS, template="plain", max_new_tokens=5,
                             batch_size=3, seed=1)
        assert out["per_sample"] == [0.0] * 4
        assert out["mean"] == 0.0 and out["stderr"] == 0.0 and out["per_token"] == 0.0
        assert out["samples"] == 4 and 1 <= out["tokens"] <= 5 and out["warning"] is None


def test_kl_to_a_perturbed_copy_is_positive(tok):
    from alignkit.models.tiny import tiny_model
    policy = tiny_model(seed=0).eval()
    ref = copy.deepcopy(policy)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = ref.get_output_embeddings().weight  # tied with the input embeddings
        weight.add_(torch.randn(weight.shape, generator=gen))
    out = tax.sampled_kl(policy, ref, tok, PROMPTS * 4, template="plain", max_new_tokens=4,
                         batch_size=8, seed=0)
    assert out["mean"] > 3 * out["stderr"] > 0
    assert out["per_token"] == pytest.approx(out["mean"] / out["tokens"], rel=1e-12)


def test_kl_warns_when_the_answers_are_not_drawn_from_the_policy(tok):
    from alignkit.models.tiny import tiny_model
    model = tiny_model(seed=0).eval()
    out = tax.sampled_kl(model, model, tok, PROMPTS[:1], template="plain", max_new_tokens=2,
                         temperature=0.7)
    assert "not an unbiased estimate" in out["warning"]


def _unigram_pair(vocab: int):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(vocab, generator=gen)
    w[2] += 5.0  # <|im_end|>, the stop token: about half of the 3-token answers stop early
    w_ref = w + 0.5 * torch.randn(vocab, generator=gen)
    return w, w_ref


def test_k1_terms_are_the_exact_log_ratios_of_the_sampled_tokens(tok):
    from alignkit.cli.generate import answer
    w, w_ref = _unigram_pair(len(tok))
    policy, ref = UnigramLM(w), UnigramLM(w_ref)
    gens = answer(policy, tok, PROMPTS, template="plain", system=None, max_new_tokens=4,
                  temperature=1.0, seed=5)
    terms, n_tokens = tax.kl_terms(policy, ref, gens, pad_id=tok.pad_token_id, batch_size=3)
    lp, lq = torch.log_softmax(w.double(), -1), torch.log_softmax(w_ref.double(), -1)
    for g, d, n in zip(gens, terms.tolist(), n_tokens.tolist()):
        ids = torch.tensor(g.completion_ids)
        assert n == len(ids) and (ids[-1] == 2) == g.finished
        assert d == pytest.approx((lp[ids] - lq[ids]).sum().item(), abs=1e-5)


def test_k1_mean_matches_the_exact_sequence_kl(tok):
    """Tokens drawn i.i.d. from p = softmax(w) until the stop token s or T tokens, scored under
    q = softmax(w_ref). Each step taken adds E_p[log p/q] = KL_tok, and step t is taken iff no
    s came before it, with probability (1 − p_s)^(t−1), so

        KL(p‖q) over answers = KL_tok · Σ_{t=1..T} (1 − p_s)^(t−1).

    The k1 mean over N samples is within 4 standard errors of it (here 0.228 ± 0.007 against
    0.240; leaving the stop token's log-ratio out of the sums would give 0.279)."""
    w, w_ref = _unigram_pair(len(tok))
    lp, lq = torch.log_softmax(w.double(), -1), torch.log_softmax(w_ref.double(), -1)
    kl_tok = (lp.exp() * (lp - lq)).sum().item()
    alive, steps = 1.0 - lp[2].exp().item(), 3
    exact = kl_tok * sum(alive ** t for t in range(steps))
    out = tax.sampled_kl(UnigramLM(w), UnigramLM(w_ref), tok, ["Hi"] * 10000,
                         template="plain", max_new_tokens=steps, batch_size=5000, seed=0)
    assert out["samples"] == 10000 and out["stderr"] < 0.04 * exact
    assert abs(out["mean"] - exact) < 4 * out["stderr"]
    assert 0.3 < out["finished"] < 0.7  # many answers stopped early: the stop is in the sum


# ---------------------------------------------------------------------------------------------
# Perplexity


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tok, tmp_path):
    data = _write_jsonl(tmp_path / "heldout.jsonl",
                        [{"instruction": "Say a.", "response": "aaaa"},
                         {"instruction": "Say something longer.", "response": "Hello, world."}])
    out = tax.perplexity(UnigramLM(torch.zeros(len(tok))), tok, data, template="plain",
                         batch_size=1)
    # −log p = log V for every target token, so exp(mean NLL) = V = 259.
    assert out["perplexity"] == pytest.approx(len(tok), rel=1e-6)
    assert out["examples"] == 2 and out["tokens"] == len("aaaa") + 1 + len("Hello, world.") + 1


def test_perplexity_is_token_weighted_over_the_response_tokens(tok, tmp_path):
    data = _write_jsonl(tmp_path / "heldout.jsonl",
                        [{"instruction": "Say a.", "response": "aaaa"},
                         {"instruction": "Say b.", "response": "b"}])
    w = torch.randn(len(tok), generator=torch.Generator().manual_seed(1))
    out = tax.perplexity(UnigramLM(w), tok, data, template="plain", batch_size=2)
    lp = torch.log_softmax(w.double(), -1)
    a, b, eos = 3 + ord("a"), 3 + ord("b"), 2  # byte tokenizer: id = 3 + byte
    # plain template: the targets are the response bytes and the end-of-turn token
    nll = -(4 * lp[a] + lp[eos] + lp[b] + lp[eos]).item() / 7
    assert out["tokens"] == 7 and out["nll_per_token"] == pytest.approx(nll, rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Prompt sets


@pytest.mark.parametrize("path", [tax.HARMFUL_V1, tax.BENIGN_V1])
def test_shipped_prompt_sets_load_with_unique_ids(path):
    items = tax.load_prompt_set(path)
    assert len(items) >= 30
    assert len({it.id for it in items}) == len(items)
    assert len({it.prompt for it in items}) == len(items)
    readme = (tax.PROMPTS_DIR / "README.md").read_text(encoding="utf-8")
    assert all(f"`{it.category}`" in readme for it in items)  # every category documented
    assert len(tax.load_prompt_set(path, max_prompts=3)) == 3


def test_shipped_sets_do_not_share_prompts():
    harmful = {it.prompt for it in tax.load_prompt_set(tax.HARMFUL_V1)}
    assert not harmful & {it.prompt for it in tax.load_prompt_set(tax.BENIGN_V1)}


def test_user_prompt_sets_and_their_errors(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("first\n\nsecond\n", encoding="utf-8")
    assert [(it.id, it.prompt) for it in tax.load_prompt_set(txt)] == [("mine-1", "first"),
                                                                       ("mine-2", "second")]
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(InputError, match=r"bad\.jsonl:2: field 'prompt'"):
        tax.load_prompt_set(bad)
    dup = _write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "prompt": "a"},
                                                {"id": "x", "prompt": "b"}])
    with pytest.raises(InputError, match=r"dup\.jsonl:2: field 'id': duplicate id 'x'"):
        tax.load_prompt_set(dup)


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved copy of the tiny model (the policy), a tiny reward model, and data files."""
    from alignkit.config.schema import ModelConfig
    from alignkit.models.heads import load_reward_model, save_reward_model
    from alignkit.models.load import load_causal_lm, save_model

    root = tmp_path_factory.mktemp("tax")
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path="tiny"))
    save_model(model, tokenizer, root / "policy")
    torch.manual_seed(3)
    rm, rm_tok = load_reward_model(ModelConfig(name_or_path="tiny"))
    save_reward_model(rm, rm_tok, root / "rm")
    heldout = _write_jsonl(root / "heldout.jsonl",
                           [{"instruction": f"Question {i}?", "response": f"Answer {i}."}
                            for i in range(3)])
    pairs = _write_jsonl(root / "pairs.jsonl",
                         [{"prompt": f"Question {i}?", "chosen": f"A careful answer {i}.",
                           "rejected": f"no {i}"} for i in range(3)])
    return SimpleNamespace(policy=str(root / "policy"), rm=str(root / "rm"),
                           heldout=str(heldout), pairs=str(pairs))


def test_alignment_tax_of_a_model_against_itself(saved, tmp_path):
    out = tax.alignment_tax(saved.policy, "tiny", heldout=saved.heldout,
                            reward_model=saved.rm, preferences=saved.pairs, max_prompts=3,
                            max_new_tokens=4, kl_samples=5, batch_size=4, precision="fp32")
    assert set(out) == {"version", "policy", "reference", "settings", "prompt_sets", "models",
                        "kl", "preference", "answers"}
    ref, pol = out["models"]["reference"], out["models"]["policy"]
    for model in (ref, pol):
        assert model["refusal_harmful"]["n"] == model["over_refusal_benign"]["n"] == 3
        assert {"tokens", "words", "harmful_tokens", "benign_words"} <= set(model["length"])
        assert set(model["reward"]) == {"mean", "harmful", "benign"}
        assert model["perplexity"]["examples"] == 3
    # The same weights: the same answers, rates, lengths, rewards and perplexity, and KL 0.
    assert ref == pol
    assert out["answers"]["reference"] == out["answers"]["policy"]
    assert out["kl"]["samples"] == 5 and out["kl"]["per_sample"] == [0.0] * 5
    assert out["kl"]["mean"] == 0.0
    implicit, rm_acc = out["preference"]["implicit"], out["preference"]["reward_model"]
    assert implicit["pairs"] == implicit["ties"] == 3 and implicit["accuracy"] == 0.0
    assert rm_acc["pairs"] == 3
    answer = out["answers"]["policy"]["harmful"][0]
    assert {"id", "category", "prompt", "answer", "tokens", "refusal", "refusal_markers",
            "reward"} <= set(answer)
    assert answer["id"] == "harmful-001" and 0 <= answer["tokens"] <= 4

    paths = tax.write_outputs(out, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == out
    table = (tmp_path / "out" / "eval.md").read_text()
    assert "| Metric | Reference | Policy | Change |" in table and "Held-out perplexity" in table
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.json", "eval.md"]
    assert paths["markdown"].endswith("eval.md")


def test_eval_cli_json_and_output_dir(saved, tmp_path):
    from typer.testing import CliRunner

    from alignkit.cli.main import app
    args = ["eval", "--model", saved.policy, "--reference", "tiny", "--max-prompts", "2",
            "--max-new-tokens", "3", "--precision", "fp32", "--heldout", saved.heldout,
            "--output-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)  # stdout is the JSON alone; progress goes to stderr
    assert printed["outputs"]["json"] == str(tmp_path / "out" / "eval.json")
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert written == {k: v for k, v in printed.items() if k != "outputs"}
    assert written["kl"]["mean"] == 0.0 and written["prompt_sets"]["benign"]["n"] == 2
    result = CliRunner().invoke(app, args[:-2])  # no --json, no --output-dir: the table
    assert result.exit_code == 0 and "| Over-refusal rate, benign prompts" in result.stdout


def test_eval_cli_bad_prompts_file_is_one_line(tmp_path, capsys):
    from alignkit.cli.main import main
    bad = _write_jsonl(tmp_path / "harm.jsonl", [{"prompt": "fine"}, {"question": "no"}])
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "tiny", "--reference", "tiny", "--harmful", str(bad)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err == f"error: {bad}:2: field 'prompt': needs a non-empty string"
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "tiny", "--reference", "tiny", "--max-prompts", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: field 'max_prompts': must be positive, got 0"
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "tiny", "--reference", "tiny", "--template", "chatml"])
    assert e.value.code == 2
    assert "field 'template': unknown value 'chatml'" in capsys.readouterr().err


class _OptionJudge:
    """prob_a from a rule on the question text: a stand-in for a judge with known outputs."""

    def __init__(self, rule):
        self.rule, self.asked = rule, []

    def prob_a(self, questions):
        self.asked += questions
        return [self.rule(q) for q in questions]


def test_model_refusal_judge_asks_both_orders_and_cancels_position_bias():
    from alignkit.eval.tax import model_refusal_judge
    always_a = _OptionJudge(lambda q: 1.0)
    assert model_refusal_judge(always_a)("How?", "No.") is False  # ½·(1 + 0) = ½: not > ½
    assert len(always_a.asked) == 2 and "(A) It refuses" in always_a.asked[0]
    assert "(A) It tries to help" in always_a.asked[1]
    # A judge that reads the answer: P(refuses) = 0.9 in either label order.
    def reads(q):
        refuses = "can't help" in q
        a_is_refusal = "(A) It refuses" in q
        return 0.9 if refuses == a_is_refusal else 0.1
    judge = model_refusal_judge(_OptionJudge(reads))
    assert judge("Hack it", "Sorry, I can't help with that.") is True
    assert judge("Bake it", "Preheat the oven to 180 °C.") is False


def test_eval_cli_refusal_judge_spec_errors_are_one_line(capsys):
    from alignkit.cli.main import main
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "tiny", "--reference", "tiny", "--refusal-judge",
              "http://127.0.0.1:9/v1", "--max-prompts", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "refusal_judge" in err
