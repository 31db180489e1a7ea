"""The `stillhouse` command: one thin subcommand per stage over the library functions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from stillhouse.errors import StillhouseError

app = typer.Typer(help="Distil a teacher language model into a small open student, and audit models for distillation.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

RecipeArg = typer.Argument(..., help="path to a recipe YAML file", show_default=False)
ForceOpt = typer.Option(False, "--force", help="redo stages even if they finished with the same inputs")


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def print_headline(h: dict) -> None:
    """The run's headline on the console: every evaluated model with its role, accuracy and share of the teacher."""
    from stillhouse.ui import console

    def pct(x):
        return "n/a" if x is None else f"{x:.1%}"

    def params(n):
        return "" if n is None else f" ({n / 1e6:.2f}M params)"

    if h.get("report"):
        console.print(f"\n[bold]report[/]: {h['report']}")
    for m in h["models"]:
        kept = f"  share of teacher kept [bold]{pct(m['share_kept'])}[/]" if m["role"] != "teacher" else ""
        if kept and m.get("share_kept_caveat"):
            kept = f"  share of teacher kept: not meaningful ({m['share_kept_caveat']})"
        who = m["name"] if m["name"] == m["role"] else f"{m['name']} ({m['role']})"
        console.print(f"[bold]{who}[/]: accuracy [bold]{pct(m['accuracy'])}[/]{params(m['parameters'])}{kept}")
    if h.get("wall_seconds") is not None:
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in h["stage_seconds"].items())
        console.print(f"total wall time {h['wall_seconds']:.0f} s ({stages})")


@app.command()
def run(recipe: Path = RecipeArg, force: bool = ForceOpt) -> None:
    """Run every stage of RECIPE in dependency order (its help lists the registered stages: `run_help`)."""
    from stillhouse.recipe import load_recipe
    from stillhouse.stages import run_all

    print_headline(run_all(load_recipe(recipe), force=force))


@app.command("train")
def train_cmd(recipe: Path = RecipeArg, force: bool = ForceOpt,
              nproc: int = typer.Option(1, "--nproc", help="training processes on this machine (data parallel; "
                                                           "one per GPU), started by the launcher"),
              launcher: str = typer.Option(None, help="torchrun (the default with --nproc > 1; CPU or GPU) or "
                                                      "accelerate (GPUs; with --accelerate-config for FSDP/DeepSpeed)"),
              accelerate_config: Path = typer.Option(None, "--accelerate-config",
                                                     help="an `accelerate config` file (FSDP, DeepSpeed ZeRO, mixed "
                                                          "precision), passed to `accelerate launch`"),
              nnodes: int = typer.Option(1, help="machines training together (each runs this command)"),
              node_rank: int = typer.Option(0, help="this machine's number among them; 0 writes the run"),
              master_addr: str = typer.Option("127.0.0.1", help="address of the machine with --node-rank 0"),
              master_port: int = typer.Option(29500, help="port on it for the processes to meet")) -> None:
    """Train every student on the curated data → student/ (several: students/NAME/). Checkpoints every
    train.save_steps steps and at SIGTERM/Ctrl-C; running it again resumes. --nproc N trains data-parallel."""
    from stillhouse.recipe import load_recipe
    from stillhouse.stages import get_stage, open_run
    from stillhouse.train.launch import Launch, follow

    launch = Launch(nproc=nproc, launcher=launcher, accelerate_config=accelerate_config, nnodes=nnodes,
                    node_rank=node_rank, master_addr=master_addr, master_port=master_port)
    r = load_recipe(recipe)
    launch.check({s.name: r.train_for(s).batch_size for s in r.students})
    if launch.used and any(r.train_for(s).method == "on_policy" for s in r.students):
        raise StillhouseError("train.method on_policy trains in one process; run `stillhouse train` without "
                              "--nproc, --launcher or --accelerate-config")
    if node_rank > 0:  # another machine's processes: rank 0's machine checks, writes and publishes the run
        follow(launch, r, open_run(r))
        return
    stage = get_stage("train")
    stage.launch = launch
    stage.run(r, open_run(r), force=force)


