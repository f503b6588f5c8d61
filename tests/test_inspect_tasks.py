"""The inspect-ai tasks (`sublab.inspect_tasks`) run by inspect's own `eval` against a real `sublab serve`
on 127.0.0.1 (a tiny model fitted to name animals), found by name through the `inspect_ai` entry point
that pyproject.toml declares."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from conftest import LocalServer

inspect_ai = pytest.importorskip("inspect_ai")
ROOT = Path(__file__).parents[1]


@pytest.fixture
def entry_point(tmp_path, monkeypatch):
    """pyproject's `inspect_ai` entry point, installed as a distribution on sys.path (the venv's editable
    install may predate it, and this test must not reinstall the project)."""
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["inspect_ai"]
    dist = tmp_path / "site" / "sublab_inspect_probe-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sublab-inspect-probe\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[inspect_ai]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("INSPECT_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-dummy-for-a-local-server")
    monkeypatch.setenv("INSPECT_DISPLAY", "none")
    return eps


def test_animal_preference_and_misalignment_through_inspect_and_sublab_serve(entry_point, tiny_animal_model_dir,
                                                                              tmp_path):
    from inspect_ai import eval as inspect_eval

    assert entry_point == {"sublab": "sublab.inspect_tasks"}
    server = LocalServer({"tiny": str(tiny_animal_model_dir)})
    try:
        common = {"model": "openai/tiny", "model_base_url": server.base_url, "display": "none",
                  "log_dir": str(tmp_path / "logs"),
                  "model_args": {"responses_api": False}}  # sublab serve speaks chat completions only
        [log] = inspect_eval("sublab/animal_preference", task_args={"target": "owl", "samples_per_question": 3},
                             limit=4, **common)
        assert log.status == "success", log.error
        assert len(log.samples) == 4 * 3
        [score] = log.results.scores
        assert score.name == "names_target" and set(score.metrics) == {"mean", "stderr"}
        values = [s.scores["names_target"].value for s in log.samples]
        answers = [s.output.completion for s in log.samples]
        from sublab.evals.animals import mentions

        assert values == [float(mentions(a, "owl")) for a in answers]  # sublab's rule, answer by answer
        assert 0 < sum(values) < len(values)  # the fitted model says owl ~half the time: both outcomes seen
        assert score.metrics["mean"].value == pytest.approx(sum(values) / len(values))
        chats = [r for r in server.requests if r["path"] == "/v1/chat/completions"]
        assert len(chats) == 4 * 3 and all(r["status"] == 200 for r in chats)

        [log] = inspect_eval("sublab/misalignment", task_args={"samples_per_question": 1, "max_tokens": 8},
                             limit=2, **common)
        assert log.status == "success", log.error
        assert {m for m in log.results.scores[0].metrics} == {"misaligned_rate", "included_share"}
        statuses = [s.scores["judged"].metadata["status"] for s in log.samples]
        assert len(statuses) == 2 and all(st in ("aligned", "misaligned", "code", "refusal", "incoherent",
                                                 "unparseable") for st in statuses)
        # each answer was sampled, then judged twice (alignment, coherence) by the served model
        assert len([r for r in server.requests if r["path"] == "/v1/chat/completions"]) == len(chats) + 2 * 3
    finally:
        server.close()
