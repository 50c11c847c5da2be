//! Gateway configuration: embedded defaults, an optional TOML file, then environment overrides.
//!
//! Every key of `config/default.toml` can be overridden by an environment variable named
//! `DICOMGW_<SECTION>__<KEY>` (upper case, two underscores between section and key), for example
//! `DICOMGW_DIMSE__AE_TITLE=PACS1` or `DICOMGW_HTTP__BIND=127.0.0.1:8080`. Values are parsed as TOML
//! scalars when they parse (numbers, booleans, `["a","b"]` arrays), else taken as strings.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

pub const ENV_PREFIX: &str = "DICOMGW_";
/// The largest `dimse.max_pdu_length` (16 MiB): a PDU is read whole into memory before it is split.
pub const MAX_PDU_LENGTH: u32 = 16 << 20;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub dimse: DimseConfig,
    pub http: HttpConfig,
    pub storage: StorageConfig,
    pub index: IndexConfig,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
    pub fhir: FhirConfig,
    pub viewer: ViewerConfig,
    pub render: RenderConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub policy: PolicyConfig,
    pub audit: AuditConfig,
}

/// What to do when an instance arrives whose SOP Instance UID is already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DuplicatePolicy {
    /// Keep the stored copy, discard the new one, answer success.
    KeepFirst,
    /// Replace the stored copy with the new one.
    Replace,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DimseConfig {
    pub ae_title: String,
    /// The plain DIMSE listener; empty: none.
    pub bind: String,
    /// The DICOM TLS listener (PS3.15 B.9 / B.11, certificate from `[tls]`); empty: none.
    pub tls_bind: String,
    /// Reject associations whose called AE title is not `ae_title`.
    pub check_called_ae: bool,
    /// Accept Storage SOP classes that are not in the standard dictionary (private classes).
    pub accept_private_sop_classes: bool,
    pub max_associations: usize,
    /// Connections beyond `max_associations` being answered A-ASSOCIATE-RJ at once; past it, a
    /// further connection is closed without an answer.
    pub max_rejections_in_progress: usize,
    /// Largest PDU we accept (and announce) in bytes.
    pub max_pdu_length: u32,
    /// Longest wait for one PDU, from when we start waiting to its last byte.
    pub read_timeout_secs: u64,
    /// Longest time one DIMSE message (command and data set) may take to arrive, from its first PDU.
    pub message_timeout_secs: u64,
    pub write_timeout_secs: u64,
    /// Largest object (dataset bytes) accepted by C-STORE; larger ones get A700.
    pub max_object_size: u64,
    pub on_duplicate: DuplicatePolicy,
    /// C-MOVE / C-GET: a pending response after a sub-operation only when this many milliseconds have
    /// passed since the last one (0: after every sub-operation). PS3.4 makes pending responses optional.
    pub retrieve_pending_interval_ms: u64,
    /// Known application entities: C-MOVE destinations, and who may query and retrieve.
    pub peers: Vec<PeerConfig>,
    /// Reject associations (A-ASSOCIATE-RJ, "calling AE title not recognized") from AE titles that are
    /// not in `peers` (or not from a pinned peer's address).
    pub require_known_peers: bool,
}

impl DimseConfig {
    pub fn write_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.write_timeout_secs)
    }
}

