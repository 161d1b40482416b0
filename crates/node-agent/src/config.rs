//! The daemon's configuration: built-in defaults (`defaults.toml`), then a TOML config file,
//! then `NODE_AGENT_*` environment variables and flags (clap reads both), each layer overriding
//! the keys it sets. Computed defaults (capacity, database URL, files under the work dir) are
//! filled in last, from the host and the merged work dir.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use builder_contract::LogSource;
use serde::{Deserialize, Serialize};
use url::Url;

const DEFAULTS: &str = include_str!("defaults.toml");

/// CPUs kept for the host when the capacity is not configured.
const RESERVED_VCPUS: u32 = 1;
/// Memory kept for the host when the capacity is not configured.
const RESERVED_MEM_MIB: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the config file {path} is not valid TOML")]
    Toml {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("the merged configuration is not valid")]
    Invalid(#[source] toml::de::Error),
    #[error("cannot read the host's memory size from /proc/meminfo")]
    Meminfo(#[source] std::io::Error),
    #[error("`vm_network` {value:?} is not an IPv4 network in CIDR form with room for a VM")]
    VmNetwork { value: String },
    #[error(
        "`vm_dns` is not set and the host has no name server a VM can reach: {resolv_conf} \
         names only loopback ones (or none) and {upstream} (systemd-resolved's upstream \
         servers) gives none either; set `vm_dns` (--vm-dns, NODE_AGENT_VM_DNS) to the name \
         servers the builder VMs should use"
    )]
    NoVmDns {
        resolv_conf: PathBuf,
        upstream: PathBuf,
    },
    #[error(
        "`listen` and `vm_listen_port` are both port {port}: the VM-facing listener needs a port \
         of its own (or set `callback_url` to serve builder VMs on the API's address)"
    )]
    SamePort { port: u16 },
    #[error("`notify_allow` entry {value:?} is not valid: {reason}")]
    NotifyAllow { value: String, reason: String },
    #[error("`{given}` is set but `{missing}` is not: TLS needs both a certificate and its key")]
    TlsPair {
        given: &'static str,
        missing: &'static str,
    },
    #[error("`vm_egress_allow_private` entry {value:?} is not a destination")]
    VmEgressAllowPrivate {
        value: String,
        #[source]
        source: builder_vmm::net::NetError,
    },
    #[error(transparent)]
    Mirror(#[from] crate::mirror::MirrorConfigError),
    #[error("`{key}` must be at least {min}, got {value}")]
    TooSmall {
        key: &'static str,
        min: u64,
        value: u64,
    },
}

/// Which VMM launches the builder VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum VmmKind {
    /// Firecracker where KVM is usable and its binaries are found, else QEMU under TCG
    /// ([`crate::vmm::choose_vmm`]).
    Auto,
    Qemu,
    Firecracker,
}

/// The keys of the config file, env and flags, after merging (before computed defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Layered {
    listen: SocketAddr,
    work_dir: PathBuf,
    database_url: Option<String>,
    api_token_file: Option<PathBuf>,
    api_tokens_file: Option<PathBuf>,
    notify_secret_file: Option<PathBuf>,
    notify_allow: Vec<String>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    node_id: Option<String>,
    capacity_vcpus: Option<u32>,
    capacity_mem_mib: Option<u64>,
    callback_url: Option<Url>,
    s3_credentials_file: Option<PathBuf>,
    vmm: VmmKind,
    kernel: PathBuf,
    rootfs: PathBuf,
    boot_args: Option<String>,
    vm_network: String,
    vm_dns: Option<Vec<Ipv4Addr>>,
    jailer_uid: u32,
    jailer_gid: u32,
    qemu_uid_base: u32,
    qemu_gid_base: u32,
    grace_period_s: u64,
    default_timeout_s: u64,
    max_body_bytes: u64,
    max_source_bytes: u64,
    webhook_attempts: u32,
    poll_interval_ms: u64,
    vm_listen_port: u16,
    vm_egress_allow_private: Vec<String>,
    vm_max_connections: u64,
    vm_header_timeout_s: u64,
    vm_idle_timeout_s: u64,
    max_log_bytes: u64,
    retention_days: u64,
    cache: bool,
    cache_dir: Option<PathBuf>,
    cache_max_mib: u64,
    cache_disk_gib: u64,
    cache_reflink_image_gib: u64,
    /// `[[mirror]]` tables (config file only).
    #[serde(default)]
    mirror: Vec<crate::mirror::MirrorEntry>,
    mirror_dir: Option<PathBuf>,
    mirror_tag_ttl_s: u64,
}

