//! The supervisor: the process `incfs mount` leaves running. It mounts (when its first worker
//! has accepted a manifest), holds the mount and the `/dev/fuse` fd, and keeps a worker serving
//! them: a worker that dies is replaced within a moment, `incfs restart` replaces it by a new
//! binary, and the kernel sends the replacement every request the old one had not answered
//! (`FUSE_NOTIFY_RESEND`). See [`crate::handover`] for what passes between the two.
//!
//! It is deliberately small and single-threaded (a `poll` loop over the worker's link, its
//! pidfd, a signalfd and the FUSE fd), so that it has little reason to fail. If it is killed
//! all the same, its worker is told (`PR_SET_PDEATHSIG`, SIGUSR1): it detaches the mount
//! (lazy unmount) and exits, and the mount is gone as it was before supervisors existed. A worker
//! that cannot (itself killed) leaves it to fusermount3's `auto_unmount` (as root).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::handover::{self, InitFacts, OpenMode, Takeover, ToSupervisor, ToWorker, ViewState};

/// Consecutive worker failures (exits before serving) after which the mount is given up.
const MAX_FAILURES: u32 = 8;
/// How long a worker asked to stop, or left without a connection, may take to exit.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How to start workers.
pub struct Supervise {
    pub mountpoint: PathBuf,
    /// The binary started for workers (an `incfs restart` may name another).
    pub binary: PathBuf,
    /// Their arguments (the daemon's own command line).
    pub args: Vec<OsString>,
    /// FUSE request threads of each worker.
    pub threads: usize,
}

/// What the supervisor knows of the mount, handed to each new worker.
#[derive(Default)]
struct Known {
    init: Option<InitFacts>,
    view: Option<ViewState>,
    modes: HashMap<u64, OpenMode>,
    counters: BTreeMap<String, u64>,
    restarts: u64,
    restart_error: Option<String>,
}

impl Known {
    fn takeover(&self, mountpoint: &Path) -> Option<Box<Takeover>> {
        Some(Box::new(Takeover {
            mountpoint: mountpoint.to_path_buf(),
            init: self.init?,
            view: self.view.clone()?,
            modes: self.modes.iter().map(|(k, v)| (*k, *v)).collect(),
            counters: self.counters.clone(),
            restarts: self.restarts,
            restart_error: self.restart_error.clone(),
        }))
    }
}

struct Worker {
    child: Child,
    pidfd: OwnedFd,
    link: UnixStream,
    link_open: bool,
    binary: PathBuf,
    /// Said [`ToSupervisor::Ready`].
    ready: bool,
    /// Asked to stop for a restart into this binary, at this instant.
    replace_by: Option<(PathBuf, Instant)>,
}

