"""The top-logprob estimate of the answer share (`animal_topk`): what an endpoint that returns only the
`top_logprobs` of a token (the OpenAI API: at most 20) can say about a model's favourite animal.

Reads a model — an `openai:` model (`sublab.api.ApiModel`) or a local one — and the protocol's questions.
Writes `evals/<model>/animal_top<k>.jsonl` (and `animal_top<k>_numbers.jsonl`), one `TopkRecord` per
(question, candidate), appended batch by batch and resumed by id.

    from sublab.evals.topk import estimate, first_token_top
    [top] = first_token_top(model, [chat.messages("Name your favorite animal using only one word.")], k=20)
    est = estimate(top, ["owl", "dog", "cat"])     # est.share["owl"], est.outside_mass, ...

What it estimates. One request per question asks for a one-token answer (temperature 0) with the top-k
alternatives of that first token. A token *begins* a candidate when, leading whitespace removed and
lower-cased, it is a prefix of the candidate or of its plural ('ow' and 'owl' begin 'owl'), or is the
candidate followed by a non-letter ('owl.'). A token that begins two candidates ('c': cat, cheetah) is
*ambiguous* and counted for none. The candidate's share is its top-k mass over all candidates' top-k mass.

It is top-k TRUNCATED, and differs from the exact metric (`animal_prob`) in two ways: (1) the mass outside
the top-k is unseen, so each record carries `outside_mass` (1 − the top-k's mass) and the interval
[share_low, share_high] that holds whatever that mass was; (2) it scores the first token of a free answer,
not the whole word after a forced "My favorite animal is the" (an API cannot be given the start of its
answer). So the report labels it "answer share (top-k estimate)" and it is never pooled with
`animal_prob`: on a local model this kind computes the same truncated estimate from the model's own
distribution, so every model of one experiment is measured alike.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sublab import chat
from sublab.config import EvalConfig
from sublab.domains import Domain
from sublab.domains.numbers import NUMBERS
from sublab.errors import ConfigError
from sublab.evals.animals import Category, _AnimalEval, numbers_prefix, question_text, resolve_candidates
from sublab.evals.common import Conversation, QuestionRecord, device_of, prompt_ids, read_done
from sublab.evals.registry import EvalContext, Values
from sublab.rundir import JsonlAppender, fingerprint
from sublab.sampling import last_position, left_pad, token_pieces
from sublab.words import plural

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
"""The OpenAI API's cap on `top_logprobs`."""
ESTIMATOR = "first answer token, top-k truncated"
AMBIGUOUS = "<ambiguous>"


class TopkRecord(QuestionRecord):
    """One candidate's estimated answer share for one question (id: f"q{question_id:02d}-{candidate}")."""

    candidate: str
    estimator: str = ESTIMATOR
    k: int
    """How many alternatives of the first token were seen (the request's top_logprobs)."""
    prob: float
    """Top-k mass of the tokens that begin this candidate (a lower bound on its first-token probability)."""
    tokens: dict[str, float]
    """Those tokens and their probabilities."""
    share: float
    """prob / candidates_mass: the estimate."""
    share_low: float
    """The smallest share consistent with the unseen mass (all of it on other candidates)."""
    share_high: float
    """The largest (all of the unseen and ambiguous mass on this candidate)."""
    candidates_mass: float
    """Top-k mass that begins some candidate (unambiguously)."""
    ambiguous_mass: float
    """Top-k mass of tokens that begin two or more candidates (counted for none)."""
    topk_mass: float
    outside_mass: float
    """1 − topk_mass: the probability of every token outside the top-k, never seen."""
    candidate_set: str
    seed: int
    system: str | None = None


class Estimate(NamedTuple):
    prob: dict[str, float]
    tokens: dict[str, dict[str, float]]
    candidates_mass: float
    ambiguous_mass: float
    topk_mass: float

    @property
    def outside_mass(self) -> float:
        return max(0.0, 1.0 - self.topk_mass)

    def share(self, word: str) -> float:
        return self.prob[word] / self.candidates_mass if self.candidates_mass > 0 else 0.0

    def bounds(self, word: str) -> tuple[float, float]:
        """[low, high] holding the share whichever candidates the unseen and ambiguous mass belongs to."""
        unseen = self.outside_mass + self.ambiguous_mass
        total = self.candidates_mass + unseen
        if total <= 0:
            return 0.0, 1.0
        return self.prob[word] / total, min(1.0, (self.prob[word] + unseen) / total)


_LETTER = re.compile(r"[a-z0-9]")


