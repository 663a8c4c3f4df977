//! Collection patterns: `*` (every collection), `prefix:*` (names starting with `prefix:`) and
//! exact names.
//!
//! Matching must stay index-backed with many triggers, so a pattern is stored as one
//! `match_key` and an event's collection name is expanded into the few keys that could match
//! it: `=name` for the exact pattern, `>p:` for each prefix of the name that ends in `:`, and
//! `*`. The hot path then asks the index for `match_key = ANY(keys)` instead of evaluating
//! every pattern.

use crate::error::PicloudError;
use crate::text::Utf8;
use pgrx::prelude::*;

/// Longest accepted pattern, in bytes. Collections are table names or short keys; anything
/// longer is a mistake, and it keeps the index entries small.
const MAX_PATTERN_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern<'a> {
    All,
    /// The prefix, including its trailing `:`.
    Prefix(&'a str),
    Exact(&'a str),
}

impl<'a> Pattern<'a> {
    pub fn parse(pattern: &'a str) -> Result<Pattern<'a>, &'static str> {
        if pattern.is_empty() {
            return Err("a pattern cannot be empty");
        }
        if pattern.len() > MAX_PATTERN_BYTES {
            return Err("a pattern is at most 1024 bytes long");
        }
        if pattern == "*" {
            return Ok(Pattern::All);
        }
        if let Some(prefix) = pattern.strip_suffix('*') {
            if !prefix.ends_with(':') {
                return Err("'*' may only stand alone or follow a trailing ':' as in 'prefix:*'");
            }
            if prefix.len() == 1 {
                return Err("the prefix before ':*' cannot be empty");
            }
            if prefix.contains('*') {
                return Err("'*' may appear only once, at the end");
            }
            return Ok(Pattern::Prefix(prefix));
        }
        if pattern.contains('*') {
            return Err("'*' may only stand alone or follow a trailing ':' as in 'prefix:*'");
        }
        Ok(Pattern::Exact(pattern))
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::All => true,
            Pattern::Prefix(prefix) => name.starts_with(prefix),
            Pattern::Exact(exact) => name == *exact,
        }
    }

    pub fn match_key(&self) -> String {
        match self {
            Pattern::All => "*".to_string(),
            Pattern::Prefix(prefix) => format!(">{prefix}"),
            Pattern::Exact(exact) => format!("={exact}"),
        }
    }
}

/// Every match key a collection name can be matched by: its exact key, one key per prefix
/// that ends in `:`, and `*`.
/// Only prefixes a stored pattern can hold are listed (at most MAX_PATTERN_BYTES long), so the
/// work stays bounded however long the name: a name of n bytes full of ':' would otherwise
/// make n keys of up to n bytes each.
pub fn match_keys_of(name: &str) -> Vec<String> {
    let prefixes = name
        .match_indices(':')
        .map(|(at, _)| at + 1)
        .take_while(|&end| end <= MAX_PATTERN_BYTES);
    let mut keys = Vec::new();
    if name.len() <= MAX_PATTERN_BYTES {
        keys.push(format!("={name}"));
    }
    keys.push("*".to_string());
    keys.extend(prefixes.map(|end| format!(">{}", &name[..end])));
    keys
}

fn parse_or_raise(pattern: &str) -> Pattern<'_> {
    match Pattern::parse(pattern) {
        Ok(parsed) => parsed,
        Err(reason) => PicloudError::InvalidPattern {
            pattern: pattern.chars().take(80).collect(),
            reason,
        }
        .raise(),
    }
}

/// Does `name` belong to the collections `pattern` selects? A malformed pattern is an error
/// (SQLSTATE 22023), never a silent non-match.
#[pg_extern(immutable, strict, parallel_safe)]
pub fn picloud_collection_matches(pattern: Utf8, name: Utf8) -> bool {
    parse_or_raise(&pattern).matches(&name)
}

/// The `match_key` stored for a validated pattern (internal).
#[pg_extern(immutable, strict, parallel_safe, name = "_pattern_match_key")]
pub fn picloud_pattern_match_key(pattern: Utf8) -> String {
    parse_or_raise(&pattern).match_key()
}

