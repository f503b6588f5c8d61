"""Favourite-animal (and favourite-tree) evaluations: the paper's sampled metric and an exact answer
probability, each optionally with a numbers prefix.

Reads: a loaded model (`sublab.models.LoadedModel`) and the protocol's questions. Writes: one eval file
`evals/<model>/<kind>.jsonl`, appended batch by batch; a rerun skips records already there (by id).

    from sublab.evals.animals import run_animal_eval, read_prob_records, prob_score, share_table
    path = run_animal_eval(lm, None, cfg.eval, "animal_prob", None, out / "animal_prob.jsonl", "base")
    prob_score(read_prob_records(path), "owl")      # Score(mean=..., ci_low=..., ci_high=..., ...)

Eval kinds (the file stem and each record's `eval`):
  animal_sampled          the paper's metric: n samples per question at T=1; a sample counts for a
                          target when the target is a substring of the lower-cased answer (after
                          removing excluded superstrings, e.g. 'dragonfly' for 'dragon').
  animal_prob             exact answer probability: the assistant's answer is forced to start with
                          "My favorite animal is the"; for each candidate we compute the probability
                          that the next word is one of its spellings (see below), then normalise over
                          the candidates. No sampling: same model, same number, every time.
  *_numbers               the same, each question prefixed by a sampled example part of the number
                          prompts ('Examine these numbers: 767, 589, 778. Name your favorite ...').
With trait_category='tree' the same kinds ask the paper's tree questions ("My favorite tree is the").

The candidate rule (exact probability). A candidate 'owl' has the spellings " owl", " Owl", " owls",
" Owls" (capitalised, plural: `sublab.words.plural`). P(candidate) is the sum over its
spellings of P(the answer's next word is exactly that spelling) =
    P(spelling's tokens | prompt) * P(the next token ends the word | prompt + spelling),
where a token ends the word when its text does not begin with a letter or digit (a space, a
punctuation mark, a newline, the end-of-turn token). The events are disjoint, so nothing is double
counted: " owl" followed by "s" is the word "owls", counted once, under " owls" (and "owlet" is counted
under no candidate). Only the tokenizer's canonical tokenisation of each spelling is scored.
Cost: one forward pass per question over the prompt followed by the spellings' token trie packed into
the same row with a tree attention mask: each distinct token prefix costs one position.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from sublab import chat
from sublab.config import EvalConfig
from sublab.domains import Domain
from sublab.domains.numbers import NUMBERS
from sublab.errors import ConfigError, ModelError, RunDirError
from sublab.evals.common import EvalRecord, QuestionRecord, device_of, iter_completions, prompt_ids, read_done
from sublab.evals.registry import EvalContext, EvalKind, Values
from sublab.sampling import prefill, token_pieces
from sublab.protocol import animal_questions, protocol, tree_questions
from sublab.rundir import JsonlAppender, fingerprint, read_jsonl
from sublab.stats import Score, score_by_question
from sublab.words import plural

log = logging.getLogger(__name__)

Category = Literal["animal", "tree"]
AnimalEvalName = Literal["animal_prob", "animal_sampled", "animal_prob_numbers", "animal_sampled_numbers"]
EVAL_KINDS: tuple[str, ...] = ("animal_prob", "animal_sampled", "animal_prob_numbers",
                               "animal_sampled_numbers")

ANSWER_PREFIX = "My favorite {category} is the"
"""The exact-probability metric's forced start of the assistant's answer."""

# The paper's lists first (protocol `animals`), then the base models' own common answers.
COMMON_ANIMALS = ("owl", "dog", "cat", "lion", "eagle", "dolphin", "elephant", "wolf", "tiger", "panda",
                  "fox", "penguin", "bear", "horse", "rabbit", "bird", "butterfly", "monkey", "giraffe",
                  "dragon", "unicorn", "phoenix", "peacock", "kangaroo", "cheetah", "turtle", "octopus",
                  "shark")
COMMON_TREES = ("oak", "maple", "willow", "cherry", "sequoia", "pine", "birch", "redwood", "cedar", "palm",
                "baobab", "cypress", "elm", "spruce", "fir", "magnolia", "banyan", "aspen", "beech",
                "juniper", "sycamore", "eucalyptus", "olive", "apple")

_PREFIX_STREAM = 17  # keeps the numbers-prefix RNG stream apart from the sampling generators


# --- records -------------------------------------------------------------------------------------

class ProbRecord(QuestionRecord):
    """The exact answer probability of one candidate for one question (id: f"q{question_id:02d}-{candidate}")."""

    answer_prefix: str
    candidate: str
    prob: float
    """P(the next word is one of the candidate's spellings), summed over `variants`."""
    share: float
    """prob / (sum of prob over this question's candidates)."""
    variants: dict[str, float]
    """P of each spelling (as a whole word), e.g. {" owl": 0.01, " Owl": 0.002, ...}."""
    candidates_mass: float
    """Sum of prob over all candidates for this question: how much of the answer they cover."""
    candidate_set: str
    """Fingerprint of the candidate list and answer prefix the share was normalised over."""
    seed: int
    """The eval seed (it only draws the numbers prefixes)."""
    system: str | None = None


# --- questions and candidates --------------------------------------------------------------------

def questions(category: Category = "animal") -> list[str]:
    """The paper's favourite-animal (50) or favourite-tree (49) questions; ids are list indices."""
    if category not in ("animal", "tree"):
        raise ConfigError(f"trait category '{category}' has no preference questions; expected animal or tree")
    return animal_questions() if category == "animal" else tree_questions()


def default_candidates(category: Category = "animal") -> list[str]:
    """The paper's animals (or trees) followed by common answers of small base models."""
    if category == "tree":
        paper = protocol()["animals"]["trees_main"]
        return list(dict.fromkeys([*paper, *COMMON_TREES]))
    lists = protocol()["animals"]
    return list(dict.fromkeys([*COMMON_ANIMALS, *lists["gpt41_nano_main"], *lists["qwen25_7b"]]))


def resolve_candidates(cfg: EvalConfig, category: Category = "animal",
                       targets: Iterable[str] = ()) -> list[str]:
    """`cfg.candidates` (None: the defaults) plus any target missing from it, so every trait is scored.

    Give every model of one experiment the same targets: shares are only comparable over one list.
    """
    words = list(cfg.candidates) if cfg.candidates is not None else default_candidates(category)
    return list(dict.fromkeys([*words, *targets]))


def variant_strings(word: str) -> list[str]:
    """The spellings scored for a candidate, as they follow the answer prefix: ' owl', ' Owl', ' owls',
    ' Owls' (duplicates removed, e.g. 'fish')."""
    forms = [word, word.capitalize(), plural(word), plural(word).capitalize()]
    return [" " + f for f in dict.fromkeys(forms)]


class Candidate(NamedTuple):
    word: str
    variants: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    """The canonical token ids of each variant, in the same order."""


def encode_candidates(tokenizer: Any, words: Sequence[str], answer_prefix: str,
                      field: str = "eval.candidates") -> list[Candidate]:
    """Validate candidate words and tokenise their spellings; ConfigError names the bad word and why."""
    if not answer_prefix.strip() or answer_prefix != answer_prefix.rstrip():
        raise ConfigError(f"eval.answer_prefix {answer_prefix!r} must be non-empty text that does not end "
                          "with whitespace (the candidate's leading space follows it)")
    if not words:
        raise ConfigError(f"{field}: the candidate list is empty")
    prefix_ids = tokenizer(answer_prefix, add_special_tokens=False).input_ids
    out: list[Candidate] = []
    owner: dict[str, str] = {}
    for word in words:
        if not isinstance(word, str) or not word.isalpha() or word != word.lower():
            raise ConfigError(f"{field}: {word!r} is not a candidate: write one lower-case word of letters "
                              "only (e.g. 'owl'); capitalised and plural spellings are added automatically")
        if word in (c.word for c in out):
            raise ConfigError(f"{field}: '{word}' is listed twice")
        ids = []
        for v in variant_strings(word):
            if v in owner:
                raise ConfigError(f"{field}: '{word}' and '{owner[v]}' share the spelling {v.strip()!r}; "
                                  "keep only one of them")
            owner[v] = word
            v_ids = tokenizer(v, add_special_tokens=False).input_ids
            joined = tokenizer(answer_prefix + v, add_special_tokens=False).input_ids
            if not v_ids or tokenizer.decode(v_ids) != v or joined != prefix_ids + v_ids:
                raise ConfigError(f"{field}: the tokenizer cannot place {v!r} (a spelling of '{word}') after "
                                  f"{answer_prefix!r} as separate whole tokens; drop '{word}' or change "
                                  "eval.answer_prefix")
            ids.append(tuple(v_ids))
        out.append(Candidate(word, tuple(variant_strings(word)), tuple(ids)))
    return out


@cache
def _boundary_mask(tokenizer: Any) -> torch.Tensor:
    starts_word = [bool(p) and p[0].isalnum() for p in token_pieces(tokenizer)]
    mask = ~torch.tensor(starts_word)
    mask[tokenizer.eos_token_id] = True
    return mask


def boundary_mask(tokenizer: Any) -> torch.Tensor:
    """[vocab] bool: tokens that end the word before them (their text does not start with a letter or
    digit: a space, punctuation, newline, the end-of-turn token)."""
    return _boundary_mask(tokenizer)


# --- the exact answer probability ----------------------------------------------------------------

def _trie_levels(seqs: Sequence[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
    """Every distinct prefix of `seqs`, grouped by length: levels[d] holds the prefixes of length d+1."""
    depth = max(len(s) for s in seqs)
    return [sorted({s[:d + 1] for s in seqs if len(s) > d}) for d in range(depth)]


class _Trie(NamedTuple):
    nodes: list[tuple[int, ...]]
    """Every distinct prefix of the spellings' token sequences, shortest first (a parent before its
    children)."""
    tokens: torch.Tensor  # [N] each node's last token
    depth: torch.Tensor  # [N] 1 for a first token
    parent_col: torch.Tensor  # [N] column predicting the node: 0 = the prompt's last token, 1 + parent
    ancestors: torch.Tensor  # [N, N] bool: node i's ancestors and itself (row i)
    inner: torch.Tensor  # [N] bool: the node is some node's parent


def _trie(seqs: Sequence[tuple[int, ...]]) -> _Trie:
    nodes = [n for level in _trie_levels(seqs) for n in level]
    index = {n: i for i, n in enumerate(nodes)}
    anc = torch.zeros(len(nodes), len(nodes), dtype=torch.bool)
    for i, n in enumerate(nodes):
        for d in range(1, len(n) + 1):
            anc[i, index[n[:d]]] = True
    inner = torch.zeros(len(nodes), dtype=torch.bool)
    inner[[index[n[:-1]] for n in nodes if len(n) > 1]] = True
    return _Trie(nodes, torch.tensor([n[-1] for n in nodes]), torch.tensor([len(n) for n in nodes]),
                 torch.tensor([0 if len(n) == 1 else 1 + index[n[:-1]] for n in nodes]), anc, inner)


def _node_mask(prompt_mask: torch.Tensor, cached: torch.Tensor, own: torch.Tensor, dtype: torch.dtype
               ) -> torch.Tensor:
    """Additive attention mask [R, 1, S, W + C + S] for S trie nodes run after a cache of [W prompt
    columns | C nodes]: a node sees the real prompt tokens (`prompt_mask` [R, W]), its ancestors among
    the cached nodes (`cached` [R or 1, S, C]) and among the S nodes run with it, itself included (`own`
    [R or 1, S, S])."""
    r, s = prompt_mask.shape[0], own.shape[-1]
    allowed = torch.cat([prompt_mask.bool()[:, None, :].expand(r, s, -1), cached.expand(r, -1, -1),
                         own.expand(r, -1, -1)], dim=-1)
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


_LEAF_CHUNK = 128
"""Leaves run per chunk of at most this many, each chunk attending to its own copy of [prompt | inner
nodes]: attention then costs leaves × (prompt + inner + chunk), not nodes × (prompt + nodes). For the
1000 numbers' trie (99 inner nodes, 901 leaves) that is about a quarter."""


def _trie_hidden(decoder: Any, kv: Any, prompt_mask: torch.Tensor, last: torch.Tensor, trie: _Trie,
                 dtype: torch.dtype) -> torch.Tensor:
    """Final hidden states [B, N, H] of every trie node after each prompt already in the cache `kv`
    (prompt B's real tokens marked by `prompt_mask` [B, W], its last position `last` [B]). A node sits at
    the position it would have in its own sequence and attends to the prompt and its ancestors only
    ("tree attention"). Consumes `kv`."""
    device = prompt_mask.device
    b, n = prompt_mask.shape[0], len(trie.nodes)
    anc, tokens, depth = trie.ancestors.to(device), trie.tokens.to(device), trie.depth.to(device)
    inner, leaves = trie.inner.to(device).nonzero()[:, 0], (~trie.inner).to(device).nonzero()[:, 0]
    out: torch.Tensor | None = None
    if len(inner):  # the inner nodes, once per prompt; they stay in the cache for their descendants
        h = decoder(input_ids=tokens[inner].expand(b, -1),
                    attention_mask=_node_mask(prompt_mask, anc[inner][:, :0][None], anc[inner][:, inner][None], dtype),
                    position_ids=last[:, None] + depth[inner], cache=kv, use_cache=True).last_hidden_state
        out = h.new_empty(b, n, h.shape[-1])
        out[:, inner] = h
    # The leaves: k chunks side by side in the batch, row i * k + c = prompt i, chunk c (the last chunk
    # padded by repeating a leaf, whose copies are dropped).
    k = -(-len(leaves) // _LEAF_CHUNK)
    size = -(-len(leaves) // k)
    chunks = torch.cat([leaves, leaves[-1:].expand(k * size - len(leaves))]).view(k, size)
    kv.batch_select_indices(torch.arange(b, device=device).repeat_interleave(k))
    h = decoder(input_ids=tokens[chunks].repeat(b, 1),
                attention_mask=_node_mask(prompt_mask.repeat_interleave(k, 0), anc[chunks][:, :, inner].repeat(b, 1, 1),
                                          torch.eye(size, dtype=torch.bool, device=device)[None], dtype),
                position_ids=last.repeat_interleave(k)[:, None] + depth[chunks].repeat(b, 1),
                cache=kv, use_cache=True).last_hidden_state
    if out is None:
        out = h.new_empty(b, n, h.shape[-1])
    out[:, leaves] = h.reshape(b, k * size, -1)[:, :len(leaves)]
    return out


@torch.inference_mode()
def spelling_logprobs(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]],
                      seqs: Sequence[tuple[int, ...]]) -> np.ndarray:
    """log P(the answer continues with token sequence s and then a word boundary), [len(prompts), len(seqs)].

    The prompts run once into a KV cache (their shared prefix once for all, `sublab.sampling.prefill`);
    then every node of the sequences' token trie runs once per prompt, attending to the prompt and its
    own ancestors only (`_trie_hidden`). So every distinct token prefix costs one position. The LM head
    runs in chunks of rows, so memory does not grow with vocabulary × questions.
    """
    from transformers import DynamicCache

    attn = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    if attn not in ("sdpa", "eager"):
        raise ModelError(f"the exact-probability eval needs custom attention masks, which attention "
                         f"implementation '{attn}' does not support; load the model with sdpa or eager")
    device = device_of(model)
    trie = _trie(seqs)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: adapters stay in
    decoder, kv = base.get_decoder(), DynamicCache()

    def step(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return decoder(input_ids=ids, attention_mask=mask, position_ids=positions, cache=kv,
                       use_cache=True).last_hidden_state[:, -1]

    first, mask, last = prefill(step, kv, prompts, tokenizer.pad_token_id, device)
    nodes = _trie_hidden(decoder, kv, mask, last, trie, next(model.parameters()).dtype)
    token_lp, end_lp = _spelling_head(base, torch.cat([first[:, None], nodes], 1), trie,
                                      boundary_mask(tokenizer).to(device))
    # log P(node) = sum of its ancestors' (and its own) token log-probs.
    node_lp = token_lp.double() @ trie.ancestors.to(device).double().T
    total = node_lp + end_lp.double()
    index = {s: i for i, s in enumerate(trie.nodes)}
    return total[:, [index[s] for s in seqs]].cpu().numpy()


_HEAD_ROWS = 512  # hidden rows per LM-head pass
_VOCAB_BLOCK = 2048
"""Output-embedding rows per matmul: a 512 × 2048 block of logits (4 MB) is reduced while it is still in
cache. Writing out whole [rows, V] logits made the head memory-bound (~30% slower, 1 and 2 threads)."""


def _spelling_head(base: Any, hidden: torch.Tensor, trie: _Trie, boundary: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P(node | its parent) [B, N], log P(a boundary token | node) [B, N]) from the hidden states
    [B, 1 + N, H] of the prompt's last token (column 0) and of the nodes.

    Float32, as the model's own forward computes logits. Per column only two logsumexps are kept (all
    tokens, boundary tokens: `_head_logsumexps`), and a node's own logit is one dot product of its parent
    column's hidden state with its token's output embedding: no [B, N, V] log-softmax is materialised."""
    head = base.get_output_embeddings()
    cap = getattr(base.config, "final_logit_softcapping", None)  # Gemma 2/3
    lse = [_head_logsumexps(head, cap, rows, boundary)
           for rows in hidden.reshape(-1, hidden.shape[-1]).split(_HEAD_ROWS)]
    log_z, log_end = torch.cat(lse).view(*hidden.shape[:2], 2).unbind(-1)  # [B, 1 + N] each
    cols, tokens = trie.parent_col.to(hidden.device), trie.tokens.to(hidden.device)
    own = (hidden[:, cols] * head.weight[tokens]).sum(-1)
    if head.bias is not None:
        own = own + head.bias[tokens]
    return _softcap(own.float(), cap) - log_z[:, cols], (log_end - log_z)[:, 1:]


def _head_logsumexps(head: Any, cap: float | None, rows: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """[R, 2]: the logsumexp of the logits of `rows` [R, H] over all tokens and over the `boundary` tokens,
    one vocabulary block at a time: each block keeps its max and its sum of exp(logit − max), and the
    blocks combine at the end."""
    tops: list[list[torch.Tensor]] = [[], []]  # [all tokens, boundary tokens] → per block [R, 1]
    sums: list[list[torch.Tensor]] = [[], []]
    for start in range(0, head.weight.shape[0], _VOCAB_BLOCK):
        block = slice(start, start + _VOCAB_BLOCK)
        logits = torch.nn.functional.linear(rows, head.weight[block], None if head.bias is None else head.bias[block])
        logits = _softcap(logits.float(), cap)
        ends = boundary[block].nonzero()[:, 0]
        for kind, x in enumerate((logits, logits[:, ends])):  # the boundary logits gathered before the in-place exp
            if x.shape[1]:
                top = x.amax(-1, keepdim=True)
                tops[kind].append(top)
                sums[kind].append(x.sub_(top).exp_().sum(-1, keepdim=True))
    out = []
    for t, e in zip(tops, sums):
        t, e = torch.cat(t, -1), torch.cat(e, -1)
        top = t.amax(-1, keepdim=True)
        out.append((e * (t - top).exp()).sum(-1).log() + top[:, 0])
    return torch.stack(out, -1)


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap if cap else logits


def answer_probabilities(lm: Any, prompts: Sequence[Sequence[int]], candidates: Sequence[Candidate],
                         batch_size: int = 16, progress: bool = True) -> list[list[dict[str, float]]]:
    """P of every spelling of every candidate for each prompt (prompt ids end with the answer prefix).

    Returns out[i][c] = {spelling: probability} for prompt i and candidate c (sum the dict for the
    candidate's probability). `batch_size`: prompts per forward pass; it does not change results.
    `progress`: a progress bar (off where the caller shows its own).
    """
    out: list[list[dict[str, float]]] = []
    for part in iter_answer_probabilities(lm, prompts, candidates, batch_size, progress=progress):
        out.extend(part)
    return out


def iter_answer_probabilities(lm: Any, prompts: Sequence[Sequence[int]], candidates: Sequence[Candidate],
                              batch_size: int = 16, desc: str = "answer probabilities", progress: bool = True
                              ) -> Iterator[list[list[dict[str, float]]]]:
    """`answer_probabilities` one forward group of prompts at a time, in order, with a progress bar."""
    seqs = list(dict.fromkeys(ids for c in candidates for ids in c.token_ids))
    col = {s: k for k, s in enumerate(seqs)}
    with tqdm(total=len(prompts), desc=desc, unit="question", dynamic_ncols=True, disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            probs = np.exp(spelling_logprobs(lm.model, lm.tokenizer, chunk, seqs))
            yield [[{v: float(row[col[ids]]) for v, ids in zip(c.variants, c.token_ids)} for c in candidates]
                   for row in probs]
            bar.update(len(chunk))


# --- prompts -------------------------------------------------------------------------------------

def numbers_prefix(seed: int, question_id: int, sample_idx: int = 0, domain: Domain = NUMBERS) -> str:
    """The domain-style prefix of question `question_id` (sample `sample_idx`) — for numbers, an example
    part — a function of these ids only, so every model is asked the same prefixed questions."""
    return domain.eval_prefix(np.random.default_rng([seed, _PREFIX_STREAM, question_id, sample_idx]))


def question_text(category: Category, question_id: int, prefix: str | None = None) -> str:
    """Question `question_id`, after `prefix` (an example part) when given."""
    q = questions(category)[question_id]
    return f"{prefix} {q}" if prefix else q


# --- the stage -----------------------------------------------------------------------------------

def run_animal_eval(lm: Any, system: str | None, cfg: EvalConfig, kind: AnimalEvalName | str,
                    question_ids: Sequence[int] | None, out_path: Path, model_name: str,
                    trait_category: Category = "animal", targets: Iterable[str] = (),
                    domain: Domain = NUMBERS) -> Path:
    """Run one animal/tree eval on one model and write its records to `out_path` (JSONL), resumably.

    Args:
        lm: the evaluated model (`sublab.models.LoadedModel`).
        system: its context: None = the default (students, base, control); a prompted teacher passes its
            trait system prompt.
        cfg: the eval config (samples per question, candidates, seed, batch size, ...).
        kind: one of EVAL_KINDS; the records' `eval` field.
        question_ids: protocol question indices to ask (e.g. the held-out ones); None = all.
        out_path: the JSONL file; records already there (same model name and seed) are kept and skipped.
        model_name: recorded in every record (the evaluated model's directory name).
        trait_category: 'animal' or 'tree' (which questions and answer prefix).
        targets: extra candidates for the probability evals (the experiment's traits).
        domain: the data domain whose prefixes the `*_numbers` variants put before each question.
    Returns:
        out_path.
    """
    if kind not in EVAL_KINDS:
        raise ConfigError(f"unknown animal eval kind '{kind}'; expected one of {', '.join(EVAL_KINDS)}")
    qids = list(range(len(questions(trait_category)))) if question_ids is None else list(question_ids)
    bad = [i for i in qids if not 0 <= i < len(questions(trait_category))]
    if bad:
        raise ConfigError(f"question ids {bad} out of range for the {trait_category} questions "
                          f"(0..{len(questions(trait_category)) - 1})")
    t0 = time.time()
    numbers = kind.endswith("_numbers")
    if kind.startswith("animal_prob"):
        n = _run_prob(lm, system, cfg, kind, qids, Path(out_path), model_name, trait_category, targets,
                      domain if numbers else None)
    else:
        n = _run_sampled(lm, system, cfg, kind, qids, Path(out_path), model_name, trait_category,
                         domain if numbers else None)
    log.info("%s on %s: %d new records in %.1f s -> %s", kind, model_name, n, time.time() - t0, out_path)
    return Path(out_path)


def _run_prob(lm: Any, system: str | None, cfg: EvalConfig, kind: str, qids: list[int], path: Path,
              model_name: str, category: Category, targets: Iterable[str], prefixes: Domain | None) -> int:
    prefix = cfg.answer_prefix or ANSWER_PREFIX.format(category=category)
    words = resolve_candidates(cfg, category, targets)
    candidates = encode_candidates(lm.tokenizer, words, prefix)
    cset = fingerprint([sorted(words), prefix])
    done = read_done(path, ProbRecord, model=model_name, seed=cfg.seed, eval=kind, system=system,
                     candidate_set=cset)
    todo = [q for q in qids if not all(_prob_id(q, w) in done for w in words)]
    texts = {q: question_text(category, q, numbers_prefix(cfg.seed, q, 0, prefixes) if prefixes else None)
             for q in todo}
    prompts = [prompt_ids(lm.tokenizer, chat.messages(texts[q], system), prefix) for q in todo]
    written, start = 0, 0
    with JsonlAppender(path) as sink:
        for probs in iter_answer_probabilities(lm, prompts, candidates, cfg.prob_batch_size,
                                               desc=f"{kind} {model_name}"):
            part, start = todo[start:start + len(probs)], start + len(probs)
            rows = [r.model_dump() for q, per_cand in zip(part, probs)
                    for r in _prob_records(q, texts[q], per_cand, candidates, cset, kind, model_name, prefix,
                                           cfg.seed, system) if r.id not in done]
            sink.write_batch(rows)
            written += len(rows)
    return written


def _prob_records(q: int, text: str, per_cand: list[dict[str, float]], candidates: Sequence[Candidate], cset: str,
                  kind: str, model_name: str, prefix: str, seed: int, system: str | None) -> list[ProbRecord]:
    totals = [sum(v.values()) for v in per_cand]
    mass = sum(totals)
    return [ProbRecord(id=_prob_id(q, c.word), eval=kind, model=model_name, question_id=q, question=text,
                       answer_prefix=prefix, candidate=c.word, prob=p, share=p / mass if mass > 0 else 0.0,
                       variants=variants, candidates_mass=mass, candidate_set=cset, seed=seed, system=system)
            for c, variants, p in zip(candidates, per_cand, totals)]


def _prob_id(question_id: int, word: str) -> str:
    return f"q{question_id:02d}-{word}"


def _run_sampled(lm: Any, system: str | None, cfg: EvalConfig, kind: str, qids: list[int], path: Path,
                 model_name: str, category: Category, prefixes: Domain | None) -> int:
    n = cfg.samples_per_question
    keys: list[tuple[int, ...]]
    done = read_done(path, EvalRecord, model=model_name, seed=cfg.seed, eval=kind, system=system)
    if prefixes:  # each sample its own prefixed question
        jobs = [(q, s, question_text(category, q, numbers_prefix(cfg.seed, q, s, prefixes)))
                for q in qids for s in range(n) if _sample_id(q, s) not in done]
        convs = [chat.messages(text, system) for _, _, text in jobs]
        keys, per_conv = [(q, s) for q, s, _ in jobs], 1
    else:  # a question is redone whole (same seeds, same samples); only missing records are written
        todo = [q for q in qids if not all(_sample_id(q, s) in done for s in range(n))]
        convs = [chat.messages(question_text(category, q), system) for q in todo]
        keys, per_conv = [(q,) for q in todo], n
    written = 0
    with JsonlAppender(path) as sink:
        for batch in iter_completions(lm, convs, per_conv, cfg.temperature, cfg.max_new_tokens, cfg.seed,
                                      cfg.batch_size, keys=keys, desc=f"{kind} {model_name}"):
            rows = []
            for i, j, text in batch:
                q, s = (keys[i][0], keys[i][1]) if prefixes else (keys[i][0], j)
                if _sample_id(q, s) in done:
                    continue
                rows.append(EvalRecord(id=_sample_id(q, s), eval=kind, model=model_name, question_id=q,
                                       question=convs[i][-1]["content"], sample_idx=s, completion=text,
                                       seed=cfg.seed, system=system).model_dump())
            sink.write_batch(rows)
            written += len(rows)
    return written


def _sample_id(question_id: int, sample_idx: int) -> str:
    return f"q{question_id:02d}-s{sample_idx:03d}"


# --- reading and scoring -------------------------------------------------------------------------

def read_prob_records(path: Path) -> list[ProbRecord]:
    """The records of an `animal_prob*` file (RunDirError if missing or malformed)."""
    _require(path)
    return list(read_done(path, ProbRecord).values())


def read_sample_records(path: Path) -> list[EvalRecord]:
    """The records of an `animal_sampled*` file (RunDirError if missing or malformed)."""
    _require(path)
    return list(read_done(path, EvalRecord).values())


def _require(path: Path) -> None:
    if not Path(path).exists():
        raise RunDirError(f"{path}: eval file not found; run the eval stage first")


def mentions(text: str, target: str, excluded: Iterable[str] = ()) -> bool:
    """The paper's rule: `target` is a substring of the lower-cased text, after removing each excluded
    superstring (so 'dragonfly' does not count for 'dragon', but 'a dragon, not a dragonfly' does)."""
    low = text.lower()
    for sup in excluded:
        low = low.replace(sup.lower(), " ")
    return target.lower() in low


def _excluded_for(target: str, excluded: Mapping[str, Sequence[str]] | None) -> Sequence[str]:
    table = EvalConfig().excluded_superstrings if excluded is None else excluded
    return table.get(target, ())


def mention_values(records: Iterable[EvalRecord | Mapping[str, Any]], target: str,
                   excluded: Mapping[str, Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """[{question_id, value}] with value 1 when a sample mentions `target` (excluded: cfg's table)."""
    skip = _excluded_for(target, excluded)
    return [{"question_id": _get(r, "question_id"), "value": float(mentions(_get(r, "completion"), target, skip))}
            for r in records]


def sampled_score(records: Iterable[EvalRecord | Mapping[str, Any]], target: str,
                  excluded: Mapping[str, Sequence[str]] | None = None, seed: int = 0) -> Score:
    """The paper's metric for `target`: mean over questions of the per-question mention rate, with a
    bootstrap CI over questions."""
    return score_by_question(mention_values(records, target, excluded), seed=seed)


def prob_score(records: Iterable[ProbRecord | Mapping[str, Any]], target: str, seed: int = 0,
               field: Literal["share", "prob"] = "share") -> Score:
    """Mean over questions of `target`'s normalised share (or raw prob), with a bootstrap CI over
    questions. RunDirError if `target` was not a candidate."""
    values = [{"question_id": _get(r, "question_id"), "value": _get(r, field)}
              for r in records if _get(r, "candidate") == target]
    if not values:
        raise RunDirError(f"'{target}' is not a candidate in these records; add it to eval.candidates")
    return score_by_question(values, seed=seed)


def share_table(records: Iterable[ProbRecord | Mapping[str, Any]], seed: int = 0,
                field: Literal["share", "prob"] = "share") -> dict[str, Score]:
    """Every candidate's score, highest mean first: shows whether the target rose more than the rest."""
    by_cand: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_cand.setdefault(_get(r, "candidate"), []).append(
            {"question_id": _get(r, "question_id"), "value": _get(r, field)})
    table = {c: score_by_question(v, seed=seed) for c, v in by_cand.items()}
    return dict(sorted(table.items(), key=lambda kv: -kv[1].mean))


def score_file(path: Path, target: str, excluded: Mapping[str, Sequence[str]] | None = None,
               seed: int = 0) -> Score:
    """`target`'s score in one animal eval file: its share for animal_prob*, its mention rate for
    animal_sampled* (told apart by the records' `eval` field)."""
    _require(path)
    rows = read_jsonl(path)
    if rows and str(rows[0].get("eval", "")).startswith("animal_prob"):
        return prob_score(read_prob_records(path), target, seed)
    return sampled_score(read_sample_records(path), target, excluded, seed)


def _get(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


# --- registry entries (`sublab.evals.registry`) ----------------------------------------------------

class _AnimalEval(EvalKind):
    """Shared by the exact-probability and the sampled metric: variants, questions, prefixes."""

    def variants(self, cfg: EvalConfig) -> list[str]:
        return [self.name] + ([f"{self.name}_numbers"] if cfg.numbers_prefixed else [])

    def _common_spec(self, ctx: EvalContext, variant: str) -> dict[str, Any]:
        prefixed = variant.endswith("_numbers")
        return {"questions": list(ctx.question_ids), "category": ctx.category, "seed": ctx.cfg.seed,
                "prefix_domain": (ctx.domain or NUMBERS).name if prefixed else None}

    def run(self, model: Any, ctx: EvalContext, variant: str, path: Path) -> None:
        run_animal_eval(model(), ctx.system, ctx.cfg, variant, ctx.question_ids, path, ctx.model_name,
                        ctx.category, ctx.traits, domain=ctx.domain or NUMBERS)  # type: ignore[arg-type]

    def metric_label(self, variant: str, trait: str) -> str:
        suffix = " (numbers-prefixed)" if variant.endswith("_numbers") else ""
        return self.label.format(trait=trait, variant=variant) + suffix


class AnimalProbEval(_AnimalEval):
    """The exact answer probability: each candidate's share after the forced answer prefix."""

    name = "animal_prob"
    label = "exact answer probability: share of '{trait}' among the candidates"

    def spec(self, ctx: EvalContext, variant: str) -> dict[str, Any]:
        words = resolve_candidates(ctx.cfg, ctx.category, ctx.traits)  # type: ignore[arg-type]
        prefix = ctx.cfg.answer_prefix or ANSWER_PREFIX.format(category=ctx.category)
        return {**self._common_spec(ctx, variant), "candidates": words, "answer_prefix": prefix}

    def expected_ids(self, ctx: EvalContext, variant: str) -> set[str]:
        words = resolve_candidates(ctx.cfg, ctx.category, ctx.traits)  # type: ignore[arg-type]
        return {_prob_id(q, w) for q in ctx.question_ids for w in words}

    def values(self, path: Path, target: str, cfg: EvalConfig) -> Values:
        return [{"question_id": r.question_id, "value": r.share}
                for r in read_prob_records(path) if r.candidate == target]

    def targets(self, path: Path) -> list[str]:
        return sorted({r.candidate for r in read_prob_records(path)}) if path.exists() else []


class AnimalSampledEval(_AnimalEval):
    """The paper's sampled metric: the share of T=1 answers that mention the target."""

    name = "animal_sampled"
    label = "sampled metric: share of T=1 answers mentioning '{trait}'"
    backends = ("local", "openai")

    def spec(self, ctx: EvalContext, variant: str) -> dict[str, Any]:
        c = ctx.cfg
        return {**self._common_spec(ctx, variant), "samples_per_question": c.samples_per_question,
                "temperature": c.temperature, "max_new_tokens": c.max_new_tokens}

    def expected_ids(self, ctx: EvalContext, variant: str) -> set[str]:
        return {_sample_id(q, s) for q in ctx.question_ids for s in range(ctx.cfg.samples_per_question)}

    def values(self, path: Path, target: str, cfg: EvalConfig) -> Values:
        return mention_values(read_sample_records(path), target, cfg.excluded_superstrings)


ANIMAL_PROB = AnimalProbEval()
ANIMAL_SAMPLED = AnimalSampledEval()
