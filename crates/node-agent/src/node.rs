//! The node: capacity and CPU accounting, the scheduler loop that claims queued builds, and the
//! supervisor of each build's VM from launch to its one terminal state, and what is kept of
//! its logs. Restart recovery, the SIGTERM drain and the retention pass (pruning ended builds,
//! their events and logs, and old report signatures) live here too.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use builder_contract::progress::advances;
use builder_contract::{
    BuildArgs, BuildFailure, BuildParams, BuildReport, BuildStatus, ErrorClass, LogSource, Phase,
    Secrets,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, Notify};

use crate::config::Config;
use crate::credentials::{scrub, CredentialError, CredentialStore, Credentials};
use crate::db::{BuildRow, Db, DbError, Update};
use crate::metrics::Metrics;
use crate::model::{BuildState, Limits};
use crate::vm::{cmdline_budget_base, LaunchSpec, Launcher, RunningVm, VmExit, VmRoutes};

/// How much of the console log goes into the database and the failure webhook.
pub const LOG_TAIL_BYTES: u64 = 4096;
/// How long a report may trail the VM's exit (the guest posts it just before powering off).
const REPORT_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How long a VM that has reported may take to power itself off before it is killed.
const POWEROFF_AFTER_REPORT: Duration = Duration::from_secs(10);
/// How often a running build's console and cancel flag are looked at.
const SUPERVISE_TICK: Duration = Duration::from_millis(500);
/// How often the retention pass runs (and once at start).
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// How long a seen report signature is kept: a signature is accepted while its timestamp is
/// within the tolerance of the receiver's clock on either side, so one recorded now can be
/// replayed for at most twice the tolerance.
const SIGNATURE_KEEP_MS: i64 =
    2 * builder_contract::signature::DEFAULT_TOLERANCE_SECS as i64 * 1000;
/// Ended builds deleted per database transaction of the retention pass.
const PRUNE_BATCH: u32 = 500;

/// What a supervisor is told while its VM runs.
#[derive(Debug)]
pub enum Signal {
    Report(Box<BuildReport>),
    Cancel(String),
    /// The guest's signed progress: it started `phase`. `applied` is answered with the phase
    /// last recorded before it, as an error, when `phase` does not follow it.
    Progress {
        phase: Phase,
        applied: tokio::sync::oneshot::Sender<Result<(), Option<Phase>>>,
    },
}

/// How a build ended, before it is written down.
#[derive(Debug)]
pub enum Outcome {
    Report(Box<BuildReport>),
    VmExited(VmExit),
    TimedOut(u64),
    Cancelled(String),
    Internal(String),
}

/// How a build's VM run ended ([`Node::run_vm`]).
struct VmRun {
    outcome: Outcome,
    /// The VMM's exit code.
    code: Option<i32>,
    /// The VM powered itself off (it was not killed).
    powered_off: bool,
    /// The rootfs the build was offered to reuse.
    offer: Option<builder_contract::RootfsReuse>,
}

struct Running {
    /// The per-build key the guest signs its report with.
    key: String,
    signals: mpsc::Sender<Signal>,
}

#[derive(Default)]
struct Usage {
    vcpus: u32,
    mem_mib: u64,
    /// Which allocator slots are taken; slot `i` is host CPU `host_cpus[i % len]`.
    slots: Vec<bool>,
    running: HashMap<String, Running>,
}

pub struct Node {
    pub config: Config,
    pub db: Db,
    pub metrics: Metrics,
    /// The credential values of builds accepted here, until they end.
    pub credentials: CredentialStore,
    pub api_token: String,
    /// Every API token: the admin's (`api_token`) and the scoped ones ([`crate::tokens`]).
    pub tokens: crate::tokens::Tokens,
    notify_secret: String,
    /// The node's S3 key and the uploads it grants builds ([`crate::uploads`]).
    pub upload_grants: crate::uploads::Uploads,
    /// The build caches ([`crate::cache`]); `None` when `cache = false`.
    pub cache_pool: Option<Arc<builder_cache::CachePool>>,
    launcher: Arc<dyn Launcher>,
    host_cpus: Vec<u32>,
    usage: Mutex<Usage>,
    wake: Notify,
    idle: Notify,
    draining: AtomicBool,
    webhooks: crate::notify::Webhooks,
    /// The VM-facing routes each VM gets on a listener of its own while it runs; set while the
    /// node serves ([`crate::serve_on`]) and no `callback_url` overrides them.
    vm_routes: Mutex<Option<VmRoutes>>,
    /// The pull-through registry mirror builder VMs pull through ([`crate::mirror`]).
    pub mirror: crate::mirror::Mirror,
}

