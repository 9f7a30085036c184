"""`loramix docs ...`, `ask/score --docs` and `train adapter --docs` end to end: tiny base, real MiniLM, real SQLite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loramix.cli import app

TEXTS = [
    {"id": "oak", "text": "The oak is a tree of the genus Quercus; its fruit is the acorn."},
    {"id": "fox", "text": "The fox is a small wild canine with a bushy tail and a pointed snout."},
    {"id": "acid", "text": "An acid reacts with a base to form a salt and water."},
    {"id": "ship", "text": "The ship sailed out of the harbour at dawn with the tide."},
    {"id": "noun", "text": "A noun is a word that names a person, place or thing."},
]


@pytest.fixture
def env(tmp_path: Path, tiny_base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAMIX_BASE", str(tiny_base_dir))
    src = tmp_path / "facts.jsonl"
    src.write_text("".join(json.dumps(t) + "\n" for t in TEXTS))
    return src


def run(*args: str, code: int = 0) -> str:
    res = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res.stdout


def test_docs_lifecycle_ask_score_train(env: Path, tmp_path: Path) -> None:
    added = json.loads(run("docs", "add", str(env), "--collection", "facts", "--tags", "science", "--json"))
    assert added["n_docs"] == 5 and added["n_chunks"] == 5 and added["tags"] == ["science"]
    assert [c["name"] for c in json.loads(run("docs", "list", "--json"))] == ["facts"]
    shown = json.loads(run("docs", "show", "facts", "--chunks", "2", "--json"))
    assert shown["chunks"][0]["key"] == "oak"
    found = json.loads(run("docs", "search", "what fruit does the oak tree bear", "--docs", "facts", "--json"))
    assert found[0]["key"] == "oak" and found[0]["collection"] == "facts"

    ans = json.loads(run("ask", "what is an acid?", "--docs", "facts", "--passages", "2", "--no-route",
                         "--max-new-tokens", "3", "--json"))
    assert [p["key"] for p in ans["passages"]][0] == "acid" and len(ans["passages"]) == 2
    assert {"collection", "id", "score"} <= set(ans["passages"][0])
    sc = json.loads(run("score", "--text", " form a salt and water.", "--docs", "tag:science", "--prompt",
                        "an acid reacts with a base to", "--json"))
    assert sc["tokens"] > 0 and sc["passages"]

    tr = json.loads(run("train", "adapter", "--name", "aware", "--data", str(env), "--docs", "facts", "--steps", "2",
                        "--batch-size", "2", "--seq-len", "16", "--json"))
    assert tr["adapter"]["meta"]["docs"] == ["facts"]

    run("docs", "rm", "facts")
    assert json.loads(run("docs", "list", "--json")) == []
    res = CliRunner().invoke(app, ["docs", "show", "facts"])
    assert res.exit_code != 0 and "no document collection named 'facts'" in str(res.exception)
    res = CliRunner().invoke(app, ["docs", "add", str(tmp_path / "nope.txt"), "--collection", "x"])
    assert res.exit_code != 0 and "no such file" in str(res.exception)


def test_train_nano_defaults_to_the_measured_core_size(env: Path) -> None:
    from loramix.config import NANO_RANK, TrainConfig

    common = ("--data", str(env), "--kind", "nano", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--json")
    nano = json.loads(run("train", "adapter", "--name", "n-default", *common))["adapter"]
    assert nano["kind"] == "nano" and nano["rank"] == NANO_RANK == 10
    assert json.loads(run("train", "adapter", "--name", "n4", "--rank", "4", *common))["adapter"]["rank"] == 4
    lora = json.loads(run("train", "adapter", "--name", "l-default", *common[:2], *common[4:]))["adapter"]
    assert lora["kind"] == "lora" and lora["rank"] == TrainConfig().rank == 8
