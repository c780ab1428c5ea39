"""A hub name is fetched from the hub $BLIP2_INTERNLM_HUB picks (Hugging Face at $HF_ENDPOINT by
default, or ModelScope under its own id), from the cache only unless downloads are allowed."""

import re
from pathlib import Path

import huggingface_hub
import modelscope
import pytest
import yaml
from spec_helpers import REPO

from blip2_internlm import assets, hub
from blip2_internlm.assets import AssetMissingError

INTERNLM2_1_8B = "internlm/internlm2-1_8b"


class FakeHubs:
    """Both hubs' ``snapshot_download``, replaced: each call is recorded, and answered with a
    directory holding ``files``, or with ``error`` raised."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: dict[str, list[tuple[tuple, dict]]] = {hub.HUGGINGFACE: [], hub.MODELSCOPE: []}
        self.files = ["config.json"]
        self.error: Exception | None = None

    def snapshot_download(self, name: str):
        def fake(*args, **kwargs):
            self.calls[name].append((args, kwargs))
            if self.error is not None:
                raise self.error
            directory = self.root / name / str(len(self.calls[name]))
            directory.mkdir(parents=True)
            for file in self.files:
                (directory / file).write_text("{}")
            return str(directory)

        return fake


@pytest.fixture
def hubs(tmp_path, monkeypatch):
    """The default environment (no hub chosen, no mirror, downloads off) and recording fake hubs."""
    for variable in (hub.HUB_ENV, hub.HF_ENDPOINT_ENV, assets.DOWNLOADS_ENV):
        monkeypatch.delenv(variable, raising=False)
    fakes = FakeHubs(tmp_path / "snapshots")
    # where hub.snapshot looks them up: `from huggingface_hub / modelscope import snapshot_download`
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fakes.snapshot_download(hub.HUGGINGFACE))
    monkeypatch.setattr(modelscope, "snapshot_download", fakes.snapshot_download(hub.MODELSCOPE))
    return fakes


@pytest.mark.parametrize("allow_downloads,local_only", [(None, True), ("0", True), ("1", False)])
def test_modelscope_fetches_the_mapped_id_and_hugging_face_is_not_asked(hubs, monkeypatch, allow_downloads, local_only):
    monkeypatch.setenv(hub.HUB_ENV, "modelscope")
    if allow_downloads is not None:
        monkeypatch.setenv(assets.DOWNLOADS_ENV, allow_downloads)
    path = assets.resolve_llm(INTERNLM2_1_8B)
    assert hubs.calls[hub.MODELSCOPE] == [
        (("Shanghai_AI_Laboratory/internlm2-1_8b",), {"local_files_only": local_only})
    ]
    assert hubs.calls[hub.HUGGINGFACE] == []
    assert (path / "config.json").is_file() and path.is_relative_to(hubs.root / hub.MODELSCOPE)


def test_the_bert_of_the_q_former_comes_from_modelscope_s_mirror(hubs, monkeypatch):
    monkeypatch.setenv(hub.HUB_ENV, "ModelScope ")  # case and stray blanks do not matter
    hubs.files = ["config.json", "vocab.txt"]
    assets.resolve_text_model("bert-base-uncased")
    ((args, _),) = hubs.calls[hub.MODELSCOPE]
    assert args == ("AI-ModelScope/bert-base-uncased",)


def test_hugging_face_is_the_default_and_is_reached_at_hf_endpoint(hubs, monkeypatch):
    assets.resolve_llm(INTERNLM2_1_8B)
    # set after huggingface_hub was imported (it reads the variable once, at import): still used
    monkeypatch.setenv(hub.HF_ENDPOINT_ENV, "https://hf-mirror.com/")
    assets.resolve_llm(INTERNLM2_1_8B)
    assert hubs.calls[hub.HUGGINGFACE] == [
        ((INTERNLM2_1_8B,), {"local_files_only": True, "endpoint": "https://huggingface.co"}),
        ((INTERNLM2_1_8B,), {"local_files_only": True, "endpoint": "https://hf-mirror.com"}),
    ]
    assert hubs.calls[hub.MODELSCOPE] == []


def test_downloads_from_hugging_face_need_the_switch(hubs, monkeypatch):
    monkeypatch.setenv(assets.DOWNLOADS_ENV, "1")
    assets.resolve_llm(INTERNLM2_1_8B)
    ((_, kwargs),) = hubs.calls[hub.HUGGINGFACE]
    assert kwargs["local_files_only"] is False


def test_an_unknown_hub_names_the_variable_and_the_known_hubs(hubs, monkeypatch):
    monkeypatch.setenv(hub.HUB_ENV, "hf-mirror")
    with pytest.raises(hub.UnknownHubError) as err:
        assets.resolve_llm(INTERNLM2_1_8B)
    assert str(err.value) == (
        "BLIP2_INTERNLM_HUB='hf-mirror' is not a known hub; set it to one of huggingface, modelscope"
    )
    assert hubs.calls == {hub.HUGGINGFACE: [], hub.MODELSCOPE: []}


def test_a_local_directory_is_used_whatever_the_hub_says(hubs, monkeypatch, tmp_path):
    monkeypatch.setenv(hub.HUB_ENV, "no-such-hub")
    (tmp_path / "config.json").write_text("{}")
    assert assets.resolve_llm(str(tmp_path)) == tmp_path
    assert hubs.calls == {hub.HUGGINGFACE: [], hub.MODELSCOPE: []}


def test_an_id_the_table_lacks_goes_to_modelscope_unchanged(hubs, monkeypatch):
    monkeypatch.setenv(hub.HUB_ENV, "modelscope")
    assets.resolve_llm("my-org/internlm2-1_8b-finetuned")
    ((args, _),) = hubs.calls[hub.MODELSCOPE]
    assert args == ("my-org/internlm2-1_8b-finetuned",)


def test_a_modelscope_prefix_names_a_modelscope_id_whatever_the_hub(hubs):
    assets.resolve_llm("modelscope:Shanghai_AI_Laboratory/internlm2-chat-1_8b")
    assert hubs.calls[hub.MODELSCOPE] == [(("Shanghai_AI_Laboratory/internlm2-chat-1_8b",), {"local_files_only": True})]
    assert hubs.calls[hub.HUGGINGFACE] == []


def test_a_value_shaped_like_no_id_is_not_sent_to_any_hub(hubs):
    for value in ("modelscope:", "modelscope:a/b/c", "./no/such/dir", "internlm/internlm2 1_8b"):
        with pytest.raises(AssetMissingError, match="no directory at"):
            assets.resolve_llm(value)
    assert hubs.calls == {hub.HUGGINGFACE: [], hub.MODELSCOPE: []}


# --- what a failure says ---------------------------------------------------------------------


def test_an_uncached_modelscope_name_says_which_hub_and_id_and_how_to_fix(hubs, monkeypatch):
    monkeypatch.setenv(hub.HUB_ENV, "modelscope")
    hubs.error = FileNotFoundError("Cannot find cached snapshot")
    with pytest.raises(AssetMissingError) as err:
        assets.resolve_llm(INTERNLM2_1_8B)
    message = str(err.value)
    assert "config key 'model.llm_model' = 'internlm/internlm2-1_8b'" in message
    assert "not in the ModelScope cache" in message and "'Shanghai_AI_Laboratory/internlm2-1_8b'" in message
    assert "BLIP2_INTERNLM_ALLOW_DOWNLOADS=1" in message and "BLIP2_INTERNLM_HUB=huggingface" in message
    assert "local InternLM2 checkpoint directory" in message  # the local-path remedy


def test_a_failed_download_names_the_hugging_face_endpoint(hubs, monkeypatch):
    monkeypatch.setenv(assets.DOWNLOADS_ENV, "1")
    monkeypatch.setenv(hub.HF_ENDPOINT_ENV, "https://hf-mirror.com")
    hubs.error = ConnectionError("connection refused\nretries exhausted")
    with pytest.raises(AssetMissingError) as err:
        assets.resolve_text_model("bert-base-uncased")
    message = str(err.value)
    assert "fetching id 'bert-base-uncased' from Hugging Face at https://hf-mirror.com failed" in message
    assert "ConnectionError: connection refused)" in message
    assert "BLIP2_INTERNLM_HUB=modelscope" in message and "model.qformer_text_model" in message


def test_a_bare_name_modelscope_cannot_have_says_how_to_name_one(hubs, monkeypatch):
    monkeypatch.setenv(hub.HUB_ENV, "modelscope")
    hubs.error = ValueError("invalid model id")
    with pytest.raises(AssetMissingError, match=r"ModelScope ids are 'owner/name'.*'modelscope:<owner>/<name>'"):
        assets.resolve_text_model("bert-base-multilingual-cased")


def test_a_snapshot_without_the_files_a_model_needs_is_rejected(hubs, monkeypatch):
    monkeypatch.setenv(hub.HUB_ENV, "modelscope")
    with pytest.raises(AssetMissingError, match=r"the ModelScope snapshot .* lacks \['vocab.txt'\]"):
        assets.resolve_text_model("bert-base-chinese")


def test_modelscope_without_its_package_says_what_to_install(hubs, monkeypatch):
    import sys

    monkeypatch.setenv(hub.HUB_ENV, "modelscope")
    monkeypatch.setitem(sys.modules, "modelscope", None)  # `import modelscope` raises ImportError
    with pytest.raises(hub.HubPackageMissingError, match=re.escape("pip install 'blip2-internlm[modelscope]'")):
        assets.resolve_llm(INTERNLM2_1_8B)


# --- the table ----------------------------------------------------------------------------------

#: keys whose values are hub names, and the architectures whose LLM has no ModelScope entry (OPT)
ASSET_KEYS = ("llm_model", "qformer_text_model")
UNMAPPED_LLM_ARCHS = ("blip2_opt_baseline",)
_ENV_DEFAULT = re.compile(r"\$\{oc\.env:[A-Z0-9_]+,(?P<default>[^}]*)\}")


def hub_names_in_configs() -> dict[str, list[str]]:
    """{hub id: [config files naming it]} for every asset key of every model type and project
    config, with ``${oc.env:VAR,default}`` read as its default."""
    found: dict[str, list[str]] = {}
    files = sorted((REPO / "blip2_internlm" / "configs" / "models").glob("*.yaml"))
    files += sorted((REPO / "configs").rglob("*.yaml"))
    for file in files:
        model = (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("model") or {}
        for key in ASSET_KEYS:
            value = model.get(key)
            if not isinstance(value, str):
                continue
            match = _ENV_DEFAULT.fullmatch(value)
            value = match["default"] if match else value
            if key == "llm_model" and model.get("arch") in UNMAPPED_LLM_ARCHS:
                continue
            if value in assets.generated_names(assets.LLM) + assets.generated_names(assets.TEXT_MODEL):
                continue
            if hub.source_of(value) is not None:
                found.setdefault(value, []).append(str(file.relative_to(REPO)))
    return found


def test_every_internlm2_and_bert_a_config_names_has_a_modelscope_id(lavis_ready):
    found = hub_names_in_configs()
    # the scan sees what the shipped model types name, so a new one cannot slip past it
    assert {INTERNLM2_1_8B, "internlm/internlm2-7b", "internlm/internlm2-chat-1_8b", "bert-base-uncased"} <= set(found)
    unmapped = {name: files for name, files in found.items() if name not in hub.MODELSCOPE_IDS}
    assert not unmapped, f"add these to blip2_internlm.hub.MODELSCOPE_IDS: {unmapped}"


def test_the_internlm2_entries_keep_the_model_s_name_under_modelscope_s_org():
    internlm2 = {k: v for k, v in hub.MODELSCOPE_IDS.items() if k.startswith("internlm/")}
    assert len(internlm2) >= 4
    for hf_id, ms_id in internlm2.items():
        assert ms_id == "Shanghai_AI_Laboratory/" + hf_id.removeprefix("internlm/")
    for hf_id, ms_id in hub.MODELSCOPE_IDS.items():
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", ms_id), f"{hf_id} -> {ms_id!r} is not a ModelScope id"


#: ways a module could override the user's mirror
_SETS_ENDPOINT = re.compile(
    r"environ\[[^]]*HF_ENDPOINT[^]]*\]\s*=|(setdefault|putenv)\([^)]*HF_ENDPOINT|update\([^)]*HF_ENDPOINT"
    r"|constants\.ENDPOINT\s*="
)


def test_nothing_in_the_package_overrides_hf_endpoint():
    assert _SETS_ENDPOINT.search('os.environ["HF_ENDPOINT"] = "https://huggingface.co"')  # the check can fail
    assert _SETS_ENDPOINT.search("os.environ.setdefault('HF_ENDPOINT', x)")
    offending = [
        f"{path.relative_to(REPO)}: {match.group(0)}"
        for path in sorted((REPO / "blip2_internlm").rglob("*.py"))
        for match in _SETS_ENDPOINT.finditer(path.read_text(encoding="utf-8"))
    ]
    assert offending == []