/// What one retention pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub builds: u64,
    pub events: u64,
    pub signatures: u64,
    pub log_files: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot read or create the secret file {path}")]
    Secret {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    S3Credentials(#[from] builder_contract::SecretsError),
    #[error(transparent)]
    Uploads(#[from] crate::uploads::UploadError),
    #[error("the S3 credentials file {path} has no `s3` section")]
    NoS3 { path: std::path::PathBuf },
    #[error("cannot create the directory {path}")]
    Dir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Reclaim(#[from] crate::vm::VmError),
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error(transparent)]
    Mirror(#[from] crate::mirror::MirrorError),
    #[error("cannot open the build cache pool {dir}")]
    CachePool {
        dir: std::path::PathBuf,
        #[source]
        source: builder_cache::CacheError,
    },
}

impl Node {
    /// Opens the database, reclaims what a crashed previous run left, fails or re-queues its
    /// builds and resumes undelivered webhooks. The scheduler is started by [`Node::run`].
    pub async fn start(
        config: Config,
        launcher: Arc<dyn Launcher>,
    ) -> Result<Arc<Self>, StartError> {
        for dir in [config.work_dir.join("logs"), config.vms_dir()] {
            std::fs::create_dir_all(&dir)
                .map_err(|source| StartError::Dir { path: dir, source })?;
        }
        let secret = |path: &Path| {
            crate::config::read_or_create_secret(path).map_err(|source| StartError::Secret {
                path: path.to_path_buf(),
                source,
            })
        };
        let api_token = secret(&config.api_token_file)?;
        let notify_secret = secret(&config.notify_secret_file)?;
        let s3 = match &config.s3_credentials_file {
            None => None,
            Some(path) => Some(
                builder_contract::Secrets::load(path)?
                    .s3
                    .ok_or_else(|| StartError::NoS3 { path: path.clone() })?,
            ),
        };
        let db = Db::open(&config.database_url).await?;
        let reclaimed = launcher.reclaim().await?;
        // Opening it removes the forks of builds a previous run left (failed below).
        let cache_pool = match config.cache.clone() {
            None => None,
            Some(pool) => {
                let dir = pool.dir.clone();
                Some(
                    crate::cache::open_pool(pool)
                        .await
                        .map_err(|source| StartError::CachePool { dir, source })?,
                )
            }
        };
        let metrics = Metrics::new(reclaimed).with_vmm(launcher.vmm_info());
        let mirror = crate::mirror::Mirror::start(&config.mirror, metrics.mirror.clone())?;
        let node = Arc::new(Node {
            cache_pool,
            metrics,
            mirror,
            credentials: CredentialStore::new(config.credentials_dir())?,
            host_cpus: host_cpu_list(),
            usage: Mutex::new(Usage {
                slots: vec![false; config.capacity_vcpus as usize],
                ..Default::default()
            }),
            tokens: crate::tokens::Tokens::new(config.api_tokens_file.clone(), &api_token),
            webhooks: crate::notify::Webhooks::new(config.notify_allow.clone()),
            config,
            db,
            api_token,
            notify_secret,
            upload_grants: crate::uploads::Uploads::new(s3)?,
            launcher,
            wake: Notify::new(),
            idle: Notify::new(),
            draining: AtomicBool::new(false),
            vm_routes: Mutex::new(None),
        });
        tracing::info!(
            reclaimed,
            node_id = node.config.node_id,
            "reclaimed leftovers of a previous run"
        );
        node.recover().await?;
        // Nothing is accepted yet: a file whose build has ended or is unknown is a leftover.
        let removed = node.credentials.sweep(&node.db, Duration::ZERO).await?;
        if removed > 0 {
            tracing::info!(removed, "credentials files of ended builds removed");
        }
        node.prune_logged().await;
        Ok(node)
    }

    /// Sets (or, with `None`, drops) the routes each VM is served on a listener of its own.
    pub fn set_vm_routes(&self, routes: Option<VmRoutes>) {
        *self.vm_routes.lock().expect("vm routes lock") = routes;
    }

    /// The retention pass: deletes the builds that ended more than `retention_days` ago (not
    /// while their webhook is still being delivered) with their events and logs, the log files
    /// of builds the database no longer has, and the report signatures past the replay window.
    pub async fn prune(&self) -> Result<Pruned, DbError> {
        let now = crate::now_ms();
        let mut pruned = Pruned {
            signatures: self.db.prune_signatures(now - SIGNATURE_KEEP_MS).await?,
            ..Pruned::default()
        };
        if self.config.retention_days > 0 {
            let keep_ms = i64::try_from(self.config.retention_days)
                .unwrap_or(i64::MAX / 86_400_000)
                .saturating_mul(86_400_000);
            let before_ms = now.saturating_sub(keep_ms);
            let logs_dir = self.config.logs_dir();
            loop {
                let (ids, events) = self.db.prune_builds(before_ms, PRUNE_BATCH).await?;
                pruned.builds += ids.len() as u64;
                pruned.events += events;
                for id in &ids {
                    pruned.log_files += crate::logs::remove(&logs_dir, id).await;
                }
                if ids.len() < PRUNE_BATCH as usize {
                    break;
                }
            }
            let before = std::time::UNIX_EPOCH + Duration::from_millis(before_ms.max(0) as u64);
            pruned.log_files += crate::logs::sweep(&logs_dir, &self.db, before).await?;
        }
        self.metrics.observe_pruned(&pruned);
        Ok(pruned)
    }

    /// [`Node::prune`], its outcome logged.
    async fn prune_logged(&self) {
        match self.prune().await {
            Ok(p) if p == Pruned::default() => {}
            Ok(p) => tracing::info!(
                builds = p.builds,
                events = p.events,
                signatures = p.signatures,
                log_files = p.log_files,
                retention_days = self.config.retention_days,
                "pruned"
            ),
            Err(e) => tracing::warn!(error = crate::error_chain(&e), "the retention pass failed"),
        }
    }

    /// Runs the retention pass every [`PRUNE_INTERVAL`] (the first ran at start).
    pub async fn prune_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(PRUNE_INTERVAL).await;
            self.prune_logged().await;
        }
    }

    async fn recover(self: &Arc<Self>) -> Result<(), DbError> {
        let node_id = &self.config.node_id;
        // Webhooks a previous run left undelivered; the builds failed below send their own.
        let undelivered = self.db.pending_webhooks(node_id).await?;
        for row in self
            .db
            .node_builds(node_id, &[BuildState::Starting])
            .await?
        {
            self.db
                .transition(
                    &row.id,
                    &[BuildState::Starting],
                    BuildState::Queued,
                    node_id,
                    "re-queued: the node agent restarted before the VM started",
                    Update::default()
                        .set("node_id", None::<String>)
                        .set("cpus", None::<String>)
                        .set("started_at_ms", None::<i64>),
                )
                .await?;
        }
        for row in self
            .db
            .node_builds(node_id, &[BuildState::Running, BuildState::Uploading])
            .await?
        {
            // Its upload, if it started one, was open when the previous run stopped.
            let node = self.clone();
            let open = row.clone();
            tokio::spawn(async move { node.upload_grants.recover(&open).await });
            self.finish(
                &row,
                &BuildState::ACTIVE,
                Outcome::Internal("node agent restarted".into()),
                None,
            )
            .await?;
        }
        for row in undelivered {
            let node = self.clone();
            tokio::spawn(async move { node.deliver(row).await });
        }
        Ok(())
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_vcpus: self.config.capacity_vcpus,
            max_mem_mib: self.config.capacity_mem_mib,
        }
    }

    /// Whether builds can upload their rootfs: the node has S3 credentials to give them.
    pub fn uploads(&self) -> bool {
        self.upload_grants.enabled()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Tells the scheduler to look at the queue now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// (vCPUs, MiB, VMs) in use.
    pub fn usage(&self) -> (u32, u64, usize) {
        let u = self.usage.lock().expect("usage lock");
        (u.vcpus, u.mem_mib, u.running.len())
    }

    /// The scheduler: claims queued builds while they fit, until draining starts.
    pub async fn run(self: Arc<Self>) {
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        while !self.is_draining() {
            let (free_vcpus, free_mem) = {
                let u = self.usage.lock().expect("usage lock");
                (
                    self.config.capacity_vcpus - u.vcpus,
                    self.config.capacity_mem_mib - u.mem_mib,
                )
            };
            let claimed = if free_vcpus == 0 {
                Ok(None)
            } else {
                self.db
                    .claim(&self.config.node_id, free_vcpus, free_mem)
                    .await
            };
            match claimed {
                Ok(Some(row)) => {
                    self.admit(row);
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = crate::error_chain(&e), "cannot claim a build"),
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    fn admit(self: &Arc<Self>, row: BuildRow) {
        let (tx, rx) = mpsc::channel(4);
        let key = crate::random_hex(32);
        let slots = {
            let mut u = self.usage.lock().expect("usage lock");
            u.vcpus += row.vcpus;
            u.mem_mib += row.mem_mib;
            let free: Vec<usize> = (0..u.slots.len()).filter(|&i| !u.slots[i]).collect();
            let slots: Vec<usize> = free.into_iter().take(row.vcpus as usize).collect();
            for &i in &slots {
                u.slots[i] = true;
            }
            u.running.insert(
                row.id.clone(),
                Running {
                    key: key.clone(),
                    signals: tx,
                },
            );
            slots
        };
        self.metrics.set_running(self.usage().2);
        let node = self.clone();
        tokio::spawn(async move {
            let cpus: Vec<u32> = slots
                .iter()
                .map(|&i| node.host_cpus[i % node.host_cpus.len()])
                .collect();
            let (outcome, exit_code) = node.supervise(&row, cpus, key, rx).await;
            if let Err(e) = node
                .finish(&row, &BuildState::ACTIVE, outcome, exit_code)
                .await
            {
                tracing::error!(
                    build_id = row.id,
                    error = crate::error_chain(&e),
                    "cannot record the end of a build"
                );
            }
            let idle = {
                let mut u = node.usage.lock().expect("usage lock");
                u.vcpus -= row.vcpus;
                u.mem_mib -= row.mem_mib;
                for i in slots {
                    u.slots[i] = false;
                }
                u.running.remove(&row.id);
                u.running.is_empty()
            };
            node.metrics.set_running(node.usage().2);
            if idle {
                node.idle.notify_waiters();
            }
            node.wake();
        });
    }

    /// The key a running build's report must be signed with.
    pub fn build_key(&self, id: &str) -> Option<String> {
        let u = self.usage.lock().expect("usage lock");
        u.running.get(id).map(|r| r.key.clone())
    }

    /// Hands a signal to the supervisor of a build running here; false when none runs it.
    pub async fn signal(&self, id: &str, signal: Signal) -> bool {
        let sender = {
            let u = self.usage.lock().expect("usage lock");
            u.running.get(id).map(|r| r.signals.clone())
        };
        match sender {
            Some(s) => s.send(signal).await.is_ok(),
            None => false,
        }
    }

    /// Runs the build's VM with a fork of its build cache, holds a report to what the node
    /// offered and verified, then commits the fork (a verified succeeded report and a VM that
    /// powered itself off) or discards it: every way a VM ends settles its fork.
    async fn supervise(
        &self,
        row: &BuildRow,
        cpus: Vec<u32>,
        key: String,
        signals: mpsc::Receiver<Signal>,
    ) -> (Outcome, Option<i32>) {
        let namespace = self.tokens.cache_namespace(&row.requester);
        let node_id = &self.config.node_id;
        let pool = self.cache_pool.as_ref();
        let fork =
            crate::cache::fork(pool, &self.db, node_id, &self.metrics, row, &namespace).await;
        let VmRun {
            mut outcome,
            code,
            powered_off,
            offer,
        } = self.run_vm(row, cpus, key, signals, fork.as_ref()).await;
        if let Outcome::Report(report) = &mut outcome {
            self.upload_grants
                .check_report(row, report, offer.as_ref())
                .await;
        }
        if let (Some(pool), Some(fork)) = (pool, fork) {
            use crate::cache::DiscardReason;
            let commit = match &outcome {
                Outcome::Report(r) if r.status == BuildStatus::Succeeded && powered_off => Ok(()),
                Outcome::Report(r) if r.status == BuildStatus::Succeeded => {
                    Err(DiscardReason::Killed)
                }
                _ => Err(DiscardReason::NotSucceeded),
            };
            crate::cache::settle(pool, &self.db, node_id, &self.metrics, row, fork, commit).await;
        }
        (outcome, code)
    }

    /// Launches and watches the VM until it ended.
    async fn run_vm(
        &self,
        row: &BuildRow,
        cpus: Vec<u32>,
        key: String,
        mut signals: mpsc::Receiver<Signal>,
        fork: Option<&crate::cache::BuildFork>,
    ) -> VmRun {
        let unlaunched = |outcome| VmRun {
            outcome,
            code: None,
            powered_off: false,
            offer: None,
        };
        let (params, secrets) = match self.launch_inputs(row, key, fork).await {
            Ok(inputs) => inputs,
            Err(message) => return unlaunched(Outcome::Internal(message)),
        };
        let offer = params.reuse.clone();
        let console_log = self.config.log_path(&row.id);
        let vm_routes = self
            .config
            .per_vm_listener()
            .then(|| self.vm_routes.lock().expect("vm routes lock").clone())
            .flatten();
        let spec = LaunchSpec {
            build_id: row.id.clone(),
            params,
            secrets,
            vcpus: row.vcpus,
            mem_mib: row.mem_mib,
            disk_gib: row.request.disk_gib,
            cpus: cpus.clone(),
            egress_allow: row.request.egress_allow.clone(),
            cache_disk: fork.map(|f| f.path().to_path_buf()),
            // The VM reaches the mirror on its own listener only.
            registry_redirects: if self.config.per_vm_listener() {
                self.mirror.redirects()
            } else {
                Vec::new()
            },
            console_log: console_log.clone(),
            vmm_log: self.config.log_file(&row.id, LogSource::Vmm),
            vm_routes,
            timeout: Duration::from_secs(row.timeout_s),
        };
        let mut vm = match self.launcher.launch(spec).await {
            Ok(vm) => vm,
            Err(e) => return unlaunched(Outcome::Internal(crate::error_chain(&e))),
        };
        let now = crate::now_ms();
        self.metrics.observe_admission(now - row.created_at_ms);
        let cpus_text = cpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let detail = format!(
            "VM started (pid {}, cpus {cpus_text})",
            vm.pid().unwrap_or(0)
        );
        if let Err(e) = self
            .db
            .transition(
                &row.id,
                &[BuildState::Starting],
                BuildState::Running,
                &self.config.node_id,
                &detail,
                Update::default()
                    .set("vm_started_at_ms", now)
                    .set("cpus", cpus_text),
            )
            .await
        {
            tracing::error!(
                build_id = row.id,
                error = crate::error_chain(&e),
                "cannot record the VM start"
            );
        }
        let (outcome, exit) = self.watch(row, vm.as_mut(), &mut signals).await;
        let (exit, powered_off) = match exit {
            Some(exit) => (Some(exit), true),
            None => {
                // After a report the guest stops dockerd and unmounts its cache disk first.
                let poweroff = match (&outcome, fork) {
                    (Outcome::Report(_), Some(_)) => Some(crate::cache::POWEROFF_WITH_CACHE),
                    (Outcome::Report(_), None) => Some(POWEROFF_AFTER_REPORT),
                    _ => None,
                };
                self.stop(row, vm.as_mut(), poweroff).await
            }
        };
        if let Err(e) = vm.cleanup().await {
            tracing::error!(
                build_id = row.id,
                error = crate::error_chain(&e),
                "VM cleanup failed"
            );
        }
        let code = exit.as_ref().and_then(|e| e.code);
        self.metrics.observe_vmm_exit(code);
        VmRun {
            outcome,
            code,
            powered_off,
            offer,
        }
    }

    /// The VM's parameters and secrets: the build's key (no S3 key: the node grants the VM its
    /// upload, [`crate::uploads`]), the build's credentials from its file, the rootfs it may
    /// reuse when its image is unchanged ([`crate::cache::reuse_offer`]), and its build args
    /// when they do not fit the kernel command line.
    async fn launch_inputs(
        &self,
        row: &BuildRow,
        key: String,
        fork: Option<&crate::cache::BuildFork>,
    ) -> Result<(BuildParams, Secrets), String> {
        let mut params = row
            .request
            .to_params(&row.id, &self.config.vm_base_url(), self.limits())
            .map_err(|e| format!("the stored request is no longer valid: {e}"))?;
        if self.config.per_vm_listener() {
            params.mirrored_registries = self.mirror.registries();
        }
        if let Some(cache_id) = fork.and_then(crate::cache::BuildFork::cache_id) {
            if self.uploads() {
                params.reuse = crate::cache::reuse_offer(&self.db, row, &cache_id)
                    .await
                    .map_err(|e| crate::error_chain(&e))?;
            }
        }
        let mut secrets = Secrets {
            webhook_secret: Some(key),
            ..Secrets::default()
        };
        if !row.credentials.is_empty() {
            match self.credentials.read(&row.id) {
                Ok(Some(credentials)) => credentials.add_to(&mut secrets),
                Ok(None) => {
                    return Err(format!(
                        "the build's credentials are not on node {} any more (its credentials \
                         file is gone)",
                        self.config.node_id
                    ))
                }
                Err(e) => return Err(crate::error_chain(&e)),
            }
        }
        let base = cmdline_budget_base(self.launcher.boot_args());
        let (_, overflow) = params
            .split_kernel_cmdline(&base)
            .map_err(|e| format!("the build parameters do not fit the kernel command line: {e}"))?;
        if let Some(overflow) = overflow {
            tracing::info!(
                build_id = row.id,
                build_args = overflow.as_map().len(),
                "the build args do not fit the kernel command line: they go on the config drive"
            );
            params.build_args = BuildArgs::default();
            secrets.build_args = Some(overflow);
        }
        Ok((params, secrets))
    }

    /// Waits for the first of: report, VM exit, timeout, cancel, and records the guest's signed
    /// progress meanwhile ([`PhaseRecord`]). Returns the VM's exit if it exited. The console is
    /// not read here: it is a log, and a build can print anything into it.
    async fn watch(
        &self,
        row: &BuildRow,
        vm: &mut dyn RunningVm,
        signals: &mut mpsc::Receiver<Signal>,
    ) -> (Outcome, Option<VmExit>) {
        let deadline = tokio::time::sleep(Duration::from_secs(row.timeout_s));
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(SUPERVISE_TICK);
        let mut phases = PhaseRecord::of(row);
        loop {
            tokio::select! {
                exit = vm.wait() => {
                    let exit = match exit {
                        Ok(exit) => exit,
                        Err(e) => VmExit { code: None, description: crate::error_chain(&e) },
                    };
                    // The report may trail the exit a little; progress before it still counts.
                    let late = tokio::time::sleep(REPORT_AFTER_EXIT);
                    tokio::pin!(late);
                    loop {
                        tokio::select! {
                            signal = signals.recv() => match signal {
                                Some(Signal::Report(r)) => return (Outcome::Report(r), Some(exit)),
                                Some(Signal::Progress { phase, applied }) => {
                                    let _ = applied.send(phases.record(self, row, phase).await);
                                }
                                Some(Signal::Cancel(_)) | None => break,
                            },
                            _ = &mut late => break,
                        }
                    }
                    return (Outcome::VmExited(exit.clone()), Some(exit));
                }
                signal = signals.recv() => match signal {
                    Some(Signal::Report(r)) => return (Outcome::Report(r), None),
                    Some(Signal::Cancel(reason)) => return (Outcome::Cancelled(reason), None),
                    Some(Signal::Progress { phase, applied }) => {
                        let _ = applied.send(phases.record(self, row, phase).await);
                    }
                    None => return (Outcome::Internal("the supervisor lost its signal channel".into()), None),
                },
                _ = &mut deadline => return (Outcome::TimedOut(row.timeout_s), None),
                _ = tick.tick() => {
                    if let Ok(Some(current)) = self.db.get(&row.id).await {
                        if current.cancel_requested {
                            return (Outcome::Cancelled("cancelled by request".into()), None);
                        }
                        if current.state.is_terminal() {
                            return (Outcome::Internal(format!("the build became {} elsewhere", current.state)), None);
                        }
                    }
                }
            }
        }
    }

    /// Ends a VM that has not exited: lets it power off within `poweroff` (after a report),
    /// kills it otherwise. Returns its exit and whether it powered itself off.
    async fn stop(
        &self,
        row: &BuildRow,
        vm: &mut dyn RunningVm,
        poweroff: Option<Duration>,
    ) -> (Option<VmExit>, bool) {
        if let Some(within) = poweroff {
            if let Ok(Ok(exit)) = tokio::time::timeout(within, vm.wait()).await {
                return (Some(exit), true);
            }
        }
        if let Err(e) = vm.kill().await {
            tracing::error!(
                build_id = row.id,
                error = crate::error_chain(&e),
                "cannot kill the VM"
            );
        }
        (vm.wait().await.ok(), false)
    }

    /// The build's credential values, to scrub what is kept of it; none when its file cannot
    /// be read (said in the node's log).
    fn credentials_of(&self, row: &BuildRow) -> Credentials {
        if row.credentials.is_empty() {
            return Credentials::default();
        }
        match self.credentials.read(&row.id) {
            Ok(c) => c.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(
                    build_id = row.id,
                    error = crate::error_chain(&e),
                    "cannot read the credentials file: the build's logs are kept unscrubbed"
                );
                Credentials::default()
            }
        }
    }

    /// Keeps a log the guest of a build running here sent: scrubbed of the build's credential
    /// values, its tail within `max_log_bytes`.
    pub async fn keep_guest_log(
        &self,
        row: &BuildRow,
        source: LogSource,
        bytes: &[u8],
    ) -> std::io::Result<()> {
        let credentials = self.credentials_of(row);
        crate::logs::keep(
            &self.config.log_file(&row.id, source),
            bytes,
            &credentials.values(),
            self.config.max_log_bytes,
        )
        .await
    }

    /// Writes the terminal state (if the build is not terminal yet), removes the build's
    /// credentials file and sends the webhook. The logs the node wrote itself (console, VMM)
    /// are kept scrubbed of the credential values and capped first; so are the console tail
    /// and the error message.
    pub async fn finish(
        self: &Arc<Self>,
        row: &BuildRow,
        from: &[BuildState],
        outcome: Outcome,
        exit_code: Option<i32>,
    ) -> Result<bool, DbError> {
        let has_credentials = !row.credentials.is_empty();
        let credentials = self.credentials_of(row);
        let values = credentials.values();
        for source in [LogSource::Console, LogSource::Vmm] {
            let path = self.config.log_file(&row.id, source);
            if let Err(e) = crate::logs::seal(&path, &values, self.config.max_log_bytes).await {
                tracing::warn!(
                    build_id = row.id,
                    error = %e,
                    path = %path.display(),
                    "the {source} log cannot be scrubbed and capped"
                );
            }
        }
        let tail = scrub(&read_tail(&self.config.log_path(&row.id)).await, &values);
        let current = self.db.get(&row.id).await?;
        let phase = current
            .as_ref()
            .and_then(|c| c.phase.as_deref())
            .and_then(|p| serde_json::from_value::<Phase>(serde_json::Value::String(p.into())).ok())
            .unwrap_or(Phase::Params);
        let failure = |class, message: String| BuildFailure {
            class,
            phase,
            message,
        };
        let with_tail = |message: String| {
            if tail.is_empty() {
                message
            } else {
                format!("{message}\n--- console log tail ---\n{tail}")
            }
        };
        let (to, mut report, detail) = match outcome {
            // Held to the upload by the supervisor ([`Node::supervise`]).
            Outcome::Report(r) => {
                let to = match r.status {
                    BuildStatus::Succeeded => BuildState::Succeeded,
                    BuildStatus::Failed => BuildState::Failed,
                };
                (to, *r, "the builder VM reported".to_string())
            }
            Outcome::VmExited(exit) => {
                let message = format!("the builder VM {} without reporting", exit.description);
                (
                    BuildState::Failed,
                    self.synthesized(
                        row,
                        failure(ErrorClass::Internal, with_tail(message.clone())),
                    ),
                    message,
                )
            }
            Outcome::TimedOut(s) => {
                let message = format!("the build ran past its {s} s time limit and was stopped");
                (
                    BuildState::TimedOut,
                    self.synthesized(row, failure(ErrorClass::User, with_tail(message.clone()))),
                    message,
                )
            }
            Outcome::Cancelled(reason) => (
                BuildState::Cancelled,
                self.synthesized(row, failure(ErrorClass::User, reason.clone())),
                reason,
            ),
            Outcome::Internal(message) => (
                BuildState::Failed,
                self.synthesized(
                    row,
                    failure(ErrorClass::Internal, with_tail(message.clone())),
                ),
                message,
            ),
        };
        if let Some(error) = report.error.as_mut() {
            error.message = scrub(&error.message, &values);
        }
        for p in &report.phases {
            self.metrics.observe_phase(p.phase, p.duration_ms);
        }
        let mut update = Update::default()
            .set("finished_at_ms", crate::now_ms())
            .set(
                "report",
                serde_json::to_string(&report).expect("a report serializes"),
            )
            .set("log_tail", tail.clone())
            .set("vmm_exit_code", exit_code.map(i64::from))
            .set("commit_sha", report.commit_sha.clone())
            .set("image_digest", report.image_digest.clone());
        if let Some(e) = &report.error {
            update = update
                .set("error_class", e.class.to_string())
                .set("error_phase", e.phase.as_str())
                .set("error_message", e.message.clone());
        }
        if let Some(r) = &report.rootfs {
            update = update
                .set("rootfs_location", r.location.clone())
                .set("rootfs_size_bytes", r.size_bytes as i64)
                .set("rootfs_sha256", r.sha256.clone());
        }
        if row.notify_url.is_some() {
            update = update.set("webhook_state", "pending");
        }
        let open_upload = self.upload_grants.take(&row.id);
        let Some(t) = self
            .db
            .transition(&row.id, from, to, &self.config.node_id, &detail, update)
            .await?
        else {
            let node = self.clone();
            let row = row.clone();
            tokio::spawn(async move { node.upload_grants.end(&row, open_upload, None).await });
            return Ok(false);
        };
        if let Err(e) = has_credentials
            .then(|| self.credentials.remove(&row.id))
            .transpose()
        {
            tracing::error!(
                build_id = row.id,
                error = crate::error_chain(&e),
                "cannot remove the credentials file of an ended build; the sweep retries"
            );
        }
        // The upload's end (abort, cleanup, `<s3_key>.status.json`) beside the webhook, not
        // before it: a store that is down must not hold the requester's webhook up.
        let node = self.clone();
        let ended = t.row.clone();
        tokio::spawn(async move {
            node.upload_grants
                .end(&ended, open_upload, Some(&report))
                .await;
        });
        if t.row.notify_url.is_some() {
            let node = self.clone();
            tokio::spawn(async move { node.deliver(t.row).await });
        }
        Ok(true)
    }

    fn synthesized(&self, row: &BuildRow, error: BuildFailure) -> BuildReport {
        let started = row.started_at_ms.unwrap_or(row.created_at_ms);
        BuildReport {
            build_id: row.id.clone(),
            status: BuildStatus::Failed,
            repo_url: row.repo_url.clone(),
            revision: row.revision.clone(),
            commit_sha: None,
            image_digest: None,
            inputs: Some(row.request.inputs(&row.credentials)),
            rootfs: None,
            error: Some(error),
            phases: vec![],
            started_at_unix_ms: started.max(0) as u64,
            duration_ms: (crate::now_ms() - started).max(0) as u64,
        }
    }

    async fn deliver(self: Arc<Self>, row: BuildRow) {
        // The requester's own key; the admin's builds (no token of their own) the node's.
        let key = self.tokens.webhook_key(&row.requester);
        let key = key.as_deref().unwrap_or(&self.notify_secret);
        crate::notify::deliver(
            &self.webhooks,
            &self.db,
            &row,
            key.as_bytes(),
            self.config.webhook_attempts,
        )
        .await;
    }

    /// Cancels a build wherever it is: queued ones here, running ones through their node.
    pub async fn cancel(self: &Arc<Self>, id: &str) -> Result<Option<BuildState>, DbError> {
        let Some(row) = self.db.get(id).await? else {
            return Ok(None);
        };
        if row.state == BuildState::Queued
            && self
                .finish(
                    &row,
                    &[BuildState::Queued],
                    Outcome::Cancelled("cancelled by request before it started".into()),
                    None,
                )
                .await?
        {
            return Ok(Some(BuildState::Cancelled));
        }
        if self
            .signal(id, Signal::Cancel("cancelled by request".into()))
            .await
            || self.db.request_cancel(id).await?
        {
            return Ok(Some(row.state));
        }
        Ok(Some(self.db.get(id).await?.map_or(row.state, |r| r.state)))
    }

    /// SIGTERM: stop admitting, wait up to the grace period, cancel what still runs.
    pub async fn drain(self: &Arc<Self>) {
        self.draining.store(true, Ordering::SeqCst);
        self.wake();
        let grace = Duration::from_secs(self.config.grace_period_s);
        if tokio::time::timeout(grace, self.wait_idle()).await.is_err() {
            let ids: Vec<String> = {
                let u = self.usage.lock().expect("usage lock");
                u.running.keys().cloned().collect()
            };
            tracing::warn!(
                running = ids.len(),
                "grace period over; cancelling running builds"
            );
            for id in ids {
                self.signal(
                    &id,
                    Signal::Cancel("the node agent is shutting down".into()),
                )
                .await;
            }
            self.wait_idle().await;
        }
        if let Some(pool) = &self.cache_pool {
            crate::cache::close_pool(pool).await;
        }
    }

    async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.usage().2 == 0 {
                return;
            }
            idle.await;
        }
    }

    pub fn readiness(&self) -> Vec<crate::vm::Check> {
        self.launcher.readiness()
    }

    /// The VMM counters of the VMs running here, by build id (see [`Launcher::vmm_metrics`]).
    pub fn vmm_metrics(&self) -> Vec<(String, builder_vmm::firecracker::metrics::MetricsTotals)> {
        self.launcher.vmm_metrics()
    }
}

/// The phase a running build has reached, as its guest's signed progress events tell it: the
/// one source of a build's phase and of `running -> uploading`. Phases only move forward
/// ([`advances`]); an event that does not is logged and changes nothing.
struct PhaseRecord {
    last: Option<Phase>,
}

impl PhaseRecord {
    /// What `row` has recorded so far.
    fn of(row: &BuildRow) -> Self {
        PhaseRecord {
            last: row.phase.as_deref().and_then(|p| {
                serde_json::from_value::<Phase>(serde_json::Value::String(p.into())).ok()
            }),
        }
    }

    /// Records that the guest started `phase`; the phase recorded before, as the error, when
    /// `phase` does not follow it.
    async fn record(
        &mut self,
        node: &Node,
        row: &BuildRow,
        phase: Phase,
    ) -> Result<(), Option<Phase>> {
        if !advances(self.last, phase) {
            tracing::warn!(
                build_id = row.id,
                phase = %phase,
                last = self.last.map(Phase::as_str),
                "ignored a progress event that does not move the build forward"
            );
            return Err(self.last);
        }
        self.last = Some(phase);
        let update = Update::default().set("phase", phase.as_str());
        let result = if phase == Phase::Upload {
            node.db
                .transition(
                    &row.id,
                    &[BuildState::Running],
                    BuildState::Uploading,
                    &node.config.node_id,
                    "uploading",
                    update,
                )
                .await
                .map(|_| ())
        } else {
            node.db.update(&row.id, update).await
        };
        if let Err(e) = result {
            tracing::warn!(
                build_id = row.id,
                error = crate::error_chain(&e),
                "cannot record the phase"
            );
        }
        Ok(())
    }
}

/// The last [`LOG_TAIL_BYTES`] of a log, from a line start when possible.
pub async fn read_tail(path: &Path) -> String {
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return String::new();
    };
    let len = file.metadata().await.map_or(0, |m| m.len());
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    if file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if file.read_to_end(&mut buf).await.is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    match (start > 0, text.find('\n')) {
        (true, Some(i)) => text[i + 1..].to_string(),
        _ => text,
    }
}

/// The CPUs this process may run on, in order.
fn host_cpu_list() -> Vec<u32> {
    // SAFETY: sched_getaffinity writes into a zeroed cpu_set_t of the size we pass.
    let cpus = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..crate::config::host_cpus()).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&i| libc::CPU_ISSET(i, &set))
            .map(|i| i as u32)
            .collect::<Vec<_>>()
    };
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}
