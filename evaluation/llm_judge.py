"""The pairwise LLM judge (judge=openai): a prompt template, both orders, bounded concurrency, retries, a reply cache.

Each comparison is shown to the judge model as the template filled with the prompt and the two
responses, by default in both orders (policy as A, then as B), so that a judge that favours a
position gives a tie instead of a win; the share of comparisons whose two orders agree is
reported. The verdict is the last match of judge.verdict_pattern in the reply (its group: A, B or
tie, any case). A reply without one is invalid: the comparison counts as neither win nor loss.
Replies are cached on disk, keyed by the judge model, the template, the prompt and both texts as
shown, so a rerun sends no request twice.
"""

import hashlib
import json
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import DictConfig

from evaluation.comparisons import Comparison, Judgment
from evaluation.openai_api import RequestRefused, api_key_problem, make_client, reachability_problem, with_retries

PLACEHOLDERS = ("{prompt}", "{response_a}", "{response_b}")
REPO_ROOT = Path(__file__).resolve().parent.parent
POLICY_FIRST, BASELINE_FIRST = "policy_first", "baseline_first"


def resolve_path(path: str) -> Path:
    """A path as given, else relative to the repository (so the shipped templates work from any folder)."""
    given = Path(path)
    return given if given.exists() or given.is_absolute() else REPO_ROOT / given


def config_problems(settings: DictConfig) -> list[str]:
    """Problems with judge=openai's settings that need no request: template, pattern, key, numbers."""
    problems = []
    template = resolve_path(settings.prompt_template)
    if not template.is_file():
        problems.append(f"judge.prompt_template={settings.prompt_template}: no such file.")
    else:
        text = template.read_text(encoding="utf-8")
        absent = [p for p in PLACEHOLDERS if p not in text]
        if absent:
            problems.append(
                f"judge.prompt_template={settings.prompt_template}: the template lacks {', '.join(absent)}; "
                f"it must contain each of {', '.join(PLACEHOLDERS)}."
            )
    try:
        if re.compile(settings.verdict_pattern).groups != 1:
            problems.append(
                f"judge.verdict_pattern={settings.verdict_pattern!r}: needs exactly one group capturing A, B or tie."
            )
    except re.error as error:
        problems.append(f"judge.verdict_pattern={settings.verdict_pattern!r}: not a regular expression ({error}).")
    problems += [p for p in [api_key_problem("judge.api_key_env", settings.api_key_env)] if p]
    for key in ("max_concurrency", "timeout_s"):
        if not settings[key] > 0:
            problems.append(f"judge.{key}={settings[key]}: must be positive.")
    if settings.max_retries < 0:
        problems.append(f"judge.max_retries={settings.max_retries}: must be 0 or more.")
    return problems


def server_problems(settings: DictConfig) -> list[str]:
    """Whether the judge's server answers (one request, made before any model loads)."""
    problem = reachability_problem("judge.base_url", settings.base_url, settings.api_key_env, settings.timeout_s)
    return [problem] if problem else []


def read_verdict(reply: str | None, pattern: re.Pattern) -> str | None:
    """'A', 'B' or 'tie' from the last match of the pattern in the reply; None when there is none."""
    matches = list(pattern.finditer(reply or ""))
    if not matches:
        return None
    verdict = (matches[-1].group(1) or "").strip()
    if verdict.upper() in ("A", "B"):
        return verdict.upper()
    return "tie" if verdict.lower() == "tie" else None


def policy_share(verdict: str | None, shown: str) -> float | None:
    """The policy's share of one verdict given which response was shown as A."""
    if verdict is None:
        return None
    if verdict == "tie":
        return 0.5
    policy_letter = "A" if shown == POLICY_FIRST else "B"
    return 1.0 if verdict == policy_letter else 0.0


