//! A guest living in a process, as a VM lives in its VMM, steered through a control socket.
//!
//! The control protocol is JSON lines over a Unix socket: the client sends one request
//! object, the host answers with zero or more `{"event":"progress",...}` lines and one
//! final line (`status`, `report`, `check`, `ok` or `error`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::Context;
use ferry_core::engine;
use ferry_core::report::{Progress, Report};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::guest::Hosted;
use crate::live::Running;
use crate::opts::{MemoryModeArg, MigrationArgs};
use ferry_core::machine::{DestAction, DestEvent, DestSession};

/// Lifecycle of the hosted guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostState {
    /// A destination waiting for a migration.
    Listening,
    /// A destination receiving a migration.
    Receiving,
    /// The guest runs here.
    Running,
    /// A migration away is in progress.
    Migrating,
    /// The guest now runs elsewhere (confirmed).
    MigratedAway,
    /// The guest was handed over, but what followed failed: it is the destination's
    /// (running or held there) and never runs here again.
    HandedOver,
    /// Received and verified, but the hand-over never came: paused, awaiting an operator.
    InDoubt,
    /// Handed over to this host, but it cannot run yet (resuming failed, or owed
    /// post-copy blocks stopped arriving): paused, never discarded, awaiting an operator.
    Held,
    /// Stopped by request.
    Stopped,
}

/// The control API's version (docs/control.md): raised when a request or an answer
/// changes incompatibly.
pub const CONTROL_API: u32 = 1;

/// A control request: one JSON object per line on the control socket
/// ([docs/control.md](../../docs/control.md)).
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// State and counters.
    Status,
    /// Migrate the guest to `to`.
    Migrate {
        /// Destination address.
        to: String,
        /// How (boxed: by far the largest request).
        args: Box<MigrationArgs>,
        /// Recover the interrupted storage post-copy of the last migration instead: push
        /// what the destination at `to` still owes.
        #[serde(default)]
        recover: bool,
    },
    /// Run the guest's self-check now.
    Check,
    /// Stop the guest and the process.
    Stop,
    /// Resume an in-doubt guest (the operator knows the source handed over).
    Resume,
    /// Discard an in-doubt guest (the operator knows the source kept it).
    Discard,
    /// Switch the running hybrid migration to memory post-copy now.
    Postcopy,
    /// Cancel the running migration (before the hand-over; the source keeps the guest).
    Cancel,
    /// Change the running migration's bandwidth cap and downtime target.
    Set {
        /// New cap (`none` lifts it).
        #[serde(default)]
        max_bandwidth: Option<String>,
        /// New downtime target.
        #[serde(default)]
        downtime: Option<String>,
    },
}

/// The JSON Schema of [`Request`], pretty-printed: what `docs/control.schema.json` holds.
pub fn request_schema() -> String {
    let schema = schemars::schema_for!(Request);
    serde_json::to_string_pretty(&schema).unwrap_or_default()
}

/// Applies a steering request to the running migration; what was done, or why not.
fn steer(run: &Running, req: Request) -> Result<String, String> {
    use ferry_core::control::CancelOutcome;
    match req {
        Request::Postcopy => match run.memory_mode {
            MemoryModeArg::Hybrid => {
                run.control.request_postcopy();
                Ok("switching to post-copy".into())
            }
            mode => Err(format!(
                "the migration runs with --memory-mode {}; only a hybrid one switches to post-copy",
                serde_json::to_value(mode)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            )),
        },
        Request::Cancel => match run.control.cancel() {
            CancelOutcome::Cancelling => {
                Ok("cancelling: the source keeps the guest, the destination discards".into())
            }
            CancelOutcome::TooLate => Err(
                "too late: the guest was handed over to the destination (it never runs here again)"
                    .into(),
            ),
        },
        Request::Set {
            max_bandwidth,
            downtime,
        } => {
            if max_bandwidth.is_none() && downtime.is_none() {
                return Err("nothing to set: give --max-bandwidth or --downtime".into());
            }
            let cap = match max_bandwidth.as_deref() {
                None => None,
                Some("none") => Some(None),
                Some(r) => Some(Some(
                    crate::units::parse_rate(r).map_err(|e| format!("--max-bandwidth: {e}"))?,
                )),
            };
            let target = downtime
                .as_deref()
                .map(crate::units::parse_duration)
                .transpose()
                .map_err(|e| format!("--downtime: {e}"))?;
            if run.control.is_committed() {
                return Err("too late: the guest was handed over".into());
            }
            let mut said = Vec::new();
            if let Some(c) = cap {
                run.control.set_max_bandwidth(c);
                said.push(match c {
                    Some(r) => format!("bandwidth cap {:.1} Mbit/s", r as f64 * 8e-6),
                    None => "no bandwidth cap".into(),
                });
            }
            if let Some(t) = target {
                run.control.set_downtime(t);
                said.push(format!("downtime target {:.1} ms", t.as_secs_f64() * 1e3));
            }
            Ok(said.join(", "))
        }
        _ => Err("not a steering request".into()),
    }
}

