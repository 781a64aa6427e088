//! The command-line interface (the composition root). See `../shared/design/CLI.md`.
//!
//! Exit codes: 0 success · 2 usage error · 3 bad input file · 1 any other failure.
//! Machine-readable output goes to stdout (`--json`); logs and progress go to stderr.

mod bench;
mod bench_queue;
mod imaging;
mod model;
mod service;
mod web;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Settings;

/// hepaflow: liver-tumour reports from abdominal CT.
#[derive(Debug, Parser)]
#[command(name = "hepaflow", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read a NIfTI file and print its format, geometry, datatype, scaling and value statistics.
    Inspect(imaging::InspectArgs),
    /// Write synthetic abdominal CT studies with ground truth in LiTS layout.
    Phantom(imaging::PhantomArgs),
    /// A PNG of one axial slice in a liver window with a mask's contours.
    Preview(imaging::PreviewArgs),
    /// Lesion analysis of a label mask: volumes, burden, and every lesion's measurements.
    Lesions(imaging::LesionsArgs),
    /// Accuracy of a predicted mask against ground truth (overlap, surface, detection).
    Metrics(imaging::MetricsArgs),
    /// Train the VGG16 patch classifier on a LiTS-layout folder.
    Train(model::TrainArgs),
    /// Fit a model's false-positive filter on its training studies (the step train ends with)
    /// and write it into the model's card.
    FitFilter(model::FitFilterArgs),
    /// Segment one CT volume into a liver/tumour label mask.
    Segment(model::SegmentArgs),
    /// Segment every study of a LiTS-layout folder and score it against its ground truth.
    Eval(model::EvalArgs),
    /// In-process timings of the imaging core, for the benchmark scripts (JSON).
    Bench(bench::BenchArgs),
    /// Everything in one process: worker, scheduler, embedded defaults.
    Run(service::RunArgs),
    /// Process jobs of the given queues.
    Worker(service::WorkerArgs),
    /// Fire the cron schedules of jobs/*.toml.
    Scheduler(service::SchedulerArgs),
    /// Apply the database migrations.
    Migrate(service::MigrateArgs),
    /// Import studies from files or folders now.
    Ingest(service::IngestArgs),
    /// Studies with their state and results.
    Studies(service::StudiesArgs),
    /// The job queue.
    Jobs(service::JobsArgs),
    /// A new run of a study, linked to the previous one.
    Rerun(service::RerunArgs),
    /// The model registry.
    Models(service::ModelsArgs),
    /// The cron schedules.
    Schedules(service::SchedulesArgs),
    /// The email outbox.
    Mail(service::MailArgs),
    /// The web dashboard.
    Serve(web::ServeArgs),
    /// Dashboard accounts.
    Users(web::UsersArgs),
}

/// How a command failed: decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// A bad input file (exit code 3); the message names the file and the reason.
    BadInput(anyhow::Error),
    /// Anything else (exit code 1).
    Other(anyhow::Error),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::BadInput(_) => 3,
            Failure::Other(_) => 1,
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Other(e.into())
    }
}

/// Result of a command.
pub type CmdResult = Result<(), Failure>;

/// Parses the command line, runs the command and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(cli, &settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            let code = f.exit_code();
            let (Failure::BadInput(e) | Failure::Other(e)) = f;
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// Runs one parsed command.
pub fn run(cli: Cli, settings: &Settings) -> CmdResult {
    match cli.command {
        Command::Inspect(a) => imaging::inspect(a, settings),
        Command::Phantom(a) => imaging::phantom(a),
        Command::Lesions(a) => imaging::lesions(a, settings),
        Command::Preview(a) => imaging::preview(a, settings),
        Command::Metrics(a) => imaging::metrics(a, settings),
        Command::Bench(a) => bench::bench(a, settings),
        Command::Train(a) => model::train(a, settings),
        Command::FitFilter(a) => model::fit_filter(a, settings),
        Command::Segment(a) => model::segment(a, settings),
        Command::Eval(a) => model::eval(a, settings),
        Command::Run(a) => service::run(a, settings),
        Command::Worker(a) => service::worker(a, settings),
        Command::Scheduler(a) => service::scheduler(a, settings),
        Command::Migrate(a) => service::migrate(a, settings),
        Command::Ingest(a) => service::ingest_cmd(a, settings),
        Command::Studies(a) => service::studies_cmd(a, settings),
        Command::Jobs(a) => service::jobs_cmd(a, settings),
        Command::Rerun(a) => service::rerun(a, settings),
        Command::Models(a) => service::models_cmd(a, settings),
        Command::Schedules(a) => service::schedules_cmd(a, settings),
        Command::Mail(a) => service::mail_cmd(a, settings),
        Command::Serve(a) => web::serve(a, settings),
        Command::Users(a) => web::users_cmd(a, settings),
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HEPAFLOW_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
