"""Reinhard colour transfer in OpenCV's uint8 Lab, exactly as the official IIDM code does it.

Between refinement rounds IIDM maps each generated image's colour statistics onto its style
reference's (Reinhard et al. 2001, "Color Transfer between Images"): per channel of the uint8
Lab image (OpenCV's 8-bit Lab: L scaled to 0..255, a and b offset by 128),

    out = round((src - mean_src) * std_ref / std_src + mean_ref), clipped to 0..255

with the whole-image means and standard deviations (cv2.meanStdDev, population std) rounded
to 2 decimals first, as the official code does. A channel with std 0 (after rounding) maps to
the reference's mean instead of dividing by zero.

    python -m tools.color_transfer --results OUT --input_path MASKS --img_path TRAIN_ROOT --output_path OUT2
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import cli
from datasets import DataError
from synthesis.color_transfer import transfer_folder


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, required=True, help="folder of generated NAME.jpg")
    parser.add_argument("--input_path", type=Path, required=True, help="masks folder with label_to_img.json")
    parser.add_argument("--img_path", type=Path, required=True, help="training root (or imgs/) with the references")
    parser.add_argument("--output_path", type=Path, required=True, help="folder for the transferred NAME.jpg")
    parser.alias("--output", "--output_path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        count = transfer_folder(args.results, args.input_path, args.img_path, args.output_path)
    except DataError as exc:
        print(f"color_transfer: {exc}", file=sys.stderr)
        return 1
    print(f"color_transfer: wrote {count} images to {args.output_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
