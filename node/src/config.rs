//! `nearby-node run --config FILE`: the production configuration, a TOML file with environment
//! overrides (`NEARBY_<FIELD>`, e.g. `NEARBY_LISTEN=0.0.0.0:7400`), validated up front so a bad
//! value is a clear error naming the field rather than a failure later.
//!
//! ```toml
//! node_id = 1                    # never reused; the node's certificate names it
//! data = "/var/lib/nearby"
//! listen = "0.0.0.0:7400"        # client service (UDP)
//! raft_listen = "0.0.0.0:7401"   # node-to-node transport (UDP)
//! advertise = "10.0.0.1"         # the host peers and clients reach this node at
//! groups = 16                    # `nearby-node init` only: shard groups of a new cluster
//! client_driver = "batched"      # or "tasks": quinn's task per connection (to measure against)
//!
//! [cluster]                      # the node's identity in the cluster (`nearby-node ca`)
//! ca = "/etc/nearby/ca.pem"
//! cert = "/etc/nearby/node.pem"
//! key = "/etc/nearby/node-key.pem"
//! pseudonym_key = "/etc/nearby/pseudonym.key"  # strangers' pseudonyms (`ca issue` writes it)
//! join = ["10.0.0.2:7401"]       # on a fresh data directory: join the cluster of these nodes
//!
//! [tls]                          # the client service's certificate
//! cert = "/etc/nearby/cert.pem"
//! key = "/etc/nearby/key.pem"
//!
//! [auth]
//! token_public_key = "/etc/nearby/token.pub"   # from `nearby-node keygen`
//!
//! [presence]
//! radius_m = 8000
//! ttl_s = 600
//! page_size = 20
//!
//! [limits]                       # load shedding (see `service::overload`)
//! shed = true                    # refuse a share of periodic updates when overloaded
//! shed_cpu_percent = 90          # ... above this CPU use of the node's cores
//! shed_lag_ms = 20               # ... or above this scheduling lag
//! min_update_interval_ms = 250   # a session's updates closer than this are refused
//! sessions_per_user = 8          # open sessions per user on a node
//!
//! [history]                      # users' location history (`crate::history`)
//! enabled = true
//! max_age_days = 30              # older records are deleted (whole segments)
//! max_mb = 10240                 # this node's history on disk, all groups together
//!
//! [admin]                        # the admin API (`crate::admin`); none without this section
//! listen = "10.0.0.1:7402"       # TCP; plain HTTP unless tls_cert/tls_key are set
//! token_file = "/etc/nearby/admin-token"  # `nearby-node admin-token` makes one (0600)
//! tls_cert = "/etc/nearby/admin.pem"      # optional, with tls_key: HTTPS only
//! tls_key = "/etc/nearby/admin-key.pem"   # (0600)
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::ServiceConfig;
use crate::presence::PresenceConfig;
use crate::service::overload::Limits;

/// A configuration error, naming the field or file at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration (unknown or mistyped field).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and field.
        message: String,
    },
    /// A field has an invalid value.
    #[error("config field `{field}`: {reason}")]
    Field {
        /// The field, as written in the file (`section.key`).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn field(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        reason: reason.into(),
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id (never reused).
    pub node_id: u64,
    /// Data directory.
    pub data: PathBuf,
    /// Client service address (UDP).
    pub listen: SocketAddr,
    /// Raft transport address (UDP).
    pub raft_listen: SocketAddr,
    /// The host (name or IP) peers and clients reach this node at; the listen addresses' own
    /// if unset (which must then not be a wildcard).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Shard groups of a new cluster (read by `nearby-node init` only: an existing cluster's
    /// ranges come from its map).
    #[serde(default = "default_groups")]
    pub groups: u64,
    /// The node's identity in the cluster.
    pub cluster: ClusterSection,
    /// The client service's certificate.
    pub tls: TlsConfig,
    /// Token verification.
    pub auth: AuthConfig,
    /// Presence settings.
    #[serde(default)]
    pub presence: PresenceSection,
    /// Overload limits.
    #[serde(default)]
    pub limits: LimitsSection,
    /// Location history.
    #[serde(default)]
    pub history: HistorySection,
    /// The admin API.
    #[serde(default)]
    pub admin: Option<AdminSection>,
    /// What carries the client connections: `"batched"` (nearby's driver, the default) or
    /// `"tasks"` (quinn's task per connection, to measure against).
    #[serde(default)]
    pub client_driver: crate::service::Driver,
}

