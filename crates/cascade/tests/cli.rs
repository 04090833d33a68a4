//! The real binary end to end on a small planted dataset with the real MiniLM:
//! train writes a verifiable artifact; bad input stops with file:line and
//! leaves no artifact behind.

use std::path::{Path, PathBuf};
use std::process::Command;

fn cascade() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cascade"))
}

fn minilm() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::env::var_os("CASCADE_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("data/minilm"))
}

fn write_dataset(dir: &Path) {
    cascade_data::synthetic::planted(60, 90, 3, 15, 5)
        .write(dir)
        .unwrap();
}

fn train(data: &Path, artifacts: &Path, cache: &Path) -> std::process::Output {
    cascade()
        .args(["train", "--quiet", "--candidates", "30"])
        .arg("--data")
        .arg(data)
        .arg("--minilm")
        .arg(minilm())
        .arg("--artifacts")
        .arg(artifacts)
        .arg("--cache")
        .arg(cache)
        .output()
        .unwrap()
}

#[test]
fn train_then_verify() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    write_dataset(&data);
    let out = train(&data, &t.path().join("artifacts"), &t.path().join("cache"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "train failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("cascade (retrieve + rank)") && stdout.contains("RMSE"),
        "{stdout}"
    );
    let v = cascade()
        .arg("verify")
        .arg("--artifact")
        .arg(t.path().join("artifacts"))
        .output()
        .unwrap();
    let vs = String::from_utf8_lossy(&v.stdout);
    assert!(
        v.status.success() && vs.starts_with("ok:") && vs.contains("90 items"),
        "{vs} {}",
        String::from_utf8_lossy(&v.stderr)
    );
    let artifacts = t.path().join("artifacts");
    let (ok, text) = predict(&artifacts, "u1", "5");
    assert!(ok, "{text}");
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.trim_start()
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .collect();
    assert_eq!(rows.len(), 5, "{text}");
    assert!(
        rows.iter().all(|r| r.contains("Item ")),
        "titles missing: {text}"
    );
    let (ok, text) = predict(&artifacts, "stranger", "3");
    assert!(ok && text.contains("unknown user"), "{text}");
    let (ok, text) = predict(&artifacts, "u1", "0");
    assert!(!ok && text.contains("num_results"), "{text}");

    serve_bench_and_sigterm(&artifacts, t.path());
    split_roles_serve(&artifacts, t.path());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `cascade serve` process and the lines it has logged so far.
struct Served {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    log: Vec<String>,
    url: String,
    /// Its Prometheus endpoint, from the start-up log.
    metrics_url: Option<String>,
}

impl Served {
    /// Start `cascade serve` with `args`; returns once it logs that it serves.
    fn start(artifacts: &Path, events: &Path, args: &[&str]) -> Self {
        use std::io::BufRead;
        let port = free_port();
        let mut child = cascade()
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .arg("--artifact")
            .arg(artifacts)
            .arg("--event-log")
            .arg(events)
            .args(args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let mut s = Self {
            child,
            lines,
            log: Vec::new(),
            url: format!("http://127.0.0.1:{port}"),
            metrics_url: None,
        };
        loop {
            match s.lines.recv_timeout(std::time::Duration::from_secs(60)) {
                Ok(l) if l.contains("serving cascade.v1") => return s,
                Ok(l) if l.contains("metrics on http://") => {
                    s.metrics_url = l.split_once("http://").map(|(_, rest)| {
                        let url: String = rest
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || ".:/".contains(*c))
                            .collect();
                        format!("http://{url}")
                    });
                    s.log.push(l);
                }
                Ok(l) => s.log.push(l),
                Err(_) => {
                    let _ = s.child.kill();
                    panic!("{args:?} never came up: {:#?}", s.log);
                }
            }
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cascade bench` against `url` for a second at `rate`: every request succeeds.
fn bench_without_errors(url: &str, artifacts: &Path, json: &Path, rate: u64) {
    let bench = cascade()
        .args(["bench", "--duration", "1", "--warmup", "0.2", "--rate"])
        .arg(rate.to_string())
        .arg("--endpoint")
        .arg(url)
        .arg("--artifact")
        .arg(artifacts)
        .arg("--json")
        .arg(json)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    let runs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(runs[0]["errors"], serde_json::json!({}), "{out}");
    assert!(runs[0]["ok"].as_u64().unwrap() >= rate * 9 / 10, "{out}");
}

/// The binary in split roles: retrieval + ranker + gateway processes answer
/// `cascade bench` load through the gateway without an error.
fn split_roles_serve(artifacts: &Path, tmp: &Path) {
    let retrieval = Served::start(artifacts, &tmp.join("r.log"), &["--role", "retrieval"]);
    let ranker = Served::start(artifacts, &tmp.join("k.log"), &["--role", "ranker"]);
    let gateway = Served::start(
        artifacts,
        &tmp.join("g.log"),
        &[
            "--role",
            "gateway",
            "--retrieval-endpoint",
            &retrieval.url,
            "--ranker-endpoint",
            &ranker.url,
        ],
    );
    bench_without_errors(&gateway.url, artifacts, &tmp.join("split.json"), 50);
}

/// `cascade serve` answers `cascade bench` load without errors, and SIGTERM
/// makes it drain and exit 0.
fn serve_bench_and_sigterm(artifacts: &Path, tmp: &Path) {
    let mut server = Served::start(artifacts, &tmp.join("events.log"), &[]);
    bench_without_errors(&server.url, artifacts, &tmp.join("bench.json"), 100);
    let kill = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "no exit after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    while let Ok(l) = server
        .lines
        .recv_timeout(std::time::Duration::from_millis(500))
    {
        server.log.push(l);
    }
    assert!(status.success(), "exit {status:?}: {:#?}", server.log);
    assert!(
        server.log.iter().any(|l| l.contains("drained")),
        "{:#?}",
        server.log
    );
}

fn predict(artifacts: &Path, user: &str, k: &str) -> (bool, String) {
    let out = cascade()
        .args(["predict", "--user", user, "-k", k, "--artifact"])
        .arg(artifacts)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn bad_row_names_file_and_line_and_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    write_dataset(&data);
    let p = data.join("interactions.csv");
    let mut text = std::fs::read_to_string(&p).unwrap();
    text.push_str("u1,not-an-item,4,1\n");
    let line = text.lines().count();
    std::fs::write(&p, text).unwrap();
    let artifacts = t.path().join("artifacts");
    let out = train(&data, &artifacts, &t.path().join("cache"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("interactions.csv:{line}:")) && stderr.contains("unknown item_id"),
        "{stderr}"
    );
    assert!(
        !artifacts.exists(),
        "no artifact may be written on bad input"
    );
}

#[test]
fn unknown_fetch_target_is_an_error() {
    let out = cascade().args(["fetch", "imagenet"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown fetch target"));
}
