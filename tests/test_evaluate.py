"""evaluate.py: judges (an OpenAI-compatible server on 127.0.0.1, a reward model, a rule), metrics, resuming, errors."""

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, SMALL_MODEL, compose_config
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from run_fixtures import write_run
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

import embedded
import evaluate
import plots
from errors import ConfigError
from evaluation import metrics
from evaluation.comparisons import Comparison
from evaluation.llm_judge import PairwiseLLMJudge
from evaluation.loading import EvalPrompt
from evaluation.openai_api import ServerError
from evaluation.rules import RULE_SCORERS, rule_scorer

N_PROMPTS = 6

# ----- a local OpenAI-compatible server ---------------------------------------------------------

_REPLY = re.compile(r"<reply_a>\n(.*?)\n</reply_a>.*?<reply_b>\n(.*?)\n</reply_b>", re.DOTALL)
_NUMBERS = re.compile(r"Which is the (largest|smallest) of ([\d, ]+)\?")


class JudgeServer:
    """Chat completions and completions on 127.0.0.1, deterministic; the `model` field picks the behaviour.

    Judge models (chat completions): always-a (position bias: always "Verdict: A"), prefer-longer (the longer
    reply of our dialogue template wins, equal lengths tie), garbage (no verdict), not-json (a 200 that is
    no chat completion), flaky (429, then
    500, then prefer-longer's answer, counted per distinct message). Generator model (either endpoint):
    half-right answers the embedded task's prompt correctly when its first listed number is even.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, int]] = []  # (path, model, status)
        self.attempts: dict[str, int] = {}
        self.authorizations: set[str] = set()  # Authorization headers seen
        self.in_flight = self.most_in_flight = 0  # chat requests being answered at once
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self.answer(200, {"object": "list", "data": [{"id": "judge", "object": "model"}]}, "models")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.authorizations.add(self.headers.get("Authorization", ""))
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    status, payload = server.respond(self.path, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                self.answer(status, payload, body.get("model", ""))

            def answer(self, status: int, payload: dict, model: str) -> None:
                with server.lock:
                    server.requests.append((self.path, model, status))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def count(self, model: str) -> int:
        with self.lock:
            return sum(1 for _, m, _ in self.requests if m == model)

    def respond(self, path: str, body: dict) -> tuple[int, dict]:
        if path.endswith("/completions") and "chat" not in path:
            return 200, completion(half_right(body["prompt"]), "text_completion")
        content = body["messages"][-1]["content"]
        model = body["model"]
        if model == "half-right":
            return 200, completion(half_right(content), "chat.completion")
        if model == "flaky":
            with self.lock:
                attempt = self.attempts[content] = self.attempts.get(content, 0) + 1
            if attempt <= 2:
                status = 429 if attempt == 1 else 500
                return status, {"error": {"message": f"try again ({status})", "type": "server_error"}}
        if model == "always-a":
            time.sleep(0.05)  # slow enough that concurrent requests overlap
            return 200, completion("Both are fine, A reads first.\nVerdict: A", "chat.completion")
        if model == "garbage":
            return 200, completion("I cannot choose between these.", "chat.completion")
        if model == "not-json":
            return 200, {"unexpected": "no choices"}
        reply_a, reply_b = _REPLY.search(content).groups()
        verdict = "A" if len(reply_a) > len(reply_b) else "B" if len(reply_b) > len(reply_a) else "tie"
        return 200, completion(f"Longer is better.\nVerdict: {verdict}", "chat.completion")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(text: str, kind: str) -> dict:
    choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
    choice |= {"message": {"role": "assistant", "content": text}} if kind == "chat.completion" else {"text": text}
    return {"id": "test", "object": kind, "created": 0, "model": "test", "choices": [choice]}


def half_right(prompt: str) -> str:
    kind, listed = _NUMBERS.search(prompt).groups()
    numbers = [int(n) for n in listed.split(", ")]
    answer = (max if kind == "largest" else min)(numbers)
    return f" The {kind} is {answer if numbers[0] % 2 == 0 else (answer + 1) % 10}."


@pytest.fixture(scope="module")
def server():
    judge_server = JudgeServer()
    yield judge_server
    judge_server.close()


# ----- tiny models, and a run folder around one ---------------------------------------------------


def tiny_llama_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, num_labels=1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A DPO-like run folder (train.py's config.yaml, metrics, report.html) with a random tiny Llama as
    LATEST, another random Llama as a plain folder, and a tiny reward model (LlamaForSequenceClassification)."""
    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = embedded.build_tokenizer()
    run_dir = write_run(root / "dpo_run", "dpo")
    OmegaConf.save(compose_config(["loss=dpo"]), run_dir / "config.yaml")
    plots.write_run_report(run_dir)
    paths = {"run": run_dir, "policy": run_dir / "LATEST", "other": root / "other", "reward": root / "reward"}
    for name, model_class, seed in (("policy", LlamaForCausalLM, 0), ("other", LlamaForCausalLM, 1),
                                    ("reward", LlamaForSequenceClassification, 2)):  # fmt: skip
        torch.manual_seed(seed)
        model_class(tiny_llama_config(tokenizer)).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def eval_config(folders: dict, out_dir: Path, *overrides: str):
    base = [f"policy={folders['policy']}", f"out_dir={out_dir}", f"n_prompts={N_PROMPTS}",
            "generation.max_new_tokens=6", "temperatures=[0.0]", "metrics.bootstrap_resamples=200"]  # fmt: skip
    return compose_config_for_evaluate(base + list(overrides))


