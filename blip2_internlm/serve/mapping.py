"""From an OpenAI chat request to what the model computes (docs/serve.md, "Requests").

Exactly one image per conversation, in the first user message.  Then:

* ``blip2_internlm`` (a base model) answers one user message (system messages are not read: the model
  has no input for them).  ``mode`` (``extra_body``) chooses the model call, by default ``caption`` for an
  image without text and ``answer`` for an image with text:

  - ``caption``: ``generate`` with the server's caption prompt (the user message has no text);
  - ``answer``: ``predict_answers`` (LAVIS's VQA contract, beam search) on the text as the question, in the
    server's question prompt, as the web demo asks it;
  - ``prompt``: ``generate`` with the text as the whole prompt after the image's queries.

* ``blip2_internlm_instruct`` chats (``mode`` ``chat``): the conversation (system, user and assistant
  turns, ending with a user turn) goes to its ``generate`` as ``model.chat`` sends it, the last
  ``tools.app.MAX_CHAT_TURNS`` user turns of it, as in the web demo.

The settings every request of one model call must share are a :class:`Settings` (the batch key).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from blip2_internlm.serve.protocol import ApiError, ChatCompletionRequest
from blip2_internlm.tools.app import MAX_CHAT_TURNS, PageLimits, Refused, check_length

#: Default new tokens and beams of each mode: the web demo's caption and answer defaults, chat's own.
DEFAULT_MAX_TOKENS = {"caption": 30, "answer": 10, "prompt": 30, "chat": 128}
DEFAULT_BEAMS = {"caption": 5, "answer": 5, "prompt": 5, "chat": 1}


@dataclass(frozen=True)
class Settings:
    """What decides a generation besides its inputs: requests with equal settings may share one model call."""

    mode: str
    num_beams: int
    max_new_tokens: int
    sampling: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Work:
    """One request as the model runner takes it."""

    settings: Settings
    image: object  # the RGB PIL image, then (``ModelRunner.prepare``) its processed pixels
    text: str = ""  # caption: unused; answer: the question as typed; prompt: the prompt
    messages: list | None = None  # chat: the conversation without the image
    seed: int | None = None  # sampling with a seed: run alone, after torch.manual_seed(seed)
    #: a streaming request's receiver of text as it is decoded (called from the model's thread)
    listener: Callable[[str], None] | None = None

    @property
    def alone(self) -> bool:
        return self.settings.sampling and self.seed is not None


@dataclass(frozen=True)
class ImageRef:
    url: str
    where: str  # the request field, e.g. messages.0.content.1


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]  # role and text of every message
    image: ImageRef


def read_conversation(request: ChatCompletionRequest) -> Conversation:
    """The messages as text, and the one image (400 when there is none, more than one, or it is not in the
    first user message)."""
    messages, images = [], []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            texts = [message.content]
        else:
            texts = []
            for j, part in enumerate(message.content):
                if part.type == "text":
                    texts.append(part.text)
                else:
                    images.append((i, ImageRef(part.image_url.url, f"the image at messages.{i}.content.{j}")))
        messages.append({"role": role, "content": "\n".join(text for text in texts if text.strip())})
    if len(images) != 1:
        found = f"{len(images)} images" if images else "no image"
        raise ApiError(400, f"a conversation has exactly one image (an image_url part); this one has {found}")
    first_user = next((i for i, message in enumerate(messages) if message["role"] == "user"), None)
    ((index, image),) = images
    if index != first_user or request.messages[index].role != "user":
        raise ApiError(400, f"the image must be in the first user message, not in messages.{index}", param="messages")
    return Conversation(messages, image)


def plan(
    request: ChatCompletionRequest,
    conversation: Conversation,
    *,
    chat_model: bool,
    limits: PageLimits,
    max_new_tokens: int,
) -> Work:
    """The :class:`Work` for ``request`` (its image not loaded yet); 400 for what the model cannot do."""
    mode = request.mode or ("chat" if chat_model else None)
    if chat_model and mode != "chat":
        raise ApiError(400, f"mode {mode!r}: this model chats; use mode 'chat' or leave it out", param="mode")
    if not chat_model and mode == "chat":
        raise ApiError(400, "mode 'chat' needs an instruction model (--arch blip2_internlm_instruct)", param="mode")
    if chat_model:
        settings = generation_settings(request, mode, max_new_tokens)
        messages = chat_messages(conversation.messages, limits)
        return Work(settings, None, messages=messages, seed=request.seed)
    text = base_model_text(conversation.messages)
    mode = mode or ("answer" if text else "caption")
    settings = generation_settings(request, mode, max_new_tokens)
    if mode == "caption" and text:
        raise ApiError(400, "mode 'caption' reads no text: send the image alone, or use mode 'prompt'", param="mode")
    if mode in ("answer", "prompt") and not text:
        raise ApiError(400, f"mode {mode!r} needs text in the user message beside the image", param="messages")
    if mode == "answer" and settings.sampling:
        raise ApiError(
            400,
            "answers use beam search (predict_answers has no sampling): leave temperature out or 0, "
            "or use mode 'prompt'",
            param="temperature",
        )
    try:
        if mode == "answer":
            check_length("question", text, limits.max_question_chars)
        elif mode == "prompt":
            check_length("prompt", text, limits.max_prompt_chars)
    except Refused as refused:
        raise ApiError(400, str(refused), param="messages") from None
    return Work(settings, None, text=text, seed=request.seed)


def generation_settings(request: ChatCompletionRequest, mode: str, max_new_tokens: int) -> Settings:
    """Sampling when ``temperature`` > 0 (``top_p`` then applies, default 1), else beam search with
    ``num_beams`` beams (the mode's default when left out; 1 is greedy)."""
    tokens = request.max_completion_tokens or request.max_tokens or DEFAULT_MAX_TOKENS[mode]
    if tokens > max_new_tokens:
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{param}={tokens}: the limit is {max_new_tokens} (--max-new-tokens)", param=param)
    sampling = bool(request.temperature)
    if sampling:
        if (request.num_beams or 1) != 1:
            raise ApiError(400, "num_beams > 1 with temperature > 0: sampling draws one sequence", param="num_beams")
        return Settings(mode, 1, tokens, True, float(request.temperature), float(request.top_p or 1.0))
    return Settings(mode, request.num_beams or DEFAULT_BEAMS[mode], tokens)


def base_model_text(messages: list[dict]) -> str:
    users = [message for message in messages if message["role"] == "user"]
    if len(users) != 1 or messages[-1]["role"] != "user":
        raise ApiError(
            400,
            "this model answers one user message (system messages aside); for conversations serve an "
            "instruction model (--arch blip2_internlm_instruct)",
            param="messages",
        )
    return users[0]["content"]


def chat_messages(messages: list[dict], limits: PageLimits) -> list[dict]:
    """The conversation the instruction model reads: checked (order of roles, text in every message, each
    within its length limit), its last :data:`MAX_CHAT_TURNS` user turns (and a system message first)."""
    from blip2_internlm.models.chat_template import ConversationError, check_messages

    for i, message in enumerate(messages):
        limit = limits.max_prompt_chars if message["role"] == "system" else limits.max_question_chars
        try:
            check_length(f"message messages.{i}", message["content"], limit)
        except Refused as refused:
            raise ApiError(400, str(refused), param=f"messages.{i}") from None
    try:
        messages = check_messages(messages, ends_with="user")
    except ConversationError as err:
        raise ApiError(400, f"messages: {err}", param="messages") from None
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    users = [i for i, message in enumerate(turns) if message["role"] == "user"]
    recent = turns[users[-MAX_CHAT_TURNS] :] if len(users) > MAX_CHAT_TURNS else turns
    return system + recent
