//! Long operations as jobs: each runs on a thread of its own, reports its
//! phase and bytes through a shared [`Progress`], can be asked to cancel,
//! and leaves its result behind for whoever asks later.
//!
//! A VM runs one job at a time: every long operation (snapshot, and later
//! migration and checkpoints) needs the VM to itself for part of its run,
//! so a second one is refused at once with the first one's id rather than
//! queued behind it. Finished jobs are kept, newest first, up to
//! [`KEPT_FINISHED`], so that a client that started one detached can still
//! read its result.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use stasis_snapshot::Progress;

/// How many finished jobs are kept for clients to read.
pub const KEPT_FINISHED: usize = 32;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Still working.
    Running,
    /// Done; `result` holds what it produced.
    Succeeded,
    /// Stopped by an error; `error` says which.
    Failed,
    /// Stopped at a safe point because it was asked to; nothing it was
    /// making was put in place.
    Cancelled,
}

/// Why a job failed, in terms a control API can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The request itself was wrong (a bad target path, say).
    BadRequest,
    /// The VM was not in a state that allows it.
    Conflict,
    /// Stopped at a safe point because it was asked to.
    Cancelled,
    /// Anything else (I/O errors, the VM failing).
    Internal,
}

/// A failed job's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// What went wrong, for a person.
    pub message: String,
}

/// What a job's work returns: a JSON result, or why it failed.
pub type JobResult = Result<serde_json::Value, JobFailure>;

/// One job: what it is, how far it is, and once done, how it ended.
#[derive(Debug)]
pub struct Job {
    id: u64,
    kind: &'static str,
    target: String,
    progress: Arc<Progress>,
    started: Instant,
    started_unix_ms: u64,
    outcome: Mutex<Option<(JobResult, Duration)>>,
    finished: Condvar,
}

/// A job as clients see it (`GET /v1/jobs/ID`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct JobStatus {
    /// The job's id, unique within the VM's life.
    pub id: u64,
    /// What it does: `snapshot`.
    pub kind: &'static str,
    /// What it works on (the snapshot directory).
    pub target: String,
    /// Where it is in its life.
    pub state: JobState,
    /// What it is doing now (for a finished job: what it did last).
    pub phase: &'static str,
    /// Bytes of this phase done.
    pub done_bytes: u64,
    /// Bytes of this phase in all (0 when the phase moves no bytes).
    pub total_bytes: u64,
    /// Of `done_bytes`, those copied ahead of their turn because the guest
    /// was about to write them (a background snapshot's memory copy).
    pub early_bytes: u64,
    /// Bytes per second in this phase so far, in MB/s (0 once finished).
    pub rate_mb_per_s: f64,
    /// Since it started (until it ended, once finished), in ms.
    pub elapsed_ms: f64,
    /// When it started, in ms since the UNIX epoch.
    pub started_unix_ms: u64,
    /// Whether `DELETE` can still stop it.
    pub cancellable: bool,
    /// Whether a cancel was asked for.
    pub cancel_requested: bool,
    /// The result, once it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error, once it failed or was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Figures of the job's own kind (a migration: round, dirty rate,
    /// expected downtime, pages remaining).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl Job {
    /// The job's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits until the job has ended and returns how.
    pub fn wait(&self) -> JobResult {
        let mut outcome = lock(&self.outcome);
        loop {
            if let Some((result, _)) = outcome.as_ref() {
                return result.clone();
            }
            outcome = self
                .finished
                .wait(outcome)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Whether the job has ended.
    pub fn is_finished(&self) -> bool {
        lock(&self.outcome).is_some()
    }

    /// How the job looks now.
    pub fn status(&self) -> JobStatus {
        let p = self.progress.read();
        let outcome = lock(&self.outcome);
        let (state, result, error, elapsed) = match outcome.as_ref() {
            None => (JobState::Running, None, None, self.started.elapsed()),
            Some((Ok(v), d)) => (JobState::Succeeded, Some(v.clone()), None, *d),
            Some((Err(f), d)) if f.kind == FailureKind::Cancelled => {
                (JobState::Cancelled, None, Some(f.message.clone()), *d)
            }
            Some((Err(f), d)) => (JobState::Failed, None, Some(f.message.clone()), *d),
        };
        let secs = p.phase_elapsed.as_secs_f64();
        let rate_mb_per_s = if state == JobState::Running && secs > 0.0 && p.done > 0 {
            p.done as f64 / secs / 1e6
        } else {
            0.0
        };
        JobStatus {
            id: self.id,
            kind: self.kind,
            target: self.target.clone(),
            state,
            phase: p.phase,
            done_bytes: p.done,
            total_bytes: p.total,
            early_bytes: p.early,
            rate_mb_per_s,
            elapsed_ms: elapsed.as_secs_f64() * 1e3,
            started_unix_ms: self.started_unix_ms,
            cancellable: state == JobState::Running && !p.committing,
            cancel_requested: p.cancel_requested,
            result,
            error,
            detail: self.progress.detail(),
        }
    }
}

/// Why a job cannot be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job {id} ({kind} to {target}) is still running; one long operation runs at a time")]
pub struct JobBusy {
    /// The running job.
    pub id: u64,
    /// What it does.
    pub kind: &'static str,
    /// What it works on.
    pub target: String,
}

/// Why a job cannot be cancelled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    /// No job has that id (or it was forgotten).
    #[error("no job {0}")]
    NotFound(u64),
    /// It ended already.
    #[error("job {id} has already ended ({state:?})")]
    Finished {
        /// The job.
        id: u64,
        /// How it ended.
        state: JobState,
    },
    /// It is putting its result in place and will finish.
    #[error("job {id} is {phase}; it can no longer be cancelled and will finish")]
    Committing {
        /// The job.
        id: u64,
        /// What it is doing.
        phase: &'static str,
    },
}