/// Flags of `node-agent serve`; every one also reads `NODE_AGENT_<NAME>`.
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct ServeArgs {
    /// TOML config file; its keys are the flag names with `_` for `-`.
    #[arg(long, env = "NODE_AGENT_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address of the HTTP API.
    #[arg(long, env = "NODE_AGENT_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// State directory: database (SQLite), logs, tokens, VM work dirs.
    #[arg(long, env = "NODE_AGENT_WORK_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<PathBuf>,
    /// `sqlite://FILE` or `postgres://...` (default: SQLite under the work dir).
    #[arg(long, env = "NODE_AGENT_DATABASE_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// File holding the API bearer token (created when missing).
    #[arg(long, env = "NODE_AGENT_API_TOKEN_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token_file: Option<PathBuf>,
    /// The scoped API tokens (`node-agent token add`; default `<work_dir>/api-tokens.toml`).
    #[arg(long, env = "NODE_AGENT_API_TOKENS_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_tokens_file: Option<PathBuf>,
    /// File holding the key that signs webhooks to requesters (created when missing).
    #[arg(long, env = "NODE_AGENT_NOTIFY_SECRET_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify_secret_file: Option<PathBuf>,
    /// Webhook targets allowed although private, loopback, link-local and the like:
    /// comma-separated CIDRs and host names.
    #[arg(long, env = "NODE_AGENT_NOTIFY_ALLOW", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify_allow: Option<Vec<String>>,
    /// PEM certificate chain of the API's HTTPS listener (with `tls_key_file`).
    #[arg(long, env = "NODE_AGENT_TLS_CERT_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[arg(long, env = "NODE_AGENT_TLS_KEY_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// This host's name in the shared queue (default: the host name).
    #[arg(long, env = "NODE_AGENT_NODE_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// vCPUs this host lends to builds at once.
    #[arg(long, env = "NODE_AGENT_CAPACITY_VCPUS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_vcpus: Option<u32>,
    /// Memory (MiB) this host lends to builds at once.
    #[arg(long, env = "NODE_AGENT_CAPACITY_MEM_MIB")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_mem_mib: Option<u64>,
    /// Base URL builder VMs post their signed report and logs to and clone uploaded sources
    /// from, instead of the per-VM listener on `vm_listen_port` (for a node agent behind
    /// another address, e.g. several hosts behind one name).
    #[arg(long, env = "NODE_AGENT_CALLBACK_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<Url>,
    /// JSON file with the S3 credentials given to builds.
    #[arg(long, env = "NODE_AGENT_S3_CREDENTIALS_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_credentials_file: Option<PathBuf>,
    /// VMM that runs the builder VMs.
    #[arg(long, env = "NODE_AGENT_VMM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm: Option<VmmKind>,
    /// Guest kernel (ELF vmlinux).
    #[arg(long, env = "NODE_AGENT_KERNEL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Builder root filesystem image.
    #[arg(long, env = "NODE_AGENT_ROOTFS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<PathBuf>,
    /// Kernel arguments before the network and build parameters (default: the VMM layer's,
    /// plus `init=` the agent named in `builder-vm.json` beside the rootfs).
    #[arg(long, env = "NODE_AGENT_BOOT_ARGS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// IPv4 range (CIDR) the VMs' networks are carved from, a /29 per VM.
    #[arg(long, env = "NODE_AGENT_VM_NETWORK")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_network: Option<String>,
    /// Name servers the builder VMs use, comma-separated IPv4 addresses (default: the host's
    /// own from /etc/resolv.conf, leaving out loopback ones a VM cannot reach; behind a
    /// loopback stub, systemd-resolved's upstreams from /run/systemd/resolve/resolv.conf; with
    /// none of either the node refuses to start).
    #[arg(long, env = "NODE_AGENT_VM_DNS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_dns: Option<Vec<Ipv4Addr>>,
    /// uid the jailer runs Firecracker as.
    #[arg(long, env = "NODE_AGENT_JAILER_UID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jailer_uid: Option<u32>,
    /// gid the jailer runs Firecracker as.
    #[arg(long, env = "NODE_AGENT_JAILER_GID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jailer_gid: Option<u32>,
    /// First uid of the range QEMU runs as, one uid per running VM (as many as VM network
    /// slots); no other user of the host may own one.
    #[arg(long, env = "NODE_AGENT_QEMU_UID_BASE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_uid_base: Option<u32>,
    /// First gid of the range QEMU runs as, one per running VM.
    #[arg(long, env = "NODE_AGENT_QEMU_GID_BASE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_gid_base: Option<u32>,
    /// Seconds SIGTERM waits for running builds before cancelling them.
    #[arg(long, env = "NODE_AGENT_GRACE_PERIOD_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_period_s: Option<u64>,
    /// Build timeout when a request gives none.
    #[arg(long, env = "NODE_AGENT_DEFAULT_TIMEOUT_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_timeout_s: Option<u64>,
    /// Largest accepted request body.
    #[arg(long, env = "NODE_AGENT_MAX_BODY_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// Largest accepted source upload (`POST /v1/sources`, a git bundle).
    #[arg(long, env = "NODE_AGENT_MAX_SOURCE_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_source_bytes: Option<u64>,
    /// Delivery attempts of a requester webhook before giving up.
    #[arg(long, env = "NODE_AGENT_WEBHOOK_ATTEMPTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_attempts: Option<u32>,
    /// How often the shared queue is polled for work another node queued.
    #[arg(long, env = "NODE_AGENT_POLL_INTERVAL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_interval_ms: Option<u64>,
    /// The port of the VM-facing listener, served on the host end of each running VM's veth
    /// (the guest's report and logs, uploaded sources; nothing of the operator API).
    #[arg(long, env = "NODE_AGENT_VM_LISTEN_PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_listen_port: Option<u16>,
    /// Private destinations builder VMs may reach despite the default deny, comma-separated
    /// `CIDR` or `CIDR:PORT` (e.g. a registry mirror on the LAN, `10.1.2.0/24:5000`).
    #[arg(
        long,
        env = "NODE_AGENT_VM_EGRESS_ALLOW_PRIVATE",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_egress_allow_private: Option<Vec<String>>,
    /// Connections one VM's listener serves at once; more are closed at once.
    #[arg(long, env = "NODE_AGENT_VM_MAX_CONNECTIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_max_connections: Option<u64>,
    /// Seconds a VM's connection has to send a request's headers (also the wait for the next
    /// request on a kept-alive connection).
    #[arg(long, env = "NODE_AGENT_VM_HEADER_TIMEOUT_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_header_timeout_s: Option<u64>,
    /// Seconds a VM's connection may go without reading or writing a byte.
    #[arg(long, env = "NODE_AGENT_VM_IDLE_TIMEOUT_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_idle_timeout_s: Option<u64>,
    /// The most bytes kept of each log of a build (console, vmm, build, dockerd): the tail.
    #[arg(long, env = "NODE_AGENT_MAX_LOG_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_log_bytes: Option<u64>,
    /// Days an ended build (its row, events and logs) is kept; 0 keeps them forever.
    #[arg(long, env = "NODE_AGENT_RETENTION_DAYS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u64>,
    /// Whether builds get a build cache (a fork of their cache key's Docker/BuildKit disk).
    #[arg(long, env = "NODE_AGENT_CACHE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<bool>,
    /// The build caches' directory (default `<work_dir>/cache`); the node is its only user.
    #[arg(long, env = "NODE_AGENT_CACHE_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// The most MiB all committed cache disks may take; least recently used keys are evicted.
    #[arg(long, env = "NODE_AGENT_CACHE_MAX_MIB")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_max_mib: Option<u64>,
    /// Size (GiB) of a new, sparse cache disk.
    #[arg(long, env = "NODE_AGENT_CACHE_DISK_GIB")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_disk_gib: Option<u64>,
    /// When `cache_dir`'s file system cannot reflink: size (GiB) of a sparse XFS image made at
    /// `<cache_dir>.xfs` and mounted on it, so forks are reflinks; 0: forks are sparse copies.
    #[arg(long, env = "NODE_AGENT_CACHE_REFLINK_IMAGE_GIB")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_reflink_image_gib: Option<u64>,
    /// The registry mirror's storage and registry configs (default `<work_dir>/mirror`); the
    /// mirrored registries themselves are `[[mirror]]` tables of the config file.
    #[arg(long, env = "NODE_AGENT_MIRROR_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror_dir: Option<PathBuf>,
    /// Seconds a tag's manifest, once pulled through the mirror, is answered again without
    /// asking the upstream (a tag moved upstream is seen that much later); 0: always ask.
    #[arg(long, env = "NODE_AGENT_MIRROR_TAG_TTL_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror_tag_ttl_s: Option<u64>,
}

