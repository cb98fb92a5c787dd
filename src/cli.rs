//! The command line: `routellm serve` and friends, parsed with clap and dispatched here so
//! `main.rs` stays a one-liner.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{Config, LogFormat, OnRouterError, OnUpstreamError, Overrides, ScoreTurns, Secret};
use crate::controller::Controller;
use crate::gateway::{Gateway, Tier};
use crate::providers::Endpoint;
use crate::server::{self, AppState};
use crate::strong_share::MIN_TRACKED_SCORES;

/// Route LLM requests between a strong and a weak model, offline and fast.
#[derive(Debug, Parser)]
#[command(name = "routellm", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the OpenAI-compatible routing server.
    Serve(ServeArgs),
    /// Score one prompt and print which model it would be routed to.
    Route(RouteArgs),
    /// Measure routers on a benchmark: APGR with confidence intervals, CPT, a plot.
    Eval(EvalArgs),
    /// Print the threshold that sends a chosen share of prompts to the strong model.
    Calibrate(CalibrateArgs),
    /// Score a file of prompts with each router, one JSON line per prompt and router.
    Score(ScoreArgs),
    /// Label your own prompts: both models answer, a judge compares the answers; the output
    /// is training data for `train` and a benchmark for `eval`.
    Label(LabelArgs),
    /// Train a router on your own data.
    #[command(subcommand)]
    Train(TrainCommand),
    /// Distil MiniLM into the static token-embedding table (Model2Vec's recipe).
    Distill(DistillArgs),
    /// Serve canned chat completions instantly, as an upstream for load tests.
    MockUpstream(MockUpstreamArgs),
    /// Ask the server running on this machine whether it answers (exit status 0 when its
    /// `/health` does): a container health check that needs no curl in the image.
    Health(HealthArgs),
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The server's config file, for the `host` and `port` it sets.
    #[arg(long, env = "ROUTELLM_CONFIG")]
    pub config: Option<PathBuf>,
    /// The server's port. [default: the config's, else 6060]
    #[arg(long, short, env = "ROUTELLM_PORT")]
    pub port: Option<u16>,
    /// The server's address; one it listens on for every interface (`0.0.0.0`, `::`) is
    /// asked on loopback. [default: the config's, else 0.0.0.0]
    #[arg(long, env = "ROUTELLM_HOST")]
    pub host: Option<String>,
    /// How long to wait for the answer.
    #[arg(long, default_value_t = 3)]
    pub timeout_secs: u64,
}

#[derive(Debug, Args)]
pub struct MockUpstreamArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start-up).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
}

#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// RouteLLM's matrix factorisation on pairwise battles and correctness data.
    Mf(TrainMfArgs),
    /// RouteLLM's similarity-weighted ranking: the index of training prompts and tier results.
    #[command(name = "sw_ranking", alias = "sw-ranking")]
    SwRanking(TrainSwRankingArgs),
    /// The BERT classifier: a three-label head over MiniLM, the encoder frozen or its top layer fine-tuned.
    Bert(TrainBertArgs),
}

#[derive(Debug, Args)]
pub struct TrainBertArgs {
    /// Training files or folders of `.jsonl` (battles or correctness; see ../shared/data/README.md).
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// The all-MiniLM-L6-v2 folder (the encoder).
    #[arg(long)]
    pub minilm_path: PathBuf,
    /// What the encoder sees of prompts over 256 tokens: `head` (sentence-transformers) or `head_tail`.
    #[arg(long, default_value = "head_tail", value_parser = parse_truncation)]
    pub truncation: crate::embed::Truncation,
    #[arg(long, default_value = "routers/bert")]
    pub out: PathBuf,
    /// L2 strengths tried; the best on the validation split ships.
    #[arg(long, num_args = 1.., default_values_t = [1e-4_f32, 1e-3, 1e-2, 1e-1])]
    pub l2: Vec<f32>,
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// One shared bias instead of one per training source.
    #[arg(long)]
    pub shared_bias: bool,
    /// Feed the head the prompt features `mf` uses (length, structure, code, maths and
    /// multiple-choice markers) beside the encoder output.
    #[arg(long)]
    pub features: bool,
    /// Epochs of fine-tuning MiniLM's top layer with the head (0: frozen encoder); the
    /// fine-tuned layer ships only if it beats the frozen encoder on validation.
    #[arg(long, default_value_t = 0)]
    pub fine_tune_epochs: usize,
    /// Adam's step size for the top layer (the head takes ten times that).
    #[arg(long, default_value_t = 2e-5)]
    pub fine_tune_learning_rate: f32,
    /// Prompts per fine-tuning step.
    #[arg(long, default_value_t = 16)]
    pub fine_tune_batch: usize,
    /// Memory the fine-tune may use for the encoder states it keeps (1.5 KiB per token of
    /// every training and validation prompt).
    #[arg(long, default_value_t = 8.0)]
    pub fine_tune_max_memory_gib: f64,
    #[command(flatten)]
    pub split: crate::train::SplitOptions,
}

/// What every `train` command shares: data, output, embedder, split.
#[derive(Debug, Args)]
pub struct TrainCommon {
    /// Training files or folders of `.jsonl` (battles or correctness; see ../shared/data/README.md).
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// `static` (the distilled table in --routers-dir/static), `minilm`, or `openai` (an
    /// OpenAI-compatible embeddings endpoint; the key is read from --openai-api-key-env).
    #[arg(long, default_value = "static")]
    pub embedder: String,
    /// MiniLM folder, for `--embedder minilm`.
    #[arg(long)]
    pub minilm_path: Option<PathBuf>,
    /// Embedding model, for `--embedder openai`.
    #[arg(long, default_value = "text-embedding-3-small")]
    pub openai_model: String,
    /// Embeddings endpoint base URL, for `--embedder openai` [default: `https://api.openai.com/v1`].
    #[arg(long)]
    pub openai_base_url: Option<String>,
    /// The environment variable holding the endpoint's API key, for `--embedder openai`
    /// (a variable, not the key: commands are recorded in manifests).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub openai_api_key_env: String,
    /// What MiniLM sees of prompts over 256 tokens: `head` (sentence-transformers) or `head_tail`.
    #[arg(long, default_value = "head", value_parser = parse_truncation)]
    pub truncation: crate::embed::Truncation,
    #[arg(long, default_value = "routers")]
    pub routers_dir: PathBuf,
    #[command(flatten)]
    pub split: crate::train::SplitOptions,
}

impl TrainCommon {
    fn embedder_config(&self) -> anyhow::Result<crate::embed::EmbedderConfig> {
        Ok(match self.embedder.as_str() {
            "static" => crate::embed::EmbedderConfig::Static,
            "minilm" => crate::embed::EmbedderConfig::Minilm {
                path: self.minilm_path.clone(),
                hub_id: None,
                truncation: Some(self.truncation),
            },
            "openai" => crate::embed::EmbedderConfig::Openai {
                model: self.openai_model.clone(),
                base_url: self.openai_base_url.clone(),
                api_key_env: Some(self.openai_api_key_env.clone()),
                headers: std::collections::BTreeMap::new(),
            },
            other => anyhow::bail!("--embedder must be static, minilm or openai, not `{other}`"),
        })
    }

    /// `out`, or the folder `serve` loads `router` from for this embedder.
    fn out(&self, out: Option<&PathBuf>, router: &str) -> anyhow::Result<PathBuf> {
        Ok(match out {
            Some(out) => out.clone(),
            None => self
                .routers_dir
                .join(crate::routers::default_artifact(router, &self.embedder_config()?)),
        })
    }

