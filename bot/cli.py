"""The `chime` command line.

    chime simulate [--script chat.txt] [--json]      the terminal simulator
    chime eval FILE.jsonl [--json] [--details OUT]   score decisions on conversation files
    chime eval FILE.jsonl --result-answers           how faithfully answers restate tool results
    chime bench decide|generate|memory [--json]      latency, reply speed and memory benchmarks
    chime bench load [--rate 50 --seconds 60 --channels 20]   a burst through engine, dispatcher and log
    chime render FILE.jsonl [--index N]              show a rendered conversation, trained tokens marked
    chime bfcl [--categories ...] [--limit N]        tool calling on BFCL, scored by bfcl-eval's checker
    chime bfcl --replay DETAILS                      another call gate's BFCL scores, from a gate-open run
    chime db upgrade | consent | opt-out | forget | decisions | label | export   storage (bot/storage_cli.py)
    chime retrain [--every 24h]                      export, train, evaluate, promote (training/retrain.py)
    chime adapters list|add|promote|rollback         adapter versions (training/adapters.py)
    chime serve [--host H] [--port P]                OpenAI-compatible API (bot/api.py, docs/api.md)
    chime discord                                    the Discord bot (bot/discord_bot/; DISCORD_TOKEN from the environment)

Every command takes the engine settings (`--config chime.yaml`, `--model`, `--adapter`,
`--threshold`, ...). Errors print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from model.errors import ChimeError

DEV_SPLIT = Path(__file__).resolve().parent.parent / "conversations" / "dev"  # the fixed dev split of the corpus

log = logging.getLogger(__name__)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--config", help="YAML file of engine settings (EngineConfig fields)")
    g.add_argument("--model", help="'default' (embedded SmolLM2-135M-Instruct), a Hugging Face id or a directory")
    g.add_argument("--adapter", help="PEFT adapter directory (default: the shipped adapter, with the default model)")
    g.add_argument("--no-adapter", action="store_true", help="the base model alone (no adapter, not even the shipped one)")
    g.add_argument("--prompt", choices=["short", "instructed"], help="system prompt: short (trained adapters) or the "
                   "original recipe's instructions (untuned baselines)")
    g.add_argument("--threshold", type=float, help="respond when P(respond) >= this (talkativeness)")
    g.add_argument("--bot-name", help="the bot's name (default Chime)")
    g.add_argument("--device", help="auto, cpu or cuda[:N]")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="weight matmul dtype")
    g.add_argument("--load-in-4bit", action="store_true", default=None, help="bitsandbytes NF4 (CUDA only)")
    g.add_argument("--max-context-tokens", type=int, help="history budget per channel")
    g.add_argument("--max-new-tokens", type=int, help="longest reply")
    g.add_argument("--temperature", type=float, help="sampling temperature (0: greedy)")
    g.add_argument("--seed", type=int, help="sampling seed")
    g.add_argument("--full-reencode", action="store_true", help="disable the incremental cache (the naive way)")
    g.add_argument("--no-mention-override", action="store_true", help="@mentions do not force a reply")
    g.add_argument("--free-tool-calls", action="store_true",
                   help="do not constrain tool calls to the tools' JSON schemas (model/constrained.py)")
    g.add_argument("--keep-ungrounded-arguments", action="store_true",
                   help="pass optional arguments and list items whose values nobody said (model/grounding.py "
                        "drops them)")
    g.add_argument("--allow-unsaid-required", action="store_true",
                   help="run calls whose required arguments hold numbers nobody said, or one said number in "
                        "several places (model/grounding.py withdraws them and answers in words)")
    g.add_argument("--raw-arguments", action="store_true",
                   help="pass percentages, boolean flags, enum choices, source/target pairs and cut-short "
                        "paths, ids and names as the model wrote them (model/grounding.py passes a said "
                        "percentage in the form its parameter asks for, a flag the message names as true, the one "
                        "enum value the message says for one it does not, from_unit/to_unit or origin/destination "
                        "the way round the message says them, a unit the message says where the model wrote one "
                        "unit on both sides, and a path, address, id or name the model cut short whole)")
    g.add_argument("--single-calls", action="store_true",
                   help="make only the calls the model wrote (model/said_lists.py copies a call for each other "
                        "item of a list the message says, \"5, 10 and 15\", each further group of numbers said, "
                        "and each number said after a parameter's name)")
    g.add_argument("--free-answer-numbers", action="store_true",
                   help="let an answer to tool results write numbers the conversation does not hold "
                        "(model/answer_numbers.py keeps them to the results' and people's numbers)")
    g.add_argument("--tool-call-threshold", type=float,
                   help="open a tool call when P(call) >= this (default: the adapter's calibrated call gate)")
    g.add_argument("--tool-call-relevance-weight", type=float,
                   help="the call gate's weight on the message's relevance to the listed tools (default: the adapter's)")
    g.add_argument("--no-tool-gate", action="store_true",
                   help="no call gate: the model itself chooses between a tool call and words")
    g.add_argument("--backend", choices=["local", "openai"], help="local model, or a remote OpenAI-compatible "
                   "completions server (vLLM) for decisions and replies")
    g.add_argument("--base-url", help="the remote server (--backend openai), e.g. http://gpu1:8000/v1")
    g.add_argument("--remote-model", help="the model name on the remote server (e.g. the LoRA module's name)")


def _engine_config(args: argparse.Namespace) -> Any:
    from model.config import EngineConfig, load_config

    overrides = {
        "model": args.model,
        "adapter": args.adapter,
        "threshold": args.threshold,
        "prompt": args.prompt,
        "bot_name": args.bot_name,
        "device": args.device,
        "dtype": args.dtype,
        "load_in_4bit": args.load_in_4bit,
        "max_context_tokens": args.max_context_tokens,
        "max_new_tokens": args.max_new_tokens,
        "backend": args.backend,
        "base_url": args.base_url,
        "remote_model": args.remote_model,
        "temperature": args.temperature,
        "seed": args.seed,
        "incremental": False if args.full_reencode else None,
        "always_answer_mentions": False if args.no_mention_override else None,
        "constrained_tool_calls": False if args.free_tool_calls else None,
        "ground_optional_arguments": False if args.keep_ungrounded_arguments else None,
        "ground_required_arguments": False if args.allow_unsaid_required else None,
        "ground_answer_numbers": False if args.free_answer_numbers else None,
        "read_arguments": False if args.raw_arguments else None,
        "one_call_per_item": False if args.single_calls else None,
        "tool_call_threshold": args.tool_call_threshold,
        "tool_call_relevance_weight": args.tool_call_relevance_weight,
        "tool_call_gate": False if args.no_tool_gate else None,
    }
    config = load_config(EngineConfig, args.config, overrides)
    if args.no_adapter:
        config.adapter = None
    return config


def _scored_config(args: argparse.Namespace) -> Any:
    """Engine settings for scored runs (eval, bfcl): generations are greedy unless --temperature says otherwise."""
    config = _engine_config(args)
    if args.temperature is None:
        config.temperature = 0.0
    return config


def _build_engine(args: argparse.Namespace) -> Any:
    from model.engine import Engine

    return Engine.from_config(_engine_config(args))


def _serving_registry(args: argparse.Namespace, config: Any) -> Any:
    """The adapter registry a bot serves from, unless --adapter/--no-adapter chose otherwise: its current
    version replaces the default adapter when it was trained for the same base model."""
    from model.adapter_registry import AdapterRegistry, AdapterRegistryError, default_adapters_dir

    if args.adapter or args.no_adapter or config.backend == "openai":  # a remote server serves its own adapter
        return None
    registry = AdapterRegistry(default_adapters_dir())
    try:
        current = registry.current()
    except AdapterRegistryError as e:
        log.error("%s; serving the default adapter", e)
        return None
    if current is not None:
        if current.meta.get("base_model", config.model) != config.model:
            log.warning("adapter %s was trained for %s, not %s: serving the default adapter", current.name,
                        current.meta.get("base_model"), config.model)
            return None
        config.adapter = str(current.path)
    return registry


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------------------- commands


def cmd_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from bot.simulator import run_interactive, run_script
    from model.conversation import read_transcript

    console = Console(stderr=args.json, highlight=False)
    lines = read_transcript(args.script) if args.script else None
    from model.engine import Engine

    config = _engine_config(args)
    registry = _serving_registry(args, config)
    with console.status("loading the model…") if not args.json else contextlib.nullcontext():
        engine = Engine.from_config(config)
    watcher = None
    if registry is not None and lines is None:  # interactive: pick up promoted adapters between messages
        from model.adapter_registry import AdapterWatcher

        watcher = AdapterWatcher(engine, registry)
        watcher.start()
    sim_log = None
    if not args.no_log:
        from bot.simulator import SimulatorLog
        from model.storage.log import ChatLog

        sim_log = SimulatorLog(ChatLog(args.db), engine.config.bot_name, channel=args.channel)
    try:
        if lines is not None:
            run_script(engine, lines, as_json=args.json, out=sys.stdout, console=console, log=sim_log)
        else:
            if not sys.stdin.isatty():
                console.print("[yellow]stdin is not a terminal: reading messages line by line[/]")
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            run_interactive(engine, console, log=sim_log)
    finally:
        if watcher is not None:
            watcher.stop(timeout=1)
        if sim_log is not None and not sim_log.chat_log.close(timeout=10):
            console.print(f"[yellow]the database is unreachable: {sim_log.chat_log.pending} log entries kept in "
                          f"{sim_log.chat_log.spool_path} for next time[/]")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from model.conversation import read_conversations

    config = _scored_config(args)
    conversations = []
    for path in args.file:
        convs = read_conversations(path, default_bot_name=config.bot_name)
        conversations.extend(convs[: args.limit] if args.limit is not None else convs)
    if args.result_answers:
        return _eval_result_answers(config, conversations, args)
    runs = {"model": _eval_run(config, conversations, args)}
    if args.baseline:
        import dataclasses

        base = dataclasses.replace(config, adapter=None, prompt="instructed", threshold=0.5, named_threshold=None)
        runs["baseline"] = _eval_run(base, conversations, args)
    files = ", ".join(args.file)
    for metrics, _ in runs.values():
        metrics["file"] = files
    if args.details:
        from training.evaluate import write_details

        write_details(args.details, runs["model"][1])
    if args.report:
        _write_report(args.report, runs, config.always_answer_mentions)
    if args.json:
        out = runs["model"][0] if len(runs) == 1 else {name: m for name, (m, _) in runs.items()}
        print(json.dumps(out))
    elif len(runs) == 1:
        _print_metrics(runs["model"][0])
    else:
        _print_side_by_side({name: m for name, (m, _) in runs.items()})
    return 0


def _eval_result_answers(config: Any, conversations: list[Any], args: argparse.Namespace) -> int:
    """`chime eval --result-answers`: the engine's answers to the files' tool results, and the numbers they state."""
    import time

    from tqdm import tqdm

    from model.engine import Engine
    from training.evaluate import evaluate_result_answers, result_answer_metrics, write_details

    if args.baseline or args.report or args.generate:
        raise ChimeError("--result-answers scores answers to tool results alone: without --baseline, --report or --generate")
    engine = Engine.from_config(config)
    rows = []
    start = time.perf_counter()
    for conv in tqdm(conversations, unit="conv", desc="result answers", file=sys.stderr, disable=args.quiet):
        rows.extend(evaluate_result_answers(engine, conv))
    metrics = result_answer_metrics(rows)
    metrics.update({"file": ", ".join(args.file), "model": engine.model_name, "adapter": engine.adapter,
                    "ground_answer_numbers": config.ground_answer_numbers,
                    "elapsed_s": round(time.perf_counter() - start, 2)})
    if args.details:
        write_details(args.details, rows)
    if args.json:
        print(json.dumps(metrics))
    else:
        _print_metrics(metrics)
    return 0


def _eval_run(config: Any, conversations: list[Any], args: argparse.Namespace) -> tuple[dict[str, Any], list[Any]]:
    from tqdm import tqdm

    from model.engine import Engine
    from model.loading import release_memory
    from training.evaluate import evaluate

    engine = Engine.from_config(config)
    label = "baseline" if config.prompt == "instructed" and not config.adapter else "eval"
    with tqdm(total=len(conversations), unit="conv", desc=label, file=sys.stderr, disable=args.quiet) as bar:
        metrics, rows = evaluate(engine, conversations, generate=args.generate, progress=lambda n: bar.update(1))
    metrics["prompt"] = config.prompt
    del engine
    release_memory()
    return metrics, rows


def _write_report(directory: str, runs: dict[str, tuple[dict[str, Any], list[Any]]], always_answer_mentions: bool) -> None:
    """metrics.json, details per run, and a PNG of precision/recall against the threshold."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.evaluate import threshold_curve, write_details

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({name: m for name, (m, _) in runs.items()}, indent=1) + "\n")
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), squeeze=False)
    for ax, (name, (metrics, rows)) in zip(axes[0], runs.items(), strict=True):
        write_details(out / f"details_{name}.jsonl", rows)
        curve = threshold_curve(rows, always_answer_mentions, metrics.get("named_threshold"))
        (out / f"curve_{name}.json").write_text(json.dumps(curve) + "\n")
        ax.plot(curve["threshold"], curve["precision"], label="respond precision")
        ax.plot(curve["threshold"], curve["recall"], label="respond recall")
        ax.plot(curve["threshold"], curve["macro_f1"], label="macro-F1", linestyle="--")
        ax.plot(curve["threshold"], curve["false_interruption_rate"], label="false interruptions", linestyle=":")
        ax.axvline(metrics["threshold"], color="grey", linewidth=0.8)
        title = "adapter " + str(metrics.get("adapter") or "none") if name == "model" else "untuned baseline (instructed prompt)"
        ax.set_title(f"{title}\nthreshold {metrics['threshold']:.2f} (named {metrics.get('named_threshold') or 0:.2f}): "
                     f"macro-F1 {metrics['macro_f1'] or 0:.3f}", fontsize=9)
        ax.set_xlabel("threshold on P(respond)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "precision_recall_threshold.png", dpi=110)
    plt.close(fig)


def _print_side_by_side(runs: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"chime eval · {next(iter(runs.values())).get('file')}")
    table.add_column("metric")
    for name in runs:
        table.add_column(name, justify="right")
    keys = ["macro_f1", "respond_precision", "respond_recall", "false_interruption_rate", "missed_intervention_rate",
            "addressed_recall", "tool_call_accuracy", "tool_call_result_accuracy", "roc_auc", "threshold", "named_threshold", "n_scored", "adapter", "prompt", "decision_p50_ms"]
    for key in keys:
        cells = []
        for m in runs.values():
            v = m.get(key)
            cells.append("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        table.add_row(key, *cells)
    Console().print(table)


def _print_metrics(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"chime eval · {metrics.get('file')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if key == "file":
            continue
        shown = f"{value:.3f}" if isinstance(value, float) else json.dumps(value) if isinstance(value, dict) else str(value)
        table.add_row(key, shown)
    Console().print(table)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "memory":
        return _bench_memory(args)
    if args.what == "log":
        from model.storage.db import database_url
        from model.storage.log import bench_log

        result = bench_log(database_url(args.db), messages=args.messages)
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return 0
    if args.what == "train":
        from training.bench import bench_train
        from training.recipe import load_recipe

        result = bench_train(load_recipe(args.recipe), steps=args.steps, trl_steps=args.trl_steps)
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return 0
    from model import benchmark

    engine = _build_engine(args)
    if args.what == "load":
        from model.loadtest import bench_load
        from model.storage.db import database_url

        result = bench_load(
            engine, database_url(args.db), args.conversations or [str(DEV_SPLIT)], rate=args.rate,
            seconds=args.seconds, channels=args.channels, seed=args.seed or 0, timeout_s=args.decision_timeout,
            max_pending=args.max_pending, progress=lambda s: print(f"bench load: {s}", file=sys.stderr),
        )
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return 0 if result["lost_rows"] == 0 and result["written"] else 1
    if args.what == "decide":
        history = [int(x) for x in args.history.split(",")]
        result = benchmark.bench_decide(
            engine,
            history_tokens=history,
            message_tokens=args.message_tokens,
            repeats=args.repeats,
            full_repeats=args.full_repeats,
            progress=lambda s: print(f"bench decide: {s}", file=sys.stderr),
        )
        if args.plot:
            _plot_decide(result, args.plot)
            result["plot"] = args.plot
    else:
        result = benchmark.bench_generate(engine, new_tokens=args.new_tokens)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def _plot_decide(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = result["history_tokens"]
    ax.plot(x, result["full_p50_ms"], "o-", label="full re-encode (naive)")
    ax.plot(x, result["incremental_p50_ms"], "o-", label="incremental cache (Chime)")
    for xi, yi, s in zip(x, result["incremental_p50_ms"], result["speedup"], strict=True):
        ax.annotate(f"{s}×", (xi, yi), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("history (tokens)")
    ax.set_ylabel(f"decision latency p50 (ms), {result['message_tokens']}-token message")
    ax.set_title(f"{result['model']} · {result['runner']} · {result['dtype']} · {result['threads']} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _bench_memory(args: argparse.Namespace) -> int:
    """Peak and final resident memory of a `chime simulate --script` process (polled with psutil)."""
    import subprocess
    import tempfile
    import time

    import psutil

    from model.benchmark import _CHAT_LINES

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        for name, text in _CHAT_LINES:
            f.write(f"{name}: {text}\n")
        f.write("maria: @Chime can you summarise the plan for tonight?\n")
        script = f.name
    cmd = [sys.executable, "-m", "bot", "simulate", "--script", script, "--json", "--seed", str(args.seed or 0)]
    for flag in ("model", "adapter", "dtype", "config", "threshold"):
        value = getattr(args, flag)
        if value is not None and value is not False:
            cmd += [f"--{flag}", str(value)]
    if args.no_adapter:
        cmd.append("--no-adapter")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = final = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
        except psutil.Error:
            break
        if rss:  # a finished (zombie) process reports 0
            final = rss
            peak = max(peak, rss)
        time.sleep(0.05)
    out, err = proc.communicate()
    os.unlink(script)
    if proc.returncode != 0:
        raise ChimeError(f"simulate failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    result = {
        "peak_rss_mb": round(peak / 2**20, 1),
        "last_rss_mb": round(final / 2**20, 1),
        "messages": len(out.strip().splitlines()),
        "wall_s": round(time.perf_counter() - start, 1),
        "command": " ".join(cmd[1:]),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from model.chat_format import ChatFormat, show_loss_mask
    from model.config import DEFAULT_MODEL
    from model.conversation import read_conversations
    from model.loading import load_tokenizer, prepare_default_model
    from model.tools import registry_from_names
    from training.dataset import with_prompt_tools

    config = _engine_config(args)
    path = str(prepare_default_model()) if config.model == DEFAULT_MODEL else config.model
    fmt = ChatFormat(load_tokenizer(path), max_message_chars=config.max_message_chars, tool_format=config.tool_format)
    conversations = read_conversations(args.file, default_bot_name=config.bot_name)
    if not 0 <= args.index < len(conversations):
        raise ChimeError(f"--index must be between 0 and {len(conversations) - 1}")
    conv = with_prompt_tools(conversations[args.index], registry_from_names(config.tools).schemas(), config.max_prompt_tools)
    rendered = fmt.render_conversation(conv, bot_name=config.bot_name)
    print(show_loss_mask(fmt, rendered))
    trained = sum(rendered.loss_mask)
    print(f"\n# {len(rendered.input_ids)} tokens, {trained} trained (inside ⟦ ⟧)", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.recipe import load_recipe
    from training.train import train

    overrides = list(args.overrides)
    if args.no_eval:
        overrides.append("evaluate=false")
    recipe = load_recipe(args.recipe, overrides)
    if args.calibrate_only:
        from training.train import recalibrate

        ev = recalibrate(recipe)["evaluation"]
        print(json.dumps({k: ev[k] for k in ("threshold", "named_threshold", "limits_met", "calibrated", "cross_validated_2fold", "tool_call_threshold", "tool_call_relevance_weight", "tool_call_gate")}))
        return 0
    result = train(recipe, resume=args.resume, progress=not args.quiet)
    card = result.card
    summary = {
        "adapter": result.adapter_dir,
        "steps": card["training"]["steps"],
        "seconds": card["training"]["seconds"],
        "train_loss": card["training"]["train_loss"],
        "trained_tokens_per_second": card["training"]["trained_tokens_per_second"],
    }
    if "evaluation" in card:
        ev = card["evaluation"]
        summary["threshold"] = ev["threshold"]
        summary["named_threshold"] = ev["named_threshold"]
        summary["dev"] = {k: ev["calibrated"][k] for k in ("macro_f1", "false_interruption_rate", "missed_intervention_rate", "addressed_recall")}
    print(json.dumps(summary))
    return 0


def cmd_bfcl(args: argparse.Namespace) -> int:
    from training.bfcl import CATEGORIES, bfcl_python, format_table, progress_to_stderr, run_bfcl
    from training.evaluate import write_details

    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ChimeError(f"unknown BFCL categories: {', '.join(unknown)}; choose from {', '.join(CATEGORIES)}")
    if args.replay:
        return _bfcl_replay(args, categories)
    python = bfcl_python(args.bfcl_python)  # fail before loading the model
    from model.engine import Engine

    engine = Engine.from_config(_scored_config(args))
    summary, details = run_bfcl(
        engine, categories, args.limit, python, args.max_prompt_tools, None if args.quiet else progress_to_stderr
    )
    summary.update(adapter=engine.adapter, model=engine.model_name, tool_format=engine.fmt.tool_format.name,
                   tool_call_threshold=engine.tool_call_threshold, tool_call_relevance_weight=engine.tool_call_relevance_weight,
                   constrained_tool_calls=engine.config.constrained_tool_calls)
    if args.details:
        write_details(args.details, details)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_table(summary))
        print(f"{summary['seconds']} s; adapter {summary['adapter']}; tool format {summary['tool_format']}; "
              f"call gate {summary['tool_call_threshold']} (relevance weight {summary['tool_call_relevance_weight']})")
    return 0


def _bfcl_replay(args: argparse.Namespace, categories: list[str]) -> int:
    """`chime bfcl --replay F`: the scores of the configured call gate, read off a gate-open run's details."""
    from model.loading import resolve_adapter, resolve_tool_call_relevance_weight, resolve_tool_call_threshold
    from training.bfcl import format_table, replay_gate

    config = _scored_config(args)
    adapter = resolve_adapter(config)
    threshold = resolve_tool_call_threshold(config, adapter)
    if threshold is None:
        raise ChimeError("--replay needs a call gate: the adapter calibrated none (or --no-tool-gate), so give --tool-call-threshold")
    recorded = [json.loads(line) for line in Path(args.replay).read_text().splitlines() if line.strip()]
    rows = []
    for category in categories:  # the first N of each category, as a run with --limit would have answered
        rows += [r for r in recorded if r.get("category") == category][: args.limit]
    summary = replay_gate(rows, threshold, resolve_tool_call_relevance_weight(config, adapter))
    summary.update(details=args.replay, adapter=adapter)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_table(summary))
        print(f"replayed from {args.replay}: call gate {threshold} (relevance weight {summary['tool_call_relevance_weight']})")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from training.corpus import run

    return run(args)


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chime", description="Chime: a group-chat bot with learned silence.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="terminal simulator of a multi-user chat")
    p.add_argument("--script", help="replay a transcript: one 'Name: text' per line")
    p.add_argument("--json", action="store_true", help="one JSON object per message (with --script)")
    p.add_argument("--no-log", action="store_true", help="do not log the conversation to the database")
    p.add_argument("--channel", default="simulator", help="the channel the conversation is logged under")
    p.add_argument("--db", help="database URL (default: $DATABASE_URL, else sqlite in $CHIME_HOME)")
    _add_engine_args(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("eval", help="score decisions on a conversation file")
    p.add_argument("file", nargs="+", help="conversations in the shared JSONL format (one or more files)")
    p.add_argument("--report", help="write metrics, details and a precision/recall-vs-threshold PNG into this directory")
    p.add_argument("--baseline", action="store_true",
                   help="also evaluate the untuned model prompted with the original recipe's instructions, side by side")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--limit", type=int, help="evaluate only the first N conversations of each file")
    p.add_argument("--details", help="write one JSON row per scored message to this file")
    p.add_argument("--generate", action="store_true", help="also generate the replies where the bot speaks")
    p.add_argument("--result-answers", action="store_true",
                   help="score the answers to the files' tool results instead of decisions: whether they state the "
                        "results' numbers, and how many write a number the conversation does not hold")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_engine_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="benchmarks: decide, generate, memory, train, log, load")
    p.add_argument("what", choices=["decide", "generate", "memory", "train", "log", "load"])
    p.add_argument("--db", help="database URL (log, load; default: $DATABASE_URL, else sqlite in $CHIME_HOME)")
    p.add_argument("--messages", type=int, default=2000, help="messages to log (log)")
    p.add_argument("--rate", type=float, default=50, help="messages per second (load)")
    p.add_argument("--seconds", type=float, default=60, help="how long to send (load)")
    p.add_argument("--channels", type=int, default=20, help="channels the messages are spread over (load)")
    p.add_argument("--conversations", nargs="*", help="conversation files or folders to replay (load; default: the dev split)")
    p.add_argument("--decision-timeout", type=float, default=30.0, help="seconds an engine call may take (load)")
    p.add_argument("--max-pending", type=int, default=20, help="messages waiting per channel; past it the oldest are not read (load)")
    p.add_argument("--recipe", default="training/recipes/cpu-lora.yaml", help="recipe whose data and settings to time (train)")
    p.add_argument("--steps", type=int, default=6, help="training steps to time, the first one excluded (train)")
    p.add_argument("--trl-steps", type=int, default=2, help="steps of the default-configured TRL runs (train)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--history", default="0,500,1500,3000", help="history lengths in tokens (decide)")
    p.add_argument("--message-tokens", type=int, default=30, help="size of the new message (decide)")
    p.add_argument("--repeats", type=int, default=9, help="timed decisions per history length (decide)")
    p.add_argument("--full-repeats", type=int, default=3, help="timed full re-encodes per history length")
    p.add_argument("--new-tokens", type=int, default=64, help="reply tokens to generate (generate)")
    p.add_argument("--plot", help="write a PNG plot of the decide curves here")
    _add_engine_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("render", help="print a rendered conversation with the trained tokens marked")
    p.add_argument("file")
    p.add_argument("--index", type=int, default=0, help="which conversation of the file")
    _add_engine_args(p)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("train", help="fine-tune a (Q)LoRA adapter from a recipe")
    p.add_argument("--recipe", required=True, help="a recipe YAML, e.g. training/recipes/cpu-lora.yaml")
    p.add_argument("overrides", nargs="*", help="key=value settings that replace the recipe's (values parsed as YAML)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--no-eval", action="store_true", help="skip the dev evaluation and threshold calibration")
    p.add_argument("--calibrate-only", action="store_true", help="re-run the dev evaluation and calibration of output_dir/adapter")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bfcl", help="tool-calling accuracy on BFCL, scored by bfcl-eval's own AST checker")
    p.add_argument("--categories", default="simple_python,multiple,parallel,parallel_multiple,irrelevance",
                   help="comma-separated BFCL non-live categories")
    p.add_argument("--limit", type=int, help="the first N entries of each category")
    p.add_argument("--max-prompt-tools", type=int, help="show only the K functions BM25 ranks highest for the question")
    p.add_argument("--bfcl-python", help="Python of the environment with bfcl-eval (default .venv-bfcl/bin/python)")
    p.add_argument("--details", help="write one JSON row per entry (reply, calls, verdict) to this file")
    p.add_argument("--replay", metavar="DETAILS", help="score the call gate (the adapter's, or --tool-call-threshold and "
                   "--tool-call-relevance-weight) on the details of a --tool-call-threshold 0 run, without generating")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    _add_engine_args(p)
    p.set_defaults(func=cmd_bfcl)

    from training.corpus import add_arguments as add_data_arguments

    p = sub.add_parser("data", help="check conversation files, count them by label, split them into train/dev")
    add_data_arguments(p)
    p.set_defaults(func=cmd_data)

    from training.importers import add_import_command

    add_import_command(sub)

    from bot.storage_cli import add_arguments as add_storage_commands

    add_storage_commands(sub)

    from training.retrain import add_arguments as add_retrain_command

    add_retrain_command(sub)

    from training.adapters import add_arguments as add_adapters_command

    add_adapters_command(sub)

    from bot.api import add_arguments as add_serve_command

    add_serve_command(sub)

    from bot.discord_bot import add_arguments as add_discord_command

    add_discord_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except ChimeError as e:
        print(f"chime: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
