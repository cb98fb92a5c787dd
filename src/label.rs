//! `routellm label`: labels prompts from a team's own traffic with a judge model, so routers
//! can be evaluated and trained on that traffic instead of public benchmarks.
//!
//! No router trained on public data routes every kind of traffic well (see
//! `routers/README.md`); what transfers is data from the traffic itself. For each prompt both
//! configured models answer (after the conversation it ended, when the prompt file keeps
//! one), a judge model compares the two answers (in both orders by
//! default, since judges favour a position), and one JSON line records the battle. The line
//! is at once a battle for `routellm train` (`model_a`, `model_b`, `winner`, `p_b_wins`) and a
//! benchmark row for `routellm eval` (`scores`), and it keeps the answers and verdicts so a
//! label can be audited. Lines are appended as prompts finish, so an interrupted run loses
//! only what was in flight, and a rerun labels only what the file does not hold yet.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use axum::http::HeaderMap;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::config::{Config, ModelConfig, Price};
use crate::error::Error;
use crate::gateway::Gateway;
use crate::prompts::Entry;
use crate::request::Api;
use crate::upstream::{Reply, Upstream};
use crate::usage::Usage;

/// The judge's instructions. Written for this project; the verdict markers follow the
/// convention of pairwise LLM judging (MT-Bench), which judges already know.
const JUDGE_INSTRUCTIONS: &str = "You compare the answers two AI assistants gave to the same user request \
(the last turn of a conversation, when the conversation before it is shown). \
Decide which answer serves the user better: correct first, then helpful, relevant, complete and clear. \
Do not let the order of the answers, their length as such, or the assistants' names sway you. \
Explain your reasoning in a few sentences, then give your verdict on the last line as exactly one of: \
[[A]] if assistant A's answer is better, [[B]] if assistant B's answer is better, [[C]] if they are equally good.";

/// Each call in all, unless told otherwise: a labelling run of thousands of prompts meets
/// rate limits and passing server errors, which a wait outlasts.
pub const DEFAULT_ATTEMPTS: u32 = 4;

/// The longest wait before another attempt, whatever `retry-after` asks: a provider that
/// wants an hour is better met by stopping and rerunning later than by a silent sleep.
const MAX_WAIT: Duration = Duration::from_secs(60);

const MARKERS: [(&str, Verdict); 3] = [("[[A]]", Verdict::A), ("[[B]]", Verdict::B), ("[[C]]", Verdict::Tie)];

/// How `label` asks and judges.
#[derive(Debug, Clone)]
pub struct LabelOptions {
    /// The judge: a configured model's name, or any `<provider>/<model>` the config's
    /// providers resolve. The strong model when `None`.
    pub judge: Option<String>,
    /// Judge each pair twice, the answers in both orders, and average: position bias cancels.
    pub both_orders: bool,
    /// Prompts labelled at once.
    pub concurrency: usize,
    /// `max_tokens` for the two models' answers; their own default when `None`.
    pub max_tokens: Option<u32>,
    /// The judge's `temperature` (0 makes its verdicts as repeatable as it allows); its own
    /// default when `None`.
    pub judge_temperature: Option<f64>,
    /// Label at most this many new prompts.
    pub limit: Option<usize>,
    /// Take prompts in an order fixed by this seed and the prompts themselves, not the
    /// file's: with `limit`, a uniform sample of the file (see [`sample_order`]).
    pub sample_seed: Option<u64>,
    /// Tries per call: a 429, a 5xx, a timeout or a refused connection is tried again after
    /// the wait its `retry-after` asks (at most a minute), else 0.5 s, 1 s, 2 s, ...
    pub attempts: u32,
}

