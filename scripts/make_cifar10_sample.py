"""Make the small CIFAR-10 sample shipped in datamodules/assets (see its README.md).

Three disjoint fixed-seed random subsets of lossless canonical CIFAR-10 training images
(the only lossless CIFAR-10 pixels at hand: images 0..3999 of data_batch_1), uint8
(N, 32, 32, 3), compressed. All three splits are *training* images: the sample is for the
quick-start and the tests, not for numbers comparable to the papers'.

    python scripts/make_cifar10_sample.py --source cifar10_train_first4000_exact.npz \
        --out datamodules/assets/cifar10_sample.npz
"""

import argparse

import numpy as np

SIZES = {"train": 400, "valid": 100, "test": 100}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", required=True, help="npz with train: uint8 (N, 32, 32, 3) CIFAR-10 images"
    )
    parser.add_argument("--out", required=True, help="the sample npz to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with np.load(args.source) as source:
        images = source["train"]
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{args.source}[train]: expected uint8 (N, 32, 32, 3)")
    order = np.random.default_rng(args.seed).permutation(len(images))
    arrays, start = {}, 0
    for split, n in SIZES.items():  # consecutive slices of one permutation: disjoint
        index = np.sort(order[start : start + n])
        arrays[split] = images[index]
        arrays[f"{split}_source_index"] = index.astype(np.int32)
        start += n
    np.savez_compressed(args.out, **arrays)


if __name__ == "__main__":
    main()
