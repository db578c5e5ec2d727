#!/usr/bin/env bash
# Run once by the postgres image, as its superuser, on a new data volume: the owner Quarry's
# producer logs in as (not a superuser: it may create the roles of the pools, the dispatcher and
# user SQL, and nothing more), its database, and that database's built-ins that run SQL text,
# change a session or signal another taken from PUBLIC and left to the owner alone (the same
# list as common/roles.py's GUARDED_BUILTINS and `producer init` as a superuser); and pgvector
# in that database, for the embeddings of jobs whose model has an embedding output.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v owner_password="$QUARRY_DB_PASSWORD" <<'SQL'
CREATE ROLE quarry LOGIN NOSUPERUSER NOCREATEDB CREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'owner_password';
CREATE DATABASE quarry OWNER quarry;
\connect quarry
CREATE EXTENSION IF NOT EXISTS vector;  -- embeddings (common/embeddings.py)
DO $$
DECLARE guarded regprocedure;
BEGIN
  FOR guarded IN
    SELECT p.oid::regprocedure FROM pg_proc p
    WHERE p.pronamespace = 'pg_catalog'::regnamespace
      AND (p.proname = ANY (ARRAY['query_to_xml', 'query_to_xmlschema', 'query_to_xml_and_xmlschema',
                                  'cursor_to_xml', 'cursor_to_xmlschema', 'ts_stat', 'ts_rewrite',
                                  'set_config', 'pg_notify', 'pg_cancel_backend', 'pg_terminate_backend'])
           OR p.proname LIKE 'pg\_%advisory\_%')
  LOOP
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', guarded);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO quarry', guarded);
  END LOOP;
END $$;
SQL