/// A known application entity (`[[dimse.peers]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub ae_title: String,
    /// Where C-MOVE sub-operations for this AE are sent.
    pub host: String,
    pub port: u16,
    /// When set, this AE's C-FIND / C-MOVE / C-GET requests are served only from this IP address.
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
    /// May send C-FIND.
    #[serde(default = "yes")]
    pub query: bool,
    /// May send C-MOVE and C-GET.
    #[serde(default = "yes")]
    pub retrieve: bool,
    /// When set, this AE's associations are accepted only over TLS with a client certificate of
    /// exactly this subject (RFC 4514, e.g. `CN=modality1,O=Hospital`).
    #[serde(default)]
    pub certificate: Option<String>,
    /// C-MOVE sub-operations to this AE go over TLS (its certificate checked against `[tls] ca`).
    #[serde(default)]
    pub tls: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub bind: String,
    /// HTTPS (HTTP/1.1 and HTTP/2 by ALPN) with the `[tls]` certificate instead of plain HTTP.
    pub tls: bool,
    /// Serve HTTP on an address other machines reach although no authentication is configured.
    pub allow_anonymous: bool,
    /// Base URL clients reach the gateway at (for RetrieveURL / BulkDataURI); derived from the
    /// request's Host header when empty.
    pub public_url: String,
    /// Origins allowed by CORS; `["*"]` allows any. Empty disables CORS headers.
    pub cors_allowed_origins: Vec<String>,
    /// Answer DICOMweb DELETE of studies, series and instances (405 when false).
    pub allow_delete: bool,
    /// gzip DICOM JSON answers (QIDO, metadata) for clients that accept it.
    pub compression: bool,
    /// Largest STOW-RS request body, in bytes (413 above); each instance in it is also held to
    /// `[dimse] max_object_size`.
    pub max_stow_size: u64,
    /// Largest request body, in bytes (413 beyond it).
    pub max_body_size: usize,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_size: usize,
    /// Requests handled at once; further ones wait for a free slot.
    pub max_concurrent_requests: usize,
    /// Seconds a request may take until its response starts (408 beyond it).
    pub request_timeout_secs: u64,
    /// Seconds a client has to send a request's head once it has started (slowloris).
    pub header_read_timeout_secs: u64,
    /// QIDO-RS results per page when the request has no `limit`, and the largest `limit` honoured.
    pub qido_default_limit: u64,
    pub qido_max_limit: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `filesystem` (objects under `path`) or `s3` (objects in the `[storage.s3]` bucket).
    pub backend: String,
    pub path: PathBuf,
    /// Where incoming objects are spooled before they are stored; must be on the same filesystem
    /// as `path` for the filesystem backend so that storing is a rename. Defaults to `<path>/../spool`.
    pub spool_path: Option<PathBuf>,
    pub s3: S3Config,
}

/// An S3-compatible bucket (AWS S3, MinIO, Ceph, Garage...), used when `storage.backend = "s3"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Endpoint URL (`https://...` for TLS); empty: AWS's endpoint for `region`.
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Prepended to every object key, e.g. `dicom/`.
    pub prefix: String,
    /// `https://endpoint/bucket/key` addressing instead of `https://bucket.endpoint/key`.
    pub force_path_style: bool,
    /// Static credentials; both empty: the standard AWS chain (environment, profile, instance role).
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Objects of at least this many bytes are uploaded in parts.
    pub multipart_threshold: u64,
    pub part_size: u64,
    /// Parts of one object uploaded at once.
    pub part_concurrency: usize,
    pub connect_timeout_secs: u64,
    /// Longest single request attempt (one part, one small object, the headers of a GET).
    pub attempt_timeout_secs: u64,
    /// Attempts per request, the first included; transient errors are retried with backoff.
    pub max_attempts: u32,
}

/// How ImagingStudy.subject refers to the patient (`[fhir] subject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectMode {
    /// (a) A logical reference: the Patient ID as an identifier, with its system.
    Identifier,
    /// (b) A literal reference to this gateway's own `Patient/{id}`.
    Local,
    /// (c) A literal reference to the patient found on `patient_server` by identifier, cached;
    /// (a) when that server is down or finds no one.
    External,
}

/// What a push does once every instance of a study is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnDelete {
    /// Update the ImagingStudy with status `entered-in-error`.
    EnteredInError,
    /// Conditional delete (`DELETE ImagingStudy?identifier=...`).
    Delete,
}

/// The FHIR R4 interface (`[fhir]`): served at `/fhir`, and optionally pushed to an EHR.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FhirConfig {
    /// Serve `/fhir` and `/IHEInvokeImageDisplay`.
    pub enabled: bool,
    pub subject: SubjectMode,
    /// Identifier system of a Patient ID whose Issuer of Patient ID has no entry in `issuer_systems`.
    pub patient_id_system: String,
    /// Issuer of Patient ID -> identifier system, e.g. `{ "HOSP_A" = "urn:oid:1.2.3.4" }`.
    pub issuer_systems: std::collections::BTreeMap<String, String>,
    /// Issuer of Accession Number (local namespace) -> identifier system.
    pub accession_systems: std::collections::BTreeMap<String, String>,
    /// Subject mode `external`: the FHIR base URL searched by `Patient?identifier=` (empty: the push
    /// server).
    pub patient_server: String,
    pub patient_cache_ttl_secs: u64,
    /// IID `requestType=STUDY`: viewer URL with `{study}` (Study Instance UID), `{patient}` and
    /// `{dicomweb}` (the DICOMweb root); empty: the study's series in DICOMweb.
    pub viewer_url: String,
    /// IID `requestType=PATIENT`: URL with `{patient}` and `{dicomweb}`; empty: the patient's
    /// studies in QIDO-RS.
    pub viewer_patient_url: String,
    /// Page size of a search without `_count`, and the largest `_count` honoured.
    pub default_count: u64,
    pub max_count: u64,
    pub push: FhirPushConfig,
}