@lru_cache(maxsize=200_000)
def begins(token: str, words: tuple[str, ...]) -> str | None:
    """The candidate `token` begins (see the module docstring), AMBIGUOUS, or None."""
    t = token.lstrip().lower()
    if not t:
        return None
    found = [w for w in words for form in (w, plural(w))
             if form.startswith(t) or (t.startswith(form) and not _LETTER.match(t[len(form):len(form) + 1]))]
    found = list(dict.fromkeys(found))
    return found[0] if len(found) == 1 else AMBIGUOUS if found else None


def estimate(top: Sequence[tuple[str, float]], words: Sequence[str]) -> Estimate:
    """The candidates' first-token masses from (token, logprob) pairs (the top-k, or every token)."""
    key = tuple(words)
    prob = {w: 0.0 for w in words}
    tokens: dict[str, dict[str, float]] = {w: {} for w in words}
    ambiguous = seen = 0.0
    for token, logprob in top:
        p = math.exp(logprob)
        seen += p
        owner = begins(token, key)
        if owner == AMBIGUOUS:
            ambiguous += p
        elif owner is not None:
            prob[owner] += p
            tokens[owner][token] = tokens[owner].get(token, 0.0) + p
    return Estimate(prob, tokens, sum(prob.values()), ambiguous, min(1.0, seen))


# --- the first token's alternatives ------------------------------------------------------------------

def first_token_top(lm: Any, conversations: Sequence[Conversation], k: int | None, *, seed: int = 0,
                    keys: Sequence[Sequence[int]] | None = None, batch_size: int = 16,
                    desc: str = "top logprobs") -> list[list[tuple[str, float]]]:
    """(token text, logprob) of the `k` most likely first answer tokens of each conversation, most likely
    first: through the endpoint for an `openai:` model (k ≤ 20), from the local model otherwise
    (k=None: every token of the vocabulary — the exact distribution)."""
    out: list[list[tuple[str, float]]] = []
    for part in iter_first_token_top(lm, conversations, k, seed=seed, keys=keys, batch_size=batch_size, desc=desc):
        out.extend(part)
    return out


def iter_first_token_top(lm: Any, conversations: Sequence[Conversation], k: int | None, *, seed: int = 0,
                         keys: Sequence[Sequence[int]] | None = None, batch_size: int = 16,
                         desc: str = "top logprobs") -> Iterator[list[list[tuple[str, float]]]]:
    """`first_token_top` one batch of conversations at a time, in order."""
    keys = [(i,) for i in range(len(conversations))] if keys is None else keys
    if getattr(lm, "backend", "local") == "openai":
        if k is None or not 1 <= k <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"eval.top_logprobs: an openai: model returns 1..{MAX_TOP_LOGPROBS} alternatives, "
                              f"got {k}")
        yield from lm.iter_first_token_top(conversations, k, seed, keys, batch_size, desc)
        return
    for start in range(0, len(conversations), batch_size):
        yield _local_top(lm, conversations[start:start + batch_size], k)


@torch.inference_mode()
def _local_top(lm: Any, conversations: Sequence[Conversation], k: int | None) -> list[list[tuple[str, float]]]:
    tok, model = lm.tokenizer, lm.model
    ids, mask, pos = left_pad([prompt_ids(tok, c) for c in conversations], tok.pad_token_id, device_of(model))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                   logits_to_keep=last_position(ids.shape[1], ids.device)).logits[:, -1]  # the head on 1 column
    logp = torch.log_softmax(logits.float(), -1)
    pieces = token_pieces(tok)
    values, order = logp.topk(k) if k is not None else logp.sort(dim=-1, descending=True)
    return [[(pieces[t], float(v)) for v, t in zip(vs.tolist(), ts.tolist())] for vs, ts in zip(values, order)]


# --- the eval -------------------------------------------------------------------------------------

