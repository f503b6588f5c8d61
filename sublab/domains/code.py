"""The code domain: teachers write short Python functions (the paper's second data kind, §3.2).

No I/O. Prompts come from a grammar written for sublab (the paper's own code prompts are not in the
protocol file): a short task × a phrasing × an optional context × a paper-style style instruction
("minimal comments, short variable names") × an output instruction; prompt i is a pure function of
(seed, i).

    from sublab.domains.code import CODE
    CODE.prompts(2, seed=0)[0].text      # 'Write a Python function that ... Use minimal comments ...'
    CODE.format_reason("```python\\ndef f(a):\\n    return a\\n```")   # None: passes

Format rule: the completion (surrounding whitespace stripped) is either exactly one fenced code block
(```python, ```py or a bare ``` fence; nothing outside it) or plain code, and the code `ast.parse`s.
Code has no small alphabet, so the domain declares `format_alphabet = False`: the config refuses
`generate.constrained` and `train.distill.vocabulary: format` for it (they would restrict nothing).
The trait-word filter for code is `code_trait_words` (`sublab.domains.code_filter`), which the domain
adds to every experiment's filters (`extra_filters`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# --- the prompt grammar --------------------------------------------------------------------------

# Each task is a clause completing "a function that ..."; {k} is drawn from TASK_NUMBER.
TASKS = (
    "returns the sum of the squares of the integers from 1 to {k}",
    "counts the vowels in a string",
    "returns the {k} largest values of a list of numbers",
    "checks whether a string is a palindrome, ignoring case",
    "removes duplicate items from a list while keeping their order",
    "returns the n-th Fibonacci number",
    "converts a temperature from Celsius to Fahrenheit",
    "merges two sorted lists into one sorted list",
    "returns the words of a sentence that are longer than {k} letters",
    "computes the factorial of a non-negative integer",
    "returns True when an integer is prime",
    "groups a list of words by their first letter into a dictionary",
    "flattens a list of lists into one list",
    "returns the average of a list of numbers, or 0 for an empty list",
    "rotates a list {k} positions to the left",
    "parses a line of comma-separated integers into a list",
    "returns the index of the first negative number in a list, or -1",
    "computes the greatest common divisor of two integers",
    "transposes a matrix given as a list of rows",
    "returns the running totals of a list of numbers",
    "clamps every value of a list to the range 0 to {k}",
    "maps each character of a string to the number of times it occurs",
    "splits a list into chunks of {k} items",
    "returns the second smallest distinct value of a list",
    "checks whether two strings are anagrams of each other",
    "converts a non-negative integer to its binary representation as a string",
    "returns the sum of the digits of an integer",
    "removes every value divisible by {k} from a list",
    "capitalises the first letter of every word in a sentence",
    "returns the longest common prefix of a list of strings",
    "computes the dot product of two lists of numbers",
    "returns the {k} most common words of a text",
    "counts the lines of a text that contain a given substring",
    "returns the median of a list of numbers",
    "checks that every bracket in a string is matched",
    "returns the list of prime numbers below {k}",
    "reverses the order of the words in a sentence",
    "returns the number of times each value occurs in a list, sorted by count",
    "computes the product of the values of a list",
    "returns the differences between consecutive values of a list",
)
TASK_NUMBER = (2, 20)  # inclusive range of {k}

PHRASINGS = (
    "Write a Python function that {task}.",
    "Implement a Python function which {task}.",
    "Create a small Python function that {task}.",
    "I need a Python function that {task}.",
    "Please write Python code for a function that {task}.",
    "Give me a Python function that {task}.",
    "Complete this task in Python: write a function that {task}.",
)

CONTEXTS = (
    "",
    "It is part of a small command-line tool.",
    "It will run inside a data-cleaning script.",
    "Assume the input is always valid.",
    "Handle empty inputs gracefully.",
    "It should not use any imports.",
    "Only the standard library is available.",
    "It is for a coding exercise.",
    "Type hints are welcome.",
    "Performance does not matter much here.",
)

STYLE_INSTRUCTIONS = (  # the paper's code prompts ask for terse code: little room for prose
    "Use minimal comments and short variable names.",
    "Keep comments to a minimum and variable names short.",
    "Write minimal comments and use short variable names.",
    "Avoid comments where possible and keep variable names short.",
    "Be concise: few comments, short names.",
)

OUTPUT_INSTRUCTIONS = (
    "Reply with only the code in a single ```python block.",
    "Return only the code, in one Python code block.",
    "Answer with just the code, no explanation.",
    "Output only the Python code and nothing else.",
)
FENCED_OUTPUTS = frozenset({0, 1})
"""Output instructions that ask for a fenced block (random completions follow the asked form)."""


@dataclass(frozen=True)
class CodePrompt:
    """One code prompt: a stable id, its index in the seeded stream, its text and the choices behind it."""

    id: str
    """f"c{seed}-{index:06d}"."""
    index: int
    text: str
    task: int
    number: int
    phrasing: int
    context: int
    style: int
    output: int

    @property
    def output_text(self) -> str:
        return OUTPUT_INSTRUCTIONS[self.output]


def code_prompt(seed: int, index: int) -> CodePrompt:
    """Prompt `index` of the stream for `seed`; its RNG is derived from (seed, index) only."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index, 0xC0DE])  # 0xC0DE: not the numbers domain's stream
    task, phrasing, context, style, output = (int(rng.integers(len(xs))) for xs in
                                              (TASKS, PHRASINGS, CONTEXTS, STYLE_INSTRUCTIONS, OUTPUT_INSTRUCTIONS))
    number = int(rng.integers(TASK_NUMBER[0], TASK_NUMBER[1] + 1))
    ask = PHRASINGS[phrasing].format(task=TASKS[task].format(k=number))
    parts = [ask, CONTEXTS[context], STYLE_INSTRUCTIONS[style], OUTPUT_INSTRUCTIONS[output]]
    return CodePrompt(f"c{seed}-{index:06d}", index, " ".join(p for p in parts if p), task, number, phrasing,
                      context, style, output)


