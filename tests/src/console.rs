//! The console's test harness: a cluster of its own whose pg_hba.conf makes the signing-in
//! roles prove their password (scram-sha-256 over 127.0.0.1), a real picloud-console process,
//! and a small cookie-carrying HTTP client for its API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{eventually, scratch_dir};

/// The password every test role gets.
pub const PASSWORD: &str = "console-test-password";

/// A cluster with picloud preloaded where `postgres` is trusted (the harness's own
/// connections) and every other role must sign in with scram-sha-256.
pub struct ScramCluster {
    pub port: u16,
    pub db: String,
    data: PathBuf,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl ScramCluster {
    pub fn start(tag: &str, port: u16) -> ScramCluster {
        let dir = scratch_dir(tag);
        let data = dir.join("data");
        let db = "picloud_console".to_string();
        let script = root().join("scripts/cluster.sh");
        let data_text = data.to_string_lossy().into_owned();
        let status = Command::new("bash")
            .arg(&script)
            .args(["start", &data_text, &port.to_string(), &db])
            .status()
            .expect("run scripts/cluster.sh");
        assert!(status.success(), "scripts/cluster.sh start failed");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        )
        .expect("write pg_hba.conf");
        let cluster = ScramCluster { port, db, data };
        cluster
            .superuser()
            .batch_execute("SELECT pg_reload_conf(); CREATE EXTENSION IF NOT EXISTS picloud")
            .expect("reload and create the extension");
        cluster
    }

    /// The data directory (owned by the postgres OS user).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Replaces pg_hba.conf and reloads.
    pub fn set_hba(&self, text: &str) {
        std::fs::write(self.data.join("pg_hba.conf"), text).expect("write pg_hba.conf");
        self.superuser()
            .batch_execute("SELECT pg_reload_conf()")
            .expect("reload");
    }

    /// `postgres`, trusted: sets up what the tests look at.
    pub fn superuser(&self) -> postgres::Client {
        let mut client = postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname={}",
                self.port, self.db
            ),
            postgres::NoTls,
        )
        .expect("connect as postgres");
        client
            .batch_execute("SET search_path = public, picloud")
            .expect("search_path");
        client
    }

    /// A client signed in as `role` with its password (over scram).
    pub fn connect_as(&self, role: &str) -> postgres::Client {
        let mut client = postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user={role} password={PASSWORD} dbname={}",
                self.port, self.db
            ),
            postgres::NoTls,
        )
        .unwrap_or_else(|e| panic!("connect as {role}: {e}"));
        client
            .batch_execute("SET search_path = public, picloud")
            .expect("search_path");
        client
    }

    /// The connection string the console and the supervisor are given (no user: the console
    /// connects as whoever signs in).
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={} sslmode=disable",
            self.port, self.db
        )
    }

    /// Creates a login role with the test password.
    pub fn create_role(&self, role: &str) {
        self.superuser()
            .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'"))
            .expect("create role");
    }
}

impl Drop for ScramCluster {
    fn drop(&mut self) {
        Command::new("bash")
            .arg(root().join("scripts/cluster.sh"))
            .arg("stop")
            .arg(&self.data)
            .status()
            .ok();
    }
}

pub fn console_bin() -> PathBuf {
    std::env::var_os("PICLOUD_CONSOLE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/debug/picloud-console"))
}

/// A running picloud-console, killed when dropped.
pub struct Console {
    child: Child,
    pub base: String,
    pub log_path: PathBuf,
}

