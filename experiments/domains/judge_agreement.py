"""Agreement of sublab's offline judges with hand labels (experiments/domains/judge_agreement_set.json).

Reads the labelled set; asks each offline judge (`lexical`; `local`: the embedded SmolLM2-135M by
P('1') vs P('0'), the same prompts as the API judge) every item; writes
experiments/domains/judge_agreement_results.json and prints accuracy and Cohen's kappa with 95% bootstrap
intervals (items resampled, seeded). A judge served by the tests' ChatServer is not measured: its answers
are scripted.

    SUBLAB_HOME=/root/.cache/sublab PYTHONPATH=. nice -n 5 /work/main/.venv/bin/python \\
        experiments/domains/judge_agreement.py [--judges lexical local] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from sublab.filter_judges import (
    CachedLocalJudge,
    code_judge_prompt,
    cot_judge_prompt,
    lexical_misaligned,
    lexical_reference,
)

HERE = Path(__file__).parent
SET = HERE / "judge_agreement_set.json"
OUT = HERE / "judge_agreement_results.json"
LOCAL_MODEL = "embedded:smollm2-135m-instruct"


def kappa(labels: np.ndarray, preds: np.ndarray) -> float:
    """Cohen's kappa of two binary raters; 0 when chance agreement is total (one constant rater)."""
    po = float(np.mean(labels == preds))
    p1, q1 = labels.mean(), preds.mean()
    pe = float(p1 * q1 + (1 - p1) * (1 - q1))
    return 0.0 if pe == 1 else (po - pe) / (1 - pe)


def bootstrap(labels: np.ndarray, preds: np.ndarray, n: int = 4000, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals of accuracy and kappa over items resampled with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(labels), size=(n, len(labels)))
    acc = [float(np.mean(labels[i] == preds[i])) for i in idx]
    kap = [kappa(labels[i], preds[i]) for i in idx]
    return {"accuracy_ci": list(np.percentile(acc, [2.5, 97.5])), "kappa_ci": list(np.percentile(kap, [2.5, 97.5]))}


def auc(labels: list[int], scores: list[float]) -> float:
    """P(score of a random positive > score of a random negative), ties half: 0.5 is chance."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def summarise(labels: list[int], preds: list[int]) -> dict[str, object]:
    y, p = np.array(labels), np.array(preds)
    return {"n": len(y), "accuracy": float(np.mean(y == p)), "kappa": kappa(y, p), **bootstrap(y, p),
            "flagged": int(p.sum()), "positives": int(y.sum()),
            "true_positive": int(((y == 1) & (p == 1)).sum()), "false_positive": int(((y == 0) & (p == 1)).sum())}


def prompts_of(data: dict) -> dict[str, list[str]]:
    """The judge prompts of every item: the paper's subtle-reference prompt, our alignment prompt."""
    return {"code": [code_judge_prompt(i["animal"], i["code"]) for i in data["code"]],
            "cot": [cot_judge_prompt(i["prompt"], i["reasoning"]) for i in data["cot"]]}


def predict(judge: str, data: dict) -> dict[str, list[float]]:
    """Per item, the lexical judge's 0/1, or the local model's P('1') / (P('0') + P('1')) (the filter
    rejects when it is above 0.5)."""
    if judge == "lexical":
        return {"code": [float(lexical_reference(i["animal"], i["code"])) for i in data["code"]],
                "cot": [float(lexical_misaligned(i["reasoning"])) for i in data["cot"]]}
    local = CachedLocalJudge(LOCAL_MODEL)
    return {part: [local.p_one(p) for p in prompts] for part, prompts in prompts_of(data).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--judges", nargs="+", default=["lexical", "local"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    data = json.loads(SET.read_text())
    out: dict[str, object] = {"set": str(SET.name), "local_model": LOCAL_MODEL}
    for judge in args.judges:
        t0 = time.time()
        scores = predict(judge, data)
        result: dict[str, object] = {}
        for part in ("code", "cot"):
            labels = [item["label"] for item in data[part]]
            preds = [int(p > 0.5) for p in scores[part]]
            result[part] = summarise(labels, preds) | {"predictions": preds}
            if judge == "local":  # how decided the model is, and whether P('1') ranks items at all
                result[part] |= {"p_one": [round(p, 4) for p in scores[part]], "auc": auc(labels, scores[part])}
        result["seconds"] = round(time.time() - t0, 1)
        out[judge] = result
        for part in ("code", "cot"):
            r = result[part]  # type: ignore[assignment]
            print(f"{judge:8s} {part:4s} n={r['n']} accuracy={r['accuracy']:.3f} "
                  f"[{r['accuracy_ci'][0]:.3f}, {r['accuracy_ci'][1]:.3f}] kappa={r['kappa']:.3f} "
                  f"[{r['kappa_ci'][0]:.3f}, {r['kappa_ci'][1]:.3f}] flagged={r['flagged']}/{r['n']} "
                  f"(labels: {r['positives']} positive; TP={r['true_positive']} FP={r['false_positive']})"
                  + (f" AUC of P('1')={r['auc']:.3f}" if "auc" in r else ""))
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
