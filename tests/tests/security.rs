//! Security: which role may call which function on which app, what row-level security lets a
//! role see and change in picloud's tables, and that a SQL handler runs with exactly its
//! principal's rights.
//!
//! The cast: tenant_a administers app A, tenant_b administers app B, `admin` is a member of
//! picloud_admin, `producer` may only enqueue into app A, and `nobody` is a LOGIN role with no
//! picloud rights at all. Roles are cluster-wide, so every test creates its own, named uniquely
//! per run, and drops them (with what they own in the test database) when it ends.

use picloud_tests::*;
use postgres::{Client, NoTls};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use uuid::Uuid;

// Harness ------------------------------------------------------------------------------------

static NAMES: AtomicU32 = AtomicU32::new(0);

fn unique(tag: &str) -> String {
    format!(
        "sec_{tag}_{}_{}",
        std::process::id(),
        NAMES.fetch_add(1, Ordering::SeqCst)
    )
}

/// `fresh_db`, retried once: the cluster may be restarting under us.
fn database(tag: &str) -> (String, Client) {
    match std::panic::catch_unwind(|| fresh_db(tag)) {
        Ok(db) => db,
        Err(_) => {
            std::thread::sleep(Duration::from_secs(3));
            fresh_db(tag)
        }
    }
}

/// `connect_as`, retried once.
fn login(db: &str, user: &str) -> Client {
    match Client::connect(&url(db, user), NoTls) {
        Ok(mut c) => {
            c.batch_execute("SET search_path = public, picloud")
                .expect("set search_path");
            c
        }
        Err(e) => {
            eprintln!("connect to {db} as {user}: {e}; retrying once");
            std::thread::sleep(Duration::from_secs(3));
            connect_as(db, user)
        }
    }
}

/// Roles created for one test. Dropped, with everything they own in the test database, when
/// this guard goes out of scope (also when the test panics).
struct Roles {
    db: String,
    names: Vec<String>,
}

impl Roles {
    fn create(&mut self, su: &mut Client, tag: &str) -> String {
        let name = unique(tag);
        su.batch_execute(&format!("CREATE ROLE {name} LOGIN"))
            .expect("create role");
        self.names.push(name.clone());
        name
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        // Best effort: leftover roles only cost names.
        if let Ok(mut c) = Client::connect(&url(&self.db, "postgres"), NoTls) {
            for name in &self.names {
                c.batch_execute(&format!("DROP OWNED BY {name} CASCADE"))
                    .ok();
            }
            for name in &self.names {
                c.batch_execute(&format!("DROP ROLE IF EXISTS {name}")).ok();
            }
        }
    }
}

fn code_and_message(e: &postgres::Error) -> (String, String) {
    let code = e
        .code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| "none".to_string());
    let message = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string());
    (code, message)
}

