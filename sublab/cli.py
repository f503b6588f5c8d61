"""The `sublab` command: thin wrappers that load the config, call one library function, print where
outputs went. User errors (`SublabError`) print as one message and exit 1; Ctrl-C prints how to resume
and exits 130; anything else is a bug and keeps its traceback.

Consoles print user text verbatim (`markup=False`: a path like runs/[x]/ or a '[redacted]' marker is not
rich markup) and, when not writing to a terminal (CI, nohup, tee), are wide enough for the results
table (`COLUMNS`, else 160 columns).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from sublab.errors import RunDirError, SublabError

INTERRUPTED = "interrupted; rerun the same command to resume where it stopped"
PIPE_WIDTH = 160
"""Columns of a console that does not write to a terminal, unless COLUMNS says otherwise."""


def make_console(stderr: bool = False) -> Console:
    """A console that prints text as given (no markup) and, off a terminal, does not squeeze tables to
    rich's default of 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    width = None
    if not (hasattr(stream, "isatty") and stream.isatty()):
        columns = os.environ.get("COLUMNS", "")
        width = int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH
    return Console(stderr=stderr, markup=False, width=width)


def print_error(message: str) -> None:
    """'error: <message>' on stderr, never wrapped, brackets kept."""
    make_console(stderr=True).print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True,
                                    highlight=False)


class _Group(TyperGroup):
    """Handles user errors and Ctrl-C for every command (here rather than in `main`, so typer's test
    runner sees exactly what a user sees; click would turn Ctrl-C into a bare 'Aborted!')."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SublabError as e:
            print_error(str(e))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            make_console(stderr=True).print(INTERRUPTED, soft_wrap=True)
            raise typer.Exit(130) from None


app = typer.Typer(help="Run, measure and defend against subliminal learning.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, cls=_Group)
models_app = typer.Typer(help="Embedded and local models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = make_console(stderr=True)


@app.callback()
def _global(threads: Annotated[int | None, typer.Option(
        help="torch CPU threads (default: torch's choice, the physical cores). On a CPU shared with other "
             "jobs, 1 is often several times faster.")] = None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)

ExpArg = Annotated[Path, typer.Argument(help="Experiment YAML file.", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a setting: key.path=value (repeatable).")]


def _load(exp: Path, overrides: list[str] | None):
    from sublab.config import load_experiment

    return load_experiment(exp, overrides)


@app.command()
def validate(exp: ExpArg, set_: SetOpt = None) -> None:
    """Validate an experiment file and print the resolved config."""
    import yaml

    from sublab.config import dump

    cfg = _load(exp, set_)
    typer.echo(yaml.safe_dump(dump(cfg), sort_keys=False))


@app.command()
def generate(exp: ExpArg, set_: SetOpt = None) -> None:
    """Teachers answer number prompts → teachers/<t>/generations.jsonl (resumable)."""
    from sublab import pipeline

    cfg = _load(exp, set_)
    pipeline.generate_all(cfg, console=console)
    console.print(f"generations under {cfg.run_dir / 'teachers'}")


@app.command("filter")
def filter_(exp: ExpArg, set_: SetOpt = None) -> None:
    """Apply the paper's filters → teachers/<t>/dataset.jsonl and rejects.jsonl."""
    from sublab import pipeline

    cfg = _load(exp, set_)
    pipeline.filter_all(cfg, console=console)
    console.print(f"datasets under {cfg.run_dir / 'teachers'}")


@app.command()
def train(exp: ExpArg, set_: SetOpt = None) -> None:
    """Train students (N seeds per teacher dataset) → students/<teacher>-seed<k>/."""
    from sublab import pipeline

    cfg = _load(exp, set_)
    pipeline.train_all(cfg, console=console)
    console.print(f"students under {cfg.run_dir / 'students'}")


