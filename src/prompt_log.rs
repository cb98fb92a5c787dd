//! The opt-in prompt log (`prompt_log:` in the config): a sample of what routers scored on
//! live traffic, one JSON line per routed request, in the format `routellm calibrate
//! --prompts` and `routellm score` read.
//!
//! A threshold calibrated on someone else's prompts sends a different share of *your*
//! traffic to the strong model; this log is how a deployment recalibrates on its own. Lines
//! are written by one dedicated thread behind a bounded queue, so a slow disk never holds up
//! a request: when the queue is full the entry is dropped and counted, not waited for.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::Deserialize;
use serde_json::json;

use crate::error::Error;
use crate::gateway::RouteDecision;
use crate::request::{Api, ModelRequest};
use crate::rng::AtomicSplitMix;

/// Entries waiting for the writer at most; beyond this they are dropped (and counted).
const QUEUE_CAPACITY: usize = 4096;
/// Rotate once the file passes this size, by default (100 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 100 * 1024 * 1024;

/// `prompt_log:` in the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptLogConfig {
    /// The JSONL file entries are appended to (created, owner-readable only, if missing).
    pub path: PathBuf,
    /// The share of routed requests logged, in (0, 1].
    #[serde(default = "one")]
    pub sample_rate: f64,
    /// When the file passes this size it becomes `<path>.1` (replacing an older one) and a
    /// new file is started, so the log never holds more than about twice this.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Also keep each Chat Completions request's whole `messages` array (system prompt,
    /// earlier turns and answers) as `conversation`, so `routellm label` has the models
    /// answer the request as it was made, not its last user turn alone. Off by default: it
    /// keeps more of the users' data, and the log grows faster.
    #[serde(default)]
    pub conversations: bool,
}

/// A conversation longer than this (say, one carrying images inline) is logged without
/// its `conversation`, so one request cannot swell the log or hold up its writer.
pub const MAX_CONVERSATION_BYTES: usize = 256 * 1024;

fn one() -> f64 {
    1.0
}

fn default_max_bytes() -> u64 {
    DEFAULT_MAX_BYTES
}

impl PromptLogConfig {
    /// Logs every routed request to `path`, rotating at the default size.
    #[must_use]
    pub fn at(path: PathBuf) -> Self {
        Self {
            path,
            sample_rate: 1.0,
            max_bytes: DEFAULT_MAX_BYTES,
            conversations: false,
        }
    }

    /// Checks the values a file may get wrong.
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return Err(Error::Config(format!(
                "prompt_log.sample_rate = {} is outside (0, 1]",
                self.sample_rate
            )));
        }
        if self.max_bytes == 0 {
            return Err(Error::Config("prompt_log.max_bytes must be positive".into()));
        }
        if self.path.as_os_str().is_empty() {
            return Err(Error::Config("prompt_log.path is empty".into()));
        }
        Ok(())
    }
}

/// Counts shared by the log and its writer thread.
#[derive(Default)]
struct Counts {
    written: AtomicU64,
    dropped: AtomicU64,
}

/// An open prompt log: [`PromptLog::record`] queues, a thread writes.
pub struct PromptLog {
    sender: Mutex<Option<SyncSender<Vec<u8>>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    counts: Arc<Counts>,
    sample_rate: f64,
    conversations: bool,
    /// Draws for sampling, lock-free.
    draws: AtomicSplitMix,
}

