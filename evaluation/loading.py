"""Where evaluation meets the training code: models and tokenizers from folders, prompts from the datasets.

Every import from the training modules is in this file, so a rename there is fixed here once.
A model folder is a run's checkpoint (<run>/LATEST, <run>/step-N, a LoRA adapter included: it is
loaded through the run's own model settings in <run>/config.yaml) or any Hugging Face folder.
"""

import gc
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from chat_templates import as_dicts, render, set_chat_template, stop_token_ids
from dataset_loading import get_dataset
from errors import DatasetError
from models import load_model, load_tokenizer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
RUN_CONFIG_FILE = "config.yaml"  # a run folder's resolved configuration (run_log.py)
TOKENIZER_FILE = "tokenizer_config.json"

__all__ = ["stop_token_ids"]  # re-exported for generation.py


def run_config(model_folder: Path) -> DictConfig | None:
    """The training configuration of the run a checkpoint folder belongs to, or None for a plain folder."""
    path = model_folder.parent / RUN_CONFIG_FILE
    return OmegaConf.load(path) if path.is_file() else None


def model_settings(model_folder: Path) -> tuple[DictConfig, int, int]:
    """(model settings as train.py's `model` key, max_length, seed) that load the folder's weights.

    A run's checkpoint keeps its run's settings with model.archive pointing at it (so a LoRA
    adapter is merged into the run's base); a plain folder gets blank_model.yaml's.
    """
    trained = run_config(model_folder)
    if trained is not None:
        model = OmegaConf.merge(trained.model, {"archive": str(model_folder)})
        max_length, seed = trained.max_length, trained.seed
    else:
        model = OmegaConf.load(CONFIG_DIR / "model" / "blank_model.yaml")
        model.name_or_path = str(model_folder)
        max_length, seed = 2048, 0
    if (model_folder / TOKENIZER_FILE).is_file():
        model.tokenizer_name_or_path = str(model_folder)
    return model, max_length, seed


def tokenizer_for(model_folder: Path, chat_template: str):
    """The folder's tokenizer (with a pad token) under the `chat_template` setting."""
    model, _, _ = model_settings(model_folder)
    tokenizer = load_tokenizer(model)
    set_chat_template(tokenizer, chat_template)
    return tokenizer


def causal_model(model_folder: Path, tokenizer, dtype: str, device: torch.device) -> PreTrainedModel:
    """The folder's causal language model, in eval mode on `device`."""
    model, max_length, seed = model_settings(model_folder)
    return load_model(model, dtype, tokenizer, max_length, seed).to(device).eval()


def free_memory() -> None:
    """Return the memory of models no longer referenced (`del` them first) before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of the evaluation: its id, text or messages, and the dataset's chosen response."""

    prompt_id: str  # a hash of the prompt, the key of its generations
    text: str  # the dataset's prompt text; for conversations, the messages as "role: content" lines
    messages: list[dict] | None  # conversational prompts only
    chosen: str  # the preferred response of the prompt's first pair (its SFT target when it has no pair)


def _prompt_id(prompt) -> str:
    raw = prompt if isinstance(prompt, str) else json.dumps(as_dicts(prompt))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _eval_prompt(prompt, entry: dict) -> EvalPrompt:
    chosen = entry["responses"][entry["pairs"][0][0]] if entry["pairs"] else entry["sft_target"]
    if isinstance(prompt, str):
        return EvalPrompt(_prompt_id(prompt), prompt, None, chosen)
    messages = as_dicts(prompt)
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return EvalPrompt(_prompt_id(prompt), text, messages, chosen)


def choose_prompts(
    datasets: list[str],
    split: str,
    n_prompts: int,
    seed: int,
    dataset_paths: dict | None,
    dataset_options: dict | None,
) -> list[EvalPrompt]:
    """n_prompts distinct prompts of the datasets' split, chosen with `seed` (all of them if fewer)."""
    prompts: dict[str, EvalPrompt] = {}
    for name in datasets:
        data = get_dataset(name, split, dataset_paths=dataset_paths, dataset_options=dataset_options)
        for prompt, entry in data.items():
            item = _eval_prompt(prompt, entry)
            prompts.setdefault(item.prompt_id, item)
    if not prompts:
        raise DatasetError(f"The {split} split of datasets={datasets} holds no prompts.")
    ordered = sorted(prompts.values(), key=lambda p: p.prompt_id)
    return random.Random(seed).sample(ordered, min(n_prompts, len(ordered)))


def prompt_token_ids(tokenizer, prompt: EvalPrompt, max_prompt_length: int) -> list[int]:
    """The prompt as the policy sees it in training, its last max_prompt_length tokens.

    Text prompts are tokenized as they are (BOS first when the tokenizer adds one); conversations
    are rendered with the chat template and its generation prompt.
    """
    if prompt.messages is None:
        ids = tokenizer(prompt.text, add_special_tokens=False).input_ids
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("x").input_ids[:1] == [bos]
        ids = ([bos] if adds_bos else []) + ids
    else:
        (text,) = render(tokenizer, [prompt.messages], add_generation_prompt=True)
        if text is None:
            raise DatasetError(f"The chat template refuses the conversation {prompt.messages!r}.")
        ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids[-max_prompt_length:]


def render_conversation(tokenizer, prompt: EvalPrompt, response: str) -> str:
    """Prompt and response as one text for a scoring model: text prompts as they are, conversations with
    its chat template (the "\\n\\nHuman: ...\\n\\nAssistant:" format when it has none).

    A text response ends with the EOS token, as training tokenizes it (tokenization.py), so a reward
    model trained here reads its score at the token it was trained to score (reward_scores.py).
    """
    if prompt.messages is None:
        return prompt.text + response + (tokenizer.eos_token or "")
    (text,) = render(tokenizer, [[*prompt.messages, {"role": "assistant", "content": response}]], False)
    if text is None:
        raise DatasetError(f"The reward model's chat template refuses the conversation {prompt.messages!r}.")
    return text


def server_prompt(tokenizer, prompt: EvalPrompt) -> str:
    """The prompt as text for a completions endpoint: as it is, or rendered with the chat template."""
    if prompt.messages is None:
        return prompt.text
    (text,) = render(tokenizer, [prompt.messages], add_generation_prompt=True)
    if text is None:
        raise DatasetError(f"The chat template refuses the conversation {prompt.messages!r}.")
    return text