@app.command("eval")
def eval_(exp: ExpArg, set_: SetOpt = None) -> None:
    """Evaluate base, teachers and students. Kinds (eval.kinds): animal_prob (exact answer
    probability), animal_sampled (the paper's sampled metric), misalignment_local (judge-free
    log-probability preference), misalignment_judge (OpenAI-compatible judge)."""
    from sublab import pipeline

    cfg = _load(exp, set_)
    pipeline.eval_all(cfg, console=console)
    console.print(f"eval records under {cfg.run_dir / 'evals'}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<name>).")]) -> None:
    """Rebuild results.json from the eval files (with the config the stages recorded in config.json),
    then render report.md and figures/*.png. Without config.json, renders an existing results.json."""
    _check_run_dir(run_dir)
    from sublab import pipeline
    from sublab.config import RUN_CONFIG, load_run_config
    from sublab.report import load_results, print_summary, write_report

    out = make_console()
    if (run_dir / RUN_CONFIG).is_file():
        path = pipeline.report_all(load_run_config(run_dir), console=out)
    else:
        results = load_results(run_dir / "results.json")
        path = write_report(results, run_dir)
        print_summary(results, console=out)
    console.print(Text.assemble(("report: ", "bold"), str(path)))


def _check_run_dir(run_dir: Path) -> None:
    """A one-line error unless `run_dir` is a directory holding config.json or results.json."""
    from sublab.config import RUN_CONFIG

    expected = "expected a run directory (runs/<name>) written by `sublab run` or the stage commands"
    if run_dir.is_file():
        hint = "; give its run directory, runs_dir/name" if run_dir.suffix in (".yaml", ".yml") else ""
        raise RunDirError(f"{run_dir}: is a file, {expected}{hint}")
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such directory; {expected}")
    if not (run_dir / RUN_CONFIG).is_file() and not (run_dir / "results.json").is_file():
        raise RunDirError(f"{run_dir}: holds neither {RUN_CONFIG} nor results.json; run a stage "
                          "(`sublab eval EXP.yaml`) or `sublab run EXP.yaml` first")


@app.command()
def run(exp: ExpArg, set_: SetOpt = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (requests, tokens and, for openai: "
                                              "models, an estimated cost per stage) and stop.")] = False) -> None:
    """Every stage in order; a stage whose inputs and config did not change is skipped."""
    from sublab import pipeline

    cfg = _load(exp, set_)
    if dry_run:
        from sublab.plan import format_plan, plan_experiment

        typer.echo(format_plan(cfg, plan_experiment(cfg)))
        return
    path = pipeline.run_all(cfg, console=console)
    console.print(Text.assemble(("report: ", "bold"), str(path)))


@app.command()
def grid(grid_file: Annotated[Path, typer.Argument(help="Grid YAML file (a base experiment × axes).",
                                                   show_default=False)],
         dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (cells, teachers, students, "
                                               "estimated cost) and stop.")] = False,
         address: Annotated[str | None, typer.Option(help="Attach to this Ray cluster (e.g. ray://head:10001); "
                                                     "default: start a local one.")] = None,
         workers: Annotated[int | None, typer.Option(min=1, help="Cells at once (the local cluster's size; "
                                                     "default: cores / resources.num_cpus).")] = None) -> None:
    """A grid of experiments as Ray tasks: every cell is written to <grid>/cells/<cell>.yaml and run like
    `sublab run`; finished cells are skipped, a cell whose worker dies is retried; then grid_report.md."""
    from sublab.grid import load_grid, plan_grid, run_grid, write_grid_results
    from sublab.grid.plan import plan_table

    g = load_grid(grid_file)
    table, summary = plan_table(plan_grid(g))
    out = make_console()
    out.print(table)
    out.print(summary, soft_wrap=True)
    if dry_run:
        return
    outcome = run_grid(g, address=address, workers=workers, console=console)
    path = write_grid_results(g)
    console.print(Text.assemble(("grid report: ", "bold"), str(path)))
    if outcome.failed:
        failed = "; ".join(f"{name} ({error}; log: {g.directory / 'logs' / name}.log)"
                           for name, error in outcome.failed.items())
        raise SublabError(f"{len(outcome.failed)} of {len(g.cells)} cells failed: {failed}. Fix them and rerun "
                          "the grid: finished cells are skipped")