/// The jobs of one VM.
#[derive(Debug, Clone, Default)]
pub struct Jobs {
    inner: Arc<Mutex<Registry>>,
}

#[derive(Debug, Default)]
struct Registry {
    last_id: u64,
    /// Newest first.
    jobs: VecDeque<Arc<Job>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Jobs {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts `work` as a job of `kind` on `target`, on a thread of its own.
    /// `work` gets the job's progress to report into and to check for
    /// cancellation. Refused while another job runs.
    pub fn start(
        &self,
        kind: &'static str,
        target: String,
        work: impl FnOnce(Arc<Progress>) -> JobResult + Send + 'static,
    ) -> Result<Arc<Job>, JobBusy> {
        let mut reg = lock(&self.inner);
        if let Some(running) = reg.jobs.iter().find(|j| !j.is_finished()) {
            return Err(JobBusy {
                id: running.id,
                kind: running.kind,
                target: running.target.clone(),
            });
        }
        reg.last_id += 1;
        let now = Instant::now();
        let job = Arc::new(Job {
            id: reg.last_id,
            kind,
            target,
            progress: Arc::new(Progress::new()),
            started: now,
            started_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            outcome: Mutex::new(None),
            finished: Condvar::new(),
        });
        reg.jobs.push_front(job.clone());
        while reg.jobs.len() > KEPT_FINISHED + 1 {
            reg.jobs.pop_back();
        }
        drop(reg);
        let worker = job.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("job-{}", job.id))
            .spawn(move || {
                stasis_sandbox::enter_or_warn(stasis_sandbox::ThreadKind::Job);
                let result = work(worker.progress.clone());
                let elapsed = worker.started.elapsed();
                *lock(&worker.outcome) = Some((result, elapsed));
                worker.finished.notify_all();
            });
        if let Err(e) = spawned {
            *lock(&job.outcome) = Some((
                Err(JobFailure {
                    kind: FailureKind::Internal,
                    message: format!("cannot start a thread for the job: {e}"),
                }),
                Duration::ZERO,
            ));
        }
        Ok(job)
    }

    /// The job with `id`, if it is known.
    pub fn get(&self, id: u64) -> Option<Arc<Job>> {
        lock(&self.inner).jobs.iter().find(|j| j.id == id).cloned()
    }

