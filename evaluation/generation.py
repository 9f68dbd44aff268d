"""Responses to the evaluation prompts: generated in-process or through an OpenAI-compatible server, saved as made.

generations.jsonl holds one line per (model, temperature, prompt), appended as each batch
finishes; a rerun reads it back and generates only what is missing, so a killed evaluation
loses at most the batch in flight. A line cut short by the kill is dropped on reading.
"""

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import GenerationConfig

from errors import DatasetError
from evaluation.loading import EvalPrompt, prompt_token_ids, server_prompt, stop_token_ids
from evaluation.openai_api import make_client, with_retries


@dataclass(frozen=True)
class Generation:
    """One response: which model ("policy" or "baseline"), at what temperature, to which prompt."""

    model: str
    temperature: float
    prompt_id: str
    response: str
    token_ids: list[int]  # the response's tokens in the generating model's tokenizer, its stop token last if it stopped

    @property
    def key(self) -> tuple[str, float, str]:
        return self.model, self.temperature, self.prompt_id


class GenerationStore:
    """generations.jsonl: what exists (read once), and appending new lines durably."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.generations: dict[tuple[str, float, str], Generation] = {}
        if path.is_file():
            self._read()

    def _read(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]  # tail: "" after a final newline, else a line cut short
        for number, line in enumerate(complete, start=1):
            try:
                generation = Generation(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as error:
                raise DatasetError(
                    f"{self.path}, line {number}: not a generation record ({error}). Delete the file "
                    "(or that line) to generate again."
                ) from error
            self.generations[generation.key] = generation
        if tail:  # a write interrupted by a kill: keep every complete line, drop the partial one
            with open(self.path, "r+b") as file:
                file.truncate(len(text.encode("utf-8")) - len(tail.encode("utf-8")))

    def missing(self, model: str, temperature: float, prompts: Sequence[EvalPrompt]) -> list[EvalPrompt]:
        return [p for p in prompts if (model, temperature, p.prompt_id) not in self.generations]

    def get(self, model: str, temperature: float, prompt: EvalPrompt) -> Generation:
        return self.generations[(model, temperature, prompt.prompt_id)]

    def append(self, generations: Sequence[Generation]) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            for generation in generations:
                file.write(json.dumps(asdict(generation)) + "\n")
                self.generations[generation.key] = generation
            file.flush()
            os.fsync(file.fileno())


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def left_padded(sequences: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (batch, longest), padded on the left for generation."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence) :] = 1
    return ids, mask


def cut_at_stop(token_ids: list[int], stop_ids: Sequence[int]) -> list[int]:
    """The new tokens up to and including the first stop token (what follows is padding)."""
    for position, token in enumerate(token_ids):
        if token in stop_ids:
            return token_ids[: position + 1]
    return token_ids


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are drawn (config.generation), the same for every model of an evaluation."""

    max_new_tokens: int
    top_p: float
    batch_size: int
    max_prompt_length: int
    seed: int


# what a generator yields: batches of (prompt, response text, response token ids)
GeneratedBatch = list[tuple[EvalPrompt, str, list[int]]]


def batch_seed(seed: int, temperature: float, first_prompt: EvalPrompt) -> int:
    return int(hashlib.sha256(f"{seed}-{temperature}-{first_prompt.prompt_id}".encode()).hexdigest()[:8], 16)


@torch.no_grad()
def generate_in_process(
    model, tokenizer, prompts: Sequence[EvalPrompt], temperature: float, settings: SamplingSettings
) -> Iterator[GeneratedBatch]:
    """Batches of (prompt, response, token ids) from a transformers model; greedy at temperature 0.

    Sampling is seeded per batch from the settings' seed, the temperature and the batch's first
    prompt, so a rerun of the same missing batch draws the same responses.
    """
    stop_ids = stop_token_ids(tokenizer)
    device = next(model.parameters()).device
    for batch in batches(prompts, settings.batch_size):
        ids, mask = left_padded([prompt_token_ids(tokenizer, p, settings.max_prompt_length) for p in batch],
                                tokenizer.pad_token_id)  # fmt: skip
        sampling = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": settings.top_p, "top_k": 0}
            torch.manual_seed(batch_seed(settings.seed, temperature, batch[0]))
        # a config of our own, not the model's generation_config.json: every model (and its repetition
        # penalty, top_k, ...) samples the same way, as the evaluation's settings say
        generation_config = GenerationConfig(max_new_tokens=settings.max_new_tokens, eos_token_id=stop_ids,
                                             pad_token_id=tokenizer.pad_token_id, **sampling)  # fmt: skip
        sequences = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=generation_config
        )
        responses = [cut_at_stop(tokens, stop_ids) for tokens in sequences[:, ids.shape[1] :].tolist()]
        yield [(p, tokenizer.decode(r, skip_special_tokens=True), r) for p, r in zip(batch, responses)]