def compose_config_for_evaluate(overrides: list[str]):
    return evaluate.compose_config(overrides)


def llm_judge_overrides(server: JudgeServer, model: str, cache: Path, *more: str) -> list[str]:
    return ["judge=openai", f"judge.base_url={server.base_url}", f"judge.model={model}", "judge.api_key_env=null",
            f"judge.cache_file={cache}", "judge.retry_backoff_s=0.01", *more]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----- metrics on synthetic numbers with known answers ------------------------------------------


def test_win_rate_counts_ties_half_and_leaves_out_unreadable_verdicts():
    assert metrics.win_rate([1.0, 0.5, 0.0, None]) == 0.5
    assert metrics.win_rate([1.0, 1.0, 0.5, None, None]) == pytest.approx(2.5 / 3)
    assert metrics.win_rate([None, None]) is None


def test_bootstrap_interval_matches_the_normal_approximation_and_is_seeded():
    assert metrics.bootstrap_interval([0.5] * 20, seed=0) == (0.5, 0.5)
    rng = np.random.default_rng(1)
    values = (rng.random(400) < 0.7).astype(float).tolist()
    low, high = metrics.bootstrap_interval(values, seed=0, n_resamples=4000)
    mean, standard_error = np.mean(values), np.std(values) / math.sqrt(len(values))
    assert low < mean < high
    assert high - low == pytest.approx(2 * 1.96 * standard_error, rel=0.1)
    assert metrics.bootstrap_interval(values, seed=0, n_resamples=4000) == (low, high)
    assert metrics.bootstrap_interval(values, seed=1, n_resamples=4000) != (low, high)
    narrow = metrics.bootstrap_interval(values, seed=0, n_resamples=4000, confidence=0.5)
    assert low < narrow[0] < narrow[1] < high


def test_length_controlled_win_rate_recovers_the_win_rate_at_equal_length():
    rng = np.random.default_rng(0)
    # a judge following a known model: P(policy wins) = sigmoid(logit(0.65) + 1.2 d / sd(d)), policy mostly longer
    differences = rng.normal(30.0, 20.0, size=6000)
    logits = math.log(0.65 / 0.35) + 1.2 * differences / differences.std()
    preferences = (rng.random(6000) < 1 / (1 + np.exp(-logits))).astype(float).tolist()
    assert metrics.win_rate(preferences) > 0.85  # the raw rate rewards length
    assert metrics.length_controlled_win_rate(preferences, differences.tolist()) == pytest.approx(0.65, abs=0.03)
    # a judge that only prefers the longer response: raw 0.8, length-controlled about even
    differences = np.concatenate([np.arange(1, 81), -np.arange(1, 21)]).astype(float)
    longer_wins = (differences > 0).astype(float).tolist()
    assert metrics.win_rate(longer_wins) == 0.8
    assert metrics.length_controlled_win_rate(longer_wins, differences.tolist()) == pytest.approx(0.5, abs=0.1)
    # no length difference to regress on: the plain rate; unreadable verdicts left out
    assert metrics.length_controlled_win_rate([1.0, 0.5, 0.0, 1.0, None], [0.0] * 5) == 0.625


def test_kl_estimates_are_per_sample_log_ratio_differences():
    assert metrics.sequence_kl_estimates([-3.0, -1.5], [-4.0, -1.5]) == [1.0, 0.0]
    assert metrics.order_agreement([True, False, None, True]) == pytest.approx(2 / 3)