/// The process-wide host.
pub struct Host {
    guest: Mutex<Option<Hosted>>,
    state: Mutex<HostState>,
    /// A held or in-doubt guest's session: it decides what an operator may do.
    session: Mutex<Option<DestSession>>,
    /// Why the guest is held or in doubt.
    reason: Mutex<Option<String>>,
    last_report: Mutex<Option<Value>>,
    role: &'static str,
    done: (Mutex<bool>, Condvar),
    /// The migration running from here, while it runs.
    running: Mutex<Option<Arc<Running>>>,
}

impl Host {
    /// Hosts `guest` in `state`.
    pub fn new(guest: Hosted, state: HostState, role: &'static str) -> Arc<Self> {
        let h = Self::listening(role);
        h.attach(guest, state);
        h
    }

    /// A host without a guest yet (a destination before the migration arrives).
    pub fn listening(role: &'static str) -> Arc<Self> {
        Arc::new(Self {
            guest: Mutex::new(None),
            state: Mutex::new(HostState::Listening),
            session: Mutex::new(None),
            reason: Mutex::new(None),
            last_report: Mutex::new(None),
            role,
            done: (Mutex::new(false), Condvar::new()),
            running: Mutex::new(None),
        })
    }

    /// Installs the guest (a migration arrived) in `state`.
    pub fn attach(&self, guest: Hosted, state: HostState) {
        *self.guest.lock().unwrap_or_else(|p| p.into_inner()) = Some(guest);
        self.set_state(state);
    }

