"""Convert a Chinese caption corpus, as distributed, into LAVIS caption JSON (``zh_caption_json``).

    python -m blip2_internlm.tools.convert_corpus --from {coco-cn,flickr8k-cn,flickr30k-cn,aic} \\
        --root DATA_ROOT --split train --out train.json [--images DIR] [--files F ...]
        [--format per-caption|per-image] [--skip-invalid]

``--root`` is a folder laid out like the builder's default config
(``blip2_internlm/configs/datasets/<builder>/defaults.yaml``, e.g. ``DATA_ROOT/coco-cn/...`` and
``DATA_ROOT/coco/images/``); ``--files`` replaces the split's annotation files (in the order the
defaults list them) and ``--images`` the image root.  The corpus is read by the same readers as
the builders, and checked the same way (missing images, empty or non-string captions: an error
naming the file and record, or skipped with a count under ``--skip-invalid``).

Output: a JSON list of ``{"image": path relative to the image root, "caption", "image_id"}``.
``per-caption`` (the default for train) writes one record per caption, as LAVIS's COCO train
annotations; ``per-image`` (the default for val/test) one record per image with its captions as
a list, as LAVIS's COCO eval annotations.  ``zh_caption_json`` reads both for every split.
Captions are written as the corpus has them; the ``chinese_caption`` processor normalises them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from omegaconf import OmegaConf

CORPORA = {
    "coco-cn": "coco_cn_caption",
    "flickr8k-cn": "flickr8k_cn_caption",
    "flickr30k-cn": "flickr30k_cn_caption",
    "aic": "aic_caption",
}


def default_layout(builder: str) -> dict:
    from blip2_internlm.paths import DATASET_CONFIG_DIR

    cfg = OmegaConf.load(DATASET_CONFIG_DIR / builder / "defaults.yaml").datasets[builder]
    return OmegaConf.to_container(cfg.build_info)


def convert(
    corpus: str,
    root: str,
    split: str,
    images: str | None = None,
    files=None,
    fmt: str | None = None,
    skip_invalid: bool = False,
) -> tuple[list[dict], int]:
    """``(records, skipped)`` for one split of ``corpus`` (a ``--from`` name)."""
    from blip2_internlm.datasets.chinese_captions import READERS, aic_image_dir, checked, per_caption, per_image

    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; expected one of {sorted(CORPORA)}")
    builder = CORPORA[corpus]
    layout = default_layout(builder)
    if not files:
        if split not in layout["annotations"]:
            raise ValueError(f"{corpus} has no default {split!r} split files; pass --files")
        storage = layout["annotations"][split]["storage"]
        files = [os.path.join(root, p) for p in ([storage] if isinstance(storage, str) else storage)]
    for path in files:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{corpus} {split}: no file at {path}")
    default_images = (layout.get("images") or {}).get("storage")
    image_root = images or (os.path.join(root, default_images) if default_images else None)
    vis_root = image_root or aic_image_dir(files[0])
    records, skipped = checked(
        READERS[builder](files, image_root), vis_root, skip_invalid, what=f"{corpus} {split} ({files})"
    )
    # Image paths relative to the image root that zh_caption_json will be given: --images, or
    # --root for AI Challenger's per-split folders.
    out_root = image_root or root
    fmt = fmt or ("per-caption" if split == "train" else "per-image")
    grouped = per_caption(records) if fmt == "per-caption" else per_image(records)
    out = [
        {
            "image": os.path.relpath(os.path.join(vis_root, r["image"]), out_root).replace(os.sep, "/"),
            "caption": r["caption"],
            "image_id": r["image_id"],
        }
        for r in grouped
    ]
    return out, skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blip2_internlm.tools.convert_corpus", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--from", dest="corpus", required=True, choices=sorted(CORPORA))
    parser.add_argument("--root", required=True, help="data root laid out as the builder's defaults.yaml")
    parser.add_argument("--split", required=True, choices=["train", "val", "test"])
    parser.add_argument("--out", required=True, help="output JSON file")
    parser.add_argument("--images", help="image root (default: the defaults.yaml one under --root)")
    parser.add_argument("--files", nargs="+", help="this split's annotation files, replacing the defaults")
    parser.add_argument(
        "--format", choices=["per-caption", "per-image"], help="default: per-caption for train, else per-image"
    )
    parser.add_argument("--skip-invalid", action="store_true", help="skip bad records (counted) instead of failing")
    args = parser.parse_args(argv)
    from blip2_internlm.datasets.records import BadRecordError

    try:
        records, skipped = convert(
            args.corpus, args.root, args.split, args.images, args.files, args.format, args.skip_invalid
        )
    except (BadRecordError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(records, handle, ensure_ascii=False)
    print(f"wrote {len(records)} records to {args.out}" + (f" ({skipped} invalid records skipped)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
