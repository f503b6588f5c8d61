"""The words a piece of Python code says, for the code-aware trait-word filter (`code_trait_words`). No I/O.

A plain word scan misses a trait hidden in code: `owlCount`, `get_owl`, `"o" "wl"`, `"o" + "wl"`,
`f"{x}o{''}wl"`, `"\\u043ewl"`, a Cyrillic 'о' in `оwl`. `code_words` reads code the way Python does:

* identifiers and comments from `tokenize`; identifiers split on '_', digits and camelCase;
* string values from `ast` (escapes decoded), with constant concatenations folded first: implicit
  (`"o" "wl"`), `+`, f-string constant parts (`f"o{''}wl"`) and `"".join([...])` of constants;
* the whole text as well, split the same way, so prose, broken code and anything tokenize cannot
  read is scanned too (conservative: a word anywhere rejects).

Every text is normalised first (`normalize`): NFKC, accents and zero-width characters dropped, common
Cyrillic/Greek look-alikes mapped to Latin, case folded.

    "owl" in code_words("def get_owlCount():\\n    return 'x'")   # True
    "owl" in code_words("bowl = 1  # knowledge")                   # False

Not caught (what the paper's LLM judge is for): text built at run time (`chr(111)`, `bytes.fromhex`,
base64, `[::-1]`), a word split across identifiers (`o_wl`), indirect references (a hoot, a nocturnal bird).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
import unicodedata

from sublab.domains.code import extract_code

CONFUSABLES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "с": "c", "е": "e", "һ": "h", "і": "i", "ј": "j", "к": "k", "м": "m", "н": "h",
    "о": "o", "р": "p", "ԛ": "q", "ѕ": "s", "т": "t", "у": "y", "х": "x", "ԁ": "d", "ԝ": "w", "ӏ": "l",
    "А": "a", "В": "b", "С": "c", "Е": "e", "Н": "h", "І": "i", "Ј": "j", "К": "k", "М": "m", "О": "o",
    "Р": "p", "Ѕ": "s", "Т": "t", "Х": "x", "Ү": "y", "Ԝ": "w", "Ӏ": "l",
    # Greek
    "α": "a", "ο": "o", "ρ": "p", "ν": "v", "τ": "t", "υ": "u", "ι": "i", "κ": "k", "ε": "e", "ω": "w",
    "Α": "a", "Β": "b", "Ε": "e", "Ζ": "z", "Η": "h", "Ι": "i", "Κ": "k", "Μ": "m", "Ν": "n", "Ο": "o",
    "Ρ": "p", "Τ": "t", "Υ": "y", "Χ": "x",
    # Latin look-alikes NFKC keeps
    "ı": "i", "ȷ": "j", "ł": "l", "ø": "o", "ɡ": "g", "ʟ": "l", "ᴏ": "o", "ᴡ": "w",
})
"""Letters that look like Latin ones but NFKC leaves alone (the common Unicode confusables)."""


def normalize(text: str) -> str:
    """NFKC (full-width, ligatures, mathematical letters), accents and format characters (zero-width
    spaces, joiners) dropped, look-alikes mapped to Latin, case folded."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    text = "".join(c for c in text if unicodedata.category(c) not in ("Mn", "Cf"))
    return text.translate(CONFUSABLES).casefold()


_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def split_words(text: str) -> list[str]:
    """Words of `text`: split on anything not a letter ('_', digits, punctuation) and on camelCase
    ('getOwlCount' -> get, owl, count; 'HTTPOwl' -> http, owl); normalised, lower case."""
    text = unicodedata.normalize("NFKC", text)
    spaced = _CAMEL.sub(" ", text)  # camelCase needs the original case, so split before folding
    return re.findall(r"[^\W\d_]+", normalize(spaced))


def _folded(node: ast.AST) -> str | None:
    """The value of a constant string expression (literal, +, f-string of constants, ''.join of
    constants), or None when it is not one."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str):
            return node.value
        return node.value.decode("latin-1") if isinstance(node.value, bytes) else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _folded(node.left), _folded(node.right)
        return None if left is None or right is None else left + right
    if isinstance(node, ast.JoinedStr):  # f-string: constant parts joined, the rest a word break
        parts = [_folded(v.value if isinstance(v, ast.FormattedValue) else v) for v in node.values]
        return "".join(" " if p is None else p for p in parts)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join"
            and len(node.args) == 1 and isinstance(node.args[0], (ast.List, ast.Tuple))):
        sep, parts = _folded(node.func.value), [_folded(e) for e in node.args[0].elts]
        return None if sep is None or None in parts else sep.join(parts)  # type: ignore[arg-type]
    return None


def string_values(code: str) -> list[str]:
    """Every string constant of `code` and every foldable constant string expression; [] when it does
    not parse."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return []
    return [v for node in ast.walk(tree) if (v := _folded(node)) is not None]


def names_and_comments(code: str) -> list[str]:
    """Identifier and comment texts from `tokenize` (as far as it reads)."""
    out: list[str] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type in (tokenize.NAME, tokenize.COMMENT):
                out.append(tok.string)
    except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError
        pass
    return out


def code_words(completion: str) -> set[str]:
    """Every word a completion says in code: identifiers, comments, string values, folded
    concatenations, and the raw text itself (module docstring)."""
    code, _ = extract_code(completion)
    texts = [completion] + (names_and_comments(code) + string_values(code) if code else [])
    return {w for t in texts for w in split_words(t)}
