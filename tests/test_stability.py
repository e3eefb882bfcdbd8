"""The stability guard: a non-finite loss or gradient skips the step (counted, logged);
too many in a row stop the run with a clear error and a checkpoint of the last good weights."""

import csv
import math
import os
import pickle
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from decoders import gated
from test_cli import DDP_TIMEOUT, QUIET, TINY_DATA, TINY_MODEL, arvae
from tiny_data import TinyBinary

from lightning_modules import PixelCNN
from lightning_modules.step_guard import StepGuard

CXX = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++"))
# the GPU cases run where CUDA is (benchmarks/gpu.sh runs this file there)
CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
)


class Flaky(PixelCNN):
    """A tiny PixelCNN whose loss is NaN on the training batches listed in ``bad``."""

    def __init__(self, bad: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(pixelcnn=gated(n_layers=1, channels=4), lr=0.01, **kwargs)
        self.bad = set(bad)
        self.seen: list[dict[str, torch.Tensor]] = []

    def elbo_terms(self, x):
        terms = super().elbo_terms(x)
        if self.training and self.trainer.fit_loop.total_batch_idx in self.bad:
            terms["recon"] = terms["recon"] * math.nan
        return terms

    def on_train_batch_start(self, batch, batch_idx):
        self.seen.append({k: v.clone() for k, v in self.state_dict().items()})


HEAD = "net.head.out.weight"  # a weight that every update changes


def logged_grad_norms(t: L.Trainer) -> list[float]:
    """``train/grad_norm`` of every step the trainer logged (not finite on a skipped one)."""
    with open(Path(t.logger.log_dir) / "metrics.csv", newline="") as f:
        return [float(r["train/grad_norm"]) for r in csv.DictReader(f) if r["train/grad_norm"]]


def trainer(tmp_path, steps: int, **options) -> L.Trainer:
    return L.Trainer(
        **options,
        max_steps=steps,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def test_a_nonfinite_step_is_skipped_counted_and_training_goes_on(tmp_path):
    L.seed_everything(0)
    model = Flaky(bad=(2, 3))
    t = trainer(tmp_path, steps=6)
    t.fit(model, datamodule=TinyBinary(n_train=96, batch_size=16))
    # batches 2 and 3 changed nothing; the updates came from batches 0, 1, 4 and 5
    for before, after in ((2, 3), (3, 4)):
        assert all(torch.equal(model.seen[before][k], v) for k, v in model.seen[after].items())
    assert not torch.equal(model.seen[1][HEAD], model.seen[2][HEAD])
    # a skipped batch still counts as a step (as AMP's skipped steps do): max_steps and
    # schedules stay tied to batches seen
    assert t.global_step == 6 and model.skipped_steps == 2 and model.bad_steps == 0
    assert not torch.equal(model.seen[4][HEAD], model.seen[5][HEAD])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv", newline="") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    # a skipped step logs as skipped, with its own non-finite loss and gradient norm, not
    # with the last good step's
    for step in range(6):
        skipped = step in (2, 3)
        assert rows[step]["train/skipped"] == ("1.0" if skipped else "0.0"), step
        for key in ("train/loss", "train/nelbo", "train/recon", "train/grad_norm"):
            assert math.isfinite(float(rows[step][key])) != skipped, (step, key, rows[step][key])
    assert [rows[s]["train/skipped_steps"] for s in range(2, 6)] == ["1.0", "2.0", "2.0", "2.0"]


def test_too_many_nonfinite_steps_in_a_row_stop_with_a_checkpoint(tmp_path):
    L.seed_everything(0)
    model = Flaky(bad=(1, 2, 3), max_bad_steps=3)
    with pytest.raises(FloatingPointError, match="3 training steps in a row") as error:
        trainer(tmp_path, steps=10).fit(model, datamodule=TinyBinary(n_train=96, batch_size=16))
    assert "nonfinite-stop.ckpt" in str(error.value) and "lr" in str(error.value)
    (path,) = tmp_path.rglob("nonfinite-stop.ckpt")
    state = torch.load(path, weights_only=False)["state_dict"]
    for k, v in model.seen[1].items():  # the weights after the last good step (batch 0)
        assert torch.equal(state[k], v), k


def test_accumulated_micro_batches_step_as_one_batch_and_a_nan_in_any_skips_the_step(tmp_path):
    """accumulate_grad_batches=2 over batches of 8 takes the steps of batches of 16: the same
    gradient norm and the same first update. A NaN in either micro-batch of a step (the
    first: its gradient is accumulated; the last: its loss is the one the step sees) skips
    the whole step."""
    runs = {}
    for name, batch, accumulate in (("whole", 16, 1), ("accumulated", 8, 2)):
        L.seed_everything(0)
        model = Flaky()
        t = trainer(tmp_path / name, steps=2, accumulate_grad_batches=accumulate)
        t.fit(model, datamodule=TinyBinary(n_train=96, batch_size=batch))
        runs[name] = model.seen[::accumulate], logged_grad_norms(t)
    (whole, whole_norms), (accumulated, accumulated_norms) = runs.values()
    assert accumulated_norms[0] == pytest.approx(whole_norms[0], rel=1e-4)  # float32 sums
    assert accumulated_norms[1] == pytest.approx(whole_norms[1], rel=1e-3)
    for k, v in whole[1].items():  # the weights after the first step
        torch.testing.assert_close(accumulated[1][k], v, rtol=1e-4, atol=1e-5)
    for bad in (2, 3):  # micro-batches 2 and 3 make step 1
        L.seed_everything(0)
        model = Flaky(bad=(bad,))
        t = trainer(tmp_path / f"bad{bad}", steps=3, accumulate_grad_batches=2)
        t.fit(model, datamodule=TinyBinary(n_train=96, batch_size=8))
        assert t.global_step == 3 and model.skipped_steps == 1, bad
        assert all(torch.equal(model.seen[2][k], v) for k, v in model.seen[4].items()), bad
        assert not torch.equal(model.seen[0][HEAD], model.seen[2][HEAD])


class Clipped(Flaky):
    """Flaky, recording the global gradient norm that Lightning's clipping leaves."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clipped: list[float] = []

    def configure_gradient_clipping(self, optimizer, **clip) -> None:
        super().configure_gradient_clipping(optimizer, **clip)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.clipped.append(float(torch.nn.utils.get_total_norm(grads)))


def test_gradient_clipping_applies_to_the_update_and_a_nonfinite_step_is_still_skipped(tmp_path):
    """`--trainer.gradient_clip_val` (what the non-finite stop's message suggests) clips the
    gradient the update uses; `train/grad_norm` logs the norm before clipping."""
    L.seed_everything(0)
    model = Clipped(bad=(1,))
    t = trainer(tmp_path, steps=3, gradient_clip_val=1.0)
    t.fit(model, datamodule=TinyBinary(n_train=96, batch_size=16))
    norms = logged_grad_norms(t)
    assert norms[0] > 10 and norms[2] > 10 and math.isnan(norms[1])
    assert model.clipped[0] == pytest.approx(1.0, rel=1e-3) == model.clipped[2]
    assert model.skipped_steps == 1
    assert all(torch.equal(model.seen[1][k], v) for k, v in model.seen[2].items())


def test_max_bad_steps_is_checked():
    with pytest.raises(ValueError, match="max_bad_steps"):
        PixelCNN(max_bad_steps=0)


def test_under_ddp_a_nan_on_one_rank_is_skipped_by_every_rank_then_too_many_stop_all(tmp_path):
    """Rank 1's batch holds a NaN at step 1, and at steps 3, 4, 5: the all-reduced gradient is
    non-finite on both ranks, so both skip step 1 (their weights stay equal, checked after
    every step) and training goes on; three in a row stop both ranks with the error and
    nonfinite-stop.ckpt holding the weights of the last good step."""
    result = arvae(
        "fit", *TINY_MODEL, *QUIET, *TINY_DATA,
        "--trainer.max_steps", "8",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "2",
        "--trainer.strategy", "ddp",
        "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.name", "nan",
        "--samples.every_n_epochs", "0",
        "--model.init_args.max_bad_steps", "3",
        "--trainer.callbacks+=tests.fault_injection.NaNBatchOnRank",
        "--trainer.callbacks.init_args.rank", "1",
        "--trainer.callbacks.init_args.steps", "[1, 3, 4, 5]",
        cwd=tmp_path, timeout=DDP_TIMEOUT,
    )  # fmt: skip
    assert result.returncode != 0
    assert "3 training steps in a row had a non-finite loss or gradient" in result.stderr
    assert "drifted" not in result.stderr
    run = tmp_path / "runs" / "nan" / "version_0"
    stop = torch.load(run / "checkpoints" / "nonfinite-stop.ckpt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in stop["state_dict"].values())
    with open(run / "metrics.csv", newline="") as f:
        skipped = {
            int(r["step"]): float(r["train/skipped_steps"])
            for r in csv.DictReader(f)
            if r.get("train/skipped_steps")
        }
    # both ranks skipped steps 1, 3, 4 and 5; the stop came in step 6, before its update
    assert [skipped[s] for s in range(6)] == [0.0, 1.0, 1.0, 2.0, 3.0, 4.0]
    assert 6 not in skipped


class FlakyLoss(Flaky):
    """Flaky's NaN put into the loss, after the (compiled) forward: the compiled graph reads
    nothing of the trainer, so it stays one graph."""

    def elbo_terms(self, x):
        return PixelCNN.elbo_terms(self, x)

    def loss(self, terms):  # by global step, which a resumed run continues
        loss = super().loss(terms)
        return loss * math.nan if self.trainer.global_step in self.bad else loss


@pytest.fixture
def deterministic_algorithms():
    """Lightning's ``deterministic=True`` turns them on for the whole process: put back."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.skipif(not CXX, reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_training_keeps_the_guard_and_resumes_exactly(tmp_path, deterministic_algorithms):
    """compile_training (the CUDA-graph mode, which on a CPU compiles as the default one): a
    NaN step is skipped as in eager training, and a run stopped mid-epoch and resumed from
    its checkpoint ends with the weights of the run that was never stopped (with
    deterministic algorithms, so that on a GPU as well)."""
    torch._dynamo.reset()

    def fit(ckpt: str | None = None) -> FlakyLoss:
        L.seed_everything(0)
        model = FlakyLoss(bad=(2,), compile_training="reduce-overhead")
        t = trainer(tmp_path, steps=8, deterministic=True)
        t.callbacks.append(  # the checkpoint that a mid-epoch stop would leave
            L.pytorch.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=4, save_top_k=-1)
        )
        t.fit(model, datamodule=TinyBinary(n_train=96, batch_size=16), ckpt_path=ckpt)
        return model

    from torch._dynamo.utils import counters

    counters.clear()
    whole = fit()  # 8 steps over 6-batch epochs; batch 2's NaN skipped
    assert counters["stats"]["unique_graphs"] >= 1 and not whole._compile_failed
    assert whole.skipped_steps == 1 and whole.trainer.global_step == 8
    assert all(torch.equal(whole.seen[2][k], v) for k, v in whole.seen[3].items())
    assert all(torch.isfinite(p).all() for p in whole.parameters())
    resumed = fit(str(tmp_path / "epoch=0-step=4.ckpt"))
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_a_compiler_failure_warns_once_and_trains_eagerly(monkeypatch):
    """Where torch.compile cannot run (no C++ compiler, no Triton), training goes on eagerly
    with one warning that says so; an error of the model itself is not swallowed."""
    import lightning_modules.base as base

    calls = []

    def broken(fn, mode):
        def run(*args):
            calls.append(mode)
            raise RuntimeError("InductorError: no working C++ compiler found")

        return run

    monkeypatch.setattr(base, "compiled", broken)
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.3))
    eager = Flaky().eval()  # eval: Flaky reads its trainer in training mode; there is none
    model = Flaky(compile_training=True).eval()
    model.load_state_dict(eager.state_dict())
    with pytest.warns(UserWarning, match="torch.compile failed.*no working C.. compiler.*eagerly"):
        loss, _ = model.training_loss(x)
    torch.testing.assert_close(loss, eager.training_loss(x)[0], rtol=0, atol=0)
    model.training_loss(x)  # no second attempt, no second warning
    assert calls == ["default"]

    def wrong(x):
        raise ValueError("the model's own error")

    model = Flaky(compile_training="max-autotune").eval()
    monkeypatch.setattr(model, "elbo_terms", wrong)
    with pytest.raises(ValueError, match="the model's own error"):
        model.training_loss(x)
    with pytest.raises(ValueError, match="compile_training must be"):
        Flaky(compile_training="fast")


