"""The durable record: SQL tables owned by Alembic, reached through SQLAlchemy's async engine.

SQLite and PostgreSQL are two URLs into the same store; what differs between them lives in
:mod:`registry.store.dialect`.
"""
