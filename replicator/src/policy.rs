//! Per-path replication policies: how often a file is pushed to the standbys
//! and whether the active node waits for it.
//!
//! A [`PolicySet`] is an ordered list of [`Rule`]s, each a glob pattern with a
//! [`Policy`]. [`PolicySet::resolve`] gives the policy of a path relative to
//! the volume root (`ssh/id_rsa`, no leading `/`). The semantics:
//!
//! - **First match wins.** Rules are tried in the order they are written; the
//!   first rule that matches decides. After the last rule comes an implicit
//!   one that matches everything with [`Policy::DEFAULT`] (sync `always`,
//!   priority 2). The volume root itself (the empty path) always gets the
//!   default.
//! - **A pattern without `/` matches the file name at any depth**, as in
//!   `.gitignore` and rsync: `*.sif` matches `a.sif` and `fw/b.sif`; `hosts`
//!   matches `hosts` and `x/hosts`.
//! - **A pattern with `/` is anchored at the volume root**: `ssh/**`,
//!   `fw/*.bin`, `**/*.bin`. A leading `/` is allowed and only says "anchored"
//!   (`/hosts` matches `hosts` but not `x/hosts`). A trailing `/` is refused:
//!   a rule for a directory already covers everything below it (next point),
//!   and a path alone does not say whether it is a directory.
//! - **`*` and `?` never cross `/`; `**` does.** `[...]` and `{a,b}` work as
//!   in [globset](https://docs.rs/globset).
//! - **A rule that matches a directory also matches everything below it.**
//!   For each rule in order, the path and then each of its ancestor
//!   directories are tested; the first rule that matches any of them wins. So
//!   `local` with sync `never` makes `local/x/y` never synced, and a later
//!   `*.conf` rule does not override it for `local/a.conf`.

use std::path::Path;
use std::time::Duration;

use globset::{GlobBuilder, GlobMatcher};

/// When a file is copied to the standbys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncMode {
    /// On every change.
    Always,
    /// Once, when the file first appears on the standby; later changes stay
    /// local to the node that made them.
    Once,
    /// At most once per interval, with the latest content.
    Interval(Duration),
    /// Never: the file stays local to each node.
    Never,
}

impl SyncMode {
    /// The name used in the configuration file (`always`, `once`, `interval`,
    /// `never`).
    pub fn name(&self) -> &'static str {
        match self {
            SyncMode::Always => "always",
            SyncMode::Once => "once",
            SyncMode::Interval(_) => "interval",
            SyncMode::Never => "never",
        }
    }
}

/// When a write of a changed `always` path on the active node returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// At once; the standbys catch up.
    Async,
    /// When every connected standby has applied the change, or at the volume's
    /// `sync_timeout`.
    Sync,
}

impl Durability {
    /// The name used in the configuration file.
    pub fn name(self) -> &'static str {
        match self {
            Durability::Async => "async",
            Durability::Sync => "sync",
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which way a path's changes travel.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From the active to the standbys only; a standby refuses local writes (`EROFS`).
    #[default]
    Down,
    /// Also upstream: a standby takes local writes of the path while it is connected
    /// to its active, and ships them to the active, which decides (see
    /// [`crate::upstream`]) and ships them on to the other standbys.
    Both,
}

impl Direction {
    /// The name used in the configuration file.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Down => "down",
            Direction::Both => "both",
        }
    }
}

/// How much a change matters: 1 is a file a standby must have before it may take
/// over, 2 is normal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Priority(u8);

impl Priority {
    /// Priority 1: the change must be on the standbys.
    pub const MUST_SYNC: Priority = Priority(1);
    /// Priority 2, the default.
    pub const NORMAL: Priority = Priority(2);

    /// The priority numbered `value`, which must be 1 or 2.
    pub fn new(value: u8) -> Result<Priority, PolicyError> {
        match value {
            1 => Ok(Priority::MUST_SYNC),
            2 => Ok(Priority::NORMAL),
            _ => Err(PolicyError::BadPriority(value)),
        }
    }

    /// The number as written in the configuration file.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Priority::NORMAL
    }
}

/// What happens to one path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Policy {
    /// When the path is copied to the standbys.
    pub sync: SyncMode,
    /// How much its changes matter.
    pub priority: Priority,
    /// Whether its writes wait for the standbys; `None` for the volume's setting.
    pub durability: Option<Durability>,
    /// Whether a standby may write it too.
    pub direction: Direction,
}

