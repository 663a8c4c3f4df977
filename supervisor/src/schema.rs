//! What the database's picloud schema offers, decided in one place from its `extversion`.
//!
//! A supervisor meets older schemas during an upgrade: packages are installed and the
//! supervisors restarted before `ALTER EXTENSION picloud UPDATE` has run everywhere
//! (docs/operations.md, "Upgrade"). Every connection reads the version once when it is
//! admitted (`db::Database`), and each difference between releases is a method here, instead
//! of each caller probing for a missing function by catching its error.

use std::fmt;

/// A picloud release, as `extversion` spells it (`major.minor.patch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u16, pub u16, pub u16);

impl Version {
    /// The release this supervisor was built with: it knows every function up to here.
    pub const CURRENT: Version = Version(0, 4, 0);

    /// `None` for anything but three dot-separated numbers.
    pub fn parse(text: &str) -> Option<Version> {
        let mut parts = text.trim().split('.').map(|part| part.parse::<u16>().ok());
        let version = Version(parts.next()??, parts.next()??, parts.next()??);
        match parts.next() {
            None => Some(version),
            Some(_) => None,
        }
    }

    /// Packed for an atomic; the inverse of `unpack`.
    pub fn pack(self) -> u64 {
        (u64::from(self.0) << 32) | (u64::from(self.1) << 16) | u64::from(self.2)
    }

    pub fn unpack(packed: u64) -> Version {
        Version((packed >> 32) as u16, (packed >> 16) as u16, packed as u16)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// The schema a connection found. A version newer than `Version::CURRENT` offers everything
/// this supervisor knows how to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schema {
    pub version: Version,
}

impl Schema {
    fn since(&self, version: Version) -> bool {
        self.version >= version
    }

    /// `picloud_next_due_at` (0.2.0): the idle wait follows the next due event instead of the
    /// poll interval.
    pub fn next_due_at(&self) -> bool {
        self.since(Version(0, 2, 0))
    }

    /// `picloud_claim(..., p_leave_sql_lane)` (0.2.0): claims can leave sql-handler events to
    /// the lanes.
    pub fn claim_leaves_sql_lane(&self) -> bool {
        self.since(Version(0, 2, 0))
    }

    /// The lanes' lock-then-run statements (0.3.0).
    pub fn sql_lanes(&self) -> bool {
        self.since(Version(0, 3, 0))
    }

    /// From 0.4.0: `picloud_claim`'s per-app cap, `picloud_leave_sql_lane` (a failed lane batch
    /// handed back to claims), `picloud_signing_secrets`, and claims returning the event
    /// document (`picloud.claimed_event`).
    pub fn per_app_cap(&self) -> bool {
        self.since(Version(0, 4, 0))
    }

    pub fn leave_sql_lane(&self) -> bool {
        self.since(Version(0, 4, 0))
    }

    pub fn signing_secrets(&self) -> bool {
        self.since(Version(0, 4, 0))
    }

    /// The http lanes (0.4.0): `picloud_lock_http_lane`, `picloud_complete_lane`, and claims
    /// that leave http events to them.
    pub fn http_lanes(&self) -> bool {
        self.since(Version(0, 4, 0))
    }

    /// `picloud_complete_many` (0.4.0): finished events reported together.
    pub fn complete_many(&self) -> bool {
        self.since(Version(0, 4, 0))
    }

    /// The statement that reads the version; no row means the extension is not installed.
    pub const QUERY: &'static str =
        "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'picloud'";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_compare_and_pack() {
        assert_eq!(Version::parse("0.4.0"), Some(Version(0, 4, 0)));
        assert_eq!(Version::parse(" 1.12.3 "), Some(Version(1, 12, 3)));
        for bad in ["", "0.4", "0.4.0.1", "0.x.0", "-1.0.0", "0.4.0-beta"] {
            assert_eq!(Version::parse(bad), None, "{bad}");
        }
        assert!(Version(0, 10, 0) > Version(0, 9, 9));
        for v in [Version(0, 0, 0), Version(0, 4, 0), Version(65535, 1, 65535)] {
            assert_eq!(Version::unpack(v.pack()), v);
        }
    }

    #[test]
    fn the_current_version_is_the_packages() {
        assert_eq!(
            Version::parse(env!("CARGO_PKG_VERSION")),
            Some(Version::CURRENT)
        );
    }

    #[test]
    fn each_feature_starts_at_its_release() {
        let at = |v: (u16, u16, u16)| Schema {
            version: Version(v.0, v.1, v.2),
        };
        let old = at((0, 1, 0));
        assert!(!old.next_due_at() && !old.sql_lanes() && !old.per_app_cap());
        let previous = at((0, 3, 0));
        assert!(previous.next_due_at() && previous.sql_lanes() && previous.claim_leaves_sql_lane());
        assert!(
            !previous.per_app_cap() && !previous.leave_sql_lane() && !previous.signing_secrets()
        );
        let newer = at((1, 0, 0));
        assert!(newer.per_app_cap() && newer.leave_sql_lane() && newer.signing_secrets());
        let current = Schema {
            version: Version::CURRENT,
        };
        assert!(current.signing_secrets() && current.per_app_cap());
    }
}
