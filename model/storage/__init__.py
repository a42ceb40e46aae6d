"""Chime's memory: what it saw and did, in a SQL database (SQLite by default, PostgreSQL via DATABASE_URL).

- `models`: the SQLAlchemy 2.0 tables (servers, channels, people and their consent, messages,
  decisions, replies, tool calls, feedback, adapter versions and evaluations, exports).
- `db`: engines and sessions for a URL, `upgrade` (Alembic migrations in `migrations/`).
- `log`: `ChatLog`, the buffered writer the bot front-ends use: it never blocks or fails a decision,
  and keeps what it must write while the database is unreachable.
- `admin`: consent, opt-out, forget, retention, corrections.
"""
