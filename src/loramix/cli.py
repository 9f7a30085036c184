"""The ``loramix`` command line. Each subcommand is a typed function; its docstring is its --help."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from loramix.config import GenerateConfig, MixConfig, RouteConfig, TrainConfig
from loramix.errors import LoramixError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="A library of LoRA adapters for one causal LM: route, mix, merge, train, generate.")
adapters_app = typer.Typer(no_args_is_help=True, help="Manage the adapter library.")
train_app = typer.Typer(no_args_is_help=True, help="Train expert adapters and the router.")
app.add_typer(adapters_app, name="adapters")
app.add_typer(train_app, name="train")
console = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)

Home = Annotated[Path | None, typer.Option("--home", envvar="LORAMIX_HOME", help="Library folder (default ~/.loramix).")]
Base = Annotated[str | None, typer.Option("--base", envvar="LORAMIX_BASE", help="Local Hugging Face causal-LM folder.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
K = Annotated[int, typer.Option("--k", help="Adapters per query.")]
Strategy = Annotated[str, typer.Option("--strategy", help="semantic | tags | hybrid | trained | arrow.")]
Temp = Annotated[float, typer.Option("--route-temperature", help="Softmax temperature for mixture weights.")]
Tags = Annotated[str, typer.Option("--tags", help="Only adapters with all these comma-separated tags.")]
Bf16 = Annotated[bool, typer.Option("--bf16/--fp32", help="bf16 autocast (often slower on CPU).")]

_R, _G, _T, _M = RouteConfig(), GenerateConfig(), TrainConfig(), MixConfig()


def _engine(home: Path | None, base: str | None = None, bf16: bool = False):
    from loramix.app import Loramix

    return Loramix(home=home, base=base, mix=MixConfig(bf16=bf16))


def _csv(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def _route_cfg(k: int, strategy: str, temperature: float, tags: str) -> RouteConfig:
    return RouteConfig(k=k, strategy=strategy, temperature=temperature, tags=_csv(tags))


def _print_json(obj: Any) -> None:
    out.print(json.dumps(obj, default=str), markup=False, highlight=False)


def _show_route(adapters: list[dict[str, Any]]) -> None:
    if not adapters:
        console.print("[dim]route: base model (no adapter)[/]")
        return
    parts = [f"[bold]{a['name']}[/] {a['weight']:.2f}" for a in adapters]
    console.print("route: " + ", ".join(parts))


# --- adapters ---------------------------------------------------------------------------------
@adapters_app.command("add")
def adapters_add(path: Path, name: Annotated[str, typer.Option("--name")], home: Home = None, base: Base = None,
                 description: Annotated[str, typer.Option("--description")] = "",
                 tags: Annotated[str, typer.Option("--tags", help="Domain tags, comma-separated.")] = "",
                 skills: Annotated[str, typer.Option("--skills", help="Skill tags, comma-separated.")] = "",
                 examples: Annotated[Path | None, typer.Option("--examples", help="Example inputs: one per line, or JSONL with 'text'.")] = None,
                 as_json: Json = False) -> None:
    """Import a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into the library."""
    ex = _read_examples(examples) if examples else None
    rec = _engine(home, base).add_adapter(path, name, description=description, domain_tags=_csv(tags),
                                          skill_tags=_csv(skills), examples=ex)
    if as_json:
        _print_json(rec.to_dict())
    else:
        console.print(f"added [bold]{rec.name}[/] ({rec.id}): rank {rec.rank}, {rec.n_params:,} parameters, "
                      f"targets {','.join(rec.target_modules)}")


def _read_examples(path: Path) -> list[str]:
    from loramix.train.corpora import load_source

    return load_source(str(path))


@adapters_app.command("list")
def adapters_list(home: Home = None, tags: Tags = "", as_json: Json = False) -> None:
    """List the adapters in the library."""
    from loramix.store import Library

    recs = Library(home).list(tags=_csv(tags) or None)
    if as_json:
        _print_json([r.to_dict() for r in recs])
        return
    table = Table("name", "id", "rank", "params", "tags", "uses", "description")
    for r in recs:
        table.add_row(r.name, r.id, str(r.rank), f"{r.n_params:,}", ",".join(r.tags), str(r.use_count),
                      r.description[:60])
    out.print(table)


@adapters_app.command("show")
def adapters_show(name: str, home: Home = None, as_json: Json = False) -> None:
    """Show one adapter's record."""
    from loramix.store import Library

    lib = Library(home)
    rec = lib.get(name)
    d = rec.to_dict() | {"examples": len(lib.examples(rec.id)), "events": lib.events(rec.id, limit=20)}
    if as_json:
        _print_json(d)
    else:
        for k, v in d.items():
            out.print(f"[bold]{k}[/]: {v}")


