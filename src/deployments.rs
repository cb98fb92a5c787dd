//! A tier's deployments: several endpoints serving the one model a tier stands for (a
//! provider in two regions, an Azure deployment backed by OpenAI's own API, replicas of a
//! self-hosted model).
//!
//! A request goes to the deployments in the pool's [`Pool::order`] — the listed order
//! (`failover`), taking turns in proportion to their weights (`round_robin`), or the one
//! with the fewest requests in flight for its weight first (`least_busy`) — and on to the next while one is
//! unavailable (429, 5xx, unreachable, too slow; never once any of its answer has been
//! sent). A deployment found unavailable is passed over for `load_balancing.cooldown_secs`
//! (or what its 429's `retry-after` asks) while others are available; when none is, all are
//! tried, soonest back first, so a tier never refuses a request on stale news.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use crate::config::{LoadBalancing, Strategy};
use crate::error::Error;
use crate::gateway::Tier;
use crate::upstream::{Reply, Upstream};

/// The longest a deployment is passed over on a 429's `retry-after`: a provider's daily
/// quota may ask for hours, but by then an operator should hear of it from the metrics.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// One deployment of a tier, by the tier and its place in the tier's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeploymentId {
    pub tier: Tier,
    pub index: usize,
}

/// One endpoint serving a tier's model, with what the pool knows of its health.
pub struct Deployment {
    pub upstream: Upstream,
    /// Milliseconds after the pool's epoch until which it is passed over; 0: available.
    cooling_until_ms: AtomicU64,
    /// The same, as another replica announced it (`shared_state`): kept apart from this
    /// replica's own, so an announcement that ends (an answer) ends here too.
    announced_until_ms: AtomicU64,
    /// Requests it answered (whatever the status, short of being unavailable).
    answered: AtomicU64,
    /// Requests it was unavailable for.
    unavailable: AtomicU64,
    /// Requests sent to it whose answer has not ended yet (a stream until its last byte
    /// or until the client leaves): what `least_busy` compares.
    in_flight: Arc<AtomicUsize>,
}

impl Deployment {
    /// Requests sent to it whose answer has not ended yet.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests it answered and requests it was unavailable for.
    #[must_use]
    pub fn attempts(&self) -> (u64, u64) {
        (
            self.answered.load(Ordering::Relaxed),
            self.unavailable.load(Ordering::Relaxed),
        )
    }
}

/// The deployments of one tier and how requests are spread over them.
pub struct Pool {
    deployments: Vec<Deployment>,
    strategy: Strategy,
    cooldown: Duration,
    /// Round robin's and least busy's next turn.
    turn: AtomicUsize,
    /// Round robin's cycle: each deployment's index as many times as its weight, spread
    /// out (see [`schedule`]).
    schedule: Vec<usize>,
    epoch: Instant,
}

impl Pool {
    /// A pool of `upstreams` (at least one; the first is the primary).
    pub fn new(upstreams: Vec<Upstream>, balancing: LoadBalancing) -> Result<Self, Error> {
        if upstreams.is_empty() {
            return Err(Error::Config("a tier needs at least one model".into()));
        }
        let weights: Vec<u32> = upstreams.iter().map(|upstream| upstream.model.weight.max(1)).collect();
        Ok(Self {
            schedule: schedule(&weights),
            deployments: upstreams
                .into_iter()
                .map(|upstream| Deployment {
                    upstream,
                    cooling_until_ms: AtomicU64::new(0),
                    announced_until_ms: AtomicU64::new(0),
                    answered: AtomicU64::new(0),
                    unavailable: AtomicU64::new(0),
                    in_flight: Arc::new(AtomicUsize::new(0)),
                })
                .collect(),
            strategy: balancing.strategy,
            cooldown: balancing.cooldown(),
            turn: AtomicUsize::new(0),
            epoch: Instant::now(),
        })
    }

    /// The first deployment listed: its name stands for the tier before a request is
    /// answered, and it serves `passthrough` paths (where files and the like are stored).
    #[must_use]
    pub fn primary(&self) -> &Upstream {
        // `new` refuses an empty list.
        &self.deployments[0].upstream
    }