impl Default for LabelOptions {
    fn default() -> Self {
        Self {
            judge: None,
            both_orders: true,
            concurrency: 4,
            max_tokens: None,
            judge_temperature: None,
            limit: None,
            sample_seed: None,
            attempts: DEFAULT_ATTEMPTS,
        }
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct LabelSummary {
    /// Prompts labelled and appended in this run.
    pub labelled: usize,
    /// Prompts the output file already held (and repeats within the input), not asked again.
    pub already_labelled: usize,
    /// Prompts left for a later run by `limit`.
    pub not_started: usize,
    /// Prompts that could not be labelled, each with why; none of them was written.
    pub failed: Vec<(String, String)>,
    pub strong_wins: usize,
    pub ties: usize,
    pub weak_wins: usize,
    /// Prompts judged in both orders with a verdict each time, and of those, how many got
    /// the same verdict both ways: a judge that often changes its mind when the answers
    /// swap places is mostly telling positions apart, and its labels are noise.
    pub judged_twice: usize,
    pub consistent: usize,
    /// Tokens every call that answered reported, answers and judgements, failed prompts'
    /// included: they were spent all the same.
    pub usage: Usage,
    /// What those tokens cost, when every model that answered has a price.
    pub cost: Option<f64>,
}

/// What the calls for one prompt spent.
#[derive(Debug, Default, Clone, Copy)]
struct Spent {
    usage: Usage,
    cost: f64,
    /// Some answer came from a model without a price: `cost` is not the whole of it.
    unpriced: bool,
}

impl Spent {
    fn add(&mut self, answer: &Answer) {
        let usage = answer.usage;
        self.absorb(Spent {
            usage,
            cost: answer
                .price
                .map_or(0.0, |price| price.cost(usage.prompt_tokens, usage.completion_tokens)),
            unpriced: answer.price.is_none(),
        });
    }

    fn absorb(&mut self, other: Spent) {
        self.usage.prompt_tokens += other.usage.prompt_tokens;
        self.usage.completion_tokens += other.usage.completion_tokens;
        self.cost += other.cost;
        self.unpriced |= other.unpriced;
    }
}

/// The answer-order of one judgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Order {
    /// The strong model's answer is assistant A.
    StrongFirst,
    WeakFirst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    A,
    B,
    Tie,
}

/// Reads the judge's verdict: the one marker its reply contains. None when it gives no
/// marker or several (a reply that quotes the instructions must not count as a verdict).
fn verdict_of(reply: &str) -> Option<Verdict> {
    let mut found = MARKERS.iter().filter(|(marker, _)| reply.contains(marker));
    match (found.next(), found.next()) {
        (Some((_, verdict)), None) => Some(*verdict),
        _ => None,
    }
}

/// The strong model's score for one verdict: 1 when its answer won, 0 when it lost.
fn strong_score(order: Order, verdict: Verdict) -> f64 {
    match (order, verdict) {
        (Order::StrongFirst, Verdict::A) | (Order::WeakFirst, Verdict::B) => 1.0,
        (Order::StrongFirst, Verdict::B) | (Order::WeakFirst, Verdict::A) => 0.0,
        (_, Verdict::Tie) => 0.5,
    }
}

/// What the judge is shown: the conversation before the request (when there is one), the
/// request, and the two answers in the order given.
fn judge_request(entry: &Entry, first: &str, second: &str) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    let earlier = entry
        .conversation
        .as_deref()
        .and_then(<[Value]>::split_last)
        .map_or(&[][..], |(_, earlier)| earlier);
    if !earlier.is_empty() {
        text.push_str("[The conversation before the request]\n");
        for message in earlier {
            let role = message.get("role").and_then(Value::as_str).unwrap_or("unknown");
            let _ = writeln!(text, "{role}: {}", crate::request::message_text(message));
        }
        text.push('\n');
    }
    let prompt = &entry.prompt;
    let _ = write!(
        text,
        "[The user's request]\n{prompt}\n\n[The answer of assistant A]\n{first}\n\n[The answer of assistant B]\n{second}"
    );
    text
}

/// One model's answer to one request, with what it cost.
#[derive(Debug)]
struct Answer {
    text: String,
    usage: Usage,
    price: Option<Price>,
}

/// The judge: a model the gateway serves, or one of its own.
enum Judge {
    Configured(String),
    Outside(Box<Upstream>),
}

/// One labelled prompt, as it is written.
#[derive(Serialize)]
struct Labelled<'a> {
    prompt: &'a str,
    model_a: &'a str,
    model_b: &'a str,
    winner: &'static str,
    p_b_wins: f64,
    scores: BTreeMap<&'a str, f64>,
    judge: &'a str,
    judgements: &'a [Judgement],
    answers: BTreeMap<&'static str, &'a str>,
    /// How many messages of a conversation came before the prompt (the models answered
    /// after them); left out for a prompt asked on its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    context_messages: Option<usize>,
}

/// The battle's winner for the strong model's share of the verdicts: `model_a` is the strong
/// model, as `train` reads battles.
fn winner_of(strong_share: f64) -> &'static str {
    match strong_share {
        share if share > 0.5 => "model_a",
        share if share < 0.5 => "model_b",
        _ => "tie",
    }
}

