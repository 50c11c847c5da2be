use std::path::PathBuf;

use clap::{Parser, Subcommand};
use dicom_gateway::{app, config::Config, reindex};

/// DICOM imaging gateway: DIMSE in, object storage and index, DICOMweb out.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (DIMSE listener and HTTP server).
    Serve {
        /// TOML configuration file; without it the embedded defaults apply (see config/default.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Rebuild the index from the objects in storage (disaster recovery, moving to a new index);
    /// run it while no gateway serves the same index.
    Reindex {
        /// TOML configuration file naming the storage and the index (defaults as for `serve`).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Reconcile storage and index in full: index every stored object the index lacks, report index
    /// rows without an object. Start-up reconciles only what the storage's log says may be
    /// unindexed; run this after storage was changed behind the gateway's back, while no gateway
    /// serves the same storage.
    Reconcile {
        /// TOML configuration file naming the storage and the index (defaults as for `serve`).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print a `[auth] users_file` hash (PBKDF2-HMAC-SHA256, random salt) of the password read from
    /// standard input: `echo -n "$PASSWORD" | dicom-gateway hash-password`, then add a line
    /// `user:<hash>:read search` to the users file.
    HashPassword,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match &cli.command {
        Command::Serve { config } | Command::Reindex { config } | Command::Reconcile { config } => {
            config
        }
        Command::HashPassword => {
            return dicom_gateway::security::authenticate::hash_password_from_stdin()
        }
    };
    let config = Config::load(config.as_deref())?;
    app::init_logging(&config.log.level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime.workers())
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve { .. } => runtime.block_on(app::serve(config)),
        Command::Reindex { .. } => runtime.block_on(reindex::run(config)),
        Command::Reconcile { .. } => runtime.block_on(app::reconcile_all(config)),
        Command::HashPassword => unreachable!("answered before the configuration is read"),
    }
}
