//! Lint of the repository's `Dockerfile` and `.dockerignore` (no Docker
//! engine needed): a multi-stage build from the lock file, and a final image
//! with no toolchain or package manager that runs the binary as non-root.

use std::path::Path;

const BINARY: &str = "seldon-auth-proxy";

/// One Dockerfile instruction: upper-cased keyword and its arguments, with
/// line continuations joined and comment lines dropped.
#[derive(Debug)]
struct Instr {
    keyword: String,
    args: String,
}

fn read(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {name}: {e}"))
}

fn parse(text: &str) -> Vec<Instr> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        // Docker skips comment and empty lines, even inside a continued line.
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let full = std::mem::take(&mut current);
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        out.push(Instr {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_string(),
        });
    }
    assert!(
        current.trim().is_empty(),
        "Dockerfile ends inside a continued line"
    );
    out
}

/// Instructions grouped by build stage (each starts with its FROM).
fn stages(instrs: &[Instr]) -> Vec<&[Instr]> {
    let starts: Vec<usize> = instrs
        .iter()
        .enumerate()
        .filter(|(_, i)| i.keyword == "FROM")
        .map(|(n, _)| n)
        .collect();
    assert!(
        starts.first() == Some(&0) || instrs[..starts[0]].iter().all(|i| i.keyword == "ARG"),
        "only ARG may come before the first FROM"
    );
    starts
        .iter()
        .enumerate()
        .map(|(n, &start)| {
            let end = starts.get(n + 1).copied().unwrap_or(instrs.len());
            &instrs[start..end]
        })
        .collect()
}

/// The image of a FROM line, without `--platform=` and `AS name`.
fn base_image(from: &Instr) -> String {
    from.args
        .split_whitespace()
        .find(|w| !w.starts_with("--"))
        .unwrap_or("")
        .to_string()
}

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| c.is_whitespace() || matches!(c, '"' | ',' | '[' | ']' | ';' | '&' | '|'))
        .filter(|w| !w.is_empty())
}

fn dockerfile() -> Vec<Instr> {
    let text = read("Dockerfile");
    assert!(text.starts_with('#'), "Dockerfile must open with a comment");
    parse(&text)
}

#[test]
fn build_is_multi_stage_and_locked() {
    let instrs = dockerfile();
    let stages = stages(&instrs);
    assert!(
        stages.len() >= 2,
        "expected a multi-stage build, found {} FROM",
        stages.len()
    );
    for st in &stages {
        let image = base_image(&st[0]);
        assert!(
            image.contains(':') || image.contains('@') || image == "scratch",
            "pin a tag or digest: FROM {image}"
        );
        assert!(!image.ends_with(":latest"), "do not build FROM {image}");
    }
    let builds: Vec<&Instr> = instrs
        .iter()
        .filter(|i| {
            i.keyword == "RUN" && words(&i.args).any(|w| w == "cargo") && i.args.contains(" build")
        })
        .collect();
    assert!(!builds.is_empty(), "no `cargo build` step");
    for b in builds {
        let w: Vec<&str> = words(&b.args).collect();
        assert!(
            w.contains(&"--locked") || w.contains(&"--frozen"),
            "cargo build without --locked: {}",
            b.args
        );
        assert!(
            w.contains(&"--release"),
            "cargo build without --release: {}",
            b.args
        );
    }
    for i in &instrs {
        assert!(
            !(i.keyword == "ADD" && i.args.contains("://")),
            "ADD of a URL is not reproducible: {}",
            i.args
        );
    }
}

#[test]
fn final_stage_is_minimal() {
    let instrs = dockerfile();
    let stages = stages(&instrs);
    let last = stages.last().expect("a stage");
    let image = base_image(&last[0]);
    assert!(
        image.contains("distroless") || image == "scratch" || image.contains("slim"),
        "final stage should be distroless or slim, not {image}"
    );
    assert!(
        !image.starts_with("rust:") && !image.contains("/rust:"),
        "final stage is the Rust toolchain image"
    );
    for i in last.iter().filter(|i| i.keyword == "RUN") {
        for tool in [
            "apt", "apt-get", "dpkg", "apk", "cargo", "rustc", "rustup", "gcc",
        ] {
            assert!(
                !words(&i.args).any(|w| w == tool),
                "final stage runs {tool}: {}",
                i.args
            );
        }
    }
    if image.contains("distroless") {
        assert!(
            last.iter().all(|i| i.keyword != "RUN"),
            "a distroless stage has no shell to RUN with"
        );
    }
    assert!(
        last.iter()
            .any(|i| i.keyword == "COPY" && i.args.contains("--from=") && i.args.contains(BINARY)),
        "final stage must COPY the binary from the build stage"
    );
    for i in last.iter().filter(|i| i.keyword == "ENV") {
        for w in [
            "SECRET",
            "PASSWORD",
            "TOKEN=",
            "ALLOW_NON_LOOPBACK",
            "_LISTEN",
        ] {
            assert!(!i.args.contains(w), "image bakes in ENV {}", i.args);
        }
    }
}

#[test]
fn runs_as_non_root() {
    let instrs = dockerfile();
    let stages = stages(&instrs);
    let last = stages.last().expect("a stage");
    let image = base_image(&last[0]);
    let user = last
        .iter()
        .rev()
        .find(|i| i.keyword == "USER")
        .map(|i| i.args.clone());
    match user {
        Some(u) => {
            let name = u.split(':').next().unwrap_or("");
            assert!(name != "root" && name != "0", "USER {u} is root");
        }
        None => assert!(
            image.contains("nonroot"),
            "no USER and {image} is not a nonroot base"
        ),
    }
}

#[test]
fn entrypoint_is_the_binary_and_ports_are_exposed() {
    let instrs = dockerfile();
    let stages = stages(&instrs);
    let last = stages.last().expect("a stage");
    let entry = last
        .iter()
        .rev()
        .find(|i| i.keyword == "ENTRYPOINT")
        .expect("final stage needs an ENTRYPOINT");
    let argv: Vec<String> = serde_json::from_str(&entry.args).unwrap_or_else(|_| {
        panic!(
            "ENTRYPOINT must be exec form (a JSON array): {}",
            entry.args
        )
    });
    assert!(
        argv.first()
            .is_some_and(|a| a == BINARY || a.ends_with(&format!("/{BINARY}"))),
        "ENTRYPOINT must run {BINARY}: {argv:?}"
    );
    let exposed: Vec<String> = last
        .iter()
        .filter(|i| i.keyword == "EXPOSE")
        .flat_map(|i| {
            i.args
                .split_whitespace()
                .map(|p| p.trim_end_matches("/tcp").to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    for port in ["8080", "9090"] {
        assert!(
            exposed.iter().any(|p| p == port),
            "EXPOSE {port} missing (found {exposed:?})"
        );
    }
}

#[test]
fn dockerignore_keeps_the_context_small() {
    let text = read(".dockerignore");
    let entries: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches("/").trim_end_matches('/'))
        .collect();
    for needed in ["target", ".git"] {
        assert!(
            entries.contains(&needed),
            ".dockerignore must list {needed}"
        );
    }
    for kept in ["src", "Cargo.toml", "Cargo.lock"] {
        assert!(
            !entries.contains(&kept),
            ".dockerignore excludes {kept}, which the build needs"
        );
    }
}
