"""Offline assets: where every file LAVIS would download comes from.

Each asset is a config value.  A value is one of:

* ``tiny`` (``tiny-zh``, ``tiny-opt``): a small asset generated deterministically on first
  use into the cache directory (``$BLIP2_INTERNLM_CACHE``, default ``~/.cache/blip2_internlm``),
  for tests and the demo; ``blip2_internlm.tiny`` builds them and registers them here by name;
* a local path (a directory for text models, a file for weights);
* a hub name (``bert-base-uncased``, ``internlm/internlm2-1_8b``), resolved from the local cache
  of the hub ``$BLIP2_INTERNLM_HUB`` picks (Hugging Face, or a mirror at ``$HF_ENDPOINT``, by
  default; ModelScope with ``modelscope``; ``blip2_internlm.hub``) and only from there, unless
  downloads are enabled explicitly with ``$BLIP2_INTERNLM_ALLOW_DOWNLOADS=1``.

A missing asset raises :class:`AssetMissingError` naming the config key, what was tried
and how to get the file, instead of hanging on a download.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blip2_internlm import hub

TINY = "tiny"
DOWNLOADS_ENV = "BLIP2_INTERNLM_ALLOW_DOWNLOADS"
CACHE_ENV = "BLIP2_INTERNLM_CACHE"


class AssetMissingError(FileNotFoundError):
    """An asset named in a config is not available locally."""

    def __init__(self, key: str, value, tried: str, how: str):
        self.key, self.value = key, value
        super().__init__(f"config key '{key}' = {value!r}: {tried}. {how}")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "blip2_internlm")


def downloads_allowed() -> bool:
    return os.environ.get(DOWNLOADS_ENV, "0").lower() in ("1", "true", "yes")


def generated(name: str, build) -> Path:
    """``cache_dir()/name``, built by ``build(tmp_dir)`` the first time.

    Several processes (DDP ranks) may race here; each builds into its own temporary
    directory and the first rename wins.  Builders are deterministic, so the losers'
    output is identical and is discarded.
    """
    target = cache_dir() / name
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        with contextlib.suppress(OSError):
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not (target / ".complete").exists():
        raise RuntimeError(f"could not create the generated asset {target}")
    return target


def resolve_pretrained_dir(key: str, value, required_files=("config.json",), how: str = "") -> Path:
    """A local directory for a Hugging Face-style model named by config ``key``: a path, or a hub
    name fetched through :mod:`blip2_internlm.hub` (from its cache only, unless downloads are on)."""
    value = str(value)
    path = Path(value).expanduser()
    if path.is_dir():
        return _with_files(key, value, path, required_files, how, f"the directory {path}")
    source = hub.source_of(value)
    if source is None:
        raise AssetMissingError(key, value, f"no directory at {path}", how)
    download = downloads_allowed()
    try:
        snapshot = hub.snapshot(source, local_files_only=not download)
    except hub.HubPackageMissingError:
        raise
    except Exception as err:  # the hubs raise several error types for "not cached" and "not found"
        raise AssetMissingError(key, value, *_hub_failure(source, download, err, how)) from None
    return _with_files(key, value, snapshot, required_files, how, f"the {source.describe()} snapshot {snapshot}")


def _with_files(key: str, value, directory: Path, required_files, how: str, what: str) -> Path:
    absent = [f for f in required_files if not (directory / f).exists()]
    if absent:
        raise AssetMissingError(key, value, f"{what} lacks {absent}", how)
    return directory


def _hub_failure(source: hub.HubSource, download: bool, err: Exception, how: str) -> tuple[str, str]:
    """What was tried and how to fix it, for an AssetMissingError about a hub name."""
    where = "Hugging Face" if source.hub == hub.HUGGINGFACE else "ModelScope"
    detail = str(err).strip().splitlines()
    reason = f"{type(err).__name__}: {detail[0][:200]}" if detail else type(err).__name__
    if download:
        tried = f"not a local directory, and fetching id {source.repo_id!r} from {source.describe()} failed ({reason})"
        fix = " Or check the network and the id"
    else:
        tried = (
            f"not a local directory and not in the {where} cache "
            f"(hub: {source.describe()}, id {source.repo_id!r}, cache only: {type(err).__name__})"
        )
        fix = f" Or set {DOWNLOADS_ENV}=1 on a machine with network to fetch it from {source.describe()}"
    if source.hub == hub.HUGGINGFACE:
        fix += (
            f"; {hub.HUB_ENV}={hub.MODELSCOPE} fetches from ModelScope instead, "
            f"{hub.HF_ENDPOINT_ENV}=https://hf-mirror.com from a Hugging Face mirror."
        )
    else:
        fix += f"; {hub.HUB_ENV}={hub.HUGGINGFACE} fetches from Hugging Face instead."
        if "/" not in source.repo_id:
            fix += (
                f" ModelScope ids are 'owner/name' and {source.repo_id!r} has no ModelScope id in "
                f"blip2_internlm.hub.MODELSCOPE_IDS: name one as '{hub.MODELSCOPE_PREFIX}<owner>/<name>'."
            )
    return tried, how + fix


def resolve_file(key: str, value, how: str) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise AssetMissingError(key, value, f"no file at {path}", how)
    return path


# --- generated test assets ---------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedAsset:
    """A test asset that a config names (``tiny``, ``tiny-zh``, ...) and that is built on first use.

    ``build(out, **params)`` writes it into ``cache_dir() / dirname(**params)`` (the name is the
    cache key: whatever changes the files must change it); ``config()``, when given, is the
    architecture its ``config.json`` holds, known without building it; ``file`` is the file
    inside the directory that the config value stands for ("" for the directory itself).
    """

    dirname: Callable[..., str]
    build: Callable[..., None]
    config: Callable[[], dict] | None = None
    file: str = ""


#: The kinds of asset a config names, one per ``resolve_*`` below.
TEXT_MODEL, VIT_WEIGHTS, LLM = "text_model", "vit_weights", "llm"
_GENERATED: dict[tuple[str, str], GeneratedAsset] = {}


def register_generated(kind: str, value: str, asset: GeneratedAsset) -> None:
    """Make config value ``value`` name the generated ``asset`` of ``kind``.

    The builders sit above the models they build (``blip2_internlm.tiny``, which registers the
    tiny assets when the package is imported); this module reaches them by name only.
    """
    if kind not in (TEXT_MODEL, VIT_WEIGHTS, LLM):
        raise ValueError(f"unknown asset kind {kind!r}; expected one of {TEXT_MODEL!r}, {VIT_WEIGHTS!r}, {LLM!r}")
    _GENERATED[(kind, value)] = asset


def generated_names(kind: str) -> list[str]:
    """The config values that name generated assets of ``kind``."""
    return sorted(value for k, value in _GENERATED if k == kind)


def generated_config(kind: str, value) -> dict | None:
    """The architecture of the generated asset ``value`` names (``config.json``'s keys,
    ``model_type`` included), without building it; None if ``value`` names no generated asset
    or its builder does not say."""
    asset = _GENERATED.get((kind, str(value)))
    return asset.config() if asset is not None and asset.config is not None else None


def _generated_path(kind: str, value, **params) -> Path | None:
    asset = _GENERATED.get((kind, str(value)))
    if asset is None:
        return None
    directory = generated(asset.dirname(**params), lambda out: asset.build(out, **params))
    return directory / asset.file if asset.file else directory


# --- the Q-Former's BERT text model --------------------------------------------------------

_TEXT_MODEL_HOW = (
    "Point it at a local BERT directory (config.json, vocab.txt, weights), e.g. a copy of "
    "bert-base-uncased or bert-base-chinese fetched with `huggingface-cli download NAME "
    "--local-dir DIR` (or `modelscope download --model AI-ModelScope/NAME --local_dir DIR`), "
    "or use 'tiny' ('tiny-zh': bert-base-chinese-style) for the generated test model."
)


def resolve_text_model(value, key: str = "model.qformer_text_model") -> Path:
    path = _generated_path(TEXT_MODEL, value)
    if path is not None:
        return path
    return resolve_pretrained_dir(key, value, ("config.json", "vocab.txt"), _TEXT_MODEL_HOW)


# --- vision encoder weights ----------------------------------------------------------------

_VIT_HOW = (
    "Download LAVIS's eva_vit_g.pth (URL in the README, section 'Weights') and set "
    "model.vit_weights to its local path, or use 'tiny' with vit_model: tiny."
)


def resolve_vit_weights(vit_model: str, value, image_size: int, key: str = "model.vit_weights") -> Path:
    # generated weights are named after the generated ViT they fit
    if (VIT_WEIGHTS, str(value)) in _GENERATED and vit_model != str(value):
        raise AssetMissingError(
            key, value, f"generated weights exist only for vit_model {str(value)!r}, not {vit_model!r}", _VIT_HOW
        )
    path = _generated_path(VIT_WEIGHTS, value, image_size=image_size)
    if path is not None:
        return path
    if value is None:
        raise AssetMissingError(key, value, f"no weights given for vit_model {vit_model!r}", _VIT_HOW)
    return resolve_file(key, value, _VIT_HOW)


# --- the frozen LLM ----------------------------------------------------------------------

_LLM_HOW = (
    "Point it at a local InternLM2 checkpoint directory (config.json, tokenizer.model, "
    "*.safetensors), e.g. internlm/internlm2-1_8b fetched with `huggingface-cli download "
    "internlm/internlm2-1_8b --local-dir DIR` (or `modelscope download --model "
    "Shanghai_AI_Laboratory/internlm2-1_8b --local_dir DIR`), or use 'tiny' ('tiny-opt') for the "
    "generated test InternLM2 (OPT)."
)


def resolve_llm(value, key: str = "model.llm_model") -> Path:
    path = _generated_path(LLM, value)
    if path is not None:
        return path
    return resolve_pretrained_dir(key, value, ("config.json",), _LLM_HOW)
