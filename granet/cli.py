"""Command line: ``granet train | layers | export | study | report``."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from granet.config import load_config
from granet.errors import run_command
from granet.study.cli import add_study_commands

__all__ = ["main"]


class ProgressBar:
    """tqdm over epochs (a trainer callback). After each epoch the bar shows the epochs done
    and that epoch's train loss, validation and test accuracy and density; it is cleared when
    training ends (the caller prints the result instead of a full bar)."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="epoch", dynamic_ncols=True, file=sys.stderr,
                        leave=False)

    def on_train_start(self, trainer: Any) -> None:
        self.bar.n = trainer.epoch
        self.bar.refresh()

    def on_epoch_end(self, trainer: Any, rec: dict[str, Any]) -> None:
        # postfix first, then the count: one draw shows epoch n with epoch n's numbers
        self.bar.set_postfix(
            {"loss": f"{rec['train_loss']:.3f}", "val": f"{rec['val_acc']:.3f}",
             "test": f"{rec['test_acc']:.3f}", "density": f"{rec['density']:.4f}"},
            refresh=False,
        )
        self.bar.update(rec["epoch"] - self.bar.n)
        self.bar.refresh()

    def on_checkpoint(self, trainer: Any, path: Path, rec: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        self.bar.close()  # leave=False: the bar's line is cleared


def start_line(trainer: Any) -> str:
    """What ``granet train`` is about to do: model, parameter counts, device, run directory."""
    cfg, engine = trainer.cfg, trainer.engine
    n_params = sum(p.numel() for p in trainer.model.parameters())
    prunable = sum(engine.sizes)
    if cfg.sparsity.method == "dense":
        sparse = f"{prunable:,} prunable, dense"
    else:
        sparse = (f"{prunable:,} prunable at density {engine.density():.4f}, "
                  f"{cfg.sparsity.method} to {cfg.sparsity.final_density:g}")
    return (f"granet train: model {cfg.model.name} on {cfg.data.name}, {n_params:,} parameters "
            f"({sparse}), {cfg.run.epochs} epochs, device {trainer.device}, "
            f"run directory {trainer.paths.root}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _check_writable_dir(root: Path) -> None:
    """The run directory exists, or can be created: its first existing parent is a writable
    directory. Checked before training, so nothing is trained that cannot be saved."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    why = None
    if not probe.is_dir():
        why = f"{str(probe)!r} is a file, not a directory"
    elif not os.access(probe, os.W_OK | os.X_OK):
        why = f"{str(probe)!r} is not writable"
    if why:
        raise ValueError(
            f"run directory {str(root)!r}: {why}; set run.output_dir (or --run-dir) to a "
            f"writable directory"
        )


def _diverged_message(exc: Any, cfg: Any) -> str:
    last = exc.summary or {}
    shown = [
        f"{k}={_fmt(last[k])}"
        for k in ("test_acc", "val_acc", "test_at_best_val", "density")
        if k in last
    ]
    finite = (
        f"last finite epoch {last['epoch']}: {', '.join(shown)}"
        if "epoch" in last else "no finite epoch"
    )
    return (
        f"diverged at epoch {exc.epoch + 1} ({exc.reason}); {finite}; lower optim.lr "
        f"(now {cfg.optim.lr:g}) or add warm-up epochs (optim.warmup_epochs); "
        f"run_dir={last.get('run_dir', '?')}"
    )


def cmd_train(args: argparse.Namespace) -> int:
    from granet.trainer import Diverged, Trainer

    cfg = load_config(args.config, args.set)
    trainer = Trainer(cfg, run_dir=args.run_dir)
    _check_writable_dir(trainer.paths.root)
    if args.fresh and trainer.paths.checkpoint.is_file():
        trainer.paths.checkpoint.unlink()
    elif trainer.paths.checkpoint.exists():
        trainer.try_resume()  # a checkpoint that cannot be resumed fails here, before any write
        left = ("nothing left to train" if trainer.epoch >= cfg.run.epochs
                else f"continuing with epoch {trainer.epoch + 1}")
        print(f"resuming {trainer.paths.root} from its checkpoint at epoch {trainer.epoch} of "
              f"{cfg.run.epochs} ({left})", file=sys.stderr)
    if not args.quiet:  # only once every check passed: an error is then the only output
        print(start_line(trainer), file=sys.stderr, flush=True)
        trainer.callbacks.append(ProgressBar(cfg.run.epochs))
    try:
        summary = trainer.fit(resume=False)
    except Diverged as exc:
        print(f"granet: error: {_diverged_message(exc, cfg)}", file=sys.stderr)
        return 1
    print(
        "done: "
        + " ".join(
            f"{k}={_fmt(summary[k])}"
            for k in ("epoch", "test_acc", "test_at_best_val", "density", "inference_flops_ratio")
            if k in summary
        )
        + f" run_dir={summary['run_dir']}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from granet.export import export_run

    out = export_run(args.run_dir)
    print(
        f"dense {out['dense_bytes'] / 1e6:.3f} MB -> sparse {out['sparse_bytes'] / 1e6:.3f} MB "
        f"({out['sparse_bytes'] / out['dense_bytes']:.1%}; density {out['density']:.4f}) "
        f"in {out['dir']}"
    )
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from granet.preflight import format_layer_table, layer_table

    cfg = load_config(args.config, args.set)
    rows, summary = layer_table(cfg)
    print(format_layer_table(rows, summary, cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="granet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one run from a YAML config")
    t.add_argument("config", nargs="?", help="YAML config (defaults if omitted)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set sparsity.final_density=0.05 (repeatable)")
    t.add_argument("--run-dir", default=None, help="run directory (default: output_dir/<hash>)")
    t.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--quiet", action="store_true", help="no start line, no progress bar")
    t.set_defaults(func=cmd_train)

    lay = sub.add_parser(
        "layers", help="print the weights the engine masks (shape, why, initial density, MACs)"
    )
    lay.add_argument("config", nargs="?", help="YAML config (defaults if omitted)")
    lay.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="dotted override, e.g. --set sparsity.exclude=[head.weight]")
    lay.set_defaults(func=cmd_layers)

    e = sub.add_parser("export", help="export a run's sparse model")
    e.add_argument("run_dir")
    e.set_defaults(func=cmd_export)

    add_study_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # User models named 'package.module:function' are looked up from the working directory too,
    # as with ``python -m`` (the console script's sys.path holds only its own bin directory).
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
