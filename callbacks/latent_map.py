"""PixelVAE Fig. 5 (§4.1.3): where the test set lies in latent space, by digit class."""

from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from .run_dir import run_dir

CHUNK = 1024  # query rows per distance block: 1024 x 10000 floats at a time


def knn_error(points: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Leave-one-out k-nearest-neighbour classification error of ``labels`` from ``points``
    (N, D): each point is classified by the majority label of its k nearest other points
    (Euclidean; ties go to the smaller label)."""
    n_classes = int(labels.max()) + 1
    wrong = 0
    for start in range(0, len(points), CHUNK):
        block = torch.cdist(points[start : start + CHUNK], points)
        rows = torch.arange(len(block))
        block[rows, rows + start] = float("inf")  # not its own neighbour
        nearest = block.topk(k, largest=False).indices
        votes = torch.zeros(len(block), n_classes).scatter_add_(
            1, labels[nearest], torch.ones(nearest.shape)
        )
        wrong += int((votes.argmax(1) != labels[start : start + CHUNK]).sum())
    return wrong / len(points)


class LatentMap(L.Callback):
    """After testing a model with a vector latent on data with class labels (the datamodule's
    ``labels["test"]``, e.g. dynamically binarized MNIST from ``mnist.npz``): logs
    ``test/knn_error/<level>``, the leave-one-out k-NN classification error of the digit
    class from the posterior means E_q[z|x] (PixelVAE §4.1.3 quantifies Fig. 5 with a k-NN
    classifier), and, for a 2-D latent, draws the test set's posterior means coloured by
    class to ``samples/latent_<level>_test.png`` (Fig. 5). The means of every DDP rank are
    gathered, so the error is that of the whole test set. Data without labels: nothing.

    Args:
        k: neighbours of the classifier.
    """

    def __init__(self, k: int = 5) -> None:
        self.k = k
        self.means: dict[str, list[torch.Tensor]] = {}
        self.index: list[torch.Tensor] = []

    def _labels(self, trainer: L.Trainer, pl_module: L.LightningModule) -> np.ndarray | None:
        labels = getattr(trainer.datamodule, "labels", {}).get("test")
        vectors = [s for s in getattr(pl_module, "latent_shapes", {}).values() if len(s) == 1]
        return labels if vectors else None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.means, self.index = {}, []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._labels(trainer, pl_module) is None:
            return
        x, index = batch
        with torch.no_grad():
            for level, mean in pl_module.posterior_mean(x).items():
                if mean.dim() == 2:
                    self.means.setdefault(level, []).append(mean.float().cpu())
        self.index.append(index.cpu())

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        labels = self._labels(trainer, pl_module)
        if labels is None or not self.index:
            return
        index, means = gathered(
            torch.cat(self.index), {k: torch.cat(v) for k, v in self.means.items()}
        )
        classes = torch.as_tensor(labels[index.numpy()], dtype=torch.long)
        out = run_dir(trainer) / "samples"
        for level, points in means.items():
            error = knn_error(points, classes, self.k)
            pl_module.log(f"test/knn_error/{level}", error)
            if points.shape[1] == 2 and trainer.is_global_zero:
                scatter(points.numpy(), classes.numpy(), out / f"latent_{level}_test.png", error)


def gathered(index: torch.Tensor, means: dict[str, torch.Tensor]):
    """Every rank's examples, one copy each (UnrepeatedDistributedSampler), sorted by index."""
    if dist.is_available() and dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (index, means))
        index = torch.cat([p[0] for p in parts])
        means = {k: torch.cat([p[1][k] for p in parts]) for k in means}
    order = index.argsort()
    return index[order], {k: v[order] for k, v in means.items()}


def scatter(points: np.ndarray, classes: np.ndarray, path: Path, error: float) -> Path:
    """The 2-D posterior means as dots coloured by class, with a legend (matplotlib)."""
    from arvae.plots import plt

    fig, ax = plt.subplots(figsize=(5.5, 5), layout="constrained")
    for c in np.unique(classes):
        at = classes == c
        ax.scatter(points[at, 0], points[at, 1], s=3, alpha=0.6, label=str(c), color=f"C{c}")
    ax.legend(markerscale=4, title="digit", loc="best", fontsize=8)
    ax.set(xlabel="E_q[z_1|x]", ylabel="E_q[z_2|x]")
    ax.set_title(f"test set in latent space (k-NN error {error:.3f})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