    /// The split flags, with the embedding cache defaulted for slow embedders and the
    /// identities of a labelled file's pair unless others were asked for.
    fn split(&self) -> anyhow::Result<crate::train::SplitOptions> {
        let split = if self.embedder == "static" {
            crate::train::SplitOptions {
                embedding_cache: None,
                ..self.split.clone()
            }
        } else {
            self.split.clone().caching_by_default()
        };
        Ok(split.for_labelled_pair(&crate::train::data::expand(&self.data)?)?)
    }
}

#[derive(Debug, Args)]
pub struct TrainSwRankingArgs {
    #[command(flatten)]
    pub common: TrainCommon,
    /// Where the artifact (model.safetensors, manifest.json) is written (default:
    /// `<routers-dir>/sw_ranking`, or `sw_ranking-minilm` / `sw_ranking-openai` for those embedders:
    /// where `serve` looks for it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Model tiers (RouteLLM: 10).
    #[arg(long, default_value_t = crate::routers::sw_ranking::DEFAULT_TIERS)]
    pub tiers: usize,
    /// Weighting sharpnesses tried: battles weigh `10 * 10^(sharpness * sim / max_sim)`
    /// (RouteLLM: 1); the best on the validation split ships.
    #[arg(long, num_args = 1.., default_values_t = [1.0, 2.0, 3.0, 5.0, 10.0])]
    pub sharpness: Vec<f64>,
}

#[derive(Debug, Args)]
pub struct TrainMfArgs {
    #[command(flatten)]
    pub common: TrainCommon,
    /// Where the artifact (model.safetensors, manifest.json) is written (default:
    /// `<routers-dir>/mf`, or `mf-minilm` / `mf-openai` for those embedders:
    /// where `serve` looks for it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    #[arg(long, default_value_t = 3e-3)]
    pub learning_rate: f32,
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f32,
    /// Battles drawn per correctness prompt (pairs of a right and a wrong model).
    #[arg(long, default_value_t = 32)]
    pub max_pairs: usize,
    /// Use prompt features only, without the embedding.
    #[arg(long)]
    pub features_only: bool,
}

#[derive(Debug, Args)]
pub struct DistillArgs {
    /// The MiniLM folder (config.json, tokenizer.json, model.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt files whose token frequencies set the SIF weights.
    #[arg(long, num_args = 1.., required = true)]
    pub corpus: Vec<PathBuf>,
    /// Dimensions kept by PCA.
    #[arg(long, default_value_t = 256)]
    pub dim: usize,
    #[arg(long, default_value = "routers/static")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Routers to evaluate; the `random` and `length` baselines are always added.
    #[arg(long, num_args = 1.., default_value = "random")]
    pub routers: Vec<String>,
    /// `mmlu`, `gsm8k`, `mt-bench`, or a JSONL file of `{"prompt", "scores": {model: number}}`.
    #[arg(long)]
    pub benchmark: String,
    /// A folder laid out like RouteLLM's `routellm/evals` (`mmlu/`, `gsm8k/`, `mt_bench/`).
    #[arg(long, env = "ROUTELLM_EVAL_DATA")]
    pub data_dir: Option<PathBuf>,
    /// Where `<benchmark>.json`, `-scores.jsonl` and `.png` are written.
    #[arg(long, default_value = ".")]
    pub output: PathBuf,
    /// Number of quantile bins; thresholds are their `num_results + 1` edges.
    #[arg(long, default_value_t = 10)]
    pub num_results: usize,
    /// Runs of the random router averaged into its curve.
    #[arg(long, default_value_t = 10)]
    pub random_iters: usize,
    /// Bootstrap replicates for the APGR confidence intervals (0 disables them).
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    #[command(flatten)]
    pub models: BenchmarkModels,
    /// Rescore even when cached scores exist.
    #[arg(long)]
    pub overwrite_cache: bool,
    /// Seed for the random router and the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub artifacts: ArtifactArgs,
}

/// Where offline commands find router settings and artifacts.
#[derive(Debug, Args)]
pub struct ArtifactArgs {
    /// Config file (router settings and the artifacts folder).
    #[arg(long, env = "ROUTELLM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Folder holding trained router artifacts. [default: routers]
    #[arg(long, env = "ROUTELLM_ROUTERS_DIR")]
    pub routers_dir: Option<PathBuf>,
}

/// Which of a benchmark's models are the strong and the weak one (`eval`, `calibrate --benchmark`).
#[derive(Debug, Args)]
pub struct BenchmarkModels {
    /// The benchmark's strong model (column or key); defaults to the benchmark's own (in a
    /// file from `routellm label`, its `model_a`).
    #[arg(long)]
    pub strong_model: Option<String>,
    /// The benchmark's weak model (column or key); defaults to the benchmark's own (in a file
    /// from `routellm label`, its `model_b`).
    #[arg(long)]
    pub weak_model: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("goal").required(true).args(["strong_model_pct", "target_pgr"])))]
