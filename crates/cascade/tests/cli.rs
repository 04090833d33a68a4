//! The real binary end to end on a small planted dataset with the real MiniLM:
//! train writes a verifiable artifact; bad input stops with file:line and
//! leaves no artifact behind.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

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
        .args(["train", "--quiet", "--rating-eval", "--candidates", "30"])
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
    assert!(ok && text.contains("no personal signal"), "{text}");
    let out = cascade()
        .args([
            "predict",
            "--user",
            "stranger",
            "-k",
            "3",
            "--context",
            "i1,i2",
        ])
        .arg("--artifact")
        .arg(&artifacts)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("personalised by context"),
        "{text}"
    );
    assert!(!text.contains(" i1 ") && !text.contains(" i2 "), "{text}");
    let (ok, text) = predict(&artifacts, "u1", "0");
    assert!(!ok && text.contains("num_results"), "{text}");

    serve_bench_and_sigterm(&artifacts, t.path());
    let gateway_scrape = split_roles_serve(&artifacts, t.path());
    observed_serve(&artifacts, t.path(), &gateway_scrape);
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
        Self::start_env(artifacts, events, args, &[])
    }

    fn start_env(artifacts: &Path, events: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
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
            .envs(env.iter().copied())
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
                            .take_while(|c| c.is_ascii_alphanumeric() || ".:".contains(*c))
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
    // The generator's own CPU is measured, and is a fraction of the cores it could use.
    let cores = runs[0]["generator_cpu_cores"].as_f64().unwrap();
    let max = std::thread::available_parallelism().map_or(64, |n| n.get()) as f64;
    assert!(cores > 0.0 && cores <= max + 0.1, "{cores} cores\n{out}");
    assert!(out.contains("gen cpu"), "{out}");
}

/// The binary in split roles: retrieval + ranker + gateway processes answer
/// `cascade bench` load through the gateway without an error. Returns the
/// gateway's metrics scrape.
fn split_roles_serve(artifacts: &Path, tmp: &Path) -> String {
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
    let scrape = get(&format!(
        "{}/metrics",
        gateway.metrics_url.as_ref().unwrap()
    ));
    assert!(
        scrape.contains("grpc_client_handled_total{grpc_code=\"OK\",grpc_method=\"Rank\""),
        "{scrape}"
    );
    scrape
}

fn get(url: &str) -> String {
    ureq::get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .into_body()
        .read_to_string()
        .unwrap()
}

/// An OTLP/HTTP receiver (`POST /v1/traces`) on its own runtime: its URL and
/// the spans it got, as (service.name, span).
type Received =
    std::sync::Arc<std::sync::Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>>;

