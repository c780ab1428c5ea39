"""The demo's shapes data are cached by content: an edit of what the generator writes (captions,
questions, drawing) regenerates them even where GENERATOR_VERSION was not bumped."""

import json

from blip2_internlm.datasets import shapes
from blip2_internlm.datasets.shapes import generate_shapes

SPLITS = {"train": 4, "test": 2}


def test_unchanged_generator_reuses_the_data(tmp_path):
    first = generate_shapes(tmp_path, splits=SPLITS)
    again = generate_shapes(tmp_path, splits=SPLITS)
    assert (first["reused"], again["reused"]) == (False, True)
    assert (
        first["fingerprint"]
        == again["fingerprint"]
        == json.loads((tmp_path / "manifest.json").read_text())["fingerprint"]
    )


def test_new_caption_wording_regenerates_the_data(tmp_path, monkeypatch):
    generate_shapes(tmp_path, splits=SPLITS)
    captions = shapes._captions

    def reworded(objects, lang):
        return [caption.replace("a ", "one ", 1) if lang == "en" else caption for caption in captions(objects, lang)]

    monkeypatch.setattr(shapes, "_captions", reworded)
    redone = generate_shapes(tmp_path, splits=SPLITS)
    assert not redone["reused"]
    train = json.loads((tmp_path / "annotations" / "caption_en_train.json").read_text())
    assert all(record["caption"].startswith("one ") for record in train)


def test_new_drawing_regenerates_the_data(tmp_path, monkeypatch):
    generate_shapes(tmp_path, splits=SPLITS)
    monkeypatch.setattr(shapes, "BACKGROUND", (200, 200, 200))
    assert not generate_shapes(tmp_path, splits=SPLITS)["reused"]


def test_a_manifest_from_before_fingerprints_is_reused_and_then_checked(tmp_path, monkeypatch):
    generate_shapes(tmp_path, splits=SPLITS)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["fingerprint"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert generate_shapes(tmp_path, splits=SPLITS)["reused"]  # no regeneration of every existing cache
    monkeypatch.setattr(shapes, "BACKGROUND", (200, 200, 200))
    redone = generate_shapes(tmp_path, splits=SPLITS)
    assert not redone["reused"] and redone["fingerprint"]
