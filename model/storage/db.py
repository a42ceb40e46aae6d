"""Database engines and migrations.

    url = database_url()            # $DATABASE_URL, else sqlite:///<CHIME_HOME>/chime.db
    upgrade(url)                    # Alembic: bring any database to the current schema
    engine = make_engine(url)
    with session_scope(engine) as s: ...

SQLite runs in WAL mode with a busy timeout and foreign keys on, so the bot and the retraining job can
write to the same file at once; PostgreSQL URLs without a driver get psycopg 3.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from model.config import data_dir
from model.errors import ChimeError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


class StorageError(ChimeError):
    """The database cannot be opened, migrated or written."""


def database_url(url: str | None = None) -> str:
    """The URL to use: an explicit one, else $DATABASE_URL, else a SQLite file in Chime's data directory."""
    if url:
        return normalize_url(url)
    env = os.environ.get("DATABASE_URL")
    if env:
        return normalize_url(env)
    path = data_dir() / "chime.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def normalize_url(url: str) -> str:
    """postgres:// and postgresql:// (no driver) become postgresql+psycopg://."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001 - DB-API objects
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str | None = None, **kwargs) -> Engine:
    url = database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextlib.contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error."""
    with sessions(engine)() as s, s.begin():
        yield s


def alembic_config(url: str):  # noqa: ANN201 - alembic.config.Config
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> str:
    """Migrate the database at `url` to `revision` (creating it if blank); returns the URL used."""
    from alembic import command

    url = database_url(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:  # SQLite alters a table by copying it: dropping the old one must not cascade to its children
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                conn.commit()
            with conn.begin():
                cfg = alembic_config(url)
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                if sqlite and (broken := conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()):
                    raise StorageError(f"the migration left rows with dangling references: {broken[:5]}")
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()
    except Exception as e:  # noqa: BLE001 - report any driver/migration error as one typed error
        raise StorageError(f"cannot migrate {safe_url(url)}: {e}") from e
    finally:
        engine.dispose()
    return url


def current_revision(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def safe_url(url: str) -> str:
    """The URL with any password hidden (for messages and logs)."""
    return make_url(url).render_as_string(hide_password=True)