@adapters_app.command("rm")
def adapters_rm(name: str, home: Home = None) -> None:
    """Remove an adapter from the library."""
    from loramix.store import Library

    Library(home).remove(name)
    console.print(f"removed {name}")


@adapters_app.command("export")
def adapters_export(name: str, out_dir: Path, home: Home = None) -> None:
    """Write an adapter as a PEFT folder that PeftModel.from_pretrained loads."""
    from loramix.store import Library

    path = Library(home).export(name, out_dir)
    console.print(f"exported {name} to {path}")


@adapters_app.command("merge")
def adapters_merge(names: list[str], name: Annotated[str, typer.Option("--name", help="Name of the new adapter.")],
                   weights: Annotated[str, typer.Option("--weights", help="Comma-separated, one per adapter (default equal).")] = "",
                   method: Annotated[str, typer.Option("--method", help="linear|cat|ties|dare_linear|dare_ties|svd|magnitude_prune|...")] = "linear",
                   density: Annotated[float, typer.Option("--density", help="Kept share for ties/dare/magnitude_prune.")] = 0.5,
                   svd_rank: Annotated[int | None, typer.Option("--svd-rank")] = None,
                   seed: Annotated[int, typer.Option("--seed", help="Seed for DARE's random drops.")] = 0,
                   home: Home = None, as_json: Json = False) -> None:
    """Merge adapters into a new library adapter (same semantics as PEFT's add_weighted_adapter)."""
    w = [float(x) for x in _csv(weights)] if weights else [1.0 / len(names)] * len(names)
    rec = _engine(home).merge(names, w, method, name, density=density, svd_rank=svd_rank, seed=seed)
    if as_json:
        _print_json(rec.to_dict())
    else:
        console.print(f"merged {', '.join(names)} -> [bold]{rec.name}[/] ({method}, rank {rec.rank})")


# --- route / score / ask ----------------------------------------------------------------------
@app.command("route")
def route(query: str, k: K = _R.k, strategy: Strategy = _R.strategy, temperature: Temp = _R.temperature,
          tags: Tags = "", home: Home = None, as_json: Json = False) -> None:
    """Pick the top-k adapters for a query and their mixture weights."""
    r = _engine(home).route(query, _route_cfg(k, strategy, temperature, tags))
    d = r.to_dict()
    if as_json:
        _print_json({"adapters": [{"name": a["name"], "score": a["score"], "weight": a["weight"]} for a in d["adapters"]],
                     "latency_ms": d["latency_ms"], "strategy": d["strategy"]})
        return
    table = Table("adapter", "score", "weight")
    for a in d["adapters"]:
        table.add_row(a["name"], f"{a['score']:.3f}", f"{a['weight']:.3f}")
    out.print(table)
    console.print(f"[dim]{d['latency_ms']:.1f} ms[/]")


@app.command("score")
def score(text: Annotated[str | None, typer.Option("--text")] = None,
          file: Annotated[Path | None, typer.Option("--file")] = None,
          adapters: Annotated[str | None, typer.Option("--adapters", help="Forced mixture 'name:w,name:w'.")] = None,
          do_route: Annotated[bool, typer.Option("--route", help="Route the text to pick the mixture.")] = False,
          k: K = _R.k, strategy: Strategy = _R.strategy, temperature: Temp = _R.temperature, tags: Tags = "",
          home: Home = None, base: Base = None, as_json: Json = False) -> None:
    """Mean token negative log-likelihood of a text (float32) under a mixture, a route, or the base model."""
    from loramix.app import parse_mixture

    if (text is None) == (file is None):
        raise typer.BadParameter("give exactly one of --text or --file")
    body = text if text is not None else file.read_text()  # type: ignore[union-attr]
    mix = parse_mixture(adapters) if adapters else None
    rcfg = _route_cfg(k, strategy, temperature, tags) if do_route and not mix else None
    res = _engine(home, base).score(body, adapters=mix, route=rcfg)
    if as_json:
        _print_json(res)
    else:
        _show_route(res["adapters"])
        out.print(f"loss {res['loss']:.4f} over {res['tokens']} tokens")


