//! The command line: `routellm serve` and friends, parsed with clap and dispatched here so
//! `main.rs` stays a one-liner.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, LogFormat, Overrides, Secret};
use crate::controller::Controller;
use crate::gateway::Gateway;
use crate::server::{self, AppState};

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
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        host: args.host,
        port: args.port,
        log_format: args.log_format,
        ..args.common.overrides()
    };
    let config = Config::load(args.common.config.as_deref(), overrides)
        .context("loading the configuration")?;
    init_tracing(config.log_format);
    let gateway = Gateway::from_config(&config).context("starting the routers")?;
    tracing::info!(
        routers = ?config.routers,
        strong = %gateway.strong().model.name,
        weak = %gateway.weak().model.name,
        "routers loaded"
    );
    let address: SocketAddr = format!("{}:{}", bracket_ipv6(&config.host), config.port)
        .parse()
        .with_context(|| format!("`{}` is not an IP address to listen on", config.host))?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {address}"))?;
    tracing::info!(address = %listener.local_addr()?, "routellm listening");
    server::run(listener, AppState::new(gateway), shutdown_signal())
        .await
        .context("serving")?;
    tracing::info!("shut down");
    Ok(())
}

async fn route(args: RouteArgs) -> anyhow::Result<()> {
    let config = Config::load(args.common.config.as_deref(), args.common.overrides())?;
    init_tracing(config.log_format);
    let controller = Controller::new(&config)?;
    let threshold = args
        .threshold
        .or_else(|| config.thresholds.get(&args.router).copied())
        .with_context(|| {
            format!(
                "give --threshold: router `{}` has no configured default",
                args.router
            )
        })?;
    let decision = controller
        .route(&args.prompt, &args.router, threshold)
        .await?;
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

fn bracket_ipv6(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("routellm=info"));
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
        assert_eq!(
            args.common.routers,
            Some(vec!["random".to_owned(), "mf".to_owned()])
        );
        assert_eq!(args.port, Some(7000));
        assert_eq!(args.common.weak_model.as_deref(), Some("groq/llama3"));
    }
}
