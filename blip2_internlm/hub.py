"""Which model hub a hub name in a config comes from: Hugging Face (or a mirror of it) or ModelScope.

``$BLIP2_INTERNLM_HUB`` picks the hub for every hub name (``huggingface``, the default, or
``modelscope``).  Configs keep naming models by their Hugging Face ids; with ``modelscope``
chosen, :data:`MODELSCOPE_IDS` turns an id into ModelScope's, and an id the table does not hold
is passed to ModelScope unchanged (so a config may name a ModelScope id directly).  A value
``modelscope:<owner>/<name>`` names a ModelScope id whatever the variable says.

Hugging Face is reached at ``$HF_ENDPOINT`` (a mirror such as https://hf-mirror.com), read when a
name is resolved and passed to ``huggingface_hub`` explicitly, so setting it after
``huggingface_hub`` was imported still counts.

Whether the network may be used is the caller's decision (``assets.downloads_allowed``): this
module only says where a name points and fetches it from there, cache-only when told.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

HUB_ENV = "BLIP2_INTERNLM_HUB"
HF_ENDPOINT_ENV = "HF_ENDPOINT"
HUGGINGFACE, MODELSCOPE = "huggingface", "modelscope"
HUBS = (HUGGINGFACE, MODELSCOPE)
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
MODELSCOPE_PREFIX = "modelscope:"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

#: Hugging Face id -> ModelScope id, for the models the model types and configs name.
#: InternLM2: the InternLM README's model zoo (ModelScope org ``Shanghai_AI_Laboratory``);
#: BERT: ModelScope's own mirrors (org ``AI-ModelScope``).
MODELSCOPE_IDS: dict[str, str] = {
    "internlm/internlm2-1_8b": "Shanghai_AI_Laboratory/internlm2-1_8b",
    "internlm/internlm2-chat-1_8b": "Shanghai_AI_Laboratory/internlm2-chat-1_8b",
    "internlm/internlm2-chat-1_8b-sft": "Shanghai_AI_Laboratory/internlm2-chat-1_8b-sft",
    "internlm/internlm2-base-7b": "Shanghai_AI_Laboratory/internlm2-base-7b",
    "internlm/internlm2-7b": "Shanghai_AI_Laboratory/internlm2-7b",
    "internlm/internlm2-chat-7b": "Shanghai_AI_Laboratory/internlm2-chat-7b",
    "internlm/internlm2-chat-7b-sft": "Shanghai_AI_Laboratory/internlm2-chat-7b-sft",
    "internlm/internlm2-base-20b": "Shanghai_AI_Laboratory/internlm2-base-20b",
    "internlm/internlm2-20b": "Shanghai_AI_Laboratory/internlm2-20b",
    "internlm/internlm2-chat-20b": "Shanghai_AI_Laboratory/internlm2-chat-20b",
    "internlm/internlm2-chat-20b-sft": "Shanghai_AI_Laboratory/internlm2-chat-20b-sft",
    "bert-base-uncased": "AI-ModelScope/bert-base-uncased",
    "google-bert/bert-base-uncased": "AI-ModelScope/bert-base-uncased",
    "bert-base-chinese": "AI-ModelScope/bert-base-chinese",
    "google-bert/bert-base-chinese": "AI-ModelScope/bert-base-chinese",
}


class UnknownHubError(ValueError):
    """``$BLIP2_INTERNLM_HUB`` names no hub this package knows."""


class HubPackageMissingError(ImportError):
    """The chosen hub's client library is not installed."""


@dataclass(frozen=True)
class HubSource:
    """Where a hub name is fetched from: ``hub``, the id there, and (Hugging Face) the endpoint."""

    hub: str
    repo_id: str
    endpoint: str | None = None

    def describe(self) -> str:
        return f"Hugging Face at {self.endpoint}" if self.hub == HUGGINGFACE else "ModelScope"


def selected_hub() -> str:
    """The hub ``$BLIP2_INTERNLM_HUB`` names (``huggingface`` when unset or empty)."""
    raw = os.environ.get(HUB_ENV, "")
    hub = raw.strip().lower() or HUGGINGFACE
    if hub not in HUBS:
        raise UnknownHubError(f"{HUB_ENV}={raw!r} is not a known hub; set it to one of {', '.join(HUBS)}")
    return hub


def huggingface_endpoint() -> str:
    """``$HF_ENDPOINT`` (a Hugging Face mirror), else huggingface.co; read at every call."""
    return (os.environ.get(HF_ENDPOINT_ENV, "").strip() or DEFAULT_HF_ENDPOINT).rstrip("/")


def modelscope_id(name: str) -> str:
    """ModelScope's id for the Hugging Face id ``name``; an id the table lacks is returned unchanged."""
    return MODELSCOPE_IDS.get(name, name)


def source_of(value: str) -> HubSource | None:
    """Where the hub name ``value`` is fetched from; None if ``value`` is not shaped like a hub id."""
    if value.startswith(MODELSCOPE_PREFIX):
        repo_id = value[len(MODELSCOPE_PREFIX) :]
        return HubSource(MODELSCOPE, repo_id) if _HUB_ID.fullmatch(repo_id) else None
    if not _HUB_ID.fullmatch(value):
        return None
    if selected_hub() == MODELSCOPE:
        return HubSource(MODELSCOPE, modelscope_id(value))
    return HubSource(HUGGINGFACE, value, huggingface_endpoint())


def snapshot(source: HubSource, *, local_files_only: bool) -> Path:
    """The local directory of ``source``'s snapshot: from the hub's cache only when
    ``local_files_only``, else downloaded as needed.  The hub's own errors pass through."""
    if source.hub == MODELSCOPE:
        try:
            from modelscope import snapshot_download
        except ImportError as err:
            raise HubPackageMissingError(
                f"{HUB_ENV}={MODELSCOPE} (or a '{MODELSCOPE_PREFIX}' name) needs the modelscope package: "
                "pip install 'blip2-internlm[modelscope]' (or pip install modelscope)"
            ) from err
        return Path(snapshot_download(source.repo_id, local_files_only=local_files_only))
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source.repo_id, local_files_only=local_files_only, endpoint=source.endpoint))