#[derive(Serialize)]
struct Judgement {
    order: Order,
    /// `model_a` (the strong model), `model_b` or `tie`; null when the judge gave none.
    winner: Option<&'static str>,
}

/// What one prompt's labelling produced, before it is written.
struct Outcome {
    prompt: String,
    /// How many messages the answers were given after; `None` for a prompt asked on its own.
    context_messages: Option<usize>,
    strong: Answer,
    weak: Answer,
    judgements: Vec<Judgement>,
    strong_share: f64,
}

/// Asks both configured models and the judge; one per process.
pub struct Labeller {
    gateway: Gateway,
    strong: String,
    weak: String,
    judge_name: String,
    judge: Judge,
    options: LabelOptions,
}

impl Labeller {
    /// Resolves the two models and the judge as `serve` resolves models.
    pub fn new(config: &Config, options: LabelOptions) -> Result<Self, Error> {
        let strong = config.strong_model.primary().name.clone();
        let weak = config.weak_model.primary().name.clone();
        if strong == weak {
            return Err(Error::Config(format!(
                "the strong and the weak model are both `{strong}`: there is nothing to compare"
            )));
        }
        if options.concurrency == 0 {
            return Err(Error::invalid("--concurrency must be at least 1"));
        }
        if options.attempts == 0 {
            return Err(Error::invalid("--attempts must be at least 1"));
        }
        if let Some(temperature) = options.judge_temperature
            && !(0.0..=2.0).contains(&temperature)
        {
            return Err(Error::invalid(format!(
                "--judge-temperature {temperature} is outside [0, 2]"
            )));
        }
        // Labelling needs the models, not the routers.
        let gateway = Gateway::with_routers(config, BTreeMap::new())?;
        let judge_name = options.judge.clone().unwrap_or_else(|| strong.clone());
        let judge = if gateway.direct(&judge_name).is_some() {
            Judge::Configured(judge_name.clone())
        } else {
            let env = |name: &str| std::env::var(name).ok();
            let model = crate::providers::resolve(
                &ModelConfig::named(judge_name.clone()),
                &config.global,
                &config.providers,
                &env,
            )?;
            if let Some(warning) = model.missing_key_warning() {
                tracing::warn!("judge: {warning}");
            }
            Judge::Outside(Box::new(Upstream::new(model)?))
        };
        Ok(Self {
            gateway,
            strong,
            weak,
            judge_name,
            judge,
            options,
        })
    }

