"""Bad input at the CLI: one clean line on stderr and a nonzero exit; output a script can trust; start-up."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loramix.app import Loramix
from loramix.cli import _print_json, app
from loramix.config import ScoreConfig
from loramix.errors import ConfigError, LoramixError
from loramix.lora import LoraWeights
from loramix.route import Router
from loramix.store import Library
from loramix.testing import HashEncoder, random_lora


@pytest.fixture
def env(tmp_path: Path, tiny_base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAMIX_BASE", str(tiny_base_dir))
    return {**os.environ, "LORAMIX_HOME": str(tmp_path / "home"), "LORAMIX_BASE": str(tiny_base_dir),
            "COLUMNS": "40", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def two(env: dict[str, str], tiny_base) -> Library:
    """A library with two keyed adapters for the tiny base (keys set directly: no encoder needed)."""
    lib = Library(env["LORAMIX_HOME"])
    for i, name in enumerate(("alpha", "beta")):
        key = HashEncoder().encode([f"{name} text"])[0]  # what the stand-in encoder would compute
        lib.add_weights(random_lora(tiny_base, seed=i), name, examples=[f"{name} text"], key=key)
    return lib


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real entry point in a child process, stderr a pipe (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "loramix.cli", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert len(lines[0]) <= 1100
    return lines[0]


def invoke_error(*args: str, stdin: str | None = None) -> LoramixError:
    res = CliRunner().invoke(app, list(args), input=stdin)
    assert isinstance(res.exception, LoramixError), (res.exception, res.output)
    msg = str(res.exception)
    assert "\n" not in msg and len(msg) < 700, msg
    return res.exception


# --- point 3: inputs that crashed or hung ---------------------------------------------------------
@pytest.mark.parametrize("text", ["", "   ", "\n\t\n"])
def test_score_and_route_refuse_blank_text(env: dict[str, str], text: str) -> None:
    assert "empty" in str(invoke_error("score", "--text", text))
    assert "empty" in str(invoke_error("route", text))
    assert "empty" in str(invoke_error("route", "--file", "-", stdin=text))
    assert "empty" in str(invoke_error("score", "--file", "-", stdin=text))


@pytest.mark.parametrize("text", ["a", "b", "!"])
def test_score_of_one_token_says_nothing_to_score(env: dict[str, str], text: str) -> None:
    err = invoke_error("score", "--text", text)
    assert isinstance(err, ConfigError) and "nothing to score" in str(err)


@pytest.mark.parametrize("w", ["1e308", "-1e308", "nan", "inf", "-inf", "101", "1e400"])
def test_mixture_weights_must_be_finite_and_bounded(env: dict[str, str], two: Library, w: str) -> None:
    err = invoke_error("score", "--text", "the oak tree", "--adapters", f"alpha:{w}")
    assert "expected a finite number between -100 and 100" in str(err)
    err = invoke_error("adapters", "merge", "alpha", "beta", "--weights", f"0.5,{w}", "--name", "m")
    assert "merge weight 1" in str(err)
    assert [r.name for r in two.list()] == ["alpha", "beta"]


def test_negative_and_small_weights_are_accepted(env: dict[str, str], two: Library) -> None:
    res = CliRunner().invoke(app, ["score", "--text", "the oak tree has leaves", "--adapters", "alpha:-0.5,beta:2",
                                   "--json"], catch_exceptions=False)
    assert res.exit_code == 0 and math.isfinite(json.loads(res.stdout)["loss"])


def test_long_text_refused_above_named_limits(env: dict[str, str], tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("the oak tree has green leaves. " * 35_000)  # about 1 MB
    err = invoke_error("score", "--file", str(big))
    assert "over the limit of" in str(err) and "ScoreConfig.max_tokens" in str(err)
    huge = tmp_path / "huge.txt"
    huge.write_bytes(b"x" * (4 * ScoreConfig().max_chars + 10))
    err = invoke_error("score", "--file", str(huge))
    assert "bytes" in str(err) and "over the limit" in str(err)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert "not UTF-8" in str(invoke_error("score", "--file", str(latin1)))


def test_token_limit_and_bounded_memory_windows(tiny_base_dir: Path, tmp_path: Path) -> None:
    """Long texts are windowed; rows per forward pass shrink so their logits stay under the budget."""
    eng = Loramix(tmp_path / "home", base=tiny_base_dir)
    text = "the quick brown fox jumps over the lazy dog. " * 40
    n = len(eng.base.tokenizer(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(ConfigError, match=f"{n:,} tokens, over the limit of 300 tokens"):
        eng.score(text, cfg=ScoreConfig(max_tokens=300))
    shapes: list[tuple[int, int]] = []
    real = eng.mixer.logits

    def spy(ids: torch.Tensor, **kw):  # type: ignore[no-untyped-def]
        shapes.append(tuple(ids.shape))
        return real(ids, **kw)

    eng.mixer.logits = spy  # type: ignore[method-assign]
    vocab = eng.mixer.model.config.vocab_size
    budget_mib = 1
    small = eng.score(text, cfg=ScoreConfig(max_len=32, logits_mib=budget_mib))
    assert len(shapes) > 1 and all(b * t * vocab * 12 <= budget_mib << 20 or b == 1 for b, t in shapes)
    shapes.clear()
    large = eng.score(text, cfg=ScoreConfig(max_len=32, logits_mib=1024))
    assert len(shapes) < 4 and small["tokens"] == large["tokens"] == n - 1
    assert small["loss"] == pytest.approx(large["loss"], rel=1e-4)


# --- point 5: output a script can trust --------------------------------------------------------------
def test_json_never_prints_nan_or_infinity(capsys: pytest.CaptureFixture[str]) -> None:
    _print_json({"loss": float("nan"), "xs": [float("inf"), -float("inf"), 1.5], "nested": {"t": (float("nan"),)}})
    text = capsys.readouterr().out

    def no_constants(c: str) -> None:
        raise AssertionError(f"bare {c} in JSON output")

    assert json.loads(text, parse_constant=no_constants) == {"loss": None, "xs": [None, None, 1.5],
                                                               "nested": {"t": [None]}}


def test_errors_are_one_line_on_stderr(env: dict[str, str], adapter_folder: Path) -> None:
    long_name = "n" * 10_000
    line = one_line_error(cli(env, "adapters", "add", str(adapter_folder), "--name", long_name),
                          "InvalidAdapter", "more characters")
    assert long_name not in line
    one_line_error(cli(env, "adapters", "show", "x" * 5000), "AdapterNotFound", "more characters")
    one_line_error(cli(env, "adapters", "add", str(adapter_folder), "--name", "-rf"), "not starting with '-'")
    one_line_error(cli(env, "adapters", "lst"), "No such command")
    one_line_error(cli(env, "route", "--k", "3"), "QUERY or --file")
    one_line_error(cli(env, "score", "--text", ""), "ConfigError", "empty")
    one_line_error(cli(env, "score", "--file", str(adapter_folder / "nope.txt")), "cannot read")


def test_route_and_score_read_files_and_stdin(env: dict[str, str], two: Library, tmp_path: Path) -> None:
    q = tmp_path / "q.txt"
    q.write_text("alpha text")
    eng = Loramix(env["LORAMIX_HOME"])
    eng._router = Router(eng.library, encoder=HashEncoder())  # routing quality is not under test here
    direct = eng.route("alpha text").to_dict()["adapters"]
    import loramix.cli as cli_mod

    orig = cli_mod._engine
    try:
        cli_mod._engine = lambda *a, **k: eng  # type: ignore[assignment]
        for args, stdin in ((["route", "--file", str(q), "--json"], None), (["route", "--file", "-", "--json"], "alpha text")):
            res = CliRunner().invoke(app, [*args, "--strategy", "semantic"], input=stdin, catch_exceptions=False)
            assert res.exit_code == 0, res.output
            assert [a["name"] for a in json.loads(res.stdout)["adapters"]] == [a["name"] for a in direct]
    finally:
        cli_mod._engine = orig
    by_file = CliRunner().invoke(app, ["score", "--file", str(q), "--json"], catch_exceptions=False)
    by_stdin = CliRunner().invoke(app, ["score", "--file", "-", "--json"], input="alpha text", catch_exceptions=False)
    by_text = CliRunner().invoke(app, ["score", "--text", "alpha text", "--json"], catch_exceptions=False)
    assert json.loads(by_file.stdout) == json.loads(by_stdin.stdout) == json.loads(by_text.stdout)


# --- point 6: gc ----------------------------------------------------------------------------------------
def test_gc_command_reports_and_removes(env: dict[str, str], two: Library, tiny_base) -> None:
    lib = two
    lib.add_weights(random_lora(tiny_base, seed=9), "unkeyed")  # an add interrupted before its key
    orphan, _ = lib.blobs.put(b"an orphan blob")
    stale, _ = lib.blobs.write_temp(b"a temp file a killed import left")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh, _ = lib.blobs.write_temp(b"an import in progress")
    dry = json.loads(CliRunner().invoke(app, ["adapters", "gc", "--dry-run", "--json"], catch_exceptions=False).stdout)
    assert dry["dry_run"] and dry["orphan_blobs"] == [orphan] and dry["temp_files"] == [stale.name]
    assert dry["unkeyed"] == ["unkeyed"] and dry["removed"] == 2
    assert lib.blobs.exists(orphan) and stale.exists()
    done = json.loads(CliRunner().invoke(app, ["adapters", "gc", "--json"], catch_exceptions=False).stdout)
    assert done["removed"] == 2 and not lib.blobs.exists(orphan) and not stale.exists() and fresh.exists()
    for r in lib.list():
        assert lib.load(r.id, verify=True).rank == 4
    res = CliRunner().invoke(app, ["adapters", "gc"], catch_exceptions=False)
    assert "removed 0 temp/trash files and 0 orphan blobs" in res.output and "1 adapters have no routing key" in res.output


def test_gc_puts_back_a_blob_an_old_interrupted_remove_moved_aside(env: dict[str, str], two: Library) -> None:
    """Libraries written by the old remove (blob moved to trash before the row's deletion committed)."""
    rec = two.get("alpha")
    trashed = two.blobs.trash(rec.blob)
    assert trashed is not None and not two.blobs.exists(rec.blob)
    old = time.time() - 7200
    os.utime(trashed, (old, old))
    rep = two.gc()
    assert rep.restored == [trashed.name] and two.load("alpha", verify=True).rank == 4


# --- point 7: start-up ----------------------------------------------------------------------------------
def test_list_and_show_never_import_torch(env: dict[str, str], two: Library) -> None:
    code = ("import sys\n"
            "from loramix.cli import app\n"
            "for args in (['adapters', 'list'], ['adapters', 'list', '--json'], ['adapters', 'show', 'alpha'],\n"
            "             ['adapters', 'show', 'beta', '--json'], ['adapters', 'gc', '--dry-run']):\n"
            "    app(args, standalone_mode=False)\n"
            "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'sentence_transformers', 'faiss')\n"
            "         if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout


def test_finished_command_exits_at_once_with_complete_output(env: dict[str, str], two: Library) -> None:
    """main() flushes and leaves with os._exit: the interpreter's teardown (about 1 s once torch and
    sentence-transformers are loaded) is skipped; output and exit codes are intact."""
    code = ("import atexit, sys, torch\n"
            "atexit.register(lambda: print('TEARDOWN RAN'))\n"
            "sys.argv = ['loramix'] + sys.argv[1:]\n"
            "from loramix.cli import main\n"
            "main()\n")
    ok = subprocess.run([sys.executable, "-c", code, "adapters", "list", "--json"], capture_output=True, text=True,
                        env=env, timeout=120)
    assert ok.returncode == 0 and "TEARDOWN RAN" not in ok.stdout
    assert [a["name"] for a in json.loads(ok.stdout)] == ["alpha", "beta"]
    bad = subprocess.run([sys.executable, "-c", code, "adapters", "show", "nope"], capture_output=True, text=True,
                         env=env, timeout=120)
    one_line_error(bad, "AdapterNotFound")


@pytest.fixture
def adapter_folder(tmp_path: Path, tiny_base) -> Path:
    from loramix.store import write_peft_dir

    w: LoraWeights = random_lora(tiny_base, seed=3)
    return write_peft_dir(w, tmp_path / "adapter")