    /// Holds a received guest (in doubt or held) for an operator; `session` decides
    /// what may be done with it.
    pub fn hold(&self, guest: Hosted, state: HostState, session: DestSession, reason: String) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.attach(guest, state);
    }

    /// A held guest's owed post-copy blocks all arrived (recovery): it may be resumed.
    pub fn owed_arrived(&self) {
        if let Some(s) = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            let _ = s.on(DestEvent::OwedArrived);
        }
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = reason.as_mut() {
            r.push_str("; the owed blocks were recovered since");
        }
    }

    /// The migration running from here, if one is.
    pub fn running(&self) -> Option<Arc<Running>> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current state.
    pub fn state(&self) -> HostState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the state.
    pub fn set_state(&self, s: HostState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    fn guest(&self) -> Option<Hosted> {
        self.guest.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records a report for `status`.
    pub fn set_last_report(&self, v: Value) {
        *self.last_report.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
    }

    /// Tells [`Host::wait_done`] to return.
    pub fn finish(&self) {
        let (m, c) = &self.done;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        c.notify_all();
    }

    /// Blocks until the guest left or was stopped.
    pub fn wait_done(&self) {
        let (m, c) = &self.done;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        while !*g {
            g = c.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The state as reported by `status`.
    pub fn status(&self) -> Value {
        let guest = self.guest();
        let (stats, workload, memory, disks, backend) = match &guest {
            Some(g) => {
                let (stats, workload) = g.status();
                (
                    stats,
                    workload,
                    g.source().layout().memory_bytes(),
                    g.disk_paths()
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>(),
                    Value::from(g.backend()),
                )
            }
            None => (Value::Null, Value::Null, 0, Vec::new(), Value::Null),
        };
        json!({
            "event": "status",
            "control_api": CONTROL_API,
            "state": self.state(),
            "role": self.role,
            "backend": backend,
            "pid": std::process::id(),
            "memory_bytes": memory,
            "disks": disks,
            "workload": workload,
            "progress": stats,
            "reason": self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            "owed_blocks": guest.as_ref().map(|g| g.dest().owed_blocks()),
            "owed_pages": guest.as_ref().map(|g| g.dest().owed_pages()),
            "migration": self.running().map(|r| r.status()),
            "last_migration": self.last_report.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }

    /// Migrates the hosted guest; `emit` gets progress events. With `recover`, instead
    /// pushes the blocks a destination still owes after this guest's interrupted storage
    /// post-copy (the guest was handed over; it never runs here again either way).
    pub fn migrate(
        &self,
        to: &str,
        args: &MigrationArgs,
        recover: bool,
        emit: &(dyn Fn(Progress) + Sync),
    ) -> Report {
        let fail = |msg: String| Report {
            ok: false,
            error: Some(msg),
            source_resumed: Some(!recover),
            source_state: if recover { "handed-over" } else { "running" }.into(),
            ..Report::default()
        };
        let from = if recover {
            HostState::HandedOver
        } else {
            HostState::Running
        };
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if *st != from {
                let why = if recover {
                    format!(
                        "only a handed-over source recovers a post-copy (this guest is {} here)",
                        state_name(*st)
                    )
                } else {
                    format!("cannot migrate a guest that is {} here", state_name(*st))
                };
                return Report {
                    source_resumed: None,
                    source_state: state_name(*st),
                    ..fail(why)
                };
            }
            *st = HostState::Migrating;
        }
        let Some(guest) = self.guest() else {
            self.set_state(from);
            return fail("no guest".into());
        };
        let running = Arc::new(Running::new(Arc::default(), args.memory_mode));
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&running));
        let control = Arc::clone(&running.control);
        let emit = |p: Progress| {
            running.track(&p);
            emit(p);
        };
        let run = if recover {
            match self.last_migration_id() {
                Some(id) => {
                    drive_source_with(guest.source(), to, args, Some(id), control, false, &emit)
                }
                None => Err(anyhow::anyhow!("no interrupted migration to recover")),
            }
        } else {
            drive_source_with(guest.source(), to, args, None, control, false, &emit)
        };
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let report = run.unwrap_or_else(|e| fail(format!("{e:#}")));
        // The engine's session said where the guest is: the state tells the truth, so an
        // operator resolving an in-doubt destination never discards the only copy.
        match (report.ok, report.source_state.as_str()) {
            (true, _) => {
                self.set_state(HostState::MigratedAway);
                *self.guest.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            (false, "handed-over" | "migrated-away") => {
                *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = report.error.clone();
                self.set_state(HostState::HandedOver);
            }
            (false, _) => self.set_state(HostState::Running),
        }
        self.set_last_report(serde_json::to_value(&report).unwrap_or(Value::Null));
        report
    }

    /// The id of the last migration away, from its report.
    fn last_migration_id(&self) -> Option<[u8; 16]> {
        let last = self.last_report.lock().unwrap_or_else(|p| p.into_inner());
        parse_id(last.as_ref()?.get("migration_id")?.as_str()?)
    }

    fn handle(&self, req: Request, conn: &UnixStream) -> anyhow::Result<()> {
        let send = |v: Value| -> anyhow::Result<()> {
            let mut w = conn;
            writeln!(w, "{v}")?;
            w.flush()?;
            Ok(())
        };
        match req {
            Request::Status => send(self.status()),
            Request::Migrate { to, args, recover } => {
                let report = self.migrate(&to, &args, recover, &|p| {
                    // A client that went away does not stop the migration.
                    let _ = send(json!({"event": "progress", "progress": p}));
                });
                send(json!({"event": "report", "report": report}))?;
                if report.ok {
                    self.finish();
                }
                Ok(())
            }
            Request::Check => match self.guest() {
                Some(g) if self.state() == HostState::Running => {
                    let r = g.check_now()?;
                    send(
                        json!({"event": "check", "ok": r.ok, "pages_checked": r.pages_checked,
                        "blocks_checked": r.blocks_checked, "problems": r.problems}),
                    )
                }
                _ => send(
                    json!({"event": "error", "message": format!("no running guest here (state {:?})", self.state())}),
                ),
            },
            Request::Stop => {
                if matches!(self.state(), HostState::Listening | HostState::Receiving) {
                    send(json!({"event": "error", "message": "no guest here yet"}))?;
                    return Ok(());
                }
                if let Some(g) = self.guest() {
                    match self.state() {
                        HostState::InDoubt => {
                            send(
                                json!({"event": "error", "message": "the guest is in doubt: resume or discard it"}),
                            )?;
                            return Ok(());
                        }
                        HostState::Held => {
                            send(
                                json!({"event": "error", "message": "the guest was handed over to this host and is held: resume it, it is never stopped or discarded here"}),
                            )?;
                            return Ok(());
                        }
                        _ => g.stop(),
                    }
                }
                self.set_state(HostState::Stopped);
                send(json!({"event": "ok"}))?;
                self.finish();
                Ok(())
            }
            Request::Postcopy | Request::Cancel | Request::Set { .. } => {
                let Some(run) = self.running() else {
                    return send(
                        json!({"event": "error", "message": format!("no migration is running here (this guest is {})", state_name(self.state()))}),
                    );
                };
                send(match steer(&run, req) {
                    Ok(what) => json!({"event": "ok", "message": what}),
                    Err(why) => json!({"event": "error", "message": why}),
                })
            }
            Request::Resume | Request::Discard => {
                match self.decide_held(matches!(req, Request::Resume)) {
                    Ok(discarded) => {
                        // Answer before the process is told to exit.
                        let r = send(json!({"event": "ok"}));
                        if discarded {
                            self.finish();
                        }
                        r
                    }
                    Err(m) => send(json!({"event": "error", "message": m})),
                }
            }
        }
    }

    /// An operator's decision on an in-doubt or held guest: resume it (`resume`) or
    /// discard it. The session decides whether it may: a handed-over guest is never
    /// discarded, and one that owes post-copy units cannot run without them. Returns
    /// whether the guest was discarded.
    pub fn decide_held(&self, resume: bool) -> Result<bool, String> {
        if !matches!(self.state(), HostState::InDoubt | HostState::Held) {
            return Err(format!(
                "only an in-doubt or held guest can be resumed or discarded (this one is {})",
                state_name(self.state())
            ));
        }
        let Some(g) = self.guest() else {
            return Err("no guest".into());
        };
        let action = {
            let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
            let ev = if resume {
                DestEvent::OperatorResume
            } else {
                DestEvent::OperatorDiscard
            };
            // The guest knows best whether the owed units arrived (a recovery may still
            // be closing its connection).
            if g.dest().owed_blocks() == 0 && g.dest().owed_pages() == 0 {
                if let Some(s) = s.as_mut() {
                    let _ = s.on(DestEvent::OwedArrived);
                }
            }
            match s.as_mut().map(|s| s.on(ev)) {
                Some(Ok(a)) => a,
                Some(Err(e)) => {
                    return Err(format!(
                        "refused: {} ({} pages and {} blocks owed by the source)",
                        e.0,
                        g.dest().owed_pages(),
                        g.dest().owed_blocks()
                    ))
                }
                None => return Err("no session for this guest".into()),
            }
        };
        if action == DestAction::Resume {
            g.dest().resume().map_err(|e| e.to_string())?;
            g.start();
            *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.set_state(HostState::Running);
            Ok(false)
        } else {
            g.dest().discard();
            *self.guest.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.set_state(HostState::Stopped);
            Ok(true)
        }
    }

    /// Serves the control socket at `path` on a background thread.
    pub fn serve(self: &Arc<Self>, path: &Path) -> anyhow::Result<ControlSocket> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            // Only a socket is ever replaced: `--control` naming any other file is a
            // mistake that must not cost the user that file.
            if !meta.file_type().is_socket() {
                anyhow::bail!(
                    "--control: {} exists and is not a socket; refusing to replace it",
                    path.display()
                );
            }
            // A stale socket from a dead process blocks bind; a live one answers.
            if UnixStream::connect(path).is_ok() {
                anyhow::bail!("--control: {} is in use by a running ferry", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("--control: removing stale {}", path.display()))?;
        }
        // Private from its first moment: created with no access for group and others
        // (the umask is only narrowed around the bind), then set to 0600 explicitly.
        // SAFETY: umask(2) only changes this process's file-creation mask; no memory is
        // passed. It is restored right after the bind.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.with_context(|| format!("--control: binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("--control: making {} private", path.display()))?;
        let host = Arc::clone(self);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let host = Arc::clone(&host);
                std::thread::spawn(move || serve_one(&host, &conn));
            }
        });
        Ok(ControlSocket {
            path: path.to_path_buf(),
        })
    }
}