def run_help() -> str:
    """`stillhouse run --help`'s text, from the stage registry: every registered stage in the order `run` walks them,
    a plug-in's included, each stage that runs only when the recipe has its section marked so."""
    from stillhouse.stages import ordered_stages

    names = [s.name if s.always else f"{s.name} (when the recipe has the `{s.section}:` section)"
             for s in ordered_stages()]
    return (f"Run every stage of RECIPE in dependency order: {', '.join(names)}. A stage that already finished with "
            "the same inputs and settings is skipped (--force redoes it).")


def _stage_command(name: str, stage) -> None:
    """A subcommand `stillhouse NAME RECIPE [--force] [the stage's flags]` for a registered stage."""
    import inspect

    params = [inspect.Parameter("recipe", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=RecipeArg, annotation=Path),
              inspect.Parameter("force", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=ForceOpt, annotation=bool)]
    for flag, help_text in stage.flags.items():
        params.append(inspect.Parameter(flag, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=bool,
                                        default=typer.Option(False, "--" + flag.replace("_", "-"), help=help_text)))

    def cmd(recipe: Path, force: bool = False, **flags: bool) -> None:
        from stillhouse.recipe import load_recipe
        from stillhouse.stages import run_stage

        run_stage(name, load_recipe(recipe), force=force, **flags)

    cmd.__signature__ = inspect.Signature(params)
    cmd.__doc__ = stage.summary or f"Run the {name} stage of RECIPE."
    app.command(name=name)(cmd)


def _add_plugin_commands() -> None:
    """One subcommand per registered stage, then every `stillhouse.cli` plug-in's commands (the demo's among them)."""
    from stillhouse.registry import Registry
    from stillhouse.stages import ordered_stages

    for c in app.registered_commands:
        if c.callback is run:
            c.help = run_help()
    taken = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    for stage in ordered_stages():
        if not stage.command:  # its CLI is a built-in command of its own (`stillhouse audit --recipe`)
            continue
        if stage.name in taken:
            raise StillhouseError(f"stage {stage.name!r} clashes with the built-in command of that name")
        _stage_command(stage.name, stage)
    for _, add_commands in Registry("stillhouse.cli", "command plug-in"):
        add_commands(app)