/// Pushing ImagingStudy to an EHR's FHIR server (`[fhir.push]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FhirPushConfig {
    /// The server's FHIR base URL, e.g. `https://ehr.example.org/fhir`; empty: no push.
    pub url: String,
    /// A study is pushed once no instance arrived (or was deleted) for this many milliseconds.
    pub stability_ms: u64,
    pub on_delete: OnDelete,
    /// Studies pushed at once by this gateway.
    pub concurrency: usize,
    pub timeout_secs: u64,
    /// First retry delay; doubled per failed attempt (with jitter) up to `max_backoff_ms`.
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// How long a claimed study stays claimed by one gateway (a crashed gateway's claims expire).
    pub lease_secs: u64,
    /// How often the outbox is polled for stable studies.
    pub poll_ms: u64,
    pub auth: FhirAuthConfig,
}

/// Authentication to the push server (`[fhir.push.auth]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FhirAuthConfig {
    /// `none`, `bearer` (static `token`) or `client_credentials` (OAuth 2.0, SMART Backend Services).
    pub kind: String,
    pub token: String,
    pub token_url: String,
    pub client_id: String,
    /// Client secret (HTTP Basic); or, when `private_key_path` is set, a signed JWT assertion instead.
    pub client_secret: String,
    /// PEM private key for `private_key_jwt` client authentication.
    pub private_key_path: String,
    /// `RS384` (RSA key) or `ES384` (EC P-384 key).
    pub jwt_alg: String,
    /// `kid` header of the assertion (the key's id in the client's JWKS).
    pub jwt_kid: String,
    pub scope: String,
    /// Tokens are refreshed this many seconds before they expire.
    pub refresh_before_secs: u64,
}

impl Default for FhirConfig {
    fn default() -> Self {
        FhirConfig {
            enabled: true,
            subject: SubjectMode::Identifier,
            patient_id_system: "urn:dicom:patient-id".into(),
            issuer_systems: Default::default(),
            accession_systems: Default::default(),
            patient_server: String::new(),
            patient_cache_ttl_secs: 300,
            viewer_url: String::new(),
            viewer_patient_url: String::new(),
            default_count: 50,
            max_count: 1000,
            push: FhirPushConfig::default(),
        }
    }
}

impl Default for FhirPushConfig {
    fn default() -> Self {
        FhirPushConfig {
            url: String::new(),
            stability_ms: 60_000,
            on_delete: OnDelete::EnteredInError,
            concurrency: 4,
            timeout_secs: 30,
            initial_backoff_ms: 2_000,
            max_backoff_ms: 600_000,
            lease_secs: 120,
            poll_ms: 1_000,
            auth: FhirAuthConfig::default(),
        }
    }
}

impl Default for FhirAuthConfig {
    fn default() -> Self {
        FhirAuthConfig {
            kind: "none".into(),
            token: String::new(),
            token_url: String::new(),
            client_id: String::new(),
            client_secret: String::new(),
            private_key_path: String::new(),
            jwt_alg: "RS384".into(),
            jwt_kid: String::new(),
            scope: "system/ImagingStudy.write".into(),
            refresh_before_secs: 60,
        }
    }
}

