//! Self-installing test dependencies: the npm packages of the test IdP (tests/idp) and a Python venv with the
//! Seldon Deploy SDK, each installed once per checkout and guarded against concurrent test processes.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The SDK the Python-driven tests call the proxy with.
pub const SDK_REQUIREMENT: &str = "seldon-deploy-sdk==2.4.0";

/// Names a Python interpreter (with the SDK installed) to use instead of `<repo>/.venv-test`.
pub const PYTHON_OVERRIDE_ENV: &str = "SELDON_AUTH_PROXY_TEST_PYTHON";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The folder of the test IdP: package.json, package-lock.json and keycloak-mock.js.
pub fn idp_dir() -> PathBuf {
    repo_root().join("tests").join("idp")
}

/// Runs `npm ci` in tests/idp when its node_modules is missing or was installed from another lock file,
/// and returns the node_modules path.
pub fn node_modules_ready() -> PathBuf {
    static READY: OnceLock<PathBuf> = OnceLock::new();
    READY
        .get_or_init(|| {
            let dir = idp_dir();
            let _lock = ProcessLock::acquire("idp-npm-ci.lock");
            let lock_file = fs::read(dir.join("package-lock.json"))
                .unwrap_or_else(|e| panic!("cannot read {}/package-lock.json: {e}", dir.display()));
            // A copy of the lock file that node_modules was installed from.
            let stamp = dir.join("node_modules").join(".seldon-auth-proxy-stamp");
            if fs::read(&stamp).ok().as_deref() != Some(lock_file.as_slice()) {
                eprintln!(
                    "installing the test IdP's npm packages in {}",
                    dir.display()
                );
                run(
                    Command::new("npm")
                        .args(["ci", "--no-audit", "--no-fund"])
                        .current_dir(&dir),
                    "Node.js (>= 20) and npm",
                );
                fs::write(&stamp, &lock_file)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", stamp.display()));
            }
            dir.join("node_modules")
        })
        .clone()
}

/// Returns a Python interpreter that can `import seldon_deploy_sdk`: the one named by
/// `SELDON_AUTH_PROXY_TEST_PYTHON`, else `<repo>/.venv-test/bin/python`, created and filled on first use.
pub fn python_with_sdk() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            if let Some(python) = std::env::var_os(PYTHON_OVERRIDE_ENV) {
                return PathBuf::from(python);
            }
            let venv = repo_root().join(".venv-test");
            let python = venv.join("bin").join("python");
            let stamp = venv.join(".seldon-auth-proxy-stamp");
            let _lock = ProcessLock::acquire("python-venv.lock");
            if fs::read_to_string(&stamp).ok().as_deref() != Some(SDK_REQUIREMENT) {
                eprintln!("installing {SDK_REQUIREMENT} into {}", venv.display());
                if !python.exists() {
                    run(
                        Command::new("python3")
                            .args(["-m", "venv", "--clear"])
                            .arg(&venv),
                        "python3 with its venv module (Debian: python3-venv)",
                    );
                }
                run(
                    Command::new(&python).args([
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                        SDK_REQUIREMENT,
                    ]),
                    "python3 with pip",
                );
                fs::write(&stamp, SDK_REQUIREMENT)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", stamp.display()));
            }
            python
        })
        .clone()
}

/// [`python_with_sdk`] from async code (the first call may install the SDK).
pub async fn python() -> PathBuf {
    tokio::task::spawn_blocking(python_with_sdk)
        .await
        .expect("a Python with seldon-deploy-sdk")
}

/// Runs a setup command to completion; panics with its output if it fails, or with what to install if it is missing.
fn run(command: &mut Command, install_hint: &str) {
    let output = command.output().unwrap_or_else(|e| {
        if e.kind() == ErrorKind::NotFound {
            panic!("{command:?} cannot run: install {install_hint} to run these tests");
        }
        panic!("{command:?} cannot run: {e}");
    });
    if !output.status.success() {
        panic!(
            "{command:?} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// An exclusive `flock` on a file in the target's tmp folder, held until dropped: serialises the installs
/// between test processes (nextest runs every test in a process of its own).
struct ProcessLock(File);

impl ProcessLock {
    fn acquire(name: &str) -> ProcessLock {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let path = dir.join(name);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        loop {
            // SAFETY: flock only reads the descriptor, which `file` keeps open; the lock goes with it.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return ProcessLock(file);
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != ErrorKind::Interrupted {
                panic!("cannot lock {}: {err}", path.display());
            }
        }
    }
}