class ReplyCache:
    """Judge replies on disk (JSON lines of {"key", "reply"}), safe to add to from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.replies: dict[str, str] = {}
        self.lock = threading.Lock()
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self.replies[record["key"]] = record["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill: that reply is asked for again
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, key: str, reply: str) -> None:
        with self.lock:
            self.replies[key] = reply
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps({"key": key, "reply": reply}) + "\n")


class PairwiseLLMJudge:
    """judge=openai: see the module's docstring."""

    def __init__(self, settings: DictConfig, seed: int) -> None:
        self.settings = settings
        self.seed = seed
        self.template = resolve_path(settings.prompt_template).read_text(encoding="utf-8")
        self.pattern = re.compile(settings.verdict_pattern)
        self.client = make_client(settings.base_url, settings.api_key_env, settings.timeout_s)
        self.cache = ReplyCache(resolve_path(settings.cache_file))
        self.refused: dict[str, str] = {}  # requests the server refused (4xx): the refusal, shown as the reply

    def fill(self, prompt: str, response_a: str, response_b: str) -> str:
        # replaced one by one (not str.format), so braces in the texts or the template stay as they are
        filled = self.template.replace("{prompt}", prompt)
        return filled.replace("{response_a}", response_a).replace("{response_b}", response_b)

    def cache_key(self, prompt: str, response_a: str, response_b: str) -> str:
        """What decides a reply: the judge model, the template, the texts as shown, the judge's sampling settings."""
        settings = self.settings
        identity = [settings.model, self.template, prompt, response_a, response_b, settings.temperature,
                    settings.max_tokens]  # fmt: skip
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()

    def orders(self, comparison: Comparison) -> list[str]:
        if self.settings.both_orders:
            return [POLICY_FIRST, BASELINE_FIRST]
        coin = random.Random(f"{self.seed}-{comparison.temperature}-{comparison.prompt.prompt_id}").random()
        return [POLICY_FIRST if coin < 0.5 else BASELINE_FIRST]

    @staticmethod
    def shown_texts(comparison: Comparison, shown: str) -> tuple[str, str, str]:
        policy, baseline = comparison.policy, comparison.baseline
        return (
            (comparison.prompt.text, policy, baseline)
            if shown == POLICY_FIRST
            else (comparison.prompt.text, baseline, policy)
        )

    def __call__(self, comparisons: list[Comparison]) -> list[Judgment]:
        shown = [[(order, self.shown_texts(c, order)) for order in self.orders(c)] for c in comparisons]
        wanted = {self.cache_key(*texts): texts for orders in shown for _, texts in orders}
        replies = self.replies(wanted)
        return [self.judgment(orders, replies) for orders in shown]

    def replies(self, wanted: dict[str, tuple[str, str, str]]) -> dict[str, str]:
        """The reply to each request: cached, or asked for (max_concurrency at a time), or the refusal's text."""
        missing = [key for key in wanted if key not in self.cache.replies]
        with ThreadPoolExecutor(max_workers=self.settings.max_concurrency) as pool:
            list(pool.map(lambda key: self.ask(key, wanted[key]), missing))
        return {key: self.cache.replies[key] if key in self.cache.replies else self.refused[key] for key in wanted}

    def ask(self, key: str, texts: tuple[str, str, str]) -> None:
        """Send one request and cache its reply; a refused request is remembered in self.refused, not cached."""
        settings = self.settings
        options = {"temperature": settings.temperature} if settings.temperature is not None else {}
        if settings.max_tokens is not None:
            options["max_tokens"] = settings.max_tokens

        def request() -> str:
            messages = [{"role": "user", "content": self.fill(*texts)}]
            try:
                completion = self.client.chat.completions.create(model=settings.model, messages=messages, **options)
                return completion.choices[0].message.content or ""
            except (ValueError, TypeError, AttributeError, IndexError) as error:  # a 200 that is no chat completion
                raise RequestRefused(
                    f"the answer is not a chat completion ({type(error).__name__}: {error})"
                ) from error

        what = f"judge request to {settings.base_url}"
        try:
            reply = with_retries(request, settings.max_retries, settings.retry_backoff_s, what)
        except RequestRefused as refusal:
            with self.cache.lock:
                self.refused[key] = f"(request refused: {refusal})"
            return
        self.cache.add(key, reply)

    def judgment(self, orders: list[tuple[str, tuple[str, str, str]]], replies: dict[str, str | None]) -> Judgment:
        verdicts, shares = [], []
        for order, texts in orders:
            key = self.cache_key(*texts)
            reply = replies[key]
            verdict = None if key in self.refused else read_verdict(reply, self.pattern)
            verdicts.append({"shown": order, "verdict": verdict, "reply": reply})
            shares.append(policy_share(verdict, order))
        if any(share is None for share in shares):
            return Judgment(None, verdicts=verdicts)
        agree = shares[0] == shares[1] if len(shares) == 2 else None
        return Judgment(sum(shares) / len(shares), verdicts=verdicts, orders_agree=agree)

    def close(self) -> None:
        self.client.close()
