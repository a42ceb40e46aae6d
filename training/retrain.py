"""`chime retrain`: one cycle of the retraining loop, or a schedule of them.

    chime retrain [--recipe R1 [--recipe R2 ...]] [key=value ...]      one cycle now
    chime retrain --every 24h                                         a cycle every day (APScheduler)

By default a candidate is trained the way the shipped adapter was, in two stages:
`training/recipes/cpu-lora.yaml`, then `training/recipes/cpu-lora-tool-phase.yaml` continuing from the
first stage's adapter. Each `--recipe` is a stage (the first replaces the default list); every stage after
the first starts from the adapter of the one before (its `init_adapter` is set to it), and `key=value`
overrides apply to every stage.

A cycle:

1. applies the retention setting (`--retention-days`) and exports every consented, labelled
   conversation from the database (a full re-export, so anyone forgotten since is gone from the training
   data too) into `conversations/logged/retrain.train.jsonl` and `.heldout.jsonl`, split by the same id
   hash as the corpus (`training.corpus.split_key`);
2. skips training when nothing changed since the last candidate (same data hash) or there are fewer than
   `--min-labels` labelled messages;
3. trains a candidate adapter with the stages in turn, each on its training files plus the logged training
   part, into `runs/retrain/<name>` (earlier stages into `runs/retrain/<name>-stage<k>`; the serving adapter is
   untouched: a crash or kill here changes nothing);
4. evaluates the candidate and the serving adapter the same way on the fixed dev split (each at its
   thresholds calibrated there) and on the held-out logged slice (when it has at least
   `--heldout-min-messages` scored messages); the serving adapter's dev result is stored and reused
   while the dev files and evaluation settings stay the same;
5. promotes the candidate only if it is not worse than the serving adapter on the agreed metrics, on
   every evaluated set: macro-F1 at most `f1_tolerance` lower, the false-interruption rate at most
   `fi_tolerance` higher, and the share of messages naming the bot that are answered at most
   `named_tolerance` lower, and tool-call accuracy at most `tool_tolerance` lower. Promotion goes
   through the adapter registry: copied aside, smoke-tested by loading it and deciding a few dev
   conversations, then the pointer is switched with an atomic rename (model/adapter_registry.py). A running bot picks the new adapter up between messages.

Every candidate and evaluation is recorded in the database (`adapter_versions`, `evaluations`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from model.errors import ChimeError, ConfigError

log = logging.getLogger(__name__)

METRICS = ("macro_f1", "false_interruption_rate", "addressed_recall")
# the shipped adapter's stages (training/recipes/cpu-lora-tool-phase.yaml says how it was made)
DEFAULT_RECIPES = ("training/recipes/cpu-lora.yaml", "training/recipes/cpu-lora-tool-phase.yaml")


@dataclass
class RetrainConfig:
    recipes: tuple[str, ...] = DEFAULT_RECIPES  # training stages; each later one continues the adapter before
    overrides: dict[str, Any] = field(default_factory=dict)  # applied to every stage
    db: str | None = None
    adapters_dir: str | None = None  # default: model.adapter_registry.default_adapters_dir()
    logged_dir: str = "conversations/logged"
    runs_dir: str = "runs/retrain"
    min_labels: int = 20
    heldout_min_messages: int = 20
    f1_tolerance: float = 0.005
    fi_tolerance: float = 0.005
    named_tolerance: float = 0.01
    tool_tolerance: float = 0.02  # tool-call accuracy (same tool and arguments): about 3 of the dev split's 153 calls
    retention_days: float | None = None
    smoke_conversations: int = 3
    # Evaluate on a remote OpenAI-compatible server (vLLM) instead of locally: it must allow runtime
    # adapter loading (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; `chime serve --allow-lora-updates`),
    # see the adapter directories at the same paths, and serve the current adapter as `remote_model`.
    # After a promotion that name is re-pointed at the new adapter, so bots using it switch too.
    backend: str = "local"  # local | openai
    base_url: str | None = None
    remote_model: str | None = None
    remote_top_logprobs: int = 20


@dataclass
class CycleResult:
    status: str  # promoted | rejected | skipped | failed
    reason: str
    candidate: str | None = None
    serving: str | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # "candidate/dev" -> metrics
    export: dict[str, Any] = field(default_factory=dict)
    serving_dev_reused: bool = False  # the serving adapter's dev result came from an earlier cycle
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verdict(candidate: dict[str, dict[str, Any]], serving: dict[str, dict[str, Any]], cfg: RetrainConfig) -> tuple[bool, list[str]]:
    """(promote?, reasons): the candidate must not be worse than the serving adapter on any evaluated set.

    A metric that is undefined on a set (e.g. no message named the bot) is not compared there."""
    reasons: list[str] = []
    checks = (  # metric, direction (+1: higher is better), tolerance, label
        ("macro_f1", 1, cfg.f1_tolerance, "macro-F1"),
        ("false_interruption_rate", -1, cfg.fi_tolerance, "false interruptions"),
        ("addressed_recall", 1, cfg.named_tolerance, "bot-named answered"),
        ("tool_call_accuracy", 1, cfg.tool_tolerance, "tool-call accuracy"),
    )
    for dataset, cm in candidate.items():
        sm = serving.get(dataset)
        if sm is None:
            continue
        for metric, direction, tolerance, label in checks:
            c, s = cm.get(metric), sm.get(metric)
            if c is None or s is None:
                continue
            if direction * (c - s) < -tolerance:
                reasons.append(f"{dataset}: {label} {c:.3f} vs serving {s:.3f}")
    return not reasons, reasons


def _hash_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "none"


@contextlib.contextmanager
def _single_instance(runs_dir: Path):
    """One retraining cycle at a time per runs directory (a scheduled cycle never overlaps a manual one)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / ".retrain.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise ChimeError(f"another retraining cycle is running ({runs_dir}/.retrain.lock)") from e
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def export_logged(cfg: RetrainConfig) -> tuple[Path, Path, dict[str, Any]]:
    """Re-export the database's labelled conversations; split them into training and held-out files."""
    from model.conversation import read_conversations, scored_messages, write_conversations
    from model.storage.admin import purge_older_than
    from model.storage.db import upgrade
    from training.corpus import DEV_FRACTION, split_key
    from training.export import export

    upgrade(cfg.db)
    logged = Path(cfg.logged_dir)
    logged.mkdir(parents=True, exist_ok=True)
    everything = logged / "retrain.all.jsonl.tmp"
    with _session(cfg) as s:
        purged = purge_older_than(s, cfg.retention_days) if cfg.retention_days else 0
        report = export(s, everything, seed=0)
    convs = read_conversations(everything)
    everything.unlink()
    heldout = [c for c in convs if split_key(c.id or "") < DEV_FRACTION]
    train = [c for c in convs if split_key(c.id or "") >= DEV_FRACTION]
    train_path, heldout_path = logged / "retrain.train.jsonl", logged / "retrain.heldout.jsonl"
    write_conversations(train_path, train)
    write_conversations(heldout_path, heldout)
    info = report.to_dict()
    info.update(purged=purged, train_conversations=len(train), heldout_conversations=len(heldout),
                train_labels=sum(len(scored_messages(c)) for c in train),
                heldout_labels=sum(len(scored_messages(c)) for c in heldout))
    return train_path, heldout_path, info