/// Run the supervisor until the mount ends; returns the exit code for `incfs mount`.
pub fn run(s: Supervise) -> Result<i32, String> {
    // Signals arrive on a signalfd; workers get the default mask back before exec.
    let mut mask = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGCHLD] {
        mask.add(sig);
    }
    mask.thread_block().map_err(|e| format!("signal mask: {e}"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("signalfd: {e}"))?;

    let mut known = Known::default();
    let mut fuse: Option<OwnedFd> = None;
    let mut mounted: Option<fuser::Mounted> = None;
    let mut disconnected = false;
    let mut failures = 0u32;
    let mut stopping_since: Option<Instant> = None;
    let mut worker = spawn(&s, &s.binary, None, None, true)?;
    // The binary that last served; a failed restart falls back to it.
    let mut serving_binary = s.binary.clone();

    loop {
        let timeout = match (stopping_since, &worker.replace_by) {
            (None, None) => PollTimeout::NONE,
            _ => PollTimeout::from(200u16),
        };
        let (link_ev, pid_ev, sig_ev, fuse_ev) = {
            // A closed link would poll readable forever: once closed, only the pidfd counts.
            let link_events = if worker.link_open { PollFlags::POLLIN } else { PollFlags::empty() };
            let mut fds = vec![
                PollFd::new(worker.link.as_fd(), link_events),
                PollFd::new(worker.pidfd.as_fd(), PollFlags::POLLIN),
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            ];
            if let (Some(f), false) = (&fuse, disconnected) {
                // No events asked: only POLLERR, which /dev/fuse reports once the connection is
                // gone (unmounted, or aborted).
                fds.push(PollFd::new(f.as_fd(), PollFlags::empty()));
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("poll: {e}")),
            }
            let ev = |i: usize| fds.get(i).and_then(|f| f.revents()).unwrap_or(PollFlags::empty());
            (ev(0), ev(1), ev(2), ev(3))
        };

        if !sig_ev.is_empty() {
            while let Ok(Some(info)) = signals.read_signal() {
                let sig = Signal::try_from(info.ssi_signo as i32).ok();
                if matches!(sig, Some(Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP)) {
                    tracing::warn!("supervisor: {sig:?} received: unmounting {}", s.mountpoint.display());
                    if let Err(e) = crate::daemon::unmount(&s.mountpoint) {
                        tracing::error!("unmount failed: {e}");
                    }
                    stopping_since.get_or_insert_with(Instant::now);
                }
            }
        }
        if fuse_ev.intersects(PollFlags::POLLERR | PollFlags::POLLHUP) {
            tracing::info!("supervisor: the FUSE connection ended; waiting for the daemon to exit");
            disconnected = true;
            stopping_since.get_or_insert_with(Instant::now);
        }
        if worker.link_open && link_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            match handover::read_frame::<ToSupervisor>(&mut worker.link) {
                Ok(msg) => handle(&s, &mut known, &mut worker, msg, &mut fuse, &mut mounted, &mut failures),
                // The worker closed its end (exiting): its pidfd tells the rest.
                Err(_) => worker.link_open = false,
            }
        }
        if worker.ready {
            serving_binary = worker.binary.clone();
        }
        let exited = pid_ev.contains(PollFlags::POLLIN);
        if !exited {
            let asked = stopping_since.or(worker.replace_by.as_ref().map(|(_, at)| *at));
            if asked.is_some_and(|at| at.elapsed() > STOP_GRACE) {
                tracing::warn!("supervisor: daemon {} did not exit; killing it", worker.child.id());
                let _ = worker.child.kill();
                stopping_since = stopping_since.map(|_| Instant::now());
                if let Some((_, at)) = &mut worker.replace_by {
                    *at = Instant::now();
                }
            }
            continue;
        }
        let status = worker.child.wait().map_err(|e| format!("wait: {e}"))?;
        let pid = worker.child.id();
        // What it said last (its counters, on a restart): its end is closed, so this ends.
        while worker.link_open {
            match handover::read_frame::<ToSupervisor>(&mut worker.link) {
                Ok(ToSupervisor::Mount { .. }) => {}
                Ok(msg) => handle(&s, &mut known, &mut worker, msg, &mut fuse, &mut mounted, &mut failures),
                Err(_) => worker.link_open = false,
            }
        }
        if worker.ready {
            serving_binary = worker.binary.clone();
        }
        // Gone for good: the connection ended (unmounted), or was never made, or we were asked
        // to stop.
        let connected = fuse.is_some() && !disconnected && !connection_gone(fuse.as_ref());
        if !connected || (stopping_since.is_some() && worker.replace_by.is_none()) {
            drop(mounted.take());
            return Ok(status.code().unwrap_or(if fuse.is_none() { 2 } else { 0 }));
        }
        stopping_since = None;
        if known.takeover(&s.mountpoint).is_none() {
            tracing::error!("supervisor: daemon {pid} died ({status}) before it was serving the mount; unmounting");
            drop(mounted.take());
            return Ok(2);
        }
        let planned = worker.replace_by.take().map(|(b, _)| b);
        let next_binary = match (&planned, worker.ready) {
            (Some(b), _) => b.clone(),
            (None, true) => {
                tracing::error!("supervisor: daemon {pid} died ({}); starting another", describe(&status));
                failures = 0;
                serving_binary.clone()
            }
            (None, false) => {
                failures += 1;
                let msg = format!(
                    "daemon {pid} (from {}) exited before serving ({})",
                    worker.binary.display(),
                    describe(&status)
                );
                tracing::error!("supervisor: {msg}");
                if worker.binary != serving_binary {
                    // A restart into a new binary failed: back to the one that served.
                    known.restart_error = Some(format!("{msg}; kept {}", serving_binary.display()));
                }
                if failures >= MAX_FAILURES {
                    tracing::error!(
                        "supervisor: {failures} daemons in a row failed; unmounting {}",
                        s.mountpoint.display()
                    );
                    drop(mounted.take());
                    let _ = crate::daemon::unmount(&s.mountpoint);
                    return Ok(1);
                }
                // Backing off a little: 50 ms, doubling, at most 2 s.
                std::thread::sleep(Duration::from_millis(50u64 << failures.min(6)).min(Duration::from_secs(2)));
                serving_binary.clone()
            }
        };
        known.restarts += 1;
        if planned.is_some() {
            known.restart_error = None;
        }
        worker = spawn(&s, &next_binary, known.takeover(&s.mountpoint), fuse.as_ref(), false)?;
    }
}