/// `[admin]`: the admin API (`crate::admin`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// TCP address to listen on.
    pub listen: SocketAddr,
    /// File holding the bearer token (one line, 0600).
    pub token_file: PathBuf,
    /// Certificate chain (PEM) of the API's HTTPS; with `tls_key`, plain HTTP is not served.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM, 0600) of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

/// `[history]`: what this node keeps of its users' past locations (`crate::history`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySection {
    /// Record accepted locations at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Delete records older than this many days (whole segments).
    #[serde(default = "default_history_days")]
    pub max_age_days: u32,
    /// What this node's history may take on disk, all groups together, in MiB.
    #[serde(default = "default_history_mb")]
    pub max_mb: u64,
}

impl Default for HistorySection {
    fn default() -> Self {
        HistorySection {
            enabled: true,
            max_age_days: default_history_days(),
            max_mb: default_history_mb(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_history_days() -> u32 {
    30
}
fn default_history_mb() -> u64 {
    10 * 1024
}

impl HistorySection {
    /// As the node's history settings.
    pub fn config(&self) -> crate::history::HistoryConfig {
        crate::history::HistoryConfig {
            enabled: self.enabled,
            max_age: Duration::from_secs(u64::from(self.max_age_days) * 24 * 3600),
            max_bytes: self.max_mb.saturating_mul(1 << 20),
            ..Default::default()
        }
    }
}

/// `[limits]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Shed a share of periodic location updates when overloaded.
    #[serde(default = "default_shed")]
    pub shed: bool,
    /// ... when the node's CPU use, in percent of the cores it may use, is above this.
    #[serde(default = "default_shed_cpu_percent")]
    pub shed_cpu_percent: u8,
    /// ... or when the scheduling lag is above this many milliseconds.
    #[serde(default = "default_shed_lag_ms")]
    pub shed_lag_ms: u32,
    /// A session's location updates closer together than this many milliseconds are refused
    /// (`rate_limited`); the node's fastest cadence is 10 s.
    #[serde(default = "default_min_update_interval_ms")]
    pub min_update_interval_ms: u32,
    /// Sessions one user may have open on a node at once; more are refused
    /// (`too_many_sessions`).
    #[serde(default = "default_sessions_per_user")]
    pub sessions_per_user: u16,
    /// Below this many MiB free on the data directory's disk, changes that only add data (new
    /// users, friend requests, settings turned on) are refused (`unavailable`, saying why);
    /// the rest is kept for Raft's own writes and for changes that end someone's visibility.
    #[serde(default = "default_min_free_disk_mb")]
    pub min_free_disk_mb: u64,
    /// Client connections from one IP address at once (generous: carrier-grade NAT puts many
    /// phones behind one address).
    #[serde(default = "default_connections_per_address")]
    pub connections_per_address: u32,
    /// Client connections from one IP address not yet past `Hello`, at once.
    #[serde(default = "default_handshakes_per_address")]
    pub handshakes_per_address: u32,
    /// Above this many connections not yet past `Hello`, new ones must first validate their
    /// address with a QUIC Retry (a flood from spoofed addresses then costs one packet each).
    #[serde(default = "default_retry_above_handshakes")]
    pub retry_above_handshakes: u32,
}

impl LimitsSection {
    /// As the client service's limits on connections from outside.
    pub fn abuse(&self) -> crate::service::AbuseLimits {
        crate::service::AbuseLimits {
            connections_per_address: self.connections_per_address,
            handshakes_per_address: self.handshakes_per_address,
            retry_above: self.retry_above_handshakes,
        }
    }
}

fn default_connections_per_address() -> u32 {
    crate::service::AbuseLimits::default().connections_per_address
}
fn default_handshakes_per_address() -> u32 {
    crate::service::AbuseLimits::default().handshakes_per_address
}
fn default_retry_above_handshakes() -> u32 {
    crate::service::AbuseLimits::default().retry_above
}

fn default_min_free_disk_mb() -> u64 {
    64
}

fn default_min_update_interval_ms() -> u32 {
    250
}
fn default_sessions_per_user() -> u16 {
    8
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            shed: default_shed(),
            shed_cpu_percent: default_shed_cpu_percent(),
            shed_lag_ms: default_shed_lag_ms(),
            min_update_interval_ms: default_min_update_interval_ms(),
            sessions_per_user: default_sessions_per_user(),
            min_free_disk_mb: default_min_free_disk_mb(),
            connections_per_address: default_connections_per_address(),
            handshakes_per_address: default_handshakes_per_address(),
            retry_above_handshakes: default_retry_above_handshakes(),
        }
    }
}

fn default_shed() -> bool {
    true
}
fn default_shed_cpu_percent() -> u8 {
    (Limits::default().cpu * 100.0).round() as u8
}
fn default_shed_lag_ms() -> u32 {
    Limits::default().lag.as_millis() as u32
}

/// `[cluster]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// The cluster CA's certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM), issued by the CA for this node id.
    pub cert: PathBuf,
    /// This node's private key (PEM, mode 0600).
    pub key: PathBuf,
    /// Raft addresses of nodes of the cluster to join when the data directory is fresh.
    #[serde(default)]
    pub join: Vec<String>,
    /// The cluster's pseudonym key (`pseudonym.key`, written by `nearby-node ca issue`): needed
    /// to list strangers nearby; without it this node lists none.
    #[serde(default)]
    pub pseudonym_key: Option<PathBuf>,
}