    /// Labels the prompts `out` does not hold yet, appending a line per prompt as it
    /// finishes. A prompt that fails is reported in the summary and left for a rerun.
    pub async fn run(&self, prompts: Vec<Entry>, out: &Path) -> Result<LabelSummary, Error> {
        let mut summary = LabelSummary::default();
        let mut seen = labelled_prompts(out).await?;
        let mut todo = Vec::new();
        for prompt in prompts {
            // One label per prompt text, as the routers see it: the same last turn after
            // another conversation is not asked again.
            if seen.insert(prompt.prompt.clone()) {
                todo.push(prompt);
            } else {
                summary.already_labelled += 1;
            }
        }
        if let Some(seed) = self.options.sample_seed {
            sample_order(&mut todo, seed);
        }
        if let Some(limit) = self.options.limit {
            summary.not_started = todo.len().saturating_sub(limit);
            todo.truncate(limit);
        }
        let mut file = open_for_append(out).await?;
        let progress = crate::progress::Progress::for_slow_items("labelling", todo.len());
        let mut spent = Spent::default();
        let mut outcomes = futures_util::stream::iter(todo)
            .map(|entry| async move {
                let mut spent = Spent::default();
                let outcome = self.label(&entry, &mut spent).await;
                (entry.prompt, outcome, spent)
            })
            .buffer_unordered(self.options.concurrency);
        while let Some((prompt, outcome, spent_on_it)) = outcomes.next().await {
            progress.advance(1);
            spent.absorb(spent_on_it);
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(error) => {
                    summary.failed.push((prompt, error.to_string()));
                    continue;
                }
            };
            let line = self.line(&outcome)?;
            file.write_all(line.as_bytes())
                .await
                .map_err(|error| Error::io(out.display().to_string(), error))?;
            file.flush()
                .await
                .map_err(|error| Error::io(out.display().to_string(), error))?;
            summary.labelled += 1;
            if let [first, second] = outcome.judgements.as_slice()
                && let (Some(first), Some(second)) = (first.winner, second.winner)
            {
                summary.judged_twice += 1;
                summary.consistent += usize::from(first == second);
            }
            match winner_of(outcome.strong_share) {
                "model_a" => summary.strong_wins += 1,
                "model_b" => summary.weak_wins += 1,
                _ => summary.ties += 1,
            }
        }
        summary.usage = spent.usage;
        summary.cost = (!spent.unpriced).then_some(spent.cost);
        Ok(summary)
    }

    /// The JSON line for one labelled prompt.
    fn line(&self, outcome: &Outcome) -> Result<String, Error> {
        let share = outcome.strong_share;
        let record = Labelled {
            prompt: &outcome.prompt,
            model_a: &self.strong,
            model_b: &self.weak,
            winner: winner_of(share),
            p_b_wins: 1.0 - share,
            scores: BTreeMap::from([(self.strong.as_str(), share), (self.weak.as_str(), 1.0 - share)]),
            judge: &self.judge_name,
            judgements: &outcome.judgements,
            answers: BTreeMap::from([
                ("model_a", outcome.strong.text.as_str()),
                ("model_b", outcome.weak.text.as_str()),
            ]),
            context_messages: outcome.context_messages,
        };
        let mut line =
            serde_json::to_string(&record).map_err(|error| Error::Internal(format!("a label line: {error}")))?;
        line.push('\n');
        Ok(line)
    }

    /// Both answers, then the judge's verdicts; what every call that answered cost goes to
    /// `spent`, whether or not the prompt ends up labelled.
    async fn label(&self, entry: &Entry, spent: &mut Spent) -> Result<Outcome, Error> {
        let prompt = entry.prompt.as_str();
        let (strong, weak) = tokio::join!(self.answer(&self.strong, entry), self.answer(&self.weak, entry));
        for answer in [&strong, &weak].into_iter().flatten() {
            spent.add(answer);
        }
        let (strong, weak) = (strong?, weak?);
        let orders: &[Order] = if self.options.both_orders {
            &[Order::StrongFirst, Order::WeakFirst]
        } else if crate::rng::fnv1a(crate::rng::FNV_OFFSET, prompt.as_bytes()) % 2 == 0 {
            // Which answer comes first is fixed per prompt, so reruns ask the same question.
            &[Order::StrongFirst]
        } else {
            &[Order::WeakFirst]
        };
        let judged = futures_util::future::join_all(orders.iter().map(|&order| {
            let (first, second) = match order {
                Order::StrongFirst => (&strong.text, &weak.text),
                Order::WeakFirst => (&weak.text, &strong.text),
            };
            self.judge(judge_request(entry, first, second))
        }))
        .await;
        for answer in judged.iter().flatten() {
            spent.add(answer);
        }
        let mut judgements = Vec::with_capacity(orders.len());
        let mut scores = Vec::new();
        for (&order, judged) in orders.iter().zip(judged) {
            let answer = judged?;
            let verdict = verdict_of(&answer.text);
            let score = verdict.map(|verdict| strong_score(order, verdict));
            judgements.push(Judgement {
                order,
                winner: score.map(winner_of),
            });
            scores.extend(score);
        }
        if scores.is_empty() {
            return Err(Error::UpstreamProtocol {
                model: self.judge_name.clone(),
                reason: "the judge gave no verdict ([[A]], [[B]] or [[C]], exactly one of them)".to_owned(),
            });
        }
        #[allow(clippy::cast_precision_loss)] // one or two verdicts
        let strong_share = scores.iter().sum::<f64>() / scores.len() as f64;
        Ok(Outcome {
            prompt: prompt.to_owned(),
            context_messages: (entry.conversation.as_ref())
                .map(|messages| messages.len().saturating_sub(1))
                .filter(|earlier| *earlier > 0),
            strong,
            weak,
            judgements,
            strong_share,
        })
    }

    /// A configured model's answer to the entry: after its conversation when it has one,
    /// else to its prompt as a one-turn conversation.
    async fn answer(&self, model: &str, entry: &Entry) -> Result<Answer, Error> {
        let messages = match &entry.conversation {
            Some(conversation) => json!(conversation),
            None => json!([{"role": "user", "content": entry.prompt}]),
        };
        let mut body = json!({"model": model, "messages": messages});
        if let Some(max_tokens) = self.options.max_tokens {
            body["max_tokens"] = json!(max_tokens);
        }
        self.ask_configured(model, &body).await
    }

    /// The judge's reply to one comparison.
    async fn judge(&self, comparison: String) -> Result<Answer, Error> {
        let mut body = json!({
            "model": self.judge_name,
            "messages": [
                {"role": "system", "content": JUDGE_INSTRUCTIONS},
                {"role": "user", "content": comparison},
            ],
        });
        if let Some(temperature) = self.options.judge_temperature {
            body["temperature"] = json!(temperature);
        }
        match &self.judge {
            Judge::Configured(name) => self.ask_configured(name, &body).await,
            Judge::Outside(upstream) => {
                let bytes = serde_json::to_vec(&body).map_err(|error| Error::Internal(error.to_string()))?;
                let reply = self
                    .with_retries(|| async { Ok((self.gateway.ask(upstream, &bytes).await?, upstream.model.price)) })
                    .await?;
                answer_of(&self.judge_name, reply.0, reply.1)
            }
        }
    }

    async fn ask_configured(&self, model: &str, body: &Value) -> Result<Answer, Error> {
        let bytes = serde_json::to_vec(body).map_err(|error| Error::Internal(error.to_string()))?;
        let (reply, price) = self
            .with_retries(|| async {
                let completion = self
                    .gateway
                    .complete_with_headers(Api::ChatCompletions, &bytes, &HeaderMap::new())
                    .await?;
                Ok((completion.reply, completion.price))
            })
            .await?;
        answer_of(model, reply, price)
    }

    /// `call`, again while it fails in a way that passes and attempts remain.
    async fn with_retries<F, Fut>(&self, mut call: F) -> Result<(Reply, Option<Price>), Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(Reply, Option<Price>), Error>>,
    {
        let mut attempt = 1;
        loop {
            let result = call().await;
            match retry_wait(result.as_ref().map(|(reply, _)| reply), attempt) {
                Some(wait) if attempt < self.options.attempts => {
                    tracing::debug!(attempt, wait_ms = wait.as_millis(), "a model call failed; trying again");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                _ => return result,
            }
        }
    }
}

