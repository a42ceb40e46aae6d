"""Versioned adapters with atomic promotion, and a watcher that hot-swaps the serving adapter.

Layout of a registry (default `$CHIME_ADAPTERS_DIR`, else `$CHIME_HOME/adapters`):

    ROOT/versions/<name>/      a complete adapter directory (adapter_config.json, adapter_model.safetensors,
                               chime_adapter.json, run cards) plus version.json (when and from where it was added)
    ROOT/current.json          {"version": name, "history": [older serving versions, newest first], "updated_at": iso}

Both changes are atomic on a POSIX filesystem: `add` copies into a hidden `.incoming-*` directory, fsyncs
it and renames it into place, so a crash never leaves a half-copied version visible; `promote` and
`rollback` write a temporary pointer, fsync it and `os.replace` it over `current.json`, so the pointer is
always either the old one or the new one. A running bot polls the pointer with `AdapterWatcher` and
swaps the adapter between messages (`Engine.reload_adapter`); a version that fails to load is logged and
the old adapter keeps serving.

The command line (`chime adapters list|add|promote|rollback`) and the smoke test that validates a
version before it is added are in `training/adapters.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.config import data_dir
from model.errors import ChimeError
from model.loading import ADAPTER_META

if TYPE_CHECKING:
    from model.engine import Engine

log = logging.getLogger(__name__)

VERSIONS = "versions"
POINTER = "current.json"
VERSION_INFO = "version.json"  # written by the registry into each version: created_at, source
INCOMING_PREFIX = ".incoming-"
HISTORY_LIMIT = 20
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


class AdapterRegistryError(ChimeError):
    """An adapter version or the serving pointer is missing, malformed or cannot be changed."""


def default_adapters_dir() -> Path:
    """`$CHIME_ADAPTERS_DIR`, else `data_dir() / "adapters"`."""
    root = os.environ.get("CHIME_ADAPTERS_DIR")
    return Path(root).expanduser() if root else data_dir() / "adapters"


@dataclass
class AdapterVersion:
    name: str
    path: Path
    created_at: str  # ISO 8601, UTC
    meta: dict[str, Any] = field(default_factory=dict)  # the adapter's chime_adapter.json; {} if none
    serving: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "created_at": self.created_at, "serving": self.serving,
                "meta": self.meta}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _is_complete(path: Path) -> bool:
    """A loadable PEFT adapter directory: its config and its weights (safetensors; pickle-based .bin
    files are refused, see `model.loading.attach_adapter`) are both there."""
    return (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_json_dict(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


class AdapterRegistry:
    """The versions under `root/versions` and the serving pointer `root/current.json`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.versions_dir = self.root / VERSIONS
        self.pointer_path = self.root / POINTER

    def __repr__(self) -> str:
        return f"AdapterRegistry({str(self.root)!r})"

    # ------------------------------------------------------------------ reading

    def pointer(self) -> dict[str, Any] | None:
        """The pointer, None when there is none; AdapterRegistryError when it is corrupt."""
        try:
            text = self.pointer_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise AdapterRegistryError(f"{self.pointer_path}: cannot read the adapter pointer: {e}") from e
        try:
            pointer = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterRegistryError(
                f"{self.pointer_path}: corrupt adapter pointer ({e}); run `chime adapters promote NAME` to rewrite it"
            ) from e
        version = pointer.get("version") if isinstance(pointer, dict) else None
        history = pointer.get("history", []) if isinstance(pointer, dict) else None
        if not isinstance(version, str) or not isinstance(history, list) or not all(isinstance(h, str) for h in history):
            raise AdapterRegistryError(
                f"{self.pointer_path}: corrupt adapter pointer (expected {{\"version\": name, \"history\": [names]}}); "
                "run `chime adapters promote NAME` to rewrite it"
            )
        return {"version": version, "history": list(history), "updated_at": pointer.get("updated_at")}

    def _serving_name(self) -> str | None:
        """The pointer's version for display; a corrupt pointer is logged, not raised."""
        try:
            pointer = self.pointer()
        except AdapterRegistryError as e:
            log.warning("%s", e)
            return None
        return pointer["version"] if pointer else None

    def _version(self, path: Path, serving: str | None) -> AdapterVersion:
        info = _read_json_dict(path / VERSION_INFO)
        created = info.get("created_at")
        if not isinstance(created, str):  # copied in by hand: the directory's time is the best there is
            created = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="microseconds")
        return AdapterVersion(
            name=path.name, path=path, created_at=created, meta=_read_json_dict(path / ADAPTER_META),
            serving=path.name == serving,
        )

    def versions(self) -> list[AdapterVersion]:
        """Every complete version, oldest first (half-copied `.incoming-*` directories are not versions)."""
        if not self.versions_dir.is_dir():
            return []
        serving = self._serving_name()
        found = [
            self._version(p, serving)
            for p in self.versions_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and _is_complete(p)
        ]
        return sorted(found, key=lambda v: (v.created_at, v.name))

    def get(self, name: str) -> AdapterVersion:
        _check_name(name)
        path = self.versions_dir / name
        if not path.is_dir():
            raise AdapterRegistryError(f"no adapter version {name!r} in {self.versions_dir}")
        if not _is_complete(path):
            raise AdapterRegistryError(f"adapter version {name!r} is incomplete (no adapter_config.json or weights): {path}")
        return self._version(path, self._serving_name())

    def current(self) -> AdapterVersion | None:
        """The serving version; None when nothing was promoted yet (AdapterRegistryError if the pointer is bad)."""
        return self._pointed(self.pointer())

    def _pointed(self, pointer: dict[str, Any] | None) -> AdapterVersion | None:
        if pointer is None:
            return None
        try:
            version = self.get(pointer["version"])
        except AdapterRegistryError as e:
            raise AdapterRegistryError(f"{self.pointer_path} points at a version that cannot serve: {e}") from e
        version.serving = True
        return version

    def history(self) -> list[str]:
        pointer = self.pointer()
        return list(pointer["history"]) if pointer else []

    # ------------------------------------------------------------------ adding

    def cleanup(self) -> list[Path]:
        """Delete `.incoming-*` directories left by a crash mid-`add`; returns what was removed.

        A directory whose process is still alive (another `add` in progress) is left alone.
        """
        removed: list[Path] = []
        if not self.versions_dir.is_dir():
            return removed
        for path in self.versions_dir.iterdir():
            if not path.name.startswith(INCOMING_PREFIX):
                continue
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and _pid_alive(int(pid)):
                continue
            log.info("removing %s, left by an interrupted add", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed

    def _default_name(self) -> str:
        base = "v" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        name, n = base, 1
        while (self.versions_dir / name).exists():
            n += 1
            name = f"{base}-{n}"
        return name

    def add(
        self, src_dir: str | Path, name: str | None = None, validate: Callable[[Path], Any] | None = None
    ) -> AdapterVersion:
        """Copy the adapter in `src_dir` into a new version (not promoted).

        `validate(path)` runs on the complete copy before it becomes visible and raises to refuse it.
        Any failure removes the copy: a version either exists completely or not at all.
        """
        src = Path(src_dir)
        if not (src / "adapter_config.json").is_file():
            raise AdapterRegistryError(f"not a PEFT adapter directory (no adapter_config.json): {src}")
        if not _is_complete(src):
            if (src / "adapter_model.bin").is_file():
                raise AdapterRegistryError(f"{src}: adapter_model.bin is a pickle file and is refused; save the adapter "
                                           "with safetensors (PEFT's default: save_pretrained(..., safe_serialization=True))")
            raise AdapterRegistryError(f"adapter directory without weights (adapter_model.safetensors): {src}")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.cleanup()
        if name is None:
            name = self._default_name()
        else:
            _check_name(name)
            if (self.versions_dir / name).exists():
                raise AdapterRegistryError(f"adapter version {name!r} already exists in {self.versions_dir}")
        incoming = self.versions_dir / f"{INCOMING_PREFIX}{name}-{os.getpid()}"
        final = self.versions_dir / name
        try:
            incoming.mkdir()
            for item in sorted(src.iterdir()):
                if item.is_file():  # the adapter's own files; checkpoints and other folders stay behind
                    shutil.copy2(item, incoming / item.name)
                    _fsync_file(incoming / item.name)
            info = {"name": name, "created_at": _now(), "source": str(src.resolve())}
            (incoming / VERSION_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
            _fsync_file(incoming / VERSION_INFO)
            _fsync_dir(incoming)
            if validate is not None:
                validate(incoming)
            if final.exists():  # another process took the name meanwhile
                raise AdapterRegistryError(f"adapter version {name!r} already exists in {self.versions_dir}")
            os.rename(incoming, final)
            _fsync_dir(self.versions_dir)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        log.info("added adapter version %s from %s", name, src)
        return self.get(name)

    # ------------------------------------------------------------------ the pointer

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise pointer read-modify-write between processes (promote and rollback)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            try:
                import fcntl
            except ImportError:  # not POSIX: no cross-process lock, the write itself stays atomic
                yield
                return
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _write_pointer(self, version: str, history: list[str]) -> None:
        pointer = {"version": version, "history": history[:HISTORY_LIMIT], "updated_at": _now()}
        tmp = self.root / f"{POINTER}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(pointer, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.pointer_path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(self.root)

    def promote(self, name: str) -> AdapterVersion:
        """Serve `name`: the previous version goes to the front of the history."""
        version = self.get(name)
        with self._locked():
            try:
                pointer = self.pointer()
            except AdapterRegistryError as e:  # promoting is how a broken pointer gets repaired
                log.warning("%s; overwriting it (its history is lost)", e)
                pointer = None
            history = list(pointer["history"]) if pointer else []
            previous = pointer["version"] if pointer else None
            if previous is not None and previous != name:
                history.insert(0, previous)
            history = [h for h in dict.fromkeys(history) if h != name]  # no duplicates, order kept
            self._write_pointer(name, history)
        log.info("promoted adapter version %s (was %s)", name, previous)
        version.serving = True
        return version

    def rollback(self) -> AdapterVersion:
        """Serve the previously serving version again (it leaves the history)."""
        with self._locked():
            pointer = self.pointer()
            if not pointer or not pointer["history"]:
                raise AdapterRegistryError(f"nothing to roll back to: {self.pointer_path} has no earlier version")
            target, rest = pointer["history"][0], pointer["history"][1:]
            version = self.get(target)
            self._write_pointer(target, rest)
        log.info("rolled back adapter from %s to %s", pointer["version"], target)
        version.serving = True
        return version


def _check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name or "") or name.startswith("."):
        raise AdapterRegistryError(
            f"invalid adapter version name {name!r}: use letters, digits, '.', '_' and '-', not starting with '.'"
        )


def _sha256_prefix(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:8]


def adapter_version(path: str | Path | None) -> str:
    """A short stable label for logs of which adapter decided: "none"; a registry version's name;
    else "<dirname>@<first 8 hex of the weights' sha256>" (just the directory name without weights)."""
    if path is None or str(path) == "":
        return "none"
    p = Path(path)
    if p.parent.name == VERSIONS and not p.name.startswith("."):
        return p.name
    for weights in ("adapter_model.safetensors", "adapter_model.bin"):
        try:
            return f"{p.name}@{_sha256_prefix(p / weights)}"
        except OSError:
            continue
    return p.name or str(path)


# ---------------------------------------------------------------------------- serving


class AdapterWatcher:
    """Polls the registry pointer and hot-swaps the engine's adapter when it changes.

    The swap happens between messages (the engine's lock); a version that fails to load is logged once
    and the engine keeps serving what it had (promoting it again retries).
    """

    def __init__(self, engine: Engine, registry: AdapterRegistry, interval_s: float = 5.0):
        self.engine = engine
        self.registry = registry
        self.interval_s = interval_s
        self._failed: tuple[str, Any] | None = None  # (version, pointer's updated_at) of the last failed load
        self._pointer_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _serving(self, version: AdapterVersion) -> bool:
        if self.engine.adapter is None:
            return False
        try:
            return Path(self.engine.adapter).resolve() == version.path.resolve()
        except OSError:
            return False

    def check(self) -> bool:
        """Reload the engine if the pointer names another version; True when it swapped."""
        try:
            pointer = self.registry.pointer()
            version = self.registry._pointed(pointer)
        except AdapterRegistryError as e:
            if str(e) != self._pointer_error:  # say it once, not every interval
                log.error("adapter watcher: %s; still serving %s", e, self.engine.adapter_version)
                self._pointer_error = str(e)
            return False
        self._pointer_error = None
        if version is None or pointer is None or self._serving(version):
            return False
        attempt = (version.name, pointer.get("updated_at"))
        if attempt == self._failed:
            return False
        previous = self.engine.adapter_version
        try:
            self.engine.reload_adapter(str(version.path))
        except Exception:
            log.exception("adapter watcher: cannot load version %s from %s; still serving %s",
                          version.name, version.path, previous)
            self._failed = attempt
            return False
        self._failed = None
        log.info("adapter watcher: now serving %s (was %s)", self.engine.adapter_version, previous)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # never let the thread die: the next interval tries again
                log.exception("adapter watcher: check failed")

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="chime-adapter-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop polling; a reload in progress finishes first unless `timeout` runs out."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