# ----- the rule judge -------------------------------------------------------------------------------


def test_rule_scorers_check_answers_and_a_user_adds_one_with_the_decorator():
    prompt = "\n\nHuman: Which is the smallest of 4, 9, 2?\n\nAssistant:"
    assert RULE_SCORERS["numbers"](prompt, None, " The smallest is 2.") == 1.0
    assert RULE_SCORERS["numbers"](prompt, None, " The smallest is 4.") == 0.0
    messages = [{"role": "user", "content": "Which is the largest of 50, 98, 54? Answer with the number only."}]
    assert RULE_SCORERS["chat_numbers"]("", messages, " 98.") == 1.0
    assert RULE_SCORERS["chat_numbers"]("", messages, "The largest is 98.") == 0.0

    @rule_scorer("test_longer")
    def longer(prompt: str, messages, response: str) -> float:
        return float(len(response))

    assert RULE_SCORERS["test_longer"] is longer
    with pytest.raises(ValueError, match="already registered"):
        rule_scorer("test_longer")(longer)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_rule_judge_scores_server_generations_on_the_embedded_task(folders, server, tmp_path, endpoint):
    """generation.backend=openai (the server answers right when the first number is even) judged by the rule."""
    server_generation = ["generation.backend=openai", f"generation.base_url={server.base_url}",
                         "generation.model=half-right", f"generation.endpoint={endpoint}"]  # fmt: skip
    config = eval_config(
        folders, tmp_path / "out", "judge=rule", "judge.scorer=numbers", "n_prompts=24", *server_generation
    )
    summary = evaluate.evaluate(config).summary["temperatures"]["0.0"]
    records = read_jsonl(tmp_path / "out" / "judgments.jsonl")
    right = [embedded.score_completion(r["prompt"], r["policy"]) for r in records]
    first_even = [int(_NUMBERS.search(r["prompt"]).group(2)[0]) % 2 == 0 for r in records]
    assert right == first_even and 0 < sum(right) < len(right)
    # right answers tie with the chosen ones (both score 1), wrong ones lose
    assert summary["win_rate"] == pytest.approx(0.5 * sum(right) / len(right))
    assert (summary["ties"], summary["losses"], summary["wins"]) == (sum(right), len(right) - sum(right), 0)
    assert summary["mean_reward"] == pytest.approx(sum(right) / len(right)) and summary["mean_reward_baseline"] == 1.0
    low, high = summary["win_rate_ci"]
    assert low <= summary["win_rate"] <= high and low < high


# ----- the LLM judge against the local server ------------------------------------------------------


def synthetic_comparisons(pairs: list[tuple[str, str]]) -> list[Comparison]:
    prompt = "\n\nHuman: Which is the largest of 1, 2?\n\nAssistant:"
    return [
        Comparison(EvalPrompt(f"p{i}", prompt, None, b), 0.0, a, b, len(a), len(b)) for i, (a, b) in enumerate(pairs)
    ]


def judge_settings(server: JudgeServer, model: str, cache: Path, *more: str):
    overrides = ["policy=unused", "baseline=chosen", *llm_judge_overrides(server, model, cache, *more)]
    return compose_config_for_evaluate(overrides).judge


PAIRS = [(" a longer answer", " short"), (" x", " a much longer one"), (" same", " same"), (" long answer", " ok")]


def test_llm_judge_both_orders_cancel_a_position_bias(server, tmp_path, monkeypatch):
    monkeypatch.setenv("EVAL_TEST_KEY", "sk-test-123")
    with server.lock:
        server.most_in_flight = 0
    settings = judge_settings(server, "always-a", tmp_path / "cache.jsonl", "judge.api_key_env=EVAL_TEST_KEY",
                              "judge.max_concurrency=3")  # fmt: skip
    judgments = PairwiseLLMJudge(settings, seed=0)(synthetic_comparisons(PAIRS))
    assert 2 <= server.most_in_flight <= 3  # 8 requests overlap, at most max_concurrency at once
    assert "Bearer sk-test-123" in server.authorizations  # the key from the variable judge.api_key_env names
    assert [j.preference for j in judgments] == [0.5] * len(PAIRS)  # A first as policy, A first as baseline
    assert [j.orders_agree for j in judgments] == [False] * len(PAIRS)
    assert [[v["shown"] for v in j.verdicts] for j in judgments] == [["policy_first", "baseline_first"]] * len(PAIRS)
    # one order only: the seeded coin decides who is A, and the always-A judge follows it
    once = PairwiseLLMJudge(judge_settings(server, "always-a", tmp_path / "c.jsonl", "judge.both_orders=false"), 0)
    judgments = once(synthetic_comparisons(PAIRS * 4))
    shown_first = [j.verdicts[0]["shown"] == "policy_first" for j in judgments]
    assert [j.preference for j in judgments] == [float(first) for first in shown_first]
    assert 0 < sum(shown_first) < len(shown_first)


