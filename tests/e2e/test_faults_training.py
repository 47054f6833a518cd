"""Training under injected faults: SIGKILL (also mid-checkpoint), non-finite losses or gradients, a failing DDP rank."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, data_overrides
from safetensors.torch import load_file

from dynaseg.config.presets import load_config
from dynaseg.engine import trainer as trainer_module
from dynaseg.engine.checkpoint import CheckpointError, save_training_state
from dynaseg.engine.distributed import FailureWatch
from dynaseg.engine.events import read_history
from dynaseg.engine.optim import lr_factor
from dynaseg.engine.trainer import train
from dynaseg.modeling.build import build_model

MAX_ITER = 16
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _overrides(synth_dir: Path, out: Path, *extra: str) -> list[str]:
    return data_overrides(synth_dir) + [
        f"output_dir={out}",
        "data.val_json=",
        "deterministic=true",
        f"solver.max_iter={MAX_ITER}",
        "solver.checkpoint_period=2",
        "solver.log_period=2",
        *extra,
    ]


def _train_cmd(synth_dir: Path, out: Path, *, wrapper: list[str] | None = None) -> list[str]:
    """``dynaseg train --resume`` (through a fault-injecting ``wrapper`` script when given)."""
    launcher = wrapper or ["-m", "dynaseg"]
    return [
        sys.executable,
        *launcher,
        "train",
        "--config",
        "blendmask_tiny",
        *_overrides(synth_dir, out),
        "--resume",
    ]


def _run(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    with log.open("w") as f:
        return subprocess.run(
            cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=300
        )


def _assert_same_weights(path: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = load_file(str(path))
    assert weights.keys() == reference.keys()
    differing = [k for k in reference if not torch.equal(weights[k], reference[k])]
    assert not differing, (
        f"{len(differing)} tensors differ from the uninterrupted run, e.g. {differing[:3]}"
    )


@pytest.fixture(scope="module")
def reference_weights(synth_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted run (in-process, one thread like the subprocesses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(
            load_config(
                "blendmask_tiny", _overrides(synth_dir, tmp_path_factory.mktemp("reference"))
            )
        )
    finally:
        torch.set_num_threads(threads)
    return load_file(str(result.weights))


def _training_starts(log: Path) -> int:
    return log.read_text().count("training iterations") if log.is_file() else 0


@pytest.mark.slow
def test_sigkill_at_random_times_then_resume_is_bit_exact(synth_dir, tmp_path, reference_weights):
    out = tmp_path / "run"
    rng = random.Random(20240601)
    trials = []
    for trial in range(2):
        started = _training_starts(out / "log.txt")
        with (tmp_path / f"trial{trial}.log").open("w") as log:
            proc = subprocess.Popen(
                _train_cmd(synth_dir, out), cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT
            )
            deadline = time.monotonic() + 120
            while _training_starts(out / "log.txt") == started and proc.poll() is None:
                assert time.monotonic() < deadline, "training did not start"
                time.sleep(0.01)
            delay = rng.uniform(0.0, 0.5)
            time.sleep(delay)  # a seeded random point of the training loop (or of the final save)
            killed = proc.poll() is None
            if killed:
                proc.send_signal(signal.SIGKILL)
            rc = proc.wait(timeout=60)
        states = sorted(p.name for p in out.glob("model_*.pt"))
        trials.append(
            {"delay_s": round(delay, 3), "killed": killed, "rc": rc, "last_state": states[-1:]}
        )
        assert rc == (-signal.SIGKILL if killed else 0), (
            trials,
            (tmp_path / f"trial{trial}.log").read_text()[-2000:],
        )
        if not killed:
            break
    print("kill trials:", json.dumps(trials))
    assert any(t["killed"] for t in trials), trials
    final = _run(_train_cmd(synth_dir, out), tmp_path / "final.log")
    assert final.returncode == 0, (tmp_path / "final.log").read_text()[-3000:]
    _assert_same_weights(out / "model_final.safetensors", reference_weights)
    assert [h["iter"] for h in read_history(out / "metrics.jsonl")] == list(
        range(2, MAX_ITER + 1, 2)
    )
    assert not list(out.glob(".*.tmp"))


KILL_WRAPPER = '''
"""Test-only: run the dynaseg CLI but SIGKILL this process in the middle of writing a checkpoint."""
import os
import signal
import sys
from pathlib import Path

import torch

from dynaseg import cli
from dynaseg.engine import checkpoint

MODE, AT = sys.argv[1], int(sys.argv[2])


def truncate_and_die(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)


if MODE == "state":        # half of model_{AT}.pt's temporary file written
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("iteration") == AT:
            truncate_and_die(f)

    torch.save = save
elif MODE == "pointer":    # model_{AT}.pt complete, last_checkpoint not yet updated
    real_atomic_write = checkpoint.atomic_write

    def atomic_write(path, write):
        if path.name == "last_checkpoint" and (path.parent / f"model_{AT:07d}.pt").is_file():
            os.kill(os.getpid(), signal.SIGKILL)
        real_atomic_write(path, write)

    checkpoint.atomic_write = atomic_write
elif MODE == "weights":    # half of model_final.safetensors's temporary file written
    real_save_file = checkpoint.save_file

    def save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        truncate_and_die(filename)

    checkpoint.save_file = save_file
sys.exit(cli.main(sys.argv[3:]))
'''


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_then_resume_is_bit_exact(
    synth_dir, tmp_path, reference_weights
):
    wrapper = tmp_path / "kill_wrapper.py"
    wrapper.write_text(KILL_WRAPPER)
    out = tmp_path / "run"

    def run(mode: str, at: int, name: str) -> str:
        proc = _run(
            _train_cmd(synth_dir, out, wrapper=[str(wrapper), mode, str(at)]),
            tmp_path / f"{name}.log",
        )
        log = (tmp_path / f"{name}.log").read_text()
        assert proc.returncode == -signal.SIGKILL, log[-3000:]
        return log

    # 1. Killed with model_0000004.pt half written: only a hidden temporary file shows it.
    run("state", 4, "a")
    tmp = list(out.glob(".model_0000004.pt.*.tmp"))
    assert len(tmp) == 1 and not (out / "model_0000004.pt").exists()
    assert (out / "last_checkpoint").read_text() == "model_0000002.pt"
    # 2. Resumes from iteration 2 (the temporary file is removed); killed after writing model_0000006.pt
    #    but before pointing last_checkpoint at it.
    log = run("pointer", 6, "b")
    assert "resumed from" in log and "model_0000002.pt at iteration 2" in log
    assert not tmp[0].exists()
    assert (out / "model_0000006.pt").is_file() and (
        out / "last_checkpoint"
    ).read_text() == "model_0000004.pt"
    # 3. Resumes from what last_checkpoint names; killed while writing the final weights.
    log = run("weights", 0, "c")
    assert "model_0000004.pt at iteration 4" in log
    assert (
        list(out.glob(".model_final.safetensors.*.tmp"))
        and not (out / "model_final.safetensors").exists()
    )
    # 4. A plain resume finds the complete final state and only writes the weights.
    proc = _run(_train_cmd(synth_dir, out), tmp_path / "d.log")
    log = (tmp_path / "d.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert f"model_{MAX_ITER:07d}.pt at iteration {MAX_ITER}" in log
    _assert_same_weights(out / "model_final.safetensors", reference_weights)
    assert not list(out.glob(".*.tmp"))


class _Injector:
    """Wraps the model the trainer builds: NaN losses / inf gradients at chosen (1-based) iterations,
    and snapshots of parameters, buffers and optimizer momentum taken before each forward pass."""

    def __init__(
        self,
        monkeypatch,
        *,
        nan_loss: set[int] = frozenset(),
        inf_grad: set[int] = frozenset(),
        nan_from: int | None = None,
    ) -> None:
        self.nan_loss, self.inf_grad, self.nan_from = nan_loss, inf_grad, nan_from
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer = None
        build_model, build_optimizer = trainer_module.build_model, trainer_module.build_optimizer

        def capture_optimizer(model, cfg):
            self.optimizer = build_optimizer(model, cfg)
            return self.optimizer

        monkeypatch.setattr(trainer_module, "build_model", lambda cfg: self._wrap(build_model(cfg)))
        monkeypatch.setattr(trainer_module, "build_optimizer", capture_optimizer)

    def _wrap(self, model):
        forward, calls = model.forward, [0]

        def wrapped(*args, **kwargs):
            calls[0] += 1
            it = calls[0]
            state = {f"p.{k}": v.detach().clone() for k, v in model.named_parameters()}
            state |= {f"b.{k}": v.detach().clone() for k, v in model.named_buffers()}
            state |= {
                f"m.{i}": s["momentum_buffer"].clone()
                for i, s in enumerate(self.optimizer.state.values())
                if s.get("momentum_buffer") is not None
            }
            self.snapshots[it] = state
            losses = forward(*args, **kwargs)
            if it in self.nan_loss or (self.nan_from is not None and it >= self.nan_from):
                losses["loss_mask"] = losses["loss_mask"] * float("nan")
            if it in self.inf_grad:
                losses["loss_mask"] = losses["loss_mask"].clone()
                losses["loss_mask"].register_hook(lambda g: g * float("inf"))
            return losses

        model.forward = wrapped
        return model


def _tiny_cfg(synth_dir, out, *extra):
    return load_config(
        "blendmask_tiny",
        data_overrides(synth_dir)
        + [
            f"output_dir={out}",
            "data.val_json=",
            "solver.max_iter=6",
            "solver.log_period=1",
            "solver.checkpoint_period=100",
            *extra,
        ],
    )


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_loss_stops_naming_term_and_iteration(synth_dir, tmp_path, monkeypatch):
    _Injector(monkeypatch, nan_loss={3})
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite loss at iteration 3: loss_mask=nan \(solver\.on_nonfinite=stop",
    ):
        train(_tiny_cfg(synth_dir, tmp_path))
    assert [h["iter"] for h in read_history(tmp_path / "metrics.jsonl")] == [1, 2]


def test_nonfinite_gradient_stops(synth_dir, tmp_path, monkeypatch):
    _Injector(monkeypatch, inf_grad={2})
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite gradients at iteration 2 \(total grad norm (inf|nan)\)",
    ):
        train(_tiny_cfg(synth_dir, tmp_path))


def test_skip_leaves_model_and_optimizer_untouched_and_logs(
    synth_dir, tmp_path, monkeypatch, caplog
):
    inject = _Injector(monkeypatch, nan_loss={3}, inf_grad={4})
    cfg = _tiny_cfg(synth_dir, tmp_path, "solver.on_nonfinite=skip")
    with caplog.at_level("WARNING", logger="dynaseg.train"):
        train(cfg)
    snaps = inject.snapshots
    assert not _same(snaps[2], snaps[3]), "a normal step must change the weights"
    assert _same(snaps[3], snaps[4]) and _same(snaps[4], snaps[5]), (
        "skipped steps changed the model or optimizer"
    )
    assert not _same(snaps[5], snaps[6])
    assert (
        "non-finite loss at iteration 3: loss_mask=nan: step skipped (1 in a row, 1 in total)"
        in caplog.text
    )
    assert (
        "non-finite gradients at iteration 4" in caplog.text
        and "(2 in a row, 2 in total)" in caplog.text
    )
    history = {h["iter"]: h for h in read_history(tmp_path / "metrics.jsonl")}
    assert history[3]["nonfinite_skipped"] == 1 and history[3]["nonfinite_skips"] == 1
    assert history[4]["nonfinite_skips"] == 2 and "loss" not in history[3]
    assert history[6]["nonfinite_skips"] == 2
    # The schedule follows the iteration number through skipped steps.
    assert history[5]["lr"] == pytest.approx(cfg.solver.base_lr * lr_factor(5, cfg.solver))
    # Gradient norms are logged at every logged step.
    assert all(
        h["grad_norm"] > 0 and h["grad_norm"] < float("inf")
        for i, h in history.items()
        if i not in (3, 4)
    )


def test_too_many_consecutive_skips_stop(synth_dir, tmp_path, monkeypatch):
    _Injector(monkeypatch, nan_from=2)
    cfg = _tiny_cfg(synth_dir, tmp_path, "solver.on_nonfinite=skip", "solver.max_nonfinite_skips=2")
    with pytest.raises(
        FloatingPointError,
        match=r"iteration 4: loss_mask=nan, after 2 skipped steps in a row: "
        r"stopping \(solver\.max_nonfinite_skips=2\)",
    ):
        train(cfg)
    skipped = [
        h["iter"] for h in read_history(tmp_path / "metrics.jsonl") if h.get("nonfinite_skipped")
    ]
    assert skipped == [2, 3]


@pytest.mark.parametrize(
    "other, error",
    [
        (
            "mask_rcnn_tiny",
            r"weights do not match the model \(BlendMask, \d+ tensors\): wrong-shape \d+ .*; missing \d+ "
            r"\(.*; unexpected \d+ \(",
        ),
        (
            "blendmask_tiny model.basis.channels=48",
            r"weights do not match the model \(BlendMask, \d+ tensors\): "
            r"wrong-shape \d+ \(basis\.\S+ \(48, 32, 3, 3\) vs model \(32, 32, 3, 3\)",
        ),
        (
            "blendmask_tiny",
            r"optimizer/scheduler state does not match this config \(ValueError: .*parameter groups",
        ),
    ],
)
def test_resume_from_a_mismatched_state_is_a_clear_error(synth_dir, tmp_path, other, error):
    name, *overrides = other.split()
    model = build_model(load_config(name, overrides).model)
    save_training_state(
        tmp_path,
        2,
        {
            "model": model.state_dict(),
            "optimizer": {"state": {}, "param_groups": []},
            "scheduler": {},
        },
    )
    with pytest.raises(
        CheckpointError, match=f"^{re.escape(str(tmp_path / 'model_0000002.pt'))}: {error}"
    ):
        train(_tiny_cfg(synth_dir, tmp_path), resume=True)


def test_failure_watch_first_failure_wins():
    store = torch.distributed.HashStore()
    rank0 = FailureWatch(store, rank=0, world_size=2, ack_timeout_s=0.05)
    rank1 = FailureWatch(store, rank=1, world_size=2, ack_timeout_s=0.05)
    assert rank1.publish(RuntimeError("disk\nfull")) == "rank 1: RuntimeError: disk full"
    assert rank0.publish(ValueError("later")) == "rank 1: RuntimeError: disk full"


def test_failure_watch_ends_a_blocked_rank():
    """A rank stuck where it cannot notice (NCCL collective) is ended after the grace period."""
    script = textwrap.dedent("""
        import time, torch.distributed as dist
        from dynaseg.engine.distributed import FailureWatch
        store = dist.HashStore()
        FailureWatch(store, rank=0, world_size=2, poll_s=0.05, grace_s=0.5).start()
        store.set("dynaseg/failed", "rank 1: RuntimeError: boom")
        time.sleep(60)
        print("not ended")
    """)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "not ended" not in proc.stdout, proc.stderr[-2000:]
    assert "rank 0 stops: rank 1 failed: RuntimeError: boom" in proc.stderr
    assert (
        "still running 0.5 s after rank 1 failed" in proc.stderr and time.monotonic() - start < 30
    )


DDP_WRAPPER = '''
"""Test-only: under DDP, rank 1 gets a NaN loss (finite gradients) at iteration 2 and raises at iteration 4."""
import os
import sys

import torch

from dynaseg import cli
from dynaseg.engine import trainer

RANK, OUT = int(os.environ["RANK"]), sys.argv[1]
build_model = trainer.build_model


def wrapped_build_model(cfg):
    model = build_model(cfg)
    forward, calls, before = model.forward, [0], {}

    def wrapped(*args, **kwargs):
        calls[0] += 1
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        if calls[0] == 2:
            before.update(params)
        if calls[0] == 3:
            torch.save({"before": before, "after": params}, f"{OUT}/rank{RANK}_params.pt")
        if calls[0] == 4 and RANK == 1:
            raise RuntimeError("injected failure on rank 1 at iteration 4")
        losses = forward(*args, **kwargs)
        if calls[0] == 2 and RANK == 1:
            losses["loss_mask"] = losses["loss_mask"] + float("nan")
        return losses

    model.forward = wrapped
    return model


trainer.build_model = wrapped_build_model
sys.exit(cli.main(sys.argv[2:]))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ddp_ranks_agree_on_skips_and_a_failing_rank_ends_all(synth_dir, tmp_path):
    wrapper = tmp_path / "ddp_wrapper.py"
    wrapper.write_text(DDP_WRAPPER)
    out = tmp_path / "run"
    out.mkdir()
    port = _free_port()
    procs, logs = [], []
    for rank in range(2):
        env = {
            **ENV,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
        }
        logs.append((tmp_path / f"rank{rank}.log").open("w"))
        cmd = [
            sys.executable,
            str(wrapper),
            str(out),
            "train",
            "--config",
            "blendmask_tiny",
            *data_overrides(synth_dir),
            f"output_dir={out}",
            "data.val_json=",
            "solver.max_iter=8",
            "solver.log_period=1",
            "solver.checkpoint_period=100",
            "solver.on_nonfinite=skip",
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[-1], stderr=subprocess.STDOUT)
        )
    start = time.monotonic()
    try:
        rcs = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    elapsed = time.monotonic() - start
    text = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    print(f"DDP fault run: exit codes {rcs}, {elapsed:.1f} s")
    # Iteration 2: rank 1's loss is NaN but its gradients are finite; both ranks skip the step.
    for rank in range(2):
        params = torch.load(out / f"rank{rank}_params.pt", weights_only=True)
        assert all(
            torch.equal(params["before"][k], params["after"][k]) for k in params["before"]
        ), rank
    p0, p1 = (torch.load(out / f"rank{r}_params.pt", weights_only=True)["after"] for r in range(2))
    assert all(torch.equal(p0[k], p1[k]) for k in p0), "ranks desynchronised"
    skips = [h for h in read_history(out / "metrics.jsonl") if h.get("nonfinite_skipped")]
    assert [h["iter"] for h in skips] == [2] and "loss_mask=nan on rank 1" in skips[0]["nonfinite"]
    # Iteration 4: rank 1 raises; both ranks end, rank 0 naming rank 1 and its error.
    assert rcs[0] != 0 and rcs[1] != 0, rcs
    assert "RuntimeError: injected failure on rank 1 at iteration 4" in text[1]
    assert "rank 1 failed: RuntimeError: injected failure on rank 1 at iteration 4" in text[0], (
        text[0][-3000:]
    )
