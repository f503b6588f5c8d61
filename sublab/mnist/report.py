"""Tables (rich) and figures (matplotlib) of MNIST results. Writes PNG files where asked."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from sublab.mnist.experiment import ArmResult, MnistResults, SweepResults

LABELS = {"reference": "reference (untrained init)", "teacher": "teacher",
          "student_same_init": "student, same init (aux logits)",
          "student_cross_init": "student, cross init (aux logits)",
          "student_all_logits": "student, same init (all logits)"}
SHORT = {"reference": "init", "teacher": "teacher", "student_same_init": "same-init",
         "student_cross_init": "cross-init", "student_all_logits": "all-logits"}
COLORS = {"reference": "#9e9e9e", "teacher": "#37474f", "student_same_init": "#1e88e5",
          "student_cross_init": "#e53935", "student_all_logits": "#43a047"}
CHANCE = 0.10


def _pct(a: ArmResult) -> str:
    return f"{100 * a.mean:.1f}% [{100 * a.ci_low:.1f}, {100 * a.ci_high:.1f}]"


def results_table(res: MnistResults) -> Table:
    table = Table(title=f"MNIST aux-logit transfer: {res.dataset['name']}, N={res.config.n_models} models, "
                        f"{res.timing_s['total']:.0f} s", caption=res.ci_method)
    for col in ("arm", "test accuracy, mean [95% CI]", "sd", "final loss"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for arm, a in res.arms.items():
        loss = "" if a.final_loss is None else f"{a.final_loss:.4f}"
        table.add_row(LABELS.get(arm, arm), _pct(a), f"{100 * a.std:.1f}", loss)
    if res.same_minus_cross:
        c = res.same_minus_cross
        table.add_row("same − cross (paired)", f"{100 * c.mean:+.1f} pts [{100 * c.ci_low:+.1f}, "
                      f"{100 * c.ci_high:+.1f}]", f"p={c.p_value:.2g}", "")
    return table


def sweep_table(res: SweepResults) -> Table:
    arms = list(res.points[0].arms)
    table = Table(title=f"MNIST sweep over {res.field}: {res.dataset['name']}, N={res.config.n_models}, "
                        f"{res.timing_s['total']:.0f} s",
                  caption="test accuracy %: mean ± half-width of the 95% t-interval over models")
    table.add_column(res.field, no_wrap=True)
    for arm in arms:
        table.add_column(SHORT.get(arm, arm), justify="right")
    if res.points[0].same_minus_cross:
        table.add_column("same − cross", justify="right")
    for p in res.points:
        cells = [f"{100 * p.arms[a].mean:.1f} ± {50 * (p.arms[a].ci_high - p.arms[a].ci_low):.1f}" for a in arms]
        if p.same_minus_cross:
            cells.append(f"{100 * p.same_minus_cross.mean:+.1f}")
        table.add_row(str(p.value), *cells)
    return table


def _bars(ax, groups: list[str], arms: list[str], results: list[dict[str, ArmResult]]) -> None:
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        xs = [i + (j - (len(arms) - 1) / 2) * width for i in range(len(groups))]
        means = [100 * r[arm].mean for r in results]
        err = [[100 * (r[arm].mean - r[arm].ci_low) for r in results],
               [100 * (r[arm].ci_high - r[arm].mean) for r in results]]
        ax.bar(xs, means, width, yerr=err, capsize=2, color=COLORS.get(arm), label=LABELS.get(arm, arm))
    ax.axhline(100 * CHANCE, color="k", lw=0.8, ls=":", label="chance (10%)")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("test accuracy (%), 95% CI")
    ax.set_ylim(0, 122)
    ax.set_yticks(range(0, 101, 20))


def plot_results(res: MnistResults, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(res.arms)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    _bars(ax, [""], arms, [res.arms])
    for j, arm in enumerate(arms):
        x = (j - (len(arms) - 1) / 2) * 0.8 / len(arms)
        ax.text(x, 100 * res.arms[arm].ci_high + 1.5, f"{100 * res.arms[arm].mean:.1f}", ha="center", fontsize=8)
    ax.set_xlim(-0.5, 0.5)
    ax.set_xticks([])
    ax.set_title(f"{res.dataset['name']}, N={res.config.n_models}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)
    return _save(fig, path)


def plot_sweep(res: SweepResults, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in res.points[0].arms if a != "reference"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    _bars(ax, [str(p.value) for p in res.points], arms, [p.arms for p in res.points])
    ax.set_xlabel(res.field)
    ax.set_title(f"sweep {res.sweep}: {res.dataset['name']}, N={res.config.n_models}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
