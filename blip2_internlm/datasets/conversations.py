"""Multi-turn image conversations in LLaVA's JSON format, and their LAVIS builder ``llava_conversations``.

A file is a JSON list of records as LLaVA-Instruct-150K writes them::

    {"id": "000000033471", "image": "000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

``llava_record_to_messages`` turns the ``conversations`` into chat messages
``[{"role": "system" | "user" | "assistant", "content": str}, ...]``: ``human``/``user`` are the
user, ``gpt``/``assistant`` the assistant, and an optional first ``system`` turn the system.  The
``<image>`` placeholder is dropped from the text (with the newline beside it): this model always
puts the image in front of the conversation.  A record that breaks the format is an error naming
file, record index and id, or, with ``skip_invalid: true`` on the train split, a counted skip;
the format and its sources are in docs/instruction_data.md.

Samples are ``{"image", "messages", "text_input", "image_id"}``: ``messages`` as written (no text
processor: punctuation and newlines are the data), ``text_input`` the last assistant turn (what
LAVIS's tasks and the sample guard read), ``image_id`` the record's id as text (its image path
when it has none).
"""

from __future__ import annotations

import logging
import os

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.datasets.datasets.base_dataset import BaseDataset
from torch.utils.data import default_collate

from blip2_internlm.datasets.chinese_captions import SPLITS, resolve, run_splits
from blip2_internlm.datasets.records import BadRecordError, CheckedMixin, builder_name, load_annotation_file, open_rgb
from blip2_internlm.paths import DATASET_CONFIG_DIR

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
#: LLaVA's ``from`` values and the chat roles they become.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
#: How many skip reasons the log line quotes.
_REASONS_LOGGED = 3


# ----------------------------------------------------------------------------- records


def _drop_placeholder(text: str) -> str:
    for form in (IMAGE_PLACEHOLDER + "\n", "\n" + IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER):
        text = text.replace(form, "", 1)
    return text


def llava_record_to_messages(record, where: str = "record", max_turns: int | None = None) -> list[dict]:
    """The chat messages of a LLaVA record's ``conversations``; ``BadRecordError`` ``"<where>: <reason>"``
    when it breaks the format.

    ``max_turns`` keeps the first that many user/assistant pairs (and the system turn).  Only the
    conversation is read: the ``image`` key is the loader's to check.
    """

    def bad(reason: str) -> BadRecordError:
        return BadRecordError(f"{where}: {reason}")

    if not isinstance(record, dict):
        raise bad(f"is a {type(record).__name__}, not an object")
    if "conversations" not in record:
        raise bad("has no 'conversations'")
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise bad(f"'conversations' is a {type(turns).__name__}, not a list")
    if not turns:
        raise bad("'conversations' is empty")
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise bad(f"conversations[{number}] is a {type(turn).__name__}, not an object")
        if not isinstance(turn.get("value"), str):
            raise bad(f"conversations[{number}] has no string 'value'")
        role = ROLES.get(turn.get("from"))
        if role is None:
            known = sorted(ROLES)
            raise bad(f"conversations[{number}] is from the unknown {turn.get('from')!r} (expected one of {known})")
        messages.append({"role": role, "content": turn["value"]})
    first = 1 if messages[0]["role"] == "system" else 0  # index of the first user turn
    for number, message in enumerate(messages[first:], start=first):
        expected = "user" if (number - first) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise bad(
                f"conversations[{number}] is from the {message['role']} where the {expected}'s turn belongs "
                "(an optional first system turn, then user and assistant turns alternating, user first)"
            )
    if messages[-1]["role"] != "assistant":
        raise bad("does not end with an assistant turn")
    for number, message in enumerate(messages):
        count = message["content"].count(IMAGE_PLACEHOLDER)
        if count and number != first:
            raise bad(f"conversations[{number}] holds {IMAGE_PLACEHOLDER}: only the first user turn may")
        if count > 1:
            raise bad(f"conversations[{number}] holds {IMAGE_PLACEHOLDER} {count} times: once at most")
        message["content"] = _drop_placeholder(message["content"]).strip()
        if not message["content"]:
            raise bad(f"conversations[{number}] is empty")
    if max_turns is not None:
        messages = messages[: first + 2 * max_turns]
    return messages


def _where(path, index: int, record) -> str:
    if isinstance(record, dict) and isinstance(record.get("id"), (str, int)):
        return f"{path}, record {index} (id {record['id']!r})"
    return f"{path}, record {index}"


def _record(path, index: int, record, vis_root: str, max_turns: int | None) -> dict:
    """The dataset's record for one LLaVA record; ``BadRecordError`` naming file, index and id."""
    where = _where(path, index, record)
    messages = llava_record_to_messages(record, where, max_turns)
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise BadRecordError(f"{where}: has no 'image' path")
    if not os.path.isfile(os.path.join(vis_root, image)):
        raise BadRecordError(f"{where}: names the missing image {os.path.join(vis_root, image)}")
    image_id = record.get("id")
    return {
        "image": image,
        "messages": messages,
        "image_id": str(image_id) if isinstance(image_id, (str, int)) else image,
        "where": where,
    }


