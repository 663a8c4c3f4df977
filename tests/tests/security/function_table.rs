//! The role x function table of the security matrix (tests/tests/security_matrix.rs): for every
//! public function, which roles may call it on which app (`cases`), and how one call of it is
//! made, checked and cleaned up (`Spec`). Grouped as the API is; each group is a test of its own.

use crate::harness::*;
use uuid::Uuid;

/// One call of the matrix: `sql` returns one row with one text column; on success that value
/// must equal `value` (when given) and the superuser's `check` must be true afterwards.
/// `cleanup` (superuser) runs after the case whatever happened.
#[derive(Default)]
pub struct Call {
    pub sql: String,
    pub value: Option<String>,
    pub check: Option<String>,
    pub cleanup: Option<String>,
}

pub fn call(sql: impl Into<String>) -> Call {
    Call {
        sql: sql.into(),
        ..Call::default()
    }
}

impl Call {
    pub fn value(mut self, v: impl Into<String>) -> Call {
        self.value = Some(v.into());
        self
    }
    pub fn check(mut self, sql: impl Into<String>) -> Call {
        self.check = Some(sql.into());
        self
    }
    pub fn cleanup(mut self, sql: impl Into<String>) -> Call {
        self.cleanup = Some(sql.into());
        self
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Expect {
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
pub enum Kind {
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
pub enum App {
    A,
    B,
}

pub fn cases(kind: Kind) -> Vec<(Who, App, Expect)> {
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

pub type Build = fn(&mut Tenancy, Who, Uuid) -> Call;

pub struct Spec {
    pub func: &'static str,
    pub kind: Kind,
    pub build: Build,
}

const TRIG: Kind = Kind::Manage("AppManageTriggers");
const DEAD: Kind = Kind::Manage("AppDeadLetterManage");

/// Every group of the table, each with the name its test carries.
pub fn groups() -> Vec<(&'static str, Vec<Spec>)> {
    vec![
        ("apps_and_app_roles", apps_and_app_roles()),
        ("handlers", handlers()),
        ("triggers", triggers()),
        (
            "enqueueing_and_synchronous_calls",
            enqueueing_and_synchronous_calls(),
        ),
        (
            "pending_events_and_dead_letters",
            pending_events_and_dead_letters(),
        ),
        ("operator_and_lane_functions", operator_and_lane_functions()),
        ("supervisor_functions", supervisor_functions()),
        ("housekeeping_steps", housekeeping_steps()),
    ]
}

/// The whole table.
pub fn specs() -> Vec<Spec> {
    groups().into_iter().flat_map(|(_, specs)| specs).collect()
}

/// Apps and app roles.
pub fn apps_and_app_roles() -> Vec<Spec> {
    vec![
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
    ]
}

/// Handlers.
pub fn handlers() -> Vec<Spec> {
    vec![
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
    ]
}

/// Triggers.
pub fn triggers() -> Vec<Spec> {
    vec![
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
    ]
}

/// Enqueueing and synchronous calls.
pub fn enqueueing_and_synchronous_calls() -> Vec<Spec> {
    vec![
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
    ]
}

/// Pending events and dead letters.
pub fn pending_events_and_dead_letters() -> Vec<Spec> {
    vec![
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
    ]
}

/// The operator's views and waits, the sql lanes, claimed batches and picloud_gc_pass.
pub fn operator_and_lane_functions() -> Vec<Spec> {
    vec![
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
            func: "picloud_lock_sql_lane_event_for_run",
            kind: Kind::Supervisor,
            build: |t, _, app| {
                let event = t.event(app);
                call(format!(
                    "SELECT count(*)::text FROM picloud.picloud_lock_sql_lane_event_for_run('{app}', '{event}')"
                ))
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
    ]
}

/// The supervisor's functions.
pub fn supervisor_functions() -> Vec<Spec> {
    vec![
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
    ]
}

/// Housekeeping steps: picloud_gc_pass calls them with picloud_admin's rights.
pub fn housekeeping_steps() -> Vec<Spec> {
    vec![
        Spec {
            func: "picloud._gc_step",
            kind: Kind::Housekeeping,
            build: |t, _, app| gc_case(t, app, "rescue_leases"),
        },
        Spec {
            func: "picloud._gc_step",
            kind: Kind::Housekeeping,
            build: |t, _, app| gc_case(t, app, "dead_letters"),
        },
        Spec {
            func: "picloud._gc_step",
            kind: Kind::Housekeeping,
            build: |t, _, app| gc_case(t, app, "abandoned_executions"),
        },
        Spec {
            func: "picloud._gc_step",
            kind: Kind::Housekeeping,
            build: |t, _, app| gc_case(t, app, "inboxes"),
        },
        Spec {
            func: "picloud._gc_step",
            kind: Kind::Housekeeping,
            build: |t, _, app| gc_case(t, app, "idempotency_keys"),
        },
        Spec {
            func: "picloud._gc_step",
            kind: Kind::Housekeeping,
            build: |t, _, app| gc_case(t, app, "event_counts"),
        },
        Spec {
            func: "picloud._count_outcome",
            kind: Kind::Housekeeping,
            build: |t, _, app| {
                let source = format!("s{}", t.next());
                call(format!("SELECT 'counted' FROM (SELECT picloud._count_outcome('{app}', '{source}', 1, 2, 3)) AS c"))
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
pub fn gc_case(t: &mut Tenancy, app: Uuid, step: &str) -> Call {
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
        call(format!("SELECT picloud._gc_step('{step}', 10000)::text"))
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