@app.command("serve")
def serve_cmd(model: str = typer.Argument(..., help="a local HF model directory (a student, Atlas, any causal LM) "
                                                  "or stillhouse:NAME", show_default=False),
              host: str = typer.Option("127.0.0.1", help="address to bind"),
              port: int = typer.Option(8000, help="port to bind"),
              model_name: str = typer.Option(None, help="the model id clients ask for (default: the directory name)"),
              api_key_env: str = typer.Option(None, help="require `Authorization: Bearer $VAR` from clients"),
              max_batch: int = typer.Option(64, help="most requests decoded together (continuous batching)"),
              window_ms: float = typer.Option(10.0, help="when idle, how long to wait for company after a request"),
              device: str = typer.Option("auto", help="cpu, cuda or auto"),
              dtype: str = typer.Option("auto", help="compute dtype: float32, bfloat16, float16, or auto (bf16 where "
                                                     "the hardware runs it natively, else fp32; the choice is logged)"),
              quantize: str = typer.Option("none", help="int8: every linear layer's weight stored in int8, "
                                                        "computing in bf16: 2-3x fp32's speed for one client on a "
                                                        "CPU with native bf16, no faster than fp32 at 64 clients, and "
                                                        "it changes more greedy answers than bf16 does; int4: "
                                                        "4-bit weights in groups of 32 (CPU only), faster still for "
                                                        "one client and changing more answers again"),
              watermark: Path = typer.Option(None, help="a key file from `stillhouse watermark keygen`"),
              watermark_logprobs: bool = typer.Option(False, "--watermark-logprobs",
                                                      help="report logprobs of the watermarked distribution the tokens "
                                                           "are drawn from (default: the model's own); needs --watermark"),
              max_queue: int = typer.Option(1024, help="requests allowed to wait; past this, clients get 429 with "
                                                       "Retry-After"),
              max_batch_tokens: int = typer.Option(None, help="prompt + max_tokens admitted into the running batch "
                                                              "(default: what 4 GiB of KV cache holds)"),
              drain_timeout: float = typer.Option(60.0, help="on SIGTERM/Ctrl-C, seconds that accepted requests may "
                                                             "take to finish; those left get a 503 saying the server "
                                                             "is stopping"),
              prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache",
                                                help="prefill a beginning that prompts share (a chat template's "
                                                     "system prompt) once and reuse it; off: every prompt whole")
              ) -> None:
    """Serve MODEL over an OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models, /health."""
    from stillhouse.serve import serve
    from stillhouse.ui import console

    from stillhouse.teachers.hf import DTYPES

    if dtype not in DTYPES:
        raise StillhouseError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if max_queue < 1:
        raise StillhouseError(f"--max-queue must be at least 1, not {max_queue}")
    if watermark_logprobs and watermark is None:
        raise StillhouseError("--watermark-logprobs needs --watermark KEYFILE")
    extra = {"max_batch_tokens": max_batch_tokens} if max_batch_tokens else {}
    if quantize != "none":
        extra["quantize"] = quantize
    if watermark_logprobs:
        extra["watermark_logprobs"] = True
    if not prefix_cache:
        extra["prefix_cache"] = False
    if drain_timeout < 0:
        raise StillhouseError(f"--drain-timeout must not be negative, not {drain_timeout}")

    def ready():  # printed once the model has loaded: a bad directory fails before anything claims to be serving
        console.print(f"serving {model} on http://{host}:{port}/v1 (Ctrl-C to stop; requests accepted by then get "
                      f"{drain_timeout:g} s to finish)")
    serve(model, host=host, port=port, model_name=model_name, api_key_env=api_key_env, max_batch=max_batch,
          window_ms=window_ms, device=device, dtype=dtype, watermark=str(watermark) if watermark else None,
          max_queue=max_queue, drain_timeout=drain_timeout, on_ready=ready, **extra)


@app.command("chat")
def chat_cmd(target: str = typer.Argument(..., help="a local model directory (or stillhouse:NAME), or the /v1 URL of "
                                                    "an OpenAI-compatible server", show_default=False),
             model: str = typer.Option(None, help="model id at the server (default: its first)"),
             api_key_env: str = typer.Option(None, help="environment variable holding the server's key"),
             max_tokens: int = typer.Option(256, help="most tokens per reply (capped to the context the prompt "
                                                      "leaves)"),
             temperature: float = typer.Option(0.7)) -> None:
    """Chat with a model in the terminal, tokens streamed as they arrive; Ctrl-D or /exit ends it. Each request is
    fitted to the model's context (the oldest turns dropped, with a note, when the conversation outgrows it)."""
    import contextlib

    import openai

    from stillhouse.chat import converse, local_counter, served_context
    from stillhouse.serve import running

    if max_tokens < 1:
        raise StillhouseError(f"--max-tokens must be at least 1, not {max_tokens}")
    with contextlib.ExitStack() as stack:
        remote = target.startswith(("http://", "https://"))
        context = count = None
        if not remote:  # the model is here: count exactly, as the server renders the conversation
            from stillhouse.models import resolve_model

            context, count = local_counter(resolve_model(target))
        url = target if remote else stack.enter_context(running(target, model_name=Path(target).name))
        key = os.environ.get(api_key_env, "") if api_key_env else "none"
        client = openai.OpenAI(base_url=url, api_key=key or "none", max_retries=2)
        try:
            listed = client.models.list().data
        except openai.OpenAIError as e:
            if model is None:
                raise StillhouseError(f"cannot reach a model at {url}: {type(e).__name__}") from None
            listed = []
        if not listed and model is None:
            raise StillhouseError(f"the server at {url} lists no model; name one with --model")
        name = model or listed[0].id
        if context is None:
            context = next((served_context(m) for m in listed if m.id == name), None)
        print(f"chatting with {name} at {url}" + (f" ({context:,}-token context)" if context else "")
              + "; Ctrl-D or /exit to end", flush=True)

        def ask() -> str:
            return input("you> ")

        try:
            converse(client, name, (), sys.stdout, max_tokens=max_tokens, temperature=temperature, context=context,
                     count=count, ask=ask)
        except KeyboardInterrupt:
            print()