def test_a_skipped_step_leaves_the_fused_adam_state_as_it_was(tmp_path):
    """The fused Adam skips a non-finite step on the device: its moments and step count
    after the skipped batch are those before it, not decayed ones."""

    class Snapshots(Flaky):
        def on_train_batch_start(self, batch, batch_idx):
            super().on_train_batch_start(batch, batch_idx)
            (opt,) = self.trainer.optimizers
            state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
            self.states.append(state)

    L.seed_everything(0)
    model = Snapshots(bad=(2,))
    model.states = []
    t = trainer(tmp_path, steps=4)
    t.fit(model, datamodule=TinyBinary(n_train=96, batch_size=16))
    (opt,) = t.optimizers
    assert opt.defaults["fused"] and not hasattr(opt, "found_inf")
    before, after = model.states[2], model.states[3]
    assert before.keys() == after.keys() and before
    for p, state in before.items():
        assert int(state["step"]) == 2 and int(after[p]["step"]) == 2
        for k, v in state.items():
            assert torch.equal(after[p][k], v), k
    assert not torch.equal(model.seen[3][HEAD], model.state_dict()[HEAD])  # batch 3 updated


def test_adamax_skips_a_nonfinite_step_too(tmp_path):
    L.seed_everything(0)
    model = Flaky(bad=(1,), optimizer="adamax")
    t = trainer(tmp_path, steps=3)
    t.fit(model, datamodule=TinyBinary(n_train=96, batch_size=16))
    assert isinstance(t.optimizers[0], torch.optim.Adamax) and model.skipped_steps == 1
    assert all(torch.equal(model.seen[1][k], v) for k, v in model.seen[2].items())
    assert not torch.equal(model.seen[2][HEAD], model.seen[0][HEAD])