/// The resolved configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub work_dir: PathBuf,
    pub database_url: String,
    pub api_token_file: PathBuf,
    /// The scoped tokens ([`crate::tokens`]).
    pub api_tokens_file: PathBuf,
    pub notify_secret_file: PathBuf,
    /// Restricted webhook targets the operator allows ([`crate::notify::NotifyAllow`]).
    pub notify_allow: crate::notify::NotifyAllow,
    /// The API's certificate and key: HTTPS when set.
    pub tls: Option<TlsFiles>,
    pub node_id: String,
    pub capacity_vcpus: u32,
    pub capacity_mem_mib: u64,
    /// The base URL builder VMs reach this node at when set; else the per-VM listener
    /// ([`Config::vm_base_url`]).
    pub callback_url: Option<Url>,
    pub s3_credentials_file: Option<PathBuf>,
    pub vmm: VmmKind,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub boot_args: Option<String>,
    pub vm_network: builder_vmm::AddressPool,
    /// Name servers given to each VM.
    pub vm_dns: Vec<Ipv4Addr>,
    pub jailer_uid: u32,
    pub jailer_gid: u32,
    /// QEMU runs as `qemu_uid_base + n`:`qemu_gid_base + n`, a different `n` per running VM.
    pub qemu_uid_base: u32,
    pub qemu_gid_base: u32,
    pub grace_period_s: u64,
    pub default_timeout_s: u64,
    pub max_body_bytes: u64,
    pub max_source_bytes: u64,
    pub webhook_attempts: u32,
    pub poll_interval_ms: u64,
    pub vm_listen_port: u16,
    /// The operator's exceptions to the VMs' private-range deny.
    pub vm_egress_allow_private: Vec<builder_vmm::EgressRule>,
    /// The limits of each VM-facing listener.
    pub vm_max_connections: usize,
    pub vm_header_timeout_s: u64,
    pub vm_idle_timeout_s: u64,
    pub max_log_bytes: u64,
    /// 0: builds are kept forever.
    pub retention_days: u64,
    /// The build caches' pool ([`builder_cache`]); `None` when `cache = false`.
    pub cache: Option<builder_cache::PoolConfig>,
    /// The pull-through registry mirror ([`crate::mirror`]); no upstreams: none.
    pub mirror: crate::mirror::MirrorConfig,
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        base.insert(key, value);
    }
}