watermark_app = typer.Typer(help="Watermark keys, as a provider who wants to recognise its outputs runs them.",
                            no_args_is_help=True)
app.add_typer(watermark_app, name="watermark")


@watermark_app.command("keygen")
def watermark_keygen(out: Path = typer.Argument(..., help="key file to write (never overwritten)", show_default=False),
                     greenlist_ratio: float = typer.Option(0.25), bias: float = typer.Option(2.0),
                     seeding_scheme: str = typer.Option("lefthash"), context_width: int = typer.Option(1)) -> None:
    """Write a new watermark key file: a secret hashing key and the full scheme."""
    from stillhouse.ui import console
    from stillhouse.watermark import keygen

    keygen(out, greenlist_ratio=greenlist_ratio, bias=bias, seeding_scheme=seeding_scheme, context_width=context_width)
    console.print(f"wrote {out} (keep it secret: whoever holds it can detect and imitate the watermark)")


audit_app = typer.Typer(help="Was a suspect model distilled from a reference teacher? `stillhouse audit --suspect "
                             "SPEC ...` runs the tests that apply and gives one verdict; the subcommands run one test "
                             "on files.")
app.add_typer(audit_app, name="audit")


def _identity_opt(value: str | None, flag: str):
    from stillhouse.identity import Identity

    if value is None:
        return None
    name, sep, maker = value.partition(",")
    if not sep or not name.strip() or not maker.strip():
        raise StillhouseError(f"{flag} must be NAME,MAKER (e.g. 'ChatGPT,OpenAI'), not {value!r}")
    return Identity(name.strip(), maker.strip())


def _named(values: list[str], flag: str, what: str) -> dict[str, str]:
    """NAME=VALUE options as a mapping; StillhouseError naming the flag for one without a name or a value."""
    out = {}
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name or not value:
            raise StillhouseError(f"{flag} must be NAME={what}, not {v!r}")
        out[name] = value
    return out