impl FhirConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if self.default_count == 0 || self.max_count < self.default_count {
            bail!("fhir.default_count must be at least 1 and at most fhir.max_count");
        }
        let push = &self.push;
        if push.concurrency == 0 || push.lease_secs == 0 || push.poll_ms == 0 {
            bail!("fhir.push.concurrency, lease_secs and poll_ms must be at least 1");
        }
        let auth = &push.auth;
        match auth.kind.as_str() {
            "none" => {}
            "bearer" if !auth.token.is_empty() => {}
            "bearer" => bail!("fhir.push.auth.kind = \"bearer\" needs fhir.push.auth.token"),
            "client_credentials" => {
                if auth.token_url.is_empty() || auth.client_id.is_empty() {
                    bail!("fhir.push.auth client_credentials needs token_url and client_id");
                }
                if auth.client_secret.is_empty() == auth.private_key_path.is_empty() {
                    bail!("fhir.push.auth client_credentials needs client_secret or private_key_path (one of them)");
                }
                if !matches!(auth.jwt_alg.as_str(), "RS384" | "ES384") {
                    bail!("fhir.push.auth.jwt_alg must be RS384 or ES384");
                }
            }
            other => bail!(
                "fhir.push.auth.kind {other:?} is not one of none, bearer, client_credentials"
            ),
        }
        if self.subject == SubjectMode::External
            && self.patient_server.is_empty()
            && push.url.is_empty()
        {
            bail!("fhir.subject = \"external\" needs fhir.patient_server (or fhir.push.url)");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    pub url: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Threads running the network tasks (DIMSE associations, HTTP requests); 0 = half the CPUs,
    /// at least one.
    pub worker_threads: usize,
    /// On SIGTERM / SIGINT: seconds the associations and HTTP requests in progress have to finish
    /// once the listeners are closed, before the process exits anyway.
    pub shutdown_grace_secs: u64,
}

impl RuntimeConfig {
    /// The number of async worker threads. Parsing, flushing and index writes run on threads of
    /// their own, so the network tasks need only part of the machine; each further worker that
    /// can run a task adds cross-thread wake-ups to every C-STORE (on 2 CPUs, two workers stored
    /// ~4 % fewer objects per second than one).
    pub fn workers(&self) -> usize {
        if self.worker_threads > 0 {
            return self.worker_threads;
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cpus / 2).max(1)
    }
}

/// The OHIF viewer served at `/viewer/` (fetched by `scripts/fetch-viewer`, never committed).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ViewerConfig {
    /// Directory holding OHIF's built `dist/` (its `index.html` at the top).
    pub dir: PathBuf,
}

impl Default for ViewerConfig {
    fn default() -> Self {
        ViewerConfig {
            dir: PathBuf::from("data/viewer"),
        }
    }
}

/// The gateway's certificate (`[tls]`), for the DICOM TLS listener, HTTPS and TLS to move
/// destinations; the files are read again on SIGHUP and when they change.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// PEM CA certificates: when set, DICOM TLS clients must present a certificate one of them signed.
    pub client_ca: String,
    /// PEM CA certificates that sign the certificates of TLS move destinations; empty: `client_ca`.
    pub ca: String,
    /// How often the files' modification times are looked at (0: only on SIGHUP).
    pub reload_check_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: String::new(),
            key: String::new(),
            client_ca: String::new(),
            ca: String::new(),
            reload_check_secs: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter directive, e.g. `info` or `dicom_gateway=debug,info`.
    pub level: String,
}

impl Default for DimseConfig {
    fn default() -> Self {
        DimseConfig {
            ae_title: "DICOMGW".into(),
            bind: "127.0.0.1:11112".into(),
            tls_bind: String::new(),
            check_called_ae: true,
            accept_private_sop_classes: false,
            max_associations: 64,
            max_rejections_in_progress: 64,
            max_pdu_length: 65_536,
            read_timeout_secs: 60,
            message_timeout_secs: 3600,
            write_timeout_secs: 60,
            max_object_size: 4 << 30,
            on_duplicate: DuplicatePolicy::KeepFirst,
            retrieve_pending_interval_ms: 100,
            peers: Vec::new(),
            require_known_peers: false,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: "127.0.0.1:8080".into(),
            tls: false,
            allow_anonymous: false,
            public_url: String::new(),
            cors_allowed_origins: vec!["*".into()],
            allow_delete: false,
            compression: true,
            max_stow_size: 64 << 30,
            max_body_size: 1 << 20,
            max_header_size: 64 << 10,
            max_concurrent_requests: 512,
            request_timeout_secs: 60,
            header_read_timeout_secs: 10,
            qido_default_limit: 1000,
            qido_max_limit: 1000,
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            worker_threads: 0,
            shutdown_grace_secs: 30,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: "filesystem".into(),
            path: PathBuf::from("data/objects"),
            spool_path: None,
            s3: S3Config::default(),
        }
    }
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: String::new(),
            region: "us-east-1".into(),
            bucket: String::new(),
            prefix: String::new(),
            force_path_style: false,
            access_key_id: String::new(),
            secret_access_key: String::new(),
            multipart_threshold: 64 << 20,
            part_size: 16 << 20,
            part_concurrency: 4,
            connect_timeout_secs: 5,
            attempt_timeout_secs: 120,
            max_attempts: 4,
        }
    }
}

