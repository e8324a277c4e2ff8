"""An HTML page to look at generated landscapes: one row per mask,

    reference | mask in the class palette, with a legend of its classes | output | rounds (when kept)

Image paths in the page are relative to it, so the folder can be moved or copied whole. The
coloured masks are written as PNGs into ``gallery/`` beside the page.

    python -m tools.gallery --results OUT --input_path MASKS --img_path TRAIN_ROOT [--mapping FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

import cli
from datasets import DataError
from datasets.landscape import MAPPING_FILE
from synthesis.gallery import PAGE, gallery_rows, write_gallery


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, required=True, help="folder of generated NAME.jpg")
    parser.add_argument("--input_path", type=Path, required=True, help="folder of the label PNGs")
    parser.add_argument("--img_path", type=Path, required=True, help="training root (or imgs/) with the references")
    parser.add_argument("--mapping", type=Path, help=f"mask -> reference JSON (default INPUT_PATH/{MAPPING_FILE})")
    parser.add_argument("--output_path", type=Path, help=f"the page to write (default RESULTS/{PAGE})")
    parser.alias("--out", "--output_path")
    args = parser.parse_args(argv)
    try:
        rows = gallery_rows(args.results, args.input_path, args.img_path, args.mapping)
    except DataError as exc:
        print(f"gallery: {exc}", file=sys.stderr)
        return 1
    if not rows:
        print(f"gallery: no outputs of {args.input_path} found in {args.results}", file=sys.stderr)
        return 1
    page = write_gallery(args.output_path or args.results / PAGE, rows)
    print(f"wrote {page} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