impl PromptLog {
    /// Opens (or creates) the file now, so a path that cannot be written fails start-up,
    /// and starts the writer thread.
    pub fn open(config: &PromptLogConfig) -> Result<Self, Error> {
        config.validate()?;
        let file = open_append(&config.path)?;
        let (sender, receiver) = sync_channel(QUEUE_CAPACITY);
        let counts = Arc::new(Counts::default());
        let writer = Writer {
            path: config.path.clone(),
            max_bytes: config.max_bytes,
            size: file.metadata().map_or(0, |metadata| metadata.len()),
            file: BufWriter::new(file),
            counts: Arc::clone(&counts),
        };
        let handle = std::thread::Builder::new()
            .name("routellm-prompt-log".into())
            .spawn(move || writer.run(&receiver))
            .map_err(|error| Error::io("the prompt log's writer thread", error))?;
        Ok(Self {
            sender: Mutex::new(Some(sender)),
            writer: Mutex::new(Some(handle)),
            counts,
            sample_rate: config.sample_rate,
            conversations: config.conversations,
            draws: AtomicSplitMix::new(crate::rng::fnv1a(
                crate::rng::FNV_OFFSET,
                config.path.as_os_str().as_encoded_bytes(),
            )),
        })
    }

    /// Whether the next routed request is one of the sample.
    pub fn sampled(&self) -> bool {
        self.sample_rate >= 1.0 || self.draws.next_unit() < self.sample_rate
    }

    /// Queues one entry for `request`: the user turns `decision`'s router scored (oldest
    /// first), as a `messages` array, with the decision, the `model` the client asked for
    /// (an alias or a `router-…` name) and the name of the client's API key (when keys are
    /// configured) beside them; and `conversation`, a Chat Completions request's `messages`
    /// as sent, when the log keeps conversations and it is at most [`MAX_CONVERSATION_BYTES`].
    pub fn record(
        &self,
        request: &ModelRequest<'_>,
        key: Option<&str>,
        decision: &RouteDecision,
        scored_turns: &[String],
    ) {
        let api = request.api();
        let messages: Vec<_> = scored_turns
            .iter()
            .map(|text| json!({"role": "user", "content": text}))
            .collect();
        let timestamp = crate::unix_now();
        let mut entry = json!({
            "timestamp": timestamp,
            "api": api.path(),
            "requested_model": request.model(),
            "key": key,
            "router": decision.router,
            "threshold": decision.threshold,
            // NaN when the router failed and on_router_error chose: JSON has no NaN.
            "win_rate": (!decision.fallback).then_some(decision.win_rate),
            "tier": decision.tier.as_str(),
            "model": decision.model,
            "messages": messages,
        });
        let kept = (self.conversations && api == Api::ChatCompletions)
            .then(|| request.raw_field("messages"))
            .flatten()
            .filter(|raw| raw.get().len() <= MAX_CONVERSATION_BYTES)
            .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).ok())
            // A lone message is the prompt already in `messages`: nothing to add.
            .filter(|messages| messages.as_array().is_some_and(|messages| messages.len() > 1));
        if let Some(conversation) = kept {
            entry["conversation"] = conversation;
        }
        let mut line = entry.to_string().into_bytes();
        line.push(b'\n');
        let sent = match &*self.sender.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
            Some(sender) => match sender.try_send(line) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
            None => false,
        };
        if !sent {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Entries written to the file so far.
    #[must_use]
    pub fn written(&self) -> u64 {
        self.counts.written.load(Ordering::Relaxed)
    }

    /// Entries dropped so far: the queue was full or the file could not be written.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed)
    }

    /// Writes out everything queued and stops the writer; later entries are dropped.
    /// Dropping the log does the same.
    pub fn close(&self) {
        drop(
            self.sender
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            // The writer only ends when the queue is closed and drained; a panic there has
            // already been reported by the panic hook.
            let _ = writer.join();
        }
    }
}

impl Drop for PromptLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn open_append(path: &Path) -> Result<File, Error> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    // Prompts are user data: readable by the service's own user only.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .map_err(|error| Error::io(format!("prompt log {}", path.display()), error))
}

struct Writer {
    path: PathBuf,
    max_bytes: u64,
    size: u64,
    file: BufWriter<File>,
    counts: Arc<Counts>,
}