@audit_app.callback(invoke_without_command=True)
def audit_cmd(ctx: typer.Context,
              suspect: str = typer.Option(None, "--suspect", help="the model to audit: a local model directory, "
                                                                  "BACKEND:MODEL (with --base-url for an endpoint), "
                                                                  "or a .jsonl file of its texts"),
              reference: str = typer.Option(None, "--reference", help="the reference teacher's identity, NAME,MAKER "
                                                                      "(e.g. 'ChatGPT,OpenAI')"),
              suspect_identity: str = typer.Option(None, help="the identity the suspect declares, NAME,MAKER"),
              watermark_key: Path = typer.Option(None, help="the reference's watermark key file"),
              tokenizer: str = typer.Option(None, help="the reference model whose tokenizer the key colours"),
              prompts: str = typer.Option(None, help="prompts to put to the suspect for the watermark and "
                                                     "attribution tests (a prompt source or a file)"),
              n: int = typer.Option(200, help="how many of those prompts"),
              candidate: list[str] = typer.Option(None, "--candidate", help="NAME=SPEC: a candidate teacher for "
                                                                            "attribution (model or .jsonl texts)"),
              reference_model: str = typer.Option(None, "--reference-model", help="the reference model itself (a "
                                                  "local model, a .gguf, BACKEND:MODEL, or a .jsonl of its answers), "
                                                  "for the provenance test"),
              pool: list[str] = typer.Option(None, "--pool", help="NAME=SPEC: a model unrelated to the reference; "
                                                                  "the provenance test and the identity null use them"),
              temperature: float = typer.Option(0.0, help="every model's answers to --prompts are sampled at this "
                                                          "(the recipe stage's default too)"),
              base_url: str = typer.Option(None, help="the suspect's OpenAI-compatible endpoint"),
              identity_null_rate: float = typer.Option(0.01, help="the rate at which a model that never saw the "
                                                                  "reference's data claims its identity"),
              alpha: float = typer.Option(1e-3, help="the verdict's level: its false-positive rate is at most this"),
              null_keys: int = typer.Option(200, help="random keys for the watermark's empirical null"),
              out: Path = typer.Option(Path("runs/audit"), help="directory for the ledger and evidence.json"),
              recipe: Path = typer.Option(None, "--recipe", help="run the audit stage of this recipe instead (its "
                                                                 "`audit:` section; the run's students as suspects)"),
              force: bool = typer.Option(False, "--force", help="with --recipe: redo the stage even if finished")
              ) -> None:
    """Audit a suspect against a reference: provenance against a pool of unrelated models, identity probes, watermark
    radioactivity, attribution, one verdict."""
    if ctx.invoked_subcommand is not None:
        return
    if recipe is not None:
        from stillhouse.recipe import load_recipe
        from stillhouse.stages import run_stage

        r = load_recipe(recipe)
        if "audit" not in r.extensions:
            raise StillhouseError(f"{recipe}: has no audit: section to run")
        run_stage("audit", r, force=force)
        return
    if suspect is None:
        raise StillhouseError("give --suspect (and --reference, --watermark-key or --candidate), or a subcommand; "
                              "see `stillhouse audit --help`")
    from stillhouse.audit.run import run_audit
    from stillhouse.ui import console

    cands = _named(candidate or [], "--candidate", "SPEC")
    ev = run_audit(suspect, out, reference_identity=_identity_opt(reference, "--reference"),
                   suspect_identity=_identity_opt(suspect_identity, "--suspect-identity"),
                   watermark_key=watermark_key, tokenizer=tokenizer, prompts=prompts, n_prompts=n,
                   candidates=cands or None, reference=reference_model, pool=_named(pool or [], "--pool", "SPEC") or None,
                   base_url=base_url, identity_null_rate=identity_null_rate, alpha=alpha, null_keys=null_keys,
                   temperature=temperature)
    for name, t in ev["tests"].items():
        note = ""
        if name == "provenance":
            tt = t["test"]
            note = (f" (closer to the reference than to {t['closest']} on {tt['closer_to_reference']} of "
                    f"{tt['prompts']} held-out prompts, to {t['closest']} on {tt['closer_to_other']})")
        elif name == "identity":
            note = f" ({t['claims_reference']} of {t['questions']} questions claim the reference; null {t['null']})"
        console.print(f"{name}: p-value [bold]{t['p_value']:.3g}[/]{note}")
    if "attribution" in ev["reported"]:
        a = ev["reported"]["attribution"]
        console.print(f"attribution: reads like [bold]{a['likeliest']}[/] (mean probability "
                      f"{a['probability'][a['likeliest']]:.2f}; candidates told apart {a['cv_accuracy']:.0%}, "
                      f"chance {a['chance']:.0%})")
    v = ev["verdict"]
    if v:
        console.print(f"verdict: [bold]{v['verdict']}[/] (Holm at alpha {v['alpha']:g}; deciding test "
                      f"{v['deciding_test']}): {v['guarantee']}")
    console.print(f"evidence: {Path(out) / 'evidence.json'}")


