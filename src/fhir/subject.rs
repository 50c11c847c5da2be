//! Patient linking: what ImagingStudy.subject says, per `[fhir] subject`:
//! (a) `identifier`: a logical reference, the Patient ID with its system;
//! (b) `local`: a literal reference to this gateway's `Patient/{id}`;
//! (c) `external`: a literal reference to the patient the configured FHIR server finds by
//!     `Patient?identifier=system|value`, cached for `patient_cache_ttl_secs`; (a) when the server
//!     is down or finds no one (failures are cached briefly, so a dead server does not slow every
//!     request).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::auth::Auth;
use super::http::Client;
use super::mapping::{patient_resource_id, patient_system, subject_by_identifier};
use crate::config::{FhirConfig, SubjectMode};

/// How long a failed lookup on the external server is remembered.
const FAILURE_TTL: Duration = Duration::from_secs(10);

/// A lookup's answer: when it was made, how long it is valid, the patient's id there if found.
type Cached = (Instant, Duration, Option<String>);

pub struct Linker {
    config: FhirConfig,
    client: Client,
    /// The external patient server's base (mode c), without trailing slash.
    server: String,
    auth: Option<Arc<Auth>>,
    /// (system, value) -> (when looked up, how long valid, the patient's id there if found).
    cache: Mutex<HashMap<(String, String), Cached>>,
}

impl Linker {
    pub fn new(config: &FhirConfig, client: Client, auth: Option<Arc<Auth>>) -> Linker {
        let server = if config.patient_server.is_empty() {
            &config.push.url
        } else {
            &config.patient_server
        };
        Linker {
            config: config.clone(),
            client,
            server: server.trim_end_matches('/').to_string(),
            // The push server's credentials serve the lookup only on that same server.
            auth: auth.filter(|_| config.patient_server.is_empty()),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// ImagingStudy.subject for a patient. `local_base`: the absolute FHIR base of this gateway
    /// for mode (b) when the resource leaves it (push); None: relative `Patient/{id}`.
    /// `same_server`: the resource goes to the external patient server itself (push), which
    /// makes its references relative.
    pub async fn subject(
        &self,
        patient_id: &str,
        issuer: &str,
        local_base: Option<&str>,
        same_server: bool,
    ) -> Value {
        if patient_id.is_empty() {
            return json!({"type": "Patient", "display": "unknown patient (no Patient ID)"});
        }
        match self.config.subject {
            SubjectMode::Identifier => subject_by_identifier(&self.config, patient_id, issuer),
            SubjectMode::Local => {
                let id = patient_resource_id(patient_id, issuer);
                let reference = match local_base {
                    Some(base) => format!("{base}/Patient/{id}"),
                    None => format!("Patient/{id}"),
                };
                let mut subject = subject_by_identifier(&self.config, patient_id, issuer);
                subject["reference"] = json!(reference);
                subject
            }
            SubjectMode::External => {
                let system = patient_system(&self.config, issuer).to_string();
                let mut subject = subject_by_identifier(&self.config, patient_id, issuer);
                if let Some(id) = self.lookup(&system, patient_id).await {
                    subject["reference"] = json!(if same_server {
                        format!("Patient/{id}")
                    } else {
                        format!("{}/Patient/{id}", self.server)
                    });
                }
                subject
            }
        }
    }

    /// The id of the patient the external server finds by identifier (cached).
    async fn lookup(&self, system: &str, value: &str) -> Option<String> {
        let key = (system.to_string(), value.to_string());
        if let Some((at, ttl, found)) = self.cache.lock().expect("cache lock").get(&key) {
            if at.elapsed() < *ttl {
                return found.clone();
            }
        }
        let (ttl, found) = match self.search(system, value).await {
            Ok(found) => (
                Duration::from_secs(self.config.patient_cache_ttl_secs),
                found,
            ),
            Err(e) => {
                tracing::warn!(error = %e, server = %self.server,
                    "patient lookup failed: subject by identifier");
                (FAILURE_TTL, None)
            }
        };
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(key, (Instant::now(), ttl, found.clone()));
        found
    }

    async fn search(&self, system: &str, value: &str) -> anyhow::Result<Option<String>> {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("identifier", &format!("{system}|{value}"))
            .finish();
        let url = format!("{}/Patient?{query}", self.server);
        let mut headers = vec![("accept", "application/fhir+json".to_string())];
        if let Some(auth) = &self.auth {
            if let Some(h) = auth.header().await? {
                headers.push(("authorization", h));
            }
        }
        let response = self
            .client
            .send(
                hyper::Method::GET,
                &url,
                &headers,
                None,
                Duration::from_secs(5),
            )
            .await?;
        if !response.status.is_success() {
            anyhow::bail!("Patient search answered {}", response.status);
        }
        let bundle: Value = response.json()?;
        let ids: Vec<&str> = bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["search"]["mode"].as_str().unwrap_or("match") == "match")
            .filter_map(|e| e["resource"]["id"].as_str())
            .collect();
        // Exactly one match links; none or several (ambiguous) fall back to the identifier.
        Ok(match ids.as_slice() {
            [id] => Some(id.to_string()),
            _ => None,
        })
    }
}