@app.command("ask")
def ask(prompt: str, adapters: Annotated[str | None, typer.Option("--adapters", help="Forced mixture 'name:w,name:w'.")] = None,
        k: K = _R.k, strategy: Strategy = _R.strategy, route_temperature: Temp = _R.temperature, tags: Tags = "",
        no_route: Annotated[bool, typer.Option("--no-route", help="Answer with the base model alone.")] = False,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = _G.max_new_tokens,
        temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 = greedy.")] = _G.temperature,
        home: Home = None, base: Base = None, bf16: Bf16 = False, as_json: Json = False) -> None:
    """Route the prompt, mix the chosen adapters and generate an answer (streamed)."""
    from loramix.app import parse_mixture

    eng = _engine(home, base, bf16)
    mix = parse_mixture(adapters) if adapters else None
    rcfg = None if (mix or no_route) else _route_cfg(k, strategy, route_temperature, tags)
    if not as_json and rcfg is not None:
        _show_route(eng.route(prompt, rcfg).to_dict()["adapters"])
    elif not as_json and mix:
        _show_route([{"name": r.name, "weight": w} for r, w in eng.resolve(mix)])

    def stream(t: str) -> None:
        sys.stdout.write(t)
        sys.stdout.flush()

    ans = eng.ask(prompt, adapters=mix, route=rcfg, gen=GenerateConfig(max_new_tokens, temperature),
                  on_text=None if as_json else stream)
    if as_json:
        _print_json(ans.to_dict())
    else:
        sys.stdout.write("\n")


# --- training ---------------------------------------------------------------------------------
@train_app.command("adapter")
def train_adapter(name: Annotated[str, typer.Option("--name")],
                  data: Annotated[str, typer.Option("--data", help="Text/JSONL file, or a corpus: zoology, computing, bible, c-api, dictd:NAME, fortune:NAME.")],
                  description: Annotated[str, typer.Option("--description")] = "",
                  tags: Annotated[str, typer.Option("--tags")] = "",
                  steps: Annotated[int, typer.Option("--steps")] = _T.steps,
                  rank: Annotated[int, typer.Option("--rank")] = _T.rank,
                  lr: Annotated[float, typer.Option("--lr")] = _T.lr,
                  batch_size: Annotated[int, typer.Option("--batch-size")] = _T.batch_size,
                  seq_len: Annotated[int, typer.Option("--seq-len")] = _T.seq_len,
                  max_examples: Annotated[int, typer.Option("--max-examples")] = _T.max_examples,
                  home: Home = None, base: Base = None, as_json: Json = False) -> None:
    """Train an expert LoRA adapter on a corpus and add it to the library (eval loss before/after)."""
    from loramix.train.corpora import load_source

    texts = load_source(data, limit=max_examples)
    cfg = TrainConfig(steps=steps, rank=rank, alpha=2.0 * rank, lr=lr, batch_size=batch_size, seq_len=seq_len,
                      max_examples=max_examples)
    rec, report = _engine(home, base).train_adapter(name, texts, cfg, description=description or f"expert trained on {data}",
                                                    domain_tags=_csv(tags), source=data, progress=not as_json)
    res = {"adapter": rec.to_dict(), "eval_loss_before": report["eval_loss_before"],
           "eval_loss_after": report["eval_loss_after"], "seconds": report["seconds"]}
    if as_json:
        _print_json(res)
    else:
        console.print(f"[bold]{rec.name}[/]: eval loss {report['eval_loss_before']:.3f} -> "
                      f"{report['eval_loss_after']:.3f} in {report['seconds']:.0f} s")


@app.command("quickstart")
def quickstart(home: Home = None, base: Base = None,
               steps: Annotated[int, typer.Option("--steps", help="Training steps per expert.")] = 60,
               as_json: Json = False) -> None:
    """Build a starter library of expert adapters from real corpora, then answer one question per domain."""
    from loramix.quickstart import run_quickstart

    res = run_quickstart(home=home, base=base, steps=steps, quiet=as_json)
    if as_json:
        _print_json(res)


def main() -> None:
    try:
        app()
    except LoramixError as e:
        console.print(f"[red]error:[/] {type(e).__name__}: {e}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
