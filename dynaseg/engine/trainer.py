"""The training loop: iteration-based, resumable, DDP-aware, with progress, logging and evaluation."""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dynaseg.config.presets import save_config
from dynaseg.config.schema import ExperimentConfig
from dynaseg.data.build import build_dataset, dataset_metadata, load_split
from dynaseg.data.packed import PackedRecords
from dynaseg.data.samplers import build_train_loader, repeat_factors
from dynaseg.engine import distributed as dist_utils
from dynaseg.engine.checkpoint import (
    CheckpointError,
    find_last_checkpoint,
    load_model_state,
    load_training_state,
    remove_stale_temp_files,
    save_training_state,
    save_weights,
)
from dynaseg.engine.evaluate import evaluate_model
from dynaseg.engine.events import EventWriter, read_history
from dynaseg.engine.freeze import freeze_groups
from dynaseg.engine.optim import build_lr_scheduler, build_optimizer
from dynaseg.modeling.build import build_model
from dynaseg.utils import comm
from dynaseg.utils.files import check_output_folder

__all__ = [
    "train",
    "TrainingResult",
    "training_objective",
    "training_autocast",
    "training_dtype",
    "cpu_has_native_bf16",
]

logger = logging.getLogger("dynaseg.train")


@dataclass
class TrainingResult:
    """What a finished run produced."""

    output_dir: Path
    weights: Path  # model_final.safetensors
    metrics: dict  # evaluate_coco output ({} when there is no validation set)


def training_objective(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The scalar to minimise from a model's training outputs: the sum of the entries whose keys
    start with "loss"; the others (e.g. DynaMask's ``msm/pick_56``) are statistics, only logged."""
    return sum(v for k, v in outputs.items() if k.startswith("loss"))


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX); elsewhere it emulates it."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


def training_dtype(device: torch.device, enabled: bool) -> torch.dtype:
    """The autocast dtype ``solver.amp`` gives on ``device``: CUDA bf16 (fp16 where bf16 is
    missing); a CPU bf16 only where it has it natively; float32 otherwise (no autocast)."""
    if enabled and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if enabled and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def training_autocast(device: torch.device, enabled: bool):
    """(autocast context, GradScaler for fp16 or None) for ``solver.amp`` on ``device``."""
    dtype = training_dtype(device, enabled)
    if dtype == torch.float32:
        if enabled and device.type == "cpu":
            logger.warning("solver.amp: this CPU has no native bf16; training in float32")
        return contextlib.nullcontext(), None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast(device.type, dtype=dtype), scaler


def _grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Total gradient 2-norm, clipping to ``max_norm`` when it is positive."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _nonfinite(
    losses: dict[str, torch.Tensor], grad_norm: torch.Tensor, *, check_grads: bool, iteration: int
) -> str:
    """ "" when every rank's losses (and, with ``check_grads``, gradients) are finite, else what is not.

    One all-reduce per step (and a single host sync) so that all ranks take the same decision.
    """
    loss_bad = torch.stack([~torch.isfinite(v.detach()).all() for v in losses.values()]).any()
    grad_bad = ~torch.isfinite(grad_norm) if check_grads else torch.zeros_like(loss_bad)
    flags = comm.reduce_max(torch.stack([loss_bad, grad_bad]).float()).tolist()
    if not any(flags):
        return ""
    local = [
        (k, v.detach().float().flatten()[0].item() if v.numel() == 1 else float("nan"))
        for k, v in losses.items()
        if not torch.isfinite(v.detach()).all()
    ]
    gathered = comm.all_gather_objects(local)
    where = (lambda r: f" on rank {r}") if len(gathered) > 1 else (lambda r: "")
    terms = ", ".join(f"{k}={v}{where(r)}" for r, items in enumerate(gathered) for k, v in items)
    if flags[0]:
        return f"non-finite loss at iteration {iteration}: {terms}"
    return f"non-finite gradients at iteration {iteration} (total grad norm {grad_norm.item()}) with finite losses"


def _repeat_factors(data, threshold: float) -> list[float] | None:
    """LVIS repeat-factor sampling of the training images (``data.repeat_threshold``), or None."""
    if threshold <= 0:
        return None
    if isinstance(data.records, PackedRecords):
        categories = data.records.categories_per_image()
    else:
        categories = [
            [(s.isthing, s.category) for s in r.segments if not s.iscrowd]  # panoptic
            if hasattr(r, "segments")
            else [a.category for a in r.annotations if not a.iscrowd]
            for r in data.records
        ]
    factors = repeat_factors(categories, threshold)
    logger.info(
        "repeat-factor sampling (t=%g): %.0f images per epoch instead of %d (max factor %.1f)",
        threshold,
        sum(factors),
        len(factors),
        max(factors),
    )
    return factors