fn otlp_http_receiver() -> (tokio::runtime::Runtime, String, Received) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let got: Received = Default::default();
    let sink = got.clone();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                    return axum::http::StatusCode::BAD_REQUEST;
                };
                let mut all = sink.lock().unwrap();
                for rs in req.resource_spans {
                    let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
                    let text = |k: &str| {
                        attrs.iter().find(|kv| kv.key == k).and_then(|kv| {
                            match kv.value.clone()?.value? {
                                Value::StringValue(s) => Some(s),
                                _ => None,
                            }
                        })
                    };
                    // "service.name|deployment.environment" to check both env inputs.
                    let who = format!(
                        "{}|{}",
                        text("service.name").unwrap_or_default(),
                        text("deployment.environment").unwrap_or_default()
                    );
                    for ss in rs.scope_spans {
                        all.extend(ss.spans.into_iter().map(|s| (who.clone(), s)));
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    rt.spawn(async move { axum::serve(listener, app).await });
    (rt, url, got)
}

/// The observability an SRE relies on, with real receivers: a Prometheus
/// server scrapes `serve` under `cascade bench` load and its query API
/// returns the request rate and p99; `promtool` accepts the exposition;
/// every series the shipped Grafana dashboard queries exists; traces reach
/// an OTLP/HTTP receiver configured only through `OTEL_*` variables, and the
/// JSON request logs carry the exported trace IDs.
fn observed_serve(artifacts: &Path, tmp: &Path, gateway_scrape: &str) {
    let required = std::env::var_os("CASCADE_REQUIRE_PROMETHEUS").is_some();
    let have = |b: &str| {
        Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !(have("prometheus") && have("promtool")) {
        assert!(
            !required,
            "prometheus/promtool not installed (.ci/run installs them)"
        );
        eprintln!("SKIPPED the Prometheus part: prometheus/promtool not installed");
        return;
    }
    let (_rt, otlp_url, received) = otlp_http_receiver();
    let mut server = Served::start_env(
        artifacts,
        &tmp.join("observed.log"),
        &["--log-format", "json"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_url.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_SERVICE_NAME", "cascade-cli-test"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=ci"),
            ("RUST_LOG", "info,cascade_server=debug"),
        ],
    );
    let metrics_url = server.metrics_url.clone().expect("metrics address logged");
    let target = metrics_url.trim_start_matches("http://");
    let prom_port = free_port();
    let cfg = tmp.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: cascade\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let prom_guard = Kill(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                tmp.join("prom").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let api = format!("http://127.0.0.1:{prom_port}");
    let t0 = std::time::Instant::now();
    while ureq::get(&format!("{api}/-/ready")).call().is_err() {
        assert!(t0.elapsed().as_secs() < 60, "prometheus never became ready");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    let query = |q: &str| -> f64 {
        let body = ureq::get(&format!("{api}/api/v1/query"))
            .query("query", q)
            .call()
            .unwrap()
            .into_body()
            .read_to_string()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{q}: {body}");
        let result = v["data"]["result"].as_array().unwrap();
        assert_eq!(result.len(), 1, "{q}: one series expected: {body}");
        result[0]["value"][1].as_str().unwrap().parse().unwrap()
    };
    // Prometheus applies discovered targets a few seconds after start:
    // load only once the first scrape has landed.
    let body = |q: &str| {
        ureq::get(&format!("{api}/api/v1/query"))
            .query("query", q)
            .call()
            .unwrap()
            .into_body()
            .read_to_string()
            .unwrap()
    };
    while !body(r#"up{job="cascade"}"#).contains(r#""1"]"#) {
        assert!(
            t0.elapsed().as_secs() < 60,
            "Prometheus never scraped the server"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let json = tmp.join("observed.json");
    let bench = cascade()
        .args([
            "bench",
            "--duration",
            "5",
            "--warmup",
            "0.5",
            "--rate",
            "100",
        ])
        .arg("--endpoint")
        .arg(&server.url)
        .arg("--artifact")
        .arg(artifacts)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        bench.status.success(),
        "{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    let runs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let ok = runs[0]["ok"].as_u64().unwrap();
    // Wait until a scrape after the load has landed: Prometheus holds every
    // answered Predict.
    // (`or vector(0)`: before the first such scrape the series is absent.)
    let t1 = std::time::Instant::now();
    while query(
        r#"sum(grpc_server_handled_total{job="cascade",grpc_method="Predict",grpc_code="OK"}) or vector(0)"#,
    ) < ok as f64
    {
        assert!(
            t1.elapsed().as_secs() < 30,
            "Prometheus never scraped the post-load counters"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let rate = query(
        r#"sum(rate(grpc_server_handled_total{job="cascade",grpc_method="Predict",grpc_code="OK"}[8s]))"#,
    );
    assert!(
        (20.0..=200.0).contains(&rate),
        "Predict rate {rate}/s under 100 rps"
    );
    let p99 = query(
        r#"histogram_quantile(0.99, sum by (le) (rate(grpc_server_handling_seconds_bucket{job="cascade",grpc_method="Predict"}[8s])))"#,
    );
    assert!(p99 > 0.0 && p99 < 1.0, "p99 {p99} s");
    let stage_p99 = query(
        r#"histogram_quantile(0.99, sum by (le) (rate(cascade_stage_duration_seconds_bucket{job="cascade",stage="rank_forward"}[8s])))"#,
    );
    assert!(
        stage_p99 > 0.0 && stage_p99 <= p99,
        "rank_forward p99 {stage_p99} vs {p99}"
    );
    drop(prom_guard);

    let scrape = get(&format!("{metrics_url}/metrics"));
    let file = tmp.join("scrape.txt");
    std::fs::write(&file, &scrape).unwrap();
    let lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    dashboard_series_exist(&(scrape + gateway_scrape));

    // SIGTERM flushes the queued spans before exit.
    let kill = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = server.child.wait().unwrap();
    assert!(status.success());
    while let Ok(l) = server
        .lines
        .recv_timeout(std::time::Duration::from_millis(500))
    {
        server.log.push(l);
    }
    let spans = received.lock().unwrap().clone();
    let predict_spans: Vec<_> = spans
        .iter()
        .filter(|(_, s)| s.name == "cascade.v1.Cascade/Predict")
        .collect();
    assert!(
        predict_spans.len() as u64 >= ok,
        "{} Predict spans for {ok} answered requests",
        predict_spans.len()
    );
    assert!(spans.iter().all(|(who, _)| who == "cascade-cli-test|ci"));
    let trace_ids: std::collections::HashSet<String> = predict_spans
        .iter()
        .map(|(_, s)| s.trace_id.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    let logged: Vec<serde_json::Value> = server
        .log
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["fields"]["message"] == "rpc finished")
        .collect();
    assert!(
        !logged.is_empty(),
        "no JSON request logs: {:#?}",
        server.log
    );
    let matched = logged
        .iter()
        .filter(|v| {
            v["fields"]["trace_id"]
                .as_str()
                .is_some_and(|t| trace_ids.contains(t))
        })
        .count();
    assert!(
        matched as u64 >= ok,
        "{matched} of {} request log lines carry an exported trace id",
        logged.len()
    );
}

/// Every metric the shipped dashboard queries is in the scrapes.
fn dashboard_series_exist(scrape: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text =
        std::fs::read_to_string(root.join("charts/cascade/dashboards/cascade.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut word = String::new();
            for c in expr.chars().chain(std::iter::once(' ')) {
                if c.is_ascii_alphanumeric() || c == '_' {
                    word.push(c);
                    continue;
                }
                let w = std::mem::take(&mut word);
                if ["grpc_", "cascade_", "process_"]
                    .iter()
                    .any(|p| w.starts_with(p))
                    && !["grpc_method", "grpc_code", "grpc_service", "grpc_type"]
                        .contains(&w.as_str())
                {
                    names.insert(w);
                }
            }
        }
    }
    assert!(names.len() >= 12, "{names:?}");
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| {
            !scrape
                .lines()
                .any(|l| l.starts_with(n.as_str()) && l[n.len()..].starts_with(['{', ' ']))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "dashboard queries absent series: {missing:?}"
    );
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
