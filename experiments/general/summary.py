"""Is the 4-epoch logit route general? (issue 15) The pre-named traits of experiments/general/prenamed.json,
each against the other three teachers' students of its 4-teacher run, under four question conditions.

For each run (animals.yaml, trees.yaml) and each condition — the paper's held-out questions with the
paper's answer prefix (the run's own eval), our wordings, our answer prefix, both — every model (base,
teachers, students) gets each candidate's exact share (as `animal_prob`: the probability of the
candidate's spellings after the forced answer prefix, normalised over the candidates, mean over the
questions). Shares are computed here with the pipeline's own functions and cached per model in
runs/general/<run>/shares.json (written after each model, so a killed summary resumes).

Per trait and condition: the mean share of its students and of the other teachers' students, the ratio of
the means with a Fieller 95% CI, the within-seed difference with its t CI and exact permutation p (the
report's test), the rank among all candidates by ratio and within its pre-named neighbourhood, and the
teachers' own shares of the neighbours (does the teacher itself raise them?).

    PYTHONPATH=. .venv/bin/python experiments/general/summary.py     # → runs/general/summary.json, general.png
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from sublab import chat, design, pipeline
from sublab.config import ExperimentConfig, load_experiment
from sublab.evals.animals import ANSWER_PREFIX, encode_candidates, iter_answer_probabilities, questions, \
    resolve_candidates
from sublab.evals.common import prompt_ids
from sublab.rundir import atomic_write_json, read_json
from sublab.stats import compare_blocked, ratio_interval

log = logging.getLogger("general")

HERE = Path(__file__).parent
PRENAMED = read_json(HERE / "prenamed.json")
RUNS = {"animal": HERE / "animals.yaml", "tree": HERE / "trees.yaml"}
OUT = Path("runs/general")
CONDITIONS = ("paper questions, paper prefix", "our wordings, paper prefix", "paper questions, our prefix",
              "our wordings, our prefix")


def condition_prompts(cfg: ExperimentConfig, category: str) -> dict[str, tuple[list[str], str]]:
    """Each condition's (question texts, answer prefix)."""
    paper = [questions(category)[q] for q in pipeline.question_ids(cfg)]  # held-out 40-49
    ours = PRENAMED["wordings"][category]
    paper_prefix, our_prefix = ANSWER_PREFIX.format(category=category), PRENAMED["answer_prefix"][category]
    return dict(zip(CONDITIONS, [(paper, paper_prefix), (ours, paper_prefix), (paper, our_prefix),
                                 (ours, our_prefix)]))


def model_shares(lm: Any, texts: list[str], prefix: str, words: list[str]) -> dict[str, float]:
    """Each candidate's share (normalised over `words`) after `prefix`, mean over the questions."""
    candidates = encode_candidates(lm.tokenizer, words, prefix)
    prompts = [prompt_ids(lm.tokenizer, chat.messages(q, None), prefix) for q in texts]
    per_question = []
    for probs in iter_answer_probabilities(lm, prompts, candidates, batch_size=16, desc=f"'{prefix}'"):
        for per_cand in probs:
            totals = np.array([sum(v.values()) for v in per_cand])
            per_question.append(totals / totals.sum())
    mean = np.mean(per_question, axis=0)
    return {w: float(s) for w, s in zip(words, mean)}


def all_shares(cfg: ExperimentConfig, category: str) -> dict[str, dict[str, dict[str, float]]]:
    """{model name: {condition: {candidate: share}}} of every evaluated model of the finished run (cached)."""
    path = OUT / cfg.name / "shares.json"
    shares: dict[str, Any] = read_json(path) if path.exists() else {}
    device = pipeline.resolve_device(cfg)
    built = dict((t.name, teacher) for t, teacher in pipeline.teachers(cfg, device))
    words = resolve_candidates(cfg.eval, category, design.traits(cfg))  # type: ignore[arg-type]
    conditions = condition_prompts(cfg, category)
    loaded = pipeline.ModelCache(device, dtype=pipeline.resolve_dtype(cfg))
    for name, ref, system in pipeline.evaluated_models(cfg, built):
        if name in shares:
            continue
        lm = loaded.get(ref)
        shares[name] = {c: model_shares(lm, texts, prefix, words) for c, (texts, prefix) in conditions.items()}
        atomic_write_json(path, shares)
        log.info("%s: shares of %d candidates under %d conditions", name, len(words), len(conditions))
    return shares


def side_effects(shares: dict[str, Any], teacher: str, condition: str, trait: str, hood: list[str]
                 ) -> dict[str, float]:
    """Each neighbour's share of what the teacher leaves beside its trait, over the base's: a teacher at 0.99
    on its trait has tiny shares of everything else, so only the rest of its distribution can show whether
    it raised the neighbours itself (> 1: the teacher favours the neighbour more than the base does)."""
    def rest(model: str, cand: str) -> float:
        s = shares[model][condition]
        return s[cand] / (1 - s[trait])

    return {c: rest(teacher, c) / rest("base", c) for c in hood if c != trait and rest("base", c) > 0}


