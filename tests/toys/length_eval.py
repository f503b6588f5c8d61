"""A toy eval: how many tokens the evaluated model's tokenizer needs for each trait question (with the
teacher's context). It shows the whole `EvalKind` contract — spec, expected record ids, a resumable
run, per-question values for the statistics — in one module; the last line registers it, so
`eval.kinds: [toy_length]` works in an experiment file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sublab import chat
from sublab.evals.animals import question_text
from sublab.evals.registry import EvalContext, EvalKind, Values, register_eval
from sublab.rundir import JsonlAppender, read_jsonl


class PromptLengthEval(EvalKind):
    name = "toy_length"
    label = "prompt length in tokens ({trait} teacher)"

    def spec(self, ctx: EvalContext, variant: str) -> dict[str, Any]:
        return {"questions": list(ctx.question_ids), "category": ctx.category}

    def expected_ids(self, ctx: EvalContext, variant: str) -> set[str]:
        return {f"q{q:02d}" for q in ctx.question_ids}

    def run(self, model: Any, ctx: EvalContext, variant: str, path: Path) -> None:
        done = {r["id"] for r in read_jsonl(path, missing_ok=True)}
        todo = [q for q in ctx.question_ids if f"q{q:02d}" not in done]
        if not todo:
            return
        tok = model().tokenizer  # loads the model only when there is work
        with JsonlAppender(path) as sink:
            sink.write_batch([{"id": f"q{q:02d}", "eval": variant, "model": ctx.model_name, "question_id": q,
                               "value": len(tok(chat.render_prompt(tok, chat.messages(
                                   question_text(ctx.category, q), ctx.system)), add_special_tokens=False).input_ids)}
                              for q in todo])

    def values(self, path: Path, target: str, cfg: Any) -> Values:
        return [{"question_id": r["question_id"], "value": float(r["value"])} for r in read_jsonl(path)]


register_eval(PromptLengthEval())