/// Whether a call's outcome is worth another attempt, and after how long: rate limits,
/// server errors, timeouts and refused connections pass; anything else will not.
fn retry_wait(outcome: Result<&Reply, &Error>, attempt: u32) -> Option<Duration> {
    match outcome {
        Ok(Reply::Complete { status, headers, .. })
            if status.is_server_error()
                || *status == axum::http::StatusCode::TOO_MANY_REQUESTS
                || *status == axum::http::StatusCode::REQUEST_TIMEOUT =>
        {
            Some(
                crate::deployments::retry_after(headers)
                    .map_or_else(|| crate::deployments::backoff(attempt), |wait| wait.min(MAX_WAIT)),
            )
        }
        Err(Error::UpstreamUnreachable { .. } | Error::UpstreamTimeout { .. }) => {
            Some(crate::deployments::backoff(attempt))
        }
        _ => None,
    }
}

/// The text of a Chat Completions answer, or why there is none.
fn answer_of(model: &str, reply: Reply, price: Option<Price>) -> Result<Answer, Error> {
    let Reply::Complete { status, body, .. } = reply else {
        return Err(Error::UpstreamProtocol {
            model: model.to_owned(),
            reason: "a stream came back to a request that asked for none".to_owned(),
        });
    };
    if !status.is_success() {
        return Err(Error::UpstreamStatus {
            model: model.to_owned(),
            status,
            body: String::from_utf8_lossy(&body).chars().take(500).collect(),
        });
    }
    let parsed: Value = serde_json::from_slice(&body).map_err(|error| Error::UpstreamProtocol {
        model: model.to_owned(),
        reason: format!("the answer is not JSON ({error})"),
    })?;
    let text = parsed["choices"][0]["message"]["content"]
        .as_str()
        .filter(|text| !text.trim().is_empty())
        .ok_or_else(|| Error::UpstreamProtocol {
            model: model.to_owned(),
            reason: "the answer has no text in choices[0].message.content".to_owned(),
        })?;
    Ok(Answer {
        text: text.to_owned(),
        usage: crate::usage::of_body(&body).unwrap_or_default(),
        price,
    })
}

