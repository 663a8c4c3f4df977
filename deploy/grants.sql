-- picloud: roles and grants for a deployment. Run once as a superuser, in the database named
-- by picloud.database, after CREATE EXTENSION picloud:
--
--   psql -d app -v ON_ERROR_STOP=1 -f grants.sql
--   psql -d app -v ON_ERROR_STOP=1 -v app_name=orders -v app_role=orders_app \
--        -v operator_role=ops -f grants.sql
--
-- Safe to run again: existing roles and an existing app of the same name are reused.
-- No passwords here, so that none ends up in shell history or the server log: afterwards set
-- them in psql with \password (it hashes on the client), or authenticate with peer or cert
-- in pg_hba.conf.
--
-- The extension itself creates three NOLOGIN roles (sql/010_access.sql, sql/090_privileges.sql):
--   picloud_supervisor  BYPASSRLS; executes every picloud function, including the claim,
--                       complete and fail calls and the user switch (_become) that runs a
--                       SQL handler as its principal. Nobody else gets _become.
--   picloud_admin       operates picloud: creates apps, grants app roles, runs housekeeping on
--                       demand, and passes every row-level security policy.
--   picloud_user        what every tenant role becomes a member of (picloud_grant_app_role
--                       does it): schema usage and the table rights the API needs, narrowed
--                       by row-level security to the apps the role holds a capability in.
-- Nothing is granted to PUBLIC.

\if :{?app_name}
\else
\set app_name example
\endif
\if :{?app_role}
\else
\set app_role example_app
\endif
\if :{?operator_role}
\else
\set operator_role picloud_operator
\endif

-- 1. The supervisor logs in as picloud_supervisor itself. A separate login role that is only
--    a member of picloud_supervisor would not do: BYPASSRLS is a role attribute, and role
--    attributes are not inherited through membership, so such a role would see no rows to
--    claim. (A per-host login role must be created WITH LOGIN BYPASSRLS IN ROLE
--    picloud_supervisor.) It needs no superuser.
--    pg_hba.conf: the supervisor has no TLS, so match it with a "host" line, for example
--      host  app  picloud_supervisor  10.0.0.0/8  scram-sha-256
--    then: \password picloud_supervisor
ALTER ROLE picloud_supervisor LOGIN;
-- PUBLIC has CONNECT on new databases, but hardened clusters revoke it.
GRANT CONNECT ON DATABASE :"DBNAME" TO picloud_supervisor;

-- 2. An operator: a person or tool that manages apps, dead letters and housekeeping across
--    every app. Membership in picloud_admin is all it takes.
SELECT format('CREATE ROLE %I LOGIN', :'operator_role')
WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = :'operator_role')
\gexec
GRANT picloud_admin TO :"operator_role";
GRANT CONNECT ON DATABASE :"DBNAME" TO :"operator_role";

-- 3. An application: an app (the tenant) and the role the application connects as.
--    'admin' lets the role register handlers and triggers, manage its dead letters and
--    enqueue; handlers it registers run as this role, so it also needs the rights on its own
--    tables that its SQL handlers use. A role that only enqueues needs just 'producer'.
SELECT format('CREATE ROLE %I LOGIN', :'app_role')
WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = :'app_role')
\gexec
GRANT CONNECT ON DATABASE :"DBNAME" TO :"app_role";
-- COALESCE evaluates its second argument only when the first is NULL: no duplicate app.
SELECT coalesce(
    (SELECT app_id FROM picloud.apps WHERE name = :'app_name' ORDER BY created_at LIMIT 1),
    picloud.picloud_create_app(:'app_name')) AS app_id
\gset
-- Also makes the role a member of picloud_user.
SELECT picloud.picloud_grant_app_role(:'app_id', :'app_role', 'admin');
\echo app :app_name is :app_id, administered by role :app_role