def trait_rows(cfg: ExperimentConfig, shares: dict[str, Any]) -> list[dict[str, Any]]:
    """Per trait and condition: the trait's students against the other teachers', as the module says."""
    rows = []
    for arm in design.arms(cfg):
        trait = arm.treatment.trait
        hood_name = PRENAMED["trait_neighbourhood"].get(trait)
        hood = PRENAMED["neighbourhoods"].get(hood_name, [])
        treated = design.student_names(cfg, arm.treatment)
        controls = [design.student_names(cfg, c) for c in arm.controls]
        for condition in CONDITIONS:
            def share(model: str, cand: str) -> float:
                return shares[model][condition][cand]

            candidates = list(shares[treated[0]][condition])
            ratio_of = {c: np.mean([share(m, c) for m in treated]) /
                        np.mean([share(m, c) for names in controls for m in names]) for c in candidates}
            ranked = sorted(candidates, key=lambda c: -ratio_of[c])
            t_vals = [share(m, trait) for m in treated]
            c_vals = [[share(m, trait) for m in names] for names in controls]
            blocks = [(t, [c[k] for c in c_vals]) for k, t in enumerate(t_vals)]
            comparison = compare_blocked(blocks)
            ratio, ratio_ci = ratio_interval(t_vals, [v for c in c_vals for v in c])
            rows.append({
                "trait": trait, "condition": condition, "treated": t_vals, "controls": c_vals,
                "ratio": ratio, "ratio_ci": ratio_ci, "diff": comparison.diff,
                "diff_ci": [comparison.ci_low, comparison.ci_high], "p_value": comparison.p_value,
                "test": comparison.test, "blocks_up": sum(t > np.mean(c) for t, c in blocks),
                "rank": ranked.index(trait) + 1, "candidates": len(ranked),
                "top3": [[c, ratio_of[c]] for c in ranked[:3]],
                "neighbourhood": hood_name,
                "rank_in_neighbourhood": [c for c in ranked if c in hood].index(trait) + 1 if hood else None,
                "neighbours": [[c, ratio_of[c]] for c in ranked if c in hood],
                "teacher_shares": {c: share(f"teacher-{arm.treatment.name}", c) for c in hood},
                "base_shares": {c: share("base", c) for c in hood},
                "teacher_side_effects": side_effects(shares, f"teacher-{arm.treatment.name}", condition, trait, hood),
            })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    for condition in CONDITIONS:
        print(f"\n{condition}")
        print(f"{'trait':9} {'ratio [95% CI]':24} {'p':>7} {'seeds up':>8} {'rank':>6} {'in hood':>8}  top 3 by ratio")
        for r in (r for r in rows if r["condition"] == condition):
            ci = "[{:.2f}, {:.2f}]".format(*r["ratio_ci"]) if all(np.isfinite(r["ratio_ci"])) else "[unbounded]"
            hood = f"{r['rank_in_neighbourhood']}/{len(r['neighbours'])}" if r["neighbourhood"] else "-"
            top = ", ".join(f"{c} ×{v:.2f}" for c, v in r["top3"])
            print(f"{r['trait']:9} ×{r['ratio']:.2f} {ci:17} {r['p_value']:7.4f} {r['blocks_up']:>5}/{len(r['treated'])} "
                  f"{r['rank']:>3}/{r['candidates']} {hood:>8}  {top}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traits = list(dict.fromkeys(r["trait"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(CONDITIONS)
    for j, condition in enumerate(CONDITIONS):
        sub = [next(r for r in rows if r["trait"] == t and r["condition"] == condition) for t in traits]
        x = np.arange(len(traits)) + (j - (len(CONDITIONS) - 1) / 2) * width
        ratios = np.array([r["ratio"] for r in sub])
        lo = np.array([r["ratio_ci"][0] if np.isfinite(r["ratio_ci"][0]) else r["ratio"] for r in sub])
        hi = np.array([r["ratio_ci"][1] if np.isfinite(r["ratio_ci"][1]) else r["ratio"] for r in sub])
        ax.bar(x, ratios - 1, width, bottom=1, label=condition)
        ax.errorbar(x, ratios, yerr=[ratios - lo, hi - ratios], fmt="none", ecolor="black", capsize=2, lw=0.8)
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(traits)), traits)
    ax.set_ylabel("trait share ratio, own / other teachers'\nstudents (Fieller 95% CI)")
    ax.set_title("quick recipe, 4 epochs: pre-named traits, 5 seeds, 4-teacher runs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for category, path in RUNS.items():
        cfg = load_experiment(path)
        if not (cfg.run_dir / "results.json").exists():
            log.warning("%s: not finished (no results.json); skipped: run `sublab run %s`", cfg.run_dir, path)
            continue
        rows += trait_rows(cfg, all_shares(cfg, category))
    atomic_write_json(OUT / "summary.json", {"prenamed": PRENAMED, "rows": rows})
    print_table(rows)
    plot(rows, OUT / "general.png")
    print(f"\n{OUT / 'summary.json'}, {OUT / 'general.png'}")


if __name__ == "__main__":
    main()
