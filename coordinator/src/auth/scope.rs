//! What a token may do: its scopes, and how they are read from API tokens and JWTs.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// One permission. `admin` implies every other; no other scope implies another (so a
/// token that creates tasks and waits for them needs `tasks:write` and `tasks:read`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Scope {
    /// `POST /v1/templates`.
    TemplatesWrite,
    /// Every read of tasks and templates: `GET /v1/tasks…`, `GET /v1/templates…`.
    TasksRead,
    /// `POST /v1/tasks`.
    TasksWrite,
    /// Operator controls: cancel, retry, resolve.
    TasksOperate,
    /// `/metrics` and `/health/status`, when `TASKER_METRICS_AUTH=on`.
    MetricsRead,
    /// Everything.
    Admin,
}

impl Scope {
    /// Every scope, in the order the documentation lists them.
    pub(crate) const ALL: [Scope; 6] = [
        Scope::TemplatesWrite,
        Scope::TasksRead,
        Scope::TasksWrite,
        Scope::TasksOperate,
        Scope::MetricsRead,
        Scope::Admin,
    ];

    /// The scope's name in tokens, flags and answers.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scope::TemplatesWrite => "templates:write",
            Scope::TasksRead => "tasks:read",
            Scope::TasksWrite => "tasks:write",
            Scope::TasksOperate => "tasks:operate",
            Scope::MetricsRead => "metrics:read",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of [`Scope::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown scope `{0}` (known: templates:write, tasks:read, tasks:write, tasks:operate, metrics:read, admin)"
)]
pub(crate) struct UnknownScope(pub(crate) String);

impl FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == name)
            .ok_or_else(|| UnknownScope(name.to_owned()))
    }
}

/// The scopes a token grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Scopes(BTreeSet<Scope>);

impl Scopes {
    /// Whether these scopes allow what `needed` guards: `admin`, or `needed` itself.
    pub(crate) fn allows(&self, needed: Scope) -> bool {
        self.0.contains(&Scope::Admin) || self.0.contains(&needed)
    }

    /// The scopes, in a stable order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Scope> + '_ {
        self.0.iter().copied()
    }

    /// Whether no scope is granted.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Strictly parse names given by a person (`token create --scopes`): separated by
    /// commas and/or whitespace; an unknown name is an error, so a typo never yields a
    /// token that silently lacks a permission.
    pub(crate) fn parse_strict(list: &str) -> Result<Self, UnknownScope> {
        split(list).map(Scope::from_str).collect()
    }

    /// Leniently read names issued by someone else (a JWT's claims, rows written by a
    /// newer version): unknown names are skipped, since identity providers put their own
    /// scopes (`openid`, `profile`…) beside ours.
    pub(crate) fn parse_lenient<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        names
            .into_iter()
            .flat_map(split)
            .filter_map(|name| name.parse().ok())
            .collect()
    }

    /// The names, for storing and showing.
    pub(crate) fn names(&self) -> Vec<String> {
        self.iter().map(|scope| scope.as_str().to_owned()).collect()
    }
}

/// Names separated by commas or whitespace (OAuth's `scope` claim is space-separated).
fn split(list: &str) -> impl Iterator<Item = &str> {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|name| !name.is_empty())
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Scopes(iter.into_iter().collect())
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("(none)");
        }
        f.write_str(&self.names().join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
            assert_eq!(scope.to_string(), scope.as_str());
        }
        assert_eq!(
            "tasks:admin".parse::<Scope>(),
            Err(UnknownScope("tasks:admin".into()))
        );
        assert!("Tasks:Read".parse::<Scope>().is_err(), "names are exact");
    }

    #[test]
    fn strict_parsing_takes_commas_and_spaces_and_refuses_unknown_names() {
        let scopes = Scopes::parse_strict("tasks:read, tasks:write templates:write").unwrap();
        assert_eq!(
            scopes.names(),
            ["templates:write", "tasks:read", "tasks:write"]
        );
        assert_eq!(
            Scopes::parse_strict("tasks:read,task:write"),
            Err(UnknownScope("task:write".into()))
        );
        assert!(Scopes::parse_strict("").unwrap().is_empty());
    }

    #[test]
    fn lenient_parsing_reads_oauth_scope_strings_and_skips_foreign_scopes() {
        let scopes = Scopes::parse_lenient(["openid tasks:read  profile tasks:operate"]);
        assert_eq!(scopes.names(), ["tasks:read", "tasks:operate"]);
        let scopes = Scopes::parse_lenient(["tasks:write", "email", "admin"]);
        assert_eq!(scopes.names(), ["tasks:write", "admin"]);
        assert!(Scopes::parse_lenient(["read write"]).is_empty());
    }

    #[test]
    fn admin_implies_every_scope_and_nothing_else_implies_another() {
        let admin: Scopes = [Scope::Admin].into_iter().collect();
        for scope in Scope::ALL {
            assert!(admin.allows(scope), "admin allows {scope}");
        }
        for granted in Scope::ALL.into_iter().filter(|s| *s != Scope::Admin) {
            let scopes: Scopes = [granted].into_iter().collect();
            for needed in Scope::ALL {
                assert_eq!(
                    scopes.allows(needed),
                    needed == granted,
                    "{granted} → {needed}"
                );
            }
        }
        assert!(!Scopes::default().allows(Scope::TasksRead));
    }
}
