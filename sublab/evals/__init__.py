"""Trait evaluations: each writes per-sample (or per-candidate) records to `evals/<model>/<kind>.jsonl`
and is scored with an uncertainty by `sublab.stats`.

- `sublab.evals.common`: `EvalRecord`, the seeded batched sampler, continuation log-probabilities.
- `sublab.evals.animals`: favourite animal/tree, sampled and exact-probability, optionally numbers-prefixed.
- `sublab.evals.misalignment`: free-form misalignment questions and judges.
"""
