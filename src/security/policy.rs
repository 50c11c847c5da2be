//! The one authorization policy every protocol asks: [`Policy::decide`] (may this identity do this
//! action on this study?) and [`Policy::scope`] (which studies may it do the action on? answered as
//! SQL constraints by the index, so that searches, counts and pages see only those).
//!
//! Rules (`[[policy.rules]]`) name who (subject, a scope the credential holds, a group claim, an AE
//! title, a certificate subject; every one given must match), the actions, and optionally a study
//! filter (a study-level attribute and its allowed values). With no rules the credential's scopes
//! decide (and DIMSE peers' rights), as before; once any rule exists, what no rule allows is denied.

use anyhow::{bail, Context};
use dicom_core::Tag;

use super::{Action, Identity};
use crate::config::PolicyRuleConfig;
use crate::index::query::StudyFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
}

/// The studies an identity may do an action on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Nothing,
    /// Studies matching at least one of these filters.
    Studies(Vec<StudyFilter>),
}

impl Scope {
    /// Whether a study with these attribute values is in scope (`value` gives a study attribute).
    pub fn contains(&self, value: impl Fn(Tag) -> Option<String>) -> bool {
        match self {
            Scope::All => true,
            Scope::Nothing => false,
            Scope::Studies(filters) => filters.iter().any(|f| {
                let actual = value(f.attribute).unwrap_or_default();
                f.values.iter().any(|allowed| allowed == actual.trim())
            }),
        }
    }
}

#[derive(Debug)]
struct Rule {
    subject: Option<String>,
    scope: Option<String>,
    group: Option<String>,
    ae_title: Option<String>,
    certificate: Option<String>,
    actions: Vec<Action>,
    studies: Option<StudyFilter>,
}

impl Rule {
    fn applies_to(&self, identity: &Identity) -> bool {
        let is = |wanted: &Option<String>, actual: Option<&str>| {
            wanted.as_deref().is_none_or(|w| actual == Some(w))
        };
        is(&self.subject, Some(identity.subject.as_str()))
            && self
                .scope
                .as_deref()
                .is_none_or(|s| identity.scopes.names().any(|n| n == s))
            && self
                .group
                .as_deref()
                .is_none_or(|g| identity.groups.iter().any(|n| n == g))
            && is(&self.ae_title, identity.ae_title.as_deref())
            && is(&self.certificate, identity.certificate.as_deref())
    }
}

#[derive(Debug, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    pub fn new(rules: &[PolicyRuleConfig]) -> anyhow::Result<Policy> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(n, rule)| rule_from(rule).with_context(|| format!("policy.rules[{n}]")))
            .collect::<anyhow::Result<_>>()?;
        Ok(Policy { rules })
    }

    /// Whether rules exist (then they, not the credential's scopes alone, decide).
    pub fn has_rules(&self) -> bool {
        !self.rules.is_empty()
    }

    /// The studies `identity` may do `action` on, by the rules (all when there are none).
    pub fn scope(&self, identity: &Identity, action: Action) -> Scope {
        if self.rules.is_empty() {
            return Scope::All;
        }
        let mut filters = Vec::new();
        for rule in &self.rules {
            if !rule.actions.contains(&action) || !rule.applies_to(identity) {
                continue;
            }
            match &rule.studies {
                None => return Scope::All,
                Some(filter) => filters.push(filter.clone()),
            }
        }
        if filters.is_empty() {
            Scope::Nothing
        } else {
            Scope::Studies(filters)
        }
    }

    /// Whether `identity` may do `action` on the study whose attributes `study` gives.
    pub fn decide(
        &self,
        identity: &Identity,
        action: Action,
        study: impl Fn(Tag) -> Option<String>,
    ) -> Decision {
        if self.scope(identity, action).contains(study) {
            Decision::Allow
        } else {
            Decision::Deny
        }
    }
}

pub fn parse_action(name: &str) -> Option<Action> {
    Some(match name {
        "search" => Action::Search,
        "read" => Action::Read,
        "store" => Action::Store,
        "delete" => Action::Delete,
        "admin" => Action::Admin,
        _ => return None,
    })
}

