-- Signing secrets for webhook deliveries (Standard Webhooks).
--
-- An app's admin gives an http handler a secret; the supervisor then signs every delivery of
-- that handler with each of its valid secrets (headers webhook-id, webhook-timestamp,
-- webhook-signature). Rotation keeps the previous secret valid for a while, so receivers can
-- move to the new one without refusing deliveries: both signatures are sent meanwhile.
--
-- Secrets are write-only for tenants: admins may add and expire them (column privileges in
-- sql/090_privileges.sql) but no tenant role can read a secret back; only the supervisor's
-- picloud_signing_secrets returns them.

CREATE TABLE picloud.handler_secrets (
    app_id      uuid        NOT NULL,
    script_id   uuid        NOT NULL,
    secret_id   uuid        NOT NULL DEFAULT gen_random_uuid(),
    -- 'whsec_' followed by the base64 of the key (16 to 128 bytes), as Standard Webhooks
    -- libraries expect it.
    secret      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- NULL: valid until rotated or cleared.
    expires_at  timestamptz,
    CONSTRAINT handler_secrets_pkey PRIMARY KEY (app_id, script_id, secret_id),
    CONSTRAINT handler_secrets_format CHECK (secret ~ '^whsec_[A-Za-z0-9+/]+={0,2}$'
                                             AND length(secret) BETWEEN 28 AND 180),
    CONSTRAINT handler_secrets_script_fkey FOREIGN KEY (app_id, script_id)
        REFERENCES picloud.scripts (app_id, script_id) ON DELETE CASCADE
);

-- Gives an http handler a new signing secret and returns it. NULL generates one (32 random
-- bytes). Secrets it had stay valid for p_previous_valid_for more (0 ends them now), so
-- deliveries carry both signatures while receivers switch.
CREATE FUNCTION picloud.picloud_set_handler_secret(
    p_app_id uuid,
    p_script_id uuid,
    p_secret text DEFAULT NULL,
    p_previous_valid_for interval DEFAULT interval '1 day')
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_secret text := p_secret;
    v_key_bytes integer;
    v_kind text;
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_script_id IS NULL OR p_previous_valid_for IS NULL THEN
        PERFORM picloud._null_argument('{script_id,previous_valid_for}',
            ARRAY[p_script_id IS NULL, p_previous_valid_for IS NULL]);
    END IF;
    IF p_previous_valid_for < interval '0' OR p_previous_valid_for > interval '30 days' THEN
        PERFORM picloud._invalid(format('previous_valid_for must be between 0 and 30 days, got %s',
            p_previous_valid_for));
    END IF;
    PERFORM picloud._require_script(p_app_id, p_script_id);
    SELECT s.kind INTO v_kind FROM picloud.scripts s
    WHERE s.app_id = p_app_id AND s.script_id = p_script_id;
    IF v_kind <> 'http' THEN
        PERFORM picloud._invalid(format('handler %s is a %s handler; only http deliveries are signed',
            p_script_id, v_kind));
    END IF;
    IF v_secret IS NULL THEN
        -- Two version-4 UUIDs: 244 random bits from the server's strong random source.
        v_secret := 'whsec_' || encode(decode(replace(gen_random_uuid()::text, '-', '')
                                              || replace(gen_random_uuid()::text, '-', ''), 'hex'), 'base64');
    ELSE
        IF length(v_secret) > 180 OR v_secret !~ '^whsec_[A-Za-z0-9+/]+={0,2}$' THEN
            PERFORM picloud._invalid('a signing secret is ''whsec_'' followed by the base64 of 16 to 128 bytes',
                'Pass NULL to have one generated.');
        END IF;
        BEGIN
            v_key_bytes := octet_length(decode(substr(v_secret, 7), 'base64'));
        EXCEPTION WHEN invalid_parameter_value THEN
            v_key_bytes := 0;
        END;
        IF v_key_bytes NOT BETWEEN 16 AND 128 THEN
            PERFORM picloud._invalid('a signing secret is ''whsec_'' followed by the base64 of 16 to 128 bytes',
                'Pass NULL to have one generated.');
        END IF;
    END IF;
    UPDATE picloud.handler_secrets h
    SET expires_at = now() + p_previous_valid_for
    WHERE h.app_id = p_app_id AND h.script_id = p_script_id
      AND (h.expires_at IS NULL OR h.expires_at > now() + p_previous_valid_for);
    INSERT INTO picloud.handler_secrets (app_id, script_id, secret) VALUES (p_app_id, p_script_id, v_secret);
    RETURN v_secret;
END
$$;

-- Ends every secret of a handler now: its deliveries go out unsigned. Returns how many ended.
CREATE FUNCTION picloud.picloud_clear_handler_secrets(p_app_id uuid, p_script_id uuid) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_ended integer;
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_script_id IS NULL THEN
        PERFORM picloud._null_argument('{script_id}', '{t}');
    END IF;
    PERFORM picloud._require_script(p_app_id, p_script_id);
    UPDATE picloud.handler_secrets h SET expires_at = now()
    WHERE h.app_id = p_app_id AND h.script_id = p_script_id
      AND (h.expires_at IS NULL OR h.expires_at > now());
    GET DIAGNOSTICS v_ended = ROW_COUNT;
    RETURN v_ended;
END
$$;

-- The valid secrets of the given handlers, newest first, at most three each (supervisor
-- only). Handlers without a valid secret have no row.
CREATE FUNCTION picloud.picloud_signing_secrets(p_app_ids uuid[], p_script_ids uuid[])
RETURNS TABLE (app_id uuid, script_id uuid, secrets text[])
LANGUAGE sql STABLE AS $$
    SELECT k.app_id, k.script_id, (array_agg(h.secret ORDER BY h.created_at DESC, h.secret_id))[1:3]
    FROM (SELECT DISTINCT u.app_id, u.script_id
          FROM unnest(p_app_ids, p_script_ids) AS u(app_id, script_id)) AS k
    JOIN picloud.handler_secrets h
      ON h.app_id = k.app_id AND h.script_id = k.script_id
     AND (h.expires_at IS NULL OR h.expires_at > now())
    GROUP BY k.app_id, k.script_id
$$;
