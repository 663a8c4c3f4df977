-- Synchronous calls: inboxes a caller opens, and the answers handlers deliver to them.

-- Opens an inbox for synchronous calls into an app and returns its channel: LISTEN on it and
-- pass it as reply_to. The answer arrives as a notification with a JSON payload
-- {"event_id", "ok", "result", "error"}. The inbox lives until ttl passes or the session ends.
CREATE FUNCTION picloud.picloud_open_inbox(p_app_id uuid, p_ttl interval DEFAULT '60 seconds') RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_channel text := 'picloud_inbox_' || replace(gen_random_uuid()::text, '-', '');
BEGIN
    PERFORM picloud._require(p_app_id, 'enqueue');
    IF p_ttl IS NULL OR p_ttl <= interval '0' OR p_ttl > interval '1 day' THEN
        PERFORM picloud._invalid(format('ttl must be positive and at most 1 day, got %s', p_ttl));
    END IF;
    INSERT INTO picloud.inboxes (app_id, channel, owner_pid, owner_started, expires_at)
    VALUES (p_app_id, v_channel, pg_catalog.pg_backend_pid(), picloud._my_backend_start(), now() + p_ttl);
    RETURN v_channel;
END
$$;

CREATE FUNCTION picloud.picloud_close_inbox(p_app_id uuid, p_channel text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'enqueue');
    DELETE FROM picloud.inboxes WHERE app_id = p_app_id AND channel = p_channel;
    RETURN FOUND;
END
$$;

-- Delivers a synchronous event's answer to its caller's inbox, exactly once; if the inbox is
-- gone, expired or its session has ended, records an abandoned execution instead.
CREATE FUNCTION picloud._reply(r picloud.outbox, p_ok boolean, p_result jsonb, p_error text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_inbox picloud.inboxes;
    v_reason text;
    v_message text;
BEGIN
    SELECT * INTO v_inbox FROM picloud.inboxes i WHERE i.app_id = r.app_id AND i.channel = r.reply_to;
    IF NOT FOUND THEN
        v_reason := 'inbox does not exist';
    ELSIF v_inbox.expires_at <= now() THEN
        v_reason := 'inbox expired';
    -- Not pg_stat_activity: it hides other roles' sessions from the supervisor's role.
    ELSIF picloud._backend_started(v_inbox.owner_pid) IS DISTINCT FROM v_inbox.owner_started THEN
        v_reason := 'caller disconnected';
    END IF;
    IF v_reason IS NOT NULL THEN
        PERFORM picloud._record_abandoned(r, p_ok, p_result, p_error, v_reason);
        RETURN;
    END IF;
    v_message := jsonb_build_object('event_id', r.event_id, 'ok', p_ok, 'result', p_result, 'error', p_error)::text;
    -- A notification payload holds at most 8000 bytes.
    IF octet_length(v_message) > 7900 THEN
        v_message := jsonb_build_object('event_id', r.event_id, 'ok', false, 'result', NULL,
            'error', format('answer of %s bytes is too large for a notification', octet_length(v_message)))::text;
    END IF;
    PERFORM pg_catalog.pg_notify(r.reply_to, v_message);
END
$$;