/// The longest request line taken, and how long a client may take to send it.
const MAX_REQUEST: u64 = 64 << 10;
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Answers one control connection: only this user (or root) may steer the guest.
fn serve_one(host: &Host, conn: &UnixStream) {
    let mut w = conn;
    let reply_error = |w: &mut &UnixStream, message: String| {
        let _ = writeln!(w, "{}", json!({"event": "error", "message": message}));
    };
    match peer_uid(conn) {
        // SAFETY: geteuid(2) has no arguments and cannot fail.
        Some(uid) if uid == 0 || uid == unsafe { libc::geteuid() } => {}
        other => {
            let who = other.map_or("an unknown user".to_string(), |u| format!("uid {u}"));
            reply_error(&mut w, format!("refused: {who} may not steer this guest"));
            return;
        }
    }
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut line = String::new();
    let mut reader = BufReader::new(conn).take(MAX_REQUEST);
    match reader.read_line(&mut line) {
        Ok(_) if line.ends_with('\n') => {}
        Ok(_) if line.len() as u64 >= MAX_REQUEST => {
            return reply_error(
                &mut w,
                format!("bad request: longer than {} KiB", MAX_REQUEST >> 10),
            )
        }
        Ok(_) if line.is_empty() => return,
        Ok(_) => {}
        Err(e) => return reply_error(&mut w, format!("bad request: {e}")),
    }
    let r = match serde_json::from_str::<Request>(&line) {
        Ok(req) => host.handle(req, conn),
        Err(e) => {
            reply_error(&mut w, format!("bad request: {e}"));
            Ok(())
        }
    };
    if let Err(e) = r {
        reply_error(&mut w, format!("{e:#}"));
    }
}

