"""The CLI end to end on a tiny random base, the real MiniLM encoder and a real SQLite library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from typer.testing import CliRunner

from loramix.base import load_base
from loramix.cli import app


@pytest.fixture
def env(tmp_path: Path, tiny_base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAMIX_BASE", str(tiny_base_dir))
    return {"LORAMIX_HOME": str(tmp_path / "home"), "LORAMIX_BASE": str(tiny_base_dir)}


def peft_dir(base_dir: Path, out: Path, seed: int, targets: list[str]) -> Path:
    torch.manual_seed(seed)
    pm = get_peft_model(load_base(base_dir).model,
                        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    pm.save_pretrained(out)
    return out


def run(*args: str) -> str:
    res = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.stdout


def test_adapter_lifecycle_route_score_ask(env: dict[str, str], tiny_base_dir: Path, tmp_path: Path) -> None:
    plants = peft_dir(tiny_base_dir, tmp_path / "p", 1, ["q_proj", "v_proj"])
    code = peft_dir(tiny_base_dir, tmp_path / "c", 2, ["q_proj", "o_proj"])
    ex = tmp_path / "ex.txt"
    ex.write_text("the roots of the oak draw water from the soil\n\npetals and sepals of a flower\n")
    run("adapters", "add", str(plants), "--name", "plants", "--description", "botany", "--tags", "science,plants",
        "--examples", str(ex))
    run("adapters", "add", str(code), "--name", "code", "--description", "compilers, kernels and source code",
        "--tags", "computing")
    listed = json.loads(run("adapters", "list", "--json"))
    assert {a["name"] for a in listed} == {"plants", "code"}
    shown = json.loads(run("adapters", "show", "plants", "--json"))
    assert shown["rank"] == 4 and shown["has_key"] and shown["examples"] == 2
    assert shown["target_modules"] == ["q_proj", "v_proj"]

    routed = json.loads(run("route", "how do flowers make seeds", "--k", "2", "--json"))
    assert [a["name"] for a in routed["adapters"]][0] == "plants"
    assert abs(sum(a["weight"] for a in routed["adapters"]) - 1.0) < 1e-6
    assert set(routed) >= {"adapters", "latency_ms"}
    only = json.loads(run("route", "flowers", "--tags", "computing", "--json"))
    assert [a["name"] for a in only["adapters"]] == ["code"]

    base_score = json.loads(run("score", "--text", "the oak tree has green leaves", "--json"))
    forced = json.loads(run("score", "--text", "the oak tree has green leaves", "--adapters", "plants:1", "--json"))
    assert base_score["tokens"] == forced["tokens"] > 0 and base_score["adapters"] == []
    assert forced["loss"] != pytest.approx(base_score["loss"], abs=1e-6)
    routed_score = json.loads(run("score", "--text", "the oak tree has green leaves", "--route", "--k", "1", "--json"))
    assert routed_score["adapters"][0]["name"] == "plants"

    ans = json.loads(run("ask", "tell me about leaves", "--max-new-tokens", "4", "--json"))
    assert ans["tokens"] == 4 and ans["adapters"][0]["name"] == "plants"
    assert json.loads(run("adapters", "show", "plants", "--json"))["use_count"] == 1

    merged = json.loads(run("adapters", "merge", "plants", "code", "--method", "cat", "--weights", "0.5,0.5",
                            "--name", "both", "--json"))
    assert merged["rank"] == 8 and merged["has_key"]
    run("adapters", "export", "both", str(tmp_path / "exported"))
    pm = PeftModel.from_pretrained(load_base(tiny_base_dir).model, tmp_path / "exported")
    assert pm is not None
    run("adapters", "rm", "code")
    assert {a["name"] for a in json.loads(run("adapters", "list", "--json"))} == {"plants", "both"}


def test_errors_are_clear_and_exit_2(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    proc = subprocess.run([sys.executable, "-m", "loramix.cli", "adapters", "add", str(bad), "--name", "x"],
                          capture_output=True, text=True, env={**env, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "InvalidAdapter" in proc.stderr and "pickle" in proc.stderr.lower()
    proc = subprocess.run([sys.executable, "-m", "loramix.cli", "adapters", "show", "nope"],
                          capture_output=True, text=True, env={**env, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_adapters_add_with_tenant_and_public(env: dict[str, str], tiny_base_dir: Path, tmp_path: Path) -> None:
    src = peft_dir(tiny_base_dir, tmp_path / "p", 3, ["q_proj"])
    run("adapters", "add", str(src), "--name", "shared-one", "--description", "shared")
    mine = json.loads(run("adapters", "add", str(src), "--name", "alice-private", "--tenant", "alice", "--json"))
    pub = json.loads(run("adapters", "add", str(src), "--name", "alice-public", "--tenant", "alice", "--public",
                         "--json"))
    assert (mine["owner"], mine["public"], pub["owner"], pub["public"]) == ("alice", False, "alice", True)
    bob_sees = {a["name"] for a in json.loads(run("adapters", "list", "--tenant", "bob", "--json"))}
    assert bob_sees == {"shared-one", "alice-public"}
    assert len(json.loads(run("adapters", "list", "--json"))) == 3
    audit = json.loads(run("adapters", "audit", "--tenant", "alice", "--json"))
    assert [(r["action"], r["adapter"]) for r in audit] == [("add", "alice-public"), ("add", "alice-private")]
    assert "alice-public" in run("adapters", "audit")
    res = CliRunner().invoke(app, ["adapters", "add", str(src), "--name", "x", "--public"])
    assert res.exit_code != 0 and "--public needs --tenant" in res.output