    /// Every known job, newest first.
    pub fn list(&self) -> Vec<JobStatus> {
        let jobs: Vec<Arc<Job>> = lock(&self.inner).jobs.iter().cloned().collect();
        jobs.iter().map(|j| j.status()).collect()
    }

    /// Asks the job with `id` to stop at its next safe point. It ends as
    /// [`JobState::Cancelled`] shortly after (wait for it, or poll).
    pub fn cancel(&self, id: u64) -> Result<Arc<Job>, CancelError> {
        let job = self.get(id).ok_or(CancelError::NotFound(id))?;
        let status = job.status();
        if status.state != JobState::Running {
            return Err(CancelError::Finished {
                id,
                state: status.state,
            });
        }
        if !job.progress.request_cancel() {
            return Err(CancelError::Committing {
                id,
                phase: job.progress.read().phase,
            });
        }
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_job_runs_reports_and_keeps_its_result() {
        let jobs = Jobs::new();
        let (go, gate) = mpsc::channel::<()>();
        let job = jobs
            .start("snapshot", "/s".into(), move |p| {
                p.phase("copying memory", 100);
                p.add(40);
                gate.recv().unwrap();
                Ok(serde_json::json!({"path": "/s"}))
            })
            .unwrap();
        while job.status().done_bytes < 40 {
            std::thread::yield_now();
        }
        let s = job.status();
        assert_eq!(
            (s.state, s.phase, s.total_bytes),
            (JobState::Running, "copying memory", 100)
        );
        assert!(s.cancellable);
        let busy = jobs.start("snapshot", "/t".into(), |_| Ok(serde_json::Value::Null));
        assert_eq!(busy.unwrap_err().id, job.id());
        go.send(()).unwrap();
        assert_eq!(job.wait().unwrap()["path"], "/s");
        let s = jobs.get(job.id()).unwrap().status();
        assert_eq!(s.state, JobState::Succeeded);
        assert!(!s.cancellable);
        assert_eq!(
            jobs.cancel(job.id()).unwrap_err(),
            CancelError::Finished {
                id: job.id(),
                state: JobState::Succeeded
            }
        );
        assert_eq!(jobs.cancel(99).unwrap_err(), CancelError::NotFound(99));
    }

    #[test]
    fn cancel_stops_at_a_safe_point_but_not_once_committing() {
        let jobs = Jobs::new();
        let job = jobs
            .start("snapshot", "/s".into(), |p| loop {
                if let Err(e) = p.check() {
                    return Err(JobFailure {
                        kind: FailureKind::Cancelled,
                        message: e.to_string(),
                    });
                }
                std::thread::sleep(Duration::from_millis(1));
            })
            .unwrap();
        jobs.cancel(job.id()).unwrap();
        assert_eq!(job.wait().unwrap_err().kind, FailureKind::Cancelled);
        assert_eq!(job.status().state, JobState::Cancelled);

        let (go, gate) = mpsc::channel::<()>();
        let (entered, committing) = mpsc::channel::<()>();
        let job = jobs
            .start("snapshot", "/s".into(), move |p| {
                p.enter_commit().unwrap();
                p.phase("putting the snapshot in place", 0);
                entered.send(()).unwrap();
                gate.recv().unwrap();
                Ok(serde_json::Value::Null)
            })
            .unwrap();
        committing.recv().unwrap();
        assert!(matches!(
            jobs.cancel(job.id()),
            Err(CancelError::Committing { .. })
        ));
        assert!(!job.status().cancellable);
        go.send(()).unwrap();
        job.wait().unwrap();
    }

    #[test]
    fn finished_jobs_are_kept_up_to_a_bound() {
        let jobs = Jobs::new();
        for _ in 0..KEPT_FINISHED + 5 {
            jobs.start("snapshot", "/s".into(), |_| Ok(serde_json::Value::Null))
                .unwrap()
                .wait()
                .unwrap();
        }
        let list = jobs.list();
        assert_eq!(list.len(), KEPT_FINISHED + 1);
        assert_eq!(list[0].id, (KEPT_FINISHED + 5) as u64);
        assert!(jobs.get(1).is_none());
    }
}
