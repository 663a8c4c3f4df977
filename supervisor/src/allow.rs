//! The `--http-allow` list and the address checks made before any HTTP
//! connection is opened.
//!
//! Two checks apply, in this order:
//! 1. the URL's host (or host:port) must be listed;
//! 2. every address the host resolves to is classified; loopback, private,
//!    link-local, unspecified and cloud-metadata addresses are refused unless
//!    that exact IP literal or the host name itself is listed.
//!
//! The connection is then made to one of the checked addresses, never to a
//! fresh resolution of the name, so DNS cannot change the answer in between.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The address cloud providers serve instance metadata (and credentials) on.
const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    /// A DNS name, lower-cased and without a trailing dot.
    Name(String),
}

impl Host {
    /// Parses a host written without brackets or port.
    pub fn parse(text: &str) -> Result<Host, String> {
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Host::Ip(ip.to_canonical()));
        }
        let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !valid {
            return Err(format!("invalid host name '{text}'"));
        }
        Ok(Host::Name(name))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

/// Splits `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 literal.
pub fn split_host_port(text: &str) -> Result<(Host, Option<u16>), String> {
    if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("missing ']' in '{text}'"))?;
        let ip = inside
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("invalid IPv6 address '{inside}'"))?;
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(parse_port(port)?),
                None => return Err(format!("unexpected text after ']' in '{text}'")),
            },
        };
        return Ok((Host::Ip(IpAddr::V6(ip).to_canonical()), port));
    }
    if text.matches(':').count() >= 2 {
        // More than one colon can only be an IPv6 literal without a port.
        let ip = text.parse::<IpAddr>().map_err(|_| {
            format!("invalid address '{text}' (write IPv6 with a port as [addr]:port)")
        })?;
        return Ok((Host::Ip(ip.to_canonical()), None));
    }
    match text.split_once(':') {
        Some((host, port)) => Ok((Host::parse(host)?, Some(parse_port(port)?))),
        None => Ok((Host::parse(text)?, None)),
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("invalid port '{text}'")),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowEntry {
    pub host: Host,
    /// `None` allows every port of the host.
    pub port: Option<u16>,
}

impl AllowEntry {
    pub fn parse(text: &str) -> Result<AllowEntry, String> {
        let text = text.trim();
        if text.contains('*') {
            return Err(format!("'{text}': wildcards are not supported"));
        }
        if text.contains('/') {
            return Err(format!("'{text}': expected host or host:port, not a URL"));
        }
        let (host, port) = split_host_port(text).map_err(|e| format!("'{text}': {e}"))?;
        Ok(AllowEntry { host, port })
    }

    fn matches(&self, host: &Host, port: u16) -> bool {
        self.host == *host && self.port.is_none_or(|p| p == port)
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.host, self.port) {
            (Host::Ip(IpAddr::V6(ip)), None) => write!(f, "{ip}"),
            (host, None) => write!(f, "{host}"),
            (host, Some(port)) => write!(f, "{host}:{port}"),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    pub entries: Vec<AllowEntry>,
}

impl AllowList {
    /// Parses entries that may each be comma-separated; empty items (a
    /// trailing comma) are skipped.
    pub fn parse(items: &[String]) -> Result<AllowList, String> {
        let mut entries = Vec::new();
        for item in items {
            for part in item.split(',') {
                if part.trim().is_empty() {
                    continue;
                }
                let entry = AllowEntry::parse(part)?;
                if !entries.contains(&entry) {
                    entries.push(entry);
                }
            }
        }
        Ok(AllowList { entries })
    }

    pub fn lists(&self, host: &Host, port: u16) -> bool {
        self.entries.iter().any(|entry| entry.matches(host, port))
    }