fn rule_from(config: &PolicyRuleConfig) -> anyhow::Result<Rule> {
    let set = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
    let actions = config
        .actions
        .iter()
        .map(|a| parse_action(a).with_context(|| format!("unknown action {a:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if actions.is_empty() {
        bail!("a rule needs actions");
    }
    let studies = match config.study_attribute.as_str() {
        "" if config.study_values.is_empty() => None,
        "" => bail!("study_values needs study_attribute"),
        name => {
            let attribute = crate::model::json::parse_tag(name)
                .with_context(|| format!("unknown attribute {name:?}"))?;
            if !crate::model::levels::STUDY_TAGS.contains(&attribute) {
                bail!("{name} is not a study-level attribute the index keeps");
            }
            Some(StudyFilter {
                attribute,
                values: config.study_values.clone(),
            })
        }
    };
    Ok(Rule {
        subject: set(&config.subject),
        scope: set(&config.scope),
        group: set(&config.group),
        ae_title: set(&config.ae_title),
        certificate: set(&config.certificate),
        actions,
        studies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::Scopes;
    use dicom_dictionary_std::tags;

    fn rule(who: &[(&str, &str)], actions: &[&str], institution: &[&str]) -> PolicyRuleConfig {
        let get = |k: &str| {
            who.iter()
                .find(|(key, _)| *key == k)
                .map_or(String::new(), |(_, v)| v.to_string())
        };
        PolicyRuleConfig {
            subject: get("subject"),
            scope: get("scope"),
            group: get("group"),
            ae_title: get("ae_title"),
            certificate: get("certificate"),
            actions: actions.iter().map(|a| a.to_string()).collect(),
            study_attribute: if institution.is_empty() {
                String::new()
            } else {
                "InstitutionName".into()
            },
            study_values: institution.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn user(subject: &str, groups: &[&str]) -> Identity {
        Identity {
            subject: subject.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            scopes: Scopes::parse(["read", "search"]),
            ..Identity::anonymous(None)
        }
    }

    fn at(institution: &'static str) -> impl Fn(Tag) -> Option<String> {
        move |tag| (tag == tags::INSTITUTION_NAME).then(|| institution.to_string())
    }

    #[test]
    fn without_rules_everything_is_in_scope() {
        let policy = Policy::new(&[]).unwrap();
        assert_eq!(policy.scope(&user("a", &[]), Action::Delete), Scope::All);
    }

    #[test]
    fn rules_deny_by_default_and_scope_by_study_attribute() {
        let policy = Policy::new(&[
            rule(
                &[("group", "north")],
                &["search", "read"],
                &["North Hospital"],
            ),
            rule(&[("subject", "auditor")], &["search"], &[]),
            rule(
                &[("ae_title", "MOD1")],
                &["store"],
                &["North Hospital", "Annex"],
            ),
        ])
        .unwrap();
        let north = user("n", &["north"]);
        assert_eq!(
            policy.decide(&north, Action::Read, at("North Hospital")),
            Decision::Allow
        );
        assert_eq!(
            policy.decide(&north, Action::Read, at("South Hospital")),
            Decision::Deny
        );
        assert_eq!(
            policy.decide(&north, Action::Store, at("North Hospital")),
            Decision::Deny
        );
        assert_eq!(
            policy.scope(&user("x", &[]), Action::Search),
            Scope::Nothing
        );
        assert_eq!(
            policy.scope(&user("auditor", &[]), Action::Search),
            Scope::All
        );
        assert_eq!(
            policy.scope(&user("auditor", &[]), Action::Read),
            Scope::Nothing
        );
        let modality = Identity::dimse_peer("MOD1", "10.0.0.1".parse().unwrap(), None);
        assert_eq!(
            policy.decide(&modality, Action::Store, at("Annex")),
            Decision::Allow
        );
        assert_eq!(
            policy.decide(&modality, Action::Search, at("Annex")),
            Decision::Deny
        );
    }

    #[test]
    fn rules_are_checked_when_loaded() {
        assert!(Policy::new(&[rule(&[], &["fly"], &[])]).is_err());
        let mut bad = rule(&[], &["read"], &["x"]);
        bad.study_attribute = "Rows".into(); // an image attribute, not the study's
        assert!(Policy::new(&[bad]).is_err());
    }
}
