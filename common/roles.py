"""The logins Quarry's processes connect as, and the second wall around user SQL
(docs/decisions.md, "Who may reach what").

Nothing of Quarry's needs a superuser. The owner (DATABASE_URL, `producer` commands: CREATEROLE
is enough) owns the tables; the pools log in as WORKER_ROLE, the dispatcher as DISPATCHER_ROLE
and KEDA as SCALER_ROLE, each granted only what its work reads and writes (WORKER_GRANTS,
DISPATCHER_GRANTS, SCALER_GRANTS, and the dataset tables as they are created); user SQL runs as
QUERY_ROLE (common/query_role.py). `ensure_roles` creates and maintains all four;
`harden_builtins` (run by `producer init` where its URL may) takes
EXECUTE on the built-ins that run SQL text, change a session or signal another away from every
role but the database's owner.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from common.config import Settings
from common.db import take_lock
from common.query_role import (
    ROLE_ATTRIBUTES,
    ROLES_LOCK,
    create_role,
    ensure_query_role,
    grant_dataset_reads,
    table_exists,
)

log = logging.getLogger(__name__)

# what the pools' work needs: the ledger's chunk and item rows, liveness, and registering an
# ingest's locations, shards and catalog rows; no DDL, no jobs created, no dispatchers
WORKER_GRANTS: Mapping[str, str] = {
    "jobs": "SELECT, UPDATE",
    "job_chunks": "SELECT, UPDATE",
    "job_items": "SELECT, INSERT, UPDATE",
    "ingest_units": "SELECT, UPDATE",
    "holders": "SELECT, INSERT, UPDATE, DELETE",
    "holds": "SELECT, INSERT, UPDATE, DELETE",
    "datasets": "SELECT",
    "locations": "SELECT, INSERT, UPDATE",
    "shards": "SELECT, INSERT, UPDATE",
    "schema_version": "SELECT",
    "model_outputs": "SELECT, INSERT",  # a model's outputs computed once (common/outputs.py)
    "embedding_sets": "SELECT",  # and each set's table, granted as it is made (common/embeddings.py)
}
# the dispatcher's: claiming and healing chunks, failing what ran out of attempts, its gauges
DISPATCHER_GRANTS: Mapping[str, str] = {
    "jobs": "SELECT, UPDATE",
    "job_chunks": "SELECT, UPDATE",
    "job_items": "SELECT, INSERT, UPDATE",
    "recorded_batches": "SELECT",
    "holders": "SELECT, DELETE",
    "holds": "SELECT, DELETE",
    "dispatchers": "SELECT, INSERT, UPDATE, DELETE",
    "quarry_locks": "SELECT, UPDATE",
    "schema_version": "SELECT",
}
# KEDA's: the backlog its scalers count (deploy/k8s/base/autoscaling.yaml), read only
SCALER_GRANTS: Mapping[str, str] = {"jobs": "SELECT", "job_chunks": "SELECT"}
WORKER_DATASET_PRIVILEGES = "SELECT, INSERT, UPDATE"  # on each dataset's catalog table
# Built-ins that run SQL given as text, change a session or signal another session: user SQL
# may not call them (quarry/query.py refuses every volatile function), and in a hardened database
# no role but the owner may either.
GUARDED_BUILTINS = (
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "set_config",
    "pg_notify",
    "pg_cancel_backend",
    "pg_terminate_backend",
)
GUARDED = """
SELECT p.oid::regprocedure FROM pg_proc p
WHERE p.pronamespace = 'pg_catalog'::regnamespace
  AND (p.proname = ANY(%s) OR p.proname LIKE 'pg\\_%%advisory\\_%%')
  AND has_function_privilege('public', p.oid, 'EXECUTE')
"""


@dataclass(frozen=True)
class ProcessRole:
    """A login one kind of Quarry process connects as, and the tables it may touch."""

    name: str
    password: str
    grants: Mapping[str, str]


def process_roles(settings: Settings) -> list[ProcessRole]:
    """The pools', the dispatcher's and the scaler's roles (those whose setting is not empty)."""
    roles = [
        ProcessRole(settings.worker_role, settings.worker_role_password, WORKER_GRANTS),
        ProcessRole(settings.dispatcher_role, settings.dispatcher_role_password, DISPATCHER_GRANTS),
        ProcessRole(settings.scaler_role, settings.scaler_role_password, SCALER_GRANTS),
    ]
    return [role for role in roles if role.name]


def ensure_roles(conn: psycopg.Connection, settings: Settings, *, maintain: bool = False) -> None:
    """The query role, the pools' and the dispatcher's: created when missing, granted what they
    lack; `maintain` (`producer init`) also sets their attributes and passwords again and hardens
    the database's built-ins where this session may."""
    ensure_query_role(conn, settings, maintain=maintain)
    with conn.transaction():
        take_lock(conn, ROLES_LOCK)
        for role in process_roles(settings):
            ensure_process_role(conn, role, maintain)
        for table in dataset_tables(conn):
            grant_dataset_writes(conn, settings, table)
    if maintain:
        harden_builtins(conn)


