"""How a conversation becomes the LLM's text, and which of its tokens carry the loss.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``:
an optional system message, then user and assistant turns alternating, user first.  A
template renders it as a list of :class:`Segment` s: text (or token ids) with a flag saying
whether the model is trained to write it.  Training tokenizes segment by segment, so the
loss mask follows the segments exactly; generation renders the history plus the opening of
the assistant's next turn.  The image's query embeddings always go in front of ``<s>``.

Two templates:

* ``internlm2_chat``: InternLM2-chat's turns, as its ``tokenizer_config.json`` renders them::

      <s><|im_start|>system\\n{system}<|im_end|>\\n
      <|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{assistant}<|im_end|>\\n ...

  Trained: each assistant's content and its ``<|im_end|>``; generation stops on ``<|im_end|>``.
  The tokenizer must know ``<|im_start|>`` and ``<|im_end|>`` as single tokens (the chat
  models' tokenizers do).
* ``plain``, for base models: ``<s>{user}{assistant}</s>{user}{assistant}</s>...``, the
  BLIP-2 layout (prompt, then text, then ``</s>``) repeated per turn; a system message is
  put in front of the first user turn.  Trained: each answer and its ``</s>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
CHAT_TEMPLATES = ("plain", "internlm2_chat")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class ConversationError(ValueError):
    """A conversation that no template can render (order of roles, empty text, unknown role)."""


@dataclass(frozen=True)
class Segment:
    """A piece of the LLM's input: ``text`` tokenized without special tokens, then ``ids``; ``train``: the
    model learns to write it (its tokens are labels), else it is context."""

    text: str = ""
    ids: tuple[int, ...] = ()
    train: bool = False


def check_messages(messages: Sequence[dict], *, ends_with: str) -> list[dict]:
    """``messages`` as plain dicts, checked: roles in order (optional system, then user/assistant
    alternating from user), non-empty string contents, the last one's role ``ends_with``."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ConversationError(f"a conversation is a non-empty list of messages, got {messages!r:.80}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise ConversationError(f"message {i}: expected {{'role': ..., 'content': ...}}, got {message!r:.80}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ConversationError(f"message {i}: role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise ConversationError(f"message {i} ({role}): content must be a non-empty string, got {content!r:.80}")
        expected = ("system", "user") if i == 0 else ("user",) if checked[-1]["role"] != "user" else ("assistant",)
        if role not in expected:
            raise ConversationError(f"message {i}: a {role} message where a {' or '.join(expected)} message belongs")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != ends_with:
        raise ConversationError(f"the conversation must end with a {ends_with} message, not {checked[-1]['role']}")
    return checked


@dataclass(frozen=True)
class ChatTemplate:
    """One of :data:`CHAT_TEMPLATES` over a tokenizer's special tokens."""

    name: str
    bos_token_id: int
    eos_token_id: int
    end_of_turn_id: int | None = None  # <|im_end|> for internlm2_chat

    @classmethod
    def for_tokenizer(cls, name: str, tokenizer) -> ChatTemplate:
        if name not in CHAT_TEMPLATES:
            raise ValueError(f"model.chat_template = {name!r}; expected one of {list(CHAT_TEMPLATES)}")
        end_of_turn = None
        if name == "internlm2_chat":
            for token in (IM_START, IM_END):
                ids = tokenizer(token, add_special_tokens=False).input_ids
                if len(ids) != 1:
                    raise ValueError(
                        f"model.chat_template: internlm2_chat needs a tokenizer that has {token} as one token "
                        f"(InternLM2-chat's does); this one splits it into {len(ids)}: use chat_template: plain "
                        "for a base model"
                    )
            end_of_turn = ids[0]  # the last token checked: <|im_end|>
        return cls(name, tokenizer.bos_token_id, tokenizer.eos_token_id, end_of_turn)

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops on these: the end of the assistant's turn, and ``</s>``."""
        ids = [self.end_of_turn_id] if self.end_of_turn_id is not None else []
        return ids + [self.eos_token_id] if self.eos_token_id not in ids else ids

    def training_segments(self, messages: Sequence[dict]) -> list[Segment]:
        """The whole conversation (ending with an assistant turn): every assistant turn is trained."""
        return [Segment(ids=(self.bos_token_id,))] + self._turns(check_messages(messages, ends_with="assistant"))

    def generation_segments(self, messages: Sequence[dict]) -> list[Segment]:
        """The history (ending with a user turn) and the opening of the assistant's answer."""
        segments = [Segment(ids=(self.bos_token_id,))] + self._turns(check_messages(messages, ends_with="user"))
        if self.name == "internlm2_chat":
            segments.append(Segment(f"{IM_START}assistant\n"))
        return segments

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False, tokenizer=None) -> str:
        """The text of :meth:`training_segments` (or :meth:`generation_segments`); ids are written as tokens
        through ``tokenizer`` (``<s>``, ``</s>``), so the string equals what ``apply_chat_template`` renders."""
        segments = self.generation_segments(messages) if add_generation_prompt else self.training_segments(messages)
        decode = (lambda ids: "".join(tokenizer.convert_ids_to_tokens(list(ids)))) if tokenizer else (lambda ids: "")
        return "".join(segment.text + decode(segment.ids) for segment in segments)

    def _turns(self, messages: list[dict]) -> list[Segment]:
        if self.name == "internlm2_chat":
            segments = []
            for message in messages:
                head = f"{IM_START}{message['role']}\n"
                if message["role"] == "assistant":
                    segments += [Segment(head), Segment(message["content"] + IM_END, train=True), Segment("\n")]
                else:
                    segments.append(Segment(f"{head}{message['content']}{IM_END}\n"))
            return segments
        # plain: the system text joins the first user turn
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        segments = []
        for message in messages[1:] if system else messages:
            if message["role"] == "user":
                segments.append(Segment(system + message["content"]))
                system = ""
            else:
                segments.append(Segment(message["content"], ids=(self.eos_token_id,), train=True))
        return segments


def user_turns(messages: Sequence[dict]) -> str:
    """The user messages joined by newlines: the instruction the Q-Former reads for a conversation."""
    return "\n".join(m["content"] for m in messages if m["role"] == "user")