/// The audit trail (`[audit]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The Audit Source ID this gateway records its events under; the host name when empty.
    pub source_id: String,
}

/// Rendered images, thumbnails and WADO-URI (`[render]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RenderConfig {
    /// Frames decoded and encoded at once (each on a blocking thread); 0 = the number of CPUs.
    pub max_concurrent: usize,
    /// The longest side of a thumbnail when the request gives no viewport, in pixels.
    pub thumbnail_size: u32,
}

/// `[auth]`: who may call the HTTP endpoints. Nothing set: every caller is anonymous.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The realm named in `WWW-Authenticate`.
    pub realm: String,
    /// OIDC / OAuth 2.0 bearer tokens: the JWKS (an http(s) URL or a file), and the `iss` and `aud`
    /// every token must carry.
    pub jwks: String,
    pub issuer: String,
    pub audience: String,
    /// Leeway for `exp` and `nbf`, in seconds.
    pub clock_skew_secs: u64,
    /// The JWKS is read again after this many seconds, and when a token names an unknown key id, but
    /// not more often than every `jwks_min_refetch_secs`.
    pub jwks_cache_secs: u64,
    pub jwks_min_refetch_secs: u64,
    /// HTTP basic users: lines `user:hash:scopes` (hash from `dicom-gateway hash-password`).
    pub users_file: String,
    pub api_keys: Vec<ApiKeyConfig>,
}

/// `[policy]`: who may do what on which studies (`security::policy`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub rules: Vec<PolicyRuleConfig>,
}

/// One `[[policy.rules]]` entry: who (every field given must match), the actions, and which studies.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyRuleConfig {
    /// Token `sub`, API key name, basic user name (or a DIMSE peer's AE title).
    pub subject: String,
    /// A scope the credential holds, as written (e.g. "radiology" or "user/*.read").
    pub scope: String,
    /// A value of the token's `groups` claim.
    pub group: String,
    pub ae_title: String,
    /// The subject of a verified TLS client certificate.
    pub certificate: String,
    /// search, read, store, delete, admin.
    pub actions: Vec<String>,
    /// Only studies whose study-level attribute (keyword or 8 hex digits, e.g. "InstitutionName",
    /// "IssuerOfPatientID") has one of `study_values`; empty: every study.
    pub study_attribute: String,
    pub study_values: Vec<String>,
}

/// One `[[auth.api_keys]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub name: String,
    /// SHA-256 of the key, hex (`printf %s "$KEY" | sha256sum`).
    pub sha256: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// RFC 3339 time after which the key is refused; empty: never.
    #[serde(default)]
    pub expires: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            realm: "dicom-gateway".into(),
            jwks: String::new(),
            issuer: String::new(),
            audience: String::new(),
            clock_skew_secs: 60,
            jwks_cache_secs: 3600,
            jwks_min_refetch_secs: 30,
            users_file: String::new(),
            api_keys: Vec::new(),
        }
    }
}

impl Default for RenderConfig {
    fn default() -> Self {
        RenderConfig {
            max_concurrent: 0,
            thumbnail_size: 128,
        }
    }
}

impl RenderConfig {
    pub fn concurrency(&self) -> usize {
        if self.max_concurrent > 0 {
            return self.max_concurrent;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            url: "sqlite://data/index.db".into(),
            max_connections: 8,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info,jpeg2k=warn".into(),
        }
    }
}

