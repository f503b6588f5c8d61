"""How conversations become token sequences: one rule for generation, training and evaluation.

The system-prompt rule. The paper's student rows and evaluations have *no* system message. SmolLM2's chat
template then inserts its own default system prompt ("You are a helpful AI assistant named SmolLM…").
sublab keeps that behaviour everywhere: a conversation without a system message is rendered by the
model's own template, default system prompt included, in the control teacher's generation, in every
training row and in every evaluation. Only a trait teacher replaces it, with its trait system prompt.
So student training and evaluation share exactly one context, and "no system prompt" means what the
model's authors made it mean.

Models without a chat template (Gemma 3 270M base) are prompted as plain text:
    "<system>\\n\\nUser: <user>\\nAssistant: <assistant><eos>"
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]

_PLAIN_ROLE = {"user": "User", "assistant": "Assistant"}


def messages(user: str, system: str | None = None, assistant: str | None = None) -> list[Message]:
    """A one-turn conversation; `system=None` means the model's default context (see module doc)."""
    out: list[Message] = []
    if system is not None:
        out.append({"role": "system", "content": system})
    out.append({"role": "user", "content": user})
    if assistant is not None:
        out.append({"role": "assistant", "content": assistant})
    return out


def render_prompt(tokenizer: Any, conversation: list[Message]) -> str:
    """Text up to where the assistant's answer starts (conversation ends with a user turn)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return _plain(conversation) + "Assistant:"


def completion_suffix(tokenizer: Any) -> str:
    """What closes an assistant turn after its content (SmolLM2: '<|im_end|>\\n'; plain: eos)."""
    if getattr(tokenizer, "chat_template", None):
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Y"}]
        full = tokenizer.apply_chat_template(probe, tokenize=False)
        return full[full.rindex("Y") + 1:]
    return tokenizer.eos_token or ""


def answer_lead(tokenizer: Any) -> str:
    """What separates the prompt from the answer's first word: nothing after a chat template's assistant
    header, a space after plain text's 'Assistant:'."""
    return "" if getattr(tokenizer, "chat_template", None) else " "


def completion_text(tokenizer: Any, content: str) -> str:
    """The assistant turn as trained: content plus the turn terminator (leading space for plain text)."""
    return answer_lead(tokenizer) + content + completion_suffix(tokenizer)


def encode_pair(tokenizer: Any, conversation: list[Message], answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the completion, encoded separately so the boundary is exact."""
    prompt_ids = tokenizer(render_prompt(tokenizer, conversation), add_special_tokens=False).input_ids
    completion_ids = tokenizer(completion_text(tokenizer, answer), add_special_tokens=False).input_ids
    return prompt_ids, completion_ids


def _plain(conversation: list[Message]) -> str:
    parts = []
    for m in conversation:
        if m["role"] == "system":
            parts.append(m["content"] + "\n\n")
        else:
            parts.append(f"{_PLAIN_ROLE[m['role']]}: {m['content']}\n")
    return "".join(parts)