    #[must_use]
    pub fn deployments(&self) -> &[Deployment] {
        &self.deployments
    }

    /// The deployment at `index`, if there is one.
    #[must_use]
    pub fn get(&self, index: usize) -> Option<&Deployment> {
        self.deployments.get(index)
    }

    /// The first deployment called `model`, by configured or provider name.
    #[must_use]
    pub fn find(&self, model: &str) -> Option<usize> {
        self.deployments.iter().position(|deployment| {
            let resolved = &deployment.upstream.model;
            resolved.name == model || resolved.provider_model == model
        })
    }

    /// The order to try the deployments in for one request: the available ones (by the
    /// strategy, with `preferred` first when it is one of them), or when none is, every
    /// deployment, the one back soonest first.
    #[must_use]
    pub fn order(&self, preferred: Option<usize>) -> Vec<usize> {
        if self.deployments.len() == 1 {
            // The usual setup: nothing to choose, and tried even while cooling.
            return vec![0];
        }
        let now = self.now_ms();
        let (mut available, mut cooling): (Vec<usize>, Vec<usize>) =
            (0..self.deployments.len()).partition(|index| self.cooling_until(*index) <= now);
        if available.is_empty() {
            cooling.sort_by_key(|index| self.cooling_until(*index));
            return cooling;
        }
        if available.len() > 1 {
            match self.strategy {
                Strategy::Failover => {}
                Strategy::RoundRobin => {
                    let turn = self.turn.fetch_add(1, Ordering::Relaxed);
                    // The turn's slot, or the next slot whose deployment is available: within
                    // the available ones, each still gets turns in proportion to its weight.
                    let first = (0..self.schedule.len())
                        .map(|step| self.schedule[(turn + step) % self.schedule.len()])
                        .find_map(|index| available.iter().position(|candidate| *candidate == index))
                        .unwrap_or(0);
                    available.rotate_left(first);
                }
                Strategy::LeastBusy => {
                    // Equally busy deployments take turns, so an idle pool still spreads its requests.
                    let start = self.turn.fetch_add(1, Ordering::Relaxed) % available.len();
                    available.rotate_left(start);
                    // One snapshot of the counts: they change while the order is made.
                    let mut loads: Vec<(usize, u64, u64)> = available
                        .iter()
                        .map(|&index| {
                            let deployment = &self.deployments[index];
                            let in_flight = deployment.in_flight() as u64;
                            (index, in_flight, u64::from(deployment.upstream.model.weight))
                        })
                        .collect();
                    // Fewest in flight per unit of weight first, compared exactly (a/w < b/v as a·v < b·w).
                    loads.sort_by(|a, b| (a.1 * b.2).cmp(&(b.1 * a.2)));
                    available = loads.into_iter().map(|(index, _, _)| index).collect();
                }
            }
        }
        if let Some(position) = preferred.and_then(|preferred| available.iter().position(|index| *index == preferred)) {
            let preferred = available.remove(position);
            available.insert(0, preferred);
        }
        available
    }

    /// Counts a request sent to the deployment at `index` until the returned guard is
    /// dropped (see [`hold_until_done`]).
    #[must_use]
    pub fn start(&self, index: usize) -> InFlight {
        let counter = self.deployments.get(index).map_or_else(
            || Arc::new(AtomicUsize::new(0)),
            |deployment| Arc::clone(&deployment.in_flight),
        );
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }

    /// Whether the deployment at `index` is taking requests (not passed over after a failure).
    #[must_use]
    pub fn is_available(&self, index: usize) -> bool {
        self.cooling_until(index) <= self.now_ms()
    }

    /// The deployment at `index` answered: it is available again if it was passed over
    /// (returns whether it was, so a shared cooldown can be ended too).
    pub fn record_answered(&self, index: usize) -> bool {
        let cooling = !self.is_available(index);
        if let Some(deployment) = self.deployments.get(index) {
            deployment.answered.fetch_add(1, Ordering::Relaxed);
            deployment.cooling_until_ms.store(0, Ordering::Relaxed);
            deployment.announced_until_ms.store(0, Ordering::Relaxed);
        }
        cooling
    }