pub struct CalibrateArgs {
    /// Routers to calibrate.
    #[arg(long, num_args = 1.., required = true)]
    pub routers: Vec<String>,
    /// Share of prompts to send to the strong model, in [0, 1].
    #[arg(long)]
    pub strong_model_pct: Option<f64>,
    /// Instead of a share, the share of the strong model's quality to keep, in (0, 1]: the
    /// threshold that recovers this much of the gap between the two models on `--benchmark`
    /// with the fewest strong calls.
    #[arg(long, requires = "benchmark", conflicts_with = "prompts")]
    pub target_pgr: Option<f64>,
    /// With --target-pgr: prompts with both models' scores — a file from `routellm label`,
    /// or any `{"prompt", "scores"}` JSONL as `eval` reads it.
    #[arg(long)]
    pub benchmark: Option<PathBuf>,
    /// With --target-pgr: choose the threshold that meets the target in at least this share
    /// of bootstrap replicates of the labelled prompts (e.g. 0.95) rather than on the sample
    /// alone, which meets it on the traffic it stands for only about half the time.
    #[arg(long, requires = "target_pgr")]
    pub confidence: Option<f64>,
    /// With --target-pgr: bootstrap replicates for the interval of the recovered share and for
    /// --confidence (0 disables the interval).
    #[arg(long, default_value_t = 1000, requires = "target_pgr")]
    pub bootstrap: usize,
    /// Seed for the bootstrap.
    #[arg(long, default_value_t = 0, requires = "target_pgr")]
    pub seed: u64,
    #[command(flatten)]
    pub models: BenchmarkModels,
    /// Your traffic: JSONL with `prompt` or `messages`, or plain text, one prompt per line.
    /// [default: the calibration set shipped in routers/calibration/prompts.jsonl]
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Which user turns of a chat entry (`messages`) to score: `last`, or `max` (the highest
    /// score among the last 8), as `serve` routes with the same setting. [default: the
    /// config's `score_turns`, else last]
    #[arg(long, env = "ROUTELLM_SCORE_TURNS", value_enum)]
    pub score_turns: Option<ScoreTurns>,
    /// Print one JSON object per router (`router`, `threshold`, `strong_model_pct` or
    /// `target_pgr` and `achieved_pgr`, `achieved_pct`, `prompts`) instead of a sentence, for
    /// scripts that update the config.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub artifacts: ArtifactArgs,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Routers to score with.
    #[arg(long, num_args = 1.., required = true)]
    pub routers: Vec<String>,
    /// Prompts: JSONL with `prompt` or `messages`, or plain text, one prompt per line.
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSONL file. [default: standard output]
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Seed for the random router, for reproducible output.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Which user turns of a chat entry (`messages`) to score: `last`, or `max` (the highest
    /// score among the last 8), as `serve` routes with the same setting. [default: the
    /// config's `score_turns`, else last]
    #[arg(long, env = "ROUTELLM_SCORE_TURNS", value_enum)]
    pub score_turns: Option<ScoreTurns>,
    #[command(flatten)]
    pub artifacts: ArtifactArgs,
}

/// Settings shared by every command that loads routers and models.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// YAML config file; flags and environment variables override its values.
    #[arg(long, env = "ROUTELLM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Routers to load, e.g. `--routers random mf` (environment: comma-separated).
    #[arg(long, env = "ROUTELLM_ROUTERS", num_args = 1.., value_delimiter = ',')]
    pub routers: Option<Vec<String>>,
    /// The strong, expensive model, e.g. `openai/gpt-4o` or `echo/gpt-4o` (offline). [default: gpt-4-1106-preview]
    #[arg(long, env = "ROUTELLM_STRONG_MODEL")]
    pub strong_model: Option<String>,
    /// The weak, cheap model, e.g. `groq/llama3-8b-8192`. [default: anyscale/mistralai/Mixtral-8x7B-Instruct-v0.1]
    #[arg(long, env = "ROUTELLM_WEAK_MODEL")]
    pub weak_model: Option<String>,
    /// Base URL applied to both models, overriding their providers' endpoints.
    #[arg(long, env = "ROUTELLM_BASE_URL")]
    pub base_url: Option<String>,
    /// API key applied to both models, overriding their providers' key variables.
    #[arg(long, env = "ROUTELLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Folder holding trained router artifacts. [default: routers]
    #[arg(long, env = "ROUTELLM_ROUTERS_DIR")]
    pub routers_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Port to listen on. [default: 6060]
    #[arg(long, short, env = "ROUTELLM_PORT")]
    pub port: Option<u16>,
    /// Address to listen on. [default: 0.0.0.0]
    #[arg(long, env = "ROUTELLM_HOST")]
    pub host: Option<String>,
    /// Log line format.
    #[arg(long, env = "ROUTELLM_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log one line per request (router, score, tier, model, status, timings, the client's
    /// x-request-id) at info level, target `routellm::access`. [default: false]
    #[arg(long, env = "ROUTELLM_ACCESS_LOG", num_args = 0..=1, default_missing_value = "true")]
    pub access_log: Option<bool>,
    /// Which model answers a routed request whose router cannot score it (e.g. its
    /// embeddings endpoint is down), or `error` for a 500. [default: strong]
    #[arg(long, env = "ROUTELLM_ON_ROUTER_ERROR", value_enum)]
    pub on_router_error: Option<OnRouterError>,
    /// What a routed request gets when its model is rate-limited (429), failing (5xx),
    /// unreachable or too slow before answering: `fail` passes that error on,
    /// `other_model` asks the other model once. [default: fail]
    #[arg(long, env = "ROUTELLM_ON_UPSTREAM_ERROR", value_enum)]
    pub on_upstream_error: Option<OnUpstreamError>,
    /// Which user turns of a conversation the router scores: `last` (RouteLLM's), or `max`,
    /// the highest score among the last 8, so a conversation that needed the strong model
    /// keeps it for its short follow-ups. [default: last]
    #[arg(long, env = "ROUTELLM_SCORE_TURNS", value_enum)]
    pub score_turns: Option<ScoreTurns>,
    /// Append what routers score (a sample of routed requests, see `prompt_log` in the
    /// config) to this JSONL file, which `calibrate --prompts` reads. [default: off]
    #[arg(long, env = "ROUTELLM_PROMPT_LOG", value_name = "PATH")]
    pub prompt_log: Option<PathBuf>,
    /// A name clients may send as `model` for a router or a configured model, e.g.
    /// `--model-alias auto=router-mf-0.79329`; repeatable (environment: comma-separated),
    /// added to the config's `model_aliases`.
    #[arg(long = "model-alias", env = "ROUTELLM_MODEL_ALIASES", value_name = "NAME=MODEL",
          value_delimiter = ',', value_parser = parse_alias)]
    pub model_aliases: Vec<(String, String)>,
    /// Share client keys' rate limits and budgets with other replicas in this Redis,
    /// `redis://[:password@]host:port/db` (see `shared_state` in the config). [default: per process]
    #[arg(long, env = "ROUTELLM_REDIS_URL", hide_env_values = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// That Redis is one node of a Redis Cluster: the others are found from it
    /// (`shared_state.cluster`). [default: the config's, else false]
    #[arg(long, env = "ROUTELLM_REDIS_CLUSTER", num_args = 0..=1, default_missing_value = "true")]
    pub redis_cluster: Option<bool>,
    /// Load the configuration, the routers and both models as `serve` would, print what
    /// would be served (no secrets), and exit without listening: for deployment pipelines.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Args)]
pub struct LabelArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Prompts: JSONL with `prompt` or `messages` (the last user turn, answered after the
    /// conversation when the line has one; a prompt log reads as it is), or plain text, one
    /// prompt per line.
    #[arg(long)]
    pub prompts: PathBuf,
    /// JSONL file the labels are appended to; prompts it already holds are not asked again.
    #[arg(long)]
    pub out: PathBuf,
    /// The judge: a configured model, or any `<provider>/<model>` the config resolves.
    /// [default: the strong model]
    #[arg(long)]
    pub judge: Option<String>,
    /// Judge each pair once, in an order fixed per prompt, instead of in both orders:
    /// half the judge's cost, with its position bias left in.
    #[arg(long)]
    pub one_order: bool,
    /// Prompts labelled at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// `max_tokens` for the two models' answers (leave unset for models that refuse it,
    /// such as OpenAI's reasoning models). [default: each model's own]
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// The judge's `temperature`, in [0, 2]: 0 makes its verdicts as repeatable as the model
    /// allows, as MT-Bench's judge runs (leave unset for models that refuse
    /// it, such as OpenAI's reasoning models). [default: the judge's own]
    #[arg(long)]
    pub judge_temperature: Option<f64>,
    /// Label at most this many new prompts (a trial run, or a budget).
    #[arg(long)]
    pub limit: Option<usize>,
    /// With --limit: a uniform random sample of the prompts instead of the first ones (a
    /// prompt log is in time order), fixed by --seed; each rerun extends the same sample.
    #[arg(long)]
    pub sample: bool,
    /// The seed of --sample.
    #[arg(long, default_value_t = 0, requires = "sample")]
    pub seed: u64,
    /// Tries per model call: rate limits, server errors, timeouts and refused connections
    /// are tried again after the wait `retry-after` asks (at most a minute), else 0.5 s, 1 s, ...
    #[arg(long, default_value_t = crate::label::DEFAULT_ATTEMPTS)]
    pub attempts: u32,
}

#[derive(Debug, Args)]
pub struct RouteArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The router to score with.
    #[arg(long, default_value = "random")]
    pub router: String,
    /// Strong when the win rate is at or above this; defaults to the configured threshold.
    #[arg(long)]
    pub threshold: Option<f64>,
    /// The prompt to score.
    pub prompt: String,
}

impl CommonArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            routers: self.routers.clone(),
            strong_model: self.strong_model.clone(),
            weak_model: self.weak_model.clone(),
            base_url: self.base_url.clone(),
            api_key: self.api_key.clone().map(Secret::new),
            routers_dir: self.routers_dir.clone(),
            ..Overrides::default()
        }
    }
}

/// Parses the command line and runs the command.
pub async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Route(args) => route(args).await,
        Command::Eval(args) => tokio::task::spawn_blocking(move || eval(&args)).await?,
        Command::Calibrate(args) => tokio::task::spawn_blocking(move || calibrate(&args)).await?,
        Command::Score(args) => tokio::task::spawn_blocking(move || score(&args)).await?,
        Command::Label(args) => label(args).await,
        Command::Train(TrainCommand::Mf(args)) => tokio::task::spawn_blocking(move || train_mf(&args)).await?,
        Command::Train(TrainCommand::SwRanking(args)) => {
            tokio::task::spawn_blocking(move || train_sw_ranking(&args)).await?
        }
        Command::Train(TrainCommand::Bert(args)) => tokio::task::spawn_blocking(move || train_bert(&args)).await?,
        Command::Distill(args) => tokio::task::spawn_blocking(move || distill(&args)).await?,
        Command::MockUpstream(args) => mock_upstream(&args).await,
        Command::Health(args) => health(&args).await,
    }
}

