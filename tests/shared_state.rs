//! Client keys' limits and budgets shared through a real Redis (`shared_state`): two proxies
//! in front of the same mock models stand in for two replicas. Needs `redis-server` on the
//! PATH (Debian's `redis-server` package; `.ci/run` installs it) or named by
//! `ROUTELLM_TEST_REDIS_SERVER`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{MockUpstream, Proxy, openai_error};

/// A `redis-server` of the test's own on a free loopback port, killed when dropped; it
/// keeps nothing on disk.
struct Redis {
    port: u16,
    process: Child,
    /// With TLS: the CA that signed its certificate.
    tls_ca: Option<PathBuf>,
    /// Its certificates, when it has a folder of its own; removed after the process ends.
    _folder: Option<tempfile::TempDir>,
}

/// A CA of the test's own and a certificate it signed for 127.0.0.1, made in `folder` with
/// the `openssl` command: `ca.crt`, `server.crt`, `server.key`.
fn make_certificates(folder: &Path) {
    std::fs::write(folder.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    for args in [
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 -subj /CN=routellm-test-ca",
        "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1",
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 1 -extfile ext.cnf",
    ] {
        let made = Command::new("openssl")
            .args(args.split(' '))
            .current_dir(folder)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|error| panic!("openssl {args}: {error}; the TLS tests need the openssl command"));
        assert!(made.success(), "openssl {args}");
    }
}

/// What makes a `redis-server` speak TLS only, on `port`, with the certificates in `folder`.
fn tls_args(port: u16, folder: &Path) -> Vec<String> {
    let file = |name: &str| folder.join(name).display().to_string();
    [
        "--port",
        "0",
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &file("server.crt"),
        "--tls-key-file",
        &file("server.key"),
        "--tls-ca-cert-file",
        &file("ca.crt"),
        "--tls-auth-clients",
        "no",
    ]
    .map(str::to_owned)
    .to_vec()
}

impl Redis {
    async fn start() -> Self {
        let port = common::closed_port().await;
        Self::start_on(port).await
    }

    async fn start_on(port: u16) -> Self {
        Self::spawn(port, &["--port", &port.to_string()], None, None).await
    }

    /// A Redis that speaks TLS only, with a certificate for 127.0.0.1 from a CA of its own
    /// (made with the `openssl` command).
    async fn start_tls() -> Self {
        let port = common::closed_port().await;
        let folder = tempfile::tempdir().unwrap();
        make_certificates(folder.path());
        let args = tls_args(port, folder.path());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::spawn(port, &args, Some(folder.path().join("ca.crt")), Some(folder)).await
    }