fn text(c: &mut Client, sql: &str) -> Option<String> {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

fn flag(c: &mut Client, sql: &str) -> bool {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

fn id(c: &mut Client, sql: &str) -> Uuid {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// (table, row count, md5 of all rows) for every picloud table, as the superuser sees them;
/// `filter` narrows every table (e.g. to one app).
fn fingerprint(su: &mut Client, filter: &str) -> Vec<(String, i64, String)> {
    let sql = TABLES
        .iter()
        .map(|t| {
            format!(
                "SELECT '{t}'::text, count(*), md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) \
                 FROM picloud.{t} x WHERE {filter}"
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    su.query(&sql, &[])
        .expect("fingerprint")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn changed_tables(
    before: &[(String, i64, String)],
    after: &[(String, i64, String)],
) -> Vec<String> {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| b != a)
        .map(|(b, a)| format!("{} ({} -> {} rows)", b.0, b.1, a.1))
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    TenantA,
    TenantB,
    Admin,
    Producer,
    Nobody,
}

/// Two apps and the five roles described at the top, each with a connection of its own.
struct Tenancy {
    db: String,
    su: Client,
    a: Client,
    b: Client,
    admin: Client,
    producer: Client,
    nobody: Client,
    tenant_a: String,
    tenant_b: String,
    admin_role: String,
    producer_role: String,
    nobody_role: String,
    /// A bystander role the matrix grants and revokes app roles to.
    extra_role: String,
    app_a: Uuid,
    app_b: Uuid,
    n: u32,
    // Last, so it is dropped after every connection above.
    roles: Roles,
}

impl Tenancy {
    fn new(tag: &str) -> Tenancy {
        let (db, mut su) = database(tag);
        let mut roles = Roles {
            db: db.clone(),
            names: Vec::new(),
        };
        let tenant_a = roles.create(&mut su, "ta");
        let tenant_b = roles.create(&mut su, "tb");
        let admin_role = roles.create(&mut su, "adm");
        let producer_role = roles.create(&mut su, "prod");
        let nobody_role = roles.create(&mut su, "nobody");
        let extra_role = roles.create(&mut su, "extra");
        su.batch_execute(&format!(
            "GRANT picloud_admin TO {admin_role};
             CREATE SCHEMA a_schema AUTHORIZATION {tenant_a};
             CREATE SCHEMA b_schema AUTHORIZATION {tenant_b};
             CREATE TABLE public.b_secret (secret text);
             INSERT INTO public.b_secret VALUES ('only tenant_b may read this');
             ALTER TABLE public.b_secret OWNER TO {tenant_b};
             REVOKE ALL ON public.b_secret FROM PUBLIC;"
        ))
        .expect("tenancy schema");
        let app_a = id(&mut su, "SELECT picloud_create_app('A')");
        let app_b = id(&mut su, "SELECT picloud_create_app('B')");
        su.batch_execute(&format!(
            "SELECT picloud_grant_app_role('{app_a}', '{tenant_a}', 'admin');
             SELECT picloud_grant_app_role('{app_b}', '{tenant_b}', 'admin');
             SELECT picloud_grant_app_role('{app_a}', '{producer_role}', 'producer');"
        ))
        .expect("grant app roles");
        let a = login(&db, &tenant_a);
        let b = login(&db, &tenant_b);
        let admin = login(&db, &admin_role);
        let producer = login(&db, &producer_role);
        let nobody = login(&db, &nobody_role);
        Tenancy {
            db,
            su,
            a,
            b,
            admin,
            producer,
            nobody,
            tenant_a,
            tenant_b,
            admin_role,
            producer_role,
            nobody_role,
            extra_role,
            app_a,
            app_b,
            n: 0,
            roles,
        }
    }

    fn client(&mut self, who: Who) -> &mut Client {
        match who {
            Who::TenantA => &mut self.a,
            Who::TenantB => &mut self.b,
            Who::Admin => &mut self.admin,
            Who::Producer => &mut self.producer,
            Who::Nobody => &mut self.nobody,
        }
    }

    fn role(&self, who: Who) -> String {
        match who {
            Who::TenantA => self.tenant_a.clone(),
            Who::TenantB => self.tenant_b.clone(),
            Who::Admin => self.admin_role.clone(),
            Who::Producer => self.producer_role.clone(),
            Who::Nobody => self.nobody_role.clone(),
        }
    }

    /// Does `who` hold the enqueue capability in `app` (what RLS shows handlers and triggers by)?
    fn may_enqueue(&self, who: Who, app: Uuid) -> bool {
        match who {
            Who::Admin => true,
            Who::TenantA | Who::Producer => app == self.app_a,
            Who::TenantB => app == self.app_b,
            Who::Nobody => false,
        }
    }

    fn next(&mut self) -> u32 {
        self.n += 1;
        self.n
    }

    // Fixtures, made by the superuser (so registered by "postgres").

    fn script(&mut self, app: Uuid) -> Uuid {
        let n = self.next();
        id(
            &mut self.su,
            &format!("SELECT picloud_create_script('{app}', 'fx{n}', 'command', 'noop')"),
        )
    }

    /// A KV trigger on a collection of its own; returns (trigger, collection).
    fn trigger(&mut self, app: Uuid, enabled: bool) -> (Uuid, String) {
        let script = self.script(app);
        let collection = format!("fx{}", self.next());
        let trigger = id(
            &mut self.su,
            &format!("SELECT picloud_create_kv_trigger('{app}', '{collection}', '{script}', p_enabled => {enabled})"),
        );
        (trigger, collection)
    }

    /// An hourly cron trigger.
    fn cron_trigger(&mut self, app: Uuid) -> Uuid {
        let script = self.script(app);
        id(
            &mut self.su,
            &format!("SELECT picloud_create_cron_trigger('{app}', '@hourly', '{script}')"),
        )
    }

    fn event(&mut self, app: Uuid) -> Uuid {
        let script = self.script(app);
        id(
            &mut self.su,
            &format!("SELECT picloud_enqueue('{app}', 'queue', 'fx', '{{}}', '{script}')"),
        )
    }

    /// An event the worker 'intruder' holds the lease on.
    fn claimed_event(&mut self, app: Uuid) -> Uuid {
        let event = self.event(app);
        self.su
            .execute(
                "UPDATE picloud.outbox SET claimed_by = 'intruder', lease_expires_at = now() + interval '1 hour',
                        attempt_count = 1 WHERE event_id = $1",
                &[&event],
            )
            .expect("claim fixture");
        event
    }

    /// An unresolved dead letter with a handler of its own; returns (dead letter, handler).
    fn dead_letter(&mut self, app: Uuid) -> (Uuid, Uuid) {
        let script = self.script(app);
        let dl = id(
            &mut self.su,
            &format!(
                "INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, script_id, payload, attempt_count, last_error)
                 VALUES ('{app}', gen_random_uuid(), 'queue', 'fx', '{script}', '{{}}', 5, 'fixture') RETURNING dead_letter_id"
            ),
        );
        (dl, script)
    }

    fn abandoned(&mut self, app: Uuid) -> Uuid {
        id(
            &mut self.su,
            &format!(
                "INSERT INTO picloud.abandoned_executions (app_id, event_id, reply_to, succeeded, reason)
                 VALUES ('{app}', gen_random_uuid(), 'gone', true, 'fixture') RETURNING abandoned_id"
            ),
        )
    }
}

// The matrix ---------------------------------------------------------------------------------

/// One call of the matrix: `sql` returns one row with one text column; on success that value
/// must equal `value` (when given) and the superuser's `check` must be true afterwards.
/// `cleanup` (superuser) runs after the case whatever happened.
#[derive(Default)]
struct Call {
    sql: String,
    value: Option<String>,
    check: Option<String>,
    cleanup: Option<String>,
}

fn call(sql: impl Into<String>) -> Call {
    Call {
        sql: sql.into(),
        ..Call::default()
    }
}

impl Call {
    fn value(mut self, v: impl Into<String>) -> Call {
        self.value = Some(v.into());
        self
    }
    fn check(mut self, sql: impl Into<String>) -> Call {
        self.check = Some(sql.into());
        self
    }
    fn cleanup(mut self, sql: impl Into<String>) -> Call {
        self.cleanup = Some(sql.into());
        self
    }
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    Ok,
    /// 42501 from the function's own check, naming the role, the app and this capability.
    Cap(&'static str),
    /// 42501: the function is for picloud_admin members only.
    Owner,
    /// 42501: no USAGE on schema picloud.
    NoSchema,
    /// 42501: no EXECUTE on the function (supervisor only).
    NoExecute,
    /// Any other SQLSTATE.
    Code(&'static str),
}

#[derive(Clone, Copy)]
enum Kind {
    /// App-scoped, needs the given capability (admins only).
    Manage(&'static str),
    /// App-scoped, needs AppEnqueue (admins and producers).
    Enqueue,
    /// picloud_admin only.
    Owner,
    /// Callable by every picloud user; row-level security decides what it returns.
    Visible,
    /// Like Visible, but app-scoped: also asked about the other tenant's app.
    VisibleInApp,
    /// Supervisor only: not even picloud_admin may call it.
    Supervisor,
    /// A housekeeping step: the supervisor and picloud_admin (for picloud_gc_pass) only.
    Housekeeping,
    /// picloud._unbecome: callable, but useless without the token.
    Unbecome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum App {
    A,
    B,
}

fn cases(kind: Kind) -> Vec<(Who, App, Expect)> {
    use Who::*;
    match kind {
        Kind::Manage(cap) => vec![
            (TenantA, App::A, Expect::Ok),
            (TenantA, App::B, Expect::Cap(cap)),
            (TenantB, App::A, Expect::Cap(cap)),
            (TenantB, App::B, Expect::Ok),
            (Admin, App::A, Expect::Ok),
            (Producer, App::A, Expect::Cap(cap)),
            (Nobody, App::A, Expect::NoSchema),
        ],
        Kind::Enqueue => vec![
            (TenantA, App::A, Expect::Ok),
            (TenantA, App::B, Expect::Cap("AppEnqueue")),
            (TenantB, App::A, Expect::Cap("AppEnqueue")),
            (TenantB, App::B, Expect::Ok),
            (Admin, App::A, Expect::Ok),
            (Producer, App::A, Expect::Ok),
            (Producer, App::B, Expect::Cap("AppEnqueue")),
            (Nobody, App::A, Expect::NoSchema),
        ],
        Kind::Owner => vec![
            (TenantA, App::A, Expect::Owner),
            (TenantB, App::A, Expect::Owner),
            (Producer, App::A, Expect::Owner),
            (Admin, App::A, Expect::Ok),
            (Nobody, App::A, Expect::NoSchema),
        ],
        Kind::Visible => vec![
            (TenantA, App::A, Expect::Ok),
            (TenantB, App::A, Expect::Ok),
            (Producer, App::A, Expect::Ok),
            (Admin, App::A, Expect::Ok),
            (Nobody, App::A, Expect::NoSchema),
        ],
        Kind::VisibleInApp => vec![
            (TenantA, App::A, Expect::Ok),
            (TenantA, App::B, Expect::Ok),
            (TenantB, App::A, Expect::Ok),
            (Producer, App::A, Expect::Ok),
            (Admin, App::B, Expect::Ok),
            (Nobody, App::A, Expect::NoSchema),
        ],
        Kind::Supervisor => vec![
            (TenantA, App::A, Expect::NoExecute),
            (TenantB, App::A, Expect::NoExecute),
            (Producer, App::A, Expect::NoExecute),
            (Admin, App::A, Expect::NoExecute),
            (Nobody, App::A, Expect::NoSchema),
        ],
        Kind::Housekeeping => vec![
            (TenantA, App::A, Expect::NoExecute),
            (TenantB, App::A, Expect::NoExecute),
            (Producer, App::A, Expect::NoExecute),
            (Admin, App::A, Expect::Ok),
            (Nobody, App::A, Expect::NoSchema),
        ],
        Kind::Unbecome => vec![
            (TenantA, App::A, Expect::Code("22023")),
            (Producer, App::A, Expect::Code("22023")),
            (Admin, App::A, Expect::Code("22023")),
            (Nobody, App::A, Expect::NoSchema),
        ],
    }
}

type Build = fn(&mut Tenancy, Who, Uuid) -> Call;

struct Spec {
    func: &'static str,
    kind: Kind,
    build: Build,
}

const TRIG: Kind = Kind::Manage("AppManageTriggers");
const DEAD: Kind = Kind::Manage("AppDeadLetterManage");

fn specs() -> Vec<Spec> {
    vec![
        // Apps and app roles.
        Spec {
            func: "picloud_create_app",
            kind: Kind::Owner,
            build: |t, _, _| {
                let name = format!("new{}", t.next());
                call(format!("SELECT picloud.picloud_create_app('{name}')::text"))
                    .check(format!(
                        "SELECT EXISTS (SELECT 1 FROM picloud.apps WHERE name = '{name}')"
                    ))
                    .cleanup(format!("DELETE FROM picloud.apps WHERE name = '{name}'"))
            },
        },
        Spec {
            func: "picloud_list_apps",
            kind: Kind::Visible,
            build: |_, who, _| {
                let expected = match who {
                    Who::TenantA | Who::Producer => "A",
                    Who::TenantB => "B",
                    _ => "A,B",
                };
                call("SELECT string_agg(name, ',' ORDER BY name) FROM picloud.picloud_list_apps()")
                    .value(expected)
            },
        },
        Spec {
            func: "picloud_drop_app",
            kind: Kind::Owner,
            build: |t, _, _| {
                // tenant_a administers the doomed app: administering an app is not owning it.
                let name = format!("drop{}", t.next());
                let app = id(&mut t.su, &format!("SELECT picloud_create_app('{name}')"));
                let (tenant_a, producer) = (t.tenant_a.clone(), t.producer_role.clone());
                t.su.batch_execute(&format!(
                    "SELECT picloud_grant_app_role('{app}', '{tenant_a}', 'admin');
                     SELECT picloud_grant_app_role('{app}', '{producer}', 'admin');"
                ))
                .unwrap();
                call(format!("SELECT picloud.picloud_drop_app('{app}')::text"))
                    .check(format!(
                        "SELECT NOT EXISTS (SELECT 1 FROM picloud.apps WHERE app_id = '{app}')"
                    ))
                    .cleanup(format!("DELETE FROM picloud.apps WHERE app_id = '{app}'"))
            },
        },
        Spec {
            func: "picloud_grant_app_role",
            kind: Kind::Owner,
            build: |t, _, app| {
                let extra = t.extra_role.clone();
                call(format!("SELECT picloud.picloud_grant_app_role('{app}', '{extra}', 'admin')::text"))
                    .check(format!(
                        "SELECT EXISTS (SELECT 1 FROM picloud.app_roles WHERE app_id = '{app}' AND role_name = '{extra}' AND capability = 'admin')"
                    ))
                    .cleanup(format!("DELETE FROM picloud.app_roles WHERE role_name = '{extra}'"))
            },
        },
        Spec {
            // Granting oneself admin rights in the other tenant's app.
            func: "picloud_grant_app_role(self, other app)",
            kind: Kind::Owner,
            build: |t, who, _| {
                let target = if who == Who::TenantB {
                    t.app_a
                } else {
                    t.app_b
                };
                let me = t.role(who);
                let c = call(format!("SELECT picloud.picloud_grant_app_role('{target}', current_user, 'admin')::text")).check(
                    format!(
                        "SELECT EXISTS (SELECT 1 FROM picloud.app_roles WHERE app_id = '{target}' AND role_name = '{me}' AND capability = 'admin')"
                    ),
                );
                c.cleanup(format!("DELETE FROM picloud.app_roles WHERE app_id = '{target}' AND role_name = '{me}'"))
            },
        },
        Spec {
            func: "picloud_revoke_app_role",
            kind: Kind::Owner,
            build: |t, _, app| {
                let extra = t.extra_role.clone();
                t.su.batch_execute(&format!(
                    "SELECT picloud_grant_app_role('{app}', '{extra}', 'producer')"
                ))
                .unwrap();
                call(format!("SELECT picloud.picloud_revoke_app_role('{app}', '{extra}', 'producer')::text"))
                    .value("true")
                    .check(format!("SELECT NOT EXISTS (SELECT 1 FROM picloud.app_roles WHERE role_name = '{extra}')"))
                    .cleanup(format!("DELETE FROM picloud.app_roles WHERE role_name = '{extra}'"))
            },
        },
        Spec {
            // Revoking the other tenant's admin rights.
            func: "picloud_revoke_app_role(other tenant)",
            kind: Kind::Owner,
            build: |t, who, _| {
                let (app, victim) = if who == Who::TenantB {
                    (t.app_a, t.tenant_a.clone())
                } else {
                    (t.app_b, t.tenant_b.clone())
                };
                call(format!("SELECT picloud.picloud_revoke_app_role('{app}', '{victim}', 'admin')::text"))
                    .value("true")
                    .check(format!("SELECT NOT EXISTS (SELECT 1 FROM picloud.app_roles WHERE app_id = '{app}' AND role_name = '{victim}')"))
                    .cleanup(format!("SELECT picloud_grant_app_role('{app}', '{victim}', 'admin')"))
            },
        },
        Spec {
            func: "picloud_has_capability(manage_triggers)",
            kind: Kind::Visible,
            build: |t, who, app| {
                let expected = matches!(who, Who::Admin) || (who == Who::TenantA && app == t.app_a);
                call(format!(
                    "SELECT picloud.picloud_has_capability('{app}', 'manage_triggers')::text"
                ))
                .value(expected.to_string())
            },
        },
        Spec {
            func: "picloud_has_capability(enqueue)",
            kind: Kind::Visible,
            build: |t, who, app| {
                let expected = t.may_enqueue(who, app);
                call(format!(
                    "SELECT picloud.picloud_has_capability('{app}', 'enqueue')::text"
                ))
                .value(expected.to_string())
            },
        },
        // Handlers.
        Spec {
            func: "picloud_create_script",
            kind: TRIG,
            build: |t, who, app| {
                let name = format!("mx{}", t.next());
                let me = t.role(who);
                call(format!("SELECT picloud.picloud_create_script('{app}', '{name}', 'http', 'https://example.com/hook')::text"))
                    .check(format!(
                        "SELECT EXISTS (SELECT 1 FROM picloud.scripts WHERE app_id = '{app}' AND name = '{name}' AND registered_by_principal = '{me}')"
                    ))
            },
        },
        Spec {
            func: "picloud_list_scripts",
            kind: TRIG,
            build: |t, _, app| {
                let s = t.script(app);
                call(format!("SELECT bool_or(script_id = '{s}')::text FROM picloud.picloud_list_scripts('{app}')")).value("true")
            },
        },
        Spec {
            func: "picloud_drop_script",
            kind: TRIG,
            build: |t, _, app| {
                let s = t.script(app);
                call(format!(
                    "SELECT picloud.picloud_drop_script('{app}', '{s}')::text"
                ))
                .check(format!(
                    "SELECT NOT EXISTS (SELECT 1 FROM picloud.scripts WHERE script_id = '{s}')"
                ))
            },
        },
        // Triggers.
        Spec {
            func: "picloud_create_kv_trigger",
            kind: TRIG,
            build: |t, who, app| {
                let s = t.script(app);
                let me = t.role(who);
                call(format!("SELECT picloud.picloud_create_kv_trigger('{app}', 'orders', '{s}')::text")).check(format!(
                    "SELECT EXISTS (SELECT 1 FROM picloud.triggers WHERE app_id = '{app}' AND script_id = '{s}' AND kind = 'kv' AND registered_by_principal = '{me}')"
                ))
            },
        },
        Spec {
            func: "picloud_create_dead_letter_trigger",
            kind: TRIG,
            build: |t, who, app| {
                let s = t.script(app);
                let me = t.role(who);
                call(format!("SELECT picloud.picloud_create_dead_letter_trigger('{app}', '{s}', 'cron')::text")).check(format!(
                    "SELECT EXISTS (SELECT 1 FROM picloud.triggers WHERE app_id = '{app}' AND script_id = '{s}' AND kind = 'dead_letter' AND registered_by_principal = '{me}')"
                ))
            },
        },
        Spec {
            func: "picloud_get_trigger",
            kind: TRIG,
            build: |t, _, app| {
                let (tr, _) = t.trigger(app, true);
                call(format!(
                    "SELECT (picloud.picloud_get_trigger('{app}', '{tr}')).trigger_id::text"
                ))
                .value(tr.to_string())
            },
        },
        Spec {
            func: "picloud_list_triggers",
            kind: TRIG,
            build: |t, _, app| {
                let (tr, _) = t.trigger(app, true);
                call(format!("SELECT bool_or(trigger_id = '{tr}')::text FROM picloud.picloud_list_triggers('{app}')")).value("true")
            },
        },
        Spec {
            func: "picloud_set_trigger_enabled",
            kind: TRIG,
            build: |t, _, app| {
                let (tr, _) = t.trigger(app, true);
                call(format!(
                    "SELECT picloud.picloud_set_trigger_enabled('{app}', '{tr}', false)::text"
                ))
                .check(format!(
                    "SELECT NOT enabled FROM picloud.triggers WHERE trigger_id = '{tr}'"
                ))
            },
        },
        Spec {
            func: "picloud_enable_trigger",
            kind: TRIG,
            build: |t, _, app| {
                let (tr, _) = t.trigger(app, false);
                call(format!(
                    "SELECT picloud.picloud_enable_trigger('{app}', '{tr}')::text"
                ))
                .check(format!(
                    "SELECT enabled FROM picloud.triggers WHERE trigger_id = '{tr}'"
                ))
            },
        },
        Spec {
            func: "picloud_disable_trigger",
            kind: TRIG,
            build: |t, _, app| {
                let (tr, _) = t.trigger(app, true);
                call(format!(
                    "SELECT picloud.picloud_disable_trigger('{app}', '{tr}')::text"
                ))
                .check(format!(
                    "SELECT NOT enabled FROM picloud.triggers WHERE trigger_id = '{tr}'"
                ))
            },
        },
        Spec {
            func: "picloud_drop_trigger",
            kind: TRIG,
            build: |t, _, app| {
                let (tr, _) = t.trigger(app, true);
                call(format!("SELECT picloud.picloud_drop_trigger('{app}', '{tr}')::text")).check(format!(
                    "SELECT NOT EXISTS (SELECT 1 FROM picloud.triggers WHERE trigger_id = '{tr}')
                        AND NOT EXISTS (SELECT 1 FROM picloud.kv_trigger_details WHERE trigger_id = '{tr}')"
                ))
            },
        },
        Spec {
            func: "picloud_create_cron_trigger",
            kind: TRIG,
            build: |t, who, app| {
                let s = t.script(app);
                let me = t.role(who);
                call(format!("SELECT picloud.picloud_create_cron_trigger('{app}', '@hourly', '{s}')::text")).check(format!(
                    "SELECT EXISTS (SELECT 1 FROM picloud.triggers t JOIN picloud.cron_trigger_details d USING (app_id, trigger_id)
                     WHERE t.app_id = '{app}' AND t.script_id = '{s}' AND t.kind = 'cron' AND t.registered_by_principal = '{me}'
                       AND d.next_fire_at > now())"
                ))
            },
        },
        Spec {
            func: "picloud_alter_cron_trigger",
            kind: TRIG,
            build: |t, _, app| {
                let tr = t.cron_trigger(app);
                call(format!(
                    "SELECT picloud.picloud_alter_cron_trigger('{app}', '{tr}', p_schedule => '@daily')::text"
                ))
                .check(format!(
                    "SELECT schedule = '@daily' FROM picloud.cron_trigger_details WHERE trigger_id = '{tr}'"
                ))
            },
        },
        Spec {
            func: "picloud_list_cron_triggers",
            kind: TRIG,
            build: |t, _, app| {
                let tr = t.cron_trigger(app);
                call(format!("SELECT bool_or(trigger_id = '{tr}')::text FROM picloud.picloud_list_cron_triggers('{app}')")).value("true")
            },
        },
        Spec {
            func: "picloud_cron_next",
            kind: Kind::Visible,
            build: |_, _, _| {
                call("SELECT count(*)::text FROM picloud.picloud_cron_next('@hourly', 'UTC', now(), 3)").value("3")
            },
        },
        Spec {
            func: "picloud_match_kv_triggers",
            kind: Kind::VisibleInApp,
            build: |t, who, app| {
                let (_, collection) = t.trigger(app, true);
                let expected = if t.may_enqueue(who, app) { "1" } else { "0" };
                call(format!("SELECT count(*)::text FROM picloud.picloud_match_kv_triggers('{app}', '{collection}', 'set')"))
                    .value(expected)
            },
        },
        Spec {
            func: "picloud_match_dead_letter_triggers",
            kind: Kind::VisibleInApp,
            build: |t, who, app| {
                let s = t.script(app);
                t.su.batch_execute(&format!(
                    "SELECT picloud_create_dead_letter_trigger('{app}', '{s}', NULL, '{s}')"
                ))
                .unwrap();
                let sql = format!("SELECT count(*)::text FROM picloud.picloud_match_dead_letter_triggers('{app}', 'queue', '{s}')");
                let all = text(&mut t.su, &sql).unwrap();
                assert_ne!(all, "0");
                let expected = if t.may_enqueue(who, app) {
                    all
                } else {
                    "0".to_string()
                };
                call(sql).value(expected)
            },
        },
        // Enqueueing and synchronous calls.
        Spec {
            func: "picloud_enqueue",
            kind: Kind::Enqueue,
            build: |t, _, app| {
                let s = t.script(app);
                call(format!("SELECT picloud.picloud_enqueue('{app}', 'queue', 'm', '{{}}', '{s}')::text"))
                    .check(format!("SELECT count(*) = 1 FROM picloud.outbox WHERE app_id = '{app}' AND script_id = '{s}'"))
            },
        },
        Spec {
            func: "picloud_enqueue(idempotency_key)",
            kind: Kind::Enqueue,
            build: |t, _, app| {
                let s = t.script(app);
                let key = format!("key{}", t.next());
                call(format!(
                    "SELECT picloud.picloud_enqueue('{app}', 'queue', 'm', '{{}}', '{s}', p_idempotency_key => '{key}')::text"
                ))
                .check(format!(
                    "SELECT count(*) = 1 FROM picloud.outbox o JOIN picloud.idempotency_keys k USING (app_id, event_id)
                     WHERE o.app_id = '{app}' AND o.script_id = '{s}' AND k.idempotency_key = '{key}'"
                ))
            },
        },
        Spec {
            func: "picloud_enqueue_bulk",
            kind: Kind::Enqueue,
            build: |t, _, app| {
                let s = t.script(app);
                call(format!(
                    "SELECT count(*)::text FROM picloud.picloud_enqueue_bulk('{app}', 'queue', 'm', ARRAY['{{}}'::jsonb, '{{}}'::jsonb], '{s}')"
                ))
                .value("2")
                .check(format!("SELECT count(*) = 2 FROM picloud.outbox WHERE app_id = '{app}' AND script_id = '{s}'"))
            },
        },
        Spec {
            func: "picloud_emit_kv",
            kind: Kind::Enqueue,
            build: |t, _, app| {
                let (tr, collection) = t.trigger(app, true);
                call(format!("SELECT picloud.picloud_emit_kv('{app}', '{collection}', 'set', 'k', '{{}}')::text"))
                    .value("1")
                    .check(format!("SELECT count(*) = 1 FROM picloud.outbox WHERE trigger_id = '{tr}'"))
            },
        },
        Spec {
            func: "picloud_open_inbox",
            kind: Kind::Enqueue,
            build: |t, who, app| {
                let me = t.role(who);
                call(format!("SELECT picloud.picloud_open_inbox('{app}')"))
                    .check(format!("SELECT count(*) = 1 FROM picloud.inboxes WHERE app_id = '{app}' AND owner_role = '{me}'"))
                    .cleanup("DELETE FROM picloud.inboxes")
            },
        },
        Spec {
            func: "picloud_close_inbox",
            kind: Kind::Enqueue,
            build: |t, who, app| {
                let me = t.role(who);
                let channel = format!("ch{}", t.next());
                t.su.batch_execute(&format!(
                    "INSERT INTO picloud.inboxes (app_id, channel, owner_role, owner_pid, owner_started, expires_at)
                     VALUES ('{app}', '{channel}', '{me}', 0, now(), now() + interval '1 hour')"
                ))
                .unwrap();
                call(format!(
                    "SELECT picloud.picloud_close_inbox('{app}', '{channel}')::text"
                ))
                .value("true")
                .check(format!(
                    "SELECT NOT EXISTS (SELECT 1 FROM picloud.inboxes WHERE channel = '{channel}')"
                ))
                .cleanup("DELETE FROM picloud.inboxes")
            },
        },
        // Pending events and dead letters.
        Spec {
            func: "picloud_list_outbox",
            kind: DEAD,
            build: |t, _, app| {
                let e = t.event(app);
                call(format!("SELECT bool_or(event_id = '{e}')::text FROM picloud.picloud_list_outbox('{app}', 10000)")).value("true")
            },
        },
        Spec {
            func: "picloud_list_dead_letters",
            kind: DEAD,
            build: |t, _, app| {
                let (dl, _) = t.dead_letter(app);
                call(format!("SELECT bool_or(dead_letter_id = '{dl}')::text FROM picloud.picloud_list_dead_letters('{app}', true, 10000)"))
                    .value("true")
            },
        },
        Spec {
            func: "picloud_get_dead_letter",
            kind: DEAD,
            build: |t, _, app| {
                let (dl, _) = t.dead_letter(app);
                call(format!("SELECT (picloud.picloud_get_dead_letter('{app}', '{dl}')).dead_letter_id::text")).value(dl.to_string())
            },
        },
        Spec {
            func: "picloud_dead_letter_count",
            kind: DEAD,
            build: |t, _, app| {
                t.dead_letter(app);
                let n = text(
                    &mut t.su,
                    &format!("SELECT count(*)::text FROM picloud.dead_letters WHERE app_id = '{app}' AND resolved_at IS NULL"),
                )
                .unwrap();
                call(format!(
                    "SELECT picloud.picloud_dead_letter_count('{app}')::text"
                ))
                .value(n)
            },
        },
        Spec {
            func: "picloud_resolve_dead_letter",
            kind: DEAD,
            build: |t, who, app| {
                let (dl, _) = t.dead_letter(app);
                let me = t.role(who);
                call(format!("SELECT picloud.picloud_resolve_dead_letter('{app}', '{dl}', 'ignored')::text")).check(format!(
                    "SELECT resolution = 'ignored' AND resolved_by = '{me}' FROM picloud.dead_letters WHERE dead_letter_id = '{dl}'"
                ))
            },
        },
        Spec {
            func: "picloud_replay_dead_letter",
            kind: DEAD,
            build: |t, _, app| {
                let (dl, s) = t.dead_letter(app);
                call(format!("SELECT picloud.picloud_replay_dead_letter('{app}', '{dl}')::text")).check(format!(
                    "SELECT (SELECT resolution = 'replayed' FROM picloud.dead_letters WHERE dead_letter_id = '{dl}')
                        AND EXISTS (SELECT 1 FROM picloud.outbox WHERE app_id = '{app}' AND script_id = '{s}')"
                ))
            },
        },
        Spec {
            func: "picloud_replay_dead_letters",
            kind: DEAD,
            build: |t, _, app| {
                let (dl, s) = t.dead_letter(app);
                call(format!("SELECT picloud.picloud_replay_dead_letters('{app}', NULL, '{s}')::text")).value("1").check(format!(
                    "SELECT (SELECT resolution = 'replayed' FROM picloud.dead_letters WHERE dead_letter_id = '{dl}')
                        AND EXISTS (SELECT 1 FROM picloud.outbox WHERE app_id = '{app}' AND script_id = '{s}')"
                ))
            },
        },
        Spec {
            func: "picloud_ignore_dead_letters",
            kind: DEAD,
            build: |t, _, app| {
                let (dl, s) = t.dead_letter(app);
                call(format!("SELECT picloud.picloud_ignore_dead_letters('{app}', NULL, '{s}')::text"))
                    .value("1")
                    .check(format!("SELECT resolution = 'ignored' FROM picloud.dead_letters WHERE dead_letter_id = '{dl}'"))
            },
        },
        Spec {
            func: "picloud_resolve_dead_letters",
            kind: DEAD,
            build: |t, _, app| {
                let (dl, s) = t.dead_letter(app);
                call(format!(
                    "SELECT string_agg(resolution || applied::text, ',') FROM picloud.picloud_resolve_dead_letters('{app}', 'handler_failed', p_script_id => '{s}')"
                ))
                .value("handler_failedtrue")
                .check(format!("SELECT resolution = 'handler_failed' FROM picloud.dead_letters WHERE dead_letter_id = '{dl}'"))
            },
        },
        Spec {
            func: "picloud_stats",
            kind: Kind::Visible,
            build: |t, who, app| {
                // Rows appear only for the apps the caller manages.
                t.event(app);
                let expected = match who {
                    Who::TenantB | Who::Producer => "false",
                    _ => "true",
                };
                call(format!(
                    "SELECT (count(*) > 0)::text FROM picloud.picloud_stats() WHERE app_id = '{app}' AND due > 0"
                ))
                .value(expected)
            },
        },
        Spec {
            func: "picloud_wait_idle",
            kind: DEAD,
            // Whether the app is idle depends on the cases before; who may ask is the point.
            build: |_, _, app| {
                call(format!(
                    "SELECT picloud.picloud_wait_idle('{app}', '0 seconds')::text"
                ))
            },
        },
        Spec {
            func: "picloud_lock_sql_lane",
            kind: Kind::Supervisor,
            build: |t, _, app| {
                t.event(app);
                call("SELECT count(*)::text FROM picloud.picloud_lock_sql_lane(100)")
            },
        },
        Spec {
            func: "picloud_run_sql_lane",
            kind: Kind::Supervisor,
            build: |_, _, _| {
                call("SELECT picloud.picloud_run_sql_lane('{}'::uuid[], '{}'::tid[])::text")
            },
        },
        Spec {
            func: "picloud_lock_sql_lane_for_run",
            kind: Kind::Supervisor,
            build: |t, _, app| {
                t.event(app);
                call("SELECT count(*)::text FROM picloud.picloud_lock_sql_lane_for_run(100)")
            },
        },
        Spec {
            func: "picloud_run_sql_lane_locked",
            kind: Kind::Supervisor,
            build: |_, _, _| call("SELECT picloud.picloud_run_sql_lane_locked()::text"),
        },
        Spec {
            func: "picloud_claim_events",
            kind: Kind::Supervisor,
            build: |t, _, app| {
                let event = t.event(app);
                call(format!(
                    "SELECT count(*)::text FROM picloud.picloud_claim_events('intruder', ARRAY['{app}'::uuid], ARRAY['{event}'::uuid], 60000)"
                ))
            },
        },
        Spec {
            func: "picloud_next_due_at",
            kind: Kind::Supervisor,
            build: |_, _, _| call("SELECT picloud.picloud_next_due_at()::text"),
        },
        Spec {
            func: "picloud_list_abandoned_executions",
            kind: DEAD,
            build: |t, _, app| {
                let ab = t.abandoned(app);
                call(format!(
                    "SELECT bool_or(abandoned_id = '{ab}')::text FROM picloud.picloud_list_abandoned_executions('{app}', 10000)"
                ))
                .value("true")
            },
        },
        Spec {
            func: "picloud_gc_pass",
            kind: Kind::Owner,
            build: |t, _, app| gc_case(t, app, "pass"),
        },
        // The supervisor's functions.
        Spec {
            func: "picloud_claim",
            kind: Kind::Supervisor,
            build: |t, _, app| {
                t.event(app);
                call("SELECT count(*)::text FROM picloud.picloud_claim('intruder', 10000, 60000)")
            },
        },
        Spec {
            func: "picloud_complete",
            kind: Kind::Supervisor,
            build: |t, _, app| {
                let e = t.claimed_event(app);
                call(format!(
                    "SELECT picloud.picloud_complete('{app}', '{e}', 'intruder')::text"
                ))
            },
        },
        Spec {
            func: "picloud_fail",
            kind: Kind::Supervisor,
            build: |t, _, app| {
                let e = t.claimed_event(app);
                call(format!(
                    "SELECT outcome FROM picloud.picloud_fail('{app}', '{e}', 'intruder', 'x')"
                ))
            },
        },
        Spec {
            func: "picloud_run_sql_handler",
            kind: Kind::Supervisor,
            build: |t, _, app| {
                let e = t.claimed_event(app);
                call(format!(
                    "SELECT picloud.picloud_run_sql_handler('{app}', '{e}', 'intruder')::text"
                ))
            },
        },
        Spec {
            func: "picloud_extend_lease",
            kind: Kind::Supervisor,
            build: |t, _, app| {
                let e = t.claimed_event(app);
                call(format!("SELECT picloud.picloud_extend_lease('{app}', '{e}', 'intruder', 86400000)::text"))
            },
        },
        Spec {
            func: "picloud_release",
            kind: Kind::Supervisor,
            build: |t, _, app| {
                let e = t.claimed_event(app);
                call(format!(
                    "SELECT picloud.picloud_release('{app}', '{e}', 'intruder')::text"
                ))
            },
        },
        Spec {
            func: "picloud_record_abandoned_execution",
            kind: Kind::Supervisor,
            build: |_, _, app| {
                call(format!(
                    "SELECT picloud.picloud_record_abandoned_execution('{app}', gen_random_uuid(), 'ch', true, NULL, NULL, 'forged')::text"
                ))
            },
        },
        Spec {
            func: "picloud._become_event",
            kind: Kind::Supervisor,
            build: |_, _, _| {
                call("SELECT picloud._become_event(gen_random_uuid(), gen_random_uuid())::text")
            },
        },
        // Housekeeping steps: picloud_gc_pass calls them with picloud_admin's rights.
        Spec {
            func: "picloud._gc_rescue_leases",
            kind: Kind::Housekeeping,
            build: |t, _, app| gc_case(t, app, "rescue_leases"),
        },
        Spec {
            func: "picloud._gc_dead_letters",
            kind: Kind::Housekeeping,
            build: |t, _, app| gc_case(t, app, "dead_letters"),
        },
        Spec {
            func: "picloud._gc_abandoned_executions",
            kind: Kind::Housekeeping,
            build: |t, _, app| gc_case(t, app, "abandoned_executions"),
        },
        Spec {
            func: "picloud._gc_inboxes",
            kind: Kind::Housekeeping,
            build: |t, _, app| gc_case(t, app, "inboxes"),
        },
        Spec {
            func: "picloud._gc_idempotency_keys",
            kind: Kind::Housekeeping,
            build: |t, _, app| gc_case(t, app, "idempotency_keys"),
        },
        Spec {
            func: "picloud._gc_event_counts",
            kind: Kind::Housekeeping,
            build: |t, _, app| gc_case(t, app, "event_counts"),
        },
        Spec {
            func: "picloud._count_outcome",
            kind: Kind::Housekeeping,
            build: |t, _, app| {
                let source = format!("s{}", t.next());
                call(format!("SELECT coalesce(picloud._count_outcome('{app}', '{source}', 1, 2, 3)::text, 'counted')"))
                    .value("counted")
                    .check(format!(
                        "SELECT sum(completed) = 1 AND sum(failed) = 2 AND sum(dead_lettered) = 3 FROM picloud.event_counts WHERE app_id = '{app}' AND source = '{source}'"
                    ))
            },
        },
        Spec {
            func: "picloud._unbecome",
            kind: Kind::Unbecome,
            build: |_, _, _| call("SELECT picloud._unbecome(12345)::text"),
        },
    ]
}

/// A case for one housekeeping step (or, for "pass", picloud_gc_pass): every step gets work in
/// `app` - three events whose lease expired (one due for a retry, one out of attempts, one
/// synchronous whose caller is gone), a resolved and an unresolved dead letter, an abandoned
/// execution and an idempotency key far past any retention, and an expired inbox. The call
/// returns what the step removed; its effect is checked on exactly these rows, and the cleanup
/// removes whatever of them is left.
fn gc_case(t: &mut Tenancy, app: Uuid, step: &str) -> Call {
    let s = t.script(app);
    let n = t.next();
    let (retry, exhausted, sync) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let (resolved, unresolved, abandoned) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let (channel, key) = (format!("gc_inbox{n}"), format!("gc_key{n}"));
    t.su.batch_execute(&format!(
        "INSERT INTO picloud.outbox (app_id, event_id, source, op, script_id, payload, attempt_count, claimed_by, lease_expires_at, reply_to)
         VALUES ('{app}', '{retry}', 'queue', 'gc', '{s}', '{{}}', 1, 'lost', now() - interval '1 minute', NULL),
                ('{app}', '{exhausted}', 'queue', 'gc', '{s}', '{{}}', current_setting('picloud.retry_max_attempts')::integer,
                 'lost', now() - interval '1 minute', NULL),
                ('{app}', '{sync}', 'queue', 'gc', '{s}', '{{}}', 1, 'lost', now() - interval '1 minute', 'gone{n}');
         INSERT INTO picloud.dead_letters (app_id, dead_letter_id, original_event_id, source, op, payload, attempt_count,
                                           created_at, resolved_at, resolved_by, resolution)
         VALUES ('{app}', '{resolved}', gen_random_uuid(), 'queue', 'gc', '{{}}', 1, now() - interval '200 years', now(), 'postgres', 'ignored'),
                ('{app}', '{unresolved}', gen_random_uuid(), 'queue', 'gc', '{{}}', 1, now() - interval '200 years', NULL, NULL, NULL);
         INSERT INTO picloud.abandoned_executions (app_id, abandoned_id, event_id, reply_to, succeeded, reason, created_at)
         VALUES ('{app}', '{abandoned}', gen_random_uuid(), 'gone', true, 'gc', now() - interval '200 years');
         INSERT INTO picloud.inboxes (app_id, channel, owner_role, owner_pid, owner_started, expires_at)
         VALUES ('{app}', '{channel}', 'postgres', 0, now(), now() - interval '1 minute');
         INSERT INTO picloud.idempotency_keys (app_id, idempotency_key, event_id, created_at)
         VALUES ('{app}', '{key}', gen_random_uuid(), now() - interval '200 years');
         INSERT INTO picloud.event_counts (app_id, source, minute, backend_pid, completed)
         VALUES ('{app}', 'gc{n}', date_trunc('minute', now() - interval '2 days'), 0, 1);"
    ))
    .expect("housekeeping fixture");
    // Retention 0 keeps dead letters and abandoned executions forever.
    let keeps = |t: &mut Tenancy, setting: &str| {
        flag(
            &mut t.su,
            &format!("SELECT current_setting('picloud.{setting}')::integer = 0"),
        )
    };
    let keep_dead_letters = keeps(t, "dead_letter_retention_days");
    let keep_abandoned = keeps(t, "abandoned_executions_retention_days");
    let not_if = |keep: bool| if keep { "" } else { "NOT" };
    let steps: [(&str, i64, String); 6] = [
        (
            "rescue_leases",
            3,
            format!(
                "(SELECT claimed_by IS NULL AND lease_expires_at IS NULL AND attempt_count = 1
                         AND last_error = 'lease of worker \"lost\" expired'
                  FROM picloud.outbox WHERE event_id = '{retry}')
                 AND NOT EXISTS (SELECT 1 FROM picloud.outbox WHERE event_id IN ('{exhausted}', '{sync}'))
                 AND (SELECT count(*) FROM picloud.dead_letters WHERE original_event_id IN ('{exhausted}', '{sync}')
                         AND resolved_at IS NULL AND last_error = 'lease of worker \"lost\" expired') = 2
                 AND EXISTS (SELECT 1 FROM picloud.abandoned_executions
                             WHERE event_id = '{sync}' AND NOT succeeded AND reason = 'inbox does not exist')"
            ),
        ),
        (
            "dead_letters",
            if keep_dead_letters { 0 } else { 1 },
            format!(
                "{} EXISTS (SELECT 1 FROM picloud.dead_letters WHERE dead_letter_id = '{resolved}')
                 AND EXISTS (SELECT 1 FROM picloud.dead_letters WHERE dead_letter_id = '{unresolved}')",
                not_if(keep_dead_letters)
            ),
        ),
        (
            "abandoned_executions",
            if keep_abandoned { 0 } else { 1 },
            format!("{} EXISTS (SELECT 1 FROM picloud.abandoned_executions WHERE abandoned_id = '{abandoned}')", not_if(keep_abandoned)),
        ),
        ("inboxes", 1, format!("NOT EXISTS (SELECT 1 FROM picloud.inboxes WHERE channel = '{channel}')")),
        ("idempotency_keys", 1, format!("NOT EXISTS (SELECT 1 FROM picloud.idempotency_keys WHERE idempotency_key = '{key}')")),
        ("event_counts", 1, format!("NOT EXISTS (SELECT 1 FROM picloud.event_counts WHERE source = 'gc{n}')")),
    ];
    let c = if step == "pass" {
        let value = steps
            .iter()
            .map(|(k, n, _)| format!("{k}={n}"))
            .collect::<Vec<_>>()
            .join(",");
        let check = steps
            .iter()
            .map(|(_, _, c)| format!("({c})"))
            .collect::<Vec<_>>()
            .join(" AND ");
        call("SELECT string_agg(kind || '=' || removed, ',' ORDER BY n) FROM picloud.picloud_gc_pass() WITH ORDINALITY AS g(kind, removed, n)")
            .value(value)
            .check(format!("SELECT {check}"))
    } else {
        let (_, n, check) = steps
            .iter()
            .find(|(k, _, _)| *k == step)
            .expect("housekeeping step");
        call(format!("SELECT picloud._gc_{step}(10000)::text"))
            .value(n.to_string())
            .check(format!("SELECT {check}"))
    };
    c.cleanup(format!(
        "DELETE FROM picloud.outbox WHERE event_id IN ('{retry}', '{exhausted}', '{sync}')
            OR payload ->> 'original_event_id' IN ('{exhausted}', '{sync}');
         DELETE FROM picloud.dead_letters WHERE dead_letter_id IN ('{resolved}', '{unresolved}')
            OR original_event_id IN ('{exhausted}', '{sync}');
         DELETE FROM picloud.abandoned_executions WHERE abandoned_id = '{abandoned}' OR event_id = '{sync}';
         DELETE FROM picloud.event_counts WHERE source = 'gc{n}';
         DELETE FROM picloud.inboxes WHERE channel = '{channel}';
         DELETE FROM picloud.idempotency_keys WHERE idempotency_key = '{key}';"
    ))
}

/// What is wrong with a refusal, if anything.
fn refusal_problem(
    expect: Expect,
    code: &str,
    message: &str,
    role: &str,
    app: Uuid,
    func: &str,
) -> Option<String> {
    let bare = func
        .split('(')
        .next()
        .unwrap_or(func)
        .trim_start_matches("picloud.");
    let (want_code, needles): (&str, Vec<String>) = match expect {
        Expect::Ok => unreachable!(),
        Expect::Cap(cap) => (
            "42501",
            vec![cap.to_string(), app.to_string(), format!("\"{role}\"")],
        ),
        Expect::Owner => ("42501", vec!["requires the picloud_admin role".to_string()]),
        Expect::NoSchema => (
            "42501",
            vec!["permission denied for schema picloud".to_string()],
        ),
        Expect::NoExecute => (
            "42501",
            vec![format!("permission denied for function {bare}")],
        ),
        Expect::Code(c) => (c, vec![]),
    };
    let missing: Vec<&String> = needles
        .iter()
        .filter(|n| !message.contains(n.as_str()))
        .collect();
    if code != want_code || !missing.is_empty() {
        Some(format!("expected {expect:?} (SQLSTATE {want_code}, message naming {needles:?}), got {code}: {message}"))
    } else {
        None
    }
}

/// Every public function, called by every role on its own and the other tenant's app: who may
/// call it is asserted by outcome (the rows it changed, the value it returned) and, for a
/// refusal, by SQLSTATE and message, with every picloud table unchanged afterwards.
#[test]
fn function_matrix() {
    let mut t = Tenancy::new("secmatrix");
    let mut failures = Vec::new();
    let mut asserted = 0;
    let mut functions = 0;
    for spec in specs() {
        functions += 1;
        for (who, app_sel, expect) in cases(spec.kind) {
            let app = if app_sel == App::A { t.app_a } else { t.app_b };
            let c = (spec.build)(&mut t, who, app);
            let role = t.role(who);
            let label = format!("{} as {who:?} on app {app_sel:?}", spec.func);
            let before = fingerprint(&mut t.su, "true");
            let result = t.client(who).query_one(c.sql.as_str(), &[]);
            let after = fingerprint(&mut t.su, "true");
            asserted += 1;
            match (expect, result) {
                (Expect::Ok, Ok(row)) => {
                    let got: Option<String> = row.get(0);
                    if let Some(want) = &c.value {
                        if got.as_deref() != Some(want.as_str()) {
                            failures.push(format!("{label}: returned {got:?}, expected {want:?}"));
                        }
                    }
                    if let Some(check) = &c.check {
                        if !flag(&mut t.su, check) {
                            failures.push(format!(
                                "{label}: succeeded but did not have its effect ({check})"
                            ));
                        }
                    }
                }
                (Expect::Ok, Err(e)) => {
                    let (code, message) = code_and_message(&e);
                    failures.push(format!("{label}: expected success, got {code}: {message}"));
                }
                (expect, Ok(row)) => {
                    let got: Option<String> = row.get(0);
                    failures.push(format!(
                        "{label}: expected {expect:?}, but the call succeeded (returned {got:?}; changed {:?})",
                        changed_tables(&before, &after)
                    ));
                }
                (expect, Err(e)) => {
                    let (code, message) = code_and_message(&e);
                    if let Some(problem) =
                        refusal_problem(expect, &code, &message, &role, app, spec.func)
                    {
                        failures.push(format!("{label}: {problem}"));
                    }
                    let changed = changed_tables(&before, &after);
                    if !changed.is_empty() {
                        failures.push(format!("{label}: refused, yet changed {changed:?}"));
                    }
                }
            }
            if let Some(cleanup) = &c.cleanup {
                t.su.batch_execute(cleanup)
                    .unwrap_or_else(|e| panic!("{label} cleanup: {e}"));
            }
        }
    }
    eprintln!("function matrix: {functions} functions, {asserted} (function, role, app) cases");
    // The fixture is intact: nobody gained or lost an app role along the way.
    let roles: Vec<String> =
        t.su.query(
            "SELECT role_name || ':' || capability FROM picloud.app_roles ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut expected = vec![
        format!("{}:admin", t.tenant_a),
        format!("{}:admin", t.tenant_b),
        format!("{}:producer", t.producer_role),
    ];
    expected.sort();
    if roles != expected {
        failures.push(format!(
            "app roles after the matrix: {roles:?}, expected {expected:?}"
        ));
    }
    assert!(
        failures.is_empty(),
        "{} of {asserted} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(asserted >= 250, "matrix shrank to {asserted} cases");
}

// Direct table access -------------------------------------------------------------------------

/// Seeds one row per table (two triggers) for app A and app B.
fn seed_tables(t: &mut Tenancy) {
    let (a, b, ta, tb) = (t.app_a, t.app_b, t.tenant_a.clone(), t.tenant_b.clone());
    // Each app's handler and triggers are registered by its tenant.
    for (app, owner) in [(a, &ta), (b, &tb)] {
        t.su.batch_execute(&format!(
            "WITH s AS (INSERT INTO picloud.scripts (app_id, name, kind, target, registered_by_principal)
                        VALUES ('{app}', 'seed', 'command', 'noop', '{owner}') RETURNING script_id),
                  k AS (INSERT INTO picloud.triggers (app_id, kind, script_id, registered_by_principal)
                        SELECT '{app}', 'kv', script_id, '{owner}' FROM s RETURNING trigger_id),
                  d AS (INSERT INTO picloud.triggers (app_id, kind, script_id, registered_by_principal)
                        SELECT '{app}', 'dead_letter', script_id, '{owner}' FROM s RETURNING trigger_id),
                  c AS (INSERT INTO picloud.triggers (app_id, kind, script_id, registered_by_principal)
                        SELECT '{app}', 'cron', script_id, '{owner}' FROM s RETURNING trigger_id),
                  cd AS (INSERT INTO picloud.cron_trigger_details (app_id, trigger_id, schedule, timezone, payload,
                                                                  catch_up, catch_up_limit, skip_if_running, next_fire_at)
                         SELECT '{app}', trigger_id, '@yearly', 'UTC', '{{}}', 'last', 1, false, now() + interval '1 day' FROM c),
                  kd AS (INSERT INTO picloud.kv_trigger_details (app_id, trigger_id, collection_pattern, match_key, ops)
                         SELECT '{app}', trigger_id, 'seed', '=seed', ARRAY['set'] FROM k),
                  dd AS (INSERT INTO picloud.dead_letter_trigger_details (app_id, trigger_id) SELECT '{app}', trigger_id FROM d)
             INSERT INTO picloud.outbox (app_id, source, op, script_id, payload) SELECT '{app}', 'queue', 'seed', script_id, '{{}}' FROM s;
             INSERT INTO picloud.idempotency_keys (app_id, idempotency_key, event_id) VALUES ('{app}', 'seed', gen_random_uuid());
             WITH dl AS (INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, payload, attempt_count,
                                                           ordering_key, ordering_seq, ordering_blocks)
                         VALUES ('{app}', gen_random_uuid(), 'queue', 'seed', '{{}}', 1, 'seed', 1, true)
                         RETURNING app_id, dead_letter_id)
             INSERT INTO picloud.key_blocks (app_id, ordering_key, dead_letter_id) SELECT app_id, 'seed', dead_letter_id FROM dl;
             INSERT INTO picloud.inboxes (app_id, channel, owner_role, owner_pid, owner_started, expires_at)
               VALUES ('{app}', 'seed', '{owner}', 0, now(), now() + interval '1 hour');
             INSERT INTO picloud.abandoned_executions (app_id, event_id, reply_to, succeeded, reason)
               VALUES ('{app}', gen_random_uuid(), 'seed', true, 'seed');
             INSERT INTO picloud.event_counts (app_id, source, minute, backend_pid, completed)
               VALUES ('{app}', 'queue', date_trunc('minute', now()), 0, 1);"
        ))
        .expect("seed");
    }
    // Another caller's inbox in app A: inboxes belong to their caller, not to the app's admins.
    let producer = t.producer_role.clone();
    t.su.batch_execute(&format!(
        "INSERT INTO picloud.inboxes (app_id, channel, owner_role, owner_pid, owner_started, expires_at)
         VALUES ('{a}', 'producers', '{producer}', 0, now(), now() + interval '1 hour')"
    ))
    .unwrap();
}

fn affected(c: &mut Client, sql: &str) -> Result<u64, (String, String)> {
    c.execute(sql, &[]).map_err(|e| code_and_message(&e))
}

// What a tenant role (a member of picloud_user) may write straight into picloud's tables: only
// what the API functions write with the caller's rights. Row-level security then narrows each
// write to the tenant's own apps; everything else is refused with 42501 "permission denied for
// table ..." before a row is looked at, the tenant's own rows included.

fn tenant_may_insert(table: &str) -> bool {
    matches!(
        table,
        "scripts"
            | "triggers"
            | "kv_trigger_details"
            | "dead_letter_trigger_details"
            | "cron_trigger_details"
            | "inboxes"
            | "outbox"
            | "idempotency_keys"
    )
}

fn tenant_may_delete(table: &str) -> bool {
    matches!(
        table,
        "scripts"
            | "triggers"
            | "kv_trigger_details"
            | "dead_letter_trigger_details"
            | "cron_trigger_details"
            | "inboxes"
            // Resolving a dead letter releases the ordering key it blocked.
            | "key_blocks"
    )
}

/// The columns a tenant may UPDATE (comma-separated, sorted), if any.
fn tenant_update_columns(table: &str) -> Option<&'static str> {
    match table {
        "triggers" => Some("enabled,updated_at"),
        "cron_trigger_details" => {
            Some("catch_up,catch_up_limit,next_fire_at,payload,schedule,skip_if_running,timezone")
        }
        "dead_letters" => Some("resolution,resolved_at,resolved_by"),
        _ => None,
    }
}

/// An UPDATE that sets every column a tenant may update to itself (so changes nothing).
fn noop_update_of_tenant_columns(table: &str) -> Option<String> {
    tenant_update_columns(table).map(|cols| {
        format!(
            "UPDATE picloud.{table} SET {}",
            cols.split(',')
                .map(|c| format!("{c} = {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// Refused for want of a table (or column) privilege.
fn no_privilege(outcome: &Result<u64, (String, String)>, table: &str) -> bool {
    matches!(outcome, Err((code, message)) if code == "42501" && *message == format!("permission denied for table {table}"))
}

/// Refused by a policy's WITH CHECK.
fn rls_refused(outcome: &Result<u64, (String, String)>, table: &str) -> bool {
    matches!(outcome, Err((code, message))
        if code == "42501" && message.contains("row-level security") && message.contains(&format!("\"{table}\"")))
}

/// SELECT, UPDATE, DELETE and INSERT straight on every picloud table: tenant_a sees only app A's
/// rows; it writes only where it holds the privilege and only app A's rows there; every other
/// write is refused (42501) and changes nothing, in app B or in app A.
#[test]
fn tables_show_and_touch_only_the_roles_own_apps() {
    let mut t = Tenancy::new("sectables");
    seed_tables(&mut t);
    let (a, b, ta, tb) = (t.app_a, t.app_b, t.tenant_a.clone(), t.tenant_b.clone());
    let b_before = fingerprint(&mut t.su, &format!("x.app_id = '{b}'"));
    assert!(
        b_before.iter().all(|(_, n, _)| *n >= 1),
        "every table has rows of app B: {b_before:?}"
    );
    let mut failures = Vec::new();

    // The catalog grants tenant_a (through picloud_user) exactly the writes listed above.
    for table in TABLES {
        let got = text(
            &mut t.su,
            &format!(
                "SELECT concat_ws(' ',
                        CASE WHEN has_table_privilege('{ta}', 'picloud.{table}', 'SELECT') THEN 'SELECT' END,
                        CASE WHEN has_table_privilege('{ta}', 'picloud.{table}', 'INSERT') THEN 'INSERT' END,
                        CASE WHEN has_table_privilege('{ta}', 'picloud.{table}', 'UPDATE') THEN 'UPDATE' END,
                        CASE WHEN has_table_privilege('{ta}', 'picloud.{table}', 'DELETE') THEN 'DELETE' END,
                        CASE WHEN has_table_privilege('{ta}', 'picloud.{table}', 'TRUNCATE') THEN 'TRUNCATE' END,
                        CASE WHEN has_table_privilege('{ta}', 'picloud.{table}', 'REFERENCES') THEN 'REFERENCES' END,
                        CASE WHEN has_table_privilege('{ta}', 'picloud.{table}', 'TRIGGER') THEN 'TRIGGER' END,
                        (SELECT 'INSERT(' || string_agg(attname::text, ',' ORDER BY attname) || ')'
                         FROM pg_attribute
                         WHERE attrelid = 'picloud.{table}'::regclass AND attnum > 0 AND NOT attisdropped
                           AND NOT has_table_privilege('{ta}', 'picloud.{table}', 'INSERT')
                           AND has_column_privilege('{ta}', attrelid, attnum, 'INSERT')),
                        (SELECT 'UPDATE(' || string_agg(attname::text, ',' ORDER BY attname) || ')'
                         FROM pg_attribute
                         WHERE attrelid = 'picloud.{table}'::regclass AND attnum > 0 AND NOT attisdropped
                           AND has_column_privilege('{ta}', attrelid, attnum, 'UPDATE')))"
            ),
        )
        .unwrap_or_default();
        let mut want = vec!["SELECT".to_string()];
        if tenant_may_insert(table) && table != "outbox" {
            want.push("INSERT".to_string());
        }
        if tenant_may_delete(table) {
            want.push("DELETE".to_string());
        }
        if table == "outbox" {
            // Only the columns an enqueue writes: never a claim, a lease or an attempt count.
            want.push(
                "INSERT(app_id,depth,due_at,event_id,op,ordering_blocks,ordering_key,ordering_seq,payload,reply_to,script_id,source,trigger_id)"
                    .to_string(),
            );
        }
        if let Some(cols) = tenant_update_columns(table) {
            want.push(format!("UPDATE({cols})"));
        }
        let want = want.join(" ");
        if got != want {
            failures.push(format!(
                "privileges of tenant_a on {table}: {got:?}, expected {want:?}"
            ));
        }
    }

    // What tenant_a may see of each table, as the superuser counts it.
    let visible = |t: &mut Tenancy, table: &str| -> i64 {
        let filter = match table {
            "app_roles" => format!("role_name = '{ta}'"),
            "inboxes" => format!("app_id = '{a}' AND owner_role = '{ta}'"),
            _ => format!("app_id = '{a}'"),
        };
        count(
            &mut t.su,
            &format!("SELECT count(*) FROM picloud.{table} WHERE {filter}"),
        )
    };

    let a_before = fingerprint(&mut t.su, &format!("x.app_id = '{a}'"));
    for table in TABLES {
        let want = visible(&mut t, table);
        let all = count(&mut t.a, &format!("SELECT count(*) FROM picloud.{table}"));
        let of_b = count(
            &mut t.a,
            &format!("SELECT count(*) FROM picloud.{table} WHERE app_id = '{b}'"),
        );
        let not_a = count(
            &mut t.a,
            &format!("SELECT count(*) FROM picloud.{table} WHERE app_id <> '{a}'"),
        );
        if all != want || of_b != 0 || not_a != 0 || want == 0 {
            failures.push(format!("SELECT {table}: sees {all} rows (expected {want}), {of_b} of app B, {not_a} not of app A"));
        }
        // No tenant may UPDATE app_id anywhere: B's rows, its own rows, or moving its own rows
        // into app B are all refused outright.
        for sql in [
            format!("UPDATE picloud.{table} SET app_id = app_id WHERE app_id = '{b}'"),
            format!("UPDATE picloud.{table} SET app_id = app_id"),
            format!("UPDATE picloud.{table} SET app_id = '{b}' WHERE app_id = '{a}'"),
        ] {
            let got = affected(&mut t.a, &sql);
            if !no_privilege(&got, table) {
                failures.push(format!(
                    "{sql}: {got:?}, expected 42501 permission denied for table {table}"
                ));
            }
        }
        // Where some columns may be updated: B's rows are out of reach, A's rows are updated.
        if let Some(update) = noop_update_of_tenant_columns(table) {
            match affected(&mut t.a, &format!("{update} WHERE app_id = '{b}'")) {
                Ok(0) => {}
                other => failures.push(format!(
                    "{update} of app B's rows: {other:?}, expected 0 rows"
                )),
            }
            match affected(&mut t.a, &update) {
                Ok(n) if n == want as u64 => {}
                other => failures.push(format!(
                    "{update} (all rows): {other:?}, expected {want} rows (app A's)"
                )),
            }
        }
        // DELETE of B's rows reaches nothing where tenants may delete, and is refused elsewhere.
        let sql = format!("DELETE FROM picloud.{table} WHERE app_id = '{b}'");
        let got = affected(&mut t.a, &sql);
        let ok = if tenant_may_delete(table) {
            got == Ok(0)
        } else {
            no_privilege(&got, table)
        };
        if !ok {
            failures.push(format!(
                "{sql}: {got:?}, expected {}",
                if tenant_may_delete(table) {
                    "0 rows".to_string()
                } else {
                    format!("42501 permission denied for table {table}")
                }
            ));
        }
    }
    let changed = changed_tables(
        &a_before,
        &fingerprint(&mut t.su, &format!("x.app_id = '{a}'")),
    );
    if !changed.is_empty() {
        failures.push(format!(
            "tenant_a's UPDATEs and refused writes changed app A's rows: {changed:?}"
        ));
    }

    // INSERT: rows for app A where tenant_a may insert (refused for lack of privilege
    // elsewhere); anything for app B is refused (42501), by the policies where the privilege
    // exists.
    let script_a = id(
        &mut t.su,
        &format!("SELECT script_id FROM picloud.scripts WHERE app_id = '{a}'"),
    );
    let script_b = id(
        &mut t.su,
        &format!("SELECT script_id FROM picloud.scripts WHERE app_id = '{b}'"),
    );
    let trig_b = id(
        &mut t.su,
        &format!(
            "SELECT trigger_id FROM picloud.triggers WHERE app_id = '{b}' AND kind = 'dead_letter'"
        ),
    );
    let (new_t1, new_t2, new_t3) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let inserts: Vec<(&str, String, String)> = vec![
        (
            "apps",
            format!("INSERT INTO picloud.apps (app_id, name) VALUES ('{}', 'mine')", Uuid::new_v4()),
            format!("INSERT INTO picloud.apps (app_id, name) VALUES ('{}', 'B2')", Uuid::new_v4()),
        ),
        (
            "app_roles",
            format!("INSERT INTO picloud.app_roles (app_id, role_name, capability) VALUES ('{a}', '{tb}', 'admin')"),
            format!("INSERT INTO picloud.app_roles (app_id, role_name, capability) VALUES ('{b}', '{ta}', 'admin')"),
        ),
        (
            "scripts",
            format!("INSERT INTO picloud.scripts (app_id, name, kind, target) VALUES ('{a}', 'ins', 'command', 'noop')"),
            format!("INSERT INTO picloud.scripts (app_id, name, kind, target) VALUES ('{b}', 'ins', 'command', 'noop')"),
        ),
        (
            "triggers",
            format!(
                "INSERT INTO picloud.triggers (app_id, trigger_id, kind, script_id) VALUES ('{a}', '{new_t1}', 'kv', '{script_a}'),
                        ('{a}', '{new_t2}', 'dead_letter', '{script_a}'), ('{a}', '{new_t3}', 'cron', '{script_a}')"
            ),
            format!("INSERT INTO picloud.triggers (app_id, kind, script_id) VALUES ('{b}', 'kv', '{script_b}')"),
        ),
        (
            "kv_trigger_details",
            format!(
                "INSERT INTO picloud.kv_trigger_details (app_id, trigger_id, collection_pattern, match_key, ops)
                 VALUES ('{a}', '{new_t1}', 'ins', '=ins', ARRAY['set'])"
            ),
            format!(
                "INSERT INTO picloud.kv_trigger_details (app_id, trigger_id, collection_pattern, match_key, ops)
                 VALUES ('{b}', '{trig_b}', 'ins', '=ins', ARRAY['set'])"
            ),
        ),
        (
            "dead_letter_trigger_details",
            format!("INSERT INTO picloud.dead_letter_trigger_details (app_id, trigger_id) VALUES ('{a}', '{new_t2}')"),
            format!(
                "INSERT INTO picloud.dead_letter_trigger_details (app_id, trigger_id) VALUES ('{b}', '{trig_b}')"
            ),
        ),
        (
            "cron_trigger_details",
            format!(
                "INSERT INTO picloud.cron_trigger_details (app_id, trigger_id, schedule, timezone, payload, catch_up, catch_up_limit, skip_if_running)
                 VALUES ('{a}', '{new_t3}', '@daily', 'UTC', '{{}}', 'last', 1, false)"
            ),
            format!(
                "INSERT INTO picloud.cron_trigger_details (app_id, trigger_id, schedule, timezone, payload, catch_up, catch_up_limit, skip_if_running)
                 VALUES ('{b}', '{trig_b}', '@daily', 'UTC', '{{}}', 'last', 1, false)"
            ),
        ),
        (
            "outbox",
            format!("INSERT INTO picloud.outbox (app_id, source, op, script_id, payload) VALUES ('{a}', 'queue', 'ins', '{script_a}', '{{}}')"),
            format!("INSERT INTO picloud.outbox (app_id, source, op, script_id, payload) VALUES ('{b}', 'queue', 'ins', '{script_b}', '{{}}')"),
        ),
        (
            "idempotency_keys",
            format!("INSERT INTO picloud.idempotency_keys (app_id, idempotency_key, event_id) VALUES ('{a}', 'ins', gen_random_uuid())"),
            format!("INSERT INTO picloud.idempotency_keys (app_id, idempotency_key, event_id) VALUES ('{b}', 'ins', gen_random_uuid())"),
        ),
        (
            "dead_letters",
            format!(
                "INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, payload, attempt_count)
                 VALUES ('{a}', gen_random_uuid(), 'queue', 'ins', '{{}}', 1)"
            ),
            format!(
                "INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, payload, attempt_count)
                 VALUES ('{b}', gen_random_uuid(), 'queue', 'ins', '{{}}', 1)"
            ),
        ),
        (
            "inboxes",
            format!(
                "INSERT INTO picloud.inboxes (app_id, channel, owner_pid, owner_started, expires_at)
                 VALUES ('{a}', 'ins', 0, now(), now() + interval '1 hour')"
            ),
            format!(
                "INSERT INTO picloud.inboxes (app_id, channel, owner_pid, owner_started, expires_at)
                 VALUES ('{b}', 'ins', 0, now(), now() + interval '1 hour')"
            ),
        ),
        (
            "abandoned_executions",
            format!(
                "INSERT INTO picloud.abandoned_executions (app_id, event_id, reply_to, succeeded, reason)
                 VALUES ('{a}', gen_random_uuid(), 'ins', true, 'ins')"
            ),
            format!(
                "INSERT INTO picloud.abandoned_executions (app_id, event_id, reply_to, succeeded, reason)
                 VALUES ('{b}', gen_random_uuid(), 'ins', true, 'ins')"
            ),
        ),
    ];
    for (table, into_a, into_b) in &inserts {
        let table = *table;
        let before = fingerprint(&mut t.su, "true");
        let got = affected(&mut t.a, into_a);
        let refused_a = got.is_err();
        match (&got, tenant_may_insert(table)) {
            (Ok(n), true) if *n >= 1 => {}
            (got, false) if no_privilege(got, table) => {}
            _ => failures.push(format!(
                "INSERT {table} for app A: {got:?}, expected {}",
                if tenant_may_insert(table) {
                    "success".to_string()
                } else {
                    format!("42501 permission denied for table {table}")
                }
            )),
        }
        if refused_a {
            let changed = changed_tables(&before, &fingerprint(&mut t.su, "true"));
            if !changed.is_empty() {
                failures.push(format!(
                    "refused INSERT {table} for app A changed {changed:?}"
                ));
            }
        }
        let before = fingerprint(&mut t.su, "true");
        let got = affected(&mut t.a, into_b);
        let ok = if tenant_may_insert(table) {
            rls_refused(&got, table)
        } else {
            no_privilege(&got, table)
        };
        if !ok {
            failures.push(format!(
                "INSERT {table} for app B: {got:?}, expected 42501 ({})",
                if tenant_may_insert(table) {
                    "row-level security".to_string()
                } else {
                    format!("permission denied for table {table}")
                }
            ));
        }
        let changed = changed_tables(&before, &fingerprint(&mut t.su, "true"));
        if !changed.is_empty() {
            failures.push(format!(
                "refused INSERT {table} for app B changed {changed:?}"
            ));
        }
    }
    // An inbox in tenant_a's own app, but in someone else's name.
    let got = affected(
        &mut t.a,
        &format!(
            "INSERT INTO picloud.inboxes (app_id, channel, owner_role, owner_pid, owner_started, expires_at)
             VALUES ('{a}', 'forged', '{tb}', 0, now(), now() + interval '1 hour')"
        ),
    );
    if !rls_refused(&got, "inboxes") {
        failures.push(format!(
            "INSERT inboxes owned by tenant_b: {got:?}, expected 42501 (row-level security)"
        ));
    }
    if count(
        &mut t.su,
        "SELECT count(*) FROM picloud.inboxes WHERE channel = 'forged'",
    ) != 0
    {
        failures.push("the forged inbox exists".to_string());
    }

    // DELETE everything tenant_a can: only app A's rows go (children before parents). Where
    // tenants may not delete, even app A's own rows are refused and stay.
    let order = [
        "key_blocks",
        "kv_trigger_details",
        "dead_letter_trigger_details",
        "cron_trigger_details",
        "triggers",
        "scripts",
        "outbox",
        "idempotency_keys",
        "dead_letters",
        "inboxes",
        "abandoned_executions",
        "app_roles",
        "apps",
    ];
    for table in order {
        let own = visible(&mut t, table);
        let got = affected(&mut t.a, &format!("DELETE FROM picloud.{table}"));
        if tenant_may_delete(table) {
            if got != Ok(own as u64) {
                failures.push(format!(
                    "DELETE FROM {table}: {got:?}, expected {own} rows (app A's)"
                ));
            }
        } else {
            if !no_privilege(&got, table) {
                failures.push(format!("DELETE FROM {table}: {got:?}, expected 42501 permission denied for table {table}"));
            }
            let left = visible(&mut t, table);
            if left != own || own == 0 {
                failures.push(format!(
                    "{table}: refused DELETE left {left} of app A's {own} rows"
                ));
            }
        }
    }
    let b_after = fingerprint(&mut t.su, &format!("x.app_id = '{b}'"));
    let changed = changed_tables(&b_before, &b_after);
    if !changed.is_empty() {
        failures.push(format!("app B's rows changed under tenant_a: {changed:?}"));
    }
    for table in TABLES {
        if tenant_may_delete(table) && visible(&mut t, table) != 0 {
            failures.push(format!("{table}: app A's rows survived tenant_a's DELETE"));
        }
    }
    // The other caller's inbox in app A was never tenant_a's to delete.
    if count(
        &mut t.su,
        "SELECT count(*) FROM picloud.inboxes WHERE channel = 'producers'",
    ) != 1
    {
        failures.push("tenant_a deleted the producer's inbox".to_string());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The unprivileged role has no way into the schema; a picloud user without app rights sees
/// and changes nothing (its writes are refused for want of privilege, or reach no row); a
/// producer sees what enqueueing needs and changes nothing but its own.
#[test]
fn outsiders_and_producers_reach_no_rows() {
    let mut t = Tenancy::new("secoutsiders");
    seed_tables(&mut t);
    let stranger = t.roles.create(&mut t.su, "stranger");
    t.su.batch_execute(&format!("GRANT picloud_user TO {stranger}"))
        .unwrap();
    let mut s = login(&t.db, &stranger);
    let everything = fingerprint(&mut t.su, "true");
    let mut failures = Vec::new();
    for table in TABLES {
        let statements = [
            format!("SELECT count(*) FROM picloud.{table}"),
            format!("UPDATE picloud.{table} SET app_id = app_id"),
            format!("DELETE FROM picloud.{table}"),
            format!("INSERT INTO picloud.{table} SELECT * FROM picloud.{table}"),
        ];
        for sql in &statements {
            match affected(&mut t.nobody, sql) {
                Err((code, message))
                    if code == "42501"
                        && message.contains("permission denied for schema picloud") => {}
                other => failures.push(format!("nobody: {sql}: {other:?}")),
            }
        }
        let seen = count(&mut s, &format!("SELECT count(*) FROM picloud.{table}"));
        // No write reaches a row: refused outright where picloud_user holds no privilege,
        // 0 rows (row-level security) where it does.
        let updated = affected(
            &mut s,
            &format!("UPDATE picloud.{table} SET app_id = app_id"),
        );
        let deleted = affected(&mut s, &format!("DELETE FROM picloud.{table}"));
        let deleted_ok = if tenant_may_delete(table) {
            deleted == Ok(0)
        } else {
            no_privilege(&deleted, table)
        };
        if seen != 0 || !no_privilege(&updated, table) || !deleted_ok {
            failures.push(format!(
                "stranger on {table}: sees {seen}, UPDATE {updated:?}, DELETE {deleted:?}"
            ));
        }
        if let Some(update) = noop_update_of_tenant_columns(table) {
            let got = affected(&mut s, &update);
            if got != Ok(0) {
                failures.push(format!("stranger: {update}: {got:?}, expected 0 rows"));
            }
        }
    }
    // A producer of app A sees app A's handlers and triggers (enqueue resolves them with its
    // rights) but not its pending events, dead letters or other callers' inboxes.
    let a = t.app_a;
    let producer_sees: [(&str, i64); 13] = [
        ("apps", 1),
        ("app_roles", 1),
        ("scripts", 1),
        ("triggers", 3),
        ("kv_trigger_details", 1),
        ("dead_letter_trigger_details", 1),
        ("cron_trigger_details", 1),
        ("outbox", 0),
        ("idempotency_keys", 1),
        ("dead_letters", 0),
        ("inboxes", 1),
        ("abandoned_executions", 0),
        ("key_blocks", 0),
    ];
    for (table, want) in producer_sees {
        let all = count(
            &mut t.producer,
            &format!("SELECT count(*) FROM picloud.{table}"),
        );
        let of_a = count(
            &mut t.producer,
            &format!("SELECT count(*) FROM picloud.{table} WHERE app_id = '{a}'"),
        );
        if all != want || of_a != want {
            failures.push(format!(
                "producer on {table}: sees {all} rows ({of_a} of app A), expected {want}"
            ));
        }
    }
    // Inboxes are the producer's own business (it opens them); every other table is checked.
    for table in TABLES.into_iter().filter(|table| *table != "inboxes") {
        let updated = affected(
            &mut t.producer,
            &format!("UPDATE picloud.{table} SET app_id = app_id"),
        );
        let deleted = affected(&mut t.producer, &format!("DELETE FROM picloud.{table}"));
        let deleted_ok = if tenant_may_delete(table) {
            deleted == Ok(0)
        } else {
            no_privilege(&deleted, table)
        };
        if !no_privilege(&updated, table) || !deleted_ok {
            failures.push(format!(
                "producer on {table}: UPDATE {updated:?}, DELETE {deleted:?}, expected 42501 permission denied for table {table} \
                 (0 rows where the privilege exists)"
            ));
        }
        if let Some(update) = noop_update_of_tenant_columns(table) {
            let got = affected(&mut t.producer, &update);
            if got != Ok(0) {
                failures.push(format!("producer: {update}: {got:?}, expected 0 rows"));
            }
        }
    }
    let changed = changed_tables(&everything, &fingerprint(&mut t.su, "true"));
    if !changed.is_empty() {
        failures.push(format!("outsiders changed {changed:?}"));
    }
    drop(s);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// Principals ----------------------------------------------------------------------------------

/// The outcome of running one claimed event as the supervisor would.
#[derive(Debug)]
struct Ran {
    event: Uuid,
    principal: Option<String>,
    principal_error: Option<String>,
    /// Ok(result) or Err((SQLSTATE, message)).
    outcome: Result<Option<serde_json::Value>, (String, String)>,
}

/// Claims every due event as the superuser (the supervisor) and runs each SQL handler in a
/// transaction of its own, committed on success and rolled back on error.
fn claim_and_run(su: &mut Client) -> Vec<Ran> {
    let claimed = su
        .query(
            "SELECT app_id, event_id, principal::text, principal_error FROM picloud.picloud_claim('sec-worker', 1000, 600000)",
            &[],
        )
        .expect("claim");
    let mut ran = Vec::new();
    for row in claimed {
        let (app, event): (Uuid, Uuid) = (row.get(0), row.get(1));
        let mut tx = su.transaction().expect("begin");
        let outcome = match tx.query_one(
            "SELECT picloud.picloud_run_sql_handler($1, $2, 'sec-worker')",
            &[&app, &event],
        ) {
            Ok(r) => {
                let result: Option<serde_json::Value> = r.get(0);
                tx.commit().expect("commit");
                Ok(result)
            }
            Err(e) => {
                let failure = code_and_message(&e);
                tx.rollback().expect("rollback");
                Err(failure)
            }
        };
        let me: String = su
            .query_one("SELECT current_user::text", &[])
            .unwrap()
            .get(0);
        assert_eq!(
            me, "postgres",
            "the supervisor's session is back to its own user"
        );
        ran.push(Ran {
            event,
            principal: row.get(2),
            principal_error: row.get(3),
            outcome,
        });
    }
    ran
}

/// Handlers of tenant_a, in a_schema: `peek` reads tenant_b's b_secret and records what it saw
/// (and as whom) in a_schema.leak.
fn tenant_a_handlers(t: &mut Tenancy) {
    t.a.batch_execute(
        "CREATE TABLE a_schema.leak (who text, secrets bigint);
         CREATE TABLE a_schema.own (n int);
         INSERT INTO a_schema.own VALUES (1), (2), (3);
         CREATE FUNCTION a_schema.peek(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO a_schema.leak SELECT current_user, count(*) FROM public.b_secret;
             RETURN NULL;
         END $$;",
    )
    .expect("tenant_a's handlers");
}

fn leaks(t: &mut Tenancy) -> Vec<String> {
    t.su.query(
        "SELECT who || ' read ' || secrets || ' row(s) of b_secret' FROM a_schema.leak",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A SQL handler runs with its principal's rights only: tenant_a's handler cannot read
/// tenant_b's table, cannot switch back to the supervisor's user, and cannot end the switch
/// without the token.
#[test]
fn sql_handlers_run_with_their_principals_rights_only() {
    let mut t = Tenancy::new("sechandler");
    tenant_a_handlers(&mut t);
    let (a, b) = (t.app_a, t.app_b);
    t.a.batch_execute(&format!(
        "CREATE TABLE a_schema.seen (who text, session_who text, own_rows bigint, visible_apps bigint, visible_b_scripts bigint);
         CREATE FUNCTION a_schema.read_own(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO a_schema.seen SELECT current_user, session_user, (SELECT count(*) FROM a_schema.own),
                 (SELECT count(*) FROM picloud.apps),
                 (SELECT count(*) FROM picloud.scripts WHERE app_id = '{b}');
             RETURN jsonb_build_object('rows', (SELECT count(*) FROM a_schema.own));
         END $$;
         CREATE FUNCTION a_schema.read_b(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
             SELECT jsonb_build_object('secrets', (SELECT count(*) FROM public.b_secret))
         $$;
         CREATE FUNCTION a_schema.reset_role(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN RESET ROLE; INSERT INTO a_schema.leak SELECT current_user, count(*) FROM public.b_secret; RETURN NULL; END $$;
         CREATE FUNCTION a_schema.set_role(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN SET ROLE postgres; INSERT INTO a_schema.leak SELECT current_user, count(*) FROM public.b_secret; RETURN NULL; END $$;
         CREATE FUNCTION a_schema.set_config_role(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN PERFORM set_config('role', 'postgres', false); RETURN NULL; END $$;
         CREATE FUNCTION a_schema.session_auth(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN SET SESSION AUTHORIZATION postgres; RETURN NULL; END $$;
         CREATE FUNCTION a_schema.unbecome(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN PERFORM picloud._unbecome(12345); INSERT INTO a_schema.leak SELECT current_user, count(*) FROM public.b_secret; RETURN NULL; END $$;
         CREATE FUNCTION a_schema.become(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN PERFORM picloud._become_event(gen_random_uuid(), gen_random_uuid()); INSERT INTO a_schema.leak SELECT current_user, count(*) FROM public.b_secret; RETURN NULL; END $$;"
    ))
    .expect("handlers");
    // tenant_b's own handler may read b_secret: the refusals below are about the principal.
    t.b.batch_execute(
        "CREATE FUNCTION b_schema.read_b(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
             SELECT jsonb_build_object('secrets', (SELECT count(*) FROM public.b_secret))
         $$;",
    )
    .expect("tenant_b's handler");
    let handlers: [(&str, &str, Uuid); 9] = [
        ("read_own", "a_schema.read_own", a),
        ("read_b", "a_schema.read_b", a),
        ("peek", "a_schema.peek", a),
        ("reset_role", "a_schema.reset_role", a),
        ("set_role", "a_schema.set_role", a),
        ("set_config_role", "a_schema.set_config_role", a),
        ("session_auth", "a_schema.session_auth", a),
        ("unbecome", "a_schema.unbecome", a),
        ("become", "a_schema.become", a),
    ];
    let mut events = std::collections::HashMap::new();
    for (name, function, app) in handlers {
        let script = id(
            &mut t.a,
            &format!("SELECT picloud_create_script('{app}', '{name}', 'sql', '{function}')"),
        );
        let event = id(
            &mut t.a,
            &format!("SELECT picloud_enqueue('{app}', 'queue', 'run', '{{}}', '{script}')"),
        );
        events.insert(event, name);
    }
    let script = id(
        &mut t.b,
        &format!("SELECT picloud_create_script('{b}', 'read_b', 'sql', 'b_schema.read_b')"),
    );
    let event = id(
        &mut t.b,
        &format!("SELECT picloud_enqueue('{b}', 'queue', 'run', '{{}}', '{script}')"),
    );
    events.insert(event, "tenant_b's read_b");

    let ran = claim_and_run(&mut t.su);
    assert_eq!(ran.len(), events.len(), "{ran:?}");
    let mut failures = Vec::new();
    for r in &ran {
        let name = events[&r.event];
        if r.principal_error.is_some() {
            failures.push(format!(
                "{name}: unexpected principal_error {:?}",
                r.principal_error
            ));
        }
        let expected_principal = if name.starts_with("tenant_b") {
            &t.tenant_b
        } else {
            &t.tenant_a
        };
        if r.principal.as_ref() != Some(expected_principal) {
            failures.push(format!(
                "{name}: principal {:?}, expected {expected_principal}",
                r.principal
            ));
        }
        let (want_code, needle) = match name {
            "read_own" | "tenant_b's read_b" => ("", ""),
            "read_b" | "peek" => ("42501", "permission denied for table b_secret"),
            "reset_role" | "set_role" | "set_config_role" => {
                ("42501", "cannot set parameter \"role\"")
            }
            "session_auth" => ("42501", "cannot set parameter \"session_authorization\""),
            "unbecome" => ("22023", "token"),
            "become" => ("42501", "permission denied for function _become_event"),
            _ => unreachable!(),
        };
        match (&r.outcome, want_code) {
            (Ok(_), "") => {}
            (Err((code, message)), want) if code == want && message.contains(needle) => {}
            (outcome, _) => failures.push(format!(
                "{name}: {outcome:?}, expected {want_code} {needle:?}"
            )),
        }
    }
    // The one handler that ran did so as tenant_a, seeing only app A.
    let seen =
        t.su.query(
            "SELECT who, session_who, own_rows, visible_apps, visible_b_scripts FROM a_schema.seen",
            &[],
        )
        .unwrap();
    if seen.len() != 1 {
        failures.push(format!("read_own ran {} times", seen.len()));
    } else {
        let row = &seen[0];
        let got: (String, String, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        if got != (t.tenant_a.clone(), "postgres".to_string(), 3, 1, 0) {
            failures.push(format!(
                "read_own saw (user, session user, own rows, apps, B's handlers) = {got:?}"
            ));
        }
    }
    let leaked = leaks(&mut t);
    if !leaked.is_empty() {
        failures.push(format!("b_secret leaked: {leaked:?}"));
    }
    // Failed events were rolled back and stay in the outbox; the two that ran are gone.
    let left = count(&mut t.su, "SELECT count(*) FROM picloud.outbox");
    if left != events.len() as i64 - 2 {
        failures.push(format!(
            "{left} events left in the outbox, expected {}",
            events.len() - 2
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Inserting handlers or triggers in someone else's name is refused by the policies' WITH
/// CHECK; renaming one's own to someone else is refused outright (tenants hold no UPDATE on
/// who a handler or trigger runs as).
#[test]
fn nobody_registers_a_handler_that_runs_as_someone_else() {
    let mut t = Tenancy::new("secregister");
    tenant_a_handlers(&mut t);
    let a = t.app_a;
    let (tb, adm) = (t.tenant_b.clone(), t.admin_role.clone());
    let own_script = id(
        &mut t.a,
        &format!("SELECT picloud_create_script('{a}', 'peek', 'sql', 'a_schema.peek')"),
    );
    let own_trigger = id(
        &mut t.a,
        &format!("SELECT picloud_create_kv_trigger('{a}', 'mine', '{own_script}')"),
    );
    let before = fingerprint(&mut t.su, "true");
    let mut failures = Vec::new();
    for other in ["postgres", tb.as_str(), adm.as_str()] {
        // (statement, table, refused by row-level security rather than for want of privilege)
        let attempts = [
            (
                format!(
                    "INSERT INTO picloud.triggers (app_id, kind, script_id, registered_by_principal) VALUES ('{a}', 'kv', '{own_script}', '{other}')"
                ),
                "triggers",
                true,
            ),
            (
                format!(
                    "INSERT INTO picloud.scripts (app_id, name, kind, target, sql_function, registered_by_principal)
                     VALUES ('{a}', 'as_{other}', 'sql', 'a_schema.peek', 'a_schema.peek(jsonb)', '{other}')"
                ),
                "scripts",
                true,
            ),
            (
                format!("UPDATE picloud.scripts SET registered_by_principal = '{other}' WHERE script_id = '{own_script}'"),
                "scripts",
                false,
            ),
        ];
        for (sql, table, by_policy) in &attempts {
            let outcome = affected(&mut t.a, sql);
            let ok = if *by_policy {
                rls_refused(&outcome, table)
            } else {
                no_privilege(&outcome, table)
            };
            if !ok {
                let want = if *by_policy {
                    "row-level security".to_string()
                } else {
                    format!("permission denied for table {table}")
                };
                failures.push(format!("{sql}: {outcome:?}, expected 42501 ({want})"));
            }
        }
    }
    let changed = changed_tables(&before, &fingerprint(&mut t.su, "true"));
    if !changed.is_empty() {
        failures.push(format!("refused registrations changed {changed:?}"));
    }
    // In one's own name it works.
    let ok = affected(
        &mut t.a,
        &format!("INSERT INTO picloud.triggers (app_id, kind, script_id) VALUES ('{a}', 'kv', '{own_script}')"),
    );
    if ok != Ok(1) {
        failures.push(format!("inserting a trigger in one's own name: {ok:?}"));
    }
    // Renaming one's own trigger to another principal must be refused just the same.
    for other in ["postgres", adm.as_str()] {
        let sql = format!("UPDATE picloud.triggers SET registered_by_principal = '{other}' WHERE trigger_id = '{own_trigger}'");
        let outcome = affected(&mut t.a, &sql);
        if !no_privilege(&outcome, "triggers") {
            failures.push(format!(
                "{sql}: {outcome:?}, expected 42501 permission denied for table triggers"
            ));
        }
    }
    let principal = text(&mut t.su, &format!("SELECT registered_by_principal::text FROM picloud.triggers WHERE trigger_id = '{own_trigger}'"));
    if principal.as_deref() != Some(t.tenant_a.as_str()) {
        failures.push(format!("tenant_a's trigger now runs as {principal:?}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The operator (superuser) registered a handler and a KV trigger in app A; tenant_a has its
/// `peek` handler registered. Returns (operator's script, operator's trigger, peek script).
fn operator_and_peek(t: &mut Tenancy) -> (Uuid, Uuid, Uuid) {
    tenant_a_handlers(t);
    let a = t.app_a;
    t.su.batch_execute(
        "CREATE FUNCTION public.operator_handler(e jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT NULL::jsonb $$;
         REVOKE ALL ON FUNCTION public.operator_handler(jsonb) FROM PUBLIC;",
    )
    .unwrap();
    let op_script = id(
        &mut t.su,
        &format!(
            "SELECT picloud_create_script('{a}', 'operator', 'sql', 'public.operator_handler')"
        ),
    );
    let op_trigger = id(
        &mut t.su,
        &format!("SELECT picloud_create_kv_trigger('{a}', 'ops', '{op_script}')"),
    );
    let peek = id(
        &mut t.a,
        &format!("SELECT picloud_create_script('{a}', 'peek', 'sql', 'a_schema.peek')"),
    );
    (op_script, op_trigger, peek)
}

/// After an attempt to borrow someone else's rights: whatever ran, nothing ran with more than
/// tenant_a's rights (a_schema.leak stays empty).
fn assert_no_escalation(
    t: &mut Tenancy,
    attempt: &str,
    outcome: Result<u64, (String, String)>,
    ran: &[Ran],
) {
    let leaked = leaks(t);
    let ran_as: Vec<String> = ran
        .iter()
        .map(|r| {
            format!(
                "principal {:?} (error {:?}) -> {:?}",
                r.principal, r.principal_error, r.outcome
            )
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "privilege escalation: {attempt} -> {outcome:?}; the handler then ran as {ran_as:?} and {leaked:?}"
    );
}

/// An admin of app A re-points its own trigger's principal to a superuser.
#[test]
fn repointing_a_triggers_principal_gains_no_rights() {
    let mut t = Tenancy::new("secrepoint");
    let (_, _, peek) = operator_and_peek(&mut t);
    let a = t.app_a;
    let mine = id(
        &mut t.a,
        &format!("SELECT picloud_create_kv_trigger('{a}', 'mine', '{peek}')"),
    );
    let attempt = format!("UPDATE picloud.triggers SET registered_by_principal = 'postgres' WHERE trigger_id = '{mine}'");
    let outcome = affected(&mut t.a, &attempt);
    t.a.query_one(
        &format!("SELECT picloud_emit_kv('{a}', 'mine', 'set', 'k', '{{}}')"),
        &[],
    )
    .unwrap();
    let ran = claim_and_run(&mut t.su);
    assert_no_escalation(&mut t, &attempt, outcome.clone(), &ran);
    assert!(
        no_privilege(&outcome, "triggers"),
        "{attempt}: {outcome:?}, expected 42501 permission denied for table triggers"
    );
    let principal = text(&mut t.su, &format!("SELECT registered_by_principal::text FROM picloud.triggers WHERE trigger_id = '{mine}'"));
    assert_eq!(
        principal.as_deref(),
        Some(t.tenant_a.as_str()),
        "tenant_a's trigger changed principal"
    );
    // Its event still ran, as tenant_a (and so could not read b_secret).
    assert!(
        ran.len() == 1
            && ran[0].principal.as_deref() == Some(t.tenant_a.as_str())
            && ran[0].principal_error.is_none(),
        "{ran:?}"
    );
    assert!(
        matches!(&ran[0].outcome, Err((code, m)) if code == "42501" && m.contains("b_secret")),
        "{ran:?}"
    );
}

/// tenant_a attempts `attempt` against the operator's handler or trigger, then an event of
/// the operator's trigger runs: the attempt must be refused for lack of privilege on `table`,
/// change nothing, and the operator's trigger must still run the operator's handler as the
/// operator.
fn assert_takeover_refused(t: &mut Tenancy, attempt: &str, table: &str) {
    let a = t.app_a;
    let before = fingerprint(&mut t.su, "true");
    let outcome = affected(&mut t.a, attempt);
    let changed = changed_tables(&before, &fingerprint(&mut t.su, "true"));
    t.a.query_one(
        &format!("SELECT picloud_emit_kv('{a}', 'ops', 'set', 'k', '{{}}')"),
        &[],
    )
    .unwrap();
    let ran = claim_and_run(&mut t.su);
    assert_no_escalation(t, attempt, outcome.clone(), &ran);
    assert!(
        no_privilege(&outcome, table),
        "{attempt}: {outcome:?}, expected 42501 permission denied for table {table}"
    );
    assert!(
        changed.is_empty(),
        "{attempt} was refused, yet changed {changed:?}"
    );
    assert!(
        ran.len() == 1
            && ran[0].principal.as_deref() == Some("postgres")
            && ran[0].principal_error.is_none()
            && ran[0].outcome.is_ok(),
        "{ran:?}"
    );
}

/// An admin of app A points the operator's trigger at its own handler.
#[test]
fn swapping_the_handler_of_someone_elses_trigger_gains_no_rights() {
    let mut t = Tenancy::new("secswap");
    let (_, op_trigger, peek) = operator_and_peek(&mut t);
    let attempt = format!(
        "UPDATE picloud.triggers SET script_id = '{peek}' WHERE trigger_id = '{op_trigger}'"
    );
    assert_takeover_refused(&mut t, &attempt, "triggers");
}

/// An admin of app A rewrites the operator's handler (taking it over in its own name) while
/// the operator's trigger still uses it.
#[test]
fn rewriting_a_handler_used_by_someone_elses_trigger_gains_no_rights() {
    let mut t = Tenancy::new("secrewrite");
    let (op_script, _, _) = operator_and_peek(&mut t);
    let attempt = format!(
        "UPDATE picloud.scripts SET target = 'a_schema.peek', sql_function = 'a_schema.peek(jsonb)',
                registered_by_principal = current_user WHERE script_id = '{op_script}'"
    );
    assert_takeover_refused(&mut t, &attempt, "scripts");
}

/// An admin (and a mere producer) of app A writes outbox rows by hand that name the operator's
/// trigger but tenant_a's handler.
#[test]
fn a_hand_made_outbox_row_cannot_borrow_a_triggers_principal() {
    let mut t = Tenancy::new("secoutbox");
    let (_, op_trigger, peek) = operator_and_peek(&mut t);
    let a = t.app_a;
    let attempt = format!(
        "INSERT INTO picloud.outbox (app_id, source, op, trigger_id, script_id, payload)
         VALUES ('{a}', 'queue', 'x', '{op_trigger}', '{peek}', '{{}}')"
    );
    let by_admin = affected(&mut t.a, &attempt);
    let by_producer = affected(&mut t.producer, &attempt);
    let ran = claim_and_run(&mut t.su);
    assert_no_escalation(
        &mut t,
        &attempt,
        by_admin.clone().and(by_producer.clone()),
        &ran,
    );
    // Producers may insert outbox rows (the enqueue functions do so with their rights), so
    // both rows exist; the pairing is caught when they are claimed: no principal, PC005.
    assert_eq!((by_admin, by_producer), (Ok(1), Ok(1)), "{attempt}");
    assert_eq!(ran.len(), 2, "{ran:?}");
    let needle = format!("handler {peek} is not the handler of trigger {op_trigger}");
    for r in &ran {
        assert!(
            r.principal.is_none(),
            "a hand-made row got principal {:?}: {r:?}",
            r.principal
        );
        assert!(
            r.principal_error
                .as_deref()
                .is_some_and(|e| e.contains(&needle)),
            "principal_error: {r:?}"
        );
        assert!(
            matches!(&r.outcome, Err((code, message)) if code == "PC005" && message.contains(&needle)),
            "run of a hand-made row: {r:?}, expected PC005"
        );
    }
    assert_eq!(
        count(&mut t.su, "SELECT count(*) FROM picloud.outbox"),
        2,
        "refused events stay in the outbox"
    );
}

/// An admin of app A writes a dead letter by hand naming the operator's trigger but its own
/// handler, then replays it.
#[test]
fn a_hand_made_dead_letter_cannot_borrow_a_triggers_principal() {
    let mut t = Tenancy::new("secdeadletter");
    let (_, op_trigger, peek) = operator_and_peek(&mut t);
    let a = t.app_a;
    let attempt = format!(
        "INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, trigger_id, script_id, payload, attempt_count)
         VALUES ('{a}', gen_random_uuid(), 'kv', 'set', '{op_trigger}', '{peek}', '{{}}', 1) RETURNING dead_letter_id"
    );
    let outcome = match t.a.query_one(attempt.as_str(), &[]) {
        Ok(row) => {
            let dl: Uuid = row.get(0);
            affected(
                &mut t.a,
                &format!("SELECT picloud_replay_dead_letter('{a}', '{dl}')"),
            )
        }
        Err(e) => Err(code_and_message(&e)),
    };
    let ran = claim_and_run(&mut t.su);
    assert_no_escalation(&mut t, &attempt, outcome.clone(), &ran);
    // Tenants hold no INSERT on dead_letters: nothing was written, nothing replayed or ran.
    assert!(
        no_privilege(&outcome, "dead_letters"),
        "{attempt}: {outcome:?}, expected 42501 permission denied for table dead_letters"
    );
    assert_eq!(
        count(&mut t.su, "SELECT count(*) FROM picloud.dead_letters"),
        0
    );
    assert!(ran.is_empty(), "{ran:?}");
}

/// A principal that was dropped, or is no longer an admin of the app, runs nothing: the claim
/// reports principal_error and picloud_run_sql_handler refuses with PC005.
#[test]
fn dropped_or_demoted_principals_run_nothing() {
    let mut t = Tenancy::new("secprincipal");
    let a = t.app_a;
    let demoted = t.roles.create(&mut t.su, "demoted");
    let dropped = t.roles.create(&mut t.su, "dropped");
    t.su.batch_execute(&format!(
        "CREATE TABLE public.ran (who text);
         GRANT INSERT, SELECT ON public.ran TO PUBLIC;
         CREATE SCHEMA demoted_schema AUTHORIZATION {demoted};
         CREATE SCHEMA dropped_schema AUTHORIZATION {dropped};
         SELECT picloud_grant_app_role('{a}', '{demoted}', 'admin');
         SELECT picloud_grant_app_role('{a}', '{dropped}', 'admin');"
    ))
    .unwrap();
    // Each of tenant_a, demoted and dropped registers a handler and a KV trigger, and each
    // handler also gets a direct (trigger-less) event.
    let setup = |c: &mut Client, schema: &str, collection: &str| -> (Uuid, Uuid) {
        c.batch_execute(&format!(
            "CREATE FUNCTION {schema}.h(e jsonb) RETURNS jsonb LANGUAGE sql AS $$ INSERT INTO public.ran VALUES (current_user) RETURNING NULL::jsonb $$;"
        ))
        .unwrap();
        let script = id(
            c,
            &format!("SELECT picloud_create_script('{a}', '{collection}', 'sql', '{schema}.h')"),
        );
        let trigger = id(
            c,
            &format!("SELECT picloud_create_kv_trigger('{a}', '{collection}', '{script}')"),
        );
        id(
            c,
            &format!("SELECT picloud_enqueue('{a}', 'queue', 'direct', '{{}}', '{script}')"),
        );
        (script, trigger)
    };
    let mut c_demoted = login(&t.db, &demoted);
    let mut c_dropped = login(&t.db, &dropped);
    setup(&mut t.a, "a_schema", "by_a");
    setup(&mut c_demoted, "demoted_schema", "by_demoted");
    setup(&mut c_dropped, "dropped_schema", "by_dropped");
    drop(c_demoted);
    drop(c_dropped);
    for collection in ["by_a", "by_demoted", "by_dropped"] {
        let n: i32 = t
            .producer
            .query_one(
                &format!("SELECT picloud_emit_kv('{a}', '{collection}', 'set', 'k', '{{}}')"),
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "{collection}");
    }
    // demoted keeps a producer role, but is no longer an admin of app A.
    t.su.batch_execute(&format!(
        "SELECT picloud_grant_app_role('{a}', '{demoted}', 'producer')"
    ))
    .unwrap();
    let revoked: bool = t
        .admin
        .query_one(
            &format!("SELECT picloud_revoke_app_role('{a}', '{demoted}', 'admin')"),
            &[],
        )
        .unwrap()
        .get(0);
    assert!(revoked);
    t.su.batch_execute(&format!(
        "REASSIGN OWNED BY {dropped} TO postgres; DROP OWNED BY {dropped}; DROP ROLE {dropped};"
    ))
    .unwrap();

    let ran = claim_and_run(&mut t.su);
    assert_eq!(ran.len(), 6, "{ran:?}");
    let mut failures = Vec::new();
    for r in &ran {
        let principal = r.principal.clone().unwrap_or_default();
        if principal == t.tenant_a {
            if r.principal_error.is_some() || r.outcome.is_err() {
                failures.push(format!("tenant_a's handler should run: {r:?}"));
            }
            continue;
        }
        let needle = if principal == demoted {
            "is no longer an administrator of app"
        } else if principal == dropped {
            "no longer exists"
        } else {
            failures.push(format!("unexpected principal: {r:?}"));
            continue;
        };
        let error = r.principal_error.clone().unwrap_or_default();
        if !(error.contains(needle) && error.contains(&principal)) {
            failures.push(format!(
                "claim of {principal}'s event: principal_error {:?}, expected {needle:?}",
                r.principal_error
            ));
        }
        match &r.outcome {
            Err((code, message)) if code == "PC005" && message.contains(needle) => {}
            other => failures.push(format!(
                "run of {principal}'s event: {other:?}, expected PC005"
            )),
        }
    }
    let ran_as: Vec<String> =
        t.su.query("SELECT who FROM public.ran", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    if ran_as != vec![t.tenant_a.clone(), t.tenant_a.clone()] {
        failures.push(format!(
            "handlers ran as {ran_as:?}, expected tenant_a's two only"
        ));
    }
    // Refused events stay claimed in the outbox (their transactions rolled back).
    let left = count(&mut t.su, "SELECT count(*) FROM picloud.outbox");
    if left != 4 {
        failures.push(format!("{left} events left, expected the 4 refused ones"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