/// The layers merged: the defaults, the config file, then the environment and flags.
fn merged(args: &ServeArgs) -> Result<toml::Table, ConfigError> {
    let mut table: toml::Table = DEFAULTS.parse().expect("the built-in defaults are TOML");
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let file: toml::Table = text.parse().map_err(|source| ConfigError::Toml {
            path: path.clone(),
            source,
        })?;
        merge(&mut table, file);
    }
    merge(
        &mut table,
        toml::Table::try_from(args).expect("flags serialize to a TOML table"),
    );
    Ok(table)
}

/// The PEM files of the API's HTTPS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The default tokens file under `work_dir`.
const API_TOKENS_FILE: &str = "api-tokens.toml";

impl Config {
    /// Merges the layers and fills in the computed defaults.
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let layered: Layered = merged(args)?.try_into().map_err(ConfigError::Invalid)?;
        Self::resolve(layered)
    }

    /// The tokens file `serve` with these flags would use, without resolving anything else
    /// (`node-agent token` needs no VM settings).
    pub fn api_tokens_file_of(args: &ServeArgs) -> Result<PathBuf, ConfigError> {
        #[derive(Deserialize)]
        struct Paths {
            work_dir: PathBuf,
            api_tokens_file: Option<PathBuf>,
        }
        let paths: Paths = merged(args)?.try_into().map_err(ConfigError::Invalid)?;
        Ok(paths
            .api_tokens_file
            .unwrap_or_else(|| paths.work_dir.join(API_TOKENS_FILE)))
    }

    fn resolve(l: Layered) -> Result<Self, ConfigError> {
        let tls = match (l.tls_cert_file, l.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::TlsPair {
                    given: "tls_cert_file",
                    missing: "tls_key_file",
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::TlsPair {
                    given: "tls_key_file",
                    missing: "tls_cert_file",
                })
            }
        };
        let notify_allow = crate::notify::NotifyAllow::parse(&l.notify_allow)
            .map_err(|(value, reason)| ConfigError::NotifyAllow { value, reason })?;
        let capacity_vcpus = match l.capacity_vcpus {
            Some(n) => n,
            None => host_cpus().saturating_sub(RESERVED_VCPUS).max(1),
        };
        let capacity_mem_mib = match l.capacity_mem_mib {
            Some(n) => n,
            None => host_mem_mib()?.saturating_sub(RESERVED_MEM_MIB).max(256),
        };
        for (key, min, value) in [
            ("capacity_vcpus", 1, u64::from(capacity_vcpus)),
            ("capacity_mem_mib", 128, capacity_mem_mib),
            ("max_body_bytes", 1024, l.max_body_bytes),
            ("max_source_bytes", 1024, l.max_source_bytes),
            ("webhook_attempts", 1, u64::from(l.webhook_attempts)),
            ("poll_interval_ms", 10, l.poll_interval_ms),
            ("default_timeout_s", 1, l.default_timeout_s),
            ("vm_listen_port", 1, u64::from(l.vm_listen_port)),
            ("max_log_bytes", 4096, l.max_log_bytes),
            ("vm_max_connections", 1, l.vm_max_connections),
            ("vm_header_timeout_s", 1, l.vm_header_timeout_s),
            ("vm_idle_timeout_s", 1, l.vm_idle_timeout_s),
            ("cache_max_mib", 1, l.cache_max_mib),
            ("cache_disk_gib", 1, l.cache_disk_gib),
        ] {
            if value < min {
                return Err(ConfigError::TooSmall { key, min, value });
            }
        }
        let under_work_dir = |name: &str| l.work_dir.join(name);
        let database_url = l.database_url.unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                under_work_dir("node-agent.db").display()
            )
        });
        let cache = l.cache.then(|| builder_cache::PoolConfig {
            dir: l.cache_dir.unwrap_or_else(|| under_work_dir("cache")),
            max_bytes: l.cache_max_mib.saturating_mul(1 << 20),
            disk_mib: l.cache_disk_gib.saturating_mul(1024),
            reflink_image_bytes: (l.cache_reflink_image_gib > 0)
                .then(|| l.cache_reflink_image_gib.saturating_mul(1 << 30)),
        });
        let mirror = crate::mirror::MirrorConfig::resolve(
            l.mirror,
            l.mirror_dir.unwrap_or_else(|| under_work_dir("mirror")),
            l.mirror_tag_ttl_s,
        )?;
        if l.callback_url.is_none() && l.listen.port() == l.vm_listen_port {
            return Err(ConfigError::SamePort {
                port: l.vm_listen_port,
            });
        }
        Ok(Config {
            listen: l.listen,
            database_url,
            api_token_file: l
                .api_token_file
                .unwrap_or_else(|| under_work_dir("api-token")),
            api_tokens_file: l
                .api_tokens_file
                .unwrap_or_else(|| under_work_dir(API_TOKENS_FILE)),
            notify_allow,
            tls,
            notify_secret_file: l
                .notify_secret_file
                .unwrap_or_else(|| under_work_dir("notify-secret")),
            node_id: l.node_id.unwrap_or_else(host_name),
            capacity_vcpus,
            capacity_mem_mib,
            callback_url: l.callback_url,
            s3_credentials_file: l.s3_credentials_file,
            vmm: l.vmm,
            kernel: l.kernel,
            rootfs: l.rootfs,
            boot_args: l.boot_args,
            vm_network: parse_pool(&l.vm_network)?,
            vm_dns: match l.vm_dns {
                Some(servers) => servers,
                None => default_vm_dns(Path::new(RESOLV_CONF), Path::new(RESOLVED_UPSTREAM))?,
            },
            jailer_uid: l.jailer_uid,
            jailer_gid: l.jailer_gid,
            qemu_uid_base: l.qemu_uid_base,
            qemu_gid_base: l.qemu_gid_base,
            grace_period_s: l.grace_period_s,
            default_timeout_s: l.default_timeout_s,
            max_body_bytes: l.max_body_bytes,
            max_source_bytes: l.max_source_bytes,
            webhook_attempts: l.webhook_attempts,
            poll_interval_ms: l.poll_interval_ms,
            vm_listen_port: l.vm_listen_port,
            vm_egress_allow_private: l
                .vm_egress_allow_private
                .into_iter()
                .map(|value| {
                    value
                        .parse()
                        .map_err(|source| ConfigError::VmEgressAllowPrivate { value, source })
                })
                .collect::<Result<_, _>>()?,
            vm_max_connections: usize::try_from(l.vm_max_connections).unwrap_or(usize::MAX),
            vm_header_timeout_s: l.vm_header_timeout_s,
            vm_idle_timeout_s: l.vm_idle_timeout_s,
            max_log_bytes: l.max_log_bytes,
            retention_days: l.retention_days,
            cache,
            mirror,
            work_dir: l.work_dir,
        })
    }

    /// Where uploaded sources are kept and served from (see [`crate::sources`]).
    pub fn sources_dir(&self) -> PathBuf {
        self.work_dir.join("sources")
    }

    /// Where the credential values of builds accepted here wait (see [`crate::credentials`]).
    pub fn credentials_dir(&self) -> PathBuf {
        self.work_dir.join("credentials")
    }

    /// The base URL builder VMs post their report and logs to and clone uploaded sources from:
    /// `callback_url` when set, else the VM-facing listener on `vm_listen_port`, whose loopback
    /// host each VM's launcher replaces by the host end of that VM's veth (where the listener
    /// is bound while the VM runs).
    pub fn vm_base_url(&self) -> Url {
        self.callback_url.clone().unwrap_or_else(|| {
            Url::parse(&format!("http://127.0.0.1:{}", self.vm_listen_port))
                .expect("an address and a port make a URL")
        })
    }

    /// Whether the VM-facing routes are served per VM (no `callback_url` override).
    pub fn per_vm_listener(&self) -> bool {
        self.callback_url.is_none()
    }

    /// Where the build logs of this node are kept.
    pub fn logs_dir(&self) -> PathBuf {
        self.work_dir.join("logs")
    }

    /// Where a build's console log is kept on this node.
    pub fn log_path(&self, build_id: &str) -> PathBuf {
        self.log_file(build_id, LogSource::Console)
    }

    /// Where log `source` of a build is kept on this node ([`crate::logs::file_of`]).
    pub fn log_file(&self, build_id: &str, source: LogSource) -> PathBuf {
        crate::logs::file_of(&self.logs_dir(), build_id, source)
    }

    /// The directory each VM's work dir is made in.
    pub fn vms_dir(&self) -> PathBuf {
        self.work_dir.join("vms")
    }
}