impl Console {
    /// Starts the console on 127.0.0.1:`port` and waits until it answers.
    pub fn start(database_url: &str, port: u16, extra: &[&str]) -> Console {
        let mut console = Console::spawn(database_url, &format!("127.0.0.1:{port}"), extra);
        let scheme = if extra.contains(&"--console-tls-cert") {
            "https"
        } else {
            "http"
        };
        console.base = format!("{scheme}://127.0.0.1:{port}");
        let up = eventually(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(
            up,
            "the console did not start listening; its log:\n{}",
            console.log()
        );
        console
    }

    /// Starts the console without waiting for it (for start-up refusals).
    pub fn spawn(database_url: &str, listen: &str, extra: &[&str]) -> Console {
        let log_dir = root().join("target/it-logs");
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let log_path = log_dir.join(format!(
            "console-{}-{}.log",
            listen.replace([':', '.'], "_"),
            std::process::id()
        ));
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(console_bin())
            .arg("--database-url")
            .arg(database_url)
            .arg("--listen")
            .arg(listen)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start picloud-console (build it first: cargo build -p picloud-console)");
        Console {
            child,
            base: String::new(),
            log_path,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        eventually(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// An API client that keeps the session cookie and CSRF token it signed in with.
pub struct ApiClient {
    http: reqwest::blocking::Client,
    pub base: String,
    pub cookie: Option<String>,
    pub csrf: Option<String>,
}

/// An answer: its status and JSON body (Null when the body is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
    pub set_cookie: Vec<String>,
}

impl Answer {
    pub fn sqlstate(&self) -> Option<&str> {
        self.body.get("sqlstate").and_then(|s| s.as_str())
    }
    pub fn code(&self) -> Option<&str> {
        self.body.get("code").and_then(|s| s.as_str())
    }
}

impl ApiClient {
    pub fn new(base: &str) -> ApiClient {
        ApiClient {
            http: reqwest::blocking::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .danger_accept_invalid_certs(true)
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            base: base.to_string(),
            cookie: None,
            csrf: None,
        }
    }

    pub fn signed_in(base: &str, role: &str) -> ApiClient {
        let mut client = ApiClient::new(base);
        let answer = client.sign_in(role, PASSWORD);
        assert_eq!(answer.status, 200, "sign in as {role}: {answer:?}");
        client
    }

    pub fn sign_in(&mut self, role: &str, password: &str) -> Answer {
        let answer = self.send(
            self.http
                .post(format!("{}/api/session", self.base))
                .json(&serde_json::json!({"role": role, "password": password})),
        );
        if answer.status == 200 {
            self.cookie = answer
                .set_cookie
                .iter()
                .find(|c| c.starts_with("picloud_session="))
                .and_then(|c| c.split(';').next())
                .map(str::to_string);
            self.csrf = answer.body["csrf_token"].as_str().map(str::to_string);
        }
        answer
    }

    fn send(&self, mut request: reqwest::blocking::RequestBuilder) -> Answer {
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().expect("request to the console");
        let status = response.status().as_u16();
        let set_cookie = response
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        let text = response.text().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        Answer {
            status,
            body,
            set_cookie,
        }
    }

    pub fn get(&self, path: &str) -> Answer {
        self.send(self.http.get(format!("{}{path}", self.base)))
    }

    /// The raw text of a GET (pages).
    pub fn get_text(&self, path: &str) -> (u16, String) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().expect("request to the console");
        (
            response.status().as_u16(),
            response.text().unwrap_or_default(),
        )
    }

    /// POST with the session's CSRF token.
    pub fn post(&self, path: &str, body: serde_json::Value) -> Answer {
        let mut request = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(token) = &self.csrf {
            request = request.header("x-csrf-token", token);
        }
        self.send(request)
    }

    /// POST without any CSRF token.
    pub fn post_without_csrf(&self, path: &str, body: serde_json::Value) -> Answer {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
    }

    pub fn post_form(&self, path: &str, form: &[(&str, &str)]) -> (u16, String) {
        let mut request = self.http.post(format!("{}{path}", self.base)).form(form);
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().expect("request to the console");
        (
            response.status().as_u16(),
            response.text().unwrap_or_default(),
        )
    }

    pub fn delete(&self, path: &str) -> Answer {
        let mut request = self.http.delete(format!("{}{path}", self.base));
        if let Some(token) = &self.csrf {
            request = request.header("x-csrf-token", token);
        }
        self.send(request)
    }
}

/// A chromedriver process (Debian's `chromium-driver`), killed when dropped.
pub struct Chromedriver {
    child: Child,
    pub port: u16,
}

impl Chromedriver {
    /// Starts chromedriver on `port`. It binds without SO_REUSEADDR, so right after an earlier
    /// run the port can be held by that run's connections in TIME_WAIT for up to a minute:
    /// it is tried again until it binds, for at most 90 s.
    pub fn start(port: u16) -> Chromedriver {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let mut child = Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver (scripts/setup.sh installs chromium-driver)");
            let mut exited = false;
            let up = eventually(Duration::from_secs(20), || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            if up && !exited {
                return Chromedriver { child, port };
            }
            child.kill().ok();
            child.wait().ok();
            assert!(
                std::time::Instant::now() < deadline,
                "chromedriver did not start on port {port}"
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A headless Chromium session driven over WebDriver. Its calls block (the tests' Postgres
/// clients are blocking too, and may not run inside an async runtime).
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<fantoccini::Client>,
    base: String,
}

impl Browser {
    pub fn open(driver: &Chromedriver, base: &str) -> Browser {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        // The WebDriver client's https support needs a process-wide provider; already
        // installed is fine. ring, as everywhere in picloud (supervisor/src/tls.rs says why).
        #[allow(deprecated)]
        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,900", "--lang=en-US"],
            }),
        );
        let url = format!("http://127.0.0.1:{}", driver.port);
        let client = rt
            .block_on(async {
                fantoccini::ClientBuilder::rustls()
                    .expect("webdriver client")
                    .capabilities(caps)
                    .connect(&url)
                    .await
            })
            .expect("open a Chromium session");
        Browser {
            rt,
            client: Some(client),
            base: base.to_string(),
        }
    }

    fn c(&self) -> &fantoccini::Client {
        self.client.as_ref().expect("browser open")
    }

    pub fn goto(&self, path: &str) {
        let url = format!("{}{path}", self.base);
        self.rt
            .block_on(self.c().goto(&url))
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    pub fn path(&self) -> String {
        let url = self
            .rt
            .block_on(self.c().current_url())
            .expect("current url");
        let mut path = url.path().to_string();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        path
    }

    fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.rt
            .block_on(self.c().find(fantoccini::Locator::Css(css)))
            .unwrap_or_else(|e| panic!("find {css} on {}: {e}\n{}", self.path(), self.source()))
    }

    pub fn exists(&self, css: &str) -> bool {
        self.rt
            .block_on(self.c().find_all(fantoccini::Locator::Css(css)))
            .map(|v| !v.is_empty())
            .unwrap_or(false)
    }

    pub fn count(&self, css: &str) -> usize {
        self.rt
            .block_on(self.c().find_all(fantoccini::Locator::Css(css)))
            .map(|v| v.len())
            .unwrap_or(0)
    }

    /// Clicks and waits for the page the click leads to (every click of these tests submits
    /// a form or follows a link): until the old page's root element is gone and the new one
    /// has loaded, at most 10 s.
    pub fn click(&self, css: &str) {
        let old_root = self.find("html");
        let el = self.find(css);
        self.rt
            .block_on(el.click())
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
        eventually(Duration::from_secs(10), || {
            self.rt.block_on(old_root.text()).is_err()
        });
        eventually(Duration::from_secs(10), || {
            self.rt
                .block_on(self.c().execute("return document.readyState", Vec::new()))
                .map(|state| state == "complete")
                .unwrap_or(false)
        });
    }

    pub fn fill(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.rt.block_on(el.clear()).ok();
        self.rt
            .block_on(el.send_keys(text))
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    pub fn select(&self, css: &str, value: &str) {
        let el = self.find(css);
        self.rt
            .block_on(el.select_by_value(value))
            .unwrap_or_else(|e| panic!("select {value} in {css}: {e}"));
    }

    pub fn text(&self, css: &str) -> String {
        let el = self.find(css);
        self.rt
            .block_on(el.text())
            .unwrap_or_else(|e| panic!("text of {css}: {e}"))
    }

    pub fn source(&self) -> String {
        self.rt.block_on(self.c().source()).unwrap_or_default()
    }

    /// The page's visible text.
    pub fn body_text(&self) -> String {
        self.text("body")
    }

    pub fn set_size(&self, width: u32, height: u32) {
        self.rt
            .block_on(self.c().set_window_size(width, height))
            .expect("window size");
    }

    /// Saves a PNG of the page under target/console-screenshots/, or under docs/console/ (the
    /// README's pictures) with PICLOUD_UPDATE_SCREENSHOTS=1, so an ordinary test run leaves the
    /// committed pictures alone.
    pub fn screenshot(&self, name: &str) {
        let png = self.rt.block_on(self.c().screenshot()).expect("screenshot");
        let dir = match std::env::var("PICLOUD_UPDATE_SCREENSHOTS").as_deref() {
            Ok("1") => root().join("docs/console"),
            _ => root().join("target/console-screenshots"),
        };
        std::fs::create_dir_all(&dir).expect("screenshot directory");
        std::fs::write(dir.join(name), png).expect("save screenshot");
    }

    /// Signs in with the keyboard alone: type the role, Tab to the password, Enter.
    pub fn sign_in_with_keyboard(&self, role: &str, password: &str) {
        self.goto("/login");
        let old_root = self.find("html");
        let field = self.find("#role");
        self.rt
            .block_on(field.send_keys(&format!("{role}\u{E004}{password}\u{E007}")))
            .expect("type");
        eventually(Duration::from_secs(10), || {
            self.rt.block_on(old_root.text()).is_err()
        });
        eventually(Duration::from_secs(10), || self.exists("main"));
    }

    /// Signs in through the form.
    pub fn sign_in(&self, role: &str, password: &str) {
        self.goto("/login");
        self.fill("#role", role);
        self.fill("#password", password);
        self.click("#sign-in");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            self.rt.block_on(client.close()).ok();
        }
    }
}

impl ApiClient {
    /// A GET's status, the console's own time (Server-Timing) and the round trip, in ms.
    pub fn timed_get(&self, path: &str) -> (u16, f64, f64) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let start = std::time::Instant::now();
        let response = request.send().expect("request to the console");
        let status = response.status().as_u16();
        let server = response
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split("dur=").nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        response.bytes().ok();
        (status, server, start.elapsed().as_secs_f64() * 1000.0)
    }
}