impl Config {
    /// Loads the embedded defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                text.parse::<toml::Table>()
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut table, std::env::vars())?;
        let config: Config = toml::Value::Table(table)
            .try_into()
            .context("invalid configuration")?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let ae = self.dimse.ae_title.trim();
        if ae.is_empty() || ae.len() > 16 || !ae.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
            bail!("dimse.ae_title must be 1-16 printable ASCII characters");
        }
        for peer in &self.dimse.peers {
            let ae = peer.ae_title.trim();
            if ae.is_empty() || ae.len() > 16 || ae.contains('\\') {
                bail!(
                    "dimse.peers: AE title {:?} must be 1-16 characters",
                    peer.ae_title
                );
            }
        }
        if self.dimse.bind.is_empty() && self.dimse.tls_bind.is_empty() {
            bail!("dimse.bind and dimse.tls_bind are both empty: no DIMSE listener");
        }
        let needs_certificate = !self.dimse.tls_bind.is_empty()
            || self.http.tls
            || self.dimse.peers.iter().any(|p| p.tls);
        if needs_certificate && (self.tls.cert.is_empty() || self.tls.key.is_empty()) {
            bail!("dimse.tls_bind, http.tls and TLS peers need tls.cert and tls.key");
        }
        if self.dimse.peers.iter().any(|p| p.tls)
            && self.tls.ca.is_empty()
            && self.tls.client_ca.is_empty()
        {
            bail!("dimse.peers with tls = true need tls.ca (or tls.client_ca) to check their certificates");
        }
        if !(4096..=MAX_PDU_LENGTH).contains(&self.dimse.max_pdu_length) {
            bail!("dimse.max_pdu_length must be 4096 to {MAX_PDU_LENGTH}");
        }
        if self.dimse.max_associations == 0 || self.http.max_concurrent_requests == 0 {
            bail!("dimse.max_associations and http.max_concurrent_requests must be at least 1");
        }
        if self.http.max_header_size < 8192 {
            // hyper's smallest read buffer.
            bail!("http.max_header_size must be at least 8192");
        }
        if self.http.qido_default_limit == 0
            || self.http.qido_max_limit < self.http.qido_default_limit
        {
            bail!("http.qido_default_limit must be at least 1 and at most http.qido_max_limit");
        }
        match self.storage.backend.as_str() {
            "filesystem" => {}
            "s3" => self.storage.s3.validate()?,
            other => bail!(
                "storage.backend {other:?} is not supported (supported: \"filesystem\", \"s3\")"
            ),
        }
        if !self.index.url.starts_with("sqlite:") {
            bail!("index.url must be a sqlite:// URL");
        }
        self.fhir.validate()?;
        Ok(())
    }

    /// Whether HTTP requests must carry credentials (`[auth]` names a JWKS, API keys or a users file).
    pub fn http_auth_configured(&self) -> bool {
        !self.auth.jwks.is_empty()
            || !self.auth.api_keys.is_empty()
            || !self.auth.users_file.is_empty()
    }

    pub fn spool_path(&self) -> PathBuf {
        self.storage.spool_path.clone().unwrap_or_else(|| {
            self.storage
                .path
                .parent()
                .unwrap_or(Path::new("."))
                .join("spool")
        })
    }
}

impl S3Config {
    fn validate(&self) -> anyhow::Result<()> {
        if self.bucket.is_empty() {
            bail!("storage.s3.bucket must be set when storage.backend = \"s3\"");
        }
        if self.access_key_id.is_empty() != self.secret_access_key.is_empty() {
            bail!("storage.s3.access_key_id and secret_access_key must be set together");
        }
        // S3 allows at most 10,000 parts of at least 5 MiB (except the last).
        if self.part_size < 5 << 20 {
            bail!("storage.s3.part_size must be at least 5 MiB (5242880)");
        }
        if self.multipart_threshold < self.part_size {
            bail!("storage.s3.multipart_threshold must be at least part_size");
        }
        if self.part_concurrency == 0 || self.max_attempts == 0 {
            bail!("storage.s3.part_concurrency and max_attempts must be at least 1");
        }
        Ok(())
    }
}