impl Policy {
    /// The policy of a path that no rule matches: sync always, priority 2, the
    /// volume's durability.
    pub const DEFAULT: Policy = Policy {
        sync: SyncMode::Always,
        priority: Priority::NORMAL,
        durability: None,
        direction: Direction::Down,
    };

    /// Whether a standby may write the path and ship the change upstream: a `both`
    /// rule of sync `always` (configuration refuses `both` with other sync modes).
    pub fn upstream(&self) -> bool {
        self.direction == Direction::Both && self.sync == SyncMode::Always
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::DEFAULT
    }
}

/// A glob pattern and the policy of the paths it matches.
#[derive(Clone, Debug)]
pub struct Rule {
    pattern: String,
    matcher: GlobMatcher,
    policy: Policy,
}

impl Rule {
    /// A rule for `pattern` (see the [module documentation](self) for what it
    /// matches).
    pub fn new(pattern: &str, policy: Policy) -> Result<Rule, PolicyError> {
        if pattern.is_empty() || pattern == "/" {
            return Err(PolicyError::EmptyPattern);
        }
        if pattern.ends_with('/') {
            return Err(PolicyError::TrailingSlash {
                pattern: pattern.to_owned(),
            });
        }
        let glob = match pattern.strip_prefix('/') {
            Some(anchored) => anchored.to_owned(),
            None if pattern.contains('/') => pattern.to_owned(),
            // `**/` lets a bare name match at any depth, including the root.
            None => format!("**/{pattern}"),
        };
        let matcher = GlobBuilder::new(&glob)
            .literal_separator(true)
            .build()
            .map_err(|e| PolicyError::BadGlob {
                pattern: pattern.to_owned(),
                // The kind, not the whole error: the error quotes the rewritten
                // glob, which the user never wrote.
                reason: e.kind().to_string(),
            })?
            .compile_matcher();
        Ok(Rule {
            pattern: pattern.to_owned(),
            matcher,
            policy,
        })
    }

    /// The pattern as written.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The policy of the paths this rule matches.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Whether the rule matches `path` or one of its ancestor directories.
    pub fn matches(&self, path: &Path) -> bool {
        path.ancestors()
            .take_while(|p| !p.as_os_str().is_empty())
            .any(|p| self.matcher.is_match(p))
    }
}

/// The rules of one volume, in order.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    rules: Vec<Rule>,
}

impl PolicySet {
    /// A set trying `rules` in order.
    pub fn new(rules: Vec<Rule>) -> PolicySet {
        PolicySet { rules }
    }

    /// The policy of `path`, relative to the volume root without a leading
    /// `/`; the empty path is the root.
    pub fn resolve(&self, path: &Path) -> Policy {
        debug_assert!(path.is_relative(), "policy path {path:?} is absolute");
        self.rules
            .iter()
            .find(|rule| rule.matches(path))
            .map_or(Policy::DEFAULT, Rule::policy)
    }