    /// Checks a target whose host resolved to `resolved`. Returns the reason
    /// for a refusal; the caller prefixes it with "http target not allowed".
    pub fn check(&self, host: &Host, port: u16, resolved: &[SocketAddr]) -> Result<(), String> {
        if !self.lists(host, port) {
            return Err(format!("{host}:{port} is not in --http-allow"));
        }
        if resolved.is_empty() {
            return Err(format!("{host} resolved to no address"));
        }
        for addr in resolved {
            let ip = addr.ip().to_canonical();
            let Some(kind) = special_kind(ip) else {
                continue;
            };
            // Only the address itself in the allow list lets a request reach an internal
            // address: a listed name whose DNS answer points inside (rebinding, a hijacked
            // record) is refused.
            let explicitly_listed = self.lists(&Host::Ip(ip), port);
            if !explicitly_listed {
                return Err(format!(
                    "{host} resolves to {kind} address {ip}; list that address in --http-allow to allow it"
                ));
            }
        }
        Ok(())
    }
}

/// Classifies addresses that must not be reached unless explicitly listed.
/// Returns `None` for ordinary (public) addresses.
pub fn special_kind(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            if v4 == METADATA_V4 {
                Some("metadata")
            } else if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.octets()[0] == 0 {
                // 0.0.0.0/8 reaches the local host on common systems.
                Some("unspecified")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if first & 0xfe00 == 0xfc00 {
                Some("private")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    fn addr(text: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip(text), port)
    }

    fn list(items: &[&str]) -> AllowList {
        let items: Vec<String> = items.iter().map(|s| s.to_string()).collect();
        match AllowList::parse(&items) {
            Ok(list) => list,
            Err(e) => panic!("allow list did not parse: {e}"),
        }
    }

    fn host(text: &str) -> Host {
        match Host::parse(text) {
            Ok(host) => host,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn classifies_addresses() {
        assert_eq!(special_kind(ip("127.0.0.1")), Some("loopback"));
        assert_eq!(special_kind(ip("127.8.9.10")), Some("loopback"));
        assert_eq!(special_kind(ip("169.254.169.254")), Some("metadata"));
        assert_eq!(special_kind(ip("169.254.1.1")), Some("link-local"));
        assert_eq!(special_kind(ip("10.1.2.3")), Some("private"));
        assert_eq!(special_kind(ip("172.16.0.1")), Some("private"));
        assert_eq!(special_kind(ip("172.31.255.255")), Some("private"));
        assert_eq!(special_kind(ip("192.168.1.1")), Some("private"));
        assert_eq!(special_kind(ip("0.0.0.0")), Some("unspecified"));
        assert_eq!(special_kind(ip("::1")), Some("loopback"));
        assert_eq!(special_kind(ip("::")), Some("unspecified"));
        assert_eq!(special_kind(ip("fe80::1")), Some("link-local"));
        assert_eq!(special_kind(ip("fd00::1")), Some("private"));
        assert_eq!(special_kind(ip("fc00::1")), Some("private"));
        // IPv4-mapped IPv6 is judged by the IPv4 address inside.
        assert_eq!(special_kind(ip("::ffff:127.0.0.1")), Some("loopback"));
        assert_eq!(special_kind(ip("::ffff:169.254.169.254")), Some("metadata"));
        // Public addresses.
        assert_eq!(special_kind(ip("93.184.216.34")), None);
        assert_eq!(special_kind(ip("172.32.0.1")), None);
        assert_eq!(special_kind(ip("2606:4700::1111")), None);
    }

    #[test]
    fn parses_entries() {
        let allow = list(&[
            "example.com, api.example.com:8080",
            "[::1]:9000",
            "::1",
            "10.0.0.5",
        ]);
        assert_eq!(allow.entries.len(), 5);
        assert_eq!(allow.entries[1].port, Some(8080));
        assert_eq!(allow.entries[2].host, Host::Ip(ip("::1")));
        assert_eq!(allow.entries[2].port, Some(9000));
        assert_eq!(allow.entries[3].port, None);
        assert_eq!(allow.entries[0].to_string(), "example.com");
        assert!(AllowList::parse(&["*.example.com".to_string()]).is_err());
        assert!(AllowList::parse(&["http://example.com".to_string()]).is_err());
        assert!(AllowList::parse(&["example.com:0".to_string()]).is_err());
        assert!(AllowList::parse(&["example.com:http".to_string()]).is_err());
        assert!(AllowList::parse(&["exa mple.com".to_string()]).is_err());
        assert_eq!(list(&["Example.COM."]).entries[0].host, host("example.com"));
        assert!(list(&["", " , "]).entries.is_empty());
    }

    #[test]
    fn refuses_hosts_not_listed() {
        let allow = list(&["example.com:8080"]);
        let public = [addr("93.184.216.34", 8080)];
        assert!(allow.check(&host("example.com"), 8080, &public).is_ok());
        assert!(allow.check(&host("example.com"), 80, &public).is_err());
        assert!(allow.check(&host("other.com"), 8080, &public).is_err());
        assert!(AllowList::default()
            .check(&host("example.com"), 8080, &public)
            .is_err());
    }

    #[test]
    fn refuses_internal_addresses_unless_explicitly_listed() {
        let empty = AllowList::default();
        for (text, port) in [
            ("127.0.0.1", 80),
            ("169.254.169.254", 80),
            ("10.0.0.7", 80),
            ("::1", 80),
            ("fe80::1", 80),
        ] {
            let target = host(text);
            let resolved = [addr(text, port)];
            assert!(
                empty.check(&target, port, &resolved).is_err(),
                "{text} must be refused"
            );
        }
        // The exact IP literal listed: allowed.
        assert!(list(&["127.0.0.1"])
            .check(&host("127.0.0.1"), 8080, &[addr("127.0.0.1", 8080)])
            .is_ok());
        assert!(list(&["[::1]:8080"])
            .check(&host("::1"), 8080, &[addr("::1", 8080)])
            .is_ok());
        assert!(list(&["[::1]:8080"])
            .check(&host("::1"), 9090, &[addr("::1", 9090)])
            .is_err());
        assert!(list(&["169.254.169.254"])
            .check(&host("169.254.169.254"), 80, &[addr("169.254.169.254", 80)])
            .is_ok());
        // Listing one internal address does not open another.
        assert!(list(&["127.0.0.1"])
            .check(&host("10.0.0.1"), 80, &[addr("10.0.0.1", 80)])
            .is_err());
        // A listed name that resolves inside is refused unless the address is listed too.
        assert!(list(&["localhost:8080"])
            .check(&host("localhost"), 8080, &[addr("127.0.0.1", 8080)])
            .is_err());
        assert!(list(&["example.com"])
            .check(&host("example.com"), 80, &[addr("10.1.2.3", 80)])
            .is_err());
        assert!(list(&["localhost:8080", "127.0.0.1:8080"])
            .check(&host("localhost"), 8080, &[addr("127.0.0.1", 8080)])
            .is_ok());
        // A public address behind a listed name.
        assert!(list(&["example.com"])
            .check(&host("example.com"), 80, &[addr("93.184.216.34", 80)])
            .is_ok());
        // No addresses at all is refused.
        assert!(list(&["example.com"])
            .check(&host("example.com"), 80, &[])
            .is_err());
    }
}