def test_llm_judge_verdicts_follow_content_in_both_orders(server, tmp_path):
    judge = PairwiseLLMJudge(judge_settings(server, "prefer-longer", tmp_path / "cache.jsonl"), seed=0)
    judgments = judge(synthetic_comparisons(PAIRS))
    assert [j.preference for j in judgments] == [1.0, 0.0, 0.5, 1.0]
    assert all(j.orders_agree for j in judgments)
    assert judgments[0].verdicts[1] == {
        "shown": "baseline_first",
        "verdict": "B",
        "reply": "Longer is better.\nVerdict: B",
    }


def test_llm_judge_retries_429_and_500_then_gives_up_clearly(server, tmp_path):
    before = server.count("flaky")
    judge = PairwiseLLMJudge(judge_settings(server, "flaky", tmp_path / "cache.jsonl"), seed=0)
    judgments = judge(synthetic_comparisons(PAIRS[:2]))
    assert [j.preference for j in judgments] == [1.0, 0.0]
    assert server.count("flaky") - before == 3 * 4  # 429, 500, then the verdict, for each of 4 requests
    statuses = [status for _, model, status in server.requests if model == "flaky"][-12:]
    assert sorted(statuses) == [200] * 4 + [429] * 4 + [500] * 4
    impatient = PairwiseLLMJudge(judge_settings(server, "flaky", tmp_path / "c2.jsonl", "judge.max_retries=1"), 0)
    with pytest.raises(ServerError, match="still failing after 2 tries"):
        impatient(synthetic_comparisons([(" brand new", " texts here")]))


def test_llm_judge_unreadable_replies_are_invalid_never_wins(folders, server, tmp_path):
    config = eval_config(folders, tmp_path / "out", *llm_judge_overrides(server, "garbage", tmp_path / "cache.jsonl"))
    summary = evaluate.evaluate(config).summary["temperatures"]["0.0"]
    assert summary["n_invalid"] == N_PROMPTS
    assert summary["win_rate"] is None and summary["wins"] == summary["ties"] == summary["losses"] == 0
    record = read_jsonl(tmp_path / "out" / "judgments.jsonl")[0]
    assert record["verdicts"][0]["verdict"] is None and "cannot choose" in record["verdicts"][0]["reply"]
    broken = PairwiseLLMJudge(judge_settings(server, "not-json", tmp_path / "cache2.jsonl"), seed=0)
    judgments = broken(synthetic_comparisons(PAIRS[:1]))
    assert judgments[0].preference is None and "not a chat completion" in judgments[0].verdicts[0]["reply"]
    assert not (tmp_path / "cache2.jsonl").exists()  # refusals are asked again next time, not cached


