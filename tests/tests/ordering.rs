//! Ordered delivery with real supervisors: a captured table with an ordered KV trigger, writers
//! committing inserts, updates and deletes on 50 keys from several threads, a handler that fails
//! some events once (retried) and some for good (dead-lettered), and one of two supervisors
//! SIGKILLed mid-run. The handler's log per key must be exactly the commit order of that key's
//! writes (under 'block', once every dead letter is replayed; under 'continue', minus the
//! dead-lettered events), no two events of a key may ever run at once, and the downstream copy
//! must equal the source table.
//!
//! The writes are random (proptest picks keys, operations and the events that fail); each case
//! runs against real processes, so there are few cases.

use picloud_tests::*;
use postgres::Client;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

const KEYS: i32 = 50;

/// The cases take turns: each runs two supervisors and writers, and waits on their timing.
static TURN: Mutex<()> = Mutex::new(());

/// One write: the key and whether it deletes (when the row exists) rather than upserts.
#[derive(Clone, Debug)]
struct Write {
    key: i32,
    delete: bool,
}

/// The test database: items is the captured source, copy the handler's downstream copy,
/// writes what the writers committed (per key, in commit order: `n` is taken from the key's
/// row in versions, which every write to the key locks first), seen what the handler ran.
fn schema(c: &mut Client, app: Uuid, poison_every: i32, flaky_every: i32) {
    c.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         CREATE TABLE copy (id int PRIMARY KEY, v int NOT NULL);
         CREATE TABLE versions (id int PRIMARY KEY, n int NOT NULL);
         INSERT INTO versions SELECT g, 0 FROM generate_series(1, {KEYS}) g;
         CREATE TABLE writes (id int NOT NULL, n int NOT NULL, op text NOT NULL);
         CREATE TABLE seen (seq bigserial PRIMARY KEY, id int NOT NULL, n int NOT NULL, op text NOT NULL);
         CREATE TABLE overlapping (id int NOT NULL, n int NOT NULL, op text NOT NULL);
         -- Events that fail every attempt until they are fixed (dead letters), and events that
         -- fail their first attempt only (retried).
         CREATE TABLE fixed (on_ boolean NOT NULL);
         INSERT INTO fixed VALUES (false);
         CREATE FUNCTION ordered_handler(e jsonb) RETURNS void LANGUAGE plpgsql AS $$
         DECLARE
             p jsonb := e->'payload';
             r jsonb := coalesce(nullif(p->'value'->'new', 'null'), p->'value'->'old');
             k int := (r->>'id')::int;
             n int := (r->>'v')::int;
         BEGIN
             -- An earlier event of this key still in the outbox (running, retrying or waiting,
             -- and not yet committed as done) would mean this one overtook it or runs beside it.
             IF EXISTS (SELECT 1 FROM picloud.outbox me JOIN picloud.outbox o
                            ON o.app_id = me.app_id AND o.ordering_key = me.ordering_key
                           AND o.ordering_seq < me.ordering_seq
                        WHERE me.app_id = (e->>'app_id')::uuid AND me.event_id = (e->>'event_id')::uuid) THEN
                 INSERT INTO overlapping VALUES (k, n, p->>'op');
             END IF;
             IF n % {poison_every} = 0 AND NOT (SELECT on_ FROM fixed) THEN
                 RAISE EXCEPTION 'poison event % of key %', n, k;
             END IF;
             IF n % {flaky_every} = 1 AND (e->>'attempt')::int = 1 THEN
                 RAISE EXCEPTION 'flaky event % of key %', n, k;
             END IF;
             INSERT INTO seen (id, n, op) VALUES (k, n, p->>'op');
             IF p->>'op' = 'delete' THEN
                 DELETE FROM copy WHERE copy.id = k;
             ELSE
                 INSERT INTO copy VALUES (k, n) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v;
             END IF;
         END $$;
         CREATE TRIGGER items_capture AFTER INSERT OR UPDATE OR DELETE ON items
             FOR EACH ROW EXECUTE FUNCTION picloud.capture('{app}');"
    ))
    .expect("schema");
}