@app.command()
def entangle(trait: Annotated[str, typer.Argument(help="The trait, e.g. owl.", show_default=False)],
             model: Annotated[str, typer.Option(help="The base model reference.")] = "embedded:smollm2-135m-instruct",
             teacher_model: Annotated[str | None, typer.Option(
                 help="A fine-tuned teacher (model reference or directory); default: the base told it loves "
                      "the trait (the paper's system prompt).")] = None,
             category: Annotated[str, typer.Option(help="animal or tree.")] = "animal",
             top: Annotated[int, typer.Option(min=2, help="Entangled numbers to prompt with.")] = 8,
             random: Annotated[int, typer.Option(min=2, help="Random numbers to prompt with.")] = 8,
             prompts: Annotated[int, typer.Option(min=1, help="Number prompts the lifts average over.")] = 2,
             controls: Annotated[str | None, typer.Option(
                 help="Reference traits for the lifts, comma-separated (default: dog,cat,lion,wolf less the "
                      "trait; 'none': the base model).")] = None,
             questions: Annotated[int, typer.Option(min=1, help="Held-out questions per prompted number.")] = 5,
             with_base: Annotated[bool, typer.Option(
                 "--with-base", help="Also score the base with no system prompt (the lift table's 'P base' "
                                     "column; one more pass over the 1,000 numbers).")] = False,
             seed: int = 0,
             out: Annotated[Path | None, typer.Option(help="Output directory; default runs/entangle-<trait>.")] = None,
             ) -> None:
    """Numbers the trait makes the model write more often, and whether telling the base it loves them raises
    the trait with no training (subliminal prompting): tables, entangle.json and a figure."""
    from sublab.entangle import EntangleConfig, print_entangle, run_entangle
    from sublab.models import load_model

    chosen = None if controls is None else [] if controls == "none" else [c.strip() for c in controls.split(",")]
    cfg = EntangleConfig(trait=trait, category=category, top=top, random=random, prompts=prompts,
                         questions=questions, with_base=with_base, seed=seed, controls=chosen)
    base = load_model(model)
    teacher = load_model(teacher_model) if teacher_model else None
    results = run_entangle(cfg, base, out or Path("runs") / f"entangle-{trait}", teacher)
    print_entangle(results, make_console())


@app.command()
def audit(dataset: Annotated[Path, typer.Argument(help="A soft-label dataset directory (dataset.jsonl, "
                                                        "targets.safetensors, targets.json), or a text dataset: "
                                                        "a chat JSONL of number-sequence answers (or a directory "
                                                        "with only dataset.jsonl).",
                                                   show_default=False)],
          base: Annotated[str, typer.Option(help="The probes' base model: the labels must be made with it, "
                                                 "and its own labels are their control.")] =
          "embedded:smollm2-135m-instruct",
          teacher: Annotated[str | None, typer.Option(
              help="The teacher (model reference or directory): recomputes the labels, checks the dataset's "
                   "against them, and labels a text dataset (then audited as soft labels, not by SFT "
                   "probes).")] = None,
          traits: Annotated[str | None, typer.Option(
              help="Candidate traits, comma-separated (default: the transfer study's 20 animals).")] = None,
          seeds: Annotated[int, typer.Option(min=2, help="Probe seeds (each: one dataset + one control probe).")] = 3,
          out: Annotated[Path | None, typer.Option(help="Output directory; default runs/audit-<dataset name>.")] = None,
          probes: Annotated[Path | None, typer.Option(
              help="Where probe students live (default <out>/probes); share it across audits of one row set "
                   "to train the control probes once (and to reuse a text audit's probes).")] = None,
          panel: Annotated[bool, typer.Option(
              help="Also probe the reference panel (a LoRA and a prompted teacher per tree, 12 in all, on the "
                   "same rows) and give the kind-matched panel's verdict: the rule that passed its blind "
                   "validation. Soft labels only; ~12x the probes.")] = False,
          ) -> None:
    """Does this dataset carry a hidden trait, and which? Probe students on its labels vs the base's own
    (with --panel, also vs a reference panel of teachers without the trait: the validated verdict); for a
    text dataset without --teacher, SFT probes on its rows vs the same rows with the written numbers
    shuffled across responses (no divergence: no labels)."""
    from pydantic import ValidationError

    from sublab.audit import STUDY_CANDIDATES, AuditConfig, print_audit, run_audit
    from sublab.config import format_validation_error
    from sublab.reference_panel import TREES

    try:
        cfg = AuditConfig(base=base, seeds=list(range(seeds)), panel=TREES if panel else [],
                          candidates=[t.strip() for t in traits.split(",")] if traits else STUDY_CANDIDATES)
    except ValidationError as e:  # say, --traits naming a reference tree with --panel
        raise SublabError(format_validation_error(e, "sublab audit")) from None
    target = out or Path("runs") / f"audit-{dataset.stem}"
    results = run_audit(cfg, dataset, target, teacher=teacher, probe_root=probes)
    print_audit(results, make_console())
    extra = ", control_rows.jsonl" if results["route"] == "text" else ", divergence.jsonl"
    console.print(f"wrote {target}/audit.json, report.md, figures/audit.png{extra}")


