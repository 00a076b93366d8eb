//! Progress display: a bar on a terminal, a plain line every few seconds otherwise (logs and CI
//! output stay readable), and nothing at all with `--quiet`.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use parking_lot::Mutex;

pub struct Reporter {
    what: &'static str,
    bar: Option<ProgressBar>,
    /// Files done and total, for the bar's message.
    files: Mutex<(u64, u64)>,
    plain: Option<Mutex<Plain>>,
}

struct Plain {
    total: u64,
    done: u64,
    files: u64,
    total_files: u64,
    started: Instant,
    last: Instant,
}

impl Reporter {
    pub fn new(what: &'static str, quiet: bool) -> Self {
        if quiet {
            return Reporter { what, bar: None, files: Mutex::new((0, 0)), plain: None };
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
                )
                .unwrap()
                .progress_chars("=> "),
            );
            bar.set_prefix(what);
            Reporter { what, bar: Some(bar), files: Mutex::new((0, 0)), plain: None }
        } else {
            let now = Instant::now();
            let plain = Plain { total: 0, done: 0, files: 0, total_files: 0, started: now, last: now };
            Reporter { what, bar: None, files: Mutex::new((0, 0)), plain: Some(Mutex::new(plain)) }
        }
    }

    fn start(&self, files: u64, bytes: u64) {
        if let Some(b) = &self.bar {
            b.set_length(bytes);
            self.files.lock().1 = files;
        }
        if let Some(p) = &self.plain {
            let mut p = p.lock();
            p.total = bytes;
            p.total_files = files;
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
        if let Some(p) = &self.plain {
            let mut p = p.lock();
            p.done += bytes;
            if p.last.elapsed() >= Duration::from_secs(5) {
                p.last = Instant::now();
                let secs = p.started.elapsed().as_secs_f64().max(1e-3);
                let files =
                    if p.total_files > 0 { format!(", {}/{} files", p.files, p.total_files) } else { String::new() };
                eprintln!(
                    "{}: {} of {} ({:.0}%){files}, {}/s",
                    self.what,
                    HumanBytes(p.done),
                    HumanBytes(p.total),
                    100.0 * p.done as f64 / p.total.max(1) as f64,
                    HumanBytes((p.done as f64 / secs) as u64)
                );
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl incfs_pack::Progress for Reporter {
    fn start(&self, files: u64, bytes: u64) {
        Reporter::start(self, files, bytes);
    }
    fn file(&self, path: &Path) {
        if let Some(b) = &self.bar {
            let mut files = self.files.lock();
            files.0 += 1;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let name: String = name.unwrap_or_default().chars().filter(|c| !c.is_control()).take(40).collect();
            b.set_message(format!("{}/{} files {name}", files.0, files.1));
        }
        if let Some(p) = &self.plain {
            p.lock().files += 1;
        }
    }
    fn advance(&self, bytes: u64) {
        Reporter::advance(self, bytes);
    }
}

impl incfs_fetch::ByteProgress for Reporter {
    fn start(&self, bytes: u64) {
        Reporter::start(self, 0, bytes);
    }
    fn advance(&self, bytes: u64) {
        Reporter::advance(self, bytes);
    }
}
