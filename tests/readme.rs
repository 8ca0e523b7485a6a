//! The README stays true: every setting the binary accepts is in its settings table, and the
//! two set-up commands it gives are the ones CI runs.

use clap::CommandFactory;
use seldon_auth_proxy::config::Cli;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

#[test]
fn every_setting_is_documented_with_its_flag_env_and_key() {
    let readme = readme();
    let command = Cli::command();
    let mut missing = Vec::new();
    for arg in command.get_arguments() {
        let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else {
            continue;
        };
        if long == "config" {
            continue;
        }
        let row = format!(
            "| `--{long}` | `{}` | `{}` |",
            env.to_string_lossy(),
            long.replace('-', "_")
        );
        if !readme.contains(&row) {
            missing.push(row);
        }
    }
    assert!(
        missing.is_empty(),
        "settings missing from the README table:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_readme_gives_the_commands_ci_runs() {
    let readme = readme();
    assert!(readme.contains("cargo run --release -- dev"));
    assert!(readme.contains("cargo test"));
    let ci =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).expect(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == "cargo test"),
        ".ci/run must run the README's test command"
    );
}
