fn main() -> std::process::ExitCode {
    memgauge::cli::run(std::env::args()).into()
}