def ensure_process_role(conn: psycopg.Connection, role: ProcessRole, maintain: bool) -> None:
    """Create `role` when missing; grant each table of its grants what it lacks."""
    name = sql.Identifier(role.name)
    found = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role.name,)).fetchone()
    if found is None:
        create_role(conn, role.name)
    if found is None or maintain:
        alter = [sql.SQL("ALTER ROLE {} LOGIN " + ROLE_ATTRIBUTES).format(name)]
        if role.password:
            alter.append(sql.SQL("ALTER ROLE {} PASSWORD {}").format(name, sql.Literal(role.password)))
        for statement in alter:
            try:
                with conn.transaction():  # a savepoint: the rest goes on
                    conn.execute(statement)
            except pg_errors.InsufficientPrivilege as exc:  # an owner with CREATEROLE, not SUPERUSER
                level = logging.WARNING if maintain else logging.DEBUG
                log.log(level, "role %s not updated: %s", role.name, exc.diag.message_primary)
    schema = conn.execute("SELECT has_schema_privilege(%s, 'public', 'USAGE')", (role.name,)).fetchone()
    if not (schema and schema[0]):
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(name))
    for table, privileges in role.grants.items():
        if not has_privileges(conn, role.name, table, privileges):
            conn.execute(sql.SQL(f"GRANT {privileges} ON {{}} TO {{}}").format(sql.Identifier(table), name))
    grant_sequences(conn, role.name, [t for t, p in role.grants.items() if "INSERT" in p])


def grant_dataset(conn: psycopg.Connection, settings: Settings, table: str) -> None:
    """A dataset's catalog table: SELECT for the query role, rows for the pools (an ingest's
    registering adds them)."""
    grant_dataset_reads(conn, settings, table)
    with conn.transaction():
        grant_dataset_writes(conn, settings, table)


def grant_dataset_writes(conn: psycopg.Connection, settings: Settings, table: str) -> None:
    """WORKER_DATASET_PRIVILEGES on `table` and its identity sequence, where lacking."""
    role = settings.worker_role
    if not (role and table and table_exists(conn, table)):
        return
    name = sql.Identifier(role)
    if not has_privileges(conn, role, table, WORKER_DATASET_PRIVILEGES):
        conn.execute(
            sql.SQL(f"GRANT {WORKER_DATASET_PRIVILEGES} ON {{}} TO {{}}").format(sql.Identifier(table), name)
        )
    grant_sequences(conn, role, [table])


def dataset_tables(conn: psycopg.Connection) -> list[str]:
    """The catalog tables of the registered datasets that exist."""
    rows = conn.execute("SELECT name FROM datasets WHERE to_regclass(quote_ident(name)) IS NOT NULL")
    return [row[0] for row in rows]


def grant_sequences(conn: psycopg.Connection, role: str, tables: list[str]) -> None:
    """USAGE for `role` on the identity and serial sequences of `tables` it lacks it on (an
    insert takes the next id from them)."""
    rows = conn.execute(
        "SELECT s.relname FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'"
        " WHERE d.refobjid = ANY(SELECT to_regclass(t) FROM unnest(%s::text[]) t)"
        " AND d.deptype IN ('a', 'i')"  # the check only on sequences, whatever order the plan takes:
        " AND CASE WHEN s.relkind = 'S' THEN NOT has_sequence_privilege(%s, s.oid, 'USAGE') END",
        (tables, role),
    ).fetchall()
    for (sequence,) in rows:
        conn.execute(
            sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(sql.Identifier(sequence), sql.Identifier(role))
        )


def has_privileges(conn: psycopg.Connection, role: str, table: str, privileges: str) -> bool:
    """Whether `role` holds every one of `privileges` on `table`."""
    wanted = [p.strip() for p in privileges.split(",")]
    row = conn.execute(
        "SELECT bool_and(has_table_privilege(%s, %s, p)) FROM unnest(%s::text[]) p", (role, table, wanted)
    ).fetchone()
    return bool(row and row[0])


def harden_builtins(conn: psycopg.Connection) -> bool:
    """Revoke EXECUTE on GUARDED_BUILTINS and the advisory-lock functions from PUBLIC in this
    database and grant it to its owner; False (and a warning) where this session may not (only
    a superuser may change the built-ins' privileges)."""
    superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if not (superuser and superuser[0]):
        held = conn.execute(GUARDED, (list(GUARDED_BUILTINS),)).fetchone()
        if held:
            log.warning(
                "the built-ins that run SQL text, change a session or signal one stay executable by"
                " every role of this database (only a superuser may revoke them: run `producer init`"
                " once with a superuser's DATABASE_URL); user SQL is still refused any of them"
            )
        return False
    owner = conn.execute(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
    ).fetchone()
    assert owner is not None
    with conn.transaction():
        for (function,) in conn.execute(GUARDED, (list(GUARDED_BUILTINS),)).fetchall():
            signature = sql.SQL(function)  # regprocedure's text: a qualified, quoted signature
            conn.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(signature))
            conn.execute(
                sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(signature, sql.Identifier(owner[0]))
            )
    return True