def load_conversation_records(path, vis_root: str, skip_invalid: bool, max_turns: int | None = None):
    """``(records, skipped)`` of a LLaVA conversation file, each record checked up front.

    A record is ``{"image": path under vis_root, "messages", "image_id", "where"}``.  A bad
    record raises ``BadRecordError`` naming file, index, id and reason, or with ``skip_invalid``
    is left out and counted; the skips are logged with the first few reasons.  A file that is
    missing, not UTF-8 or not a JSON list is an error naming it whatever ``skip_invalid`` says.
    """
    try:
        raw = load_annotation_file(path)
    except UnicodeDecodeError as err:
        raise BadRecordError(f"{path} is not UTF-8 text: {err}") from None
    records, reasons = [], []
    for index, record in enumerate(raw):
        try:
            records.append(_record(path, index, record, vis_root, max_turns))
        except BadRecordError as err:
            if not skip_invalid:
                raise BadRecordError(f"{err} (set skip_invalid: true to skip such records)") from None
            reasons.append(str(err))
    if reasons:
        logger.warning(
            "Skipped %d invalid conversation records of %s (skip_invalid: true), first: %s",
            len(reasons),
            path,
            "; ".join(reasons[:_REASONS_LOGGED]),
        )
    return records, len(reasons)


# ----------------------------------------------------------------------------- dataset


class ConversationDataset(CheckedMixin, BaseDataset):
    """Samples ``{"image", "messages", "text_input", "image_id"}``, one per conversation."""

    def __init__(self, vis_processor, text_processor, vis_root, records, skip_invalid=False, skipped=0):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths=[])
        self.annotation = list(records)
        self.skip_invalid, self.skipped_records = skip_invalid, skipped
        self._add_instance_ids()

    def load(self, index):
        ann = self.annotation[index]
        image = open_rgb(os.path.join(self.vis_root, ann["image"]), ann["where"])
        messages = [dict(message) for message in ann["messages"]]
        return {
            "image": self.vis_processor(image),
            "messages": messages,
            "text_input": messages[-1]["content"],
            "image_id": ann["image_id"],
        }

    def collater(self, samples):
        """LAVIS's batch, with ``messages`` as one list of messages per sample."""
        batch = default_collate([{key: value for key, value in s.items() if key != "messages"} for s in samples])
        batch["messages"] = [s["messages"] for s in samples]
        return batch


# ----------------------------------------------------------------------------- builder


@registry.register_builder("llava_conversations")
class LlavaConversationsBuilder(BaseDatasetBuilder):
    """Each split under ``build_info.annotations`` from its JSON files; images under ``images.storage``.

    Only the train split honours ``skip_invalid``: an evaluation split never drops a record.
    """

    train_dataset_cls = eval_dataset_cls = ConversationDataset
    DATASET_CONFIG_DICT = {"default": os.path.join(DATASET_CONFIG_DIR, "llava_conversations", "defaults.yaml")}

    def _download_data(self):
        """Nothing to fetch: the files are downloaded by hand (docs/instruction_data.md)."""

    def max_turns(self, name: str) -> int | None:
        value = self.config.get("max_turns", None)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"datasets.{name}.max_turns = {value!r}; expected a positive integer or null")
        return value

    def image_root(self, name: str) -> str:
        key = f"datasets.{name}.build_info.images.storage"
        storage = (self.config.build_info.get("images", None) or {}).get("storage", None)
        if storage is None:
            raise BadRecordError(f"{key} is not set: point it at the folder the records' 'image' paths are under")
        root = resolve(storage)
        if not os.path.isdir(root):
            raise BadRecordError(f"{key}: no folder at {root}")
        return root

    def split_files(self, name: str) -> dict[str, list[str]]:
        """``split -> files`` of the configured splits.  A split with a missing file is an error
        naming its key and the file, unless the run being set up does not use that split."""
        used = run_splits()
        files = {}
        for split, info in (self.config.build_info.get("annotations", None) or {}).items():
            if split not in SPLITS or info is None:
                continue
            key = f"datasets.{name}.build_info.annotations.{split}.storage"
            storage = info.get("storage", None)
            if not storage:
                raise BadRecordError(f"{key} is not set (set the split to null to leave it out)")
            paths = [resolve(p) for p in ([storage] if isinstance(storage, str) else list(storage))]
            missing = next((p for p in paths if not os.path.isfile(p)), None)
            if missing is None:
                files[split] = paths
            elif used is not None and split not in used:
                logger.info("%s: no file at %s; split %r is not built (the run does not use it)", key, missing, split)
            else:
                raise BadRecordError(f"{key}: no file at {missing}")
        return files

    def build(self):
        self.build_processors()
        name = builder_name(self)
        vis_root, max_turns = self.image_root(name), self.max_turns(name)
        datasets = {}
        for split, paths in self.split_files(name).items():
            kind = "train" if split == "train" else "eval"
            skip_invalid = kind == "train" and bool(self.config.get("skip_invalid", False))
            records, skipped = [], 0
            for path in paths:
                kept, dropped = load_conversation_records(path, vis_root, skip_invalid, max_turns)
                records.extend(kept)
                skipped += dropped
            if not records:
                raise BadRecordError(f"no usable records in datasets.{name} {split} ({paths})")
            datasets[split] = (self.train_dataset_cls if kind == "train" else self.eval_dataset_cls)(
                vis_processor=self.vis_processors[kind],
                text_processor=self.text_processors[kind],
                vis_root=vis_root,
                records=records,
                skip_invalid=skip_invalid,
                skipped=skipped,
            )
        return datasets