/// `routellm health`: GET `/health` of the server the config (or flags, or environment)
/// describes; an error, and so exit status 1, unless it answers 200.
async fn health(args: &HealthArgs) -> anyhow::Result<()> {
    let file = args
        .config
        .as_deref()
        .map(crate::config::FileConfig::read)
        .transpose()?;
    let (file_host, file_port) = file.as_ref().map_or((None, None), crate::config::FileConfig::listen);
    let host = args
        .host
        .as_deref()
        .or(file_host)
        .unwrap_or(crate::config::DEFAULT_HOST);
    let host = match host {
        "0.0.0.0" | "" => "127.0.0.1",
        "::" | "[::]" => "::1",
        specific => specific,
    };
    let port = args.port.or(file_port).unwrap_or(crate::config::DEFAULT_PORT);
    let url = format!("http://{}:{port}/health", bracket_ipv6(host));
    crate::upstream::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(args.timeout_secs.max(1)))
        .no_proxy()
        .build()?;
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("{url} does not answer"))?;
    anyhow::ensure!(
        response.status() == reqwest::StatusCode::OK,
        "{url} answered {}",
        response.status()
    );
    println!("{url}: ok");
    Ok(())
}

async fn mock_upstream(args: &MockUpstreamArgs) -> anyhow::Result<()> {
    let address: SocketAddr = format!("{}:{}", bracket_ipv6(&args.host), args.port).parse()?;
    let listener = tokio::net::TcpListener::bind(address).await?;
    eprintln!("mock upstream listening address={}", listener.local_addr()?);
    axum::serve(listener, crate::mock_upstream::app())
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

/// The command as a manifest records it: `routellm` and its arguments, whatever path the
/// binary ran from (`./target/release/routellm`, a cache dir), so retraining an artifact
/// with the same arguments rewrites its manifest byte for byte on any machine.
fn command_line() -> String {
    std::iter::once("routellm".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The signature `train_mf` and `train_sw_ranking` share: files, embedder, its kind,
/// options, output folder, the command line for the manifest.
type Trainer<O, M> = fn(
    &[PathBuf],
    &std::sync::Arc<dyn crate::embed::Embedder>,
    &str,
    &O,
    &std::path::Path,
    &str,
) -> Result<M, crate::Error>;

/// Reads the data and the embedder of `common`, runs `trainer`, reports where it wrote.
fn run_trainer<O, M>(
    common: &TrainCommon,
    out: &std::path::Path,
    options: &O,
    trainer: Trainer<O, M>,
) -> anyhow::Result<()> {
    let embedder = crate::embed::build(&common.embedder_config()?, &common.routers_dir)?;
    let files = crate::train::data::expand(&common.data)?;
    trainer(&files, &embedder, &common.embedder, options, out, &command_line())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn train_mf(args: &TrainMfArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let options = crate::train::MfOptions {
        hidden: args.hidden,
        epochs: args.epochs,
        learning_rate: args.learning_rate,
        weight_decay: args.weight_decay,
        batch_prompts: 64,
        max_pairs: args.max_pairs,
        use_embedding: !args.features_only,
        split: common.split()?,
    };
    run_trainer(
        common,
        &common.out(args.out.as_ref(), "mf")?,
        &options,
        crate::train::train_mf,
    )
}

fn train_sw_ranking(args: &TrainSwRankingArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let options = crate::train::sw_ranking::SwOptions {
        tiers: args.tiers,
        sharpness_grid: args.sharpness.clone(),
        split: common.split()?,
    };
    run_trainer(
        common,
        &common.out(args.out.as_ref(), "sw_ranking")?,
        &options,
        crate::train::sw_ranking::train_sw_ranking,
    )
}

fn parse_truncation(text: &str) -> Result<crate::embed::Truncation, String> {
    match text {
        "head" => Ok(crate::embed::Truncation::Head),
        "head_tail" | "head-tail" => Ok(crate::embed::Truncation::HeadTail),
        other => Err(format!("`{other}`: expected head or head_tail")),
    }
}

fn gib_to_bytes(gib: f64) -> anyhow::Result<usize> {
    anyhow::ensure!(
        gib.is_finite() && gib > 0.0,
        "--fine-tune-max-memory-gib must be positive, not {gib}"
    );
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    // `as` saturates: an absurdly large limit becomes usize::MAX, not a wrapped value.
    let bytes = (gib * f64::from(1_u32 << 30)) as usize;
    Ok(bytes)
}

fn train_bert(args: &TrainBertArgs) -> anyhow::Result<()> {
    let encoder: std::sync::Arc<dyn crate::embed::Embedder> =
        std::sync::Arc::new(crate::embed::MiniLm::load(&args.minilm_path)?.with_truncation(args.truncation));
    let files = crate::train::data::expand(&args.data)?;
    let options = crate::train::bert::BertOptions {
        l2_grid: args.l2.clone(),
        steps: args.steps,
        learning_rate: 0.01,
        per_source_bias: !args.shared_bias,
        features: args.features,
        fine_tune_epochs: args.fine_tune_epochs,
        fine_tune_learning_rate: args.fine_tune_learning_rate,
        fine_tune_batch: args.fine_tune_batch,
        fine_tune_memory_limit: gib_to_bytes(args.fine_tune_max_memory_gib)?,
        split: args.split.clone().caching_by_default().for_labelled_pair(&files)?,
    };
    crate::train::bert::train_bert(&files, &encoder, &options, &args.out, &command_line())?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn distill(args: &DistillArgs) -> anyhow::Result<()> {
    let minilm = crate::embed::MiniLm::load(&args.model)?;
    let mut corpus = Vec::new();
    for path in &args.corpus {
        if crate::train::data::is_eval_data(path) {
            anyhow::bail!("{} is evaluation data; distil on training prompts only", path.display());
        }
        corpus.extend(crate::prompts::read(path)?);
    }
    // Battle files repeat each prompt once per opponent; frequencies should count text once.
    corpus.sort_unstable();
    corpus.dedup();
    let digest = crate::embed::TableBuilder::distill(&minilm, &corpus, args.dim, &args.out)?;
    let manifest = serde_json::json!({
        "embedder": "static",
        "id": format!("static:{}", &digest[..16]),
        "sha256": digest,
        "source_model": "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0)",
        "source_model_id": crate::embed::Embedder::id(&minilm),
        "dim": args.dim,
        "recipe": "Model2Vec: each vocabulary token through MiniLM as [CLS] token [SEP], output at the token; PCA; SIF weights a/(a+p) with a=1e-3 from corpus token frequencies",
        "corpus": args.corpus.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "corpus_prompts": corpus.len(),
        "command": command_line(),
    });
    std::fs::write(
        args.out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    eprintln!("wrote {} (static:{})", args.out.display(), &digest[..16]);
    Ok(())
}

/// The config that offline commands load routers with: the file plus `--routers-dir`.
fn offline_config(artifacts: &ArtifactArgs) -> anyhow::Result<Config> {
    let overrides = Overrides {
        routers_dir: artifacts.routers_dir.clone(),
        ..Overrides::default()
    };
    Ok(Config::load(artifacts.config.as_deref(), overrides)?)
}

fn eval(args: &EvalArgs) -> anyhow::Result<()> {
    let config = offline_config(&args.artifacts)?;
    let options = crate::eval::EvalOptions {
        routers: args.routers.clone(),
        benchmark: crate::eval::benchmark::BenchmarkKind::parse(&args.benchmark),
        data_dir: args.data_dir.clone(),
        output: args.output.clone(),
        num_results: args.num_results,
        random_iters: args.random_iters,
        bootstrap: args.bootstrap,
        strong_model: args.models.strong_model.clone(),
        weak_model: args.models.weak_model.clone(),
        overwrite_cache: args.overwrite_cache,
        seed: args.seed,
    };
    let report = crate::eval::run(&options, &config)?;
    print!("{}", crate::eval::format_table(&report));
    eprintln!(
        "wrote {0}/{1}.json, {0}/{1}-scores.jsonl and {0}/{1}.png",
        args.output.display(),
        report.benchmark
    );
    Ok(())
}

/// The calibration prompts that ship with the project, used when `--prompts` is absent.
pub const DEFAULT_CALIBRATION_PROMPTS: &str = "calibration/prompts.jsonl";

fn calibrate(args: &CalibrateArgs) -> anyhow::Result<()> {
    let config = offline_config(&args.artifacts)?;
    let Some(strong_model_pct) = args.strong_model_pct else {
        return calibrate_for_quality(args, &config);
    };
    let path = args
        .prompts
        .clone()
        .unwrap_or_else(|| config.routers_dir.join(DEFAULT_CALIBRATION_PROMPTS));
    let prompts = read_entries(&path, args.score_turns.unwrap_or(config.score_turns))?;
    for name in &args.routers {
        let calibration = if name == "random" {
            // Its scores are uniform by construction: the exact answer needs no sample.
            let threshold = 1.0 - strong_model_pct;
            if !(0.0..=1.0).contains(&threshold) {
                anyhow::bail!("--strong-model-pct {strong_model_pct} is outside [0, 1]");
            }
            crate::scoring::Calibration {
                threshold,
                achieved_share: strong_model_pct,
                display: format!("{threshold:.5}"),
            }
        } else {
            let router = crate::routers::build(name, &config)?;
            let scores = prompts.score(router.as_ref(), name)?;
            crate::scoring::calibrate(&scores, strong_model_pct)?
        };
        #[allow(clippy::cast_precision_loss)]
        let half_prompt = 0.5 / prompts.len().max(1) as f64;
        if args.json {
            let threshold = calibration.printed_threshold();
            println!(
                "{}",
                serde_json::json!({
                    "router": name,
                    "threshold": threshold,
                    "strong_model_pct": strong_model_pct,
                    "achieved_pct": calibration.achieved_share,
                    "prompts": prompts.len(),
                })
            );
            continue;
        }
        println!(
            "For {:.1}% strong model calls for {name}, threshold = {}",
            strong_model_pct * 100.0,
            calibration.display
        );
        if (calibration.achieved_share - strong_model_pct).abs() > half_prompt {
            eprintln!(
                "note: tied scores allow {:.1}% rather than {:.1}% on these {} prompts",
                calibration.achieved_share * 100.0,
                strong_model_pct * 100.0,
                prompts.len()
            );
        }
    }
    Ok(())
}

/// `calibrate --target-pgr`: per router, the threshold that keeps that share of the strong
/// model's quality on a labelled set with the fewest strong calls.
fn calibrate_for_quality(args: &CalibrateArgs, config: &Config) -> anyhow::Result<()> {
    let (Some(target), Some(path)) = (args.target_pgr, args.benchmark.as_ref()) else {
        anyhow::bail!("--target-pgr needs --benchmark");
    };
    let benchmark = crate::eval::benchmark::load(
        &crate::eval::benchmark::BenchmarkKind::Generic(path.clone()),
        path.parent().unwrap_or(std::path::Path::new(".")),
        args.models.strong_model.as_deref(),
        args.models.weak_model.as_deref(),
    )?;
    let outcomes: Vec<(f64, f64)> = benchmark
        .outcomes
        .iter()
        .map(|outcome| (outcome.strong_mean(), outcome.weak_mean()))
        .collect();
    let prompts = Entries::Last(benchmark.prompts.clone());
    for name in &args.routers {
        let router = crate::routers::build(name, config)?;
        let scores = prompts.score(router.as_ref(), name)?;
        let bootstrap = (args.bootstrap > 0 || args.confidence.is_some()).then_some(crate::scoring::BootstrapOptions {
            replicates: args.bootstrap,
            seed: args.seed,
            confidence: args.confidence,
        });
        let quality = crate::scoring::calibrate_for_quality(&scores, &outcomes, target, bootstrap)?;
        if args.json {
            println!(
                "{}",
                quality_json(name, target, args.confidence, &quality, prompts.len())
            );
        } else {
            println!(
                "{}",
                quality_sentence(name, target, args.confidence, &quality, prompts.len())
            );
        }
    }
    Ok(())
}

fn quality_json(
    name: &str,
    target: f64,
    confidence: Option<f64>,
    quality: &crate::scoring::QualityCalibration,
    prompts: usize,
) -> serde_json::Value {
    let calibration = &quality.calibration;
    let threshold = calibration.printed_threshold();
    let mut line = serde_json::json!({
        "router": name,
        "threshold": threshold,
        "target_pgr": target,
        "achieved_pgr": quality.achieved_pgr,
        "achieved_pct": calibration.achieved_share,
        "prompts": prompts,
    });
    if let Some(confidence) = confidence {
        line["confidence"] = confidence.into();
    }
    if let Some(bootstrap) = &quality.bootstrap {
        line["replicates_meeting_target"] = bootstrap.meets_target.into();
        line["pgr_interval"] = bootstrap
            .pgr_interval
            .map_or(serde_json::Value::Null, |(low, high)| serde_json::json!([low, high]));
    }
    line
}

fn quality_sentence(
    name: &str,
    target: f64,
    confidence: Option<f64>,
    quality: &crate::scoring::QualityCalibration,
    prompts: usize,
) -> String {
    let calibration = &quality.calibration;
    let goal = match confidence {
        Some(confidence) => format!(
            "{:.1}% of the strong model's quality with {:.0}% confidence",
            target * 100.0,
            confidence * 100.0
        ),
        None => format!("{:.1}% of the strong model's quality", target * 100.0),
    };
    let mut sentence = format!(
        "For {goal} for {name}, threshold = {} ({:.1}% strong model calls on these {prompts} \
         prompts, {:.1}% of the gap recovered",
        calibration.display,
        calibration.achieved_share * 100.0,
        quality.achieved_pgr * 100.0
    );
    if let Some(bootstrap) = &quality.bootstrap {
        if let Some((low, high)) = bootstrap.pgr_interval {
            let _ = write!(sentence, ", 95% interval [{:.1}%, {:.1}%]", low * 100.0, high * 100.0);
        }
        let _ = write!(
            sentence,
            "; at least {:.1}% in {:.1}% of {} resamples",
            target * 100.0,
            bootstrap.meets_target * 100.0,
            bootstrap.replicates
        );
    }
    sentence.push(')');
    sentence
}

/// A prompt file's entries as `score_turns` has a router read them.
enum Entries {
    /// One prompt per entry (a chat entry's last user turn).
    Last(Vec<String>),
    /// Each entry's last user turns, scored by the highest.
    Max(Vec<Vec<String>>),
}

impl Entries {
    fn len(&self) -> usize {
        match self {
            Self::Last(prompts) => prompts.len(),
            Self::Max(entries) => entries.len(),
        }
    }

    fn score(&self, router: &dyn crate::routers::Router, name: &str) -> Result<Vec<f64>, crate::error::Error> {
        match self {
            Self::Last(prompts) => crate::scoring::score_all(router, name, prompts),
            Self::Max(entries) => crate::scoring::score_highest(router, name, entries),
        }
    }
}

fn read_entries(path: &std::path::Path, score_turns: ScoreTurns) -> Result<Entries, crate::error::Error> {
    Ok(match score_turns {
        ScoreTurns::Last => Entries::Last(crate::prompts::read(path)?),
        ScoreTurns::Max => Entries::Max(crate::prompts::read_turns(path, crate::config::MAX_SCORED_TURNS)?),
    })
}

fn score(args: &ScoreArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let config = offline_config(&args.artifacts)?;
    let prompts = read_entries(&args.input, args.score_turns.unwrap_or(config.score_turns))?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    for name in &args.routers {
        let router: std::sync::Arc<dyn crate::routers::Router> = match (name.as_str(), args.seed) {
            ("random", Some(seed)) => std::sync::Arc::new(crate::routers::RandomRouter::with_seed(seed)),
            _ => crate::routers::build(name, &config)?,
        };
        let scores = prompts.score(router.as_ref(), name)?;
        for (index, win_rate) in scores.iter().enumerate() {
            writeln!(
                out,
                "{}",
                serde_json::json!({"index": index, "router": name, "win_rate": win_rate})
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// `NAME=MODEL`, split at the first `=` (a model name may hold one, an alias may not).
fn parse_alias(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((alias, model)) if !alias.trim().is_empty() && !model.trim().is_empty() => {
            Ok((alias.trim().to_owned(), model.trim().to_owned()))
        }
        _ => Err(format!("`{text}` is not NAME=MODEL, e.g. auto=router-mf-0.79329")),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        host: args.host,
        port: args.port,
        log_format: args.log_format,
        access_log: args.access_log,
        on_router_error: args.on_router_error,
        on_upstream_error: args.on_upstream_error,
        score_turns: args.score_turns,
        prompt_log: args.prompt_log,
        model_aliases: args.model_aliases,
        redis_url: args.redis_url.map(Secret::new),
        redis_cluster: args.redis_cluster,
        ..args.common.overrides()
    };
    let reload_overrides = overrides.clone();
    let config = Config::load(args.common.config.as_deref(), overrides).context("loading the configuration")?;
    init_tracing(config.log_format, config.access_log);
    let gateway = Gateway::from_config(&config).context("loading the routers and models")?;
    tracing::info!(
        routers = ?config.routers,
        strong = %gateway.strong().model.name,
        weak = %gateway.weak().model.name,
        "routers loaded"
    );
    for (_, deployment) in gateway.deployments() {
        if let Some(warning) = deployment.upstream.model.missing_key_warning() {
            tracing::warn!("{warning}");
        }
    }
    let address: SocketAddr = format!("{}:{}", bracket_ipv6(&config.host), config.port)
        .parse()
        .with_context(|| format!("`{}` is not an IP address to listen on", config.host))?;
    if args.check {
        print!("{}", describe_setup(&config, &gateway, address));
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {address}"))?;
    let state = AppState::new(gateway);
    #[cfg(unix)]
    reload_on_hangup(state.clone(), args.common.config.clone(), reload_overrides.clone());
    if let (Some(interval), Some(file)) = (config.watch_config, args.common.config.clone()) {
        watch_config_file(state.clone(), file, reload_overrides, interval);
    }
    if config.spend_file.is_some() {
        save_spend_periodically(state.clone());
    }
    if let Some(shared) = state.shared_state() {
        // Serving does not wait for Redis: a failed ping is logged (by the shared state)
        // and requests are decided as `on_failure` says until it answers.
        if shared.ping().await.is_ok() {
            tracing::info!(redis = %shared.address(), "client keys' limits and budgets are shared");
        }
    }
    tracing::info!(address = %listener.local_addr()?, "routellm listening");
    server::run(listener, state.clone(), shutdown_signal())
        .await
        .context("serving")?;
    // What the last answers cost, so the budgets pick up there after a restart.
    state.save_spend().context("writing spend_file")?;
    state.send_shared_charges().await;
    tracing::info!("shut down");
    Ok(())
}

/// Writes the keys' spend to `spend_file` every few seconds, so a crash loses at most
/// that much of it.
fn save_spend_periodically(state: AppState) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(std::time::Duration::from_secs(5));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            ticks.tick().await;
            // File I/O stays off the async workers.
            let saving = state.clone();
            let saved = tokio::task::spawn_blocking(move || saving.save_spend())
                .await
                .unwrap_or_else(|error| Err(crate::Error::Internal(format!("saving the spend: {error}"))));
            // A failure is logged once until the file can be written again.
            match saved {
                Ok(()) => failing = false,
                Err(error) if !failing => {
                    tracing::error!(error = %error, "could not write spend_file; budgets restart from zero if the server does");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    });
}

async fn label(args: LabelArgs) -> anyhow::Result<()> {
    let config = Config::load(args.common.config.as_deref(), args.common.overrides())?;
    init_tracing(config.log_format, false);
    let prompts = crate::prompts::read_entries(&args.prompts)?;
    let options = crate::label::LabelOptions {
        judge: args.judge,
        both_orders: !args.one_order,
        concurrency: args.concurrency,
        max_tokens: args.max_tokens,
        judge_temperature: args.judge_temperature,
        limit: args.limit,
        sample_seed: args.sample.then_some(args.seed),
        attempts: args.attempts,
    };
    let both_orders = options.both_orders;
    let labeller = crate::label::Labeller::new(&config, options)?;
    let summary = labeller.run(prompts, &args.out).await?;
    eprintln!("{}", describe_labelling(&summary, &args.out, both_orders));
    if summary.failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "{} prompts were not labelled (run the same command again to retry only them)",
            summary.failed.len()
        )
    }
}

/// What `label` did, for people: counts, outcomes, tokens and the first few failures.
fn describe_labelling(summary: &crate::label::LabelSummary, out: &std::path::Path, both_orders: bool) -> String {
    use std::fmt::Write as _;
    let mut text = format!(
        "labelled {} prompts into {} ({} already there, {} left by --limit, {} failed)",
        summary.labelled,
        out.display(),
        summary.already_labelled,
        summary.not_started,
        summary.failed.len()
    );
    if summary.labelled > 0 {
        let _ = write!(
            text,
            "\nthe strong model won {}, tied {}, lost {} (judged {})",
            summary.strong_wins,
            summary.ties,
            summary.weak_wins,
            if both_orders { "in both orders" } else { "once" },
        );
    }
    let spent = summary.usage.prompt_tokens + summary.usage.completion_tokens;
    if spent > 0 {
        let _ = write!(
            text,
            "\ntokens spent (failed prompts too): {} prompt, {} completion",
            summary.usage.prompt_tokens, summary.usage.completion_tokens
        );
        if let Some(cost) = summary.cost {
            let _ = write!(text, "; cost {cost:.4}");
        }
    }
    if summary.judged_twice > 0 {
        #[allow(clippy::cast_precision_loss)] // counts of prompts
        let share = summary.consistent as f64 / summary.judged_twice as f64;
        let _ = write!(
            text,
            "\nthe judge gave the same verdict in both orders on {:.0}% of {} prompts{}",
            100.0 * share,
            summary.judged_twice,
            if share < 0.6 {
                " (low: its verdicts follow the answers' positions more than their content)"
            } else {
                ""
            }
        );
    }
    for (prompt, reason) in summary.failed.iter().take(5) {
        let head: String = prompt.chars().take(60).collect();
        let _ = write!(text, "\nnot labelled: {head:?}: {reason}");
    }
    if summary.failed.len() > 5 {
        let _ = write!(text, "\n... and {} more", summary.failed.len() - 5);
    }
    text
}

async fn route(args: RouteArgs) -> anyhow::Result<()> {
    let config = Config::load(args.common.config.as_deref(), args.common.overrides())?;
    init_tracing(config.log_format, false);
    let controller = Controller::new(&config)?;
    let threshold = args
        .threshold
        .or_else(|| config.thresholds.get(&args.router).copied())
        .with_context(|| format!("give --threshold: router `{}` has no configured default", args.router))?;
    let decision = controller.route(&args.prompt, &args.router, threshold).await?;
    println!(
        "{}",
        serde_json::json!({
            "router": decision.router,
            "threshold": decision.threshold,
            "win_rate": decision.win_rate,
            "tier": decision.tier.as_str(),
            "model": decision.model,
        })
    );
    Ok(())
}

/// A client key's limits and models as `serve --check` lists them (never the key).
fn describe_key_limits(key: &crate::api_keys::ApiKeySpec) -> String {
    let mut terms = Vec::new();
    if let Some(limit) = key.requests_per_minute {
        terms.push(format!("{limit} requests/min"));
    }
    if let Some(limit) = key.tokens_per_minute {
        terms.push(format!("{limit} tokens/min"));
    }
    if let Some(budget) = &key.budget {
        let per = match budget.per {
            crate::budgets::Period::Day => "per day",
            crate::budgets::Period::Month => "per month",
            crate::budgets::Period::Total => "in total",
        };
        terms.push(format!("budget {} {per}", budget.limit));
    }
    if let Some(models) = &key.models {
        terms.push(format!(
            "models {}",
            models.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    if terms.is_empty() {
        terms.push("no limits".to_owned());
    }
    terms.join(", ")
}

/// Each tier's deployments for `serve --check`: endpoint, key set or not, headers by name,
/// price, warnings; and how requests are spread when a tier lists several.
fn describe_models(out: &mut String, config: &Config, gateway: &Gateway) {
    use std::fmt::Write as _;
    let deployments = [Tier::Strong, Tier::Weak].into_iter().flat_map(|tier| {
        let listed = gateway.pool(tier).deployments();
        listed.iter().enumerate().map(move |(index, deployment)| {
            let tier = match listed.len() {
                1 => tier.as_str().to_owned(),
                several => format!("{} ({} of {several})", tier.as_str(), index + 1),
            };
            (tier, &deployment.upstream)
        })
    });
    for (tier, upstream) in deployments {
        let model = &upstream.model;
        let endpoint = match &model.endpoint {
            Endpoint::Echo => "built-in offline echo".to_owned(),
            Endpoint::Http {
                base_url,
                api_key,
                headers,
            } => {
                format!(
                    "{} ({}), API key {}, extra headers: {}",
                    without_credentials(base_url),
                    model.provider,
                    if api_key.is_some() { "set" } else { "not set" },
                    header_names(headers.keys())
                )
            }
        };
        let _ = writeln!(
            out,
            "{tier} model {} as `{}`: {endpoint}",
            model.name, model.provider_model
        );
        if let Some(price) = model.price {
            let _ = writeln!(
                out,
                "  price per million tokens: input {}, output {}",
                price.input, price.output
            );
        }
        if model.weight != 1 {
            let _ = writeln!(out, "  weight {}", model.weight);
        }
        if let Some(warning) = model.missing_key_warning() {
            let _ = writeln!(out, "  warning: {warning}");
        }
    }
    if config.strong_model.len() > 1 || config.weak_model.len() > 1 {
        let _ = writeln!(
            out,
            "load balancing: {}, an unavailable deployment passed over for {} s",
            match config.load_balancing.strategy {
                crate::config::Strategy::Failover => "failover (in the order listed)",
                crate::config::Strategy::RoundRobin => "round robin",
                crate::config::Strategy::LeastBusy => "least busy (fewest requests in flight for its weight)",
            },
            config.load_balancing.cooldown_secs
        );
    }
}

/// The `serve --check` lines on who may call what — each client key's limits, the scoring
/// timeout, passthrough paths and CORS origins — and on watching the config file.
fn describe_access_and_reloads(out: &mut String, config: &Config) {
    use std::fmt::Write as _;
    for key in &config.api_keys {
        let _ = writeln!(out, "  key `{}`: {}", key.name, describe_key_limits(key));
    }
    if let Some(path) = &config.spend_file {
        let _ = writeln!(
            out,
            "key spend kept in {} (written every 5 s and at shutdown)",
            path.display()
        );
    }
    if let Some(shared) = &config.shared_state {
        // Cooldowns are shared whether or not any key is limited.
        let shares = if config.api_keys.is_empty() {
            "deployment cooldowns".to_owned()
        } else {
            format!(
                "keys' rate limits and budgets (while Redis is unavailable: {}), deployment cooldowns",
                match shared.on_failure {
                    crate::shared_state::OnFailure::Local => "each replica's own buckets",
                    crate::shared_state::OnFailure::Refuse => "limited keys refused with 503",
                }
            )
        };
        let _ = writeln!(
            out,
            "shared in Redis at {} (keys `{}:*`, timeout {} ms): {shares}",
            crate::shared_state::SharedState::new(shared)
                .map_or_else(|_| "?".to_owned(), |state| state.address().to_owned()),
            shared.key_prefix,
            shared.timeout_ms,
        );
    }
    if let Some(limit) = config.scoring_timeout {
        let _ = writeln!(out, "scoring timeout: {} ms", limit.as_millis());
    }
    if let Some(limit) = config.stream_first_event_timeout {
        let _ = writeln!(
            out,
            "a stream's first event within {} s, else the next deployment",
            limit.as_secs_f64()
        );
    }
    if !config.passthrough.paths.is_empty() {
        let to = match config.passthrough.to {
            crate::config::PassthroughTo::Strong => &config.strong_model.primary().name,
            crate::config::PassthroughTo::Weak => &config.weak_model.primary().name,
        };
        let _ = writeln!(
            out,
            "passed through to {to}: /v1/{}",
            config.passthrough.paths.join(", /v1/")
        );
        if let Some(price) = config.passthrough.price_per_million_tokens {
            let _ = writeln!(
                out,
                "  price per million tokens: input {}, output {}",
                price.input, price.output
            );
        }
    }
    if !config.cors_allowed_origins.is_empty() {
        let _ = writeln!(out, "CORS origins: {}", config.cors_allowed_origins.join(", "));
    }
    if let Some(interval) = config.watch_config {
        let _ = writeln!(
            out,
            "config file watched every {} s, reloaded when it changes",
            interval.as_secs()
        );
    }
}

/// What `serve` would run, for `serve --check`: routers, thresholds, both models and the
/// settings that change requests. Keys and header values are secrets: only whether they
/// are set, and header names, are shown.
fn describe_setup(config: &Config, gateway: &Gateway, address: SocketAddr) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("configuration OK\n");
    let _ = writeln!(out, "listen: {address}");
    for name in &config.routers {
        match (config.thresholds.get(name), config.strong_share.get(name)) {
            (Some(threshold), Some(share)) => {
                let _ = writeln!(
                    out,
                    "router {name}: loaded, default threshold {threshold} until {MIN_TRACKED_SCORES} requests are \
                     scored, then the one that sends {share} of its latest {} scores to the strong model",
                    config.strong_share_window
                );
            }
            (Some(threshold), None) => {
                let _ = writeln!(out, "router {name}: loaded, default threshold {threshold}");
            }
            (None, _) => {
                let _ = writeln!(out, "router {name}: loaded, no default threshold");
            }
        }
    }
    describe_models(&mut out, config, gateway);
    let _ = writeln!(
        out,
        "client headers forwarded: {}",
        header_names(&config.forward_headers)
    );
    let name =
        |value: Option<clap::builder::PossibleValue>| value.map_or_else(String::new, |v| v.get_name().to_owned());
    let _ = writeln!(
        out,
        "on_router_error: {}, on_upstream_error: {}, score_turns: {}, client API keys: {}",
        name(config.on_router_error.to_possible_value()),
        name(config.on_upstream_error.to_possible_value()),
        name(config.score_turns.to_possible_value()),
        config.api_keys.len()
    );
    describe_access_and_reloads(&mut out, config);
    for (alias, target) in &config.model_aliases {
        let unserved = match crate::model_name::parse(target) {
            Ok(crate::model_name::ModelTarget::Routed { router, .. })
                if !config.routers.iter().any(|r| r == router) =>
            {
                format!(" (router `{router}` is not loaded: requests for it are refused)")
            }
            _ => String::new(),
        };
        let _ = writeln!(out, "model alias `{alias}` → `{target}`{unserved}");
    }
    if let Some(prompt_log) = &config.prompt_log {
        let _ = writeln!(
            out,
            "prompt log: {} (sample rate {}, rotated at {} bytes{})",
            prompt_log.path.display(),
            prompt_log.sample_rate,
            prompt_log.max_bytes,
            if prompt_log.conversations {
                ", with whole conversations"
            } else {
                ""
            }
        );
    }
    if let Some(cache) = &config.response_cache {
        let _ = writeln!(
            out,
            "response cache: identical Chat Completions and Completions requests answered again for {} s, up to {} MiB, {}",
            cache.ttl_secs,
            cache.max_mb,
            match cache.scope {
                crate::cache::CacheScope::Key => "each API key its own answers",
                crate::cache::CacheScope::Shared => "shared by every caller",
            }
        );
        out.push_str(if cache.coalesce {
            "  identical requests in flight together wait for one answer (streams read it as it is written)\n"
        } else {
            "  identical requests in flight together each call the model (coalesce: false)\n"
        });
        if cache.redis {
            out.push_str("  answers also kept in the shared state's Redis, for every replica\n");
        }
    }
    out
}

/// Header names, comma-separated, or `none`.
fn header_names<'a>(names: impl IntoIterator<Item = &'a axum::http::HeaderName>) -> String {
    let names: Vec<&str> = names.into_iter().map(axum::http::HeaderName::as_str).collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// A base URL with any user name and password replaced, for printing.
fn without_credentials(base_url: &str) -> String {
    match reqwest::Url::parse(base_url) {
        Ok(mut url) if !url.username().is_empty() || url.password().is_some() => {
            let _ = url.set_username("redacted");
            let _ = url.set_password(None);
            url.to_string()
        }
        _ => base_url.to_owned(),
    }
}

fn bracket_ipv6(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

fn init_tracing(format: LogFormat, access_log: bool) {
    // RUST_LOG sets the verbosity of everything but the access log, which only the
    // `access_log` setting turns on: `RUST_LOG=routellm=debug` must not flood a busy server.
    let base = std::env::var("RUST_LOG")
        .ok()
        .filter(|value| !value.trim().is_empty())
        .unwrap_or_else(|| "routellm=info".to_owned());
    let access = if access_log { "info" } else { "off" };
    let filter = tracing_subscriber::EnvFilter::new(format!("{base},routellm::access={access}"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second initialisation (library users, tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Re-reads the configuration on SIGHUP and applies its routing policy (thresholds, `strong_share`,
/// aliases, client API keys, `on_*_error`, `score_turns`, the scoring timeout: see `Gateway::reload`), so a
/// recalibrated threshold or a rotated key needs no restart. A file that does not load or
/// check out leaves the running policy in force. Flags and environment variables given at
/// start still win over the file.
#[cfg(unix)]
fn reload_on_hangup(state: AppState, file: Option<PathBuf>, overrides: Overrides) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP: the configuration cannot be reloaded");
            return;
        }
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            reload(&state, file.clone(), overrides.clone(), "SIGHUP").await;
        }
    });
}

/// With `watch_config_secs`, looks at the config file every `interval` and reloads it (as
/// SIGHUP does) when its contents changed: a Kubernetes `ConfigMap` or a deployment tool
/// that rewrites the file then needs no signal. A file that is missing for a moment (being
/// replaced) is waited for; a changed file that does not check out is reported once.
fn watch_config_file(state: AppState, file: PathBuf, overrides: Overrides, interval: std::time::Duration) {
    tokio::spawn(async move {
        let contents = |path: PathBuf| async move {
            tokio::task::spawn_blocking(move || std::fs::read(path).ok())
                .await
                .ok()
                .flatten()
        };
        let mut seen = contents(file.clone()).await;
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let now = contents(file.clone()).await;
            if now.is_none() || now == seen {
                continue;
            }
            seen = now;
            reload(&state, Some(file.clone()), overrides.clone(), "config file changed").await;
        }
    });
}

/// Re-reads the configuration and applies its routing policy, logging the outcome under
/// what caused the reload.
async fn reload(state: &AppState, file: Option<PathBuf>, overrides: Overrides, cause: &str) {
    let reloading = state.clone();
    // Reads a file: kept off the async workers.
    let outcome = tokio::task::spawn_blocking(move || reloading.reload_file(file.as_deref(), overrides))
        .await
        .unwrap_or_else(|panicked| Err(crate::error::Error::Config(panicked.to_string())));
    match outcome {
        Ok(needs_restart) if needs_restart.is_empty() => {
            tracing::info!("{cause}: configuration reloaded");
        }
        Ok(needs_restart) => tracing::warn!(
            needs_restart = ?needs_restart,
            "{cause}: configuration reloaded; these settings changed and take effect at the next restart"
        ),
        Err(error) => tracing::warn!(
            %error,
            "{cause}: configuration not reloaded; the running one stays in force"
        ),
    }
}

/// Resolves on Ctrl-C or SIGTERM (what `docker stop` sends).
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received, draining connections");
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_check_names_what_redis_shares_and_where_without_its_password() {
        let described = |yaml: &str, overrides: Overrides| {
            let config = Config::merge(crate::config::FileConfig::from_yaml(yaml).unwrap(), overrides).unwrap();
            let mut out = String::new();
            describe_access_and_reloads(&mut out, &config);
            out
        };
        let flags = Overrides {
            redis_url: Some(Secret::new("redis://:hunter2@10.0.0.7:7000".into())),
            redis_cluster: Some(true),
            ..Overrides::default()
        };
        let unlimited = described("", flags.clone());
        assert!(
            unlimited.contains(
                "shared in Redis at cluster via 10.0.0.7:7000 (keys `routellm:*`, timeout 100 ms): deployment cooldowns\n"
            ),
            "{unlimited}"
        );
        let limited = described(
            "api_keys: [{key: k, name: team, requests_per_minute: 5}]\nshared_state: {redis_url: x, on_failure: refuse}\n",
            flags,
        );
        assert!(
            limited.contains(
                "keys' rate limits and budgets (while Redis is unavailable: limited keys refused with 503), deployment cooldowns"
            ),
            "{limited}"
        );
        assert!(!unlimited.contains("hunter2") && !limited.contains("hunter2"));
    }

    #[test]
    fn routellm_style_flags_parse() {
        let cli = Cli::try_parse_from([
            "routellm",
            "serve",
            "--routers",
            "random",
            "mf",
            "--strong-model",
            "gpt-4o",
            "--weak-model",
            "groq/llama3",
            "--port",
            "7000",
            "--base-url",
            "http://x/v1",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("expected serve")
        };
        assert_eq!(args.common.routers, Some(vec!["random".to_owned(), "mf".to_owned()]));
        assert_eq!(args.port, Some(7000));
        assert_eq!(args.common.weak_model.as_deref(), Some("groq/llama3"));
    }

    #[test]
    fn model_alias_flags_split_at_the_first_equals_sign() {
        let cli = Cli::try_parse_from([
            "routellm",
            "serve",
            "--model-alias",
            "auto=router-mf-0.8",
            "--model-alias",
            "odd=vendor/model=v2",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("expected serve")
        };
        assert_eq!(
            args.model_aliases,
            vec![
                ("auto".to_owned(), "router-mf-0.8".to_owned()),
                ("odd".to_owned(), "vendor/model=v2".to_owned())
            ]
        );
        for bad in ["auto", "=router-mf", "auto="] {
            assert!(
                Cli::try_parse_from(["routellm", "serve", "--model-alias", bad]).is_err(),
                "{bad}"
            );
        }
    }
}