def serving_adapter(cfg: RetrainConfig, recipe: Any) -> tuple[str, str | None]:
    """(name, directory) of what serves now: the registry's current version, else the recipe model's
    default (the shipped adapter for the default model; no adapter for others)."""
    from model.adapter_registry import AdapterRegistry, adapter_version, default_adapters_dir
    from model.config import DEFAULT_ADAPTER, EngineConfig
    from model.loading import resolve_adapter

    registry = AdapterRegistry(cfg.adapters_dir or default_adapters_dir())
    current = registry.current()
    if current is not None:
        return current.name, str(current.path)
    path = resolve_adapter(EngineConfig(model=recipe.model, adapter=DEFAULT_ADAPTER))
    return adapter_version(path), path


def dev_key(recipe: Any) -> str:
    """What a dev evaluation depends on besides the adapter: the dev files, the base model and the
    evaluation settings (a serving adapter's dev result is reused while these stay the same)."""
    from training.dataset import expand_globs

    digest = hashlib.sha256()
    for path in expand_globs(recipe.dev_files):
        digest.update(str(path).encode())
        digest.update(Path(path).read_bytes())
    settings = {k: v for k, v in dataclasses.asdict(recipe).items()
                if k.startswith("calibration_") or k in ("model", "eval_limit", "tools", "tool_format", "max_prompt_tools", "bot_name")}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def cached_dev_evaluation(cfg: RetrainConfig, adapter_name: str, key: str) -> dict[str, Any] | None:
    """The latest stored dev evaluation of `adapter_name` made under the same `dev_key`, if any."""
    from sqlalchemy import select

    from model.storage import models as m

    with _session(cfg) as s:
        for row in s.scalars(select(m.Evaluation).where(m.Evaluation.adapter_name == adapter_name, m.Evaluation.dataset == "dev")
                             .order_by(m.Evaluation.id.desc())):
            full = row.metrics.get("_evaluation")
            if row.metrics.get("_dev_key") == key and isinstance(full, dict):
                return full
    return None