@audit_app.command("watermark")
def audit_watermark(texts: Path = typer.Argument(..., help="JSONL of the suspect's outputs: {\"text\", optional "
                                                     "\"prompt\", optional \"watermark\": the scheme}", show_default=False),
                    key: Path = typer.Option(..., "--key", help="the reference's watermark key file"),
                    tokenizer: str = typer.Option(..., "--tokenizer", help="the reference model (directory or "
                                                                           "stillhouse:NAME) whose tokenizer and "
                                                                           "vocabulary the key colours"),
                    null_keys: int = typer.Option(200, help="random keys scored on the same texts (the empirical null)"),
                    out: Path = typer.Option(None, help="write the evidence here as JSON")) -> None:
    """Black-box watermark radioactivity: green tokens in the suspect's texts under the key, with an exact binomial
    p-value and the false-positive rate measured under random keys."""
    import json

    from stillhouse.audit.radioactivity import audit_texts
    from stillhouse.rundir import atomic_write_text
    from stillhouse.ui import console

    if null_keys < 0:
        raise StillhouseError(f"--null-keys must be at least 0, not {null_keys}")
    ev = audit_texts(texts, key, tokenizer, null_keys=null_keys)
    k = ev["key"]
    console.print(f"{ev['n_texts']} texts, {k['scored']} distinct (context, token) pairs scored "
                  f"({k['skipped_repeats']} repeats, {k['skipped_prompt']} copied from the prompt left out)")
    console.print(f"green {k['green']} of {k['scored']} (chance: {k['gamma']:.3f}), z {k['z']:.2f}, "
                  f"exact p-value [bold]{k['p_value']:.3g}[/]")
    if ev["null_keys"]:
        fpr = ev["false_positive_rate"]
        console.print(f"under {ev['null_keys']} random keys: empirical p {ev['empirical_p']:.3g}; false-positive "
                      "rate " + ", ".join(f"{v:.1%} at p <= {t}" for t, v in fpr.items()))
    if out:
        atomic_write_text(out, json.dumps(ev, indent=2) + "\n")
        console.print(f"evidence: {out}")


@audit_app.command("attribute")
def audit_attribute(suspect: Path = typer.Argument(..., help="JSONL of the suspect's outputs ({\"text\"} per line)",
                                                    show_default=False),
                    candidate: list[str] = typer.Option(..., "--candidate", help="NAME=FILE: a candidate teacher's "
                                                                                 "answers (JSONL, {\"text\"}); "
                                                                                 "two or more"),
                    folds: int = typer.Option(5, help="cross-validation folds"),
                    out: Path = typer.Option(None, help="write the result here as JSON")) -> None:
    """Stylometric attribution: which candidate's answers the suspect's read like, beside how well the candidates
    can be told apart at all (cross-validated accuracy)."""
    import json

    from stillhouse.audit.attribution import fit_attribution
    from stillhouse.audit.radioactivity import read_texts
    from stillhouse.rundir import atomic_write_text
    from stillhouse.ui import console

    sources = {name: [r["text"] for r in read_texts(path)]
               for name, path in _named(candidate, "--candidate", "FILE").items()}
    if folds < 2:
        raise StillhouseError(f"--folds must be at least 2, not {folds}")
    model = fit_attribution(sources, folds=folds)
    res = model.attribute([r["text"] for r in read_texts(suspect)])
    res["samples"] = model.samples
    console.print(f"candidates told apart with {res['cv_accuracy']:.1%} cross-validated accuracy "
                  f"(chance {res['chance']:.1%}, {folds} folds)")
    for name, p in sorted(res["probability"].items(), key=lambda kv: -kv[1]):
        console.print(f"  {name}: mean probability {p:.3f}, likeliest for {res['votes'][name]} of {res['texts']} texts")
    if out:
        atomic_write_text(out, json.dumps(res, indent=2) + "\n")


