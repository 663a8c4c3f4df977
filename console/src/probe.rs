//! The start-up check that signing in proves something: the database must refuse a wrong
//! password. Where it does not (`trust` in pg_hba.conf), anyone reaching the console could
//! sign in as any role, so the console then listens on loopback only.

use std::net::SocketAddr;

use crate::db::Target;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The server refused the wrong password (28P01): passwords are checked.
    PasswordsChecked,
    /// The server let the role in with a wrong password.
    PasswordsIgnored,
    /// The probe could not tell (the server unreachable, the role unknown, ...).
    Unknown(String),
}

pub async fn probe(target: &Target, role: &str) -> Verdict {
    let wrong = format!("picloud-console-probe-{}", rand::random::<u64>());
    match target.connect_as(role, &wrong).await {
        Ok(_client) => Verdict::PasswordsIgnored,
        Err(e) => match e.code().map(|c| c.code()) {
            Some("28P01") => Verdict::PasswordsChecked,
            _ => Verdict::Unknown(e.to_string()),
        },
    }
}

/// Whether the console may listen on `listen` after `verdict`; the reason when not.
pub fn allows(verdict: &Verdict, listen: SocketAddr, role: &str) -> Result<(), String> {
    if listen.ip().is_loopback() {
        return Ok(());
    }
    match verdict {
        Verdict::PasswordsChecked => Ok(()),
        Verdict::PasswordsIgnored => Err(format!(
            "refusing to listen on {listen}: the database let role \"{role}\" sign in with a wrong \
             password (trust authentication?), so a sign-in would prove nothing. Require \
             scram-sha-256 in pg_hba.conf, or listen on 127.0.0.1"
        )),
        Verdict::Unknown(why) => Err(format!(
            "refusing to listen on {listen}: could not check that the database refuses a wrong \
             password for role \"{role}\" ({why}). Pass --probe-role with a role that exists, or \
             listen on 127.0.0.1"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_checked_password_opens_more_than_loopback() {
        let loopback: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let v6_loopback: SocketAddr = "[::1]:1".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:1".parse().unwrap();
        let unknown = Verdict::Unknown("connection refused".into());
        for verdict in [
            Verdict::PasswordsChecked,
            Verdict::PasswordsIgnored,
            unknown.clone(),
        ] {
            assert!(allows(&verdict, loopback, "r").is_ok());
            assert!(allows(&verdict, v6_loopback, "r").is_ok());
        }
        assert!(allows(&Verdict::PasswordsChecked, any, "r").is_ok());
        let refused = allows(&Verdict::PasswordsIgnored, any, "r").unwrap_err();
        assert!(refused.contains("wrong password"), "{refused}");
        assert!(allows(&unknown, any, "r").is_err());
    }
}
