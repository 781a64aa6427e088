use std::process::ExitCode;

fn main() -> ExitCode {
    hepaflow::cli::main()
}
