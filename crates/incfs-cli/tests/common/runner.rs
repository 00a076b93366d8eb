//! A tokio runtime on a thread of its own, for the in-process test servers (the proxies), so
//! they work from plain `#[test]`s. Dropping the runner signals the server future to stop, drops
//! every task (closing their sockets, stalled ones too) without waiting for peers, and waits for
//! the thread a bounded time: a stuck server must never hang a test (it is detached instead).

use std::future::Future;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

/// How long `Drop` waits for the thread before leaving it behind.
const DROP_WAIT: Duration = Duration::from_secs(5);

pub struct Runner {
    stop: Option<oneshot::Sender<()>>,
    done: std_mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl Runner {
    /// Run `server(stop)` on a new thread named `name`; it should return soon after `stop` fires.
    pub fn spawn<F, Fut>(name: String, server: F) -> Runner
    where
        F: FnOnce(oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (stop_tx, stop_rx) = oneshot::channel();
        let (done_tx, done_rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let runtime =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("building a runtime");
                runtime.block_on(server(stop_rx));
                runtime.shutdown_background();
                let _ = done_tx.send(());
            })
            .expect("spawning a server thread");
        Runner { stop: Some(stop_tx), done: done_rx, thread: Some(thread) }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.done.recv_timeout(DROP_WAIT) {
            Ok(()) | Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}