def train(
    cfg: ExperimentConfig, *, resume: bool = False, model: nn.Module | None = None
) -> TrainingResult:
    """Train ``cfg.model`` on ``cfg.data`` for ``cfg.solver.max_iter`` iterations.

    Writes to ``cfg.output_dir``: ``config.yaml``, ``metrics.jsonl`` (+ TensorBoard events),
    ``model_XXXXXXX.pt`` training states (resumable), ``model_final.safetensors``, and after the
    final evaluation ``metrics.json`` and ``results_val.json``. With ``resume`` it continues from the
    last readable training state in the output directory. Under DDP an error on one rank ends all
    ranks (see ``distributed.spread_failures``). An ``output_dir`` that is empty, a file or under
    one is refused (UserError) before any work. Non-finite losses or gradients stop the run or skip
    the step (``solver.on_nonfinite``); see docs/reliability.md. ``model`` replaces the one
    ``cfg.model`` describes (reference models of the benchmarks, e.g. ``bench fcos-peer``).
    """
    check_output_folder(cfg.output_dir, option="output_dir")
    device = dist_utils.init_distributed(cfg.device)
    with dist_utils.spread_failures():
        return _train(cfg, resume=resume, device=device, model=model)


def _train(
    cfg: ExperimentConfig, *, resume: bool, device: torch.device, model: nn.Module | None
) -> TrainingResult:
    rank, world = comm.get_rank(), comm.get_world_size()
    main = comm.is_main_process()
    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out)
        save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.deterministic:
        # Multi-threaded CPU kernels (e.g. index_put with accumulation) otherwise sum in varying order.
        torch.use_deterministic_algorithms(True)

    data = load_split(cfg, "train")
    if cfg.data.batch_size % world:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by the {world} processes"
        )
    dataset = build_dataset(cfg, data, train=True)

    model_name = cfg.model.kind if model is None else type(model).__name__
    model = (build_model(cfg.model) if model is None else model).to(device)
    if cfg.solver.freeze:
        frozen = freeze_groups(model, cfg.solver.freeze)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(
            "frozen %s: %d parameters; %d left to train",
            ",".join(cfg.solver.freeze),
            frozen,
            trainable,
        )
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer(model, cfg.solver)
    scheduler = build_lr_scheduler(optimizer, cfg.solver)
    autocast, scaler = training_autocast(device, cfg.solver.amp)
    start_iter, resume_rng, skips, skips_in_a_row = 0, None, 0, 0
    if resume:
        last = find_last_checkpoint(out)
        if last is None:
            logger.warning("--resume: no checkpoint in %s, starting from scratch", out)
        else:
            state = load_training_state(last)
            load_model_state(model, state["model"], source=last)
            try:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{last}: optimizer/scheduler state does not match this config "
                    f"({type(e).__name__}: {e})"
                ) from None
            if scaler is not None and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            resume_rng = state.get("rng")
            start_iter = int(state["iteration"])
            skips, skips_in_a_row = (
                int(state.get("nonfinite_skips", 0)),
                int(state.get("nonfinite_in_a_row", 0)),
            )
            logger.info("resumed from %s at iteration %d", last, start_iter)
    if world > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=_unwrap(model).ddp_unused_parameters,
        )

    loader = build_train_loader(
        dataset,
        batch_size_per_rank=cfg.data.batch_size // world,
        num_workers=cfg.data.num_workers,
        aspect_ratio_grouping=cfg.data.aspect_ratio_grouping,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
        start_iter=start_iter,
        size_divisibility=cfg.model.size_divisibility,
        repeat=_repeat_factors(data, cfg.data.repeat_threshold),
    )
    # The record of the resumed iteration itself was written before its checkpoint: keep it.
    events = EventWriter(out, start_iter=start_iter + 1 if start_iter else 0) if main else None
    weights_meta = {**dataset_metadata(data), "model": model_name}

    def checkpoint(iteration: int) -> None:
        if main:
            # The global RNG drives RoI sampling and Gumbel noise: saving it makes resumes exact.
            state = {
                "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "nonfinite_skips": skips,
                "nonfinite_in_a_row": skips_in_a_row,
            }
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            save_training_state(out, iteration, state)

    model.train()
    bar = tqdm(
        total=cfg.solver.max_iter,
        initial=start_iter,
        desc="train",
        disable=not main,
        dynamic_ncols=True,
        mininterval=1 if sys.stderr.isatty() else 15,
    )
    data_iter = iter(loader)
    if resume_rng is not None:  # after iter(loader), which draws a seed from the global RNG
        torch.set_rng_state(resume_rng)
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = list(model.buffers())
    skip_mode = cfg.solver.on_nonfinite == "skip"
    logger.info("training iterations %d to %d", start_iter + 1, cfg.solver.max_iter)
    start = time.perf_counter()
    for iteration in range(start_iter, cfg.solver.max_iter):
        done = iteration + 1  # iteration numbers in messages and events count steps from 1
        batch = next(data_iter).to(device, memory_format=memory_format)
        # A skipped step must not leave BatchNorm statistics (or step counters) of its forward pass.
        saved_buffers = [b.detach().clone() for b in buffers] if skip_mode else None
        with autocast:
            losses = model(batch)
        total = training_objective(losses)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        grad_norm = _grad_norm(params, cfg.solver.clip_grad_norm)
        # With fp16 AMP, inf gradients are the GradScaler's business (it skips and lowers the scale).
        problem = _nonfinite(losses, grad_norm, check_grads=scaler is None, iteration=done)
        if problem and not skip_mode:
            raise FloatingPointError(
                f'{problem} (solver.on_nonfinite=stop; "skip" skips such steps)'
            )
        if problem:
            skips, skips_in_a_row = skips + 1, skips_in_a_row + 1
            if skips_in_a_row > cfg.solver.max_nonfinite_skips:
                raise FloatingPointError(
                    f"{problem}, after {skips_in_a_row - 1} skipped steps in a row: stopping "
                    f"(solver.max_nonfinite_skips={cfg.solver.max_nonfinite_skips})"
                )
            with torch.no_grad():
                for b, saved in zip(buffers, saved_buffers):
                    b.copy_(saved)
            if scaler is not None:
                scaler.update()
            if main:
                logger.warning(
                    "%s: step skipped (%d in a row, %d in total)", problem, skips_in_a_row, skips
                )
                events.write(
                    done, {"nonfinite_skipped": 1, "nonfinite_skips": skips, "nonfinite": problem}
                )
        else:
            skips_in_a_row = 0
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        scheduler.step()  # also after a skipped step: the schedule follows the iteration number

        if not problem and (done % cfg.solver.log_period == 0 or done == cfg.solver.max_iter):
            reduced = {k: comm.reduce_mean(v.detach().float()).item() for k, v in losses.items()}
            if main:
                scalars = {
                    "loss": sum(v for k, v in reduced.items() if k.startswith("loss")),
                    **reduced,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm.item(),
                    "time_per_iter": (time.perf_counter() - start) / max(done - start_iter, 1),
                }
                if skips:
                    scalars["nonfinite_skips"] = skips
                events.write(done, scalars)
                bar.set_postfix(
                    {
                        k.replace("loss_", ""): f"{v:.3f}"
                        for k, v in scalars.items()
                        if k.startswith("loss")
                    }
                )
        bar.update(1)
        if done % cfg.solver.checkpoint_period == 0 and done < cfg.solver.max_iter:
            checkpoint(done)
        if (
            cfg.solver.eval_period
            and done % cfg.solver.eval_period == 0
            and done < cfg.solver.max_iter
            and cfg.data.val_json
        ):
            metrics = evaluate_model(cfg, _unwrap(model), device)
            if main:
                events.write(done, _metric_scalars(metrics))
    bar.close()
    checkpoint(cfg.solver.max_iter)
    weights = out / "model_final.safetensors"
    if main:
        save_weights(model, weights, weights_meta)
        logger.info("training done in %.1f s; weights: %s", time.perf_counter() - start, weights)
    comm.barrier()
    metrics = evaluate_model(cfg, _unwrap(model), device, out) if cfg.data.val_json else {}
    if main:
        events.close()
        _plot_history(out)
    return TrainingResult(output_dir=out, weights=weights, metrics=metrics)


def _metric_scalars(metrics: dict) -> dict[str, float]:
    """Flat scalars for the event log: bbox/AP…, segm/AP…, panoptic/PQ, panoptic/PQ_Things…"""
    out = {
        f"{t}/{k}": v
        for t in ("bbox", "segm")
        if t in metrics
        for k, v in metrics[t].items()
        if k != "per_class"
    }
    if "cityscapes" in metrics:
        out |= {f"cityscapes/{k}": metrics["cityscapes"][k] for k in ("AP", "AP50")}
    for group, values in metrics.get("panoptic", {}).items():
        if group != "per_class":
            suffix = "" if group == "All" else f"_{group}"
            out |= {f"panoptic/{k}{suffix}": v for k, v in values.items() if k != "N"}
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _plot_history(out: Path) -> None:
    from dynaseg.engine.loss_curve import plot_loss_curves

    history = [h for h in read_history(out / "metrics.jsonl") if "loss" in h]
    if history:
        plot_loss_curves(history, out / "loss_curve.png")
