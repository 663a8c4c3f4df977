-- The http lanes: first attempts of http-handler events delivered without a claim.
--
-- A claim writes every row twice (the claim's new row version, then the completion's delete),
-- and for an http event that is most of what the database does for it. An http lane instead
-- locks a batch of ready events in a transaction, as the sql lanes do (picloud._lock_lane:
-- the same events - first attempts of asynchronous events whose handler has no concurrency
-- limit, an ordered key's first event only - and the same turns between apps), delivers them
-- while the transaction stays open, deletes those delivered (picloud_complete_lane) and
-- commits. Nothing is written for an event before its delivery, one delete after it.
--
-- Anything unusual leaves the lane in the same transaction, before it commits: an event whose
-- delivery failed, or that is still running when the lane stops waiting (a short hold, so the
-- transaction never stays open for long), is claimed with picloud_claim_events - its attempt
-- counted, under a lease - and the supervisor reports it the ordinary way (picloud_fail, a
-- retry or a dead letter; or picloud_complete once it finishes). If the lane's transaction is
-- lost (its connection, the supervisor), its events are unlocked untouched and delivered again:
-- http deliveries are at least once, as with claims.

-- Locks up to p_batch http events for an http lane (see picloud._lock_lane) and returns each as a
-- claim answers it, as its first attempt.
CREATE FUNCTION picloud.picloud_lock_http_lane(p_batch integer)
RETURNS SETOF picloud.claimed_event
LANGUAGE plpgsql
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    -- Answered as claims answer the attempt they start (one ahead of the row's count): this is
    -- the event's first. picloud._outbox_at fetches the locked rows by address.
    RETURN QUERY
    SELECT * FROM picloud._claim_answers(ARRAY(
        SELECT a.event
        FROM picloud._outbox_at(ARRAY(SELECT l.row_tid FROM picloud._lock_lane(p_batch, 'http') l)) a
        ORDER BY (a.event).priority, (a.event).due_at, (a.event).event_id), 1);
END
$$;

-- Deletes the given events, delivered by the lane that locked them in this transaction (still
-- unclaimed first attempts), counts them as completed and returns how many.
CREATE FUNCTION picloud.picloud_complete_lane(p_app_ids uuid[], p_event_ids uuid[])
RETURNS integer
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_done picloud.outbox[];
BEGIN
    PERFORM picloud._check_event_keys(p_app_ids, p_event_ids);
    IF cardinality(p_event_ids) > 10000 THEN
        PERFORM picloud._invalid(format('at most 10000 events at once, got %s', cardinality(p_event_ids)));
    END IF;
    WITH done AS (
        DELETE FROM picloud.outbox o
        USING unnest(p_app_ids, p_event_ids) AS k(app_id, event_id)
        WHERE o.app_id = k.app_id AND o.event_id = k.event_id
          AND picloud._unclaimed(o.claimed_by) AND o.attempt_count = 0 AND o.first_attempt_at IS NULL
          AND o.reply_to IS NULL
        RETURNING o AS row)
    SELECT coalesce(array_agg(done.row), '{}') INTO v_done FROM done;
    PERFORM picloud._count_completed(v_done);
    RETURN cardinality(v_done);
END
$$;