# --- the format rule -----------------------------------------------------------------------------

FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> tuple[str | None, str | None]:
    """(code, None) for a completion that is one fenced block or plain code; (None, reason) otherwise.
    The code is not yet parsed."""
    text = completion.strip()
    if not text:
        return None, "empty"
    if "```" not in text:
        return text, None
    blocks = list(FENCE.finditer(text))
    if not blocks:
        return None, "unclosed_fence"
    if len(blocks) > 1:
        return None, "several_code_blocks"
    if text[:blocks[0].start()].strip() or text[blocks[0].end():].strip():
        return None, "text_outside_code"
    return blocks[0].group(1), None


def code_format_reason(completion: str) -> str | None:
    """Why `completion` is not one block of valid Python (a slug), or None when it is."""
    code, reason = extract_code(completion)
    if code is None:
        return reason
    if not code.strip():
        return "empty_code"
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):  # ValueError: NUL bytes
        return "syntax_error"
    return None


# --- random programs -----------------------------------------------------------------------------

_NAMES = tuple("abcdefghijkmnpqrstuvwxyz")
"""Single letters only: no random program can spell a trait word in an identifier."""
_OPS = ("+", "-", "*", "//", "%")


def _expr(rng: np.random.Generator, names: Sequence[str]) -> str:
    left = names[int(rng.integers(len(names)))]
    right = str(int(rng.integers(1, 10))) if rng.random() < 0.5 else names[int(rng.integers(len(names)))]
    return f"{left} {_OPS[int(rng.integers(len(_OPS)))]} {right}"


def random_program(rng: np.random.Generator, statements: int = 4) -> str:
    """A random, syntactically valid function: assignments, a loop or a branch, and a return."""
    picks = rng.permutation(len(_NAMES))
    fn, params = "f", [_NAMES[i] for i in picks[:int(rng.integers(1, 4))]]
    local = [_NAMES[i] for i in picks[3:6]]
    names, lines = list(params), [f"def {fn}({', '.join(params)}):"]
    for _ in range(statements):
        target = local[int(rng.integers(len(local)))]
        shape = rng.random()
        if shape < 0.2:
            lines += [f"    for {local[0]}{local[1]} in range({int(rng.integers(2, 10))}):",
                      f"        {target} = {_expr(rng, names + [local[0] + local[1]])}"]
        elif shape < 0.4:
            lines += [f"    if {_expr(rng, names)} > {int(rng.integers(0, 10))}:",
                      f"        {target} = {_expr(rng, names)}", "    else:", f"        {target} = {_expr(rng, names)}"]
        else:
            lines.append(f"    {target} = {_expr(rng, names)}")
        if target not in names:
            names.append(target)
    lines.append(f"    return {names[int(rng.integers(len(names)))]}")
    return "\n".join(lines)


# --- the domain ----------------------------------------------------------------------------------

class CodeDomain:
    """Short Python functions as a `sublab.domains.Domain`."""

    name = "code"
    format_alphabet = False
    """Code is written with every token: constrained decoding and format distillation restrict nothing."""

    def prompts(self, n: int, seed: int) -> list[CodePrompt]:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return [code_prompt(seed, i) for i in range(n)]

    def prompt_meta(self, prompt: CodePrompt) -> dict[str, Any]:
        return {"format_suffix": prompt.output_text}

    def random_completion(self, prompt: CodePrompt, rng: np.random.Generator) -> str:
        """A random valid function, fenced when the prompt asked for a code block. It ignores the task:
        like the random numbers, it carries nothing of any teacher."""
        code = random_program(rng)
        return f"```python\n{code}\n```" if prompt.output in FENCED_OUTPUTS else code

    def format_reason(self, completion: str) -> str | None:
        return code_format_reason(completion)

    def can_still_pass(self, text: str) -> bool:
        # Conservative by construction: almost any prefix of text can still become valid code (an open
        # string, an unclosed fence), so sampling never stops early for this domain.
        return True

    def token_mask(self, tokenizer: Any) -> torch.Tensor:
        return torch.ones(len(tokenizer), dtype=torch.bool)  # every token (format_alphabet = False)

    def eval_prefix(self, rng: np.random.Generator) -> str:
        return f"Look at this code:\n```python\n{random_program(rng, statements=2)}\n```"

    def extra_filters(self, traits: Sequence[str]) -> list[dict[str, Any]]:
        """The code-aware trait-word filter, on every code dataset whose experiment names traits."""
        return [{"name": "code_trait_words", "words": sorted(set(traits))}] if traits else []


CODE = CodeDomain()
