"""One benchmark table: per model config, training images/s (fp32, bf16-mixed), sampling
seconds per image (cached, uncached, the peers'), importance-weighted test images/s and peak
memory, with the machine it ran on.

Each config is a model as ``arvae fit -c ...`` builds it from the experiment YAML files (fresh
weights: speed does not depend on them), on synthetic data of its shape and kind (binary or
8-bit levels; speed does not depend on the values either), at the config's batch size
(``--batch`` overrides it). Each config runs in a process of its own, so its peak memory is
its own: the peak resident set of that process on a CPU, ``torch.cuda.max_memory_allocated``
on a GPU.

- **train images/s**: after ``--warmup-steps`` untimed steps, steps for ``--train-seconds``
  per precision, in ``--rounds`` rounds interleaved with the peer's where one is given (so
  both see the same machine load); the median round. One step is what ``training_step``
  runs (:meth:`ImageModel.training_loss`, with ``compile_training`` when ``--compile``
  sets it), its backward and the config's optimizer: no Lightning loop, no logging, the
  same step the peer's loop runs. bf16 is autocast as Lightning's ``bf16-mixed``. With
  ``--fit-steps N`` also N steps through ``Trainer.fit`` as ``arvae fit`` runs them
  (Lightning's loop, the stability guard), the device synchronized only at their two ends:
  the cost of the loop beside the bare step.
  FLOPs per image are counted once (``torch.utils.flop_counter``, forward + backward), so
  the table shows the achieved TFLOP/s, and the MFU where the peak is known (GPUs listed in
  ``PEAK_BF16_TFLOPS``, or ``--peak-tflops``).
- **sample s/image**: ``model.sample(n, noise)`` for ``--sample-batch`` images, cached
  (the default sampler) and, with ``--uncached``, inside ``reference_sampling()`` (minutes
  per batch on a CPU), from the same noise: the 'same draws' column says whether both gave
  identical images.
- **IWAE images/s**: latent models' ``log_likelihood_bound(x, k)`` with ``--iwae-k`` (100)
  samples on ``--iwae-images`` (8) images, the pass size tuned (``iwae_batch: null``) on a
  first call, then timed on a second.
- **peers** (checkouts outside this repository, their path given; nothing of them is copied
  here): ``--pytorch-generative PATH`` trains and samples EugenHotaj/pytorch-generative's
  ``GatedPixelCNN`` beside any config whose network is a ``GatedPixelCNN`` without latents
  (same layers and width, 1 channel in and out); ``--pixel-cnn-pp PATH`` trains
  pclucas14/pixel-cnn-pp beside PixelCNN++ configs on 3x32x32 (same blocks, filters,
  logistics, dropout) and predicts its sampler's time (one whole-canvas forward and draw
  per pixel, every one the same cost: H x W x one timed step).

Configs are named (``CONFIGS``: the default three ran in 190 s on 2 cores; the others
take longer and are opt-in) or given as YAML files joined by '+':

    python benchmarks/table.py
    python benchmarks/table.py gated_pixelcnn --uncached --pytorch-generative ~/pg
    python benchmarks/table.py pixelcnnpp --batch 16 --pixel-cnn-pp /tmp/pixel-cnn-pp
    python benchmarks/table.py vlae --set model.init_args.latent_dim=32
    python benchmarks/table.py a.yaml+b.yaml  # fit -c a.yaml -c b.yaml
    python benchmarks/table.py --device cuda --compile reduce-overhead --json out.json
"""

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from cpu_bench import environment, interleaved, quiet_lightning, sync
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments"
MNIST = [EXP / "pixelvae/_mnist_common.yaml"]
NATURAL = [EXP / "pixelvae/_natural_common.yaml", EXP / "pixelvae/_hierarchical_32px.yaml"]
CONFIGS: dict[str, list[Path]] = {  # name -> the YAML files, in the README's `arvae fit -c` order
    "gated_pixelcnn": MNIST + [EXP / "pixelvae/gated_pixelcnn.yaml"],
    "gated_pixelvae": MNIST + [EXP / "pixelvae/gated_pixelvae.yaml"],
    "vlae": [EXP / "vlae/_common.yaml", EXP / "vlae/mnist_static.yaml"],
    # slow on a CPU: opt-in
    "pixelcnnpp": [EXP / "pixelcnnpp/cifar10.yaml"],
    "hierarchical_cifar10": NATURAL + [EXP / "pixelvae/cifar10_hierarchical.yaml"],
    "grayscale_cifar10": [EXP / "auxiliary/grayscale_cifar10.yaml"],
    "agave_cifar10": [EXP / "agave/_cifar10.yaml", EXP / "agave/cifar10_lambda12.yaml"],
}
DEFAULT = ["gated_pixelcnn", "gated_pixelvae", "vlae"]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}  # dense


