//! The security suites' shared harness: unique role names, the five-role tenancy of two apps
//! with its fixtures, and fingerprints of picloud's tables. Included by tests/tests/security_*.rs
//! (`#[path = "security/harness.rs"] mod harness;`); each suite uses part of it.
#![allow(dead_code)]

use picloud_tests::*;
use postgres::{Client, NoTls};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use uuid::Uuid;

static NAMES: AtomicU32 = AtomicU32::new(0);

pub fn unique(tag: &str) -> String {
    format!(
        "sec_{tag}_{}_{}",
        std::process::id(),
        NAMES.fetch_add(1, Ordering::SeqCst)
    )
}

/// `fresh_db`, retried once: the cluster may be restarting under us.
pub fn database(tag: &str) -> (String, Client) {
    match std::panic::catch_unwind(|| fresh_db(tag)) {
        Ok(db) => db,
        Err(_) => {
            std::thread::sleep(Duration::from_secs(3));
            fresh_db(tag)
        }
    }
}

/// `connect_as`, retried once.
pub fn login(db: &str, user: &str) -> Client {
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
pub struct Roles {
    pub db: String,
    pub names: Vec<String>,
}

impl Roles {
    pub fn create(&mut self, su: &mut Client, tag: &str) -> String {
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

pub fn code_and_message(e: &postgres::Error) -> (String, String) {
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

pub fn text(c: &mut Client, sql: &str) -> Option<String> {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

pub fn flag(c: &mut Client, sql: &str) -> bool {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

pub fn id(c: &mut Client, sql: &str) -> Uuid {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// (table, row count, md5 of all rows) for every picloud table, as the superuser sees them;
/// `filter` narrows every table (e.g. to one app).
pub fn fingerprint(su: &mut Client, filter: &str) -> Vec<(String, i64, String)> {
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

pub fn changed_tables(
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
pub enum Who {
    TenantA,
    TenantB,
    Admin,
    Producer,
    Nobody,
}

/// Two apps and the five roles described at the top, each with a connection of its own.
pub struct Tenancy {
    pub db: String,
    pub su: Client,
    pub a: Client,
    pub b: Client,
    pub admin: Client,
    pub producer: Client,
    pub nobody: Client,
    pub tenant_a: String,
    pub tenant_b: String,
    pub admin_role: String,
    pub producer_role: String,
    pub nobody_role: String,
    /// A bystander role the matrix grants and revokes app roles to.
    pub extra_role: String,
    pub app_a: Uuid,
    pub app_b: Uuid,
    pub n: u32,
    // Last, so it is dropped after every connection above.
    pub roles: Roles,
}

impl Tenancy {
    pub fn new(tag: &str) -> Tenancy {
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

    pub fn client(&mut self, who: Who) -> &mut Client {
        match who {
            Who::TenantA => &mut self.a,
            Who::TenantB => &mut self.b,
            Who::Admin => &mut self.admin,
            Who::Producer => &mut self.producer,
            Who::Nobody => &mut self.nobody,
        }
    }

    pub fn role(&self, who: Who) -> String {
        match who {
            Who::TenantA => self.tenant_a.clone(),
            Who::TenantB => self.tenant_b.clone(),
            Who::Admin => self.admin_role.clone(),
            Who::Producer => self.producer_role.clone(),
            Who::Nobody => self.nobody_role.clone(),
        }
    }

    /// Does `who` hold the enqueue capability in `app` (what RLS shows handlers and triggers by)?
    pub fn may_enqueue(&self, who: Who, app: Uuid) -> bool {
        match who {
            Who::Admin => true,
            Who::TenantA | Who::Producer => app == self.app_a,
            Who::TenantB => app == self.app_b,
            Who::Nobody => false,
        }
    }

    pub fn next(&mut self) -> u32 {
        self.n += 1;
        self.n
    }

    // Fixtures, made by the superuser (so registered by "postgres").

    pub fn script(&mut self, app: Uuid) -> Uuid {
        let n = self.next();
        id(
            &mut self.su,
            &format!("SELECT picloud_create_script('{app}', 'fx{n}', 'command', 'noop')"),
        )
    }

    /// A KV trigger on a collection of its own; returns (trigger, collection).
    pub fn trigger(&mut self, app: Uuid, enabled: bool) -> (Uuid, String) {
        let script = self.script(app);
        let collection = format!("fx{}", self.next());
        let trigger = id(
            &mut self.su,
            &format!("SELECT picloud_create_kv_trigger('{app}', '{collection}', '{script}', p_enabled => {enabled})"),
        );
        (trigger, collection)
    }

    /// An hourly cron trigger.
    pub fn cron_trigger(&mut self, app: Uuid) -> Uuid {
        let script = self.script(app);
        id(
            &mut self.su,
            &format!("SELECT picloud_create_cron_trigger('{app}', '@hourly', '{script}')"),
        )
    }

    pub fn event(&mut self, app: Uuid) -> Uuid {
        let script = self.script(app);
        id(
            &mut self.su,
            &format!("SELECT picloud_enqueue('{app}', 'queue', 'fx', '{{}}', '{script}')"),
        )
    }

    /// An event the worker 'intruder' holds the lease on.
    pub fn claimed_event(&mut self, app: Uuid) -> Uuid {
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
    pub fn dead_letter(&mut self, app: Uuid) -> (Uuid, Uuid) {
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

    pub fn abandoned(&mut self, app: Uuid) -> Uuid {
        id(
            &mut self.su,
            &format!(
                "INSERT INTO picloud.abandoned_executions (app_id, event_id, reply_to, succeeded, reason)
                 VALUES ('{app}', gen_random_uuid(), 'gone', true, 'fixture') RETURNING abandoned_id"
            ),
        )
    }
}

pub fn affected(c: &mut Client, sql: &str) -> Result<u64, (String, String)> {
    c.execute(sql, &[]).map_err(|e| code_and_message(&e))
}

/// Refused for want of a table (or column) privilege.
pub fn no_privilege(outcome: &Result<u64, (String, String)>, table: &str) -> bool {
    matches!(outcome, Err((code, message)) if code == "42501" && *message == format!("permission denied for table {table}"))
}

/// Refused by a policy's WITH CHECK.
pub fn rls_refused(outcome: &Result<u64, (String, String)>, table: &str) -> bool {
    matches!(outcome, Err((code, message))
        if code == "42501" && message.contains("row-level security") && message.contains(&format!("\"{table}\"")))
}