    async fn spawn(port: u16, listen: &[&str], tls_ca: Option<PathBuf>, folder: Option<tempfile::TempDir>) -> Self {
        let program = std::env::var("ROUTELLM_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let process = Command::new(&program)
            .args(listen)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "starting `{program}` ({error}): these tests need a Redis server; install Debian's \
                     `redis-server` package or set ROUTELLM_TEST_REDIS_SERVER"
                )
            });
        let redis = Self {
            port,
            process,
            tls_ca,
            _folder: folder,
        };
        let started = Instant::now();
        while redis.query::<String>(&redis::cmd("PING")).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start on {port}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        redis
    }

    fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> redis::RedisResult<T> {
        let client = match &self.tls_ca {
            Some(ca) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).unwrap()),
                },
            )?,
            None => redis::Client::open(self.url())?,
        };
        let mut connection = client.get_multiplexed_async_connection().await?;
        command.query_async(&mut connection).await
    }

    /// What a key has spent in `period` as Redis holds it, once it holds at least `least`
    /// (charges are sent after the answer, in a task of their own).
    async fn spent_at_least(&self, key: &str, period: &str, least: f64) -> f64 {
        let started = Instant::now();
        loop {
            let spent: Option<f64> = self
                .query(redis::cmd("GET").arg(format!("routellm:{{{key}}}:spend:{period}")))
                .await
                .unwrap();
            match spent {
                Some(spent) if spent >= least => return spent,
                _ if started.elapsed() > Duration::from_secs(5) => panic!("spend of {key} stayed at {spent:?}"),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// How a Redis Cluster of three primaries splits the 16,384 slots.
const SLOT_RANGES: [(u16, u16); 3] = [(0, 5460), (5461, 10922), (10923, 16383)];

/// A Redis Cluster of the test's own: three primaries on free loopback ports, formed with
/// `CLUSTER ADDSLOTSRANGE` and `CLUSTER MEET`, killed when dropped. With TLS, clients and
/// the cluster bus speak TLS only, with certificates from a CA of the test's own.
struct RedisCluster {
    nodes: Vec<Redis>,
    /// Each node's `nodes.conf` (and the certificates); dropped after the nodes.
    folder: tempfile::TempDir,
    tls: bool,
}

impl RedisCluster {
    async fn start(tls: bool) -> Self {
        Self::start_with(tls, None).await
    }

    /// With the first node (the one the URL names) on `seed_port` if given.
    async fn start_with(tls: bool, seed_port: Option<u16>) -> Self {
        let folder = tempfile::tempdir().unwrap();
        if tls {
            make_certificates(folder.path());
        }
        let mut nodes = Vec::new();
        let mut bus_ports = Vec::new();
        for index in 0..SLOT_RANGES.len() {
            let port = match seed_port {
                Some(port) if index == 0 => port,
                _ => common::closed_port().await,
            };
            // Named, not the default port + 10000, which can lie past 65535.
            let bus_port = common::closed_port().await;
            let nodes_file = folder.path().join(format!("nodes-{port}.conf"));
            let mut args = if tls {
                let mut args = tls_args(port, folder.path());
                args.extend(["--tls-cluster".to_owned(), "yes".to_owned()]);
                args
            } else {
                vec!["--port".to_owned(), port.to_string()]
            };
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus_port.to_string(),
                    "--cluster-config-file",
                    nodes_file.to_str().unwrap(),
                ]
                .map(str::to_owned),
            );
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let ca = tls.then(|| folder.path().join("ca.crt"));
            nodes.push(Redis::spawn(port, &args, ca, None).await);
            bus_ports.push(bus_port);
        }
        for (node, (first, last)) in nodes.iter().zip(SLOT_RANGES) {
            let assign = redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(first).arg(last).clone();
            node.query::<()>(&assign).await.unwrap();
        }
        for (node, bus_port) in nodes.iter().zip(&bus_ports).skip(1) {
            let meet = redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(node.port)
                .arg(bus_port)
                .clone();
            nodes[0].query::<()>(&meet).await.unwrap();
        }
        let started = Instant::now();
        for node in &nodes {
            while !node
                .query::<String>(redis::cmd("CLUSTER").arg("INFO"))
                .await
                .unwrap()
                .contains("cluster_state:ok")
            {
                assert!(started.elapsed() < Duration::from_secs(20), "the cluster did not form");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Self { nodes, folder, tls }
    }

    /// The `shared_state` section that reaches this cluster.
    fn shared_state(&self) -> routellm::shared_state::SharedStateConfig {
        cluster_config(self.url(), self.tls.then(|| self.folder.path().join("ca.crt")))
    }

    /// The URL the replicas are given: the first node's, from which they find the others.
    fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// Which node holds `key`'s slot.
    async fn holder(&self, key: &str) -> usize {
        let slot: u16 = self.nodes[0]
            .query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await
            .unwrap();
        SLOT_RANGES
            .iter()
            .position(|&(first, last)| (first..=last).contains(&slot))
            .unwrap()
    }

    /// The first `n` whose key, as `key_of(n)` makes it, lies on the node at `index`.
    async fn first_on(&self, index: usize, key_of: impl Fn(usize) -> String) -> usize {
        let mut n = 0;
        while self.holder(&key_of(n)).await != index {
            n += 1;
        }
        n
    }
}

/// A validated `shared_state` section for the cluster node at `url`.
fn cluster_config(url: String, tls_ca_file: Option<PathBuf>) -> routellm::shared_state::SharedStateConfig {
    routellm::shared_state::SharedStateConfig {
        cluster: true,
        tls_ca_file,
        ..routellm::shared_state::SharedStateConfig::at(routellm::config::Secret::new(url))
    }
    .validate(&|_| None)
    .unwrap()
}

/// Two replicas: proxies in front of the same two mock models, configured alike by `yaml`.
async fn replicas(yaml: &str) -> (MockUpstream, Proxy, Proxy) {
    let (strong, weak) = (MockUpstream::start("strong").await, MockUpstream::start("weak").await);
    let config = format!(
        "strong_model: {{name: openai/strong-model, base_url: '{}', api_key: sk-strong, \
         price_per_million_tokens: {{input: 1000, output: 1000}}}}\n\
         weak_model: {{name: together_ai/weak-model, base_url: '{}', api_key: sk-weak, \
         price_per_million_tokens: {{input: 1, output: 1}}}}\n{yaml}",
        strong.base_url(),
        weak.base_url()
    );
    let first = Proxy::start_config(&config).await;
    let second = Proxy::start_config(&config).await;
    (strong, first, second)
}

/// A Redis of the test's own and two replicas sharing it, configured by `yaml` besides.
async fn sharing_replicas(yaml: &str) -> (Redis, MockUpstream, Proxy, Proxy) {
    let redis = Redis::start().await;
    let (strong, first, second) = replicas(&format!("shared_state: {{redis_url: '{}'}}\n{yaml}", redis.url())).await;
    (redis, strong, first, second)
}

async fn post_as(proxy: &Proxy, key: &str) -> reqwest::Response {
    proxy
        .client
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(r#"{"model":"router-random-0","messages":[{"role":"user","content":"Hello"}]}"#)
        .send()
        .await
        .unwrap()
}

fn metric(text: &str, series: &str) -> f64 {
    common::metric(text, series)
}

/// Today's label of a daily budget, as the proxy names its spend in Redis.
fn today() -> String {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    routellm::budgets::Period::Day.at(unix).0
}

#[tokio::test]
async fn two_replicas_admit_one_keys_requests_from_one_bucket() {
    let (redis, strong, first, second) =
        sharing_replicas("api_keys: [{key: k-team, name: team, requests_per_minute: 3}, k-open]\n").await;
    // One bucket of three between them: 2, 1, 0 left, whichever replica is asked.
    for (proxy, remaining) in [(&first, "2"), (&second, "1"), (&first, "0")] {
        let response = post_as(proxy, "k-team").await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-ratelimit-limit-requests"], "3");
        assert_eq!(response.headers()["x-ratelimit-remaining-requests"], remaining);
    }
    for proxy in [&second, &first] {
        let refused = post_as(proxy, "k-team").await;
        let wait_ms: u64 = refused.headers()["retry-after-ms"].to_str().unwrap().parse().unwrap();
        assert!(
            (15_000..=20_000).contains(&wait_ms),
            "one request refills in 20 s: {wait_ms}"
        );
        let error = openai_error(refused, 429).await;
        assert_eq!(error["type"], "requests");
        assert_eq!(error["code"], "rate_limit_exceeded");
        assert!(error["message"].as_str().unwrap().contains("(RPM): Limit 3"), "{error}");
    }
    assert_eq!(strong.received().len(), 3, "refused requests reach no model");
    // A key without limits asks nothing of Redis and is not held back.
    assert_eq!(post_as(&second, "k-open").await.status(), 200);

    let (first_metrics, second_metrics) = (first.metrics().await, second.metrics().await);
    assert_eq!(
        metric(&first_metrics, r#"routellm_key_requests_total{key="team"}"#),
        2.0
    );
    assert_eq!(
        metric(&second_metrics, r#"routellm_key_requests_total{key="team"}"#),
        1.0
    );
    for text in [&first_metrics, &second_metrics] {
        assert_eq!(
            metric(text, r#"routellm_key_rate_limited_total{key="team",limit="requests"}"#),
            1.0
        );
        assert_eq!(metric(text, "routellm_shared_state_up"), 1.0);
        assert_eq!(metric(text, "routellm_shared_state_errors_total"), 0.0);
        assert_eq!(metric(text, "routellm_shared_state_local_decisions_total"), 0.0);
    }
    // Redis holds the bucket under the key's name (never the key), and lets it expire.
    let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg("*")).await.unwrap();
    assert_eq!(keys, ["routellm:{team}:requests"]);
    let ttl_ms: i64 = redis.query(redis::cmd("PTTL").arg(&keys[0])).await.unwrap();
    assert!((55_000..=61_000).contains(&ttl_ms), "expires once refilled: {ttl_ms}");
}

#[tokio::test]
async fn tokens_and_spend_charged_on_one_replica_hold_back_the_other() {
    // The mock's answer reports 4 tokens at 1000 per million: 0.004 each.
    let (redis, strong, first, second) = sharing_replicas(
        "api_keys: [{key: k-tokens, name: tokens, tokens_per_minute: 6}, \
         {key: k-budget, name: budget, budget: {limit: 0.006, per: day}}]\n",
    )
    .await;
    let period = today();

    // Tokens: 4 of 6 on the first replica, 4 more on the second (admitted with 2 left),
    // then -2: the first refuses, though it has charged only 4 itself.
    assert_eq!(post_as(&first, "k-tokens").await.status(), 200);
    let bucket = "routellm:{tokens}:tokens";
    let started = Instant::now();
    while redis
        .query::<Option<f64>>(redis::cmd("HGET").arg(bucket).arg("level"))
        .await
        .unwrap()
        .is_none_or(|level| level > 2.5)
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the charge never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second_answer = post_as(&second, "k-tokens").await;
    assert_eq!(second_answer.headers()["x-ratelimit-remaining-tokens"], "2");
    second_answer.text().await.unwrap();
    let started = Instant::now();
    let refused = loop {
        let response = post_as(&first, "k-tokens").await;
        if response.status() == 429 {
            break response;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the second charge never held the first back"
        );
        response.text().await.unwrap();
    };
    let error = openai_error(refused, 429).await;
    assert_eq!(error["type"], "tokens");
    assert!(error["message"].as_str().unwrap().contains("(TPM): Limit 6"), "{error}");

    // Budget: 0.004 spent through the first replica, 0.008 through the second, which then
    // refuses; so does the first, which has spent only 0.004 itself.
    let calls = strong.received().len();
    assert_eq!(post_as(&first, "k-budget").await.status(), 200);
    redis.spent_at_least("budget", &period, 0.004).await;
    assert_eq!(post_as(&second, "k-budget").await.status(), 200);
    let spent = redis.spent_at_least("budget", &period, 0.008).await;
    assert!((spent - 0.008).abs() < 1e-9, "{spent}");
    for proxy in [&first, &second] {
        let error = openai_error(post_as(proxy, "k-budget").await, 429).await;
        assert_eq!(error["code"], "insufficient_quota");
        assert!(
            error["message"].as_str().unwrap().contains("has spent 0.0080"),
            "{error}"
        );
    }
    assert_eq!(strong.received().len(), calls + 2);
    // Each replica's /metrics shows the shared spend, as it last heard it from Redis.
    for proxy in [&first, &second] {
        let text = proxy.metrics().await;
        let shown = metric(
            &text,
            &format!(r#"routellm_key_spend{{key="budget",period="{period}"}}"#),
        );
        assert!((shown - 0.008).abs() < 1e-9, "{shown}");
    }
    let ttl: i64 = redis
        .query(redis::cmd("TTL").arg(format!("routellm:{{budget}}:spend:{period}")))
        .await
        .unwrap();
    assert!(
        (86_400..=2 * 86_400).contains(&ttl),
        "kept a day past the period's end: {ttl}"
    );
}

#[tokio::test]
async fn while_redis_is_down_each_replica_decides_and_its_charges_reach_redis_later() {
    let mut redis = Redis::start().await;
    let port = redis.port;
    let (_strong, first, _second) = replicas(&format!(
        "shared_state: {{redis_url: '{}', timeout_ms: 200}}\n\
         api_keys: [{{key: k-team, name: team, requests_per_minute: 100, budget: {{limit: 1, per: day}}}}]\n",
        redis.url()
    ))
    .await;
    let period = today();
    assert_eq!(post_as(&first, "k-team").await.status(), 200);
    redis.spent_at_least("team", &period, 0.004).await;

    let _ = redis.process.kill();
    let _ = redis.process.wait();
    // Admitted by the replica's own bucket, which goes on from what Redis last said.
    let response = post_as(&first, "k-team").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "98");
    response.text().await.unwrap();
    let text = first.metrics().await;
    assert_eq!(metric(&text, "routellm_shared_state_up"), 0.0);
    assert!(metric(&text, "routellm_shared_state_errors_total") >= 1.0);
    assert_eq!(metric(&text, "routellm_shared_state_local_decisions_total"), 1.0);

    // Redis back (empty: it kept nothing): after the pause the next request goes through
    // it, and the spend charged meanwhile is sent with it.
    redis = Redis::start_on(port).await;
    tokio::time::sleep(routellm::shared_state::RETRY_AFTER + Duration::from_millis(100)).await;
    assert_eq!(post_as(&first, "k-team").await.status(), 200);
    let spent = redis.spent_at_least("team", &period, 0.008).await;
    assert!(
        (spent - 0.008).abs() < 1e-9,
        "the answer while down and the one after: {spent}"
    );
    assert_eq!(metric(&first.metrics().await, "routellm_shared_state_up"), 1.0);
}

#[tokio::test]
async fn with_on_failure_refuse_limited_keys_get_503_while_redis_is_unavailable() {
    let closed = common::closed_port().await;
    let (strong, proxy, _) = replicas(&format!(
        "shared_state: {{redis_url: 'redis://127.0.0.1:{closed}', on_failure: refuse, timeout_ms: 200}}\n\
         api_keys: [{{key: k-team, name: team, requests_per_minute: 100}}, k-open]\n"
    ))
    .await;
    let refused = post_as(&proxy, "k-team").await;
    let error = openai_error(refused, 503).await;
    assert_eq!(error["type"], "server_error");
    assert_eq!(error["code"], "limits_unavailable");
    assert!(strong.received().is_empty());
    // Nothing to share for a key without limits: it is served.
    assert_eq!(post_as(&proxy, "k-open").await.status(), 200);
}

/// The cached answers Redis holds, once it holds `count` (they are sent after the answer).
async fn cached_in_redis(redis: &Redis, count: usize) -> Vec<String> {
    let started = Instant::now();
    loop {
        let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg("routellm:cache:*")).await.unwrap();
        if keys.len() >= count {
            return keys;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "Redis holds {keys:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_answer_cached_by_one_replica_is_given_again_by_the_other() {
    let (redis, strong, first, second) = sharing_replicas("response_cache: {ttl_secs: 600, redis: true}\n").await;
    let whole = r#"{"model":"router-random-0","messages":[{"role":"user","content":"Cache me"}]}"#;
    let streamed = r#"{"model":"router-random-0","stream":true,"messages":[{"role":"user","content":"Cache me"}]}"#;

    let answered = first.post_chat(whole).await;
    assert_eq!(answered.headers()["x-routellm-cache"], "miss");
    let answer = answered.text().await.unwrap();
    let keys = cached_in_redis(&redis, 1).await;
    let ttl: i64 = redis.query(redis::cmd("TTL").arg(&keys[0])).await.unwrap();
    assert!((590..=600).contains(&ttl), "kept in Redis for ttl_secs: {ttl}");

    let again = second.post_chat(whole).await;
    assert_eq!(again.headers()["x-routellm-cache"], "hit");
    assert!(again.headers().contains_key("age"));
    // The decision the first replica made, given as it gave it.
    assert_eq!(again.headers()["x-routellm-model"], "openai/strong-model");
    assert_eq!(again.headers()["x-routellm-router"], "random");
    assert_eq!(again.headers()["x-routellm-tier"], "strong");
    assert_eq!(again.text().await.unwrap(), answer);

    // A stream is kept once it has ended, and given again by the other replica as it was.
    let first_stream = first.post_chat(streamed).await.text().await.unwrap();
    assert!(first_stream.ends_with("data: [DONE]\n\n"), "{first_stream}");
    cached_in_redis(&redis, 2).await;
    let second_stream = second.post_chat(streamed).await;
    assert_eq!(second_stream.headers()["x-routellm-cache"], "hit");
    assert_eq!(second_stream.text().await.unwrap(), first_stream);
    assert_eq!(
        strong.received().len(),
        2,
        "one model call per question, for both replicas"
    );

    let text = second.metrics().await;
    assert_eq!(metric(&text, "routellm_cache_shared_hits_total"), 2.0);
    assert_eq!(metric(&text, r#"routellm_cache_requests_total{result="hit"}"#), 2.0);
    // Now kept by the second replica too: asked again, it answers from its own memory.
    assert_eq!(second.post_chat(whole).await.headers()["x-routellm-cache"], "hit");
    assert_eq!(metric(&second.metrics().await, "routellm_cache_shared_hits_total"), 2.0);
}

#[tokio::test]
async fn a_burst_at_both_replicas_at_once_is_admitted_exactly_to_the_limit() {
    let (_redis, strong, first, second) =
        sharing_replicas("api_keys: [{key: k-team, name: team, requests_per_minute: 30}]\n").await;
    // 80 requests at once, half at each replica: the one bucket admits 30 (and whatever
    // refilled meanwhile, half a request a second), never 30 per replica.
    let started = Instant::now();
    let burst = (0..80).map(|index| {
        let proxy = if index % 2 == 0 { &first } else { &second };
        async move { post_as(proxy, "k-team").await.status().as_u16() }
    });
    let statuses = futures_util::future::join_all(burst).await;
    let refill = started.elapsed().as_secs_f64() / 2.0;
    let admitted = statuses.iter().filter(|status| **status == 200).count();
    assert!(
        statuses.iter().all(|status| matches!(status, 200 | 429)),
        "{statuses:?}"
    );
    assert!(
        admitted >= 30 && f64::from(u32::try_from(admitted).unwrap()) <= 30.0 + refill.ceil(),
        "{admitted} admitted in {:?}",
        started.elapsed()
    );
    assert_eq!(strong.received().len(), admitted);
}

#[tokio::test]
async fn over_tls_the_replicas_share_limits_when_they_trust_redis_and_fall_back_when_not() {
    let redis = Redis::start_tls().await;
    let ca = redis.tls_ca.clone().unwrap();
    let (strong, first, second) = replicas(&format!(
        "shared_state: {{redis_url: '{}', tls_ca_file: '{}'}}\n\
         api_keys: [{{key: k-team, name: team, requests_per_minute: 1}}]\n",
        redis.url(),
        ca.display()
    ))
    .await;
    assert_eq!(post_as(&first, "k-team").await.status(), 200);
    let error = openai_error(post_as(&second, "k-team").await, 429).await;
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert_eq!(strong.received().len(), 1);
    let text = second.metrics().await;
    assert_eq!(metric(&text, "routellm_shared_state_up"), 1.0);
    assert_eq!(metric(&text, "routellm_shared_state_errors_total"), 0.0);

    // Trusting only the system's certificates, a replica does not accept this Redis's own
    // CA: it never shares, and decides alone (its own bucket of one).
    let (_strong, untrusting, _) = replicas(&format!(
        "shared_state: {{redis_url: '{}', timeout_ms: 500}}\n\
         api_keys: [{{key: k-team, name: team, requests_per_minute: 1}}]\n",
        redis.url()
    ))
    .await;
    assert_eq!(post_as(&untrusting, "k-team").await.status(), 200);
    let text = untrusting.metrics().await;
    assert_eq!(metric(&text, "routellm_shared_state_up"), 0.0);
    assert_eq!(metric(&text, "routellm_shared_state_local_decisions_total"), 1.0);
}

#[tokio::test]
async fn a_deployment_one_replica_found_unavailable_is_passed_over_by_the_other() {
    let redis = Redis::start().await;
    let (down, backup, weak) = (
        MockUpstream::start("down").await,
        MockUpstream::start("backup").await,
        MockUpstream::start("weak").await,
    );
    down.set_unavailable(Some(axum::http::StatusCode::SERVICE_UNAVAILABLE));
    let config = format!(
        "strong_model:\n\
         \x20 - {{name: openai/primary, base_url: '{}', api_key: sk}}\n\
         \x20 - {{name: openai/backup, base_url: '{}', api_key: sk}}\n\
         weak_model: {{name: openai/weak, base_url: '{}', api_key: sk}}\n\
         load_balancing: {{cooldown_secs: 60}}\n\
         shared_state: {{redis_url: '{}'}}\n",
        down.base_url(),
        backup.base_url(),
        weak.base_url(),
        redis.url()
    );
    let (first, second) = (Proxy::start_config(&config).await, Proxy::start_config(&config).await);
    let body = r#"{"model":"router-random-0","messages":[{"role":"user","content":"Hello"}]}"#;
    let answered = first.post_chat(body).await;
    assert_eq!(answered.headers()["x-routellm-model"], "openai/backup");
    assert_eq!(down.received().len(), 1);

    // Within a poll the second replica passes the primary over too, without trying it.
    let passed_over = "routellm_deployment_available{tier=\"strong\",deployment=\"0\",model=\"openai/primary\"} 0\n";
    let started = Instant::now();
    while !second.metrics().await.contains(passed_over) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the second replica never heard"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answered = second.post_chat(body).await;
    assert_eq!(answered.headers()["x-routellm-model"], "openai/backup");
    assert_eq!(down.received().len(), 1, "the second replica did not try the primary");
    let announced: Vec<String> = redis
        .query(redis::cmd("KEYS").arg("routellm:cooldown:*"))
        .await
        .unwrap();
    assert_eq!(announced.len(), 1, "{announced:?}");
    let ttl_ms: i64 = redis.query(redis::cmd("PTTL").arg(&announced[0])).await.unwrap();
    assert!(
        (50_000..=60_000).contains(&ttl_ms),
        "announced for the cooldown: {ttl_ms}"
    );

    // The primary recovers and the backup fails: at the second replica every deployment is
    // passed over, so the one back soonest is asked — the primary, which answers. That
    // withdraws the announcement, and the next polls do not bring the cooldown back.
    down.set_unavailable(None);
    backup.set_unavailable(Some(axum::http::StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(second.post_chat(body).await.status(), 503, "the backup's own answer");
    let answered = second.post_chat(body).await;
    assert_eq!(answered.headers()["x-routellm-model"], "openai/primary");
    let started = Instant::now();
    while redis
        .query::<Vec<String>>(redis::cmd("KEYS").arg("routellm:cooldown:*"))
        .await
        .unwrap()
        .contains(&announced[0])
    {
        assert!(started.elapsed() < Duration::from_secs(5), "the announcement stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(routellm::server::SHARED_COOLDOWN_POLL + Duration::from_millis(300)).await;
    let available = "routellm_deployment_available{tier=\"strong\",deployment=\"0\",model=\"openai/primary\"} 1\n";
    assert!(
        second.metrics().await.contains(available),
        "passed over again after it answered"
    );
}

/// With `cluster: true` the replicas share through a Redis Cluster as through one Redis:
/// each client key's bucket lives on the node holding its slot — for both keys here a node
/// other than the one the URL names — and both replicas draw on it.
#[tokio::test]
async fn on_a_redis_cluster_each_keys_bucket_is_shared_on_the_node_holding_it() {
    let cluster = RedisCluster::start(false).await;
    let requests_key = |n: usize| format!("routellm:{{team-{n}}}:requests");
    let east = cluster.first_on(1, requests_key).await;
    let west = cluster.first_on(2, requests_key).await;
    let (strong, first, second) = replicas(&format!(
        "shared_state: {{redis_url: '{}', cluster: true}}\n\
         api_keys: [{{key: k-east, name: team-{east}, requests_per_minute: 2}}, \
         {{key: k-west, name: team-{west}, requests_per_minute: 2}}]\n",
        cluster.url()
    ))
    .await;
    for key in ["k-east", "k-west"] {
        for (proxy, remaining) in [(&first, "1"), (&second, "0")] {
            let response = post_as(proxy, key).await;
            assert_eq!(response.status(), 200, "{key}");
            assert_eq!(response.headers()["x-ratelimit-remaining-requests"], remaining, "{key}");
        }
        openai_error(post_as(&first, key).await, 429).await;
    }
    assert_eq!(strong.received().len(), 4);
    for (index, n) in [(1, east), (2, west)] {
        let exists: i64 = cluster.nodes[index]
            .query(redis::cmd("EXISTS").arg(requests_key(n)))
            .await
            .unwrap();
        assert_eq!(exists, 1, "team-{n}'s bucket on node {index}");
    }
    for text in [first.metrics().await, second.metrics().await] {
        assert_eq!(metric(&text, "routellm_shared_state_up"), 1.0);
        assert_eq!(metric(&text, "routellm_shared_state_errors_total"), 0.0);
        assert_eq!(metric(&text, "routellm_shared_state_local_decisions_total"), 0.0);
    }

    // The whole cluster gone: decided at once by the replica's own bucket, which starts
    // from what Redis last said (empty), without waiting on the cluster client's retries.
    drop(cluster);
    let started = Instant::now();
    openai_error(post_as(&second, "k-west").await, 429).await;
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    let text = second.metrics().await;
    assert_eq!(metric(&text, "routellm_shared_state_up"), 0.0);
    assert_eq!(metric(&text, "routellm_shared_state_local_decisions_total"), 1.0);
}

/// The deployments' cooldowns are read with one MGET over keys in several slots, which the
/// cluster client splits by node; cached answers are single keys on any node.
#[tokio::test]
async fn on_a_redis_cluster_cooldowns_and_cached_answers_reach_every_node() {
    cooldowns_and_cached_answers_reach_every_node(&RedisCluster::start(false).await).await;
}

/// The same over TLS (clients and the cluster bus), trusting the cluster's CA by
/// `tls_ca_file`, as a managed cluster with encryption in transit is reached.
#[tokio::test]
async fn on_a_redis_cluster_over_tls_cooldowns_and_cached_answers_reach_every_node() {
    let cluster = RedisCluster::start(true).await;
    assert!(cluster.url().starts_with("rediss://"));
    cooldowns_and_cached_answers_reach_every_node(&cluster).await;
}

async fn cooldowns_and_cached_answers_reach_every_node(cluster: &RedisCluster) {
    let state = routellm::shared_state::SharedState::new(&cluster.shared_state()).unwrap();
    cooldowns_and_cached_answers_reach_every_node_with(cluster, &state).await;
    assert_eq!(state.stats(), (true, 0, 0));
}

async fn cooldowns_and_cached_answers_reach_every_node_with(
    cluster: &RedisCluster,
    state: &routellm::shared_state::SharedState,
) {
    let mut ids = Vec::new();
    for index in 0..SLOT_RANGES.len() {
        let n = cluster
            .first_on(index, |n| format!("routellm:cooldown:deployment-{n}"))
            .await;
        ids.push(format!("deployment-{n}"));
    }
    for (until, id) in (1_000..).zip(&ids) {
        state
            .announce_cooldown(id, until, Duration::from_secs(60))
            .await
            .unwrap();
    }
    let mut asked = ids.clone();
    asked.push("never-announced".to_owned());
    assert_eq!(
        state.cooldowns(&asked).await.unwrap(),
        [Some(1_000), Some(1_001), Some(1_002), None]
    );
    state.withdraw_cooldown(&ids[1]).await.unwrap();
    assert_eq!(
        state.cooldowns(&asked).await.unwrap(),
        [Some(1_000), None, Some(1_002), None]
    );

    for index in 0..SLOT_RANGES.len() {
        let n = cluster.first_on(index, |n| state.cache_key(&format!("{n:032x}"))).await;
        let key = state.cache_key(&format!("{n:032x}"));
        let answer = format!("answer {index}").into_bytes();
        state.set_bytes(&key, &answer, Duration::from_secs(60)).await.unwrap();
        assert_eq!(state.get_bytes(&key).await.unwrap(), Some(answer));
        let exists: i64 = cluster.nodes[index]
            .query(redis::cmd("EXISTS").arg(&key))
            .await
            .unwrap();
        assert_eq!(exists, 1, "{key} on node {index}");
    }
}

/// A replica may start before the cluster (as pods do): its first calls fail and are decided
/// locally, and once the cluster answers, the next call after the pause goes through.
#[tokio::test]
async fn a_cluster_that_comes_up_after_the_replica_is_used_once_it_answers() {
    let seed_port = common::closed_port().await;
    let config = cluster_config(format!("redis://127.0.0.1:{seed_port}"), None);
    let state = routellm::shared_state::SharedState::new(&config).unwrap();
    assert_eq!(state.ping().await, Err(routellm::shared_state::Unavailable));
    assert!(!state.stats().0);

    let cluster = RedisCluster::start_with(false, Some(seed_port)).await;
    assert_eq!(cluster.url(), format!("redis://127.0.0.1:{seed_port}"));
    let started = Instant::now();
    while state.ping().await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the cluster was never reached"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(state.stats().0);
    cooldowns_and_cached_answers_reach_every_node_with(&cluster, &state).await;
}
