//! gRPC clients that are not rewind's own, for tests that drive the coordinator through them:
//! Python with the pinned grpcio packages of `docs/clients/python/requirements.txt` in a virtual
//! environment under `target/python-venv`, and Go with Debian's grpc-go; `tests/run-all`
//! installs both.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::on_path;

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
pub fn must_generate_python_stubs(python: &Path, into: &Path) {
    std::fs::create_dir_all(into).expect("create the stubs' directory");
    let output = Command::new(python)
        .current_dir(workspace())
        .args(["-m", "grpc_tools.protoc", "-I", "proto"])
        .arg(format!("--python_out={}", into.display()))
        .arg(format!("--grpc_python_out={}", into.display()))
        .args(proto_files())
        .output()
        .expect("run grpc_tools.protoc");
    assert!(
        output.status.success(),
        "protoc failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `script` (a path under the workspace) with `args`, the stubs in `stubs` on its path.
pub fn run_python(python: &Path, stubs: &Path, script: &str, args: &[&str]) -> Output {
    Command::new(python)
        .env("PYTHONPATH", stubs)
        .arg(workspace().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("run {script}: {error}"))
}

/// The Go client example (`docs/clients/go`) built in `into` (a GOPATH), its stubs generated
/// from `proto/` as its instructions say, with Debian's Go and grpc-go: nothing is fetched.
pub fn must_build_go_client(into: &Path) -> PathBuf {
    const INSTALL: &str = "apt-get install golang-go golang-google-grpc-dev \
                           golang-github-golang-protobuf-1-5-dev protoc-gen-go \
                           protoc-gen-go-grpc protobuf-compiler (tests/run-all does)";
    for tool in ["go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc"] {
        assert!(on_path(tool), "{tool} is missing: {INSTALL}");
    }
    assert!(
        Path::new("/usr/share/gocode/src/google.golang.org/grpc").is_dir(),
        "grpc-go is missing: {INSTALL}"
    );
    // grpc-go marshals through github.com/golang/protobuf: 1.3 cannot carry protoc-gen-go's
    // messages (it panics on them), 1.4 and later hand them to the new API (wrappers.go).
    assert!(
        Path::new("/usr/share/gocode/src/github.com/golang/protobuf/proto/wrappers.go").is_file(),
        "github.com/golang/protobuf 1.5 is missing: {INSTALL}"
    );
    let package = into.join("src/rewindclient");
    let stubs = package.join("rewindv1");
    let generated = into.join("generated");
    for dir in [&stubs, &generated] {
        std::fs::create_dir_all(dir).expect("create the Go client's directories");
    }
    let protos = proto_files();
    // Give every proto the stubs' Go package without editing it (no go_package option).
    let mapping = protos
        .iter()
        .map(|proto| {
            let name = proto.strip_prefix("proto").expect("under proto/");
            format!("M{}=rewindclient/rewindv1", name.display())
        })
        .collect::<Vec<_>>()
        .join(",");
    let output = Command::new("protoc")
        .current_dir(workspace())
        .args(["-I", "proto"])
        .arg(format!("--go_out={}", generated.display()))
        .arg(format!("--go_opt=paths=source_relative,{mapping}"))
        .arg(format!("--go-grpc_out={}", generated.display()))
        .arg(format!("--go-grpc_opt=paths=source_relative,{mapping}"))
        .args(&protos)
        .output()
        .expect("run protoc");
    assert!(
        output.status.success(),
        "protoc for Go failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for entry in std::fs::read_dir(generated.join("rewind/v1")).expect("the generated Go") {
        let path = entry.expect("a generated file").path();
        std::fs::copy(&path, stubs.join(path.file_name().expect("a file name")))
            .expect("copy a stub");
    }
    std::fs::copy(
        workspace().join("docs/clients/go/main.go"),
        package.join("main.go"),
    )
    .expect("copy the example");
    let binary = into.join("rewind_status");
    // GOPATH mode over Debian's packages: no module proxy is asked for anything.
    let output = Command::new("go")
        .current_dir(&package)
        .env("GO111MODULE", "off")
        .env("GOPATH", format!("{}:/usr/share/gocode", into.display()))
        .env("GOCACHE", into.join("cache"))
        .args(["build", "-o"])
        .arg(&binary)
        .arg(".")
        .output()
        .expect("run go build");
    assert!(
        output.status.success(),
        "go build of the Go client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    binary
}

/// `proto/rewind/v1/*.proto`, named from the workspace's root as protoc wants them with
/// `-I proto` (the examples' instructions name them so too).
fn proto_files() -> Vec<PathBuf> {
    let root = workspace();
    let mut protos: Vec<PathBuf> = std::fs::read_dir(root.join("proto/rewind/v1"))
        .expect("read proto/rewind/v1")
        .map(|entry| entry.expect("a proto file").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "proto")
        })
        .map(|path| {
            path.strip_prefix(&root)
                .expect("under the workspace")
                .to_path_buf()
        })
        .collect();
    protos.sort();
    protos
}
