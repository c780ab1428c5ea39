"""LAVIS dataset builders and datasets: no downloads behind the user's back, Visual Genome's real layout,
and bad records or images failing where the bad-sample guard can name them."""

import logging
import os

from blip2_internlm.compat.fixes import fix

logger = logging.getLogger(__name__)


@fix
def no_hidden_annotation_downloads():
    """BaseDatasetBuilder downloads any annotation file it cannot find, which hangs or fails obscurely offline."""
    from lavis.common.utils import is_url
    from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

    from blip2_internlm.assets import AssetMissingError, downloads_allowed
    from blip2_internlm.datasets.records import builder_name

    download_ann = BaseDatasetBuilder._download_ann

    def checked_download_ann(self):
        if not downloads_allowed():
            name = builder_name(self)
            for split, info in self.config.build_info.annotations.items():
                urls, storages = info.get("url", None), info.storage
                urls = [urls] if isinstance(urls, str) else list(urls or [])
                storages = [storages] if isinstance(storages, str) else list(storages)
                for url, storage in zip(urls, storages):
                    path = storage_path(storage)
                    if not os.path.exists(path) and url and is_url(str(url)) and not os.path.isfile(str(url)):
                        raise AssetMissingError(
                            f"datasets.{name}.build_info.annotations.{split}.storage",
                            str(storage),
                            f"no file at {path}",
                            f"Download {url} there (or point the key at your copy), or set "
                            "BLIP2_INTERNLM_ALLOW_DOWNLOADS=1 on a machine with network.",
                        )
        return download_ann(self)

    BaseDatasetBuilder._download_ann = checked_download_ann


def storage_path(storage) -> str:
    from lavis.common import utils

    return str(storage) if os.path.isabs(str(storage)) else utils.get_cache_path(str(storage))


@fix
def caption_samples_keep_image_ids():
    """CaptionDataset returns a per-dataset index as image_id, so COCO image 5 and another dataset's image 5 would count as one image in ITC."""
    from lavis.datasets.datasets.caption_datasets import CaptionDataset

    getitem = CaptionDataset.__getitem__

    def getitem_with_annotation_id(self, index):
        sample = getitem(self, index)
        sample["image_id"] = self.annotation[index]["image_id"]
        return sample

    CaptionDataset.__getitem__ = getitem_with_annotation_id


#: Sub-directories that LAVIS's download_vg.py produces when it unpacks images.zip and images2.zip.
VG_IMAGE_SUBDIRS = ("VG_100K", "VG_100K_2")


def find_vg_image(vis_root: str, image: str) -> str | None:
    """The file for a VG annotation's ``image`` under either layout, or None.

    Annotations name images ``<id>.jpg`` (or with some prefix); the download unpacks them
    into ``VG_100K/`` and ``VG_100K_2/``; users who merged the two folders have them flat.
    """
    candidates = [os.path.join(vis_root, image)]
    name = os.path.basename(image)
    candidates += [os.path.join(vis_root, sub, name) for sub in VG_IMAGE_SUBDIRS]
    candidates.append(os.path.join(vis_root, name))
    return next((path for path in candidates if os.path.isfile(path)), None)


def vg_caption_dataset_cls():
    from lavis.datasets.datasets.image_text_pair_datasets import ImageTextPairDataset

    class VGCaptionDataset(ImageTextPairDataset):
        """``ImageTextPairDataset`` whose image paths are resolved against the VG download layout."""

        def __init__(self, vis_processor, text_processor, vis_root, ann_paths):
            super().__init__(vis_processor, text_processor, vis_root, ann_paths)
            resolved, missing = [], []
            for ann in self.annotation:
                path = find_vg_image(vis_root, ann["image"])
                if path is None:
                    missing.append(ann["image"])
                else:
                    resolved.append({**ann, "image": os.path.relpath(path, vis_root)})
            if missing:
                raise FileNotFoundError(
                    f"Visual Genome: {len(missing)} of {len(self.annotation)} images in {ann_paths} were not "
                    f"found under {vis_root} (looked in ./, {', '.join(VG_IMAGE_SUBDIRS)}), e.g. {missing[:3]}. "
                    "Set datasets.vg_caption.build_info.images.storage to the folder that holds VG_100K/ and VG_100K_2/."
                )
            self.annotation = resolved

        def __getitem__(self, index):
            sample = super().__getitem__(index)
            ann = self.annotation[index]
            # VG has dozens of captions per image: ITC needs to know which ones share it
            sample["image_id"] = ann.get("image_id", "vg_" + os.path.splitext(os.path.basename(ann["image"]))[0])
            return sample

    return VGCaptionDataset


@fix
def vg_caption_images_in_download_layout():
    """The vg_caption builder joins annotation paths to the image root as is, which does not match the VG_100K/VG_100K_2 download layout."""
    from lavis.datasets.builders.image_text_pair_builder import VGCaptionBuilder

    VGCaptionBuilder.train_dataset_cls = vg_caption_dataset_cls()


@fix
def truncated_images_are_errors():
    """LAVIS sets PIL's global LOAD_TRUNCATED_IMAGES on import: a truncated file trains as a partly blank image."""
    import lavis.datasets.datasets.coco_caption_datasets  # noqa: F401  (sets the flag when first imported)
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False


@fix
def caption_image_ids_read_per_sample():
    """CaptionDataset reads each image_id when built: a record without one stops the run, with a KeyError naming no record."""
    from lavis.datasets.datasets.base_dataset import BaseDataset
    from lavis.datasets.datasets.caption_datasets import CaptionDataset

    def init_indexing_present_ids(self, vis_processor, text_processor, vis_root, ann_paths):
        BaseDataset.__init__(self, vis_processor, text_processor, vis_root, ann_paths)
        # a record without one fails when it is read, where the bad-sample guard names it
        self.img_ids = {}
        for ann in self.annotation:
            if "image_id" in ann:
                self.img_ids.setdefault(ann["image_id"], len(self.img_ids))

    CaptionDataset.__init__ = init_indexing_present_ids


@fix
def laion_shards_decode_images_and_captions_only():
    """LaionDataset decodes shard members with webdataset's default decoders, which unpickle .pyd/.pickle members and torch.load .pth ones."""
    from lavis.datasets.datasets.laion_dataset import LaionDataset

    from blip2_internlm.datasets.chinese_captions import ZhCaptionWdsDataset

    def decode_image_and_caption_only(self, vis_processor, text_processor, location):
        # LAVIS's pipeline and error handling (warn and continue), with zh_caption_wds's decoding
        ZhCaptionWdsDataset.__init__(self, vis_processor, text_processor, location, skip_invalid=True)

    LaionDataset.__init__ = decode_image_and_caption_only
    LaionDataset.caption_key = "caption"
    for name in ("image", "caption", "to_dict"):
        setattr(LaionDataset, name, ZhCaptionWdsDataset.__dict__[name])
