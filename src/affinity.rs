//! Responses conversations stay with the model whose provider stored them.
//!
//! A Responses request may continue an earlier answer by `previous_response_id`. Only the
//! provider account that produced that answer knows the id: routed to the other model (a
//! different endpoint or key), or to another deployment of the same one, the request
//! fails. So when the deployments do not all share storage, the proxy remembers which of
//! them produced each Responses answer it passed on (the latest [`CAPACITY`] ids; an id it
//! never saw — from before a restart, or from another replica — is routed as usual) and
//! sends a continuation to that deployment whatever its score.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::deployments::DeploymentId;
use crate::sse::DataScanner;

/// How many response ids are remembered: roughly 13 MB with OpenAI's ids of about 50 bytes.
pub const CAPACITY: usize = 100_000;

/// The longest id kept: OpenAI's are about 50 characters; anything far longer is not an id
/// worth holding memory for.
const MAX_ID_BYTES: usize = 256;

/// Which model produced each of the latest Responses answers.
#[derive(Debug)]
pub struct ResponseAffinity {
    capacity: usize,
    inner: Mutex<Remembered>,
}

#[derive(Debug, Default)]
struct Remembered {
    deployments: HashMap<Arc<str>, DeploymentId>,
    /// The same ids oldest first, for eviction (shared, not copied).
    order: VecDeque<Arc<str>>,
}

impl ResponseAffinity {
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(Remembered::default()),
        }
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, Remembered> {
        // A map of ids stays consistent whatever a panicking holder was doing.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes that `deployment` produced the answer `id`.
    pub fn remember(&self, id: &str, deployment: DeploymentId) {
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            return;
        }
        let mut remembered = self.remembered();
        let id: Arc<str> = Arc::from(id);
        if remembered.deployments.insert(Arc::clone(&id), deployment).is_some() {
            return;
        }
        remembered.order.push_back(id);
        while remembered.order.len() > self.capacity {
            if let Some(oldest) = remembered.order.pop_front() {
                remembered.deployments.remove(&oldest);
            }
        }
    }

    /// The deployment that produced the answer `id`, if it is remembered.
    #[must_use]
    pub fn deployment_of(&self, id: &str) -> Option<DeploymentId> {
        self.remembered().deployments.get(id).copied()
    }
}

#[derive(Deserialize)]
struct WithId {
    id: String,
}

#[derive(Deserialize)]
struct Event {
    response: WithId,
}

/// The `id` of a complete Responses answer.
#[must_use]
pub fn id_of_answer(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<WithId>(body).ok().map(|answer| answer.id)
}

/// Watches a Responses stream for the first event that carries its response (OpenAI's
/// first, `response.created`), whatever the network's chunk boundaries.
#[derive(Default)]
pub struct StreamIdScanner {
    data: DataScanner,
}

impl StreamIdScanner {
    /// Feeds the next bytes; returns the response's id once an event carrying it has passed.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<String> {
        self.data.feed(bytes, id_of_event)
    }
}

fn id_of_event(payload: &[u8]) -> Option<String> {
    // Only events with a `response` object are parsed; deltas are skipped unparsed.
    if crate::sse::values_of(payload, "response").any(|value| value.starts_with(b"{")) {
        return serde_json::from_slice::<Event>(payload)
            .ok()
            .map(|event| event.response.id);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::gateway::Tier;

    const STRONG: DeploymentId = DeploymentId {
        tier: Tier::Strong,
        index: 0,
    };
    const WEAK_SECOND: DeploymentId = DeploymentId {
        tier: Tier::Weak,
        index: 1,
    };

    #[test]
    fn the_latest_ids_are_remembered_and_the_oldest_forgotten() {
        let affinity = ResponseAffinity::new(2);
        affinity.remember("resp_1", STRONG);
        affinity.remember("resp_2", WEAK_SECOND);
        assert_eq!(affinity.deployment_of("resp_1"), Some(STRONG));
        affinity.remember("resp_3", WEAK_SECOND);
        assert_eq!(affinity.deployment_of("resp_1"), None, "evicted, oldest first");
        assert_eq!(affinity.deployment_of("resp_2"), Some(WEAK_SECOND));
        assert_eq!(affinity.deployment_of("resp_3"), Some(WEAK_SECOND));
        affinity.remember(&"x".repeat(MAX_ID_BYTES + 1), STRONG);
        affinity.remember("", STRONG);
        assert_eq!(
            affinity.deployment_of("resp_2"),
            Some(WEAK_SECOND),
            "nothing evicted for ids not kept"
        );
    }

    #[test]
    fn ids_are_read_from_answers_and_from_a_stream_split_anywhere() {
        assert_eq!(
            id_of_answer(br#"{"id":"resp_abc","object":"response","output":[]}"#).as_deref(),
            Some("resp_abc")
        );
        assert_eq!(id_of_answer(b"not json"), None);
        let stream = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_s1\",\"status\":\"in_progress\"}}\n\n\
                      event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"response\"}\n\n";
        for split in [1, 17, 40, 90, stream.len() - 1] {
            let mut scanner = StreamIdScanner::default();
            let first = scanner.feed(&stream.as_bytes()[..split]);
            let second = scanner.feed(&stream.as_bytes()[split..]);
            assert_eq!(first.or(second).as_deref(), Some("resp_s1"), "split at {split}");
        }
        let mut deltas_only = StreamIdScanner::default();
        assert_eq!(
            deltas_only
                .feed(b"data: {\"type\":\"response.output_text.delta\",\"delta\":\"{\\\"response\\\": 1}\"}\n\n"),
            None
        );
    }
}