/// Orders `prompts` by a hash of `seed` and each prompt's text: a permutation that does not
/// depend on the order they came in. The first N are a uniform sample of the set (a prompt
/// log is in time order: its first N are one morning's traffic), and a rerun extends the
/// same sample, since the prompts already labelled were its first ones.
pub fn sample_order<T: AsRef<str>>(prompts: &mut [T], seed: u64) {
    let start = crate::rng::mix(seed ^ crate::rng::FNV_OFFSET);
    prompts.sort_by_cached_key(|prompt| {
        let text = prompt.as_ref();
        (
            crate::rng::mix(crate::rng::fnv1a(start, text.as_bytes())),
            text.to_owned(),
        )
    });
}

/// The prompts `out` already holds. A line that is not a label (a run killed mid-write
/// leaves at most a partial last line) stops the run rather than be appended after.
async fn labelled_prompts(out: &Path) -> Result<HashSet<String>, Error> {
    let text = match tokio::fs::read_to_string(out).await {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(error) => return Err(Error::io(out.display().to_string(), error)),
    };
    let mut prompts = HashSet::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let prompt = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|row| row.get("prompt").and_then(Value::as_str).map(str::to_owned));
        let Some(prompt) = prompt else {
            return Err(Error::invalid(format!(
                "{}:{}: not a label line (a JSON object with a `prompt`); remove or fix it, then run again",
                out.display(),
                number + 1
            )));
        };
        prompts.insert(prompt);
    }
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(Error::invalid(format!(
            "{}: the last line does not end with a newline; add one, then run again",
            out.display()
        )));
    }
    Ok(prompts)
}