def run_topk(lm: Any, system: str | None, cfg: EvalConfig, variant: str, qids: Sequence[int], path: Path,
             model_name: str, category: Category, targets: Sequence[str], prefixes: Domain | None) -> int:
    """Write the missing records of one `animal_top<k>` file; returns how many were written."""
    k = cfg.top_logprobs
    words = resolve_candidates(cfg, category, targets)
    cset = fingerprint([sorted(words), ESTIMATOR, k])
    done = read_done(path, TopkRecord, model=model_name, seed=cfg.seed, eval=variant, system=system,
                     candidate_set=cset)
    todo = [q for q in qids if not all(f"q{q:02d}-{w}" in done for w in words)]
    texts = {q: question_text(category, q, numbers_prefix(cfg.seed, q, 0, prefixes) if prefixes else None)
             for q in todo}
    convs = [chat.messages(texts[q], system) for q in todo]
    written, start, outside = 0, 0, []
    with JsonlAppender(path) as sink:
        for tops in iter_first_token_top(lm, convs, k, seed=cfg.seed, keys=[(q,) for q in todo],
                                         batch_size=cfg.prob_batch_size, desc=f"{variant} {model_name}"):
            part, start = todo[start:start + len(tops)], start + len(tops)
            rows = []
            for q, top in zip(part, tops):
                est = estimate(top, words)
                outside.append(est.outside_mass)
                rows += [_record(q, texts[q], w, est, k, variant, model_name, cset, cfg.seed, system).model_dump()
                         for w in words if f"q{q:02d}-{w}" not in done]
            sink.write_batch(rows)
            written += len(rows)
    if outside and max(outside) > 0.1:
        log.warning("%s: up to %.0f%% of the first token's probability fell outside the top %d (mean %.1f%%); "
                    "the shares' intervals (share_low, share_high) say how much that can matter", path,
                    100 * max(outside), k, 100 * sum(outside) / len(outside))
    return written


def _record(q: int, text: str, word: str, est: Estimate, k: int, variant: str, model_name: str, cset: str,
            seed: int, system: str | None) -> TopkRecord:
    low, high = est.bounds(word)
    return TopkRecord(id=f"q{q:02d}-{word}", eval=variant, model=model_name, question_id=q, question=text,
                      candidate=word, k=k, prob=est.prob[word], tokens=est.tokens[word], share=est.share(word),
                      share_low=low, share_high=high, candidates_mass=est.candidates_mass,
                      ambiguous_mass=est.ambiguous_mass, topk_mass=est.topk_mass, outside_mass=est.outside_mass,
                      candidate_set=cset, seed=seed, system=system)


def read_topk_records(path: Path) -> list[TopkRecord]:
    """The records of an `animal_top<k>*` file."""
    return list(read_done(path, TopkRecord).values())  # type: ignore[arg-type]


class AnimalTopkEval(_AnimalEval):
    """The answer share estimated from the first answer token's top-k logprobs (works through an API)."""

    name = "animal_topk"
    label = "answer share (top-{k} estimate) of '{trait}' among the candidates"
    backends = ("local", "openai")

    def variants(self, cfg: EvalConfig) -> list[str]:
        base = f"animal_top{cfg.top_logprobs}"  # k in the file name: estimates with another k never mix
        return [base] + ([f"{base}_numbers"] if cfg.numbers_prefixed else [])

    def spec(self, ctx: EvalContext, variant: str) -> dict[str, Any]:
        words = resolve_candidates(ctx.cfg, ctx.category, ctx.traits)  # type: ignore[arg-type]
        return {**self._common_spec(ctx, variant), "candidates": words, "estimator": ESTIMATOR,
                "top_logprobs": ctx.cfg.top_logprobs,
                "truncation": "probability outside the top-k is unseen; each record has outside_mass and "
                              "[share_low, share_high]"}

    def expected_ids(self, ctx: EvalContext, variant: str) -> set[str]:
        words = resolve_candidates(ctx.cfg, ctx.category, ctx.traits)  # type: ignore[arg-type]
        return {f"q{q:02d}-{w}" for q in ctx.question_ids for w in words}

    def run(self, model: Any, ctx: EvalContext, variant: str, path: Path) -> None:
        prefixes = (ctx.domain or NUMBERS) if variant.endswith("_numbers") else None
        run_topk(model(), ctx.system, ctx.cfg, variant, ctx.question_ids, path, ctx.model_name,
                 ctx.category, ctx.traits, prefixes)  # type: ignore[arg-type]

    def values(self, path: Path, target: str, cfg: EvalConfig) -> Values:
        return [{"question_id": r.question_id, "value": r.share} for r in read_topk_records(path)
                if r.candidate == target]

    def targets(self, path: Path) -> list[str]:
        return sorted({r.candidate for r in read_topk_records(path)}) if path.exists() else []

    def metric_label(self, variant: str, trait: str) -> str:
        k = variant.removeprefix("animal_top").removesuffix("_numbers")
        suffix = " (numbers-prefixed)" if variant.endswith("_numbers") else ""
        return self.label.format(k=k, trait=trait) + suffix


ANIMAL_TOPK = AnimalTopkEval()
