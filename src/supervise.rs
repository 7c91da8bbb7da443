//! Every spawned task is supervised (DEVELOPERS): restarted with backoff when it ends or panics,
//! its state told to readiness and a metric, the process ended when it cannot recover. Failures
//! that repeat are logged once per change, not once per attempt.

use std::time::Duration;

/// Raised by a supervised task that gave up. The server then drains like on SIGTERM and exits
/// non-zero (for the kubelet to restart it), instead of `exit(1)` cutting in-flight requests off.
#[derive(Debug, Clone)]
pub struct Fatal(tokio::sync::watch::Sender<Option<&'static str>>);

impl Default for Fatal {
    fn default() -> Self {
        Fatal(tokio::sync::watch::channel(None).0)
    }
}

impl Fatal {
    /// Says that the task `what` gave up; the first one raised is kept.
    pub fn raise(&self, what: &'static str) {
        self.0.send_if_modified(|raised| raised.is_none() && raised.replace(what).is_none());
    }

    /// The task that gave up, if one did.
    pub fn raised(&self) -> Option<&'static str> {
        *self.0.borrow()
    }

    /// Resolves once a task gave up.
    pub async fn wait(&self) {
        let _ = self.0.subscribe().wait_for(Option::is_some).await;
    }
}

/// How a task is kept running (DEVELOPERS: every spawned task is supervised).
#[derive(Debug, Clone, Copy)]
pub struct Supervision {
    /// The wait before the first restart; doubled after each stop, up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// A run that lasted this long was healthy: the count of stops starts again.
    pub healthy_after: Duration,
    /// Stops in a row (none of them after a healthy run) before giving up.
    pub give_up_after: u32,
}

impl Default for Supervision {
    fn default() -> Self {
        Supervision {
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            healthy_after: Duration::from_secs(120),
            give_up_after: 8,
        }
    }
}

/// Runs `run()` as a task and starts it again with backoff whenever it ends or panics, telling
/// `on_state` when it runs (`true`) and when it stopped (`false`). After too many stops in a row,
/// calls `give_up` (in the server: exit non-zero, and the kubelet restarts the pod).
pub async fn supervise<F, Fut>(
    name: &'static str,
    mut run: F,
    policy: Supervision,
    mut on_state: impl FnMut(bool),
    give_up: impl FnOnce(),
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (mut stops, mut backoff) = (0u32, policy.first_backoff);
    loop {
        on_state(true);
        let started = tokio::time::Instant::now();
        let why = match tokio::spawn(run()).await {
            Ok(()) => "ended".to_owned(),
            Err(e) => format!("panicked: {e}"),
        };
        on_state(false);
        if started.elapsed() >= policy.healthy_after {
            (stops, backoff) = (0, policy.first_backoff);
        }
        stops += 1;
        if stops >= policy.give_up_after {
            tracing::error!(task = name, stops, why, "task keeps stopping; giving up");
            give_up();
            return;
        }
        tracing::error!(task = name, stops, why, ?backoff, "task stopped; restarting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(policy.max_backoff);
    }
}

/// Logs a repeating failure once per change of its message, and the recovery once.
#[derive(Debug, Default)]
pub struct LogOnChange {
    last: Option<String>,
}

impl LogOnChange {
    /// `true` when `error` differs from the last failure (log it); a repeat returns `false`.
    pub fn failed(&mut self, error: &impl std::fmt::Display) -> bool {
        let message = error.to_string();
        let new = self.last.as_deref() != Some(message.as_str());
        self.last = Some(message);
        new
    }

    /// `true` when this success ends a run of failures (log the recovery).
    pub fn succeeded(&mut self) -> bool {
        self.last.take().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    /// Giving up raises `Fatal` (the server's signal to drain and exit 1), once, and a waiter sees it.
    #[tokio::test]
    async fn giving_up_raises_fatal_for_the_drain() {
        let fatal = Fatal::default();
        let waiter = tokio::spawn({
            let fatal = fatal.clone();
            async move { fatal.wait().await }
        });
        assert_eq!(fatal.raised(), None);
        let raise = fatal.clone();
        supervise("ending", || async {}, quick(), |_| {}, move || raise.raise("ending")).await;
        tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("the waiter wakes").unwrap();
        fatal.raise("another");
        assert_eq!(fatal.raised(), Some("ending"), "the first task that gave up is kept");
    }

    fn quick() -> Supervision {
        Supervision {
            first_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            healthy_after: Duration::from_secs(60),
            give_up_after: 4,
        }
    }

    #[tokio::test]
    async fn a_task_that_panics_is_restarted_and_said_to_be_down_meanwhile() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Mutex;
        let runs = Arc::new(AtomicUsize::new(0));
        let states = Arc::new(Mutex::new(Vec::new()));
        let (r, s) = (runs.clone(), states.clone());
        let run = move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    panic!("watch bug #{n}");
                }
                std::future::pending::<()>().await // the third run stays up
            }
        };
        let task =
            tokio::spawn(supervise("test", run, quick(), move |up| s.lock().unwrap().push(up), || panic!("gave up")));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::SeqCst) < 3 {
            assert!(tokio::time::Instant::now() < deadline, "not restarted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*states.lock().unwrap(), [true, false, true, false, true], "down after each panic, up on each run");
        assert!(!task.is_finished(), "still supervising");
        task.abort();
    }

    #[tokio::test]
    async fn a_task_that_keeps_stopping_is_given_up() {
        let stops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let s = stops.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let on_state = move |up: bool| {
            if !up {
                s.fetch_add(1, Ordering::SeqCst);
            }
        };
        supervise("test", || async {}, quick(), on_state, move || tx.send(()).unwrap()).await;
        rx.await.expect("give_up was called");
        assert_eq!(stops.load(Ordering::SeqCst), 4, "gives up after give_up_after stops in a row");
    }

    #[test]
    fn a_repeating_failure_is_logged_once_per_change() {
        let mut log = LogOnChange::default();
        assert!(!log.succeeded(), "nothing to recover from");
        assert!(log.failed(&"cannot read tls.crt"));
        assert!(!log.failed(&"cannot read tls.crt"), "the same failure again");
        assert!(log.failed(&"tls.key does not match"), "another failure");
        assert!(log.succeeded());
        assert!(!log.succeeded());
        assert!(log.failed(&"tls.key does not match"), "after a recovery, the same failure is news again");
    }
}