def test_a_run_that_ends_in_too_many_nonfinite_steps_stops_with_the_error(tmp_path):
    """The guard reads its count a step late; the run's last steps are checked at its end."""
    L.seed_everything(0)
    model = Flaky(bad=(3, 4), max_bad_steps=2)
    with pytest.raises(FloatingPointError, match="2 training steps in a row.*the last at step 4"):
        trainer(tmp_path, steps=5).fit(model, datamodule=TinyBinary(n_train=96, batch_size=16))
    (path,) = tmp_path.rglob("nonfinite-stop.ckpt")
    state = torch.load(path, weights_only=False)["state_dict"]
    assert all(torch.equal(state[k], v) for k, v in model.seen[3].items())


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_fp16_amp_with_a_gradient_scaler_trains_and_skips_through_the_scaler(device, tmp_path):
    """Under 16-mixed on a GPU Lightning steps through a GradScaler (on a CPU too, here). The
    weights update (the scaler steps only when handed the closure's result); the logged
    gradient norm is the unscaled one; the overflows of its first steps, while it halves its
    scale from 2^16, are skipped but not counted towards the stop; a NaN loss is."""
    from lightning.pytorch.plugins import MixedPrecision

    def fit(scale: float | None, steps: int, **kwargs):
        L.seed_everything(0)
        model = Flaky(**kwargs)
        scaler = torch.amp.GradScaler(device, init_scale=scale) if scale else None
        plugins = [MixedPrecision("16-mixed", device, scaler=scaler)] if scaler else []
        t = trainer(tmp_path, steps, accelerator=device, plugins=plugins)
        t.fit(model, datamodule=TinyBinary(n_train=96, batch_size=16))
        return model, scaler, logged_grad_norms(t)

    model, scaler, norms = fit(2.0**7, steps=3)
    assert model.skipped_steps == 0 and scaler.get_scale() == 2.0**7
    assert not torch.equal(model.seen[0][HEAD], model.seen[1][HEAD])
    _, _, fp32_norms = fit(None, steps=1)
    assert norms[0] == pytest.approx(fp32_norms[0], rel=0.05)
    # from 2^16 the first steps overflow in a row, more than max_bad_steps of them
    model, scaler, norms = fit(2.0**16, steps=12, max_bad_steps=2)
    calibration = model.skipped_steps
    assert calibration > 2 and scaler.get_scale() == 2.0 ** (16 - calibration)
    assert not any(math.isfinite(n) for n in norms[:calibration]) and math.isfinite(norms[-1])
    assert not torch.equal(model.seen[-1][HEAD], model.state_dict()[HEAD])
    with pytest.raises(FloatingPointError, match="2 training steps in a row"):
        fit(2.0**7, steps=6, bad=(1, 2), max_bad_steps=2)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_the_step_guard_reports_each_recorded_step_one_step_late(device):
    """On a GPU the counters stay on the device and the host waits on each copy's event."""
    guard = StepGuard()
    assert guard.previous_run() == 0 and guard.skipped_steps == 0 and guard.last_bad_terms() == {}
    runs = []
    # a skip that is not bad (fp16 AMP finding its scale) ends a run of bad steps
    steps = [(False, False), (True, True), (True, True), (True, False), (True, True)]
    for step, (skipped, bad) in enumerate(steps):
        terms = {"recon": math.nan if bad else step, "kl/z": 1.0}
        terms = {k: torch.tensor(v, device=device) for k, v in terms.items()}
        flags = torch.tensor([skipped, bad], device=device)
        guard.record(flags[0], flags[1], terms, step)
        runs.append(guard.previous_run())
    assert runs == [0, 1, 2, 0, 1] and guard.last_bad_step == 4
    assert guard.skipped_steps == 4 and guard.bad_steps == 1
    terms = guard.last_bad_terms()
    assert math.isnan(terms["recon"]) and terms["kl/z"] == 1.0
    copy = pickle.loads(pickle.dumps(guard))
    assert copy.previous_run() == 0 and copy.skipped_steps == 4


