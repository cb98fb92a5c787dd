//! The real `routellm` binary driven by the official OpenAI SDKs for Python (`pip install openai`)
//! and Node (`npm ci --prefix tests/sdk`),
//! and the binary's behaviour that depends on its process environment.

#![allow(clippy::unwrap_used, clippy::format_collect)] // test code: a panic is the failure report

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{MockUpstream, closed_port};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Flags for the `random` router between the built-in offline models.
const ECHO_MODELS: [&str; 6] = [
    "--routers",
    "random",
    "--strong-model",
    "echo/gpt-4o",
    "--weak-model",
    "echo/mixtral",
];

/// Starts the binary on an OS-chosen port and returns it with its base URL.
async fn start_binary(args: &[&str]) -> (Child, String) {
    let (child, base_url, _log) = start_command(Command::new(env!("CARGO_BIN_EXE_routellm")), args).await;
    (child, base_url)
}

/// As [`start_binary`], with the command's environment prepared by the caller; also
/// returns the log lines written after start-up.
async fn start_command(
    mut command: Command,
    args: &[&str],
) -> (Child, String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let mut child = command
        .args(["serve", "--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .env_remove("ROUTELLM_CONFIG")
        .env("RUST_LOG", "routellm=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the routellm binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let address = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if !line.contains("listening") {
                continue;
            }
            // Text logs say `address=127.0.0.1:port`, JSON logs `"address":"127.0.0.1:port"`.
            if let Some(rest) = line.split("address=").nth(1) {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
            if let Some(rest) = line.split(r#""address":""#).nth(1) {
                return rest.split('"').next().unwrap().to_owned();
            }
        }
        panic!("routellm exited before listening")
    })
    .await
    .expect("routellm reports its address");
    // Keep draining the log so the child never blocks on a full pipe.
    let (log, log_lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = log.send(line);
        }
    });
    (child, format!("http://{address}/v1"), log_lines)
}

/// The official OpenAI SDKs the tests drive the binary with.
#[derive(Clone, Copy, Debug)]
enum Sdk {
    /// `pip install openai`.
    Python,
    /// `npm ci --prefix tests/sdk` (the version pinned in `tests/sdk/package-lock.json`).
    Node,
}

