//! Running commands on the host, behind a trait so step logic can be tested with a fake.

use std::process::Stdio;
use std::time::Duration;

use crate::AgentError;

/// Most output kept from a command, for error messages.
const OUTPUT_TAIL_BYTES: usize = 2048;

#[tonic::async_trait]
pub trait Host: Send + Sync + 'static {
    /// Runs `argv` (no shell) with a timeout; Ok only if it exits 0.
    async fn run(&self, argv: &[String], timeout: Duration) -> Result<(), AgentError>;
}

/// The real host: spawns processes, kills them on timeout.
pub struct LocalHost;

#[tonic::async_trait]
impl Host for LocalHost {
    async fn run(&self, argv: &[String], timeout: Duration) -> Result<(), AgentError> {
        let shown = argv.join(" ");
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| AgentError::invalid("command", "is empty"))?;
        let mut command = tokio::process::Command::new(program);
        // SAFETY: the closure only calls umask, which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                rewind_shared::config::usual_umask();
                Ok(())
            });
        }
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| AgentError::Command {
                command: shown.clone(),
                reason: format!("cannot start: {error}"),
            })?;
        let output = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| AgentError::Command {
                command: shown.clone(),
                reason: format!("timed out after {} ms and was killed", timeout.as_millis()),
            })?
            .map_err(|error| AgentError::Command {
                command: shown.clone(),
                reason: error.to_string(),
            })?;
        if output.status.success() {
            return Ok(());
        }
        let mut stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if stderr.len() > OUTPUT_TAIL_BYTES {
            let cut = (stderr.len() - OUTPUT_TAIL_BYTES..stderr.len())
                .find(|&index| stderr.is_char_boundary(index))
                .unwrap_or(0);
            stderr = stderr[cut..].to_string();
        }
        Err(AgentError::Command {
            command: shown,
            reason: format!("{}: {}", output.status, stderr.trim()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_report_exit_status_stderr_and_timeouts() {
        let host = LocalHost;
        let argv = |parts: &[&str]| {
            parts
                .iter()
                .map(|part| part.to_string())
                .collect::<Vec<_>>()
        };
        host.run(&argv(&["true"]), Duration::from_secs(5))
            .await
            .unwrap();
        let failed = host
            .run(
                &argv(&["sh", "-c", "echo broken >&2; exit 3"]),
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert!(
            failed.to_string().contains("exit status: 3") && failed.to_string().contains("broken"),
            "{failed}"
        );
        let slow = host
            .run(&argv(&["sleep", "5"]), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(slow.to_string().contains("timed out"), "{slow}");
        let missing = host
            .run(&argv(&["/nonexistent/program"]), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(missing.to_string().contains("cannot start"), "{missing}");
    }
}