/// The uid of the process at the other end of `conn` (`SO_PEERCRED`).
fn peer_uid(conn: &UnixStream) -> Option<u32> {
    use std::os::unix::io::AsRawFd;
    ferry_transports::admission::peer_uid(conn.as_raw_fd()).ok()
}

/// A state as `status` spells it.
pub fn state_name(s: HostState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Removes the socket file when dropped.
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs the source side of a migration of `guest` to `to`.
pub fn run_source(
    guest: Hosted,
    to: &str,
    args: &MigrationArgs,
    emit: &(dyn Fn(Progress) + Sync),
) -> anyhow::Result<Report> {
    drive_source(guest.source(), to, args, None, emit)
}

/// [`run_source`] for a guest that lives only in this process: if the link breaks during
/// a post-copy, it keeps reconnecting until the destination has everything (this
/// process holds the only copy of what it still lacks).
pub fn run_source_holding(
    guest: Hosted,
    to: &str,
    args: &MigrationArgs,
    control: Arc<ferry_core::control::MigrationControl>,
    emit: &(dyn Fn(Progress) + Sync),
) -> anyhow::Result<Report> {
    drive_source_with(guest.source(), to, args, None, control, true, emit)
}

/// Runs the source side of a migration of `guest` to `to`, or with `recover` the
/// recovery of that migration's interrupted post-copy.
pub fn drive_source(
    guest: Arc<dyn ferry_core::SourceGuest>,
    to: &str,
    args: &MigrationArgs,
    recover: Option<[u8; 16]>,
    emit: &(dyn Fn(Progress) + Sync),
) -> anyhow::Result<Report> {
    drive_source_with(guest, to, args, recover, Arc::default(), false, emit)
}

/// [`drive_source`], with the switch an operator sets to move a hybrid migration to
/// post-copy, and whether a broken post-copy is retried until it succeeds (`persist`) or
/// for `--timeout`.
fn drive_source_with(
    guest: Arc<dyn ferry_core::SourceGuest>,
    to: &str,
    args: &MigrationArgs,
    recover: Option<[u8; 16]>,
    control: Arc<ferry_core::control::MigrationControl>,
    persist: bool,
    emit: &(dyn Fn(Progress) + Sync),
) -> anyhow::Result<Report> {
    let mut cfg = args.source_config(to)?;
    cfg.control = control;
    let transport = args.peer.transport(cfg.io_timeout)?;
    let codec = args.codec()?;
    Ok(match recover {
        None => {
            let first = engine::migrate(
                Arc::clone(&guest),
                &*transport,
                Arc::clone(&codec),
                &cfg,
                emit,
            );
            let link = Link {
                guest,
                transport: &*transport,
                codec,
                cfg: &cfg,
            };
            reconnect_postcopy(first, &link, persist, emit)
        }
        Some(id) => engine::recover_postcopy(guest, &*transport, codec, &cfg, id, emit),
    })
}

/// What a post-copy reconnection needs.
struct Link<'a> {
    guest: Arc<dyn ferry_core::SourceGuest>,
    transport: &'a dyn ferry_core::transport::Transport,
    codec: Arc<dyn ferry_core::codec::CodecFactory>,
    cfg: &'a engine::SourceConfig,
}

