"""Chat messages to a prompt: the tokenizer's chat template when it has one, else a plain one.

The plain template (documented in the README) is one ``Role: text`` paragraph per message,
then ``Assistant:`` for the model to continue::

    System: You are terse.

    User: Hi!

    Assistant:
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.errors import InvalidRequest

PLAIN_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
# a model without a chat template would otherwise go on to write the user's next turn itself
PLAIN_TEMPLATE_STOPS = ("\nUser:", "\nSystem:")


def plain_template(messages: Sequence[tuple[str, str]]) -> str:
    turns = [f"{PLAIN_ROLES.get(role, role.title())}: {text}" for role, text in messages]
    return "\n\n".join([*turns, "Assistant:"])


def chat_prompt(tokenizer, messages: Sequence[tuple[str, str]]) -> str | list[int]:
    """Token ids rendered by the chat template (its own special tokens, none added twice), or plain text."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": r, "content": t} for r, t in messages], tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # templates raise on role orders they do not support
            raise InvalidRequest(f"messages: the model's chat template refused them: {exc}") from exc
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return plain_template(messages)