    /// The deployment at `index` was unavailable: passed over for the cooldown, or as long
    /// as `retry_after` (its 429's) asks; returns for how long.
    pub fn record_unavailable(&self, index: usize, retry_after: Option<Duration>) -> Duration {
        let wait = retry_after.map_or(self.cooldown, |asked| asked.min(MAX_RETRY_AFTER));
        let Some(deployment) = self.deployments.get(index) else {
            return wait;
        };
        deployment.unavailable.fetch_add(1, Ordering::Relaxed);
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
            .max(1);
        deployment.cooling_until_ms.store(until, Ordering::Relaxed);
        wait
    }

    /// What the replicas sharing state announce for the deployment at `index`: unavailable
    /// for `remaining` more (passed over here too, this replica's own cooldown untouched),
    /// or, with `None`, nothing any more.
    pub fn take_announced(&self, index: usize, remaining: Option<Duration>) {
        if let Some(deployment) = self.deployments.get(index) {
            let until = remaining.map_or(0, |remaining| {
                self.now_ms()
                    .saturating_add(u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX))
            });
            deployment.announced_until_ms.store(until, Ordering::Relaxed);
        }
    }

    fn cooling_until(&self, index: usize) -> u64 {
        self.deployments.get(index).map_or(0, |deployment| {
            deployment
                .cooling_until_ms
                .load(Ordering::Relaxed)
                .max(deployment.announced_until_ms.load(Ordering::Relaxed))
        })
    }

    fn now_ms(&self) -> u64 {
        // Counted from 1 so that 0 can mean "available" even in a pool's first millisecond.
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }
}

/// A round-robin cycle over deployments of `weights`: deployment `i` takes its `k`-th turn
/// at `(k + ½) / weight` of the way through (stride scheduling), so a heavier one's turns
/// are spread between the others' rather than given in a row; equal weights take turns in
/// the listed order.
fn schedule(weights: &[u32]) -> Vec<usize> {
    let mut turns: Vec<(f64, usize)> = weights
        .iter()
        .enumerate()
        .flat_map(|(index, &weight)| (0..weight).map(move |k| ((f64::from(k) + 0.5) / f64::from(weight), index)))
        .collect();
    turns.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    turns.into_iter().map(|(_, index)| index).collect()
}

/// A request in flight at a deployment, counted until this is dropped.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps `in_flight` counted while `reply` is still on its way: a whole answer has
/// arrived (it ends now), a stream ends with its last byte or when the client leaves.
#[must_use]
pub fn hold_until_done(reply: Reply, in_flight: InFlight) -> Reply {
    match reply {
        whole @ Reply::Complete { .. } => whole,
        Reply::Stream { status, headers, body } => Reply::Stream {
            status,
            headers,
            body: Box::pin(futures_util::StreamExt::map(body, move |chunk| {
                let _counted = &in_flight;
                chunk
            })),
        },
    }
}

/// 0.5 s, 1 s, 2 s, ... before attempt `attempt + 1`, where no `retry-after` says how long:
/// the wait of batch clients (embedding training prompts, `routellm label`) between tries.
#[must_use]
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500 << attempt.saturating_sub(1).min(6))
}