def generate_through_server(
    server: DictConfig,
    model_name: str,
    tokenizer,
    prompts: Sequence[EvalPrompt],
    temperature: float,
    settings: SamplingSettings,
) -> Iterator[GeneratedBatch]:
    """Batches of (prompt, response, token ids) from an OpenAI-compatible server (config.generation).

    completions: the prompt text rendered here (as in training); chat: the messages, rendered by
    the server. Token ids are the response retokenized, EOS last when the server says it stopped.
    """
    client = make_client(server.base_url, server.api_key_env, server.timeout_s)
    sampling = {"temperature": temperature, "max_tokens": settings.max_new_tokens}
    if temperature > 0:
        sampling["top_p"] = settings.top_p

    def ask(prompt: EvalPrompt) -> tuple[EvalPrompt, str, list[int]]:
        def request() -> tuple[str, str | None]:
            if server.endpoint == "chat":
                messages = prompt.messages or [{"role": "user", "content": prompt.text}]
                choice = client.chat.completions.create(model=model_name, messages=messages, **sampling).choices[0]
                return choice.message.content or "", choice.finish_reason
            choice = client.completions.create(model=model_name, prompt=server_prompt(tokenizer, prompt), **sampling)
            return choice.choices[0].text, choice.choices[0].finish_reason

        text, finish_reason = with_retries(
            request, server.max_retries, server.retry_backoff_s, f"generation at {server.base_url}"
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids + (
            [tokenizer.eos_token_id] if finish_reason == "stop" else []
        )
        return prompt, text, ids

    try:
        with ThreadPoolExecutor(max_workers=settings.batch_size) as pool:
            for batch in batches(prompts, settings.batch_size):
                yield list(pool.map(ask, batch))
    finally:
        client.close()


def generate_missing(
    store: GenerationStore,
    role: str,
    temperatures: Sequence[float],
    prompts: Sequence[EvalPrompt],
    generate_batches: Callable[[Sequence[EvalPrompt], float], Iterator[GeneratedBatch]],
) -> int:
    """Generate, for each temperature, the responses of `role` that the store lacks; returns how many were made."""
    made = 0
    for temperature in temperatures:
        missing = store.missing(role, temperature, prompts)
        for batch in generate_batches(missing, temperature) if missing else ():
            store.append([Generation(role, temperature, p.prompt_id, text, ids) for p, text, ids in batch])
            made += len(batch)
    return made


@torch.no_grad()
def response_logps(
    model, tokenizer, pairs: Sequence[tuple[EvalPrompt, list[int]]], max_prompt_length: int, batch_size: int
) -> list[float]:
    """log pi(y|x) of each (prompt, response token ids), summed over the response's tokens (float32).

    Rows are right-padded and each is scored with the model's own logits (no temperature).
    """
    device = next(model.parameters()).device
    logps = []
    for batch in batches(pairs, batch_size):
        prompts = [prompt_token_ids(tokenizer, prompt, max_prompt_length) for prompt, _ in batch]
        rows = [p + list(response) for p, (_, response) in zip(prompts, batch)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        response_mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, (prompt, sequence) in enumerate(zip(prompts, rows)):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
            response_mask[row, len(prompt) : len(sequence)] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        # token t is predicted by position t - 1: (batch, width - 1)
        token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
        summed = (token_logps * response_mask[:, 1:].to(device)).sum(-1)
        logps += summed.cpu().tolist()
    return logps
