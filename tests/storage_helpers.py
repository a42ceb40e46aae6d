"""Database URLs for the storage tests (SQLite and PostgreSQL), and a TCP proxy that can cut the line."""

from __future__ import annotations

import os
import socket
import threading
import uuid

PG_URL = os.environ.get("CHIME_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def postgres_available(url: str = PG_URL) -> str | None:
    """None when PostgreSQL answers at `url`, else why not."""
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return None
    except Exception as e:  # noqa: BLE001
        return f"PostgreSQL is not reachable at {url}: {type(e).__name__}"


def fresh_schema_url(url: str = PG_URL, host_port: tuple[str, int] | None = None) -> tuple[str, str]:
    """Create an empty schema and return (URL whose search_path is that schema, schema name)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    schema = "chime_test_" + uuid.uuid4().hex[:10]
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    u = make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
    if host_port is not None:
        u = u.set(host=host_port[0], port=host_port[1])
    return u.render_as_string(hide_password=False), schema


def drop_schema(schema: str, url: str = PG_URL) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


class CuttableProxy:
    """A TCP proxy to PostgreSQL. `cut()` drops every connection and refuses new ones (the database is
    gone, as a client sees it); `restore()` lets connections through again."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)):
        self.target = target
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.up = True
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.up = False
        with self._lock:
            for s in self._conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self._conns.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self._stop = True
        self.cut()
        self.listener.close()
