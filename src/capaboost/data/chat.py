"""Chat rows of the causal-LM task: ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the
tokenizer's chat template, loss on the assistant turns only.

How the assistant tokens are found, and why this way. Templates differ in everything (headers, a default
system prompt, BOS, end-of-turn markers), and few real ones (Llama 3, Qwen 2.5, Mistral) carry the
``{% generation %}`` markers that ``return_assistant_tokens_mask`` needs, so that route would refuse most chat
models. Instead the conversation is rendered once as text and the template is applied to the *prefixes*
``messages[:i]`` and ``messages[:i + 1]`` of each assistant turn ``i``: the two renders end where turn ``i``
starts and ends, and the turn's content is found inside that stretch. Working on characters, not on token
prefixes, matters for BPE: the text is tokenized once, as ``apply_chat_template(tokenize=True)`` does (same
ids, so training sees exactly what generation will), and the characters of each token (the fast tokenizer's
offsets) say whether it belongs to an assistant turn. Token prefixes of separately tokenized renders may merge
differently at the boundary; character positions cannot. A template that renders earlier turns differently
once more follow (e.g. one that drops earlier reasoning) is refused with that reason, never guessed at.

Labelled: each assistant turn's content and the end-of-turn markup the template puts right after it
(``<|im_end|>``, ``<|eot_id|>``, ``</s>``), not the whitespace that follows, as TRL's ``assistant_only_loss``
does with ``{% generation %}`` templates; the model so learns to close its turn. Headers, system and user turns
are -100.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from capaboost.data.errors import DataError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
Where = tuple[Optional[str], Optional[int]]  # (file, line) of the row, for error messages


def read_messages(value: Any, path: str | Path, line: int) -> list[dict[str, str]]:
    """A row's ``messages`` checked: a non-empty list of ``{"role", "content"}`` with a known role, string content
    and at least one non-empty assistant turn; anything else names the file, line and message."""
    if not isinstance(value, list) or not value:
        got = type(value).__name__ if not isinstance(value, list) else "an empty list"
        raise DataError(f"'messages' must be a non-empty list of {{\"role\", \"content\"}} objects, got {got}",
                        path, line, "messages")
    out = []
    for n, message in enumerate(value, start=1):
        at = f"message {n}"
        if not isinstance(message, dict):
            raise DataError(f"{at} must be an object with 'role' and 'content', got {type(message).__name__}",
                            path, line, "messages")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise DataError(f"{at} has fields {extra}; only 'role' and 'content' are read", path, line, "messages")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{at} has role {role!r}; roles are {', '.join(ROLES)}", path, line, "messages")
        if not isinstance(content, str):
            raise DataError(f"{at} ({role}): 'content' must be a string, got {type(content).__name__}",
                            path, line, "messages")
        out.append({"role": role, "content": content})
    assistant = [m for m in out if m["role"] == "assistant"]
    if not assistant:
        raise DataError("no assistant turn: the loss is on assistant turns only", path, line, "messages")
    if not any(m["content"].strip() for m in assistant):
        raise DataError("every assistant turn is empty: nothing to train on", path, line, "messages")
    return out


def _error(message: str, where: Where) -> DataError:
    return DataError(message, where[0], where[1], "messages" if where[0] else None)


def check_chat_template(tokenizer: Any, where: Where = (None, None)) -> None:
    """A clear error, with the fix, for a tokenizer that cannot render ``messages`` rows."""
    if not getattr(tokenizer, "chat_template", None):
        raise _error(
            "'messages' rows need a tokenizer with a chat template, and this one has none: use a chat/instruct "
            "model's tokenizer, or set tokenizer.chat_template = '<Jinja template>' and save_pretrained it into "
            "the --model folder (or write the rows as prompt/response)", where)
    if not getattr(tokenizer, "is_fast", False):
        raise _error("'messages' rows need a fast tokenizer (its offsets locate the assistant turns); load the "
                     "model's tokenizer with AutoTokenizer (use_fast=True)", where)


def _render(tokenizer: Any, messages: list[dict[str, str]], where: Where) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # jinja's errors (raise_exception in templates) have no common base
        raise _error(f"the tokenizer's chat template fails on this conversation: {err}", where) from err


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], where: Where = (None, None)
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, [(start, end) character span of each assistant turn's content + end marker])."""
    check_chat_template(tokenizer, where)
    text = _render(tokenizer, messages, where)

    def end_of(k: int) -> int:
        if k == 0:
            return 0
        prefix = _render(tokenizer, messages[:k], where)
        if not text.startswith(prefix):
            raise _error(
                f"the chat template renders the first {k} messages differently when more follow (it rewrites "
                "earlier turns), so the assistant turns cannot be located: train on one assistant turn per row", where)
        return len(prefix)

    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not message["content"].strip():
            continue
        start, end = end_of(i), end_of(i + 1)
        content = message["content"]
        at = text.find(content, start, end)
        if at < 0:  # templates often trim the content
            content = content.strip()
            at = text.find(content, start, end)
        if at < 0:
            raise _error(f"the chat template changes the content of message {i + 1} (assistant), so its tokens "
                         "cannot be located", where)
        spans.append((at, max(at + len(content), len(text[:end].rstrip()))))
    return text, spans


def tokenize_chat(messages: list[dict[str, str]], tokenizer: Any, max_length: int,
                  where: Where = (None, None)) -> dict[str, list[int]]:
    """``input_ids`` = ``apply_chat_template(messages, tokenize=True)``'s ids, ``labels`` = -100 outside the
    assistant turns (see the module docstring); over ``max_length`` the head is kept, both lists cut alike.

    A conversation whose assistant turns all fall beyond ``max_length`` is an error, not a silent zero-loss row.
    """
    text, spans = assistant_spans(tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        token if any(s < stop and max(e, s + 1) > start for start, stop in spans) else IGNORE_INDEX
        for token, (s, e) in zip(ids, enc["offset_mapping"])
    ]
    # label 0 never counts (no token before it predicts it), so a row needs a labelled token in 1..max_length-1
    first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX and i > 0), None)
    if first is None:
        raise _error("no token of any assistant turn survives tokenization", where)
    if first >= max_length:
        raise _error(f"the first assistant token is token {first + 1} of {len(ids)}, beyond --max-seq-len "
                     f"{max_length}: raise --max-seq-len or shorten the turns before it", where)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}
