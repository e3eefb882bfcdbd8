"""Model options of checkpoints written before the pixel-decoder option (main up to 82b1a17).

Then each model named its PixelCNN's options its own way (``kind`` / ``pixelcnn``,
``kernel`` / ``pixel_kernel``, ``n_layers`` / ``n_pixelcnn_layers`` / ``n_masked``, VLAE's
``decoder`` switch, PixelCNN++'s ``nr_filters``); now every model has one ``pixelcnn``
option, a network by class_path. :func:`upgrade` rewrites the old options of a saved model
into the new ones, so ``arvae test --ckpt_path OLD.ckpt`` reads such a checkpoint (the
weights kept their names).
"""

LAST_COMMIT = "82b1a17"  # the last commit whose models take the old options
BACKBONE = "lightning_modules.backbone."


def network(name: str, **init_args) -> dict:
    return {"class_path": BACKBONE + name, "init_args": init_args}


def masked(kind: str, n_layers: int, channels: int, first_kernel: int, kernel: int) -> dict:
    """The gated or plain masked network the old options named (no network for 0 layers)."""
    name = "PlainPixelCNN" if kind == "plain" else "GatedPixelCNN"
    options = dict(n_layers=n_layers, channels=channels, first_kernel=first_kernel, kernel=kernel)
    return network(name, **options) if n_layers else None


def upgrade(class_path: str, init_args: dict) -> dict:
    """The init_args of ``class_path`` in today's option names (unchanged if already so)."""
    a = dict(init_args)
    model = class_path.rsplit(".", 1)[-1]
    if model == "PixelCNN" and "kind" in a:
        a["pixelcnn"] = masked(
            a.pop("kind"),
            a.pop("n_layers", 12),
            a.pop("channels", 32),
            a.pop("first_kernel", 7),
            a.pop("kernel", 5),
        )
    elif model == "PixelVAE" and "n_pixelcnn_layers" in a:
        a["pixelcnn"] = masked(
            a.pop("pixelcnn", "gated"),
            a.pop("n_pixelcnn_layers"),
            a.pop("pixelcnn_channels", 32),
            a.pop("first_kernel", 7),
            a.pop("kernel", 5),
        )
    elif model == "HierarchicalPixelVAE" and "n_pixelcnn_layers" in a:
        a["pixelcnn"] = masked(
            "gated",
            a.pop("n_pixelcnn_layers"),
            a.pop("pixelcnn_channels", 384),
            a.pop("pixel_first_kernel", 3),
            a.pop("pixel_kernel", 3),
        )
    elif model == "VLAE" and "decoder" in a:
        decoder = a.pop("decoder")
        net = network(
            "LocalPixelCNN",
            channels=a.pop("pixelcnn_channels", 12),
            n_layers=a.pop("n_masked", 6),
            n_1x1_blocks=a.pop("n_1x1_blocks", 4),
            tie_weights=a.pop("tie_weights", True),
        )
        a["pixelcnn"] = None if decoder == "factorized" else net
        a["latent"] = decoder != "unconditional"
    elif model == "PixelCNNpp" and "nr_filters" in a:
        a["pixelcnn"] = network(
            "PixelCNNppNet",
            nr_resnet=a.pop("nr_resnet", 5),
            channels=a.pop("nr_filters"),
            dropout=a.pop("dropout", 0.5),
        )
        n_mix = a.pop("nr_logistic_mix", 10)
        if a.get("likelihood") is None:
            a["likelihood"] = {
                "class_path": "lightning_modules.likelihoods.DiscretizedLogisticMixture",
                "init_args": {"n_mix": n_mix},
            }
    return a