def test_llm_judge_evaluation_and_a_rerun_that_sends_no_request(folders, server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    first = evaluate.evaluate(
        eval_config(folders, tmp_path / "one", *llm_judge_overrides(server, "prefer-longer", cache))
    )
    sent = server.count("prefer-longer")
    assert sent >= 2  # at least one distinct pair, in two orders
    second = evaluate.evaluate(
        eval_config(folders, tmp_path / "two", *llm_judge_overrides(server, "prefer-longer", cache))
    )
    assert server.count("prefer-longer") == sent  # every verdict came from the cache
    assert second.summary["temperatures"] == first.summary["temperatures"]
    records = read_jsonl(tmp_path / "one" / "judgments.jsonl")
    expected = [1.0 if len(r["policy"]) > len(r["baseline"]) else 0.0 if len(r["policy"]) < len(r["baseline"]) else 0.5
                for r in records]  # fmt: skip
    assert [r["preference"] for r in records] == expected
    assert first.summary["temperatures"]["0.0"]["order_agreement"] == 1.0


# ----- the reward model, self-comparison, KL ----------------------------------------------------------


@torch.no_grad()
def direct_rewards(reward_folder: Path, texts: list[str]) -> list[float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_folder)
    model = AutoModelForSequenceClassification.from_pretrained(reward_folder).eval()
    return [model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item() for text in texts]


def test_reward_model_judge_scores_both_models_generations(folders, tmp_path):
    config = eval_config(folders, tmp_path / "out", "judge=reward_model", f"judge.path={folders['reward']}",
                         f"baseline={folders['other']}")  # fmt: skip
    summary = evaluate.evaluate(config).summary["temperatures"]["0.0"]
    records = read_jsonl(tmp_path / "out" / "judgments.jsonl")
    eos = AutoTokenizer.from_pretrained(folders["reward"]).eos_token  # text responses end with it, as in training
    policy_rewards = direct_rewards(folders["reward"], [r["prompt"] + r["policy"] + eos for r in records])
    baseline_rewards = direct_rewards(folders["reward"], [r["prompt"] + r["baseline"] + eos for r in records])
    assert [r["policy_score"] for r in records] == pytest.approx(policy_rewards, abs=1e-4)
    assert [r["baseline_score"] for r in records] == pytest.approx(baseline_rewards, abs=1e-4)
    assert [r["preference"] for r in records] == [float(p > b) for p, b in zip(policy_rewards, baseline_rewards)]
    assert summary["mean_reward"] == pytest.approx(np.mean(policy_rewards), abs=1e-4)
    generations = read_jsonl(tmp_path / "out" / "generations.jsonl")
    assert sorted({g["model"] for g in generations}) == ["baseline", "policy"]


def test_reward_model_scores_conversations_under_its_own_chat_template(folders, tmp_path):
    """Conversational data (demo-chat rows): the reward model reads each answer in its own template."""
    import shutil

    import chat_task

    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(json.dumps(row) + "\n" for row in chat_task.preference_rows(chat_task.make_problems("test", 6)))
    )
    reward = tmp_path / "reward_with_template"
    shutil.copytree(folders["reward"], reward)
    tokenizer = AutoTokenizer.from_pretrained(reward)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(reward)
    overrides = ("judge=reward_model", f"judge.path={reward}", f"datasets=[{data}]", "split=train", "baseline=none")
    evaluate.evaluate(eval_config(folders, tmp_path / "out", *overrides))
    records = read_jsonl(tmp_path / "out" / "judgments.jsonl")
    assert len(records) == 5 and all(r["baseline"] is None and r["preference"] is None for r in records)
    texts = [f"<user>{r['prompt'][0]['content']}<assistant>{r['policy']}" for r in records]
    assert [r["policy_score"] for r in records] == pytest.approx(direct_rewards(reward, texts), abs=1e-4)


@pytest.fixture(scope="module")
def self_evaluation(folders, tmp_path_factory):
    """The policy against itself (reference too), at temperatures 0 and 1, by the reward model; default out_dir."""
    policy = folders["policy"]
    overrides = [f"policy={policy}", f"baseline={policy}", f"reference={policy}", "judge=reward_model",
                 f"judge.path={folders['reward']}", f"n_prompts={N_PROMPTS}", "generation.max_new_tokens=6",
                 "temperatures=[0.0,1.0]", "metrics.bootstrap_resamples=200"]  # fmt: skip
    return evaluate.evaluate(compose_config_for_evaluate(overrides))


def test_policy_against_itself_at_temperature_zero_ties_everywhere(self_evaluation):
    greedy = self_evaluation.summary["temperatures"]["0.0"]
    assert (greedy["win_rate"], greedy["ties"], greedy["n_prompts"]) == (0.5, N_PROMPTS, N_PROMPTS)
    assert greedy["win_rate_ci"] == [0.5, 0.5] and greedy["lc_win_rate"] == 0.5
    records = [r for r in read_jsonl(self_evaluation.out_dir / "judgments.jsonl") if r["temperature"] == 0.0]
    assert all(r["policy"] == r["baseline"] and r["policy_score"] == r["baseline_score"] for r in records)


def test_kl_to_itself_is_exactly_zero(self_evaluation):
    for temperature in ("0.0", "1.0"):
        assert self_evaluation.summary["temperatures"][temperature]["kl"] == 0.0


