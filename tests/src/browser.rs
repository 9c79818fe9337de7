//! A real browser for the web view's tests: Debian's headless Chromium, driven over the
//! DevTools protocol on a pipe (`--remote-debugging-pipe`: it reads commands on descriptor 3
//! and writes answers and events on descriptor 4, each JSON message ending in a NUL byte), so
//! no port and no client crate are needed.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::sync::mpsc;

use serde_json::{Value, json};

use crate::*;

/// Longest one DevTools command may take to be answered.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

pub struct Browser {
    child: Child,
    commands: std::io::PipeWriter,
    answers: mpsc::Receiver<Value>,
    next_id: u64,
    /// The page's session (`Target.attachToTarget`, flattened).
    session: String,
    /// Chromium's own messages, for a failure to show.
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium with one blank page; fails naming the package when it is missing.
    pub fn must_start() -> Self {
        let binary = ["chromium", "chromium-browser"]
            .into_iter()
            .find(|name| on_path(name))
            .unwrap_or_else(|| {
                panic!("chromium is not installed: apt-get install chromium (tests/run-all does)")
            });
        let profile = tempfile::tempdir().unwrap();
        let log = profile.path().join("chromium.log");
        let (their_commands, commands) = std::io::pipe().unwrap();
        let (answers_from, their_answers) = std::io::pipe().unwrap();
        let (command_fd, answer_fd) = (their_commands.as_raw_fd(), their_answers.as_raw_fd());
        let mut command = Command::new(binary);
        command
            .args([
                "--headless",
                // Root in a container: Chromium's sandbox needs user namespaces it lacks here.
                "--no-sandbox",
                "--remote-debugging-pipe",
                "--disable-gpu",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--window-size=1280,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2). Both ends
        // are first moved above 10, so that neither is already 3 or 4 when dup2 puts them there
        // (dup2 leaves those open across exec; the originals close on it).
        unsafe {
            command.pre_exec(move || {
                let high_command = libc::fcntl(command_fd, libc::F_DUPFD_CLOEXEC, 10);
                let high_answer = libc::fcntl(answer_fd, libc::F_DUPFD_CLOEXEC, 10);
                if high_command < 0
                    || high_answer < 0
                    || libc::dup2(high_command, 3) < 0
                    || libc::dup2(high_answer, 4) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("start {binary}: {error}"));
        drop((their_commands, their_answers));
        let (sender, answers) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(answers_from);
            loop {
                let mut message = Vec::new();
                match reader.read_until(0, &mut message) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                message.pop();
                if let Ok(value) = serde_json::from_slice::<Value>(&message)
                    && sender.send(value).is_err()
                {
                    return;
                }
            }
        });
        let mut browser = Self {
            child,
            commands,
            answers,
            next_id: 0,
            session: String::new(),
            log,
            _profile: profile,
        };
        let target = browser.call("Target.createTarget", json!({"url": "about:blank"}));
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser.call("Page.enable", json!({}));
        browser
    }

    /// Sends one command (to the page once attached) and returns its result.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .unwrap_or_else(|error| panic!("{method}: {error}"))
    }

    /// [`Self::call`], its protocol error returned (a page navigating away answers some with
    /// "Execution context was destroyed"); Chromium gone or silent is still a panic.
    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + ANSWER_WITHIN;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = match self.answers.recv_timeout(left) {
                Ok(answer) => answer,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("chromium did not answer {method} within 30 s")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "chromium exited ({:?}) during {method}:\n{}",
                    self.child.try_wait(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            };
            // Events (no id) are not waited for.
            if answer["id"] != json!(id) {
                continue;
            }
            if let Some(error) = answer.get("error") {
                return Err(error.to_string());
            }
            return Ok(answer["result"].clone());
        }
    }

    /// Opens `url` and waits until the new page has loaded (the old one, even of the same
    /// address, is told apart by a mark only it carries).
    pub fn must_open(&mut self, url: &str) {
        self.must_wait_for(
            Duration::from_secs(10),
            "the current page to take a mark",
            "window.previousPage = true",
        );
        self.call("Page.navigate", json!({"url": url}));
        self.must_wait_for(
            Duration::from_secs(30),
            "the page to load",
            "window.previousPage === undefined && document.readyState === 'complete'",
        );
    }

    /// The value of a JavaScript expression in the page.
    pub fn evaluate(&mut self, expression: &str) -> Value {
        self.try_evaluate(expression)
            .unwrap_or_else(|error| panic!("{expression}: {error}"))
    }

    fn try_evaluate(&mut self, expression: &str) -> Result<Value, String> {
        let result = self.try_call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(exception.to_string());
        }
        Ok(result["result"]["value"].clone())
    }

    /// Waits until `expression` is true in the page; while a page is being replaced it may
    /// not be evaluated at all, which counts as not yet.
    pub fn must_wait_for(&mut self, limit: Duration, what: &str, expression: &str) {
        if let Err(shown) = self.wait_for(limit, expression) {
            panic!("timed out after {limit:?} waiting for {what}; the page:\n{shown}");
        }
    }

    /// [`Self::must_wait_for`], answering what the page showed instead when time is up.
    pub fn wait_for(&mut self, limit: Duration, expression: &str) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.try_evaluate(expression) == Ok(json!(true)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "{:?}",
            self.try_evaluate("location.href + '\\n' + document.body.innerText")
        ))
    }

    /// A PNG of the whole page, written to `path`.
    pub fn must_screenshot(&mut self, path: &Path) {
        use base64::Engine as _;
        let shot = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