def test_a_run_resumed_from_an_unfused_adam_checkpoint_skips_on_the_host(tmp_path):
    """A checkpoint of an earlier arvae (Adam unfused on a CPU) brings its optimizer groups,
    which say unfused: the resumed run's Adam steps unfused, so the guard decides the skip
    on the host instead of telling the kernel (which an unfused Adam refuses)."""
    L.seed_everything(0)
    t = trainer(tmp_path, steps=2)
    t.fit(Flaky(), datamodule=TinyBinary(n_train=96, batch_size=16))
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    for group in ckpt["optimizer_states"][0]["param_groups"]:
        group["fused"] = None
    torch.save(ckpt, tmp_path / "unfused.ckpt")
    model = Flaky(bad=(3,))
    t = trainer(tmp_path, steps=5)
    t.fit(
        model, datamodule=TinyBinary(n_train=96, batch_size=16), ckpt_path=tmp_path / "unfused.ckpt"
    )
    assert t.optimizers[0].param_groups[0]["fused"] is None and model.skipped_steps == 1
    assert all(torch.equal(model.seen[1][k], v) for k, v in model.seen[2].items())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_step_guard_keeps_counting_without_loss_terms():
    guard = StepGuard()
    guard.record(torch.tensor(True), torch.tensor(True), {}, 0)
    assert guard.previous_run() == 1 and guard.last_bad_terms() == {}