/// Folds `DICOMGW_SECTION__KEY=value` variables into the TOML table
/// (`DICOMGW_SECTION__SUBSECTION__KEY` for a nested table such as `[storage.s3]`).
fn apply_env(
    table: &mut toml::Table,
    vars: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        let Some((key, sections)) = path.split_last().filter(|(_, s)| !s.is_empty()) else {
            continue;
        };
        let mut current = &mut *table;
        for section in sections {
            let entry = current
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(section_table) = entry.as_table_mut() else {
                bail!("config section {section} is not a table");
            };
            current = section_table;
        }
        current.insert(key.clone(), parse_env_value(&value));
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_values_and_types() {
        let mut table: toml::Table = "[dimse]\nae_title = \"A\"\n".parse().unwrap();
        let vars = vec![
            ("DICOMGW_DIMSE__AE_TITLE".to_string(), "PACS".to_string()),
            ("DICOMGW_DIMSE__MAX_ASSOCIATIONS".into(), "3".into()),
            ("DICOMGW_HTTP__BIND".into(), "127.0.0.1:1".into()),
            (
                "DICOMGW_HTTP__CORS_ALLOWED_ORIGINS".into(),
                "[\"x\"]".into(),
            ),
            ("DICOMGW_STORAGE__S3__BUCKET".into(), "images".into()),
            ("DICOMGW_STORAGE__S3__PART_CONCURRENCY".into(), "8".into()),
            ("OTHER".into(), "1".into()),
        ];
        apply_env(&mut table, vars.into_iter()).unwrap();
        let c: Config = toml::Value::Table(table).try_into().unwrap();
        assert_eq!(c.dimse.ae_title, "PACS");
        assert_eq!(c.dimse.max_associations, 3);
        assert_eq!(c.http.bind, "127.0.0.1:1");
        assert_eq!(c.http.cors_allowed_origins, vec!["x".to_string()]);
        assert_eq!(c.storage.s3.bucket, "images");
        assert_eq!(c.storage.s3.part_concurrency, 8);
    }

    #[test]
    fn s3_backend_needs_a_bucket_and_sane_parts() {
        let mut c = Config::default();
        c.storage.backend = "s3".into();
        assert!(c.validate().is_err(), "no bucket");
        c.storage.s3.bucket = "images".into();
        c.validate().unwrap();
        c.storage.s3.part_size = 1 << 20;
        assert!(c.validate().is_err(), "parts below the S3 minimum");
        c.storage.s3.part_size = 16 << 20;
        c.storage.s3.access_key_id = "id-without-secret".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn peers_come_from_a_file_or_an_inline_array_in_the_environment() {
        let text = "[[dimse.peers]]\nae_title = \"WS1\"\nhost = \"10.0.0.5\"\nport = 104\naddress = \"10.0.0.5\"\nretrieve = false\n";
        let c: Config = toml::from_str(text).unwrap();
        assert_eq!(c.dimse.peers.len(), 1);
        assert!(c.dimse.peers[0].query && !c.dimse.peers[0].retrieve);
        assert_eq!(c.dimse.peers[0].address, Some("10.0.0.5".parse().unwrap()));
        let mut table = toml::Table::new();
        let vars = vec![(
            "DICOMGW_DIMSE__PEERS".to_string(),
            "[{ae_title = \"DEST\", host = \"127.0.0.1\", port = 4242}]".to_string(),
        )];
        apply_env(&mut table, vars.into_iter()).unwrap();
        let c: Config = toml::Value::Table(table).try_into().unwrap();
        assert_eq!(c.dimse.peers[0].port, 4242);
        assert!(c.dimse.peers[0].retrieve);
    }

    #[test]
    fn default_config_file_matches_embedded_defaults() {
        let text = include_str!("../config/default.toml");
        let c: Config = toml::from_str(text).unwrap();
        let d = Config::default();
        assert_eq!(c.dimse.ae_title, d.dimse.ae_title);
        assert_eq!(c.dimse.bind, d.dimse.bind);
        assert_eq!(c.http.bind, d.http.bind);
        assert_eq!(c.dimse.tls_bind, d.dimse.tls_bind);
        assert_eq!(c.http.tls, d.http.tls);
        assert_eq!(c.http.allow_anonymous, d.http.allow_anonymous);
        assert_eq!(c.tls, d.tls);
        assert_eq!(c.http.allow_delete, d.http.allow_delete);
        assert_eq!(c.storage.path, d.storage.path);
        assert_eq!(c.index.url, d.index.url);
        assert_eq!(c.dimse.max_object_size, d.dimse.max_object_size);
        assert_eq!(c.dimse.on_duplicate, d.dimse.on_duplicate);
        assert_eq!(c.storage.s3, d.storage.s3);
        assert_eq!(c.dimse.peers, d.dimse.peers);
        assert_eq!(c.fhir.subject, d.fhir.subject);
        assert_eq!(c.fhir.patient_id_system, d.fhir.patient_id_system);
        assert_eq!(c.fhir.push.url, d.fhir.push.url);
        assert_eq!(c.fhir.push.stability_ms, d.fhir.push.stability_ms);
        assert_eq!(c.fhir.push.on_delete, d.fhir.push.on_delete);
        assert_eq!(c.fhir.push.auth.kind, d.fhir.push.auth.kind);
        c.validate().unwrap();
    }
}