async fn run_sdk_script(sdk: Sdk, base_url: &str, mode: &str) {
    let (program, script, install) = match sdk {
        Sdk::Python => ("python3", "openai_client.py", "python3 with `pip install openai`"),
        Sdk::Node => ("node", "openai_client.mjs", "node with `npm ci --prefix tests/sdk`"),
    };
    let script = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(program)
        .args([&script, base_url, mode])
        .output()
        .await
        .unwrap_or_else(|error| panic!("{program} runs (the SDK tests need {install}): {error}"));
    assert!(
        output.status.success(),
        "OpenAI {sdk:?} SDK checks failed ({mode}; they need {install}):\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn python_sdk_against_mock_upstreams() {
    sdk_against_mock_upstreams(Sdk::Python).await;
}

#[tokio::test]
async fn node_sdk_against_mock_upstreams() {
    sdk_against_mock_upstreams(Sdk::Node).await;
}

async fn sdk_against_mock_upstreams(sdk: Sdk) {
    let upstream = MockUpstream::start("mock").await;
    let config = config_file(
        "thresholds: {random: 0.5}\nstrong_model: openai/gpt-4o\nweak_model: groq/llama3-8b\n\
         upstream: {forward_headers: [x-request-id]}\nmodel_aliases: {gpt-4: router-random-1}\n\
         passthrough: {paths: [embeddings]}\n",
    );
    let (_child, base_url) = start_binary(&[
        "--config",
        config.to_str().unwrap(),
        "--routers",
        "random",
        "--base-url",
        &upstream.base_url(),
        "--api-key",
        "sk-upstream",
    ])
    .await;
    run_sdk_script(sdk, &base_url, "mock").await;

    let received = upstream.received();
    assert!(
        received
            .iter()
            .all(|r| r.headers["authorization"] == "Bearer sk-upstream")
    );
    let tools_request = received
        .iter()
        .find(|request| request.json().get("tools").is_some())
        .expect("the tools request reached the upstream");
    // The header the config lists is passed on; the SDK's own (x-stainless-*) are not.
    assert_eq!(tools_request.headers["x-request-id"], "sdk-trace-1");
    assert!(
        received
            .iter()
            .all(|request| request.headers.get("x-stainless-lang").is_none())
    );
    let with_tools = tools_request.json();
    assert_eq!(with_tools["model"], "gpt-4o");
    assert_eq!(with_tools["tools"][0]["function"]["name"], "lookup");
    assert_eq!(with_tools["response_format"]["json_schema"]["strict"], true);
    assert_eq!(with_tools["seed_marker"], 42);
    assert!(with_tools.get("temperature").is_none(), "nothing is injected");
    let embeddings = received
        .iter()
        .find(|request| request.endpoint == "other")
        .expect("the embeddings request was passed through")
        .json();
    assert_eq!(
        embeddings["model"], "text-embedding-3-small",
        "passed through unrouted, unchanged"
    );
    assert_eq!(embeddings["encoding_format"], "float");
}

#[tokio::test]
async fn python_sdk_against_offline_echo_models() {
    let (_child, base_url) = start_binary(&ECHO_MODELS).await;
    run_sdk_script(Sdk::Python, &base_url, "echo").await;
}

#[tokio::test]
async fn node_sdk_against_offline_echo_models() {
    let (_child, base_url) = start_binary(&ECHO_MODELS).await;
    run_sdk_script(Sdk::Node, &base_url, "echo").await;
}

/// A strong tier whose first deployment is down (nothing listens there): the SDK, retries
/// off, gets its answers from the second, streamed and whole, and never sees the failure.
#[tokio::test]
async fn python_sdk_is_answered_by_the_next_deployment_when_the_first_is_down() {
    let backup = MockUpstream::start("backup").await;
    let config = config_file(&format!(
        "thresholds: {{random: 0.5}}\nweak_model: echo/mixtral\nstrong_model:\n\
         \x20 - {{name: openai/strong-primary, base_url: 'http://127.0.0.1:{}/v1', api_key: sk-primary}}\n\
         \x20 - {{name: groq/strong-backup, base_url: '{}', api_key: sk-backup}}\n",
        closed_port().await,
        backup.base_url()
    ));
    let (_child, base_url) = start_binary(&["--config", config.to_str().unwrap(), "--routers", "random"]).await;
    run_sdk_script(Sdk::Python, &base_url, "failover").await;
    let received = backup.received();
    assert_eq!(received.len(), 2, "the whole answer and the stream");
    assert!(
        received.iter().all(|request| request.json()["model"] == "strong-backup"
            && request.headers["authorization"] == "Bearer sk-backup")
    );
}

/// The response cache as the SDK meets it: the same request answered again (whole, and a
/// stream given back in one piece that the SDK reads chunk by chunk), `Cache-Control:
/// no-cache` sent as an extra header for a fresh answer.
#[tokio::test]
async fn python_sdk_gets_a_repeated_request_answered_from_the_cache() {
    let config = config_file("response_cache: {ttl_secs: 60}\n");
    let (_child, base_url) = start_binary(&[&ECHO_MODELS[..], &["--config", config.to_str().unwrap()]].concat()).await;
    run_sdk_script(Sdk::Python, &base_url, "cache").await;
    let metrics = metrics_of(&base_url).await;
    assert!(
        metrics.contains("routellm_cache_requests_total{result=\"hit\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("routellm_cache_requests_total{result=\"refresh\"} 1\n"),
        "{metrics}"
    );
}

/// A key's rate limit as the SDK meets it: OpenAI's 429 `rate_limit_exceeded` with
/// `retry-after-ms`, which the SDK's automatic retry honours; its allowed models; and the
/// per-key counts in `/metrics`.
#[tokio::test]
async fn python_sdk_backs_off_on_a_keys_rate_limit() {
    let config = config_file(
        "thresholds: {random: 0.5}\napi_keys: [{key: sk-client, name: sdk, requests_per_minute: 60, \
         models: [router-random]}]\n",
    );
    let (_child, base_url) = start_binary(&[&ECHO_MODELS[..], &["--config", config.to_str().unwrap()]].concat()).await;
    run_sdk_script(Sdk::Python, &base_url, "limits").await;
    let metrics = metrics_of(&base_url).await;
    let sample = |name: &str| -> u64 {
        let line = metrics
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(sample(r#"routellm_key_requests_total{key="sdk"}"#) >= 61);
    assert!(sample(r#"routellm_key_rate_limited_total{key="sdk",limit="requests"}"#) >= 1);
    assert_eq!(
        sample(r#"routellm_key_rate_limited_total{key="sdk",limit="tokens"}"#),
        0
    );
    assert!(sample(r#"routellm_key_tokens_total{key="sdk"}"#) > 0);
}

/// A key's budget as the SDK meets it — OpenAI's 429 `insufficient_quota`, which the SDK
/// does not retry — and as a restart finds it: `spend_file` keeps what was spent.
#[cfg(unix)]
#[tokio::test]
async fn a_spent_budget_is_refused_with_insufficient_quota_and_stays_spent_across_a_restart() {
    let scratch = tempfile::tempdir().unwrap();
    let spend_file = scratch.path().join("spend.json");
    let priced = "price_per_million_tokens: {input: 1000, output: 1000}";
    let config = config_file(&format!(
        "strong_model: {{name: echo/gpt-4o, {priced}}}\nweak_model: {{name: echo/mixtral, {priced}}}\n\
         thresholds: {{random: 0.5}}\napi_keys: [{{key: sk-client, name: sdk, budget: {{limit: 0.05, per: month}}}}]\n\
         spend_file: {}\n",
        spend_file.display()
    ));
    let args = ["--config", config.to_str().unwrap(), "--routers", "random"];
    let (child, base_url) = start_binary(&args).await;
    run_sdk_script(Sdk::Python, &base_url, "budget").await;
    routellm::upstream::install_crypto_provider();
    let client = reqwest::Client::new();
    let metrics = metrics_of(&base_url).await;
    assert!(
        metrics.contains("routellm_key_rate_limited_total{key=\"sdk\",limit=\"budget\"} 2\n"),
        "one refusal per client, no retries:\n{metrics}"
    );
    assert!(
        metrics.contains("routellm_key_spend{key=\"sdk\",period=\""),
        "{metrics}"
    );

    // A graceful stop writes the spend down; the next start reads it.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut child = child;
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the server stops on SIGTERM")
        .unwrap();
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&spend_file).unwrap()).unwrap();
    assert!(saved["keys"]["sdk"]["spent"].as_f64().unwrap() >= 0.05, "{saved}");
    let (_child, base_url) = start_binary(&args).await;
    let response = client
        .post(format!("{base_url}/chat/completions"))
        .bearer_auth("sk-client")
        .header("content-type", "application/json")
        .body(r#"{"model":"router-random-0","messages":[{"role":"user","content":"Hello"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429, "still spent after the restart");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota");
}

/// Deployments behind an egress proxy set `HTTPS_PROXY`/`HTTP_PROXY` (and `NO_PROXY`): the
/// binary's calls to the models must go through it. The mock stands in for the proxy; the
/// model's host does not resolve, so an answer can only have come through the proxy.
#[tokio::test]
async fn upstream_calls_go_through_the_proxy_named_in_the_environment() {
    let proxy = MockUpstream::start("via-proxy").await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_routellm"));
    child
        .env("HTTP_PROXY", proxy.base_url().trim_end_matches("/v1"))
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    let (_child, base_url, _log) = start_command(
        child,
        &[
            "--routers",
            "random",
            "--strong-model",
            "openai/gpt-4o",
            "--weak-model",
            "openai/gpt-4o-mini",
            "--base-url",
            "http://models.example.invalid/v1",
            "--api-key",
            "sk-upstream",
        ],
    )
    .await;
    routellm::upstream::install_crypto_provider();
    let response = reqwest::Client::new()
        .post(format!("{base_url}/chat/completions"))
        .header("content-type", "application/json")
        .body(r#"{"model":"router-random-0","messages":[{"role":"user","content":"Hello"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let received = proxy.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].headers["host"], "models.example.invalid");
    assert_eq!(received[0].headers["authorization"], "Bearer sk-upstream");
    assert_eq!(received[0].json()["model"], "gpt-4o");
}

/// `serve --check` loads everything `serve` would, prints it without secrets, and exits
/// without listening; a configuration that would not start fails the check the same way.
#[tokio::test]
async fn serve_check_validates_and_describes_without_secrets() {
    let config = config_file(
        "strong_model: {name: openai/gpt-4o, api_key: sk-strong-secret, base_url: 'https://user:pw-secret@llm.example/v1', \
         headers: {X-Gateway-Key: gk-header-secret}, price_per_million_tokens: {input: 2.5, output: 10}}\n\
         weak_model: [{name: echo/mixtral, price_per_million_tokens: {input: 0.5, output: 0.5}}, \
         {name: groq/mixtral-8x7b, api_key: gq-secret, weight: 2, price_per_million_tokens: {input: 0.5, output: 0.5}}]\nload_balancing: {strategy: round_robin}\n\
         thresholds: {random: 0.4}\nstrong_share: {random: 0.3}\n\
         upstream: {forward_headers: [traceparent], stream_first_event_timeout_secs: 20}\napi_keys: [client-key-secret, {key: team-secret, name: team-a, requests_per_minute: 60, \
         tokens_per_minute: 9000, models: [auto], budget: {limit: 25, per: day}}]\nscoring_timeout_ms: 250\npassthrough: {paths: [embeddings, files/*], price_per_million_tokens: {input: 0.02, output: 0}}\nwatch_config_secs: 30\n\
         spend_file: /tmp/routellm-check-spend.json\nresponse_cache: {ttl_secs: 900, max_mb: 64}\n",
    );
    let check = |config: &std::path::Path| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_routellm"));
        command
            .args(["serve", "--check", "--routers", "random", "--port", "0"])
            .args(["--model-alias", "auto=router-random,later=router-mf", "--config"])
            .arg(config)
            .env_remove("ROUTELLM_CONFIG")
            .kill_on_drop(true);
        async move { tokio::time::timeout(Duration::from_secs(30), command.output()).await }
    };
    let output = check(&config).await.expect("the check exits by itself").unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{stdout}");
    for expected in [
        "configuration OK",
        "router random: loaded, default threshold 0.4 until 100 requests are scored, then the one that sends 0.3 \
         of its latest 1000 scores to the strong model",
        "strong model openai/gpt-4o as `gpt-4o`: https://redacted@llm.example/v1 (openai), API key set, extra headers: x-gateway-key",
        "price per million tokens: input 2.5, output 10",
        "weak (1 of 2) model echo/mixtral as `mixtral`: built-in offline echo",
        "weak (2 of 2) model groq/mixtral-8x7b as `mixtral-8x7b`: https://api.groq.com/openai/v1 (groq), API key set",
        "load balancing: round robin, an unavailable deployment passed over for 10 s",
        "  weight 2\n",
        "client headers forwarded: traceparent",
        "on_router_error: strong, on_upstream_error: fail, score_turns: last, client API keys: 2",
        ": no limits",
        "key `team-a`: 60 requests/min, 9000 tokens/min, budget 25 per day, models auto",
        "key spend kept in /tmp/routellm-check-spend.json (written every 5 s and at shutdown)",
        "scoring timeout: 250 ms",
        "a stream's first event within 20 s, else the next deployment",
        "passed through to openai/gpt-4o: /v1/embeddings, /v1/files/*\n  price per million tokens: input 0.02, output 0\n",
        "config file watched every 30 s, reloaded when it changes",
        "response cache: identical Chat Completions and Completions requests answered again for 900 s, up to 64 MiB, \
         each API key its own answers\n  identical requests in flight together wait for one answer (streams read it as it is written)\n",
        "model alias `auto` → `router-random`",
        "model alias `later` → `router-mf` (router `mf` is not loaded: requests for it are refused)",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in\n{stdout}");
    }
    assert!(!stdout.contains("secret"), "a secret was printed:\n{stdout}");

    let broken = config_file("strong_model: {name: openai/gpt-4o, headers: {Authorization: x}}\n");
    let output = check(&broken).await.expect("the check exits by itself").unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("`Authorization` cannot be set"), "{stderr}");
}

/// SIGHUP re-reads the config file: a new threshold and new client keys apply to the
/// next requests without a restart, and a file that does not check out changes nothing.
#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads_thresholds_and_keys_and_refuses_a_broken_file() {
    let config = config_file("strong_model: echo/gpt-4o\nweak_model: echo/mixtral\nthresholds: {random: 0}\n");
    let mut command = Command::new(env!("CARGO_BIN_EXE_routellm"));
    command.env_remove("RUST_LOG");
    let (child, base_url, mut log) =
        start_command(command, &["--routers", "random", "--config", config.to_str().unwrap()]).await;
    routellm::upstream::install_crypto_provider();
    let client = reqwest::Client::new();
    let tier = |key: Option<&'static str>| {
        let mut request = client
            .post(format!("{base_url}/chat/completions"))
            .header("content-type", "application/json")
            .body(r#"{"model":"router-random","messages":[{"role":"user","content":"Hello"}]}"#);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move {
            let response = request.send().await.unwrap();
            let tier = response
                .headers()
                .get("x-routellm-tier")
                .map(|v| v.to_str().unwrap().to_owned());
            (response.status().as_u16(), tier)
        }
    };
    // Threshold 0: every score is at or above it.
    assert_eq!(tier(None).await, (200, Some("strong".to_owned())));

    let line = rewrite_and_hang_up(
        &config,
        "strong_model: echo/gpt-4o\nweak_model: echo/mixtral\nthresholds: {random: 1}\napi_keys: [k-new]\n",
        &child,
        &mut log,
    )
    .await;
    assert!(line.contains("configuration reloaded"), "{line}");
    // Threshold 1: the random router's scores in [0, 1) all fall below it.
    assert_eq!(tier(Some("k-new")).await, (200, Some("weak".to_owned())));
    assert_eq!(tier(None).await.0, 401);

    let line = rewrite_and_hang_up(
        &config,
        "strong_model: echo/gpt-4o\nweak_model: echo/mixtral\nthresholds: {random: 7}\n",
        &child,
        &mut log,
    )
    .await;
    assert!(
        line.contains("not reloaded") && line.contains("thresholds.random"),
        "{line}"
    );
    assert_eq!(tier(Some("k-new")).await, (200, Some("weak".to_owned())));
    assert_eq!(tier(None).await.0, 401);
    let metrics = metrics_of(&base_url).await;
    for expected in [
        "routellm_router_default_threshold{router=\"random\"} 1\n",
        "routellm_config_reloads_total{result=\"applied\"} 1\n",
        "routellm_config_reloads_total{result=\"refused\"} 1\n",
    ] {
        assert!(metrics.contains(expected), "{expected} in {metrics}");
    }
    drop(child);
}

/// The loop the prompt log exists for: serve with `--prompt-log`, then calibrate on what
/// was logged. With the `length` router the threshold is known from the prompts alone.
#[tokio::test]
async fn calibrate_reads_the_prompt_log_the_server_writes() {
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("prompts.jsonl");
    let (child, base_url) = start_binary(&[
        "--routers",
        "length",
        "--strong-model",
        "echo/gpt-4o",
        "--weak-model",
        "echo/mixtral",
        "--prompt-log",
        log.to_str().unwrap(),
    ])
    .await;
    routellm::upstream::install_crypto_provider();
    let client = reqwest::Client::new();
    let prompts = PROMPTS_BY_LENGTH;
    chat_tiers(&client, &base_url, "router-length-0.5", &prompts).await;
    // The writer flushes after every burst: once the lines are there, killing the server
    // loses nothing.
    wait_for_lines(&log, prompts.len()).await;
    drop(child);
    let logged = routellm::prompts::read(&log).unwrap();
    assert_eq!(logged, prompts);

    let output = calibrate_length_for_half(&log, false).await;
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let threshold: f64 = stdout
        .rsplit("threshold = ")
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no threshold in {stdout}"));
    // Half of the four logged prompts score at or above the threshold.
    let length = routellm::routers::LengthRouter;
    let strong = prompts
        .iter()
        .filter(|prompt| routellm::routers::Router::strong_win_rate(&length, prompt).unwrap() >= threshold)
        .count();
    assert_eq!(strong, 2, "{stdout}");
}

/// The rollout the README describes: clients hard-coded to `gpt-4o` are scored but still
/// all sent to the strong model (an alias at threshold 0), the prompt log is calibrated,
/// and a reload points the alias at the calibrated threshold, which then splits the same
/// prompts as calibrated.
#[cfg(unix)]
#[tokio::test]
async fn rollout_scores_in_shadow_then_routes_at_the_calibrated_threshold_after_a_reload() {
    let scratch = tempfile::tempdir().unwrap();
    let log_path = scratch.path().join("prompts.jsonl");
    let config_for = |alias: &str| {
        format!(
            "strong_model: echo/gpt-4o\nweak_model: echo/mixtral\nrouters: [length]\n\
             model_aliases: {{gpt-4o: '{alias}'}}\nprompt_log: {{path: '{}'}}\n",
            log_path.display()
        )
    };
    let config = config_file(&config_for("router-length-0"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_routellm"));
    command.env_remove("RUST_LOG");
    let (child, base_url, mut log) = start_command(command, &["--config", config.to_str().unwrap()]).await;
    routellm::upstream::install_crypto_provider();
    let client = reqwest::Client::new();
    let prompts = PROMPTS_BY_LENGTH;
    let tiers = || chat_tiers(&client, &base_url, "gpt-4o", &prompts);
    assert_eq!(
        tiers().await,
        ["strong"; 4],
        "in shadow every request goes to the strong model"
    );
    wait_for_lines(&log_path, prompts.len()).await;
    // The log names the alias the clients used, not only the router behind it.
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logged
            .lines()
            .all(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["requested_model"] == "gpt-4o"),
        "{logged}"
    );
    let output = calibrate_length_for_half(&log_path, true).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let calibration: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(calibration["prompts"], 4);
    let threshold = calibration["threshold"].as_f64().unwrap();

    let line = rewrite_and_hang_up(
        &config,
        &config_for(&format!("router-length-{threshold}")),
        &child,
        &mut log,
    )
    .await;
    assert!(line.contains("configuration reloaded"), "{line}");
    assert_eq!(tiers().await, ["weak", "weak", "strong", "strong"]);
    drop(child);
}

/// The access log is off by default and, with `--access-log`, has one line per request
/// naming what was decided and the client's request id.
#[tokio::test]
async fn access_log_lines_name_the_decision_and_the_request_id() {
    routellm::upstream::install_crypto_provider();
    let client = reqwest::Client::new();
    let request = |base_url: &str, id: Option<&str>| {
        let mut request = client
            .post(format!("{base_url}/chat/completions"))
            .header("content-type", "application/json")
            .body(r#"{"model":"router-random-0","messages":[{"role":"user","content":"Hello"}]}"#);
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        request.send()
    };

    let mut command = Command::new(env!("CARGO_BIN_EXE_routellm"));
    command.env_remove("RUST_LOG");
    let mut args = vec!["--access-log", "--log-format", "json"];
    args.extend(ECHO_MODELS);
    let (child, base_url, mut log) = start_command(command, &args).await;
    let traced = request(&base_url, Some("trace-42")).await.unwrap();
    assert_eq!(traced.status(), 200);
    assert_eq!(traced.headers()["x-routellm-request-id"], "trace-42");
    let entry = next_access_line(&mut log).await;
    let fields = &entry["fields"];
    assert_eq!(fields["request_id"], "trace-42", "{entry}");
    assert_eq!(fields["router"], "random");
    assert_eq!(fields["tier"], "strong");
    assert_eq!(fields["model"], "echo/gpt-4o");
    assert_eq!(fields["status"], 200);
    assert_eq!(fields["api"], "chat/completions");
    // A refused request is logged too, with its status and why.
    let refused = client
        .post(format!("{base_url}/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", "trace-refused")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let entry = next_access_line(&mut log).await;
    assert_eq!(entry["fields"]["request_id"], "trace-refused", "{entry}");
    assert_eq!(entry["fields"]["status"], 400);
    assert!(
        entry["fields"]["error"].as_str().is_some_and(|error| !error.is_empty()),
        "{entry}"
    );
    // Without an id of its own, the client gets the one the log made up.
    let untraced = request(&base_url, None).await.unwrap();
    let made_up = untraced.headers()["x-routellm-request-id"].to_str().unwrap().to_owned();
    let entry = next_access_line(&mut log).await;
    assert_eq!(entry["fields"]["request_id"], made_up.as_str(), "{entry}");
    drop(child);

    // Without the flag: the request is served, and no access line is written by the time
    // the server has answered and shut down.
    let mut command = Command::new(env!("CARGO_BIN_EXE_routellm"));
    command.env_remove("RUST_LOG");
    let (mut child, base_url, mut log) = start_command(command, &ECHO_MODELS).await;
    assert_eq!(request(&base_url, Some("trace-43")).await.unwrap().status(), 200);
    child.kill().await.unwrap();
    let mut rest = Vec::new();
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(5), log.recv()).await {
        rest.push(line);
    }
    assert!(!rest.iter().any(|line| is_access_line(line)), "{rest:?}");
}

fn is_access_line(line: &str) -> bool {
    line.contains("routellm::access")
}

/// The next access log line (JSON format), within 10 s.
async fn next_access_line(log: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> serde_json::Value {
    serde_json::from_str(&next_log_line(log, is_access_line).await).unwrap()
}

/// Four prompts, shortest first, none of equal length: `length` ranks them in this order.
const PROMPTS_BY_LENGTH: [&str; 4] = [
    "Hi",
    "Name a colour",
    "Explain how a hash map resizes",
    "Write a sonnet about the sea at dawn",
];

/// `routellm calibrate` of the `length` router for half strong calls on `prompts`.
async fn calibrate_length_for_half(prompts: &std::path::Path, json: bool) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_routellm"));
    command.args(["calibrate", "--routers", "length", "--strong-model-pct", "0.5"]);
    if json {
        command.arg("--json");
    }
    command
        .arg("--prompts")
        .arg(prompts)
        .env_remove("ROUTELLM_CONFIG")
        .output()
        .await
        .unwrap()
}

/// Waits (up to two seconds) until the file at `path` holds `lines` lines.
async fn wait_for_lines(path: &std::path::Path, lines: usize) {
    for _ in 0..100 {
        if std::fs::read_to_string(path).is_ok_and(|text| text.lines().count() == lines) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends each prompt as a one-turn chat to `model` and returns the tier each went to.
async fn chat_tiers(client: &reqwest::Client, base_url: &str, model: &str, prompts: &[&str]) -> Vec<String> {
    let mut tiers = Vec::new();
    for prompt in prompts {
        let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": prompt}]});
        let response = client
            .post(format!("{base_url}/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        tiers.push(response.headers()["x-routellm-tier"].to_str().unwrap().to_owned());
    }
    tiers
}

/// With `watch_config_secs`, a rewritten config file is reloaded without a signal, as a
/// Kubernetes `ConfigMap` update needs; a rewrite that does not check out is refused once.
#[tokio::test]
async fn a_watched_config_file_is_reloaded_when_it_changes() {
    let yaml = |threshold: u32| {
        format!(
            "strong_model: echo/gpt-4o\nweak_model: echo/mixtral\nthresholds: {{random: {threshold}}}\nwatch_config_secs: 1\n"
        )
    };
    let config = config_file(&yaml(0));
    let mut command = Command::new(env!("CARGO_BIN_EXE_routellm"));
    command.env_remove("RUST_LOG");
    let (_child, base_url, mut log) =
        start_command(command, &["--routers", "random", "--config", config.to_str().unwrap()]).await;
    routellm::upstream::install_crypto_provider();
    let client = reqwest::Client::new();
    let tier = async || {
        chat_tiers(&client, &base_url, "router-random", &["Hello"])
            .await
            .remove(0)
    };
    assert_eq!(tier().await, "strong", "threshold 0");

    std::fs::write(&config, yaml(1)).unwrap();
    let line = next_log_line(&mut log, |line| line.contains("config file changed")).await;
    assert!(line.contains("configuration reloaded"), "{line}");
    assert_eq!(tier().await, "weak", "threshold 1");

    std::fs::write(&config, yaml(7)).unwrap();
    let line = next_log_line(&mut log, |line| line.contains("config file changed")).await;
    assert!(
        line.contains("not reloaded") && line.contains("thresholds.random"),
        "{line}"
    );
    assert_eq!(tier().await, "weak", "the running policy stays");
}

/// Writes the config file, sends SIGHUP and returns the server's log line about it.
async fn rewrite_and_hang_up(
    config: &std::path::Path,
    yaml: &str,
    child: &tokio::process::Child,
    log: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
) -> String {
    std::fs::write(config, yaml).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    next_log_line(log, |line| line.contains("SIGHUP")).await
}

/// The next log line that `wanted` picks, within 10 s.
async fn next_log_line(
    log: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    wanted: impl Fn(&str) -> bool,
) -> String {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let line = log.recv().await.expect("the log continues");
            if wanted(&line) {
                return line;
            }
        }
    })
    .await
    .expect("the log line awaited")
}

/// A config file in the target directory, unique per call.
/// The server's `/metrics` text, given its `.../v1` base URL.
async fn metrics_of(base_url: &str) -> String {
    routellm::upstream::install_crypto_provider();
    let url = format!("{}/metrics", base_url.trim_end_matches("/v1"));
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// A YAML file with `contents`, deleted when the returned path is dropped.
fn config_file(contents: &str) -> tempfile::TempPath {
    let file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(file.path(), contents).unwrap();
    file.into_temp_path()
}
