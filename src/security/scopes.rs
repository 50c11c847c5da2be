//! Scopes: what a credential lets its holder do. Read from a token's `scope` (or `scp`) claim, or
//! from an API key's or a user's configured scopes.
//!
//! The gateway's own scopes (`read`, `search`, `store`, `delete`, `admin`) apply to every protocol.
//! SMART App Launch scopes map onto the same actions: `<context>/<type>.<permissions>` with context
//! `patient`, `user` or `system`, permissions `read` / `write` / `*` (v1) or any of `cruds` (v2: create
//! and update store, read reads, delete deletes, search searches). A type-specific SMART scope
//! (`user/ImagingStudy.read`) allows that FHIR resource type only; `*` (`user/*.read`) allows every
//! protocol. Unknown scopes grant nothing.

use super::Action;

/// One action, on one FHIR resource type or (`None`) on everything.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    action: Action,
    resource: Option<String>,
}

/// The actions a credential allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes {
    grants: Vec<Grant>,
    /// The scopes as given (what `[[policy.rules]] scope` matches).
    names: Vec<String>,
}

impl Scopes {
    /// Scopes as written in a token or the configuration (unknown ones are ignored).
    pub fn parse<'a>(scopes: impl IntoIterator<Item = &'a str>) -> Scopes {
        let mut grants = Vec::new();
        let mut names = Vec::new();
        for scope in scopes {
            names.push(scope.to_string());
            let (resource, actions) = match gateway_scope(scope) {
                Some(action) => (None, vec![action]),
                None => match smart_scope(scope) {
                    Some(granted) => granted,
                    None => continue,
                },
            };
            for action in actions {
                let grant = Grant {
                    action,
                    resource: resource.clone(),
                };
                if !grants.contains(&grant) {
                    grants.push(grant);
                }
            }
        }
        Scopes { grants, names }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// Whether `action` is allowed on `fhir_type` (a FHIR resource type; `None` for DICOM resources).
    pub fn allows(&self, action: Action, fhir_type: Option<&str>) -> bool {
        self.grants.iter().any(|grant| {
            grant.action == action
                && match (&grant.resource, fhir_type) {
                    (None, _) => true,
                    (Some(granted), Some(asked)) => granted == asked,
                    (Some(_), None) => false,
                }
        })
    }
}

fn gateway_scope(scope: &str) -> Option<Action> {
    Some(match scope {
        "read" => Action::Read,
        "search" => Action::Search,
        "store" => Action::Store,
        "delete" => Action::Delete,
        "admin" => Action::Admin,
        _ => return None,
    })
}

/// `patient/ImagingStudy.read` -> (Some("ImagingStudy"), [Read, Search]).
fn smart_scope(scope: &str) -> Option<(Option<String>, Vec<Action>)> {
    let (context, rest) = scope.split_once('/')?;
    if !matches!(context, "patient" | "user" | "system") {
        return None;
    }
    let (resource, permissions) = rest.rsplit_once('.')?;
    // A v2 scope narrowed by a search (`?category=...`) is not honoured rather than widened.
    if resource.is_empty() || permissions.contains('?') {
        return None;
    }
    use Action::*;
    let actions = match permissions {
        "read" => vec![Read, Search],
        "write" => vec![Store, Delete],
        "*" => vec![Read, Search, Store, Delete],
        v2 if !v2.is_empty() && v2.chars().all(|c| "cruds".contains(c)) => v2
            .chars()
            .map(|c| match c {
                'c' | 'u' => Store,
                'r' => Read,
                'd' => Delete,
                _ => Search,
            })
            .collect(),
        _ => return None,
    };
    Some(((resource != "*").then(|| resource.to_string()), actions))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_scopes_allow_their_action_everywhere() {
        let scopes = Scopes::parse(["read", "search", "bogus"]);
        assert!(scopes.allows(Action::Read, None));
        assert!(scopes.allows(Action::Search, Some("ImagingStudy")));
        assert!(!scopes.allows(Action::Store, None));
        assert!(!scopes.allows(Action::Admin, None));
    }

    #[test]
    fn smart_type_scope_allows_that_fhir_type_only() {
        let scopes = Scopes::parse(["patient/ImagingStudy.read"]);
        assert!(scopes.allows(Action::Read, Some("ImagingStudy")));
        assert!(scopes.allows(Action::Search, Some("ImagingStudy")));
        assert!(!scopes.allows(Action::Read, Some("Patient")));
        assert!(!scopes.allows(Action::Read, None));
        assert!(!scopes.allows(Action::Store, Some("ImagingStudy")));
    }

    #[test]
    fn smart_wildcards_and_v2_forms() {
        let all = Scopes::parse(["system/*.*"]);
        for action in [Action::Read, Action::Search, Action::Store, Action::Delete] {
            assert!(all.allows(action, None));
        }
        assert!(!all.allows(Action::Admin, None));
        let rs = Scopes::parse(["user/*.rs"]);
        assert!(rs.allows(Action::Read, None) && rs.allows(Action::Search, Some("Patient")));
        assert!(!rs.allows(Action::Store, None));
        let cruds = Scopes::parse(["user/Patient.cruds"]);
        assert!(cruds.allows(Action::Delete, Some("Patient")));
        let nothing = Scopes::parse(["user/*.rs?category=x", "user/*.rx", "other/*.read"]);
        for action in [Action::Read, Action::Search, Action::Store, Action::Delete] {
            assert!(!nothing.allows(action, None));
        }
    }
}