/// A post-copy whose link broke after the hand-over: reconnects and pushes what the
/// destination still owes (its listener takes the recovery), for 8 × `--timeout` (a
/// destination notices a silent source after 6 × and only then listens again), or with
/// `persist` (this process holds the guest's only memory) until it succeeds.
fn reconnect_postcopy(
    mut report: Report,
    link: &Link<'_>,
    persist: bool,
    emit: &(dyn Fn(Progress) + Sync),
) -> Report {
    let interrupted = !report.ok
        && report.source_state == "handed-over"
        && report.pages_postcopy + report.blocks_postcopy > 0;
    let Some(id) = parse_id(&report.migration_id).filter(|_| interrupted) else {
        return report;
    };
    let t0 = std::time::Instant::now();
    let first_error = report.error.clone().unwrap_or_default();
    let mut last = String::new();
    while persist || t0.elapsed() < link.cfg.io_timeout * 8 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        emit(Progress::Note {
            text: format!(
                "post-copy interrupted; reconnecting (attempt {})",
                report.postcopy_reconnects + 1
            ),
        });
        let r = engine::recover_postcopy(
            Arc::clone(&link.guest),
            link.transport,
            Arc::clone(&link.codec),
            link.cfg,
            id,
            emit,
        );
        report.postcopy_reconnects += 1;
        report.bytes_on_wire += r.bytes_on_wire;
        if r.ok {
            report.ok = true;
            report.verified = r.verified;
            report.oracle = r.oracle;
            report.error = None;
            report.source_state = r.source_state;
            report.pages_pushed += r.pages_pushed;
            report.pages_demanded += r.pages_demanded;
            report.total_ms += t0.elapsed().as_secs_f64() * 1e3;
            return report;
        }
        last = r.error.unwrap_or_default();
        if persist && report.postcopy_reconnects.is_multiple_of(10) {
            eprintln!(
                "ferry: this process holds the only copy of the pages the destination still lacks; it keeps reconnecting (last: {last}). Interrupting it loses the guest."
            );
        }
    }
    report.error = Some(format!(
        "{first_error}; reconnecting for {:.0} s ({} attempts) did not recover it: {last}",
        t0.elapsed().as_secs_f64(),
        report.postcopy_reconnects
    ));
    report
}

/// A migration id from its hex form.
pub fn parse_id(hex: &str) -> Option<[u8; 16]> {
    let mut id = [0u8; 16];
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// Sends `req` to the control socket at `path` and calls `on_line` for each answer line;
/// returns the last one.
pub fn request(
    path: &Path,
    req: &Request,
    mut on_line: impl FnMut(&Value),
) -> anyhow::Result<Value> {
    let conn = UnixStream::connect(path)
        .with_context(|| format!("--vm: cannot reach a ferry guest at {}", path.display()))?;
    let mut w = &conn;
    writeln!(w, "{}", serde_json::to_string(req)?)?;
    for line in BufReader::new(&conn).lines() {
        let line = line.context("reading the control socket")?;
        let v: Value = serde_json::from_str(&line).context("bad answer on the control socket")?;
        on_line(&v);
        if v.get("event").and_then(Value::as_str) != Some("progress") {
            return Ok(v);
        }
    }
    anyhow::bail!(
        "--vm: the guest's process at {} closed the control socket before answering (did it die?)",
        path.display()
    )
}