def test_outputs_land_in_the_run_folder_and_its_report(self_evaluation, folders):
    out_dir = self_evaluation.out_dir
    assert out_dir.parent == folders["run"] / "evaluations"
    for name in ("config.yaml", "generations.jsonl", "judgments.jsonl", "summary.json", "win_rate_vs_temperature.png"):
        assert (out_dir / name).is_file(), name
    summary = json.loads((out_dir / "summary.json").read_text())
    required = {"win_rate", "win_rate_ci", "lc_win_rate", "n_prompts", "n_invalid", "order_agreement",
                "mean_length_policy", "mean_length_baseline", "kl", "mean_reward"}  # fmt: skip
    assert required <= set(summary["temperatures"]["1.0"])
    report = (folders["run"] / "report.html").read_text()
    assert report.count(f'<section id="evaluation-{out_dir.name}">') == 1 and "data:image/png;base64," in report
    assert OmegaConf.load(out_dir / "config.yaml").policy == str(folders["policy"])


# ----- resuming -----------------------------------------------------------------------------------------


# ----- bad inputs: one clear error before any model loads ------------------------------------------------


def test_every_bad_input_is_reported_before_anything_loads(folders, server, tmp_path):
    template = tmp_path / "no_b.txt"
    template.write_text("Which is better?\n{prompt}\nA: {response_a}\n")
    os.environ.pop("EVAL_TEST_MISSING_KEY", None)
    config = eval_config(folders, tmp_path / "out", "judge=openai", f"judge.prompt_template={template}",
                         "judge.api_key_env=EVAL_TEST_MISSING_KEY", "temperatures=[-0.5]")  # fmt: skip
    with pytest.raises(ConfigError) as error:
        evaluate.evaluate(config)
    message = str(error.value)
    assert "judge.prompt_template" in message and "{response_b}" in message
    assert "EVAL_TEST_MISSING_KEY is not set" in message and "temperatures=[-0.5]" in message
    assert not (tmp_path / "out").exists()

    closed = f"http://127.0.0.1:{free_closed_port()}/v1"
    unreachable = eval_config(
        folders, tmp_path / "out", "judge=openai", f"judge.base_url={closed}", "judge.api_key_env=null"
    )
    with pytest.raises(ConfigError, match=rf"judge.base_url={re.escape(closed)}: cannot reach the server"):
        evaluate.evaluate(unreachable)
    with pytest.raises(ConfigError, match="judge.scorer=nope: no rule scorer of that name. Registered: .*numbers"):
        evaluate.evaluate(eval_config(folders, tmp_path / "out", "judge=rule", "judge.scorer=nope"))
    with pytest.raises(MissingConfigException, match="judge/nope"):
        compose_config_for_evaluate(["policy=x", "judge=nope"])
    with pytest.raises(ConfigCompositionException):
        compose_config_for_evaluate(["policy=x", "n_promts=3"])  # misspelt keys are refused
    with pytest.raises(ConfigError, match=r"(?s)model=\.\.\.: not a setting .*n_promts=\.\.\.: not a setting"):
        evaluate.evaluate(eval_config(folders, tmp_path / "out", "judge=rule", "+model=tiny", "+n_promts=3"))
    assert not (tmp_path / "out").exists()


def free_closed_port() -> int:
    from utils import free_port

    return free_port()


def test_command_line_reports_all_problems_with_exit_code_2(tmp_path):
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json: any load would crash")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "evaluate.py"), f"policy={broken}", "datasets=[numbers]", "judge=rule",
         "judge.scorer=nope", f"baseline={tmp_path / 'missing'}", f"out_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "error: 2 problem(s)" in result.stderr and "Traceback" not in result.stderr
    assert "judge.scorer=nope" in result.stderr and f"baseline={tmp_path / 'missing'}" in result.stderr
    assert not (tmp_path / "out").exists()


def test_every_judge_file_composes_and_has_a_registry_row():
    from evaluation.judges import JUDGES

    files = sorted(p.stem for p in (REPO_ROOT / "config" / "judge").glob("*.yaml"))
    assert files == sorted(JUDGES)
    for name in files:
        assert compose_config_for_evaluate(["policy=x", f"judge={name}"]).judge.name == name


