"""Make the small CelebA sample shipped in datamodules/assets (see its README.md).

The first 32 images of the aligned-and-cropped release (000001.jpg .. 000032.jpg, decoded,
uint8 (32, 218, 178, 3)), cut to the 128x128 window of Kolesnikov & Lampert (2017) with
`datamodules.celeba.crop_aligned` (rows 50..177, columns 25..152), split by one fixed-seed
permutation into three disjoint subsets (24 train / 4 valid / 4 test, each kept in file order),
compressed. All 32 belong to the official *train* partition: the sample is for the quick-start
and the tests, not for numbers comparable to the papers'.

    python scripts/make_celeba_sample.py --source /path/to/celeba_sample32.npz \\
        --out datamodules/assets/celeba_sample.npz
"""

import argparse
import re

import numpy as np

from datamodules.celeba import CROP, HEIGHT, SAMPLE_SIZES, WIDTH, crop_aligned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        required=True,
        help="npz with test_original: uint8 (N, 218, 178, 3) aligned CelebA images and "
        "filenames (N,) such as 000001.jpg",
    )
    parser.add_argument("--out", required=True, help="the sample npz to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with np.load(args.source) as source:
        images, names = source["test_original"], source["filenames"]
    n = sum(SAMPLE_SIZES.values())
    if images.dtype != np.uint8 or images.shape != (n, HEIGHT, WIDTH, 3):
        raise ValueError(
            f"{args.source}[test_original]: expected uint8 ({n}, {HEIGHT}, {WIDTH}, 3)"
        )
    if not all(re.fullmatch(r"\d{6}\.jpg", str(name)) for name in names):
        raise ValueError(f"{args.source}[filenames]: expected names such as 000001.jpg")
    number = np.array([int(str(name)[:6]) for name in names])  # 1-based, as in the release
    cropped = crop_aligned(images, CROP)
    order = np.random.default_rng(args.seed).permutation(n)
    arrays, start = {}, 0
    for split, size in SAMPLE_SIZES.items():  # consecutive slices of one permutation: disjoint
        index = np.sort(order[start : start + size])
        arrays[split] = cropped[index]
        arrays[f"{split}_source_index"] = (number[index] - 1).astype(np.int32)
        start += size
    np.savez_compressed(args.out, **arrays)


if __name__ == "__main__":
    main()