/// The host's resolver configuration.
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// systemd-resolved's list of the real upstream servers, behind its 127.0.0.53 stub.
const RESOLVED_UPSTREAM: &str = "/run/systemd/resolve/resolv.conf";

/// The default `vm_dns`: the host's name servers a guest can reach through NAT, or an error
/// when there are none (a node whose builds cannot resolve names fails every clone, late and
/// far from the cause, so it does not start).
fn default_vm_dns(resolv_conf: &Path, upstream: &Path) -> Result<Vec<Ipv4Addr>, ConfigError> {
    let servers = host_resolvers(resolv_conf, upstream);
    if servers.is_empty() {
        return Err(ConfigError::NoVmDns {
            resolv_conf: resolv_conf.to_path_buf(),
            upstream: upstream.to_path_buf(),
        });
    }
    Ok(servers)
}

/// IPv4 resolvers of the host that a guest can reach through NAT (not loopback): those of
/// `resolv_conf`, or when it names only loopback ones (a local stub such as systemd-resolved's
/// 127.0.0.53) or none, those of `upstream`, the stub's own upstream servers.
fn host_resolvers(resolv_conf: &Path, upstream: &Path) -> Vec<Ipv4Addr> {
    let reachable = |path: &Path| -> Vec<Ipv4Addr> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
            .filter(|a| !a.is_loopback())
            .take(2)
            .collect()
    };
    let servers = reachable(resolv_conf);
    if servers.is_empty() {
        reachable(upstream)
    } else {
        servers
    }
}