def test_plot_evaluations_draws_reward_against_kl(self_evaluation, tmp_path, monkeypatch, capsys):
    import runpy

    out = tmp_path / "compare"
    monkeypatch.setattr(sys, "argv", ["plot_evaluations.py", str(self_evaluation.out_dir), "--out", str(out)])
    runpy.run_path(str(REPO_ROOT / "scripts" / "plot_evaluations.py"), run_name="__main__")
    assert (out / "reward_vs_kl.png").stat().st_size > 0 and (out / "win_rates_vs_temperature.png").is_file()
    assert "| 1.0 |" in capsys.readouterr().out
    from evaluation.report import reward_vs_kl_figure

    without_kl = {"temperatures": {"0.0": {"mean_reward": 0.3}}}
    assert reward_vs_kl_figure([("no reference", without_kl)]) is None


def test_a_lora_checkpoint_is_merged_into_its_runs_base(folders, tmp_path):
    """An adapter-only step-N (a LoRA run's) generates exactly what the same adapter merged by hand does."""
    from peft import LoraConfig, get_peft_model

    from models import load_model

    run_dir = tmp_path / "lora_run"
    run_dir.mkdir()
    run_config = compose_config(["loss=dpo", "lora.enabled=true", *SMALL_MODEL])
    OmegaConf.save(run_config, run_dir / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(folders["policy"])
    base = load_model(run_config.model, "float32", tokenizer, run_config.max_length, run_config.seed)
    torch.manual_seed(3)
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    checkpoint = run_dir / "step-64"
    adapted.save_pretrained(checkpoint / "adapter")
    tokenizer.save_pretrained(checkpoint)
    adapted.merge_and_unload().save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    overrides = (f"policy={checkpoint}", f"baseline={tmp_path / 'merged'}", "judge=reward_model",
                 f"judge.path={folders['reward']}")  # fmt: skip
    summary = evaluate.evaluate(eval_config(folders, tmp_path / "out", *overrides)).summary["temperatures"]["0.0"]
    assert (summary["win_rate"], summary["ties"]) == (0.5, N_PROMPTS)
    records = read_jsonl(tmp_path / "out" / "judgments.jsonl")
    assert all(r["policy"] == r["baseline"] for r in records)


def test_every_evaluate_command_in_the_readme_composes():
    import shlex

    section = (REPO_ROOT / "README.md").read_text().split("## Evaluating a run", 1)[1].split("\n## ", 1)[0]
    lines = re.sub(r"<[^>]*>", "x", section.replace("\\\n", " ")).splitlines()  # <dpo run> placeholders
    commands = [shlex.split(line)[2:] for line in lines if line.startswith("python evaluate.py")]
    assert len(commands) >= 6
    for overrides in commands:
        config = compose_config_for_evaluate(overrides)
        assert config.judge.name in ("openai", "reward_model", "rule")
    for path in re.findall(r"config/judge_prompts/\w+\.txt", section):
        assert (REPO_ROOT / path).is_file(), path


def test_an_evaluation_killed_while_generating_continues_where_it_stopped(folders, tmp_path):
    """SIGKILL the command line after a few batches; rerunning it keeps them and generates only the rest."""
    out_dir = tmp_path / "out"
    overrides = [f"policy={folders['policy']}", f"out_dir={out_dir}", "judge=rule", "n_prompts=60",
                 "generation.max_new_tokens=6", "temperatures=[0.0]", "metrics.bootstrap_resamples=200"]  # fmt: skip
    command = [sys.executable, str(REPO_ROOT / "evaluate.py"), *overrides, "generation.batch_size=1"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = out_dir / "generations.jsonl"
    try:
        while process.poll() is None and (not path.is_file() or path.read_text().count("\n") < 3):
            time.sleep(0.01)
        process.kill()  # SIGKILL: no handler runs, the file is as the kill left it
    finally:
        process.wait(timeout=60)
    kept = path.read_text().splitlines(keepends=True)
    kept = kept if kept[-1].endswith("\n") else kept[:-1]
    assert 3 <= len(kept) < 60
    with open(path, "a") as file:  # as a kill in the middle of a write would leave it
        file.write('{"model": "policy", "temperature": 0.0, "prompt_id": "cut sh')
    resumed = evaluate.evaluate(compose_config_for_evaluate(overrides))
    assert resumed.n_generated == 60 - len(kept)
    lines = path.read_text().splitlines(keepends=True)
    assert lines[: len(kept)] == kept and len({json.loads(line)["prompt_id"] for line in lines}) == len(lines) == 60
    assert evaluate.evaluate(compose_config_for_evaluate(overrides)).n_generated == 0
    with pytest.raises(ConfigError, match="n_prompts: 60 there, 30 now"):
        evaluate.evaluate(compose_config_for_evaluate([*overrides, "n_prompts=30"]))