    /// The rules, in the order they are tried.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

/// Why a rule or a priority was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// The pattern is not a valid glob.
    #[error("{pattern:?} is not a valid glob: {reason}")]
    BadGlob {
        /// The pattern as written.
        pattern: String,
        /// globset's explanation.
        reason: String,
    },
    /// The pattern is empty (or just `/`), which would name the volume root.
    #[error("the pattern is empty")]
    EmptyPattern,
    /// The pattern ends in `/`.
    #[error(
        "{pattern:?} ends with '/': write the directory without it, \
         a rule for a directory already covers everything below it"
    )]
    TrailingSlash {
        /// The pattern as written.
        pattern: String,
    },
    /// A priority other than 1 or 2.
    #[error("{0} is not a priority (expected 1 = must sync, or 2 = normal)")]
    BadPriority(u8),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NEVER: Policy = Policy {
        sync: SyncMode::Never,
        priority: Priority::NORMAL,
        durability: None,
        direction: Direction::Down,
    };
    const ONCE: Policy = Policy {
        sync: SyncMode::Once,
        priority: Priority::MUST_SYNC,
        durability: None,
        direction: Direction::Down,
    };

    fn set(rules: &[(&str, Policy)]) -> PolicySet {
        PolicySet::new(
            rules
                .iter()
                .map(|(p, policy)| Rule::new(p, *policy).expect("valid test pattern"))
                .collect(),
        )
    }

    fn matches(pattern: &str, path: &str) -> bool {
        Rule::new(pattern, NEVER)
            .expect("valid test pattern")
            .matches(Path::new(path))
    }

    #[test]
    fn names_and_priorities() {
        assert_eq!(SyncMode::Always.name(), "always");
        assert_eq!(SyncMode::Once.name(), "once");
        assert_eq!(
            SyncMode::Interval(Duration::from_secs(1)).name(),
            "interval"
        );
        assert_eq!(SyncMode::Never.name(), "never");
        assert_eq!(Priority::new(1), Ok(Priority::MUST_SYNC));
        assert_eq!(Priority::new(2), Ok(Priority::NORMAL));
        assert_eq!(Priority::new(0), Err(PolicyError::BadPriority(0)));
        assert_eq!(Priority::new(3), Err(PolicyError::BadPriority(3)));
        assert_eq!(Priority::default().get(), 2);
        assert_eq!(Policy::default(), Policy::DEFAULT);
        assert_eq!(Policy::DEFAULT.sync, SyncMode::Always);
    }

    #[test]
    fn basename_patterns_match_at_any_depth() {
        assert!(matches("*.sif", "a.sif"));
        assert!(matches("*.sif", "fw/b.sif"));
        assert!(matches("*.sif", "x/y/z.sif"));
        assert!(!matches("*.sif", "a.sif.bak"));
        assert!(matches("hosts", "hosts"));
        assert!(matches("hosts", "x/hosts"));
        assert!(!matches("hosts", "hosts.allow"));
        assert!(!matches("hosts", "myhosts"));
    }

    #[test]
    fn patterns_with_a_slash_are_anchored() {
        assert!(matches("ssh/**", "ssh/id_rsa"));
        assert!(matches("ssh/**", "ssh/keys/a"));
        assert!(!matches("ssh/**", "x/ssh/id_rsa"));
        assert!(matches("fw/*.bin", "fw/a.bin"));
        assert!(!matches("fw/*.bin", "fw/old/a.bin"));
        assert!(!matches("fw/*.bin", "x/fw/a.bin"));
        assert!(matches("**/*.bin", "a.bin"));
        assert!(matches("**/*.bin", "fw/old/a.bin"));
        assert!(matches("/hosts", "hosts"));
        assert!(!matches("/hosts", "x/hosts"));
    }

    #[test]
    fn star_and_question_mark_do_not_cross_slash() {
        assert!(!matches("/a*c", "ab/c"));
        assert!(!matches("/a?b", "a/b"));
        assert!(matches("/a*/c", "ab/c"));
        assert!(!matches("/a*/c", "a/b/c"));
        assert!(matches("/a/**/c", "a/b/b/c"));
        assert!(matches("/a/**/c", "a/c"));
    }

    #[test]
    fn a_directory_rule_covers_its_contents() {
        let policies = set(&[("local", NEVER), ("*.conf", ONCE)]);
        assert_eq!(policies.resolve(Path::new("local")), NEVER);
        assert_eq!(policies.resolve(Path::new("local/x/y")), NEVER);
        assert_eq!(policies.resolve(Path::new("a/local/a.conf")), NEVER);
        assert_eq!(policies.resolve(Path::new("a.conf")), ONCE);
        assert_eq!(policies.resolve(Path::new("other/y")), Policy::DEFAULT);
    }

    #[test]
    fn first_match_wins_and_root_gets_the_default() {
        let policies = set(&[("ssh/**", ONCE), ("*", NEVER)]);
        assert_eq!(policies.resolve(Path::new("ssh/id_rsa")), ONCE);
        assert_eq!(policies.resolve(Path::new("hosts")), NEVER);
        assert_eq!(policies.resolve(Path::new("")), Policy::DEFAULT);
        assert_eq!(policies.rules().len(), 2);
        assert_eq!(policies.rules()[0].pattern(), "ssh/**");
        assert_eq!(policies.rules()[0].policy(), ONCE);
    }

    #[test]
    fn bad_patterns_are_refused() {
        match Rule::new("a[b", NEVER) {
            Err(PolicyError::BadGlob { pattern, reason }) => {
                assert_eq!(pattern, "a[b");
                assert!(reason.contains("unclosed"), "{reason}");
            }
            other => panic!("expected BadGlob, got {other:?}"),
        }
        let message = Rule::new("a[b", NEVER).unwrap_err().to_string();
        assert!(
            message.starts_with("\"a[b\" is not a valid glob: "),
            "{message}"
        );
        assert!(!message.contains("**/"), "{message}");
        assert_eq!(Rule::new("", NEVER).unwrap_err(), PolicyError::EmptyPattern);
        assert_eq!(
            Rule::new("/", NEVER).unwrap_err(),
            PolicyError::EmptyPattern
        );
        assert!(matches!(
            Rule::new("local/", NEVER),
            Err(PolicyError::TrailingSlash { .. })
        ));
    }

    /// A relative path of one to four short components from a small
    /// alphabet, so that random patterns and paths collide often.
    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec("[abc]{1,2}(\\.sif)?", 1..5).prop_map(|parts| parts.join("/"))
    }

    /// A valid pattern: a bare name, an anchored path, or either with
    /// wildcards.
    fn pattern() -> impl Strategy<Value = String> {
        let component = prop_oneof![
            "[abc]{1,2}",
            Just("*".to_owned()),
            Just("?".to_owned()),
            Just("*.sif".to_owned())
        ];
        prop_oneof![
            component.clone(),
            prop::collection::vec(prop_oneof![component, Just("**".to_owned())], 2..4)
                .prop_map(|parts| parts.join("/")),
            path().prop_map(|p| format!("/{p}")),
        ]
    }

    fn policy() -> impl Strategy<Value = Policy> {
        (
            prop_oneof![
                Just(SyncMode::Always),
                Just(SyncMode::Once),
                Just(SyncMode::Never),
                (1u64..100).prop_map(|s| SyncMode::Interval(Duration::from_secs(s))),
            ],
            prop_oneof![Just(Priority::MUST_SYNC), Just(Priority::NORMAL)],
        )
            .prop_map(|(sync, priority)| Policy {
                sync,
                priority,
                durability: None,
                ..Policy::DEFAULT
            })
    }

    fn rules() -> impl Strategy<Value = Vec<Rule>> {
        prop::collection::vec(
            (pattern(), policy())
                .prop_map(|(p, policy)| Rule::new(&p, policy).expect("generated pattern is valid")),
            0..6,
        )
    }

    proptest! {
        #[test]
        fn prepending_a_match_all_rule_overrides_everything(
            rules in rules(), first in policy(), path in path()
        ) {
            let mut all = vec![Rule::new("**", first).expect("valid")];
            all.extend(rules);
            prop_assert_eq!(PolicySet::new(all).resolve(Path::new(&path)), first);
        }

        #[test]
        fn appending_rules_keeps_earlier_matches(
            rules in rules(), more in rules(), path in path()
        ) {
            let path = Path::new(&path);
            let before = PolicySet::new(rules.clone());
            if let Some(rule) = rules.iter().find(|r| r.matches(path)) {
                let mut all = rules.clone();
                all.extend(more);
                prop_assert_eq!(PolicySet::new(all).resolve(path), rule.policy());
                prop_assert_eq!(before.resolve(path), rule.policy());
            }
        }

        #[test]
        fn unmatched_paths_get_the_default(rules in rules(), path in path()) {
            let path = Path::new(&path);
            let policies = PolicySet::new(rules);
            if !policies.rules().iter().any(|r| r.matches(path)) {
                prop_assert_eq!(policies.resolve(path), Policy::DEFAULT);
            }
        }

        #[test]
        fn bare_names_match_at_every_depth(
            name in "[abc]{1,3}", dirs in prop::collection::vec("[abc]{1,3}", 0..4), p in policy()
        ) {
            let policies = PolicySet::new(vec![Rule::new(&name, p).expect("valid")]);
            let mut path = dirs.join("/");
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(&name);
            prop_assert_eq!(policies.resolve(Path::new(&path)), p);
        }

        #[test]
        fn everything_below_a_matched_directory_inherits(
            rules in rules(), dir in path(), below in path(), p in policy()
        ) {
            let mut all = vec![Rule::new(&format!("/{dir}"), p).expect("valid")];
            all.extend(rules);
            let policies = PolicySet::new(all);
            prop_assert_eq!(policies.resolve(Path::new(&dir)), p);
            prop_assert_eq!(policies.resolve(&Path::new(&dir).join(&below)), p);
        }

        #[test]
        fn resolve_is_deterministic(rules in rules(), path in path()) {
            let path = Path::new(&path);
            let a = PolicySet::new(rules.clone());
            let b = PolicySet::new(rules);
            prop_assert_eq!(a.resolve(path), a.resolve(path));
            prop_assert_eq!(a.resolve(path), b.resolve(path));
        }
    }
}
