"""Image ids for ITC: any hashable id becomes an integer that every rank agrees on."""

import torch
from spec_helpers import run_python

from blip2_internlm.ids import image_ids_to_tensor, stable_image_id


def test_small_non_negative_ints_keep_their_value():
    assert [stable_image_id(i) for i in (0, 7, 391895, 2**62 - 1)] == [0, 7, 391895, 2**62 - 1]


def test_strings_and_other_ids_hash_above_every_plain_int():
    for image_id in ("coco_123456", "vg_1", "shapes_train_00001", "123", -5, 2**62, ("a", 1)):
        assert 2**62 <= stable_image_id(image_id) < 2**63


def test_a_string_never_equals_the_int_it_spells():
    assert stable_image_id("123") != stable_image_id(123)


def test_equal_ids_map_equal_and_distinct_ids_do_not_collide():
    ids = [f"coco_{i}" for i in range(100_000)] + [f"vg_{i}" for i in range(100_000)]
    mapped = [stable_image_id(i) for i in ids]
    assert len(set(mapped)) == len(ids)
    assert stable_image_id("coco_5") == stable_image_id("coco_5")


def test_mapping_is_identical_in_processes_with_different_hash_seeds():
    code = "from blip2_internlm.ids import stable_image_id; print([stable_image_id(s) for s in ('coco_1','vg_2','x')])"
    outputs = {run_python("-c", code, env={"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outputs) == 1
    assert outputs.pop().strip() == str([stable_image_id(s) for s in ("coco_1", "vg_2", "x")])


def test_batches_of_ids_become_int64_tensors():
    assert image_ids_to_tensor(["a", "b", "a"]).dtype == torch.long
    ids = image_ids_to_tensor(["a", "b", "a"])
    assert ids[0] == ids[2] and ids[0] != ids[1]
    assert image_ids_to_tensor(torch.tensor([3, 4])).tolist() == [3, 4]
    assert image_ids_to_tensor([3, 4]).tolist() == [3, 4]


def test_bools_are_rejected_rather_than_taken_as_ints():
    import pytest

    with pytest.raises(TypeError, match="bool"):
        stable_image_id(True)