fn parse_pool(value: &str) -> Result<builder_vmm::AddressPool, ConfigError> {
    let invalid = || ConfigError::VmNetwork {
        value: value.to_string(),
    };
    let (network, prefix) = value.split_once('/').ok_or_else(invalid)?;
    let pool = builder_vmm::AddressPool {
        network: network.parse().map_err(|_| invalid())?,
        prefix: prefix.parse().map_err(|_| invalid())?,
    };
    pool.validate().map_err(|_| invalid())?;
    Ok(pool)
}

/// CPUs this process may run on.
pub fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

fn host_mem_mib() -> Result<u64, ConfigError> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(ConfigError::Meminfo)?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| {
            ConfigError::Meminfo(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no MemTotal line",
            ))
        })?;
    Ok(kib / 1024)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

/// Reads a secret file, or creates it with 32 random bytes (hex, mode 0600) when missing.
pub fn read_or_create_secret(path: &Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is empty", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let secret = crate::random_hex(32);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(secret.as_bytes())?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_defaults_file_and_flags_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9000\"\ncapacity_vcpus = 3\n").unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            capacity_vcpus: Some(5),
            work_dir: Some(dir.path().to_path_buf()),
            // The default depends on the host's resolv.conf (see the test below).
            vm_dns: Some(vec![Ipv4Addr::new(192, 0, 2, 53)]),
            ..Default::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.capacity_vcpus, 5);
        assert_eq!(c.grace_period_s, 60);
        assert_eq!(c.api_token_file, dir.path().join("api-token"));
        assert!(c.database_url.starts_with("sqlite://"));
        assert_eq!(c.callback_url, None);
        assert_eq!(c.vm_base_url().as_str(), "http://127.0.0.1:7071/");
        assert_eq!(c.retention_days, 14);
        assert_eq!(c.max_log_bytes, 8 << 20);
        assert_eq!(c.vm_max_connections, 64);
        assert_eq!(c.vm_egress_allow_private, []);
        let cache = c.cache.as_ref().expect("the build cache is on by default");
        assert_eq!(cache.dir, dir.path().join("cache"));
        assert_eq!(cache.max_bytes, 50 << 30);
        assert_eq!(cache.disk_mib, 20 << 10);
        assert_eq!(cache.reflink_image_bytes, Some(100 << 30));
        let off = ServeArgs {
            cache: Some(false),
            ..args.clone()
        };
        assert!(Config::load(&off).unwrap().cache.is_none());
        let empty = ServeArgs {
            cache_disk_gib: Some(0),
            ..args.clone()
        };
        let err = Config::load(&empty).unwrap_err().to_string();
        assert!(err.contains("`cache_disk_gib` must be at least 1"), "{err}");

        std::fs::write(&file, "vm_egress_allow_private = [\"10.1.2.0/24:5000\"]\n").unwrap();
        let c = Config::load(&args).unwrap();
        assert_eq!(c.vm_egress_allow_private[0].to_string(), "10.1.2.0/24:5000");
        std::fs::write(&file, "vm_egress_allow_private = [\"10.1.2.0/24:x\"]\n").unwrap();
        let err = Config::load(&args).unwrap_err().to_string();
        assert!(
            err.contains("`vm_egress_allow_private` entry \"10.1.2.0/24:x\""),
            "{err}"
        );

        std::fs::write(&file, "capacity_cpus = 3\n").unwrap();
        let err = Config::load(&args).unwrap_err();
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(chain.contains("unknown field `capacity_cpus`"), "{chain}");
    }

    #[test]
    fn mirror_tables_come_from_the_config_file_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let args = ServeArgs {
            config: Some(file.clone()),
            work_dir: Some(dir.path().to_path_buf()),
            vm_dns: Some(vec![Ipv4Addr::new(192, 0, 2, 53)]),
            ..Default::default()
        };
        std::fs::write(&file, "").unwrap();
        let none = Config::load(&args).unwrap().mirror;
        assert_eq!(none.upstreams, []);
        assert_eq!(none.dir, dir.path().join("mirror"));
        assert_eq!(none.tag_ttl, std::time::Duration::from_secs(300));
        std::fs::write(
            &file,
            "mirror_tag_ttl_s = 60\n[[mirror]]\nupstream = \"198.18.0.2:5000\"\n\
             remote_url = \"http://198.18.0.2:5000\"\n",
        )
        .unwrap();
        let one = Config::load(&args).unwrap().mirror;
        assert_eq!(one.upstreams[0].upstream, "198.18.0.2:5000");
        assert_eq!(one.tag_ttl, std::time::Duration::from_secs(60));
        std::fs::write(
            &file,
            "[[mirror]]\nupstream = \"registry:5000\"\nremote_url = \"http://registry:5000\"\n",
        )
        .unwrap();
        let err = Config::load(&args).unwrap_err().to_string();
        assert!(
            err.contains("`mirror[0].upstream` \"registry:5000\""),
            "{err}"
        );
    }

    #[test]
    fn tls_needs_both_files_and_notify_allow_entries_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let args = ServeArgs {
            work_dir: Some(dir.path().to_path_buf()),
            vm_dns: Some(vec![Ipv4Addr::new(192, 0, 2, 53)]),
            ..Default::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.tls, None);
        assert_eq!(c.api_tokens_file, dir.path().join("api-tokens.toml"));
        assert_eq!(
            Config::api_tokens_file_of(&args).unwrap(),
            c.api_tokens_file,
            "`node-agent token` finds the file serve uses"
        );
        let half = ServeArgs {
            tls_cert_file: Some(dir.path().join("cert.pem")),
            ..args.clone()
        };
        let err = Config::load(&half).unwrap_err().to_string();
        assert!(err.contains("`tls_key_file`"), "{err}");
        let bad = ServeArgs {
            notify_allow: Some(vec!["10.0.0.0/40".into()]),
            ..args
        };
        let err = Config::load(&bad).unwrap_err().to_string();
        assert!(
            err.contains("`notify_allow` entry \"10.0.0.0/40\""),
            "{err}"
        );
    }

    #[test]
    fn vm_dns_defaults_to_reachable_host_servers_then_systemd_upstreams_else_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("resolv.conf");
        let upstream = dir.path().join("upstream.conf");
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();

        // A normal host: its own servers, loopback and IPv6 ones left out, at most two.
        std::fs::write(
            &resolv,
            "# comment\nsearch example\nnameserver 127.0.0.1\nnameserver 10.1.2.3\n\
             nameserver ::1\nnameserver 10.1.2.4\nnameserver 10.1.2.5\n",
        )
        .unwrap();
        std::fs::write(&upstream, "nameserver 9.9.9.9\n").unwrap();
        assert_eq!(
            default_vm_dns(&resolv, &upstream).unwrap(),
            [ip("10.1.2.3"), ip("10.1.2.4")]
        );

        // systemd-resolved's stub: its upstream servers.
        std::fs::write(&resolv, "nameserver 127.0.0.53\noptions edns0 trust-ad\n").unwrap();
        std::fs::write(
            &upstream,
            "nameserver 192.168.1.1\nnameserver 127.0.0.1\nnameserver 1.1.1.1\n",
        )
        .unwrap();
        assert_eq!(
            default_vm_dns(&resolv, &upstream).unwrap(),
            [ip("192.168.1.1"), ip("1.1.1.1")]
        );

        // The stub alone (no systemd file, or one without usable servers): refused, naming
        // both files and the key to set.
        for upstream_text in [None, Some("nameserver 127.0.0.53\n")] {
            let _ = std::fs::remove_file(&upstream);
            if let Some(text) = upstream_text {
                std::fs::write(&upstream, text).unwrap();
            }
            let err = default_vm_dns(&resolv, &upstream).unwrap_err().to_string();
            for words in [
                "`vm_dns` is not set",
                "resolv.conf",
                "upstream.conf",
                "--vm-dns",
            ] {
                assert!(err.contains(words), "{words} not in: {err}");
            }
        }

        // An empty or missing resolv.conf and no upstream file: refused too.
        std::fs::write(&resolv, "").unwrap();
        assert!(default_vm_dns(&resolv, &upstream).is_err());
        assert!(default_vm_dns(&dir.path().join("none"), &dir.path().join("none2")).is_err());
        // ... but the systemd upstreams still count when resolv.conf is empty.
        std::fs::write(&upstream, "nameserver 8.8.8.8\n").unwrap();
        assert_eq!(default_vm_dns(&resolv, &upstream).unwrap(), [ip("8.8.8.8")]);
    }
}