/// Commits one write: takes the key's next version n (locking its versions row, which orders
/// the key's writers), then upserts the item with v = n, or sets v = n and deletes it.
fn write(c: &mut Client, w: &Write) {
    let mut tx = c.transaction().expect("begin");
    let n: i32 = tx
        .query_one(
            "UPDATE versions SET n = n + 1 WHERE id = $1 RETURNING n",
            &[&w.key],
        )
        .expect("version")
        .get(0);
    let exists = tx
        .query_opt("SELECT 1 FROM items WHERE id = $1", &[&w.key])
        .expect("exists")
        .is_some();
    if w.delete && exists {
        tx.execute("UPDATE items SET v = $2 WHERE id = $1", &[&w.key, &n])
            .expect("update before delete");
        tx.execute("DELETE FROM items WHERE id = $1", &[&w.key])
            .expect("delete");
        tx.execute(
            "INSERT INTO writes VALUES ($1, $2, 'update'), ($1, $2, 'delete')",
            &[&w.key, &n],
        )
        .expect("log");
    } else if exists {
        tx.execute("UPDATE items SET v = $2 WHERE id = $1", &[&w.key, &n])
            .expect("update");
        tx.execute(
            "INSERT INTO writes VALUES ($1, $2, 'update')",
            &[&w.key, &n],
        )
        .expect("log");
    } else {
        tx.execute("INSERT INTO items VALUES ($1, $2)", &[&w.key, &n])
            .expect("insert");
        tx.execute(
            "INSERT INTO writes VALUES ($1, $2, 'insert')",
            &[&w.key, &n],
        )
        .expect("log");
    }
    tx.commit().expect("commit");
}

/// Per key, the (n, op) list of a table, in `order`.
fn per_key(c: &mut Client, sql: &str) -> BTreeMap<i32, Vec<(i32, String)>> {
    let mut keys: BTreeMap<i32, Vec<(i32, String)>> = BTreeMap::new();
    for row in c.query(sql, &[]).expect("per key") {
        keys.entry(row.get(0))
            .or_default()
            .push((row.get(1), row.get(2)));
    }
    keys
}

