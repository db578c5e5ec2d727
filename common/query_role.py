"""The least-privilege role that every piece of user SQL runs as (docs/decisions.md, "User SQL").

User text never runs on the owner's connection: it runs on a session that logged in as this
role, so nothing in the text (not even `set_config('role', …)`, which undoes a `SET ROLE`) can
reach more than the role may. The role may read the catalog tables and the predictions view,
and nothing else of Quarry's; it owns nothing, writes nothing, creates nothing and belongs to no
other role. `ensure_query_role` creates and maintains it (run with the schema by every producer
command); `check_query_session` refuses a session whose role has grown more rights.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from common.config import Settings
from common.db import take_lock
from common.errors import ConfigError

log = logging.getLogger(__name__)
# what user SQL may read of Quarry's own tables (and each dataset's catalog, granted at ingest)
READABLE = ("styles", "images", "predictions", "datasets", "locations", "duplicates")
LEDGER = (
    "jobs",
    "job_chunks",
    "job_items",
    "dispatchers",
    "schema_version",
    "ingest_units",
    "holders",
    "holds",
    "recorded_batches",
    "quarry_locks",
    "model_outputs",
    "embedding_sets",
)  # never readable
ROLES_LOCK = "roles"  # a row of quarry_locks: one maintenance of Quarry's roles at a time
# role attributes that would let a session escape: none of them may be set
ROLE_ATTRIBUTES = "NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS"


def ensure_query_role(conn: psycopg.Connection, settings: Settings, *, maintain: bool = False) -> None:
    """Create QUERY_ROLE when missing, with its password and limits; grant it SELECT on the
    catalog and the predictions view and revoke what it holds on the ledger, where that differs
    (grants on other tables, made by an administrator, are kept). `maintain` (`producer init`)
    also sets its attributes, password and limits again. Catalog rows change only when something
    differs, under a row lock: concurrent producers never update the same row at once."""
    role, password = settings.query_role, settings.query_role_password
    limits = {
        "statement_timeout": f"{settings.query_timeout_s}s",
        "work_mem": settings.query_work_mem,
        "temp_file_limit": settings.query_temp_file_limit,
    }
    name = sql.Identifier(role)
    with conn.transaction():
        take_lock(conn, ROLES_LOCK)
        found = conn.execute("SELECT rolconfig FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if found is None:
            create_role(conn, role)
        changes = []
        if found is None or maintain:
            changes.append(sql.SQL("ALTER ROLE {} LOGIN " + ROLE_ATTRIBUTES).format(name))
            if password:
                changes.append(sql.SQL("ALTER ROLE {} PASSWORD {}").format(name, sql.Literal(password)))
        current = dict(item.split("=", 1) for item in (found[0] or [])) if found and not maintain else {}
        for setting, value in limits.items():
            if current.get(setting) != value:
                changes.append(
                    sql.SQL("ALTER ROLE {} SET {} = {}").format(
                        name, sql.Identifier(setting), sql.Literal(value)
                    )
                )
        for statement in changes:
            try:
                with conn.transaction():
                    conn.execute(statement)
            except pg_errors.InsufficientPrivilege as exc:  # a managed server's owner may lack these
                level = logging.WARNING if maintain else logging.DEBUG  # said once, by `producer init`
                log.log(level, "query role %s not updated: %s", role, exc.diag.message_primary)
        grant_reads(conn, role)


def create_role(conn: psycopg.Connection, role: str) -> None:
    """CREATE ROLE, or ConfigError naming what an administrator should run."""
    try:
        with conn.transaction():  # another database of this server may create it at the same time
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN " + ROLE_ATTRIBUTES).format(sql.Identifier(role)))
    except (pg_errors.DuplicateObject, pg_errors.UniqueViolation):
        pass
    except pg_errors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"cannot create the query role {role}: {exc.diag.message_primary}; have an administrator"
            f" run: CREATE ROLE {role} LOGIN PASSWORD '…' {ROLE_ATTRIBUTES}"
        ) from exc


ANY_PRIVILEGE = "SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER"


def grant_reads(conn: psycopg.Connection, role: str) -> None:
    """SELECT on READABLE, nothing on LEDGER; only what differs is granted or revoked. A catalog
    table that is not there (`producer drop-dataset styles`) is passed over."""
    name = sql.Identifier(role)
    readable = [t for t in READABLE if table_exists(conn, t)]
    missing = [t for t in readable if not has_privilege(conn, role, t, "SELECT")]
    held = [t for t in LEDGER if has_privilege(conn, role, t, ANY_PRIVILEGE)]
    if missing:
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(name))
        tables = sql.SQL(", ").join(map(sql.Identifier, missing))
        conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(tables, name))
    if held:
        tables = sql.SQL(", ").join(map(sql.Identifier, held))
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(tables, name))


def grant_dataset_reads(conn: psycopg.Connection, settings: Settings, table: str) -> None:
    """SELECT on a dataset's catalog table for the query role (when the table is there and the
    role lacks it)."""
    role = settings.query_role
    if table and table_exists(conn, table) and not has_privilege(conn, role, table, "SELECT"):
        with conn.transaction():
            conn.execute(
                sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(table), sql.Identifier(role))
            )


def table_exists(conn: psycopg.Connection, table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    return bool(row and row[0])


def has_privilege(conn: psycopg.Connection, role: str, table: str, privileges: str) -> bool:
    row = conn.execute("SELECT has_table_privilege(%s, %s, %s)", (role, table, privileges)).fetchone()
    return bool(row and row[0])


ESCALATIONS = """
SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolbypassrls, r.rolreplication,
       (SELECT string_agg(g.rolname, ', ' ORDER BY g.rolname) FROM pg_auth_members m
        JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid),
       (SELECT string_agg(c.relname, ', ' ORDER BY c.relname) FROM pg_class c
        WHERE c.relowner = r.oid)
FROM pg_roles r WHERE r.rolname = current_user
"""


def check_query_session(conn: psycopg.Connection, role: str) -> None:
    """ConfigError unless this session is the query role and that role holds no more than it
    should: no superuser, role-, database-creating, replication or RLS-bypassing attribute, no
    membership in another role (the server's file, program and signal roles among them), no
    object it owns."""
    user = conn.execute("SELECT current_user").fetchone()
    if user is None or user[0] != role:
        raise ConfigError(f"user SQL must run as {role}, not {user[0] if user else '?'}")
    row = conn.execute(ESCALATIONS).fetchone()
    assert row is not None
    *flags, member_of, owns = row
    granted = [
        name
        for name, on in zip(
            ("SUPERUSER", "CREATEROLE", "CREATEDB", "BYPASSRLS", "REPLICATION"), flags, strict=True
        )
        if on
    ]
    if granted or member_of or owns:
        held = ", ".join(
            [
                *granted,
                *([f"member of {member_of}"] if member_of else []),
                *([f"owner of {owns}"] if owns else []),
            ]
        )
        raise ConfigError(
            f"the query role {role} holds more than SELECT ({held}): Quarry will not run user SQL as it"
        )