impl Writer {
    fn run(mut self, receiver: &Receiver<Vec<u8>>) {
        // Block for the next entry, write whatever else is queued, then flush: a burst is
        // one write to the file, and nothing waits in the buffer while the queue is idle.
        while let Ok(first) = receiver.recv() {
            self.write(&first);
            while let Ok(next) = receiver.try_recv() {
                self.write(&next);
            }
            if let Err(error) = self.file.flush() {
                tracing::warn!(path = %self.path.display(), error = %error, "could not write the prompt log");
            }
        }
    }

    fn write(&mut self, line: &[u8]) {
        if let Err(error) = self.file.write_all(line) {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(path = %self.path.display(), error = %error, "could not write the prompt log");
            return;
        }
        self.counts.written.fetch_add(1, Ordering::Relaxed);
        self.size += line.len() as u64;
        if self.size >= self.max_bytes
            && let Err(error) = self.rotate()
        {
            tracing::warn!(path = %self.path.display(), error = %error, "could not rotate the prompt log");
        }
    }

    /// Moves the full file to `<path>.1` and starts an empty one.
    fn rotate(&mut self) -> Result<(), Error> {
        self.file
            .flush()
            .map_err(|error| Error::io(self.path.display().to_string(), error))?;
        let mut rotated = self.path.clone().into_os_string();
        rotated.push(".1");
        std::fs::rename(&self.path, &rotated).map_err(|error| Error::io(self.path.display().to_string(), error))?;
        self.file = BufWriter::new(open_append(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::Tier;

    fn decision(fallback: bool) -> RouteDecision {
        RouteDecision {
            router: "mf".into(),
            threshold: 0.3,
            win_rate: if fallback { f64::NAN } else { 0.42 },
            tier: Tier::Strong,
            model: "openai/gpt-4o".into(),
            fallback,
            upstream_fallback: false,
            pinned: false,
        }
    }

    /// A request body for `model` with one more field, its JSON as given.
    fn body(model: &str, field: &str, json: &str) -> Vec<u8> {
        format!(r#"{{"model":"{model}","{field}":{json}}}"#).into_bytes()
    }

    /// A log path in a folder of its own, removed with the returned guard.
    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompts.jsonl");
        (dir, path)
    }

    #[test]
    fn entries_are_what_calibrate_reads_and_carry_the_decision() {
        let (_scratch, path) = scratch();
        let log = PromptLog::open(&PromptLogConfig::at(path.clone())).unwrap();
        let chat = body("auto", "messages", r#"[{"role":"user","content":"then this"}]"#);
        log.record(
            &ModelRequest::parse(Api::ChatCompletions, &chat).unwrap(),
            Some("team-a"),
            &decision(false),
            &["first turn".into(), "then this".into()],
        );
        let completion = body("router-mf-0.5", "prompt", r#""once upon a time""#);
        log.record(
            &ModelRequest::parse(Api::Completions, &completion).unwrap(),
            None,
            &decision(true),
            &["once upon a time".into()],
        );
        log.close();
        assert_eq!((log.written(), log.dropped()), (2, 0));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(crate::prompts::parse(&text).unwrap(), ["then this", "once upon a time"]);
        assert_eq!(
            crate::prompts::parse_turns(&text, 8).unwrap(),
            [vec!["first turn", "then this"], vec!["once upon a time"]]
        );
        let entries: Vec<serde_json::Value> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(entries[0]["router"], "mf");
        assert_eq!(entries[0]["requested_model"], "auto");
        assert_eq!(entries[1]["requested_model"], "router-mf-0.5");
        assert_eq!(entries[0]["key"], "team-a");
        assert!(entries[1]["key"].is_null(), "no keys configured");
        assert_eq!(entries[0]["win_rate"], 0.42);
        assert_eq!(entries[0]["tier"], "strong");
        assert_eq!(entries[0]["api"], "chat/completions");
        assert!(entries[1]["win_rate"].is_null(), "a fallback has no score");
        log.record(
            &ModelRequest::parse(Api::ChatCompletions, &chat).unwrap(),
            None,
            &decision(false),
            &["after close".into()],
        );
        assert_eq!(log.dropped(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "only the owner may read prompts: {mode:o}");
        }
    }

    #[test]
    fn conversations_are_kept_only_when_asked_for_and_not_too_large() {
        let conversation = r#"[{"role":"system","content":"Be brief."},{"role":"user","content":"hi"}]"#;
        let chat = body("auto", "messages", conversation);
        let huge = body(
            "auto",
            "messages",
            &format!(
                r#"[{{"role":"user","content":"{}"}}]"#,
                "x".repeat(MAX_CONVERSATION_BYTES)
            ),
        );
        let lone = body("auto", "messages", r#"[{"role":"user","content":"hi"}]"#);
        let completion = body("auto", "prompt", r#""once""#);
        let logged = |conversations: bool| {
            let (_scratch, path) = scratch();
            let log = PromptLog::open(&PromptLogConfig {
                conversations,
                ..PromptLogConfig::at(path.clone())
            })
            .unwrap();
            for (api, sent) in [
                (Api::ChatCompletions, &chat),
                (Api::ChatCompletions, &huge),
                (Api::ChatCompletions, &lone),
                (Api::Completions, &completion),
            ] {
                log.record(
                    &ModelRequest::parse(api, sent).unwrap(),
                    None,
                    &decision(false),
                    &["hi".into()],
                );
            }
            log.close();
            let text = std::fs::read_to_string(&path).unwrap();
            text.lines()
                .map(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .unwrap()
                        .get("conversation")
                        .cloned()
                })
                .collect::<Vec<_>>()
        };
        let expected: serde_json::Value = serde_json::from_str(conversation).unwrap();
        assert_eq!(logged(true), [Some(expected), None, None, None]);
        assert_eq!(logged(false), [None, None, None, None]);
    }

    #[test]
    fn a_full_file_is_rotated_to_dot_one() {
        let (_scratch, path) = scratch();
        let config = PromptLogConfig {
            max_bytes: 600,
            ..PromptLogConfig::at(path.clone())
        };
        let log = PromptLog::open(&config).unwrap();
        for turn in 0..10 {
            let sent = body("auto", "input", &format!("\"prompt number {turn}\""));
            log.record(
                &ModelRequest::parse(Api::Responses, &sent).unwrap(),
                None,
                &decision(false),
                &[format!("prompt number {turn}")],
            );
        }
        log.close();
        let current = crate::prompts::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let rotated = crate::prompts::parse(&std::fs::read_to_string(path.with_extension("jsonl.1")).unwrap()).unwrap();
        assert!(!rotated.is_empty() && rotated.len() < 10, "{rotated:?}");
        assert_eq!(current.last().map(String::as_str), Some("prompt number 9"));
        // Rotation keeps one older file: what is left of the ten is the newest, in order.
        let kept: Vec<_> = rotated.iter().chain(&current).collect();
        assert!(kept.windows(2).all(|pair| pair[0] < pair[1]), "{kept:?}");
        assert!(std::fs::metadata(&path).unwrap().len() < 600);
    }

    #[test]
    fn sampling_keeps_about_the_configured_share() {
        let (_scratch, path) = scratch();
        let log = PromptLog::open(&PromptLogConfig {
            sample_rate: 0.25,
            ..PromptLogConfig::at(path)
        })
        .unwrap();
        let kept = (0..4000).filter(|_| log.sampled()).count();
        assert!((850..1150).contains(&kept), "{kept}");
    }

    #[test]
    fn bad_settings_and_unwritable_paths_fail_at_start() {
        let (_scratch, path) = scratch();
        for sample_rate in [0.0, 1.5, f64::NAN] {
            let config = PromptLogConfig {
                sample_rate,
                ..PromptLogConfig::at(path.clone())
            };
            assert!(PromptLog::open(&config).is_err(), "{sample_rate}");
        }
        let unwritable = PromptLogConfig::at(path.join("no-such-dir/prompts.jsonl"));
        let error = PromptLog::open(&unwritable).err().unwrap();
        assert!(error.to_string().contains("prompt log"), "{error}");
    }
}
