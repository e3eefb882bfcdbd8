"""Make the small binarized MNIST sample shipped in datamodules/assets (see its README.md).

A fixed-seed random subset of each split of the static (Larochelle & Murray) binarized MNIST,
kept in random order (the test file is grouped by digit class, so neither a prefix of it nor
of a sorted subset would be representative), bit-packed and compressed.

    python scripts/make_mnist_sample.py --source binarized_mnist.npz \
        --out datamodules/assets/binarized_mnist_sample.npz
"""

import argparse

import numpy as np
from einops import rearrange

SIZES = {"train": 4000, "valid": 1000, "test": 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", required=True, help="npz with train/valid/test, uint8 0/1 (N, 28, 28)"
    )
    parser.add_argument("--out", required=True, help="the sample npz to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    arrays = {}
    with np.load(args.source) as source:
        for split, n in SIZES.items():
            images = source[split]
            if images.shape[1:] != (28, 28) or not np.isin(images, (0, 1)).all():
                raise ValueError(f"{args.source}[{split}]: expected 0/1 images (N, 28, 28)")
            index = rng.choice(len(images), size=n, replace=False)
            pixels = rearrange(images[index].astype(np.uint8), "n h w -> n (h w)")
            arrays[split] = np.packbits(pixels, axis=1)  # (n, 98): 784 bits per image
            arrays[f"{split}_source_index"] = index.astype(np.int32)
    np.savez_compressed(args.out, **arrays)


if __name__ == "__main__":
    main()