/// `[tls]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `[auth]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// File holding the Ed25519 public keys whose session tokens are accepted (base64url, one
    /// per line: two while the issuer rotates its key).
    pub token_public_key: PathBuf,
}

/// `[presence]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceSection {
    /// Search radius (the largest a user may choose), metres.
    #[serde(default = "default_radius")]
    pub radius_m: u32,
    /// Inactivity timeout, seconds.
    #[serde(default = "default_ttl")]
    pub ttl_s: u32,
    /// Friends per page.
    #[serde(default = "default_page")]
    pub page_size: u16,
}

impl Default for PresenceSection {
    fn default() -> Self {
        PresenceSection {
            radius_m: default_radius(),
            ttl_s: default_ttl(),
            page_size: default_page(),
        }
    }
}

fn default_groups() -> u64 {
    16
}
fn default_radius() -> u32 {
    8_000
}
fn default_ttl() -> u32 {
    600
}
fn default_page() -> u16 {
    20
}

impl NodeConfig {
    /// Reads `path`, applies `NEARBY_*` overrides from `env`, and validates.
    pub fn load(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path, env)
    }

    /// Parses TOML text (see [`NodeConfig::load`]).
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<NodeConfig, ConfigError> {
        let mut c: NodeConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        c.apply_env(env)?;
        c.validate()?;
        Ok(c)
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(name: &'static str, v: String) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.parse().map_err(|e: T::Err| field(name, format!("{v:?}: {e}")))
        }
        if let Some(v) = env("NEARBY_NODE_ID") {
            self.node_id = parse("NEARBY_NODE_ID", v)?;
        }
        if let Some(v) = env("NEARBY_DATA") {
            self.data = PathBuf::from(v);
        }
        if let Some(v) = env("NEARBY_LISTEN") {
            self.listen = parse("NEARBY_LISTEN", v)?;
        }
        if let Some(v) = env("NEARBY_RAFT_LISTEN") {
            self.raft_listen = parse("NEARBY_RAFT_LISTEN", v)?;
        }
        if let Some(v) = env("NEARBY_ADVERTISE") {
            self.advertise = Some(v);
        }
        if let Some(v) = env("NEARBY_JOIN") {
            self.cluster.join = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(v) = env("NEARBY_RADIUS_M") {
            self.presence.radius_m = parse("NEARBY_RADIUS_M", v)?;
        }
        if let Some(v) = env("NEARBY_TTL_S") {
            self.presence.ttl_s = parse("NEARBY_TTL_S", v)?;
        }
        if let Some(v) = env("NEARBY_SHED") {
            self.limits.shed = parse("NEARBY_SHED", v)?;
        }
        if let Some(v) = env("NEARBY_SHED_CPU_PERCENT") {
            self.limits.shed_cpu_percent = parse("NEARBY_SHED_CPU_PERCENT", v)?;
        }
        if let Some(v) = env("NEARBY_SHED_LAG_MS") {
            self.limits.shed_lag_ms = parse("NEARBY_SHED_LAG_MS", v)?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(field("node_id", "must be at least 1"));
        }
        if !(1..=4096).contains(&self.groups) {
            return Err(field("groups", format!("{} is not in 1..=4096", self.groups)));
        }
        if !(100..=50_000).contains(&self.presence.radius_m) {
            return Err(field(
                "presence.radius_m",
                format!("{} m is not in 100..=50000", self.presence.radius_m),
            ));
        }
        if !(30..=86_400).contains(&self.presence.ttl_s) {
            return Err(field(
                "presence.ttl_s",
                format!("{} s is not in 30..=86400", self.presence.ttl_s),
            ));
        }
        if !(1..=100).contains(&self.presence.page_size) {
            return Err(field(
                "presence.page_size",
                format!("{} is not in 1..=100", self.presence.page_size),
            ));
        }
        if !(1..=10_000).contains(&self.limits.shed_lag_ms) {
            return Err(field(
                "limits.shed_lag_ms",
                format!("{} ms is not in 1..=10000", self.limits.shed_lag_ms),
            ));
        }
        if !(10..=100).contains(&self.limits.shed_cpu_percent) {
            return Err(field(
                "limits.shed_cpu_percent",
                format!("{} % is not in 10..=100", self.limits.shed_cpu_percent),
            ));
        }
        if self.listen == self.raft_listen && self.listen.port() != 0 {
            return Err(field("raft_listen", "must differ from listen"));
        }
        let wildcard = self.listen.ip().is_unspecified() || self.raft_listen.ip().is_unspecified();
        if wildcard && self.advertise.is_none() {
            return Err(field(
                "advertise",
                "required when listening on all addresses: the host peers and clients reach this node at",
            ));
        }
        if self.history.max_age_days == 0 {
            return Err(field(
                "history.max_age_days",
                "must be at least 1 (or set history.enabled = false)",
            ));
        }
        if self.history.max_mb < 16 {
            return Err(field("history.max_mb", "must be at least 16"));
        }
        if let Some(admin) = &self.admin {
            match (&admin.tls_cert, &admin.tls_key) {
                (Some(_), None) => return Err(field("admin.tls_key", "required with admin.tls_cert")),
                (None, Some(_)) => return Err(field("admin.tls_cert", "required with admin.tls_key")),
                _ => {}
            }
        }
        for seed in &self.cluster.join {
            if !seed.contains(':') {
                return Err(field("cluster.join", format!("{seed:?} is not host:port")));
            }
        }
        Ok(())
    }

    /// The client address other nodes redirect clients to.
    pub fn client_advertise(&self) -> Option<String> {
        self.advertise
            .as_ref()
            .map(|h| format!("{h}:{}", self.listen.port()))
    }

    /// The node-to-node address peers use.
    pub fn raft_advertise(&self) -> Option<String> {
        self.advertise
            .as_ref()
            .map(|h| format!("{h}:{}", self.raft_listen.port()))
    }

    /// The client-facing settings this configuration describes.
    pub fn service(&self) -> ServiceConfig {
        ServiceConfig {
            presence: PresenceConfig {
                radius_m: f64::from(self.presence.radius_m),
                ttl: Duration::from_secs(u64::from(self.presence.ttl_s)),
                // Read from its file by the binary (`cluster.pseudonym_key`).
                pseudonyms: None,
            },
            page_size: self.presence.page_size,
            sessions_per_user: usize::from(self.limits.sessions_per_user.max(1)),
            shed: self.limits.shed.then(|| Limits {
                lag: Duration::from_millis(u64::from(self.limits.shed_lag_ms)),
                cpu: f64::from(self.limits.shed_cpu_percent) / 100.0,
            }),
            ..ServiceConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node_id = 3
data = "/tmp/x"
listen = "127.0.0.1:7400"
raft_listen = "127.0.0.1:7401"
[cluster]
ca = "ca.pem"
cert = "node.pem"
key = "node-key.pem"
[tls]
cert = "c.pem"
key = "k.pem"
[auth]
token_public_key = "t.pub"
[presence]
radius_m = 5000
"#;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<NodeConfig, ConfigError> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        NodeConfig::parse(text, Path::new("node.toml"), move |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn a_good_file_parses_with_defaults_and_env_overrides() {
        let c = parse(
            GOOD,
            &[
                ("NEARBY_LISTEN", "0.0.0.0:9000"),
                ("NEARBY_ADVERTISE", "10.1.2.3"),
                ("NEARBY_JOIN", "10.1.2.4:7401, 10.1.2.5:7401"),
            ],
        )
        .expect("parses");
        assert_eq!(c.client_advertise().as_deref(), Some("10.1.2.3:9000"));
        assert_eq!(c.raft_advertise().as_deref(), Some("10.1.2.3:7401"));
        assert_eq!(c.cluster.join, vec!["10.1.2.4:7401", "10.1.2.5:7401"]);
        assert_eq!(c.node_id, 3);
        assert_eq!(c.groups, 16);
        assert_eq!(c.presence.radius_m, 5000);
        assert_eq!(c.presence.ttl_s, 600);
        assert_eq!(c.listen, "0.0.0.0:9000".parse().expect("addr"));
        assert_eq!(c.service().presence.ttl, Duration::from_secs(600));
        assert_eq!(c.service().shed, Some(Limits::default()));
    }

    #[test]
    fn load_shedding_is_configured_in_limits_and_can_be_turned_off() {
        let text = format!("{GOOD}[limits]\nshed_lag_ms = 50\nshed_cpu_percent = 90\n");
        let c = parse(&text, &[]).expect("parses");
        let want = Limits {
            lag: Duration::from_millis(50),
            cpu: 0.9,
        };
        assert_eq!(c.service().shed, Some(want));
        let c = parse(GOOD, &[("NEARBY_SHED", "false")]).expect("parses");
        assert_eq!(c.service().shed, None);
    }

    #[test]
    fn bad_configs_name_the_field() {
        /// The file's text, environment overrides, and the field the error must name.
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (
                &GOOD.replace("radius_m = 5000", "radius_m = 5"),
                &[],
                "presence.radius_m",
            ),
            (&GOOD.replace("node_id = 3", "node_id = 0"), &[], "node_id"),
            (
                &GOOD.replace("node_id = 3", "node_id = \"three\""),
                &[],
                "node_id",
            ),
            (
                &GOOD.replace("[presence]", "[presence]\nradius = 1"),
                &[],
                "radius",
            ),
            (&GOOD.replace("listen = \"127.0.0.1:7400\"\n", ""), &[], "listen"),
            (GOOD, &[("NEARBY_TTL_S", "soon")], "NEARBY_TTL_S"),
            (GOOD, &[("NEARBY_SHED_LAG_MS", "60000")], "limits.shed_lag_ms"),
            (
                GOOD,
                &[("NEARBY_SHED_CPU_PERCENT", "5")],
                "limits.shed_cpu_percent",
            ),
            (GOOD, &[("NEARBY_RAFT_LISTEN", "127.0.0.1:7400")], "raft_listen"),
            (GOOD, &[("NEARBY_LISTEN", "0.0.0.0:7400")], "advertise"),
            (GOOD, &[("NEARBY_JOIN", "10.0.0.1")], "cluster.join"),
            (&GOOD.replace("[cluster]\n", "[custer]\n"), &[], "custer"),
        ];
        for (text, env, name) in cases {
            let err = parse(text, env).expect_err("must fail").to_string();
            assert!(err.contains(name), "error {err:?} does not name {name}");
        }
    }
}
