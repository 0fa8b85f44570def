"""Write WebDataset tar shards ({key}.jpg, {key}.txt, {key}.json) of image-text pairs.

Sources (pick one):
  --folder DIR            images with same-named .txt captions beside them (recursive)
  --table FILE.csv|.parquet  rows of (local image path, caption); relative paths resolve
                          against the table's folder
  --synthetic N           N synthetic shapes images with captions (for trying things out)
  --segmentation voc|coco|context --root DIR --split NAME
                          a segmentation split (evaluation data for a cluster without shared
                          storage): {key}.jpg (the original JPEG), {key}.png (grey class-index
                          mask, 255 = ignore), {key}.json (id, labels, dataset, split); the key
                          is the image id. class_names.txt is written beside the tars; read them
                          with wsss_ray.data.segmentation.read_segmentation_shards

Bad input is skipped, counted and named, never fatal: empty, truncated or corrupt images, images
over PIL.Image.MAX_IMAGE_PIXELS (decompression bombs: refused from the header, never decoded),
missing, empty or non-UTF-8 captions, table rows without a path, masks that do not decode or do
not match their image's size. The summary names the first ten; {prefix}-skipped.txt beside the
shards lists every one. Captions over 4096 bytes are cut there (and listed). CMYK, palette,
transparent and 16-bit images are converted as a viewer shows them. A source that cannot be read
at all (a missing folder or table, a table without the columns, a COCO json that is not one or
names a category it does not define) is one line, "error: ..." naming the file, exit status 2.

  python jobs/make_shards.py --folder photos/ --out shards/ --samples-per-shard 1000
  python jobs/make_shards.py --segmentation voc --root VOCdevkit/VOC2012 --split val --out voc_val/
"""

from __future__ import annotations

import argparse
import sys

from wsss_ray.data.shards import pairs_from_folder, pairs_from_table, write_shards


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="folder of images + .txt captions")
    src.add_argument("--table", help="CSV or parquet file of (path, caption)")
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic shapes images")
    src.add_argument(
        "--segmentation", choices=["voc", "coco", "context"], help="shard a segmentation split"
    )
    p.add_argument("--root", help="--segmentation: dataset root (VOC2012 / COCO / VOC2010)")
    p.add_argument("--split", default="val", help="--segmentation: split name")
    p.add_argument("--out", required=True, help="output folder for the .tar shards")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    p.add_argument("--image-col", default="path", help="table column with image paths")
    p.add_argument("--caption-col", default="caption", help="table column with captions")
    p.add_argument("--seed", type=int, default=0, help="synthetic generator seed")
    p.add_argument("--image-size", type=int, default=128, help="synthetic image side")
    a = p.parse_args(argv)
    if a.segmentation and not a.root:
        p.error("--segmentation needs --root")
    try:
        print(_write(a))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _write(a: argparse.Namespace) -> str:
    """Write the shards the arguments ask for; returns the summary line."""
    if a.synthetic is not None:
        from wsss_ray.data.synthetic import write_webdataset

        paths = write_webdataset(a.out, a.synthetic, a.seed, a.image_size, a.samples_per_shard)
        return f"wrote {a.synthetic} synthetic samples in {len(paths)} shards to {a.out}"
    if a.segmentation:
        from wsss_ray.data.segmentation import open_source, shard_segmentation

        source = open_source(a.segmentation, a.root, a.split)
        summary = shard_segmentation(source, a.out, a.samples_per_shard, a.prefix)
        return f"{a.segmentation} {a.split} -> {a.out}: {summary}"
    if a.folder:
        pairs = pairs_from_folder(a.folder)
    else:
        pairs = pairs_from_table(a.table, a.image_col, a.caption_col)
    return str(write_shards(pairs, a.out, a.prefix, a.samples_per_shard))


if __name__ == "__main__":
    sys.exit(main())
