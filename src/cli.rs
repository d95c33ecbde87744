//! The `memgauge` command line: one entry, [`run`], for the binary and the Python console script.

use clap::Parser;

/// How the command ended; the process exits with its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Everything is within its limits.
    Success,
    /// A regression was found.
    Regression,
    /// The input or the command was wrong.
    Error,
}

impl ExitStatus {
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::Regression => 1,
            ExitStatus::Error => 2,
        }
    }
}

impl From<ExitStatus> for std::process::ExitCode {
    fn from(status: ExitStatus) -> Self {
        std::process::ExitCode::from(status.code() as u8)
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "memgauge",
    version,
    about = "Memory figures for Python test suites, gated in CI"
)]
struct Cli {}

pub fn run<I, T>(args: I) -> ExitStatus
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match Cli::try_parse_from(args) {
        Ok(_) => ExitStatus::Success,
        Err(error) => {
            let _ = error.print();
            if error.use_stderr() {
                ExitStatus::Error
            } else {
                ExitStatus::Success
            }
        }
    }
}
