"""Conversations in preference data: messages, reading them from a row's fields, splitting off the last answer.

A conversational prompt is a tuple of Message(role, content), the user's turn last; a response is
the text of the assistant's answer. preference_datasets.py builds its entries from these, and
chat_templates.py renders them with a tokenizer's chat template.
"""

from typing import NamedTuple

ROLES = ("system", "user", "assistant")


class Message(NamedTuple):
    """One turn of a conversation."""

    role: str  # "system" (first only), "user" or "assistant"
    content: str


Conversation = tuple[Message, ...]  # a conversational prompt: the turns before the answer, the user's last


class RowProblem(ValueError):
    """What is wrong with one row of conversational data; the caller names the file and row, or skips it."""


def as_conversation(messages, field: str) -> Conversation:
    """A list of {"role", "content"} dicts (a row field) as a Conversation, or RowProblem saying what is wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RowProblem(f"field {field!r} must be a non-empty list of messages, not {messages!r}"[:160] + ".")
    conversation = []
    for position, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise RowProblem(
                f"field {field!r}, message {position}: expected {{'role': one of {', '.join(ROLES)}, "
                f"'content': a string}}, not {message!r}"[:200]
                + "."
            )
        if role == "system" and position > 0:
            raise RowProblem(f"field {field!r}, message {position}: a system message may only come first.")
        conversation.append(Message(role, content))
    return tuple(conversation)


def split_last_answer(conversation: Conversation, field: str) -> tuple[Conversation, str]:
    """(the prompt, the text of the last assistant turn) of a whole conversation, or RowProblem."""
    if conversation[-1].role != "assistant":
        raise RowProblem(f"field {field!r}: the last message must be the assistant's, not {conversation[-1].role!r}.")
    prompt = conversation[:-1]
    if not prompt or prompt[-1].role != "user":
        raise RowProblem(f"field {field!r}: the assistant's last answer must follow a user message.")
    return prompt, conversation[-1].content


def split_conversation_pair(chosen: Conversation, rejected: Conversation) -> tuple[Conversation, str, str]:
    """(shared prompt, chosen answer, rejected answer) of two whole conversations that differ only in the last turn."""
    prompt, chosen_answer = split_last_answer(chosen, "chosen")
    rejected_prompt, rejected_answer = split_last_answer(rejected, "rejected")
    if rejected_prompt != prompt:
        pairs = enumerate(zip(prompt, rejected_prompt))
        turn = next((i for i, (ours, theirs) in pairs if ours != theirs), min(len(prompt), len(rejected_prompt)))
        raise RowProblem(
            f"chosen and rejected differ at message {turn}, before the last assistant turn; "
            "they must share every message but the last."
        )
    return prompt, chosen_answer, rejected_answer


def conversation_problem(prompt: tuple) -> str | None:
    if not prompt or not all(
        isinstance(m, tuple) and len(m) == 2 and all(isinstance(x, str) for x in m) for m in prompt
    ):
        return "a conversational prompt must be a non-empty tuple of Message(role, content) with string fields."
    roles = [message[0] for message in prompt]
    if not set(roles) <= set(ROLES) or "system" in roles[1:]:
        return f"roles {roles}: each must be one of {', '.join(ROLES)}, and a system message may only come first."
    if roles[-1] != "user":
        return f"a conversational prompt must end with the user's message, not the {roles[-1]}'s."
    return None
