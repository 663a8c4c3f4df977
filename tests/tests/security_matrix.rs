//! Security, the function matrix: which role may call which function on which app, one test per
//! group of the API (the table is tests/tests/security/function_table.rs).
//!
//! The cast: tenant_a administers app A, tenant_b administers app B, `admin` is a member of
//! picloud_admin, `producer` may only enqueue into app A, and `nobody` is a LOGIN role with no
//! picloud rights at all. Roles are cluster-wide, so every test creates its own, named uniquely
//! per run, and drops them (with what they own in the test database) when it ends.

#[path = "security/function_table.rs"]
mod function_table;
#[path = "security/harness.rs"]
mod harness;

use function_table::*;
use harness::*;
use picloud_tests::*;
use uuid::Uuid;

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

/// Calls every function of `specs` as every role of its kind on its own and the other tenant's
/// app, in a tenancy of its own: who may call it is asserted by outcome (the rows it changed,
/// the value it returned) and, for a refusal, by SQLSTATE and message, with every picloud table
/// unchanged afterwards. Panics with every failing case, each named by function, role and app.
fn run_matrix(group: &str, specs: Vec<Spec>) {
    let mut t = Tenancy::new("secmatrix");
    let mut failures = Vec::new();
    let mut asserted = 0;
    let mut functions = 0;
    for spec in specs {
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
    eprintln!(
        "function matrix, {group}: {functions} functions, {asserted} (function, role, app) cases"
    );
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
        "{group}: {} of {asserted} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Each group of the table, and nothing else, is run by the test named after it.
#[test]
fn every_group_of_the_table_has_its_test() {
    let names: Vec<&str> = groups().into_iter().map(|(name, _)| name).collect();
    assert_eq!(
        names,
        [
            "apps_and_app_roles",
            "handlers",
            "triggers",
            "enqueueing_and_synchronous_calls",
            "pending_events_and_dead_letters",
            "operator_and_lane_functions",
            "supervisor_functions",
            "housekeeping_steps",
        ]
    );
}

/// The table still asks at least 250 (function, role, app) cases.
#[test]
fn the_matrix_keeps_its_cases() {
    let asserted: usize = specs().iter().map(|spec| cases(spec.kind).len()).sum();
    assert!(asserted >= 250, "matrix shrank to {asserted} cases");
}

#[test]
fn matrix_apps_and_app_roles() {
    run_matrix("apps and app roles", apps_and_app_roles());
}

#[test]
fn matrix_handlers() {
    run_matrix("handlers", handlers());
}

#[test]
fn matrix_triggers() {
    run_matrix("triggers", triggers());
}

#[test]
fn matrix_enqueueing_and_synchronous_calls() {
    run_matrix(
        "enqueueing and synchronous calls",
        enqueueing_and_synchronous_calls(),
    );
}

#[test]
fn matrix_pending_events_and_dead_letters() {
    run_matrix(
        "pending events and dead letters",
        pending_events_and_dead_letters(),
    );
}

#[test]
fn matrix_operator_and_lane_functions() {
    run_matrix("operator and lane functions", operator_and_lane_functions());
}

#[test]
fn matrix_supervisor_functions() {
    run_matrix("supervisor functions", supervisor_functions());
}

#[test]
fn matrix_housekeeping_steps() {
    run_matrix("housekeeping steps", housekeeping_steps());
}