def evaluate_on(recipe: Any, adapter: str | None, heldout: Path, min_messages: int,
                dev: dict[str, Any] | None = None, remote: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Metrics on the dev split (thresholds calibrated there, as training does; `dev`: a stored result to
    reuse) and on the held-out logged slice at those thresholds. `remote`: engine settings for a remote
    backend serving `adapter` (`backend`, `base_url`, `remote_model`); `adapter` then only names it."""
    from model.config import EngineConfig
    from model.conversation import read_conversations
    from model.engine import Engine
    from training.evaluate import evaluate
    from training.train import evaluate_adapter

    if dev is None:
        dev = evaluate_adapter(recipe, adapter, remote)  # adapter None: the base model alone
    out: dict[str, dict[str, Any]] = {"dev": dict(dev["calibrated"])}
    convs = read_conversations(heldout) if heldout.exists() else []
    if convs:
        engine = Engine.from_config(EngineConfig(
            model=recipe.model, adapter=adapter, bot_name=recipe.bot_name, threshold=dev["threshold"],
            named_threshold=dev["named_threshold"], tool_call_threshold=dev.get("tool_call_threshold"),
            tool_call_relevance_weight=dev.get("tool_call_relevance_weight"),
            device=recipe.device, tools=list(recipe.tools),
            tool_format=recipe.tool_format, max_prompt_tools=recipe.max_prompt_tools, temperature=0.0,
            **(remote or {}),
        ))
        metrics, rows = evaluate(engine, convs)
        if len(rows) >= min_messages:
            out["logged-heldout"] = metrics
    out["_dev_evaluation"] = dev
    return out


class RemoteEvaluation:
    """Candidate and serving adapter evaluated on a remote server that loads adapters at run time."""

    def __init__(self, cfg: RetrainConfig):
        from model.remote import RemoteClient, remote_api_key

        if not cfg.base_url or not cfg.remote_model:
            raise ConfigError("--backend openai needs --base-url and --remote-model (the name the server serves the "
                              "current adapter under)")
        self.cfg = cfg
        self.client = RemoteClient(cfg.base_url, remote_api_key())

    def settings(self, model: str) -> dict[str, Any]:
        return {"backend": "openai", "base_url": self.cfg.base_url, "remote_model": model,
                "remote_top_logprobs": self.cfg.remote_top_logprobs}

    def load(self, name: str, path: str) -> dict[str, Any]:
        self.client.load_lora_adapter(name, str(Path(path).resolve()))
        return self.settings(name)

    def serving(self) -> dict[str, Any]:
        return self.settings(self.cfg.remote_model or "")

    def unload(self, name: str) -> None:
        self.client.unload_lora_adapter(name)

    def repoint(self, path: str) -> None:
        """Serve the promoted adapter under the name the bots use (unload, then load it under that name)."""
        name = self.cfg.remote_model or ""
        try:
            self.client.unload_lora_adapter(name)
        except ChimeError as e:  # the name was the server's base model or a start-up module: nothing to unload
            log.info("retrain: %s had no runtime adapter %r to unload (%s)", self.cfg.base_url, name, e)
        self.client.load_lora_adapter(name, str(Path(path).resolve()))


@contextlib.contextmanager
def _session(cfg: RetrainConfig) -> Iterator[Any]:
    """One transaction on the configured database (committed on success), its engine disposed after."""
    from model.storage.db import make_engine, session_scope

    engine = make_engine(cfg.db)
    try:
        with session_scope(engine) as s:
            yield s
    finally:
        engine.dispose()


def _record(cfg: RetrainConfig, **values: Any) -> None:
    from model.storage import models as m

    with _session(cfg) as s:
        evaluations = values.pop("evaluations", {})
        row = s.query(m.AdapterRecord).filter_by(name=values["name"]).one_or_none()
        if row is None:
            s.add(m.AdapterRecord(**values))
        else:
            for k, v in values.items():
                setattr(row, k, v)
        for (adapter, dataset), metrics in evaluations.items():
            s.add(m.Evaluation(adapter_name=adapter, dataset=dataset, n_messages=int(metrics.get("n_scored") or 0),
                               metrics=json.loads(json.dumps(metrics, default=float))))


def run_cycle(cfg: RetrainConfig) -> CycleResult:
    from model.adapter_registry import AdapterRegistry, default_adapters_dir
    from model.config import EngineConfig
    from model.conversation import read_conversations
    from training.adapters import smoke_validate
    from training.dataset import expand_globs
    from training.recipe import load_recipe

    start = time.perf_counter()
    runs = Path(cfg.runs_dir)
    with _single_instance(runs):
        if not cfg.recipes:
            raise ConfigError("retrain: no recipe given")
        stages = [load_recipe(path, cfg.overrides) for path in cfg.recipes]
        recipe_names = "+".join(stage.name for stage in stages)
        registry = AdapterRegistry(cfg.adapters_dir or default_adapters_dir())
        registry.cleanup()
        train_path, heldout_path, info = export_logged(cfg)
        data_hash = hashlib.sha256(
            f"{_hash_file(train_path)}|{_hash_file(heldout_path)}|{recipe_names}|{cfg.overrides}".encode()
        ).hexdigest()[:16]
        result = CycleResult(status="skipped", reason="", export=info)
        if info["train_labels"] < cfg.min_labels:
            result.reason = f"{info['train_labels']} labelled logged messages for training; --min-labels is {cfg.min_labels}"
            return _done(result, start)
        if _seen(cfg, data_hash):
            result.reason = f"nothing new since the last candidate (data {data_hash})"
            return _done(result, start)
        name = base = "r" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        while any(runs.glob(name + "*")) or (registry.versions_dir / name).exists():
            name = f"{base}-{int(name.rsplit('-', 1)[-1]) + 1 if name != base else 2}"
        staged: list[Any] = []
        for k, stage in enumerate(stages, 1):
            stage_name = name if k == len(stages) else f"{name}-stage{k}"
            staged.append(dataclasses.replace(
                stage, name=stage_name, output_dir=str(runs / stage_name), train_files=[*stage.train_files, str(train_path)],
                evaluate=False, init_adapter=str(Path(staged[-1].output_dir) / "adapter") if staged else stage.init_adapter,
            ))
        recipe = staged[-1]
        result.candidate = name
        serving_name, serving_path = serving_adapter(cfg, recipe)
        result.serving = serving_name
        key = dev_key(recipe)
        serving_dev = cached_dev_evaluation(cfg, serving_name, key)
        _record(cfg, name=name, path=None, status="training", recipe=recipe_names, data_hash=data_hash)
        try:
            from training.train import save_card, train

            for stage in staged:
                log.info("retrain: training %s (%s)", stage.name, stage.output_dir)
                trained = train(stage, progress=False)
            remote = RemoteEvaluation(cfg) if cfg.backend == "openai" else None
            cand_remote = remote.load(name, trained.adapter_dir) if remote else None
            cand = evaluate_on(recipe, trained.adapter_dir, heldout_path, cfg.heldout_min_messages, remote=cand_remote)
            # the candidate's calibrated thresholds go with it, as after `chime train`
            trained.card["evaluation"] = cand["_dev_evaluation"]
            save_card(Path(recipe.output_dir), Path(trained.adapter_dir), recipe, trained.card)
            serv = evaluate_on(recipe, serving_path, heldout_path, cfg.heldout_min_messages, dev=serving_dev,
                               remote=remote.serving() if remote else None)
        except Exception as e:
            _record(cfg, name=name, status="failed", reason=f"{type(e).__name__}: {e}"[:2000])
            raise
        # the full dev results are stored with the key, so the next cycle reuses the serving adapter's
        cand["dev"].update(_dev_key=key, _evaluation=cand.pop("_dev_evaluation"))
        serv["dev"].update(_dev_key=key, _evaluation=serv.pop("_dev_evaluation"))
        result.metrics = {f"{who}/{k}": {mk: mv for mk, mv in v.items() if not mk.startswith("_")}
                          for who, res in (("candidate", cand), ("serving", serv)) for k, v in res.items()}
        result.serving_dev_reused = serving_dev is not None
        evaluations = {(name, k): v for k, v in cand.items()} | {(serving_name, k): v for k, v in serv.items()}
        ok, reasons = verdict(cand, serv, cfg)
        if remote is not None:
            remote.unload(name)
        if not ok:
            result.status, result.reason = "rejected", "; ".join(reasons)
            _record(cfg, name=name, path=trained.adapter_dir, status="rejected", reason=result.reason, evaluations=evaluations)
            return _done(result, start)
        dev_convs = [c for p in expand_globs(recipe.dev_files) for c in read_conversations(p, default_bot_name=recipe.bot_name)]
        smoke_config = EngineConfig(model=recipe.model, bot_name=recipe.bot_name, device=recipe.device, temperature=0.0,
                                    tools=list(recipe.tools), tool_format=recipe.tool_format)
        version = registry.add(trained.adapter_dir, name=name,
                               validate=lambda p: smoke_validate(p, smoke_config, dev_convs, cfg.smoke_conversations))
        registry.promote(version.name)
        if remote is not None:
            remote.repoint(str(version.path))
        result.status = "promoted"
        result.reason = "not worse than " + serving_name + " on " + ", ".join(sorted(cand))
        _record(cfg, name=name, path=str(version.path), status="promoted", reason=result.reason,
                promoted_at=datetime.now(timezone.utc), evaluations=evaluations)
        return _done(result, start)


def _seen(cfg: RetrainConfig, data_hash: str) -> bool:
    from sqlalchemy import select

    from model.storage import models as m

    with _session(cfg) as s:
        return s.scalars(select(m.AdapterRecord).where(m.AdapterRecord.data_hash == data_hash,
                                                       m.AdapterRecord.status.in_(("promoted", "rejected")))).first() is not None


def _done(result: CycleResult, start: float) -> CycleResult:
    result.seconds = round(time.perf_counter() - start, 1)
    log.info("retrain: %s (%s)", result.status, result.reason)
    return result


def parse_every(value: str) -> float:
    """"24h", "90m", "3600s", "1d" -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", value or "")
    if not match:
        raise ConfigError(f"--every: expected a duration like 24h, 90m or 1d, got {value!r}")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def schedule(cfg: RetrainConfig, every_s: float, cycles: int | None = None) -> int:
    """Run a cycle now and then every `every_s` seconds (APScheduler; a late or overlapping run is
    coalesced into one, and a failed cycle is logged and the next tick tries again). Stops after
    `cycles` cycles when given, else on Ctrl-C. Returns the number of cycles run."""
    from apscheduler.schedulers.blocking import BlockingScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    scheduler = BlockingScheduler(timezone="UTC")
    done = 0

    def job() -> None:
        nonlocal done
        try:
            print(json.dumps(run_cycle(cfg).to_dict(), default=str), flush=True)
        except Exception:  # noqa: BLE001 - the schedule survives a failed cycle
            log.exception("retrain: the cycle failed; the serving adapter is unchanged")
        done += 1
        if cycles is not None and done >= cycles:
            scheduler.shutdown(wait=False)

    scheduler.add_job(job, IntervalTrigger(seconds=every_s), next_run_time=datetime.now(timezone.utc),
                      max_instances=1, coalesce=True, misfire_grace_time=max(1, int(every_s)))
    log.info("retrain: a cycle every %.0f s; Ctrl-C stops", every_s)
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        scheduler.start()
    return done


def add_arguments(sub: Any) -> None:
    p = sub.add_parser("retrain", help="export logged conversations, train, evaluate and promote a better adapter")
    p.add_argument("--recipe", action="append", dest="recipes", metavar="RECIPE",
                   help="a training stage; repeat for more, each continuing the adapter of the one before "
                        f"(default: {' then '.join(DEFAULT_RECIPES)})")
    p.add_argument("overrides", nargs="*", help="key=value recipe settings")
    p.add_argument("--every", help="run on a schedule: 24h, 90m, 1d ... (first cycle now)")
    p.add_argument("--cycles", type=int, help="with --every: stop after this many cycles")
    p.add_argument("--db", help="database URL (default: $DATABASE_URL, else sqlite in $CHIME_HOME)")
    p.add_argument("--adapters-dir", help="adapter registry (default: $CHIME_ADAPTERS_DIR, else $CHIME_HOME/adapters)")
    p.add_argument("--logged-dir", default=RetrainConfig.logged_dir)
    p.add_argument("--runs-dir", default=RetrainConfig.runs_dir)
    p.add_argument("--min-labels", type=int, default=RetrainConfig.min_labels)
    p.add_argument("--heldout-min-messages", type=int, default=RetrainConfig.heldout_min_messages)
    p.add_argument("--f1-tolerance", type=float, default=RetrainConfig.f1_tolerance)
    p.add_argument("--fi-tolerance", type=float, default=RetrainConfig.fi_tolerance)
    p.add_argument("--named-tolerance", type=float, default=RetrainConfig.named_tolerance)
    p.add_argument("--tool-tolerance", type=float, default=RetrainConfig.tool_tolerance,
                   help="how much lower the candidate's tool-call accuracy may be")
    p.add_argument("--retention-days", type=float, help="purge messages older than this before exporting")
    p.add_argument("--backend", choices=["local", "openai"], default="local",
                   help="evaluate on a remote OpenAI-compatible server (vLLM with runtime LoRA updates)")
    p.add_argument("--base-url", help="the remote server, e.g. http://gpu1:8000/v1 (--backend openai)")
    p.add_argument("--remote-model", help="the name the remote server serves the current adapter under")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> RetrainConfig:
    from training.recipe import parse_overrides

    return RetrainConfig(
        recipes=tuple(args.recipes or DEFAULT_RECIPES), overrides=parse_overrides(args.overrides), db=args.db, adapters_dir=args.adapters_dir,
        logged_dir=args.logged_dir, runs_dir=args.runs_dir, min_labels=args.min_labels,
        heldout_min_messages=args.heldout_min_messages, f1_tolerance=args.f1_tolerance, fi_tolerance=args.fi_tolerance,
        named_tolerance=args.named_tolerance, tool_tolerance=args.tool_tolerance, retention_days=args.retention_days, backend=args.backend,
        base_url=args.base_url, remote_model=args.remote_model,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.every:
        schedule(cfg, parse_every(args.every), args.cycles)
        return 0
    result = run_cycle(cfg)
    print(json.dumps(result.to_dict(), default=str, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m training.retrain ...` (the same as `chime retrain ...`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="chime")
    add_arguments(ap.add_subparsers(dest="command", required=True))
    return run(ap.parse_args(["retrain", *(argv if argv is not None else __import__("sys").argv[1:])]))


if __name__ == "__main__":
    raise SystemExit(main())