ledger_app = typer.Typer(help="The SQLite ledger of teacher and judge calls.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
TargetArg = typer.Argument(..., help="a recipe file or a run directory", show_default=False)


def _ledger_path(target: Path) -> Path:
    from stillhouse.recipe import load_recipe
    from stillhouse.rundir import RunDir

    run = RunDir(target) if target.is_dir() else RunDir(load_recipe(target).run_path())
    if not run.ledger.is_file():
        raise StillhouseError(f"no ledger at {run.ledger}; run `stillhouse generate` first")
    return run.ledger


@ledger_app.command("path")
def ledger_path(target: Path = TargetArg) -> None:
    """Print the ledger's path (open it with sqlite3 or datasette)."""
    print(_ledger_path(target))


@ledger_app.command("stats")
def ledger_stats(target: Path = TargetArg, as_json: bool = typer.Option(False, "--json")) -> None:
    """Calls, cache hits, tokens and cost per stage, model and mode (online or batch); the batches."""
    import json

    from rich.console import Console
    from rich.table import Table

    from stillhouse.calls import Ledger
    from stillhouse.ui import console

    led = Ledger(_ledger_path(target))
    st = led.stats()
    led.close()
    if as_json:
        print(json.dumps(st, indent=2))
        return
    t = Table(title=f"ledger: {st['calls']} calls, {st['failed']} failed, ${st['cost_usd']:.4f}")
    for col in ("stage", "model", "mode", "calls", "failed", "prompt tokens", "completion tokens", "cost USD",
                "mean latency s"):
        t.add_column(col)
    for p in st["by_stage_model"]:
        t.add_row(p["stage"], p["model"], p["mode"], str(p["calls"]), str(p["failed"]), f"{p['prompt_tokens']:,}",
                  f"{p['completion_tokens']:,}",
                  f"{p['cost_usd'] or 0:.4f}", "-" if p["mean_latency_s"] is None else f"{p['mean_latency_s']:.3f}")
    # piped or captured there is no terminal to fit: the table keeps its natural width instead of rich's 80 columns
    # (which cut the stage and model names to "genera…")
    (console if console.is_terminal else Console(stderr=True, width=1000)).print(t)
    if st["batches"]:  # batch mode: each batch, where it stands, and what became of its requests
        b = Table(title=f"batches: {len(st['batches'])}")
        for col in ("batch", "runner", "provider id", "round", "requests", "status", "provider status", "answered",
                    "failed", "answered elsewhere"):
            b.add_column(col)
        for x in st["batches"]:
            other = x["requests"] - (x["answered"] or 0) - (x["failed"] or 0)
            b.add_row(x["name"], x["runner"], x["remote_id"] or "-", str(x["round"]), str(x["requests"]), x["status"],
                      x["remote_status"] or "-", str(x["answered"] or 0), str(x["failed"] or 0),
                      str(other) if x["status"] == "collected" else "-")
        (console if console.is_terminal else Console(stderr=True, width=1000)).print(b)
    s = st["sessions"]
    console.print(f"{s['runs']} runs asked for {s['requested']} calls: {s['cache_hits']} cache hits, "
                  f"{s['calls_made']} made, {s['failed']} failed")
    if st["failed"]:
        led = Ledger(_ledger_path(target))
        for f in led.failures()[:5]:
            console.print(f"[red]failed[/] {f['stage']} {f['model']} after {f['attempts']} attempts: {f['error']}",
                          highlight=False)
        led.close()
        console.print(f"{st['failed']} calls failed for good and have not succeeded since; re-run the stage to retry them")


@ledger_app.command("export")
def ledger_export(target: Path = TargetArg) -> None:
    """Every call as JSON lines on stdout."""
    import json

    from stillhouse.calls import Ledger

    led = Ledger(_ledger_path(target))
    for row in led.export():
        print(json.dumps(row, ensure_ascii=False))
    led.close()


def main() -> None:
    _quiet_libraries()
    from stillhouse.ui import console

    try:
        _add_plugin_commands()
        app(standalone_mode=False)
    except StillhouseError as e:
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; finished stages are kept, the unfinished one will be redone")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort,):
        sys.exit(1)
    except Exception as e:  # usage errors (an unknown option, a bad value) arrive here when standalone_mode is off
        if isinstance(e, _usage_errors()) and hasattr(e, "show"):
            e.show()
            sys.exit(e.exit_code)
        raise


def _usage_errors() -> tuple[type, ...]:
    """The exception types of command-line usage errors: click's, and those of the click that typer 0.2x carries
    inside itself (`typer._click`), which derive from `typer.TyperException` and not from click's: without them an
    unknown option ended in a traceback."""
    import click

    return (click.ClickException, *([typer.TyperException] if hasattr(typer, "TyperException") else []))


if __name__ == "__main__":
    main()