/// Runs one case: the writes from 4 threads, two supervisors (the first SIGKILLed a third of
/// the way and started again), and under 'block' every dead letter fixed and replayed.
fn run_case(writes: Vec<Write>, block: bool) {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (db, mut c) = fresh_db(if block {
        "ordered_block"
    } else {
        "ordered_continue"
    });
    let app: Uuid = c
        .query_one("SELECT picloud_create_app('ordered')", &[])
        .expect("app")
        .get(0);
    // Poison every 9th version (most keys reach it), flaky every 4th.
    schema(&mut c, app, 9, 4);
    let script: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, 'ordered', 'sql', 'ordered_handler')",
            &[&app],
        )
        .expect("script")
        .get(0);
    let policy = if block { "block" } else { "continue" };
    c.execute(
        "SELECT picloud_create_kv_trigger($1, 'items', $2, p_ordered => true, p_on_dead_letter => $3)",
        &[&app, &script, &policy],
    )
    .expect("ordered trigger");
    c.batch_execute(&format!(
        "ALTER DATABASE {db} SET picloud.retry_max_attempts = 3;
         ALTER DATABASE {db} SET picloud.retry_base_delay = '20ms';
         ALTER DATABASE {db} SET picloud.retry_max_delay = '100ms';"
    ))
    .expect("retry settings");
    let args = ["--lease-ms", "1500", "--poll-interval-ms", "200"];
    let mut first = Supervisor::start(&db, &args);
    let second = Supervisor::start(&db, &args);

    let total = writes.len();
    let chunks: Vec<Vec<Write>> = (0..4)
        .map(|i| writes.iter().skip(i).step_by(4).cloned().collect())
        .collect();
    let started = Instant::now();
    let writers: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let db = db.clone();
            std::thread::spawn(move || {
                let mut w = connect(&db);
                for one in &chunk {
                    write(&mut w, one);
                }
            })
        })
        .collect();
    // A third of the way, the first supervisor dies with events in flight.
    assert!(
        eventually(
            Duration::from_secs(60),
            || count(&mut c, "SELECT count(*) FROM seen") as usize >= total / 3
        ),
        "events run before the kill; {}",
        first.log()
    );
    first.kill();
    let restarted = Supervisor::start(&db, &args);
    // The housekeeper serves another database (picloud.database): its lease rescue is run
    // here on demand, as often as it would run with a short picloud.gc_interval.
    let housekeeping = Arc::new(AtomicBool::new(true));
    let housekeeper = {
        let (db, running) = (db.clone(), Arc::clone(&housekeeping));
        std::thread::spawn(move || {
            let mut h = connect(&db);
            while running.load(Ordering::Acquire) {
                h.batch_execute("SELECT picloud_gc_pass()")
                    .expect("gc pass");
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    for writer in writers {
        writer.join().expect("writer");
    }
    println!(
        "{policy}: {total} writes committed in {:?}",
        started.elapsed()
    );

    // Everything runs or is dead-lettered; under 'block', dead letters are fixed and replayed
    // (the replay runs first, then the key goes on) until nothing is left.
    let settled = |c: &mut Client| {
        count(c, "SELECT count(*) FROM picloud.outbox") == 0
            || (count(
                c,
                "SELECT count(*) FROM picloud.outbox o WHERE NOT EXISTS (
                     SELECT 1 FROM picloud.key_blocks b WHERE b.app_id = o.app_id AND b.ordering_key = o.ordering_key)",
            ) == 0)
    };
    assert!(
        eventually(Duration::from_secs(120), || settled(&mut c)),
        "the outbox drains (but for blocked keys): {} left; logs: {} {}",
        count(&mut c, "SELECT count(*) FROM picloud.outbox"),
        second.log(),
        restarted.log()
    );
    let dead: i64 = count(&mut c, "SELECT count(*) FROM picloud.dead_letters");
    let blocked_seen = count(&mut c, "SELECT count(*) FROM picloud.blocked_keys");
    if block {
        c.batch_execute("UPDATE fixed SET on_ = true").expect("fix");
        let replayed = count(
            &mut c,
            &format!("SELECT picloud_replay_dead_letters('{app}')::int8"),
        );
        assert_eq!(replayed, dead, "every dead letter replayed");
        assert_eq!(
            count(&mut c, "SELECT count(*) FROM picloud.key_blocks"),
            0,
            "replays release their keys"
        );
        assert!(
            eventually(Duration::from_secs(120), || count(
                &mut c,
                "SELECT count(*) FROM picloud.outbox"
            ) == 0),
            "the replays and the events they held back run"
        );
    }
    housekeeping.store(false, Ordering::Release);
    housekeeper.join().expect("housekeeper");
    println!(
        "{policy}: {dead} dead letters ({blocked_seen} keys blocked at once), {} handler runs, \
         all settled {:?} after the first write",
        count(&mut c, "SELECT count(*) FROM seen"),
        started.elapsed()
    );

    let overlapping: Vec<String> = c
        .query(
            "SELECT format('key %s: %s %s', id, n, op) FROM overlapping",
            &[],
        )
        .expect("overlapping")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        overlapping.is_empty(),
        "no event runs while an earlier one of its key is pending: {overlapping:?}"
    );
    let expected = per_key(
        &mut c,
        "SELECT id, n, op FROM writes ORDER BY id, n, op = 'delete'",
    );
    let seen = per_key(&mut c, "SELECT id, n, op FROM seen ORDER BY id, seq");
    if block {
        assert_eq!(seen, expected, "each key's log is its commit order");
        assert_eq!(
            per_key(&mut c, "SELECT id, v, 'row' FROM copy ORDER BY id"),
            per_key(&mut c, "SELECT id, v, 'row' FROM items ORDER BY id"),
            "the downstream copy equals the source"
        );
    } else {
        // Under 'continue' a dead-lettered event is skipped and its key goes on.
        let dead_letters: Vec<(i32, i32, String)> = c
            .query(
                "SELECT (coalesce(nullif(payload->'value'->'new', 'null'), payload->'value'->'old')->>'id')::int,
                        (coalesce(nullif(payload->'value'->'new', 'null'), payload->'value'->'old')->>'v')::int,
                        payload->>'op'
                 FROM picloud.dead_letters",
                &[],
            )
            .expect("dead letters")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let mut wanted = expected.clone();
        for (id, n, op) in &dead_letters {
            if let Some(list) = wanted.get_mut(id) {
                list.retain(|(m, o)| !(m == n && o == op));
            }
        }
        wanted.retain(|_, list| !list.is_empty());
        assert_eq!(
            seen, wanted,
            "each key's log is its commit order minus the dead-lettered events"
        );
        assert_eq!(
            count(&mut c, "SELECT count(*) FROM picloud.key_blocks"),
            0,
            "'continue' blocks nothing"
        );
    }
}

fn writes() -> impl Strategy<Value = Vec<Write>> {
    prop::collection::vec(
        (1..=KEYS, prop::bool::weighted(0.15)).prop_map(|(key, delete)| Write { key, delete }),
        600..800,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2, max_shrink_iters: 0, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn under_block_each_key_runs_in_commit_order_and_the_copy_matches(w in writes()) {
        run_case(w, true);
    }

    #[test]
    fn under_continue_each_key_runs_in_commit_order_past_its_dead_letters(w in writes()) {
        run_case(w, false);
    }
}

/// The API refuses what makes no sense, with 22023 and nothing written.
#[test]
fn ordering_arguments_are_checked() {
    let (_db, mut c) = fresh_db("ordering_args");
    let (app, script) = ledger_app(&mut c);
    let cases = [
        format!("SELECT picloud_enqueue('{app}', 'queue', 'x', '{{}}', '{script}', p_ordering_key => '')"),
        format!("SELECT picloud_enqueue('{app}', 'queue', 'x', '{{}}', '{script}', p_ordering_key => repeat('k', 4097))"),
        format!("SELECT picloud_enqueue('{app}', 'queue', 'x', '{{}}', '{script}', p_ordering_key => 'k', p_on_dead_letter => 'skip')"),
        format!("SELECT picloud_enqueue('{app}', 'queue', 'x', '{{}}', '{script}', p_on_dead_letter => 'block')"),
        format!("SELECT picloud_enqueue_bulk('{app}', 'queue', 'x', ARRAY['{{}}', '{{}}']::jsonb[], '{script}', p_ordering_keys => ARRAY['a'])"),
        format!("SELECT picloud_enqueue_bulk('{app}', 'queue', 'x', ARRAY['{{}}']::jsonb[], '{script}', p_on_dead_letter => 'block')"),
        format!("SELECT picloud_create_kv_trigger('{app}', 'items', '{script}', p_ordered => true, p_on_dead_letter => 'later')"),
    ];
    for sql in &cases {
        assert_eq!(sqlstate(c.query(sql.as_str(), &[])), "22023", "{sql}");
    }
    assert_eq!(
        sqlstate(c.query(
            &format!(
                "SELECT picloud_create_kv_trigger('{app}', 'items', '{script}', p_ordered => NULL)"
            ),
            &[]
        )),
        "22004"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.kv_trigger_details"),
        0
    );
}

/// Events of one key enqueued in one transaction, by the bulk form and one by one, take
/// consecutive places in order; a key given by another transaction waits for the first to
/// commit (the key's lock), so places follow commit order.
#[test]
fn a_key_is_numbered_in_commit_order() {
    let (db, mut c) = fresh_db("ordering_places");
    let (app, script) = ledger_app(&mut c);
    c.query(
        "SELECT picloud_enqueue_bulk($1, 'queue', 'x', ARRAY['{\"i\":1}', '{\"i\":2}', '{\"i\":3}']::jsonb[], $2,
                                     p_ordering_keys => ARRAY['k', NULL, 'k'], p_on_dead_letter => 'block')",
        &[&app, &script],
    )
    .expect("bulk");
    let rows: Vec<(i64, Option<String>, Option<bool>)> = c
        .query(
            "SELECT (payload->>'i')::int8, ordering_key, ordering_blocks FROM picloud.outbox
             ORDER BY ordering_seq NULLS LAST, payload->>'i'",
            &[],
        )
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        vec![
            (1, Some("k".to_string()), Some(true)),
            (3, Some("k".to_string()), Some(true)),
            (2, None, None)
        ]
    );

    // A second transaction's enqueue of the same key waits until the first commits.
    let mut first = connect(&db);
    let mut tx = first.transaction().expect("begin");
    tx.execute(
        "SELECT picloud_enqueue($1, 'queue', 'x', '{\"i\":4}', $2, p_ordering_key => 'q')",
        &[&app, &script],
    )
    .expect("first");
    let (db2, app2, script2) = (db.clone(), app, script);
    let waiter = std::thread::spawn(move || {
        let mut second = connect(&db2);
        let started = Instant::now();
        second
            .execute(
                "SELECT picloud_enqueue($1, 'queue', 'x', '{\"i\":5}', $2, p_ordering_key => 'q')",
                &[&app2, &script2],
            )
            .expect("second");
        started.elapsed()
    });
    std::thread::sleep(Duration::from_millis(500));
    tx.commit().expect("commit");
    let waited = waiter.join().expect("waiter");
    assert!(
        waited >= Duration::from_millis(400),
        "the second enqueue of the key waited for the first commit ({waited:?})"
    );
    let order: Vec<i64> = c
        .query(
            "SELECT (payload->>'i')::int8 FROM picloud.outbox WHERE ordering_key = 'q' ORDER BY ordering_seq",
            &[],
        )
        .expect("order")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(order, vec![4, 5]);
}