def config_files(spec: str) -> list[Path]:
    """A named config's YAML files, or the files of 'a.yaml+b.yaml'."""
    return CONFIGS.get(spec) or [Path(f) for f in spec.split("+")]


# --------------------------------------------------------------------------- the machine
def machine(device: str) -> dict:
    env = environment()
    env["device"] = device
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_bf16"] = torch.cuda.is_bf16_supported()
    return env


def describe_machine(env: dict) -> str:
    native = env["avx512_bf16"] or env["amx_bf16"]
    load = ", ".join(f"{x:.2f}" for x in env["load_average_at_start"])
    lines = [
        f"python {env['python']}  torch {env['torch']}  lightning {env['lightning']}",
        f"CPU: {env['cpu']}, {env['cores_available']} cores available, torch threads "
        f"{env['torch_threads']}; bf16 on this CPU: "
        + ("native (avx512_bf16/amx)" if native else "emulated (no avx512_bf16, no amx)"),
        f"load average at start (1/5/15 min): {load}  (other processes skew timings)",
    ]
    if env["device"] == "cuda":
        lines.append(f"GPU: {env['gpu']}, {env['gpu_memory_gib']} GiB, bf16 {env['gpu_bf16']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- one config
def build(files: list[Path], batch: int | None, compile_mode: str | None, overrides: list[str]):
    """The model and the batch size of ``arvae fit -c f1 -c f2 ... --key value ...`` (nothing
    trained or read: the data module is only built, which gives the data's shape and kind)."""
    from arvae.cli import ArvaeCLI, ArvaeParser, quiet_lightning
    from datamodules import ImageDataModule
    from lightning_modules import ImageModel

    quiet_lightning()
    args = [a for f in files for a in ("-c", str(f))]
    args += ["--trainer.logger", "false", "--trainer.callbacks", "[]"]
    if batch is not None:
        args += ["--data.init_args.batch_size", str(batch)]
    if compile_mode is not None:
        args += ["--model.init_args.compile_training", compile_mode]
    for item in overrides:
        key, _, value = item.partition("=")
        args += [f"--{key}", value]
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.chdir(tmp)  # whatever the Trainer's construction writes goes here
        args += ["--data.init_args.root", tmp]  # not read; some data modules require one
        try:
            cli = ArvaeCLI(
                ImageModel,
                ImageDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                run=False,
                parser_class=ArvaeParser,
                args=args,
            )
        finally:
            os.chdir(cwd)
    return cli.model, cli.datamodule.batch_size


def synthetic(model, n: int, device: str) -> torch.Tensor:
    """n images of the model's shape and kind: bits, or levels 0..255 as floats."""
    shape = (n, *model.image_shape)
    g = torch.Generator().manual_seed(0)
    if model.data_kind == "binary":
        return torch.bernoulli(torch.full(shape, 0.5), generator=g).to(device)
    return torch.randint(0, 256, shape, generator=g).float().to(device)


def the_optimizer(model) -> torch.optim.Optimizer:
    opt = model.configure_optimizers()
    return opt["optimizer"] if isinstance(opt, dict) else opt


def arvae_step(model, opt, x: torch.Tensor, bf16: bool) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            loss, _ = model.training_loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


class FitClock(L.Callback):
    """Times ``Trainer.fit``'s steps after ``warmup`` of them, the device synchronized only
    at the two ends (a step that needs no host sync is timed as it runs in training)."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device = warmup, device
        self.start = self.end = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        sync(self.device)
        self.end = time.perf_counter()


def fit_steps_per_s(model, x: torch.Tensor, precision: str, steps: int, warmup: int) -> float:
    """Steps/s of the training step as ``arvae fit`` runs it: ``Trainer.fit`` on batch ``x``
    over and over (Lightning's loop and hooks, the stability guard, logging into no logger,
    no progress bar or checkpoints); the model ends on x's device, as it began."""
    device, warmup = x.device.type, max(warmup, 1)  # the clock starts after a step
    clock = FitClock(warmup, device)
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else device, devices=1, precision=precision,
        max_steps=warmup + steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[clock],
    )  # fmt: skip
    batch = (x, torch.arange(len(x), device=x.device))
    loader = torch.utils.data.DataLoader([batch] * (warmup + steps), batch_size=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`")
        trainer.fit(model, train_dataloaders=loader)
    model.to(x.device)  # Lightning's teardown moves it to the CPU
    return steps / (clock.end - clock.start)


def flops_per_step(step: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def timed(fn: Callable[[], torch.Tensor], device: str) -> tuple[float, torch.Tensor]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def network_options(model) -> tuple[str, dict]:
    """The class name of the model's ``pixelcnn`` network and every option it was built with
    (the config's, then the constructor's defaults)."""
    import importlib
    import inspect

    cfg = model.hparams.get("pixelcnn")
    if not isinstance(cfg, dict) or "class_path" not in cfg:
        return "", {}
    module, _, name = cfg["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    options = {
        k: p.default
        for k, p in inspect.signature(cls).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return name, options | cfg.get("init_args", {})


def gated_peer_match(model) -> dict | None:
    """pytorch-generative's size for a latent-free one-channel gated PixelCNN, else None."""
    name, o = network_options(model)
    if model.latent_shapes or name != "GatedPixelCNN" or model.image_shape[0] != 1:
        return None
    return {"n_layers": o["n_layers"], "channels": o["channels"]}


def pixelcnnpp_peer_match(model) -> dict | None:
    """pixel-cnn-pp's size for a latent-free PixelCNN++ on 3x32x32, else None."""
    name, o = network_options(model)
    if model.latent_shapes or name != "PixelCNNppNet" or model.image_shape != (3, 32, 32):
        return None
    return {
        "nr_resnet": o["nr_resnet"],
        "nr_filters": o["channels"],
        "nr_mix": model.likelihood.n_mix,
        "dropout": o["dropout"],
    }


def pytorch_generative_rows(path: Path, match: dict, x: torch.Tensor, args) -> tuple:
    """The peer's training step and its sampler, at the matched size."""
    import torch.nn.functional as F
    from sampling_speed import load_peer

    module, how = load_peer(path)
    torch.manual_seed(0)
    peer = module.GatedPixelCNN(
        in_channels=1,
        out_channels=1,
        n_gated=match["n_layers"] - 1,
        gated_channels=match["channels"],
        head_channels=match["channels"],
    ).to(x.device)
    opt = torch.optim.Adam(peer.parameters(), lr=1e-3)

    def step(bf16: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
                logits = peer(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), x, reduction="sum")
            opt.zero_grad(set_to_none=True)
            (loss / len(x)).backward()
            opt.step()

        return run

    def sample() -> float:  # seconds per batch, after one untimed call (as pixel-cnn-pp's)
        with torch.no_grad():
            one = lambda: peer.sample(n_samples=args.sample_batch)  # noqa: E731
            one()
            return timed(one, x.device.type)[0]

    params = sum(p.numel() for p in peer.parameters())
    name = f"pytorch-generative GatedPixelCNN {match['n_layers']} x {match['channels']} (3x3)"
    return name, params, step, sample, f"imported: {how}"


def pixel_cnn_pp_rows(path: Path, match: dict, x: torch.Tensor, args) -> tuple:
    import pixelcnnpp_peer as pp

    peer = pp.load_peer(path)
    torch.manual_seed(0)
    net = pp.build_peer(peer, argparse.Namespace(**match)).to(x.device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    data = pp.peer_input(x)

    def step(bf16: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16), pp.peer_on_cpu():
                loss = peer.loss(data, pp.peer_forward(net, data))
            opt.zero_grad(set_to_none=True)
            (loss / len(x)).backward()
            opt.step()

        return run

    canvas = torch.zeros(args.sample_batch, *x.shape[1:], device=x.device)

    def sample() -> float:  # predicted seconds per batch: H x W x one whole-canvas step
        net.eval()
        with torch.no_grad(), pp.peer_on_cpu():
            if net.init_padding is not None and net.init_padding.shape[0] != len(canvas):
                net.init_padding = None
            one = lambda: peer.sample(net(canvas, sample=True), match["nr_mix"])  # noqa: E731
            one()
            seconds, _ = timed(one, x.device.type)
        net.train()
        return seconds * canvas.shape[2] * canvas.shape[3]

    params = sum(p.numel() for p in net.parameters())
    name = f"pixel-cnn-pp {match['nr_resnet']} blocks x {match['nr_filters']} filters"
    return name, params, step, sample, f"commit {peer.commit}"


def run_config(spec: str, args) -> dict:
    """Every measurement of one config (run in its own process: see :func:`main`)."""
    from lightning_modules.backbone import reference_sampling

    torch.manual_seed(0)
    device = args.device
    model, batch = build(config_files(spec), args.batch, args.compile, args.set)
    model = model.to(device)
    x = synthetic(model, batch, device)
    model.initialize_from(x)
    model.train()
    opt = the_optimizer(model)
    row = {
        "config": spec,
        "impl": f"arvae {type(model).__name__}",
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "compile": args.compile,
    }
    rows = [row]
    peers = []
    gp, pp = gated_peer_match(model), pixelcnnpp_peer_match(model)
    if args.pytorch_generative and gp:
        peers.append(pytorch_generative_rows(args.pytorch_generative, gp, x, args))
    if args.pixel_cnn_pp and pp:
        peers.append(pixel_cnn_pp_rows(args.pixel_cnn_pp, pp, x, args))
    for name, params, _, _, note in peers:
        rows.append({"config": spec, "impl": name, "params": params, "batch": batch, "note": note})

    row["flops_per_image"] = flops_per_step(arvae_step(model, opt, x, False)) / batch
    opt.zero_grad(set_to_none=True)
    for precision in args.precisions:
        bf16 = precision == "bf16-mixed"
        steps = {"arvae": arvae_step(model, opt, x, bf16)}
        for name, _, peer_step, _, _ in peers:
            steps[name] = peer_step(bf16)
        rates = interleaved(steps, args.train_seconds, args.rounds, args.warmup_steps, device)
        for r, rate in zip(rows, rates.values(), strict=True):
            r[f"train_img_s/{precision}"] = rate["steps_per_s"] * batch
            r[f"train_steps/{precision}"] = rate["steps"]
        speeds = ", ".join(f"{n} {v['steps_per_s'] * batch:.4g} img/s" for n, v in rates.items())
        print(f"  {spec} train {precision}: {speeds}", flush=True)

    model.eval()
    n = args.sample_batch
    noise = model.sample_noise(n, torch.Generator().manual_seed(0))
    noise = {k: v.to(device) for k, v in noise.items()}
    with torch.no_grad():
        model.sample(1, {k: v[:1] for k, v in noise.items()})  # warm-up
        seconds, cached = timed(lambda: model.sample(n, noise), device)
        row["sample_s_per_image/cached"] = seconds / n
        print(f"  {spec} sample cached: {seconds / n:.3f} s/image", flush=True)
        if args.uncached:
            with reference_sampling():
                seconds, reference = timed(lambda: model.sample(n, noise), device)
            row["sample_s_per_image/uncached"] = seconds / n
            row["same_draws"] = bool(torch.equal(cached, reference))
            print(f"  {spec} sample uncached: {seconds / n:.3f} s/image", flush=True)
    for r, (_, _, _, peer_sample, _) in zip(rows[1:], peers, strict=True):
        if args.peer_sampling:
            seconds = peer_sample()
            r["sample_s_per_image/peer"] = seconds / n
            print(f"  {r['impl']} sample: {seconds / n:.3f} s/image", flush=True)

    if model.latent_shapes and args.iwae_k:
        model.iwae_batch = None
        xi = x[: args.iwae_images]
        index = torch.arange(len(xi))
        with model.per_example_noise(index):
            model.log_likelihood_bound(xi, args.iwae_k)  # tunes the pass size
            seconds, _ = timed(lambda: model.log_likelihood_bound(xi, args.iwae_k), device)
        row["iwae_img_s"] = len(xi) / seconds
        row["iwae_k"] = args.iwae_k
        row["iwae_samples_per_pass"] = model.iwae_samples_per_pass(len(xi))
        print(f"  {spec} IWAE k={args.iwae_k}: {len(xi) / seconds:.3f} img/s", flush=True)
    row["peak_memory_mib"] = peak_memory_mib(device)
    if args.fit_steps:
        model.train()
        for precision in args.precisions:
            rate = fit_steps_per_s(model, x, precision, args.fit_steps, args.warmup_steps)
            row[f"fit_img_s/{precision}"] = rate * batch
            print(f"  {spec} train {precision} through Trainer.fit: {rate * batch:.4g} img/s")
    return {"rows": rows}


# --------------------------------------------------------------------------- the table
def cell(value, fmt: str = "{:.3g}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def markdown(rows: list[dict], precisions: list[str], peak_tflops: float | None) -> str:
    head = ["config", "impl", "params", "batch"]
    head += [f"train img/s {p}" for p in precisions] + ["TFLOP/s (best)", "MFU"]
    head += ["sample s/img cached", "uncached", "same draws", "peer's", "IWAE img/s (k)"]
    head += ["peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rates = [r.get(f"train_img_s/{p}") for p in precisions]
        best = max((v for v in rates if v), default=None)
        flops = r.get("flops_per_image")
        tflops = best * flops / 1e12 if best and flops else None
        mfu = tflops / peak_tflops if tflops and peak_tflops else None
        iwae = r.get("iwae_img_s")
        cells = [r["config"], r["impl"], f"{r['params'] / 1e6:.2f}M", str(r["batch"])]
        cells += [cell(v, "{:.4g}") for v in rates]
        cells += [cell(tflops, "{:.4f}"), cell(mfu, "{:.1%}")]
        cells += [
            cell(r.get("sample_s_per_image/cached"), "{:.4f}"),
            cell(r.get("sample_s_per_image/uncached"), "{:.3f}"),
            {True: "yes", False: "NO"}.get(r.get("same_draws"), "-"),
            cell(r.get("sample_s_per_image/peer"), "{:.3f}"),
            f"{iwae:.3f} ({r['iwae_k']})" if iwae else "-",
            cell(r.get("peak_memory_mib"), "{:.0f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict], precisions: list[str]) -> list[str]:
    out = []
    for r in rows:
        if not r["impl"].startswith("arvae"):
            continue
        rates = {p: r.get(f"train_img_s/{p}") for p in precisions}
        if all(rates.get(p) for p in ("32-true", "bf16-mixed")):
            out.append(f"{r['config']}: bf16-mixed / 32-true training = "
                       f"{rates['bf16-mixed'] / rates['32-true']:.2f}x")  # fmt: skip
        for p in precisions:
            if rates.get(p) and r.get(f"fit_img_s/{p}"):
                out.append(f"{r['config']}: Trainer.fit / the bare training step ({p}) = "
                           f"{r[f'fit_img_s/{p}'] / rates[p]:.2f}x")  # fmt: skip
        if r.get("sample_s_per_image/uncached"):
            speedup = r["sample_s_per_image/uncached"] / r["sample_s_per_image/cached"]
            out.append(f"{r['config']}: cached sampling {speedup:.1f}x faster than uncached")
        for peer in rows:
            if peer["config"] != r["config"] or peer is r:
                continue
            for p in precisions:
                if r.get(f"train_img_s/{p}") and peer.get(f"train_img_s/{p}"):
                    out.append(
                        f"{r['config']}: arvae / {peer['impl']} training ({p}) = "
                        f"{r[f'train_img_s/{p}'] / peer[f'train_img_s/{p}']:.2f}x"
                    )
            if peer.get("sample_s_per_image/peer"):
                out.append(
                    f"{r['config']}: {peer['impl']} sampling takes "
                    f"{peer['sample_s_per_image/peer'] / r['sample_s_per_image/cached']:.1f}x"
                    " as long as arvae's cached sampler"
                )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="*", default=DEFAULT,
                   help=f"names ({', '.join(CONFIGS)}) or YAML files joined by '+'")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, help="override the configs' batch size")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config option for every config, as arvae fit's --KEY VALUE, e.g. "
                   "model.init_args.pixelcnn.init_args.kernel=3")  # fmt: skip
    p.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"],
                   choices=["32-true", "bf16-mixed"])  # fmt: skip
    p.add_argument("--train-seconds", type=float, default=20.0, help="per precision")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--fit-steps", type=int, default=0,
                   help="also time this many training steps through Trainer.fit (the guard, "
                   "Lightning's loop) after the warm-up ones")  # fmt: skip
    p.add_argument("--compile", help="compile_training mode (true, default, reduce-overhead)")
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--uncached", action="store_true", help="time uncached sampling (slow)")
    p.add_argument("--iwae-k", type=int, default=100, help="0: no IWAE timing")
    p.add_argument("--iwae-images", type=int, default=8)
    p.add_argument("--pytorch-generative", type=Path, metavar="PATH")
    p.add_argument("--pixel-cnn-pp", type=Path, metavar="PATH")
    p.add_argument("--no-peer-sampling", dest="peer_sampling", action="store_false",
                   help="train the peers but do not time their samplers")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak for the MFU column")
    p.add_argument("--json", type=Path, help="write the machine and the rows here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one config, in a child process
    args = p.parse_args(argv)
    for spec in args.configs:
        missing = [str(f) for f in config_files(spec) if not f.is_file()]
        if missing:
            p.error(f"config {spec!r}: no such file {missing} (names: {', '.join(CONFIGS)})")
    for opt in ("pytorch_generative", "pixel_cnn_pp"):
        path = getattr(args, opt)
        if path is not None:
            setattr(args, opt, path.expanduser().resolve())
            if not path.is_dir():
                p.error(f"--{opt.replace('_', '-')} {path}: not a directory (a peer checkout)")
    return args


def peak_of(device: str, env: dict, given: float | None) -> float | None:
    if given:
        return given
    if device == "cuda":
        return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in env["gpu"]), None)
    return None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.worker:
        quiet_lightning()
        out = run_config(args.worker, args)
        Path(args.json).write_text(json.dumps(out))
        return
    print("command: python benchmarks/table.py " + shlex.join(argv))
    env = machine(args.device)
    print(describe_machine(env), flush=True)
    started = time.perf_counter()
    rows: list[dict] = []
    base = [a for a in argv if a not in args.configs]
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.configs):
            print(f"\n== {spec}", flush=True)
            out = Path(tmp) / f"{i}.json"
            cmd = [sys.executable, __file__, *base, "--worker", spec, "--json", str(out)]
            done = subprocess.run(cmd, cwd=ROOT)
            if done.returncode != 0:
                print(f"  {spec}: FAILED (exit {done.returncode}); the table goes on without it")
                continue
            rows += json.loads(out.read_text())["rows"]
    peak = peak_of(args.device, env, args.peak_tflops)
    print(f"\n{markdown(rows, args.precisions, peak)}")
    memory = "max allocated" if args.device == "cuda" else "the peak RSS of its process"
    print(
        f"(train: median of {args.rounds} rounds of {args.train_seconds / args.rounds:g} s per"
        " precision; TFLOP/s = best training rate x counted FLOPs per image; MFU against "
        f"{f'{peak:g} TFLOP/s' if peak else 'no known peak'}; peak MiB: {memory})"
    )
    for line in ratios(rows, args.precisions):
        print(line)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"total {time.perf_counter() - started:.0f} s; load average at end: {load}")
    if args.json:
        args.json.write_text(json.dumps({"machine": env, "args": argv, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
