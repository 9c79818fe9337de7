//! Python with grpcio, for tests that drive the coordinator through a gRPC client that is not
//! rewind's own: the pinned packages of `docs/clients/python/requirements.txt` in a virtual
//! environment under `target/python-venv`, which `tests/run-all` creates.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace's root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the workspace's root")
}

/// The virtual environment's interpreter (`REWIND_PYTHON` names another); panics with how to
/// make it when it is missing or lacks grpcio.
pub fn must_python() -> PathBuf {
    let python = std::env::var_os("REWIND_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/python-venv/bin/python"));
    let works = Command::new(&python)
        .args([
            "-c",
            "import grpc, grpc_health, grpc_reflection, grpc_tools",
        ])
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        works,
        "{} with grpcio is missing: python3 -m venv target/python-venv && \
         target/python-venv/bin/pip install -r docs/clients/python/requirements.txt \
         (tests/run-all does)",
        python.display()
    );
    python
}

/// Generates the Python stubs of `proto/` into `into` (grpcio-tools' protoc), as the client
/// example's instructions say.
pub fn must_generate_stubs(python: &Path, into: &Path) {
    std::fs::create_dir_all(into).expect("create the stubs' directory");
    let root = workspace();
    let protos: Vec<PathBuf> = std::fs::read_dir(root.join("proto/rewind/v1"))
        .expect("read proto/rewind/v1")
        .map(|entry| entry.expect("a proto file").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "proto")
        })
        // protoc wants them named under `-I proto`, as the example's instructions do.
        .map(|path| {
            path.strip_prefix(&root)
                .expect("under the workspace")
                .to_path_buf()
        })
        .collect();
    let output = Command::new(python)
        .current_dir(&root)
        .args(["-m", "grpc_tools.protoc", "-I", "proto"])
        .arg(format!("--python_out={}", into.display()))
        .arg(format!("--grpc_python_out={}", into.display()))
        .args(&protos)
        .output()
        .expect("run grpc_tools.protoc");
    assert!(
        output.status.success(),
        "protoc failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `script` (a path under the workspace) with `args`, the stubs in `stubs` on its path.
pub fn run(python: &Path, stubs: &Path, script: &str, args: &[&str]) -> Output {
    Command::new(python)
        .env("PYTHONPATH", stubs)
        .arg(workspace().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("run {script}: {error}"))
}
