//! `stasis jobs` and `stasis cancel`, and following a running job on a
//! terminal: one progress bar per phase, Ctrl-C to cancel.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use stasis_api::{ApiClient, JobInfo, JobState};

use crate::cli::{CancelArgs, JobsArgs};

/// Exit status when the command was interrupted (128 + SIGINT).
pub const EXIT_INTERRUPTED: i32 = 130;

/// How often a waiting command asks the VM about its job.
const POLL: Duration = Duration::from_millis(50);

fn fail(e: impl std::fmt::Display) -> i32 {
    eprintln!("stasis: {e}");
    1
}

/// A job's progress on the terminal (nothing when stderr is not one).
pub struct ProgressView {
    bar: Option<ProgressBar>,
    phase: String,
}

impl ProgressView {
    /// A view that draws on stderr if it is a terminal.
    pub fn new() -> Self {
        Self {
            bar: None,
            phase: String::new(),
        }
    }

    /// Whether anything is drawn.
    pub fn is_visible() -> bool {
        std::io::stderr().is_terminal()
    }

    /// Shows `job` as it is now.
    pub fn show(&mut self, job: &JobInfo) {
        if !Self::is_visible() {
            return;
        }
        if self.bar.is_none() || job.phase != self.phase {
            self.finish();
            let bar = if job.total_bytes > 0 {
                ProgressBar::new(job.total_bytes).with_style(
                    ProgressStyle::with_template(
                        "{msg} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                )
            } else {
                ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                        .expect("valid template"),
                )
            };
            bar.set_message(format!("job {}: {}", job.id, job.phase));
            bar.enable_steady_tick(Duration::from_millis(100));
            self.bar = Some(bar);
            self.phase = job.phase.clone();
        }
        if let Some(bar) = &self.bar {
            bar.set_position(job.done_bytes);
            if job.detail.is_some() {
                bar.set_message(format!("job {}: {}{}", job.id, job.phase, detail_text(job)));
            }
        }
    }

    /// Removes the bar.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for ProgressView {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Runs `request`, a call that waits for a job the VM starts for it (a
/// snapshot, a migration), on a thread of its own, and meanwhile follows
/// that job (found by `target`) with a progress bar on a terminal; the
/// first interrupt cancels the job, a second stops waiting (`None`: the job
/// goes on in the VM).
pub fn follow_request<T: Send + 'static>(
    client: &ApiClient,
    target: &str,
    interrupts: &AtomicUsize,
    request: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let worker = std::thread::spawn(request);
    let mut view = ProgressView::new();
    let mut cancel = CancelOnInterrupt::default();
    let mut job = None;
    while !worker.is_finished() {
        let interrupted = interrupts.load(Ordering::SeqCst) > 0;
        if ProgressView::is_visible() || interrupted {
            if job.is_none() {
                job = client.jobs().ok().and_then(|jobs| {
                    jobs.into_iter()
                        .find(|j| j.state == JobState::Running && j.target == target)
                        .map(|j| j.id)
                });
            }
            if let Some(info) = job.and_then(|id| client.job(id).ok()) {
                view.show(&info);
            }
        }
        if cancel.poll(client, job, interrupts, &mut view) {
            return None;
        }
        std::thread::sleep(POLL);
    }
    view.finish();
    Some(worker.join().expect("the request thread does not panic"))
}

/// A migration's figures from its job's `detail`, for the progress bar.
fn detail_text(job: &JobInfo) -> String {
    let Some(d) = &job.detail else {
        return String::new();
    };
    let f = |k: &str| d.get(k).and_then(serde_json::Value::as_f64);
    let mut parts = Vec::new();
    if let Some(r) = f("round") {
        parts.push(format!("round {r}"));
    }
    if let Some(v) = f("link_mb_per_s") {
        parts.push(format!("link {v:.0} MB/s"));
    }
    if let Some(v) = f("dirty_rate_mb_per_s") {
        parts.push(format!("dirtied {v:.0} MB/s"));
    }
    if let Some(v) = f("expected_downtime_ms") {
        parts.push(format!("pause ~{v:.0} ms"));
    }
    if let Some(v) = f("throttle_percent").filter(|v| *v > 0.0) {
        parts.push(format!("throttled {v:.0}%"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// What came of waiting for a job.
pub enum Waited {
    /// It ended; here is how.
    Ended(Box<JobInfo>),
    /// A second interrupt: the command stops waiting; the job goes on.
    GaveUp(u64),
}

/// Follows job `id` until it ends. The first interrupt asks the VM to
/// cancel it (it ends at its next safe point); a second one stops waiting.
pub fn wait_for(
    client: &ApiClient,
    id: u64,
    interrupts: &AtomicUsize,
) -> Result<Waited, stasis_api::ClientError> {
    let mut view = ProgressView::new();
    let mut cancel = CancelOnInterrupt::default();
    loop {
        let job = client.job(id)?;
        if job.state != JobState::Running {
            return Ok(Waited::Ended(Box::new(job)));
        }
        view.show(&job);
        if cancel.poll(client, Some(id), interrupts, &mut view) {
            return Ok(Waited::GaveUp(id));
        }
        std::thread::sleep(POLL);
    }
}

/// Turns the first interrupt into a cancel request for a job.
#[derive(Default)]
pub struct CancelOnInterrupt {
    sent: bool,
}

impl CancelOnInterrupt {
    /// Sends the cancel once there was an interrupt and the job is known.
    /// Returns true after a second interrupt: stop waiting.
    pub fn poll(
        &mut self,
        client: &ApiClient,
        id: Option<u64>,
        interrupts: &AtomicUsize,
        view: &mut ProgressView,
    ) -> bool {
        let n = interrupts.load(Ordering::SeqCst);
        if n >= 2 {
            view.finish();
            return true;
        }
        if n == 1 && !self.sent {
            if let Some(id) = id {
                self.sent = true;
                view.finish();
                match client.cancel_job(id) {
                    Ok(_) => eprintln!(
                        "stasis: cancelling job {id} at its next safe point (Ctrl-C again to stop waiting)"
                    ),
                    Err(e) => eprintln!("stasis: {e}"),
                }
            }
        }
        false
    }
}

fn progress_text(j: &JobInfo) -> String {
    if j.state != JobState::Running {
        return String::new();
    }
    match j.done_bytes.saturating_mul(100).checked_div(j.total_bytes) {
        Some(pct) => format!(" {}%", pct.min(100)),
        None => String::new(),
    }
}

fn print_job(j: &JobInfo) {
    println!("job:        {}", j.id);
    println!("kind:       {}", j.kind);
    println!("target:     {}", j.target);
    println!("state:      {}", j.state.as_str());
    println!("phase:      {}{}", j.phase, progress_text(j));
    if j.total_bytes > 0 {
        println!(
            "bytes:      {} of {} ({:.0} MB/s)",
            j.done_bytes, j.total_bytes, j.rate_mb_per_s
        );
    }
    println!("elapsed:    {:.1} ms", j.elapsed_ms);
    if j.state == JobState::Running {
        println!(
            "cancel:     {}",
            if j.cancel_requested {
                "requested"
            } else if j.cancellable {
                "possible (`stasis cancel`)"
            } else {
                "no longer possible: the result is being put in place"
            }
        );
    }
    if j.detail.is_some() {
        println!("detail:    {}", detail_text(j));
    }
    if let Some(e) = &j.error {
        println!("error:      {e}");
    }
    if let Some(r) = &j.result {
        println!("result:     {r}");
    }
}

/// `stasis jobs NAME [ID] [--wait] [--json]`.
pub fn jobs(args: &JobsArgs) -> i32 {
    let interrupts = crate::signals::count_interrupts();
    let client = match ApiClient::for_vm(&args.name) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let Some(id) = args.id else {
        let list = match client.jobs() {
            Ok(l) => l,
            Err(e) => return fail(e),
        };
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&list).expect("serializes")
            );
            return 0;
        }
        println!(
            "{:>4}  {:<9}  {:<8}  {:<36}  {:>9}  TARGET",
            "ID", "STATE", "KIND", "PHASE", "ELAPSED"
        );
        for j in list {
            println!(
                "{:>4}  {:<9}  {:<8}  {:<36}  {:>7.0}ms  {}",
                j.id,
                j.state.as_str(),
                j.kind,
                format!("{}{}", j.phase, progress_text(&j)),
                j.elapsed_ms,
                j.target
            );
        }
        return 0;
    };
    let job = if args.wait {
        match wait_for(&client, id, &interrupts) {
            Ok(Waited::Ended(j)) => *j,
            Ok(Waited::GaveUp(id)) => {
                eprintln!("stasis: stopped waiting; job {id} goes on in the VM");
                return EXIT_INTERRUPTED;
            }
            Err(e) => return fail(e),
        }
    } else {
        match client.job(id) {
            Ok(j) => j,
            Err(e) => return fail(e),
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&job).expect("serializes")
        );
    } else {
        print_job(&job);
    }
    match job.state {
        JobState::Running | JobState::Succeeded => 0,
        JobState::Failed | JobState::Cancelled => 1,
    }
}

/// `stasis cancel NAME ID`: asks for the cancel and waits until the job
/// has ended. Exit status 0 if it ended cancelled.
pub fn cancel(args: &CancelArgs) -> i32 {
    let interrupts = crate::signals::count_interrupts();
    let client = match ApiClient::for_vm(&args.name) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if let Err(e) = client.cancel_job(args.id) {
        return fail(e);
    }
    let job = match wait_for(&client, args.id, &interrupts) {
        Ok(Waited::Ended(j)) => *j,
        Ok(Waited::GaveUp(_)) => return EXIT_INTERRUPTED,
        Err(e) => return fail(e),
    };
    match job.state {
        JobState::Cancelled => {
            println!(
                "job {} cancelled during '{}'; nothing at {} changed",
                job.id, job.phase, job.target
            );
            0
        }
        s => fail(format!(
            "job {} ended {} before the cancel took effect{}",
            job.id,
            s.as_str(),
            job.error.map(|e| format!(": {e}")).unwrap_or_default()
        )),
    }
}
