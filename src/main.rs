use std::path::PathBuf;

use clap::{Parser, Subcommand};
use dicom_gateway::{app, config::Config};

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(config.as_deref())?;
            app::init_logging(&config.log.level);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(app::serve(config))
        }
    }
}