async fn open_for_append(out: &Path) -> Result<tokio::fs::File, Error> {
    let mut options = tokio::fs::OpenOptions::new();
    options.create(true).append(true);
    // Prompts and answers are user data, as in the prompt log: the owner's alone.
    #[cfg(unix)]
    options.mode(0o600);
    options
        .open(out)
        .await
        .map_err(|error| Error::io(out.display().to_string(), error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_depends_on_the_prompts_and_the_seed_not_on_the_file_order() {
        let prompts: Vec<String> = (0..200).map(|i| format!("prompt {i}")).collect();
        let mut sampled = prompts.clone();
        sample_order(&mut sampled, 7);
        let mut reversed: Vec<String> = prompts.iter().rev().cloned().collect();
        sample_order(&mut reversed, 7);
        assert_eq!(sampled, reversed, "the same prompts in another order, the same sample");
        let mut kept: Vec<&String> = sampled.iter().collect();
        kept.sort();
        let mut all: Vec<&String> = prompts.iter().collect();
        all.sort();
        assert_eq!(kept, all, "a permutation: nothing lost or repeated");
        // Not the file order, and another seed draws another sample.
        assert_ne!(sampled[..20], prompts[..20]);
        let mut other = prompts.clone();
        sample_order(&mut other, 8);
        assert_ne!(other[..20], sampled[..20]);
        // Spread over the whole file: the first 50 drawn come from every quarter of it.
        for quarter in 0..4 {
            let drawn = sampled[..50]
                .iter()
                .filter(|prompt| {
                    let index: usize = prompt["prompt ".len()..].parse().unwrap();
                    index / 50 == quarter
                })
                .count();
            assert!((4..=25).contains(&drawn), "quarter {quarter}: {drawn} of the first 50");
        }
    }

    #[test]
    fn a_verdict_is_the_one_marker_in_the_reply() {
        assert_eq!(verdict_of("A is right, B miscounts.\n[[A]]"), Some(Verdict::A));
        assert_eq!(verdict_of("[[B]]"), Some(Verdict::B));
        assert_eq!(verdict_of("Both fine. [[C]]"), Some(Verdict::Tie));
        // Repeating a marker is still one verdict.
        assert_eq!(verdict_of("[[B]] ... so [[B]]"), Some(Verdict::B));
        assert_eq!(verdict_of("no verdict here"), None);
        // An echo of the instructions names every marker: no verdict, not the last one.
        assert_eq!(verdict_of(JUDGE_INSTRUCTIONS), None);
        assert_eq!(verdict_of("[[A]] or maybe [[B]]"), None);
    }

    #[test]
    fn verdicts_score_the_strong_model_whichever_order_it_was_shown_in() {
        assert!((strong_score(Order::StrongFirst, Verdict::A) - 1.0).abs() < f64::EPSILON);
        assert!(strong_score(Order::StrongFirst, Verdict::B).abs() < f64::EPSILON);
        assert!(strong_score(Order::WeakFirst, Verdict::A).abs() < f64::EPSILON);
        assert!((strong_score(Order::WeakFirst, Verdict::B) - 1.0).abs() < f64::EPSILON);
        assert!((strong_score(Order::WeakFirst, Verdict::Tie) - 0.5).abs() < f64::EPSILON);
    }

    #[test]
    fn the_comparison_shows_the_request_and_both_answers_in_order() {
        let lone = Entry::from("What is 2+2?".to_owned());
        let text = judge_request(&lone, "4", "5");
        let request = text.find("What is 2+2?").unwrap();
        let first = text.find("assistant A]\n4").unwrap();
        let second = text.find("assistant B]\n5").unwrap();
        assert!(request < first && first < second, "{text}");
    }

    #[test]
    fn rate_limits_and_server_errors_are_tried_again_client_errors_are_not() {
        let reply = |status: u16, headers: &[(&'static str, &'static str)]| Reply::Complete {
            status: axum::http::StatusCode::from_u16(status).unwrap(),
            headers: headers
                .iter()
                .map(|(name, value)| (axum::http::HeaderName::from_static(name), value.parse().unwrap()))
                .collect(),
            body: bytes::Bytes::new(),
        };
        let wait = |reply: &Reply, attempt| retry_wait(Ok(reply), attempt);
        assert_eq!(
            wait(&reply(429, &[("retry-after-ms", "250")]), 1),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            wait(&reply(429, &[("retry-after", "3600")]), 1),
            Some(MAX_WAIT),
            "capped"
        );
        assert_eq!(wait(&reply(503, &[]), 1), Some(Duration::from_millis(500)));
        assert_eq!(wait(&reply(500, &[]), 3), Some(Duration::from_secs(2)), "backs off");
        assert_eq!(wait(&reply(400, &[]), 1), None);
        assert_eq!(wait(&reply(401, &[]), 1), None);
        assert_eq!(wait(&reply(200, &[]), 1), None);
        let unreachable = Error::UpstreamUnreachable {
            model: "m".into(),
            reason: "refused".into(),
        };
        assert_eq!(retry_wait(Err(&unreachable), 2), Some(Duration::from_secs(1)));
        assert_eq!(retry_wait(Err(&Error::ModelNotFound("m".into())), 1), None);
    }

    #[test]
    fn an_answer_needs_success_and_text() {
        let reply = |status: u16, body: &str| Reply::Complete {
            status: axum::http::StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: bytes::Bytes::from(body.to_owned()),
        };
        let ok = r#"{"choices":[{"message":{"content":"four"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
        let answer = answer_of("m", reply(200, ok), None).unwrap();
        assert_eq!(answer.text, "four");
        assert_eq!(answer.usage.prompt_tokens, 3);
        let error = answer_of("m", reply(429, r#"{"error":{"message":"slow down"}}"#), None).unwrap_err();
        assert!(
            error.to_string().contains("429") && error.to_string().contains("slow down"),
            "{error}"
        );
        let empty = r#"{"choices":[{"message":{"content":null,"tool_calls":[]}}]}"#;
        assert!(answer_of("m", reply(200, empty), None).is_err());
        assert!(answer_of("m", reply(200, "<html>"), None).is_err());
    }

    #[tokio::test]
    async fn a_partial_last_line_stops_a_rerun_instead_of_being_appended_to() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let out = dir.join("labels.jsonl");
        std::fs::write(&out, "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n").unwrap();
        let held = labelled_prompts(&out).await.unwrap();
        assert!(held.contains("a") && held.contains("b") && held.len() == 2);
        std::fs::write(&out, "{\"prompt\": \"a\"}\n{\"prompt\": \"b").unwrap();
        let error = labelled_prompts(&out).await.unwrap_err();
        assert!(error.to_string().contains(":2:"), "{error}");
        std::fs::write(&out, "{\"prompt\": \"a\"}").unwrap();
        assert!(labelled_prompts(&out).await.is_err());
        assert!(labelled_prompts(&dir.join("absent.jsonl")).await.unwrap().is_empty());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let fresh = dir.join("fresh.jsonl");
            drop(open_for_append(&fresh).await.unwrap());
            assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
