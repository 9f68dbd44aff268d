"""Chat templates: the `chat_template` setting, rendering conversations to text, and the end-of-turn token.

A conversational example is rendered twice (tokenization.py tokenizes the texts): the prompt's
messages with the generation prompt ("<|im_start|>assistant\\n"), and the whole conversation
with the answer. The prompt's tokens must be a prefix of the whole conversation's, so that the
response tokens are exactly what the answer adds. Templates that strip or rewrite earlier turns
break that property; their rows are reported and left out, never trained on misaligned tokens.

Tokenizers without a template (and `chat_template=none`) render conversations in the
Anthropic-HH text format of the built-in datasets (PLAIN_TEXT_TEMPLATE).
"""

from collections.abc import Sequence
from pathlib import Path

import jinja2
from transformers.utils.chat_template_utils import _compile_jinja_template

from errors import DatasetError

CHAT_TEMPLATE_CHOICES = ("auto", "none")  # or the path of a Jinja file

# "\n\nHuman: ...\n\nAssistant: ...", the format of hh and of the DPO paper; a system message goes first as is
PLAIN_TEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '\n\nHuman: ' + message['content'] }}"
    "{% else %}{{ '\n\nAssistant: ' + message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)


def chat_template_problem(setting: str) -> str | None:
    """Why the `chat_template` config value is unusable, or None (for the config checks).

    A template file is compiled as transformers compiles it, so a syntax error is found here, with
    its line, and is never taken for rows the template refuses.
    """
    if setting in CHAT_TEMPLATE_CHOICES:
        return None
    if not Path(setting).is_file():
        return f"chat_template={setting}: must be auto, none, or the path of a Jinja chat template file (no such file)."
    try:
        text = Path(setting).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return f"chat_template={setting}: cannot be read as UTF-8 text ({error})."
    syntax_error = template_syntax_error(text)
    return f"chat_template={setting}: {syntax_error}. Fix the template file." if syntax_error else None


def template_syntax_error(template: str) -> str | None:
    """Where and why a Jinja chat template does not compile ("line 3: unexpected '}'"), or None."""
    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as error:  # also an unknown filter or test (TemplateAssertionError)
        return f"line {error.lineno}: {(error.message or 'syntax error').rstrip('.')}"
    return None


def set_chat_template(tokenizer, setting: str) -> None:
    """Apply the `chat_template` setting: auto keeps the tokenizer's own, none removes it, a path replaces it."""
    if setting == "auto":
        return
    if setting == "none":
        tokenizer.chat_template = None
        return
    path = Path(setting)
    if not path.is_file():
        raise DatasetError(chat_template_problem(setting))
    tokenizer.chat_template = path.read_text(encoding="utf-8")


def template_text(tokenizer) -> str:
    """The Jinja template conversations are rendered with: the tokenizer's, else the plain-text one."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates (e.g. "default", "tool_use"): conversations use default
        template = template.get("default")
    return template or PLAIN_TEXT_TEMPLATE


def render(tokenizer, conversations: Sequence[Sequence[dict]], add_generation_prompt: bool) -> list[str | None]:
    """Each conversation (a list of {"role", "content"}) as the template's text, special tokens written out.

    None for a conversation the template refuses (many raise on roles that do not alternate).
    """
    template = template_text(tokenizer)
    syntax_error = template_syntax_error(template)
    if syntax_error:
        raise DatasetError(
            f"The chat template of {tokenizer.name_or_path or 'the tokenizer'} does not compile ({syntax_error}); "
            "no row was rendered. Set chat_template=<a fixed Jinja file> or chat_template=none."
        )
    texts = []
    for conversation in conversations:
        try:
            texts.append(
                tokenizer.apply_chat_template(
                    list(conversation),
                    chat_template=template,
                    add_generation_prompt=add_generation_prompt,
                    tokenize=False,
                )
            )
        except jinja2.TemplateError:
            texts.append(None)
    return texts


def special_token_ids(tokenizer) -> set[int]:
    """Ids of every special token: the named ones and the added tokens marked special (<|eot_id|>, ...)."""
    added = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the template closes an assistant turn with (<|im_end|>, <|eot_id|>), or None.

    Found by rendering a probe conversation: the first special token after the answer's text.
    None for the plain-text template and templates that close turns with plain text; responses
    then end with EOS as in the text datasets.
    """
    if not tokenizer.chat_template:
        return None
    user = {"role": "user", "content": "Hi"}
    (prompt,) = render(tokenizer, [[user]], True)
    (whole,) = render(tokenizer, [[user, {"role": "assistant", "content": "Hello"}]], False)
    if prompt is None or whole is None or not whole.startswith(prompt) or "Hello" not in whole[len(prompt) :]:
        return None
    after_answer = whole[len(prompt) :].split("Hello", 1)[1]
    special = special_token_ids(tokenizer)
    after_ids = tokenizer(after_answer, add_special_tokens=False).input_ids
    return next((token for token in after_ids if token in special), None)


def stop_token_ids(tokenizer) -> list[int]:
    """Where generation stops: EOS, and the template's end-of-turn token when it has another one."""
    end_of_turn = end_of_turn_id(tokenizer)
    return [tokenizer.eos_token_id] + ([end_of_turn] if end_of_turn not in (None, tokenizer.eos_token_id) else [])


def with_answer(prompt_messages: Sequence[dict], answer: str) -> list[dict]:
    """The prompt's messages followed by the assistant's answer: a sample saved as a conversation."""
    return [*prompt_messages, {"role": "assistant", "content": answer}]


def as_dicts(conversation: Sequence[Sequence[str]]) -> list[dict]:
    """(role, content) pairs (preference_datasets.Message) as the {"role", "content"} dicts templates read."""
    return [{"role": role, "content": content} for role, content in conversation]