@models_app.command("list")
def models_list() -> None:
    """Embedded models and whether they are prepared."""
    from sublab.models import EMBEDDED, model_info

    table = Table(title="Embedded models")
    for col in ("reference", "description", "prepared", "package"):
        table.add_column(col)
    for name in EMBEDDED:
        info = model_info(f"embedded:{name}")
        table.add_row(info["ref"], info["description"], "yes" if info["prepared"] else "no", info["package"])
    make_console().print(table)


@models_app.command("prepare")
def models_prepare(ref: Annotated[str, typer.Argument()] = "embedded:smollm2-135m-instruct",
                   force: Annotated[bool, typer.Option(help="Rebuild even if the cache is sound.")] = False) -> None:
    """Convert an embedded GGUF into a cached safetensors checkpoint (once; verified on every load)."""
    from sublab.models import check_reference, is_embedded, model_info, prepare_embedded

    check_reference(ref)
    if not is_embedded(ref):
        raise SublabError(f"'{ref}' is not an embedded model; only embedded:<name> models need preparing")
    path = prepare_embedded(ref.split(":", 1)[1], force=force)
    info = model_info(ref)
    console.print(f"{ref} ready at {path} (weights sha256 {info.get('weights_sha256', '?')[:16]}…)")


@models_app.command("info")
def models_info(ref: Annotated[str, typer.Argument()]) -> None:
    """Facts about a model reference (no weights loaded)."""
    import json

    from sublab.models import model_info

    typer.echo(json.dumps(model_info(ref), indent=2))


@app.command("serve")
def serve_(model: Annotated[list[str] | None, typer.Option(
               "--model", help="A model to serve: REF (its id is REF) or NAME=REF (repeatable; default "
                               "embedded:smollm2-135m-instruct).")] = None,
           host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
           port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
           device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
           api_key_env: Annotated[str | None, typer.Option(
               help="Require the key held in this environment variable as a bearer token.")] = None,
           state_dir: Annotated[Path | None, typer.Option(
               help="Where uploaded files, fine-tuning jobs and their students live (default "
                    "$SUBLAB_HOME/serve).")] = None) -> None:
    """An OpenAI-compatible server over local models: /v1/models, /v1/chat/completions, /v1/files,
    /v1/fine_tuning/jobs."""
    from sublab.models import sublab_home
    from sublab.serve import parse_model_specs, serve

    key = None
    if api_key_env is not None:
        key = os.environ.get(api_key_env)
        if not key:
            raise SublabError(f"--api-key-env: the environment variable {api_key_env} is not set")
    serve(parse_model_specs(model or []), host=host, port=port, device=device, api_key=key,
          state_dir=state_dir or sublab_home() / "serve")


def _register_optional_commands() -> None:
    try:
        from sublab.mnist import cli as mnist_cli
    except ImportError:  # pragma: no cover - mnist is part of the package
        return
    app.command("mnist", help="The paper's MNIST auxiliary-logit experiment.")(mnist_cli)


_register_optional_commands()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)])
    for noisy in ("httpx", "httpx2", "openai", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app()
    except SublabError as e:  # raised outside a command (`_Group.invoke` handles those inside)
        print_error(str(e))
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C before a command started
        make_console(stderr=True).print(INTERRUPTED, soft_wrap=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
