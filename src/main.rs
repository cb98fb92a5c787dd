//! The `routellm` binary: everything lives in the library; this only starts the runtime.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match routellm::cli::main().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
