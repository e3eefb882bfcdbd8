"""CPU benchmark: AGAVE's auxiliary term keeps a PixelCNN++ decoder using z; without it the
KL collapses (appendix C's control), from the same start.

An AGAVE (λ = 2, y = x) is trained with its auxiliary term for ``--start-steps``; from those
weights (and the same Adamax state) two runs of ``--steps`` each see the same batches: (a) the
same objective, eq. 7 at λ = 2, and (b) the auxiliary term dropped with λ = 1, the VAE bound of
eq. 6 alone. It prints each run's training KL every ``--every`` steps and, at the end, on
held-out images: the KL (nats per image), the active units of z, x's -ELBO in bits/dim with
its decomposition, and the VAE's bound of y. A script, not a test: see benchmarks/README.md.

    python benchmarks/agave_collapse.py --data ../shared/data/cifar10_train_first4000_exact.npz

``--data``: an npz with ``train`` images (N, 32, 32, 3) uint8, the last ``--n-test`` held
out; without it the CIFAR-10 sample shipped in the package (400 train, its 100 test images).
"""

import argparse
import copy
import functools
import math
import time

import numpy as np
import torch

from lightning_modules import AGAVE
from lightning_modules.backbone import PixelCNNppNet
from lightning_modules.likelihoods import DiscretizedLogisticMixture


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", help="npz with `train` (N, 32, 32, 3) uint8; default: the sample")
    p.add_argument("--n-test", type=int, default=500, help="held-out images (the last ones)")
    p.add_argument("--start-steps", type=int, default=600, help="shared start, with the term")
    p.add_argument("--steps", type=int, default=600, help="steps of each continuation")
    p.add_argument("--every", type=int, default=50, help="print the KL this often")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--latent-channels", type=int, default=8, help="z: C x 16 x 16")
    p.add_argument("--width", type=int, default=32, help="ResNet VAE channels")
    p.add_argument("--nr-resnet", type=int, default=2, help="PixelCNN++ blocks per stage")
    p.add_argument("--channels", type=int, default=48, help="PixelCNN++ filters")
    p.add_argument("--n-mix", type=int, default=5, help="logistics of the mixture")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load(args) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) images, (N, 3, 32, 32) float levels 0..255."""
    if args.data:
        images = np.load(args.data)["train"]
        train, test = images[: -args.n_test], images[-args.n_test :]
    else:
        from datamodules.cifar10 import load_sample  # the package's 400 / 100 / 100

        splits = load_sample()
        train, test = splits["train"], splits["test"]
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float()  # noqa: E731
    return as_tensor(train), as_tensor(test)


@torch.no_grad()
def evaluate(model: AGAVE, x: torch.Tensor) -> dict[str, float]:
    model.eval()
    terms = {k: [] for k in ("recon", "recon_y", "kl/z")}
    means = []
    for batch in x.split(100):
        for k, v in model.elbo_terms(batch).items():
            terms[k].append(v)
        means.append(model.encode(batch)[0].flatten(1))
    model.train()
    t = {k: torch.cat(v) for k, v in terms.items()}
    m = model.evaluation_metrics(t)
    active = int((torch.cat(means).double().var(0) > 0.01).sum())
    return {
        "kl_nats": float(t["kl/z"].mean()),
        "active_units": active,
        "bpd": float((m["bpd/kl"] + m["bpd/recon"]).mean()),
        "bpd/kl": float(m["bpd/kl"].mean()),
        "bpd/recon": float(m["bpd/recon"].mean()),
        "bpd_vae": float(m["bpd_vae"].mean()),
    }


def train(model, optimizer, x, steps, seed, every, label, batch_size) -> float:
    """``steps`` Adamax steps on batches drawn by ``seed``; prints the batch KL; seconds."""
    order = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = x[torch.randint(len(x), (batch_size,), generator=order)]
        terms = model.elbo_terms(batch)
        loss = model.loss(terms)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            kl = float(terms["kl/z"].detach().mean())
            bpd = float(model.nelbo(terms).detach().mean()) / (model.dims * math.log(2))
            print(f"  {label} step {step:5d}: train KL {kl:8.2f} nats, -ELBO {bpd:.3f} bits/dim",
                  flush=True)  # fmt: skip
    return time.perf_counter() - start


def main(args) -> None:
    torch.manual_seed(args.seed)
    train_x, test_x = load(args)
    net = functools.partial(PixelCNNppNet, nr_resnet=args.nr_resnet, channels=args.channels,
                            dropout=0.0)  # fmt: skip
    model = AGAVE(image_shape=(3, 32, 32), lam=2.0, latent_channels=args.latent_channels,
                  width=args.width, blocks=1, pixelcnn=net,
                  likelihood=DiscretizedLogisticMixture(n_mix=args.n_mix))  # fmt: skip
    model.initialize_from(train_x[: 2 * args.batch_size])
    optimizer = torch.optim.Adamax(model.parameters(), lr=args.lr)
    print(f"AGAVE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters,"
          f" {len(train_x)} training / {len(test_x)} held-out images, batch {args.batch_size},"
          f" {torch.get_num_threads()} threads")  # fmt: skip
    print(f"shared start: {args.start_steps} steps of eq. 7 at λ = 2 (auxiliary term on)")
    seconds = train(
        model, optimizer, train_x, args.start_steps, args.seed, args.every, "start", args.batch_size
    )
    print(f"  {seconds:.0f} s; held out: {evaluate(model, test_x)}")
    results = {}
    for label, lam, weight in (("on", 2.0, 1.0), ("dropped", 1.0, 0.0)):
        run = copy.deepcopy(model)
        run.lam, run.auxiliary_weight = lam, weight
        opt = torch.optim.Adamax(run.parameters(), lr=args.lr)
        opt.load_state_dict(optimizer.state_dict())
        name = "auxiliary term on, λ = 2" if weight else "auxiliary term dropped, λ = 1 (eq. 6)"
        print(f"{name}: {args.steps} more steps on the same batches")
        seconds = train(
            run, opt, train_x, args.steps, args.seed + 1, args.every, label, args.batch_size
        )
        results[label] = evaluate(run, test_x)
        print(f"  {seconds:.0f} s; held out: {results[label]}")
    print("\nheld-out images after the same budget, from the same start:")
    print("| run | KL (nats/image) | active units | -ELBO bits/dim | bpd/kl | bpd/recon |"
          " VAE bound of y |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| auxiliary term {label} | {r['kl_nats']:.2f} | {r['active_units']} |"
              f" {r['bpd']:.3f} | {r['bpd/kl']:.4f} | {r['bpd/recon']:.3f} |"
              f" {r['bpd_vae']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main(parse_args())
