-- Roles, capabilities, apps and argument checks.
--
-- picloud_admin: operates picloud (creates apps, grants app roles, runs GC on demand).
-- picloud_user:  every tenant role is made a member; gives schema usage and table access,
--                which row-level security narrows to the apps the role holds rights in.
-- picloud_supervisor: what the supervisor connects as (or is a member of). It holds no rights
--                on picloud's tables: it may call the claim/complete/fail/lane functions, which
--                run as picloud_owner, and nothing a tenant could not call besides.
-- picloud_owner: owns the functions that write the outbox on the supervisor's behalf
--                (SECURITY DEFINER); not a superuser, never a login.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'picloud_admin') THEN
        CREATE ROLE picloud_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'picloud_user') THEN
        CREATE ROLE picloud_user NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'picloud_supervisor') THEN
        CREATE ROLE picloud_supervisor NOLOGIN BYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'picloud_owner') THEN
        CREATE ROLE picloud_owner NOLOGIN NOINHERIT BYPASSRLS;
    END IF;
END
$roles$;
GRANT picloud_user TO picloud_admin WITH ADMIN OPTION;

-- Raises 22004 naming the first argument that is NULL. Called only when some required
-- argument is NULL, so the hot paths pay one IF.
CREATE FUNCTION picloud._null_argument(p_names text[], p_is_null boolean[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. cardinality(p_names) LOOP
        IF p_is_null[i] THEN
            RAISE EXCEPTION 'argument % must not be NULL', p_names[i] USING ERRCODE = '22004';
        END IF;
    END LOOP;
END
$$;

CREATE FUNCTION picloud._invalid(p_message text, p_hint text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', p_message USING ERRCODE = '22023', HINT = coalesce(p_hint, '');
END
$$;

-- picloud._is_owner() (Rust, api/access.rs): superusers and members of picloud_admin, who act
-- on every app.

-- Does the current role hold a capability in an app?
--   manage_triggers     (AppManageTriggers)    - admin
--   manage_dead_letters (AppDeadLetterManage)  - admin
--   enqueue                                    - admin or producer
-- PL/pgSQL rather than SQL: a SQL function that is not inlined (none with a fixed search_path
-- is, see sql/090_privileges.sql) is parsed and planned again by every statement that calls
-- it, about 0.2 ms - most of what an API call that checks a right cost; PL/pgSQL keeps its plan
-- for the session. Every name and operator is qualified instead of a fixed search_path (see
-- sql/090_privileges.sql): it is the outbox's INSERT policy, and a SET clause would cost every
-- enqueue by a tenant role a settings change and its undoing (5-19 percent of such an enqueue).
CREATE FUNCTION picloud.picloud_has_capability(p_app_id uuid, p_capability text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN picloud._is_owner() OR EXISTS (
        SELECT 1 FROM picloud.app_roles r
        WHERE r.app_id OPERATOR(pg_catalog.=) p_app_id
          AND r.role_name OPERATOR(pg_catalog.=) CURRENT_USER
          AND (r.capability OPERATOR(pg_catalog.=) 'admin'
               OR (p_capability OPERATOR(pg_catalog.=) 'enqueue'
                   AND r.capability OPERATOR(pg_catalog.=) 'producer')));
END
$$;

-- Raises 42501 naming the app and the capability unless the current role holds it.
CREATE FUNCTION picloud._require(p_app_id uuid, p_capability text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_app_id IS NULL THEN
        RAISE EXCEPTION 'argument app_id must not be NULL' USING ERRCODE = '22004';
    END IF;
    IF NOT picloud.picloud_has_capability(p_app_id, p_capability) THEN
        RAISE EXCEPTION 'permission denied: role "%" lacks capability % in app %',
            current_user,
            CASE p_capability
                WHEN 'manage_triggers' THEN 'AppManageTriggers'
                WHEN 'manage_dead_letters' THEN 'AppDeadLetterManage'
                WHEN 'enqueue' THEN 'AppEnqueue'
                ELSE p_capability
            END,
            p_app_id
            USING ERRCODE = '42501',
                  HINT = 'An app''s capabilities are granted with picloud_grant_app_role.';
    END IF;
END
$$;

CREATE FUNCTION picloud._require_owner(p_action text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT picloud._is_owner() THEN
        RAISE EXCEPTION 'permission denied: % requires the picloud_admin role', p_action
            USING ERRCODE = '42501';
    END IF;
END
$$;

-- What, if anything, stops a principal from running a handler in an app now: the role was
-- dropped, or it no longer administers the app. picloud._role_standing (Rust) answers the
-- role questions from backend caches; only ordinary roles need a look at app_roles.
CREATE FUNCTION picloud._principal_problem(p_app_id uuid, p_principal name) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_standing integer;
BEGIN
    IF p_principal IS NULL THEN
        RETURN 'the handler no longer exists';
    END IF;
    v_standing := picloud._role_standing(p_principal);
    IF v_standing = 0 THEN
        RETURN format('principal role "%s" no longer exists', p_principal);
    ELSIF v_standing = 1 THEN
        RETURN NULL;
    ELSIF EXISTS (SELECT 1 FROM picloud.app_roles r
                  WHERE r.app_id = p_app_id AND r.role_name = p_principal AND r.capability = 'admin') THEN
        RETURN NULL;
    END IF;
    RETURN format('principal role "%s" is no longer an administrator of app %s', p_principal, p_app_id);
END
$$;

-- Apps ------------------------------------------------------------------------------------

CREATE FUNCTION picloud.picloud_create_app(p_name text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_app_id uuid := gen_random_uuid();
BEGIN
    PERFORM picloud._require_owner('picloud_create_app');
    IF p_name IS NULL THEN PERFORM picloud._null_argument('{name}', '{t}'); END IF;
    IF length(p_name) NOT BETWEEN 1 AND 200 THEN
        PERFORM picloud._invalid(format('app name must be 1 to 200 characters long, got %s', length(p_name)));
    END IF;
    INSERT INTO picloud.apps (app_id, name) VALUES (v_app_id, p_name);
    RETURN v_app_id;
END
$$;

CREATE FUNCTION picloud.picloud_list_apps()
RETURNS TABLE (app_id uuid, name text, created_at timestamptz, created_by name)
LANGUAGE sql STABLE AS $$
    -- Row-level security shows each role the apps it holds a capability in.
    SELECT a.app_id, a.name, a.created_at, a.created_by FROM picloud.apps a ORDER BY a.created_at, a.app_id
$$;

-- Deletes an app with everything it owns, pending events included.
CREATE FUNCTION picloud.picloud_drop_app(p_app_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM picloud._require_owner('picloud_drop_app');
    IF p_app_id IS NULL THEN PERFORM picloud._null_argument('{app_id}', '{t}'); END IF;
    -- The app row first: waits for a sql lane batch of the app to end (it holds this row) and
    -- keeps further lane batches away, instead of deadlocking with one over outbox rows.
    PERFORM 1 FROM picloud.apps WHERE app_id = p_app_id FOR UPDATE;
    DELETE FROM picloud.outbox WHERE app_id = p_app_id;
    DELETE FROM picloud.idempotency_keys WHERE app_id = p_app_id;
    DELETE FROM picloud.triggers WHERE app_id = p_app_id;
    DELETE FROM picloud.apps WHERE app_id = p_app_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'app % does not exist', p_app_id USING ERRCODE = 'P0002';
    END IF;
END
$$;

CREATE FUNCTION picloud._require_app(p_app_id uuid) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM picloud.apps WHERE app_id = p_app_id) THEN
        RAISE EXCEPTION 'app % does not exist', p_app_id USING ERRCODE = 'P0002';
    END IF;
END
$$;

-- Makes a role an app's 'admin' (manages triggers, handlers, dead letters; enqueues) or
-- 'producer' (enqueues only). Restricted to picloud_admin.
CREATE FUNCTION picloud.picloud_grant_app_role(p_app_id uuid, p_role name, p_capability text DEFAULT 'admin')
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM picloud._require_owner('picloud_grant_app_role');
    IF p_app_id IS NULL OR p_role IS NULL OR p_capability IS NULL THEN
        PERFORM picloud._null_argument('{app_id,role,capability}',
            ARRAY[p_app_id IS NULL, p_role IS NULL, p_capability IS NULL]);
    END IF;
    PERFORM picloud._require_app(p_app_id);
    IF p_capability NOT IN ('admin', 'producer') THEN
        PERFORM picloud._invalid(format('unknown app capability %L', p_capability),
            'Use ''admin'' or ''producer''.');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'role "%" does not exist', p_role USING ERRCODE = '42704';
    END IF;
    INSERT INTO picloud.app_roles (app_id, role_name, capability)
    VALUES (p_app_id, p_role, p_capability)
    ON CONFLICT ON CONSTRAINT app_roles_pkey DO NOTHING;
    IF NOT pg_catalog.pg_has_role(p_role, 'picloud_user', 'MEMBER') THEN
        EXECUTE format('GRANT picloud_user TO %I', p_role);
    END IF;
END
$$;

CREATE FUNCTION picloud.picloud_revoke_app_role(p_app_id uuid, p_role name, p_capability text DEFAULT 'admin')
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM picloud._require_owner('picloud_revoke_app_role');
    IF p_app_id IS NULL OR p_role IS NULL OR p_capability IS NULL THEN
        PERFORM picloud._null_argument('{app_id,role,capability}',
            ARRAY[p_app_id IS NULL, p_role IS NULL, p_capability IS NULL]);
    END IF;
    DELETE FROM picloud.app_roles
    WHERE app_id = p_app_id AND role_name = p_role AND capability = p_capability;
    RETURN FOUND;
END
$$;