/// How long a 429 asks the client to wait: OpenAI's `retry-after-ms`, else `retry-after`
/// in seconds (an HTTP date is not worth parsing for a cooldown).
#[must_use]
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|value| value.is_finite() && *value >= 0.0)
    };
    number("retry-after-ms")
        .map(|ms| ms / 1e3)
        .or_else(|| number("retry-after"))
        .map(|secs| Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{Endpoint, ResolvedModel};

    fn pool(names: &[&str], strategy: Strategy, cooldown_secs: f64) -> Pool {
        weighted_pool(
            &names.iter().map(|name| (*name, 1)).collect::<Vec<_>>(),
            strategy,
            cooldown_secs,
        )
    }

    fn weighted_pool(names: &[(&str, u32)], strategy: Strategy, cooldown_secs: f64) -> Pool {
        let upstreams = names
            .iter()
            .map(|(name, weight)| {
                Upstream::new(ResolvedModel {
                    name: (*name).to_owned(),
                    provider_model: format!("provider-{name}"),
                    provider: "echo".into(),
                    price: None,
                    weight: *weight,
                    endpoint: Endpoint::Echo,
                })
                .unwrap()
            })
            .collect();
        Pool::new(
            upstreams,
            LoadBalancing {
                strategy,
                cooldown_secs,
            },
        )
        .unwrap()
    }

    #[test]
    fn failover_keeps_the_listed_order_and_passes_over_an_unavailable_deployment_until_its_cooldown_ends() {
        let pool = pool(&["a", "b", "c"], Strategy::Failover, 0.2);
        assert_eq!(pool.order(None), [0, 1, 2]);
        pool.record_unavailable(0, None);
        assert!(!pool.is_available(0));
        assert_eq!(pool.order(None), [1, 2], "a is passed over while b and c are available");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(pool.order(None), [0, 1, 2], "back after the cooldown");
        let (answered, unavailable) = pool.deployments()[0].attempts();
        assert_eq!((answered, unavailable), (0, 1));
    }

    #[test]
    fn an_answer_ends_a_cooldown_and_when_every_deployment_is_cooling_all_are_tried_soonest_back_first() {
        let pool = pool(&["a", "b"], Strategy::Failover, 60.0);
        pool.record_unavailable(0, None);
        pool.record_unavailable(1, Some(Duration::from_secs(5)));
        assert_eq!(pool.order(None), [1, 0], "b is back in 5 s, a in 60 s");
        pool.record_answered(0);
        assert!(pool.is_available(0));
        assert_eq!(pool.order(None), [0]);
    }

    #[test]
    fn another_replicas_cooldown_passes_a_deployment_over_without_shortening_this_ones() {
        let pool = pool(&["a", "b"], Strategy::Failover, 60.0);
        assert_eq!(pool.record_unavailable(0, None), Duration::from_secs(60));
        pool.take_announced(0, Some(Duration::from_millis(100)));
        pool.take_announced(1, Some(Duration::from_millis(100)));
        assert_eq!(pool.order(None), [1, 0], "b is back in 0.1 s, a still in 60 s");
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(
            pool.order(None),
            [1],
            "b's announced cooldown has ended, a's own has not"
        );
        assert_eq!(
            pool.deployments()[1].attempts(),
            (0, 0),
            "not counted as this replica's failure"
        );
        // An announcement withdrawn (the deployment answered elsewhere) ends at once; an
        // answer here ends both kinds of cooldown and says it was cooling.
        pool.take_announced(1, Some(Duration::from_secs(60)));
        assert!(!pool.is_available(1));
        pool.take_announced(1, None);
        assert!(pool.is_available(1));
        assert_eq!(pool.order(None), [1]);
        pool.take_announced(0, Some(Duration::from_secs(90)));
        assert!(pool.record_answered(0));
        assert_eq!(pool.order(None), [0, 1]);
        assert!(!pool.record_answered(0), "not cooling any more");
    }

    #[test]
    fn round_robin_takes_turns_over_the_available_deployments() {
        let pool = pool(&["a", "b", "c"], Strategy::RoundRobin, 60.0);
        let firsts: Vec<usize> = (0..6).map(|_| pool.order(None)[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        assert_eq!(
            pool.order(None),
            [0, 1, 2],
            "each order holds every available deployment"
        );
        pool.record_unavailable(1, None);
        let firsts: Vec<usize> = (0..4).map(|_| pool.order(None)[0]).collect();
        assert!(firsts.iter().all(|first| *first != 1), "{firsts:?}");
        assert!(firsts.contains(&0) && firsts.contains(&2), "{firsts:?}");
    }

    #[test]
    fn weighted_round_robin_gives_each_its_weight_in_turns_spread_over_the_cycle() {
        let pool = weighted_pool(&[("a", 3), ("b", 1), ("c", 2)], Strategy::RoundRobin, 60.0);
        let firsts: Vec<usize> = (0..12).map(|_| pool.order(None)[0]).collect();
        let count = |index: usize| firsts.iter().filter(|first| **first == index).count();
        assert_eq!((count(0), count(1), count(2)), (6, 2, 4), "{firsts:?}");
        // Each six turns hold a whole cycle, and `a` never takes all three of its turns in a row.
        assert_eq!(firsts[..6], firsts[6..], "{firsts:?}");
        assert!(
            !firsts.windows(3).any(|run| run.iter().all(|first| *first == 0)),
            "{firsts:?}"
        );
        // An unavailable deployment's weight leaves the cycle with it.
        pool.record_unavailable(0, None);
        let firsts: Vec<usize> = (0..6).map(|_| pool.order(None)[0]).collect();
        let count = |index: usize| firsts.iter().filter(|first| **first == index).count();
        assert_eq!((count(1), count(2)), (2, 4), "{firsts:?}");
    }

    #[test]
    fn least_busy_goes_to_the_fewest_requests_in_flight_for_the_weight() {
        let pool = weighted_pool(&[("a", 1), ("b", 1), ("c", 2)], Strategy::LeastBusy, 60.0);
        // Idle, they take turns.
        let firsts: Vec<usize> = (0..3).map(|_| pool.order(None)[0]).collect();
        assert_eq!(firsts, [0, 1, 2]);
        let on_a = pool.start(0);
        let on_c = [pool.start(2), pool.start(2)];
        // a: 1 of weight 1, c: 2 of weight 2 (as busy), b: idle.
        for _ in 0..3 {
            assert_eq!(pool.order(None)[0], 1);
        }
        let on_b = [pool.start(1), pool.start(1)];
        // b: 2, a: 1, c: 1 per weight: a and c take turns ahead of b.
        let order = pool.order(None);
        assert_eq!(order[2], 1, "{order:?}");
        drop(on_c);
        assert_eq!(pool.order(None), [2, 0, 1]);
        assert_eq!(pool.deployments()[1].in_flight(), 2);
        drop((on_a, on_b));
        assert!(pool.deployments().iter().all(|deployment| deployment.in_flight() == 0));
        // An unavailable deployment is passed over however idle it is.
        let _busy = pool.start(0);
        pool.record_unavailable(1, None);
        pool.record_unavailable(2, None);
        assert_eq!(pool.order(None), [0]);
    }

    #[tokio::test]
    async fn a_stream_stays_in_flight_until_it_ends_or_is_dropped() {
        let pool = pool(&["a"], Strategy::LeastBusy, 60.0);
        let chunks: Vec<Result<bytes::Bytes, std::convert::Infallible>> = vec![
            Ok(bytes::Bytes::from_static(b"one")),
            Ok(bytes::Bytes::from_static(b"two")),
        ];
        let stream = Reply::Stream {
            status: axum::http::StatusCode::OK,
            headers: HeaderMap::new(),
            body: Box::pin(futures_util::stream::iter(chunks)),
        };
        let Reply::Stream { body, .. } = hold_until_done(stream, pool.start(0)) else {
            panic!("a stream stays a stream");
        };
        assert_eq!(pool.deployments()[0].in_flight(), 1);
        let read: Vec<_> = futures_util::StreamExt::collect(body).await;
        assert_eq!(read.len(), 2);
        assert_eq!(pool.deployments()[0].in_flight(), 0, "done once read and dropped");
        let whole = Reply::Complete {
            status: axum::http::StatusCode::OK,
            headers: HeaderMap::new(),
            body: bytes::Bytes::from_static(b"{}"),
        };
        let _ = hold_until_done(whole, pool.start(0));
        assert_eq!(pool.deployments()[0].in_flight(), 0, "a whole answer has arrived");
    }

    #[test]
    fn a_preferred_deployment_goes_first_only_while_it_is_available() {
        let pool = pool(&["a", "b", "c"], Strategy::Failover, 60.0);
        assert_eq!(pool.order(Some(2)), [2, 0, 1]);
        pool.record_unavailable(2, None);
        assert_eq!(pool.order(Some(2)), [0, 1]);
        assert_eq!(pool.find("b"), Some(1));
        assert_eq!(pool.find("provider-c"), Some(2), "by the provider's name too");
        assert_eq!(pool.find("d"), None);
    }

    #[test]
    fn retry_after_reads_milliseconds_first_then_seconds_and_is_capped() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(*name, value.parse().unwrap());
            }
            headers
        };
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2"), ("retry-after-ms", "1500")])),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")])),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "86400")])),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")])),
            None
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "-3")])), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }
}
