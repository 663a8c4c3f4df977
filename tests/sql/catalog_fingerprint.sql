-- Every object of the picloud extension in this database, one row each, with what defines
-- it. Two databases whose fingerprints are equal have the same picloud schema: used to check
-- that an upgraded database matches a fresh install.
SELECT kind, name, detail FROM (
    SELECT 'function' AS kind, p.oid::regprocedure::text AS name,
           pg_get_functiondef(p.oid)
           || ' acl=' || coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(p.proacl) x), '') AS detail
    FROM pg_proc p WHERE p.pronamespace = 'picloud'::regnamespace
    UNION ALL
    SELECT 'relation', c.relname,
           c.relkind::text || ' persistence=' || c.relpersistence::text
           || ' options=' || coalesce(array_to_string(c.reloptions, ','), '')
           || ' rls=' || c.relrowsecurity::text
           || ' acl=' || coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(c.relacl) x), '')
    FROM pg_class c WHERE c.relnamespace = 'picloud'::regnamespace
    UNION ALL
    SELECT 'column', c.relname || '.' || a.attname,
           a.attnum::text || ' ' || format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull::text
           || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
           || ' acl=' || coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(a.attacl) x), '')
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE c.relnamespace = 'picloud'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT 'constraint', conrelid::regclass::text || '.' || conname, pg_get_constraintdef(oid)
    FROM pg_constraint WHERE connamespace = 'picloud'::regnamespace
    UNION ALL
    SELECT 'index', i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
    WHERE c.relnamespace = 'picloud'::regnamespace
    UNION ALL
    SELECT 'view', c.relname, pg_get_viewdef(c.oid)
    FROM pg_class c WHERE c.relkind = 'v' AND c.relnamespace = 'picloud'::regnamespace
    UNION ALL
    SELECT 'policy', tablename || '.' || policyname,
           cmd || ' roles=' || array_to_string(roles, ',') || ' using=' || coalesce(qual, '')
           || ' check=' || coalesce(with_check, '')
    FROM pg_policies WHERE schemaname = 'picloud'
    UNION ALL
    SELECT 'member', pg_describe_object(classid, objid, 0), ''
    FROM pg_depend
    WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
      AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'picloud')
    UNION ALL
    SELECT 'config_dump', x::regclass::text, ''
    FROM pg_extension e, unnest(e.extconfig) x WHERE e.extname = 'picloud'
    UNION ALL
    SELECT 'schema', n.nspname,
           coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(n.nspacl) x), '')
    FROM pg_namespace n WHERE n.nspname = 'picloud'
) objects
ORDER BY kind, name, detail;