/// The match keys a collection name can be matched by (internal; see module docs).
#[pg_extern(immutable, strict, parallel_safe, name = "_collection_match_keys")]
pub fn picloud_collection_match_keys(name: Utf8) -> Vec<String> {
    match_keys_of(&name)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn collection_matches_table() {
        // (pattern, name, expected)
        let cases: &[(&str, &str, bool)] = &[
            ("*", "orders", true),
            ("*", "", true),
            ("*", "ünïcødé", true),
            ("*", "a:b:c", true),
            ("orders", "orders", true),
            ("orders", "orders2", false),
            ("orders", "Orders", false),
            ("orders", "", false),
            ("orders", "orders:1", false),
            ("user:*", "user:1", true),
            ("user:*", "user:", true),
            ("user:*", "user", false),
            ("user:*", "users:1", false),
            ("user:*", "user:a:b", true),
            ("user:*", "xuser:1", false),
            ("a:b:*", "a:b:c", true),
            ("a:b:*", "a:bc", false),
            ("a:b:*", "a:b", false),
            ("ünï:*", "ünï:cødé", true),
            ("ünï:*", "ünïcødé", false),
            ("ünïcødé", "ünïcødé", true),
            ("名前", "名前", true),
            ("名前:*", "名前:x", true),
            ("名前:*", "名前", false),
            ("user:", "user:", true),
            ("user:", "user:1", false),
            ("a b", "a b", true),
            ("a b", "a  b", false),
            ("x:y", "x:y", true),
            ("x:*", "x:*", true),
            ("emoji🎉:*", "emoji🎉:1", true),
            ("emoji🎉", "emoji🎉", true),
        ];
        for (pattern, name, expected) in cases {
            let got = Spi::get_one_with_args::<bool>(
                "SELECT picloud.picloud_collection_matches($1, $2)",
                &[(*pattern).into(), (*name).into()],
            );
            assert_eq!(
                got,
                Ok(Some(*expected)),
                "pattern {pattern:?} name {name:?}"
            );
        }
        assert!(cases.len() >= 30);
    }

    #[pg_test]
    fn collection_matches_is_strict() {
        let got = Spi::get_one::<bool>("SELECT picloud.picloud_collection_matches(NULL, 'x')");
        assert_eq!(got, Ok(None));
    }

    #[pg_test(error = "invalid collection pattern \"\": a pattern cannot be empty")]
    fn empty_pattern_is_refused() {
        let result = Spi::get_one::<bool>("SELECT picloud.picloud_collection_matches('', 'x')");
        panic!("expected an error, got {result:?}");
    }

    #[pg_test(
        error = "invalid collection pattern \"a*b\": '*' may only stand alone or follow a trailing ':' as in 'prefix:*'"
    )]
    fn star_in_the_middle_is_refused() {
        let result = Spi::get_one::<bool>("SELECT picloud.picloud_collection_matches('a*b', 'x')");
        panic!("expected an error, got {result:?}");
    }

    #[pg_test(
        error = "invalid collection pattern \"**\": '*' may only stand alone or follow a trailing ':' as in 'prefix:*'"
    )]
    fn double_star_is_refused() {
        let result = Spi::get_one::<bool>("SELECT picloud.picloud_collection_matches('**', 'x')");
        panic!("expected an error, got {result:?}");
    }

    #[pg_test(
        error = "invalid collection pattern \"user*\": '*' may only stand alone or follow a trailing ':' as in 'prefix:*'"
    )]
    fn prefix_without_colon_is_refused() {
        let result =
            Spi::get_one::<bool>("SELECT picloud.picloud_collection_matches('user*', 'user1')");
        panic!("expected an error, got {result:?}");
    }

    #[pg_test]
    fn match_keys_cover_every_prefix() {
        let keys = Spi::get_one::<Vec<String>>("SELECT picloud._collection_match_keys('a:b:c')");
        assert_eq!(
            keys,
            Ok(Some(vec![
                "=a:b:c".to_string(),
                "*".to_string(),
                ">a:".to_string(),
                ">a:b:".to_string()
            ]))
        );
    }
}
