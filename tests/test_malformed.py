"""Malformed input never ends in a traceback and is never silently accepted (issue 11, defect 8).

Each case runs through the real CLI (typer's runner on `sublab.cli.app`; a few through a subprocess of
`python -m sublab.cli`) and must exit 1 (2 for command-line usage errors) with one `error:` line (plus
at most a hint line) that names the file, field, override or line, and no traceback. Validation loads no
model: `embedded:smollm2-135m-instruct` is only looked up by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from sublab.cli import app, make_console, print_error

ROOT = Path(__file__).parents[1]
BASE: dict[str, Any] = {
    "name": "m", "base_model": "embedded:smollm2-135m-instruct", "device": "cpu",
    "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"}, {"name": "control", "kind": "control"}],
}


def _with(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """BASE (or `base`) with `value` set at the dotted `path` (a number indexes a list); DELETE removes."""
    raw = yaml.safe_load(yaml.safe_dump(base or BASE))
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    key: Any = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return raw


DELETE = object()
FINETUNED = _with("teachers.0", {"name": "owl", "kind": "finetuned", "trait": "owl"})
NO_CUDA = not __import__("torch").cuda.is_available()

# (id, experiment file: a dict (dumped as YAML), str or bytes, expected in the error line)
FILES: list[tuple[str, Any, list[str]]] = [
    ("binary", b"\x7fELF\x02\x01\x01\x00\x00\x00", ["a binary file", "expected an experiment YAML"]),
    ("latin-1", "name: caf\xe9\n".encode("latin-1"), ["not UTF-8"]),
    ("empty", "", ["empty", "expected a mapping"]),
    ("only-comments", "# nothing here\n", ["empty"]),
    ("yaml-list", "- name: m\n- teachers: []\n", ["got a list"]),
    ("yaml-scalar", "just some words\n", ["got a str"]),
    ("unclosed-bracket", "name: m\nteachers: [a, b\n", ["not valid YAML (line"]),
    ("tab-indent", "name: m\ntrain:\n\tlr: 1\n", ["not valid YAML (line 3"]),
    ("bad-indent", "name: m\n  teachers: x\n", ["not valid YAML (line 2"]),
    ("undefined-alias", "name: *nope\n", ["not valid YAML (line 1", "undefined alias"]),
    ("python-tag", "name: !!python/object/apply:os.system ['true']\n", ["not valid YAML (line 1"]),
    ("control-char", "name: a\x07b\n", ["#x0007", "not allowed in YAML"]),
    ("deep-nesting", "name: " + "[" * 3000 + "]" * 3000 + "\n", ["nested too deeply"]),
    ("too-large", "# " + "x" * (1 << 20) + "\n", ["larger than 1 MiB"]),
    ("dup-top-key", "name: a\nteachers: []\nname: b\n", ["duplicate key 'name'", "line 3", "first on line 1"]),
    ("dup-nested-key", "name: m\ntrain:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", ["duplicate key 'lr'", "line 4"]),
    ("dup-key-in-list", "name: m\nteachers:\n  - {name: owl, trait: owl, trait: cat}\n",
     ["duplicate key 'trait'", "line 3"]),
    ("dup-flow-key", "name: m\neval: {seed: 1, seed: 2}\n", ["duplicate key 'seed'", "line 2"]),
    # names become directories under runs_dir
    ("name-dotdot", _with("name", "../x"), ["name:", "'../x' is not a safe directory name"]),
    ("name-empty", _with("name", ""), ["name:", "not a safe directory name"]),
    ("name-absolute", _with("name", "/tmp/x"), ["name:", "not a safe directory name"]),
    ("name-slash", _with("name", "a/b"), ["name:", "not a safe directory name"]),
    ("name-hidden", _with("name", ".x"), ["name:", "not a safe directory name"]),
    ("name-too-long", _with("name", "x" * 300), ["name:", "at most 128"]),
    ("name-int", _with("name", 5), ["name: Input should be a valid string"]),
    ("name-missing", _with("name", DELETE), ["name: Field required"]),
    # teachers
    ("teachers-missing", _with("teachers", DELETE), ["teachers: Field required"]),
    ("teachers-empty", _with("teachers", []), ["add a control teacher"]),
    ("no-control", _with("teachers.1", {"name": "cat", "trait": "cat"}), ["add a control teacher"]),
    ("teachers-mapping", _with("teachers", {"owl": "owl"}), ["teachers: Input should be a valid list"]),
    ("teacher-string", _with("teachers.0", "owl"), ["teachers.0:"]),
    ("teacher-kind", _with("teachers.0.kind", "telepathic"), ["teachers.0:", "telepathic"]),
    ("teacher-no-trait", _with("teachers.0.trait", DELETE), ["teachers.0:", "`trait` is required"]),
    ("teacher-name-slash", _with("teachers.0.name", "a/b"), ["teachers.0:", "'a/b'"]),
    ("teacher-dup-names", _with("teachers.1", {"name": "owl", "kind": "control"}), ["names must be unique"]),
    ("teacher-unknown-key", _with("teachers.0.colour", "red"), ["teachers.0.colour: unknown key"]),
    ("finetune-unknown-key", _with("teachers.0.finetune", {"lrr": 1}, FINETUNED),
     ["teachers.0.finetune.lrr: unknown key"]),
    ("finetune-missing-file", _with("teachers.0.finetune", {"dataset": "no/such.jsonl"}, FINETUNED),
     ["teachers.0.finetune.dataset", "'no/such.jsonl' not found"]),
    ("finetune-no-builtin", _with("teachers.0.finetune", {"dataset": "builtin:nope"}, FINETUNED),
     ["teachers.0.finetune.dataset", "builtin:nope"]),
    # unknown keys at every level
    ("unknown-top-key", _with("trian", {}), ["trian: unknown key"]),
    ("unknown-train-key", _with("train.learning_rate", 1), ["train.learning_rate: unknown key"]),
    ("unknown-eval-key", _with("eval.kind", "animal_prob"), ["eval.kind: unknown key"]),
    ("unknown-generate-key", _with("generate.prompts", 5), ["generate.prompts: unknown key"]),
    ("unknown-filter-key", _with("filter.size", 5), ["filter.size: unknown key"]),
    ("unknown-distill-key", _with("train.distill.topk", 5), ["train.distill.topk: unknown key"]),
    # choices, presets, references
    ("unknown-preset", _with("preset", "huge"), ["unknown preset 'huge'"]),
    ("preset-list", _with("preset", ["quick"]), ["unknown preset"]),
    ("unknown-eval-kind", _with("eval.kinds", ["animal_prob", "vibes"]), ["eval.kinds", "vibes"]),
    ("unknown-method", _with("train.method", "sgd"), ["train", "sgd"]),
    ("unknown-device", _with("device", "gpu"), ["device:"]),
    ("unknown-model", _with("base_model", "embedded:nope"), ["unknown embedded model 'embedded:nope'"]),
    ("missing-model-dir", _with("base_model", "./no/such/model"), ["'./no/such/model' is neither"]),
    ("bad-cross-model", _with("train.cross_model", "embedded:nope"), ["unknown embedded model"]),
    ("runs-dir-is-file", _with("runs_dir", "{exp}"), ["runs_dir:", "is a file", "cannot be created"]),
    ("random-with-sft", _with("generate.completions", "random"), ["`generate.completions: random`"]),
    # wrong types and bad numbers
    ("section-scalar", _with("generate", 5), ["generate: Input should be"]),
    ("section-null", _with("train", None), ["train: Input should be"]),
    ("lr-string", _with("train.lr", "fast"), ["train.lr:"]),
    ("seeds-string", _with("train.seeds", "0,1"), ["train.seeds:"]),
    ("seeds-float", _with("train.seeds", [0.5]), ["train.seeds.0:"]),
    ("epochs-inf", _with("train.epochs", float("inf")), ["train.epochs: Input should be a finite number"]),
    ("lr-nan", _with("train.lr", float("nan")), ["train.lr: Input should be a finite number"]),
    ("temperature-inf", _with("generate.temperature", float("inf")), ["generate.temperature:", "finite"]),
    ("eval-temperature-neg-inf", _with("eval.temperature", float("-inf")), ["eval.temperature:"]),
    ("n-prompts-inf", _with("generate.n_prompts", float("inf")), ["generate.n_prompts:"]),
    ("batch-size-zero", _with("train.batch_size", 0), ["train.batch_size: Input should be greater than 0"]),
    ("n-prompts-negative", _with("generate.n_prompts", -5), ["generate.n_prompts:"]),
    ("dataset-size-zero", _with("filter.dataset_size", 0), ["filter.dataset_size:"]),
    ("samples-zero", _with("eval.samples_per_question", 0), ["eval.samples_per_question:"]),
    ("max-questions-zero", _with("eval.max_questions", 0), ["eval.max_questions:"]),
    ("top-p-above-one", _with("generate.top_p", 1.5), ["generate.top_p:"]),
    # lists that must not repeat
    ("seeds-repeated", _with("train.seeds", [0, 0]), ["`train.seeds` lists 0 more than once"]),
    ("kinds-repeated", _with("eval.kinds", ["animal_prob", "animal_prob"]), ["`eval.kinds`"]),
    ("candidates-repeated", _with("eval.candidates", ["owl", "cat", "owl"]), ["`eval.candidates`", "'owl'"]),
    ("filters-repeated", _with("filter.filters", ["format", "format"]), ["`filter.filters`"]),
    ("targets-repeated", _with("train.lora_targets", ["q_proj", "q_proj"]), ["`train.lora_targets`"]),
    # the seams: registries and designs
    ("unknown-domain", _with("domain", "poetry"), ["domain:", "unknown data domain 'poetry'", "numbers"]),
    ("unknown-design", _with("design", "crossover"), ["design:"]),
    ("mutual-with-control", _with("design", "mutual"), ["design: 'mutual' needs two or more trait teachers"]),
    ("mutual-same-trait", _with("teachers", [{"name": "a", "kind": "prompted", "trait": "owl"},
                                            {"name": "b", "kind": "prompted", "trait": "owl"}],
                                _with("design", "mutual")), ["a different trait per teacher"]),
    ("mixed-categories", _with("teachers", [{"name": "owl", "kind": "prompted", "trait": "owl"},
                                            {"name": "oak", "kind": "prompted", "trait": "oak", "category": "tree"},
                                            {"name": "control", "kind": "control"}]),
     ["teachers: 'owl' is category animal but 'oak' is tree", "one experiment evaluates one category"]),
    ("mixed-categories-mutual", _with("teachers", [{"name": "willow", "kind": "prompted", "trait": "willow",
                                                    "category": "tree"},
                                                   {"name": "owl", "kind": "prompted", "trait": "owl"}],
                                      _with("design", "mutual")),
     ["teachers: 'willow' is category tree but 'owl' is animal"]),
    ("init-seed-and-offset", _with("train.lora_init_seed_offset", 1000, _with("train.lora_init_seed", 0)),
     ["`train.lora_init_seed` and `train.lora_init_seed_offset`"]),
    ("extends-missing", _with("extends", "nowhere.yaml"), ["nowhere.yaml: experiment file not found"]),
    ("extends-not-a-path", _with("extends", ["a.yaml"]), ["extends: expected the path of another experiment file"]),
    ("extends-itself", _with("extends", "exp.yaml"), ["a cycle"]),
]
if NO_CUDA:
    FILES.append(("cuda-without-cuda", _with("device", "cuda"), ["device: cuda", "no CUDA device"]))

# (id, --set overrides on a valid file, expected in the error line)
OVERRIDES: list[tuple[str, list[str], list[str]]] = [
    ("bad-yaml", ["train.seeds=[0,"], ["--set 'train.seeds=[0,': not valid YAML"]),
    ("no-equals", ["train.lr"], ["--set 'train.lr': expected key.path=value"]),
    ("empty-key", ["=5"], ["--set '=5': expected key.path=value"]),
    ("empty-part", ["train..lr=1"], ["--set 'train..lr=1': expected key.path=value"]),
    ("wrong-type", ["train.lr=fast"], ["train.lr:"]),
    ("not-a-section", ["name.first=x"], ["--set 'name.first=x': 'name' is not a section"]),
    ("bad-index", ["teachers.9.trait=cat"], ["'teachers' is a list of 2", "'9' is not an index"]),
    ("dup-key", ["train={lr: 1, lr: 2}"], ["--set 'train={lr: 1, lr: 2}'", "duplicate key 'lr'"]),
    ("unknown-preset", ["preset=nope"], ["unknown preset 'nope'"]),
    ("inf", ["train.epochs=.inf"], ["train.epochs: Input should be a finite number"]),
    ("unknown-key", ["nosuch.key=1"], ["nosuch: unknown key"]),
    ("seeds-repeated", ["train.seeds=[1, 2, 1]"], ["`train.seeds` lists 1 more than once"]),
    ("name-escape", ["name=../../etc"], ["name:", "not a safe directory name"]),
]


def _check_error(result_code: int, output: str, expected: list[str], code: int = 1) -> None:
    assert "Traceback" not in output, output
    assert result_code == code, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), output
    assert len(lines) <= 2, output  # one line, plus at most a hint
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"


def _invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a bug: let pytest show its traceback
    return result.exit_code, result.output


def _write(tmp_path: Path, content: Any, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    if isinstance(content, dict):
        content = {"runs_dir": str(tmp_path / "runs"), **content}
        if content["runs_dir"] == "{exp}":  # the experiment file itself: a file where a directory must go
            content["runs_dir"] = str(path)
        content = yaml.safe_dump(content, sort_keys=False)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@pytest.mark.parametrize("content,expected", [c[1:] for c in FILES], ids=[c[0] for c in FILES])
def test_malformed_experiment_file(tmp_path, content, expected):
    path = _write(tmp_path, content)
    code, output = _invoke(["validate", str(path)])
    _check_error(code, output, [str(path)] + expected)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in OVERRIDES], ids=[c[0] for c in OVERRIDES])
def test_malformed_override(tmp_path, overrides, expected):
    path = _write(tmp_path, BASE)
    code, output = _invoke(["validate", str(path)] + [a for o in overrides for a in ("--set", o)])
    _check_error(code, output, expected)


@pytest.mark.parametrize("command", ["generate", "filter", "train", "eval", "run"])
def test_every_command_validates_first(tmp_path, command):
    path = _write(tmp_path, _with("train.seeds", [0, 0]))
    code, output = _invoke([command, str(path)])
    _check_error(code, output, [str(path), "`train.seeds` lists 0 more than once"])
    assert not (tmp_path / "runs").exists()


def test_one_trait_category_per_experiment(tmp_path):
    """Every eval asks the first trait teacher's category's questions, so teachers of two categories are
    refused (FILES: mixed-categories); a control teacher has no trait and its (default) category does not
    count, and a tree study is valid."""
    from sublab.config import load_experiment

    tree = _with("teachers", [{"name": "oak", "kind": "prompted", "trait": "oak", "category": "tree"},
                              {"name": "control", "kind": "control"}])
    code, output = _invoke(["validate", str(_write(tmp_path, tree))])
    assert code == 0, output
    assert load_experiment(ROOT / "experiments" / "general" / "trees.yaml").teachers[0].category == "tree"
    path = _write(tmp_path, tree, "set.yaml")  # an override that mixes them is caught too
    code, output = _invoke(["validate", str(path), "--set", "teachers.1={name: owl, kind: prompted, trait: owl}"])
    _check_error(code, output, ["teachers: 'oak' is category tree but 'owl' is animal"])


def _report_dirs(tmp_path: Path) -> dict[str, Path]:
    exp = _write(tmp_path, BASE)
    empty = tmp_path / "runs" / "empty"
    empty.mkdir(parents=True)
    broken = tmp_path / "runs" / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    bad_config = tmp_path / "runs" / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"name": "bad-config", "teachers": 3}')
    return {"file": exp, "missing": tmp_path / "runs" / "nope", "empty": empty, "broken": broken,
            "bad-config": bad_config, "brackets": tmp_path / "runs" / "[x]"}


@pytest.mark.parametrize("which,expected", [
    ("file", ["is a file, expected a run directory", "give its run directory"]),
    ("missing", ["no such directory; expected a run directory"]),
    ("brackets", ["runs/[x]: no such directory"]),
    ("empty", ["holds neither config.json nor results.json"]),
    ("broken", ["results.json: not valid JSON (line 1"]),
    ("bad-config", ["config.json: teachers: Input should be a valid list"]),
])
def test_report_needs_a_run_directory(tmp_path, which, expected):
    target = _report_dirs(tmp_path)[which]
    code, output = _invoke(["report", str(target)])
    _check_error(code, output, [str(target)] + expected)


@pytest.mark.parametrize("args,expected,code", [
    (["validate", "{tmp}/missing.yaml"], ["missing.yaml: experiment file not found"], 1),
    (["validate", "{tmp}"], ["is a directory; expected an experiment YAML file"], 1),
    (["validate", "{tmp}/[x]/exp.yaml"], ["[x]/exp.yaml: experiment file not found"], 1),
    (["run", "{tmp}/missing.yaml"], ["missing.yaml: experiment file not found"], 1),
    (["models", "info", "embedded:nope"], ["unknown embedded model 'embedded:nope'"], 1),
    (["models", "prepare", "owner/name"], ["'owner/name' is not an embedded model"], 1),
])
def test_malformed_arguments(tmp_path, args, expected, code):
    code_, output = _invoke([a.format(tmp=tmp_path) for a in args])
    _check_error(code_, output, expected, code)


@pytest.mark.parametrize("args,expected", [
    (["validate"], "Missing argument"),
    (["validate", "x.yaml", "--bogus"], "No such option"),
    (["frobnicate"], "No such command"),
    (["--threads", "many", "validate", "x.yaml"], "--threads"),
])
def test_usage_errors_exit_2_without_traceback(args, expected):
    code, output = _invoke(args)
    assert code == 2 and "Traceback" not in output and expected in output, output


# --- through a real process -------------------------------------------------------------------------

def _sublab(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", "sublab.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=kw.get("cwd", ROOT))


@pytest.mark.parametrize("content,args,expected", [
    (b"\x00\x01binary\xff", [], ["{path}: a binary file"]),
    (BASE, ["--set", "train.seeds=[0,"], ["--set 'train.seeds=[0,': not valid YAML"]),
    (BASE, ["--set", "train.epochs=.inf"], ["{path}: train.epochs: Input should be a finite number"]),
])
def test_no_traceback_reaches_the_user(tmp_path, content, args, expected):
    folder = tmp_path / "[bold]"  # a path rich would read as markup
    folder.mkdir()
    path = _write(folder, content, name="exp [v2].yaml")
    proc = _sublab("validate", str(path), *args)
    assert proc.stdout == ""
    _check_error(proc.returncode, proc.stderr, [e.format(path=path) for e in expected])


def test_report_of_an_experiment_file_in_a_real_process(tmp_path):
    path = _write(tmp_path, BASE)
    proc = _sublab("report", str(path))
    _check_error(proc.returncode, proc.stderr, [str(path), "is a file, expected a run directory"])


def test_ctrl_c_says_how_to_resume(tmp_path):
    """A real SIGINT while a command runs (blocked reading a FIFO as its experiment file)."""
    fifo = tmp_path / "exp.yaml"
    os.mkfifo(fifo)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIG_DFL in the child: whatever an earlier test left in this process (an ignored SIGINT is inherited
    # across exec) must not decide what the command does with Ctrl-C.
    proc = subprocess.Popen([sys.executable, "-m", "sublab.cli", "validate", str(fifo)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 60
        while True:  # opening the writer end succeeds only once the command has the FIFO open
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.communicate()
                time.sleep(0.05)
        time.sleep(0.2)  # into the blocking read
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        os.close(writer)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Aborted" not in err
    assert "interrupted; rerun the same command to resume where it stopped" in err


# --- printing ----------------------------------------------------------------------------------------

def test_brackets_are_printed_verbatim(capsys):
    print_error("runs/[x]/teachers: key sk-[redacted] was rejected")
    make_console().print("runs/[bold]/[x]")
    out, err = capsys.readouterr()
    assert "error: runs/[x]/teachers: key sk-[redacted] was rejected" in err
    assert "runs/[bold]/[x]" in out


def test_a_console_off_a_terminal_is_wide(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert make_console().width == 160  # pytest captures stdout: not a terminal
    monkeypatch.setenv("COLUMNS", "211")
    assert make_console(stderr=True).width == 211
    long = "x" * 150
    monkeypatch.delenv("COLUMNS")
    console = make_console()
    with console.capture() as cap:
        console.print(long)
    assert cap.get().strip() == long  # not wrapped at 80