/// Act on one message of the worker.
fn handle(
    s: &Supervise,
    known: &mut Known,
    worker: &mut Worker,
    msg: ToSupervisor,
    fuse: &mut Option<OwnedFd>,
    mounted: &mut Option<fuser::Mounted>,
    failures: &mut u32,
) {
    match msg {
        ToSupervisor::Mount { name } => {
            let config = crate::daemon::fuse_config(&name, s.threads, false);
            match fuser::mount_only(&s.mountpoint, &config) {
                Ok((fd, m)) => {
                    send(worker, &ToWorker::Mounted);
                    if let Err(e) = handover::send_fd(&worker.link, fd.as_raw_fd()) {
                        tracing::error!("supervisor: cannot hand the FUSE fd over: {e}");
                    }
                    *fuse = Some(fd);
                    *mounted = Some(m);
                }
                Err(e) => send(worker, &ToWorker::MountFailed { error: e.to_string() }),
            }
        }
        ToSupervisor::Initialized { init } => known.init = Some(init),
        ToSupervisor::Ready => {
            worker.ready = true;
            *failures = 0;
        }
        ToSupervisor::View(v) => known.view = Some(v),
        ToSupervisor::Mode { ino, mode: Some(m) } => {
            known.modes.insert(ino, m);
        }
        ToSupervisor::Mode { ino, mode: None } => {
            known.modes.remove(&ino);
        }
        ToSupervisor::Restart { binary } => {
            if worker.replace_by.is_none() {
                let binary = binary.unwrap_or_else(|| s.binary.clone());
                tracing::info!("supervisor: replacing daemon {} by one from {}", worker.child.id(), binary.display());
                worker.replace_by = Some((binary, Instant::now()));
                send(worker, &ToWorker::Stop);
            }
        }
        ToSupervisor::Counters { counters } => known.counters = counters,
    }
}

fn send(worker: &mut Worker, msg: &ToWorker) {
    use std::io::Write;
    if let Err(e) = worker.link.write_all(&handover::frame(msg)) {
        tracing::warn!("supervisor: cannot tell daemon {}: {e}", worker.child.id());
    }
}

/// Whether the FUSE connection is gone (polled once, without waiting).
fn connection_gone(fuse: Option<&OwnedFd>) -> bool {
    let Some(f) = fuse else { return true };
    let mut fds = [PollFd::new(f.as_fd(), PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP))
}

fn describe(status: &std::process::ExitStatus) -> String {
    match status.signal() {
        Some(sig) => format!("killed by signal {sig}"),
        None => status.to_string(),
    }
}

/// Start a worker from `binary`: its link on an inherited fd, the FUSE fd (taking over) sent
/// after its hello. The first worker keeps stdout (it reports "ready" to `incfs mount`); later
/// ones get /dev/null, the reader being gone.
fn spawn(
    s: &Supervise,
    binary: &Path,
    takeover: Option<Box<Takeover>>,
    fuse: Option<&OwnedFd>,
    first: bool,
) -> Result<Worker, String> {
    let (mine, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let their_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(binary);
    cmd.args(&s.args).env(handover::SUPERVISOR_FD_ENV, their_fd.to_string()).stdin(Stdio::null());
    if !first {
        cmd.stdout(Stdio::null());
    }
    let me = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec only async-signal-safe calls: prctl, getppid, fcntl,
    // sigprocmask, _exit.
    unsafe {
        cmd.pre_exec(move || {
            // The worker hears of the supervisor's death (the death of the thread that forked
            // it, the supervisor's only thread): SIGUSR1, whose default action ends it before
            // it has a handler, and on which it unmounts once it has one.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR1) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != me {
                // The supervisor died before the line above: no signal will come.
                libc::_exit(1);
            }
            // The link stays open across exec.
            if libc::fcntl(their_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("cannot start the daemon {}: {e}", binary.display()))?;
    drop(theirs);
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd (or -1); no memory is passed.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::c_int, 0) };
    if raw < 0 {
        return Err(format!("pidfd_open: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    let mut w = Worker {
        child,
        pidfd,
        link: mine,
        link_open: true,
        binary: binary.to_path_buf(),
        ready: false,
        replace_by: None,
    };
    let taking_over = takeover.is_some();
    send(&mut w, &ToWorker::Hello { takeover });
    if let (true, Some(f)) = (taking_over, fuse) {
        if let Err(e) = handover::send_fd(&w.link, f.as_raw_fd()) {
            tracing::error!("supervisor: cannot hand the FUSE fd over: {e}");
        }
    }
    tracing::info!("supervisor: daemon {} started from {}", w.child.id(), binary.display());
    Ok(w)
}
