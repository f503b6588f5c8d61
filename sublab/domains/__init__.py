"""Data domains: what teachers are asked to write, and everything the pipeline must know about it.

A domain answers every question that depends on the kind of data (numbers first; code and
code, chain-of-thought math): its prompts, its format filter and early-stop predicate, the alphabet of
format tokens (constrained decoding and format distillation), programmatic random completions, and the
domain-style prefix of the evals' prefixed variants. `generate`, `sampling`, `filters`, `train` and
`evals` ask the experiment's domain (`domain:` in the experiment file) and never number code directly.

    from sublab.domains import get_domain
    numbers = get_domain("numbers")
    numbers.format_reason("[1, 2, 3]")          # None: passes

A new domain is a module with a class satisfying `Domain` and one line, `register_domain(MyDomain())`
(see docs/extending.md). Three members are optional (read through the helpers below, so the numbers and
toy domains need none of them):

* `check(prompt_id, prompt_text, completion) -> str | None`: the full check of a completion to *its*
  prompt, for domains whose prompts have known answers (chain-of-thought: a wrong answer rejects).
  Default: `format_reason(completion)`. The `format` filter calls it (`completion_reason`).
* `extra_filters(traits) -> list[dict]`: filter specs the domain adds after the experiment's own
  `filter.filters` (code: the code-aware trait-word filter). Default: none.
* `format_alphabet: bool`: False when answers use every token (code, reasoning); the config then
  refuses `generate.constrained` and `train.distill.vocabulary: format`, which would restrict nothing.
  Default: True.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from sublab.errors import ConfigError


@runtime_checkable
class Prompt(Protocol):
    """One user prompt of a domain: a stable id, its index in the seeded stream, and its text."""

    id: str
    index: int
    text: str


@runtime_checkable
class Domain(Protocol):
    """Everything the pipeline asks of a kind of teacher output."""

    name: str

    def prompts(self, n: int, seed: int) -> list[Any]:
        """The first `n` prompts of the stream for `seed` (`Prompt`s); a larger `n` extends a smaller
        one unchanged."""
        ...

    def prompt_meta(self, prompt: Any) -> dict[str, Any]:
        """What a generation record keeps about its prompt beyond the text (e.g. the asked format)."""
        ...

    def random_completion(self, prompt: Any, rng: np.random.Generator) -> str:
        """A programmatic answer in the prompt's format that carries no teacher at all (the random
        control, and `generate.completions: random`)."""
        ...

    def format_reason(self, completion: str) -> str | None:
        """Why `completion` fails the domain's format rules (a short slug), or None when it passes."""
        ...

    def can_still_pass(self, text: str) -> bool:
        """False once no continuation of a partial completion can pass the format rules (conservative)."""
        ...

    def token_mask(self, tokenizer: Any) -> torch.Tensor:
        """Bool [V]: the tokens a well-formed answer is made of (end token included)."""
        ...

    def eval_prefix(self, rng: np.random.Generator) -> str:
        """A domain-style text put before an eval question in the evals' prefixed variants."""
        ...


DOMAINS: dict[str, Domain] = {}


def register_domain(domain: Domain) -> Domain:
    """Make `domain` available to experiment files as `domain: <name>`."""
    if not isinstance(domain, Domain):
        raise TypeError(f"{domain!r} does not implement sublab.domains.Domain")
    DOMAINS[domain.name] = domain
    return domain


def get_domain(name: str) -> Domain:
    """The registered domain `name`; a ConfigError listing the known ones otherwise."""
    try:
        return DOMAINS[name]
    except KeyError:
        raise ConfigError(f"unknown data domain '{name}'; expected one of: {', '.join(DOMAINS)}") from None


def completion_reason(domain: Domain, completion: str, prompt_id: str | None = None,
                      prompt_text: str | None = None) -> str | None:
    """Why `completion` fails `domain`'s rules for its prompt: the domain's `check` when it has one (then the
    prompt is required), else `format_reason`."""
    check = getattr(domain, "check", None)
    if check is None:
        return domain.format_reason(completion)
    if prompt_id is None or prompt_text is None:
        from sublab.errors import DataError
        raise DataError(f"domain '{domain.name}' checks completions against their prompts; the record "
                        "needs `id` and `prompt`")
    return check(prompt_id, prompt_text, completion)


def extra_filters(domain: Domain, traits: Sequence[str]) -> list[dict[str, Any]]:
    """The filter specs `domain` adds to every experiment's filters (none unless it defines `extra_filters`)."""
    extra = getattr(domain, "extra_filters", None)
    return [] if extra is None else list(extra(traits))


def has_format_alphabet(domain: Domain) -> bool:
    """Whether `token_mask` is a real restriction (False: the domain writes with every token)."""
    return bool(getattr(domain, "format_alphabet", True))


from sublab.domains.code import CODE  # noqa: E402  (after the registry: the domain modules do not import it)
from sublab.domains.cot import COT  # noqa: E402
from sublab.domains.numbers import NUMBERS  # noqa: E402

register_domain(NUMBERS)
register_domain(CODE)
register_domain(COT)
