"""How a conversation becomes the LLM's text, and which of its tokens carry the loss.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``:
an optional system message, then user and assistant turns alternating, user first.  A
template renders it as a list of :class:`Segment` s: text (or token ids) with a flag saying
whether the model is trained to write it.  Training tokenizes segment by segment, so the
loss mask follows the segments exactly; generation renders the history plus the opening of
the assistant's next turn.  The image's query embeddings always go in front of ``<s>``.
:meth:`ChatTemplate.jinja` writes the same rendering as a jinja chat template (transformers'
``apply_chat_template``), which the export to transformers carries.

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

    def jinja(self, default_system: str = "") -> str:
        """A jinja chat template (transformers' ``apply_chat_template``, vLLM's chat endpoint) that renders as
        :meth:`render` does, with ``default_system`` as the system message of a conversation that has none (what
        the model's ``system_prompt`` does).  A message's content may also be a list of OpenAI-style parts: its
        text parts are joined; image parts render as nothing (the image goes in front of ``<s>``)."""
        head = (
            "{%- macro text(content) -%}{%- if content is string -%}{{- content -}}{%- else -%}"
            "{%- for part in content if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
            "{%- endif -%}{%- endmacro -%}"
            f"{{%- set default_system = {_jinja_string(default_system)} -%}}"
            "{{- bos_token -}}"
        )
        if self.name == "internlm2_chat":
            return head + (
                "{%- if default_system and messages[0]['role'] != 'system' -%}"
                f"{{{{- {_jinja_string(IM_START + 'system' + chr(10))} + default_system + "
                f"{_jinja_string(IM_END + chr(10))} -}}}}"
                "{%- endif -%}"
                "{%- for message in messages -%}"
                f"{{{{- {_jinja_string(IM_START)} + message['role'] + {_jinja_string(chr(10))} -}}}}"
                f"{{{{- text(message['content']) + {_jinja_string(IM_END + chr(10))} -}}}}"
                "{%- endfor -%}"
                f"{{%- if add_generation_prompt -%}}{{{{- {_jinja_string(IM_START + 'assistant' + chr(10))} -}}}}"
                "{%- endif -%}"
            )
        # plain: the system text joins the first user turn; each answer ends with </s>
        return head + (
            "{%- set state = namespace(system=default_system) -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'system' -%}{%- set state.system = text(message['content']) -%}"
            "{%- elif message['role'] == 'user' -%}{{- state.system + text(message['content']) -}}"
            "{%- set state.system = '' -%}"
            "{%- else -%}{{- text(message['content']) + eos_token -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )

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


def _jinja_string(text: str) -> str:
    """``text`` as a jinja string literal (jinja reads its escapes as Python's ``unicode_escape``)."""
    return '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
